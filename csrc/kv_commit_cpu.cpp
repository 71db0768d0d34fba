// CPU kernel of kv_commit (contract: "KV-cache commit"; executable specification:
// specops/reference/kv.py, which defines the words: moves, sources, destinations, layouts).
//
// Per call it reads, for every kv tensor and row, the source slot of each move whose source
// differs from its destination, Hkv*D elements each, into a buffer, then writes them to the
// destinations: all reads of a (tensor, row) happen before its writes, as in the reference.
// A chain moves nothing. Elements are copied as raw bits (2 or 4 bytes), never converted.
// Rows of different tensors, and different rows of one tensor, are disjoint memory (paged:
// when blocks are private to their row, as the contract requires), so (tensor, row) pairs run
// in parallel.
#include <ATen/ATen.h>
#include <ATen/Parallel.h>
#include <torch/library.h>

#include <algorithm>
#include <cstdint>
#include <cstring>
#include <optional>
#include <string>
#include <unordered_map>
#include <vector>

#include "checks.h"

namespace specops {
namespace {

constexpr const char* kOp = "kv_commit";

// How slot s of row b is addressed in every kv tensor (they share shape and strides).
struct SlotMap {
  bool paged = false;
  int64_t capacity = 0, block_size = 1, num_blocks = 0, max_blocks = 0;
  int64_t stride_row = 0, stride_slot = 0;  // row (contiguous) or block (paged); slot/offset
  const int32_t* tables = nullptr;          // [B, max_blocks] (paged)

