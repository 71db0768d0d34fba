"""The Triton token-tree kernels (specops/triton_kernels/tree.py) against the reference.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tens of ms per program),
so these tests use small trees and vocabularies with small blocks to hit the tile edges; with a
GPU the same tests run natively on CUDA tensors, plus large trees (T = 256), V = 151936 and a
CUDA-graph replay.
"""

import importlib
import os
import textwrap

import pytest
import torch
from helpers import assert_compiles_for_hopper

# Must happen before triton is imported (it decides at import), so before specops.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="the Triton kernels need `pip install triton`")
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from specops.reference import (  # noqa: E402
    chain_verify_ref,
    tree_metadata_ref,
    tree_verify_greedy_ref,
    tree_verify_ref,
)

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if not CUDA and not INTERPRET:
    pytest.skip("no GPU and TRITON_INTERPRET=0: the Triton kernels cannot run",
                allow_module_level=True)

from specops.triton_kernels import tree  # noqa: E402
from specops.triton_kernels import (  # noqa: E402
    tree_metadata_triton,
    tree_verify_greedy_triton,
    tree_verify_triton,
)

if INTERPRET and not isinstance(tree._tree_verify_kernel, InterpretedFunction):
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set (no GPU): run with "
                "TRITON_INTERPRET=1 in the environment", allow_module_level=True)

# inf - inf in deliberately bad rows.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
INF, NAN = float("inf"), float("nan")
KINDS = ("chain", "star", "random", "bushy")


