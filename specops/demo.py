"""A short demonstration of chain verification: ``python -m specops.demo``.

A toy target and draft "model" over a small word vocabulary: the draft proposes five words,
the target checks all of them at once, and specops keeps exactly the target's distribution.
Then one verify step is timed at a real vocabulary size (Qwen2.5's 151,936 tokens).
"""

import time

import torch

import specops

WORDS = ["the", "cat", "sat", "on", "mat", "dog", "ran", "a", ".", "<eos>"]


def toy_rows(prefs: list[dict[str, float]]) -> torch.Tensor:
    """One probability row per entry: the named words get their weight, the rest share 0.05."""
    rows = torch.full((len(prefs), len(WORDS)), 0.05)
    for row, pref in zip(rows, prefs):
        for word, weight in pref.items():
            row[WORDS.index(word)] = weight
    return rows / rows.sum(-1, keepdim=True)


def show_toy_step() -> None:
    draft = ["cat", "sat", "on", "a", "mat"]
    draft_tokens = torch.tensor([[WORDS.index(w) for w in draft]])
    # target rows: after "the", after "the cat", ... (K + 1 = 6 rows)
    target = toy_rows([{"cat": 3}, {"sat": 3}, {"on": 3}, {"the": 3, "a": 0.5}, {"mat": 3},
                       {".": 3}])[None]
    draft_probs = toy_rows([{"cat": 2}, {"sat": 2}, {"on": 2}, {"a": 2}, {"mat": 2}])[None]
    print("prompt: 'the'   draft proposes:", " ".join(draft))

    tokens, num_accepted = specops.chain_verify_greedy(target.log(), draft_tokens)
    print(f"greedy verify   : accepted {int(num_accepted)} of 5, emits",
          " ".join(WORDS[t] for t in tokens[0].tolist() if t >= 0))
    for seed in range(3):
        tokens, num_accepted = specops.chain_verify(
            target, draft_tokens, draft_probs, seeds=torch.tensor([seed]),
            positions=torch.tensor([0]))
        print(f"sampled, seed {seed}: accepted {int(num_accepted)} of 5, emits",
              " ".join(WORDS[t] for t in tokens[0].tolist() if t >= 0))


def time_real_vocab(vocab: int = 151936, num_draft: int = 5, repeats: int = 50) -> None:
    g = torch.Generator().manual_seed(0)
    target = torch.randn(1, num_draft + 1, vocab, generator=g).softmax(-1)
    draft = torch.randn(1, num_draft, vocab, generator=g).softmax(-1)
    tokens = torch.multinomial(draft[0], 1, generator=g).T
    args = dict(seeds=torch.tensor([1]), positions=torch.tensor([100]))

    def median_ms(fn) -> float:
        fn()
        times = []
        for _ in range(repeats):
            start = time.perf_counter()
            fn()
            times.append(time.perf_counter() - start)
        return sorted(times)[len(times) // 2] * 1e3

    kernel = median_ms(lambda: specops.chain_verify(target, tokens, draft, **args))
    with specops.use_backend("reference"):
        reference = median_ms(lambda: specops.chain_verify(target, tokens, draft, **args))
    print(f"one verify step, B=1 K={num_draft} V={vocab}: specops kernel {kernel:.3f} ms, "
          f"pure-PyTorch reference {reference:.3f} ms (median of {repeats}, this machine)")


if __name__ == "__main__":
    show_toy_step()
    time_real_vocab()