  // Element offset of (row b, slot s, head 0, dim 0), or -1 when the slot or its block is out
  // of range.
  int64_t offset(int64_t b, int64_t s) const {
    if (s < 0 || s >= capacity) return -1;
    if (!paged) return b * stride_row + s * stride_slot;
    const int64_t block = tables[b * max_blocks + s / block_size];
    if (block < 0 || block >= num_blocks) return -1;
    return block * stride_row + (s % block_size) * stride_slot;
  }
};

std::string at_row(int64_t b) { return " at row " + std::to_string(b); }

// Shapes, dtypes, devices, one set of strides, no tensor twice (same checks and words as
// specops/_checks.py: kv_commit_meta and kv_distinct). Returns the slot map without tables.
SlotMap check_kv_commit_args(at::TensorList kv, const at::Tensor& cache_lens,
                             const at::Tensor& path, const at::Tensor& num_accepted,
                             const std::optional<at::Tensor>& block_tables) {
  TORCH_CHECK_VALUE(!kv.empty(), kOp, ": kv must hold at least one tensor");
  check_tensor(path, kOp, "path", at::kInt, 2);
  const int64_t batch = path.size(0);
  TORCH_CHECK_VALUE(path.size(1) >= 1, kOp, ": path must be [B, T] with T >= 1, got shape ",
                    path.sizes());
  check_tensor(cache_lens, kOp, "cache_lens", at::kInt, 1);
  check_dim_size(cache_lens, kOp, "cache_lens", 0, batch, "B");
  check_tensor(num_accepted, kOp, "num_accepted", at::kInt, 1);
  check_dim_size(num_accepted, kOp, "num_accepted", 0, batch, "B");

  const at::Tensor& first = kv[0];
  check_float_logits(first, kOp, "kv[0]");
  check_layout(first, kOp, "kv[0]", 4);
  // Every dim but B (contiguous) must be >= 1: a slot of zero elements is not a cache.
  for (int64_t d = block_tables ? 0 : 1; d < 4; ++d) {
    TORCH_CHECK_VALUE(first.size(d) >= 1, kOp, ": kv[0] must have every dim >= 1 (but B), "
                      "got shape ", first.sizes());
  }
  SlotMap map;
  if (!block_tables) {
    check_dim_size(first, kOp, "kv[0]", 0, batch, "B, contiguous layout [B, Hkv, S, D]");
    map.capacity = first.size(2);
    map.stride_row = first.stride(0);
    map.stride_slot = first.stride(2);
  } else {
    check_tensor(*block_tables, kOp, "block_tables", at::kInt, 2);
    check_dim_size(*block_tables, kOp, "block_tables", 0, batch, "B");
    TORCH_CHECK_VALUE(block_tables->size(1) >= 1, kOp,
                      ": block_tables must be [B, max_blocks] with max_blocks >= 1, got shape ",
                      block_tables->sizes());
    map.paged = true;
    map.num_blocks = first.size(0);
    map.block_size = first.size(1);
    map.max_blocks = block_tables->size(1);
    map.capacity = map.max_blocks * map.block_size;
    map.stride_row = first.stride(0);
    map.stride_slot = first.stride(1);
  }
  std::unordered_map<const void*, size_t> seen;
  for (size_t i = 0; i < kv.size(); ++i) {
    const std::string name = "kv[" + std::to_string(i) + "]";
    const at::Tensor& t = kv[i];
    TORCH_CHECK_TYPE(t.scalar_type() == first.scalar_type(), kOp, ": ", name, " must be ",
                     first.scalar_type(), ", got ", t.scalar_type());
    check_layout(t, kOp, name.c_str(), 4);
    TORCH_CHECK_VALUE(t.sizes() == first.sizes(), kOp, ": ", name, " has shape ", t.sizes(),
                      ", expected kv[0]'s ", first.sizes(), " (all kv tensors share one layout)");
    TORCH_CHECK_VALUE(t.strides() == first.strides(), kOp, ": ", name, " has strides ",
                      t.strides(), ", expected kv[0]'s ", first.strides(),
                      " (all kv tensors are addressed with one set of strides)");
    const auto [it, inserted] = seen.emplace(t.const_data_ptr(), i);
    TORCH_CHECK_VALUE(inserted, kOp, ": ", name, " and kv[", it->second,
                      "] are the same memory (each kv tensor must appear once)");
  }
  return map;
}

// Cheap checks, all before any write (same order and words as _checks.kv_commit_values).
void check_kv_commit_values(const SlotMap& map, const int32_t* lens, const int32_t* path,
                            const int32_t* accepted, int64_t batch, int64_t num_slots) {
  const int64_t cap = map.capacity;
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK_VALUE(lens[b] >= 0, kOp, ": cache_lens must be >= 0, got ", lens[b], at_row(b));
  }
  for (int64_t b = 0; b < batch; ++b) {
    TORCH_CHECK_VALUE(accepted[b] >= 0 && accepted[b] <= num_slots - 1, kOp,
                      ": num_accepted must be in 0..T-1=", num_slots - 1, ", got ", accepted[b],
                      at_row(b));
  }
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t end = int64_t{lens[b]} + 1 + accepted[b];
    TORCH_CHECK_VALUE(end <= cap, kOp, ": cache_lens + 1 + num_accepted must be <= S=", cap,
                      " (the cache's capacity), got ", end, at_row(b));
  }
  for (int64_t b = 0; b < batch; ++b) {
    int64_t previous = 0;
    for (int64_t k = 0; k < accepted[b]; ++k) {
      const int64_t p = path[b * num_slots + k];
      TORCH_CHECK_VALUE(p > previous && p <= num_slots - 1, kOp,
                        ": path must hold increasing node indices in 1..T-1=", num_slots - 1,
                        " before num_accepted (a root-to-node path), got ", p, at_row(b), ", ",
                        k);
      previous = p;
    }
  }
  for (int64_t b = 0; b < batch; ++b) {
    for (int64_t k = 0; k < accepted[b]; ++k) {
      const int64_t slot = int64_t{lens[b]} + path[b * num_slots + k];
      TORCH_CHECK_VALUE(slot < cap, kOp, ": cache_lens + path must be < S=", cap,
                        " (node slots inside the cache), got ", slot, at_row(b), ", ", k);
    }
  }
  if (!map.paged) return;
  // Sources first, then destinations, as the Python check orders them.
  for (int pass = 0; pass < 2; ++pass) {
    for (int64_t b = 0; b < batch; ++b) {
      for (int64_t k = 0; k < accepted[b]; ++k) {
        const int64_t slot = int64_t{lens[b]} + (pass == 0 ? path[b * num_slots + k] : 1 + k);
        const int64_t entry = slot / map.block_size;
        const int64_t block = map.tables[b * map.max_blocks + entry];
        TORCH_CHECK_VALUE(block >= 0 && block < map.num_blocks, kOp, ": block_tables[", b, ", ",
                          entry, "] = ", block, " is outside 0..num_blocks-1=",
                          map.num_blocks - 1, " (it holds slot ", slot, " of row ", b, ")");
      }
    }
  }
}

struct Move {
  int64_t src, dst;  // element offsets of the slots
};

