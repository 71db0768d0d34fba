"""Token-tree ops (contract, "Token trees"): ``tree_metadata``, ``tree_verify`` and
``tree_verify_greedy`` on every backend.

- hand-checkable greedy cases written as token lists;
- on chain-shaped trees, exactly ``chain_verify`` / ``chain_verify_greedy``;
- independent oracles (an explicit ancestor walk for the metadata, a row-by-row walk written
  from the contract's words for both verify ops) on hypothesis-drawn trees, and kernels equal
  to the reference on the same inputs;
- registration (opcheck, torch.compile, CUDA graphs, docstring examples), bad input at every
  check level, batch invariance.
The statistical test of ``tree_verify`` is in test_tree_losslessness.py.
"""

import doctest

import numpy as np
import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

import specops
import specops.tree_ops
from helpers import DEVICES, assert_equal_rows, random_chain_inputs
from specops.reference.random import PURPOSE_ACCEPT, PURPOSE_DRAW, uniform
from tree_strategies import (check_invariants, greedy_inputs, make_parents, sibling_ranks, trees,
                             verify_inputs)

BACKENDS = ["kernels", "reference"]
VOCAB = 10


@pytest.fixture
def checks():
    """Sets a check level for one test and restores the default after it."""
    yield specops.set_checks
    specops.set_checks("cheap")


def _i32(values) -> torch.Tensor:
    return torch.tensor(values, dtype=torch.int32)


def verify(d):
    return specops.tree_verify(d["target_probs"], d["tree_tokens"], d["parents"],
                               d["num_nodes"], d["draft_probs"], seeds=d["seeds"],
                               positions=d["positions"])


def verify_greedy(d):
    return specops.tree_verify_greedy(d["target_logits"], d["tree_tokens"], d["parents"],
                                      d["num_nodes"])


def assert_tree_equal(actual, expected, what=""):
    for name, a, e in zip(("tokens", "path", "num_accepted"), actual, expected):
        assert_equal_rows(a, e, f"{what} {name}")


def on_backend(backend, fn, d):
    with specops.use_backend(backend):
        return fn(d)


# ------------------------------------------------------------------------------------------
# Oracles: the contract's words, row by row, in plain Python.

def metadata_oracle(parents: torch.Tensor, num_nodes: torch.Tensor):
    """mask[b, i, j] iff j is i or an ancestor (walking parent pointers); depth = number of
    ancestors; nodes past num_nodes: False / -1. Valid trees only."""
    batch, num_slots = parents.shape
    mask = torch.zeros(batch, num_slots, num_slots, dtype=torch.bool)
    depth = torch.full((batch, num_slots), -1, dtype=torch.int32)
    for b in range(batch):
        par = parents[b].tolist()
        for i in range(int(num_nodes[b])):
            j, ancestors = i, 0
            while j != -1:
                mask[b, i, j] = True
                j = par[j]
                ancestors += j != -1
            depth[b, i] = ancestors
    return mask, depth


def _children(par: list[int], n: int) -> tuple[list[list[int]], list[int]]:
    children, depth = [[] for _ in par], [0] * len(par)
    for i in range(1, n):
        children[par[i]].append(i)
        depth[i] = depth[par[i]] + 1
    return children, depth


def greedy_oracle(d):
    """At each node the first child (index order) whose token is the node's first argmax."""
    argmax = d["target_logits"].float().argmax(-1).tolist()
    return _collect(d, lambda b: _greedy_walk(argmax[b], d["tree_tokens"][b].tolist(),
                                              d["parents"][b].tolist(), int(d["num_nodes"][b])))


def _greedy_walk(argmax, tokens, par, n):
    children, _ = _children(par, n)
    node, path = 0, []
    while True:
        match = [c for c in children[node] if tokens[c] == argmax[node]]
        if not match:
            return [tokens[c] for c in path] + [argmax[node]], path
        node = match[0]
        path.append(node)


def _u(seed: int, position: int, rank: int, purpose: int) -> np.float32:
    return np.float32(uniform(torch.tensor(seed), torch.tensor(position), rank, purpose).item())


def _sanitize(w: np.ndarray) -> np.ndarray:
    return np.where((w > 0) & (w < np.inf), w, np.float32(0)).astype(np.float32)


def _draw(w: np.ndarray, u: np.float32) -> int:
    """Smallest i with w[i] > 0 whose inclusive prefix sum (float64) exceeds u * sum(w)."""
    cum = np.cumsum(w.astype(np.float64))
    hit = (w > 0) & (cum > np.float64(u) * cum[-1])
    return int(np.argmax(hit)) if hit.any() else 0


