"""Sequence-level losslessness of the decoding loop: with sampling on, the first NEW tokens
that ``specops.generate`` emits follow the target's own sampling distribution exactly,
whatever the drafter.

A tiny model over a vocabulary of 5 gives 5**3 = 125 possible 3-token continuations, whose
exact probabilities (temperature, top-k, top-p applied as in Hugging Face's warpers, through
``specops.sampling_probs``) come from the target's logits. Row ``b`` of one batch uses seed
``seed + b``, so a batch of N copies of the prompt is N independent samples. Pearson's
chi-square test (cells expecting < 5 pooled) at significance ALPHA = 1e-3; its power against
any deviation of total variation 0.05 is computed from the noncentral chi-square
(noncentrality >= 4 N TV^2, worst case) and asserted >= 0.99. A negative control (the draft
reusing the accept test's random numbers, a real bug) must be rejected.

Also: at a fixed draft length a row of a batch samples what it samples alone with its seed.
"""

import itertools

import numpy as np
import pytest
import torch
from scipy import stats

import specops
from loop_models import drafters as loop_drafters
from loop_models import noisy_copy, padded, prompts, tiny_model, tiny_pair

ALPHA, TV, VOCAB, NEW, N = 1e-3, 0.05, 5, 3, 12000
PROMPT = [2, 3, 4, 2, 3]   # a repeated bigram, so prompt lookup finds matches
SAMPLING = dict(temperature=0.9, top_k=4, top_p=0.95)


@pytest.fixture(scope="module")
def pair():
    target = tiny_model("qwen2", vocab=VOCAB, seed=11, init=0.1)
    return target, noisy_copy(target, noise=0.6, seed=12)


def exact_distribution(target) -> np.ndarray:
    """P(x1, x2, x3 | PROMPT) for all 125 continuations, index x1*25 + x2*5 + x3."""
    cells = list(itertools.product(range(VOCAB), repeat=NEW))
    ids = torch.tensor([PROMPT + list(c) for c in cells])
    with torch.no_grad():
        logits = target(ids).logits[:, len(PROMPT) - 1:-1]          # [125, NEW, V]
    probs = specops.sampling_probs(logits.float(), **SAMPLING).double()
    chosen = torch.tensor(cells)[:, :, None]
    return probs.gather(-1, chosen)[..., 0].prod(-1).numpy()


def sample(target, seed: int, **kwargs) -> np.ndarray:
    ids = torch.tensor([PROMPT]).repeat(N, 1)
    out = specops.generate(target, ids, max_new_tokens=NEW, eos_token_id=[], seed=seed,
                           **SAMPLING, **kwargs)
    new = out.sequences[:, len(PROMPT):].numpy()
    return new[:, 0] * VOCAB**2 + new[:, 1] * VOCAB + new[:, 2]


def chi_square(cells: np.ndarray, exact: np.ndarray) -> tuple[float, float, int]:
    observed = np.bincount(cells, minlength=len(exact)).astype(float)
    assert observed[exact == 0].sum() == 0, "a continuation of probability 0 was emitted"
    expected = N * exact
    small = expected < 5
    observed = np.append(observed[~small], observed[small].sum())
    expected = np.append(expected[~small], expected[small].sum())
    if expected[-1] == 0:
        observed, expected = observed[:-1], expected[:-1]
    statistic = float(((observed - expected) ** 2 / expected).sum())
    df = len(expected) - 1
    return statistic, float(stats.chi2.sf(statistic, df)), df


def power(df: int) -> float:
    return float(stats.ncx2.sf(stats.chi2.isf(ALPHA, df), df, 4 * N * TV**2))


