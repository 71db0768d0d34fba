// The tree_attention CPU kernel for wide query tiles (many nodes x grouped heads per kv head,
// e.g. T = 8 or 64 with H/Hkv = 4): the score and value products as register-blocked
// outer products, the query rows across vector lanes.
//
// The node-tile kernel (tree_attention_cpu.cpp) puts key slots across the lanes, so it must
// transpose every key block; with few query rows that transpose is cheap next to the rest,
// with 32 or more it is what limits it. Here query row r of a task is lane r of every vector,
// so neither operand is ever transposed inside the slot loop:
//   scores   s[j][r] = sum_d  k[j][d] * qt[d][r]   (a key element broadcast, a q vector)
//   values  ot[d][r] += sum_j v[j][d] *  p[j][r]   (a value element broadcast, a p vector)
// Each micro-tile holds kTileA x kTileV vectors (16 accumulators) in registers, so one loaded
// vector serves kTileA fused multiply-adds. The online softmax works on whole vectors of rows
// too. q is transposed once per task on the way in, the output once on the way out.
//
// Per task it reads q's rows once, the kv head's prefix and tree block once (converted to
// float32 a block at a time), the mask rows of its nodes, and writes its output rows once.
// A row's result depends only on its own lane, so it is the same for every tiling.
#pragma once

#include <algorithm>
#include <cstdint>
#include <cstdlib>
#include <memory>

#include "tree_attention_cpu.h"

