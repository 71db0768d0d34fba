// Vocabulary rows cut into fixed chunks, so that one long row (batch 1) still uses every core:
// the CPU kernels run at::parallel_for over (row, chunk) pairs, not over rows alone.
#pragma once

#include <ATen/Parallel.h>

#include <algorithm>
#include <cstdint>

namespace specops {

// 8192 floats = 32 KiB per chunk: V = 151936 gives 19 chunks, enough to share among cores,
// and the one chunk a draw rescans stays short.
constexpr int64_t kVocabChunk = 8192;

inline int64_t num_vocab_chunks(int64_t vocab) {
  return (vocab + kVocabChunk - 1) / kVocabChunk;
}

// Calls fn(row, chunk, begin, end) for every chunk [begin, end) of rows 0..num_rows-1, in
// parallel. fn must only write to state owned by its (row, chunk).
template <class Fn>
void parallel_for_vocab_chunks(int64_t num_rows, int64_t vocab, const Fn& fn) {
  const int64_t chunks = num_vocab_chunks(vocab);
  // Hand out at least ~32K elements per task: smaller tasks cost more to schedule than to run.
  const int64_t grain = std::max<int64_t>(1, 32768 / std::min(vocab, kVocabChunk));
  at::parallel_for(0, num_rows * chunks, grain, [&](int64_t lo, int64_t hi) {
    for (int64_t task = lo; task < hi; ++task) {
      const int64_t row = task / chunks, chunk = task % chunks;
      const int64_t begin = chunk * kVocabChunk;
      fn(row, chunk, begin, std::min(vocab, begin + kVocabChunk));
    }
  });
}

}  // namespace specops
