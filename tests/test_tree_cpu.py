"""The C++ CPU kernels of the token-tree ops (csrc/tree_cpu.cpp) against the reference
(specops/reference/tree.py): exact equality on hypothesis-drawn trees (chains, stars, k-ary,
random and deep trees, ragged num_nodes, duplicate sibling tokens, garbage past num_nodes),
vocabularies at the kernel's chunk edges, literal cases for the residual carried across
siblings (zero-mass residuals included), then the input checks at each check level.
"""


import pytest
import torch
from hypothesis import event, given, settings
from hypothesis import strategies as st

import specops
import specops._C  # noqa: F401  (registers the kernels)
from specops.reference.tree import (tree_children_ref, tree_metadata_ref,
                                    tree_verify_greedy_ref, tree_verify_ref)

from helpers import check_level

OPS = torch.ops.specops
CHUNK = 8192  # kVocabChunk in csrc/vocab_chunks.h
EDGE_VOCABS = [1, 2, 100, CHUNK - 1, CHUNK, CHUNK + 1, 32000]
LOGIT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]
SHAPES = ("chain", "star", "kary", "random", "deep")
INT64 = st.integers(-2**63, 2**63 - 1)


def assert_same(actual, expected, names, **context) -> None:
    """Exact equality of output tuples; on failure prints the first mismatching rows."""
    for name, a, e in zip(names, actual, expected):
        assert (a.shape, a.dtype) == (e.shape, e.dtype), f"{name}: {a.shape} {a.dtype} != " \
            f"{e.shape} {e.dtype}"
        if torch.equal(a, e):
            continue
        bad = (a != e).reshape(a.shape[0], -1).any(-1).nonzero().flatten()
        lines = [f"{name}: {len(bad)} of {a.shape[0]} rows differ"]
        for r in bad[:4].tolist():
            extra = ", ".join(f"{k}={v[r].tolist()}" for k, v in context.items() if v is not None)
            lines.append(f"  row {r}: got {a[r].tolist()}, expected {e[r].tolist()} ({extra})")
        raise AssertionError("\n".join(lines))


VERIFY_OUTPUTS = ("num_accepted", "path", "tokens")


def reorder(outputs):
    """(tokens, path, num_accepted) -> (num_accepted, path, tokens): compare counts first."""
    return outputs[2], outputs[1], outputs[0]


# ---------------------------------------------------------------------------------------------
# Inputs


def make_parents(shapes, num_slots, g, arity=2):
    """[B, T] int32 parents in topological order, one shape per row."""
    rows = []
    for shape in shapes:
        parents = [-1]
        for i in range(1, num_slots):
            uniform = int(torch.randint(0, i, (1,), generator=g))
            parents.append({"chain": i - 1, "star": 0, "kary": (i - 1) // arity,
                            "random": uniform,
                            "deep": i - 1 if torch.rand(1, generator=g) < 0.7 else uniform}[shape])
        rows.append(parents)
    return torch.tensor(rows, dtype=torch.int32)


@st.composite
def tree_rows(draw, batch, num_slots):
    """(parents, num_nodes, g): shapes per row, ragged num_nodes (1 and T drawn often) and, in
    half the examples, garbage parents past num_nodes (never read)."""
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    shapes = draw(st.lists(st.sampled_from(SHAPES), min_size=batch, max_size=batch))
    parents = make_parents(shapes, num_slots, g, arity=draw(st.integers(2, 4)))
    choice = st.one_of(st.just(1), st.just(num_slots), st.integers(1, num_slots))
    num_nodes = torch.tensor(draw(st.lists(choice, min_size=batch, max_size=batch)),
                             dtype=torch.int32)
    if draw(st.booleans()):
        past = torch.arange(num_slots) >= num_nodes[:, None]
        garbage = torch.randint(-3, num_slots + 3, parents.shape, generator=g, dtype=torch.int32)
        parents = torch.where(past, garbage, parents)
    for shape in shapes:
        event(f"shape {shape}")
    return parents, num_nodes, g


@st.composite
def metadata_inputs(draw):
    batch = draw(st.integers(1, 6))
    num_slots = draw(st.one_of(st.integers(1, 12), st.just(256), st.integers(1, 256)))
    parents, num_nodes, _ = draw(tree_rows(batch, num_slots))
    return parents, num_nodes


def node_tokens(parents, best_of_parent, g, vocab, duplicates):
    """Tokens per node: the parent's most likely token (usually accepted), a random token, or
    (with probability `duplicates`) a copy of the previous sibling's token."""
    batch, num_slots = parents.shape
    pick = torch.rand(batch, num_slots, generator=g)
    random_tokens = torch.randint(0, vocab, (batch, num_slots), generator=g)
    tokens = torch.where(pick < 0.55, best_of_parent, random_tokens)
    duplicate = torch.rand(batch, num_slots, generator=g) < duplicates
    for b in range(batch):
        last_child = {}
        for i in range(1, num_slots):
            p = int(parents[b, i])
            if p in last_child and duplicate[b, i]:
                tokens[b, i] = tokens[b, last_child[p]]
            last_child[p] = i
    return tokens


