"""specops.models' fallback for architectures without a compact forward: Hugging Face's own
forward over the static KV cache (:class:`specops.models.HFEagerCausalLM`).

Tiny random models of six other families (absolute and rotary positions, parallel blocks,
learned position offsets, GQA, q/k norms) plus Qwen2 forced through the fallback: a ragged
prefill, a chain step and a token tree give the transformers model's logits on the plain
sequences; speculative greedy decoding through the fallback reproduces the target's own
greedy ``generate``; models the fallback cannot hold are refused with the reason.
"""

import pytest
import torch

import specops
import specops.models
from loop_models import EOS, PAD, assert_same_or_tie, hf_greedy, noisy_copy

transformers = pytest.importorskip("transformers")

VOCAB = 97
SMALL = dict(hidden_size=32, num_attention_heads=4, intermediate_size=64, vocab_size=VOCAB,
             max_position_embeddings=128, eos_token_id=EOS, bos_token_id=PAD,
             pad_token_id=PAD)


def tiny(family: str, seed: int = 0, **overrides) -> torch.nn.Module:
    """A 2-layer random model of ``family``, eval mode, fp32, weights scaled up so that its
    next-token distributions are peaked (greedy ties stay rare)."""
    tf = transformers
    gqa = dict(num_key_value_heads=2, head_dim=8)
    configs = {
        "gpt2": lambda: (tf.GPT2Config(n_layer=2, n_embd=32, n_head=4, vocab_size=VOCAB,
                                       n_positions=128, eos_token_id=EOS, bos_token_id=PAD,
                                       pad_token_id=PAD), tf.GPT2LMHeadModel),
        "gpt_neox": lambda: (tf.GPTNeoXConfig(num_hidden_layers=2, **SMALL),
                             tf.GPTNeoXForCausalLM),
        "opt": lambda: (tf.OPTConfig(num_hidden_layers=2, ffn_dim=64, word_embed_proj_dim=32,
                                     **{k: v for k, v in SMALL.items()
                                        if k != "intermediate_size"}), tf.OPTForCausalLM),
        "phi3": lambda: (tf.Phi3Config(num_hidden_layers=2, num_key_value_heads=2, **SMALL),
                         tf.Phi3ForCausalLM),
        "gemma": lambda: (tf.GemmaConfig(num_hidden_layers=2, **gqa, **SMALL),
                          tf.GemmaForCausalLM),
        "qwen3": lambda: (tf.Qwen3Config(num_hidden_layers=2, **gqa, **SMALL),
                          tf.Qwen3ForCausalLM),
        "qwen2": lambda: (tf.Qwen2Config(num_hidden_layers=2, num_key_value_heads=2, **SMALL),
                          tf.Qwen2ForCausalLM),
    }
    config, model_class = configs[family]()
    for key, value in overrides.items():
        setattr(config, key, value)
    torch.manual_seed(seed)
    model = model_class(config).eval()
    with torch.no_grad():
        for param in model.parameters():
            param.mul_(3.0) if param.dim() > 1 else param.add_(torch.randn_like(param) * 0.2)
    return model


FAMILIES = ["gpt2", "gpt_neox", "opt", "phi3", "gemma", "qwen3", "qwen2"]


def wrap(model):
    """The fallback, also for Qwen2 (which would otherwise get the compact forward)."""
    lm = specops.models.causal_lm(model, hf_forward=True)
    assert isinstance(lm, specops.models.HFEagerCausalLM)
    return lm


def hf_logits(model, sequence):
    with torch.no_grad():
        return model(sequence[None]).logits[0].float()


def i32(values):
    return torch.tensor(values, dtype=torch.int32)