def assert_same(actual, expected, what):
    """Exact equality, printing the first mismatching rows."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    actual, expected = actual.cpu(), expected.cpu()
    if torch.equal(actual, expected):
        return
    rows = (actual != expected).reshape(actual.shape[0], -1).any(-1).nonzero().flatten()[:5]
    lines = [f"row {int(r)}: got {actual[r].tolist()} expected {expected[r].tolist()}"
             for r in rows]
    raise AssertionError(f"{what}: rows differ\n" + "\n".join(lines))


def random_parents(batch, num_slots, gen, kinds=KINDS):
    """[B, T] int32 topological parents, row b of shape kinds[b % len(kinds)]: a chain, a star
    (every node a child of the root), uniform random parents, or bushy (parents among the
    first third, so many siblings per node)."""
    parents = torch.full((batch, num_slots), -1, dtype=torch.int32)
    for b in range(batch):
        kind = kinds[b % len(kinds)]
        for i in range(1, num_slots):
            if kind == "chain":
                parents[b, i] = i - 1
            elif kind == "star":
                parents[b, i] = 0
            else:
                top = i if kind == "random" else max(1, i // 3)
                parents[b, i] = int(torch.randint(0, top, (), generator=gen))
    return parents


def ragged_num_nodes(batch, num_slots, gen, out_of_range=True):
    """[B] int32 in 1..T, some rows full; with out_of_range, rows with 0 and T + 1 (checks
    off: everything detached, resp. all nodes used)."""
    num_nodes = torch.randint(1, num_slots + 1, (batch,), generator=gen, dtype=torch.int32)
    num_nodes[::3] = num_slots
    if out_of_range and batch >= 4:
        num_nodes[1] = 0
        num_nodes[3] = num_slots + 1
    return num_nodes


def detach_some(parents, gen):
    """Rows 2, 6, 10, ...: one node gets a parent outside 0..i-1 (checks off), detaching it
    and its subtree."""
    num_slots = parents.shape[1]
    if num_slots < 2:
        return parents
    bad = (lambda i: i, lambda i: -1, lambda i: num_slots + 3)
    for n, b in enumerate(range(2, parents.shape[0], 4)):
        i = int(torch.randint(1, num_slots, (), generator=gen))
        parents[b, i] = bad[n % 3](i)
    return parents


def tree_inputs(batch, num_slots, vocab, gen, with_draft_probs, bad_rows=False,
                kinds=KINDS):
    """Random tree inputs. Each draft row q_i is close to its parent's target row and node i's
    token is sampled from q_i (from the parent's target row without draft_probs), so runs of
    accepts happen; siblings are drawn independently, so duplicates among them occur (and are
    forced in star rows). Ragged num_nodes, detached nodes, full-range seeds, positions across
    the 32-bit carry. With ``bad_rows``, row b gets corruption b % 8 (tokens out of range,
    q(x) = 0, NaN/inf/negative p, zero rows, p == q with a zero-mass residual, mass only on
    the last token)."""
    parents = random_parents(batch, num_slots, gen, kinds)
    num_nodes = ragged_num_nodes(batch, num_slots, gen)
    target_logits = torch.randn(batch, num_slots, vocab, generator=gen) * 3
    safe = parents.clamp(min=0).long()
    rows = torch.arange(batch)[:, None]
    draft_logits = target_logits[rows, safe] + torch.randn(target_logits.shape, generator=gen)
    target = target_logits.softmax(-1)
    draft = draft_logits.softmax(-1)
    sampled_from = draft if with_draft_probs else target[rows, safe]
    tokens = torch.multinomial(sampled_from.reshape(-1, vocab), 1, replacement=True,
                               generator=gen).reshape(batch, num_slots)
    for b in range(1, batch, 4):  # a star-ish row: the second child repeats the first
        if num_slots > 2 and parents[b, 2] == parents[b, 1]:
            tokens[b, 2] = tokens[b, 1]
    if bad_rows:
        for b in range(batch):
            kind = b % 8
            if kind == 1 and num_slots > 1:
                tokens[b, 1] = -1
                tokens[b, -1] = vocab
            elif kind == 2 and num_slots > 1:
                draft[b, 1, tokens[b, 1]] = 0.0  # q(x) = 0: always rejected
            elif kind == 3:
                target[b, :, 0] = NAN
                target[b, :, -1] = INF if vocab > 1 else NAN
                target[b, :, vocab // 2] = -1.0
                draft[b, :, -1] = NAN
            elif kind == 4:
                target[b] = 0.0
            elif kind == 5:
                # p == q and a first child with p(x) = q(x) = 0: a residual without mass.
                target[b, :, 0] = 0.0
                draft[b] = target[b, safe[b]]
                if num_slots > 1:
                    tokens[b, 1] = 0
            elif kind == 6:
                target[b] = 0.0
                target[b, :, -1] = 1.0
            elif kind == 7:
                target[b, :, :-1] = 0.0  # one valid lane in the last block, rest masked
                target[b, :, -1] = 1e-30
    parents = detach_some(parents, gen)
    seeds = torch.randint(-2**63, 2**63 - 1, (batch,), generator=gen)
    positions = torch.randint(0, 2**40, (batch,), generator=gen)
    positions[::3] = 2**32 - 2
    out = dict(target_probs=target, tree_tokens=tokens, parents=parents, num_nodes=num_nodes,
               draft_probs=draft if with_draft_probs else None, seeds=seeds,
               positions=positions)
    return {k: (v.to(DEVICE) if v is not None else None) for k, v in out.items()}


# ----------------------------------------------------------------------------- tree_metadata


def check_metadata(parents, num_nodes, **blocks):
    parents, num_nodes = parents.to(DEVICE), num_nodes.to(DEVICE)
    mask, depth = tree_metadata_triton(parents, num_nodes, **blocks)
    expected_mask, expected_depth = tree_metadata_ref(parents, num_nodes)
    assert_same(depth, expected_depth, "depth")
    assert_same(mask, expected_mask, "mask")


def test_tree_metadata_literal():
    """Root 0 with children 1, 2; node 3 under 1; node 4 past num_nodes; row 1 detaches node 1
    (parent 1 is not below 1), and with it node 3."""
    parents = torch.tensor([[-1, 0, 0, 1, 3], [-1, 1, 0, 1, 3]], dtype=torch.int32)
    num_nodes = torch.tensor([4, 5], dtype=torch.int32)
    mask, depth = tree_metadata_triton(parents.to(DEVICE), num_nodes.to(DEVICE),
                                       block_nodes=2, block_cols=2)
    assert depth.tolist() == [[0, 1, 1, 2, -1], [0, -1, 1, -1, -1]]
    assert mask.int().tolist()[0] == [[1, 0, 0, 0, 0], [1, 1, 0, 0, 0], [1, 0, 1, 0, 0],
                                      [1, 1, 0, 1, 0], [0, 0, 0, 0, 0]]
    assert mask.int().tolist()[1] == [[1, 0, 0, 0, 0], [0, 0, 0, 0, 0], [1, 0, 1, 0, 0],
                                      [0, 0, 0, 0, 0], [0, 0, 0, 0, 0]]


@pytest.mark.parametrize("num_slots", [1, 2, 3, 4, 5, 9])
def test_tree_metadata_tile_edges(num_slots):
    """Tiles of 2 nodes x 4 columns, and the default tiles: T = 1, BLOCK - 1, BLOCK,
    BLOCK + 1; every tree shape, ragged and out-of-range num_nodes, detached nodes."""
    gen = torch.Generator().manual_seed(num_slots)
    parents = detach_some(random_parents(12, num_slots, gen), gen)
    num_nodes = ragged_num_nodes(12, num_slots, gen)
    check_metadata(parents, num_nodes, block_nodes=2, block_cols=4)
    check_metadata(parents, num_nodes)


def test_tree_metadata_256_nodes():
    """T = 256 with the default tiles: a chain 255 deep, random and bushy trees."""
    gen = torch.Generator().manual_seed(256)
    batch = 16 if CUDA else 3
    parents = random_parents(batch, 256, gen, kinds=("chain", "random", "bushy"))
    num_nodes = torch.full((batch,), 256, dtype=torch.int32)
    num_nodes[-1] = 200
    check_metadata(detach_some(parents, gen), num_nodes)


# ------------------------------------------------------------------------------- tree_verify


def check_verify(inputs, block_size=None):
    """Every path that applies against the reference: without draft_probs both the two-launch
    path of deterministic children (the default at these shapes) and the single walk."""
    expected = tree_verify_ref(**inputs)
    has_draft_probs = inputs["draft_probs"] is not None
    vocab = inputs["target_probs"].shape[-1]
    for one_hot_path in ((False,) if has_draft_probs else (True, False)):
        tokens, path, num_accepted = tree_verify_triton(**inputs, block_size=block_size,
                                                        one_hot_path=one_hot_path)
        what = "two-launch" if one_hot_path else "single walk"
        assert_same(num_accepted, expected[2], f"num_accepted ({what})")
        assert_same(path, expected[1], f"path ({what})")
        assert_same(tokens, expected[0], f"tokens ({what})")
        final = tokens.gather(1, num_accepted.long()[:, None])
        assert ((final >= 0) & (final < vocab)).all()
    return expected


def test_tree_verify_literal():
    """One-hot target rows, so the walk is deterministic. Root argmax 3; children node 1
    (token 5, rejected) and node 2 (token 3, accepted); node 2's child node 3 (token 4, its
    argmax, accepted) is a leaf whose row's argmax 7 is drawn. Node 4 (token 4 under node 2,
    a duplicate of node 3) is never tested."""
    argmax = torch.tensor([[3, 0, 4, 7, 1]])
    target = torch.nn.functional.one_hot(argmax, 8).float().to(DEVICE)
    args = dict(target_probs=target, tree_tokens=torch.tensor([[9, 5, 3, 4, 4]], device=DEVICE),
                parents=torch.tensor([[-1, 0, 0, 2, 2]], dtype=torch.int32, device=DEVICE),
                num_nodes=torch.tensor([5], dtype=torch.int32, device=DEVICE), draft_probs=None,
                seeds=torch.tensor([123], device=DEVICE),
                positions=torch.tensor([40], device=DEVICE))
    for one_hot_path in (True, False):
        args["num_nodes"] = torch.tensor([5], dtype=torch.int32, device=DEVICE)
        tokens, path, num_accepted = tree_verify_triton(**args, block_size=4,
                                                        one_hot_path=one_hot_path)
        assert tokens.tolist() == [[3, 4, 7, -1, -1]]
        assert path.tolist() == [[2, 3, -1, -1, -1]] and num_accepted.tolist() == [2]
        args["num_nodes"] = args["num_nodes"] * 0 + 2  # only node 1, rejected: draw from p_0 - q
        tokens, path, num_accepted = tree_verify_triton(**args, block_size=4,
                                                        one_hot_path=one_hot_path)
        assert tokens.tolist() == [[3, -1, -1, -1, -1]] and num_accepted.tolist() == [0]


@pytest.mark.parametrize("vocab", [1, 2, 3, 4, 5, 9])
@pytest.mark.parametrize("with_draft_probs", [True, False])
def test_tree_verify_tile_edges(vocab, with_draft_probs):
    """Blocks of 4 lanes: V = 1, 2, BLOCK - 1, BLOCK, BLOCK + 1, 2 * BLOCK + 1; every tree
    shape, bad rows, detached nodes, ragged num_nodes."""
    gen = torch.Generator().manual_seed(vocab * 2 + with_draft_probs)
    check_verify(tree_inputs(8, 7, vocab, gen, with_draft_probs, bad_rows=True), block_size=4)


@pytest.mark.parametrize("with_draft_probs", [True, False])
def test_tree_verify_default_block(with_draft_probs):
    """The launcher's own block size (one block covers the row) and a wider tree."""
    gen = torch.Generator().manual_seed(11 + with_draft_probs)
    check_verify(tree_inputs(8, 12, 50, gen, with_draft_probs, bad_rows=True))


