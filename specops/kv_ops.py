"""Public KV-cache ops (contract, "KV-cache commit"): ``kv_commit``, the custom op that rolls
back rejected tree nodes, and ``kv_write``, a plain PyTorch helper that writes a tree step's
new entries. Same dispatch as :mod:`specops.ops`: ``torch.ops.specops.kv_commit`` (C++ on the
CPU, Triton on CUDA), or the reference when selected with ``specops.set_backend("reference")``.
"""

import torch
from torch import Tensor

from . import _checks, ops
from .reference.kv import kv_commit_ref, slot_index, slot_view


def kv_commit(kv: list[Tensor], cache_lens: Tensor, path: Tensor, num_accepted: Tensor,
              block_tables: Tensor | None = None) -> Tensor:
    """Commits a verified token tree to the KV cache: moves the entries of the accepted path
    behind the root, in place, in every layer's K and V at once, and returns the new lengths.

    During a tree step node ``i``'s key/value sits at slot ``cache_lens[b] + i`` (node 0, the
    root, at ``cache_lens[b]``). Afterwards slot ``cache_lens[b] + 1 + k`` holds what slot
    ``cache_lens[b] + path[b, k]`` held, for ``k < num_accepted[b]``: the cache is what
    running the model on the accepted tokens alone would have written. Only those slots are
    written: slots up to ``cache_lens[b]`` and past ``cache_lens[b] + num_accepted[b]`` keep
    their bytes (past the new length they are stale and the next step overwrites them). A
    chain (``path[b, k] == k + 1``) moves nothing. Copies are bit-exact. On a GPU it is one
    sync-free launch for all tensors, which can be captured in a CUDA graph after one call
    with the same tensors (that call builds the kernel's table of data pointers).

    Args:
        kv: list of cache tensors, one per layer and per K/V, all of one shape, dtype
            (float32, bfloat16 or float16) and strides, each either
            Shape ``(batch_size, num_kv_heads, max_seq_len, head_dim)`` (contiguous, Hugging
            Face's layout) or
            Shape ``(num_blocks, block_size, num_kv_heads, head_dim)`` (paged). Updated in
            place; no tensor may appear twice or overlap another.
        cache_lens: Shape ``(batch_size,)``, int32: committed tokens per row (the root's slot).
        path: Shape ``(batch_size, num_nodes_max)``, int32: accepted node indices in order
            (all ``>= 1``, increasing), then ``-1``, as :func:`specops.tree_verify` returns.
        num_accepted: Shape ``(batch_size,)``, int32 in ``0..num_nodes_max - 1``.
        block_tables: Shape ``(batch_size, max_blocks)``, int32, paged layout only: slot
            ``s`` of row ``b`` is block ``block_tables[b, s // block_size]``, offset
            ``s % block_size``. Written blocks must be private to their row.

    Returns:
        new_cache_lens: Shape ``(batch_size,)``, int32 = ``cache_lens + 1 + num_accepted``
        (the root and the accepted tokens are now cached).

    Checks (``specops.set_checks``): dtypes, shapes, devices and strides always. At
    ``"cheap"`` on the CPU (``"full"`` on a GPU, which syncs): ``cache_lens >= 0``,
    ``num_accepted`` in ``0..T-1``, ``cache_lens + 1 + num_accepted <= S`` (the capacity:
    ``max_seq_len``, or ``max_blocks * block_size``), ``path`` increasing in ``1..T-1``
    before ``num_accepted`` with ``cache_lens + path < S``, and the block-table entries of
    every moved slot in ``0..num_blocks-1``; a failed check raises ``ValueError`` before
    anything is written. That each path node is a child of the previous one is not checked
    (it needs the tree's parents, which this op does not take). With checks off, a move whose
    slot or block is out of range is skipped; every source is still read before any
    destination is written, so all backends give the same bytes for any path.

    >>> cache = torch.arange(6.0).reshape(1, 1, 6, 1)  # [B, Hkv, S, D]: slot s holds s
    >>> # Root at slot 2, nodes 1..3 at slots 3..5; the walk accepted node 2 only.
    >>> specops.kv_commit([cache], torch.tensor([2], dtype=torch.int32),
    ...                   torch.tensor([[2, -1, -1, -1]], dtype=torch.int32),
    ...                   torch.tensor([1], dtype=torch.int32))
    tensor([4], dtype=torch.int32)
    >>> cache.flatten().tolist()
    [0.0, 1.0, 2.0, 4.0, 4.0, 5.0]
    """
    kv = _checks.kv_list("kv_commit", kv)
    args = (kv, cache_lens, path, num_accepted, block_tables)
    _checks.kv_commit_meta(*args)
    if ops.get_backend() == "reference":
        # Data pointers and value checks cannot be traced: the reference skips them inside
        # torch.compile (the kernels check inside the op).
        if not torch.compiler.is_compiling():
            _checks.kv_distinct("kv_commit", kv)
            if _checks.values_checked(cache_lens.device):
                _checks.kv_commit_values(*args)
        return kv_commit_ref(*args)
    return torch.ops.specops.kv_commit(*args)


