// CPU kernels of chain_verify and chain_verify_greedy (contract: "Chain verification";
// executable specification: specops/reference/chain.py).
//
// chain_verify reads per call: the B*K entries p[b, j, x_j] and q[b, j, x_j] of the accept
// tests, then one full row per batch row (the residual p - q at the first rejection, or the
// bonus row), which it sums in parallel chunks and rescans in one chunk only. It writes B*(K+1)
// int64 tokens and B int32 counts. chain_verify_greedy reads the rows 0..num_accepted of each
// batch row, one depth at a time, each row split into parallel chunks.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <optional>
#include <tuple>
#include <vector>

#include "argmax_cpu.h"
#include "checks.h"
#include "draw_cpu.h"
#include "philox.h"
#include "rows_cpu.h"
#include "vocab_chunks.h"

namespace specops {
namespace {

// Shapes shared by both ops: rows [B, K+1, V], draft_tokens [B, K], draft_lens [B].
void check_chain_shapes(const char* op, const char* rows_name, const at::Tensor& rows,
                        const at::Tensor& draft_tokens, const at::Tensor& draft_lens) {
  TORCH_CHECK_VALUE(rows.size(1) >= 1, op, ": ", rows_name,
                    ".shape[1] must be >= 1 (K+1 rows), got shape ", rows.sizes());
  TORCH_CHECK_VALUE(rows.size(2) >= 1, op, ": ", rows_name,
                    ".shape[2] must be >= 1 (V), got shape ", rows.sizes());
  const int64_t batch = rows.size(0), num_slots = rows.size(1) - 1;
  check_dim_size(draft_tokens, op, "draft_tokens", 0, batch, "B");
  check_dim_size(draft_tokens, op, "draft_tokens", 1, num_slots, "K");
  check_dim_size(draft_lens, op, "draft_lens", 0, batch, "B");
}

// Cheap checks (O(B*K)): lengths in 0..K, draft tokens before each row's length in 0..V-1.
void check_lens_and_tokens(const char* op, const int32_t* lens, const int64_t* tokens,
                           int64_t batch, int64_t num_slots, int64_t vocab) {
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK_VALUE(lens[b] >= 0 && lens[b] <= num_slots, op, ": draft_lens[", b, "] = ",
                      lens[b], " is outside 0..", num_slots, " (K)");
    for (int64_t j = 0; j < lens[b]; ++j) {
      const int64_t x = tokens[b * num_slots + j];
      TORCH_CHECK_VALUE(x >= 0 && x < vocab, op, ": draft_tokens[", b, ", ", j, "] = ", x,
                        " is outside 0..", vocab - 1, " (V-1); draft_lens[", b, "] = ", lens[b]);
    }
  }
}

// Full checks: every probability row a row's walk could read must be a distribution.
// `last_row(b)` is the last row index checked for batch row b. Reports the first bad row.
template <class LastRow>
void check_prob_rows(const char* op, const char* name, const Rows<float>& rows, int64_t batch,
                     int64_t num_rows, int64_t vocab, const LastRow& last_row) {
  std::vector<RowFault> faults(batch * num_rows, RowFault::kNone);
  at::parallel_for(0, batch * num_rows, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t b = t / num_rows, r = t % num_rows;
      if (r <= last_row(b)) faults[t] = prob_row_fault(rows.row(b, r), vocab);
    }
  });
  for (int64_t t = 0; t < batch * num_rows; ++t) {
    TORCH_CHECK_VALUE(faults[t] == RowFault::kNone, op, ": ", name, "[", t / num_rows, ", ",
                      t % num_rows, "] ", row_fault_text(faults[t]),
                      " (full checks need every row up to draft_lens to be a distribution)");
  }
}

int64_t clamped_len(int32_t len, int64_t num_slots) {
  return std::min<int64_t>(std::max<int32_t>(len, 0), num_slots);
}

// tokens[b] = accepted drafts, the final token, then -1 (already filled).
void emit_row(int64_t* out, const int64_t* drafts, int64_t num_accepted, int64_t final_token) {
  std::copy(drafts, drafts + num_accepted, out);
  out[num_accepted] = final_token;
}

