"""specops.models: the compact forward over a static KV cache gives Hugging Face's logits.

Tiny random Qwen2, Llama and Mistral models built from configs (no downloads): a ragged,
right-padded prefill, then a causal chain step, then a token tree, each compared with the
transformers model run on the plain sequences; the weights are the model's own (read in
place); bad models and inputs are refused; ``torch.compile(fullgraph=True)`` and CUDA graph
capture give the eager result.
"""

import doctest

import pytest
import torch

import specops
import specops.linear_ops
import specops.models
from helpers import DEVICES

transformers = pytest.importorskip("transformers")

VOCAB = {"qwen2": 113, "llama": 96, "mistral": 130}
# Each family with the options that exercise its code paths: Qwen2's q/k/v biases; Llama
# with every bias, tied embeddings and llama3 rope scaling; Mistral with a head_dim that is not
# hidden / heads and a (long) sliding window.
OPTIONS = {
    "qwen2": dict(),
    "llama": dict(attention_bias=True, mlp_bias=True, tie_word_embeddings=True,
                  rope_parameters=dict(rope_type="llama3", rope_theta=10000.0, factor=8.0,
                                       low_freq_factor=1.0, high_freq_factor=4.0,
                                       original_max_position_embeddings=16)),
    "mistral": dict(head_dim=32, sliding_window=64),
}
# model dtype -> (atol, rtol) on logits against the transformers model in the same dtype.
# |logits| < 4 here. fp32 agrees to ~2e-6; in bf16/fp16 tree attention accumulates in float32
# where transformers' SDPA rounds its scores, a few ulps of the logits (bf16 ulp at 2: 1.6e-2).
TOLERANCE = {torch.float32: (1e-4, 1e-4), torch.bfloat16: (6e-2, 2e-2),
             torch.float16: (1e-2, 5e-3)}


def tiny_model(kind: str, dtype=torch.float32, device="cpu", **overrides):
    config_class, model_class = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[kind]
    options = dict(vocab_size=VOCAB[kind], hidden_size=64, intermediate_size=128,
                   num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                   max_position_embeddings=256, initializer_range=0.1,
                   attn_implementation="sdpa", **OPTIONS[kind])
    options.update(overrides)
    torch.manual_seed(0)
    model = model_class(config_class(**options))
    with torch.no_grad():  # biases start at 0 and norms at 1: make them matter
        for param in model.parameters():
            if param.dim() == 1:
                param.add_(torch.randn_like(param) * 0.2)
    return model.to(device=device, dtype=dtype).eval()


def hf_logits(model, sequence: torch.Tensor) -> torch.Tensor:
    """The transformers model on one unpadded sequence: ``(len, V)`` float32."""
    with torch.no_grad():
        return model(sequence[None]).logits[0].float()


def close(actual, expected, dtype, what):
    atol, rtol = TOLERANCE[dtype]
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


def i32(values, device):
    return torch.tensor(values, dtype=torch.int32, device=device)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("kind", list(VOCAB))
