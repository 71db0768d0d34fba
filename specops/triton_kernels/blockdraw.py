"""The last stage of a draw in Triton, shared by the verify kernels: inverse-CDF sampling
located first among per-block float64 masses, then inside the one block that holds the
threshold (the contract's drawing rule: the first index whose cumulative weight exceeds
``u * total``, else the last index with weight; token 0 when nothing has weight)."""

import triton
import triton.language as tl

from .argmax import NO_INDEX


@triton.jit
def locate_block(mass, index, u):
    """The final draw's first stage: the block (or chunk) of ``index`` whose cumulative
    ``mass`` (float64, [NB]) first exceeds ``u * total``, else the last block with mass (-1:
    none); returns ``(block, mass before it, threshold u * total)``."""
    cum_mass = tl.cumsum(mass, 0)
    threshold = u.to(tl.float64) * tl.max(cum_mass, 0)
    first_hit = tl.min(tl.where((mass > 0) & (cum_mass > threshold), index, NO_INDEX), 0)
    last_positive = tl.max(tl.where(mass > 0, index, -1), 0)
    block = tl.where(first_hit < NO_INDEX, first_hit, last_positive)
    mass_before = tl.sum(tl.where(index == block - 1, cum_mass, 0.0), 0)
    return block, mass_before, threshold


@triton.jit
def draw_in_block(w, offs, block, mass_before, threshold):
    """The final draw's second stage: the token of the located block whose cumulative weight
    (``w``, float64 at vocabulary ``offs``) first exceeds the threshold."""
    cum_w = mass_before + tl.cumsum(w, 0)
    first = tl.min(tl.where((w > 0) & (cum_w > threshold), offs, NO_INDEX), 0)
    # Only rounding between the block sums and this scan can miss every lane: then the
    # block's last positive lane, as the reference falls back to the last positive index.
    last = tl.max(tl.where(w > 0, offs, -1), 0)
    token = tl.where(first < NO_INDEX, first, last)
    return tl.where(block >= 0, tl.maximum(token, 0), 0)  # no positive mass: token 0