std::tuple<at::Tensor, at::Tensor> chain_verify_cpu(
    const at::Tensor& target_probs, const at::Tensor& draft_tokens,
    const std::optional<at::Tensor>& draft_probs, const at::Tensor& draft_lens,
    const at::Tensor& seeds, const at::Tensor& positions) {
  constexpr const char* op = "chain_verify";
  check_tensor(target_probs, op, "target_probs", at::kFloat, 3);
  check_tensor(draft_tokens, op, "draft_tokens", at::kLong, 2);
  if (draft_probs) check_tensor(*draft_probs, op, "draft_probs", at::kFloat, 3);
  check_tensor(draft_lens, op, "draft_lens", at::kInt, 1);
  check_tensor(seeds, op, "seeds", at::kLong, 1);
  check_tensor(positions, op, "positions", at::kLong, 1);
  check_chain_shapes(op, "target_probs", target_probs, draft_tokens, draft_lens);
  const int64_t batch = target_probs.size(0), num_slots = target_probs.size(1) - 1;
  const int64_t vocab = target_probs.size(2);
  if (draft_probs) {
    check_dim_size(*draft_probs, op, "draft_probs", 0, batch, "B");
    check_dim_size(*draft_probs, op, "draft_probs", 1, num_slots, "K");
    check_dim_size(*draft_probs, op, "draft_probs", 2, vocab, "V");
  }
  check_dim_size(seeds, op, "seeds", 0, batch, "B");
  check_dim_size(positions, op, "positions", 0, batch, "B");

  const at::Tensor tokens_c = draft_tokens.contiguous(), lens_c = draft_lens.contiguous();
  const at::Tensor seeds_c = seeds.contiguous(), positions_c = positions.contiguous();
  const int64_t* drafts = tokens_c.const_data_ptr<int64_t>();
  const int32_t* lens = lens_c.const_data_ptr<int32_t>();
  const int64_t* seed = seeds_c.const_data_ptr<int64_t>();
  const int64_t* position = positions_c.const_data_ptr<int64_t>();
  const Rows<float> p(target_probs);
  const std::optional<Rows<float>> q =
      draft_probs ? std::optional<Rows<float>>(Rows<float>(*draft_probs)) : std::nullopt;

  const CheckLevel level = check_level();
  if (level >= CheckLevel::kCheap) {
    check_lens_and_tokens(op, lens, drafts, batch, num_slots, vocab);
    for (int64_t b = 0; b < batch; ++b) {
      TORCH_CHECK_VALUE(position[b] >= 0, op, ": positions[", b, "] = ", position[b],
                        " must be >= 0");
    }
  }
  if (level >= CheckLevel::kFull) {
    check_prob_rows(op, "target_probs", p, batch, num_slots + 1, vocab,
                    [&](int64_t b) { return int64_t{lens[b]}; });
    if (q) {
      check_prob_rows(op, "draft_probs", *q, batch, num_slots, vocab,
                      [&](int64_t b) { return int64_t{lens[b]} - 1; });
    }
  }

  // Phase 1, O(B*K): accept tests, then where each row's output token is drawn from.
  std::vector<int64_t> num_accepted(batch);
  std::vector<ResidualRow> from(batch);
  std::vector<float> u_draw(batch);
  std::vector<char> rejected(batch);
  at::parallel_for(0, batch, 64, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const int64_t len = clamped_len(lens[b], num_slots);
      const int64_t* x = drafts + b * num_slots;
      // Positions wrap like int64 tensors do (only reachable with checks off).
      const uint64_t slot0 = uint64_t(position[b]) + 1;
      int64_t n = 0;
      for (; n < len; ++n) {
        const bool valid = x[n] >= 0 && x[n] < vocab;
        const float px = valid ? p.row(b, n)[x[n]] : 0.0f;
        const float qx = !valid ? 0.0f : q ? q->row(b, n)[x[n]] : 1.0f;
        const float u = philox_uniform(seed[b], int64_t(slot0 + n), 0, kPurposeAccept);
        if (!(u * qx < px)) break;
      }
      num_accepted[b] = n;
      rejected[b] = n < len;
      ResidualRow row;
      row.p = p.row(b, n);
      if (rejected[b]) {
        if (q) {
          row.q = q->row(b, n);
        } else if (x[n] >= 0 && x[n] < vocab) {
          row.one_hot = x[n];
        }
      }
      from[b] = row;
      u_draw[b] = philox_uniform(seed[b], int64_t(slot0 + n), 0, kPurposeDraw);
    }
  });

  // Phase 2: chunk sums of every output row, parallel over (row, chunk).
  const int64_t chunks = num_vocab_chunks(vocab);
  std::vector<double> chunk_sums(batch * chunks);
  parallel_for_vocab_chunks(batch, vocab, [&](int64_t b, int64_t c, int64_t begin, int64_t end) {
    chunk_sums[b * chunks + c] = from[b].sum(begin, end);
  });

  // A residual that lost all its mass to rounding is replaced by sanitize(p) (rare).
  std::vector<int64_t> refill;
  for (int64_t b = 0; b < batch; ++b) {
    if (!rejected[b]) continue;
    double total = 0;
    for (int64_t c = 0; c < chunks; ++c) total += chunk_sums[b * chunks + c];
    if (total == 0) {
      from[b].q = nullptr;
      from[b].one_hot = -1;
      refill.push_back(b);
    }
  }
  parallel_for_vocab_chunks(int64_t(refill.size()), vocab,
                            [&](int64_t r, int64_t c, int64_t begin, int64_t end) {
                              const int64_t b = refill[r];
                              chunk_sums[b * chunks + c] = from[b].sum(begin, end);
                            });

  // Phase 3: each row rescans the one chunk that holds its threshold, and emits.
  at::Tensor tokens = at::full({batch, num_slots + 1}, -1, target_probs.options().dtype(at::kLong));
  at::Tensor accepted = at::empty({batch}, target_probs.options().dtype(at::kInt));
  int64_t* out_tokens = tokens.data_ptr<int64_t>();
  int32_t* out_accepted = accepted.data_ptr<int32_t>();
  at::parallel_for(0, batch, 4, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const int64_t final_token =
          draw_from_chunk_sums(from[b], chunk_sums.data() + b * chunks, vocab, u_draw[b]);
      emit_row(out_tokens + b * (num_slots + 1), drafts + b * num_slots, num_accepted[b],
               final_token);
      out_accepted[b] = int32_t(num_accepted[b]);
    }
  });
  return {tokens, accepted};
}

