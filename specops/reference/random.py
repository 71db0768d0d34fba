"""Philox4x32-10 counter-based randomness, the one source of random numbers in specops.

Every random number a verify op uses is a pure function of ``(seed, position, sibling rank,
purpose)`` (contract, "The root, positions and randomness"), so outputs are batch-invariant,
repeat on every call and replay inside device graphs. This file is the executable definition;
``csrc/philox.h`` and ``specops/triton_kernels/philox.py`` implement the same function.

uint32 arithmetic is emulated in int64 tensors: a 32x32-bit product would overflow int64, so
``_mulhilo`` splits the multiplicand into 16-bit halves (each partial product < 2**48).
"""

import torch
from torch import Tensor

PHILOX_M0, PHILOX_M1 = 0xD2511F53, 0xCD9E8D57
PHILOX_W0, PHILOX_W1 = 0x9E3779B9, 0xBB67AE85
_U32 = 0xFFFFFFFF

PURPOSE_ACCEPT = 0
PURPOSE_DRAW = 1


def _mulhilo(m: int, x: Tensor) -> tuple[Tensor, Tensor]:
    t_lo = (x & 0xFFFF) * m
    t_hi = (x >> 16) * m
    s = t_lo + ((t_hi & 0xFFFF) << 16)
    return (t_hi >> 16) + (s >> 32), s & _U32


def philox4x32_10(counter: tuple[Tensor, Tensor, Tensor, Tensor],
                  key: tuple[Tensor, Tensor]) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Philox4x32-10 (Salmon et al., SC'11) on int64 tensors holding uint32 values."""
    c0, c1, c2, c3 = counter
    k0, k1 = key
    for _ in range(10):
        hi0, lo0 = _mulhilo(PHILOX_M0, c0)
        hi1, lo1 = _mulhilo(PHILOX_M1, c2)
        c0, c1, c2, c3 = hi1 ^ c1 ^ k0, lo1, hi0 ^ c3 ^ k1, lo0
        k0 = (k0 + PHILOX_W0) & _U32
        k1 = (k1 + PHILOX_W1) & _U32
    return c0, c1, c2, c3


def uniform(seeds: Tensor, positions: Tensor, sibling_rank: Tensor | int, purpose: int) -> Tensor:
    """``u`` in [0, 1) (float32) for the token decided at absolute ``positions``.

    Args:
        seeds: int64, broadcastable against ``positions``. Key = (low, high 32 bits).
        positions: int64, the absolute position ``a`` of the token being decided.
        sibling_rank: the node's rank among its siblings (0 for chains and for draws).
        purpose: ``PURPOSE_ACCEPT`` (0) for an accept test, ``PURPOSE_DRAW`` (1) for a draw.

    Returns:
        float32 tensor of the broadcast shape, ``(x0 >> 8) * 2**-24`` (exact in float32).
    """
    seeds, positions = torch.broadcast_tensors(seeds.long(), positions.long())
    rank = torch.as_tensor(sibling_rank, dtype=torch.int64, device=seeds.device)
    counter = (positions & _U32, (positions >> 32) & _U32,
               (rank & _U32).expand_as(positions), torch.full_like(positions, purpose))
    x0, _, _, _ = philox4x32_10(counter, (seeds & _U32, (seeds >> 32) & _U32))
    return (x0 >> 8).to(torch.float32) * 2.0 ** -24
