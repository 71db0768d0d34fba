// CPU kernels of tree_metadata, tree_verify and tree_verify_greedy (contract: "Token trees";
// executable specification: specops/reference/tree.py, whose docstring defines detached nodes
// and the residual rule r, S this file follows).
//
// Per call:
// - tree_metadata reads B*T parents and writes the B*T*T mask and B*T depths, each mask row
//   copied from its parent's row (topological order makes the parent's row ready).
// - tree_verify reads, per accept test, only r(x) and q(x) at the child's token (at a node's
//   first child r = p_c, so just p_c[x]). The first rejection at a node reads p_c and q_1 in
//   full to sum the residual sanitize(p_c - q_1), which stays a formula and is not written;
//   every further rejection at that node reads the residual and q_i and writes the next
//   residual into the row's buffer (V floats, allocated on first use). The final draw sums one
//   row (unless the residual's sums are known already) and rescans one chunk of it. Writes
//   B*T tokens, B*T path entries and B counts.
// - tree_verify_greedy reads one logits row per visited node.
// Every full-row pass runs over (row, vocab chunk) pairs in parallel, so one long row still
// uses every core; the rows advance in lock-step rounds of at most one rejection each.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <memory>
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

// ---------------------------------------------------------------------------------------------
// The tree of each row in the form the walks use, built in O(T) per row.

// Node i is attached iff i < num_nodes, 0 <= parents[i] < i and its parent is attached; the
// root iff num_nodes >= 1 (reference: _attached_parents, tree_metadata_ref). `depth` is -1 for
// detached nodes. on_attached(i, parent) is called for every attached non-root node in index
// order, so a node's parent has always been handed over before it.
template <class OnAttached>
void attach_nodes(const int32_t* parents, int32_t num_nodes, int64_t num_slots, int32_t* depth,
                  const OnAttached& on_attached) {
  depth[0] = num_nodes >= 1 ? 0 : -1;
  for (int64_t i = 1; i < num_slots; ++i) {
    const int32_t p = parents[i];
    const bool attached = i < num_nodes && p >= 0 && p < i && depth[p] >= 0;
    depth[i] = attached ? depth[p] + 1 : -1;
    if (attached) on_attached(i, p);
  }
}

// Depths, first-child / next-sibling lists (index order) and sibling ranks of every row.
class TreeIndex {
 public:
  TreeIndex(const int32_t* parents, const int32_t* num_nodes, int64_t batch, int64_t num_slots)
      : num_slots_(num_slots),
        depth_(batch * num_slots),
        first_child_(batch * num_slots, -1),
        next_sibling_(batch * num_slots, -1),
        sibling_rank_(batch * num_slots, -1) {
    at::parallel_for(0, batch, 64, [&](int64_t lo, int64_t hi) {
      std::vector<int32_t> last_child(num_slots);
      for (int64_t b = lo; b < hi; ++b) {
        int32_t* first = first_child_.data() + b * num_slots;
        int32_t* next = next_sibling_.data() + b * num_slots;
        int32_t* rank = sibling_rank_.data() + b * num_slots;
        std::fill(last_child.begin(), last_child.end(), -1);
        attach_nodes(parents + b * num_slots, num_nodes[b], num_slots,
                     depth_.data() + b * num_slots, [&](int64_t i, int32_t p) {
                       const int32_t last = last_child[p];
                       if (last < 0) {
                         first[p] = int32_t(i);
                         rank[i] = 0;
                       } else {
                         next[last] = int32_t(i);
                         rank[i] = rank[last] + 1;
                       }
                       last_child[p] = int32_t(i);
                     });
      }
    });
  }

  int32_t depth(int64_t b, int64_t i) const { return depth_[b * num_slots_ + i]; }
  int32_t first_child(int64_t b, int64_t i) const { return first_child_[b * num_slots_ + i]; }
  int32_t next_sibling(int64_t b, int64_t i) const { return next_sibling_[b * num_slots_ + i]; }
  int32_t sibling_rank(int64_t b, int64_t i) const { return sibling_rank_[b * num_slots_ + i]; }

 private:
  int64_t num_slots_;
  std::vector<int32_t> depth_, first_child_, next_sibling_, sibling_rank_;
};

// ---------------------------------------------------------------------------------------------
// Checks (contract, "Bad input"; the Python side: specops/_checks.py tree_values and
// tree_verify_values, checked in the same order).

