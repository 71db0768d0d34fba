"""Argument checks shared by the public functions, the fake kernels and the GPU launchers.

Levels (contract, "Bad input"): dtype/shape/device are checked at every level (they cost no
sync); ``"cheap"`` (default) adds token ids, lengths and positions on the CPU; ``"full"`` adds
probability rows (NaN, inf, negative, zero sum) and, on GPUs, is the only level that checks
values at all, since reading values there needs a host sync. The C++ CPU kernels check the
same things with the same messages (csrc/checks.h).
"""

import os
from collections.abc import Iterator, Sequence
from contextlib import contextmanager

import torch
from torch import Tensor

LEVELS = ("off", "cheap", "full")
_level = "cheap"
_capturing = False   # a device graph is being captured: no value checks

FLOAT_LOGITS = (torch.float32, torch.bfloat16, torch.float16)


def check_level() -> str:
    return _level


def set_level(level: str) -> None:
    global _level
    if level not in LEVELS:
        raise ValueError(f"check level must be one of {LEVELS}, got {level!r}")
    _level = level


def level_from_env() -> str:
    return os.environ.get("SPECOPS_CHECKS", "cheap")


def values_checked(device: torch.device) -> bool:
    """Whether values are checked on ``device`` at the current level (never during a
    device-graph capture)."""
    if _capturing:
        return False
    return _level == "full" or (_level == "cheap" and device.type == "cpu")


@contextmanager
def graph_capture() -> Iterator[None]:
    """Value checks off while a device graph captures (:mod:`specops.graphs`): a check reads
    values on the host, which a capture cannot do (CUDA raises on the sync) and a replay would
    not repeat. The eager warm-up calls before a capture are checked as usual."""
    global _capturing
    saved, _capturing = _capturing, True
    try:
        yield
    finally:
        _capturing = saved


# ---- dtype, shape, device: every level, no sync ----

def check_tensor(op: str, name: str, t, dtypes: Sequence[torch.dtype], dim: int) -> None:
    if not isinstance(t, Tensor):
        raise TypeError(f"{op}: {name} must be a torch.Tensor, got {type(t).__name__}")
    if t.dtype not in dtypes:
        wanted = " or ".join(str(d).removeprefix("torch.") for d in dtypes)
        raise TypeError(f"{op}: {name} must be {wanted}, got {str(t.dtype).removeprefix('torch.')}")
    if t.dim() != dim:
        raise ValueError(f"{op}: {name} must have {dim} dims, got shape {tuple(t.shape)}")


def check_size(op: str, name: str, t: Tensor, dim: int, expected: int, what: str) -> None:
    if t.shape[dim] != expected:
        raise ValueError(f"{op}: {name}.shape[{dim}] must be {expected} ({what}), "
                         f"got shape {tuple(t.shape)}")


def check_same_device(op: str, reference: Tensor, **tensors: Tensor | None) -> None:
    for name, t in tensors.items():
        if t is not None and t.device != reference.device:
            raise ValueError(f"{op}: {name} is on {t.device}, expected {reference.device} "
                             f"like the other arguments")


def chain_verify_meta(target_probs, draft_tokens, draft_probs, draft_lens, seeds, positions):
    op = "chain_verify"
    batch, num_rows, vocab = _check_rows_and_drafts(op, "target_probs", target_probs,
                                                    (torch.float32,), draft_tokens)
    if draft_probs is not None:
        check_tensor(op, "draft_probs", draft_probs, (torch.float32,), 3)
        check_size(op, "draft_probs", draft_probs, 0, batch, "B")
        check_size(op, "draft_probs", draft_probs, 1, num_rows - 1, "K")
        check_size(op, "draft_probs", draft_probs, 2, vocab, "V")
    _check_row_vectors(op, batch, draft_lens=(draft_lens, torch.int32),
                       seeds=(seeds, torch.int64), positions=(positions, torch.int64))
    check_same_device(op, target_probs, draft_tokens=draft_tokens, draft_probs=draft_probs,
                      draft_lens=draft_lens, seeds=seeds, positions=positions)


def chain_verify_greedy_meta(target_logits, draft_tokens, draft_lens):
    op = "chain_verify_greedy"
    batch, _, _ = _check_rows_and_drafts(op, "target_logits", target_logits, FLOAT_LOGITS,
                                         draft_tokens)
    _check_row_vectors(op, batch, draft_lens=(draft_lens, torch.int32))
    check_same_device(op, target_logits, draft_tokens=draft_tokens, draft_lens=draft_lens)


