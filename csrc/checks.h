// Input checks shared by the CPU kernels (contract, "Bad input").
// The level is process-wide, set from Python by specops.set_checks().
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

namespace specops {

enum class CheckLevel : int { kOff = 0, kCheap = 1, kFull = 2 };

CheckLevel check_level();
void set_check_level(CheckLevel level);

// Wrong dtype, shape or device: TypeError / ValueError naming the argument, at every level.
inline void check_tensor(const at::Tensor& t, const char* op, const char* name,
                         at::ScalarType dtype, int64_t dim) {
  TORCH_CHECK_TYPE(t.scalar_type() == dtype, op, ": ", name, " must be ", dtype, ", got ",
                   t.scalar_type());
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", name, " must have ", dim, " dims, got shape ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be on the CPU here, got ",
                    t.device());
}

inline void check_float_logits(const at::Tensor& t, const char* op, const char* name) {
  auto s = t.scalar_type();
  TORCH_CHECK_TYPE(s == at::kFloat || s == at::kBFloat16 || s == at::kHalf, op, ": ", name,
                   " must be float32, bfloat16 or float16, got ", s);
}

inline void check_dim_size(const at::Tensor& t, const char* op, const char* name, int64_t dim,
                           int64_t expected, const char* what) {
  TORCH_CHECK_VALUE(t.size(dim) == expected, op, ": ", name, ".shape[", dim, "] must be ",
                    expected, " (", what, "), got shape ", t.sizes());
}

}  // namespace specops