@pytest.mark.parametrize("with_draft_probs", [True, False])
def test_tree_verify_many_siblings(with_draft_probs):
    """Stars (odd rows: nodes 5..7 under node 1) whose children are drawn independently from
    a drafter sharper than the target, over a small vocabulary: many rows reject several
    siblings in a row, and the first residual has little mass, so its renormalisation
    (r / S - q, not r - q) and each sibling's own random number (its rank in the counter)
    decide which child is accepted. For these seeds a kernel with rank 0 for every sibling
    fails both cases, one with r - q the draft_probs case (with one-hot q the two rules differ
    only by rounding)."""
    gen = torch.Generator().manual_seed(22)
    batch, num_slots, vocab = 48, 8, 6
    target_logits = torch.randn(batch, num_slots, vocab, generator=gen) * 1.5
    noise = torch.randn(batch, num_slots, vocab, generator=gen)
    draft = (target_logits[:, :1] * 3 + noise * 2).softmax(-1)
    tokens = torch.multinomial(draft.reshape(-1, vocab), 1, generator=gen)
    parents = torch.zeros(batch, num_slots, dtype=torch.int32)
    parents[:, 0] = -1
    parents[1::2, 5:] = 1
    inputs = dict(target_probs=target_logits.softmax(-1),
                  tree_tokens=tokens.reshape(batch, num_slots), parents=parents,
                  num_nodes=torch.full((batch,), num_slots, dtype=torch.int32),
                  draft_probs=draft if with_draft_probs else None,
                  seeds=torch.randint(-2**63, 2**63 - 1, (batch,), generator=gen),
                  positions=torch.randint(0, 2**40, (batch,), generator=gen))
    inputs = {k: (v.to(DEVICE) if v is not None else None) for k, v in inputs.items()}
    _, path, _ = check_verify(inputs, block_size=4)
    # The test's power: rows where the root rejected >= 2 children (then accepted or drew).
    assert ((path[:, 0] >= 3) | (path[:, 0] < 0)).sum() >= 4