@pytest.mark.parametrize("family", FAMILIES)
def test_prefill_chain_and_tree_steps_match_transformers(family):
    model = tiny(family)
    lm = wrap(model)
    assert (lm.vocab_size, lm.num_layers, lm.graph_safe) == (VOCAB, 2, False)
    gen = torch.Generator().manual_seed(1)
    lens, num_chain, num_nodes = [9, 4, 7], 4, 8
    batch = len(lens)
    prompt = torch.randint(0, VOCAB, (batch, max(lens)), generator=gen)  # right-padded junk
    cache = lm.new_cache(batch, 32)

    def check(actual, expected, what):
        torch.testing.assert_close(actual, expected, atol=1e-4, rtol=1e-4,
                                   msg=lambda m: f"{family} {what}: {m}")

    last = torch.tensor(lens)[:, None] - 1
    logits = lm(prompt, cache, i32([0] * batch), torch.arange(max(lens)).expand(batch, -1),
                logits_index=last, prefill=True)
    assert logits.shape == (batch, 1, VOCAB) and logits.dtype == torch.float32
    for b in range(batch):
        check(logits[b, 0], hf_logits(model, prompt[b, :lens[b]])[-1], f"prefill row {b}")

    chain = torch.randint(0, VOCAB, (batch, num_chain), generator=gen)
    cache_lens = i32(lens)
    logits = lm(chain, cache, cache_lens, cache_lens.long()[:, None] + torch.arange(num_chain))
    committed = [torch.cat([prompt[b, :lens[b]], chain[b]]) for b in range(batch)]
    for b in range(batch):
        check(logits[b], hf_logits(model, committed[b])[lens[b]:], f"chain row {b}")

    parents = (torch.rand(batch, num_nodes, generator=gen) * torch.arange(num_nodes)).int()
    parents[:, 0] = -1
    used = i32([num_nodes, 5, num_nodes])
    tree_tokens = torch.randint(0, VOCAB, (batch, num_nodes), generator=gen)
    mask, depth = specops.tree_metadata(parents, used)
    paths, _ = specops.tree_paths(parents, used)
    cache_lens = i32([n + num_chain for n in lens])
    positions = cache_lens.long()[:, None] + depth.long().clamp(min=0)
    logits = lm(tree_tokens, cache, cache_lens, positions, mask)
    for b in range(batch):
        for i in range(int(used[b])):
            path = paths[b, i][paths[b, i] >= 0]
            sequence = torch.cat([committed[b], tree_tokens[b, path]])
            check(logits[b, i], hf_logits(model, sequence)[-1], f"tree row {b} node {i}")


def test_fallback_equals_the_compact_forward_on_qwen2():
    """The two paths are interchangeable: same logits and the same cache contents."""
    model = tiny("qwen2")
    runs = []
    for lm in (specops.models.causal_lm(model), wrap(model)):
        cache = lm.new_cache(2, 12)
        tokens = torch.randint(0, VOCAB, (2, 6), generator=torch.Generator().manual_seed(4))
        first = lm(tokens, cache, i32([0, 0]), torch.arange(6).expand(2, -1), prefill=True)
        second = lm(tokens[:, :3], cache, i32([6, 4]), torch.tensor([[6, 7, 8], [4, 5, 6]]))
        runs.append((first, second, cache.tensors()))
    for native, fallback in zip(runs[0], runs[1]):
        for a, b in zip(native if isinstance(native, list) else [native],
                        fallback if isinstance(fallback, list) else [fallback]):
            torch.testing.assert_close(a, b, atol=1e-5, rtol=1e-5)


def drafters(draft):
    return {"chain-3": dict(draft=draft, num_draft_tokens=3),
            "chain-auto": dict(draft=draft),
            "tree": dict(draft=draft, tree=specops.DynamicTree(depth=3, top_k=2, num_nodes=6,
                                                               adaptive=False)),
            "static-tree": dict(draft=draft, tree=specops.StaticTree((2, 2))),
            "lookup": dict(draft=specops.PromptLookup(max_ngram=2), num_draft_tokens=4),
            "hybrid": dict(draft=specops.Hybrid(draft, specops.PromptLookup(max_ngram=2)),
                           num_draft_tokens=3)}


@pytest.mark.parametrize("family", ["gpt_neox", "phi3", "gpt2"])
@pytest.mark.parametrize("method", list(drafters(None)))
def test_greedy_through_the_fallback_equals_target_generate(family, method):
    target = tiny(family, seed=3)
    draft = noisy_copy(target, noise=0.1)
    generator = torch.Generator().manual_seed(0)
    rows = [torch.randint(2, VOCAB, (n,), generator=generator).tolist() for n in (5, 1, 9)]
    width, new = max(map(len, rows)), 16
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros_like(ids)
    for b, row in enumerate(rows):  # left padding, as Hugging Face batches prompts
        ids[b, width - len(row):], mask[b, width - len(row):] = torch.tensor(row), 1
    out = specops.generate(target, ids, attention_mask=mask, max_new_tokens=new,
                           eos_token_id=[], **drafters(draft)[method])
    for b, row in enumerate(rows):
        ours = out.sequences[b, width:].tolist()
        assert_same_or_tie(target, row, ours, hf_greedy(target, row, new),
                           f"{family} {method} row {b}")
    if method in ("chain-3", "tree", "static-tree"):
        assert out.stats.mean_emitted_per_step > 1.2, out.stats.summary()


