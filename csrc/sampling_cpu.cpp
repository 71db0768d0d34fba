// CPU kernel of sampling_probs (contract: "Sampling distributions"; executable specification:
// specops/reference/sampling.py): temperature, then top-k, then top-p, then softmax.
//
// Reads N*V logits, writes N*V floats (plus two N*V float temporaries). Neither top-k nor top-p
// sorts a row: top-k finds the k-th largest value with a radix histogram of the float bits,
// and top-p sorts only the most probable tokens whose mass reaches top_p (a histogram of the
// probabilities' exponents says how many), the prefix of the full descending order it needs.
//
// Both softmaxes are ATen's, as in the reference: which tokens top-p keeps depends on the
// float rounding of the probabilities (at V = 151936 a float sum in another order flips a token
// at the boundary in about one row in ten), and the same softmax makes the kept set, and the
// output, the reference's exactly.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cmath>
#include <cstring>
#include <functional>
#include <limits>
#include <vector>

#include "argmax_cpu.h"
#include "checks.h"

namespace specops {
namespace {

constexpr float kInf = std::numeric_limits<float>::infinity();

uint32_t float_to_bits(float f) {
  uint32_t bits;
  std::memcpy(&bits, &f, sizeof bits);
  return bits;
}

float float_from_bits(uint32_t bits) {
  float f;
  std::memcpy(&f, &bits, sizeof f);
  return f;
}

// A key whose unsigned order is the float order (NaN-free input; -0 sorts just below +0,
// which changes no k-th value).
uint32_t order_key(float f) {
  const uint32_t bits = float_to_bits(f);
  return bits ^ (uint32_t(int32_t(bits) >> 31) | 0x80000000u);
}

float key_to_float(uint32_t key) {
  return float_from_bits(key ^ ((key & 0x80000000u) ? 0x80000000u : 0xFFFFFFFFu));
}

// The k-th largest of x[0..n) (1 <= k <= n, no NaN): a histogram of the keys' top 11 bits
// finds the bucket that holds it, and nth_element runs on that bucket only.
float kth_largest(const float* x, int64_t n, int64_t k) {
  constexpr int kShift = 21, kBuckets = 1 << (32 - kShift);
  // Four interleaved histograms: logits crowd into few buckets, and back-to-back increments
  // of one counter would wait on each other.
  std::vector<int64_t> counts(4 * kBuckets, 0);
  int64_t i = 0;
  for (; i + 4 <= n; i += 4) {
    for (int h = 0; h < 4; ++h) ++counts[h * kBuckets + (order_key(x[i + h]) >> kShift)];
  }
  for (; i < n; ++i) ++counts[order_key(x[i]) >> kShift];
  int64_t above = 0, bucket = kBuckets - 1;
  for (;; --bucket) {
    const int64_t count = counts[bucket] + counts[kBuckets + bucket] +
                          counts[2 * kBuckets + bucket] + counts[3 * kBuckets + bucket];
    if (bucket == 0 || above + count >= k) break;
    above += count;
  }
  std::vector<uint32_t> keys;
  for (i = 0; i < n; ++i) {
    const uint32_t key = order_key(x[i]);
    if ((key >> kShift) == uint32_t(bucket)) keys.push_back(key);
  }
  const int64_t rank = k - above - 1;  // 0-based, descending, inside the bucket
  std::nth_element(keys.begin(), keys.begin() + rank, keys.end(), std::greater<uint32_t>());
  return key_to_float(keys[rank]);
}

struct Candidate {
  float prob;
  int32_t index;
};

// Top-p on one row of probabilities (>= 0, finite): returns the kept tokens, the prefix of
// the order (prob descending, lower index first) before the first token whose exclusive
// float64 prefix mass is >= top_p; the first token is always kept. The prefix mass is computed
// as the reference computes it, cumsum - self, in the same order.
std::vector<Candidate> top_p_keep(const float* probs, int64_t n, double top_p) {
  // Mass per bucket of the probabilities' bits (8 buckets per power of two).
  constexpr int kShift = 20;
  std::vector<double> mass(1 << (31 - kShift), 0.0);
  int64_t num_positive = 0;
  for (int64_t i = 0; i < n; ++i) {
    if (probs[i] > 0.0f) {
      mass[float_to_bits(probs[i]) >> kShift] += double(probs[i]);
      ++num_positive;
    }
  }
  // Candidates: the top buckets whose mass clearly reaches top_p, a prefix of the sorted
  // order. If the cut does not fall inside them after all, take every positive token.
  uint32_t lowest_bucket = 0;
  double reached = 0;
  for (int64_t bucket = int64_t(mass.size()) - 1; bucket >= 0; --bucket) {
    reached += mass[bucket];
    if (reached >= top_p + 1e-6) {
      lowest_bucket = uint32_t(bucket);
      break;
    }
  }
  std::vector<Candidate> kept;
  for (int attempt = 0; attempt < 2; ++attempt) {
    kept.clear();
    for (int64_t i = 0; i < n; ++i) {
      if (probs[i] > 0.0f && (float_to_bits(probs[i]) >> kShift) >= lowest_bucket) {
        kept.push_back({probs[i], int32_t(i)});
      }
    }
    std::sort(kept.begin(), kept.end(), [](const Candidate& a, const Candidate& b) {
      return a.prob > b.prob || (a.prob == b.prob && a.index < b.index);
    });
    double cum = 0;
    for (size_t r = 0; r < kept.size(); ++r) {
      cum += double(kept[r].prob);
      if (r > 0 && cum - double(kept[r].prob) >= top_p) {
        kept.resize(r);
        return kept;
      }
    }
    if (int64_t(kept.size()) == num_positive) break;
    lowest_bucket = 0;
  }
  // Every positive token. Tokens of probability 0 stay out: kept, they would add 0 as well.
  return kept;
}

// x[0..V) = logits / temperature with top-k applied (-inf outside). Returns whether the row
// is well-formed (no NaN, finite maximum); a row that is not is NaN after softmax, with or
// without top-k/top-p, so both are skipped there.
template <class T>
bool scaled_logits_row(const T* logits, int64_t vocab, float temperature, int32_t top_k,
                       float* x) {
  for (int64_t i = 0; i < vocab; ++i) x[i] = static_cast<float>(logits[i]) / temperature;
  bool has_nan = false;
  const float max = argmax_detail::max_ignoring_nan(x, vocab, has_nan);
  if (has_nan || !(std::fabs(max) < kInf)) return false;
  const int64_t k = std::min<int64_t>(std::max<int32_t>(top_k, 0), vocab);
  if (k > 0 && k < vocab) {  // k == V keeps everything
    const float kth = kth_largest(x, vocab, k);
    for (int64_t i = 0; i < vocab; ++i) x[i] = x[i] < kth ? -kInf : x[i];
  }
  return true;
}

// Full checks: no NaN, no +inf, not all -inf.
template <class T>
void check_logit_rows(const T* logits, int64_t rows, int64_t vocab) {
  std::vector<int> faults(rows, 0);  // 1: NaN, 2: +inf, 3: all -inf
  at::parallel_for(0, rows, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      const T* row = logits + r * vocab;
      int nan = 0, pos_inf = 0, above_neg_inf = 0;
      for (int64_t i = 0; i < vocab; ++i) {
        const float x = static_cast<float>(row[i]);
        nan |= x != x;
        pos_inf |= x == kInf;
        above_neg_inf |= x > -kInf;
      }
      faults[r] = nan ? 1 : pos_inf ? 2 : !above_neg_inf ? 3 : 0;
    }
  });
  constexpr const char* kText[] = {"", "holds a NaN", "holds +inf", "is all -inf"};
  for (int64_t r = 0; r < rows; ++r) {
    TORCH_CHECK_VALUE(faults[r] == 0, "sampling_probs: logits[", r, "] ", kText[faults[r]],
                      " (full checks)");
  }
}