def make_verify_inputs(parents, num_nodes, g, vocab, sharpness=4.0, with_draft_probs=True,
                       noise=0.3, duplicates=0.3):
    """tree_verify inputs on a given tree: target rows of the given sharpness (scaled, some
    one-hot), tokens from node_tokens with p(x) = 0 at some, draft rows near the parent's
    target row with q(x) = 0 at some; -1 at half the tokens past num_nodes."""
    batch, num_slots = parents.shape

    def rand(*shape):
        return torch.rand(*shape, generator=g)

    # Rows need not sum to 1 (contract): scale each by a factor in [0.5, 2); some are one-hot.
    logits = torch.randn(batch, num_slots, vocab, generator=g) * sharpness
    target = logits.softmax(-1) * (0.5 + 1.5 * rand(batch, num_slots, 1))
    hot = torch.randint(0, vocab, (batch, num_slots), generator=g)
    one_hot = torch.nn.functional.one_hot(hot, vocab).float()
    target = torch.where((rand(batch, num_slots) < 0.2)[..., None], one_hot, target)

    parent_index = parents.clamp(0, num_slots - 1).long()[..., None].expand(-1, -1, vocab)
    parent_rows = target.gather(1, parent_index)
    tokens = node_tokens(parents, parent_rows.argmax(-1), g, vocab, duplicates)
    # p(x) = 0 at some tokens: always rejected.
    zero_p = rand(batch, num_slots) < 0.1
    p_at_x = parent_rows.gather(-1, tokens[..., None])
    parent_rows.scatter_(-1, tokens[..., None], torch.where(zero_p[..., None], 0.0, p_at_x))
    target = target.scatter(1, parent_index, parent_rows)

    draft = None
    if with_draft_probs:
        # q near the parent's p (drafts often accepted), with q(x) = 0 at some tokens.
        shaken = logits.gather(1, parent_index) + torch.randn(logits.shape, generator=g) * noise
        draft = shaken.softmax(-1)
        q_at_x = draft.gather(-1, tokens[..., None])
        draft.scatter_(-1, tokens[..., None],
                       torch.where((rand(batch, num_slots) < 0.1)[..., None], 0.0, q_at_x))

    # Tokens past num_nodes may hold anything; node 0 holds the root token (unused).
    past = torch.arange(num_slots) >= num_nodes[:, None]
    tokens = torch.where(past & (rand(batch, num_slots) < 0.5), -1, tokens)
    seeds = torch.randint(-2**63, 2**63 - 1, (batch,), generator=g)
    positions = torch.randint(0, 2**62, (batch,), generator=g)
    return dict(target_probs=target, tree_tokens=tokens, parents=parents, num_nodes=num_nodes,
                draft_probs=draft, seeds=seeds, positions=positions)


@st.composite
def verify_inputs(draw):
    vocab = draw(st.sampled_from(EDGE_VOCABS))
    big = vocab > 1000  # small trees on long rows: the reference's time grows with B*T*V
    batch = draw(st.integers(1, 2 if big else 6))
    num_slots = draw(st.integers(1, 10 if big else 40))
    parents, num_nodes, g = draw(tree_rows(batch, num_slots))
    inputs = make_verify_inputs(parents, num_nodes, g, vocab,
                                sharpness=draw(st.sampled_from([0.0, 1.0, 4.0, 12.0])),
                                with_draft_probs=draw(st.booleans()),
                                noise=draw(st.sampled_from([0.3, 2.0])),
                                duplicates=draw(st.sampled_from([0.0, 0.3, 0.7])))
    # Seeds and positions from hypothesis, so that it can shrink them.
    inputs["seeds"] = torch.tensor(draw(st.lists(INT64, min_size=batch, max_size=batch)))
    inputs["positions"] = torch.tensor(draw(st.lists(st.integers(0, 2**62), min_size=batch,
                                                     max_size=batch)))
    return inputs


VERIFY_ARGS = ("target_probs", "tree_tokens", "parents", "num_nodes", "draft_probs", "seeds",
               "positions")


def run_verify(inputs):
    args = [inputs[k] for k in VERIFY_ARGS]
    return OPS.tree_verify(*args), tree_verify_ref(*args)


def assert_verify_equal(actual, expected, inputs):
    assert_same(reorder(actual), reorder(expected), VERIFY_OUTPUTS,
                num_nodes=inputs["num_nodes"], parents=inputs["parents"],
                tree_tokens=inputs["tree_tokens"])


@st.composite
def greedy_inputs(draw):
    vocab = draw(st.sampled_from(EDGE_VOCABS))
    big = vocab > 1000  # small trees on long rows: the reference's time grows with B*T*V
    batch = draw(st.integers(1, 2 if big else 6))
    num_slots = draw(st.integers(1, 10 if big else 40))
    parents, num_nodes, g = draw(tree_rows(batch, num_slots))
    dtype = draw(st.sampled_from(LOGIT_DTYPES))
    if draw(st.booleans()):  # small integers: ties everywhere, the first maximal index wins
        logits = torch.randint(-2, 3, (batch, num_slots, vocab), generator=g).to(dtype)
    else:
        logits = (torch.randn(batch, num_slots, vocab, generator=g) * 3).to(dtype)
    rows = logits.float().gather(
        1, parents.clamp(0, num_slots - 1).long()[..., None].expand(-1, -1, vocab))
    first_max = rows.argmax(-1)
    last_max = vocab - 1 - rows.flip(-1).argmax(-1)  # differs from first_max on a tie
    tokens = node_tokens(parents, first_max, g, vocab, draw(st.sampled_from([0.0, 0.3, 0.7])))
    tokens = torch.where(torch.rand(batch, num_slots, generator=g) < 0.15, last_max, tokens)
    return dict(target_logits=logits, tree_tokens=tokens, parents=parents, num_nodes=num_nodes)


