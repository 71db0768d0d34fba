"""Fused Triton kernels for the decoder layer of specops' own forward (specops/models/llama.py)
on CUDA: residual add + RMSNorm; rotary embedding of queries and keys with the write of keys
and values into the KV cache; SiLU-gated product.

Why: replayed from a CUDA graph, a decode step of a small model is expected to take time
with the count of its small kernels more than with their bytes (the reading of the first GPU
run, BENCHMARKS.md "GPU", not yet profiled kernel by kernel). Eager PyTorch runs Hugging
Face's RMSNorm as 8 elementwise kernels, rotary as 5 per tensor, the cache write
(:class:`specops.kv_ops.KVSlotWriter`) as 6 per tensor and the MLP's gate as 2, about 42
launches a layer with the residual adds; these kernels take 4 (a layer drops from about 50
kernels to about 13, by a count of the code). They are not ops of the public contract: the
forward calls them on CUDA only, outside ``torch.compile`` (which fuses the PyTorch
composition itself), and the PyTorch composition in llama.py (``_rms_norm``, ``_rotary``,
``F.silu(g) * u``, ``KVSlotWriter.write``) is what they must equal.

Numerics follow Hugging Face's modules operation by operation, each result rounded to the
model's dtype where eager PyTorch rounds it (a bfloat16 ``a * b + c`` is two roundings):
RMSNorm squares and averages in float32, scales, rounds, then multiplies by the weight;
rotary rounds ``x * cos`` and ``rotate_half(x) * sin`` before adding them. The one freedom
taken is the order of the float32 sum of squares (a tree reduction here, as in any GPU
reduction), so results agree with the composition to float32 rounding, not bit for bit.

Traffic per call (E = element size): add_rms_norm, per row of N: 2N (N with no residual)
elements read, 2N written (N), N weights read; rotary_kv_write: every q and k element read and
written once, every v element read once, every k and v element written once more to the
cache, the token's cos and sin read once per program; silu_mul: 2 reads and 1 write an element.
"""

import torch
import triton
import triton.language as tl


