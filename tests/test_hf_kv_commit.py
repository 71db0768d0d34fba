"""kv_commit through the Hugging Face hook (specops/hf.py): after a tree pass, a greedy walk
and ``kv_commit`` on every layer's K and V of a ``DynamicCache``, the next step's logits equal
those of the model run on the accepted tokens alone. Tiny random Qwen2 and Llama models built
from a config (no downloads), fp32.

The step under test, as an engine runs it::

    cache holds the prompt (P tokens); root = the last committed token, not cached yet
    tree_forward(root + drafts)      -> node i's K/V at slot P + i, logits row i after node i
    tree_verify_greedy(logits)       -> path (accepted nodes), num_accepted, bonus token
    kv_commit(every K and V, P, ...) -> slot P + 1 + k holds node path[k]'s K/V
    cache.crop(to P + 1 + num_accepted); model(bonus token, cache) -> next logits
"""

import copy

import pytest
import torch

import specops
import specops.hf

transformers = pytest.importorskip("transformers")

VOCAB = 97
PROMPT_LEN = 9
# model dtype -> (atol, rtol) on logits (|logits| < 1 here). Cached and uncached fp32 SDPA
# sum in different orders, so the runs agree to rounding, not bit for bit.
TOLERANCE = {torch.float32: (1e-5, 1e-5)}

# node:     0   1  2  3  4  5  6  7      children: 0 -> 1, 2;  1 -> 4;  2 -> 3;  3 -> 5, 6;
PARENTS = [-1, 0, 0, 2, 1, 3, 3, 5]  #              5 -> 7.  Depths 0 1 1 2 2 3 3 4.
# Accepted paths, one per row (equal lengths: DynamicCache rows share one length). [2, 3, 5, 7]
# makes kv_commit's moves overlap (slot P+2 is read for k=0 before k=1 overwrites it); [2, 3,
# 6] takes a second child; [1, 4] keeps node 1 in place and moves node 4; [] accepts nothing.
PATHS = [
    [[2, 3, 5, 7]],
    [[2, 3, 6]],
    [[1, 4]],
    [[]],
    [[1, 4], [2, 3]],
    [[2, 3, 5], [2, 3, 6]],
]


def tiny_model(kind: str):
    config_class, model_class = {
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
    }[kind]
    config = config_class(vocab_size=VOCAB, hidden_size=64, intermediate_size=128,
                          num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                          max_position_embeddings=256, attn_implementation="sdpa")
    torch.manual_seed(0)
    return model_class(config).float().eval()


def tree_logits(model, cache, tokens, mask, depth):
    with torch.no_grad():
        return specops.hf.tree_forward(model, tokens, mask, depth,
                                       past_key_values=cache).logits


def steer_tokens(model, cache, tokens, parents, mask, depth, paths):
    """Rewrites the tree's tokens so that the greedy walk of row b accepts exactly
    ``paths[b]``: along the path each node's token is its parent's argmax, every sibling before
    it (and every child of the path's last node) gets another token. A node's logits depend
    on its ancestors only, so one tree pass per depth fixes that depth."""
    children = [[i for i, p in enumerate(parents) if p == c] for c in range(len(parents))]
    for k in range(max(map(len, paths)) + 1):
        logits = tree_logits(model, copy.deepcopy(cache), tokens, mask, depth)
        for b, path in enumerate(paths):
            if k > len(path):
                continue
            node = 0 if k == 0 else path[k - 1]
            target = int(logits[b, node].argmax())
            for child in children[node]:
                if k < len(path) and child == path[k]:
                    tokens[b, child] = target
                    break
                if tokens[b, child] == target:
                    tokens[b, child] = (target + 1) % VOCAB
    return tokens


def commit_and_crop(cache, cache_lens, path, num_accepted, *, commit=True):
    if commit:
        kv = [t for layer in cache.layers for t in (layer.keys, layer.values)]
        new_lens = specops.kv_commit(kv, cache_lens, path, num_accepted)
    else:
        new_lens = cache_lens + 1 + num_accepted
    new_len = int(new_lens[0])  # rows share one length (asserted by the caller)
    cache.crop(new_len - cache.get_seq_length())  # crop takes minus the tokens to drop
    return new_lens


def next_logits(model, cache, token):
    with torch.no_grad():
        return model(token[:, None], past_key_values=cache, use_cache=True).logits[:, -1]


@pytest.mark.parametrize("paths", PATHS, ids=lambda p: "-".join(map(str, p)).replace(" ", ""))
@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_next_step_after_kv_commit_equals_a_run_on_the_accepted_tokens(kind, paths):
    model = tiny_model(kind)
    batch, num_nodes = len(paths), len(PARENTS)
    num_accepted = len(paths[0])
    gen = torch.Generator().manual_seed(1 + 7 * batch + num_accepted)
    prompt = torch.randint(0, VOCAB, (batch, PROMPT_LEN), generator=gen)
    tokens = torch.randint(0, VOCAB, (batch, num_nodes), generator=gen)  # node 0: the root
    parents = torch.tensor([PARENTS] * batch, dtype=torch.int32)
    mask, depth = specops.tree_metadata(parents)

    cache = transformers.DynamicCache(config=model.config)
    with torch.no_grad():
        model(prompt, past_key_values=cache, use_cache=True)
    cache_lens = torch.full((batch,), PROMPT_LEN, dtype=torch.int32)
    tokens = steer_tokens(model, cache, tokens, PARENTS, mask, depth, paths)

    logits = tree_logits(model, cache, tokens, mask, depth)  # appends the 8 nodes to cache
    out_tokens, path, accepted = specops.tree_verify_greedy(logits, tokens, parents)
    assert accepted.tolist() == [num_accepted] * batch
    assert [row[:num_accepted] for row in path.tolist()] == paths
    uncommitted = copy.deepcopy(cache)

    new_lens = commit_and_crop(cache, cache_lens, path, accepted)
    assert new_lens.dtype == torch.int32
    assert new_lens.tolist() == [PROMPT_LEN + 1 + num_accepted] * batch
    assert cache.get_seq_length() == PROMPT_LEN + 1 + num_accepted
    bonus = out_tokens[:, num_accepted]  # the token after the accepted path
    after_commit = next_logits(model, cache, bonus)

    atol, rtol = TOLERANCE[torch.float32]
    for b in range(batch):
        nodes = [0] + paths[b]
        sequence = torch.cat([prompt[b], tokens[b, nodes], bonus[b, None]])[None]
        with torch.no_grad():
            fresh = model(sequence).logits[0, PROMPT_LEN:]  # no cache, no tree, causal SDPA
        # The tree pass's logits at the root and each accepted node, then the next step's.
        torch.testing.assert_close(logits[b, nodes], fresh[:-1], atol=atol, rtol=rtol,
                                   msg=lambda m: f"{kind} row {b} tree nodes {nodes}: {m}")
        torch.testing.assert_close(after_commit[b], fresh[-1], atol=atol, rtol=rtol,
                                   msg=lambda m: f"{kind} row {b} path {paths[b]}: next "
                                                 f"step after kv_commit: {m}")

    # The check has teeth: without kv_commit, a path whose nodes are not at slots 1..n leaves
    # the wrong K/V behind the root and the next step's logits differ.
    if any(p != list(range(1, num_accepted + 1)) for p in paths):
        commit_and_crop(uncommitted, cache_lens, path, accepted, commit=False)
        stale = next_logits(model, uncommitted, bonus)
        assert not torch.allclose(stale, after_commit, atol=1e-3), "crop alone matched"
