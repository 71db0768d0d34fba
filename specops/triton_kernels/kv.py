"""KV-cache commit in Triton: the GPU kernel of ``kv_commit``.

Same words and semantics as specops/reference/kv.py (the executable specification): move
``k`` of row ``b`` copies the source slot ``cache_lens[b] + path[b, k]`` to the destination
slot ``cache_lens[b] + 1 + k``, for ``k < num_accepted[b]``, in every kv tensor, with all
sources read before any destination is written; moves out of range are skipped, and so are
moves whose source is their destination (a chain moves nothing).

One launch for all tensors. Their data pointers travel in a device int64 tensor (the
*pointer table*); the tensors share shape, dtype and strides (checked), so one set of strides
addresses them all. Building the table is a host-to-device copy, so tables are cached by the
pointers they hold (never stale: a table's content is its key) and the copy is non-blocking
from pinned memory: a steady-state engine, whose cache tensors do not move, pays nothing.
Inside CUDA-graph capture no copy may be recorded, so the table must already exist (the
warm-up call before capture, which Triton needs anyway to compile, makes it); tables used by
a capture are kept for the life of the process, since the graph may replay them at any time.

Traffic per call: for every tensor, row and moved slot, Hkv*D elements read and written once;
``B`` int32 lengths written; ``B*T`` path entries (and ``2*B*T`` block-table entries, paged)
read by each program.
"""

from collections import OrderedDict

import torch
import triton
import triton.language as tl

# Elements of the [BLOCK_T, BLOCK_E] tile one program moves at once (registers, not smem).
TILE_ELEMS = 4096
MAX_CACHED_TABLES = 32

_tables: OrderedDict[tuple, torch.Tensor] = OrderedDict()  # LRU, outside graph capture
_captured_tables: dict[tuple, torch.Tensor] = {}  # used by a graph capture: kept forever


def kv_pointer_table(kv: list[torch.Tensor]) -> torch.Tensor:
    """[len(kv)] int64 on kv's device: the tensors' data pointers, cached (see module doc)."""
    device = kv[0].device
    key = (device, tuple(t.data_ptr() for t in kv))
    capturing = device.type == "cuda" and torch.cuda.is_current_stream_capturing()
    table = _captured_tables.get(key)
    if table is not None:
        return table
    table = _tables.pop(key, None)
    if table is None:
        if capturing:
            raise RuntimeError(
                "kv_commit: call it once with these kv tensors before capturing a CUDA graph: "
                "its pointer table is a host-to-device copy, which cannot be captured")
        host = torch.tensor(key[1], dtype=torch.int64)
        table = host.pin_memory().to(device, non_blocking=True) if device.type == "cuda" else host
    if capturing:
        _captured_tables[key] = table
    else:
        _tables[key] = table
        while len(_tables) > MAX_CACHED_TABLES:
            _tables.popitem(last=False)
    return table


@triton.jit
def _slot_offsets(slots, b, capacity, block_tables_ptr, max_blocks, num_blocks, block_size,
                  stride_row, stride_slot, PAGED: tl.constexpr):
    """Element offsets of row ``b``'s slots ``slots`` (int64 lanes), and whether each slot
    (and, paged, its block) is in range; out-of-range lanes get offset 0 and are masked."""
    ok = (slots >= 0) & (slots < capacity)
    s = tl.where(ok, slots, 0)
    if PAGED:
        block = tl.load(block_tables_ptr + b * max_blocks + s // block_size, mask=ok,
                        other=-1).to(tl.int64)
        ok = ok & (block >= 0) & (block < num_blocks)
        offset = block * stride_row + (s % block_size) * stride_slot
    else:
        offset = b * stride_row + s * stride_slot
    return tl.where(ok, offset, 0), ok