def verify_oracle(d):
    """Walk from the root; test the children in index order against the residual r (``p`` of
    the node, then ``max(0, r - q_i)`` renormalised after each rejection; zero mass keeps r);
    accept iff ``u * q(x) < r(x)`` with u from (seed, position + depth, sibling rank, 0);
    at a leaf or after rejecting every child draw from r with (seed, position + depth + 1, 0,
    1). float32 arithmetic as the reference does it. Valid inputs only."""
    p_all = d["target_probs"].numpy()
    q_all = None if d["draft_probs"] is None else d["draft_probs"].numpy()

    def walk(b):
        tokens, par, n = d["tree_tokens"][b].tolist(), d["parents"][b].tolist(), int(
            d["num_nodes"][b])
        seed, position = int(d["seeds"][b]), int(d["positions"][b])
        children, depth = _children(par, n)
        vocab = p_all.shape[-1]
        node, path = 0, []
        r, scale = p_all[b, 0].copy(), np.float32(1)
        while True:
            for rank, c in enumerate(children[node]):
                x = tokens[c]
                q = np.eye(vocab, dtype=np.float32)[x] if q_all is None else q_all[b, c]
                u = _u(seed, position + depth[c], rank, PURPOSE_ACCEPT)
                if u * q[x] < r[x] / scale:
                    path.append(c)
                    node, r, scale = c, p_all[b, c].copy(), np.float32(1)
                    break
                residual = _sanitize(r / scale - q)
                mass = residual.astype(np.float64).sum()
                if mass > 0:
                    r, scale = residual, np.float32(mass)
            else:
                u = _u(seed, position + depth[node] + 1, 0, PURPOSE_DRAW)
                return [tokens[c] for c in path] + [_draw(_sanitize(r), u)], path

    return _collect(d, walk)


def _collect(d, walk):
    batch, num_slots = d["parents"].shape
    tokens = torch.full((batch, num_slots), -1, dtype=torch.int64)
    path = torch.full((batch, num_slots), -1, dtype=torch.int32)
    num_accepted = torch.zeros(batch, dtype=torch.int32)
    for b in range(batch):
        row_tokens, row_path = walk(b)
        tokens[b, :len(row_tokens)] = torch.tensor(row_tokens)
        path[b, :len(row_path)] = torch.tensor(row_path, dtype=torch.int32)
        num_accepted[b] = len(row_path)
    return tokens, path, num_accepted


# ------------------------------------------------------------------------------------------
# Hand-checkable greedy cases. Node 0 is the root (its token, 0 here, is unused); the target's
# argmax is given per node; outputs exclude the root.

def logits_with_argmax(argmax: list[list[int]]) -> torch.Tensor:
    x = torch.zeros(len(argmax), len(argmax[0]), VOCAB)
    x.scatter_(-1, torch.tensor(argmax)[..., None], 5.0)
    return x


TREE = [-1, 0, 0, 1, 2]  # 0 -> {1, 2}, 1 -> {3}, 2 -> {4}


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("parents, tokens, num_nodes, argmax, expected, path, accepted", [
    # root argmax 7: child 1 (5) no, child 2 (7) yes; node 2 argmax 9: child 4 (9) yes; node 4
    # is a leaf: bonus token argmax[4] = 1
    ([TREE], [[0, 5, 7, 3, 9]], [5], [[7, 3, 9, 4, 1]], [[7, 9, 1, -1, -1]],
     [[2, 4, -1, -1, -1]], [2]),
    # root argmax 5: child 1; node 1 argmax 8: child 3 (3) no -> emit 8
    ([TREE], [[0, 5, 7, 3, 9]], [5], [[5, 8, 9, 4, 1]], [[5, 8, -1, -1, -1]],
     [[1, -1, -1, -1, -1]], [1]),
    # no child of the root matches: emit the root's argmax
    ([TREE], [[0, 5, 7, 3, 9]], [5], [[6, 3, 9, 4, 1]], [[6, -1, -1, -1, -1]],
     [[-1, -1, -1, -1, -1]], [0]),
    # duplicates: children 1 and 2 both hold 4; the first wins although node 2's child (2)
    # would have matched next
    ([TREE], [[0, 4, 4, 1, 2]], [5], [[4, 3, 2, 0, 0]], [[4, 3, -1, -1, -1]],
     [[1, -1, -1, -1, -1]], [1]),
    # a star: the later sibling 3 matches after two non-matching duplicates; leaf -> bonus 8
    ([[-1, 0, 0, 0]], [[0, 6, 6, 2]], [4], [[2, 0, 0, 8]], [[2, 8, -1, -1]],
     [[3, -1, -1, -1]], [1]),
    # a chain, all accepted: bonus from the last node
    ([[-1, 0, 1, 2]], [[0, 1, 2, 3]], [4], [[1, 2, 3, 4]], [[1, 2, 3, 4]], [[1, 2, 3, -1]],
     [3]),
    # ragged: row 1 uses nodes 0..1 only (node 2's 7 would match), row 2 the root only
    ([TREE, TREE, TREE], [[0, 5, 7, 3, 9]] * 3, [5, 2, 1], [[7, 3, 9, 4, 1]] * 3,
     [[7, 9, 1, -1, -1], [7, -1, -1, -1, -1], [7, -1, -1, -1, -1]],
     [[2, 4, -1, -1, -1], [-1] * 5, [-1] * 5], [2, 0, 0]),
    # nodes past num_nodes may hold anything (-1 tokens, parents out of range)
    ([[-1, 0, 9, -4]], [[0, 3, -1, 99]], [2], [[3, 1, 1, 1]], [[3, 1, -1, -1]],
     [[1, -1, -1, -1]], [1]),
])
def test_greedy_token_lists(backend, parents, tokens, num_nodes, argmax, expected, path,
                            accepted):
    logits = logits_with_argmax(argmax)
    d = dict(target_logits=logits, tree_tokens=torch.tensor(tokens), parents=_i32(parents),
             num_nodes=_i32(num_nodes))
    with specops.use_backend(backend):
        out = verify_greedy(d)
        # tree_verify on one-hot rows is exactly greedy, whatever the seed and draft rows
        probs = specops.sampling_probs(logits.reshape(-1, VOCAB), temperature=0.0)
        probs = probs.reshape(logits.shape)
        for seed in (0, 1, -5, 2**40 + 3):
            for draft_probs in (None, torch.full_like(probs, 1 / VOCAB), probs.roll(1, -1)):
                sampled = verify(dict(d, target_probs=probs, draft_probs=draft_probs,
                                      seeds=torch.full((len(tokens),), seed),
                                      positions=torch.arange(len(tokens)) * 1000))
                assert [t.tolist() for t in sampled] == [expected, path, accepted]
    assert [t.tolist() for t in out] == [expected, path, accepted]


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_ties_take_the_first_maximal_index(backend):
    logits = torch.tensor([[[0.0, 3.0, 3.0], [1.0, 1.0, 1.0], [0.0, 0.0, 0.0]]])
    parents = _i32([[-1, 0, 0]])
    with specops.use_backend(backend):
        out = specops.tree_verify_greedy(logits, torch.tensor([[0, 2, 1]]), parents)
        assert [t.tolist() for t in out] == [[[1, 0, -1]], [[2, -1, -1]], [1]]
        out = specops.tree_verify_greedy(logits.bfloat16(), torch.tensor([[0, 2, 2]]), parents)
        assert [t.tolist() for t in out] == [[[1, -1, -1]], [[-1, -1, -1]], [0]]