namespace specops {
namespace tree_attention_kernels {

constexpr int64_t kWideSlots = 64;  // key/value slots per step of the online softmax
constexpr int kTileA = 8;           // slots (scores) or head-dim entries (values) per tile
constexpr int kTileV = 2;           // vectors of 16 query rows per tile
constexpr int64_t kWideLanes = kTileV * kVec;  // rows are padded to a multiple of this
constexpr int64_t kWideMaxRows = 128;          // query rows per task (more when group > 128)
static_assert(kWideSlots % kTileA == 0, "a block is a whole number of tiles");

// Query rows per call from which the wide kernel is used (T * H / Hkv); below it most lanes
// would be padding. It also needs head_dim % kTileA == 0.
constexpr int64_t kWideMinRows = 16;

inline int64_t round_up(int64_t x, int64_t m) { return (x + m - 1) / m * m; }

// 64-byte aligned floats: a Vec16 load then never splits across two cache lines.
struct AlignedFloats {
  struct Free {
    void operator()(float* p) const { std::free(p); }
  };
  std::unique_ptr<float, Free> ptr;
  explicit AlignedFloats(int64_t n)
      : ptr(static_cast<float*>(std::aligned_alloc(64, round_up(std::max<int64_t>(n, 1) * 4, 64)))) {
    if (!ptr) throw std::bad_alloc();
  }
  float* get() const { return ptr.get(); }
};

// Per-thread buffers of one task with `lanes` padded query rows.
struct WideScratch {
  int64_t lanes;
  AlignedFloats qt, ot;     // [D, lanes]: scaled queries; output accumulator
  AlignedFloats kb, vb;     // [kWideSlots, D]: the block's keys and values in float32
  AlignedFloats s;          // [kWideSlots, lanes]: scores, then softmax weights
  AlignedFloats m, l, alpha, safe_max, sum;  // [lanes] each
  WideScratch(int64_t lanes, int64_t dim)
      : lanes(lanes), qt(dim * lanes), ot(dim * lanes), kb(kWideSlots * dim),
        vb(kWideSlots * dim), s(kWideSlots * lanes), m(lanes), l(lanes), alpha(lanes),
        safe_max(lanes), sum(lanes) {}
};

// acc[a][c] += sum_{k < len} x[a * xa + k * xk] * y[k * yk + c * 16]: kTileA broadcast
// elements of x times kTileV vectors of y per step.
SPECOPS_INLINE void outer_tile(const float* x, int64_t xa, int64_t xk, const float* y,
                               int64_t yk, int64_t len, Vec16 (&acc)[kTileA][kTileV]) {
  for (int64_t k = 0; k < len; ++k) {
    Vec16 yv[kTileV];
    for (int c = 0; c < kTileV; ++c) yv[c] = load16(y + k * yk + c * kVec);
    for (int a = 0; a < kTileA; ++a) {
      const float xs = x[a * xa + k * xk];
      for (int c = 0; c < kTileV; ++c) acc[a][c] += xs * yv[c];
    }
  }
}

// One block of n <= kWideSlots slots starting at `slot0` for the task's `rows` query rows.
// `tree_j0 >= 0` marks a tree block (slot slot0 + j holds node tree_j0 + j), where the mask
// applies; the prefix (tree_j0 < 0) is open to every node.
template <class T, int kD>
SPECOPS_INLINE void wide_block(const Problem<T>& p, WideScratch& w, int64_t b, int64_t kv_head,
                               int64_t node_begin, int64_t rows, int64_t slot0, int64_t n,
                               int64_t tree_j0) {
  const int64_t dim = kD > 0 ? kD : p.head_dim, lanes = w.lanes;
  const int64_t n_pad = round_up(n, kTileA);
  float *kb = w.kb.get(), *vb = w.vb.get(), *s = w.s.get();
  for (int64_t j = 0; j < n; ++j) {
    const T* k_row = p.k.row(b, kv_head, slot0 + j);
    const T* v_row = p.v.row(b, kv_head, slot0 + j);
    for (int64_t d = 0; d < dim; ++d) kb[j * dim + d] = static_cast<float>(k_row[d]);
    for (int64_t d = 0; d < dim; ++d) vb[j * dim + d] = static_cast<float>(v_row[d]);
  }
  // Pad slots: zero keys give finite scores (masked below), zero values keep 0 * v finite.
  std::fill(kb + n * dim, kb + n_pad * dim, 0.0f);
  std::fill(vb + n * dim, vb + n_pad * dim, 0.0f);

  for (int64_t c0 = 0; c0 < lanes; c0 += kWideLanes) {
    for (int64_t j0 = 0; j0 < n_pad; j0 += kTileA) {
      Vec16 acc[kTileA][kTileV] = {};
      outer_tile(kb + j0 * dim, dim, 1, w.qt.get() + c0, lanes, dim, acc);
      for (int a = 0; a < kTileA; ++a) {
        for (int c = 0; c < kTileV; ++c) store16(s + (j0 + a) * lanes + c0 + c * kVec, acc[a][c]);
      }
    }
  }
  if (tree_j0 >= 0) {
    for (int64_t r = 0; r < rows; ++r) {
      const bool* allowed =
          p.mask + (b * p.num_nodes + node_begin + r / p.group) * p.num_nodes + tree_j0;
      for (int64_t j = 0; j < n; ++j) s[j * lanes + r] = allowed[j] ? s[j * lanes + r] : kNegInf;
    }
  }

  // Online softmax, each loop over the lanes (rows), so it vectorises. A row whose running
  // max is still -inf (nothing seen yet) uses 0 as its max: its weights and alpha are 0.
  float *m = w.m.get(), *l = w.l.get(), *alpha = w.alpha.get();
  float *safe = w.safe_max.get(), *sum = w.sum.get();
  std::copy(m, m + lanes, safe);
  for (int64_t j = 0; j < n; ++j) {
    for (int64_t r = 0; r < lanes; ++r) safe[r] = std::max(safe[r], s[j * lanes + r]);
  }
  for (int64_t r = 0; r < lanes; ++r) {
    const float m_new = safe[r];
    safe[r] = m_new == kNegInf ? 0.0f : m_new;
    alpha[r] = exp_nonpositive(m[r] - safe[r]);
    m[r] = m_new;
    sum[r] = 0.0f;
  }
  for (int64_t j = 0; j < n; ++j) {
    float* row = s + j * lanes;
    for (int64_t r = 0; r < lanes; ++r) {
      row[r] = exp_nonpositive(row[r] - safe[r]);
      sum[r] += row[r];
    }
  }
  std::fill(s + n * lanes, s + n_pad * lanes, 0.0f);
  for (int64_t r = 0; r < lanes; ++r) l[r] = l[r] * alpha[r] + sum[r];

  float* ot = w.ot.get();
  for (int64_t c0 = 0; c0 < lanes; c0 += kWideLanes) {
    Vec16 scale[kTileV];
    for (int c = 0; c < kTileV; ++c) scale[c] = load16(alpha + c0 + c * kVec);
    for (int64_t d0 = 0; d0 < dim; d0 += kTileA) {
      Vec16 acc[kTileA][kTileV];
      for (int a = 0; a < kTileA; ++a) {
        for (int c = 0; c < kTileV; ++c) {
          acc[a][c] = scale[c] * load16(ot + (d0 + a) * lanes + c0 + c * kVec);
        }
      }
      outer_tile(vb + d0, 1, dim, s + c0, lanes, n_pad, acc);
      for (int a = 0; a < kTileA; ++a) {
        for (int c = 0; c < kTileV; ++c) store16(ot + (d0 + a) * lanes + c0 + c * kVec, acc[a][c]);
      }
    }
  }
}

// Nodes [node_begin, node_end) of row b against kv head `kv_head`: the whole task.
template <class T, int kD>
SPECOPS_INLINE void wide_tile(const Problem<T>& p, WideScratch& w, int64_t b, int64_t kv_head,
                              int64_t node_begin, int64_t node_end) {
  const int64_t dim = kD > 0 ? kD : p.head_dim, lanes = w.lanes;
  const int64_t group = p.group, rows = (node_end - node_begin) * group;
  float* qt = w.qt.get();
  std::fill(qt, qt + dim * lanes, 0.0f);  // padding rows: q = 0, finite and never written out
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t node = node_begin + r / group, head = kv_head * group + r % group;
    const T* q = p.q + b * p.q_stride_b + node * p.q_stride_t + head * p.q_stride_h;
    for (int64_t d = 0; d < dim; ++d) qt[d * lanes + r] = static_cast<float>(q[d]) * p.scale;
  }
  std::fill(w.ot.get(), w.ot.get() + dim * lanes, 0.0f);
  std::fill(w.m.get(), w.m.get() + lanes, kNegInf);
  std::fill(w.l.get(), w.l.get() + lanes, 0.0f);

