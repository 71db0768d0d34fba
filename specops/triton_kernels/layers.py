"""Fused Triton kernels for the decoder layer of specops' own forward (specops/models/llama.py)
on CUDA: residual add + RMSNorm, rotary embedding of queries and keys, SiLU-gated product.

Why: replayed from a CUDA graph, a decode step's time is mostly the count of small kernels,
not their bytes. Eager PyTorch runs Hugging Face's RMSNorm as 8 elementwise kernels, rotary as
5 per tensor and the MLP's gate as 2, about 30 launches a layer with the residual adds; these
kernels take 4 (a layer drops from about 43 kernels to about 17). They are not ops of the public contract: the forward calls them
on CUDA only, outside ``torch.compile`` (which fuses the PyTorch composition itself), and the
PyTorch composition in llama.py (``_rms_norm``, ``_rotary``, ``F.silu(g) * u``) is what they
must equal.

Numerics follow Hugging Face's modules operation by operation, each result rounded to the
model's dtype where eager PyTorch rounds it (a bfloat16 ``a * b + c`` is two roundings):
RMSNorm squares and averages in float32, scales, rounds, then multiplies by the weight;
rotary rounds ``x * cos`` and ``rotate_half(x) * sin`` before adding them. The one freedom
taken is the order of the float32 sum of squares (a tree reduction here, as in any GPU
reduction), so results agree with the composition to float32 rounding, not bit for bit.

Traffic per call (E = element size): add_rms_norm, per row of N: 2N (N with no residual)
elements read, 2N written (N), N weights read; rotary: every q and k element read and written
once, the token's cos and sin read once per program; silu_mul: 2 reads and 1 write an element.
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
    rotate_half(x) * sin``, each product rounded to the tensor's dtype before the sum."""
    dtype = base_ptr.dtype.element_ty
    offs = heads[:, None] * (2 * HALF) + cols[None, :]
    inside = (heads[:, None] < num_heads) & (cols[None, :] < HALF)
    x1 = tl.load(base_ptr + offs, mask=inside, other=0.0).to(tl.float32)
    x2 = tl.load(base_ptr + offs + HALF, mask=inside, other=0.0).to(tl.float32)
    # rotate_half(x) = cat(-x2, x1): the first half gets -x2 * sin, the second x1 * sin
    first = (x1 * cos1).to(dtype).to(tl.float32) + (-x2 * sin1).to(dtype).to(tl.float32)
    second = (x2 * cos2).to(dtype).to(tl.float32) + (x1 * sin2).to(dtype).to(tl.float32)
    tl.store(base_ptr + offs, first.to(dtype), mask=inside)
    tl.store(base_ptr + offs + HALF, second.to(dtype), mask=inside)


@triton.jit
def _rotary_kernel(
    q_ptr,        # [tokens, num_q_heads, 2 * HALF] model dtype, rotated in place
    k_ptr,        # [tokens, num_k_heads, 2 * HALF] model dtype, rotated in place
    cos_ptr,      # [tokens, 2 * HALF] model dtype
    sin_ptr,      # [tokens, 2 * HALF] model dtype
    num_q_heads, num_k_heads,
    HALF: tl.constexpr, BLOCK_H: tl.constexpr, BLOCK_D: tl.constexpr,
):
    """Program ``(token, j)``: heads ``[j * BLOCK_H, (j + 1) * BLOCK_H)`` of the token's q
    and of its k. Reads and writes each of their elements once; reads the token's cos, sin."""
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
    _rotate_heads(k_ptr + token * num_k_heads * (2 * HALF), heads, num_k_heads, cols,
                  cos1, cos2, sin1, sin2, HALF)


def rotary_triton_(q: torch.Tensor, k: torch.Tensor, cos: torch.Tensor,
                   sin: torch.Tensor) -> None:
    """Hugging Face's ``apply_rotary_pos_emb`` (rotate_half convention) on ``q`` and ``k``,
    in place.

    Args:
        q: Shape ``(batch_size, T, num_heads, head_dim)``, contiguous, model dtype.
        k: Shape ``(batch_size, T, num_kv_heads, head_dim)``, contiguous, ``q``'s dtype.
        cos, sin: Shape ``(batch_size, T, head_dim)``, contiguous, ``q``'s dtype (what the
            model's ``rotary_emb`` returns). ``head_dim`` is even.
    """
    if not (q.is_contiguous() and k.is_contiguous()):
        raise ValueError("rotary_triton_: q and k must be contiguous (rotated in place)")
    cos, sin = cos.contiguous(), sin.contiguous()
    batch, num_new, num_heads, head_dim = q.shape
    tokens = batch * num_new
    if not tokens:
        return
    half = head_dim // 2
    block_d = triton.next_power_of_2(half)
    most_heads = max(num_heads, k.shape[2])
    block_h = min(triton.next_power_of_2(most_heads), max(1, 2048 // block_d))
    grid = (tokens, triton.cdiv(most_heads, block_h))
    _rotary_kernel[grid](q, k, cos, sin, num_heads, k.shape[2], HALF=half, BLOCK_H=block_h,
                         BLOCK_D=block_d, num_warps=_num_warps(block_h * block_d))


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