template <class T>
at::Tensor sampling_probs_kernel(const T* logits, int64_t rows, int64_t vocab, const float* temp,
                                 const int32_t* top_k, const float* top_p) {
  const auto options = at::TensorOptions().dtype(at::kFloat);
  at::Tensor x = at::empty({rows, vocab}, options);
  float* x_data = x.data_ptr<float>();
  // Rows that top-p changes: not greedy, well-formed, top_p < 1.
  std::vector<char> apply_top_p(rows, 0);
  at::parallel_for(0, rows, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t r = lo; r < hi; ++r) {
      float* x_row = x_data + r * vocab;
      if (temp[r] == 0.0f) {
        std::fill(x_row, x_row + vocab, 0.0f);  // replaced by a one-hot row below
      } else {
        const bool ok = scaled_logits_row(logits + r * vocab, vocab, temp[r], top_k[r], x_row);
        apply_top_p[r] = ok && top_p[r] < 1.0f;
      }
    }
  });
  const bool all_greedy = std::all_of(temp, temp + rows, [](float t) { return t == 0.0f; });
  at::Tensor probs = all_greedy ? at::empty({rows, vocab}, options) : at::softmax(x, -1);
  if (std::find(apply_top_p.begin(), apply_top_p.end(), 1) != apply_top_p.end()) {
    const float* probs_data = probs.const_data_ptr<float>();
    at::parallel_for(0, rows, 1, [&](int64_t lo, int64_t hi) {
      for (int64_t r = lo; r < hi; ++r) {
        if (!apply_top_p[r]) continue;
        float* x_row = x_data + r * vocab;
        const std::vector<Candidate> kept = top_p_keep(probs_data + r * vocab, vocab, top_p[r]);
        std::vector<float> kept_x(kept.size());
        for (size_t c = 0; c < kept.size(); ++c) kept_x[c] = x_row[kept[c].index];
        std::fill(x_row, x_row + vocab, -kInf);
        for (size_t c = 0; c < kept.size(); ++c) x_row[kept[c].index] = kept_x[c];
      }
    });
    probs = at::softmax(x, -1);  // rows without top-p come out as before
  }
  float* out = probs.data_ptr<float>();
  for (int64_t r = 0; r < rows; ++r) {
    if (temp[r] != 0.0f) continue;
    float* row = out + r * vocab;
    std::fill(row, row + vocab, 0.0f);
    row[row_argmax(logits + r * vocab, vocab)] = 1.0f;
  }
  return probs;
}