GREEDY_ARGS = ("target_logits", "tree_tokens", "parents", "num_nodes")


def run_greedy(inputs):
    args = [inputs[k] for k in GREEDY_ARGS]
    return OPS.tree_verify_greedy(*args), tree_verify_greedy_ref(*args)


# ---------------------------------------------------------------------------------------------
# Equality with the reference


@settings(max_examples=80)
@given(metadata_inputs())
def test_tree_metadata_matches_reference(inputs):
    parents, num_nodes = inputs
    event(f"T={parents.shape[1]}" if parents.shape[1] in (1, 256) else "other T")
    assert_same(OPS.tree_metadata(parents, num_nodes), tree_metadata_ref(parents, num_nodes),
                ("mask", "depth"), num_nodes=num_nodes, parents=parents)


@settings(max_examples=150)
@given(verify_inputs())
def test_tree_verify_matches_reference(inputs):
    actual, expected = run_verify(inputs)
    event(f"V={inputs['target_probs'].shape[-1]}")
    event("draft_probs" if inputs["draft_probs"] is not None else "no draft_probs")
    path = expected[1]
    _, _, rank = tree_children_ref(inputs["parents"], inputs["num_nodes"])
    accepted_rank = rank.gather(1, path.clamp(min=0).long()).masked_fill(path < 0, 0)
    event("a sibling accepted after 2+ rejections" if bool((accepted_rank >= 2).any())
          else "no sibling accepted after 2+ rejections")
    event("an acceptance at depth 2+" if bool((expected[2] >= 2).any()) else "depth < 2")
    assert_verify_equal(actual, expected, inputs)


@settings(max_examples=120)
@given(greedy_inputs())
def test_tree_verify_greedy_matches_reference(inputs):
    actual, expected = run_greedy(inputs)
    event(f"V={inputs['target_logits'].shape[-1]}, {inputs['target_logits'].dtype}")
    event("an acceptance" if bool((expected[2] > 0).any()) else "no acceptance")
    assert_same(reorder(actual), reorder(expected), VERIFY_OUTPUTS,
                num_nodes=inputs["num_nodes"], parents=inputs["parents"],
                tree_tokens=inputs["tree_tokens"])


def test_generated_walks_reach_every_outcome():
    """The generator must produce walks that accept at depth >= 2, accept a sibling after two
    or more rejected ones (a residual from the buffer), end at a leaf and end after rejecting
    every child, or the equality test would compare only a few code paths."""
    outcomes = set()
    for seed in range(12):
        g = torch.Generator().manual_seed(seed)
        shapes = [SHAPES[(seed + b) % len(SHAPES)] for b in range(6)]
        parents = make_parents(shapes, 30, g, arity=3)
        num_nodes = torch.full((6,), 30, dtype=torch.int32)
        inputs = make_verify_inputs(parents, num_nodes, g, 300, sharpness=[1.0, 4.0][seed % 2],
                                    with_draft_probs=seed % 3 > 0)
        actual, expected = run_verify(inputs)
        assert_verify_equal(actual, expected, inputs)
        first_child, _, rank = tree_children_ref(parents, num_nodes)
        path, n = expected[1], expected[2]
        for b in range(len(n)):
            k = int(n[b])
            outcomes.add("depth 2+" if k >= 2 else "depth < 2")
            if any(int(rank[b, int(path[b, j])]) >= 2 for j in range(k)):
                outcomes.add("accepted after 2+ rejections")
            last = int(path[b, k - 1]) if k else 0
            outcomes.add("ended at a leaf" if int(first_child[b, last]) < 0 else "all rejected")
    assert outcomes == {"depth 2+", "depth < 2", "accepted after 2+ rejections",
                        "ended at a leaf", "all rejected"}


# ---------------------------------------------------------------------------------------------
# Literal cases


def test_docstring_examples():
    probs = torch.tensor([[[0.0, 0.0, 1.0], [1.0, 0.0, 0.0], [0.0, 1.0, 0.0]]])
    parents = torch.tensor([[-1, 0, 0]], dtype=torch.int32)
    nodes = torch.tensor([3], dtype=torch.int32)
    tokens, path, n = OPS.tree_verify(probs, torch.tensor([[0, 1, 2]]), parents, nodes, None,
                                      torch.tensor([0]), torch.tensor([3]))
    assert tokens.tolist() == [[2, 1, -1]] and path.tolist() == [[2, -1, -1]] and n.tolist() == [1]
    logits = torch.tensor([[[0.0, 0.0, 9.0], [9.0, 0.0, 0.0], [0.0, 9.0, 0.0]]])
    out = OPS.tree_verify_greedy(logits, torch.tensor([[0, 1, 2]]), parents, nodes)
    assert out[0].tolist() == [[2, 1, -1]] and out[1].tolist() == [[2, -1, -1]]
    mask, depth = OPS.tree_metadata(torch.tensor([[-1, 0, 0, 1]], dtype=torch.int32),
                                    torch.tensor([4], dtype=torch.int32))
    assert depth.tolist() == [[0, 1, 1, 2]] and mask[0, 3].tolist() == [True, True, False, True]