def test_tree_verify_equals_chain_on_chains():
    """A chain is the tree parents = [-1, 0, ..., K-1] (contract): the same tokens."""
    gen = torch.Generator().manual_seed(5)
    for with_draft_probs, one_hot_path in ((True, False), (False, False), (False, True)):
        inputs = tree_inputs(6, 5, 9, gen, with_draft_probs, kinds=("chain",))
        inputs["parents"] = random_parents(6, 5, gen, kinds=("chain",)).to(DEVICE)
        inputs["num_nodes"] = inputs["num_nodes"].clamp(1, 5)
        tokens, _, num_accepted = tree_verify_triton(**inputs, block_size=4,
                                                     one_hot_path=one_hot_path)
        draft_probs = inputs["draft_probs"]
        chain_tokens, chain_num = chain_verify_ref(
            inputs["target_probs"], inputs["tree_tokens"][:, 1:],
            draft_probs[:, 1:] if draft_probs is not None else None, inputs["num_nodes"] - 1,
            inputs["seeds"], inputs["positions"])
        assert_same(num_accepted, chain_num, "num_accepted")
        assert_same(tokens, chain_tokens, "tokens")


def test_tree_verify_256_nodes():
    """T = 256: a chain 255 deep (deterministic children accepted by one-hot targets, so the
    walk goes all the way) and a bushy tree."""
    gen = torch.Generator().manual_seed(256)
    num_slots, vocab = 256, 5
    inputs = tree_inputs(2, num_slots, vocab, gen, False, kinds=("chain", "bushy"))
    inputs["num_nodes"] = torch.full((2,), num_slots, dtype=torch.int32, device=DEVICE)
    argmax = inputs["target_probs"].argmax(-1)
    inputs["target_probs"][0] = torch.nn.functional.one_hot(argmax[0], vocab).float()
    inputs["tree_tokens"][0, 1:] = argmax[0, :-1]
    _, _, num_accepted = check_verify(inputs, block_size=4)
    assert num_accepted[0] == num_slots - 1


