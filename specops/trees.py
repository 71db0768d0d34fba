"""Building token trees (contract, "Token trees"): index forms, static shapes, dynamic trees.

- Index forms of a tree besides :func:`specops.tree_metadata`'s mask and depth:
  :func:`tree_children` (first-child / next-sibling lists), :func:`tree_paths` (root-to-node
  paths), :func:`pack_tree_mask` / :func:`unpack_tree_mask` (the mask as int32 bit words).
- Static shapes, built once at setup: :func:`chain_parents`, :func:`tree_from_choices`
  (Medusa / EAGLE "choices" lists), and :func:`tokens_from_topk`, which fills such a tree's
  tokens from the drafter's top-k at each node, level by level.
- Dynamic trees: :func:`grow_tree`, EAGLE-2's tree, grown on the device with static shapes.

Children taken from a top-k are *deterministic* (not sampled), so verify trees built here
with ``draft_probs=None``; passing their real draft distributions would be lossy (contract,
``tree_verify``).
"""

from collections.abc import Callable, Sequence
from typing import NamedTuple

import torch
from torch import Tensor

from . import _checks
from .reference.tree import tree_children_ref, tree_paths_ref

# The weight of bit j of an int32 word; bit 31 is the sign bit, so its weight is -2**31 and a
# word's bits sum to it exactly in int32 (no int64 -> int32 wraparound).
_BIT_WEIGHTS = [1 << j for j in range(31)] + [-(1 << 31)]


# ---------------------------------------------------------------------------- index forms

def _checked_num_nodes(op: str, parents: Tensor, num_nodes: Tensor | None) -> Tensor:
    _checks.check_tensor(op, "parents", parents, (torch.int32,), 2)
    if num_nodes is None:
        num_nodes = torch.full((parents.shape[0],), parents.shape[1], dtype=torch.int32,
                               device=parents.device)
    _checks.tree_metadata_meta(parents, num_nodes, op=op)
    if _checks.values_checked(parents.device):
        _checks.tree_values(op, parents, num_nodes)
    return num_nodes


def tree_children(parents: Tensor, num_nodes: Tensor | None = None
                  ) -> tuple[Tensor, Tensor, Tensor]:
    """First-child / next-sibling lists and sibling ranks: the index form a tree walk uses.

    A thin wrapper over :func:`specops.reference.tree_children_ref` (with the argument checks
    of :func:`specops.tree_metadata`); it is the reference, not a fast kernel.

    Args:
        parents: Shape ``(batch_size, T)``, int32, as in :func:`specops.tree_metadata`.
        num_nodes: Shape ``(batch_size,)``, int32 in ``1..T``; nodes past it are ignored.
            ``None`` = all.

    Returns:
        first_child: Shape ``(batch_size, T)``, int32: the lowest-index child, -1 for a leaf.
        next_sibling: Shape ``(batch_size, T)``, int32: the next child of the same parent in
            index order, -1 for the last one (and for the root).
        sibling_rank: Shape ``(batch_size, T)``, int32: rank among the parent's children in
            index order (the order ``tree_verify`` tests them); 0 for the root.
        Nodes past ``num_nodes`` get -1 everywhere.

    >>> first_child, next_sibling, rank = specops.tree_children(
    ...     torch.tensor([[-1, 0, 0, 1]], dtype=torch.int32))
    >>> first_child.tolist(), next_sibling.tolist(), rank.tolist()
    ([[1, 3, -1, -1]], [[-1, 2, -1, -1]], [[0, 0, 1, 0]])
    """
    num_nodes = _checked_num_nodes("tree_children", parents, num_nodes)
    return tree_children_ref(parents, num_nodes)


