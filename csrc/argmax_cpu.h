// torch.argmax's rule on one row, chunk by chunk: the first maximal index, where a NaN counts
// as larger than every number (so the first NaN wins). bf16/fp16 compare after conversion to
// float, which keeps their order.
#pragma once

#include <algorithm>
#include <cstdint>
#include <limits>
#include <type_traits>

#if defined(__SSE2__)
#include <emmintrin.h>
#endif

#include "vocab_chunks.h"

namespace specops {

struct ChunkMax {
  float value;    // largest non-NaN value of the chunk (-inf if none)
  int64_t index;  // first index of the first NaN if has_nan, else of value
  bool has_nan;
};

namespace argmax_detail {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Largest non-NaN value of x[0..n) (-inf if none); sets has_nan if a NaN occurs.
// GCC does not vectorise a float max without -ffast-math, hence SSE2 (x86-64's baseline).
inline float max_ignoring_nan(const float* x, int64_t n, bool& has_nan) {
  float m = kNegInf;
  int64_t i = 0;
  int nan = 0;
#if defined(__SSE2__)
  __m128 m0 = _mm_set1_ps(kNegInf), m1 = m0, m2 = m0, m3 = m0;
  __m128 u0 = _mm_setzero_ps(), u1 = u0;
  for (; i + 16 <= n; i += 16) {
    const __m128 a = _mm_loadu_ps(x + i), b = _mm_loadu_ps(x + i + 4);
    const __m128 c = _mm_loadu_ps(x + i + 8), d = _mm_loadu_ps(x + i + 12);
    // _mm_max_ps(a, m) is a > m ? a : m, so a NaN in `a` leaves m unchanged.
    m0 = _mm_max_ps(a, m0);
    m1 = _mm_max_ps(b, m1);
    m2 = _mm_max_ps(c, m2);
    m3 = _mm_max_ps(d, m3);
    u0 = _mm_or_ps(u0, _mm_or_ps(_mm_cmpunord_ps(a, a), _mm_cmpunord_ps(b, b)));
    u1 = _mm_or_ps(u1, _mm_or_ps(_mm_cmpunord_ps(c, c), _mm_cmpunord_ps(d, d)));
  }
  alignas(16) float lanes[4];
  _mm_store_ps(lanes, _mm_max_ps(_mm_max_ps(m0, m1), _mm_max_ps(m2, m3)));
  for (float lane : lanes) m = lane > m ? lane : m;
  nan = _mm_movemask_ps(_mm_or_ps(u0, u1));
#endif
  for (; i < n; ++i) {
    m = x[i] > m ? x[i] : m;
    nan |= x[i] != x[i];
  }
  has_nan = nan != 0;
  return m;
}

// First i in [0, n) with x[i] == value, or with x[i] NaN if find_nan; n if none.
inline int64_t first_index(const float* x, int64_t n, float value, bool find_nan) {
  int64_t i = 0;
#if defined(__SSE2__)
  const __m128 v = _mm_set1_ps(value);
  for (; i + 8 <= n; i += 8) {
    const __m128 a = _mm_loadu_ps(x + i), b = _mm_loadu_ps(x + i + 4);
    const __m128 hit = find_nan ? _mm_or_ps(_mm_cmpunord_ps(a, a), _mm_cmpunord_ps(b, b))
                                : _mm_or_ps(_mm_cmpeq_ps(a, v), _mm_cmpeq_ps(b, v));
    if (_mm_movemask_ps(hit)) break;
  }
#endif
  for (; i < n; ++i) {
    if (find_nan ? x[i] != x[i] : x[i] == value) return i;
  }
  return n;
}

}  // namespace argmax_detail

// Argmax of row[begin, end), at most kVocabChunk long.
template <class T>
ChunkMax chunk_argmax(const T* row, int64_t begin, int64_t end) {
  const int64_t n = end - begin;
  const float* x;
  float converted[std::is_same_v<T, float> ? 1 : kVocabChunk];
  if constexpr (std::is_same_v<T, float>) {
    x = row + begin;
  } else {
    for (int64_t i = 0; i < n; ++i) converted[i] = static_cast<float>(row[begin + i]);
    x = converted;
  }
  bool has_nan = false;
  const float m = argmax_detail::max_ignoring_nan(x, n, has_nan);
  // The search always succeeds (a chunk of -inf finds its first -inf); min() only guards.
  const int64_t first = std::min(argmax_detail::first_index(x, n, m, has_nan), n - 1);
  return {m, begin + first, has_nan};
}

// Combines the results of consecutive chunks of one row into the row's argmax.
inline int64_t combine_argmax(const ChunkMax* chunks, int64_t num_chunks) {
  int64_t best = 0;
  for (int64_t c = 0; c < num_chunks; ++c) {
    if (chunks[c].has_nan) return chunks[c].index;
    if (chunks[c].value > chunks[best].value) best = c;
  }
  return chunks[best].index;
}

// Argmax of a whole row, chunk by chunk on the calling thread.
template <class T>
int64_t row_argmax(const T* row, int64_t vocab) {
  ChunkMax best{argmax_detail::kNegInf, 0, false};
  for (int64_t begin = 0; begin < vocab; begin += kVocabChunk) {
    const ChunkMax chunk = chunk_argmax(row, begin, std::min(vocab, begin + kVocabChunk));
    if (chunk.has_nan) return chunk.index;
    if (begin == 0 || chunk.value > best.value) best = chunk;
  }
  return best.index;
}

}  // namespace specops