@pytest.mark.parametrize("backend", BACKENDS)
def test_residual_is_carried_across_siblings(backend):
    """Root p = [1/2, 1/2, 0, ...], deterministic children with tokens 0, 0, 1. Child 1 is
    accepted iff u < 1/2; after its rejection the residual is [0, 1, 0, ...]: the duplicate
    child 2 is always rejected and child 3 always accepted. Children 1 and 3 are leaves with
    one-hot rows at 7 and 8. So every seed gives [0, 7] via path [1] or [1, 8] via [3]."""
    n = 256
    p = torch.zeros(n, 4, VOCAB)
    p[:, 0, :2] = 0.5
    p[:, 1, 7] = p[:, 2, 5] = p[:, 3, 8] = 1.0
    d = dict(target_probs=p, tree_tokens=torch.tensor([[0, 0, 0, 1]]).expand(n, 4),
             parents=_i32([[-1, 0, 0, 0]]).expand(n, 4), num_nodes=_i32([4] * n),
             draft_probs=None, seeds=torch.arange(n) * 7919, positions=torch.arange(n))
    tokens, path, num_accepted = on_backend(backend, verify, d)
    first = path[:, 0] == 1
    assert num_accepted.eq(1).all() and path[:, 1:].eq(-1).all()
    assert (first | (path[:, 0] == 3)).all()
    assert torch.equal(tokens[:, :2], torch.where(first[:, None], torch.tensor([0, 7]),
                                                  torch.tensor([1, 8])))
    assert 0.35 < first.float().mean() < 0.65  # 1/2 in expectation, sd 0.03


@pytest.mark.parametrize("backend", BACKENDS)
def test_sibling_rank_picks_the_random_number(backend):
    """Root p = [1/2, 1/4, 1/4, 0, ...], deterministic children 1, 2, 3 with tokens 0, 1, 2
    (leaves with one-hot rows at 5, 6, 7). Child k is tested with u_k = Philox(seed, position
    + 1, k - 1, accept): child 1 is accepted iff u_0 < 1/2; else the residual is [0, 1/2, 1/2]
    and child 2 is accepted iff u_1 < 1/2; else child 3 surely. (With one u for all siblings
    child 2 could never be accepted.)"""
    n = 256
    p = torch.zeros(n, 4, VOCAB)
    p[:, 0, :3] = torch.tensor([0.5, 0.25, 0.25])
    p[:, 1, 5] = p[:, 2, 6] = p[:, 3, 7] = 1.0
    seeds, positions = torch.arange(n) * -104729, torch.arange(n) * 2**31
    d = dict(target_probs=p, tree_tokens=torch.tensor([[9, 0, 1, 2]]).expand(n, 4),
             parents=_i32([[-1, 0, 0, 0]]).expand(n, 4), num_nodes=_i32([4] * n),
             draft_probs=None, seeds=seeds, positions=positions)
    tokens, path, _ = on_backend(backend, verify, d)
    u0, u1 = (uniform(seeds, positions + 1, rank, PURPOSE_ACCEPT) for rank in (0, 1))
    child = torch.where(u0 < 0.5, 1, torch.where(u1 < 0.5, 2, 3))
    assert torch.equal(path[:, 0], child.int())
    assert torch.equal(tokens[:, :2], torch.stack([child - 1, child + 4], 1))
    assert (child == 2).any()


# ------------------------------------------------------------------------------------------
# Chains: tree_verify is chain_verify (same seeds, positions, tokens).

@st.composite
def chain_cases(draw):
    vocab = draw(st.sampled_from([1, 2, 5, 300, 3000]))
    batch = draw(st.integers(1, 6))
    num_draft = draw(st.integers(0, 3 if vocab > 1000 else 8))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    d = random_chain_inputs(batch, num_draft, vocab, g, with_draft_probs=draw(st.booleans()))
    d["draft_lens"] = torch.tensor(draw(st.lists(
        st.one_of(st.just(0), st.just(num_draft), st.integers(0, num_draft)),
        min_size=batch, max_size=batch)), dtype=torch.int32)
    d["seeds"] = torch.tensor(draw(st.lists(st.integers(-2**63, 2**63 - 1), min_size=batch,
                                            max_size=batch)))
    return d, draw(st.integers(0, 3))  # extra tree slots past the chain


