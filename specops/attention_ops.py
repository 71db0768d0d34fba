"""Public tree attention (contract, "Tree attention"). Same dispatch as :mod:`specops.ops`:
``torch.ops.specops.tree_attention`` (C++ on the CPU, Triton on CUDA), or the reference when
selected with ``specops.set_backend("reference")``.
"""

import torch
from torch import Tensor

from . import _checks, ops
from .reference.attention import tree_attention_ref


def tree_attention(q: Tensor, k_cache: Tensor, v_cache: Tensor, cache_lens: Tensor,
                   mask: Tensor, scale: float | None = None,
                   block_tables: Tensor | None = None) -> Tensor:
    """Attention of the ``T`` nodes of a token tree over a KV cache that already holds their
    keys and values: the verification forward pass of tree speculative decoding (SpecInfer,
    Miao et al. 2024, https://arxiv.org/abs/2305.09781; Medusa, Cai et al. 2024,
    https://arxiv.org/abs/2401.10774).

    Node ``i`` of row ``b`` attends to the *prefix*, the cached slots ``[0, cache_lens[b])``,
    and to slot ``cache_lens[b] + j`` for every node ``j`` with ``mask[b, i, j]`` (itself and
    its ancestors when ``mask`` comes from :func:`specops.tree_metadata`). Query head ``h``
    reads kv head ``h // (H // Hkv)`` (grouped-query attention when ``Hkv < H``). Scores
    ``scale * q . k`` are softmaxed and accumulated in float32. A node that can attend to
    nothing (an all-False mask row and ``cache_lens[b] = 0``) outputs zeros.

    The caller writes node ``i``'s key/value to slot ``cache_lens[b] + i`` before the call
    (after rotary embedding at the node's position ``positions[b] + depth[b, i]``, which is
    not its slot). No sliding window: every prefix slot is attended to, so a model whose
    sliding window is shorter than its context (some Mistral configurations) must not use
    this op; the Hugging Face integration refuses such models.

    Args:
        q: Shape ``(batch_size, T, num_heads, head_dim)``, float32, bfloat16 or float16. Any
            strides with a contiguous last dim are read in place (e.g. Hugging Face's
            ``(B, H, T, D)`` query transposed).
        k_cache: Shape ``(batch_size, num_kv_heads, S, head_dim)`` (Hugging Face layout), or
            paged ``(num_blocks, block_size, num_kv_heads, head_dim)`` with ``block_tables``;
            ``q``'s dtype. ``num_heads`` must be a multiple of ``num_kv_heads``.
        v_cache: Same shape and dtype as ``k_cache``.
        cache_lens: Shape ``(batch_size,)``, int32 in ``0..capacity - T``: the prefix length
            of each row (``capacity`` = ``S``, or ``max_blocks * block_size`` when paged).
        mask: Shape ``(batch_size, T, T)``, bool: ``mask[b, i, j]`` iff node ``i`` attends to
            node ``j`` (the first output of :func:`specops.tree_metadata`).
        scale: Multiplies ``q . k``. ``None`` = ``1 / sqrt(head_dim)``.
        block_tables: Shape ``(batch_size, max_blocks)``, int32, for the paged layout: slot
            ``s`` of row ``b`` is block ``block_tables[b, s // block_size]``, offset
            ``s % block_size``. Entries past the slots a row uses are ignored (may be -1).
            ``None`` = contiguous layout.

    Returns:
        Shape ``(batch_size, T, num_heads, head_dim)``, contiguous, in ``q``'s dtype.

    Bad values: by default (checks ``"cheap"``, CPU) a ``cache_lens`` entry outside
    ``0..capacity - T`` or a used block-table entry outside ``0..num_blocks - 1`` raises a
    ``ValueError``; on a GPU only ``"full"`` checks them. With checks off, ``cache_lens`` is
    clamped to ``0..capacity - T`` and block-table entries to ``0..num_blocks - 1``, so no
    read leaves the cache.

    >>> q = torch.zeros(1, 3, 1, 2)  # equal scores: each node averages the values it sees
    >>> k = torch.zeros(1, 1, 4, 2)
    >>> v = torch.tensor([0.0, 3.0, 6.0, 9.0]).reshape(1, 1, 4, 1).repeat(1, 1, 1, 2)
    >>> mask = torch.tensor([[[True, False, False],   # root: slots 0 (prefix) and 1
    ...                       [True, True, False],    # node 1, child of the root: + slot 2
    ...                       [True, False, True]]])  # node 2, child of the root: + slot 3
    >>> out = specops.tree_attention(q, k, v, torch.tensor([1], dtype=torch.int32), mask)
    >>> out[0, :, 0]
    tensor([[1.5000, 1.5000],
            [3.0000, 3.0000],
            [4.0000, 4.0000]])
    """
    if isinstance(scale, int) and not isinstance(scale, bool):
        scale = float(scale)
    args = (q, k_cache, v_cache, cache_lens, mask, scale, block_tables)
    capacity = _checks.tree_attention_meta(*args)
    if ops.get_backend() == "reference":
        if _checks.values_checked(q.device):
            _checks.tree_attention_values(q, k_cache, cache_lens, block_tables, capacity)
        return tree_attention_ref(*args)
    return torch.ops.specops.tree_attention(*args)