def test_greedy_literal_tree():
    # Root argmax 5: child 1 (token 4) no, child 2 (token 5) yes, child 3 (also 5) is a later
    # duplicate; node 2's argmax 7 matches its second child 5; node 5's argmax is 1.
    parents = torch.tensor([[-1, 0, 0, 0, 2, 2, 5]], dtype=torch.int32)
    tokens = torch.tensor([[9, 4, 5, 5, 6, 7, 2]])
    logits = torch.zeros(1, 7, 10)
    for node, best in enumerate([5, 0, 7, 0, 0, 1, 0]):
        logits[0, node, best] = 1.0
    out = OPS.tree_verify_greedy(logits, tokens, parents, torch.tensor([7], dtype=torch.int32))
    assert out[0].tolist() == [[5, 7, 1, -1, -1, -1, -1]]
    assert out[1].tolist() == [[2, 5, -1, -1, -1, -1, -1]] and out[2].tolist() == [2]
    # num_nodes = 5 detaches node 5: the walk stops at node 2 and emits its argmax 7.
    out = OPS.tree_verify_greedy(logits, tokens, parents, torch.tensor([5], dtype=torch.int32))
    assert out[0].tolist() == [[5, 7, -1, -1, -1, -1, -1]] and out[2].tolist() == [1]


def test_duplicate_deterministic_sibling_is_never_accepted():
    # Deterministic children: after token 3 is rejected, the residual max(0, p - onehot(3))
    # has no mass at 3, so a later sibling with token 3 is always rejected, for every seed.
    g = torch.Generator().manual_seed(0)
    batch, vocab = 64, 6
    target = torch.rand(batch, 4, vocab, generator=g)
    parents = torch.tensor([[-1, 0, 0, 0]] * batch, dtype=torch.int32)
    tokens = torch.tensor([[0, 3, 3, 3]] * batch)
    nodes = torch.full((batch,), 4, dtype=torch.int32)
    args = (target, tokens, parents, nodes, None, torch.arange(batch), torch.zeros(batch).long())
    out_tokens, path, n = OPS.tree_verify(*args)
    assert_verify_equal((out_tokens, path, n), tree_verify_ref(*args),
                        dict(num_nodes=nodes, parents=parents, tree_tokens=tokens))
    assert set(path[:, 0].tolist()) <= {1, -1} and ((path[:, 0] == 1) == (n == 1)).all()
    assert 0 < int(n.sum()) < batch  # both outcomes occur, so the check above means something
    rejected = n == 0
    assert (out_tokens[rejected, 0] != 3).all()  # the residual has no mass at 3


def test_chain_tree_equals_chain_verify():
    # A chain is the tree [-1, 0, 1, ..., K-1] (contract): the same tokens as chain_verify.
    g = torch.Generator().manual_seed(1)
    batch, num_slots, vocab = 16, 7, CHUNK + 1
    target = (torch.randn(batch, num_slots, vocab, generator=g) * 6).softmax(-1)
    draft = (torch.randn(batch, num_slots, vocab, generator=g) * 6).softmax(-1)
    tokens = torch.where(torch.rand(batch, num_slots, generator=g) < 0.8,
                         target.roll(1, dims=1).argmax(-1), 5)
    parents = torch.arange(-1, num_slots - 1, dtype=torch.int32).expand(batch, -1).contiguous()
    nodes = torch.randint(1, num_slots + 1, (batch,), generator=g, dtype=torch.int32)
    seeds, positions = torch.arange(batch) * 7, torch.arange(batch) * 100
    for q in (None, draft):
        tree = OPS.tree_verify(target, tokens, parents, nodes, q, seeds, positions)
        chain = OPS.chain_verify(target, tokens[:, 1:], None if q is None else q[:, 1:],
                                 nodes - 1, seeds, positions)
        assert_same((tree[2], tree[0]), (chain[1], chain[0]), ("num_accepted", "tokens"))
        expected_path = torch.where(torch.arange(num_slots) < tree[2][:, None],
                                    torch.arange(1, num_slots + 1), -1).int()
        assert torch.equal(tree[1], expected_path)
        assert bool((tree[2] > 0).any()) and bool((tree[2] < nodes - 1).any())


def test_one_hot_rows_equal_greedy():
    # Temperature-0 targets: tree_verify with one-hot rows is tree_verify_greedy.
    g = torch.Generator().manual_seed(2)
    batch, num_slots, vocab = 24, 20, 9
    parents = make_parents(["random", "star", "deep", "kary"] * 6, num_slots, g)
    logits = torch.randn(batch, num_slots, vocab, generator=g)
    one_hot = torch.nn.functional.one_hot(logits.argmax(-1), vocab).float()
    best = logits.argmax(-1).gather(1, parents.clamp(min=0).long())
    tokens = torch.where(torch.rand(batch, num_slots, generator=g) < 0.6, best, 2)
    nodes = torch.full((batch,), num_slots, dtype=torch.int32)
    greedy = OPS.tree_verify_greedy(logits, tokens, parents, nodes)
    assert int(greedy[2].max()) >= 2
    for q in (None, torch.rand(batch, num_slots, vocab, generator=g)):
        sampled = OPS.tree_verify(one_hot, tokens, parents, nodes, q, torch.arange(batch),
                                  torch.zeros(batch).long())
        assert_same(reorder(sampled), reorder(greedy), VERIFY_OUTPUTS)


def residual(r, scale, q):
    """The reference's rejection rule on [V] rows: sanitize(r / S - q)."""
    w = r / scale - q
    return torch.where((w > 0) & (w < float("inf")), w, 0.0)


def mass(r):
    """S = float32(float64 sum), summed as the reference sums its [B, V] residual."""
    return r[None].double().sum(-1).float()[0]


