"""Reference KV-cache commit (contract, "KV-cache commit"): the executable specification.

Words: a row's cache holds ``cache_lens[b]`` committed entries at slots ``0..cache_lens[b]-1``;
during a tree step, node ``i``'s key or value sits at slot ``cache_lens[b] + i`` (node 0, the
root, at ``cache_lens[b]``). Committing the accepted path ``path[b, :num_accepted[b]]`` is a
list of *moves*: move ``k`` copies slot ``cache_lens[b] + path[b, k]`` (its *source*) to slot
``cache_lens[b] + 1 + k`` (its *destination*). A move whose source equals its destination
(``path[b, k] == k + 1``, e.g. every move of a chain) is a no-op.

Layouts: *contiguous* ``[B, Hkv, S, D]`` (Hugging Face), slot ``s`` of row ``b`` is
``cache[b, :, s]``; *paged* ``[num_blocks, block_size, Hkv, D]`` with ``block_tables [B,
max_blocks]``, slot ``s`` of row ``b`` is ``cache[block_tables[b, s // block_size], s %
block_size]``. The *capacity* ``S`` of a row is ``cache.shape[2]`` or ``max_blocks *
block_size``.

Every source is read before any destination is written, so the result does not depend on the
order of the moves even for paths that break the contract (which the checks reject). With
checks off, a move is skipped when its source or destination slot is outside ``0..S-1`` or,
paged, when the block-table entry of either is outside ``0..num_blocks-1``: nothing is ever
read or written out of bounds, and only destination slots of performed moves are written.
"""

import torch
from torch import Tensor


def slot_view(cache: Tensor, paged: bool) -> Tensor:
    """``cache`` as ``[rows or blocks, slots, Hkv, D]`` (a view): slot ``s`` of row ``b`` is
    ``view[b, s]`` (contiguous) or ``view[block, offset]`` (paged)."""
    return cache if paged else cache.transpose(1, 2)


def slot_index(cache: Tensor, slots: Tensor, block_tables: Tensor | None
               ) -> tuple[tuple[Tensor, Tensor], Tensor]:
    """Where the slots ``slots [B, N]`` (int64) of each row live in ``slot_view(cache)``.

    Returns ``(index, valid)``: ``index`` = two ``[B, N]`` int64 tensors, the row (or block)
    and the slot (or offset), clamped into range; ``valid [B, N]`` bool says the slot (and,
    paged, its block) really is in range.
    """
    batch = slots.shape[0]
    if block_tables is None:
        capacity = cache.shape[2]
        valid = (slots >= 0) & (slots < capacity)
        rows = torch.arange(batch, device=slots.device)[:, None].expand_as(slots)
        return (rows, slots.clamp(0, capacity - 1)), valid
    num_blocks, block_size = cache.shape[:2]
    capacity = block_tables.shape[1] * block_size
    valid = (slots >= 0) & (slots < capacity)
    s = slots.clamp(0, capacity - 1)
    blocks = block_tables.long().gather(1, s // block_size)
    valid &= (blocks >= 0) & (blocks < num_blocks)
    return (blocks.clamp(0, num_blocks - 1), s % block_size), valid


def masked_index_put_(view: Tensor, index: tuple[Tensor, Tensor], values: Tensor,
                      valid: Tensor) -> None:
    """``view[index[0][n], index[1][n]] = values[n]`` for the entries ``n`` where
    ``valid[n]``, sync-free; the others write nothing. ``view`` is a :func:`slot_view`;
    indices ``[N]`` int64 (in range: callers clamp), values ``[N, Hkv, D]``, valid ``[N]``.

    ``index_put_`` cannot skip entries, so an invalid entry is sent to the *anchor*, the first
    valid entry, with the anchor's value: duplicate indices then carry identical bytes and the
    result is deterministic. With no valid entry the anchor is entry 0 and it receives its own
    current value.
    """
    if valid.numel() == 0:
        return
    first = valid.to(torch.int32).argmax(0, keepdim=True)  # [1], a tensor index (traceable)
    anchor = tuple(i[first] for i in index)
    anchor_value = torch.where(valid.any(), values[first], view[anchor])
    i0, i1 = (torch.where(valid, i, a) for i, a in zip(index, anchor))
    values = torch.where(valid[:, None, None], values, anchor_value)
    view.index_put_((i0, i1), values)


def kv_commit_ref(kv: list[Tensor], cache_lens: Tensor, path: Tensor, num_accepted: Tensor,
                  block_tables: Tensor | None = None) -> Tensor:
    """Moves the accepted nodes' entries behind the root, in place, in every tensor of ``kv``.

    Args:
        kv: tensors of one layout, shape and dtype: contiguous ``[B, Hkv, S, D]`` or paged
            ``[num_blocks, block_size, Hkv, D]``. Updated in place.
        cache_lens: [B] int32. path: [B, T] int32 (accepted node indices, then -1).
        num_accepted: [B] int32. block_tables: [B, max_blocks] int32 (paged) or None.

    Returns:
        new_cache_lens [B] int32 = ``cache_lens + 1 + num_accepted``.
    """
    batch, num_slots = path.shape
    moves = torch.arange(num_slots, device=path.device)
    lens = cache_lens.long()[:, None]
    src, src_ok = slot_index(kv[0], lens + path.long(), block_tables)
    dst, dst_ok = slot_index(kv[0], lens + 1 + moves, block_tables)
    valid = (moves < num_accepted.long()[:, None]) & src_ok & dst_ok
    valid, src, dst = valid.flatten(), [i.flatten() for i in src], [i.flatten() for i in dst]
    for cache in kv:
        view = slot_view(cache, block_tables is not None)
        # One gather of every source, then the writes: all reads happen before any write.
        masked_index_put_(view, (dst[0], dst[1]), view[src[0], src[1]], valid)
    return (cache_lens + 1 + num_accepted).to(torch.int32)