def tree_metadata_meta(parents, num_nodes, op="tree_metadata"):
    check_tensor(op, "parents", parents, (torch.int32,), 2)
    if parents.shape[1] < 1:
        raise ValueError(f"{op}: parents must be [B, T] with T >= 1 (node 0 is the root), "
                         f"got shape {tuple(parents.shape)}")
    _check_row_vectors(op, parents.shape[0], num_nodes=(num_nodes, torch.int32))
    check_same_device(op, parents, num_nodes=num_nodes)


def _tree_meta(op, rows_name, rows, dtypes, tree_tokens, parents, num_nodes):
    check_tensor(op, rows_name, rows, dtypes, 3)
    batch, num_slots, vocab = rows.shape
    if num_slots < 1 or vocab < 1:
        raise ValueError(f"{op}: {rows_name} must be [B, T, V] with T >= 1 and V >= 1, "
                         f"got shape {tuple(rows.shape)}")
    check_tensor(op, "tree_tokens", tree_tokens, (torch.int64,), 2)
    check_tensor(op, "parents", parents, (torch.int32,), 2)
    for name, t in (("tree_tokens", tree_tokens), ("parents", parents)):
        check_size(op, name, t, 0, batch, "B")
        check_size(op, name, t, 1, num_slots, "T")
    _check_row_vectors(op, batch, num_nodes=(num_nodes, torch.int32))
    check_same_device(op, rows, tree_tokens=tree_tokens, parents=parents, num_nodes=num_nodes)
    return batch, num_slots, vocab


def tree_verify_meta(target_probs, tree_tokens, parents, num_nodes, draft_probs, seeds,
                     positions):
    op = "tree_verify"
    batch, num_slots, vocab = _tree_meta(op, "target_probs", target_probs, (torch.float32,),
                                         tree_tokens, parents, num_nodes)
    if draft_probs is not None:
        check_tensor(op, "draft_probs", draft_probs, (torch.float32,), 3)
        for dim, (size, what) in enumerate(((batch, "B"), (num_slots, "T"), (vocab, "V"))):
            check_size(op, "draft_probs", draft_probs, dim, size, what)
    _check_row_vectors(op, batch, seeds=(seeds, torch.int64), positions=(positions, torch.int64))
    check_same_device(op, target_probs, draft_probs=draft_probs, seeds=seeds,
                      positions=positions)


def tree_verify_greedy_meta(target_logits, tree_tokens, parents, num_nodes):
    _tree_meta("tree_verify_greedy", "target_logits", target_logits, FLOAT_LOGITS, tree_tokens,
               parents, num_nodes)


def sampling_probs_meta(logits, temperature, top_k, top_p):
    op = "sampling_probs"
    check_tensor(op, "logits", logits, FLOAT_LOGITS, 2)
    if logits.shape[1] < 1:
        raise ValueError(f"{op}: logits must have V >= 1, got shape {tuple(logits.shape)}")
    _check_row_vectors(op, logits.shape[0], temperature=(temperature, torch.float32),
                       top_k=(top_k, torch.int32), top_p=(top_p, torch.float32))
    check_same_device(op, logits, temperature=temperature, top_k=top_k, top_p=top_p)


def _check_rows_and_drafts(op: str, name: str, rows: Tensor, dtypes: Sequence[torch.dtype],
                           draft_tokens: Tensor) -> tuple[int, int, int]:
    """``rows [B, K+1, V]`` and ``draft_tokens [B, K]``; returns ``(B, K+1, V)``."""
    check_tensor(op, name, rows, dtypes, 3)
    batch, num_rows, vocab = rows.shape
    if num_rows < 1 or vocab < 1:
        raise ValueError(f"{op}: {name} must be [B, K+1, V] with K+1 >= 1 and V >= 1, "
                         f"got shape {tuple(rows.shape)}")
    check_tensor(op, "draft_tokens", draft_tokens, (torch.int64,), 2)
    check_size(op, "draft_tokens", draft_tokens, 0, batch, "B")
    check_size(op, "draft_tokens", draft_tokens, 1, num_rows - 1, "K")
    return batch, num_rows, vocab