  const int64_t prefix = p.prefix[b];
  for (int64_t slot = 0; slot < prefix; slot += kWideSlots) {
    wide_block<T, kD>(p, w, b, kv_head, node_begin, rows, slot,
                      std::min(kWideSlots, prefix - slot), -1);
  }
  for (int64_t j = 0; j < p.num_nodes; j += kWideSlots) {
    wide_block<T, kD>(p, w, b, kv_head, node_begin, rows, prefix + j,
                      std::min(kWideSlots, p.num_nodes - j), j);
  }

  const float* ot = w.ot.get();
  const float* l = w.l.get();
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t node = node_begin + r / group, head = kv_head * group + r % group;
    T* out = p.out + ((b * p.num_nodes + node) * p.num_heads + head) * dim;
    // l = 0: the node attends to nothing (all-False mask row, empty prefix) and outputs 0.
    const float inv = l[r] > 0.0f ? 1.0f / l[r] : 0.0f;
    for (int64_t d = 0; d < dim; ++d) out[d] = static_cast<T>(ot[d * lanes + r] * inv);
  }
}

template <class T>
SPECOPS_INLINE void wide_tile_any_dim(const Problem<T>& p, WideScratch& w, int64_t b,
                                      int64_t kv_head, int64_t node_begin, int64_t node_end) {
  switch (p.head_dim) {
    case 64: return wide_tile<T, 64>(p, w, b, kv_head, node_begin, node_end);
    case 128: return wide_tile<T, 128>(p, w, b, kv_head, node_begin, node_end);
    default: return wide_tile<T, 0>(p, w, b, kv_head, node_begin, node_end);
  }
}

SPECOPS_CPU_CLONES static void wide_tile_float(const Problem<float>& p, WideScratch& w,
                                               int64_t b, int64_t h, int64_t i0, int64_t i1) {
  wide_tile_any_dim(p, w, b, h, i0, i1);
}
SPECOPS_CPU_CLONES static void wide_tile_bfloat16(const Problem<c10::BFloat16>& p,
                                                  WideScratch& w, int64_t b, int64_t h,
                                                  int64_t i0, int64_t i1) {
  wide_tile_any_dim(p, w, b, h, i0, i1);
}
SPECOPS_CPU_CLONES static void wide_tile_half(const Problem<c10::Half>& p, WideScratch& w,
                                              int64_t b, int64_t h, int64_t i0, int64_t i1) {
  wide_tile_any_dim(p, w, b, h, i0, i1);
}
static void wide_tile_dispatch(const Problem<float>& p, WideScratch& w, int64_t b, int64_t h,
                               int64_t i0, int64_t i1) {
  wide_tile_float(p, w, b, h, i0, i1);
}
static void wide_tile_dispatch(const Problem<c10::BFloat16>& p, WideScratch& w, int64_t b,
                               int64_t h, int64_t i0, int64_t i1) {
  wide_tile_bfloat16(p, w, b, h, i0, i1);
}
static void wide_tile_dispatch(const Problem<c10::Half>& p, WideScratch& w, int64_t b,
                               int64_t h, int64_t i0, int64_t i1) {
  wide_tile_half(p, w, b, h, i0, i1);
}

}  // namespace tree_attention_kernels
}  // namespace specops