def _num_warps(block: int) -> int:
    """Warps for a program over ``block`` elements: about 8 elements a thread, 1..16 warps."""
    return max(1, min(16, block // 256))


@triton.jit
def _add_rms_norm_kernel(
    x_ptr,        # [rows, N] model dtype: the hidden state
    delta_ptr,    # [rows, N] model dtype: added to x first (HAS_DELTA), else unused
    sum_ptr,      # [rows, N] model dtype out: x + delta (HAS_DELTA), else unused
    out_ptr,      # [rows, N] model dtype out: RMSNorm(x + delta) * weight
    weight_ptr,   # [N] model dtype
    n_cols, eps,
    HAS_DELTA: tl.constexpr, BLOCK: tl.constexpr,
):
    """Program ``row``: one row. Reads N (2N with delta) elements and N weights, writes N
    (2N)."""
    row = tl.program_id(0).to(tl.int64)
    cols = tl.arange(0, BLOCK)
    inside = cols < n_cols
    offs = row * n_cols + cols
    x = tl.load(x_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    if HAS_DELTA:
        delta = tl.load(delta_ptr + offs, mask=inside, other=0.0).to(tl.float32)
        total = (x + delta).to(sum_ptr.dtype.element_ty)   # the residual stream's rounding
        tl.store(sum_ptr + offs, total, mask=inside)
        x = total.to(tl.float32)
    variance = tl.sum(x * x, axis=0) / n_cols
    normed = (x * tl.math.rsqrt(variance + eps)).to(out_ptr.dtype.element_ty)
    weight = tl.load(weight_ptr + cols, mask=inside, other=0.0).to(tl.float32)
    tl.store(out_ptr + offs, (weight * normed.to(tl.float32)).to(out_ptr.dtype.element_ty),
             mask=inside)


def add_rms_norm_triton(x: torch.Tensor, delta: torch.Tensor | None, weight: torch.Tensor,
                        eps: float) -> tuple[torch.Tensor, torch.Tensor]:
    """``h = x + delta`` (or ``x`` when ``delta`` is None) and Hugging Face's RMSNorm of it.

    Args:
        x: Shape ``(..., N)``, contiguous, float32, bfloat16 or float16.
        delta: ``x``'s shape, dtype and layout, or None.
        weight: Shape ``(N,)``, ``x``'s dtype.
        eps: The norm's ``variance_epsilon``.

    Returns:
        ``(h, normed)``, each ``x``'s shape and dtype (``h`` is ``x`` itself without delta).
    """
    x, weight = x.contiguous(), weight.contiguous()
    delta = delta.contiguous() if delta is not None else None
    n_cols = x.shape[-1]
    rows = x.numel() // max(n_cols, 1)
    out = torch.empty_like(x)
    total = torch.empty_like(x) if delta is not None else x
    if rows:
        block = triton.next_power_of_2(n_cols)
        _add_rms_norm_kernel[(rows,)](
            x, delta if delta is not None else x, total, out, weight, n_cols, eps,
            HAS_DELTA=delta is not None, BLOCK=block, num_warps=_num_warps(block))
    return total, out


@triton.jit
def _rotate_heads(base_ptr, heads, num_heads, cols, cos1, cos2, sin1, sin2,
                  HALF: tl.constexpr):
    """Rotates ``heads`` ([BLOCK_H] indices) of one token in place: ``x * cos +
    rotate_half(x) * sin``, each product rounded to the tensor's dtype before the sum.
    Returns the two rotated halves ([BLOCK_H, BLOCK_D] each, the dtype's values)."""
    dtype = base_ptr.dtype.element_ty
    offs = heads[:, None] * (2 * HALF) + cols[None, :]
    inside = (heads[:, None] < num_heads) & (cols[None, :] < HALF)
    x1 = tl.load(base_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    x2 = tl.load(base_ptr + offs + HALF, mask=inside, other=0.0).to(tl.float32)
    # rotate_half(x) = cat(-x2, x1): the first half gets -x2 * sin, the second x1 * sin
    first = ((x1 * cos1).to(dtype).to(tl.float32) + (-x2 * sin1).to(dtype).to(tl.float32))
    second = ((x2 * cos2).to(dtype).to(tl.float32) + (x1 * sin2).to(dtype).to(tl.float32))
    first, second = first.to(dtype), second.to(dtype)
    tl.store(base_ptr + offs, first, mask=inside)
    tl.store(base_ptr + offs + HALF, second, mask=inside)
    return first, second


@triton.jit
def _rotary_kv_write_kernel(
    q_ptr,          # [B, T, num_q_heads, 2 * HALF] model dtype, rotated in place
    k_ptr,          # [B, T, num_k_heads, 2 * HALF] model dtype, rotated in place
    v_ptr,          # [B, T, num_k_heads, 2 * HALF] model dtype
    cos_ptr,        # [B, T, 2 * HALF] model dtype
    sin_ptr,        # [B, T, 2 * HALF] model dtype
    k_cache_ptr,    # [B, num_k_heads, S, 2 * HALF] model dtype, last dim contiguous: written
    v_cache_ptr,    # as k_cache (same strides)
    cache_lens_ptr,  # [B] int32: token t of row b goes to slot cache_lens[b] + t
    num_new, num_q_heads, num_k_heads, capacity,
    stride_cache_b, stride_cache_h, stride_cache_s,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program ``(token, j)``: heads ``[j * BLOCK_H, (j + 1) * BLOCK_H)`` of the token's q, k
    and v. Reads and writes each q and k element once, reads each v element once, writes k
    and v to the cache slot once (nothing when the slot is outside ``0..S-1``, as
    ``kv_write`` drops it), reads the token's cos and sin."""
    token = tl.program_id(0).to(tl.int64)
    heads = tl.program_id(1) * BLOCK_H + tl.arange(0, BLOCK_H)
    cols = tl.arange(0, BLOCK_D)
    in_half = cols < HALF
    row = token * (2 * HALF) + cols
    cos1 = tl.load(cos_ptr + row, mask=in_half, other=0.0).to(tl.float32)
    cos2 = tl.load(cos_ptr + row + HALF, mask=in_half, other=0.0).to(tl.float32)
    sin1 = tl.load(sin_ptr + row, mask=in_half, other=0.0).to(tl.float32)
    sin2 = tl.load(sin_ptr + row + HALF, mask=in_half, other=0.0).to(tl.float32)
    _rotate_heads(q_ptr + token * num_q_heads * (2 * HALF), heads, num_q_heads, cols,
                  cos1, cos2, sin1, sin2, HALF)
    kv_offset = token * num_k_heads * (2 * HALF)
    k1, k2 = _rotate_heads(k_ptr + kv_offset, heads, num_k_heads, cols,
                           cos1, cos2, sin1, sin2, HALF)
    b = token // num_new
    slot = tl.load(cache_lens_ptr + b).to(tl.int64) + token % num_new
    head_offs = heads[:, None] * (2 * HALF) + cols[None, :]
    inside = (heads[:, None] < num_k_heads) & (cols[None, :] < HALF)
    v1 = tl.load(v_ptr + kv_offset + head_offs, mask=inside, other=0.0)
    v2 = tl.load(v_ptr + kv_offset + head_offs + HALF, mask=inside, other=0.0)
    in_cache = (slot >= 0) & (slot < capacity)
    store = tl.where(in_cache, inside, False)   # not inside & in_cache: an int mask in the
    # interpreter, which refuses it
    dst = (b * stride_cache_b + heads[:, None].to(tl.int64) * stride_cache_h
           + slot * stride_cache_s + cols[None, :])
    tl.store(k_cache_ptr + dst, k1, mask=store)
    tl.store(k_cache_ptr + dst + HALF, k2, mask=store)
    tl.store(v_cache_ptr + dst, v1, mask=store)
    tl.store(v_cache_ptr + dst + HALF, v2, mask=store)


def rotary_kv_write_triton_(q: torch.Tensor, k: torch.Tensor, v: torch.Tensor,
                            cos: torch.Tensor, sin: torch.Tensor, k_cache: torch.Tensor,
                            v_cache: torch.Tensor, cache_lens: torch.Tensor) -> None:
    """Hugging Face's ``apply_rotary_pos_emb`` (rotate_half convention) on ``q`` and ``k`` in
    place, then ``kv_write`` of the rotated ``k`` and of ``v`` into one layer's cache: one
    launch for what eager PyTorch does in about 22.

    Args:
        q: Shape ``(batch_size, T, num_heads, head_dim)``, contiguous, model dtype.
        k, v: Shape ``(batch_size, T, num_kv_heads, head_dim)``, contiguous, ``q``'s dtype.
        cos, sin: Shape ``(batch_size, T, head_dim)``, ``q``'s dtype (what the model's
            ``rotary_emb`` returns). ``head_dim`` is even.
        k_cache, v_cache: Shape ``(batch_size, num_kv_heads, S, head_dim)``, ``q``'s dtype,
            one layout with a contiguous last dim. Token ``t`` of row ``b`` is written to slot
            ``cache_lens[b] + t``; a slot outside ``0..S-1`` is dropped.
        cache_lens: Shape ``(batch_size,)``, int32.
    """
    if not all(t.is_contiguous() for t in (q, k, v)):
        raise ValueError("rotary_kv_write_triton_: q, k and v must be contiguous "
                         "(q and k are rotated in place)")
    if k_cache.stride() != v_cache.stride() or k_cache.stride(-1) != 1:
        raise ValueError("rotary_kv_write_triton_: k_cache and v_cache must share strides "
                         "with a contiguous last dim")
    cos, sin, cache_lens = cos.contiguous(), sin.contiguous(), cache_lens.contiguous()
    batch, num_new, num_heads, head_dim = q.shape
    tokens = batch * num_new
    if not tokens:
        return
    half = head_dim // 2
    block_d = triton.next_power_of_2(half)
    most_heads = max(num_heads, k.shape[2])
    block_h = min(triton.next_power_of_2(most_heads), max(1, 2048 // block_d))
    grid = (tokens, triton.cdiv(most_heads, block_h))
    _rotary_kv_write_kernel[grid](
        q, k, v, cos, sin, k_cache, v_cache, cache_lens, num_new, num_heads, k.shape[2],
        k_cache.shape[2], *k_cache.stride()[:3], HALF=half, BLOCK_H=block_h, BLOCK_D=block_d,
        num_warps=_num_warps(block_h * block_d))


@triton.jit
def _silu_mul_kernel(
    gate_ptr,     # [n] model dtype
    up_ptr,       # [n] model dtype
    out_ptr,      # [n] model dtype out: silu(gate) * up
    n, BLOCK: tl.constexpr,
):
    """Program ``i``: elements ``[i * BLOCK, (i + 1) * BLOCK)``; 2 reads and 1 write each."""
    offs = tl.program_id(0).to(tl.int64) * BLOCK + tl.arange(0, BLOCK)
    inside = offs < n
    gate = tl.load(gate_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    up = tl.load(up_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    dtype = out_ptr.dtype.element_ty
    act = (gate / (1.0 + tl.exp(-gate))).to(dtype).to(tl.float32)   # F.silu, rounded
    tl.store(out_ptr + offs, (act * up).to(dtype), mask=inside)


def silu_mul_triton(gate: torch.Tensor, up: torch.Tensor) -> torch.Tensor:
    """``F.silu(gate) * up`` in one launch. ``gate``, ``up``: one shape and dtype, contiguous.
    Returns a new tensor of that shape and dtype."""
    gate, up = gate.contiguous(), up.contiguous()
    out = torch.empty_like(gate)
    n = gate.numel()
    if n:
        block = 1024
        _silu_mul_kernel[(triton.cdiv(n, block),)](gate, up, out, n, BLOCK=block, num_warps=4)
    return out
