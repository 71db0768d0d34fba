// CPU kernel of skinny_linear: y = x @ W^T (+ bias) for a few rows of x, float32 or bfloat16
// (executable specification: torch.nn.functional.linear; wrapper: specops/linear_ops.py).
//
// bfloat16: W is read as bfloat16 (half the bytes of float32, which is what the product costs)
// and widened to float32 in registers (a bfloat16 is the top 16 bits of a float32: zero-extend
// and shift left by 16, exact); x and bias are widened once up front, sums are float32, and
// y is rounded to bfloat16 at the end (torch's float32 -> bfloat16 cast, nearest even).
//
// A linear layer over M = 1..16 rows is memory-bound in principle: W (N x K) is far larger
// than x or y, so it should cost about one read of W, like a matrix-vector product. BLAS
// sgemm does not get there for such M (it packs W into panels; on an AVX-512 EPYC a 2-row
// product costs about twice the 1-row one). Here each task owns a range of output columns n
// and walks its rows of W kR at a time (a group). For each group, every tile of up to kMaxH
// rows of x runs over all K columns in SIMD chunks, keeping its kH x kR dot products in
// vector registers (fp32 FMA), so each W vector loaded serves kH rows of x and each x vector
// kR rows of W. The first tile reads the group from memory, the others from cache (kR * K
// floats, L1 or L2), and every tile prefetches a share of the next group into L2 meanwhile.
// Horizontal sums at the end of each tile.
//
// Per call: reads W from memory once (N * K * 4 bytes), x once per group (from cache), writes
// y (M * N floats) once; M * N * K FMAs. From about M = 5 on this CPU the FMAs, not the
// memory stream, set the time (one 16-lane FMA per cycle against ~20 GB/s of W).
//
// The row loop is compiled for AVX-512, AVX2 and baseline x86-64 (GCC target_clones, picked
// at load time); the register tiling is picked at run time to suit the register file (32
// 512-bit registers with AVX-512, 16 256-bit ones otherwise).
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstring>
#include <optional>

#include "checks.h"

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && \
    defined(__linux__)