def tree_paths(parents: Tensor, num_nodes: Tensor | None = None) -> tuple[Tensor, Tensor]:
    """Root-to-node paths, for engines that verify or attend path by path.

    A thin wrapper over :func:`specops.reference.tree_paths_ref` (with the argument checks of
    :func:`specops.tree_metadata`).

    Args:
        parents: Shape ``(batch_size, T)``, int32, as in :func:`specops.tree_metadata`.
        num_nodes: Shape ``(batch_size,)``, int32 in ``1..T``. ``None`` = all.

    Returns:
        paths: Shape ``(batch_size, T, T)``, int32: row ``i`` lists the nodes from the root to
            node ``i`` (root first, node ``i`` at column ``depth[i]``), then -1; all -1 past
            ``num_nodes``.
        is_leaf: Shape ``(batch_size, T)``, bool: nodes without children; their rows of
            ``paths`` are the root-to-leaf paths.

    >>> paths, is_leaf = specops.tree_paths(torch.tensor([[-1, 0, 0, 1]], dtype=torch.int32))
    >>> paths[0]
    tensor([[ 0, -1, -1, -1],
            [ 0,  1, -1, -1],
            [ 0,  2, -1, -1],
            [ 0,  1,  3, -1]], dtype=torch.int32)
    >>> is_leaf
    tensor([[False, False,  True,  True]])
    """
    num_nodes = _checked_num_nodes("tree_paths", parents, num_nodes)
    return tree_paths_ref(parents, num_nodes)