// Copies the moves of one (tensor, row): every source into `buffer`, then every destination.
// `Bits` is an unsigned integer as wide as the element: a bit-exact copy.
template <class Bits>
void move_slots(Bits* base, const Move* moves, int64_t num_moves, int64_t heads, int64_t dim,
                int64_t stride_head, int64_t stride_dim, std::vector<Bits>& buffer) {
  const int64_t slot_elems = heads * dim;
  buffer.resize(num_moves * slot_elems);
  auto copy_slot = [&](const Bits* from, int64_t from_head, int64_t from_dim, Bits* to,
                       int64_t to_head, int64_t to_dim) {
    for (int64_t h = 0; h < heads; ++h) {
      if (from_dim == 1 && to_dim == 1) {
        std::memcpy(to + h * to_head, from + h * from_head, dim * sizeof(Bits));
      } else {
        for (int64_t d = 0; d < dim; ++d) {
          to[h * to_head + d * to_dim] = from[h * from_head + d * from_dim];
        }
      }
    }
  };
  Bits* staged = buffer.data();
  for (int64_t m = 0; m < num_moves; ++m) {
    copy_slot(base + moves[m].src, stride_head, stride_dim, staged + m * slot_elems, dim, 1);
  }
  for (int64_t m = 0; m < num_moves; ++m) {
    copy_slot(staged + m * slot_elems, dim, 1, base + moves[m].dst, stride_head, stride_dim);
  }
}

at::Tensor kv_commit_cpu(at::TensorList kv, const at::Tensor& cache_lens, const at::Tensor& path,
                         const at::Tensor& num_accepted,
                         const std::optional<at::Tensor>& block_tables) {
  SlotMap map = check_kv_commit_args(kv, cache_lens, path, num_accepted, block_tables);
  const int64_t batch = path.size(0), num_slots = path.size(1);
  const at::Tensor lens_c = cache_lens.contiguous(), path_c = path.contiguous();
  const at::Tensor accepted_c = num_accepted.contiguous();
  const at::Tensor tables_c = block_tables ? block_tables->contiguous() : at::Tensor();
  const int32_t* lens = lens_c.const_data_ptr<int32_t>();
  const int32_t* nodes = path_c.const_data_ptr<int32_t>();
  const int32_t* accepted = accepted_c.const_data_ptr<int32_t>();
  if (map.paged) map.tables = tables_c.const_data_ptr<int32_t>();
  if (check_level() >= CheckLevel::kCheap) {
    check_kv_commit_values(map, lens, nodes, accepted, batch, num_slots);
  }

  // The moves of every row, shared by all tensors; out-of-range ones (checks off) and
  // identical ones are skipped. Row b's moves are moves[first[b] .. first[b + 1]).
  std::vector<Move> moves;
  std::vector<int64_t> first(batch + 1, 0);
  for (int64_t b = 0; b < batch; ++b) {
    const int64_t n = std::clamp<int64_t>(accepted[b], 0, num_slots);
    for (int64_t k = 0; k < n; ++k) {
      const int64_t src = map.offset(b, int64_t{lens[b]} + nodes[b * num_slots + k]);
      const int64_t dst = map.offset(b, int64_t{lens[b]} + 1 + k);
      if (src >= 0 && dst >= 0 && src != dst) moves.push_back({src, dst});
    }
    first[b + 1] = int64_t(moves.size());
  }

  const at::Tensor& cache = kv[0];
  const int64_t heads = map.paged ? cache.size(2) : cache.size(1);
  const int64_t dim = cache.size(3);
  const int64_t stride_head = map.paged ? cache.stride(2) : cache.stride(1);
  const int64_t stride_dim = cache.stride(3);
  const int64_t num_tensors = int64_t(kv.size());
  if (!moves.empty()) {
    // About 32K elements per parallel chunk: a (tensor, row) moves this many on average.
    const int64_t per_task = std::max<int64_t>(1, int64_t(moves.size()) * heads * dim / batch);
    const int64_t grain = std::max<int64_t>(1, 32768 / per_task);
    auto run = [&](auto tag) {
      using Bits = decltype(tag);
      at::parallel_for(0, num_tensors * batch, grain, [&](int64_t lo, int64_t hi) {
        std::vector<Bits> buffer;
        for (int64_t task = lo; task < hi; ++task) {
          const int64_t t = task / batch, b = task % batch;
          const int64_t count = first[b + 1] - first[b];
          if (count == 0) continue;
          Bits* base = static_cast<Bits*>(kv[t].mutable_data_ptr());
          move_slots(base, moves.data() + first[b], count, heads, dim, stride_head, stride_dim,
                     buffer);
        }
      });
    };
    if (cache.element_size() == 2) {
      run(uint16_t());
    } else {
      run(uint32_t());
    }
  }
  return (cache_lens + 1 + num_accepted).to(at::kInt);
}

}  // namespace
}  // namespace specops

TORCH_LIBRARY_IMPL(specops, CPU, m) { m.impl("kv_commit", &specops::kv_commit_cpu); }
