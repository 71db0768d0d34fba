"""Tree building (specops.trees): literal cases, pack/unpack round trips, and grow_tree checked
against a brute-force EAGLE-2 enumeration, then fed to tree_metadata / tree_verify_greedy."""

import doctest

import numpy as np
import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import specops
import specops.trees
from specops.reference import tree_children_ref, tree_metadata_ref, tree_paths_ref

from helpers import assert_equal_rows

# The tree kernels may not be built yet; the reference is the specification anyway.
REFERENCE = "reference"


# ---------------------------------------------------------------------------- static shapes

def test_chain_parents():
    assert specops.chain_parents(3).tolist() == [[-1, 0, 1, 2]]
    assert specops.chain_parents(0, batch=2).tolist() == [[-1], [-1]]
    parents = specops.chain_parents(4, batch=3)
    assert parents.dtype == torch.int32 and parents.shape == (3, 5)
    with specops.use_backend(REFERENCE):
        _, depth = specops.tree_metadata(parents)
    assert depth.tolist() == [[0, 1, 2, 3, 4]] * 3


def test_tree_from_choices_literal():
    # node:     0     1     2     3       4       5
    # choice:  root  (0,)  (1,)  (0, 0)  (0, 1)  (1, 0)
    parents, depth, rank = specops.tree_from_choices([(0,), (1,), (0, 0), (0, 1), (1, 0)])
    assert parents.tolist() == [-1, 0, 0, 1, 1, 2]
    assert depth.tolist() == [0, 1, 1, 2, 2, 2]
    assert rank.tolist() == [-1, 0, 1, 0, 1, 0]
    assert parents.dtype == depth.dtype == rank.dtype == torch.int32
    # any input order, lists as in Medusa's files: the same tree
    shuffled = specops.tree_from_choices([[1, 0], [0, 1], [1], [0, 0], [0]])
    assert [t.tolist() for t in shuffled] == [parents.tolist(), depth.tolist(), rank.tolist()]


def test_tree_from_choices_edge_cases():
    assert [t.tolist() for t in specops.tree_from_choices([])] == [[-1], [0], [-1]]
    # ranks may be skipped: rank is the top-k index, not the sibling index
    parents, depth, rank = specops.tree_from_choices([(2,), (0,), (2, 3)])
    assert (parents.tolist(), depth.tolist(), rank.tolist()) == (
        [-1, 0, 0, 2], [0, 1, 1, 2], [-1, 0, 2, 3])


@pytest.mark.parametrize("choices, message", [
    ([(0,), (0, 1, 0)], "prefix"),  # (0, 1) is missing
    ([(1, 0)], "prefix"),
    ([(0,), (0,)], "duplicate"),
    ([(0,), ()], "root"),
    ([(0,), (-1,)], ">= 0"),
    ([(0,), (0, 1.0)], "ints"),
    ([(0,), (True,)], "ints"),
    ([0, 1], "tuple"),
    (["01"], "tuple"),
])
def test_tree_from_choices_rejects_invalid(choices, message):
    with pytest.raises(ValueError, match=message):
        specops.tree_from_choices(choices)


# --------------------------------------------------------------------------- index forms

def test_tree_children_and_paths_literal():
    #        0
    #      /   \
    #     1     2
    #    / \    |
    #   3   4   5
    parents = torch.tensor([[-1, 0, 0, 1, 1, 2]], dtype=torch.int32)
    first_child, next_sibling, sibling_rank = specops.tree_children(parents)
    assert first_child.tolist() == [[1, 3, 5, -1, -1, -1]]
    assert next_sibling.tolist() == [[-1, 2, -1, 4, -1, -1]]
    assert sibling_rank.tolist() == [[0, 0, 1, 0, 1, 0]]
    paths, is_leaf = specops.tree_paths(parents)
    assert paths[0].tolist() == [[0, -1, -1, -1, -1, -1],
                                 [0, 1, -1, -1, -1, -1],
                                 [0, 2, -1, -1, -1, -1],
                                 [0, 1, 3, -1, -1, -1],
                                 [0, 1, 4, -1, -1, -1],
                                 [0, 2, 5, -1, -1, -1]]
    assert is_leaf.tolist() == [[False, False, False, True, True, True]]
    # num_nodes = 4: nodes 4 and 5 are ignored, node 2 becomes a leaf
    num_nodes = torch.tensor([4], dtype=torch.int32)
    first_child, next_sibling, sibling_rank = specops.tree_children(parents, num_nodes)
    assert first_child.tolist() == [[1, 3, -1, -1, -1, -1]]
    assert sibling_rank.tolist() == [[0, 0, 1, 0, -1, -1]]
    _, is_leaf = specops.tree_paths(parents, num_nodes)
    assert is_leaf.tolist() == [[False, False, True, True, False, False]]


