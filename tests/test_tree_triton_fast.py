"""The two-launch path of ``tree_verify_triton`` for deterministic children (draft_probs=None,
one-hot q; specops/triton_kernels/tree.py) against the reference.

Literal trees pin its rules (a rejection that leaves no mass keeps the raw row, a chunk mass
that cancels is re-summed, the final draw skips rejected tokens); hypothesis draws top-k trees
with duplicate and out-of-range tokens, bad rows and vocabularies at chunk edges; a
statistical test checks the first emitted token's distribution. Shared helpers come from
test_tree_triton.py (which also runs both paths in its own tests).
"""

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from test_tree_triton import CUDA, DEVICE, INF, NAN, assert_same, detach_some, random_parents

from specops.reference import tree_verify_ref
from specops.triton_kernels import tree, tree_verify_triton

pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")


def verify_one_hot(target, tree_tokens, parents, num_nodes=None, seeds=None, positions=None,
                   chunk=4):
    """The two-launch path, checked against the reference; returns its outputs."""
    batch, num_slots, _ = target.shape
    args = dict(
        target_probs=target.to(DEVICE), tree_tokens=tree_tokens.to(DEVICE),
        parents=parents.to(DEVICE),
        num_nodes=(num_nodes if num_nodes is not None
                   else torch.full((batch,), num_slots, dtype=torch.int32)).to(DEVICE),
        draft_probs=None,
        seeds=(seeds if seeds is not None else torch.arange(batch) * 7919 + 1).to(DEVICE),
        positions=(positions if positions is not None
                   else torch.full((batch,), 100)).to(DEVICE))
    got = tree_verify_triton(**args, block_size=chunk, one_hot_path=True)
    expected = tree_verify_ref(**args)
    for g, e, what in zip(got, expected, ("tokens", "path", "num_accepted")):
        assert_same(g, e, what)
    return [x.cpu() for x in got]


def test_path_choice():
    """Deterministic children take the two-launch path while B * T <= 1024 (the module
    docstring's traffic argument); sampled children always take the single walk, and forcing
    the two-launch path with draft_probs is refused."""
    assert tree.uses_one_hot_path(1, 64, False) and tree.uses_one_hot_path(64, 16, False)
    assert not tree.uses_one_hot_path(256, 8, False)
    assert not tree.uses_one_hot_path(1, 64, True)
    probs = torch.full((1, 2, 4), 0.25, device=DEVICE)
    with pytest.raises(ValueError, match="one_hot_path"):
        tree_verify_triton(probs, torch.zeros(1, 2, dtype=torch.int64, device=DEVICE),
                           torch.tensor([[-1, 0]], dtype=torch.int32, device=DEVICE),
                           torch.tensor([2], dtype=torch.int32, device=DEVICE), probs,
                           torch.zeros(1, dtype=torch.int64, device=DEVICE),
                           torch.zeros(1, dtype=torch.int64, device=DEVICE), one_hot_path=True)


def star(batch, num_slots):
    parents = torch.zeros(batch, num_slots, dtype=torch.int32)
    parents[:, 0] = -1
    return parents


def test_no_mass_left_keeps_the_raw_row():
    """Root row: 1e-6 at token 3, inf at 4, NaN at 6, -1 at 1. Node 1 (token 3) is rejected
    and leaves no mass (3 was the only positive finite entry), so the raw row and S = 1 stay
    (contract): node 2 (token 4) then reads r(4) = inf and is accepted, and node 2's one-hot
    row at 5 gives the final token. A kernel that moved to the sanitised row would read 0."""
    target = torch.zeros(1, 3, 8)
    target[0, 0, 3], target[0, 0, 4], target[0, 0, 6], target[0, 0, 1] = 1e-6, INF, NAN, -1.0
    target[0, 1:, 5] = 1.0
    tokens, path, num_accepted = verify_one_hot(target, torch.tensor([[0, 3, 4]]),
                                                star(1, 3))
    assert tokens.tolist() == [[4, 5, -1]] and path.tolist() == [[2, -1, -1]]
    assert num_accepted.tolist() == [1]


@pytest.mark.parametrize("tiny_at", [2, 5])
def test_cancelling_chunk_mass_is_resummed(tiny_at):
    """Root row: 1e-3 at token 1 and 1e-30 at ``tiny_at`` (chunks of 4: the same chunk, then
    the next one). The only child, token 1, is rejected (u >= 1e-3 for these seeds), leaving
    {tiny_at: 1e-30}: in float64 1e-3 + 1e-30 - 1e-3 is 0, so a kernel that only subtracts
    would see no mass left, keep the row and draw token 1."""
    batch = 4
    target = torch.zeros(batch, 2, 8)
    target[:, 0, 1], target[:, 0, tiny_at] = 1e-3, 1e-30
    target[:, 1, 0] = 1.0
    tokens, _, num_accepted = verify_one_hot(target, torch.tensor([[0, 1]] * batch),
                                             star(batch, 2))
    assert tokens.tolist() == [[tiny_at, -1]] * batch and num_accepted.tolist() == [0] * batch


def test_final_draw_skips_rejected_tokens():
    """Uniform root row over 8 tokens, children tokens 0..5 (chunks of 4: the final draw's
    chunk holds rejected lanes). Rows that reject all six draw 6 or 7, never a rejected one."""
    batch = 32
    target = torch.full((batch, 7, 8), 0.125)
    tree_tokens = torch.tensor([[0, 0, 1, 2, 3, 4, 5]] * batch)
    tokens, path, num_accepted = verify_one_hot(target, tree_tokens, star(batch, 7))
    all_rejected = num_accepted == 0
    assert all_rejected.sum() >= 4  # the test's power, for these seeds
    assert set(tokens[all_rejected, 0].tolist()) <= {6, 7}


