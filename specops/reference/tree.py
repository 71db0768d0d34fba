"""Reference token-tree ops (contract, "Token trees"): the executable specification.

A tree is ``parents [B, T]`` (int32) with ``parents[:, 0] = -1`` and ``0 <= parents[b, i] < i``
for the other nodes (topological order); ``num_nodes [B]`` (int32, ``1..T``) marks the nodes in
use. A node past ``num_nodes``, or (only reachable with checks off) one whose parent is out of
range, is *detached*: it is nobody's child, it has depth -1 and an all-False mask row, and so
do its descendants.

Verification walks from the root. At node ``c`` the residual starts as ``r = p_c`` with scale
``S = 1``; its children are tested in index order: child ``i`` with token ``x`` and draft
distribution ``q_i`` is accepted iff ``u * q_i(x) < r(x) / S``. On rejection
``r = sanitize(r / S - q_i)`` and ``S = float32(sum(r))`` (summed in float64), i.e. the residual
is renormalised where it is used; a residual whose mass is zero keeps the previous ``r, S``.
When a child is accepted the walk moves there; when all children of ``c`` are rejected, or
``c`` is a leaf, the final token is drawn from ``r``. For a chain this is exactly
``chain_verify`` (``S = 1`` and the first residual is ``p - q``).
"""

import torch
from torch import Tensor

from .draw import draw, sanitize
from .random import PURPOSE_ACCEPT, PURPOSE_DRAW, uniform


def _attached_parents(parents: Tensor, num_nodes: Tensor) -> Tensor:
    """[B, T] int64: the parent of every attached non-root node, -1 for the root and for nodes
    that are nobody's child (past num_nodes or an out-of-range parent)."""
    nodes = torch.arange(parents.shape[1], device=parents.device)
    p = parents.long()
    ok = (nodes >= 1) & (nodes < num_nodes.long()[:, None]) & (p >= 0) & (p < nodes)
    return torch.where(ok, p, -1)


def tree_metadata_ref(parents: Tensor, num_nodes: Tensor) -> tuple[Tensor, Tensor]:
    """Ancestor-or-self mask and depths.

    Args:
        parents: [B, T] int32. num_nodes: [B] int32 in ``1..T``.

    Returns:
        mask [B, T, T] bool (``mask[b, i, j]`` iff node j is node i or an ancestor of it),
        depth [B, T] int32 (root 0; detached nodes -1 with an all-False mask row).
    """
    batch, num_slots = parents.shape
    device = parents.device
    parent = _attached_parents(parents, num_nodes)
    rows = torch.arange(batch, device=device)
    mask = torch.zeros(batch, num_slots, num_slots, dtype=torch.bool, device=device)
    depth = torch.full((batch, num_slots), -1, dtype=torch.int32, device=device)
    has_root = num_nodes >= 1
    mask[:, 0, 0] = has_root
    depth[:, 0] = torch.where(has_root, 0, -1)
    for i in range(1, num_slots):
        p = parent[:, i]
        attached = (p >= 0) & (depth[rows, p.clamp(min=0)] >= 0)
        mask[:, i] = torch.where(attached[:, None], mask[rows, p.clamp(min=0)], False)
        mask[:, i, i] = attached
        depth[:, i] = torch.where(attached, depth[rows, p.clamp(min=0)] + 1, -1)
    return mask, depth


