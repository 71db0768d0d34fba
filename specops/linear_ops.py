"""Linear layer for a few rows of activations on the CPU: the verify pass of speculative
decoding runs the target over the ``T`` = draft length + 1 new tokens, and for such ``T`` a
layer should cost one read of its weight, like the one-token step. torch's float32
``F.linear`` goes through BLAS sgemm there, which on an AVX-512 CPU costs about twice the
one-row product already at two rows; :func:`skinny_linear` streams the weight once.
"""

import torch
import torch.nn.functional as F
from torch import Tensor

from . import ops

_OP = "skinny_linear"
# Rows (tokens, all batch rows together) up to which the CPU kernel is used, per dtype; torch's
# F.linear above. Measured on a 2-core AMD EPYC (AVX-512 with bf16 dot products), Qwen2.5-1.5B
# projection shapes (8960x1536, 1536x8960, 1536x1536), both threads: float32 kernel vs MKL
# sgemm 2.0 vs 4.5 ms at 1 row, 3.8 vs 11.9 at 16, 10.0 vs 24.0 at 64, still ahead at 128
# (24.3 vs 32.6); bfloat16 kernel vs oneDNN 0.8 vs 1.9 ms at 1 row, 0.9 vs 1.2 at 4, about
# even at 6-8 and behind from 8 on (3.9 vs 2.7 at 16), oneDNN using the CPU's bfloat16 dot
# product instructions. Where those are missing the kernel would stay ahead longer; 6 is the
# measured crossover here.
MAX_ROWS = {torch.float32: 64, torch.bfloat16: 6}
# A float32 input past MAX_ROWS on the CPU (a prefill) goes to oneDNN's matmul
# (torch.ops.mkldnn._linear_pointwise, the op torch's own compiler emits for CPU linears; it
# takes nn.Linear's weight as it is) rather than torch's F.linear, which on this CPU goes to
# MKL's sgemm. Measured on the 2-core AMD EPYC, 2 threads, Qwen2.5-1.5B projections
# (8960x1536 / 1536x8960 / 1536x1536), ms: 172 rows oneDNN 22.9 / 22.5 / 3.9, sgemm 33.1 /
# 27.2 / 4.5, this kernel in a 172-row block 26.1 / 22.8 / 4.4; 359 rows 47.4 / 46.2 / 8.0
# against sgemm 59.5 / 51.5 / 9.1; 1484 rows (a batch of 4 long prompts) 213 / 199 against
# sgemm 233 / 210. MKL appears to take a slower code path on this AMD CPU; on an Intel CPU the
# two libraries should be closer. Without oneDNN in the torch build, F.linear.
_ONEDNN_LINEAR = (torch.backends.mkldnn.is_available()
                  and hasattr(torch.ops.mkldnn, "_linear_pointwise"))


def skinny_linear_meta(x: Tensor, weight: Tensor, bias: Tensor | None) -> None:
    """Shape and dtype checks shared by :func:`skinny_linear` and the fake kernel."""
    for name, t in (("x", x), ("weight", weight), ("bias", bias)):
        if t is None and name == "bias":
            continue
        if not isinstance(t, Tensor):
            raise TypeError(f"{_OP}: {name} must be a torch.Tensor, got {type(t).__name__}")
        if not t.dtype.is_floating_point:
            raise TypeError(f"{_OP}: {name} must be a floating-point tensor, got "
                            f"{str(t.dtype).removeprefix('torch.')}")
        if t.dtype != x.dtype:
            raise TypeError(f"{_OP}: {name} must have x's dtype "
                            f"{str(x.dtype).removeprefix('torch.')}, got "
                            f"{str(t.dtype).removeprefix('torch.')}")
        if t.device != x.device:
            raise ValueError(f"{_OP}: {name} must be on x's device {x.device}, got {t.device}")
    if weight.dim() != 2:
        raise ValueError(f"{_OP}: weight must have 2 dims (out_features, in_features), got "
                         f"shape {tuple(weight.shape)}")
    if x.dim() < 1:
        raise ValueError(f"{_OP}: x must have at least 1 dim, got shape {tuple(x.shape)}")
    if x.shape[-1] != weight.shape[1]:
        raise ValueError(f"{_OP}: x.shape[-1] must be {weight.shape[1]} (weight.shape[1], "
                         f"in_features), got shape {tuple(x.shape)}")
    if bias is not None and tuple(bias.shape) != (weight.shape[0],):
        raise ValueError(f"{_OP}: bias must have shape ({weight.shape[0]},) (weight.shape[0], "
                         f"out_features), got shape {tuple(bias.shape)}")