def test_prefill_chain_and_tree_steps_match_transformers(kind, dtype, device):
    model = tiny_model(kind, dtype, device)
    lm = specops.models.causal_lm(model)
    assert (lm.vocab_size, lm.num_layers, lm.dtype) == (VOCAB[kind], 2, dtype)
    gen = torch.Generator().manual_seed(1)
    batch, num_chain, num_nodes = 3, 4, 8
    lens = [9, 4, 7]  # ragged prompts, right-padded with junk tokens
    prompt = torch.randint(0, VOCAB[kind], (batch, max(lens)), generator=gen).to(device)
    cache = lm.new_cache(batch, 32)

    # Prefill: logits after each row's last prompt token.
    cache_lens = i32([0] * batch, device)
    positions = torch.arange(max(lens), device=device).expand(batch, -1)
    last = torch.tensor(lens, device=device)[:, None] - 1
    logits = lm(prompt, cache, cache_lens, positions, logits_index=last, prefill=True)
    assert logits.shape == (batch, 1, VOCAB[kind]) and logits.dtype == torch.float32
    assert cache_lens.tolist() == [0] * batch  # not mutated
    for b in range(batch):
        close(logits[b, 0], hf_logits(model, prompt[b, :lens[b]])[-1], dtype, f"prefill row {b}")

    # Chain step: num_chain tokens per row at the ragged lengths, causal among themselves.
    chain = torch.randint(0, VOCAB[kind], (batch, num_chain), generator=gen).to(device)
    cache_lens = i32(lens, device)
    positions = cache_lens.long()[:, None] + torch.arange(num_chain, device=device)
    logits = lm(chain, cache, cache_lens, positions)
    assert logits.shape == (batch, num_chain, VOCAB[kind])
    committed = [torch.cat([prompt[b, :lens[b]], chain[b]]) for b in range(batch)]
    for b in range(batch):
        close(logits[b], hf_logits(model, committed[b])[lens[b]:], dtype, f"chain row {b}")

    # Tree step: node i's logits are those after the root-to-node-i path (row 1 uses 5 nodes).
    parents = (torch.rand(batch, num_nodes, generator=gen) * torch.arange(num_nodes)).int()
    parents[:, 0] = -1
    used = torch.tensor([num_nodes, 5, num_nodes], dtype=torch.int32)
    tree_tokens = torch.randint(0, VOCAB[kind], (batch, num_nodes), generator=gen)
    mask, depth = specops.tree_metadata(parents, used)
    paths, _ = specops.tree_paths(parents, used)
    cache_lens = i32([n + num_chain for n in lens], device)
    positions = cache_lens.long()[:, None] + depth.long().clamp(min=0).to(device)
    logits = lm(tree_tokens.to(device), cache, cache_lens, positions, mask.to(device))
    for b in range(batch):
        for i in range(int(used[b])):
            path = paths[b, i][paths[b, i] >= 0]
            sequence = torch.cat([committed[b], tree_tokens[b, path].to(device)])
            close(logits[b, i], hf_logits(model, sequence)[-1], dtype,
                  f"tree row {b} node {i} path {path.tolist()}")


def test_prefill_flag_only_changes_the_attention_kernel():
    """SDPA prefill and tree-attention prefill write the same cache and logits."""
    lm = specops.models.causal_lm(tiny_model("qwen2"))
    prompt = torch.randint(0, VOCAB["qwen2"], (2, 10), generator=torch.Generator().manual_seed(2))
    positions = torch.arange(10).expand(2, -1)
    runs = []
    for prefill in (True, False):
        cache = lm.new_cache(2, 16)
        logits = lm(prompt, cache, i32([0, 0], "cpu"), positions, prefill=prefill)
        runs.append((logits, cache.tensors()))
    torch.testing.assert_close(runs[0][0], runs[1][0], atol=1e-5, rtol=1e-5)
    for index, (sdpa_kv, tree_kv) in enumerate(zip(runs[0][1], runs[1][1])):
        exact = index < 2  # layer 0's K/V come before any attention; later ones after it
        tolerance = 0 if exact else 1e-5
        torch.testing.assert_close(sdpa_kv, tree_kv, atol=tolerance, rtol=tolerance)
        assert sdpa_kv[:, :, :10].abs().sum() > 0 and sdpa_kv[:, :, 10:].abs().sum() == 0


def _prefill_last_logits(lm, prompt, lens):
    batch, width = prompt.shape
    cache = lm.new_cache(batch, width + 8)
    return lm(prompt, cache, i32([0] * batch, "cpu"), torch.arange(width).expand(batch, -1),
              logits_index=torch.tensor(lens)[:, None] - 1, prefill=True)


@pytest.mark.skipif(not specops.linear_ops._ONEDNN_LINEAR,
                    reason="this torch build has no oneDNN (the prefill then uses F.linear)")
def test_long_float32_prefill_uses_onednn(monkeypatch):
    """A float32 prefill longer than skinny_linear's rows runs every projection through
    oneDNN's matmul (F.linear never called), ragged right-padded rows included, and gives
    transformers' logits."""
    model = tiny_model("qwen2", max_position_embeddings=512)
    lm = specops.models.causal_lm(model)
    lens = [250, 171]
    prompt = torch.randint(0, VOCAB["qwen2"], (2, 250), generator=torch.Generator().manual_seed(3))
    expected = [hf_logits(model, prompt[b, :lens[b]])[-1] for b in range(2)]
    calls = []
    real = torch.ops.mkldnn._linear_pointwise

    def counting_onednn(x, *args):
        calls.append(x.shape[0])
        return real(x, *args)

    def no_f_linear(*args, **kwargs):
        raise AssertionError("F.linear called: a float32 prefill should run on oneDNN")
    monkeypatch.setattr(torch.nn.functional, "linear", no_f_linear)
    monkeypatch.setattr(torch.ops.mkldnn, "_linear_pointwise", counting_onednn)
    logits = _prefill_last_logits(lm, prompt, lens)
    assert calls and set(calls) == {500}, calls   # every projection of the 2 x 250 rows
    for b in range(2):
        close(logits[b, 0], expected[b], torch.float32, f"prefill row {b}")