def kv_write(cache: Tensor, new_entries: Tensor, cache_lens: Tensor,
             block_tables: Tensor | None = None) -> None:
    """Writes a tree step's new keys or values into one cache tensor, in place: node ``i``'s
    entry goes to slot ``cache_lens[b] + i`` (the layout :func:`kv_commit` and
    :func:`specops.tree_attention` expect). Call it once per layer for K and for V.

    A plain, sync-free PyTorch function (one ``index_put_``, through a one-write
    :class:`KVSlotWriter`), not a custom op: it traces under ``torch.compile`` and records in
    CUDA graphs as it is.

    Args:
        cache: Shape ``(batch_size, num_kv_heads, max_seq_len, head_dim)`` (contiguous) or
            Shape ``(num_blocks, block_size, num_kv_heads, head_dim)`` (paged); float32,
            bfloat16 or float16.
        new_entries: Shape ``(batch_size, num_kv_heads, num_nodes, head_dim)``, cache's dtype
            (the projection output's ``[B, Hkv, T, D]``, Hugging Face's order).
        cache_lens: Shape ``(batch_size,)``, int32: the root's slot.
        block_tables: Shape ``(batch_size, max_blocks)``, int32, paged layout only.

    Checks: dtypes, shapes and devices always; at ``"cheap"`` on the CPU (``"full"`` on a
    GPU): ``0 <= cache_lens <= S - num_nodes`` and the block-table entries of the written
    slots in ``0..num_blocks-1`` (``ValueError``, nothing written). Inside ``torch.compile``
    the value checks are skipped (they would break the graph). With checks off, entries whose
    slot or block is out of range are dropped.

    >>> cache = torch.zeros(1, 1, 5, 1)
    >>> new = torch.tensor([7.0, 8.0]).reshape(1, 1, 2, 1)  # [B, Hkv, T, D]
    >>> specops.kv_write(cache, new, torch.tensor([2], dtype=torch.int32))
    >>> cache.flatten().tolist()
    [0.0, 0.0, 7.0, 8.0, 0.0]
    """
    kv_write_checks(cache, new_entries, cache_lens, block_tables)
    KVSlotWriter(cache, cache_lens, new_entries.shape[2], block_tables).put(cache, new_entries)


def kv_write_checks(cache: Tensor, new_entries: Tensor, cache_lens: Tensor,
                    block_tables: Tensor | None = None, *, values: bool = True) -> None:
    """:func:`kv_write`'s checks alone (``values=False``: its dtype, shape and device checks
    only), for a caller that writes the same entries another way."""
    _checks.check_tensor("kv_write", "cache", cache, _checks.KV_DTYPES, 4)
    args = (cache, new_entries, cache_lens, block_tables)
    _checks.kv_write_meta(*args)
    if values and _checks.values_checked(cache.device) and not torch.compiler.is_compiling():
        _checks.kv_write_values(*args)


class KVSlotWriter:
    """:func:`kv_write` for many cache tensors of one layout written at the same slots (every
    layer's K and V in one forward): the slot and mask arithmetic runs once, each write is then
    a gather, two ``where`` and one ``index_put_`` (about 21 small kernels a :func:`kv_write`
    call otherwise, which a CUDA graph replays one by one too). Each write leaves the bytes
    :func:`kv_write` would, out-of-range entries dropped alike.

    Args:
        cache: The first cache tensor (its layout and capacity; every later one must share
            them, and ``block_tables``).
        cache_lens, block_tables: As :func:`kv_write`.
        num_new: The entries per row each write brings (``T``).

    The checks are :func:`kv_write`'s: dtypes, shapes and devices at every write, the value
    checks (``"cheap"`` on the CPU, ``"full"`` on a GPU, never under ``torch.compile``) at the
    first write only, since every write has the same slots.
    """

    def __init__(self, cache: Tensor, cache_lens: Tensor, num_new: int,
                 block_tables: Tensor | None = None):
        self.cache_lens, self.block_tables = cache_lens, block_tables
        self.checked = False
        slots = cache_lens.long()[:, None] + torch.arange(num_new, device=cache.device)
        index, valid = slot_index(cache, slots, block_tables)
        index = tuple(i.flatten() for i in index)
        self.valid = valid.flatten()
        if self.valid.numel() == 0:   # nothing to write (T = 0 or B = 0): put returns at once
            return
        # masked_index_put_'s anchor (the first valid entry), found once for every write
        self.first = self.valid.to(torch.int32).argmax(0, keepdim=True)
        self.anchor = tuple(i[self.first] for i in index)
        self.any_valid = self.valid.any()
        self.index = tuple(torch.where(self.valid, i, a) for i, a in zip(index, self.anchor))

    def write(self, cache: Tensor, new_entries: Tensor) -> None:
        """``kv_write(cache, new_entries, cache_lens, block_tables)``, in place."""
        kv_write_checks(cache, new_entries, self.cache_lens, self.block_tables,
                        values=not self.checked)
        self.checked = True
        self.put(cache, new_entries)

    def put(self, cache: Tensor, new_entries: Tensor) -> None:
        """The write alone, unchecked (:func:`kv_write` checks before it)."""
        batch, heads, num_new, dim = new_entries.shape
        if self.valid.numel() == 0:
            return
        values = new_entries.transpose(1, 2).reshape(batch * num_new, heads, dim)
        view = slot_view(cache, self.block_tables is not None)
        anchor_value = torch.where(self.any_valid, values[self.first], view[self.anchor])
        values = torch.where(self.valid[:, None, None], values, anchor_value)
        view.index_put_(self.index, values)