def _check_row_vectors(op: str, batch: int, **vectors: tuple[Tensor, torch.dtype]) -> None:
    for name, (t, dtype) in vectors.items():
        check_tensor(op, name, t, (dtype,), 1)
        check_size(op, name, t, 0, batch, "B")


# ---- values: read tensors, so they run only where values_checked() says ----

def _first_bad_row(bad: Tensor, row_offset: int = 0) -> str:
    """``"row b, j"`` of the first True; ``row_offset`` is added to the last index."""
    index = bad.nonzero()[0].tolist()
    index[-1] += row_offset
    return "row " + ", ".join(str(i) for i in index)


def _check_lens(op: str, draft_lens: Tensor, num_slots: int) -> None:
    bad = (draft_lens < 0) | (draft_lens > num_slots)
    if bool(bad.any()):
        raise ValueError(f"{op}: draft_lens must be in 0..K={num_slots}, got "
                         f"{int(draft_lens[bad][0])} at {_first_bad_row(bad)}")


def _check_tokens(op: str, draft_tokens: Tensor, draft_lens: Tensor, vocab: int) -> None:
    active = torch.arange(draft_tokens.shape[1], device=draft_tokens.device) < draft_lens[:, None]
    bad = active & ((draft_tokens < 0) | (draft_tokens >= vocab))
    if bool(bad.any()):
        raise ValueError(f"{op}: draft_tokens must be in 0..V-1={vocab - 1} within draft_lens, "
                         f"got {int(draft_tokens[bad][0])} at {_first_bad_row(bad)}")


def _check_prob_rows(op: str, name: str, probs: Tensor, num_rows_used: Tensor,
                     row_offset: int = 0) -> None:
    used = torch.arange(probs.shape[1], device=probs.device) < num_rows_used[:, None]
    finite = torch.isfinite(probs)
    bad_values = (~finite | (probs < 0)).any(-1)
    zero_sum = torch.where(finite, probs, 0).double().sum(-1) <= 0
    bad = used & (bad_values | zero_sum)
    if bool(bad.any()):
        raise ValueError(f"{op}: {name} has a row with NaN, inf, a negative entry or zero sum "
                         f"at {_first_bad_row(bad, row_offset)}")


def chain_verify_values(target_probs, draft_tokens, draft_probs, draft_lens, positions):
    op = "chain_verify"
    num_slots = draft_tokens.shape[1]
    _check_lens(op, draft_lens, num_slots)
    _check_tokens(op, draft_tokens, draft_lens, target_probs.shape[-1])
    if bool((positions < 0).any()):
        raise ValueError(f"{op}: positions must be >= 0, got {int(positions.min())}")
    if _level == "full":
        _check_prob_rows(op, "target_probs", target_probs, draft_lens + 1)
        if draft_probs is not None:
            _check_prob_rows(op, "draft_probs", draft_probs, draft_lens)


def chain_verify_greedy_values(target_logits, draft_tokens, draft_lens):
    op = "chain_verify_greedy"
    _check_lens(op, draft_lens, draft_tokens.shape[1])
    _check_tokens(op, draft_tokens, draft_lens, target_logits.shape[-1])
    if _level == "full":
        used = torch.arange(target_logits.shape[1], device=target_logits.device) <= draft_lens[:, None]
        bad = used & target_logits.isnan().any(-1)
        if bool(bad.any()):
            raise ValueError(f"{op}: target_logits has NaN at {_first_bad_row(bad)}")


def tree_values(op, parents, num_nodes, tree_tokens=None, vocab=None):
    """num_nodes in 1..T; parents[:, 0] = -1 and 0 <= parents[b, i] < i for 1 <= i < num_nodes
    (this rules out cycles); tokens of nodes 1..num_nodes-1 in 0..V-1."""
    num_slots = parents.shape[1]
    bad = (num_nodes < 1) | (num_nodes > num_slots)
    if bool(bad.any()):
        raise ValueError(f"{op}: num_nodes must be in 1..T={num_slots}, got "
                         f"{int(num_nodes[bad][0])} at {_first_bad_row(bad)}")
    if bool((parents[:, 0] != -1).any()):
        bad = parents[:, 0] != -1
        raise ValueError(f"{op}: parents[:, 0] must be -1 (node 0 is the root), got "
                         f"{int(parents[bad][0, 0])} at {_first_bad_row(bad)}")
    nodes = torch.arange(num_slots, device=parents.device)
    used = (nodes >= 1) & (nodes < num_nodes[:, None])
    bad = used & ((parents < 0) | (parents >= nodes))
    if bool(bad.any()):
        raise ValueError(f"{op}: parents must satisfy 0 <= parents[b, i] < i (topological "
                         f"order, no cycles), got {int(parents[bad][0])} at {_first_bad_row(bad)}")
    if tree_tokens is not None:
        bad = used & ((tree_tokens < 0) | (tree_tokens >= vocab))
        if bool(bad.any()):
            raise ValueError(f"{op}: tree_tokens must be in 0..V-1={vocab - 1} for nodes "
                             f"1..num_nodes-1, got {int(tree_tokens[bad][0])} at "
                             f"{_first_bad_row(bad)}")


