"""specops' own model forward: Hugging Face weights, a static KV cache, specops attention.

:func:`causal_lm` wraps a transformers causal LM in a :class:`SpecopsCausalLM`, whose forward
is sync-free and shape-static (so the decoding loop can capture it in CUDA graphs) and serves
prefill, chain and tree steps through one call. Supported: ``LlamaForCausalLM``,
``MistralForCausalLM``, ``Qwen2ForCausalLM`` (``config.model_type`` in
:data:`SUPPORTED_MODEL_TYPES`).

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
from .llama import SUPPORTED_MODEL_TYPES, SpecopsCausalLM

__all__ = ["causal_lm", "SpecopsCausalLM", "StaticKVCache", "SUPPORTED_MODEL_TYPES"]


def causal_lm(model: torch.nn.Module) -> SpecopsCausalLM:
    """Wraps a transformers causal LM for specops' forward, using its weights in place.

    Args:
        model: A ``LlamaForCausalLM``, ``MistralForCausalLM`` or ``Qwen2ForCausalLM`` (by
            ``config.model_type``), with a SiLU-gated MLP; or a :class:`SpecopsCausalLM`,
            returned as it is.

    Returns:
        The wrapper; its forward runs under ``torch.no_grad`` whatever the model's mode.

    Raises:
        ValueError: for any other model type (the message names it and the supported ones),
            another activation, or a dynamic rope scaling.
    """
    if isinstance(model, SpecopsCausalLM):
        return model
    return SpecopsCausalLM(model)