def test_prefill_without_onednn_uses_f_linear(monkeypatch):
    """Without oneDNN a float32 prefill past skinny_linear's rows goes to F.linear and still
    gives transformers' logits."""
    model = tiny_model("qwen2")
    lm = specops.models.causal_lm(model)
    prompt = torch.randint(0, VOCAB["qwen2"], (2, 40), generator=torch.Generator().manual_seed(4))
    expected = [hf_logits(model, prompt[b])[-1] for b in range(2)]
    monkeypatch.setattr(specops.linear_ops, "_ONEDNN_LINEAR", False)
    calls = []
    real_linear = torch.nn.functional.linear

    def counting_linear(x, *args, **kwargs):
        calls.append(x.shape[:-1].numel())
        return real_linear(x, *args, **kwargs)
    monkeypatch.setattr(torch.nn.functional, "linear", counting_linear)
    logits = _prefill_last_logits(lm, prompt, [40, 40])
    assert calls and set(calls) == {80}, calls   # every projection of the 2 x 40 rows
    for b in range(2):
        close(logits[b, 0], expected[b], torch.float32, f"prefill row {b}")


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_every_parameter_is_read_in_place(kind):
    """Perturbing any parameter of the transformers model in place changes the next output,
    and the perturbed model still matches transformers: no weight was copied or cached."""
    model = tiny_model(kind)
    lm = specops.models.causal_lm(model)
    if kind == "llama":
        assert model.lm_head.weight is model.model.embed_tokens.weight  # tied
    tokens = torch.randint(0, VOCAB[kind], (1, 6), generator=torch.Generator().manual_seed(3))
    positions = torch.arange(6)[None]

    def run():
        return lm(tokens, lm.new_cache(1, 8), i32([0], "cpu"), positions)

    baseline = run()
    gen = torch.Generator().manual_seed(4)
    for name, param in model.named_parameters():
        noise = torch.randn(param.shape, generator=gen) * 0.5
        with torch.no_grad():
            param.add_(noise)
        assert not torch.allclose(run(), baseline, atol=1e-4), f"{name} is not read in place"
    torch.testing.assert_close(run()[0], hf_logits(model, tokens[0]), atol=1e-4, rtol=1e-4)


def test_other_models_fall_back_and_the_compact_forward_refuses_them():
    """causal_lm sends what the compact forward cannot run to Hugging Face's forward
    (tests/test_hf_eager.py checks that path); the compact class itself refuses them."""
    gpt2 = transformers.GPT2LMHeadModel(transformers.GPT2Config(
        n_layer=1, n_embd=32, n_head=2, vocab_size=50, n_positions=32))
    gelu = tiny_model("llama", hidden_act="gelu")
    for model in (gpt2, gelu):
        assert isinstance(specops.models.causal_lm(model), specops.models.HFEagerCausalLM)
    assert isinstance(specops.models.causal_lm(tiny_model("qwen2")),
                      specops.models.SpecopsCausalLM)
    with pytest.raises(ValueError, match=r"'gpt2'.*llama, mistral, qwen2"):
        specops.models.SpecopsCausalLM(gpt2)
    with pytest.raises(ValueError, match="hidden_act='gelu'"):
        specops.models.SpecopsCausalLM(gelu)
    dynamic = dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0)
    with pytest.raises(ValueError, match="'dynamic'"):
        specops.models.causal_lm(tiny_model("llama", rope_parameters=dynamic))


@pytest.mark.parametrize("kind, overrides", [
    ("mistral", dict(sliding_window=16)),
    ("qwen2", dict(use_sliding_window=True, sliding_window=16, max_window_layers=0)),
])
def test_sliding_window_shorter_than_capacity_is_refused(kind, overrides):
    lm = specops.models.causal_lm(tiny_model(kind, **overrides))
    assert lm.new_cache(1, 16).capacity == 16  # the window covers every slot
    with pytest.raises(ValueError, match="sliding_window=16"):
        lm.new_cache(1, 17)
    # Qwen2's window is off unless use_sliding_window is set.
    assert specops.models.causal_lm(tiny_model("qwen2")).new_cache(1, 4096).capacity == 4096