def pack_tree_mask(mask: Tensor) -> Tensor:
    """Bit-packs a tree mask into int32 words, 32 columns per word.

    Bit order: column ``j`` is bit ``j % 32`` (least significant first) of word ``j // 32``,
    i.e. ``mask[b, i, j] == (packed[b, i, j // 32] >> (j % 32)) & 1``. Bit 31 is the sign
    bit, so a word whose column 31 is set is negative. Columns past the mask's last one are 0.

    Args:
        mask: Shape ``(batch_size, T, T)``, bool, e.g. from :func:`specops.tree_metadata`
            (any ``(..., N)`` bool tensor packs the same way along its last dim).

    Returns:
        Shape ``(batch_size, T, ceil(T / 32))``, int32.

    >>> mask = torch.tensor([[[1, 0, 0, 0], [1, 1, 0, 0], [1, 0, 1, 0], [1, 1, 0, 1]]]).bool()
    >>> specops.pack_tree_mask(mask)  # tree [-1, 0, 0, 1]; node 3: columns 0, 1, 3 -> 0b1011
    tensor([[[ 1],
             [ 3],
             [ 5],
             [11]]], dtype=torch.int32)
    """
    _checks.check_tensor("pack_tree_mask", "mask", mask, (torch.bool,), mask.dim())
    if mask.dim() < 1:
        raise ValueError("pack_tree_mask: mask must have at least 1 dim, got a scalar")
    num_cols = mask.shape[-1]
    num_words = -(-num_cols // 32)
    bits = torch.nn.functional.pad(mask.to(torch.int32), (0, num_words * 32 - num_cols))
    bits = bits.unflatten(-1, (num_words, 32))
    weights = torch.tensor(_BIT_WEIGHTS, dtype=torch.int32, device=mask.device)
    return (bits * weights).sum(-1, dtype=torch.int32)


def unpack_tree_mask(packed: Tensor, num_nodes_max: int) -> Tensor:
    """The inverse of :func:`pack_tree_mask`.

    Args:
        packed: Shape ``(batch_size, T, ceil(num_nodes_max / 32))``, int32 (any ``(..., W)``
            works the same way). Bits past column ``num_nodes_max`` are ignored.
        num_nodes_max: the number of mask columns, ``T`` for a tree mask.

    Returns:
        Shape ``(batch_size, T, num_nodes_max)``, bool.

    >>> specops.unpack_tree_mask(torch.tensor([[[11]]], dtype=torch.int32), 4)
    tensor([[[ True,  True, False,  True]]])
    """
    _checks.check_tensor("unpack_tree_mask", "packed", packed, (torch.int32,), packed.dim())
    num_words = -(-num_nodes_max // 32)
    if packed.dim() < 1 or packed.shape[-1] != num_words:
        raise ValueError(f"unpack_tree_mask: packed.shape[-1] must be ceil(num_nodes_max / 32)"
                         f" = {num_words}, got shape {tuple(packed.shape)}")
    shifts = torch.arange(32, dtype=torch.int32, device=packed.device)
    bits = (packed[..., None] >> shifts) & 1  # arithmetic shift; & 1 keeps only bit j
    return bits.flatten(-2)[..., :num_nodes_max].bool()


# ---------------------------------------------------------------------------- static shapes

def chain_parents(num_draft: int, batch: int = 1, device: torch.device | str | None = None
                  ) -> Tensor:
    """A chain as a tree: the root, then ``num_draft`` nodes each the child of the previous.

    Returns:
        parents: Shape ``(batch, num_draft + 1)``, int32: ``[-1, 0, 1, ..., num_draft - 1]``.

    >>> specops.chain_parents(3, batch=2)
    tensor([[-1,  0,  1,  2],
            [-1,  0,  1,  2]], dtype=torch.int32)
    """
    if num_draft < 0 or batch < 0:
        raise ValueError(f"chain_parents: num_draft and batch must be >= 0, got {num_draft}, "
                         f"{batch}")
    row = torch.arange(-1, num_draft, dtype=torch.int32, device=device)
    return row.expand(batch, num_draft + 1).contiguous()


class ChoiceTree(NamedTuple):
    """A static tree built from a choices list by :func:`tree_from_choices`."""

    parents: Tensor  #: [T] int32, -1 for the root
    depth: Tensor  #: [T] int32, root 0, non-decreasing
    rank: Tensor  #: [T] int32, the node's top-k rank among its parent's candidates; -1 root


def tree_from_choices(choices: Sequence[Sequence[int]],
                      device: torch.device | str | None = None) -> ChoiceTree:
    """A static tree from a Medusa / EAGLE "choices" list.

    Each choice is the path of top-k ranks from the root: ``(0,)`` is the root's most likely
    child, ``(1,)`` its second, ``(0, 1)`` the second most likely child of ``(0,)``. Every
    prefix of a choice must be present. Nodes are ordered by (depth, choice), so parents
    precede children and siblings come in rank order (the order ``tree_verify`` tests them).
    Runs once at setup: it loops in Python.

    Args:
        choices: tuples (or lists) of non-negative ints, in any order, no duplicates.
        device: where to put the returned tensors.

    Returns:
        A :class:`ChoiceTree` ``(parents, depth, rank)``, each of shape ``(1 + len(choices),)``
        and int32: ``parents[0] = -1``; ``rank[i]`` is the last entry of node ``i``'s choice
        (-1 for the root), its index in the parent's top-k (see :func:`tokens_from_topk`).
        Expand to ``(batch_size, T)`` with ``parents.expand(batch_size, -1)``.

    Raises:
        ValueError: an empty or non-integer choice, a negative rank, a duplicate, or a choice
            whose prefix is missing.

    >>> parents, depth, rank = specops.tree_from_choices([(1,), (0,), (0, 1), (1, 0), (0, 0)])
    >>> parents.tolist(), depth.tolist(), rank.tolist()
    ([-1, 0, 0, 1, 1, 2], [0, 1, 1, 2, 2, 2], [-1, 0, 1, 0, 1, 0])
    """
    paths = []
    for choice in choices:
        if isinstance(choice, (str, bytes)) or not isinstance(choice, Sequence):
            raise ValueError(f"tree_from_choices: each choice must be a tuple of ranks, got "
                             f"{choice!r}")
        path = tuple(choice)
        if not path:
            raise ValueError("tree_from_choices: the empty choice () is the root, which is "
                             "implicit; leave it out")
        if any(isinstance(r, bool) or not isinstance(r, int) or r < 0 for r in path):
            raise ValueError(f"tree_from_choices: ranks must be ints >= 0, got {choice!r}")
        paths.append(path)
    if len(set(paths)) != len(paths):
        duplicate = next(p for i, p in enumerate(paths) if p in paths[:i])
        raise ValueError(f"tree_from_choices: duplicate choice {duplicate!r}")
    present = set(paths)
    for path in paths:
        for length in range(1, len(path)):
            if path[:length] not in present:
                raise ValueError(f"tree_from_choices: choice {path!r} needs its prefix "
                                 f"{path[:length]!r}, which is missing")
    ordered = sorted(paths, key=lambda p: (len(p), p))
    index = {(): 0} | {p: i + 1 for i, p in enumerate(ordered)}
    parents = [-1] + [index[p[:-1]] for p in ordered]
    depth = [0] + [len(p) for p in ordered]
    rank = [-1] + [p[-1] for p in ordered]

    def as_tensor(values: list[int]) -> Tensor:
        return torch.tensor(values, dtype=torch.int32, device=device)

    return ChoiceTree(as_tensor(parents), as_tensor(depth), as_tensor(rank))


def tokens_from_topk(root_tokens: Tensor, topk_tokens: Tensor, parents: Tensor, rank: Tensor
                     ) -> Tensor:
    """The tokens of a static tree: node ``i`` holds the ``rank[i]``-th token of its parent's
    top-k, ``tree_tokens[b, i] = topk_tokens[b, parents[i], rank[i]]``; node 0 holds the root.

    Intended use, drafting level by level on a tree from :func:`tree_from_choices` (nodes are
    ordered by depth, so each level is a contiguous slice ``lo:hi``, found once at setup):
    keep a ``topk_tokens`` buffer; at each depth ``d``, call this function to get the tokens
    of the level-``d`` nodes (their parents' rows are filled by then), run the drafter on
    them, and write its top-k for those nodes into ``topk_tokens[:, lo:hi]``. After the last
    level one more call gives the whole tree. Nodes whose parent is not expanded yet get
    stale tokens, which the loop never reads. No sync, static shapes; values (parents, ranks
    in ``0..k-1``) are checked only where the check level reads values (on the CPU).

    The children are deterministic (top-k, not sampled): verify with ``draft_probs=None``.

    Args:
        root_tokens: Shape ``(batch_size,)``, int64: the root (last committed) token.
        topk_tokens: Shape ``(batch_size, T, k)``, int64: row ``j`` is the drafter's top-k
            token ids after node ``j``, most likely first; ``k > max(rank)``.
        parents: Shape ``(T,)`` or ``(batch_size, T)``, int32, e.g. from
            :func:`tree_from_choices`.
        rank: Shape ``(T,)`` or ``(batch_size, T)``, int32 in ``0..k-1`` (entry 0 unused).

    Returns:
        tree_tokens: Shape ``(batch_size, T)``, int64.

    >>> parents, depth, rank = specops.tree_from_choices([(0,), (1,), (0, 0), (0, 1), (1, 0)])
    >>> table = torch.tensor([[0.0, -1, -2], [-2, 0, -1], [-1, -2, 0]])  # toy drafter's logp
    >>> levels = [(0, 1), (1, 3)]  # nodes at depth 0 and 1, from depth at setup
    >>> root = torch.tensor([2])
    >>> topk = torch.zeros(1, 6, 2, dtype=torch.long)
    >>> for lo, hi in levels:
    ...     level_tokens = specops.tokens_from_topk(root, topk, parents, rank)[:, lo:hi]
    ...     topk[:, lo:hi] = table[level_tokens].topk(2, dim=-1).indices
    >>> specops.tokens_from_topk(root, topk, parents, rank)
    tensor([[2, 2, 0, 2, 0, 0]])
    """
    op = "tokens_from_topk"
    _checks.check_tensor(op, "root_tokens", root_tokens, (torch.int64,), 1)
    _checks.check_tensor(op, "topk_tokens", topk_tokens, (torch.int64,), 3)
    batch, num_slots, _ = topk_tokens.shape
    _checks.check_size(op, "root_tokens", root_tokens, 0, batch, "B")
    for name, t in (("parents", parents), ("rank", rank)):
        _checks.check_tensor(op, name, t, (torch.int32,), t.dim())
        if t.shape not in ((num_slots,), (batch, num_slots)):
            raise ValueError(f"{op}: {name} must have shape (T,) or (B, T) = "
                             f"{(batch, num_slots)}, got {tuple(t.shape)}")
    _checks.check_same_device(op, topk_tokens, root_tokens=root_tokens, parents=parents,
                              rank=rank)
    k = topk_tokens.shape[2]
    if _checks.values_checked(topk_tokens.device):
        full = torch.full((batch,), num_slots, dtype=torch.int32, device=parents.device)
        _checks.tree_values(op, parents.expand(batch, num_slots), full)
        bad = (rank[..., 1:] < 0) | (rank[..., 1:] >= k)
        if bool(bad.any()):
            raise ValueError(f"{op}: rank must be in 0..k-1={k - 1} for nodes 1..T-1, got "
                             f"{int(rank[..., 1:][bad][0])}")
    flat = topk_tokens.flatten(1)  # [B, T * k]: row j's rank r at j * k + r
    index = parents.long().clamp(min=0) * k + rank.long().clamp(min=0)
    tokens = flat.gather(1, index.expand(batch, num_slots))
    is_root = torch.arange(num_slots, device=topk_tokens.device) == 0
    return torch.where(is_root, root_tokens[:, None], tokens)


# ---------------------------------------------------------------------------- dynamic trees

DraftStep = Callable[[Tensor, Tensor, int], Tensor]


def grow_tree(draft_step: DraftStep, root_tokens: Tensor, depth: int, top_k: int,
              num_nodes: int) -> tuple[Tensor, Tensor, Tensor, Tensor]:
    """Grows an EAGLE-2 dynamic draft tree on the device: sync-free, static shapes.

    EAGLE-2 (Li et al. 2024, https://arxiv.org/abs/2406.16858). A candidate's score is its
    path's cumulative draft log-probability. Starting from the root, each round expands
    every frontier node into its ``top_k`` most likely tokens; the ``top_k`` best new
    candidates form the next frontier. All candidates of all rounds form a pool, of which the
    ``num_nodes - 1`` best (plus the root) are kept, re-indexed in (depth, creation) order.
    Scores never increase along a path (log-probs are clamped to ``<= 0``, NaN counts as
    ``-inf``) and ties go to the earlier-created candidate, so a kept node's parent is
    always kept. Ties between the token log-probs of one node are broken as
    :func:`torch.topk` breaks them.

    ``draft_step(tokens, parent_index, depth)`` runs the draft model on the frontier and is
    called ``depth`` times, with ``depth = 0, 1, ..., depth - 1``:

    - ``tokens``: Shape ``(batch_size, F)``, int64: the frontier, the nodes to expand, all
      at tree depth ``depth`` (position ``positions[b] + depth``). ``F = 1`` (the root) at
      depth 0, then ``F = top_k``, best score first.
    - ``parent_index``: Shape ``(batch_size, F)``, int64: each frontier node's parent, as an
      index into the sequence of all tokens passed to ``draft_step`` so far in this call
      (the root is 0; the ``f``-th token of the call at depth ``d >= 1`` is
      ``1 + (d - 1) * top_k + f``); -1 for the root. Every frontier node's parent was
      itself passed before, so a caller that appends each call's keys and values to its
      draft cache finds the parent's entry at ``cache_len + parent_index``, and the node's
      attention row is its parent's row plus itself. Parents always come from the previous
      call, so ``parent_index`` minus that call's first index is the parent's column there.
    - returns: Shape ``(batch_size, F, vocab_size)``, any float dtype: log-probabilities of
      the next token after each frontier node (``vocab_size >= top_k``).

    With ``depth >= 1`` the pool holds ``1 + top_k + (depth - 1) * top_k**2`` nodes, the
    most ``num_nodes`` may be. The children are deterministic (top-k, not sampled): verify
    with ``draft_probs=None``. Runs under ``torch.compile(fullgraph=True)`` when
    ``draft_step`` does.

    Args:
        draft_step: the callback above.
        root_tokens: Shape ``(batch_size,)``, int64: the root (last committed) token per row.
        depth: rounds of expansion (the tree's maximum depth), ``>= 0``.
        top_k: children per expanded node and frontier width, ``>= 1``.
        num_nodes: nodes per tree, root included, in ``1..pool size``.

    Returns:
        tree_tokens: Shape ``(batch_size, num_nodes)``, int64; column 0 is the root token.
        parents: Shape ``(batch_size, num_nodes)``, int32, topological (``parents[b, i] < i``).
        num_nodes_per_row: Shape ``(batch_size,)``, int32, all ``num_nodes``.
        scores: Shape ``(batch_size, num_nodes)``, float32: each node's cumulative draft
            log-prob, root 0.

    >>> table = torch.tensor([[-0.1, -2.5, -3.0], [-1.5, -0.3, -3.0], [-0.6, -0.9, -9.0]])
    >>> draft_step = lambda tokens, parent_index, depth: table[tokens]  # logp by last token
    >>> tokens, parents, num_nodes, scores = specops.grow_tree(
    ...     draft_step, torch.tensor([2]), depth=3, top_k=2, num_nodes=5)
    >>> tokens, parents
    (tensor([[2, 0, 1, 0, 0]]), tensor([[-1,  0,  0,  1,  3]], dtype=torch.int32))
    >>> scores  # 2 -> 0 -> 0 -> 0 (-0.8) outranks 2 -> 1 -> 1 (-1.2)
    tensor([[ 0.0000, -0.6000, -0.9000, -0.7000, -0.8000]])
    """
    op = "grow_tree"
    _checks.check_tensor(op, "root_tokens", root_tokens, (torch.int64,), 1)
    if depth < 0 or top_k < 1:
        raise ValueError(f"{op}: depth must be >= 0 and top_k >= 1, got {depth}, {top_k}")
    pool_size = 1 + (top_k + (depth - 1) * top_k * top_k if depth >= 1 else 0)
    if not 1 <= num_nodes <= pool_size:
        raise ValueError(f"{op}: num_nodes must be in 1..{pool_size} (1 + top_k + (depth - 1)"
                         f" * top_k**2 candidates), got {num_nodes}")
    batch = root_tokens.shape[0]
    device = root_tokens.device

    # The frontier: tokens, scores, pool indices, and parents as draft_step sees them.
    frontier_tokens = root_tokens[:, None]
    frontier_scores = torch.zeros(batch, 1, dtype=torch.float32, device=device)
    frontier_node = torch.zeros(batch, 1, dtype=torch.long, device=device)
    parent_index = torch.full((batch, 1), -1, dtype=torch.long, device=device)
    # The pool, in creation order: root, then each round's candidates (parent-major, rank
    # order). Parents are created before their children, so creation order is topological.
    pool_tokens, pool_parents, pool_scores = [frontier_tokens], [parent_index], [frontier_scores]
    num_pooled = 1
    first_fed = 0  # index of this call's first token among all tokens passed to draft_step
    for d in range(depth):
        width = frontier_tokens.shape[1]
        logp = draft_step(frontier_tokens, parent_index, d)
        if logp.dim() != 3 or logp.shape[:2] != (batch, width) or logp.shape[2] < top_k:
            raise ValueError(f"{op}: draft_step at depth {d} must return [B, F, V] = "
                             f"[{batch}, {width}, >= {top_k}], got {tuple(logp.shape)}")
        logp = logp.float()
        logp = torch.where(logp.isnan(), float("-inf"), logp.clamp(max=0.0))
        top_logp, top_tokens = logp.topk(top_k, dim=-1)  # [B, F, k], most likely first
        scores = (frontier_scores[:, :, None] + top_logp).flatten(1)  # [B, F * k]
        pool_tokens.append(top_tokens.flatten(1))
        pool_parents.append(frontier_node[:, :, None].expand(-1, -1, top_k).flatten(1))
        pool_scores.append(scores)
        if d + 1 < depth:
            # stable: equal scores keep creation order, like the final selection below
            best = scores.sort(dim=1, descending=True, stable=True).indices[:, :top_k]
            frontier_tokens = pool_tokens[-1].gather(1, best)
            frontier_scores = scores.gather(1, best)
            frontier_node = num_pooled + best
            # the parent is this call's frontier node best // top_k
            parent_index = first_fed + best // top_k
        first_fed += width
        num_pooled += width * top_k

    tokens = torch.cat(pool_tokens, 1)  # [B, P]
    parents = torch.cat(pool_parents, 1)
    scores = torch.cat(pool_scores, 1)
    # Keep the root and the num_nodes - 1 best candidates; among equal scores the earlier
    # (an ancestor before its descendants), so the kept set is closed under parents.
    best = scores[:, 1:].sort(dim=1, descending=True, stable=True).indices[:, :num_nodes - 1]
    kept = torch.cat([torch.zeros(batch, 1, dtype=torch.long, device=device),
                      (best + 1).sort(dim=1).values], 1)  # [B, N] pool indices, topological
    new_index = torch.full_like(parents, -1).scatter(
        1, kept, torch.arange(num_nodes, device=device).expand(batch, num_nodes))
    kept_parents = parents.gather(1, kept)
    new_parents = torch.where(kept_parents >= 0,
                              new_index.gather(1, kept_parents.clamp(min=0)), -1)
    num_nodes_per_row = torch.full((batch,), num_nodes, dtype=torch.int32, device=device)
    return (tokens.gather(1, kept), new_parents.int(), num_nodes_per_row,
            scores.gather(1, kept))


def keep_best_nodes(tree_tokens: Tensor, parents: Tensor, scores: Tensor, num_nodes: int
                    ) -> tuple[Tensor, Tensor, Tensor]:
    """The subtree of the ``num_nodes`` best-scored nodes of each row (root included), in the
    original node order: how a cost-aware loop verifies a smaller part of a grown tree.

    The kept set is closed under ancestors when scores never increase along a path, as
    :func:`grow_tree`'s cumulative log-probs do: nodes are ranked by score, ties to the
    smaller index (a parent precedes its children), so a node is never kept without its
    parent. Sync-free, static shapes.

    Args:
        tree_tokens: Shape ``(batch_size, T)``, int64, node 0 the root.
        parents: Shape ``(batch_size, T)``, int32, topological, ``parents[:, 0] == -1``.
        scores: Shape ``(batch_size, T)``, float: per node, non-increasing along paths.
        num_nodes: Nodes to keep per row, in ``1..T``.

    Returns:
        ``(tree_tokens, parents, scores)`` of shape ``(batch_size, num_nodes)``, parents
        re-indexed into the kept nodes (int32, root -1).

    >>> tokens = torch.tensor([[7, 8, 9, 10]])
    >>> parents = torch.tensor([[-1, 0, 0, 1]], dtype=torch.int32)
    >>> scores = torch.tensor([[0.0, -0.1, -2.0, -0.5]])
    >>> keep_best_nodes(tokens, parents, scores, 3)[:2]
    (tensor([[ 7,  8, 10]]), tensor([[-1,  0,  1]], dtype=torch.int32))
    """
    batch, total = tree_tokens.shape
    if not 1 <= num_nodes <= total:
        raise ValueError(f"keep_best_nodes: num_nodes must be in 1..{total}, got {num_nodes}")
    if parents.shape != tree_tokens.shape or scores.shape != tree_tokens.shape:
        raise ValueError(f"keep_best_nodes: tree_tokens {tuple(tree_tokens.shape)}, parents "
                         f"{tuple(parents.shape)} and scores {tuple(scores.shape)} must match")
    ranked = torch.sort(-scores.float(), dim=1, stable=True).indices   # best first, ties: index
    kept = ranked[:, :num_nodes].sort(dim=1).values                    # original order
    new_index = torch.full((batch, total), -1, dtype=torch.int64, device=tree_tokens.device)
    new_index.scatter_(1, kept, torch.arange(num_nodes, device=tree_tokens.device)
                       .expand(batch, -1).contiguous())
    old_parents = parents.long().gather(1, kept)
    new_parents = torch.where(old_parents < 0, old_parents,
                              new_index.gather(1, old_parents.clamp(min=0)))
    return tree_tokens.gather(1, kept), new_parents.int(), scores.gather(1, kept)
