// [B, R, V] tensors read row by row through their strides, shared by the CPU kernels.
#pragma once

#include <ATen/ATen.h>

#include <cstdint>

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

}  // namespace specops