// parents [B, T] int32 with T >= 1, num_nodes [B] int32.
void check_tree_shapes(const char* op, const at::Tensor& parents, const at::Tensor& num_nodes) {
  check_tensor(parents, op, "parents", at::kInt, 2);
  TORCH_CHECK_VALUE(parents.size(1) >= 1, op, ": parents must be [B, T] with T >= 1 (node 0 is ",
                    "the root), got shape ", parents.sizes());
  check_tensor(num_nodes, op, "num_nodes", at::kInt, 1);
  check_dim_size(num_nodes, op, "num_nodes", 0, parents.size(0), "B");
}

// rows [B, T, V] (T, V >= 1), tree_tokens [B, T] int64, parents [B, T] int32, num_nodes [B].
void check_rows_and_tree(const char* op, const char* rows_name, const at::Tensor& rows,
                         const at::Tensor& tree_tokens, const at::Tensor& parents,
                         const at::Tensor& num_nodes) {
  TORCH_CHECK_VALUE(rows.size(1) >= 1 && rows.size(2) >= 1, op, ": ", rows_name,
                    " must be [B, T, V] with T >= 1 and V >= 1, got shape ", rows.sizes());
  check_tensor(tree_tokens, op, "tree_tokens", at::kLong, 2);
  check_tensor(parents, op, "parents", at::kInt, 2);
  const int64_t batch = rows.size(0), num_slots = rows.size(1);
  check_dim_size(tree_tokens, op, "tree_tokens", 0, batch, "B");
  check_dim_size(tree_tokens, op, "tree_tokens", 1, num_slots, "T");
  check_dim_size(parents, op, "parents", 0, batch, "B");
  check_dim_size(parents, op, "parents", 1, num_slots, "T");
  check_tensor(num_nodes, op, "num_nodes", at::kInt, 1);
  check_dim_size(num_nodes, op, "num_nodes", 0, batch, "B");
}

// Cheap checks, O(B*T): num_nodes in 1..T; parents[b, 0] = -1; 0 <= parents[b, i] < i for
// 1 <= i < num_nodes[b] (which rules out cycles); with `tokens`, the tokens of nodes
// 1..num_nodes-1 in 0..V-1.
void check_tree_values(const char* op, const int32_t* parents, const int32_t* num_nodes,
                       const int64_t* tokens, int64_t batch, int64_t num_slots, int64_t vocab) {
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK_VALUE(num_nodes[b] >= 1 && num_nodes[b] <= num_slots, op, ": num_nodes[", b,
                      "] = ", num_nodes[b], " is outside 1..", num_slots, " (T)");
  }
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK_VALUE(parents[b * num_slots] == -1, op, ": parents[", b, ", 0] = ",
                      parents[b * num_slots], " must be -1 (node 0 is the root)");
  }
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t i = 1; i < num_nodes[b]; ++i) {
      const int32_t p = parents[b * num_slots + i];
      TORCH_CHECK_VALUE(p >= 0 && p < i, op, ": parents[", b, ", ", i, "] = ", p,
                        " must satisfy 0 <= parents[b, i] < i (topological order, no cycles); "
                        "num_nodes[", b, "] = ", num_nodes[b]);
    }
  }
  if (tokens == nullptr) return;
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t i = 1; i < num_nodes[b]; ++i) {
      const int64_t x = tokens[b * num_slots + i];
      TORCH_CHECK_VALUE(x >= 0 && x < vocab, op, ": tree_tokens[", b, ", ", i, "] = ", x,
                        " is outside 0..", vocab - 1, " (V-1); num_nodes[", b, "] = ",
                        num_nodes[b]);
    }
  }
}

// Full checks: rows first_row..num_nodes[b]-1 of every batch row must be distributions
// (target rows from 0, draft rows from 1: draft row 0 is unused). Reports the first bad row.
void check_prob_rows(const char* op, const char* name, const Rows<float>& rows, int64_t batch,
                     int64_t num_slots, int64_t vocab, const int32_t* num_nodes,
                     int64_t first_row) {
  std::vector<RowFault> faults(batch * num_slots, RowFault::kNone);
  at::parallel_for(0, batch * num_slots, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t b = t / num_slots, i = t % num_slots;
      if (i >= first_row && i < num_nodes[b]) faults[t] = prob_row_fault(rows.row(b, i), vocab);
    }
  });
  for (int64_t t = 0; t < batch * num_slots; ++t) {
    TORCH_CHECK_VALUE(faults[t] == RowFault::kNone, op, ": ", name, "[", t / num_slots, ", ",
                      t % num_slots, "] ", row_fault_text(faults[t]),
                      " (full checks need the rows of the nodes below num_nodes to be "
                      "distributions)");
  }
}

