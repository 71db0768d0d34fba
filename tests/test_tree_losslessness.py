"""Losslessness of ``tree_verify``, tested on whole speculative decodes (contract, "Token
trees": lossless for children drawn independently from their ``q_i``, or deterministic).

The method, tables and statistics are those of test_losslessness.py (imported from it): each
test decodes ``NUM_ROWS`` rows from a fixed prompt with an order-2 Markov table target and
draft, repeating ``tree_verify`` until every row has ``NUM_GENERATED`` new tokens. Every step
draws, per row, a random tree of up to ``T - 1 = 6`` nodes (a chain, a star, a k-ary tree, a
random recursive tree or a deep one) and a ragged ``num_nodes`` in ``1..T``; a node's children
are

- drawn independently from the draft table at their parent (with replacement, so siblings
  repeat tokens), passed with their real ``draft_probs``; or
- the parent's top-k tokens under the draft table, distinct, with ``draft_probs=None``
  (a deterministic drafter; at most ``V`` children per node).

``target_probs`` comes from the target table at each node's last two tokens, ``positions``
(the root's index) advances by ``num_accepted + 1`` and the emitted tokens are
``tokens[:num_accepted + 1]``. The joint distribution of the first ``NUM_GENERATED`` tokens is
then compared with the exact autoregressive one: a sequence of probability 0 fails outright;
otherwise a Pearson chi-square over the ``V**NUM_GENERATED = 64`` cells (cells expecting
fewer than 5 pooled) at significance ``ALPHA = 1e-3``, with power ``>= 0.9`` against any
deviation of total variation ``TV = 0.01`` (computed from the noncentral chi-square and
asserted in every test; 0.999 at 63 degrees of freedom with N = 2**18). Both backends run
every case; on the kernels each step is also compared with the reference on a slice of rows.
A negative control (a wrong residual rule) must fail the same test.
"""

import time

import numpy as np
import pytest
import torch

import specops
import specops.reference.tree as tree_ref
from specops.reference.draw import sanitize
from test_losslessness import (
    ALPHA,
    MIN_POWER,
    NUM_GENERATED,
    NUM_ROWS,
    PROMPT,
    SEED_MULTIPLIER,
    V,
    _case_tables,
    _cell_index,
    _chi_square,
    _exact_distribution,
)
from tree_strategies import SHAPES, check_invariants, make_parents, sibling_ranks

T = 7  # tree slots: the root and up to 6 drafted nodes
# test name -> the table case of test_losslessness.py; "deterministic_drafter" gives top-k
# children with draft_probs=None, every other case children drawn from q with real draft_probs
CASES = {
    "independent_children": "random",
    "top_k_children": "deterministic_drafter",
    "p_equals_q": "p_equals_q",
    "disjoint_supports": "disjoint_supports",
    "q_zero_where_p_positive": "q_zero_where_p_positive",
}
GREEDY_ROWS = 2**12  # the greedy case is checked exactly, not statistically
CROSS_CHECKED_ROWS = 2048  # per step, the kernels' outputs are compared with the reference's
VERIFY_ARGS = ("target_probs", "tree_tokens", "parents", "num_nodes", "draft_probs")


def _draft_tree(generator: torch.Generator, batch: int, deterministic: bool):
    """(parents [batch, T] int32, num_nodes [batch] int32): one random shape per row."""
    kinds = torch.randint(0, len(SHAPES), (batch,), generator=generator)
    arity = int(torch.randint(1, 4, (1,), generator=generator))
    parents = make_parents(kinds, T, generator, arity=arity,
                           max_children=V if deterministic else None)
    num_nodes = torch.randint(1, T + 1, (batch,), generator=generator, dtype=torch.int32)
    return parents, num_nodes


def _decode(target: torch.Tensor, draft: torch.Tensor, deterministic: bool, num_rows: int,
            seed: int = 0) -> np.ndarray:
    """[num_rows, NUM_GENERATED] int64: the first new tokens of ``num_rows`` tree decodes."""
    generator = torch.Generator().manual_seed(seed)  # the drafter's randomness
    # Tables indexed by context = V * (second last token) + last token.
    target_rows, draft_rows = target.reshape(V * V, V), draft.reshape(V * V, V)
    draft_cum = draft_rows.double().cumsum(-1)  # inverse-CDF sampling, zero entries skipped
    top_k = torch.sort(draft_rows, dim=-1, descending=True, stable=True).indices
    prompt_len = len(PROMPT)
    sequences = torch.full((num_rows, prompt_len + NUM_GENERATED + T), -1)
    sequences[:, :prompt_len] = torch.tensor(PROMPT)
    lengths = torch.full((num_rows,), prompt_len)
    seeds = torch.arange(num_rows) * SEED_MULTIPLIER
    slots = torch.arange(T)
    while True:
        active = (lengths < prompt_len + NUM_GENERATED).nonzero().flatten()
        if active.numel() == 0:
            break
        batch = active.numel()
        length = lengths[active]
        parents, num_nodes = _draft_tree(generator, batch, deterministic)
        parent = parents.long().clamp(min=0)
        rank = sibling_ranks(parents)
        # last[:, i]: node i's token (node 0 is the root, the last committed token, at position
        # length - 1); context[:, i]: node i's last two tokens, the row of both tables after it.
        last = torch.empty(batch, T, dtype=torch.int64)
        context = torch.empty(batch, T, dtype=torch.int64)
        last[:, 0] = sequences[active, length - 1]
        context[:, 0] = V * sequences[active, length - 2] + last[:, 0]
        for i in range(1, T):
            at = context.gather(1, parent[:, i:i + 1]).squeeze(1)  # the parent's context
            if deterministic:  # the parent's (rank + 1)-th most probable draft token
                x = top_k[at, rank[:, i]]
            else:  # drawn from q, independently of its siblings
                cum = draft_cum[at]
                u = torch.rand(batch, 1, generator=generator, dtype=torch.float64)
                x = torch.searchsorted(cum, u * cum[:, -1:], right=True).squeeze(1).clamp(
                    max=V - 1)
            last[:, i] = x
            context[:, i] = V * (at % V) + x
        tree_tokens = torch.where(slots < num_nodes[:, None], last, -1)
        target_probs = target_rows[context]  # [batch, T, V]
        # node i was drawn from its parent's draft row (row 0 is unused)
        draft_probs = None if deterministic else draft_rows[context.gather(1, parent)]
        d = dict(target_probs=target_probs, tree_tokens=tree_tokens, parents=parents,
                 num_nodes=num_nodes, draft_probs=draft_probs, seeds=seeds[active],
                 positions=length - 1)
        out = specops.tree_verify(target_probs, tree_tokens, parents, num_nodes, draft_probs,
                                  seeds=d["seeds"], positions=d["positions"])
        check_invariants(d, out)
        if specops.get_backend() == "kernels":  # and the reference agrees on a slice of rows
            _check_against_reference(d, out, CROSS_CHECKED_ROWS)
        tokens, _, num_accepted = out
        emitted = slots < num_accepted.long()[:, None] + 1
        columns = length[:, None] + slots
        sequences[active[:, None].expand_as(columns)[emitted], columns[emitted]] = tokens[emitted]
        lengths[active] = length + num_accepted.long() + 1
    return sequences[:, prompt_len:prompt_len + NUM_GENERATED].numpy()