def test_bad_inputs_name_the_argument():
    lm = specops.models.causal_lm(tiny_model("qwen2"))
    cache, lens, tokens, positions = lm.new_cache(2, 8), i32([0, 0], "cpu"), \
        torch.zeros(2, 3, dtype=torch.long), torch.arange(3).expand(2, -1)
    with pytest.raises(TypeError, match="tokens must be int64"):
        lm(tokens.int(), cache, lens, positions)
    with pytest.raises(TypeError, match="cache_lens must be int32"):
        lm(tokens, cache, lens.long(), positions)
    with pytest.raises(ValueError, match="positions.shape"):
        lm(tokens, cache, lens, positions[:, :2])
    with pytest.raises(ValueError, match="mask.shape"):
        lm(tokens, cache, lens, positions, torch.ones(2, 3, 2, dtype=torch.bool))
    with pytest.raises(ValueError, match="prefill=True .* no mask"):
        lm(tokens, cache, lens, positions, torch.ones(2, 3, 3, dtype=torch.bool), prefill=True)
    with pytest.raises(ValueError, match="cache must hold"):
        lm(tokens, lm.new_cache(1, 8), lens, positions)
    with pytest.raises(ValueError, match="cache_lens"):  # past the capacity (kv_write's check)
        lm(tokens, cache, i32([6, 0], "cpu"), positions)


def _decode_inputs(lm, device):
    """A prefilled cache and one decode step's inputs (T=1) for two rows."""
    gen = torch.Generator().manual_seed(5)
    prompt = torch.randint(0, lm.vocab_size, (2, 6), generator=gen).to(device)
    cache = lm.new_cache(2, 16)
    lm(prompt, cache, i32([0, 0], device), torch.arange(6, device=device).expand(2, -1),
       logits_index=torch.zeros(2, 1, dtype=torch.long, device=device), prefill=True)
    token = torch.randint(0, lm.vocab_size, (2, 1), generator=gen).to(device)
    return token, cache, i32([6, 4], device), torch.tensor([[6], [4]], device=device)


def test_compiled_decode_step_matches_eager():
    lm = specops.models.causal_lm(tiny_model("llama"))
    token, cache, lens, positions = _decode_inputs(lm, "cpu")
    eager_cache = [t.clone() for t in cache.tensors()]
    expected = lm(token, cache, lens, positions)
    compiled_kv = cache.tensors()
    for t, saved in zip(compiled_kv, eager_cache):
        t.copy_(saved)  # undo the eager step's writes
    actual = torch.compile(lm.forward, fullgraph=True)(token, cache, lens, positions)
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    reference_cache = lm.new_cache(2, 16)  # the compiled step wrote the same K/V
    for t, saved in zip(reference_cache.tensors(), eager_cache):
        t.copy_(saved)
    lm(token, reference_cache, lens, positions)
    for got, want in zip(compiled_kv, reference_cache.tensors()):
        torch.testing.assert_close(got, want, atol=1e-5, rtol=1e-5)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_capture_and_replay_of_a_decode_step():
    lm = specops.models.causal_lm(tiny_model("qwen2", torch.float16, "cuda"))
    token, cache, lens, positions = _decode_inputs(lm, "cuda")
    saved = [t.clone() for t in cache.tensors()]
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        lm(token, cache, lens, positions)  # warm-up: compiles the kernels outside the capture
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        static_out = lm(token, cache, lens, positions)

    def restore():
        for t, s in zip(cache.tensors(), saved):
            t.copy_(s)

    outputs = []
    for step in range(3):  # new inputs copied into the captured tensors, then replayed
        restore()
        token.fill_(step + 3)
        lens.copy_(i32([6 - step, 4 + step], "cuda"))
        positions.copy_(lens.long()[:, None])
        graph.replay()
        replayed, replayed_kv = static_out.clone(), [t.clone() for t in cache.tensors()]
        restore()
        expected = lm(token, cache, lens, positions)
        # Same kernels, but cuBLAS may pick another algorithm inside a capture: fp16 noise.
        torch.testing.assert_close(replayed, expected, atol=1e-3, rtol=1e-3,
                                   msg=lambda m: f"step {step}: {m}")
        for got, want in zip(replayed_kv, cache.tensors()):
            torch.testing.assert_close(got, want, atol=1e-3, rtol=1e-3)
        outputs.append(replayed)
    assert not torch.equal(outputs[0], outputs[1])  # the replays did see the new inputs


def test_docstring_example():
    import specops.models as module
    results = doctest.testmod(module, extraglobs={"specops": specops, "torch": torch,
                                                  "hf_model": tiny_model("qwen2")},
                              optionflags=doctest.NORMALIZE_WHITESPACE)
    assert results.attempted > 0 and results.failed == 0