def run_fixed_walk(target, tokens, parents, draft, seeds=range(12)):
    """Kernel and reference on one row for several seeds; returns the outputs of the last."""
    num_nodes = torch.tensor([parents.shape[1]], dtype=torch.int32)
    context = dict(num_nodes=num_nodes, parents=parents, tree_tokens=tokens)
    for seed in seeds:
        args = (target, tokens, parents, num_nodes, draft, torch.tensor([seed]),
                torch.tensor([seed * 1000]))
        actual = OPS.tree_verify(*args)
        assert_verify_equal(actual, tree_verify_ref(*args), context)
    return actual


def small_rows(count, vocab, g):
    """Draft rows of mass 0.5, so that residuals keep mass after subtracting them."""
    q = torch.rand(count, vocab, generator=g)
    return 0.5 * q / q.sum(-1, keepdim=True)


def test_zero_mass_residuals_keep_the_previous_one():
    """Rejections whose residual has no mass at all (q = r / S, token with r(x) = 0) keep the
    previous r and S, at each stage of the kernel's residual (the target row, the first
    residual, the buffer); a buffer chunk that loses all its mass while other chunks keep
    some must read as zero afterwards. Every token has r(x) = 0 at its test, so every child is
    rejected whatever the seed: the walk is a fixed sequence of residuals."""
    vocab, num_slots = 2 * CHUNK + 10, 9
    g = torch.Generator().manual_seed(4)
    p = torch.rand(vocab, generator=g)
    p[::3] = 0.0  # tokens with p(x) = 0: x = 0, 3, 6, ...
    q = small_rows(num_slots, vocab, g)
    q[1] = p  # 1st: p - p = 0 everywhere: keep p (the target row)
    r2 = residual(p, 1.0, q[2])  # 2nd: the first residual
    q[3] = r2 / mass(r2)  # 3rd: zero mass: keep r2, S2
    r4 = residual(r2, mass(r2), q[4])  # 4th: the buffer
    q[5] = r4 / mass(r4)  # 5th: zero mass: keep the buffer
    # 6th: removes chunk 0's mass only: chunk 0 of the buffer must read as zero after it
    q[6] = torch.where(torch.arange(vocab) < CHUNK, r4 / mass(r4), 0.0)
    r6 = residual(r4, mass(r4), q[6])
    assert float(r6[:CHUNK].sum()) == 0 and float(r6.sum()) > 0 and float(r4[:CHUNK].sum()) > 0
    # 7th: a token in chunk 0 where r4 > 0 but r6 = 0: rejected only if chunk 0 reads zero;
    # 8th: q[8] as drawn.
    seventh = int(((r4[:CHUNK] > 0) & (p[:CHUNK] > 0)).nonzero()[0])
    tokens = torch.tensor([[0, 0, 3, 6, 9, 12, 15, seventh, 30]])
    target = p.expand(1, num_slots, vocab).contiguous()
    parents = torch.tensor([[-1] + [0] * (num_slots - 1)], dtype=torch.int32)
    _, _, num_accepted = run_fixed_walk(target, tokens, parents, q[None])
    assert int(num_accepted) == 0
    # The same walk without draft rows (one-hot q): tokens with p(x) = 0 are rejected too.
    run_fixed_walk(target, tokens, parents, None, seeds=[5])


def test_buffer_reused_at_a_later_node_reads_the_new_residual():
    """Two rejections at the root fill the row's residual buffer; after an accepted child,
    two rejections there write the buffer again, where one chunk of the new residual is all
    zero but held the root's residual: a later test in that chunk must read zero."""
    vocab = 2 * CHUNK + 10
    g = torch.Generator().manual_seed(8)
    p_root, p_node = torch.rand(2, vocab, generator=g)
    p_root[::3] = 0.0
    p_node[::3] = 0.0
    q = small_rows(7, vocab, g)
    # Root: nodes 1, 2 rejected (tokens with r(x) = 0), node 3 accepted (q(x) = 0 < r(x) / S).
    first = residual(p_root, 1.0, q[1])
    root_buffer = residual(first, mass(first), q[2])
    third = int(((root_buffer[:CHUNK] > 0) & (p_node[:CHUNK] > 0)).nonzero()[-1])
    q[3, third] = 0.0
    # Node 3: nodes 4, 5 rejected, node 5's residual all zero in chunk 0; node 6 in chunk 0.
    first = residual(p_node, 1.0, q[4])
    q[5] = torch.where(torch.arange(vocab) < CHUNK, first / mass(first), 0.0)
    assert float(residual(first, mass(first), q[5])[:CHUNK].sum()) == 0
    sixth = int((root_buffer[:CHUNK] > 0).nonzero()[0])
    tokens = torch.tensor([[0, 0, 3, third, 6, 9, sixth]])
    parents = torch.tensor([[-1, 0, 0, 0, 3, 3, 3]], dtype=torch.int32)
    target = torch.stack([p_root, p_root, p_root, p_node, p_root, p_root, p_root])[None]
    tokens_out, path, num_accepted = run_fixed_walk(target, tokens, parents, q[None])
    assert path[0, :2].tolist() == [3, -1] and int(num_accepted) == 1