def chain_as_tree(d, extra: int):
    """parents [-1, 0, ..., K-1] then ``extra`` unused slots; num_nodes = draft_lens + 1."""
    batch, num_rows, vocab = d["target_probs"].shape
    g = torch.Generator().manual_seed(extra)
    num_slots = num_rows + extra
    parents = torch.arange(-1, num_slots - 1, dtype=torch.int32).expand(batch, -1).clone()
    parents[:, num_rows:] = torch.randint(-2, num_slots + 2, (batch, extra), generator=g).int()
    tokens = torch.cat([torch.zeros(batch, 1, dtype=torch.int64), d["draft_tokens"],
                        torch.full((batch, extra), -1)], 1)
    target = torch.cat([d["target_probs"], torch.rand(batch, extra, vocab, generator=g)], 1)
    draft = None
    if d["draft_probs"] is not None:
        draft = torch.cat([torch.full((batch, 1, vocab), float("nan")), d["draft_probs"],
                           torch.rand(batch, extra, vocab, generator=g)], 1)
    return dict(target_probs=target, tree_tokens=tokens, parents=parents,
                num_nodes=d["draft_lens"] + 1, draft_probs=draft, seeds=d["seeds"],
                positions=d["positions"])


@pytest.mark.parametrize("backend", BACKENDS)
@settings(max_examples=40)
@given(case=chain_cases())
def test_chain_shaped_tree_is_chain_verify(backend, case):
    d, extra = case
    tree = chain_as_tree(d, extra)
    num_rows = d["target_probs"].shape[1]
    with specops.use_backend(backend):
        chain_tokens, chain_accepted = specops.chain_verify(
            d["target_probs"], d["draft_tokens"], d["draft_probs"], d["draft_lens"],
            seeds=d["seeds"], positions=d["positions"])
        tokens, path, num_accepted = verify(tree)
        logits = d["target_probs"].log()
        greedy_chain = specops.chain_verify_greedy(logits, d["draft_tokens"], d["draft_lens"])
        greedy_tree = verify_greedy(dict(tree, target_logits=tree["target_probs"].log()))
    event("draft_probs" if d["draft_probs"] is not None else "no draft_probs")
    event("a rejection" if bool((chain_accepted < d["draft_lens"]).any()) else "no rejection")
    assert_equal_rows(num_accepted, chain_accepted, "num_accepted")
    assert_equal_rows(tokens[:, :num_rows], chain_tokens, "tokens")
    assert tokens[:, num_rows:].eq(-1).all()
    slots = torch.arange(tree["parents"].shape[1])
    expected_path = torch.where(slots < num_accepted[:, None], slots + 1, -1).int()
    assert_equal_rows(path, expected_path, "path")
    assert_equal_rows(greedy_tree[2], greedy_chain[1], "greedy num_accepted")
    assert_equal_rows(greedy_tree[0][:, :num_rows], greedy_chain[0], "greedy tokens")
    assert greedy_tree[0][:, num_rows:].eq(-1).all()


# ------------------------------------------------------------------------------------------
# Metadata

@pytest.mark.parametrize("backend", BACKENDS)
def test_metadata_literal(backend):
    # 0 -> {1, 2}, 1 -> {3, 4}, 4 -> {5}; row 1 uses nodes 0..2 only
    parents = _i32([[-1, 0, 0, 1, 1, 4]] * 2)
    with specops.use_backend(backend):
        mask, depth = specops.tree_metadata(parents, _i32([6, 3]))
    assert depth.tolist() == [[0, 1, 1, 2, 2, 3], [0, 1, 1, -1, -1, -1]]
    T, F = True, False
    assert mask[0].tolist() == [[T, F, F, F, F, F],
                                [T, T, F, F, F, F],
                                [T, F, T, F, F, F],
                                [T, T, F, T, F, F],
                                [T, T, F, F, T, F],
                                [T, T, F, F, T, T]]
    assert mask[1].tolist() == [[T, F, F, F, F, F],
                                [T, T, F, F, F, F],
                                [T, F, T, F, F, F]] + [[F] * 6] * 3
    with specops.use_backend(backend):  # num_nodes=None: all nodes
        assert torch.equal(specops.tree_metadata(parents[:1])[1], depth[:1])


@settings(max_examples=50)
@given(tree=trees(max_batch=4, max_slots=256))
def test_metadata_is_the_ancestor_relation(tree):
    parents, num_nodes, shapes = tree
    event(f"T={'<=12' if parents.shape[1] <= 12 else '<=256'}")
    expected = metadata_oracle(parents, num_nodes)
    for backend in BACKENDS:
        with specops.use_backend(backend):
            mask, depth = specops.tree_metadata(parents, num_nodes)
        assert mask.dtype == torch.bool and depth.dtype == torch.int32
        assert_equal_rows(depth, expected[1], f"{backend} depth")
        assert_equal_rows(mask, expected[0], f"{backend} mask")


# ------------------------------------------------------------------------------------------
# Verification on random trees: the oracle, and kernels equal to the reference

