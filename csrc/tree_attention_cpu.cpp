// CPU kernel of tree_attention (contract: "Tree attention"; executable specification:
// specops/reference/attention.py).
//
// One task per (row b, kv head, tile of nodes). Its query tile is the tile's nodes times the
// H/Hkv query heads that share the kv head, so each key/value row it loads serves all of them.
// A task walks the prefix, then the tree block, kBlockSlots slots at a time, with an online
// softmax in float32 (running max m, running sum l, accumulator rescaled by exp(m_old - m));
// the tree mask only touches the tree block. Per call it reads q once, each kv head's prefix
// and tree block once per node tile, the mask, and writes out [B, T, H, D] once.
//
// The tile loop is compiled for AVX-512, AVX2 and baseline x86-64 (GCC target_clones, picked
// at load time), so one build runs everywhere and uses the widest vectors it finds.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <c10/util/BFloat16.h>
#include <c10/util/Half.h>
#include <torch/library.h>

#include <algorithm>
#include <atomic>
#include <cmath>
#include <cstring>
#include <limits>
#include <optional>
#include <type_traits>
#include <vector>

#include "checks.h"
#include "tree_attention_cpu.h"
#include "tree_attention_wide_cpu.h"

namespace specops {
namespace {

using namespace tree_attention_kernels;
constexpr const char* kOp = "tree_attention";
constexpr int64_t kBlockSlots = 32;   // key/value slots per step of the online softmax
constexpr int64_t kMaxTileRows = 128;  // query rows (nodes x grouped heads) per task
static_assert(kBlockSlots % kVec == 0, "a block is a whole number of vectors");

// Per-thread buffers, sized for the largest tile.
struct Scratch {
  std::vector<float> q, acc, kt, v, s, m, l;
  Scratch(int64_t rows, int64_t head_dim)
      : q(rows * head_dim), acc(rows * head_dim), kt(head_dim * kBlockSlots),
        v(kBlockSlots * head_dim), s(rows * kBlockSlots), m(rows), l(rows) {}
};

// dots[i][j] = q_i . k_j for kRows query rows and the kBlockSlots slots of kt [D,
// kBlockSlots]: each K vector loaded serves kRows rows.
template <int kRows, int kD>
SPECOPS_INLINE void block_dots(const float* q, int64_t dim, const float* kt,
                               float (*dots)[kBlockSlots]) {
  constexpr int kCols = kBlockSlots / kVec;
  Vec16 acc[kRows][kCols] = {};
  for (int64_t d = 0; d < (kD > 0 ? kD : dim); ++d) {
    Vec16 k[kCols];
    for (int c = 0; c < kCols; ++c) k[c] = load16(kt + d * kBlockSlots + c * kVec);
    for (int i = 0; i < kRows; ++i) {
      const float qd = q[i * dim + d];
      for (int c = 0; c < kCols; ++c) acc[i][c] += qd * k[c];
    }
  }
  for (int i = 0; i < kRows; ++i) {
    for (int c = 0; c < kCols; ++c) store16(dots[i] + c * kVec, acc[i][c]);
  }
}

// acc[0:D] = alpha * acc + sum_j weight[j] * v[j, 0:D], the row held in registers over j.
template <int kD>
SPECOPS_INLINE void accumulate_values(float* acc, float alpha, const float* weight, int64_t n,
                                      const float* v, int64_t dim) {
  if constexpr (kD > 0) {
    constexpr int kCols = kD / kVec;
    Vec16 a[kCols];
    for (int c = 0; c < kCols; ++c) a[c] = alpha * load16(acc + c * kVec);
    for (int64_t j = 0; j < n; ++j) {
      const float w = weight[j];
      for (int c = 0; c < kCols; ++c) a[c] += w * load16(v + j * kD + c * kVec);
    }
    for (int c = 0; c < kCols; ++c) store16(acc + c * kVec, a[c]);
  } else {
    for (int64_t d = 0; d < dim; ++d) acc[d] *= alpha;
    for (int64_t j = 0; j < n; ++j) {
      for (int64_t d = 0; d < dim; ++d) acc[d] += weight[j] * v[j * dim + d];
    }
  }
}

// 16 consecutive elements as floats (a plain load for float; a widening loop otherwise).
template <class T>
SPECOPS_INLINE Vec16 load16_as_float(const T* p) {
  if constexpr (std::is_same_v<T, float>) {
    return load16(p);
  } else {
    float x[kVec];
    for (int i = 0; i < kVec; ++i) x[i] = static_cast<float>(p[i]);
    return load16(x);
  }
}

// One round of transpose16: element (i, c) with bit S of i clear and of c set trades places
// with (i + S, c - S), i.e. the S x S blocks off the diagonal swap. Indices 16..31 pick from
// the second operand (row i + S).
typedef int32_t Idx16 __attribute__((vector_size(64)));
template <int S>
SPECOPS_INLINE void transpose16_round(Vec16 (&r)[kVec], Idx16 keep_low, Idx16 keep_high) {
#pragma GCC unroll 16
  for (int i = 0; i < kVec; ++i) {
    if (i & S) continue;
    const Vec16 a = r[i], b = r[i + S];
    r[i] = __builtin_shuffle(a, b, keep_low);       // c & S ? b[c - S] : a[c]
    r[i + S] = __builtin_shuffle(a, b, keep_high);  // c & S ? b[c] : a[c + S]
  }
}

// In place transpose of the 16 x 16 floats in r (row t = r[t]): four rounds of 16 two-vector
// shuffles, everything in registers.
SPECOPS_INLINE void transpose16(Vec16 (&r)[kVec]) {
  transpose16_round<8>(r, Idx16{0, 1, 2, 3, 4, 5, 6, 7, 16, 17, 18, 19, 20, 21, 22, 23},
                       Idx16{8, 9, 10, 11, 12, 13, 14, 15, 24, 25, 26, 27, 28, 29, 30, 31});
  transpose16_round<4>(r, Idx16{0, 1, 2, 3, 16, 17, 18, 19, 8, 9, 10, 11, 24, 25, 26, 27},
                       Idx16{4, 5, 6, 7, 20, 21, 22, 23, 12, 13, 14, 15, 28, 29, 30, 31});
  transpose16_round<2>(r, Idx16{0, 1, 16, 17, 4, 5, 20, 21, 8, 9, 24, 25, 12, 13, 28, 29},
                       Idx16{2, 3, 18, 19, 6, 7, 22, 23, 10, 11, 26, 27, 14, 15, 30, 31});
  transpose16_round<1>(r, Idx16{0, 16, 2, 18, 4, 20, 6, 22, 8, 24, 10, 26, 12, 28, 14, 30},
                       Idx16{1, 17, 3, 19, 5, 21, 7, 23, 9, 25, 11, 27, 13, 29, 15, 31});
}

// kt[d * kBlockSlots + j] = k_rows[j][d] for the n <= kBlockSlots rows of a block: 16 x 16
// tiles through vector shuffles (element-wise strided stores cost about one cycle each, and
// with few query rows that was most of a block's time); a head dim tail element by element.
template <class T>
SPECOPS_INLINE void transpose_keys(const T* const* k_rows, int64_t n, int64_t dim, float* kt) {
  const int64_t dim16 = dim / kVec * kVec;
  for (int64_t j0 = 0; j0 < n; j0 += kVec) {
    const int64_t count = std::min<int64_t>(kVec, n - j0);
    for (int64_t d0 = 0; d0 < dim16; d0 += kVec) {
      Vec16 r[kVec];
#pragma GCC unroll 16
      for (int t = 0; t < kVec; ++t) {
        r[t] = t < count ? load16_as_float(k_rows[j0 + t] + d0) : Vec16{};
      }
      transpose16(r);
#pragma GCC unroll 16
      for (int t = 0; t < kVec; ++t) store16(kt + (d0 + t) * kBlockSlots + j0, r[t]);
    }
    for (int64_t j = j0; j < j0 + count; ++j) {
      for (int64_t d = dim16; d < dim; ++d) kt[d * kBlockSlots + j] = static_cast<float>(k_rows[j][d]);
    }
  }
}

// One block of n <= kBlockSlots slots starting at `slot0`, for all `rows` query rows of the
// tile. `tree_j0 >= 0` marks a tree block (slot slot0 + j holds node tree_j0 + j), where the
// mask applies; the prefix (tree_j0 < 0) is open to every node.
template <class T, int kD>
SPECOPS_INLINE void attend_block(const Problem<T>& p, Scratch& w, int64_t b, int64_t kv_head,
                                 int64_t node_begin, int64_t rows, int64_t slot0, int64_t n,
                                 int64_t tree_j0) {
  const int64_t dim = kD > 0 ? kD : p.head_dim;
  float* kt = w.kt.data();  // [D, kBlockSlots]: K transposed, so scores vectorise over slots
  float* v = w.v.data();    // [kBlockSlots, D]
  const T* k_rows[kBlockSlots];
  for (int64_t j = 0; j < n; ++j) {
    k_rows[j] = p.k.row(b, kv_head, slot0 + j);
    const T* v_row = p.v.row(b, kv_head, slot0 + j);
    for (int64_t d = 0; d < dim; ++d) v[j * dim + d] = static_cast<float>(v_row[d]);
  }
  transpose_keys(k_rows, n, dim, kt);
  constexpr int kRowBlock = 4;
  float dots[kRowBlock][kBlockSlots];
  for (int64_t r0 = 0; r0 < rows; r0 += kRowBlock) {
    const float* q = w.q.data() + r0 * dim;
    const int64_t count = std::min<int64_t>(kRowBlock, rows - r0);
    if (count == kRowBlock) {
      block_dots<kRowBlock, kD>(q, dim, kt, dots);
    } else {
      for (int64_t i = 0; i < count; ++i) block_dots<1, kD>(q + i * dim, dim, kt, dots + i);
    }
    for (int64_t i = 0; i < count; ++i) {
      const int64_t r = r0 + i;
      float* s = dots[i];
      const bool* allowed =
          tree_j0 < 0 ? nullptr
                      : p.mask + (b * p.num_nodes + node_begin + r / p.group) * p.num_nodes +
                            tree_j0;
      if (allowed != nullptr) {
        for (int64_t j = 0; j < n; ++j) s[j] = allowed[j] ? s[j] : kNegInf;
      }
      float block_max = kNegInf;
      for (int64_t j = 0; j < kBlockSlots; ++j) {  // branch-free, so it vectorises
        s[j] = j < n ? s[j] : kNegInf;
        block_max = std::max(block_max, s[j]);
      }
      const float m_old = w.m[r];
      const float m_new = std::max(m_old, block_max);
      if (m_new == kNegInf) continue;  // nothing to attend to yet
      const float alpha = exp_nonpositive(m_old - m_new);  // 0 while m_old is -inf
      float sum = 0.0f;
      for (int64_t j = 0; j < kBlockSlots; ++j) {
        s[j] = exp_nonpositive(s[j] - m_new);
        sum += s[j];
      }
      w.m[r] = m_new;
      w.l[r] = w.l[r] * alpha + sum;
      accumulate_values<kD>(w.acc.data() + r * dim, alpha, s, n, v, dim);
    }
  }
}

// Nodes [node_begin, node_end) of row b against kv head `kv_head`: the whole task.
template <class T, int kD>
SPECOPS_INLINE void attend_tile(const Problem<T>& p, Scratch& w, int64_t b, int64_t kv_head,
                                int64_t node_begin, int64_t node_end) {
  const int64_t dim = kD > 0 ? kD : p.head_dim;
  const int64_t group = p.group, rows = (node_end - node_begin) * group;
  for (int64_t r = 0; r < rows; ++r) {
    const int64_t node = node_begin + r / group, head = kv_head * group + r % group;
    const T* q = p.q + b * p.q_stride_b + node * p.q_stride_t + head * p.q_stride_h;
    float* dst = w.q.data() + r * dim;
    for (int64_t d = 0; d < dim; ++d) dst[d] = static_cast<float>(q[d]) * p.scale;
  }
  std::fill(w.acc.begin(), w.acc.begin() + rows * dim, 0.0f);
  std::fill(w.m.begin(), w.m.begin() + rows, kNegInf);
  std::fill(w.l.begin(), w.l.begin() + rows, 0.0f);

  const int64_t prefix = p.prefix[b];
  for (int64_t slot = 0; slot < prefix; slot += kBlockSlots) {
    attend_block<T, kD>(p, w, b, kv_head, node_begin, rows, slot,
                        std::min(kBlockSlots, prefix - slot), -1);
  }
  for (int64_t j = 0; j < p.num_nodes; j += kBlockSlots) {
    attend_block<T, kD>(p, w, b, kv_head, node_begin, rows, prefix + j,
                        std::min(kBlockSlots, p.num_nodes - j), j);
  }

  for (int64_t r = 0; r < rows; ++r) {
    const int64_t node = node_begin + r / group, head = kv_head * group + r % group;
    T* out = p.out + ((b * p.num_nodes + node) * p.num_heads + head) * dim;
    // l = 0: the node attends to nothing (all-False mask row, empty prefix) and outputs 0.
    const float inv = w.l[r] > 0.0f ? 1.0f / w.l[r] : 0.0f;
    const float* acc = w.acc.data() + r * dim;
    for (int64_t d = 0; d < dim; ++d) out[d] = static_cast<T>(acc[d] * inv);
  }
}

// Head dims 64 and 128 get loops of known length; the others a loop over p.head_dim.
template <class T>
SPECOPS_INLINE void attend_tile_any_dim(const Problem<T>& p, Scratch& w, int64_t b,
                                        int64_t kv_head, int64_t node_begin, int64_t node_end) {
  switch (p.head_dim) {
    case 64: return attend_tile<T, 64>(p, w, b, kv_head, node_begin, node_end);
    case 128: return attend_tile<T, 128>(p, w, b, kv_head, node_begin, node_end);
    default: return attend_tile<T, 0>(p, w, b, kv_head, node_begin, node_end);
  }
}

SPECOPS_CPU_CLONES void attend_tile_float(const Problem<float>& p, Scratch& w, int64_t b,
                                          int64_t kv_head, int64_t node_begin, int64_t node_end) {
  attend_tile_any_dim(p, w, b, kv_head, node_begin, node_end);
}
SPECOPS_CPU_CLONES void attend_tile_bfloat16(const Problem<c10::BFloat16>& p, Scratch& w,
                                             int64_t b, int64_t kv_head, int64_t node_begin,
                                             int64_t node_end) {
  attend_tile_any_dim(p, w, b, kv_head, node_begin, node_end);
}
SPECOPS_CPU_CLONES void attend_tile_half(const Problem<c10::Half>& p, Scratch& w, int64_t b,
                                         int64_t kv_head, int64_t node_begin, int64_t node_end) {
  attend_tile_any_dim(p, w, b, kv_head, node_begin, node_end);
}
void attend_tile_dispatch(const Problem<float>& p, Scratch& w, int64_t b, int64_t h,
                          int64_t i0, int64_t i1) {
  attend_tile_float(p, w, b, h, i0, i1);
}
void attend_tile_dispatch(const Problem<c10::BFloat16>& p, Scratch& w, int64_t b, int64_t h,
                          int64_t i0, int64_t i1) {
  attend_tile_bfloat16(p, w, b, h, i0, i1);
}
void attend_tile_dispatch(const Problem<c10::Half>& p, Scratch& w, int64_t b, int64_t h,
                          int64_t i0, int64_t i1) {
  attend_tile_half(p, w, b, h, i0, i1);
}

// Last dim contiguous (the kernels step through D with stride 1); other strides are kept.
at::Tensor inner_contiguous(const at::Tensor& t) { return t.stride(-1) == 1 ? t : t.contiguous(); }

template <class T>
CacheView<T> cache_view(const at::Tensor& cache, const std::optional<at::Tensor>& block_tables,
                        const at::Tensor& tables) {
  CacheView<T> view;
  view.base = cache.const_data_ptr<T>();
  if (block_tables) {  // [num_blocks, block_size, Hkv, D]
    view.stride_outer = cache.stride(0);
    view.stride_slot = cache.stride(1);
    view.stride_head = cache.stride(2);
    view.block_table = tables.const_data_ptr<int32_t>();
    view.max_blocks = tables.size(1);
    view.block_size = cache.size(1);
    view.num_blocks = cache.size(0);
  } else {  // [B, Hkv, S, D]
    view.stride_outer = cache.stride(0);
    view.stride_slot = cache.stride(2);
    view.stride_head = cache.stride(1);
  }
  return view;
}

template <class T>
void run(const at::Tensor& q, const at::Tensor& k, const at::Tensor& v,
         const std::optional<at::Tensor>& block_tables, const at::Tensor& tables,
         const at::Tensor& mask, const std::vector<int64_t>& prefix, float scale,
         int64_t num_kv_heads, at::Tensor& out) {
  Problem<T> p;
  p.q = q.const_data_ptr<T>();
  p.q_stride_b = q.stride(0);
  p.q_stride_t = q.stride(1);
  p.q_stride_h = q.stride(2);
  p.k = cache_view<T>(k, block_tables, tables);
  p.v = cache_view<T>(v, block_tables, tables);
  p.mask = mask.const_data_ptr<bool>();
  p.prefix = prefix.data();
  p.out = out.data_ptr<T>();
  const int64_t batch = q.size(0);
  p.num_nodes = q.size(1);
  p.num_heads = q.size(2);
  p.head_dim = q.size(3);
  p.group = p.num_heads / num_kv_heads;
  p.scale = scale;

  // Node tiles: at most kMaxTileRows (kWideMaxRows) query rows, and small enough that B=1
  // still gives every thread a few tasks. Rows do not interact, so the tiling never changes a
  // result; which kernel runs depends on T, H/Hkv and D only, never on B or the threads.
  const bool wide = p.head_dim % kTileA == 0 && p.num_nodes * p.group >= kWideMinRows;
  const int64_t heads = batch * num_kv_heads;
  const int64_t wanted_tiles = (4 * at::get_num_threads() + heads - 1) / heads;
  int64_t tile = std::max<int64_t>(1, (wide ? kWideMaxRows : kMaxTileRows) / p.group);
  tile = std::min(tile, std::max<int64_t>(1, (p.num_nodes + wanted_tiles - 1) / wanted_tiles));
  tile = std::min(tile, p.num_nodes);
  const int64_t tiles = (p.num_nodes + tile - 1) / tile, num_tasks = heads * tiles;
  // Threads take tasks from a shared counter rather than fixed ranges: on a machine shared
  // with other work, a thread that gets less CPU time then takes fewer tasks.
  std::atomic<int64_t> next_task{0};
  at::parallel_for(0, std::min<int64_t>(at::get_num_threads(), num_tasks), 1,
                   [&](int64_t, int64_t) {
    std::optional<Scratch> narrow_scratch;
    std::optional<WideScratch> wide_scratch;
    if (wide) {
      wide_scratch.emplace(round_up(tile * p.group, kWideLanes), p.head_dim);
    } else {
      narrow_scratch.emplace(tile * p.group, p.head_dim);
    }
    for (int64_t task; (task = next_task.fetch_add(1)) < num_tasks;) {
      const int64_t b = task / (num_kv_heads * tiles);
      const int64_t kv_head = task / tiles % num_kv_heads;
      const int64_t node_begin = task % tiles * tile;
      const int64_t node_end = std::min(node_begin + tile, p.num_nodes);
      if (wide) {
        wide_tile_dispatch(p, *wide_scratch, b, kv_head, node_begin, node_end);
      } else {
        attend_tile_dispatch(p, *narrow_scratch, b, kv_head, node_begin, node_end);
      }
    }
  });
}

at::Tensor tree_attention_cpu(const at::Tensor& q, const at::Tensor& k_cache,
                              const at::Tensor& v_cache, const at::Tensor& cache_lens,
                              const at::Tensor& mask, std::optional<double> scale,
                              const std::optional<at::Tensor>& block_tables) {
  // Dtype, shape, device: every level (same words as specops/_checks.py).
  check_layout(q, kOp, "q", 4);
  check_float_logits(q, kOp, "q");
  check_layout(k_cache, kOp, "k_cache", 4);
  check_layout(v_cache, kOp, "v_cache", 4);
  TORCH_CHECK_TYPE(k_cache.scalar_type() == q.scalar_type(), kOp, ": k_cache must be ",
                   q.scalar_type(), " like q, got ", k_cache.scalar_type());
  TORCH_CHECK_TYPE(v_cache.scalar_type() == q.scalar_type(), kOp, ": v_cache must be ",
                   q.scalar_type(), " like q, got ", v_cache.scalar_type());
  const int64_t batch = q.size(0), num_nodes = q.size(1), num_heads = q.size(2);
  const int64_t head_dim = q.size(3);
  TORCH_CHECK_VALUE(num_heads >= 1 && head_dim >= 1, kOp,
                    ": q must be [B, T, H, D] with H >= 1 and D >= 1, got shape ", q.sizes());
  const bool paged = block_tables.has_value();
  const int64_t num_kv_heads = k_cache.size(paged ? 2 : 1);
  TORCH_CHECK_VALUE(num_kv_heads >= 1 && num_heads % num_kv_heads == 0, kOp, ": k_cache has ",
                    num_kv_heads, " kv heads, which must divide q's ", num_heads,
                    " heads; got shape ", k_cache.sizes());
  check_dim_size(k_cache, kOp, "k_cache", 3, head_dim, "D");
  if (!paged) check_dim_size(k_cache, kOp, "k_cache", 0, batch, "B");
  TORCH_CHECK_VALUE(v_cache.sizes() == k_cache.sizes(), kOp, ": v_cache must have k_cache's shape ",
                    k_cache.sizes(), ", got shape ", v_cache.sizes());
  check_tensor(cache_lens, kOp, "cache_lens", at::kInt, 1);
  check_dim_size(cache_lens, kOp, "cache_lens", 0, batch, "B");
  check_tensor(mask, kOp, "mask", at::kBool, 3);
  check_dim_size(mask, kOp, "mask", 0, batch, "B");
  check_dim_size(mask, kOp, "mask", 1, num_nodes, "T");
  check_dim_size(mask, kOp, "mask", 2, num_nodes, "T");
  int64_t capacity = k_cache.size(2);
  at::Tensor tables;
  if (paged) {
    check_tensor(*block_tables, kOp, "block_tables", at::kInt, 2);
    check_dim_size(*block_tables, kOp, "block_tables", 0, batch, "B");
    TORCH_CHECK_VALUE(k_cache.size(0) >= 1 && k_cache.size(1) >= 1, kOp,
                      ": k_cache must be [num_blocks, block_size, Hkv, D] with num_blocks >= 1 "
                      "and block_size >= 1, got shape ", k_cache.sizes());
    tables = block_tables->contiguous();
    capacity = tables.size(1) * k_cache.size(1);
  }
  TORCH_CHECK_VALUE(capacity >= num_nodes, kOp, ": the cache holds ", capacity,
                    " slots per row, fewer than the T = ", num_nodes, " new nodes (",
                    paged ? "block_tables.shape[1] * block_size" : "k_cache.shape[2]", ")");

  // Values (cheap level): prefix lengths, and the block-table entries those slots use.
  const at::Tensor lens = cache_lens.contiguous();
  const int32_t* len = lens.const_data_ptr<int32_t>();
  if (check_level() >= CheckLevel::kCheap) {
    for (int64_t b = 0; b < batch; ++b) {
      TORCH_CHECK_VALUE(len[b] >= 0 && len[b] <= capacity - num_nodes, kOp, ": cache_lens[", b,
                        "] = ", len[b], " is outside 0..", capacity - num_nodes,
                        " (the cache's ", capacity, " slots minus T = ", num_nodes, ")");
    }
    if (paged) {
      const int64_t block_size = k_cache.size(1), num_blocks = k_cache.size(0);
      const int32_t* entry = tables.const_data_ptr<int32_t>();
      for (int64_t b = 0; b < batch; ++b) {
        const int64_t used = (len[b] + num_nodes + block_size - 1) / block_size;
        for (int64_t e = 0; e < used; ++e) {
          const int32_t x = entry[b * tables.size(1) + e];
          TORCH_CHECK_VALUE(x >= 0 && x < num_blocks, kOp, ": block_tables[", b, ", ", e,
                            "] = ", x, " is outside 0..", num_blocks - 1,
                            " (num_blocks - 1); it holds slots below cache_lens[", b, "] + T");
        }
      }
    }
  }
  std::vector<int64_t> prefix(batch);
  for (int64_t b = 0; b < batch; ++b) {
    prefix[b] = std::min<int64_t>(std::max<int32_t>(len[b], 0), capacity - num_nodes);
  }

  const float scale_value =
      static_cast<float>(scale.has_value() ? *scale : 1.0 / std::sqrt(double(head_dim)));
  const at::Tensor q_c = inner_contiguous(q), k_c = inner_contiguous(k_cache);
  const at::Tensor v_c = inner_contiguous(v_cache), mask_c = mask.contiguous();
  at::Tensor out = at::empty({batch, num_nodes, num_heads, head_dim}, q.options());
  if (out.numel() == 0) return out;
  switch (q.scalar_type()) {
    case at::kFloat:
      run<float>(q_c, k_c, v_c, block_tables, tables, mask_c, prefix, scale_value, num_kv_heads,
                 out);
      break;
    case at::kBFloat16:
      run<c10::BFloat16>(q_c, k_c, v_c, block_tables, tables, mask_c, prefix, scale_value,
                         num_kv_heads, out);
      break;
    default:
      run<c10::Half>(q_c, k_c, v_c, block_tables, tables, mask_c, prefix, scale_value,
                     num_kv_heads, out);
  }
  return out;
}

}  // namespace
}  // namespace specops

TORCH_LIBRARY_IMPL(specops, CPU, m) { m.impl("tree_attention", &specops::tree_attention_cpu); }
