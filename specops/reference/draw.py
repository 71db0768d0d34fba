"""The drawing rule shared by every op that samples (contract, "The root, positions and randomness")."""

import torch
from torch import Tensor


def sanitize(weights: Tensor) -> Tensor:
    """Keeps the entries that are positive and finite; NaN, inf and negatives become 0.

    This is how every backend reads a row it draws from, so a bad row (with checks off)
    still gives an in-bounds, documented token instead of a crash.
    """
    return torch.where((weights > 0) & (weights < float("inf")), weights, 0.0)


def draw(weights: Tensor, u: Tensor, fallback: Tensor | None = None) -> Tensor:
    """Draws one index per row from unnormalised ``weights`` with the uniform ``u``.

    The index is the smallest ``i`` with ``weights[i] > 0`` whose inclusive prefix sum
    exceeds ``u * sum(weights)``; sums are taken in float64 so that backends summing in other
    orders agree except where rounding at 1e-16 decides a boundary.

    Args:
        weights: [N, V] float32, already sanitised (non-negative, finite).
        u: [N] float32 in [0, 1).
        fallback: [N, V] float32, sanitised; replaces a row of ``weights`` whose mass is zero
            (a residual can lose all its mass through rounding).

    Returns:
        [N] int64. A row with no positive mass at all (a bad input row) draws index 0.
    """
    w = weights.double()
    if fallback is not None:
        w = torch.where(w.sum(-1, keepdim=True) == 0, fallback.double(), w)
    cum = w.cumsum(-1)
    threshold = u.double()[:, None] * cum[:, -1:]
    hit = (w > 0) & (cum > threshold)
    first_hit = hit.int().argmax(-1)
    # Unreachable with a positive total (threshold < total); kept so rounding can never
    # produce an index with zero weight.
    positive = w > 0
    last_positive = w.shape[-1] - 1 - positive.flip(-1).int().argmax(-1)
    return torch.where(hit.any(-1), first_hit,
                       torch.where(positive.any(-1), last_positive, 0)).long()
