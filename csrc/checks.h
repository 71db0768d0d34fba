// Input checks shared by the CPU kernels (contract, "Bad input").
// The level is process-wide, set from Python by specops.set_checks().
#pragma once

#include <ATen/ATen.h>
#include <c10/util/Exception.h>

#include <cmath>
#include <limits>

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

// dims and device, for arguments whose dtype is checked separately (logits).
inline void check_layout(const at::Tensor& t, const char* op, const char* name, int64_t dim) {
  TORCH_CHECK_VALUE(t.dim() == dim, op, ": ", name, " must have ", dim, " dims, got shape ",
                    t.sizes());
  TORCH_CHECK_VALUE(t.device().is_cpu(), op, ": ", name, " must be on the CPU here, got ",
                    t.device());
}

// What makes a probability row unusable (full checks): the first fault found, in this order.
enum class RowFault : int { kNone = 0, kNaN, kInf, kNegative, kZeroSum };

inline const char* row_fault_text(RowFault fault) {
  switch (fault) {
    case RowFault::kNaN: return "holds a NaN";
    case RowFault::kInf: return "holds an inf";
    case RowFault::kNegative: return "holds a negative entry";
    case RowFault::kZeroSum: return "sums to zero";
    default: return "is fine";
  }
}

inline RowFault prob_row_fault(const float* row, int64_t n) {
  constexpr float kInf = std::numeric_limits<float>::infinity();
  int nan = 0, inf = 0, negative = 0, positive = 0;
  for (int64_t i = 0; i < n; ++i) {
    const float x = row[i];
    nan |= x != x;
    inf |= (x == kInf) | (x == -kInf);
    negative |= x < 0.0f;
    positive |= x > 0.0f;
  }
  if (nan) return RowFault::kNaN;
  if (inf) return RowFault::kInf;
  if (negative) return RowFault::kNegative;
  return positive ? RowFault::kNone : RowFault::kZeroSum;
}

}  // namespace specops
