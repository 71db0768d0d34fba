"""Tree attention in Triton: the GPU kernel of ``tree_attention``, flash-decoding style.

Same words and semantics as specops/reference/attention.py (the executable specification):
node ``i`` of row ``b`` attends to the *prefix* ``[0, cache_lens[b])`` and to the *tree
block* slots ``cache_lens[b] + j`` with ``mask[b, i, j]``; query head ``h`` reads kv head
``h // GROUP``.

Launch 1, grid ``(B, Hkv * row_tiles, num_splits + 1)``: a program takes one kv head's query
tile, ``BLOCK_R`` rows of (node, grouped head) pairs (all ``T * GROUP`` of them when they fit,
so each key/value block it loads serves every node and head of the group), and runs an online
softmax in float32 over its share of the slots. Splits ``0..num_splits-1`` share the prefix
round-robin, ``BLOCK_N`` slots at a time (split ``s`` takes blocks ``s, s + num_splits, ...``),
so the work spreads evenly whatever the prefix length, which the launcher cannot know without
a sync. Split ``num_splits`` takes the tree block, the only place the mask is read (straight
from ``mask``; no ``[T, prefix + T]`` mask is ever built). Each program writes its partial
``(m, l, acc)``. Launch 2, grid ``(B, Hkv * row_tiles)``, merges the partials and writes
``out``. Traffic: the prefix and tree block of K and V read once per row tile, plus
``(num_splits + 1) * T * H * (D + 2)`` floats of partials written and read back.
"""

import math
import os

import torch
import triton
import triton.language as tl

_LOG2E = 1.4426950408889634


@triton.jit
def _kv_offsets(b, kv_head, slots, in_range, block_tables_ptr, max_blocks, block_size,
                num_blocks, stride_outer, stride_slot, stride_head, PAGED: tl.constexpr):
    """int64 offsets of the rows ``slots`` of row ``b``, kv head ``kv_head``, in the cache."""
    if PAGED:
        entry = tl.load(block_tables_ptr + b * max_blocks + slots // block_size, mask=in_range,
                        other=0)
        # Clamped: with checks off a bad entry reads some block of the cache, never past it.
        block = tl.minimum(tl.maximum(entry, 0), num_blocks - 1).to(tl.int64)
        offset = (slots % block_size).to(tl.int64)
        return block * stride_outer + offset * stride_slot + kv_head.to(tl.int64) * stride_head
    else:
        return (b * stride_outer + slots.to(tl.int64) * stride_slot
                + kv_head.to(tl.int64) * stride_head)