@settings(max_examples=20 if not CUDA else 100, deadline=None)
@given(batch=st.integers(1, 4), num_slots=st.integers(1, 9), vocab=st.integers(1, 40),
       block_size=st.sampled_from([4, 16, 64]), with_draft_probs=st.booleans(),
       seed=st.integers(0, 2**31))
def test_tree_verify_hypothesis(batch, num_slots, vocab, block_size, with_draft_probs, seed):
    gen = torch.Generator().manual_seed(seed)
    check_verify(tree_inputs(batch, num_slots, vocab, gen, with_draft_probs), block_size)


@pytest.mark.skipif(not CUDA, reason="large vocabularies need a GPU")
@pytest.mark.parametrize("batch, num_slots, vocab", [(1, 256, 151936), (4, 64, 151936),
                                                     (64, 16, 32000), (256, 8, 4099)])
@pytest.mark.parametrize("with_draft_probs", [True, False])
def test_tree_verify_large(batch, num_slots, vocab, with_draft_probs):
    gen = torch.Generator().manual_seed(batch + num_slots)
    check_verify(tree_inputs(batch, num_slots, vocab, gen, with_draft_probs, bad_rows=True))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_tree_cuda_graph():
    """Every launcher (tree_verify's both paths) captured in one graph; replays follow new
    seeds and new trees (updated in place, so shared by both tree_verify inputs)."""
    gen = torch.Generator().manual_seed(3)
    inputs = tree_inputs(8, 16, 32000, gen, True)
    logits = torch.randn(8, 16, 32000, generator=gen).to(DEVICE)
    greedy_args = (logits, inputs["tree_tokens"], inputs["parents"], inputs["num_nodes"])
    one_hot = dict(inputs, draft_probs=None)  # the two-launch path of deterministic children
    tree_verify_triton(**inputs)  # compile outside the capture
    tree_verify_triton(**one_hot)
    tree_verify_greedy_triton(*greedy_args)
    tree_metadata_triton(inputs["parents"], inputs["num_nodes"])
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        verified = tree_verify_triton(**inputs)
        verified_one_hot = tree_verify_triton(**one_hot)
        greedy = tree_verify_greedy_triton(*greedy_args)
        metadata = tree_metadata_triton(inputs["parents"], inputs["num_nodes"])
    for step in range(2):
        if step:
            inputs["seeds"] += 1
            inputs["parents"].copy_(random_parents(8, 16, gen).to(DEVICE))
        graph.replay()
        for got, expected, what in zip(
                verified + verified_one_hot + greedy + metadata,
                tree_verify_ref(**inputs) + tree_verify_ref(**one_hot)
                + tree_verify_greedy_ref(*greedy_args)
                + tree_metadata_ref(inputs["parents"], inputs["num_nodes"]),
                ("tokens", "path", "num_accepted") * 3 + ("mask", "depth")):
            assert_same(got, expected, f"{what} after replay {step}")


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_tree_ops_opcheck_on_cuda():
    """The CUDA registrations (specops/_gpu.py) of the three tree ops pass opcheck."""
    importlib.import_module("specops")  # registers the ops

    gen = torch.Generator().manual_seed(4)
    inputs = tree_inputs(3, 6, 100, gen, True)
    shape = (random_parents(3, 6, gen).to(DEVICE),
             ragged_num_nodes(3, 6, gen, out_of_range=False).to(DEVICE))
    torch.library.opcheck(torch.ops.specops.tree_verify.default,
                          (inputs["target_probs"], inputs["tree_tokens"], *shape,
                           inputs["draft_probs"], inputs["seeds"], inputs["positions"]))
    torch.library.opcheck(torch.ops.specops.tree_verify_greedy.default,
                          (inputs["target_probs"], inputs["tree_tokens"], *shape))
    torch.library.opcheck(torch.ops.specops.tree_metadata.default, shape)


