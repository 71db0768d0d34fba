"""A compact, graph-safe forward pass for Llama-family causal LMs (Llama, Mistral, Qwen2).

Hugging Face modeling code builds masks and caches with Python logic that CUDA graphs cannot
capture, so the decoding loop runs the model through :class:`SpecopsCausalLM` instead. It
reads the Hugging Face model's own parameters at call time (nothing is copied: an in-place
change to a weight shows in the next call), keeps keys/values in a :class:`StaticKVCache`
owned by the caller, writes them as :func:`specops.kv_write` does (through one
:class:`specops.kv_ops.KVSlotWriter` per forward: the slot arithmetic once for every layer)
and attends with :func:`specops.tree_attention`, so one forward serves prefill, chain and
tree steps::

    lm = specops.models.causal_lm(hf_model)
    cache = lm.new_cache(batch_size=2, capacity=1024)
    logits = lm(tokens, cache, cache_lens, positions, mask)   # (B, T, V) float32

The layer is the one these three families share: RMSNorm before attention and MLP, rotary
embedding from the model's own ``rotary_emb`` module (so every rope scaling type computes
exactly as in transformers), grouped-query attention with optional q/k/v/o biases (Qwen2 has
q/k/v biases, Llama's ``attention_bias``/``mlp_bias`` switch them on) and a SiLU-gated MLP.
"""

import types

import torch
import torch.nn.functional as F
from torch import Tensor

from ..attention_ops import tree_attention
from ..hf import active_sliding_window
from ..kv_ops import KVSlotWriter, kv_write_checks
from ..linear_ops import model_linear
from .cache import StaticKVCache, check_step_inputs

SUPPORTED_MODEL_TYPES = ("llama", "mistral", "qwen2")
_LAYER_KERNELS = ("auto", "torch", "triton")
_OP = "SpecopsCausalLM.forward"


def _rms_norm(x: Tensor, norm: torch.nn.Module) -> Tensor:
    """Hugging Face's RMSNorm numerics: normalise in float32, cast back, then scale."""
    x32 = x.float()
    x32 = x32 * torch.rsqrt(x32.pow(2).mean(-1, keepdim=True) + norm.variance_epsilon)
    return norm.weight * x32.to(x.dtype)


def _add_rms_norm(fused, hidden: Tensor, delta: Tensor | None,
                  norm: torch.nn.Module) -> tuple[Tensor, Tensor]:
    """``(hidden + delta, RMSNorm of it)`` (``delta`` None: nothing added), in one fused
    Triton launch when ``fused`` is the layer-kernel module, else as PyTorch composes it."""
    if fused is not None and norm.weight.dtype == hidden.dtype:
        return fused.add_rms_norm_triton(hidden, delta, norm.weight, norm.variance_epsilon)
    if delta is not None:
        hidden = hidden + delta
    return hidden, _rms_norm(hidden, norm)


def _rotary(x: Tensor, cos: Tensor, sin: Tensor) -> Tensor:
    """``x (B, T, heads, D)``, ``cos, sin (B, T, 1, D)``: Hugging Face's
    ``apply_rotary_pos_emb`` (rotate_half convention), in token-major layout."""
    half = x.shape[-1] // 2
    rotated = torch.cat((-x[..., half:], x[..., :half]), dim=-1)
    return x * cos + rotated * sin


def _linear(x: Tensor, proj: torch.nn.Module) -> Tensor:
    """``proj(x)`` with the module's own parameters, read in place, routed by
    :func:`specops.linear_ops.model_linear` (the CPU kernel for a decode or verify step,
    oneDNN's matmul for a float32 prefill on the CPU, F.linear otherwise)."""
    return model_linear(x, proj.weight, proj.bias)