def one_hot_inputs(batch, num_slots, vocab, gen):
    """Top-k trees: node i's token is one of the ``top`` most probable tokens of its parent's
    row (so siblings repeat tokens), some out of range. Row corruptions, each with probability
    1/8 per node row: NaN, inf and negative entries; a zero row; a row whose only mass sits on
    its first child's token (rejecting it leaves no mass); a large and a tiny entry in one
    chunk, the large one a child's token (the cancellation case); an unnormalised row."""
    parents = random_parents(batch, num_slots, gen)
    logits = torch.randn(batch, num_slots, vocab, generator=gen) * 2
    target = logits.softmax(-1)
    safe = parents.clamp(min=0).long()
    rows = torch.arange(batch)[:, None]
    top = int(torch.randint(1, 4, (), generator=gen))
    order = target.argsort(-1, descending=True)[rows, safe]  # [B, T, V]: parent's ranking
    pick = torch.randint(0, min(top, vocab), (batch, num_slots, 1), generator=gen)
    tree_tokens = order.gather(-1, pick).squeeze(-1)
    wild = torch.rand(batch, num_slots, generator=gen) < 0.1
    wild_ids = torch.tensor([-1, vocab, vocab + 7])[torch.randint(0, 3, (batch, num_slots),
                                                                  generator=gen)]
    tree_tokens = torch.where(wild, wild_ids, tree_tokens)
    first_child = torch.full((batch, num_slots), -1)
    for b in range(batch):
        for i in range(num_slots - 1, 0, -1):
            if parents[b, i] >= 0:
                first_child[b, parents[b, i]] = i
    corrupt = torch.randint(0, 8, (batch, num_slots), generator=gen)
    for b in range(batch):
        for i in range(num_slots):
            kind = int(corrupt[b, i])
            child = int(first_child[b, i])
            x = int(tree_tokens[b, child]) if child >= 0 else 0
            x = x if 0 <= x < vocab else 0
            if kind == 1:
                target[b, i, 0] = NAN
                target[b, i, vocab - 1] = INF
                target[b, i, vocab // 2] = -1.0
            elif kind == 2:
                target[b, i] = 0.0
            elif kind == 3:
                target[b, i] = 0.0
                target[b, i, x] = 0.3
            elif kind == 4:
                target[b, i] = 0.0
                target[b, i, x] = 0.9
                target[b, i, x ^ 1 if (x ^ 1) < vocab else x] += 1e-30
                target[b, i, vocab - 1] += 0.05
            elif kind == 5:
                target[b, i] *= 1e-3
    num_nodes = torch.randint(1, num_slots + 1, (batch,), generator=gen, dtype=torch.int32)
    num_nodes[::2] = num_slots
    return target, tree_tokens, detach_some(parents, gen), num_nodes


@settings(max_examples=20 if not CUDA else 200, deadline=None)
@given(batch=st.integers(1, 4), num_slots=st.integers(1, 9), chunk=st.sampled_from([4, 8, 16]),
       num_chunks=st.integers(1, 3), edge=st.sampled_from([-1, 0, 1]),
       seed=st.integers(0, 2**31))
def test_one_hot_path_hypothesis(batch, num_slots, chunk, num_chunks, edge, seed):
    """Equality with the reference; V at chunk edges (k * CHUNK - 1, k * CHUNK, + 1)."""
    gen = torch.Generator().manual_seed(seed)
    vocab = max(1, chunk * num_chunks + edge)
    target, tree_tokens, parents, num_nodes = one_hot_inputs(batch, num_slots, vocab, gen)
    seeds = torch.randint(-2**63, 2**63 - 1, (batch,), generator=gen)
    positions = torch.randint(0, 2**40, (batch,), generator=gen)
    tokens, _, num_accepted = verify_one_hot(target, tree_tokens, parents, num_nodes, seeds,
                                             positions, chunk)
    final = tokens.gather(1, num_accepted.long()[:, None])
    assert ((final >= 0) & (final < vocab)).all()


def test_first_token_follows_the_target():
    """Losslessness of one step: the first emitted token is distributed as the root's row p.

    A star of deterministic children with tokens [0, 1, 0, 2] (a duplicate, simply rejected)
    over p = [0.4, 0.3, 0.2, 0.1], N rows with distinct seeds. Pearson chi-square (3 df) at
    significance 1e-3; the power against the likeliest bug, rejected tokens left in the
    residual (computed exactly below), is asserted >= 0.99.
    """
    stats = pytest.importorskip("scipy.stats")
    num_rows = 2**16 if CUDA else 256
    p = torch.tensor([0.4, 0.3, 0.2, 0.1], dtype=torch.float64)
    children = [0, 1, 0, 2]
    # The bug: r stays p, so child k is accepted with probability p(x_k), then a draw from p.
    bug, reach = torch.zeros(4, dtype=torch.float64), 1.0
    for x in children:
        bug[x] += reach * p[x]
        reach *= 1 - p[x]
    bug += reach * p
    alpha = 1e-3
    critical = stats.chi2.isf(alpha, 3)
    power = stats.ncx2.sf(critical, 3, num_rows * float(((bug - p) ** 2 / p).sum()))
    assert power >= 0.99

    target = p.float().expand(num_rows, 5, 4).contiguous()
    tree_tokens = torch.tensor([[-1] + children] * num_rows)
    seeds = torch.arange(num_rows) * 1000003 + 17
    tokens, _, _ = verify_one_hot(target, tree_tokens, star(num_rows, 5), seeds=seeds)
    counts = torch.bincount(tokens[:, 0], minlength=4).double()
    result = stats.chisquare(counts.numpy(), (num_rows * p).numpy())
    assert result.pvalue > alpha, f"counts {counts.tolist()}, chi2 p = {result.pvalue:.3g}"