def test_tree_children_and_paths_are_the_reference():
    parents = torch.tensor([[-1, 0, 1, 0, 3, 3, 2], [-1, 0, 0, 0, 2, 4, 5]], dtype=torch.int32)
    num_nodes = torch.tensor([7, 5], dtype=torch.int32)
    for got, expected in zip(specops.tree_children(parents, num_nodes),
                             tree_children_ref(parents, num_nodes)):
        assert_equal_rows(got, expected, "tree_children")
    for got, expected in zip(specops.tree_paths(parents, num_nodes),
                             tree_paths_ref(parents, num_nodes)):
        assert_equal_rows(got, expected, "tree_paths")


def test_index_forms_check_their_arguments():
    with pytest.raises(TypeError, match="int32"):
        specops.tree_children(torch.tensor([[-1, 0]]))
    with pytest.raises(ValueError, match="topological"):
        specops.tree_paths(torch.tensor([[-1, 1]], dtype=torch.int32))


@st.composite
def masks(draw):
    num_cols = draw(st.one_of(st.sampled_from([1, 31, 32, 33, 63, 64, 65, 256]),
                              st.integers(1, 100)))
    batch = draw(st.integers(1, 3))
    num_rows = draw(st.sampled_from([1, num_cols]))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**32 - 1)))
    density = draw(st.sampled_from([0.0, 0.1, 0.5, 1.0]))
    return torch.rand(batch, num_rows, num_cols, generator=g) < density