@triton.jit
def _kv_commit_kernel(
    kv_ptrs_ptr,  # [num_tensors] int64: data pointers of the kv tensors (one shape and strides)
    cache_lens_ptr,  # [B] int32
    path_ptr,  # [B, T] int32
    num_accepted_ptr,  # [B] int32
    block_tables_ptr,  # [B, max_blocks] int32 when PAGED, else any int32 tensor (unread)
    new_lens_ptr,  # [B] int32, out: cache_lens + 1 + num_accepted
    num_slots, capacity, slot_elems, dim, num_blocks, block_size, max_blocks, num_chunks,
    stride_row, stride_slot, stride_head, stride_dim,
    PAGED: tl.constexpr, ELEM: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_E: tl.constexpr,
    VEC: tl.constexpr, EVEN_E: tl.constexpr,
):
    """Program (b, tensor * num_chunks + chunk): row b's moves in one tensor, restricted to
    the chunk-th BLOCK_E elements of a slot's flattened (Hkv, D).

    Race freedom. The elements a program reads and writes are (its tensor, its row's slots,
    its chunk of (Hkv, D)); no two programs share any of them (rows are disjoint memory, and
    paged blocks are private to their row, a precondition of the op), so programs never race.
    Inside a program, a later move's destination can be an earlier move's source (path
    [2, 3, 5]: move 1 writes slot L+2, which move 0 reads), and the tile's rows are spread
    over different warps, so without a barrier one warp could store move 1 before another
    loads move 0's source. The program loads the whole [moves, elements] tile, waits at a
    CTA barrier (bar.sync, which orders the loads before it against the stores after it),
    then stores: every read happens before any write, exactly the reference's semantics, for
    any path (on valid paths, ascending order would also do; on bad ones, with checks off,
    this keeps all backends equal). Reads T path entries (+ 2*T block-table entries) and
    the moved slots' chunk elements, writes those elements once.
    """
    b = tl.program_id(0).to(tl.int64)
    pid = tl.program_id(1)
    tensor = pid // num_chunks
    chunk = pid % num_chunks
    cache_len = tl.load(cache_lens_ptr + b)
    n = tl.load(num_accepted_ptr + b)
    tl.store(new_lens_ptr + b, cache_len + 1 + n, mask=pid == 0)

    moves = tl.arange(0, BLOCK_T)
    active = moves < tl.minimum(n, num_slots)
    node = tl.load(path_ptr + b * num_slots + moves, mask=active, other=0).to(tl.int64)
    src, src_ok = _slot_offsets(cache_len.to(tl.int64) + node, b, capacity, block_tables_ptr,
                                max_blocks, num_blocks, block_size, stride_row, stride_slot,
                                PAGED)
    dst, dst_ok = _slot_offsets(cache_len.to(tl.int64) + 1 + moves, b, capacity,
                                block_tables_ptr, max_blocks, num_blocks, block_size, stride_row,
                                stride_slot, PAGED)
    moved = active & src_ok & dst_ok & (src != dst)

    elems = chunk * BLOCK_E + tl.arange(0, BLOCK_E)
    heads, dims = (elems // dim).to(tl.int64), (elems % dim).to(tl.int64)
    elem_offset = heads * stride_head + dims * stride_dim
    if EVEN_E:  # every chunk is full: the mask is constant along a slot's elements
        mask = moved[:, None] & (elems < BLOCK_E * num_chunks)[None, :]
    else:
        mask = moved[:, None] & (elems < slot_elems)[None, :]
    # The table holds raw addresses; elements are moved as same-width integers (bit-exact).
    base = tl.load(kv_ptrs_ptr + tensor).to(tl.pointer_type(ELEM))
    if VEC > 1:
        # The launcher checked: 16-byte aligned pointers, unit dim stride, and row, slot and
        # head strides and head_dim multiples of VEC, so runs of VEC elements are 16 bytes.
        base = tl.multiple_of(base, 16)
        src = tl.multiple_of(src, VEC)
        dst = tl.multiple_of(dst, VEC)
        elem_offset = tl.max_contiguous(tl.multiple_of(elem_offset, VEC), VEC)
    values = tl.load(base + src[:, None] + elem_offset[None, :], mask=mask)
    tl.debug_barrier()
    tl.store(base + dst[:, None] + elem_offset[None, :], values, mask=mask)


def kv_commit_triton(kv: list[torch.Tensor], cache_lens: torch.Tensor, path: torch.Tensor,
                     num_accepted: torch.Tensor, block_tables: torch.Tensor | None
                     ) -> torch.Tensor:
    """Moves the accepted path's entries behind the root, in place, in one sync-free launch.

    Args:
        kv: tensors of one shape, dtype (float32/bfloat16/float16) and strides: contiguous
            [B, Hkv, S, D], or paged [num_blocks, block_size, Hkv, D]. Updated in place.
        cache_lens: [B] int32. path: [B, T] int32. num_accepted: [B] int32.
        block_tables: [B, max_blocks] int32 (paged), or None (contiguous).

    Returns:
        new_cache_lens [B] int32 = cache_lens + 1 + num_accepted. Equal to ``kv_commit_ref``
        on every input (bit-exact copies).
    """
    batch, num_slots = path.shape
    new_lens = torch.empty((batch,), dtype=torch.int32, device=path.device)
    if batch == 0:
        return new_lens
    cache = kv[0]
    paged = block_tables is not None
    if paged:
        num_blocks, block_size, heads, dim = cache.shape
        stride_row, stride_slot, stride_head, stride_dim = cache.stride()
        max_blocks = block_tables.shape[1]
        capacity = max_blocks * block_size
        block_tables = block_tables.contiguous()
    else:
        _, heads, capacity, dim = cache.shape
        stride_row, stride_head, stride_slot, stride_dim = cache.stride()
        num_blocks, block_size, max_blocks = 1, 1, 1
        block_tables = cache_lens  # never read
    slot_elems = heads * dim
    block_t = triton.next_power_of_2(num_slots)
    block_e = min(triton.next_power_of_2(slot_elems), max(16, TILE_ELEMS // block_t))
    num_chunks = triton.cdiv(slot_elems, block_e)
    elem = {2: tl.int16, 4: tl.int32}[cache.element_size()]
    # 16-byte vector moves when every run of VEC elements is 16 aligned bytes.
    vec = 16 // cache.element_size()
    aligned = (stride_dim == 1 and dim % vec == 0
               and all(s % vec == 0 for s in (stride_row, stride_slot, stride_head))
               and all(t.data_ptr() % 16 == 0 for t in kv))
    _kv_commit_kernel[(batch, len(kv) * num_chunks)](
        kv_pointer_table(kv), cache_lens.contiguous(), path.contiguous(),
        num_accepted.contiguous(), block_tables, new_lens,
        num_slots, capacity, slot_elems, dim, num_blocks, block_size, max_blocks, num_chunks,
        stride_row, stride_slot, stride_head, stride_dim,
        PAGED=paged, ELEM=elem, BLOCK_T=block_t, BLOCK_E=block_e, VEC=vec if aligned else 1,
        EVEN_E=slot_elems % block_e == 0)
    return new_lens
