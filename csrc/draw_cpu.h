// Drawing one token from a sanitised residual row max(0, p - q), as specops/reference/draw.py
// defines it: the smallest i with w_i > 0 whose inclusive prefix sum (float64) exceeds
// u * sum(w). A row is summed chunk by chunk (in parallel, see vocab_chunks.h); the draw then
// walks the chunk sums and rescans only the chunk that holds the threshold.
#pragma once

#include <cstdint>
#include <cstring>

#include "vocab_chunks.h"

namespace specops {

// sanitize(): NaN, inf, negatives and zero read as 0 (reference: draw.sanitize). Written on
// the bits (positive finite floats are exactly the int32 values in (0, 0x7F800000)) so that
// it compiles to branch-free vector code: a residual's sign is a coin flip per entry.
inline float sanitized(float d) {
  int32_t bits;
  std::memcpy(&bits, &d, sizeof bits);
  bits &= -int32_t((bits > 0) & (bits < 0x7F800000));
  std::memcpy(&d, &bits, sizeof d);
  return d;
}

// float64 sum of sanitized(p[i] - q[i]) (of sanitized(p[i]) without q). Eight independent
// accumulators let the compiler vectorise; the order differs from a sequential cumsum only by
// rounding at 1e-16, which decides a draw only at an exact boundary.
template <bool kHasQ>
double sum_sanitized(const float* p, const float* q, int64_t n) {
  double acc[8] = {0, 0, 0, 0, 0, 0, 0, 0};
  int64_t i = 0;
  for (; i + 8 <= n; i += 8) {
    for (int lane = 0; lane < 8; ++lane) {
      const float d = kHasQ ? p[i + lane] - q[i + lane] : p[i + lane];
      acc[lane] += double(sanitized(d));
    }
  }
  double tail = 0;
  for (; i < n; ++i) tail += double(sanitized(kHasQ ? p[i] - q[i] : p[i]));
  return ((acc[0] + acc[1]) + (acc[2] + acc[3])) + ((acc[4] + acc[5]) + (acc[6] + acc[7])) + tail;
}

// The row a token is drawn from: sanitized(p - q), where q is a draft row, one-hot at
// `one_hot` (a deterministic drafter's rejected token), or zero (q == nullptr, one_hot < 0).
struct ResidualRow {
  const float* p = nullptr;  // [V] target probabilities
  const float* q = nullptr;  // [V] draft probabilities, or nullptr
  int64_t one_hot = -1;      // with q == nullptr: q = 1 at this index (if >= 0), else 0

  float weight(int64_t i) const {
    if (q != nullptr) return sanitized(p[i] - q[i]);
    return sanitized(i == one_hot ? p[i] - 1.0f : p[i]);
  }

  double sum(int64_t begin, int64_t end) const {
    if (q != nullptr) return sum_sanitized<true>(p + begin, q + begin, end - begin);
    if (one_hot < begin || one_hot >= end) {
      return sum_sanitized<false>(p + begin, nullptr, end - begin);
    }
    return sum_sanitized<false>(p + begin, nullptr, one_hot - begin) + double(weight(one_hot)) +
           sum_sanitized<false>(p + one_hot + 1, nullptr, end - one_hot - 1);
  }

  // The draw inside chunk [begin, end), whose preceding chunks sum to `before`.
  int64_t find_in_chunk(int64_t begin, int64_t end, double before, double threshold) const {
    double cum = before;
    int64_t last_positive = begin;
    for (int64_t i = begin; i < end; ++i) {
      const float w = weight(i);
      if (w > 0.0f) {
        cum += double(w);
        if (cum > threshold) return i;
        last_positive = i;
      }
    }
    // Reached only when this chunk's sequential sum rounds below its vectorised sum.
    return last_positive;
  }
};

// Draws from `row` given its per-chunk sums (chunk c summed over [c*kVocabChunk, ...)).
// Returns 0 for a row without positive mass, as the reference does.
inline int64_t draw_from_chunk_sums(const ResidualRow& row, const double* chunk_sums,
                                    int64_t vocab, float u) {
  const int64_t chunks = num_vocab_chunks(vocab);
  double total = 0;
  for (int64_t c = 0; c < chunks; ++c) total += chunk_sums[c];
  if (!(total > 0)) return 0;
  // u < 1, so threshold < total, and the running sum below reaches total exactly at the last
  // chunk with mass: some chunk always holds the threshold.
  const double threshold = double(u) * total;
  double before = 0;
  for (int64_t c = 0; c < chunks; ++c) {
    if (chunk_sums[c] > 0 && before + chunk_sums[c] > threshold) {
      const int64_t begin = c * kVocabChunk;
      return row.find_in_chunk(begin, std::min(vocab, begin + kVocabChunk), before, threshold);
    }
    before += chunk_sums[c];
  }
  return 0;  // unreachable: see above
}

}  // namespace specops
