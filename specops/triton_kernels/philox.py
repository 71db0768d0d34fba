"""Philox4x32-10 and the uniform ``u`` in Triton: the same function as specops/reference/random.py.

Key = (seed low 32 bits, seed high 32 bits); counter = (position low 32 bits, position high 32
bits, sibling rank, purpose); ``u = (x0 >> 8) * 2**-24`` (contract, "The root, positions and
randomness"). All arithmetic is uint32: ``tl.umulhi`` gives the high word of the 32x32-bit
product and the wrapping uint32 multiply the low word (mul.hi.u32 / mul.lo.u32 on NVIDIA).
"""

import triton
import triton.language as tl

PURPOSE_ACCEPT = tl.constexpr(0)
PURPOSE_DRAW = tl.constexpr(1)

_M0 = tl.constexpr(0xD2511F53)
_M1 = tl.constexpr(0xCD9E8D57)
_W0 = tl.constexpr(0x9E3779B9)
_W1 = tl.constexpr(0xBB67AE85)


@triton.jit
def philox4x32_10(c0, c1, c2, c3, k0, k1):
    """Philox4x32-10 (Salmon et al., SC'11) on uint32 tensors; returns the four output words."""
    # Wrapping uint32 products and sums are the algorithm: sanitize_overflow=False keeps
    # TRITON_DEBUG's overflow asserts off them.
    for _ in tl.static_range(10):
        hi0 = tl.umulhi(_M0, c0)
        hi1 = tl.umulhi(_M1, c2)
        lo0 = tl.mul(_M0, c0, sanitize_overflow=False)
        lo1 = tl.mul(_M1, c2, sanitize_overflow=False)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = tl.add(k0, _W0, sanitize_overflow=False)
        k1 = tl.add(k1, _W1, sanitize_overflow=False)
    return c0, c1, c2, c3


@triton.jit
def philox_uniform(seed, position, sibling_rank, purpose: tl.constexpr):
    """``u`` in [0, 1) (float32, shaped like ``position``) for the token decided at ``position``.

    seed: int64 scalar or tensor; position: int64 tensor (the absolute position ``a``);
    sibling_rank: a non-negative int or int32 tensor (0 for chain slots and draws);
    purpose: PURPOSE_ACCEPT (0) or PURPOSE_DRAW (1).
    """
    a = position.to(tl.uint64, bitcast=True)
    s = seed.to(tl.uint64, bitcast=True)
    c0 = (a & 0xFFFFFFFF).to(tl.uint32)
    c1 = (a >> 32).to(tl.uint32)
    zero = c0 * 0
    c2 = zero + sibling_rank
    c3 = zero + purpose
    k0 = (s & 0xFFFFFFFF).to(tl.uint32)
    k1 = (s >> 32).to(tl.uint32)
    x0, _, _, _ = philox4x32_10(c0, c1, c2, c3, k0, k1)
    # x0 >> 8 < 2**24 converts exactly; the scale is a power of two, so u is exact in float32.
    return (x0 >> 8).to(tl.float32) * 5.9604644775390625e-08