def _rows(d) -> torch.Tensor:
    return d["target_probs"] if "target_probs" in d else d["target_logits"]


def _events(d, expected):
    event(f"V={_rows(d).shape[-1]}")
    tokens, path, num_accepted = expected
    event("a root-only row" if bool((d["num_nodes"] == 1).any()) else "no root-only row")
    event("an acceptance" if bool((num_accepted > 0).any()) else "no acceptance")
    rank = sibling_ranks(d["parents"]).gather(1, path.long().clamp(min=0))
    later = (path >= 0) & (rank > 0)
    event("a later sibling accepted" if bool(later.any()) else "only first children accepted")


@pytest.mark.parametrize("with_draft_probs", [True, False])
@settings(max_examples=50)
@given(data=st.data())
def test_tree_verify_matches_oracle_and_reference(with_draft_probs, data):
    d = data.draw(verify_inputs(with_draft_probs=with_draft_probs))
    expected = on_backend("reference", verify, d)
    _events(d, expected)
    check_invariants(d, expected)
    if d["target_probs"].shape[-1] <= 17:  # exact float64 sums: the oracle is bit-exact
        assert_tree_equal(expected, verify_oracle(d), "reference vs oracle")
    assert_tree_equal(on_backend("kernels", verify, d), expected, "kernels vs reference")


@settings(max_examples=60)
@given(d=greedy_inputs())
def test_tree_verify_greedy_matches_oracle_and_reference(d):
    expected = greedy_oracle(d)
    _events(d, expected)
    event(str(d["target_logits"].dtype))
    check_invariants(d, expected)
    for backend in BACKENDS:
        assert_tree_equal(on_backend(backend, verify_greedy, d), expected, backend)


def test_strided_inputs():
    """Views (a slice of a larger batch, transposed storage) read through their strides."""
    g = torch.Generator().manual_seed(5)
    big = (torch.randn(8, 12, 301, generator=g) * 3).softmax(-1)
    parents_t = make_parents(["random", "star", "deep", "chain"], 9, g).t().contiguous().t()
    d = dict(target_probs=big[::2, 1:10], draft_probs=big[1::2, 2:11],
             tree_tokens=big[::2, :9].argmax(-1).t().contiguous().t(), parents=parents_t,
             num_nodes=_i32([9, 5, 9, 1]), seeds=torch.tensor([1, 2, 3, 4]),
             positions=torch.tensor([10, 20, 30, 40]))
    assert not d["target_probs"].is_contiguous() and not d["parents"].is_contiguous()
    contiguous = {k: (v.contiguous() if isinstance(v, torch.Tensor) else v) for k, v in d.items()}
    greedy = dict(d, target_logits=d["target_probs"].log().bfloat16())
    for backend in BACKENDS:
        expected = on_backend("reference", verify, contiguous)
        assert_tree_equal(on_backend(backend, verify, d), expected, backend)
        assert_tree_equal(on_backend(backend, verify_greedy, greedy),
                          on_backend("reference", verify_greedy,
                                     dict(greedy, target_logits=greedy["target_logits"]
                                          .contiguous())), backend)
        with specops.use_backend(backend):
            assert torch.equal(specops.tree_metadata(d["parents"], d["num_nodes"])[0],
                               specops.tree_metadata(contiguous["parents"],
                                                     d["num_nodes"])[0])


# ------------------------------------------------------------------------------------------
# Registration: opcheck, torch.compile, CUDA graphs, docstring examples

def simple_inputs(batch: int, num_slots: int, vocab: int, g: torch.Generator,
                  with_draft_probs: bool = True, device: str = "cpu"):
    """Random trees (all shapes), softmax rows, tokens = the parent's argmax or random."""
    shapes = [("chain", "star", "kary", "random", "deep")[i % 5] for i in range(batch)]
    parents = make_parents(shapes, num_slots, g)
    target = (torch.randn(batch, num_slots, vocab, generator=g) * 3).softmax(-1)
    draft = (torch.randn(batch, num_slots, vocab, generator=g) * 3).softmax(-1)
    best = target[torch.arange(batch)[:, None], parents.long().clamp(min=0)].argmax(-1)
    anything = torch.randint(0, vocab, (batch, num_slots), generator=g)
    tokens = torch.where(torch.rand(batch, num_slots, generator=g) < 0.6, best, anything)
    d = dict(target_probs=target, tree_tokens=tokens, parents=parents,
             num_nodes=torch.randint(1, num_slots + 1, (batch,), generator=g, dtype=torch.int32),
             draft_probs=draft if with_draft_probs else None,
             seeds=torch.randint(-2**62, 2**62, (batch,), generator=g),
             positions=torch.randint(0, 2**40, (batch,), generator=g))
    return {k: (v.to(device) if v is not None else None) for k, v in d.items()}


def _verify_args(d):
    return (d["target_probs"], d["tree_tokens"], d["parents"], d["num_nodes"], d["draft_probs"],
            d["seeds"], d["positions"])


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    g = torch.Generator().manual_seed(0)
    ops = torch.ops.specops
    for with_q in (True, False):
        d = simple_inputs(5, 7, 50, g, with_q, device)
        torch.library.opcheck(ops.tree_verify.default, _verify_args(d))
        torch.library.opcheck(ops.tree_verify_greedy.default,
                              (d["target_probs"].log().bfloat16(), d["tree_tokens"],
                               d["parents"], d["num_nodes"]))
        torch.library.opcheck(ops.tree_metadata.default, (d["parents"], d["num_nodes"]))
    d = simple_inputs(2, 1, 1, g, True, device)  # the root alone, V = 1
    torch.library.opcheck(ops.tree_verify.default, _verify_args(d))