def tree_verify_values(target_probs, tree_tokens, parents, num_nodes, draft_probs, positions):
    op = "tree_verify"
    tree_values(op, parents, num_nodes, tree_tokens, target_probs.shape[-1])
    if bool((positions < 0).any()):
        raise ValueError(f"{op}: positions must be >= 0, got {int(positions.min())}")
    if _level == "full":
        _check_prob_rows(op, "target_probs", target_probs, num_nodes)
        if draft_probs is not None:  # row 0 is unused
            _check_prob_rows(op, "draft_probs", draft_probs[:, 1:], num_nodes - 1, row_offset=1)


def tree_verify_greedy_values(target_logits, tree_tokens, parents, num_nodes):
    op = "tree_verify_greedy"
    tree_values(op, parents, num_nodes, tree_tokens, target_logits.shape[-1])
    if _level == "full":
        used = torch.arange(target_logits.shape[1], device=target_logits.device) < num_nodes[:, None]
        bad = used & target_logits.isnan().any(-1)
        if bool(bad.any()):
            raise ValueError(f"{op}: target_logits has NaN at {_first_bad_row(bad)}")


def sampling_probs_values(logits, temperature, top_k, top_p):
    op = "sampling_probs"
    if bool((~torch.isfinite(temperature) | (temperature < 0)).any()):
        raise ValueError(f"{op}: temperature must be finite and >= 0")
    if bool((top_k < 0).any()):
        raise ValueError(f"{op}: top_k must be >= 0 (0 = off)")
    if bool(((top_p < 0) | (top_p > 1) | top_p.isnan()).any()):
        raise ValueError(f"{op}: top_p must be in [0, 1] (1 = off)")
    if _level == "full":
        bad = (logits.isnan() | (logits == float("inf"))).any(-1) | (logits == float("-inf")).all(-1)
        if bool(bad.any()):
            raise ValueError(f"{op}: logits has a row with NaN, +inf or only -inf at "
                             f"{_first_bad_row(bad)}")


# ---- KV cache (contract, "KV-cache commit"; layouts as in "Tree attention") ----

KV_DTYPES = FLOAT_LOGITS


def kv_list(op: str, kv) -> list[Tensor]:
    """``kv`` as a list of tensors (TypeError otherwise; ValueError when empty)."""
    if isinstance(kv, Tensor) or not isinstance(kv, (list, tuple)):
        raise TypeError(f"{op}: kv must be a list of tensors (one per layer and per K/V), "
                        f"got {type(kv).__name__}")
    if not kv:
        raise ValueError(f"{op}: kv must hold at least one tensor")
    for i, t in enumerate(kv):
        if not isinstance(t, Tensor):
            raise TypeError(f"{op}: kv[{i}] must be a torch.Tensor, got {type(t).__name__}")
    return list(kv)


def kv_layout_meta(op: str, name: str, cache: Tensor, block_tables: Tensor | None,
                   batch: int) -> tuple[int, int, int]:
    """One cache tensor of either layout; returns ``(capacity S, Hkv, D)``.

    Contiguous ``[B, Hkv, S, D]``, or paged ``[num_blocks, block_size, Hkv, D]`` with
    ``block_tables [B, max_blocks]`` int32 (capacity ``max_blocks * block_size``).
    """
    check_tensor(op, name, cache, KV_DTYPES, 4)
    # Every dim but B (contiguous) must be >= 1: a slot of zero elements is not a cache.
    if min(cache.shape[1 if block_tables is None else 0:]) < 1:
        raise ValueError(f"{op}: {name} must have every dim >= 1 (but B), got shape "
                         f"{tuple(cache.shape)}")
    if block_tables is None:
        check_size(op, name, cache, 0, batch, "B, contiguous layout [B, Hkv, S, D]")
        _, heads, capacity, dim = cache.shape
        return capacity, heads, dim
    check_tensor(op, "block_tables", block_tables, (torch.int32,), 2)
    check_size(op, "block_tables", block_tables, 0, batch, "B")
    if block_tables.shape[1] < 1:
        raise ValueError(f"{op}: block_tables must be [B, max_blocks] with max_blocks >= 1, "
                         f"got shape {tuple(block_tables.shape)}")
    _, block_size, heads, dim = cache.shape
    return block_tables.shape[1] * block_size, heads, dim


