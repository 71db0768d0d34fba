"""Losslessness of ``chain_verify``, tested on whole speculative decodes (contract, "Chain
verification": repeating the step emits exactly the target's autoregressive distribution).

One verify step alone is not that distribution (a drawn token never equals the rejected
draft), so each test decodes ``NUM_ROWS`` rows from a fixed prompt with a table target model
and a table draft model (order-2 Markov: a distribution over ``V`` tokens for each pair of
last tokens), repeating ``chain_verify`` until every row has ``NUM_GENERATED`` new tokens.
Every step draws a ragged ``draft_lens`` in ``0..K`` per row, samples that many drafts
autoregressively from the draft table (or takes its argmax: a deterministic drafter), builds
``target_probs`` from the target table on prefix + drafts, and advances ``positions`` (the
root's index in the sequence) by ``num_accepted + 1``. The empirical joint distribution of the
first ``NUM_GENERATED`` tokens is then compared with the exact one, enumerated from the target
table:

- a sequence of exact probability 0 observed even once fails outright;
- otherwise a Pearson chi-square test over the ``V**NUM_GENERATED`` cells, cells expecting
  fewer than 5 counts pooled into one, at significance ``ALPHA = 1e-3``, with power
  ``>= MIN_POWER = 0.9`` against any deviation of total variation ``TV = 0.01`` on the tested
  cells (computed and asserted from the noncentral chi-square in every test, see ``_power``).

Expected counts use the exact probabilities; ``u`` has 24-bit resolution, so the op's true
cell probabilities differ by at most ``~NUM_GENERATED * 2 * 2**-24`` per row, under 0.1
expected counts in all at these sizes: negligible next to the counts' spread.
"""

import itertools
import time
from dataclasses import dataclass

import numpy as np
import pytest
import torch
from scipy import stats

import specops
import specops.reference.chain as chain_ref
from specops.reference.draw import sanitize

V = 4  # vocabulary
K = 4  # most drafts per step
NUM_GENERATED = 3  # tokens compared per row: V**3 = 64 cells, up to 3 verify steps
PROMPT = (3, 0, 2, 1)  # the root of the first step is its last token, at position 3
NUM_ROWS = 2**18  # power 0.9990 at 63 df (2**17: 0.73); 4 tokens would need ~4x the time
ALPHA = 1e-3
TV = 0.01
MIN_POWER = 0.9
MIN_EXPECTED = 5.0
# Odd, so row i's low 32 bits differ for every i < 2**32; most seeds have high bits set and
# half of them are negative int64.
SEED_MULTIPLIER = 0x9E3779B97F4A7C15 - 2**64
BACKENDS = ["reference", "kernels"]


# ------------------------------------------------------------------------------------------
# Table models: table[a, b] is the next-token distribution after the tokens a, b.

def _normalise(table: np.ndarray) -> torch.Tensor:
    """Rows summing to 1 in float64, then float32 (what the op is given)."""
    return torch.from_numpy(table / table.sum(-1, keepdims=True)).float()


def _random_table(rng: np.random.Generator) -> np.ndarray:
    return rng.dirichlet(np.ones(V), size=(V, V))


def _one_hot(table: np.ndarray) -> np.ndarray:
    return np.eye(V)[table.argmax(-1)]


def _random_masks(rng: np.random.Generator, num_zero: int) -> np.ndarray:
    """[V, V, V] bool: True on ``num_zero`` random tokens per context."""
    ranks = rng.random((V, V, V)).argsort(-1).argsort(-1)
    return ranks < num_zero


