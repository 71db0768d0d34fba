"""Tiny random Hugging Face models for the decoding-loop tests, a greedy reference, random
(padded) prompts and the drafting methods under test."""

import copy

import torch
from transformers import LlamaConfig, LlamaForCausalLM, Qwen2Config, Qwen2ForCausalLM

import specops

EOS, PAD = 1, 0


def tiny_model(family: str = "qwen2", vocab: int = 64, layers: int = 2, seed: int = 0,
               init: float = 0.25) -> torch.nn.Module:
    """A 2-layer model whose weights are large enough (``init``) that its next-token
    distributions are peaked: greedy ties, which the tests must otherwise explain, are rare."""
    torch.manual_seed(seed)
    common = dict(vocab_size=vocab, hidden_size=32, intermediate_size=64,
                  num_hidden_layers=layers, num_attention_heads=4, num_key_value_heads=2,
                  max_position_embeddings=256, initializer_range=init, eos_token_id=EOS,
                  bos_token_id=PAD, pad_token_id=PAD, tie_word_embeddings=False)
    if family == "qwen2":
        model = Qwen2ForCausalLM(Qwen2Config(**common))
    else:
        model = LlamaForCausalLM(LlamaConfig(**common))
    return model.eval()


def noisy_copy(model: torch.nn.Module, noise: float, seed: int = 1,
               vocab: int | None = None) -> torch.nn.Module:
    """A draft that agrees with ``model`` often but not always. ``vocab`` resizes its
    embedding and head (rows added are random, rows dropped are the last ones), as for
    models of one tokenizer with differently padded tables."""
    draft = copy.deepcopy(model)
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for p in draft.parameters():
            p.add_(torch.randn(p.shape, generator=generator) * noise * p.std())
    if vocab is not None:
        draft.resize_token_embeddings(vocab)
        with torch.no_grad():
            head = draft.get_output_embeddings().weight
            head[model.config.vocab_size:] = torch.randn(
                head[model.config.vocab_size:].shape, generator=generator)
    return draft


def tiny_pair(family: str) -> tuple[torch.nn.Module, torch.nn.Module]:
    """A tiny target and a draft that agrees with it often (a noisy copy)."""
    target = tiny_model(family, seed=3)
    return target, noisy_copy(target, noise=0.1)


def hf_greedy(model: torch.nn.Module, prompt: list[int], max_new_tokens: int,
              eos: int | None = None) -> list[int]:
    """The target's own greedy ``generate`` on one unpadded row."""
    ids = torch.tensor([prompt])
    out = model.generate(ids, attention_mask=torch.ones_like(ids), max_new_tokens=max_new_tokens,
                         do_sample=False, eos_token_id=eos, pad_token_id=PAD)
    new = out[0, len(prompt):].tolist()
    if eos is not None and eos in new:
        new = new[:new.index(eos) + 1]
    return new


def top2_gap(model: torch.nn.Module, tokens: list[int]) -> float:
    """Gap between the two largest next-token logits after ``tokens`` (fp32)."""
    with torch.no_grad():
        logits = model(torch.tensor([tokens])).logits[0, -1].float()
    top = logits.topk(2).values
    return float(top[0] - top[1])


def assert_same_or_tie(model, prompt: list[int], ours: list[int], reference: list[int],
                       what: str) -> None:
    """Equal token for token, or the first difference is a numerical tie (top-2 logit gap
    below 1e-4 at that step), after which the rest cannot be compared."""
    if ours == reference:
        return
    first = next((i for i, (a, b) in enumerate(zip(ours, reference)) if a != b),
                 min(len(ours), len(reference)))
    gap = top2_gap(model, prompt + reference[:first])
    assert gap < 1e-4, (f"{what}: outputs differ at new token {first} where the top-2 logit gap "
                        f"is {gap:.3g} (not a tie)\n ours {ours}\n  ref {reference}")


def prompts(vocab: int, lengths: list[int], seed: int = 0) -> list[list[int]]:
    """Random prompts of the given lengths."""
    generator = torch.Generator().manual_seed(seed)
    # ids 2.. so that no prompt token is EOS or PAD
    return [torch.randint(2, vocab, (n,), generator=generator).tolist() for n in lengths]


def padded(rows: list[list[int]], side: str) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids`` and ``attention_mask`` of ``rows`` padded on ``side`` ("left"/"right")."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), PAD)
    mask = torch.zeros(len(rows), width, dtype=torch.int64)
    for b, r in enumerate(rows):
        cols = slice(width - len(r), width) if side == "left" else slice(0, len(r))
        ids[b, cols] = torch.tensor(r)
        mask[b, cols] = 1
    return ids, mask


METHODS = ("plain", "chain-3", "chain-auto", "tree", "adaptive-tree", "static-tree", "lookup",
           "hybrid", "lookup-auto", "hybrid-auto")


def drafters(draft) -> dict[str, dict]:
    """``generate`` keyword arguments of every drafting method the loop tests cover."""
    return {"plain": dict(draft=None),
            "chain-3": dict(draft=draft, num_draft_tokens=3),
            "chain-auto": dict(draft=draft),
            "tree": dict(draft=draft, tree=specops.DynamicTree(depth=3, top_k=2, num_nodes=6,
                                                               adaptive=False)),
            "adaptive-tree": dict(draft=draft, tree=specops.DynamicTree(depth=3, top_k=2,
                                                                        num_nodes=6)),
            "static-tree": dict(draft=draft, tree=specops.StaticTree((2, 2, 1))),
            "lookup": dict(draft=specops.PromptLookup(max_ngram=2), num_draft_tokens=4),
            "hybrid": dict(draft=specops.Hybrid(draft, specops.PromptLookup(max_ngram=2)),
                           num_draft_tokens=3),
            "lookup-auto": dict(draft=specops.PromptLookup(max_ngram=2)),
            "hybrid-auto": dict(draft=specops.Hybrid(draft, specops.PromptLookup(max_ngram=2)))}