// ---------------------------------------------------------------------------------------------
// tree_metadata

std::tuple<at::Tensor, at::Tensor> tree_metadata_cpu(const at::Tensor& parents,
                                                     const at::Tensor& num_nodes) {
  constexpr const char* op = "tree_metadata";
  check_tree_shapes(op, parents, num_nodes);
  const int64_t batch = parents.size(0), num_slots = parents.size(1);
  const at::Tensor parents_c = parents.contiguous(), num_nodes_c = num_nodes.contiguous();
  const int32_t* parent = parents_c.const_data_ptr<int32_t>();
  const int32_t* nodes = num_nodes_c.const_data_ptr<int32_t>();
  if (check_level() >= CheckLevel::kCheap) {
    check_tree_values(op, parent, nodes, nullptr, batch, num_slots, 0);
  }

  at::Tensor mask = at::empty({batch, num_slots, num_slots}, parents.options().dtype(at::kBool));
  at::Tensor depth = at::empty({batch, num_slots}, parents.options().dtype(at::kInt));
  bool* out_mask = mask.data_ptr<bool>();
  int32_t* out_depth = depth.data_ptr<int32_t>();
  const int64_t grain = std::max<int64_t>(1, 32768 / (num_slots * num_slots));
  at::parallel_for(0, batch, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      bool* m = out_mask + b * num_slots * num_slots;
      std::memset(m, 0, num_slots * num_slots * sizeof(bool));
      int32_t* d = out_depth + b * num_slots;
      m[0] = nodes[b] >= 1;  // the root, attached iff num_nodes >= 1 (as depth[0] below)
      attach_nodes(parent + b * num_slots, nodes[b], num_slots, d, [&](int64_t i, int32_t p) {
        // The parent's row only has entries at 0..p.
        std::memcpy(m + i * num_slots, m + p * num_slots, (p + 1) * sizeof(bool));
        m[i * num_slots + i] = true;
      });
    }
  });
  return {mask, depth};
}

// ---------------------------------------------------------------------------------------------
// tree_verify