def _case_tables(name: str) -> tuple[torch.Tensor, torch.Tensor, bool]:
    """(target table, draft table, deterministic drafter) for a case, all [V, V, V]."""
    rng = np.random.default_rng(sum(map(ord, name)))
    p, q = _random_table(rng), _random_table(rng)
    deterministic = False
    if name == "p_equals_q":
        q = p
    elif name == "disjoint_supports":  # q only where p is 0: every draft is rejected
        in_p = _random_masks(rng, V // 2)
        p, q = np.where(in_p, p, 0.0), np.where(in_p, 0.0, q)
    elif name == "q_zero_where_p_positive":  # tokens the drafter never proposes
        q = np.where(_random_masks(rng, 2), 0.0, q)
    elif name == "greedy_target":
        p = _one_hot(p)
    elif name == "deterministic_drafter":  # draft_probs=None, drafts = argmax of q
        deterministic = True
    elif name == "tiny_probabilities":  # entries ~1e-30 in both tables (floats, not denormals)
        p = np.where(_random_masks(rng, 2), 1e-30 * rng.uniform(0.5, 2, p.shape), p)
        q = np.where(_random_masks(rng, 2), 1e-30 * rng.uniform(0.5, 2, q.shape), q)
    else:
        assert name == "random"
    return _normalise(p), _normalise(q), deterministic


CASES = ["random", "p_equals_q", "disjoint_supports", "q_zero_where_p_positive",
         "greedy_target", "deterministic_drafter", "tiny_probabilities"]


def _exact_distribution(target: torch.Tensor) -> np.ndarray:
    """[V**NUM_GENERATED] float64: probability of each continuation of PROMPT, in the order of
    ``_cell_index`` (first token most significant)."""
    table = target.double().numpy()
    table = table / table.sum(-1, keepdims=True)  # draws normalise the row they draw from
    probs = np.empty(V**NUM_GENERATED)
    for cell, sequence in enumerate(itertools.product(range(V), repeat=NUM_GENERATED)):
        context, prob = list(PROMPT[-2:]), 1.0
        for token in sequence:
            prob *= table[context[-2], context[-1], token]
            context.append(token)
        probs[cell] = prob
    return probs


def _cell_index(sequences: np.ndarray) -> np.ndarray:
    return sequences @ (V ** np.arange(NUM_GENERATED - 1, -1, -1))


def _cell_name(cell: int) -> str:
    return str(tuple(int(d) for d in np.unravel_index(cell, (V,) * NUM_GENERATED)))


# ------------------------------------------------------------------------------------------
# Speculative decoding, vectorised over rows (the Python loops run over steps and slots).

def _sample(rows: torch.Tensor, generator: torch.Generator) -> torch.Tensor:
    """One index per row of [N, V] probabilities (inverse CDF in float64, zeros skipped)."""
    weights = rows.double()
    cum = weights.cumsum(-1)
    u = torch.rand(rows.shape[0], 1, generator=generator, dtype=torch.float64)
    return ((cum > u * cum[:, -1:]) & (weights > 0)).int().argmax(-1)


def _decode(target: torch.Tensor, draft: torch.Tensor, deterministic: bool, num_rows: int,
            seed: int = 0) -> np.ndarray:
    """[num_rows, NUM_GENERATED] int64: the first new tokens of ``num_rows`` decodes."""
    generator = torch.Generator().manual_seed(seed)  # the drafter's randomness
    prompt_len = len(PROMPT)
    sequences = torch.full((num_rows, prompt_len + NUM_GENERATED + K + 1), -1)
    sequences[:, :prompt_len] = torch.tensor(PROMPT)
    lengths = torch.full((num_rows,), prompt_len)
    seeds = torch.arange(num_rows) * SEED_MULTIPLIER
    slots = torch.arange(K + 1)
    while True:
        active = (lengths < prompt_len + NUM_GENERATED).nonzero().flatten()
        if active.numel() == 0:
            break
        batch = active.numel()
        length = lengths[active]
        # context[:, j], context[:, j + 1] are the two tokens before draft slot j; the root
        # (last committed token) sits at column 1 and at position length - 1.
        context = torch.empty(batch, K + 2, dtype=torch.int64)
        context[:, 0] = sequences[active, length - 2]
        context[:, 1] = sequences[active, length - 1]
        for j in range(K):
            q_row = draft[context[:, j], context[:, j + 1]]
            context[:, j + 2] = q_row.argmax(-1) if deterministic else _sample(q_row, generator)
        draft_lens = torch.randint(0, K + 1, (batch,), generator=generator, dtype=torch.int32)
        draft_tokens = torch.where(slots[:K] < draft_lens[:, None], context[:, 2:], -1)
        target_probs = target[context[:, :-1], context[:, 1:]]  # [batch, K+1, V]
        draft_probs = None if deterministic else draft[context[:, :-2], context[:, 1:-1]]
        tokens, num_accepted = specops.chain_verify(
            target_probs, draft_tokens, draft_probs, draft_lens, seeds=seeds[active],
            positions=length - 1)

        emitted = slots < num_accepted.long()[:, None] + 1  # [batch, K+1]
        assert (num_accepted <= draft_lens).all() and (num_accepted >= 0).all()
        assert torch.equal(tokens >= 0, emitted), "tokens must be -1 exactly past the emitted"
        assert (tokens < V).all()
        accepted = slots[:K] < num_accepted.long()[:, None]
        assert torch.equal(tokens[:, :K][accepted], draft_tokens[accepted])
        columns = length[:, None] + slots
        sequences[active[:, None].expand_as(columns)[emitted], columns[emitted]] = tokens[emitted]
        lengths[active] = length + num_accepted.long() + 1
    return sequences[:, prompt_len:prompt_len + NUM_GENERATED].numpy()


# ------------------------------------------------------------------------------------------
# The statistics.

def _power(df: int, num_rows: int) -> float:
    """Power of the chi-square test at ALPHA against any deviation of total variation TV.

    Noncentrality of a deviation d (sum 0, sum |d| = 2 TV) is lambda = N sum d_i**2 / p_i.
    By Cauchy-Schwarz on its positive part S+ and negative part S- (each moving TV of mass):
    lambda >= N TV**2 (1/p(S+) + 1/p(S-)) >= 4 N TV**2, since p(S+) + p(S-) <= 1. So
    lambda = 4 N TV**2 is the worst case (mass TV moved between two halves of mass 1/2; moving
    it between two cells gives N TV**2 (1/p_i + 1/p_j), at least as much).
    """
    return _power_at(df, num_rows, TV)


def _power_at(df: int, num_rows: int, tv: float) -> float:
    noncentrality = 4 * num_rows * tv**2
    return float(stats.ncx2.sf(stats.chi2.isf(ALPHA, df), df, noncentrality))


@dataclass
class ChiSquare:
    statistic: float
    df: int
    p_value: float
    power: float
    report: str  # the worst cells, observed vs expected


def _pool(expected: np.ndarray) -> np.ndarray:
    """[cells] int: group of each cell; cells expecting < MIN_EXPECTED share the last group,
    which takes the next smallest cells until it expects MIN_EXPECTED too."""
    order = np.argsort(expected, kind="stable")
    cum = np.cumsum(expected[order])
    num_small = int((expected < MIN_EXPECTED).sum())
    if num_small:
        num_small = max(num_small, min(int(np.searchsorted(cum, MIN_EXPECTED)) + 1, len(order)))
    groups = np.empty(len(expected), dtype=np.int64)
    kept = order[num_small:]
    groups[kept] = np.arange(len(kept))
    groups[order[:num_small]] = len(kept)
    return groups


def _chi_square(sequences: np.ndarray, exact: np.ndarray) -> ChiSquare:
    """Tests [N, NUM_GENERATED] sequences against the exact distribution of the cells."""
    return _chi_square_counts(np.bincount(_cell_index(sequences), minlength=len(exact)), exact)


def _chi_square_counts(observed_cells: np.ndarray, exact: np.ndarray) -> ChiSquare:
    num_rows = int(observed_cells.sum())
    impossible = (exact == 0) & (observed_cells > 0)
    assert not impossible.any(), "sequences of probability 0 were emitted: " + ", ".join(
        f"{_cell_name(c)} x{observed_cells[c]}" for c in np.flatnonzero(impossible))

    expected_cells = num_rows * exact
    groups = _pool(expected_cells)
    observed = np.bincount(groups, weights=observed_cells)
    expected = np.bincount(groups, weights=expected_cells)
    df = len(expected) - 1
    if df == 0:
        return ChiSquare(0.0, 0, 1.0, 1.0, "one cell")
    residuals = (observed - expected) / np.sqrt(expected)
    statistic = float((residuals**2).sum())
    lines = []
    pooled = groups.max() if (expected_cells < MIN_EXPECTED).any() else -1
    for g in np.argsort(-np.abs(residuals))[:8]:
        cells = np.flatnonzero(groups == g)
        name = f"pool of {len(cells)}" if g == pooled else _cell_name(cells[0])
        lines.append(f"  {name:>12}: observed {observed[g]:8.0f}  expected {expected[g]:10.1f}"
                     f"  (o-e)/sqrt(e) {residuals[g]:+6.2f}")
    return ChiSquare(statistic, df, float(stats.chi2.sf(statistic, df)), _power(df, num_rows),
                     "worst cells:\n" + "\n".join(lines))


# ------------------------------------------------------------------------------------------
# The tests.

@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("backend", BACKENDS)
def test_speculative_decoding_is_lossless(backend, case):
    """Decoding with chain_verify emits the target's autoregressive distribution.

    Significance 1e-3 (Pearson chi-square over the first 3 tokens, small cells pooled); power
    >= 0.9 against a total-variation deviation of 0.01 (asserted); any emitted sequence of
    probability 0 fails outright. ``greedy_target`` must equal the greedy sequence exactly.
    """
    target, draft, deterministic = _case_tables(case)
    exact = _exact_distribution(target)
    start = time.perf_counter()
    with specops.use_backend(backend):
        sequences = _decode(target, draft, deterministic, NUM_ROWS)
    result = _chi_square(sequences, exact)
    print(f"\n{backend}/{case}: N={NUM_ROWS} chi2={result.statistic:.1f} df={result.df} "
          f"p={result.p_value:.3g} power={result.power:.5f} "
          f"({time.perf_counter() - start:.1f}s)")
    if case == "greedy_target":
        greedy = np.array(np.unravel_index(int(exact.argmax()), (V,) * NUM_GENERATED))
        assert exact.max() == 1.0 and (sequences == greedy).all()
        return
    assert result.power >= MIN_POWER, f"power {result.power:.3f} < {MIN_POWER}: raise NUM_ROWS"
    assert result.p_value >= ALPHA, (
        f"{backend}/{case}: chi2 {result.statistic:.1f} on {result.df} df, p = "
        f"{result.p_value:.3g} < {ALPHA}\n{result.report}")


def test_drawing_from_p_instead_of_the_residual_is_caught(monkeypatch):
    """Negative control: the same test, significance 1e-3 and power >= 0.9 against a TV of
    0.01, rejects a rule that draws from ``p`` instead of ``max(0, p - q)`` after a rejection
    (random p and q, reference backend with its ``residual`` patched)."""
    monkeypatch.setattr(chain_ref, "residual", lambda p, q: sanitize(p))
    target, draft, deterministic = _case_tables("random")
    with specops.use_backend("reference"):
        sequences = _decode(target, draft, deterministic, NUM_ROWS)
    result = _chi_square(sequences, _exact_distribution(target))
    print(f"\nwrong rule: chi2={result.statistic:.1f} df={result.df} p={result.p_value:.3g}\n"
          f"{result.report}")
    assert result.power >= MIN_POWER
    assert result.p_value < ALPHA, f"the wrong rule passed: p = {result.p_value:.3g}"


def test_statistic_has_its_stated_size_and_power():
    """The chi-square machinery on exact multinomial samples (no decoding), for the ``random``
    case's distribution and N = NUM_ROWS: at significance 1e-3 it rejects at most 10 of 2000
    samples of the exact distribution (2 expected), and the worst-case alternatives (mass moved
    between two halves of mass ~1/2) are rejected as often as ``_power`` says: at TV 0.01
    (stated power >= 0.9) and at the TV where it states about 0.5, within 0.1 over 400 samples
    (4 standard errors)."""
    exact = _exact_distribution(_case_tables("random")[0])
    df = _chi_square_counts(np.round(NUM_ROWS * exact).astype(np.int64), exact).df
    plus = np.zeros(len(exact), dtype=bool)
    mass = 0.0
    for cell in np.argsort(-exact):  # greedy split into two halves of mass close to 1/2
        if mass + exact[cell] <= 0.5:
            plus[cell], mass = True, mass + exact[cell]
    rng = np.random.default_rng(0)

    def rejection_rate(tv: float, num_samples: int) -> float:
        probs = np.where(plus, exact * (1 + tv / mass), exact * (1 - tv / (1 - mass)))
        assert np.isclose(np.abs(probs - exact).sum() / 2, tv)
        counts = rng.multinomial(NUM_ROWS, probs / probs.sum(), size=num_samples)
        return np.mean([_chi_square_counts(cells, exact).p_value < ALPHA for cells in counts])

    # The TV at which the stated power is about 0.5: noncentrality = critical value - df.
    half_tv = TV * np.sqrt((stats.chi2.isf(ALPHA, df) - df) / (4 * NUM_ROWS * TV**2))
    size, power, half_power = (rejection_rate(0.0, 2000), rejection_rate(TV, 400),
                               rejection_rate(half_tv, 400))
    stated, stated_half = _power(df, NUM_ROWS), _power_at(df, NUM_ROWS, half_tv)
    print(f"\nsize {size:.4f} (alpha {ALPHA}); power at TV {TV}: {power:.3f} (stated "
          f"{stated:.5f}); at TV {half_tv:.4f}: {half_power:.3f} (stated {stated_half:.3f})")
    assert size * 2000 <= 10
    assert stated >= MIN_POWER and power >= stated - 0.1
    assert abs(half_power - stated_half) <= 0.1
