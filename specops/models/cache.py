"""A static KV cache for specops' own model forward (:mod:`specops.models`).

One preallocated key tensor and one value tensor per layer, in Hugging Face's
``(batch_size, num_kv_heads, capacity, head_dim)`` layout, indexed by slot: row ``b`` holds
its ``cache_lens[b]`` committed tokens in slots ``0..cache_lens[b] - 1``. The lengths are not
stored here; the decoding loop owns them (a device tensor), so rolling back a rejected chain
is just a smaller length, and a tree step is rolled back by :func:`specops.kv_commit` on
:meth:`StaticKVCache.tensors`. Tensors never change address, which CUDA graphs need.
"""

import torch
from torch import Tensor


class StaticKVCache:
    """Keys and values of every layer, preallocated.

    Attributes:
        keys: One tensor per layer, Shape ``(batch_size, num_kv_heads, capacity, head_dim)``,
            the model's dtype, zeros at start. Keys are stored after rotary embedding.
        values: Same shapes and dtype as ``keys``.
        batch_size: Rows.
        capacity: Slots per row. Keeping ``cache_lens + T <= capacity`` for a forward of
            ``T`` new tokens is the caller's job; :func:`specops.kv_write` and
            :func:`specops.tree_attention` raise ``ValueError`` when it fails (at the default
            check level on the CPU; on a GPU only with ``specops.set_checks("full")``).
    """

    def __init__(self, num_layers: int, batch_size: int, num_kv_heads: int, capacity: int,
                 head_dim: int, dtype: torch.dtype, device: torch.device | str):
        for name, value in (("num_layers", num_layers), ("batch_size", batch_size),
                            ("capacity", capacity)):
            if isinstance(value, bool) or not isinstance(value, int) or value < 1:
                raise ValueError(f"StaticKVCache: {name} must be a positive int, got {value!r}")
        shape = (batch_size, num_kv_heads, capacity, head_dim)
        self.keys: list[Tensor] = [torch.zeros(shape, dtype=dtype, device=device)
                                   for _ in range(num_layers)]
        self.values: list[Tensor] = [torch.zeros(shape, dtype=dtype, device=device)
                                     for _ in range(num_layers)]
        self.batch_size = batch_size
        self.capacity = capacity

    def tensors(self) -> list[Tensor]:
        """Every layer's K and V as one list, ``[K_0, V_0, K_1, V_1, ...]``: the ``kv``
        argument of :func:`specops.kv_commit` (one launch commits them all)."""
        return [t for pair in zip(self.keys, self.values) for t in pair]

    def __repr__(self) -> str:
        first = self.keys[0]
        return (f"StaticKVCache(num_layers={len(self.keys)}, shape={tuple(first.shape)}, "
                f"dtype={first.dtype}, device={first.device})")