def _check_against_reference(d, out, num_rows: int) -> None:
    part = {k: (v[:num_rows] if isinstance(v, torch.Tensor) else v) for k, v in d.items()}
    with specops.use_backend("reference"):
        expected = specops.tree_verify(*(part[k] for k in VERIFY_ARGS),
                                       seeds=part["seeds"], positions=part["positions"])
    for name, a, e in zip(("tokens", "path", "num_accepted"), out, expected):
        assert torch.equal(a[:num_rows], e), f"kernels and reference differ in {name}"


@pytest.mark.parametrize("case", list(CASES))
@pytest.mark.parametrize("backend", ["reference", "kernels"])
def test_tree_decoding_is_lossless(backend, case):
    """Decoding with tree_verify emits the target's autoregressive distribution.

    Significance 1e-3 (Pearson chi-square over the first 3 tokens, small cells pooled); power
    >= 0.9 against a total-variation deviation of 0.01 (asserted); any emitted sequence of
    probability 0 fails outright. On the kernels, every step's outputs are also compared with
    the reference's on its first CROSS_CHECKED_ROWS rows.
    """
    target, draft, deterministic = _case_tables(CASES[case])
    exact = _exact_distribution(target)
    start = time.perf_counter()
    with specops.use_backend(backend):
        sequences = _decode(target, draft, deterministic, NUM_ROWS)
    result = _chi_square(sequences, exact)
    print(f"\n{backend}/{case}: N={NUM_ROWS} chi2={result.statistic:.1f} df={result.df} "
          f"p={result.p_value:.3g} power={result.power:.5f} "
          f"({time.perf_counter() - start:.1f}s)")
    assert result.power >= MIN_POWER, f"power {result.power:.3f} < {MIN_POWER}: raise NUM_ROWS"
    assert result.p_value >= ALPHA, (
        f"{backend}/{case}: chi2 {result.statistic:.1f} on {result.df} df, p = "
        f"{result.p_value:.3g} < {ALPHA}\n{result.report}")


@pytest.mark.parametrize("backend", ["reference", "kernels"])
def test_greedy_target_decodes_the_greedy_sequence(backend):
    """One-hot target rows (temperature 0): every row emits exactly the greedy sequence,
    with independent children and real draft_probs (exact, no statistics)."""
    target, draft, deterministic = _case_tables("greedy_target")
    exact = _exact_distribution(target)
    with specops.use_backend(backend):
        sequences = _decode(target, draft, deterministic, GREEDY_ROWS)
    greedy = np.array(np.unravel_index(int(exact.argmax()), (V,) * NUM_GENERATED))
    assert exact.max() == 1.0 and (sequences == greedy).all()


def test_not_carrying_the_residual_across_siblings_is_caught(monkeypatch):
    """Negative control: the same test, significance 1e-3 and power >= 0.9 against a TV of
    0.01, rejects a rule that keeps ``r = p`` after a rejected child instead of
    ``max(0, r - q)`` (independent children, random p and q, the reference with
    ``sibling_residual`` patched; its emitted distribution is about 0.22 from the exact one in
    total variation)."""
    monkeypatch.setattr(tree_ref, "sibling_residual",
                        lambda r, scale, q: sanitize(r / scale[:, None]))
    target, draft, deterministic = _case_tables(CASES["independent_children"])
    with specops.use_backend("reference"):
        sequences = _decode(target, draft, deterministic, NUM_ROWS)
    exact = _exact_distribution(target)
    result = _chi_square(sequences, exact)
    observed = np.bincount(_cell_index(sequences), minlength=len(exact)) / len(sequences)
    print(f"\nwrong rule: chi2={result.statistic:.1f} df={result.df} p={result.p_value:.3g} "
          f"TV={np.abs(observed - exact).sum() / 2:.3f}\n{result.report}")
    assert result.power >= MIN_POWER
    assert result.p_value < ALPHA, f"the wrong rule passed: p = {result.p_value:.3g}"