def _tree_step(target_probs, tree_tokens, parents, num_nodes, draft_probs, seeds, positions):
    mask, depth = specops.tree_metadata(parents, num_nodes)
    tokens, path, num_accepted = specops.tree_verify(target_probs, tree_tokens, parents,
                                                     num_nodes, draft_probs, seeds=seeds,
                                                     positions=positions)
    greedy = specops.tree_verify_greedy(target_probs.log(), tree_tokens, parents, num_nodes)
    return (mask, depth, tokens, path, num_accepted) + tuple(greedy)


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("with_q", [True, False])
def test_compile_fullgraph_matches_eager(device, with_q):
    d = simple_inputs(6, 9, 64, torch.Generator().manual_seed(1), with_q, device)
    eager = _tree_step(*_verify_args(d))
    compiled = torch.compile(_tree_step, fullgraph=True)(*_verify_args(d))
    for a, b in zip(compiled, eager):
        torch.testing.assert_close(a, b, rtol=0, atol=0)


@pytest.mark.skipif(not torch.cuda.is_available(), reason="needs a CUDA GPU")
def test_cuda_graph_capture_and_replay_with_new_inputs():
    g = torch.Generator().manual_seed(2)
    static = simple_inputs(8, 12, 1000, g, device="cuda")
    _tree_step(*_verify_args(static))  # warm-up (Triton JIT)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        outputs = _tree_step(*_verify_args(static))
    for trial in range(3):
        fresh = simple_inputs(8, 12, 1000, g, device="cuda")
        for name, value in fresh.items():
            static[name].copy_(value)
        graph.replay()
        expected = _tree_step(*_verify_args(fresh))
        for i, (out, exp) in enumerate(zip(outputs, expected)):
            assert_equal_rows(out, exp, f"replay {trial}, output {i}")


def test_tree_ops_docstring_examples():
    results = doctest.testmod(specops.tree_ops, extraglobs={"specops": specops, "torch": torch},
                              optionflags=doctest.NORMALIZE_WHITESPACE)
    assert results.attempted > 0
    assert results.failed == 0


# ------------------------------------------------------------------------------------------
# Bad input

def _bad(**overrides):
    """B=3, T=5, V=20: row 0 uses all nodes, row 1 nodes 0..2, row 2 the root only."""
    d = simple_inputs(3, 5, 20, torch.Generator().manual_seed(0))
    d.update(parents=_i32([[-1, 0, 0, 1, 2]] * 3), num_nodes=_i32([5, 3, 1]))
    d.update(overrides)
    return d


def _greedy(d):
    return specops.tree_verify_greedy(d["target_probs"].log(), d["tree_tokens"], d["parents"],
                                      d["num_nodes"])


def _metadata(d):
    return specops.tree_metadata(d["parents"], d["num_nodes"])