def test_many_rows_and_threads_match_reference():
    # Enough rows for the accept tests to run in parallel (grain 16), stars and chains of 96.
    g = torch.Generator().manual_seed(5)
    batch, num_slots, vocab = 40, 96, 64
    parents = make_parents(["star", "chain", "random", "deep"] * 10, num_slots, g)
    logits = torch.randn(batch, num_slots, vocab, generator=g) * 3
    target, draft = logits.softmax(-1), (logits + torch.randn(logits.shape, generator=g)).softmax(-1)
    best = target.argmax(-1).gather(1, parents.clamp(min=0).long())
    tokens = torch.where(torch.rand(batch, num_slots, generator=g) < 0.5, best,
                         torch.randint(0, vocab, (batch, num_slots), generator=g))
    nodes = torch.randint(1, num_slots + 1, (batch,), generator=g, dtype=torch.int32)
    seeds, positions = torch.randint(-2**62, 2**62, (batch,), generator=g), torch.arange(batch)
    for q in (None, draft):
        inputs = dict(target_probs=target, tree_tokens=tokens, parents=parents, num_nodes=nodes,
                      draft_probs=q, seeds=seeds, positions=positions)
        assert_verify_equal(*run_verify(inputs), inputs)
    greedy = dict(target_logits=logits, tree_tokens=tokens, parents=parents, num_nodes=nodes)
    actual, expected = run_greedy(greedy)
    assert_same(reorder(actual), reorder(expected), VERIFY_OUTPUTS)
    assert_same(OPS.tree_metadata(parents, nodes), tree_metadata_ref(parents, nodes),
                ("mask", "depth"))


def test_strided_inputs_match_reference():
    # Views (a slice of the node rows, every other batch row) are read through their strides.
    g = torch.Generator().manual_seed(6)
    big = (torch.randn(6, 11, CHUNK + 3, generator=g) * 4).softmax(-1)
    target, draft = big[::2, :5], big[1::2, 5:10]
    parents = torch.tensor([[-1, 0, 0, 1, 1]] * 3, dtype=torch.int32)
    tokens = target.argmax(-1).gather(1, parents.clamp(min=0).long())
    tokens[:, 2] = 7
    inputs = dict(target_probs=target, tree_tokens=tokens, parents=parents,
                  num_nodes=torch.tensor([5, 3, 1], dtype=torch.int32), draft_probs=draft,
                  seeds=torch.tensor([1, 2, 3]), positions=torch.tensor([10, 20, 30]))
    assert not target.is_contiguous() and not draft.is_contiguous()
    assert_verify_equal(*run_verify(inputs), inputs)
    greedy = dict(target_logits=target.log().to(torch.float16), tree_tokens=tokens,
                  parents=parents, num_nodes=inputs["num_nodes"])
    assert_same(*map(reorder, run_greedy(greedy)), VERIFY_OUTPUTS)


def test_empty_batch():
    empty = torch.zeros(0, dtype=torch.int64)
    parents, nodes = torch.zeros(0, 4, dtype=torch.int32), torch.zeros(0, dtype=torch.int32)
    mask, depth = OPS.tree_metadata(parents, nodes)
    assert mask.shape == (0, 4, 4) and depth.shape == (0, 4)
    tokens, path, n = OPS.tree_verify(torch.rand(0, 4, 5), torch.zeros(0, 4, dtype=torch.int64),
                                      parents, nodes, None, empty, empty)
    assert tokens.shape == (0, 4) and path.shape == (0, 4) and n.shape == (0,)
    out = OPS.tree_verify_greedy(torch.rand(0, 4, 5), torch.zeros(0, 4, dtype=torch.int64),
                                 parents, nodes)
    assert out[0].shape == (0, 4)


# ---------------------------------------------------------------------------------------------
# Input checks (contract, "Bad input")


def verify_args(batch=2, num_slots=5, vocab=16):
    g = torch.Generator().manual_seed(1)
    return dict(
        target_probs=torch.rand(batch, num_slots, vocab, generator=g),
        tree_tokens=torch.randint(0, vocab, (batch, num_slots), generator=g),
        parents=torch.tensor([[-1, 0, 0, 1, 1], [-1, 0, 1, 2, 3]], dtype=torch.int32)[:batch],
        num_nodes=torch.tensor([5, 4], dtype=torch.int32)[:batch],
        draft_probs=torch.rand(batch, num_slots, vocab, generator=g),
        seeds=torch.arange(batch), positions=torch.arange(batch) * 10)


def greedy_args():
    args = verify_args()
    return dict(target_logits=args["target_probs"], tree_tokens=args["tree_tokens"],
                parents=args["parents"], num_nodes=args["num_nodes"])


def metadata_args():
    args = verify_args()
    return dict(parents=args["parents"], num_nodes=args["num_nodes"])


MAKERS = dict(tree_metadata=metadata_args, tree_verify=verify_args,
              tree_verify_greedy=greedy_args)
REFERENCES = dict(tree_metadata=tree_metadata_ref, tree_verify=tree_verify_ref,
                  tree_verify_greedy=tree_verify_greedy_ref)


def call(op_name, args):
    return getattr(OPS, op_name)(**args)


@pytest.mark.parametrize("op_name", ["tree_metadata", "tree_verify", "tree_verify_greedy"])
def test_opcheck(op_name):
    # Schema, fake kernel (specops/_fake.py) and the CPU kernel agree.
    args = MAKERS[op_name]()
    torch.library.opcheck(getattr(OPS, op_name), tuple(args.values()))
    if op_name == "tree_verify":
        args["draft_probs"] = None
        torch.library.opcheck(OPS.tree_verify, tuple(args.values()))


