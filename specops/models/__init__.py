"""specops' own model forward: Hugging Face weights, a static KV cache, specops attention.

:func:`causal_lm` wraps a transformers causal LM for the decoding loop. Llama, Mistral and
Qwen2 (``config.model_type`` in :data:`SUPPORTED_MODEL_TYPES`, SiLU-gated MLP) get a
:class:`SpecopsCausalLM`, whose forward is sync-free and shape-static (so the loop can capture
it in device graphs) and serves prefill, chain and tree steps through one call. Other
decoder-only models fall back to :class:`HFEagerCausalLM`: the same call through Hugging
Face's own forward, eager, never graphed (:mod:`specops.models.hf_eager` says which models it
takes).

>>> lm = specops.models.causal_lm(hf_model)  # e.g. a Qwen2ForCausalLM
>>> cache = lm.new_cache(batch_size=1, capacity=64)
>>> prompt = torch.tensor([[5, 6, 7]])
>>> logits = lm(prompt, cache, torch.zeros(1, dtype=torch.int32), torch.arange(3)[None],
...             logits_index=torch.tensor([[2]]), prefill=True)  # after the last prompt token
>>> logits.shape[:2], logits.dtype
(torch.Size([1, 1]), torch.float32)
>>> # Then one decode step: token 8 at slot and position 3.
>>> logits = lm(torch.tensor([[8]]), cache, torch.tensor([3], dtype=torch.int32),
...             torch.tensor([[3]]))
"""

import torch

from .cache import StaticKVCache
from .hf_eager import HFEagerCausalLM
from .llama import SUPPORTED_MODEL_TYPES, SpecopsCausalLM

__all__ = ["causal_lm", "CausalLM", "HFEagerCausalLM", "SpecopsCausalLM", "StaticKVCache",
           "SUPPORTED_MODEL_TYPES"]

CausalLM = SpecopsCausalLM | HFEagerCausalLM


def causal_lm(model: torch.nn.Module, *, hf_forward: bool = False) -> CausalLM:
    """Wraps a transformers causal LM for the decoding loop, using its weights in place.

    Args:
        model: A transformers ``*ForCausalLM``; or a wrapper from an earlier call, returned
            as it is.
        hf_forward: Run even a supported family through :class:`HFEagerCausalLM` (for
            comparison or debugging; slower, never graphed).

    Returns:
        A :class:`SpecopsCausalLM` for Llama / Mistral / Qwen2 with a SiLU-gated MLP, else
        an :class:`HFEagerCausalLM`. Its forward runs under ``torch.no_grad``.

    Raises:
        ValueError: for a dynamic rope scaling (either path), or a model the fallback cannot
            hold (encoder-decoder, a cache that is not one key/value tensor per layer, ...):
            the message names the model and the reason.
    """
    if isinstance(model, (SpecopsCausalLM, HFEagerCausalLM)):
        return model
    config = getattr(model, "config", None)
    native = (getattr(config, "model_type", None) in SUPPORTED_MODEL_TYPES
              and getattr(config, "hidden_act", None) in ("silu", "swish"))
    return SpecopsCausalLM(model) if native and not hf_forward else HFEagerCausalLM(model)