# (argument, spoiled value, error, the ops taking that argument besides tree_verify)
WRONG_ARGUMENTS = [
    ("target_probs", lambda d: d["target_probs"].double(), TypeError, ""),
    ("target_probs", lambda d: d["target_probs"][0], ValueError, ""),
    ("target_probs", lambda d: d["target_probs"][:, :, :0], ValueError, ""),
    ("tree_tokens", lambda d: d["tree_tokens"].int(), TypeError, "g"),
    ("tree_tokens", lambda d: d["tree_tokens"][:, :4], ValueError, "g"),
    ("tree_tokens", lambda d: d["tree_tokens"][:2], ValueError, "g"),
    ("parents", lambda d: d["parents"].long(), TypeError, "gm"),
    ("parents", lambda d: d["parents"][:, :4], ValueError, "g"),
    ("parents", lambda d: d["parents"][0], ValueError, "gm"),
    ("parents", lambda d: d["parents"].tolist(), TypeError, "gm"),
    ("num_nodes", lambda d: d["num_nodes"].long(), TypeError, "gm"),
    ("num_nodes", lambda d: d["num_nodes"][:2], ValueError, "gm"),
    ("num_nodes", lambda d: d["num_nodes"].to("meta"), ValueError, "gm"),
    ("draft_probs", lambda d: d["draft_probs"].half(), TypeError, ""),
    ("draft_probs", lambda d: d["draft_probs"][:, :4], ValueError, ""),
    ("draft_probs", lambda d: d["draft_probs"][:, :, :19], ValueError, ""),
    ("seeds", lambda d: d["seeds"].float(), TypeError, ""),
    ("seeds", lambda d: d["seeds"][:, None], ValueError, ""),
    ("positions", lambda d: d["positions"].int(), TypeError, ""),
    ("positions", lambda d: d["positions"].to("meta"), ValueError, ""),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, value, error, also", WRONG_ARGUMENTS)
def test_wrong_dtype_shape_device_names_the_argument(backend, checks, name, value, error, also):
    """At every check level; ``g``: also tree_verify_greedy, ``m``: also tree_metadata."""
    ops = [verify] + [_greedy] * ("g" in also) + [_metadata] * ("m" in also)
    for level in ("off", "cheap", "full"):
        checks(level)
        d = _bad()
        d[name] = value(d)
        for op in ops:
            with specops.use_backend(backend), pytest.raises(error, match=name):
                op(d)


@pytest.mark.parametrize("backend", BACKENDS)
def test_greedy_logits_dtype_and_shape(backend):
    d = _bad()
    with specops.use_backend(backend):
        # the rows define B, T and V, so a T that differs is blamed on tree_tokens
        for logits, error, name in ((d["target_probs"].double(), TypeError, "target_logits"),
                                    (d["target_probs"].long(), TypeError, "target_logits"),
                                    (d["target_probs"][0], ValueError, "target_logits"),
                                    (d["target_probs"][:, :4], ValueError, "tree_tokens")):
            with pytest.raises(error, match=name):
                specops.tree_verify_greedy(logits, d["tree_tokens"], d["parents"],
                                           d["num_nodes"])
        with pytest.raises(ValueError, match="parents"):
            specops.tree_metadata(torch.zeros(3, 0, dtype=torch.int32))


def _set(t: torch.Tensor, index, value) -> torch.Tensor:
    t = t.clone()
    t[index] = value
    return t


PARENTS = _i32([[-1, 0, 0, 1, 2]] * 3)
BAD_VALUES = [
    ("parents", "root not -1", _set(PARENTS, (0, 0), 0)),
    ("parents", "root not -1 in a root-only row", _set(PARENTS, (2, 0), 3)),
    ("parents", "self loop (a cycle)", _set(PARENTS, (1, 2), 2)),
    ("parents", "forward pointer (a cycle)", _set(PARENTS, (0, 3), 4)),
    ("parents", "negative", _set(PARENTS, (0, 4), -1)),
    ("parents", "past T", _set(PARENTS, (1, 1), 99)),
    ("num_nodes", "zero", _i32([5, 0, 1])),
    ("num_nodes", "past T", _i32([6, 3, 1])),
    ("num_nodes", "negative", _i32([5, 3, -1])),
    ("tree_tokens", "V", _set(torch.zeros(3, 5, dtype=torch.int64), (0, 4), 20)),
    ("tree_tokens", "negative", _set(torch.zeros(3, 5, dtype=torch.int64), (1, 2), -1)),
    ("positions", "negative", torch.tensor([0, -3, 0])),
]


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("name, what, bad_value", BAD_VALUES,
                         ids=[f"{n}-{w}" for n, w, _ in BAD_VALUES])
def test_bad_values_raise_at_cheap_level(backend, checks, name, what, bad_value):
    ops = [verify]
    ops += [_greedy] if name != "positions" else []
    ops += [_metadata] if name in ("parents", "num_nodes") else []
    for level in ("cheap", "full"):
        checks(level)
        for op in ops:
            with specops.use_backend(backend), pytest.raises(ValueError, match=name):
                op(_bad(**{name: bad_value}))
    checks("off")  # no error, in bounds
    for op in ops:
        with specops.use_backend(backend):
            op(_bad(**{name: bad_value}))


@pytest.mark.parametrize("backend", BACKENDS)
def test_unused_slots_are_not_checked(backend, checks):
    """Past num_nodes anything goes: parents, tokens, NaN rows (and draft row 0)."""
    d = _bad()
    d["parents"] = _set(_set(d["parents"], (1, 4), 7), (2, 1), -9)
    d["tree_tokens"] = _set(_set(d["tree_tokens"], (1, 3), -1), (2, 2), 10**9)
    d["target_probs"] = _set(d["target_probs"], (1, 4), float("nan"))
    d["draft_probs"] = _set(_set(d["draft_probs"], (0, 0), float("nan")), (1, 3), -1.0)
    clean = _bad()
    expected = [on_backend("reference", op, clean) for op in (verify, _greedy, _metadata)]
    for level in ("cheap", "full"):
        checks(level)
        with specops.use_backend(backend):
            for op, exp in zip((verify, _greedy, _metadata), expected):
                for i, (a, b) in enumerate(zip(op(d), exp)):
                    assert_equal_rows(a, b, f"{level}, {op.__name__} output {i}")


def _nan_row(d):
    d["target_probs"] = _set(d["target_probs"], (1, 2, 5), float("nan"))
    return d


def _inf_row(d):
    d["target_probs"] = _set(d["target_probs"], (0, 4, 0), float("inf"))
    return d


def _negative_row(d):
    d["draft_probs"] = _set(d["draft_probs"], (0, 1, 3), -0.5)
    return d


def _zero_row(d):
    d["target_probs"] = _set(d["target_probs"], (2, 0), 0.0)
    return d


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("spoil, name", [(_nan_row, "target_probs"), (_inf_row, "target_probs"),
                                         (_negative_row, "draft_probs"),
                                         (_zero_row, "target_probs")])
def test_bad_rows_raise_only_with_full_checks(backend, checks, spoil, name):
    checks("full")
    with specops.use_backend(backend), pytest.raises(ValueError, match=name):
        verify(spoil(_bad()))
    for level in ("cheap", "off"):
        checks(level)
        with specops.use_backend(backend):
            out = verify(spoil(_bad()))
        d = _bad()
        check_invariants(d, out)


@pytest.mark.parametrize("backend", BACKENDS)
def test_nan_logits_raise_only_with_full_checks(backend, checks):
    d = _bad()
    logits = _set(d["target_probs"].log(), (0, 3, 2), float("nan"))
    args = (logits, d["tree_tokens"], d["parents"], d["num_nodes"])
    checks("full")
    with specops.use_backend(backend), pytest.raises(ValueError, match="target_logits"):
        specops.tree_verify_greedy(*args)
    with specops.use_backend(backend):  # row 4 of batch row 1 is past num_nodes
        specops.tree_verify_greedy(_set(d["target_probs"].log(), (1, 4, 2), float("nan")),
                                   *args[1:])
    checks("cheap")
    with specops.use_backend(backend):
        out = specops.tree_verify_greedy(*args)
    check_invariants(d, out)


def _garbage(seed: int):
    """Everything wrong at once: parents anywhere (root included), num_nodes out of range,
    token ids out of range, NaN / inf / negative / all-zero probability rows."""
    g = torch.Generator().manual_seed(seed)
    batch, num_slots, vocab = 6, 7, 9
    d = simple_inputs(batch, num_slots, vocab, g, with_draft_probs=seed % 3 != 0)
    d["parents"] = torch.where(torch.rand(batch, num_slots, generator=g) < 0.3,
                               torch.randint(-3, num_slots + 3, (batch, num_slots), generator=g,
                                             dtype=torch.int32), d["parents"])
    d["num_nodes"] = torch.randint(-2, num_slots + 3, (batch,), generator=g, dtype=torch.int32)
    d["tree_tokens"] = torch.where(torch.rand(batch, num_slots, generator=g) < 0.3,
                                   torch.randint(-3, vocab + 3, (batch, num_slots), generator=g),
                                   d["tree_tokens"])
    for name in ("target_probs", "draft_probs"):
        if d[name] is None:
            continue
        rows = d[name]
        spoil = torch.randint(0, 6, (batch, num_slots, 1), generator=g)
        bad = torch.tensor([0.0, float("nan"), float("inf"), -1.0, 0.0, 0.0])[spoil]
        where = torch.rand(batch, num_slots, vocab, generator=g) < 0.4
        rows = torch.where((spoil > 0) & (spoil < 4) & where, bad, rows)
        d[name] = torch.where(spoil == 4, 0.0, rows)  # an all-zero row
    d["seeds"] = torch.randint(-2**63, 2**63 - 1, (batch,), generator=g)
    return d


def _in_bounds(d, out, vocab):
    tokens, path, num_accepted = out
    batch, num_slots = d["parents"].shape
    assert ((tokens >= -1) & (tokens < vocab)).all() and (tokens[:, 0] >= 0).all()
    assert ((path == -1) | ((path >= 1) & (path < num_slots))).all()
    assert ((num_accepted >= 0) & (num_accepted < num_slots)).all()
    slots = torch.arange(num_slots)
    assert torch.equal(path >= 0, slots < num_accepted[:, None])
    assert torch.equal(tokens >= 0, slots <= num_accepted[:, None])


def test_checks_off_outcomes_are_in_bounds_and_match_the_reference(checks):
    """With checks off, bad values give the reference's documented outcome on the kernels."""
    checks("off")
    for seed in range(30):
        d = _garbage(seed)
        logits = d["target_probs"].log()
        greedy = dict(d, target_logits=logits)
        expected = on_backend("reference", verify, d)
        _in_bounds(d, expected, 9)
        assert_tree_equal(on_backend("kernels", verify, d), expected, f"seed {seed}")
        expected = on_backend("reference", verify_greedy, greedy)
        _in_bounds(d, expected, 9)
        assert_tree_equal(on_backend("kernels", verify_greedy, greedy), expected,
                          f"greedy, seed {seed}")
        mask, depth = on_backend("reference", _metadata, d)
        assert ((depth >= -1) & (depth < d["parents"].shape[1])).all()
        kernel_mask, kernel_depth = on_backend("kernels", _metadata, d)
        assert_equal_rows(kernel_depth, depth, f"depth, seed {seed}")
        assert_equal_rows(kernel_mask, mask, f"mask, seed {seed}")


# ------------------------------------------------------------------------------------------
# Batch invariance and determinism

@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("with_q", [True, False])
def test_batch_invariance_and_determinism(backend, with_q):
    g = torch.Generator().manual_seed(3)
    d = simple_inputs(16, 10, 300, g, with_q)
    greedy = dict(d, target_logits=d["target_probs"].log())
    with specops.use_backend(backend):
        out = verify(d), verify_greedy(greedy), _metadata(d)
        again = verify(d), verify_greedy(greedy), _metadata(d)
        # Shuffle the rows and replace half of them with other rows: the kept rows stay.
        other = simple_inputs(16, 10, 300, g, with_q)
        perm = torch.randperm(16, generator=g)
        mixed = {k: (None if v is None else torch.cat([v[perm][:8], other[k][:8]]))
                 for k, v in d.items()}
        moved = (verify(mixed), verify_greedy(dict(mixed, target_logits=mixed["target_probs"]
                                                   .log())), _metadata(mixed))
    for name, a, b, c in zip(("verify", "greedy", "metadata"), out, again, moved):
        for i, (x, y, z) in enumerate(zip(a, b, c)):
            assert_equal_rows(y, x, f"{name} output {i}, repeated")
            assert_equal_rows(z[:8], x[perm][:8], f"{name} output {i}, moved rows")