def kv_commit_meta(kv, cache_lens, path, num_accepted, block_tables) -> tuple[int, int, int]:
    """Dtypes, shapes, devices, and one set of strides for all of ``kv``; returns
    ``(B, T, capacity S)``."""
    op = "kv_commit"
    kv = kv_list(op, kv)
    check_tensor(op, "path", path, (torch.int32,), 2)
    batch, num_slots = path.shape
    if num_slots < 1:
        raise ValueError(f"{op}: path must be [B, T] with T >= 1, got shape {tuple(path.shape)}")
    _check_row_vectors(op, batch, cache_lens=(cache_lens, torch.int32),
                       num_accepted=(num_accepted, torch.int32))
    capacity, _, _ = kv_layout_meta(op, "kv[0]", kv[0], block_tables, batch)
    first = kv[0]
    for i, t in enumerate(kv[1:], 1):
        check_tensor(op, f"kv[{i}]", t, (first.dtype,), 4)
        if t.shape != first.shape:
            raise ValueError(f"{op}: kv[{i}] has shape {tuple(t.shape)}, expected kv[0]'s "
                             f"{tuple(first.shape)} (all kv tensors share one layout)")
        if t.stride() != first.stride():
            raise ValueError(f"{op}: kv[{i}] has strides {t.stride()}, expected kv[0]'s "
                             f"{first.stride()} (all kv tensors are addressed with one set of "
                             f"strides)")
    check_same_device(op, first, cache_lens=cache_lens, path=path, num_accepted=num_accepted,
                      block_tables=block_tables,
                      **{f"kv[{i}]": t for i, t in enumerate(kv[1:], 1)})
    return batch, num_slots, capacity


def kv_distinct(op: str, kv: list[Tensor]) -> None:
    """No tensor twice in ``kv`` (its moves would be applied twice, racing on a GPU). Reads
    data pointers, so it runs on real tensors only; partial overlaps are not detected."""
    seen = {}
    for i, t in enumerate(kv):
        j = seen.setdefault(t.data_ptr(), i)
        if j != i:
            raise ValueError(f"{op}: kv[{i}] and kv[{j}] are the same memory (each kv tensor "
                             f"must appear once)")


def _used_blocks(op: str, block_tables: Tensor, block_size: int, num_blocks: int, slots: Tensor,
                 used: Tensor) -> None:
    """Block-table entries of the slots ``slots [B, N]`` where ``used`` must be block ids."""
    capacity = block_tables.shape[1] * block_size
    entry = slots.clamp(0, capacity - 1) // block_size
    blocks = block_tables.long().gather(1, entry)
    bad = used & ((blocks < 0) | (blocks >= num_blocks))
    if bool(bad.any()):
        row, k = bad.nonzero()[0].tolist()
        raise ValueError(f"{op}: block_tables[{row}, {int(entry[row, k])}] = "
                         f"{int(blocks[row, k])} is outside 0..num_blocks-1={num_blocks - 1} "
                         f"(it holds slot {int(slots[row, k])} of row {row})")


