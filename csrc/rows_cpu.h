// [B, R, V] tensors read row by row through their strides, shared by the CPU kernels.
#pragma once

#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/Exception.h>

#include <cstdint>
#include <vector>

namespace specops {

// [B, R, V] rows addressed through their strides, without copying; the last dim is made
// contiguous if it is not (never the case for tensors a model produces).
template <class T>
struct Rows {
  at::Tensor keep_alive;
  const T* base;
  int64_t stride_b, stride_r;

  explicit Rows(const at::Tensor& t)
      : keep_alive(t.stride(2) == 1 ? t : t.contiguous()),
        base(keep_alive.const_data_ptr<T>()),
        stride_b(keep_alive.stride(0)),
        stride_r(keep_alive.stride(1)) {}

  const T* row(int64_t b, int64_t r) const { return base + b * stride_b + r * stride_r; }
};

// Full checks of greedy ops: no NaN in target_logits rows 0..rows_used(b)-1 of each batch row
// (rows scanned in parallel; the first bad row is reported, naming `which` rows are scanned).
template <class T, class RowsUsed>
void check_no_nan_rows(const char* op, const Rows<T>& logits, int64_t batch, int64_t num_rows,
                       int64_t vocab, const RowsUsed& rows_used, const char* which) {
  std::vector<char> has_nan(batch * num_rows, 0);
  at::parallel_for(0, batch * num_rows, 1, [&](int64_t lo, int64_t hi) {
    for (int64_t t = lo; t < hi; ++t) {
      const int64_t b = t / num_rows, r = t % num_rows;
      if (r >= rows_used(b)) continue;
      const T* row = logits.row(b, r);
      int nan = 0;
      for (int64_t i = 0; i < vocab; ++i) {
        const float x = static_cast<float>(row[i]);
        nan |= x != x;
      }
      has_nan[t] = char(nan);
    }
  });
  for (int64_t t = 0; t < batch * num_rows; ++t) {
    TORCH_CHECK_VALUE(!has_nan[t], op, ": target_logits[", t / num_rows, ", ", t % num_rows,
                      "] holds a NaN (full checks scan ", which, ")");
  }
}

}  // namespace specops