# ------------------------------------------------------------------------ tree_verify_greedy


def greedy_inputs(batch, num_slots, vocab, dtype, gen):
    """Integer logits (ties everywhere), NaN in some rows, a row of -inf; node tokens mostly
    the parent's argmax (so runs of accepts happen), some wrong or out of range, duplicates
    among siblings; every tree shape, ragged num_nodes, detached nodes."""
    logits = torch.randint(-3, 3, (batch, num_slots, vocab), generator=gen).to(dtype)
    logits[0, 0] = -INF
    if vocab > 3:
        logits[1 % batch, 0, vocab - 1] = NAN
        logits[2 % batch, :, vocab // 2] = NAN
        logits[2 % batch, :, 1] = NAN
    parents = random_parents(batch, num_slots, gen)
    argmax = logits.argmax(-1)
    tokens = argmax[torch.arange(batch)[:, None], parents.clamp(min=0).long()]
    wrong = torch.rand(tokens.shape, generator=gen) < 0.25
    tokens = torch.where(wrong, torch.randint(-1, vocab + 1, tokens.shape, generator=gen), tokens)
    num_nodes = ragged_num_nodes(batch, num_slots, gen)
    parents = detach_some(parents, gen)
    return (logits.to(DEVICE), tokens.to(DEVICE), parents.to(DEVICE), num_nodes.to(DEVICE))


def check_greedy(args, chunk_size=None):
    tokens, path, num_accepted = tree_verify_greedy_triton(*args, chunk_size=chunk_size)
    expected = tree_verify_greedy_ref(*args)
    assert_same(num_accepted, expected[2], "num_accepted")
    assert_same(path, expected[1], "path")
    assert_same(tokens, expected[0], "tokens")


def test_tree_verify_greedy_literal():
    """Root argmax 3: node 1 (token 5) is skipped, node 2 (token 3) taken; under node 2,
    nodes 3 and 4 both hold its argmax 4: the first (node 3) is taken; node 3's argmax 7."""
    logits = torch.nn.functional.one_hot(torch.tensor([[3, 0, 4, 7, 1]]), 8).float()
    tokens, path, num_accepted = tree_verify_greedy_triton(
        logits.to(DEVICE), torch.tensor([[9, 5, 3, 4, 4]], device=DEVICE),
        torch.tensor([[-1, 0, 0, 2, 2]], dtype=torch.int32, device=DEVICE),
        torch.tensor([5], dtype=torch.int32, device=DEVICE), chunk_size=4)
    assert tokens.tolist() == [[3, 4, 7, -1, -1]]
    assert path.tolist() == [[2, 3, -1, -1, -1]] and num_accepted.tolist() == [2]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [1, 7, 8, 9])
def test_tree_verify_greedy_tile_edges(dtype, vocab):
    """Chunks of 8 lanes: V = 1, CHUNK - 1, CHUNK, CHUNK + 1; masked lanes never win."""
    gen = torch.Generator().manual_seed(vocab)
    check_greedy(greedy_inputs(8, 6, vocab, dtype, gen), chunk_size=8)


def test_tree_verify_greedy_masked_lanes_lose():
    """All-equal and all -inf rows: index 0 wins, never a masked lane (ids >= V)."""
    for value in (0.0, -INF):
        logits = torch.full((1, 2, 9), value, device=DEVICE)
        tokens, _, _ = tree_verify_greedy_triton(
            logits, torch.tensor([[0, 0]], device=DEVICE),
            torch.tensor([[-1, 0]], dtype=torch.int32, device=DEVICE),
            torch.tensor([2], dtype=torch.int32, device=DEVICE), chunk_size=8)
        assert tokens.tolist() == [[0, 0]]