@triton.jit
def _tree_attention_split_kernel(
    q_ptr,  # [B, T, H, D], strides (stride_qb, stride_qt, stride_qh, 1)
    k_ptr,  # [B, Hkv, S, D] or paged [num_blocks, block_size, Hkv, D], last dim contiguous
    v_ptr,  # same layout as k
    cache_lens_ptr,  # [B] int32
    mask_ptr,  # [B, T, T] uint8 (a view of the bool mask), contiguous
    block_tables_ptr,  # [B, max_blocks] int32, contiguous (PAGED only)
    part_m_ptr,  # [B, Hkv, row_tiles * BLOCK_R, num_splits + 1] float32, out: running max (log2)
    part_l_ptr,  # same shape, float32, out: running sum
    part_acc_ptr,  # [B, Hkv, row_tiles * BLOCK_R, num_splits + 1, BLOCK_D] float32, out
    scale_log2,  # scale * log2(e): scores are kept in base 2
    num_nodes, num_kv_heads, capacity, num_splits, row_tiles,
    stride_qb, stride_qt, stride_qh,
    stride_k_outer, stride_k_slot, stride_k_head,
    stride_v_outer, stride_v_slot, stride_v_head,
    max_blocks, block_size, num_blocks,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr,
    BLOCK_R: tl.constexpr, BLOCK_N: tl.constexpr, PAGED: tl.constexpr, FP32_DOT: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1) // row_tiles
    row_tile = tl.program_id(1) % row_tiles
    split = tl.program_id(2)

    rows = row_tile * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_nodes * GROUP
    node = tl.where(row_ok, rows // GROUP, 0)
    head = kv_head * GROUP + rows % GROUP
    d = tl.arange(0, BLOCK_D)
    d_ok = d < HEAD_DIM
    q = tl.load(q_ptr + b * stride_qb + node[:, None].to(tl.int64) * stride_qt
                + head[:, None] * stride_qh + d[None, :],
                mask=row_ok[:, None] & d_ok[None, :], other=0.0)

    prefix = tl.minimum(tl.maximum(tl.load(cache_lens_ptr + b), 0), capacity - num_nodes)
    m_i = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_i = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    cols = tl.arange(0, BLOCK_N)
    is_tree = split == num_splits
    # The prefix splits walk blocks split, split + num_splits, ...; the tree split walks the
    # T tree-block slots. One loop serves both so that each program runs a single body.
    start = tl.where(is_tree, 0, split * BLOCK_N)
    end = tl.where(is_tree, num_nodes, prefix)
    step = tl.where(is_tree, BLOCK_N, num_splits * BLOCK_N)
    for first in range(start, end, step):
        j = first + cols
        col_ok = j < end
        slots = tl.where(is_tree, prefix + j, j)
        k_off = _kv_offsets(b, kv_head, slots, col_ok, block_tables_ptr, max_blocks, block_size,
                            num_blocks, stride_k_outer, stride_k_slot, stride_k_head, PAGED)
        v_off = _kv_offsets(b, kv_head, slots, col_ok, block_tables_ptr, max_blocks, block_size,
                            num_blocks, stride_v_outer, stride_v_slot, stride_v_head, PAGED)
        kv_mask = col_ok[:, None] & d_ok[None, :]
        k = tl.load(k_ptr + k_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        v = tl.load(v_ptr + v_off[:, None] + d[None, :], mask=kv_mask, other=0.0)
        if FP32_DOT:
            s = tl.dot(q.to(tl.float32), tl.trans(k.to(tl.float32)), input_precision="ieee")
        else:
            s = tl.dot(q, tl.trans(k))
        allowed = col_ok[None, :] & row_ok[:, None]
        # The tree mask, read only for the tree block (no load at all on prefix splits).
        tree_cols = tl.where(is_tree, num_nodes, 0)
        bits = tl.load(mask_ptr + (b * num_nodes + node[:, None]) * num_nodes + j[None, :],
                       mask=row_ok[:, None] & (j[None, :] < tree_cols), other=1)
        allowed = allowed & (bits != 0)
        s = tl.where(allowed, s * scale_log2, float("-inf"))
        m_new = tl.maximum(m_i, tl.max(s, 1))
        # Rows with nothing allowed yet keep m = -inf; a finite stand-in avoids -inf - -inf.
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        p = tl.exp2(s - m_safe[:, None])
        alpha = tl.exp2(m_i - m_safe)
        l_i = l_i * alpha + tl.sum(p, 1)
        if FP32_DOT:
            pv = tl.dot(p, v.to(tl.float32), input_precision="ieee")
        else:
            pv = tl.dot(p.to(v.dtype), v)
        acc = acc * alpha[:, None] + pv
        m_i = m_new

    part = ((b * num_kv_heads + kv_head) * row_tiles * BLOCK_R + rows) * (num_splits + 1) + split
    tl.store(part_m_ptr + part, m_i)
    tl.store(part_l_ptr + part, l_i)
    tl.store(part_acc_ptr + part[:, None] * BLOCK_D + d[None, :], acc)


@triton.jit
def _tree_attention_combine_kernel(
    part_m_ptr,  # [B, Hkv, row_tiles * BLOCK_R, num_splits + 1] float32
    part_l_ptr,  # same shape, float32
    part_acc_ptr,  # [B, Hkv, row_tiles * BLOCK_R, num_splits + 1, BLOCK_D] float32
    out_ptr,  # [B, T, H, D] contiguous, q's dtype, out
    num_nodes, num_kv_heads, num_splits, row_tiles,
    GROUP: tl.constexpr, HEAD_DIM: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_R: tl.constexpr,
):
    b = tl.program_id(0).to(tl.int64)
    kv_head = tl.program_id(1) // row_tiles
    row_tile = tl.program_id(1) % row_tiles
    rows = row_tile * BLOCK_R + tl.arange(0, BLOCK_R)
    row_ok = rows < num_nodes * GROUP
    d = tl.arange(0, BLOCK_D)

    base = ((b * num_kv_heads + kv_head) * row_tiles * BLOCK_R + rows) * (num_splits + 1)
    m = tl.full([BLOCK_R], float("-inf"), tl.float32)
    l_sum = tl.zeros([BLOCK_R], tl.float32)
    acc = tl.zeros([BLOCK_R, BLOCK_D], tl.float32)
    for split in range(0, num_splits + 1):
        m_s = tl.load(part_m_ptr + base + split)
        l_s = tl.load(part_l_ptr + base + split)
        acc_s = tl.load(part_acc_ptr + (base + split)[:, None] * BLOCK_D + d[None, :])
        m_new = tl.maximum(m, m_s)
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        alpha = tl.exp2(m - m_safe)
        beta = tl.exp2(m_s - m_safe)
        l_sum = l_sum * alpha + l_s * beta
        acc = acc * alpha[:, None] + acc_s * beta[:, None]
        m = m_new

    # l = 0: the node attends to nothing (all-False mask row, empty prefix) and outputs 0.
    inv = tl.where(l_sum > 0, 1.0 / tl.where(l_sum > 0, l_sum, 1.0), 0.0)
    out = acc * inv[:, None]
    node = rows // GROUP
    head = kv_head * GROUP + rows % GROUP
    num_heads = num_kv_heads * GROUP
    dst = ((b * num_nodes + node[:, None]) * num_heads + head[:, None]) * HEAD_DIM + d[None, :]
    tl.store(out_ptr + dst, out.to(out_ptr.dtype.element_ty),
             mask=row_ok[:, None] & (d[None, :] < HEAD_DIM))


_NUM_SMS: dict[int, int] = {}


def _num_sms(device: torch.device) -> int:
    """Streaming multiprocessors of a CUDA device (a host query, cached; 4 off the GPU)."""
    if device.type != "cuda":
        return 4
    index = device.index if device.index is not None else torch.cuda.current_device()
    if index not in _NUM_SMS:
        _NUM_SMS[index] = torch.cuda.get_device_properties(index).multi_processor_count
    return _NUM_SMS[index]


def _fp32_dot(dtype: torch.dtype) -> bool:
    """Whether the dots run in float32 (IEEE, not TF32): for float32 inputs, and for bfloat16
    under Triton's interpreter, whose bfloat16 tl.dot returns garbage (Triton 3.9). On a GPU
    bfloat16 and float16 use the tensor cores with float32 accumulation."""
    interpreting = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
    return dtype == torch.float32 or (interpreting and dtype == torch.bfloat16)


def _inner_contiguous(t: torch.Tensor) -> torch.Tensor:
    return t if t.stride(-1) == 1 else t.contiguous()


def tree_attention_triton(q: torch.Tensor, k_cache: torch.Tensor, v_cache: torch.Tensor,
                          cache_lens: torch.Tensor, mask: torch.Tensor, scale: float | None,
                          block_tables: torch.Tensor | None, *, num_splits: int | None = None,
                          block_n: int | None = None, block_r: int | None = None) -> torch.Tensor:
    """Tree attention in two sync-free launches (the grid depends on shapes only).

    Args:
        q: [B, T, H, D] float32/bf16/fp16, last dim contiguous.
        k_cache, v_cache: [B, Hkv, S, D], or paged [num_blocks, block_size, Hkv, D].
        cache_lens: [B] int32 (clamped into ``0..capacity - T``). mask: [B, T, T] bool.
        scale: float or None (``1 / sqrt(D)``). block_tables: [B, max_blocks] int32 or None.
        num_splits: prefix splits per (row, kv head, row tile); default from the shapes.
        block_n: slots per step, a power of two >= 16. block_r: query rows per program, a
            power of two >= 16 (default: all ``T * H / Hkv`` rows up to 64).

    Returns:
        [B, T, H, D] contiguous, q's dtype.
    """
    batch, num_nodes, num_heads, head_dim = q.shape
    paged = block_tables is not None
    num_kv_heads = k_cache.shape[2 if paged else 1]
    group = num_heads // num_kv_heads
    out = torch.empty((batch, num_nodes, num_heads, head_dim), dtype=q.dtype, device=q.device)
    if out.numel() == 0:
        return out
    q, k_cache, v_cache = (_inner_contiguous(t) for t in (q, k_cache, v_cache))
    mask = mask.contiguous().view(torch.uint8)
    cache_lens = cache_lens.contiguous()
    if paged:
        block_tables = block_tables.contiguous()
        num_blocks, block_size = k_cache.shape[0], k_cache.shape[1]
        max_blocks = block_tables.shape[1]
        capacity = max_blocks * block_size
        k_strides = (k_cache.stride(0), k_cache.stride(1), k_cache.stride(2))
        v_strides = (v_cache.stride(0), v_cache.stride(1), v_cache.stride(2))
        tables = block_tables
    else:
        num_blocks, block_size, max_blocks = 1, 1, 0
        capacity = k_cache.shape[2]
        k_strides = (k_cache.stride(0), k_cache.stride(2), k_cache.stride(1))
        v_strides = (v_cache.stride(0), v_cache.stride(2), v_cache.stride(1))
        tables = cache_lens  # never read
    scale = 1.0 / math.sqrt(head_dim) if scale is None else float(scale)

    block_d = max(16, triton.next_power_of_2(head_dim))
    num_rows = num_nodes * group
    block_r = block_r or min(64, max(16, triton.next_power_of_2(num_rows)))
    # float32 tiles are twice the bytes: 32 slots keep the pipelined K/V buffers near 100 KiB
    # of shared memory at D = 128 (64 slots need 180 KiB, more than an A100 has).
    block_n = block_n or (64 if block_d <= 128 and q.dtype != torch.float32 else 32)
    row_tiles = triton.cdiv(num_rows, block_r)
    if num_splits is None:
        # About two programs per SM, but no split shorter than 4 blocks of a full cache.
        programs = batch * num_kv_heads * row_tiles
        most = max(1, triton.cdiv(capacity - num_nodes, 4 * block_n))
        num_splits = max(1, min(most, triton.cdiv(2 * _num_sms(q.device), programs)))

    padded_rows = row_tiles * block_r
    part_shape = (batch, num_kv_heads, padded_rows, num_splits + 1)
    part_m = torch.empty(part_shape, dtype=torch.float32, device=q.device)
    part_l = torch.empty(part_shape, dtype=torch.float32, device=q.device)
    part_acc = torch.empty(part_shape + (block_d,), dtype=torch.float32, device=q.device)
    num_warps = 4 if block_r * block_d <= 64 * 64 else 8
    _tree_attention_split_kernel[(batch, num_kv_heads * row_tiles, num_splits + 1)](
        q, k_cache, v_cache, cache_lens, mask, tables, part_m, part_l, part_acc,
        scale * _LOG2E, num_nodes, num_kv_heads, capacity, num_splits, row_tiles,
        q.stride(0), q.stride(1), q.stride(2), *k_strides, *v_strides,
        max_blocks, block_size, num_blocks,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_R=block_r, BLOCK_N=block_n,
        PAGED=paged, FP32_DOT=_fp32_dot(q.dtype), num_warps=num_warps)
    _tree_attention_combine_kernel[(batch, num_kv_heads * row_tiles)](
        part_m, part_l, part_acc, out, num_nodes, num_kv_heads, num_splits, row_tiles,
        GROUP=group, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_R=block_r, num_warps=4)
    return out
