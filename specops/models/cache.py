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

from .. import _checks


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


def check_step_inputs(op: str, lm, tokens: Tensor, cache: StaticKVCache, cache_lens: Tensor,
                      positions: Tensor, mask: Tensor | None, logits_index: Tensor | None,
                      prefill: bool) -> None:
    """The argument checks of a model step (``SpecopsCausalLM.forward`` and its Hugging Face
    fallback): dtypes, shapes and devices only (no sync, traceable). ``lm`` gives
    ``num_layers``, ``num_kv_heads``, ``head_dim``, ``cache_dtype`` and ``weight`` (a
    parameter on the model's device)."""
    _checks.check_tensor(op, "tokens", tokens, (torch.int64,), 2)
    batch, num_new = tokens.shape
    if num_new < 1:
        raise ValueError(f"{op}: tokens must hold at least one token per row, "
                         f"got shape {tuple(tokens.shape)}")
    if not isinstance(cache, StaticKVCache):
        raise TypeError(f"{op}: cache must be a StaticKVCache (from new_cache), "
                        f"got {type(cache).__name__}")
    expected = (batch, lm.num_kv_heads, cache.capacity, lm.head_dim)
    layers_ok = len(cache.keys) == len(cache.values) == lm.num_layers
    if not layers_ok or any(t.shape != expected or t.dtype != lm.cache_dtype
                            for t in (*cache.keys, *cache.values)):
        raise ValueError(f"{op}: cache must hold {lm.num_layers} layers of {list(expected)} "
                         f"{lm.cache_dtype} keys and values for this model and batch, "
                         f"got {cache!r}")
    _checks._check_row_vectors(op, batch, cache_lens=(cache_lens, torch.int32))
    _checks.check_tensor(op, "positions", positions, (torch.int64,), 2)
    _checks.check_size(op, "positions", positions, 0, batch, "B")
    _checks.check_size(op, "positions", positions, 1, num_new, "T")
    if mask is not None:
        if prefill:
            raise ValueError(f"{op}: prefill=True runs causal attention and takes no "
                             f"mask; pass mask=None or prefill=False")
        _checks.check_tensor(op, "mask", mask, (torch.bool,), 3)
        for dim, (size, what) in enumerate(((batch, "B"), (num_new, "T"), (num_new, "T"))):
            _checks.check_size(op, "mask", mask, dim, size, what)
    if logits_index is not None:
        _checks.check_tensor(op, "logits_index", logits_index, (torch.int64,), 2)
        _checks.check_size(op, "logits_index", logits_index, 0, batch, "B")
    _checks.check_same_device(op, lm.weight, tokens=tokens, cache=cache.keys[0],
                              cache_lens=cache_lens, positions=positions, mask=mask,
                              logits_index=logits_index)
