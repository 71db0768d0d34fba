"""Token trees for the tests: shape generators (vectorised over rows) and hypothesis strategies
for ``tree_metadata``, ``tree_verify`` and ``tree_verify_greedy`` inputs.

A tree row is ``parents [T]`` with ``parents[0] = -1`` and ``0 <= parents[i] < i``, used up to
``num_nodes``; slots past ``num_nodes`` hold garbage on purpose (the ops must ignore them).
"""

import torch
from hypothesis import strategies as st

# chain: i-1; star: 0; kary: (i-1)//k; random: uniform in 0..i-1 (random recursive tree);
# deep: i-1 with probability 0.8, else uniform (long paths with side branches).
SHAPES = ("chain", "star", "kary", "random", "deep")
INT64 = st.integers(-2**63, 2**63 - 1)
LOGIT_DTYPES = [torch.float32, torch.bfloat16, torch.float16]


def make_parents(shapes: list[str] | torch.Tensor, num_slots: int, generator: torch.Generator,
                 arity: int = 2, max_children: int | None = None) -> torch.Tensor:
    """[B, T] int32 parents in topological order, one shape per row (a name of SHAPES or its
    index).

    ``max_children`` caps every node's children (a node at the cap hands its next child to
    node ``i - 1``, which has none yet), for trees whose children are distinct top-k tokens.
    """
    batch = len(shapes)
    kind = shapes if isinstance(shapes, torch.Tensor) else torch.tensor(
        [SHAPES.index(s) for s in shapes])
    parents = torch.full((batch, num_slots), -1, dtype=torch.int64)
    num_children = torch.zeros(batch, num_slots, dtype=torch.int64)
    for i in range(1, num_slots):
        uniform = (torch.rand(batch, generator=generator) * i).long().clamp(max=i - 1)
        deep = torch.where(torch.rand(batch, generator=generator) < 0.8, i - 1, uniform)
        p = torch.where(kind == 0, i - 1, torch.where(kind == 1, 0, torch.where(
            kind == 2, (i - 1) // arity, torch.where(kind == 3, uniform, deep))))
        if max_children is not None:
            full = num_children.gather(1, p[:, None]).squeeze(1) >= max_children
            p = torch.where(full, i - 1, p)
            num_children.scatter_add_(1, p[:, None], torch.ones(batch, 1, dtype=torch.int64))
        parents[:, i] = p
    return parents.int()


def sibling_ranks(parents: torch.Tensor) -> torch.Tensor:
    """[B, T] int64: each node's rank among its parent's children in index order (root 0)."""
    nodes = torch.arange(parents.shape[1])
    same = (parents[:, :, None] == parents[:, None, :]) & (nodes[None, :] < nodes[:, None])
    return torch.where(nodes >= 1, same.sum(-1), 0)


def previous_sibling(parents: torch.Tensor) -> torch.Tensor:
    """[B, T] int64: the closest earlier node with the same parent, -1 if none."""
    nodes = torch.arange(parents.shape[1])
    same = (parents[:, :, None] == parents[:, None, :]) & (nodes[None, :] < nodes[:, None])
    last = torch.where(same, nodes, -1).amax(-1)
    return torch.where(nodes >= 1, last, -1)


def ragged_num_nodes(draw, batch: int, num_slots: int) -> torch.Tensor:
    """num_nodes in 1..T, with T drawn often and 1 (the root alone) at times."""
    choice = st.sampled_from([num_slots, num_slots, 1]) | st.integers(1, num_slots)
    return torch.tensor(draw(st.lists(choice, min_size=batch, max_size=batch)), dtype=torch.int32)


def spoil_unused(parents: torch.Tensor, num_nodes: torch.Tensor, generator: torch.Generator,
                 values: tuple[int, int]) -> torch.Tensor:
    """A copy with random values in ``values`` (inclusive) at slots past num_nodes."""
    past = torch.arange(parents.shape[1]) >= num_nodes[:, None].long()
    garbage = torch.randint(values[0], values[1] + 1, parents.shape, generator=generator)
    return torch.where(past, garbage.to(parents.dtype), parents)


def _slot_counts(max_slots: int):
    """T in 1..max_slots, spread evenly over small, medium and large trees (plain integers
    draw mostly tiny ones)."""
    sizes = sorted({1, 2, 3, 5, 8, 13, max_slots // 2, max_slots} & set(range(1, max_slots + 1)))
    return st.sampled_from(sizes) | st.integers(1, max_slots)


@st.composite
def trees(draw, max_batch: int = 4, max_slots: int = 256):
    """(parents [B, T] int32, num_nodes [B] int32, shapes): chains, stars, k-ary, random and
    deep trees up to T = max_slots, garbage past num_nodes in half the examples."""
    batch = draw(st.integers(1, max_batch))
    num_slots = draw(st.one_of(st.integers(1, 12), st.sampled_from([max_slots]),
                               st.integers(1, max_slots)))
    shapes = draw(st.lists(st.sampled_from(SHAPES), min_size=batch, max_size=batch))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    parents = make_parents(shapes, num_slots, g, arity=draw(st.integers(1, 4)))
    num_nodes = ragged_num_nodes(draw, batch, num_slots)
    if draw(st.booleans()):
        parents = spoil_unused(parents, num_nodes, g, (-3, 2 * num_slots))
    return parents, num_nodes, shapes


@st.composite
def verify_inputs(draw, vocabs=(1, 2, 3, 17, 3000, 8193), max_batch: int = 6,
                  max_slots: int = 24, with_draft_probs: bool | None = None):
    """Inputs of ``tree_verify`` on random trees.

    Rows need not sum to 1 (scaled by [0.5, 2)); a quarter of the target rows are one-hot.
    Each node's token is its parent's target argmax or a sample from it (often accepted; more
    often for later siblings than for first children), a sample from its draft distribution,
    a copy of its previous sibling's token (duplicates among siblings) or any token; p(x) = 0
    and q(x) = 0 at some node tokens. Siblings share their parent's draft row, as when drawn
    independently from it. Draft row 0 is unused and holds NaN at times; slots past num_nodes
    hold garbage (-1 or ids out of range).
    """
    vocab = draw(st.sampled_from(vocabs))
    big = vocab > 1000
    batch = draw(st.integers(1, 2 if big else max_batch))
    num_slots = draw(_slot_counts(8 if big else max_slots))
    shapes = draw(st.lists(st.sampled_from(SHAPES), min_size=batch, max_size=batch))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    sharpness = draw(st.sampled_from([0.0, 1.0, 4.0, 12.0]))
    parents = make_parents(shapes, num_slots, g, arity=draw(st.integers(1, 4)))
    num_nodes = ragged_num_nodes(draw, batch, num_slots)

    def rand(*shape):
        return torch.rand(*shape, generator=g)

    def rows():
        p = (torch.randn(batch, num_slots, vocab, generator=g) * sharpness).softmax(-1)
        return p * (0.5 + 1.5 * rand(batch, num_slots, 1))

    target = rows()
    hot = torch.randint(0, vocab, (batch, num_slots), generator=g)
    one_hot = torch.nn.functional.one_hot(hot, vocab).float()
    target = torch.where((rand(batch, num_slots) < 0.25)[..., None], one_hot, target)
    after = rows()  # after[b, i]: the draft distribution of node i's children
    parent = parents.long().clamp(min=0)
    batch_index = torch.arange(batch)[:, None]
    q = after[batch_index, parent]  # q[b, i]: the distribution node i was drawn from

    def sample(probs):
        return torch.multinomial(probs.reshape(-1, vocab), 1, generator=g).reshape(batch,
                                                                                  num_slots)

    p_parent = target[batch_index, parent]
    choices = torch.stack([p_parent.argmax(-1), sample(p_parent), sample(q),
                           torch.randint(0, vocab, (batch, num_slots), generator=g)])
    # first children rejected more often than later ones, so that later siblings get tested
    weights = torch.tensor([[0.1, 0.2, 0.3, 0.4], [0.3, 0.4, 0.2, 0.1]])
    first_child = sibling_ranks(parents) == 0
    pick = torch.multinomial(weights[torch.where(first_child, 0, 1).flatten()], 1,
                             generator=g).reshape(batch, num_slots)
    tokens = choices.gather(0, pick[None]).squeeze(0)
    duplicate = rand(batch, num_slots) < 0.25
    previous = previous_sibling(parents)
    for i in range(1, num_slots):  # in index order, so a copy of a copy is a copy
        copy = duplicate[:, i] & (previous[:, i] >= 0)
        tokens[:, i] = torch.where(copy, tokens[batch_index[:, 0], previous[:, i].clamp(min=0)],
                                   tokens[:, i])
    tokens[:, 0] = torch.randint(0, vocab, (batch,), generator=g)  # the root token

    # p(x) = 0 at some node tokens (always rejected) where the row keeps mass elsewhere,
    # q(x) = 0 at others (accepted iff p(x) > 0)
    zero_p = rand(batch, num_slots) < 0.1
    rows_b = batch_index[:, 0]
    for i in range(1, num_slots):
        row = target[rows_b, parent[:, i]]
        p_x = row[rows_b, tokens[:, i]]
        spoil = zero_p[:, i] & (row.sum(-1) - p_x > 0)
        target[rows_b, parent[:, i], tokens[:, i]] = torch.where(spoil, 0.0, p_x)
    x = tokens[..., None]
    draft = None
    if draw(st.booleans()) if with_draft_probs is None else with_draft_probs:
        q_x = q.gather(-1, x)
        zero_q = rand(batch, num_slots, 1) < 0.15
        draft = q.scatter(-1, x, torch.where(zero_q, 0.0, q_x))
        if draw(st.booleans()):
            draft[:, 0] = float("nan")  # row 0 is unused

    if draw(st.booleans()):
        past = torch.arange(num_slots) >= num_nodes[:, None].long()
        garbage = torch.where(rand(batch, num_slots) < 0.5, -1, vocab + 7)
        tokens = torch.where(past, garbage, tokens)
        parents = spoil_unused(parents, num_nodes, g, (-3, 2 * num_slots))
    seeds = torch.tensor(draw(st.lists(INT64, min_size=batch, max_size=batch)))
    positions = torch.tensor(draw(st.lists(st.integers(0, 2**62), min_size=batch,
                                           max_size=batch)))
    return dict(target_probs=target, tree_tokens=tokens, parents=parents, num_nodes=num_nodes,
                draft_probs=draft, seeds=seeds, positions=positions, shapes=shapes)


@st.composite
def greedy_inputs(draw, vocabs=(1, 2, 3, 17, 3000, 8193), max_batch: int = 5,
                  max_slots: int = 24):
    """Inputs of ``tree_verify_greedy``: logits in fp32/bf16/fp16, with ties (small integers)
    in half the examples; node tokens are the parent's first argmax, its last maximal index
    (differs on a tie), a copy of the previous sibling's or any token."""
    vocab = draw(st.sampled_from(vocabs))
    big = vocab > 1000
    batch = draw(st.integers(1, 2 if big else max_batch))
    num_slots = draw(_slot_counts(8 if big else max_slots))
    dtype = draw(st.sampled_from(LOGIT_DTYPES))
    shapes = draw(st.lists(st.sampled_from(SHAPES), min_size=batch, max_size=batch))
    g = torch.Generator().manual_seed(draw(st.integers(0, 2**31)))
    parents = make_parents(shapes, num_slots, g, arity=draw(st.integers(1, 4)))
    num_nodes = ragged_num_nodes(draw, batch, num_slots)
    if draw(st.booleans()):
        logits = torch.randint(-2, 3, (batch, num_slots, vocab), generator=g).to(dtype)
    else:
        logits = (torch.randn(batch, num_slots, vocab, generator=g) * 3).to(dtype)
    batch_index = torch.arange(batch)[:, None]
    parent_rows = logits.float()[batch_index, parents.long().clamp(min=0)]
    first_max = parent_rows.argmax(-1)
    last_max = vocab - 1 - parent_rows.flip(-1).argmax(-1)
    pick = torch.rand(batch, num_slots, generator=g)
    anything = torch.randint(0, vocab, (batch, num_slots), generator=g)
    tokens = torch.where(pick < 0.5, first_max, torch.where(pick < 0.7, last_max, anything))
    previous = previous_sibling(parents)
    duplicate = torch.rand(batch, num_slots, generator=g) < 0.3
    for i in range(1, num_slots):
        copy = duplicate[:, i] & (previous[:, i] >= 0)
        tokens[:, i] = torch.where(copy, tokens[batch_index[:, 0], previous[:, i].clamp(min=0)],
                                   tokens[:, i])
    if draw(st.booleans()):
        past = torch.arange(num_slots) >= num_nodes[:, None].long()
        tokens = torch.where(past, -1, tokens)
        parents = spoil_unused(parents, num_nodes, g, (-3, 2 * num_slots))
    return dict(target_logits=logits, tree_tokens=tokens, parents=parents, num_nodes=num_nodes,
                shapes=shapes)


def check_invariants(d, out):
    """What any correct walk satisfies: path[k] is a child of path[k-1] (of the root for
    k = 0) within num_nodes, tokens[k] is its token, then one token in 0..V-1, then -1."""
    tokens, path, num_accepted = out
    batch, num_slots = d["parents"].shape
    vocab = (d["target_probs"] if "target_probs" in d else d["target_logits"]).shape[-1]
    slots = torch.arange(num_slots)
    n = num_accepted.long()[:, None]
    assert ((num_accepted >= 0) & (num_accepted < d["num_nodes"])).all()
    assert torch.equal(path >= 0, slots < n) and torch.equal(tokens >= 0, slots <= n)
    assert (tokens < vocab).all() and (path < d["num_nodes"][:, None]).all()
    previous = torch.cat([torch.zeros(batch, 1, dtype=torch.int32), path[:, :-1]], 1)
    parent_of = d["parents"].gather(1, path.long().clamp(min=0))
    assert torch.equal(torch.where(slots < n, parent_of, -1), torch.where(slots < n, previous, -1))
    node_tokens = d["tree_tokens"].gather(1, path.long().clamp(min=0))
    assert torch.equal(torch.where(slots < n, tokens, -1), torch.where(slots < n, node_tokens, -1))