def kv_commit_values(kv, cache_lens, path, num_accepted, block_tables):
    """cache_lens >= 0; num_accepted in 0..T-1; cache_lens + 1 + num_accepted <= S; before
    num_accepted, path increasing in 1..T-1 with cache_lens + path < S; the block-table entries
    of every moved slot in 0..num_blocks-1.

    Whether each path node is a child of the previous one needs the tree's parents, which the
    op does not take: that is not checked (an increasing path of other nodes moves their
    entries as asked)."""
    op = "kv_commit"
    batch, num_slots = path.shape
    capacity, _, _ = kv_layout_meta(op, "kv[0]", kv[0], block_tables, batch)
    lens, n = cache_lens.long(), num_accepted.long()
    bad = lens < 0
    if bool(bad.any()):
        raise ValueError(f"{op}: cache_lens must be >= 0, got {int(lens[bad][0])} at "
                         f"{_first_bad_row(bad)}")
    bad = (n < 0) | (n > num_slots - 1)
    if bool(bad.any()):
        raise ValueError(f"{op}: num_accepted must be in 0..T-1={num_slots - 1}, got "
                         f"{int(n[bad][0])} at {_first_bad_row(bad)}")
    bad = lens + 1 + n > capacity
    if bool(bad.any()):
        raise ValueError(f"{op}: cache_lens + 1 + num_accepted must be <= S={capacity} (the "
                         f"cache's capacity), got {int((lens + 1 + n)[bad][0])} at "
                         f"{_first_bad_row(bad)}")
    moves = torch.arange(num_slots, device=path.device)
    active = moves < n[:, None]
    p = path.long()
    previous = torch.cat([torch.zeros_like(p[:, :1]), p[:, :-1]], dim=1)
    bad = active & ((p <= previous) | (p > num_slots - 1))
    if bool(bad.any()):
        raise ValueError(f"{op}: path must hold increasing node indices in 1..T-1={num_slots - 1} "
                         f"before num_accepted (a root-to-node path), got {int(p[bad][0])} at "
                         f"{_first_bad_row(bad)}")
    bad = active & (lens[:, None] + p >= capacity)
    if bool(bad.any()):
        raise ValueError(f"{op}: cache_lens + path must be < S={capacity} (node slots inside the "
                         f"cache), got {int((lens[:, None] + p)[bad][0])} at "
                         f"{_first_bad_row(bad)}")
    if block_tables is not None:
        num_blocks, block_size = kv[0].shape[:2]
        slots = torch.cat([lens[:, None] + p, lens[:, None] + 1 + moves], dim=1)
        _used_blocks(op, block_tables, block_size, num_blocks, slots,
                     torch.cat([active, active], dim=1))


def kv_write_meta(cache, new_entries, cache_lens, block_tables) -> tuple[int, int]:
    """Returns ``(T, capacity S)``."""
    op = "kv_write"
    check_tensor(op, "new_entries", new_entries, KV_DTYPES, 4)
    batch, heads, num_new, dim = new_entries.shape
    _check_row_vectors(op, batch, cache_lens=(cache_lens, torch.int32))
    capacity, cache_heads, cache_dim = kv_layout_meta(op, "cache", cache, block_tables, batch)
    if cache.dtype != new_entries.dtype:
        raise TypeError(f"{op}: new_entries must have cache's dtype "
                        f"{str(cache.dtype).removeprefix('torch.')}, got "
                        f"{str(new_entries.dtype).removeprefix('torch.')}")
    if (cache_heads, cache_dim) != (heads, dim):
        raise ValueError(f"{op}: new_entries must be [B, Hkv={cache_heads}, T, D={cache_dim}] "
                         f"like cache, got shape {tuple(new_entries.shape)}")
    check_same_device(op, cache, new_entries=new_entries, cache_lens=cache_lens,
                      block_tables=block_tables)
    return num_new, capacity


def kv_write_values(cache, new_entries, cache_lens, block_tables):
    """cache_lens >= 0, cache_lens + T <= S, block-table entries of the written slots in
    range."""
    op = "kv_write"
    num_new, capacity = kv_write_meta(cache, new_entries, cache_lens, block_tables)
    lens = cache_lens.long()
    bad = (lens < 0) | (lens + num_new > capacity)
    if bool(bad.any()):
        raise ValueError(f"{op}: cache_lens must be in 0..S-T={capacity - num_new} (T={num_new} "
                         f"new entries in a cache of capacity S={capacity}), got "
                         f"{int(lens[bad][0])} at {_first_bad_row(bad)}")
    if block_tables is not None:
        num_blocks, block_size = cache.shape[:2]
        slots = lens[:, None] + torch.arange(num_new, device=lens.device)
        _used_blocks(op, block_tables, block_size, num_blocks, slots,
                     torch.ones_like(slots, dtype=torch.bool))


# ---- tree attention ----