def skinny_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``y = x @ weight.T + bias``, the same function as ``torch.nn.functional.linear`` (its
    executable specification), fast on the CPU for a few rows of ``x``.

    With ``x`` on the CPU in float32 (at most 64 rows, ``x.numel() // in_features``) or
    bfloat16 (at most 6 rows), ``torch.ops.specops.skinny_linear`` runs: a C++ kernel
    that reads ``weight`` from memory once and computes all rows' dot products from it
    (float32 FMA, all of torch's threads for large ``out_features``). Anything else calls
    ``F.linear``: above those rows BLAS's blocked GEMM is the right tool (the product is no
    longer bound by reading the weight; see ``MAX_ROWS`` for the measured crossovers), torch's
    float16 is left as it is, and on GPUs cuBLAS is the GPU
    path. ``specops.set_backend("reference")`` also routes to ``F.linear``.

    float32 results equal ``F.linear``'s up to float32 rounding (another summation order):
    relative error about ``1e-7 * sqrt(in_features)`` of ``|x| @ |weight|.T``. bfloat16
    inputs are summed in float32 and the result rounded once to bfloat16 (nearest even):
    ``F.linear`` of the inputs cast to float32, then cast to bfloat16, up to that float32
    rounding (which can move a result across a bfloat16 rounding boundary: one ulp).

    Args:
        x: Shape ``(..., in_features)``, floating point (the kernel serves float32 and
            bfloat16). Any strides; leading dims are
            flattened (a copy only where they cannot be viewed as one).
        weight: Shape ``(out_features, in_features)``, ``x``'s dtype and device. Read in
            place when its last dim is contiguous (``nn.Linear.weight`` is).
        bias: Shape ``(out_features,)``, ``x``'s dtype, or ``None``.

    Returns:
        Shape ``(..., out_features)``, contiguous, ``x``'s dtype.

    >>> x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    >>> w = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    >>> specops.skinny_linear(x, w, torch.tensor([0.0, 0.5, 0.0]))
    tensor([[ 1.0000,  3.5000, -2.0000],
            [ 3.0000,  7.5000, -4.0000]])
    """
    skinny_linear_meta(x, weight, bias)
    if kernel_serves(x) and ops.get_backend() == "kernels":
        return torch.ops.specops.skinny_linear(x, weight, bias)
    return F.linear(x, weight, bias)


def kernel_serves(x: Tensor) -> bool:
    """Whether :func:`skinny_linear` runs the CPU kernel for ``x`` (any shape
    ``(..., in_features)``): on the CPU, a dtype of ``MAX_ROWS`` and at most that many rows."""
    return (x.device.type == "cpu" and x.dtype in MAX_ROWS and x.shape[-1] > 0
            and x.numel() <= MAX_ROWS[x.dtype] * x.shape[-1])


def model_linear(x: Tensor, weight: Tensor, bias: Tensor | None = None) -> Tensor:
    """``F.linear(x, weight, bias)`` as specops' model forward routes it: a decode or verify
    step on the CPU in float32 or bfloat16 (up to ``MAX_ROWS``, all batch rows together)
    through :func:`skinny_linear`, which reads the weight once however many tokens there are,
    where torch's sgemm costs about twice the one-token product from two tokens on and its
    bfloat16 matrix-vector path is slower still. A longer float32 input on the CPU (a
    prefill) goes to oneDNN's matmul, faster than torch's sgemm there (``_ONEDNN_LINEAR``);
    anything else through F.linear.

    Args:
        x: Shape ``(..., in_features)``.
        weight: Shape ``(out_features, in_features)``, ``x``'s dtype and device.
        bias: Shape ``(out_features,)`` or ``None``.

    Returns:
        Shape ``(..., out_features)``, ``x``'s dtype.
    """
    if kernel_serves(x):
        return skinny_linear(x, weight, bias)
    # Not under torch.compile: TorchInductor picks its own CPU linears, and its lowering of
    # this op asserts under dynamic shapes (a compiled prefill of a 173-token prompt at the
    # Qwen2.5-1.5B shape: "LoweringException: AssertionError: mkldnn._linear_pointwise").
    if (_ONEDNN_LINEAR and x.device.type == "cpu" and x.dtype == torch.float32
            and ops.get_backend() == "kernels" and weight.is_contiguous() and x.numel() > 0
            and not torch.compiler.is_compiling()):
        rows = x.reshape(-1, x.shape[-1])
        return torch.ops.mkldnn._linear_pointwise(rows, weight, bias, "none", [], "").view(
            *x.shape[:-1], -1)
    return F.linear(x, weight, bias)
