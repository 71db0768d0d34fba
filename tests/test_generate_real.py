"""Greedy exactness on the real bundled pair (Qwen2.5-Coder 1.5B fp32 target, 0.5B draft):
speculative output equals the target's own greedy ``generate``. Slow (loads ~9 GB, decodes
on the CPU at a few tokens/s), so it runs only with SPECOPS_SLOW=1 and the converted models
(``python -m specops generate`` converts them once)."""

import os

import pytest
import torch

import specops

pytestmark = [pytest.mark.slow,
              pytest.mark.skipif(os.environ.get("SPECOPS_SLOW") != "1",
                                 reason="loads the real 1.5B/0.5B pair; set SPECOPS_SLOW=1")]

PROMPTS = ["Write a Python function that returns the n-th Fibonacci number.",
           "Explain in two sentences what a hash table is."]


@pytest.fixture(scope="module")
def pair():
    from specops.pretrained import load_model
    target, tokenizer = load_model("default-target", dtype=torch.float32)
    draft, _ = load_model("default-draft", dtype=torch.float32)
    return target, draft, tokenizer


@pytest.mark.parametrize("prompt", PROMPTS)
def test_real_pair_greedy_equals_target_generate(pair, prompt):
    target, draft, tokenizer = pair
    ids = tokenizer.apply_chat_template([{"role": "user", "content": prompt}],
                                        add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)["input_ids"]
    eos = tokenizer.convert_tokens_to_ids("<|im_end|>")
    reference = target.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=24,
                                do_sample=False, eos_token_id=eos,
                                pad_token_id=tokenizer.pad_token_id, repetition_penalty=1.0,
                                top_k=None, top_p=None, temperature=None)[0, ids.shape[1]:]
    options = {"chain": dict(draft=draft), "prompt lookup": dict(draft=specops.PromptLookup()),
               "hybrid": dict(draft=specops.Hybrid(draft)),
               "cost-aware tree": dict(draft=draft, tree=specops.DynamicTree())}
    for name, option in options.items():
        out = specops.generate(target, ids, max_new_tokens=24, eos_token_id=eos, **option)
        new = out.sequences[0, ids.shape[1]:ids.shape[1] + out.num_new_tokens[0]]
        assert new.tolist() == reference.tolist(), name
