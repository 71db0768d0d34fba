"""Reference tree attention (contract, "Tree attention"): the executable specification.

Words: the *prefix* of row ``b`` is the ``cache_lens[b]`` cached slots ``[0, cache_lens[b])``;
the *tree block* is the ``T`` slots after it, where slot ``cache_lens[b] + j`` holds node
``j``'s key/value (node 0 is the root). Node ``i`` attends to the whole prefix and to the
nodes ``j`` with ``mask[b, i, j]`` (itself and its ancestors, from ``tree_metadata``). Query
head ``h`` reads kv head ``h // (H // Hkv)`` (grouped-query attention).

A node that can attend to nothing (an all-False mask row and an empty prefix) outputs zeros.
With checks off, ``cache_lens`` is clamped to ``0..capacity - T`` and block-table entries to
``0..num_blocks - 1``, so every read stays inside the cache.
"""

import math

import torch
from torch import Tensor


def logical_cache_ref(cache: Tensor, block_tables: Tensor | None) -> Tensor:
    """The cache of every row as ``[B, Hkv, capacity, D]``.

    Args:
        cache: ``[B, Hkv, S, D]`` (returned as is), or paged ``[num_blocks, block_size, Hkv,
            D]``, where slot ``s`` of row ``b`` is block ``block_tables[b, s // block_size]``,
            offset ``s % block_size`` (capacity ``max_blocks * block_size``).
        block_tables: ``[B, max_blocks]`` int32, or None for the contiguous layout.
    """
    if block_tables is None:
        return cache
    blocks = block_tables.long().clamp(0, cache.shape[0] - 1)
    gathered = cache[blocks]  # [B, max_blocks, block_size, Hkv, D]
    return gathered.flatten(1, 2).transpose(1, 2)


def tree_attention_allowed_ref(cache_lens: Tensor, mask: Tensor, capacity: int) -> Tensor:
    """``[B, T, capacity]`` bool: which cache slots each node attends to."""
    batch, num_nodes, _ = mask.shape
    prefix = cache_lens.long().clamp(0, capacity - num_nodes)
    slots = torch.arange(capacity, device=mask.device)
    node = slots[None, :] - prefix[:, None]  # [B, S]: the node a tree-block slot holds
    in_tree = (node >= 0) & (node < num_nodes)
    tree = mask.gather(2, node.clamp(0, num_nodes - 1)[:, None, :].expand(-1, num_nodes, -1))
    in_prefix = slots[None, None, :] < prefix[:, None, None]
    return in_prefix | (in_tree[:, None, :] & tree)


def tree_attention_ref(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor,
                       mask: Tensor, scale: float | None = None,
                       block_tables: Tensor | None = None) -> Tensor:
    """Attention of ``T`` tree nodes over a KV cache that already holds their keys/values.

    Args:
        q: ``[B, T, H, D]`` float32/bf16/fp16.
        k_cache, v_cache: ``[B, Hkv, S, D]``, or paged ``[num_blocks, block_size, Hkv, D]``
            with ``block_tables``; same dtype as ``q``.
        cache_lens: ``[B]`` int32, the prefix length of each row.
        mask: ``[B, T, T]`` bool, ``mask[b, i, j]``: node ``i`` attends to node ``j``.
        scale: multiplies ``q . k``; None = ``1 / sqrt(D)``.
        block_tables: ``[B, max_blocks]`` int32, or None for the contiguous layout.

    Returns:
        ``[B, T, H, D]`` in ``q``'s dtype, computed in float32.
    """
    batch, num_nodes, num_heads, head_dim = q.shape
    k = logical_cache_ref(k_cache, block_tables).float()
    v = logical_cache_ref(v_cache, block_tables).float()
    num_kv_heads, capacity = k.shape[1], k.shape[2]
    group = num_heads // num_kv_heads
    scale = 1.0 / math.sqrt(head_dim) if scale is None else scale

    allowed = tree_attention_allowed_ref(cache_lens, mask, capacity)[:, None, None]  # b,1,1,t,s
    qf = q.float().reshape(batch, num_nodes, num_kv_heads, group, head_dim)
    scores = torch.einsum("bthgd,bhsd->bhgts", qf, k) * scale
    scores = scores.masked_fill(~allowed, float("-inf"))
    # A row with no allowed slot would be 0/0 = NaN; it outputs zeros instead.
    weights = torch.where(allowed.any(-1, keepdim=True), scores.softmax(-1), 0.0)
    out = torch.einsum("bhgts,bhsd->bthgd", weights, v)
    return out.reshape(batch, num_nodes, num_heads, head_dim).to(q.dtype)