// Greedy: walk depth by depth; at each depth, the argmax of every still-accepting row's logits
// row, each split into parallel chunks. Rows past a row's output slot are never read.
template <class T>
void greedy_walk(const Rows<T>& logits, const int64_t* drafts, const int32_t* lens, int64_t batch,
                 int64_t num_slots, int64_t vocab, int64_t* out_tokens, int32_t* out_accepted) {
  const int64_t chunks = num_vocab_chunks(vocab);
  std::vector<int64_t> active(batch);
  for (int64_t b = 0; b < batch; ++b) active[b] = b;
  std::vector<ChunkMax> parts;
  for (int64_t depth = 0; !active.empty(); ++depth) {
    parts.resize(active.size() * chunks);
    parallel_for_vocab_chunks(int64_t(active.size()), vocab,
                              [&](int64_t r, int64_t c, int64_t begin, int64_t end) {
                                parts[r * chunks + c] =
                                    chunk_argmax(logits.row(active[r], depth), begin, end);
                              });
    std::vector<int64_t> still;
    for (size_t r = 0; r < active.size(); ++r) {
      const int64_t b = active[r];
      const int64_t argmax = combine_argmax(parts.data() + r * chunks, chunks);
      const int64_t* x = drafts + b * num_slots;
      if (depth < clamped_len(lens[b], num_slots) && x[depth] == argmax) {
        still.push_back(b);
      } else {
        emit_row(out_tokens + b * (num_slots + 1), x, depth, argmax);
        out_accepted[b] = int32_t(depth);
      }
    }
    active.swap(still);
  }
}

std::tuple<at::Tensor, at::Tensor> chain_verify_greedy_cpu(const at::Tensor& target_logits,
                                                           const at::Tensor& draft_tokens,
                                                           const at::Tensor& draft_lens) {
  constexpr const char* op = "chain_verify_greedy";
  check_float_logits(target_logits, op, "target_logits");
  check_layout(target_logits, op, "target_logits", 3);
  check_tensor(draft_tokens, op, "draft_tokens", at::kLong, 2);
  check_tensor(draft_lens, op, "draft_lens", at::kInt, 1);
  check_chain_shapes(op, "target_logits", target_logits, draft_tokens, draft_lens);
  const int64_t batch = target_logits.size(0), num_slots = target_logits.size(1) - 1;
  const int64_t vocab = target_logits.size(2);

  const at::Tensor tokens_c = draft_tokens.contiguous(), lens_c = draft_lens.contiguous();
  const int64_t* drafts = tokens_c.const_data_ptr<int64_t>();
  const int32_t* lens = lens_c.const_data_ptr<int32_t>();
  const CheckLevel level = check_level();
  if (level >= CheckLevel::kCheap) check_lens_and_tokens(op, lens, drafts, batch, num_slots, vocab);

  at::Tensor tokens =
      at::full({batch, num_slots + 1}, -1, target_logits.options().dtype(at::kLong));
  at::Tensor accepted = at::empty({batch}, target_logits.options().dtype(at::kInt));
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const Rows<T> logits(target_logits);
    if (level >= CheckLevel::kFull) {
      check_no_nan_rows(op, logits, batch, num_slots + 1, vocab,
                        [&](int64_t b) { return int64_t{lens[b]} + 1; },
                        "every row up to draft_lens");
    }
    greedy_walk(logits, drafts, lens, batch, num_slots, vocab, tokens.data_ptr<int64_t>(),
                accepted.data_ptr<int32_t>());
  };
  switch (target_logits.scalar_type()) {
    case at::kBFloat16: run(c10::BFloat16()); break;
    case at::kHalf: run(c10::Half()); break;
    default: run(float()); break;
  }
  return {tokens, accepted};
}

}  // namespace
}  // namespace specops

TORCH_LIBRARY_IMPL(specops, CPU, m) {
  m.impl("chain_verify", &specops::chain_verify_cpu);
  m.impl("chain_verify_greedy", &specops::chain_verify_greedy_cpu);
}