at::Tensor sampling_probs_cpu(const at::Tensor& logits, const at::Tensor& temperature,
                              const at::Tensor& top_k, const at::Tensor& top_p) {
  constexpr const char* op = "sampling_probs";
  check_float_logits(logits, op, "logits");
  check_layout(logits, op, "logits", 2);
  check_tensor(temperature, op, "temperature", at::kFloat, 1);
  check_tensor(top_k, op, "top_k", at::kInt, 1);
  check_tensor(top_p, op, "top_p", at::kFloat, 1);
  TORCH_CHECK_VALUE(logits.size(1) >= 1, op, ": logits.shape[1] must be >= 1 (V), got shape ",
                    logits.sizes());
  const int64_t rows = logits.size(0), vocab = logits.size(1);
  check_dim_size(temperature, op, "temperature", 0, rows, "N");
  check_dim_size(top_k, op, "top_k", 0, rows, "N");
  check_dim_size(top_p, op, "top_p", 0, rows, "N");

  const at::Tensor logits_c = logits.contiguous(), temperature_c = temperature.contiguous();
  const at::Tensor top_k_c = top_k.contiguous(), top_p_c = top_p.contiguous();
  const float* temp = temperature_c.const_data_ptr<float>();
  const int32_t* k = top_k_c.const_data_ptr<int32_t>();
  const float* p = top_p_c.const_data_ptr<float>();
  const CheckLevel level = check_level();
  if (level >= CheckLevel::kCheap) {
    for (int64_t r = 0; r < rows; ++r) {
      TORCH_CHECK_VALUE(std::isfinite(temp[r]) && temp[r] >= 0.0f, op, ": temperature[", r,
                        "] = ", temp[r], " must be finite and >= 0");
      TORCH_CHECK_VALUE(k[r] >= 0, op, ": top_k[", r, "] = ", k[r], " must be >= 0 (0 = off)");
      TORCH_CHECK_VALUE(p[r] >= 0.0f && p[r] <= 1.0f, op, ": top_p[", r, "] = ", p[r],
                        " must be in [0, 1] (1 = off)");
    }
  }
  auto run = [&](auto tag) {
    using T = decltype(tag);
    const T* data = logits_c.const_data_ptr<T>();
    if (level >= CheckLevel::kFull) check_logit_rows(data, rows, vocab);
    return sampling_probs_kernel(data, rows, vocab, temp, k, p);
  };
  switch (logits.scalar_type()) {
    case at::kBFloat16: return run(c10::BFloat16());
    case at::kHalf: return run(c10::Half());
    default: return run(float());
  }
}

}  // namespace
}  // namespace specops

TORCH_LIBRARY_IMPL(specops, CPU, m) {
  m.impl("sampling_probs", &specops::sampling_probs_cpu);
}
