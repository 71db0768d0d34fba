"""Reference chain verification (contract, "Chain verification"): the executable specification.

Words: slot ``j`` of a row holds draft token ``x_j`` at absolute position ``positions + 1 + j``.
A draft token is *accepted* iff ``u * q(x) < p(x)``; the first token that is not is
*rejected*, and the output token there is *drawn* from the residual ``max(0, p - q)``. When
every one of the row's ``draft_lens`` tokens is accepted, a *bonus* token is drawn from the
target row after them. Emitted tokens per row = ``num_accepted + 1``.
"""

import torch
from torch import Tensor

from .draw import draw, sanitize
from .random import PURPOSE_ACCEPT, PURPOSE_DRAW, uniform


def _gather_at(rows: Tensor, tokens: Tensor) -> Tensor:
    """``rows[b, j, tokens[b, j]]``, 0 where the token is outside ``0..V-1``."""
    vocab = rows.shape[-1]
    valid = (tokens >= 0) & (tokens < vocab)
    values = rows.gather(-1, tokens.clamp(0, vocab - 1)[..., None]).squeeze(-1)
    return torch.where(valid, values.float(), 0.0)


def residual(p: Tensor, q: Tensor) -> Tensor:
    """``max(0, p - q)`` as every backend reads it (sanitised). [N, V] float32."""
    return sanitize(p - q)


def _emit(draft_tokens: Tensor, num_accepted: Tensor, final_token: Tensor) -> Tensor:
    """[B, K+1] int64: accepted drafts, the final token, then -1."""
    batch, num_slots = draft_tokens.shape
    slots = torch.arange(num_slots + 1, device=draft_tokens.device)
    padded = torch.cat([draft_tokens, draft_tokens.new_full((batch, 1), -1)], dim=1)
    n = num_accepted.long()[:, None]
    tokens = torch.where(slots < n, padded, -1)
    return torch.where(slots == n, final_token[:, None], tokens)


def _num_accepted(accept: Tensor) -> Tensor:
    """Length of the leading run of True per row, int32."""
    return accept.int().cumprod(-1).sum(-1, dtype=torch.int32)


def chain_verify_ref(target_probs: Tensor, draft_tokens: Tensor, draft_probs: Tensor | None,
                     draft_lens: Tensor, seeds: Tensor, positions: Tensor) -> tuple[Tensor, Tensor]:
    """Lossless probability-ratio rejection sampling for one draft chain per row.

    Args:
        target_probs: [B, K+1, V] float32, row ``j`` = target distribution after ``j`` drafts.
        draft_tokens: [B, K] int64; slots at or past ``draft_lens`` are ignored.
        draft_probs: [B, K, V] float32, or None for a deterministic drafter (one-hot q).
        draft_lens: [B] int32 in ``0..K``.
        seeds: [B] int64. positions: [B] int64, the root's absolute position.

    Returns:
        tokens [B, K+1] int64, num_accepted [B] int32.
    """
    batch, num_rows, _ = target_probs.shape
    num_slots = num_rows - 1
    device = target_probs.device
    rows = torch.arange(batch, device=device)
    slots = torch.arange(num_slots, device=device)
    draft_lens = draft_lens.clamp(0, num_slots)  # only reachable with checks off

    p_x = _gather_at(target_probs[:, :num_slots], draft_tokens)
    q_x = torch.ones_like(p_x) if draft_probs is None else _gather_at(draft_probs, draft_tokens)
    u = uniform(seeds[:, None], positions[:, None] + 1 + slots, 0, PURPOSE_ACCEPT)
    accept = (u * q_x < p_x) & (slots < draft_lens[:, None])
    num_accepted = _num_accepted(accept)

    # The output token sits at slot num_accepted: drawn from the residual if that slot held a
    # rejected draft, otherwise (all accepted) a bonus token from the target row.
    out_slot = num_accepted.long()
    p = target_probs[rows, out_slot].float()
    rejected = out_slot < draft_lens.long()
    q = torch.zeros_like(p)
    if num_slots > 0:
        q_slot = out_slot.clamp(max=num_slots - 1)
        if draft_probs is None:
            x = draft_tokens[rows, q_slot]
            valid = (x >= 0) & (x < p.shape[-1])
            q[rows, x.clamp(0, p.shape[-1] - 1)] = valid.float()
        else:
            q = draft_probs[rows, q_slot].float()
        q = torch.where(rejected[:, None], q, 0.0)
    u_draw = uniform(seeds, positions + 1 + out_slot, 0, PURPOSE_DRAW)
    final = draw(residual(p, q), u_draw, fallback=sanitize(p))
    return _emit(draft_tokens, num_accepted, final), num_accepted


def chain_verify_greedy_ref(target_logits: Tensor, draft_tokens: Tensor,
                            draft_lens: Tensor) -> tuple[Tensor, Tensor]:
    """Greedy verification on raw logits: accept while the draft equals the row's argmax.

    Args:
        target_logits: [B, K+1, V] float32/bf16/fp16. The argmax is the first maximal index;
            a NaN counts as larger than every number (``torch.argmax``'s rule).
        draft_tokens: [B, K] int64. draft_lens: [B] int32 in ``0..K``.

    Returns:
        tokens [B, K+1] int64, num_accepted [B] int32 (same as ``chain_verify`` on one-hot rows).
    """
    num_slots = draft_tokens.shape[1]
    draft_lens = draft_lens.clamp(0, num_slots)  # only reachable with checks off
    argmax = target_logits.argmax(-1)
    slots = torch.arange(num_slots, device=target_logits.device)
    accept = (draft_tokens == argmax[:, :num_slots]) & (slots < draft_lens[:, None])
    num_accepted = _num_accepted(accept)
    final = argmax.gather(1, num_accepted.long()[:, None]).squeeze(1)
    return _emit(draft_tokens, num_accepted, final), num_accepted