// sanitized(sanitized(p[i] - rq[i]) / scale - q[i]) into out[i] for i < n (the rq and q terms
// only where the template says so); returns their float64 sum. Eight accumulators, as in
// sum_sanitized, let the compiler vectorise. The division is IEEE, as the reference's.
template <bool kResidualQ, bool kDraftQ>
double scaled_residual_span(const float* p, const float* rq, float scale, const float* q,
                            float* out, int64_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  auto value = [&](int64_t k) {
    const float r = sanitized(kResidualQ ? p[k] - rq[k] : p[k]);
    return sanitized(kDraftQ ? r / scale - q[k] : r / scale);
  };
  for (; i + 8 <= n; i += 8) {
    for (int lane = 0; lane < 8; ++lane) {
      const float w = value(i + lane);
      out[i + lane] = w;
      acc[lane] += double(w);
    }
  }
  double tail = 0;
  for (; i < n; ++i) {
    out[i] = value(i);
    tail += double(out[i]);
  }
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

// The next residual sanitize(r / scale - q) on [begin, end) into out[0..end-begin), where r is
// `residual` (a formula or a buffer) and q is a draft row, one-hot at `hot` (>= 0), or zero.
// The one-hot indices of r and q are computed apart so that the spans between stay branch-free.
double scaled_residual(const ResidualRow& residual, float scale, const float* q, int64_t hot,
                       int64_t begin, int64_t end, float* out) {
  int64_t cuts[2];
  int num_cuts = 0;
  if (residual.q == nullptr && residual.one_hot >= begin && residual.one_hot < end) {
    cuts[num_cuts++] = residual.one_hot;
  }
  if (q == nullptr && hot >= begin && hot < end && !(num_cuts == 1 && cuts[0] == hot)) {
    cuts[num_cuts++] = hot;
  }
  if (num_cuts == 2 && cuts[1] < cuts[0]) std::swap(cuts[0], cuts[1]);
  auto span = [&](int64_t lo, int64_t hi) {
    const float* p = residual.p + lo;
    const float* rq = residual.q ? residual.q + lo : nullptr;
    const float* dq = q ? q + lo : nullptr;
    float* o = out + (lo - begin);
    if (rq && dq) return scaled_residual_span<true, true>(p, rq, scale, dq, o, hi - lo);
    if (rq) return scaled_residual_span<true, false>(p, rq, scale, dq, o, hi - lo);
    if (dq) return scaled_residual_span<false, true>(p, rq, scale, dq, o, hi - lo);
    return scaled_residual_span<false, false>(p, rq, scale, dq, o, hi - lo);
  };
  double total = 0;
  int64_t lo = begin;
  for (int k = 0; k < num_cuts; ++k) {
    const int64_t i = cuts[k];
    total += span(lo, i);
    const float qi = q ? q[i] : i == hot ? 1.0f : 0.0f;
    out[i - begin] = sanitized(residual.weight(i) / scale - qi);
    total += double(out[i - begin]);
    lo = i + 1;
  }
  return total + span(lo, end);
}

// Where a row's residual r lives (reference: r and S of tree_verify_ref).
enum class Residual : uint8_t {
  kTarget,   // r = p_current as given (not sanitised: the accept test reads it raw), S = 1
  kFormula,  // r = sanitize(p_current - q_1) after one rejection, computed where read
  kBuffer,   // r in the row's buffer, after two or more rejections at the current node
};

// One row's walk (reference: the loop of tree_verify_ref).
struct Walk {
  int64_t current = 0;    // node whose children are tested
  int64_t candidate = -1; // child under test; -1: the row draws its final token
  int64_t num_accepted = 0;
  Residual kind = Residual::kTarget;
  ResidualRow r;          // kTarget: {p_current}; kFormula: {p_current, q_1}; kBuffer: {buffer}
  float scale = 1.0f;     // S
  bool rejected = false;  // the candidate was rejected: the next residual is due
  const float* reject_q = nullptr;  // the rejected child's draft row, or nullptr:
  int64_t reject_hot = -1;          // one-hot at its token (-1: token out of range, q = 0)
  int sums = 0;           // which of the row's two chunk-sum slots holds r's sums
};

struct VerifyInputs {
  const Rows<float>& p;
  const std::optional<Rows<float>>& q;
  const int64_t* tokens;  // [B, T]
  const int64_t* seeds;
  const int64_t* positions;
  const TreeIndex& tree;
  int64_t num_slots, vocab;
};

// Tests the row's candidates until one is rejected or none is left; accepted nodes go to the
// outputs at once.
void advance(Walk& w, int64_t b, const VerifyInputs& in, int64_t* out_tokens, int32_t* out_path) {
  const int64_t* x_of = in.tokens + b * in.num_slots;
  // Positions wrap like int64 tensors do (only reachable with checks off).
  const uint64_t root = uint64_t(in.positions[b]);
  while (w.candidate >= 0) {
    const int64_t c = w.candidate, x = x_of[c];
    const bool valid = x >= 0 && x < in.vocab;
    const float qx = !valid ? 0.0f : in.q ? in.q->row(b, c)[x] : 1.0f;
    const float rx = !valid ? 0.0f : w.kind == Residual::kTarget ? w.r.p[x] : w.r.weight(x);
    const float u = philox_uniform(in.seeds[b], int64_t(root + uint64_t(in.tree.depth(b, c))),
                                   uint32_t(in.tree.sibling_rank(b, c)), kPurposeAccept);
    if (u * qx < rx / w.scale) {
      out_path[w.num_accepted] = int32_t(c);
      out_tokens[w.num_accepted] = x;
      ++w.num_accepted;
      w.current = c;
      w.candidate = in.tree.first_child(b, c);
      w.kind = Residual::kTarget;
      w.r = ResidualRow{in.p.row(b, c)};
      w.scale = 1.0f;
      continue;
    }
    w.rejected = true;
    w.reject_q = in.q ? in.q->row(b, c) : nullptr;
    w.reject_hot = !in.q && valid ? x : -1;
    return;
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_verify_cpu(
    const at::Tensor& target_probs, const at::Tensor& tree_tokens, const at::Tensor& parents,
    const at::Tensor& num_nodes, const std::optional<at::Tensor>& draft_probs,
    const at::Tensor& seeds, const at::Tensor& positions) {
  constexpr const char* op = "tree_verify";
  check_tensor(target_probs, op, "target_probs", at::kFloat, 3);
  check_rows_and_tree(op, "target_probs", target_probs, tree_tokens, parents, num_nodes);
  const int64_t batch = target_probs.size(0), num_slots = target_probs.size(1);
  const int64_t vocab = target_probs.size(2);
  if (draft_probs) {
    check_tensor(*draft_probs, op, "draft_probs", at::kFloat, 3);
    check_dim_size(*draft_probs, op, "draft_probs", 0, batch, "B");
    check_dim_size(*draft_probs, op, "draft_probs", 1, num_slots, "T");
    check_dim_size(*draft_probs, op, "draft_probs", 2, vocab, "V");
  }
  check_tensor(seeds, op, "seeds", at::kLong, 1);
  check_dim_size(seeds, op, "seeds", 0, batch, "B");
  check_tensor(positions, op, "positions", at::kLong, 1);
  check_dim_size(positions, op, "positions", 0, batch, "B");

  const at::Tensor tokens_c = tree_tokens.contiguous(), parents_c = parents.contiguous();
  const at::Tensor num_nodes_c = num_nodes.contiguous(), seeds_c = seeds.contiguous();
  const at::Tensor positions_c = positions.contiguous();
  const int32_t* nodes = num_nodes_c.const_data_ptr<int32_t>();
  const int64_t* position = positions_c.const_data_ptr<int64_t>();
  const Rows<float> p(target_probs);
  const std::optional<Rows<float>> q =
      draft_probs ? std::optional<Rows<float>>(Rows<float>(*draft_probs)) : std::nullopt;

  const CheckLevel level = check_level();
  if (level >= CheckLevel::kCheap) {
    check_tree_values(op, parents_c.const_data_ptr<int32_t>(), nodes,
                      tokens_c.const_data_ptr<int64_t>(), batch, num_slots, vocab);
    for (int64_t b = 0; b < batch; ++b) {
      TORCH_CHECK_VALUE(position[b] >= 0, op, ": positions[", b, "] = ", position[b],
                        " must be >= 0");
    }
  }
  if (level >= CheckLevel::kFull) {
    check_prob_rows(op, "target_probs", p, batch, num_slots, vocab, nodes, 0);
    if (q) check_prob_rows(op, "draft_probs", *q, batch, num_slots, vocab, nodes, 1);
  }

  const TreeIndex tree(parents_c.const_data_ptr<int32_t>(), nodes, batch, num_slots);
  const VerifyInputs in{p, q, tokens_c.const_data_ptr<int64_t>(),
                        seeds_c.const_data_ptr<int64_t>(), position, tree, num_slots, vocab};
  at::Tensor tokens = at::full({batch, num_slots}, -1, target_probs.options().dtype(at::kLong));
  at::Tensor path = at::full({batch, num_slots}, -1, target_probs.options().dtype(at::kInt));
  at::Tensor accepted = at::empty({batch}, target_probs.options().dtype(at::kInt));
  int64_t* out_tokens = tokens.data_ptr<int64_t>();
  int32_t* out_path = path.data_ptr<int32_t>();

  const int64_t chunks = num_vocab_chunks(vocab);
  std::vector<Walk> walks(batch);
  // Row b's chunk sums: slot s at sums[(2 * b + s) * chunks]; the other slot takes the sums
  // of the next residual, which replaces r only if its mass is positive.
  std::vector<double> sums(2 * batch * chunks);
  auto slot = [&](int64_t b, int s) { return sums.data() + (2 * b + s) * chunks; };
  // Chunks of a buffer whose new residual is all zero but that still hold the old one.
  std::vector<char> stale(batch * chunks, 0);
  std::vector<std::unique_ptr<float[]>> buffers(batch);

  std::vector<int64_t> active(batch);
  for (int64_t b = 0; b < batch; ++b) {
    walks[b].candidate = tree.first_child(b, 0);
    walks[b].r = ResidualRow{p.row(b, 0)};
    active[b] = b;
  }
  std::vector<int64_t> pending;
  while (!active.empty()) {
    // Accept tests, O(1) each, until every active row has a rejection or draws.
    at::parallel_for(0, int64_t(active.size()), 16, [&](int64_t lo, int64_t hi) {
      for (int64_t k = lo; k < hi; ++k) {
        const int64_t b = active[k];
        advance(walks[b], b, in, out_tokens + b * num_slots, out_path + b * num_slots);
      }
    });
    pending.clear();
    for (int64_t b : active) {
      if (!walks[b].rejected) continue;
      pending.push_back(b);
      if (walks[b].kind != Residual::kTarget && !buffers[b]) {
        buffers[b].reset(new float[vocab]);
      }
    }
    // The residual of every rejection: summed (the first at a node) or written (later ones).
    parallel_for_vocab_chunks(
        int64_t(pending.size()), vocab, [&](int64_t k, int64_t c, int64_t begin, int64_t end) {
          const int64_t b = pending[k];
          const Walk& w = walks[b];
          double* next_sums = slot(b, 1 - w.sums);
          if (w.kind == Residual::kTarget) {
            next_sums[c] = ResidualRow{w.r.p, w.reject_q, w.reject_hot}.sum(begin, end);
            return;
          }
          float out[kVocabChunk];
          const double mass =
              scaled_residual(w.r, w.scale, w.reject_q, w.reject_hot, begin, end, out);
          next_sums[c] = mass;
          // Written through a scratch chunk: if the whole residual has no mass, r is kept, and
          // the buffer may be r itself. A chunk without mass is all zeros: it is written only
          // when the residual is adopted, and not at all where r's chunk was zero already.
          float* dst = buffers[b].get() + begin;
          const bool old_zero = w.kind == Residual::kBuffer && slot(b, w.sums)[c] == 0;
          stale[b * chunks + c] = char(mass == 0 && w.kind == Residual::kBuffer && !old_zero);
          if (mass > 0 || w.kind == Residual::kFormula) {
            std::memcpy(dst, out, (end - begin) * sizeof(float));
          }
        });
    // Adopt each residual with positive mass; a residual without mass keeps r and S.
    for (int64_t b : pending) {
      Walk& w = walks[b];
      const double* next_sums = slot(b, 1 - w.sums);
      double mass = 0;
      for (int64_t c = 0; c < chunks; ++c) mass += next_sums[c];
      if (mass > 0) {
        if (w.kind == Residual::kTarget) {
          w.kind = Residual::kFormula;
          w.r = ResidualRow{w.r.p, w.reject_q, w.reject_hot};
        } else {
          float* buffer = buffers[b].get();
          for (int64_t c = 0; c < chunks; ++c) {
            if (!stale[b * chunks + c]) continue;
            const int64_t begin = c * kVocabChunk;
            std::fill(buffer + begin, buffer + std::min(vocab, begin + kVocabChunk), 0.0f);
          }
          w.kind = Residual::kBuffer;
          w.r = ResidualRow{buffer};
        }
        w.scale = float(mass);
        w.sums = 1 - w.sums;
      }
      w.rejected = false;
      w.candidate = tree.next_sibling(b, w.candidate);
    }
    active.swap(pending);
  }

  // The final draw from sanitize(r): rows still at p_current sum it first.
  std::vector<int64_t> unsummed;
  for (int64_t b = 0; b < batch; ++b) {
    if (walks[b].kind == Residual::kTarget) unsummed.push_back(b);
  }
  parallel_for_vocab_chunks(int64_t(unsummed.size()), vocab,
                            [&](int64_t k, int64_t c, int64_t begin, int64_t end) {
                              const int64_t b = unsummed[k];
                              slot(b, walks[b].sums)[c] = walks[b].r.sum(begin, end);
                            });
  int32_t* out_accepted = accepted.data_ptr<int32_t>();
  at::parallel_for(0, batch, 4, [&](int64_t lo, int64_t hi) {
    for (int64_t b = lo; b < hi; ++b) {
      const Walk& w = walks[b];
      // The node after `current` sits one past it (the root's depth is -1 if it is detached).
      const int64_t at = int64_t(uint64_t(position[b]) + uint64_t(tree.depth(b, w.current) + 1));
      const float u = philox_uniform(in.seeds[b], at, 0, kPurposeDraw);
      out_tokens[b * num_slots + w.num_accepted] =
          draw_from_chunk_sums(w.r, slot(b, w.sums), vocab, u);
      out_accepted[b] = int32_t(w.num_accepted);
    }
  });
  return {tokens, path, accepted};
}

// ---------------------------------------------------------------------------------------------
// tree_verify_greedy

// Walks every row depth by depth: the argmax of each still-walking row's current node, rows
// split into parallel chunks; then the first child whose token is that argmax, if any.
template <class T>
void greedy_tree_walk(const Rows<T>& logits, const int64_t* tokens, const TreeIndex& tree,
                      int64_t batch, int64_t num_slots, int64_t vocab, int64_t* out_tokens,
                      int32_t* out_path, int32_t* out_accepted) {
  const int64_t chunks = num_vocab_chunks(vocab);
  std::vector<int64_t> active(batch), current(batch, 0), num_accepted(batch, 0);
  for (int64_t b = 0; b < batch; ++b) active[b] = b;
  std::vector<ChunkMax> parts;
  std::vector<int64_t> still;
  while (!active.empty()) {
    parts.resize(active.size() * chunks);
    parallel_for_vocab_chunks(int64_t(active.size()), vocab,
                              [&](int64_t r, int64_t c, int64_t begin, int64_t end) {
                                const int64_t b = active[r];
                                parts[r * chunks + c] =
                                    chunk_argmax(logits.row(b, current[b]), begin, end);
                              });
    still.clear();
    for (size_t r = 0; r < active.size(); ++r) {
      const int64_t b = active[r];
      const int64_t argmax = combine_argmax(parts.data() + r * chunks, chunks);
      const int64_t* x = tokens + b * num_slots;
      int64_t child = tree.first_child(b, current[b]);
      while (child >= 0 && x[child] != argmax) child = tree.next_sibling(b, child);
      const int64_t n = num_accepted[b];
      if (child >= 0) {
        out_path[b * num_slots + n] = int32_t(child);
        out_tokens[b * num_slots + n] = x[child];
        num_accepted[b] = n + 1;
        current[b] = child;
        still.push_back(b);
      } else {
        out_tokens[b * num_slots + n] = argmax;
        out_accepted[b] = int32_t(n);
      }
    }
    active.swap(still);
  }
}

std::tuple<at::Tensor, at::Tensor, at::Tensor> tree_verify_greedy_cpu(
    const at::Tensor& target_logits, const at::Tensor& tree_tokens, const at::Tensor& parents,
    const at::Tensor& num_nodes) {
  constexpr const char* op = "tree_verify_greedy";
  check_float_logits(target_logits, op, "target_logits");
  check_layout(target_logits, op, "target_logits", 3);
  check_rows_and_tree(op, "target_logits", target_logits, tree_tokens, parents, num_nodes);
  const int64_t batch = target_logits.size(0), num_slots = target_logits.size(1);
  const int64_t vocab = target_logits.size(2);

  const at::Tensor tokens_c = tree_tokens.contiguous(), parents_c = parents.contiguous();
  const at::Tensor num_nodes_c = num_nodes.contiguous();
  const int64_t* x = tokens_c.const_data_ptr<int64_t>();
  const int32_t* parent = parents_c.const_data_ptr<int32_t>();
  const int32_t* nodes = num_nodes_c.const_data_ptr<int32_t>();
  const CheckLevel level = check_level();
  if (level >= CheckLevel::kCheap) {
    check_tree_values(op, parent, nodes, x, batch, num_slots, vocab);
  }

  const TreeIndex tree(parent, nodes, batch, num_slots);
  at::Tensor tokens = at::full({batch, num_slots}, -1, target_logits.options().dtype(at::kLong));
  at::Tensor path = at::full({batch, num_slots}, -1, target_logits.options().dtype(at::kInt));
  at::Tensor accepted = at::empty({batch}, target_logits.options().dtype(at::kInt));
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const Rows<T> logits(target_logits);
    if (level >= CheckLevel::kFull) {
      check_no_nan_rows(op, logits, batch, num_slots, vocab,
                        [&](int64_t b) { return int64_t{nodes[b]}; },
                        "the rows of the nodes below num_nodes");
    }
    greedy_tree_walk(logits, x, tree, batch, num_slots, vocab, tokens.data_ptr<int64_t>(),
                     path.data_ptr<int32_t>(), accepted.data_ptr<int32_t>());
  };
  switch (target_logits.scalar_type()) {
    case at::kBFloat16: run(c10::BFloat16()); break;
    case at::kHalf: run(c10::Half()); break;
    default: run(float()); break;
  }
  return {tokens, path, accepted};
}

}  // namespace
}  // namespace specops

TORCH_LIBRARY_IMPL(specops, CPU, m) {
  m.impl("tree_metadata", &specops::tree_metadata_cpu);
  m.impl("tree_verify", &specops::tree_verify_cpu);
  m.impl("tree_verify_greedy", &specops::tree_verify_greedy_cpu);
}