def test_positions_up_to_the_models_limit():
    """GPT-2 has learned absolute positions: a run that fills n_positions exactly works
    (drafted tokens never sit past the last position the run can emit)."""
    target = tiny("gpt2", seed=3, n_positions=24, max_position_embeddings=24)
    row = list(range(2, 10))
    out = specops.generate(target, torch.tensor([row]), draft=target, num_draft_tokens=4,
                           max_new_tokens=16, eos_token_id=[])
    assert out.sequences[0, 8:].tolist() == hf_greedy(target, row, 16)


def test_models_the_fallback_cannot_hold_are_refused():
    tf = transformers
    mamba = tf.MambaForCausalLM(tf.MambaConfig(vocab_size=VOCAB, hidden_size=32,
                                               num_hidden_layers=1, state_size=4))
    with pytest.raises(ValueError, match="MambaForCausalLM"):
        specops.models.causal_lm(mamba)
    t5 = tf.T5ForConditionalGeneration(tf.T5Config(vocab_size=VOCAB, d_model=32, d_ff=64,
                                                   num_layers=1, num_heads=2, d_kv=16))
    with pytest.raises(ValueError, match="encoder-decoder"):
        specops.models.causal_lm(t5)
    dynamic = dict(rope_type="dynamic", rope_theta=10000.0, factor=2.0)
    with pytest.raises(ValueError, match="'dynamic'"):
        specops.models.causal_lm(tiny("phi3", rope_parameters=dynamic))


def test_sliding_window_shorter_than_capacity_is_refused():
    gemma2 = transformers.Gemma2ForCausalLM(transformers.Gemma2Config(
        num_hidden_layers=2, num_key_value_heads=2, head_dim=8, sliding_window=16,
        **SMALL)).eval()
    lm = specops.models.causal_lm(gemma2)
    assert isinstance(lm, specops.models.HFEagerCausalLM)
    assert lm.new_cache(1, 16).capacity == 16
    with pytest.raises(ValueError, match="sliding_window=16"):
        lm.new_cache(1, 17)


def test_bad_inputs_name_the_argument():
    lm = wrap(tiny("gpt_neox"))
    cache, lens, tokens = lm.new_cache(2, 8), i32([0, 0]), torch.zeros(2, 3, dtype=torch.long)
    positions = torch.arange(3).expand(2, -1)
    with pytest.raises(TypeError, match="tokens must be int64"):
        lm(tokens.int(), cache, lens, positions)
    with pytest.raises(TypeError, match="cache_lens must be int32"):
        lm(tokens, cache, lens.long(), positions)
    with pytest.raises(ValueError, match="cache must hold"):
        lm(tokens, lm.new_cache(3, 8), lens, positions)
    with pytest.raises(ValueError, match="takes no mask"):
        lm(tokens, cache, lens, positions, torch.ones(2, 3, 3, dtype=torch.bool), prefill=True)


def test_wrappers_can_be_passed_to_the_loop():
    """A Qwen2 pair forced through the fallback, passed as wrappers: the loop takes them as
    they are and still reproduces the target's greedy output."""
    target = tiny("qwen2", seed=3)
    draft = noisy_copy(target, noise=0.1)
    row = torch.randint(2, VOCAB, (7,), generator=torch.Generator().manual_seed(2)).tolist()
    out = specops.generate(wrap(target), torch.tensor([row]), draft=wrap(draft),
                           num_draft_tokens=3, max_new_tokens=12, eos_token_id=[])
    assert_same_or_tie(target, row, out.sequences[0, 7:].tolist(), hf_greedy(target, row, 12),
                       "wrapped pair")
    assert out.stats.mean_emitted_per_step > 1.2, out.stats.summary()