@settings(max_examples=15 if not CUDA else 100, deadline=None)
@given(batch=st.integers(1, 4), num_slots=st.integers(1, 9), vocab=st.integers(1, 40),
       chunk_size=st.sampled_from([4, 16, 64]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       seed=st.integers(0, 2**31))
def test_tree_verify_greedy_hypothesis(batch, num_slots, vocab, chunk_size, dtype, seed):
    check_greedy(greedy_inputs(batch, num_slots, vocab, dtype,
                               torch.Generator().manual_seed(seed)), chunk_size)


@pytest.mark.skipif(not CUDA, reason="large vocabularies need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, num_slots, vocab", [(1, 256, 151936), (32, 16, 128256)])
def test_tree_verify_greedy_large(dtype, batch, num_slots, vocab):
    gen = torch.Generator().manual_seed(batch)
    check_greedy(greedy_inputs(batch, num_slots, vocab, dtype, gen))


# ------------------------------------------------------------------- compiles for the H100

_COMPILE_FOR_HOPPER = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from specops.triton_kernels import tree

    def build(fn, consts, options=None, **types):
        names = fn.arg_names
        signature = {n: types.get(n, "constexpr" if n in consts else "i32") for n in names}
        source = ASTSource(fn=fn, signature=signature, constexprs=consts)
        triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options or {})

    build(tree._tree_metadata_kernel, dict(BLOCK_I=16, BLOCK_J=256), parents_ptr="*i32",
          num_nodes_ptr="*i32", mask_ptr="*u8", depth_ptr="*i32")
    verify = dict(target_probs_ptr="*fp32", tree_tokens_ptr="*i64", parents_ptr="*i32",
                  num_nodes_ptr="*i32", draft_probs_ptr="*fp32", seeds_ptr="*i64",
                  positions_ptr="*i64", ws_ptr="*fp32", ws_mass_ptr="*fp64",
                  tokens_ptr="*i64", path_ptr="*i32", num_accepted_ptr="*i32")
    for has in (True, False):
        build(tree._tree_verify_kernel,
              dict(HAS_DRAFT_PROBS=has, BLOCK_T=256, BLOCK=4096, BLOCK_NB=64),
              dict(num_warps=16), **verify)
    for dtype in ("*fp32", "*bf16", "*fp16"):
        build(tree._tree_verify_greedy_argmax_kernel, dict(CHUNK=4096),
              target_logits_ptr=dtype, num_nodes_ptr="*i32", chunk_max_ptr="*fp32",
              chunk_argmax_ptr="*i32")
    build(tree._tree_verify_chunk_mass_kernel, dict(CHUNK=4096), target_probs_ptr="*fp32",
          num_nodes_ptr="*i32", chunk_mass_ptr="*fp64")
    build(tree._tree_verify_one_hot_walk_kernel,
          dict(BLOCK_T=256, BLOCK_CHUNKS=256, CHUNK=4096), target_probs_ptr="*fp32",
          tree_tokens_ptr="*i64", parents_ptr="*i32", num_nodes_ptr="*i32", seeds_ptr="*i64",
          positions_ptr="*i64", chunk_mass_ptr="*fp64", tokens_ptr="*i64", path_ptr="*i32",
          num_accepted_ptr="*i32")
    build(tree._tree_verify_greedy_walk_kernel, dict(BLOCK_T=256, BLOCK_CHUNKS=64),
          tree_tokens_ptr="*i64", parents_ptr="*i32", num_nodes_ptr="*i32",
          chunk_max_ptr="*fp32", chunk_argmax_ptr="*i32", tokens_ptr="*i64", path_ptr="*i32",
          num_accepted_ptr="*i32")
    print("compiled")
""")


@pytest.mark.skipif(CUDA, reason="on a GPU the other tests compile and run every kernel")
def test_tree_kernels_compile_for_hopper():
    """Every tree kernel compiles to an sm_90 cubin (Triton's own ptxas, no GPU needed), so
    code the interpreter accepts but the compiler rejects fails here rather than on a GPU."""
    assert_compiles_for_hopper(_COMPILE_FOR_HOPPER, timeout=600)
