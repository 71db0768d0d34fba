"""The Hugging Face integration (specops/hf.py): one tree pass through ``tree_attention``
gives the logits of running every root-to-node path separately, on tiny random Qwen2 and
Llama models built from a config (no downloads)."""

import copy

import pytest
import torch

import specops
import specops.hf
from specops.reference.tree import tree_metadata_ref, tree_paths_ref

transformers = pytest.importorskip("transformers")

VOCAB = 97
# model dtype -> (atol, rtol) on logits (|logits| < 1 here), as for the op itself.
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2)}


def tiny_model(kind: str, dtype: torch.dtype, **overrides):
    common = dict(vocab_size=VOCAB, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=256,
                  attn_implementation="sdpa")
    common.update(overrides)
    config_class, model_class = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "mistral": (transformers.MistralConfig, transformers.MistralForCausalLM),
    }[kind]
    torch.manual_seed(0)
    return model_class(config_class(**common)).to(dtype).eval()


def random_tree(batch, num_nodes, gen):
    parents = (torch.rand(batch, num_nodes, generator=gen) * torch.arange(num_nodes)).int()
    parents[:, 0] = -1
    num_used = torch.randint(1, num_nodes + 1, (batch,), generator=gen, dtype=torch.int32)
    num_used[0] = num_nodes
    tokens = torch.randint(0, VOCAB, (batch, num_nodes), generator=gen)
    return parents, num_used, tokens


def prefill(model, prompt):
    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(prompt, past_key_values=cache, use_cache=True)
    return cache


@pytest.mark.parametrize("kind", ["qwen2", "llama"])
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
def test_tree_pass_equals_every_path_run_separately(kind, dtype):
    model = tiny_model(kind, dtype)
    gen = torch.Generator().manual_seed(1)
    batch, prompt_len, num_nodes = 2, 11, 9
    prompt = torch.randint(0, VOCAB, (batch, prompt_len), generator=gen)
    parents, num_used, tokens = random_tree(batch, num_nodes, gen)
    mask, depth = tree_metadata_ref(parents, num_used)

    cache = prefill(model, prompt)
    with torch.no_grad():
        logits = specops.hf.tree_forward(model, tokens, mask, depth,
                                         past_key_values=cache).logits
    assert logits.shape == (batch, num_nodes, VOCAB)
    assert model.config._attn_implementation == "sdpa"  # restored after the pass
    assert cache.get_seq_length() == prompt_len + num_nodes  # nodes at slots prompt_len + i

    paths, _ = tree_paths_ref(parents, num_used)
    atol, rtol = TOLERANCE[dtype]
    for b in range(batch):
        for i in range(int(num_used[b])):
            path = paths[b, i][paths[b, i] >= 0]
            sequence = torch.cat([prompt[b], tokens[b, path]])[None]
            with torch.no_grad():
                expected = model(sequence).logits[0, -1]  # ordinary causal SDPA, no cache
            torch.testing.assert_close(logits[b, i], expected, atol=atol, rtol=rtol,
                                       msg=lambda m: f"{kind} row {b} node {i} path "
                                                     f"{path.tolist()}: {m}")


def test_positions_follow_depth_not_slots():
    """Two siblings at depth 1 see the same position; running the tree as a flat causal
    sequence (slots as positions) gives different logits for the second sibling."""
    model = tiny_model("qwen2", torch.float32)
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(2))
    parents = torch.tensor([[-1, 0, 0]], dtype=torch.int32)
    tokens = torch.tensor([[5, 7, 9]])
    mask, depth = tree_metadata_ref(parents, torch.tensor([3], dtype=torch.int32))
    with torch.no_grad():
        tree = specops.hf.tree_forward(model, tokens, mask, depth,
                                       past_key_values=prefill(model, prompt)).logits
        second = model(torch.cat([prompt, tokens[:, [0, 2]]], 1)).logits[0, -1]
        flat = model(torch.cat([prompt, tokens], 1)).logits[0, -1]
    torch.testing.assert_close(tree[0, 2], second, atol=1e-5, rtol=1e-5)
    assert not torch.allclose(tree[0, 2], flat, atol=1e-3)


def test_short_sliding_window_is_refused():
    model = tiny_model("mistral", torch.float32, sliding_window=8)
    prompt = torch.randint(0, VOCAB, (1, 6), generator=torch.Generator().manual_seed(3))
    parents = torch.tensor([[-1, 0, 1, 1]], dtype=torch.int32)
    mask, depth = tree_metadata_ref(parents, torch.tensor([4], dtype=torch.int32))
    cache = prefill(model, prompt)
    with pytest.raises(ValueError, match="sliding_window=8"):
        specops.hf.tree_forward(model, torch.ones(1, 4, dtype=torch.long), mask, depth,
                                past_key_values=copy.deepcopy(cache))
    # A window the context fits in has no effect, so it is allowed.
    model = tiny_model("mistral", torch.float32, sliding_window=64)
    with torch.no_grad():
        specops.hf.tree_forward(model, torch.ones(1, 4, dtype=torch.long), mask, depth,
                                past_key_values=prefill(model, prompt))


def test_hook_refuses_calls_without_a_tree():
    model = tiny_model("llama", torch.float32)
    with specops.hf.tree_attention_enabled(model), pytest.raises(ValueError, match="tree_mask"):
        model(torch.ones(1, 3, dtype=torch.long))
    assert model.config._attn_implementation == "sdpa"