#define SPECOPS_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#define SPECOPS_HAS_AVX512() (__builtin_cpu_supports("x86-64-v4") != 0)
#else
#define SPECOPS_CPU_CLONES
#define SPECOPS_HAS_AVX512() false
#endif
#define SPECOPS_INLINE __attribute__((always_inline)) inline
// Vector values only cross always-inlined calls, so the ABI note GCC makes about them is moot.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace specops {
namespace {

constexpr const char* kOp = "skinny_linear";
constexpr int64_t kPad = 16;  // x rows are padded with zeros to a multiple of this many floats
constexpr int64_t kMinTaskBytes = 256 * 1024;  // less W than this per thread is not worth a task

// 16 floats (one AVX-512 register) or 8 (one AVX2 register). GCC vector extensions keep the
// accumulators in registers; `a += b * c` contracts to an FMA where the target has one.
typedef float Vec16 __attribute__((vector_size(64)));
typedef float Vec8 __attribute__((vector_size(32)));

template <class V>
constexpr int kLanes = sizeof(V) / sizeof(float);

template <class V>
SPECOPS_INLINE V load(const float* p) {
  V v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}

// W elements: float32, or bfloat16 as its raw 16 bits.
typedef uint16_t Bf16Bits;
typedef uint16_t U16x16 __attribute__((vector_size(32)));
typedef uint16_t U16x8 __attribute__((vector_size(16)));
typedef uint32_t U32x16 __attribute__((vector_size(64)));
typedef uint32_t U32x8 __attribute__((vector_size(32)));
template <class V>
struct BitsOf;
template <>
struct BitsOf<Vec16> {
  typedef U16x16 Half;
  typedef U32x16 Full;
};
template <>
struct BitsOf<Vec8> {
  typedef U16x8 Half;
  typedef U32x8 Full;
};

// One vector of W elements as float32.
template <class V>
SPECOPS_INLINE V load_w(const float* p) {
  return load<V>(p);
}
template <class V>
SPECOPS_INLINE V load_w(const Bf16Bits* p) {
  typename BitsOf<V>::Half h;
  std::memcpy(&h, p, sizeof(h));
  const typename BitsOf<V>::Full bits =
      __builtin_convertvector(h, typename BitsOf<V>::Full) << 16;
  V v;
  std::memcpy(&v, &bits, sizeof(v));
  return v;
}

template <class V>
SPECOPS_INLINE float hsum(V v) {
  float lanes[kLanes<V>];
  std::memcpy(lanes, &v, sizeof(v));
  float s = 0.0f;
  for (int i = 0; i < kLanes<V>; ++i) s += lanes[i];
  return s;
}

template <class WT>
struct Problem {
  const float* x = nullptr;     // [M, ldx], zero-padded past K up to a multiple of kPad
  int64_t ldx = 0;
  const WT* w = nullptr;        // [N, K], row stride ldw, last dim contiguous
  int64_t ldw = 0;
  const float* bias = nullptr;  // [N] or null
  float* y = nullptr;           // [M, N], contiguous
  int64_t num_rows = 0, n = 0, k = 0;
};

// y[m, n0 + r] = x[m] . W[n0 + r] (+ bias) for the kH rows m of x at x, kR rows of W at n0.
// Also prefetches, at each step, the same columns of rows `prefetch_rows` of `next` (the next
// group of W rows), so that memory is read while the other tiles of x compute from cache.
template <int kH, int kR, class V, class WT>
SPECOPS_INLINE void dot_tile(const Problem<WT>& p, const float* x, float* y, int64_t n0,
                             const WT* next, int first_prefetch_row, int prefetch_step) {
  constexpr int L = kLanes<V>;
  const WT* w = p.w + n0 * p.ldw;
  V acc[kH][kR] = {};
  const int64_t k_full = p.k - p.k % L;
  for (int64_t i = 0; i < k_full; i += L) {
    V wv[kR];
    for (int r = 0; r < kR; ++r) wv[r] = load_w<V>(w + r * p.ldw + i);
    if (next != nullptr) {
      for (int r = first_prefetch_row; r < kR; r += prefetch_step) {
        __builtin_prefetch(next + r * p.ldw + i, 0, 1);  // to L2: L1 holds x and this group
      }
    }
    for (int m = 0; m < kH; ++m) {
      const V xv = load<V>(x + m * p.ldx + i);
      for (int r = 0; r < kR; ++r) acc[m][r] += xv * wv[r];
    }
  }
  if (k_full < p.k) {  // K tail: W padded with zeros here, x already is
    V wv[kR];
    for (int r = 0; r < kR; ++r) {
      WT tail[L] = {};
      std::memcpy(tail, w + r * p.ldw + k_full, (p.k - k_full) * sizeof(WT));
      wv[r] = load_w<V>(tail);
    }
    for (int m = 0; m < kH; ++m) {
      const V xv = load<V>(x + m * p.ldx + k_full);
      for (int r = 0; r < kR; ++r) acc[m][r] += xv * wv[r];
    }
  }
  for (int m = 0; m < kH; ++m) {
    for (int r = 0; r < kR; ++r) {
      const float b = p.bias != nullptr ? p.bias[n0 + r] : 0.0f;
      y[m * p.n + n0 + r] = hsum(acc[m][r]) + b;
    }
  }
}

// Register tiles: kMaxH rows of x by kR rows of W, so that kMaxH * kR accumulators, kR W
// vectors and one x vector fit the register file: 32 registers with AVX-512 (Vec16), 16 with
// AVX2 (Vec8). Each step of a tile loads kR + kH vectors for kH * kR FMAs.
template <class V>
struct Tiling;
template <>
struct Tiling<Vec16> {
  static constexpr int kMaxH = 4, kR = 6;
};
template <>
struct Tiling<Vec8> {
  static constexpr int kMaxH = 2, kR = 4;
};

template <int kR, class V, class WT>
SPECOPS_INLINE void dot_tile_any(const Problem<WT>& p, int64_t m0, int h, int64_t n0,
                                 const WT* next, int first_prefetch_row, int prefetch_step) {
  const float* x = p.x + m0 * p.ldx;
  float* y = p.y + m0 * p.n;
  constexpr int kMaxH = Tiling<V>::kMaxH;
  switch (h) {
    case 1: dot_tile<1, kR, V, WT>(p, x, y, n0, next, first_prefetch_row, prefetch_step); break;
    case 2: dot_tile<2, kR, V, WT>(p, x, y, n0, next, first_prefetch_row, prefetch_step); break;
    case 3:
      if constexpr (kMaxH >= 3) {
        dot_tile<3, kR, V, WT>(p, x, y, n0, next, first_prefetch_row, prefetch_step);
      }
      break;
    case 4:
      if constexpr (kMaxH >= 4) {
        dot_tile<4, kR, V, WT>(p, x, y, n0, next, first_prefetch_row, prefetch_step);
      }
      break;
    default: break;
  }
}

// Output columns [n0, n1) for every row of x. Rows of W go kR at a time; for each group, every
// tile of x rows walks the group's K columns. The first tile reads the group from memory and
// the others from cache (kR * K floats: L1 or L2), so W is read from memory once, while each
// tile prefetches a share of the next group's rows.
template <class V, class WT>
SPECOPS_INLINE void columns_impl(const Problem<WT>& p, int64_t n0, int64_t n1) {
  constexpr int kR = Tiling<V>::kR, kMaxH = Tiling<V>::kMaxH;
  const int64_t num_tiles = (p.num_rows + kMaxH - 1) / kMaxH;
  // Tiles of near-equal height: M = 9 is 3 + 3 + 3 rather than 4 + 4 + 1.
  const int64_t base = p.num_rows / num_tiles, extra = p.num_rows % num_tiles;
  const int step = static_cast<int>(std::min<int64_t>(num_tiles, kR));
  int64_t n = n0;
  for (; n + kR <= n1; n += kR) {
    const WT* next = n + 2 * kR <= n1 ? p.w + (n + kR) * p.ldw : nullptr;
    int64_t m0 = 0;
    for (int64_t t = 0; t < num_tiles; ++t) {
      const int h = static_cast<int>(base + (t < extra ? 1 : 0));
      const int first = static_cast<int>(t < kR ? t : kR);  // kR: this tile prefetches nothing
      dot_tile_any<kR, V, WT>(p, m0, h, n, next, first, step);
      m0 += h;
    }
  }
  for (; n < n1; ++n) {
    int64_t m0 = 0;
    for (int64_t t = 0; t < num_tiles; ++t) {
      const int h = static_cast<int>(base + (t < extra ? 1 : 0));
      dot_tile_any<1, V, WT>(p, m0, h, n, nullptr, 0, 1);
      m0 += h;
    }
  }
}

SPECOPS_CPU_CLONES void columns(const Problem<float>& p, int64_t n0, int64_t n1, bool wide) {
  if (wide) {
    columns_impl<Vec16>(p, n0, n1);
  } else {
    columns_impl<Vec8>(p, n0, n1);
  }
}

SPECOPS_CPU_CLONES void columns_bf16(const Problem<Bf16Bits>& p, int64_t n0, int64_t n1,
                                     bool wide) {
  if (wide) {
    columns_impl<Vec16>(p, n0, n1);
  } else {
    columns_impl<Vec8>(p, n0, n1);
  }
}

at::Tensor skinny_linear_cpu(const at::Tensor& x, const at::Tensor& weight,
                             const std::optional<at::Tensor>& bias) {
  const at::ScalarType dtype = x.scalar_type();
  TORCH_CHECK_TYPE(dtype == at::kFloat || dtype == at::kBFloat16, kOp,
                   ": x must be float32 or bfloat16, got ", dtype);
  TORCH_CHECK_VALUE(x.dim() >= 1, kOp, ": x must have at least 1 dim, got shape ", x.sizes());
  check_tensor(weight, kOp, "weight", dtype, 2);
  TORCH_CHECK_VALUE(x.device().is_cpu(), kOp, ": x must be on the CPU here, got ", x.device());
  const int64_t n = weight.size(0), k = weight.size(1);
  TORCH_CHECK_VALUE(x.size(-1) == k, kOp, ": x.shape[-1] must be ", k,
                    " (weight.shape[1], in_features), got shape ", x.sizes());
  if (bias) {
    check_tensor(*bias, kOp, "bias", dtype, 1);
    check_dim_size(*bias, kOp, "bias", 0, n, "weight.shape[0], out_features");
  }
  const bool bf16 = dtype == at::kBFloat16;

  std::vector<int64_t> out_shape(x.sizes().begin(), x.sizes().end());
  out_shape.back() = n;
  // bfloat16: sums go to a float32 buffer (M * N floats), rounded to bfloat16 at the end.
  at::Tensor y = at::empty(out_shape, x.options().dtype(at::kFloat));
  const int64_t num_rows = k > 0 ? x.numel() / k : c10::multiply_integers(x.sizes().begin(),
                                                                          x.sizes().end() - 1);
  if (num_rows == 0 || n == 0) return y.to(dtype);

  // x rows are read in place when they are float32 and can be loaded as whole vectors;
  // otherwise copied once (M * K floats, small next to W) into zero-padded float32 rows.
  at::Tensor x2 = x.reshape({num_rows, k});
  at::Tensor x_pad;
  const float* xp = nullptr;
  int64_t ldx = 0;
  if (!bf16 && k % kPad == 0 && x2.stride(1) == 1 && k > 0) {
    xp = x2.const_data_ptr<float>();
    ldx = x2.stride(0);
  } else {
    ldx = (k + kPad - 1) / kPad * kPad;
    x_pad = at::zeros({num_rows, std::max<int64_t>(ldx, 1)}, x.options().dtype(at::kFloat));
    if (k > 0) x_pad.narrow(1, 0, k).copy_(x2);
    xp = x_pad.const_data_ptr<float>();
  }
  at::Tensor w = weight.stride(1) == 1 ? weight : weight.contiguous();
  at::Tensor b;
  if (bias) b = bias->to(at::kFloat).contiguous();

  const bool wide = SPECOPS_HAS_AVX512();
  const int64_t grain =
      std::max<int64_t>(16, kMinTaskBytes / std::max<int64_t>(1, k * w.element_size()));
  const float* bias_data = bias ? b.const_data_ptr<float>() : nullptr;
  float* out = y.mutable_data_ptr<float>();
  if (bf16) {
    const auto* w_bits = reinterpret_cast<const Bf16Bits*>(w.const_data_ptr<at::BFloat16>());
    const Problem<Bf16Bits> p{xp, ldx, w_bits, w.stride(0), bias_data, out, num_rows, n, k};
    at::parallel_for(0, n, grain, [&](int64_t n0, int64_t n1) { columns_bf16(p, n0, n1, wide); });
    return y.to(at::kBFloat16);  // round to nearest even, as torch casts
  }
  const Problem<float> p{xp, ldx, w.const_data_ptr<float>(), w.stride(0), bias_data, out,
                         num_rows, n, k};
  at::parallel_for(0, n, grain, [&](int64_t n0, int64_t n1) { columns(p, n0, n1, wide); });
  return y;
}

}  // namespace
}  // namespace specops

TORCH_LIBRARY_IMPL(specops, CPU, m) { m.impl("skinny_linear", &specops::skinny_linear_cpu); }