@given(masks())
def test_pack_unpack_round_trip(mask):
    num_cols = mask.shape[-1]
    packed = specops.pack_tree_mask(mask)
    assert packed.dtype == torch.int32
    assert packed.shape == mask.shape[:2] + (-(-num_cols // 32),)
    # the documented bit order: column j is bit j % 32 of word j // 32
    j = torch.arange(num_cols)
    bits = (packed[..., j // 32] >> (j % 32).int()) & 1
    assert torch.equal(bits.bool(), mask)
    assert torch.equal(specops.unpack_tree_mask(packed, num_cols), mask)


@given(st.integers(1, 40), st.integers(0, 2**32 - 1))
def test_pack_unpack_tree_masks(num_slots, seed):
    g = torch.Generator().manual_seed(seed)
    nodes = torch.arange(num_slots)
    parents = (torch.rand(2, num_slots, generator=g) * nodes).long().int()  # parent < node
    parents[:, 0] = -1
    mask, _ = tree_metadata_ref(parents, torch.full((2,), num_slots, dtype=torch.int32))
    assert torch.equal(specops.unpack_tree_mask(specops.pack_tree_mask(mask), num_slots), mask)


def test_pack_tree_mask_literal_words():
    mask = torch.zeros(1, 1, 33, dtype=torch.bool)
    mask[0, 0, [0, 31, 32]] = True
    assert specops.pack_tree_mask(mask).tolist() == [[[1 - 2**31, 1]]]  # bit 31 is the sign
    assert specops.pack_tree_mask(torch.ones(1, 1, 32, dtype=torch.bool)).tolist() == [[[-1]]]
    with pytest.raises(ValueError, match="ceil"):
        specops.unpack_tree_mask(torch.zeros(1, 1, 1, dtype=torch.int32), 33)


# -------------------------------------------------------------------- top-k static trees

def random_table(vocab: int, seed: int, quantized: bool = False) -> torch.Tensor:
    """[V, V] float32 draft log-probs indexed by the last token. Quantized: each row is a
    permutation of 0, -0.25, ..., -(V-1)/4, so sums are exact, scores tie across rows and
    along paths (log-prob 0), but never within a row (top-k is well defined)."""
    g = torch.Generator().manual_seed(seed)
    if quantized:
        return torch.stack([-0.25 * torch.randperm(vocab, generator=g).float()
                            for _ in range(vocab)])
    return (torch.randn(vocab, vocab, generator=g) * 2).log_softmax(-1)


def test_tokens_from_topk_level_by_level():
    choices = [(0,), (1,), (0, 0), (0, 1), (1, 0), (0, 0, 0), (2,)]
    parents, depth, rank = specops.tree_from_choices(choices)
    num_slots = parents.shape[0]
    table = random_table(16, seed=3)
    root = torch.tensor([5, 9])
    # level bounds, once at setup (nodes are sorted by depth)
    bounds = torch.cumsum(torch.bincount(depth), 0).tolist()
    levels = list(zip([0] + bounds[:-1], bounds))
    topk = torch.zeros(2, num_slots, 3, dtype=torch.long)
    for lo, hi in levels[:-1]:  # the deepest level is not expanded
        level_tokens = specops.tokens_from_topk(root, topk, parents, rank)[:, lo:hi]
        topk[:, lo:hi] = table[level_tokens].topk(3, dim=-1).indices
    tree_tokens = specops.tokens_from_topk(root, topk, parents, rank)

    ranked = table.argsort(-1, descending=True)
    for b in range(2):
        expected = [int(root[b])]
        for i in range(1, num_slots):
            expected.append(int(ranked[expected[int(parents[i])], int(rank[i])]))
        assert tree_tokens[b].tolist() == expected
    # [B, T] parents and rank broadcast the same way
    batched = specops.tokens_from_topk(root, topk, parents.expand(2, -1), rank.expand(2, -1))
    assert torch.equal(batched, tree_tokens)

    with pytest.raises(ValueError, match="rank must be in 0..k-1=2"):
        specops.tokens_from_topk(root, topk, parents, rank + 1)
    with pytest.raises(ValueError, match="topological"):
        specops.tokens_from_topk(root, topk, torch.where(parents == 1, 5, parents), rank)

    # When the target agrees with the drafter, greedy verification accepts the rank-0 chain
    # (0,) -> (0, 0) -> (0, 0, 0), nodes 1, 4, 7, then emits the target's next token.
    logits = table[tree_tokens]  # [B, T, V]: the target's logits after each node
    batch_parents = parents.expand(2, -1).contiguous()
    with specops.use_backend(REFERENCE):
        tokens, path, num_accepted = specops.tree_verify_greedy(logits, tree_tokens,
                                                                batch_parents)
        # deterministic children: draft_probs=None; one-hot target rows give the same walk
        probs = specops.sampling_probs(logits, temperature=0.0)
        sampled = specops.tree_verify(probs, tree_tokens, batch_parents, None,
                                      seeds=torch.tensor([1, 2]), positions=torch.tensor([0, 9]))
    for got, want in zip(sampled, (tokens, path, num_accepted)):
        assert_equal_rows(got, want, "tree_verify on one-hot rows")
    assert path.tolist() == [[1, 4, 7, -1, -1, -1, -1, -1]] * 2
    assert num_accepted.tolist() == [3, 3]
    assert tokens[:, :3].tolist() == tree_tokens[:, [1, 4, 7]].tolist()
    assert tokens[:, 3].tolist() == ranked[tree_tokens[:, 7], 0].tolist()


# ------------------------------------------------------------------------------ grow_tree

def brute_force_eagle2(logp_of_path, root: int, depth: int, top_k: int, num_nodes: int):
    """EAGLE-2 by enumeration, one row, in float32 like grow_tree: expand each frontier path
    into its top_k tokens, keep the top_k best new candidates as the frontier, pool every
    candidate, keep the root and the num_nodes - 1 best; ties go to the earlier candidate
    (Python's sort is stable), nodes are returned in creation order."""
    pool = [(np.float32(0.0), (root,), -1)]  # (score, token path, parent pool index)
    frontier = [0]
    for _ in range(depth):
        new = []
        for f in frontier:
            score, path, _ = pool[f]
            row = logp_of_path(path)
            for token in sorted(range(len(row)), key=lambda t: -row[t])[:top_k]:
                new.append(len(pool))
                pool.append((np.float32(score + np.float32(row[token])), path + (token,), f))
        frontier = sorted(new, key=lambda i: -pool[i][0])[:top_k]
    kept = [0] + sorted(sorted(range(1, len(pool)), key=lambda i: -pool[i][0])[:num_nodes - 1])
    new_index = {node: i for i, node in enumerate(kept)}
    tokens = [pool[i][1][-1] for i in kept]
    parents = [-1] + [new_index[pool[i][2]] for i in kept[1:]]  # KeyError: not closed
    scores = [float(pool[i][0]) for i in kept]
    return tokens, parents, scores, [pool[i][1] for i in kept]


def table_draft_step(table: torch.Tensor):
    def draft_step(tokens, parent_index, depth):
        return table[tokens]
    return draft_step


def check_tree(tree_tokens, parents, num_nodes, vocab, top_k_tokens=None):
    """Valid topological parents, and the tree accepted by tree_metadata and
    tree_verify_greedy (reference backend)."""
    batch, num_slots = parents.shape
    nodes = torch.arange(num_slots)
    assert (parents[:, 0] == -1).all()
    assert ((parents[:, 1:] >= 0) & (parents[:, 1:] < nodes[1:])).all(), parents
    assert tree_tokens.dtype == torch.int64 and parents.dtype == torch.int32
    assert num_nodes.dtype == torch.int32 and (num_nodes == num_slots).all()
    with specops.use_backend(REFERENCE):
        mask, depth = specops.tree_metadata(parents, num_nodes)
        logits = torch.randn(batch, num_slots, vocab, generator=torch.Generator().manual_seed(0))
        tokens, path, accepted = specops.tree_verify_greedy(logits, tree_tokens, parents,
                                                            num_nodes)
    assert (depth >= 0).all() and mask.diagonal(dim1=1, dim2=2).all()
    assert ((accepted >= 0) & (accepted < num_slots)).all()


GROW_CASES = [  # batch, vocab, depth, top_k, num_nodes
    (1, 8, 1, 1, 2),
    (2, 8, 3, 1, 4),  # top_k = 1: a chain
    (3, 16, 4, 3, 12),
    (2, 16, 5, 4, 1),  # the root alone
    (2, 12, 3, 3, 1 + 3 + 2 * 9),  # the whole pool
    (4, 32, 6, 4, 25),
    (2, 5, 2, 5, 20),  # top_k = vocab
]


@pytest.mark.parametrize("quantized", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("batch, vocab, depth, top_k, num_nodes", GROW_CASES)
def test_grow_tree_matches_brute_force(batch, vocab, depth, top_k, num_nodes, quantized):
    table = random_table(vocab, seed=vocab + depth, quantized=quantized)
    root = torch.randint(0, vocab, (batch,), generator=torch.Generator().manual_seed(depth))
    tree_tokens, parents, num_nodes_per_row, scores = specops.grow_tree(
        table_draft_step(table), root, depth, top_k, num_nodes)
    assert tree_tokens.shape == parents.shape == scores.shape == (batch, num_nodes)
    assert scores.dtype == torch.float32
    check_tree(tree_tokens, parents, num_nodes_per_row, vocab)
    rows = table.tolist()
    ranked = table.argsort(-1, descending=True)
    for b in range(batch):
        tokens, expected_parents, expected_scores, paths = brute_force_eagle2(
            lambda path: rows[path[-1]], int(root[b]), depth, top_k, num_nodes)
        assert tree_tokens[b].tolist() == tokens
        assert parents[b].tolist() == expected_parents
        assert scores[b].tolist() == expected_scores
        # every kept node's parent is kept (brute_force_eagle2 raises otherwise), and its
        # token is one of the parent's top_k
        assert set(paths) >= {p[:-1] for p in paths[1:]}
        for i in range(1, num_nodes):
            parent_token = tree_tokens[b, parents[b, i]]
            assert tree_tokens[b, i] in ranked[parent_token, :top_k]


def test_grow_tree_parent_index_lets_a_caller_keep_context():
    """The draft_step contract: parent_index points into the tokens passed so far, so a caller
    can keep per-token state (a KV cache). Here the state is the token path, and the draft
    log-probs depend on the last two tokens, which a last-token lookup could not give."""
    vocab, depth, top_k, num_nodes = 11, 4, 3, 15
    g = torch.Generator().manual_seed(7)
    table = (torch.randn(vocab, vocab, vocab, generator=g) * 2).log_softmax(-1)
    root = torch.tensor([3, 8])
    fed_paths: list[list[tuple]] = [[], []]  # per row, the paths of all tokens passed so far
    seen_depths = []

    def draft_step(tokens, parent_index, d):
        seen_depths.append(d)
        assert tokens.shape == parent_index.shape == (2, 1 if d == 0 else top_k)
        assert parent_index.dtype == torch.int64
        first = 0 if d == 0 else 1 + (d - 1) * top_k  # this call's first index
        logp = torch.empty(2, tokens.shape[1], vocab)
        for b in range(2):
            for f in range(tokens.shape[1]):
                p = int(parent_index[b, f])
                if d == 0:
                    assert p == -1
                    path = (int(tokens[b, f]),)
                else:  # the parent is one of the previous call's tokens
                    assert first - top_k <= p < first or (d == 1 and p == 0)
                    path = fed_paths[b][p] + (int(tokens[b, f]),)
                fed_paths[b].append(path)
                logp[b, f] = table[path[-2] if len(path) > 1 else 0, path[-1]]
        return logp

    tree_tokens, parents, num_nodes_per_row, scores = specops.grow_tree(
        draft_step, root, depth, top_k, num_nodes)
    assert seen_depths == list(range(depth))
    check_tree(tree_tokens, parents, num_nodes_per_row, vocab)
    rows = table.tolist()
    for b in range(2):
        tokens, expected_parents, expected_scores, paths = brute_force_eagle2(
            lambda path: rows[path[-2] if len(path) > 1 else 0][path[-1]], int(root[b]),
            depth, top_k, num_nodes)
        assert tree_tokens[b].tolist() == tokens
        assert parents[b].tolist() == expected_parents
        assert scores[b].tolist() == expected_scores


def test_grow_tree_degenerate_log_probs_still_give_a_closed_tree():
    """NaN counts as -inf and positive values as 0, so scores never increase along a path;
    -inf candidates are kept when there are not enough finite ones."""
    vocab = 6
    table = torch.full((vocab, vocab), float("-inf"))
    table[:, 0] = 0.0
    table[:, 1] = float("nan")
    table[2, 3] = 5.0  # a positive "log-prob" (e.g. raw logits passed by mistake)
    table[3, 2] = -1.0
    root = torch.tensor([2, 3, 4])
    tree_tokens, parents, num_nodes, scores = specops.grow_tree(
        table_draft_step(table), root, depth=4, top_k=3, num_nodes=20)
    check_tree(tree_tokens, parents, num_nodes, vocab)
    parent_scores = scores.gather(1, parents.long().clamp(min=0))
    assert (scores[:, 1:] <= parent_scores[:, 1:]).all()
    assert not scores.isnan().any() and (scores <= 0).all()


def test_grow_tree_rejects_bad_arguments():
    step = table_draft_step(random_table(8, seed=0))
    root = torch.tensor([1])
    with pytest.raises(ValueError, match=r"num_nodes must be in 1\.\.13"):
        specops.grow_tree(step, root, depth=2, top_k=3, num_nodes=14)
    with pytest.raises(ValueError, match="top_k"):
        specops.grow_tree(step, root, depth=2, top_k=0, num_nodes=1)
    with pytest.raises(ValueError, match=r"draft_step at depth 0 must return"):
        specops.grow_tree(lambda t, p, d: torch.zeros(1, 1, 2), root, 2, 3, 5)
    with pytest.raises(TypeError, match="int64"):
        specops.grow_tree(step, root.int(), depth=2, top_k=3, num_nodes=5)
    # depth 0: no draft call, only the root
    tokens, parents, _, scores = specops.grow_tree(step, root, depth=0, top_k=3, num_nodes=1)
    assert (tokens.tolist(), parents.tolist(), scores.tolist()) == ([[1]], [[-1]], [[0.0]])


def test_grow_tree_compiles_fullgraph():
    """One graph, no breaks, same results as eager. aot_eager traces exactly what Inductor
    would receive (Dynamo capture, then AOT functionalisation of the sorts, gathers and
    scatter) without Inductor's cold start, which takes 10-70 s on a 2-core machine and
    would blow this file's time budget; test_api's compile test covers Inductor itself."""
    table = random_table(64, seed=5)
    step = table_draft_step(table)
    g = torch.Generator().manual_seed(1)
    torch._dynamo.reset()
    compiled = torch.compile(specops.grow_tree, fullgraph=True, backend="aot_eager")
    for _ in range(2):  # new root tokens, same shapes
        root = torch.randint(0, 64, (3,), generator=g)
        expected = specops.grow_tree(step, root, 4, 3, 12)
        result = compiled(step, root, 4, 3, 12)
        for got, want in zip(result, expected):
            assert_equal_rows(got, want, "compiled grow_tree")


def test_docstring_examples():
    results = doctest.testmod(specops.trees, extraglobs={"specops": specops, "torch": torch},
                              optionflags=doctest.NORMALIZE_WHITESPACE)
    assert results.attempted >= 20
    assert results.failed == 0


@pytest.mark.parametrize("quantized", [False, True], ids=["random", "ties"])
@pytest.mark.parametrize("batch, vocab, depth, top_k, num_nodes", GROW_CASES)
def test_keep_best_nodes_of_a_grown_tree_is_the_smaller_grown_tree(batch, vocab, depth, top_k,
                                                                   num_nodes, quantized):
    """Keeping the n best nodes of a grown tree gives exactly the tree grow_tree keeps for
    num_nodes=n (same tokens, parents, scores): the same ranking and tie rule."""
    table = random_table(vocab, seed=vocab + depth, quantized=quantized)
    root = torch.randint(0, vocab, (batch,), generator=torch.Generator().manual_seed(depth))
    step = table_draft_step(table)
    tokens, parents, _, scores = specops.grow_tree(step, root, depth, top_k, num_nodes)
    for n in range(1, num_nodes + 1):
        kept = specops.keep_best_nodes(tokens, parents, scores, n)
        smaller = specops.grow_tree(step, root, depth, top_k, n)
        for got, want, what in zip(kept, (smaller[0], smaller[1], smaller[3]),
                                   ("tokens", "parents", "scores")):
            assert got.dtype == want.dtype and torch.equal(got, want), (n, what)


def test_keep_best_nodes_literal_and_checks():
    tokens = torch.tensor([[10, 11, 12, 13, 14], [20, 21, 22, 23, 24]])
    parents = torch.tensor([[-1, 0, 0, 1, 2], [-1, 0, 1, 2, 0]], dtype=torch.int32)
    scores = torch.tensor([[0.0, -1.0, -0.2, -1.5, -0.3], [0.0, -0.1, -0.1, -0.9, -0.5]])
    kept_tokens, kept_parents, kept_scores = specops.keep_best_nodes(tokens, parents, scores, 3)
    # row 0 keeps nodes 0, 2, 4 (a chain through node 2); row 1 keeps 0, 1, 2 (the tie
    # between nodes 1 and 2 at -0.1 goes to the smaller index, the parent)
    assert kept_tokens.tolist() == [[10, 12, 14], [20, 21, 22]]
    assert kept_parents.tolist() == [[-1, 0, 1], [-1, 0, 1]]
    torch.testing.assert_close(kept_scores, torch.tensor([[0.0, -0.2, -0.3], [0.0, -0.1, -0.1]]))
    assert specops.keep_best_nodes(tokens, parents, scores, 1)[0].tolist() == [[10], [20]]
    with pytest.raises(ValueError, match="num_nodes must be in 1..5"):
        specops.keep_best_nodes(tokens, parents, scores, 6)
    with pytest.raises(ValueError, match="must match"):
        specops.keep_best_nodes(tokens, parents[:, :4], scores, 2)
