"""Hugging Face transformers integration: tree verification through :func:`tree_attention`.

transformers lets a model's attention be swapped through its ``AttentionInterface``; this
module registers :func:`specops.tree_attention` there under the name ``"specops_tree"`` (with a
mask function that builds nothing, since the tree mask travels as a keyword argument), and
:func:`tree_forward` runs one verification pass of a token tree with it::

    mask, depth = specops.tree_metadata(parents, num_nodes)
    out = specops.hf.tree_forward(model, tree_tokens, mask, depth, past_key_values=cache)
    probs = specops.sampling_probs(out.logits, temperature=...)   # row i: after node i

Each node gets the position ``positions[b] + depth[b, i]`` for its rotary embedding while
its key/value goes to cache slot ``cache_lens[b] + i``: positions follow the tree, slots follow
node order. Only the tree pass uses specops' attention; the model's implementation (SDPA,
eager, ...) is restored afterwards, so prefill and drafting are unchanged.

Works with models whose attention modules call ``ALL_ATTENTION_FUNCTIONS`` (Llama, Qwen2,
Mistral and most decoder-only models of transformers >= 4.48) and with ``DynamicCache``-style
caches that append the new keys/values. Rows must be unpadded (every cached slot is attended
to). A sliding window that is shorter than the context is refused: tree attention has none.
"""

import contextlib
from collections.abc import Iterator

import torch
from torch import Tensor

from .attention_ops import tree_attention

TREE_ATTENTION = "specops_tree"


def _tree_attention_forward(module: torch.nn.Module, query: Tensor, key: Tensor, value: Tensor,
                            attention_mask: Tensor | None, scaling: float | None = None,
                            dropout: float = 0.0, sliding_window: int | None = None,
                            tree_mask: Tensor | None = None, cache_lens: Tensor | None = None,
                            **kwargs) -> tuple[Tensor, None]:
    """transformers attention function: ``query [B, H, T, D]``, ``key, value [B, Hkv, S, D]``
    (the cache after this layer's update); returns ``([B, T, H, D], None)``."""
    if tree_mask is None or cache_lens is None:
        raise ValueError(f"attention {TREE_ATTENTION!r} needs tree_mask and cache_lens: run "
                         f"the model through specops.hf.tree_forward")
    if dropout:
        raise ValueError(f"attention {TREE_ATTENTION!r} is for inference: dropout must be 0, "
                         f"got {dropout} (call model.eval())")
    window = sliding_window if sliding_window is not None else getattr(module, "sliding_window",
                                                                       None)
    if window is not None and key.shape[2] > window:
        raise ValueError(f"specops tree attention has no sliding window, but this layer uses "
                         f"sliding_window={window} over {key.shape[2]} cached slots")
    out = tree_attention(query.transpose(1, 2), key, value, cache_lens, tree_mask, scale=scaling)
    return out, None


def _no_mask(*args, **kwargs) -> None:
    """Mask function for transformers: the tree mask is passed to the attention directly."""
    return None


def register_tree_attention() -> str:
    """Registers the ``"specops_tree"`` attention (and its mask function) with transformers;
    idempotent. Returns the name."""
    from transformers import AttentionInterface
    from transformers.masking_utils import AttentionMaskInterface

    AttentionInterface.register(TREE_ATTENTION, _tree_attention_forward)
    AttentionMaskInterface.register(TREE_ATTENTION, _no_mask)
    return TREE_ATTENTION


@contextlib.contextmanager
def tree_attention_enabled(model: torch.nn.Module) -> Iterator[None]:
    """``with tree_attention_enabled(model):`` the model's attention is ``"specops_tree"``;
    its previous implementation is restored on exit."""
    register_tree_attention()
    config = model.config
    previous = config._attn_implementation
    config._attn_implementation = TREE_ATTENTION
    try:
        yield
    finally:
        config._attn_implementation = previous


def active_sliding_window(config) -> int | None:
    """The sliding window a transformers config turns on, or None."""
    window = getattr(config, "sliding_window", None)
    layer_types = getattr(config, "layer_types", None)
    if layer_types is not None:
        return window if "sliding_attention" in layer_types else None
    if not getattr(config, "use_sliding_window", True):  # Qwen2-style switch
        return None
    return window


def tree_forward(model: torch.nn.Module, tree_tokens: Tensor, mask: Tensor, depth: Tensor, *,
                 past_key_values, cache_lens: Tensor | None = None,
                 positions: Tensor | None = None, **model_kwargs):
    """One verification forward pass of a token tree per row through a Hugging Face causal LM.

    Args:
        model: A transformers causal LM (e.g. ``Qwen2ForCausalLM``, ``LlamaForCausalLM``).
        tree_tokens: Shape ``(batch_size, T)``, int64; node 0 is the root (the last committed
            token, not yet cached).
        mask: Shape ``(batch_size, T, T)``, bool, and depth: Shape ``(batch_size, T)``, int32,
            from :func:`specops.tree_metadata` (nodes past ``num_nodes`` have depth -1 and
            their outputs are meaningless).
        past_key_values: The model's cache holding the committed tokens (e.g.
            ``DynamicCache``); the pass appends the ``T`` nodes' keys/values at slots
            ``cache_lens + i``.
        cache_lens: Shape ``(batch_size,)``, int32, cached tokens per row. ``None`` = the
            cache's length (every row the same, no padding).
        positions: Shape ``(batch_size,)``, int64, the root's absolute position. ``None`` =
            ``cache_lens``; node ``i`` sits at ``positions + depth[:, i]``.
        **model_kwargs: Passed to ``model(...)`` (e.g. ``logits_to_keep``).

    Returns:
        The model's output; ``.logits`` has shape ``(batch_size, T, vocab_size)``, row ``i``
        the target's next-token logits after node ``i``, as :func:`specops.tree_verify` and
        :func:`specops.tree_verify_greedy` expect them.
    """
    batch, num_nodes = tree_tokens.shape
    if cache_lens is None:
        cache_lens = torch.full((batch,), past_key_values.get_seq_length(), dtype=torch.int32,
                                device=tree_tokens.device)
    window = active_sliding_window(model.config)
    if window is not None and past_key_values.get_seq_length() + num_nodes > window:
        raise ValueError(f"specops tree attention has no sliding window, but "
                         f"{type(model).__name__} uses sliding_window={window}, shorter than "
                         f"the {past_key_values.get_seq_length() + num_nodes} tokens of this "
                         f"pass: verify this model with its own attention")
    if positions is None:
        positions = cache_lens.long()
    position_ids = positions[:, None] + depth.long().clamp(min=0)
    with tree_attention_enabled(model):
        return model(input_ids=tree_tokens, position_ids=position_ids,
                     past_key_values=past_key_values, use_cache=True, tree_mask=mask,
                     cache_lens=cache_lens, **model_kwargs)