WRONG_DTYPES = [
    ("tree_metadata", "parents", torch.int64),
    ("tree_metadata", "num_nodes", torch.int64),
    ("tree_verify", "target_probs", torch.float64),
    ("tree_verify", "target_probs", torch.bfloat16),
    ("tree_verify", "tree_tokens", torch.int32),
    ("tree_verify", "parents", torch.int64),
    ("tree_verify", "num_nodes", torch.float32),
    ("tree_verify", "draft_probs", torch.float16),
    ("tree_verify", "seeds", torch.int32),
    ("tree_verify", "positions", torch.float32),
    ("tree_verify_greedy", "target_logits", torch.float64),
    ("tree_verify_greedy", "tree_tokens", torch.int32),
    ("tree_verify_greedy", "parents", torch.int16),
    ("tree_verify_greedy", "num_nodes", torch.int64),
]


@pytest.mark.parametrize("op_name, name, dtype", WRONG_DTYPES)
@pytest.mark.parametrize("level", [0, 1, 2])
def test_wrong_dtype_is_type_error(op_name, name, dtype, level):
    args = MAKERS[op_name]()
    args[name] = args[name].to(dtype)
    with check_level(level), pytest.raises(TypeError, match=rf"^{op_name}: {name} "):
        call(op_name, args)


WRONG_SHAPES = [
    ("tree_metadata", "parents", lambda t: t[0]),
    ("tree_metadata", "parents", lambda t: t[:, :0]),
    ("tree_metadata", "num_nodes", lambda t: t[:1]),
    ("tree_metadata", "num_nodes", lambda t: t[None]),
    ("tree_verify", "target_probs", lambda t: t[0]),
    ("tree_verify", "target_probs", lambda t: t[:, :0]),
    ("tree_verify", "target_probs", lambda t: t[..., :0]),
    ("tree_verify", "tree_tokens", lambda t: t[:1]),
    ("tree_verify", "tree_tokens", lambda t: t[:, :4]),
    ("tree_verify", "parents", lambda t: t[:, :3]),
    ("tree_verify", "parents", lambda t: t[None]),
    ("tree_verify", "num_nodes", lambda t: t[:1]),
    ("tree_verify", "draft_probs", lambda t: t[..., :15]),
    ("tree_verify", "draft_probs", lambda t: t[:, :4]),
    ("tree_verify", "draft_probs", lambda t: t[:1]),
    ("tree_verify", "seeds", lambda t: t[None]),
    ("tree_verify", "positions", lambda t: t[:1]),
    ("tree_verify_greedy", "target_logits", lambda t: t[..., :0]),
    ("tree_verify_greedy", "tree_tokens", lambda t: t[:, :2]),
    ("tree_verify_greedy", "parents", lambda t: t[:1]),
    ("tree_verify_greedy", "num_nodes", lambda t: t[None]),
]


@pytest.mark.parametrize("op_name, name, reshape", WRONG_SHAPES)
def test_wrong_shape_is_value_error(op_name, name, reshape):
    args = MAKERS[op_name]()
    args[name] = reshape(args[name])
    with check_level(0), pytest.raises(ValueError, match=rf"^{op_name}: {name}[ .\[]"):
        call(op_name, args)


def _set(name, index, value):
    def change(args):
        args[name][index] = value
    return change


TREE_FAULTS = [  # (argument, change): caught at the default level by all three ops
    ("num_nodes", _set("num_nodes", 0, 0)),
    ("num_nodes", _set("num_nodes", 1, 6)),
    ("num_nodes", _set("num_nodes", 1, -2**31)),
    ("parents", _set("parents", (1, 0), 0)),  # root not -1
    ("parents", _set("parents", (0, 0), -2)),
    ("parents", _set("parents", (0, 3), 3)),  # a self-loop: not topological
    ("parents", _set("parents", (0, 2), 4)),  # a later parent: not topological
    ("parents", _set("parents", (1, 3), -1)),  # a second root
    ("parents", _set("parents", (1, 1), 2**31 - 1)),
]
TOKEN_FAULTS = [
    ("tree_tokens", _set("tree_tokens", (0, 4), 16)),
    ("tree_tokens", _set("tree_tokens", (1, 1), -1)),
    ("tree_tokens", _set("tree_tokens", (1, 3), 2**62)),
]
BAD_VALUES = ([("tree_metadata", *fault) for fault in TREE_FAULTS]
              + [(op, *fault) for op in ("tree_verify", "tree_verify_greedy")
                 for fault in TREE_FAULTS + TOKEN_FAULTS]
              + [("tree_verify", "positions", _set("positions", 1, -3))])


@pytest.mark.parametrize("op_name, name, change", BAD_VALUES)
def test_bad_values_are_value_errors_and_off_gives_the_reference(op_name, name, change):
    args = MAKERS[op_name]()
    call(op_name, args)  # the unchanged arguments pass
    change(args)
    for level in (1, 2):
        with check_level(level), pytest.raises(ValueError, match=rf"^{op_name}: {name}\["):
            call(op_name, args)
    with check_level(0):  # off: no check, no crash, the reference's outputs, in bounds
        actual = call(op_name, args)
    expected = REFERENCES[op_name](**args)
    assert_same(actual, expected, ("0", "1", "2"))
    if op_name != "tree_metadata":
        vocab = args[next(iter(args))].shape[-1]
        emitted = actual[0].gather(1, actual[2].long()[:, None])
        assert ((emitted >= 0) & (emitted < vocab)).all()