def drafters(draft):
    return {
        "plain": dict(),
        "chain (sampled drafts, real q)": dict(draft=draft, num_draft_tokens=2),
        "chain, cost-aware": dict(draft=draft, max_draft_tokens=3),
        "tree (top-k children, deterministic)": dict(
            draft=draft, tree=specops.DynamicTree(depth=2, top_k=2, num_nodes=5,
                                                  adaptive=False)),
        "tree, cost-aware size": dict(
            draft=draft, tree=specops.DynamicTree(depth=2, top_k=2, num_nodes=5)),
        "static tree (sampled children, real q)": dict(
            draft=draft, tree=specops.StaticTree((2, 2))),
        "static tree (top-k children)": dict(
            draft=draft, tree=specops.StaticTree((3, 1), sampled=False)),
        "prompt lookup": dict(draft=specops.PromptLookup(max_ngram=2), num_draft_tokens=2),
        "hybrid": dict(draft=specops.Hybrid(draft, specops.PromptLookup(max_ngram=2),
                                            min_match=2), num_draft_tokens=2),
        # cost-aware lengths, and a choice of drafter per step from past acceptance
        "hybrid, cost-aware, compare": dict(
            draft=specops.Hybrid(draft, specops.PromptLookup(max_ngram=2), min_match=1,
                                 compare=True), max_draft_tokens=3),
    }


@pytest.mark.parametrize("method", list(drafters(None)))
def test_first_tokens_follow_the_target_distribution(pair, method):
    target, draft = pair
    exact = exact_distribution(target)
    statistic, p_value, df = chi_square(sample(target, 1000, **drafters(draft)[method]), exact)
    print(f"\n{method}: chi2 {statistic:.1f} on {df} df, p = {p_value:.3g}, "
          f"power vs TV {TV}: {power(df):.4f}")
    assert power(df) >= 0.99
    assert p_value > ALPHA, f"{method}: chi2 {statistic:.1f} on {df} df, p = {p_value:.2g}"


def test_negative_control_is_rejected(pair, monkeypatch):
    """A real bug the test must catch: the draft drawing its tokens with the very random
    numbers the accept test then uses (Philox purpose 0 instead of its own), which
    correlates proposal and acceptance."""
    from specops import loop

    target, draft = pair
    monkeypatch.setattr(loop, "PURPOSE_DRAFT", 0)
    exact = exact_distribution(target)
    statistic, p_value, df = chi_square(
        sample(target, 5000, draft=draft, num_draft_tokens=2), exact)
    assert p_value < ALPHA, f"the wrong rule passed: chi2 {statistic:.1f} on {df} df"


@pytest.mark.parametrize("method", ["plain", "chain-3", "chain-6", "lookup", "static-tree",
                                    "sampled-static-tree", "tree"])
def test_a_row_samples_in_a_batch_what_it_samples_alone(method):
    """Row ``b`` of a batch with ``seed`` emits the tokens it emits alone with ``seed + b``,
    at a fixed draft length or tree, whatever the other rows' progress: ragged acceptance
    leaves rows at different distances from ``max_new_tokens``, and a row's last token
    must be decided as it is alone (a draft cut to the row's own budget, then a sampled
    token), not by an accept test of a draft the furthest row's budget allowed (which
    changed the last token of some rows at 4 of 40 random configurations)."""
    target, draft = tiny_pair("llama")
    options = dict(loop_drafters(draft),    # the loop tests' methods, and two more
                   **{"chain-6": dict(draft=draft, num_draft_tokens=6),
                      "sampled-static-tree": dict(draft=draft, tree=specops.StaticTree(
                          (2, 1), sampled=True))})
    sampling = dict(temperature=1.0, top_k=0, top_p=1.0, eos_token_id=[])
    rows = prompts(target.config.vocab_size, [7, 2, 11, 4], seed=3)
    ids, mask = padded(rows, "left")
    for new in (9, 17, 26):
        together = specops.generate(target, ids, attention_mask=mask, max_new_tokens=new,
                                    seed=998152, **sampling, **options[method])
        for b, row in enumerate(rows):
            alone = specops.generate(target, torch.tensor([row]), max_new_tokens=new,
                                     seed=998152 + b, **sampling, **options[method])
            assert together.sequences[b, ids.shape[1]:].tolist() == alone.sequences[
                0, len(row):].tolist(), f"{method}, max_new_tokens {new}, row {b}"