def tree_children_ref(parents: Tensor, num_nodes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """First-child / next-sibling lists and sibling ranks, the index form the walk uses.

    Returns:
        first_child [B, T] int32 (-1: leaf), next_sibling [B, T] int32 (-1: last child),
        sibling_rank [B, T] int32 (rank among the parent's children in index order; 0 for the
        root, -1 for detached nodes).
    """
    batch, num_slots = parents.shape
    device = parents.device
    _, depth = tree_metadata_ref(parents, num_nodes)
    parent = torch.where(depth >= 0, _attached_parents(parents, num_nodes), -1)
    nodes = torch.arange(num_slots, device=device)
    # same_parent[b, i, j]: j is a child of the same parent as i (both attached, non-root)
    child = parent >= 0
    same = (parent[:, :, None] == parent[:, None, :]) & child[:, :, None] & child[:, None, :]
    earlier = nodes[None, :] < nodes[:, None]
    later = ~earlier & (nodes[None, :] != nodes[:, None])
    sibling_rank = (same & earlier).sum(-1, dtype=torch.int32)
    sibling_rank = torch.where(child, sibling_rank, torch.where(depth == 0, 0, -1)).int()
    big = num_slots
    next_sibling = torch.where(same & later, nodes[None, None, :], big).amin(-1)
    next_sibling = torch.where(next_sibling < big, next_sibling, -1).int()
    is_child_of = (parent[:, None, :] == nodes[None, :, None]) & child[:, None, :]  # [B, c, i]
    first_child = torch.where(is_child_of, nodes[None, None, :], big).amin(-1)
    first_child = torch.where(first_child < big, first_child, -1).int()
    return first_child, next_sibling, sibling_rank


def tree_paths_ref(parents: Tensor, num_nodes: Tensor) -> tuple[Tensor, Tensor]:
    """Root-to-node paths, for engines that verify or attend path by path.

    Returns:
        paths [B, T, T] int32: row i lists the nodes from the root to node i (root first),
        then -1; all -1 for detached nodes. is_leaf [B, T] bool: attached nodes without
        children (their rows are the root-to-leaf paths).
    """
    mask, depth = tree_metadata_ref(parents, num_nodes)
    num_slots = parents.shape[1]
    nodes = torch.arange(num_slots, device=parents.device)
    # ancestors of i are exactly the j with mask[i, j]; node j sits at column depth[j]
    column = torch.where(mask, depth[:, None, :].long(), num_slots)  # [B, i, j]
    # masked-out j all land in the extra last column, which is dropped
    padded = torch.full(mask.shape[:2] + (num_slots + 1,), -1, dtype=torch.int32,
                        device=parents.device)
    padded.scatter_(-1, column, torch.where(mask, nodes.int()[None, None, :], -1))
    paths = padded[..., :num_slots]
    first_child, _, _ = tree_children_ref(parents, num_nodes)
    is_leaf = (depth >= 0) & (first_child < 0)
    return paths, is_leaf


def _rows_at(rows: Tensor, node: Tensor) -> Tensor:
    """rows[b, node[b]] for node >= 0 (clamped), [B, V] float32."""
    return rows[torch.arange(rows.shape[0], device=rows.device), node.clamp(min=0)].float()


def sibling_residual(r: Tensor, scale: Tensor, q: Tensor) -> Tensor:
    """The residual after a rejected child: ``max(0, r / S - q)``, sanitised as every backend
    reads it. r, q: [B, V] float32; scale: [B] float32. (A function of its own so that the
    losslessness tests can swap in a wrong rule as a negative control.)"""
    return sanitize(r / scale[:, None] - q)


def tree_verify_ref(target_probs: Tensor, tree_tokens: Tensor, parents: Tensor,
                    num_nodes: Tensor, draft_probs: Tensor | None, seeds: Tensor,
                    positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Lossless verification of a token tree per row (recursive rejection across siblings).

    Args:
        target_probs: [B, T, V] float32, row i = target distribution after node i.
        tree_tokens: [B, T] int64 (node 0 holds the root token, unused here).
        parents: [B, T] int32. num_nodes: [B] int32 in ``1..T``.
        draft_probs: [B, T, V] float32 (row 0 unused): the distribution node i's token was
            sampled from; None = deterministic children (one-hot q).
        seeds: [B] int64. positions: [B] int64, the root's absolute position.

    Returns:
        tokens [B, T] int64 (accepted node tokens, the final token, then -1), path [B, T]
        int32 (accepted node indices, then -1), num_accepted [B] int32.
    """
    batch, num_slots, vocab = target_probs.shape
    device = target_probs.device
    rows = torch.arange(batch, device=device)
    first_child, next_sibling, sibling_rank = tree_children_ref(parents, num_nodes)
    _, depth = tree_metadata_ref(parents, num_nodes)

    current = torch.zeros(batch, dtype=torch.long, device=device)
    candidate = first_child[:, 0].long()
    r = target_probs[:, 0].float()
    scale = torch.ones(batch, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    num_accepted = torch.zeros(batch, dtype=torch.int32, device=device)
    path = torch.full((batch, num_slots), -1, dtype=torch.int32, device=device)
    tokens = torch.full((batch, num_slots), -1, dtype=torch.int64, device=device)
    # Each node is tested at most once, so T - 1 tests and one draw end every row's walk.
    for _ in range(num_slots):
        testing = ~done & (candidate >= 0)
        drawing = ~done & (candidate < 0)

        u_draw = uniform(seeds, positions + depth[rows, current].long() + 1, 0, PURPOSE_DRAW)
        final = draw(sanitize(r), u_draw)
        tokens[rows, num_accepted.long()] = torch.where(drawing, final,
                                                        tokens[rows, num_accepted.long()])
        done = done | drawing

        node = candidate.clamp(min=0)
        x = tree_tokens[rows, node]
        valid = (x >= 0) & (x < vocab)
        x_safe = x.clamp(0, vocab - 1)
        if draft_probs is None:
            q = torch.zeros_like(r)
            q[rows, x_safe] = valid.float()
        else:
            q = draft_probs[rows, node].float()
        q_x = torch.where(valid, q[rows, x_safe], 0.0)
        r_x = torch.where(valid, r[rows, x_safe], 0.0)
        u = uniform(seeds, positions + depth[rows, node].long(), sibling_rank[rows, node].long(),
                    PURPOSE_ACCEPT)
        accept = testing & (u * q_x < r_x / scale)
        reject = testing & ~accept

        # accepted: move to the child
        path[rows, num_accepted.long()] = torch.where(accept, node.int(),
                                                      path[rows, num_accepted.long()])
        tokens[rows, num_accepted.long()] = torch.where(accept, x,
                                                        tokens[rows, num_accepted.long()])
        num_accepted = num_accepted + accept.int()
        current = torch.where(accept, node, current)
        # rejected: the residual, renormalised where used; zero mass keeps the previous one
        residual = sibling_residual(r, scale, q)
        mass = residual.double().sum(-1)
        update = reject & (mass > 0)
        r = torch.where(accept[:, None], _rows_at(target_probs, node),
                        torch.where(update[:, None], residual, r))
        scale = torch.where(accept, 1.0, torch.where(update, mass.float(), scale))
        candidate = torch.where(accept, first_child[rows, node].long(),
                                torch.where(reject, next_sibling[rows, node].long(), candidate))
    return tokens, path, num_accepted


def tree_verify_greedy_ref(target_logits: Tensor, tree_tokens: Tensor, parents: Tensor,
                           num_nodes: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Greedy tree verification: at each node take the first child whose token equals the
    node's argmax (first maximal index, NaN largest); then emit that argmax.

    Args:
        target_logits: [B, T, V] float32/bf16/fp16. tree_tokens: [B, T] int64.
        parents: [B, T] int32. num_nodes: [B] int32.

    Returns:
        tokens [B, T] int64, path [B, T] int32, num_accepted [B] int32, as ``tree_verify``.
    """
    batch, num_slots, _ = target_logits.shape
    device = target_logits.device
    rows = torch.arange(batch, device=device)
    first_child, next_sibling, _ = tree_children_ref(parents, num_nodes)
    argmax = target_logits.argmax(-1)
    # is_match[b, i]: node i is attached and its token is its parent's argmax
    parent = _attached_parents(parents, num_nodes)
    is_match = (parent >= 0) & (tree_tokens == argmax[rows[:, None], parent.clamp(min=0)])

    current = torch.zeros(batch, dtype=torch.long, device=device)
    num_accepted = torch.zeros(batch, dtype=torch.int32, device=device)
    done = torch.zeros(batch, dtype=torch.bool, device=device)
    path = torch.full((batch, num_slots), -1, dtype=torch.int32, device=device)
    tokens = torch.full((batch, num_slots), -1, dtype=torch.int64, device=device)
    nodes = torch.arange(num_slots, device=device)
    for _ in range(num_slots):
        children = (parent == current[:, None]) & is_match
        chosen = torch.where(children, nodes, num_slots).amin(-1)
        move = ~done & (chosen < num_slots)
        stop = ~done & ~move
        slot = num_accepted.long()
        tokens[rows, slot] = torch.where(move, tree_tokens[rows, chosen.clamp(max=num_slots - 1)],
                                         torch.where(stop, argmax[rows, current],
                                                     tokens[rows, slot]))
        path[rows, slot] = torch.where(move, chosen.int(), path[rows, slot])
        num_accepted = num_accepted + move.int()
        current = torch.where(move, chosen, current)
        done = done | stop
    return tokens, path, num_accepted