def test_nodes_past_num_nodes_are_not_checked():
    args = verify_args()
    args["num_nodes"][1] = 2
    args["parents"][1, 2:] = torch.tensor([7, -5, 3], dtype=torch.int32)
    args["tree_tokens"][1, 2:] = torch.tensor([-1, 10**9, 16])
    args["tree_tokens"][0, 0] = -1  # the root's token is never read
    call("tree_verify", args)
    call("tree_verify_greedy", dict(target_logits=args["target_probs"],
                                    tree_tokens=args["tree_tokens"], parents=args["parents"],
                                    num_nodes=args["num_nodes"]))
    call("tree_metadata", dict(parents=args["parents"], num_nodes=args["num_nodes"]))


BAD_ROWS = [  # (argument, batch row, node row, bad value at index 3): found by full checks
    ("target_probs", 0, 0, float("nan")),
    ("target_probs", 0, 4, -0.5),  # a leaf's row: read only for the final draw
    ("target_probs", 1, 3, float("inf")),  # row num_nodes-1
    ("target_probs", 1, 2, 0.0),  # 0.0: the whole row is zeroed
    ("draft_probs", 0, 1, float("nan")),
    ("draft_probs", 1, 3, 0.0),
    ("draft_probs", 0, 4, float("-inf")),
]


def _spoil(args, name, b, i, value):
    if value == 0.0:
        args[name][b, i] = 0.0
    else:
        args[name][b, i, 3] = value


@pytest.mark.parametrize("name, b, i, value", BAD_ROWS)
def test_bad_probability_rows_only_at_full_level(name, b, i, value):
    args = verify_args()
    _spoil(args, name, b, i, value)
    call("tree_verify", args)  # cheap: not checked
    with check_level(2), pytest.raises(ValueError, match=rf"^tree_verify: {name}\[{b}, {i}\]"):
        call("tree_verify", args)


def test_full_checks_skip_unused_rows():
    args = verify_args()
    args["target_probs"][1, 4] = float("nan")  # node 4 of row 1 is past num_nodes = 4
    args["draft_probs"][:, 0] = -1.0  # draft row 0 is unused
    args["draft_probs"][1, 4] = float("nan")
    with check_level(2):
        call("tree_verify", args)
    greedy = greedy_args()
    greedy["target_logits"][1, 4, 2] = float("nan")
    with check_level(2):
        call("tree_verify_greedy", greedy)
    greedy["target_logits"][1, 3, 0] = float("nan")
    call("tree_verify_greedy", greedy)  # cheap: not checked
    message = r"^tree_verify_greedy: target_logits\[1, 3\]"
    with check_level(2), pytest.raises(ValueError, match=message):
        call("tree_verify_greedy", greedy)


@pytest.mark.parametrize("with_draft_probs", [False, True])
def test_checks_off_bad_values_give_the_reference_outputs(with_draft_probs):
    """Off: num_nodes out of range (the root detached at num_nodes <= 0, whose final token then
    sits at positions + 0), parents forming cycles or pointing forward, a root that is not -1,
    token ids out of range, negative positions, NaN / inf / negative / all-zero rows: in-bounds
    outputs, the reference's."""
    g = torch.Generator().manual_seed(7)
    batch, num_slots, vocab = 10, 6, CHUNK + 1
    target = (torch.randn(batch, num_slots, vocab, generator=g) * 3).softmax(-1)
    parents = torch.tensor([[-1, 0, 0, 1, 1, 2]] * batch, dtype=torch.int32)
    parents[0] = torch.tensor([-1, 2, 1, 1, 3, 0])  # 1 <-> 2 cycle: both detached, 3, 4 too
    parents[1] = torch.tensor([7, 0, 0, 5, 4, 9])  # root's parent ignored; 3, 4 forward; 5 out
    parents[2] = torch.tensor([-1, -1, 0, -7, 2, 2])
    tokens = target.argmax(-1).gather(1, parents.clamp(0, num_slots - 1).long())
    tokens[3] = torch.tensor([0, 2**62, -5, vocab, 4, 5])
    target[4, 0] = float("nan")
    target[5, 0, ::3] = -1.0
    target[5, 0, int(tokens[5, 1])] = float("inf")
    target[6] = 0.0
    target[7, 0] = -target[7, 0]
    draft = torch.rand(batch, num_slots, vocab, generator=g) if with_draft_probs else None
    if with_draft_probs:
        draft[8, 1:3] = float("nan")
        draft[9, 1] = -draft[9, 1]
    nodes = torch.tensor([6, 6, 6, 6, 6, 6, 6, 0, -3, 99], dtype=torch.int32)
    positions = torch.tensor([0, 1, 2, -9, 4, 5, 6, -1, 2**40, 9])
    inputs = dict(target_probs=target, tree_tokens=tokens, parents=parents, num_nodes=nodes,
                  draft_probs=draft, seeds=torch.arange(batch) - 4, positions=positions)
    with check_level(0):
        actual, expected = run_verify(inputs)
        greedy = dict(target_logits=target, tree_tokens=tokens, parents=parents, num_nodes=nodes)
        greedy_actual, greedy_expected = run_greedy(greedy)
        metadata = OPS.tree_metadata(parents, nodes)
    assert_verify_equal(actual, expected, inputs)
    assert_same(reorder(greedy_actual), reorder(greedy_expected), VERIFY_OUTPUTS)
    assert_same(metadata, tree_metadata_ref(parents, nodes), ("mask", "depth"))
    for out in (actual, greedy_actual):
        emitted = out[0].gather(1, out[2].long()[:, None])
        assert ((emitted >= 0) & (emitted < vocab)).all()
    assert metadata[1][7].tolist() == [-1] * num_slots and not metadata[0][7].any()
    assert actual[2][6] == 0 and actual[0][6, 0] == 0  # no mass anywhere: token 0
