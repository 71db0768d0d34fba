"""The fallback forward for causal LMs specops has no compact forward for: Hugging Face's own
modeling code, eager, over specops' static KV cache.

:class:`HFEagerCausalLM` serves the decoding loop through the same call as
:class:`~specops.models.SpecopsCausalLM` (prefill, chain and tree steps over a
:class:`StaticKVCache` indexed by slot), so every drafter, sampler and ``kv_commit`` works
unchanged; it is slower and cannot be captured in a device graph. Each call:

1. hands the model a ``DynamicCache`` holding slots ``0..max(cache_lens) - 1`` of every row
   (a view of the static cache; transformers concatenates the new keys/values after it);
2. passes an explicit 4-D additive attention mask: new token ``i`` of row ``b`` sees cached
   slot ``s`` iff ``s < cache_lens[b]`` and new token ``j`` iff ``mask[b, i, j]``, and the
   explicit ``position_ids`` (``positions``), so ragged rows and token trees run exactly;
3. copies the new keys/values from the returned cache to slots ``cache_lens[b] + i`` of the
   static cache with :func:`specops.kv_write`.

It reads ``max(cache_lens)`` on the host (one sync per call: this path is eager anyway).

Works with decoder-only transformers models whose attention takes a custom 4-D mask (those
built on ``transformers.masking_utils``: most of them in transformers 5) and whose cache is
one key and one value tensor per layer in ``(batch, kv_heads, length, head_dim)`` layout. A
model whose cache is anything else (state-space or linear-attention layers, sliding-window
layers, latent caches) is refused at wrap time, from a one-token probe forward.
"""

import torch
from torch import Tensor

from ..hf import active_sliding_window
from ..kv_ops import kv_write
from .cache import StaticKVCache, check_step_inputs

_OP = "HFEagerCausalLM.forward"