def tree_attention_meta(q, k_cache, v_cache, cache_lens, mask, scale, block_tables) -> int:
    """Dtype, shape and device of every argument; returns the cache capacity per row (``S``,
    or ``max_blocks * block_size`` when paged)."""
    op = "tree_attention"
    check_tensor(op, "q", q, FLOAT_LOGITS, 4)
    check_tensor(op, "k_cache", k_cache, (q.dtype,), 4)
    check_tensor(op, "v_cache", v_cache, (q.dtype,), 4)
    batch, num_nodes, num_heads, head_dim = q.shape
    if num_heads < 1 or head_dim < 1:
        raise ValueError(f"{op}: q must be [B, T, H, D] with H >= 1 and D >= 1, "
                         f"got shape {tuple(q.shape)}")
    paged = block_tables is not None
    num_kv_heads = k_cache.shape[2 if paged else 1]
    if num_kv_heads < 1 or num_heads % num_kv_heads != 0:
        raise ValueError(f"{op}: k_cache has {num_kv_heads} kv heads, which must divide q's "
                         f"{num_heads} heads; got shape {tuple(k_cache.shape)}")
    check_size(op, "k_cache", k_cache, 3, head_dim, "D")
    if not paged:
        check_size(op, "k_cache", k_cache, 0, batch, "B")
    if v_cache.shape != k_cache.shape:
        raise ValueError(f"{op}: v_cache must have k_cache's shape {tuple(k_cache.shape)}, "
                         f"got shape {tuple(v_cache.shape)}")
    _check_row_vectors(op, batch, cache_lens=(cache_lens, torch.int32))
    check_tensor(op, "mask", mask, (torch.bool,), 3)
    for dim, (size, what) in enumerate(((batch, "B"), (num_nodes, "T"), (num_nodes, "T"))):
        check_size(op, "mask", mask, dim, size, what)
    if paged:
        check_tensor(op, "block_tables", block_tables, (torch.int32,), 2)
        check_size(op, "block_tables", block_tables, 0, batch, "B")
        if k_cache.shape[0] < 1 or k_cache.shape[1] < 1:
            raise ValueError(f"{op}: k_cache must be [num_blocks, block_size, Hkv, D] with "
                             f"num_blocks >= 1 and block_size >= 1, got shape "
                             f"{tuple(k_cache.shape)}")
        capacity = block_tables.shape[1] * k_cache.shape[1]
    else:
        capacity = k_cache.shape[2]
    if capacity < num_nodes:
        where = "block_tables.shape[1] * block_size" if paged else "k_cache.shape[2]"
        raise ValueError(f"{op}: the cache holds {capacity} slots per row, fewer than the "
                         f"T = {num_nodes} new nodes ({where})")
    if scale is not None and (isinstance(scale, bool) or not isinstance(scale, (int, float))):
        raise TypeError(f"{op}: scale must be a number or None, got {type(scale).__name__}")
    check_same_device(op, q, k_cache=k_cache, v_cache=v_cache, cache_lens=cache_lens, mask=mask,
                      block_tables=block_tables)
    return capacity


def tree_attention_values(q, k_cache, cache_lens, block_tables, capacity: int) -> None:
    """cache_lens in ``0..capacity - T``; the block-table entries holding slots below
    ``cache_lens + T`` in ``0..num_blocks - 1``."""
    op = "tree_attention"
    num_nodes = q.shape[1]
    bad = (cache_lens < 0) | (cache_lens > capacity - num_nodes)
    if bool(bad.any()):
        raise ValueError(f"{op}: cache_lens must be in 0..{capacity - num_nodes} (the cache's "
                         f"{capacity} slots minus T = {num_nodes}), got "
                         f"{int(cache_lens[bad][0])} at {_first_bad_row(bad)}")
    if block_tables is not None:
        num_blocks, block_size = k_cache.shape[0], k_cache.shape[1]
        entries = torch.arange(block_tables.shape[1], device=block_tables.device)
        used = entries * block_size < (cache_lens.long() + num_nodes)[:, None]
        bad = used & ((block_tables < 0) | (block_tables >= num_blocks))
        if bool(bad.any()):
            raise ValueError(f"{op}: block_tables entries holding slots below cache_lens + T "
                             f"must be in 0..{num_blocks - 1} (num_blocks - 1), got "
                             f"{int(block_tables[bad][0])} at {_first_bad_row(bad)}")
