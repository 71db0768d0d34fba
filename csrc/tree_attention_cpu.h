// Pieces shared by the CPU tree_attention kernels (tree_attention_cpu.cpp, which holds the
// node-tile kernel, and tree_attention_wide_cpu.h, the kernel for wide query tiles): the
// problem description, the cache views of both layouts, vectors and exp.
#pragma once

#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <limits>

#if defined(__GNUC__) && !defined(__clang__) && __GNUC__ >= 12 && defined(__x86_64__) && \
    defined(__linux__)
#define SPECOPS_CPU_CLONES \
  __attribute__((target_clones("arch=x86-64-v4", "arch=x86-64-v3", "default")))
#else
#define SPECOPS_CPU_CLONES
#endif
#define SPECOPS_INLINE __attribute__((always_inline)) inline
// Keep the hot loops in the bodies of the SPECOPS_CPU_CLONES functions and of the
// SPECOPS_INLINE helpers they call, never in a lambda: a lambda is a function of its own,
// compiled for the baseline target (no AVX2/AVX-512), and so is every helper inlined into it.
// A lambda walking the key blocks made tree_attention 10-40x slower here (T = 1..33, 12
// heads, prefix 400); the tests still passed.
// Vec16 values only cross always-inlined calls, so the ABI note GCC makes about them is moot.
#pragma GCC diagnostic ignored "-Wpsabi"

namespace specops {
namespace tree_attention_kernels {

constexpr float kNegInf = -std::numeric_limits<float>::infinity();

// Slot `slot` of row b, kv head `head`, in either cache layout; the last dim is contiguous.
template <class T>
struct CacheView {
  const T* base = nullptr;
  int64_t stride_outer = 0;  // contiguous [B, Hkv, S, D]: per row b; paged: per block
  int64_t stride_slot = 0;   // contiguous: per slot; paged: per offset in a block
  int64_t stride_head = 0;
  const int32_t* block_table = nullptr;  // [B, max_blocks], contiguous; null when contiguous
  int64_t max_blocks = 0, block_size = 1, num_blocks = 1;

  const T* row(int64_t b, int64_t head, int64_t slot) const {
    if (block_table == nullptr) {
      return base + b * stride_outer + slot * stride_slot + head * stride_head;
    }
    // Clamped: with checks off an out-of-range entry reads a block of the cache, never past it.
    const int64_t entry = block_table[b * max_blocks + slot / block_size];
    const int64_t block = std::min<int64_t>(std::max<int64_t>(entry, 0), num_blocks - 1);
    return base + block * stride_outer + (slot % block_size) * stride_slot + head * stride_head;
  }
};

template <class T>
struct Problem {
  const T* q = nullptr;  // [B, T, H, D], last dim contiguous
  int64_t q_stride_b = 0, q_stride_t = 0, q_stride_h = 0;
  CacheView<T> k, v;
  const bool* mask = nullptr;     // [B, T, T], contiguous
  const int64_t* prefix = nullptr;  // [B], cache_lens clamped to 0..capacity - T
  T* out = nullptr;               // [B, T, H, D], contiguous
  int64_t num_nodes = 0, num_heads = 0, group = 0, head_dim = 0;
  float scale = 1.0f;
};

// exp(x) for x <= 0 (a score minus a running max) in a form compilers vectorise: Cephes'
// expf, relative error below 2e-7; x below -87 (and -inf, a masked slot) gives exactly 0.
SPECOPS_INLINE float exp_nonpositive(float x) {
  constexpr float kLog2e = 1.44269504088896341f, kRound = 12582912.0f;  // 1.5 * 2^23
  const float clamped = std::max(x, -87.0f);
  const float n = (clamped * kLog2e + kRound) - kRound;  // round to nearest, no libm call
  float r = clamped - n * 0.693359375f;
  r = r - n * -2.12194440e-4f;
  float y = 1.9875691500e-4f;
  y = y * r + 1.3981999507e-3f;
  y = y * r + 8.3334519073e-3f;
  y = y * r + 4.1665795894e-2f;
  y = y * r + 1.6666665459e-1f;
  y = y * r + 5.0000001201e-1f;
  y = y * (r * r) + r + 1.0f;
  const int32_t bits = (static_cast<int32_t>(n) + 127) << 23;  // 2^n, n in -126..0
  float scale;
  std::memcpy(&scale, &bits, sizeof(scale));
  return x < -87.0f ? 0.0f : y * scale;
}

// 16 floats: one AVX-512 register, two AVX2 ones. GCC/Clang vector extensions keep the
// accumulators below in registers where plain arrays were spilled to memory on every step.
typedef float Vec16 __attribute__((vector_size(64)));
constexpr int64_t kVec = 16;

SPECOPS_INLINE Vec16 load16(const float* p) {
  Vec16 v;
  std::memcpy(&v, p, sizeof(v));
  return v;
}
SPECOPS_INLINE void store16(float* p, Vec16 v) { std::memcpy(p, &v, sizeof(v)); }

}  // namespace tree_attention_kernels
}  // namespace specops