class HFEagerCausalLM:
    """Any supported-shape transformers causal LM, driven eagerly through a static KV cache.

    Build it with :func:`specops.models.causal_lm`, which picks it for model types without a
    compact forward. The weights are the model's own; nothing is copied.

    Attributes:
        hf_model: The wrapped transformers model.
        config: ``hf_model.config``.
        vocab_size: Rows of the output embedding (the logits' last dim).
        num_layers: Layers holding keys and values.
        num_kv_heads, head_dim: Of every layer's cache (found by the probe forward).
        cache_dtype: Of the keys and values the model caches.
        graph_safe: ``False``: the decoding loop never captures this forward in a graph.
    """

    graph_safe = False

    def __init__(self, model: torch.nn.Module):
        config = getattr(model, "config", None)
        if config is None or not callable(getattr(model, "get_output_embeddings", None)) \
                or model.get_output_embeddings() is None:
            raise ValueError(f"specops.models: {type(model).__name__} is not a transformers "
                             f"causal LM with an output embedding (pass the *ForCausalLM "
                             f"model)")
        if getattr(config, "is_encoder_decoder", False):
            raise ValueError(f"specops.models: {type(model).__name__} is an encoder-decoder "
                             f"model; the decoding loop runs decoder-only causal LMs")
        rope = getattr(config, "rope_parameters", None) or getattr(config, "rope_scaling", None)
        rope_type = (rope or {}).get("rope_type", (rope or {}).get("type", "default"))
        if "dynamic" in str(rope_type):
            raise ValueError(f"specops.models: rope type {rope_type!r} depends on the sequence "
                             f"length seen so far and cannot run on a static cache")
        self.hf_model = model
        self.config = config
        self.vocab_size = model.get_output_embeddings().weight.shape[0]
        self._probe()

    def _probe(self) -> None:
        """One forward of one token, to learn the cache's structure and refuse what this path
        cannot hold."""
        from transformers import DynamicCache
        model, name = self.hf_model, type(self.hf_model).__name__
        token = torch.zeros(1, 1, dtype=torch.long, device=self.device)
        with torch.no_grad():
            try:
                out = model(input_ids=token, past_key_values=DynamicCache(), use_cache=True)
            except Exception as error:  # the message says which model and why
                raise ValueError(f"specops.models: {name} cannot run on a DynamicCache "
                                 f"({type(error).__name__}: {error})") from error
        cache = getattr(out, "past_key_values", None)
        layers = getattr(cache, "layers", None)
        if not layers or any(type(layer).__name__ != "DynamicLayer" for layer in layers):
            kinds = sorted({type(layer).__name__ for layer in layers or []})
            raise ValueError(f"specops.models: {name}'s cache is not one key/value tensor per "
                             f"layer (got {type(cache).__name__} with layers {kinds}); the "
                             f"decoding loop supports those models only")
        shapes = {(tuple(layer.keys.shape), tuple(layer.values.shape)) for layer in layers}
        if len(shapes) != 1:
            raise ValueError(f"specops.models: {name}'s layers cache keys/values of different "
                             f"shapes {sorted(shapes)}; the static cache needs one shape")
        (keys, values), = shapes
        if len(keys) != 4 or keys != values or keys[0] != 1 or keys[2] != 1:
            raise ValueError(f"specops.models: {name} caches keys {keys} and values {values}; "
                             f"expected (batch, kv_heads, length, head_dim) for both")
        self.num_layers = len(layers)
        self.num_kv_heads, self.head_dim = keys[1], keys[3]
        self.cache_dtype = layers[0].keys.dtype

    @property
    def weight(self) -> Tensor:
        """The output embedding matrix: where the model lives."""
        return self.hf_model.get_output_embeddings().weight

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def dtype(self) -> torch.dtype:
        return self.weight.dtype

    def __repr__(self) -> str:
        return (f"HFEagerCausalLM({type(self.hf_model).__name__}, layers={self.num_layers}, "
                f"vocab_size={self.vocab_size}, dtype={self.dtype}, device={self.device})")

    def new_cache(self, batch_size: int, capacity: int) -> StaticKVCache:
        """A zeroed :class:`StaticKVCache` of ``capacity`` slots per row (raises
        ``ValueError`` naming ``sliding_window`` when the model's window is shorter)."""
        window = active_sliding_window(self.config)
        if window is not None and window < capacity:
            raise ValueError(f"specops.models: this {self.config.model_type} model uses "
                             f"sliding_window={window}, smaller than the cache capacity "
                             f"{capacity}; use capacity <= {window}")
        return StaticKVCache(self.num_layers, batch_size, self.num_kv_heads, capacity,
                             self.head_dim, self.cache_dtype, self.device)

    def forward(self, tokens: Tensor, cache: StaticKVCache, cache_lens: Tensor,
                positions: Tensor, mask: Tensor | None = None, *,
                logits_index: Tensor | None = None, prefill: bool = False) -> Tensor:
        """The call of :meth:`specops.models.SpecopsCausalLM.forward`, same arguments and
        result: ``tokens (B, T)`` int64 over ``cache_lens (B,)`` int32 cached slots, at
        rotary/absolute positions ``positions (B, T)`` int64, attending among themselves by
        ``mask (B, T, T)`` bool (``None``: causal); keys/values go to slots
        ``cache_lens[b] + i``. Returns ``(B, N or T, vocab_size)`` float32 logits, rows
        ``logits_index (B, N)`` int64 when given. ``prefill`` is accepted for the same call
        and changes nothing here (the mask is causal when ``mask`` is ``None``)."""
        self._check_inputs(tokens, cache, cache_lens, positions, mask, logits_index, prefill)
        with torch.no_grad():
            return self._forward(tokens, cache, cache_lens, positions, mask, logits_index)

    __call__ = forward

    def _forward(self, tokens, cache, cache_lens, positions, mask, logits_index):
        from transformers import DynamicCache
        batch, num_new = tokens.shape
        cached = int(cache_lens.max())
        past = DynamicCache()
        for index, (keys, values) in enumerate(zip(cache.keys, cache.values)):
            past.update(keys[:, :, :cached], values[:, :, :cached], index)
        if mask is None:
            mask = torch.ones(num_new, num_new, dtype=torch.bool, device=tokens.device).tril()
            mask = mask.expand(batch, num_new, num_new)
        slots = torch.arange(cached, device=tokens.device)
        old = slots[None, :] < cache_lens[:, None]                          # (B, cached)
        allowed = torch.cat([old[:, None, :].expand(batch, num_new, cached), mask], dim=2)
        additive = torch.zeros(allowed.shape, dtype=self.dtype, device=tokens.device)
        additive.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        out = self.hf_model(input_ids=tokens, attention_mask=additive[:, None],
                            position_ids=positions, past_key_values=past, use_cache=True)
        for index, layer in enumerate(out.past_key_values.layers):
            kv_write(cache.keys[index], layer.keys[:, :, cached:], cache_lens)
            kv_write(cache.values[index], layer.values[:, :, cached:], cache_lens)
        logits = out.logits
        if logits_index is not None:
            index = logits_index.unsqueeze(-1).expand(-1, -1, logits.shape[-1])
            logits = logits.gather(1, index)
        return logits.float()

    def _check_inputs(self, tokens, cache, cache_lens, positions, mask, logits_index, prefill):
        check_step_inputs(_OP, self, tokens, cache, cache_lens, positions, mask, logits_index,
                          prefill)