class SpecopsCausalLM:
    """A Llama / Mistral / Qwen2 ``*ForCausalLM`` driven through a static KV cache.

    Build it with :func:`specops.models.causal_lm`. Only Python structure (module references,
    head counts) is taken at wrap time; parameters and buffers are read from ``hf_model`` on
    every call.

    Args:
        model: A Llama / Mistral / Qwen2 ``*ForCausalLM`` with a SiLU-gated MLP.
        layer_kernels: How the layer's elementwise work runs (residual add + RMSNorm, rotary,
            SiLU gate, the K/V cache write). ``"auto"``: fused Triton kernels
            (:mod:`specops.triton_kernels.layers`: 4 launches a layer where eager PyTorch
            launches about 40, and a CUDA-graph replay's time goes with the count) for
            inputs on CUDA, the PyTorch composition elsewhere; ``"torch"``: always the
            composition; ``"triton"``: always the Triton kernels (on the CPU only under
            ``TRITON_INTERPRET=1``, for tests). Inside ``torch.compile`` the composition
            runs whatever this says (Inductor fuses it).

    Attributes:
        hf_model: The wrapped transformers model (its weights are used in place).
        config: ``hf_model.config``.
        vocab_size: Rows of ``lm_head`` (the logits' last dim; may exceed the tokenizer's size).
        device, dtype: Those of the embedding matrix now (they follow ``hf_model.to(...)``);
            caches and compute use them (``cache_dtype`` = ``dtype``).
        num_layers: Decoder layers.
        graph_safe: ``True``: the loop may capture this forward in a device graph.
    """

    def __init__(self, model: torch.nn.Module, *, layer_kernels: str = "auto"):
        if layer_kernels not in _LAYER_KERNELS:
            raise ValueError(f"specops.models: layer_kernels={layer_kernels!r}, expected one "
                             f"of {', '.join(map(repr, _LAYER_KERNELS))}")
        config = getattr(model, "config", None)
        model_type = getattr(config, "model_type", None)
        if model_type not in SUPPORTED_MODEL_TYPES:
            raise ValueError(f"specops.models: unsupported model type {model_type!r} "
                             f"({type(model).__name__}); supported: "
                             f"{', '.join(SUPPORTED_MODEL_TYPES)}")
        if not (hasattr(model, "model") and hasattr(model, "lm_head")):
            raise ValueError(f"specops.models: {type(model).__name__} has no .model/.lm_head: "
                             f"pass the *ForCausalLM model, not the bare decoder")
        if getattr(config, "hidden_act", None) not in ("silu", "swish"):
            raise ValueError(f"specops.models: only SiLU-gated MLPs are supported, "
                             f"{model_type} config has hidden_act={config.hidden_act!r}")
        rope_type = getattr(model.model.rotary_emb, "rope_type", "default")
        if "dynamic" in str(rope_type):
            # Dynamic NTK rescales every position by the longest one in the call, a Python
            # branch on tensor values; keys cached at older scales would disagree anyway.
            raise ValueError(f"specops.models: rope type {rope_type!r} depends on the sequence "
                             f"length seen so far and cannot run on a static cache")
        self.hf_model = model
        self.config = config
        self.layer_kernels = layer_kernels
        self.num_heads = config.num_attention_heads
        self.num_kv_heads = getattr(config, "num_key_value_heads", None) or self.num_heads
        if self.num_heads % self.num_kv_heads:
            raise ValueError(f"specops.models: {self.num_kv_heads} kv heads must divide "
                             f"{self.num_heads} query heads")
        self.head_dim = getattr(config, "head_dim", None) or config.hidden_size // self.num_heads
        # a bool here: compiled with dynamic shapes, an int comparison in the forward becomes
        # a SymBool, which scaled_dot_product_attention's enable_gqa refuses
        self.grouped = self.num_heads != self.num_kv_heads
        self.scale = self.head_dim ** -0.5
        self._layers = list(model.model.layers)
        self.num_layers = len(self._layers)
        self.vocab_size = model.lm_head.weight.shape[0]

    graph_safe = True  # sync-free, static shapes: the loop may capture it in a device graph

    @property
    def weight(self) -> Tensor:
        """The embedding matrix: where the model lives."""
        return self.hf_model.model.embed_tokens.weight

    @property
    def device(self) -> torch.device:
        return self.hf_model.model.embed_tokens.weight.device

    @property
    def cache_dtype(self) -> torch.dtype:
        return self.dtype

    @property
    def dtype(self) -> torch.dtype:
        return self.hf_model.model.embed_tokens.weight.dtype

    def __repr__(self) -> str:
        return (f"SpecopsCausalLM({type(self.hf_model).__name__}, layers={self.num_layers}, "
                f"vocab_size={self.vocab_size}, dtype={self.dtype}, device={self.device})")

    def new_cache(self, batch_size: int, capacity: int) -> StaticKVCache:
        """A zeroed :class:`StaticKVCache` for this model: ``capacity`` slots per row.

        Raises ``ValueError`` naming ``sliding_window`` when the model's active sliding window
        (some Mistral and Qwen2 configurations) is smaller than ``capacity``: tree attention
        attends to every cached slot, so it would differ from the model past the window.
        """
        window = active_sliding_window(self.config)
        if window is not None and window < capacity:
            raise ValueError(f"specops.models: this {self.config.model_type} model uses "
                             f"sliding_window={window}, smaller than the cache capacity "
                             f"{capacity}; specops' tree attention has no sliding window, so "
                             f"use capacity <= {window}")
        return StaticKVCache(self.num_layers, batch_size, self.num_kv_heads, capacity,
                             self.head_dim, self.dtype, self.device)

    def forward(self, tokens: Tensor, cache: StaticKVCache, cache_lens: Tensor,
                positions: Tensor, mask: Tensor | None = None, *,
                logits_index: Tensor | None = None, prefill: bool = False) -> Tensor:
        """Runs ``T`` new tokens per row over the cached ones and writes their keys/values.

        Token ``i`` of row ``b`` gets rotary position ``positions[b, i]``, writes its key and
        value (after rotary) to slot ``cache_lens[b] + i`` of every layer, and attends to the
        cached slots ``[0, cache_lens[b])`` plus the new tokens ``j`` with ``mask[b, i, j]``.
        For a tree from :func:`specops.tree_metadata`, pass its ``mask`` and
        ``positions = root position + depth``: row ``i`` of the logits is then the model's
        next-token logits after the root-to-node-``i`` path. Sync-free, with static shapes:
        capturable in a CUDA graph and by ``torch.compile(fullgraph=True)`` per input shape.

        Args:
            tokens: Shape ``(batch_size, T)``, int64 in ``0..vocab_size - 1``.
            cache: From :meth:`new_cache`; updated in place (slots past ``cache_lens[b] + T``
                untouched). The caller keeps ``cache_lens + T <= cache.capacity``.
            cache_lens: Shape ``(batch_size,)``, int32: tokens already cached per row. Not
                modified; the caller advances it (or :func:`specops.kv_commit` does).
            positions: Shape ``(batch_size, T)``, int64: each token's rotary position (its
                absolute position in the sequence, not its slot).
            mask: Shape ``(batch_size, T, T)``, bool: ``mask[b, i, j]`` iff new token ``i``
                attends to new token ``j``. ``None`` = causal (``j <= i``).
            logits_index: Shape ``(batch_size, N)``, int64 in ``0..T - 1``: only these rows
                go through the final norm and ``lm_head`` (e.g. each prompt's last token).
                ``None`` = all ``T`` rows.
            prefill: The caller promises that every ``cache_lens`` is 0 (not checked: that
                would sync) and ``mask`` is ``None``; attention then runs as causal
                ``scaled_dot_product_attention`` on the new keys/values, fast for long
                prompts. Rows may be right-padded: a pad token's junk entry lies past the
                row's length, is never attended to and is overwritten later.

        Returns:
            Shape ``(batch_size, N or T, vocab_size)``, float32 (computed in the model's dtype).
        """
        self._check_inputs(tokens, cache, cache_lens, positions, mask, logits_index, prefill)
        with torch.no_grad():
            return self._forward(tokens, cache, cache_lens, positions, mask, logits_index,
                                 prefill)

    __call__ = forward

    def compiled(self, *, any_length: bool = False, **options):
        """:meth:`forward` with its tensor work compiled by ``torch.compile(fullgraph=True,
        **options)`` (TorchInductor: it fuses the elementwise kernels that eager mode
        launches one by one, about 40 a layer). The input checks stay eager.

        By default for the loop's fixed-shape steps: each new input shape compiles once more
        (after the second, ``torch.compile``'s automatic dynamic shapes take over).
        ``any_length=True`` is for calls of every length (prefills, a draft's catch-up): it
        compiles with dynamic shapes (``dynamic=True`` unless ``options`` say otherwise).
        Each call compiles its own copy of the forward's code, so compiled versions never
        mix between calls (the any-length one stays apart from the steps' specialised one).
        Used by ``SpeculativeGenerator(compile=True)``; with CUDA graphs, the graph captures
        the compiled kernels."""
        if any_length:
            options.setdefault("dynamic", True)
        # torch.compile keeps its compiled code per code object, and at most
        # torch._dynamo.config.recompile_limit (8) versions of it, past which fullgraph=True
        # fails outright. Every model wrapper, cache shape and mode adds versions, so each
        # compiled() call compiles a private copy of _forward's code: its versions are its
        # own (a test suite, or an engine building several generators, hit the limit).
        forward_fn = SpecopsCausalLM._forward
        private = types.FunctionType(forward_fn.__code__.replace(), forward_fn.__globals__,
                                     forward_fn.__name__, forward_fn.__defaults__,
                                     forward_fn.__closure__)
        run = torch.compile(types.MethodType(private, self), fullgraph=True, **options)
        marked = []   # the last cache whose capacity was marked dynamic

        def forward(tokens, cache, cache_lens, positions, mask=None, *, logits_index=None,
                    prefill=False):
            self._check_inputs(tokens, cache, cache_lens, positions, mask, logits_index,
                               prefill)
            if not marked or marked[0] is not cache:
                # a cache of another capacity (a call with more new tokens) would otherwise
                # compile every step shape again (tens of seconds at the Qwen2.5-1.5B shape
                # on the CPU); nothing specialises on the capacity
                for t in cache.tensors():
                    torch._dynamo.maybe_mark_dynamic(t, 2)
                marked[:] = [cache]
            with torch.no_grad():
                return run(tokens, cache, cache_lens, positions, mask, logits_index, prefill)

        return forward

    def _forward(self, tokens, cache, cache_lens, positions, mask, logits_index, prefill):
        inner = self.hf_model.model
        batch, num_new = tokens.shape
        fused = self._fused_kernels(tokens.device)
        hidden = F.embedding(tokens, inner.embed_tokens.weight)
        cos, sin = inner.rotary_emb(hidden, positions)  # (B, T, D) each, model dtype
        if mask is None and not prefill:
            causal = torch.ones(num_new, num_new, dtype=torch.bool, device=tokens.device).tril()
            mask = causal.expand(batch, num_new, num_new).contiguous()
        # kv_write for every layer's K and V at the same slots: the index work once (the
        # fused kernels write the cache themselves)
        writer = KVSlotWriter(cache.keys[0], cache_lens, num_new) if fused is None else None
        pending = None   # the last sublayer's output, added to hidden by the next norm
        for index, (layer, keys, values) in enumerate(zip(self._layers, cache.keys,
                                                          cache.values)):
            attn = layer.self_attn
            hidden, x = _add_rms_norm(fused, hidden, pending, layer.input_layernorm)
            q = _linear(x, attn.q_proj).view(batch, num_new, self.num_heads, self.head_dim)
            k = _linear(x, attn.k_proj).view(batch, num_new, self.num_kv_heads, self.head_dim)
            v = _linear(x, attn.v_proj).view(batch, num_new, self.num_kv_heads, self.head_dim)
            if fused is not None:
                if index == 0:   # kv_write's checks, once: every layer writes these slots
                    kv_write_checks(keys, k.transpose(1, 2), cache_lens)
                fused.rotary_kv_write_triton_(q, k, v, cos, sin, keys, values, cache_lens)
                k, v = k.transpose(1, 2), v.transpose(1, 2)
            else:
                cos_h, sin_h = cos.unsqueeze(2), sin.unsqueeze(2)  # broadcast over heads
                q, k = _rotary(q, cos_h, sin_h), _rotary(k, cos_h, sin_h)
                k, v = k.transpose(1, 2), v.transpose(1, 2)  # (B, Hkv, T, D): cache order
                writer.write(keys, k)
                writer.write(values, v)
            if prefill:
                out = F.scaled_dot_product_attention(
                    q.transpose(1, 2), k, v, is_causal=True, scale=self.scale,
                    enable_gqa=self.grouped).transpose(1, 2)
            else:
                out = tree_attention(q, keys, values, cache_lens, mask, scale=self.scale)
            attended = _linear(out.reshape(batch, num_new, -1), attn.o_proj)
            hidden, x = _add_rms_norm(fused, hidden, attended, layer.post_attention_layernorm)
            mlp = layer.mlp
            gate, up = _linear(x, mlp.gate_proj), _linear(x, mlp.up_proj)
            gated = fused.silu_mul_triton(gate, up) if fused is not None else F.silu(gate) * up
            pending = _linear(gated, mlp.down_proj)
        if logits_index is not None:
            rows = logits_index.unsqueeze(-1).expand(-1, -1, hidden.shape[-1])
            hidden = hidden.gather(1, rows)
            pending = pending.gather(1, rows) if pending is not None else None
        _, hidden = _add_rms_norm(fused, hidden, pending, inner.norm)
        return _linear(hidden, self.hf_model.lm_head).float()

    def _fused_kernels(self, device: torch.device):
        """The module of fused Triton layer kernels when this call uses them, else None
        (PyTorch composition): see ``layer_kernels`` of the constructor."""
        if self.layer_kernels == "torch" or torch.compiler.is_compiling():
            return None   # torch.compile fuses the composition itself
        if self.layer_kernels == "auto" and device.type != "cuda":
            return None
        from ..triton_kernels import layers
        return layers

    def _check_inputs(self, tokens, cache, cache_lens, positions, mask, logits_index, prefill):
        check_step_inputs(_OP, self, tokens, cache, cache_lens, positions, mask, logits_index,
                          prefill)
