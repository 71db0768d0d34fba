"""Public token-tree ops (contract, "Token trees"): ``tree_metadata``, ``tree_verify``,
``tree_verify_greedy``. Same dispatch as :mod:`specops.ops`: ``torch.ops.specops.*`` kernels,
or the reference when selected with ``specops.set_backend("reference")``.
"""

import torch
from torch import Tensor

from . import _checks, ops
from .reference.tree import tree_metadata_ref, tree_verify_greedy_ref, tree_verify_ref


def _full_num_nodes(num_nodes: Tensor | None, parents: Tensor) -> Tensor:
    if num_nodes is not None:
        return num_nodes
    batch, num_slots = parents.shape
    return torch.full((batch,), num_slots, dtype=torch.int32, device=parents.device)


def tree_metadata(parents: Tensor, num_nodes: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Ancestor-or-self mask and depth of every node of a token tree.

    Args:
        parents: Shape ``(batch_size, num_nodes_max)``, int32. ``parents[:, 0] = -1`` (node 0
            is the root, the last committed token) and ``0 <= parents[b, i] < i``.
        num_nodes: Shape ``(batch_size,)``, int32 in ``1..num_nodes_max``; nodes past it are
            ignored. ``None`` = all.

    Returns:
        mask: Shape ``(batch_size, T, T)``, bool: ``mask[b, i, j]`` iff node ``j`` is node
            ``i`` or an ancestor of it (False rows for nodes past ``num_nodes``).
        depth: Shape ``(batch_size, T)``, int32: root 0, ``-1`` past ``num_nodes``. Node ``i``
            sits at position ``positions[b] + depth[b, i]``.

    With checks off, a node whose parent is out of range is detached like a node past
    ``num_nodes`` (depth -1, all-False row), and so are its descendants.

    >>> mask, depth = specops.tree_metadata(torch.tensor([[-1, 0, 0, 1]], dtype=torch.int32))
    >>> depth
    tensor([[0, 1, 1, 2]], dtype=torch.int32)
    >>> mask[0, 3].tolist()
    [True, True, False, True]
    """
    _checks.check_tensor("tree_metadata", "parents", parents, (torch.int32,), 2)
    num_nodes = _full_num_nodes(num_nodes, parents)
    _checks.tree_metadata_meta(parents, num_nodes)
    if ops.get_backend() == "reference":
        if _checks.values_checked(parents.device):
            _checks.tree_values("tree_metadata", parents, num_nodes)
        return tree_metadata_ref(parents, num_nodes)
    return torch.ops.specops.tree_metadata(parents, num_nodes)


def tree_verify(target_probs: Tensor, tree_tokens: Tensor, parents: Tensor,
                num_nodes: Tensor | None = None, draft_probs: Tensor | None = None, *,
                seeds: Tensor, positions: Tensor) -> tuple[Tensor, Tensor, Tensor]:
    """Lossless verification of a token tree per row: recursive rejection sampling across
    siblings (SpecInfer, Miao et al. 2024, https://arxiv.org/abs/2305.09781; SpecTr, Sun et
    al. 2023, https://arxiv.org/abs/2310.15141), with the residual carried from sibling to
    sibling.

    From the root, the children of the current node are tested in index order: child ``i``
    with token ``x`` is accepted iff ``u * q_i(x) < r(x)`` with ``r`` the current residual
    (``p`` of the node at first, then ``max(0, r - q_i)`` after each rejected sibling,
    renormalised). The walk moves to an accepted child; when all children are rejected, or
    at a leaf, the final token is drawn from ``r``. On a chain this gives exactly
    :func:`specops.chain_verify`'s tokens for the same seeds.

    Lossless for children drawn *independently* from their ``q_i`` (with replacement:
    duplicate tokens stay separate nodes) or for *deterministic* children
    (``draft_probs=None``, e.g. top-k expansions). Children drawn without replacement with
    their real ``q`` are lossy: pass them as deterministic instead.

    Args:
        target_probs: Shape ``(batch_size, T, vocab_size)``, float32: row ``i`` is the target
            distribution after node ``i``.
        tree_tokens: Shape ``(batch_size, T)``, int64; node 0 holds the root token (unused).
        parents: Shape ``(batch_size, T)``, int32, as in :func:`tree_metadata`.
        num_nodes: Shape ``(batch_size,)``, int32 in ``1..T``. ``None`` = all.
        draft_probs: Shape ``(batch_size, T, vocab_size)``, float32; row ``i`` is the
            distribution node ``i``'s token was sampled from (row 0 unused). ``None`` =
            deterministic children (one-hot ``q``).
        seeds: Shape ``(batch_size,)``, int64. positions: Shape ``(batch_size,)``, int64, the
            root's absolute position; a node at depth ``d`` sits at ``positions + d``.

    Returns:
        tokens: Shape ``(batch_size, T)``, int64: accepted node tokens, the final token, -1.
        path: Shape ``(batch_size, T)``, int32: accepted node indices (all >= 1), then -1.
        num_accepted: Shape ``(batch_size,)``, int32.

    >>> probs = torch.tensor([[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    >>> parents = torch.tensor([[-1, 0, 0]], dtype=torch.int32)
    >>> specops.tree_verify(probs, torch.tensor([[0, 1, 2]]), parents,
    ...                     seeds=torch.tensor([0]), positions=torch.tensor([3]))
    (tensor([[ 2,  1, -1]]), tensor([[ 2, -1, -1]], dtype=torch.int32), tensor([1], dtype=torch.int32))
    """
    _checks.check_tensor("tree_verify", "parents", parents, (torch.int32,), 2)
    num_nodes = _full_num_nodes(num_nodes, parents)
    args = (target_probs, tree_tokens, parents, num_nodes, draft_probs, seeds, positions)
    _checks.tree_verify_meta(*args)
    if ops.get_backend() == "reference":
        if _checks.values_checked(target_probs.device):
            _checks.tree_verify_values(target_probs, tree_tokens, parents, num_nodes,
                                       draft_probs, positions)
        return tree_verify_ref(*args)
    return torch.ops.specops.tree_verify(*args)


def tree_verify_greedy(target_logits: Tensor, tree_tokens: Tensor, parents: Tensor,
                       num_nodes: Tensor | None = None) -> tuple[Tensor, Tensor, Tensor]:
    """Greedy tree verification on raw logits: at each node take the first child (in index
    order) whose token equals the node's argmax; emit the argmax where no child matches.

    Args:
        target_logits: Shape ``(batch_size, T, vocab_size)``, float32, bfloat16 or float16.
        tree_tokens: Shape ``(batch_size, T)``, int64. parents: ``(batch_size, T)``, int32.
        num_nodes: Shape ``(batch_size,)``, int32. ``None`` = all.

    Returns:
        tokens, path, num_accepted as :func:`tree_verify`; equal to it on one-hot rows.

    >>> logits = torch.tensor([[[0.0, 0.0, 9.0], [9.0, 0.0, 0.0], [0.0, 9.0, 0.0]]])
    >>> parents = torch.tensor([[-1, 0, 0]], dtype=torch.int32)
    >>> specops.tree_verify_greedy(logits, torch.tensor([[0, 1, 2]]), parents)
    (tensor([[ 2,  1, -1]]), tensor([[ 2, -1, -1]], dtype=torch.int32), tensor([1], dtype=torch.int32))
    """
    _checks.check_tensor("tree_verify_greedy", "parents", parents, (torch.int32,), 2)
    num_nodes = _full_num_nodes(num_nodes, parents)
    args = (target_logits, tree_tokens, parents, num_nodes)
    _checks.tree_verify_greedy_meta(*args)
    if ops.get_backend() == "reference":
        if _checks.values_checked(target_logits.device):
            _checks.tree_verify_greedy_values(*args)
        return tree_verify_greedy_ref(*args)
    return torch.ops.specops.tree_verify_greedy(*args)
