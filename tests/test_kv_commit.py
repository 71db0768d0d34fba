"""kv_commit and kv_write (contract, "KV-cache commit").

The main statement: after a tree step and its commit, the cache equals the cache that the
accepted tokens alone would have produced. Every entry here is a function of (row, tensor,
absolute position, token), so "recompute from the accepted tokens" is a cache built directly
from the committed sequence. The Triton kernel runs under Triton's interpreter without a GPU.
"""

import doctest
import textwrap

import pytest
import torch
from hypothesis import given, settings
from hypothesis import strategies as st
from helpers import assert_compiles_for_hopper

import specops
import specops.kv_ops
from specops.reference.kv import kv_commit_ref, masked_index_put_, slot_index, slot_view

CUDA = torch.cuda.is_available()
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
BITS = {torch.float32: torch.int32, torch.bfloat16: torch.int16, torch.float16: torch.int16}

try:
    import triton  # noqa: F401
    from triton.runtime.interpreter import InterpretedFunction

    from specops.triton_kernels import kv as kv_triton
    TRITON = CUDA or isinstance(kv_triton._kv_commit_kernel, InterpretedFunction)
except ImportError:
    TRITON = False
needs_triton = pytest.mark.skipif(not TRITON, reason="needs Triton (a GPU or TRITON_INTERPRET=1 "
                                  "before triton is imported)")


@pytest.fixture
def checks():
    yield specops.set_checks
    specops.set_checks("cheap")


def commit(impl, kv, cache_lens, path, num_accepted, block_tables=None):
    """Runs one backend: "reference", "kernels" (the C++ kernel on the CPU) or "triton"."""
    if impl == "triton" and not CUDA:  # the interpreter, on the CPU tensors themselves
        return kv_triton.kv_commit_triton(kv, cache_lens, path, num_accepted, block_tables)
    if impl == "triton":  # on the GPU, then back into the CPU tensors
        on_gpu = [t.cuda() for t in kv]
        new_lens = kv_triton.kv_commit_triton(
            on_gpu, cache_lens.cuda(), path.cuda(), num_accepted.cuda(),
            None if block_tables is None else block_tables.cuda())
        for t, result in zip(kv, on_gpu):
            t.copy_(result.cpu())
        return new_lens.cpu()
    with specops.use_backend(impl):
        return specops.kv_commit(kv, cache_lens, path, num_accepted, block_tables)


def bits(t):
    """The raw bits, so that equality is bit-exact (NaN payloads, -0.0)."""
    return t.view(BITS[t.dtype])


# ------------------------------------------------------------------------ a tree step's cache


def entries(rows, layer, positions, tokens, heads, dim, dtype):
    """[B, Hkv, N, D] cache entries, a function of (row, layer, position, token, head, dim);
    small integers, exact in every dtype."""
    h = torch.arange(heads)[None, :, None, None]
    d = torch.arange(dim)[None, None, None, :]
    key = (tokens * 7 + positions * 3 + rows * 5)[:, None, :, None] + layer * 11 + h * 13 + d
    return (key % 251 - 125).to(dtype)


def random_tree_step(g, batch, num_nodes, capacity):
    """Per row: a prefix, a random tree (node 0 = root), and a random root-to-node walk.

    Returns a dict with cache_lens [B], parents/tree_tokens/depth [B, T], path [B, T] (walk's
    nodes after the root, then -1), num_accepted [B], and sequences [B, capacity]: the
    committed tokens after the commit (prefix, root, accepted tokens), -1 past them.
    """
    lens = torch.randint(0, capacity - num_nodes + 1, (batch,), generator=g, dtype=torch.int32)
    parents = torch.full((batch, num_nodes), -1, dtype=torch.int32)
    depth = torch.zeros(batch, num_nodes, dtype=torch.int64)
    for i in range(1, num_nodes):
        parents[:, i] = torch.randint(0, i, (batch,), generator=g, dtype=torch.int32)
        depth[:, i] = depth.gather(1, parents[:, i:i + 1].long())[:, 0] + 1
    tree_tokens = torch.randint(0, 1000, (batch, num_nodes), generator=g)
    prefix = torch.randint(0, 1000, (batch, capacity), generator=g)
    path = torch.full((batch, num_nodes), -1, dtype=torch.int32)
    num_accepted = torch.zeros(batch, dtype=torch.int32)
    sequences = torch.full((batch, capacity), -1, dtype=torch.int64)
    for b in range(batch):
        node = int(torch.randint(0, num_nodes, (1,), generator=g))
        walk = []
        while node > 0:
            walk.append(node)
            node = int(parents[b, node])
        walk.reverse()
        path[b, :len(walk)] = torch.tensor(walk, dtype=torch.int32)
        num_accepted[b] = len(walk)
        length = int(lens[b])
        committed = prefix[b, :length].tolist() + [int(tree_tokens[b, 0])]
        committed += [int(tree_tokens[b, i]) for i in walk]
        sequences[b, :len(committed)] = torch.tensor(committed)
    return dict(cache_lens=lens, parents=parents, depth=depth, tree_tokens=tree_tokens,
                prefix=prefix, path=path, num_accepted=num_accepted, sequences=sequences)


def caches_before(step, num_tensors, heads, dim, capacity, dtype, g):
    """Logical [B, Hkv, S, D] caches during the tree step: prefix entries, then node i at slot
    cache_lens + i (position cache_lens + depth), then stale garbage."""
    batch, num_nodes = step["tree_tokens"].shape
    slots = torch.arange(capacity)[None, :]
    lens = step["cache_lens"].long()[:, None]
    node = (slots - lens).clamp(0, num_nodes - 1)
    in_tree = (slots >= lens) & (slots < lens + num_nodes)
    tokens = torch.where(in_tree, step["tree_tokens"].gather(1, node), step["prefix"])
    positions = torch.where(in_tree, lens + step["depth"].gather(1, node), slots)
    rows = torch.arange(batch)[:, None]
    caches = []
    for layer in range(num_tensors):
        cache = entries(rows, layer, positions, tokens, heads, dim, dtype)
        stale = slots >= lens + num_nodes
        garbage = torch.randint(-100, 100, cache.shape, generator=g).to(dtype)
        caches.append(torch.where(stale[:, None, :, None], garbage, cache))
    return caches


def recomputed(step, layer, heads, dim, dtype):
    """The logical cache the committed sequence alone produces (valid below the new length)."""
    sequences = step["sequences"]
    batch, capacity = sequences.shape
    positions = torch.arange(capacity)[None, :].expand(batch, -1)
    return entries(torch.arange(batch)[:, None], layer, positions, sequences, heads, dim, dtype)


def fill_paged(storage, cache, tables):
    """Writes a logical [B, Hkv, S, D] cache into paged storage through its block tables."""
    batch, heads, capacity, dim = cache.shape
    max_blocks, block_size = tables.shape[1], storage.shape[1]
    padded = torch.zeros(batch, heads, max_blocks * block_size, dim, dtype=cache.dtype)
    padded[:, :, :capacity] = cache
    blocks = padded.reshape(batch, heads, max_blocks, block_size, dim).permute(0, 2, 3, 1, 4)
    storage[tables.long()] = blocks


def to_paged(logical, g, block_size):
    """Scatters [B, Hkv, S, D] caches into [num_blocks, block_size, Hkv, D] through shuffled
    private blocks; spare blocks hold garbage. Returns (paged list, block_tables)."""
    batch, heads, capacity, dim = logical[0].shape
    max_blocks = -(-capacity // block_size)
    num_blocks = batch * max_blocks + 3
    perm = torch.randperm(num_blocks, generator=g)[:batch * max_blocks]
    tables = perm.reshape(batch, max_blocks).to(torch.int32)
    paged = []
    for cache in logical:
        storage = torch.randint(-100, 100, (num_blocks, block_size, heads, dim),
                                generator=g).to(cache.dtype)
        fill_paged(storage, cache, tables)
        paged.append(storage)
    return paged, tables


def from_paged(paged, tables, capacity):
    batch, max_blocks = tables.shape
    blocks = paged[tables.long()]  # [B, max_blocks, block_size, Hkv, D]
    logical = blocks.reshape(batch, max_blocks * blocks.shape[2], *blocks.shape[3:])
    return logical[:, :capacity].permute(0, 2, 1, 3)


def check_commit(impl, batch, heads, dim, num_nodes, num_tensors, dtype, paged, seed,
                 block_size=3, spare=2):
    g = torch.Generator().manual_seed(seed)
    capacity = num_nodes + spare + 2
    step = random_tree_step(g, batch, num_nodes, capacity)
    logical = caches_before(step, num_tensors, heads, dim, capacity, dtype, g)
    tables = None
    kv = [c.clone() for c in logical]
    if paged:
        kv, tables = to_paged(logical, g, block_size)
    before = [c.clone() for c in kv]
    new_lens = commit(impl, kv, step["cache_lens"], step["path"], step["num_accepted"], tables)
    assert new_lens.dtype == torch.int32
    assert torch.equal(new_lens, step["cache_lens"] + 1 + step["num_accepted"])
    slots = torch.arange(capacity)[None, :]
    lens = step["cache_lens"].long()[:, None]
    moved = ((slots > lens) & (slots < new_lens.long()[:, None]))[:, None, :, None]
    for layer, (after, old) in enumerate(zip(kv, before)):
        if paged:
            after_logical = from_paged(after, tables, capacity)
            old_logical = from_paged(old, tables, capacity)
            in_use = torch.zeros(after.shape[0], dtype=torch.bool)
            in_use[tables.long().flatten()] = True
            assert torch.equal(bits(after[~in_use]), bits(old[~in_use])), "spare block written"
        else:
            after_logical, old_logical = after, old
        expected = recomputed(step, layer, heads, dim, dtype)
        valid = slots < new_lens.long()[:, None]
        valid = valid[:, None, :, None].expand_as(expected)
        assert torch.equal(bits(after_logical)[valid], bits(expected)[valid]), \
            f"{impl}: tensor {layer} differs from the recomputed cache below the new length"
        # Only the destinations of the moves are written: the rest keeps its bytes.
        kept = ~moved.expand_as(expected)
        assert torch.equal(bits(after_logical)[kept], bits(old_logical)[kept]), \
            f"{impl}: tensor {layer}: a slot outside cache_lens+1..new_len-1 changed"
    return step


IMPLS = ["reference", "kernels", pytest.param("triton", marks=needs_triton)]


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_commit_equals_recompute(impl, paged, dtype):
    step = check_commit(impl, batch=6, heads=2, dim=8, num_nodes=7, num_tensors=4, dtype=dtype,
                        paged=paged, seed=0)
    assert step["num_accepted"].max() >= 2  # some rows move (seed 0 draws deep walks)


@settings(max_examples=100)
@given(batch=st.integers(1, 5), heads=st.integers(1, 3), dim=st.integers(1, 9),
       num_nodes=st.integers(1, 9), num_tensors=st.integers(1, 3), dtype=st.sampled_from(DTYPES),
       paged=st.booleans(), block_size=st.integers(1, 5), spare=st.integers(0, 4),
       seed=st.integers(0, 2**31))
def test_commit_equals_recompute_hypothesis(batch, heads, dim, num_nodes, num_tensors, dtype,
                                            paged, block_size, spare, seed):
    for impl in ("reference", "kernels"):
        check_commit(impl, batch, heads, dim, num_nodes, num_tensors, dtype, paged, seed,
                     block_size, spare)


@needs_triton
@settings(max_examples=30)
@given(batch=st.integers(1, 3), heads=st.integers(1, 2), dim=st.sampled_from([1, 3, 8]),
       num_nodes=st.integers(1, 6), dtype=st.sampled_from(DTYPES), paged=st.booleans(),
       seed=st.integers(0, 2**31))
def test_triton_commit_equals_recompute_hypothesis(batch, heads, dim, num_nodes, dtype, paged,
                                                   seed):
    check_commit("triton", batch, heads, dim, num_nodes, 2, dtype, paged, seed)


@pytest.mark.parametrize("impl", IMPLS)
@pytest.mark.parametrize("paged", [False, True])
def test_overlapping_moves_literal(impl, paged):
    """path [2, 3, 5]: move 1 writes slot L+2, which move 0 reads; move 2 writes slot L+3,
    which move 1 reads. Slot s holds the value 100*row + s, D = 1."""
    lens = torch.tensor([1, 0, 2], dtype=torch.int32)
    path = torch.tensor([[2, 3, 5, -1, -1, -1], [1, 2, 3, -1, -1, -1], [4, -1, -1, -1, -1, -1]],
                        dtype=torch.int32)
    num_accepted = torch.tensor([3, 3, 1], dtype=torch.int32)
    logical = (torch.arange(3)[:, None] * 100 + torch.arange(9)).float().reshape(3, 1, 9, 1)
    expected = [[0, 1, 3, 4, 6, 5, 6, 7, 8],  # L=1: slots 2, 3, 4 <- 3, 4, 6
                [100, 101, 102, 103, 104, 105, 106, 107, 108],  # a chain moves nothing
                [200, 201, 202, 206, 204, 205, 206, 207, 208]]  # L=2: slot 3 <- 6
    kv = [logical.clone(), -logical]
    tables = None
    if paged:  # block_size 2, blocks in reverse order, one spare block
        tables = torch.tensor([[14, 13, 12, 11, 10], [9, 8, 7, 6, 5], [4, 3, 2, 1, 0]],
                              dtype=torch.int32)
        kv = [torch.zeros(16, 2, 1, 1) - 1 for _ in kv]
        for t, src in zip(kv, (logical, -logical)):
            for b in range(3):
                for s in range(9):
                    t[tables[b, s // 2], s % 2] = src[b, 0, s]
    new_lens = commit(impl, kv, lens, path, num_accepted, tables)
    assert new_lens.tolist() == [5, 4, 4]
    for sign, t in zip((1, -1), kv):
        if paged:
            got = [[float(t[tables[b, s // 2], s % 2]) for s in range(9)] for b in range(3)]
            assert float(t[15].sum()) == -2  # spare block untouched
        else:
            got = t[:, 0, :, 0].tolist()
        assert got == [[sign * v for v in row] for row in expected]


@pytest.mark.parametrize("impl", IMPLS)
def test_strided_views_and_no_rows(impl):
    """kv tensors that are views of one buffer (K and V interleaved per block, vLLM/FlashInfer
    style) with non-trivial strides; and B = 0."""
    g = torch.Generator().manual_seed(5)
    buffer = torch.randn(2, 6, 2, 4, 3, 5, generator=g)  # [layers, blocks, K/V, bs, Hkv, D]
    kv = [buffer[layer, :, which] for layer in range(2) for which in range(2)]
    tables = torch.tensor([[5, 0], [2, 3]], dtype=torch.int32)
    lens = torch.tensor([1, 2], dtype=torch.int32)
    path = torch.tensor([[2, 4, -1, -1, -1], [3, -1, -1, -1, -1]], dtype=torch.int32)
    num_accepted = torch.tensor([2, 1], dtype=torch.int32)
    expected = [t.clone() for t in kv]
    kv_commit_ref(expected, lens, path, num_accepted, tables)
    commit(impl, kv, lens, path, num_accepted, tables)
    for got, want in zip(kv, expected):
        assert torch.equal(got, want)
    empty = [torch.zeros(0, 2, 4, 3)]
    none = torch.zeros(0, dtype=torch.int32)
    assert commit(impl, empty, none, torch.zeros(0, 3, dtype=torch.int32), none).shape == (0,)


# ---------------------------------------------------------- checks off: every backend agrees


def garbage_inputs(g, paged):
    batch, num_nodes, capacity, block_size = 5, 6, 10, 3
    lens = torch.randint(-4, capacity + 4, (batch,), generator=g, dtype=torch.int32)
    path = torch.randint(-3, num_nodes + 4, (batch, num_nodes), generator=g, dtype=torch.int32)
    num_accepted = torch.randint(-2, num_nodes + 3, (batch,), generator=g, dtype=torch.int32)
    kv = [torch.randn(batch, 2, capacity, 3, generator=g) for _ in range(2)]
    tables = None
    if paged:
        max_blocks = 4
        num_blocks = batch * max_blocks
        tables = torch.randperm(num_blocks, generator=g).reshape(batch, max_blocks).to(torch.int32)
        spoil = torch.rand(batch, max_blocks, generator=g) < 0.3
        tables = torch.where(spoil, torch.tensor([-1, num_blocks, 2**31 - 1])[
            torch.randint(0, 3, (batch, max_blocks), generator=g)].to(torch.int32), tables)
        kv = [torch.randn(num_blocks, block_size, 2, 3, generator=g) for _ in range(2)]
    return kv, lens, path, num_accepted, tables


@pytest.mark.parametrize("paged", [False, True])
def test_checks_off_bad_values_give_the_reference_bytes(checks, paged):
    """With checks off, garbage lengths, paths and block tables never reach out of bounds and
    every backend gives the reference's bytes (all reads before any write, out-of-range moves
    skipped). The in-range block ids are distinct, so no two rows share a slot."""
    checks("off")
    g = torch.Generator().manual_seed(11)
    impls = ["kernels"] + (["triton"] if TRITON else [])
    for _ in range(8):
        kv, lens, path, num_accepted, tables = garbage_inputs(g, paged)
        expected = [t.clone() for t in kv]
        expected_lens = kv_commit_ref(expected, lens, path, num_accepted, tables)
        for impl in impls:
            got = [t.clone() for t in kv]
            assert torch.equal(commit(impl, got, lens, path, num_accepted, tables),
                               expected_lens)
            for a, b in zip(got, expected):
                assert torch.equal(a, b), impl


# ------------------------------------------------------------------------------- bad input


def _good(paged=False):
    g = torch.Generator().manual_seed(3)
    kv = [torch.randn(2, 2, 8, 4, generator=g) for _ in range(3)]
    args = dict(kv=kv, cache_lens=torch.tensor([1, 3], dtype=torch.int32),
                path=torch.tensor([[2, 3, -1, -1], [1, -1, -1, -1]], dtype=torch.int32),
                num_accepted=torch.tensor([2, 1], dtype=torch.int32), block_tables=None)
    if paged:
        args["kv"] = [torch.randn(6, 4, 2, 4, generator=g) for _ in range(3)]
        args["block_tables"] = torch.tensor([[0, 1, -1], [2, 3, 4]], dtype=torch.int32)
    return args


def _replace(args, name, value):
    args = dict(args)
    if name.startswith("kv["):
        args["kv"] = list(args["kv"])
        args["kv"][int(name[3])] = value(args)
    else:
        args[name] = value(args)
    return args


STRUCTURAL = [
    ("kv", lambda a: a["kv"][0], TypeError, False),
    ("kv", lambda a: [], ValueError, False),
    ("kv[0]", lambda a: a["kv"][0].double(), TypeError, False),
    ("kv[0]", lambda a: a["kv"][0].int(), TypeError, False),
    ("kv[1]", lambda a: a["kv"][1].half(), TypeError, False),
    ("kv[1]", lambda a: a["kv"][1][:, :, :7], ValueError, False),
    ("kv[2]", lambda a: a["kv"][2].transpose(1, 2).contiguous().transpose(1, 2), ValueError,
     False),
    ("kv[2]", lambda a: a["kv"][0], ValueError, False),  # the same tensor twice
    ("kv[0]", lambda a: a["kv"][0][:1], ValueError, False),  # B mismatch (contiguous)
    ("path", lambda a: a["path"].long(), TypeError, False),
    ("path", lambda a: a["path"][0], ValueError, False),
    ("path", lambda a: a["path"][:, :0], ValueError, False),
    ("num_accepted", lambda a: a["num_accepted"][:1], ValueError, False),
    ("cache_lens", lambda a: a["cache_lens"].long(), TypeError, False),
    ("cache_lens", lambda a: a["cache_lens"].to("meta"), ValueError, False),
    ("block_tables", lambda a: a["block_tables"].long(), TypeError, True),
    ("block_tables", lambda a: a["block_tables"][:1], ValueError, True),
]


@pytest.mark.parametrize("backend", ["kernels", "reference"])
@pytest.mark.parametrize("name, value, error, paged", STRUCTURAL)
def test_wrong_dtype_shape_device_names_the_argument(checks, backend, name, value, error, paged):
    for level in ("off", "cheap", "full"):
        checks(level)
        args = _replace(_good(paged), name, value)
        with specops.use_backend(backend), pytest.raises(error, match=name.replace("[", r"\[")):
            specops.kv_commit(**args)


BAD_VALUES = [  # (the argument the error names, overrides of _good(paged), paged)
    ("cache_lens", dict(cache_lens=[-1, 3]), False),
    ("num_accepted", dict(num_accepted=[2, 4]), False),  # > T-1 = 3
    ("num_accepted", dict(num_accepted=[-1, 1]), False),
    ("cache_lens", dict(cache_lens=[1, 7]), False),  # 7 + 1 + 1 > S = 8
    ("path", dict(path=[[3, 2, -1, -1], [1, -1, -1, -1]]), False),  # not increasing
    ("path", dict(path=[[0, 3, -1, -1], [1, -1, -1, -1]]), False),  # the root
    ("path", dict(path=[[2, 4, -1, -1], [1, -1, -1, -1]]), False),  # >= T
    # 6 + 1 + 1 <= S, but node 2's slot 6 + 2 is outside the cache
    ("path", dict(cache_lens=[1, 6], path=[[2, 3, -1, -1], [2, -1, -1, -1]]), False),
    ("block_tables", dict(block_tables=[[0, 6, -1], [2, 3, 4]]), True),  # 6 = num_blocks
    ("block_tables", dict(block_tables=[[0, 1, -1], [2, -1, 4]]), True),
]


@pytest.mark.parametrize("backend", ["kernels", "reference"])
@pytest.mark.parametrize("name, overrides, paged", BAD_VALUES)
def test_bad_values_raise_before_any_write(checks, backend, name, overrides, paged):
    args = _good(paged)
    args.update({k: torch.tensor(v, dtype=torch.int32) for k, v in overrides.items()})
    before = [t.clone() for t in args["kv"]]
    for level in ("cheap", "full"):
        checks(level)
        with specops.use_backend(backend), pytest.raises(ValueError, match=name):
            specops.kv_commit(**args)
        for t, old in zip(args["kv"], before):
            assert torch.equal(t, old), "a failed check wrote to the cache"
    checks("off")  # no error, the reference's documented bytes
    expected = [t.clone() for t in before]
    expected_lens = kv_commit_ref(expected, args["cache_lens"], args["path"],
                                  args["num_accepted"], args["block_tables"])
    with specops.use_backend(backend):
        assert torch.equal(specops.kv_commit(**args), expected_lens)
    for t, want in zip(args["kv"], expected):
        assert torch.equal(t, want)


@pytest.mark.parametrize("backend", ["kernels", "reference"])
@pytest.mark.parametrize("paged", [False, True])
def test_good_inputs_pass_every_level(checks, backend, paged):
    """The control for the cases above; paged, the unused table entries hold -1."""
    for level in ("cheap", "full"):
        checks(level)
        args = _good(paged)
        with specops.use_backend(backend):
            assert specops.kv_commit(**args).tolist() == [4, 5]


# ------------------------------------------------------------------------------- kv_write


@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("dtype", DTYPES)
def test_kv_write_then_commit_equals_recompute(paged, dtype):
    """kv_write puts node i at slot cache_lens + i; with kv_commit it rebuilds the
    recomputed cache from the tree step's entries alone."""
    g = torch.Generator().manual_seed(7)
    batch, heads, dim, num_nodes, capacity = 4, 2, 5, 6, 12
    step = random_tree_step(g, batch, num_nodes, capacity)
    full = caches_before(step, 2, heads, dim, capacity, dtype, g)
    lens = step["cache_lens"].long()
    prefix_only = []
    for cache in full:  # the cache before the step: the tree slots hold garbage
        stale = cache.clone()
        slots = torch.arange(capacity)[None, :]
        in_tree = (slots >= lens[:, None]) & (slots < lens[:, None] + num_nodes)
        stale[in_tree[:, None, :, None].expand_as(stale)] = 99
        prefix_only.append(stale)
    new = [torch.stack([c[b, :, int(lens[b]):int(lens[b]) + num_nodes] for b in range(batch)])
           for c in full]
    tables = None
    kv = prefix_only
    if paged:
        kv, tables = to_paged(prefix_only, g, 4)
    for cache, entries_ in zip(kv, new):
        specops.kv_write(cache, entries_, step["cache_lens"], tables)
    got = [from_paged(c, tables, capacity) if paged else c for c in kv]
    for a, b in zip(got, full):
        assert torch.equal(bits(a), bits(b))
    new_lens = specops.kv_commit(kv, step["cache_lens"], step["path"], step["num_accepted"],
                                 tables)
    for layer, cache in enumerate(kv):
        logical = from_paged(cache, tables, capacity) if paged else cache
        expected = recomputed(step, layer, heads, dim, dtype)
        for b in range(batch):
            n = int(new_lens[b])
            assert torch.equal(bits(logical[b, :, :n]), bits(expected[b, :, :n]))


def test_kv_write_checks_and_dropped_writes(checks):
    cache = torch.zeros(2, 1, 6, 2)
    new = torch.ones(2, 1, 3, 2)
    with pytest.raises(ValueError, match="cache_lens"):
        specops.kv_write(cache, new, torch.tensor([0, 4], dtype=torch.int32))
    assert not cache.any()
    with pytest.raises(TypeError, match="new_entries"):
        specops.kv_write(cache, new.half(), torch.tensor([0, 1], dtype=torch.int32))
    with pytest.raises(ValueError, match="new_entries"):
        specops.kv_write(cache, new[:, :, :, :1], torch.tensor([0, 1], dtype=torch.int32))
    paged = torch.zeros(4, 2, 1, 2)
    with pytest.raises(ValueError, match="block_tables"):
        specops.kv_write(paged, new, torch.tensor([0, 1], dtype=torch.int32),
                         torch.tensor([[0, 5, -1], [2, 3, -1]], dtype=torch.int32))
    assert not paged.any()
    checks("off")  # out-of-range entries are dropped, the others written
    specops.kv_write(cache, new * 3, torch.tensor([-1, 4], dtype=torch.int32))
    assert cache[0, 0, :, 0].tolist() == [3, 3, 0, 0, 0, 0]
    assert cache[1, 0, :, 0].tolist() == [0, 0, 0, 0, 3, 3]
    specops.kv_write(paged, new * 2, torch.tensor([0, 1], dtype=torch.int32),
                     torch.tensor([[0, 9, -1], [2, 3, -1]], dtype=torch.int32))
    # row 0: slots 0, 1 in block 0, slot 2 in block 9 (dropped); row 1: slots 1, 2, 3
    assert paged[:, :, 0, 0].tolist() == [[2, 2], [0, 0], [0, 2], [2, 2]]
    specops.kv_write(cache, new * 5, torch.tensor([9, 7], dtype=torch.int32))  # nothing valid
    assert cache[:, 0, :, 0].tolist() == [[3, 3, 0, 0, 0, 0], [0, 0, 0, 0, 3, 3]]
    checks("cheap")
    specops.kv_write(cache, new[:, :, :0], torch.tensor([6, 0], dtype=torch.int32))  # T = 0
    assert cache[:, 0, :, 0].tolist() == [[3, 3, 0, 0, 0, 0], [0, 0, 0, 0, 3, 3]]


@settings(max_examples=60, deadline=None)
@given(data=st.data())
def test_slot_writer_writes_what_kv_write_writes(data):
    """KVSlotWriter (the model forward's kv_write for every layer, index work once) and
    kv_write (a one-write KVSlotWriter) leave the bytes of the reference's slot_index +
    masked_index_put_, in range or not (checks off: out-of-range entries dropped),
    contiguous or paged, for several tensors written at the same slots."""
    batch = data.draw(st.integers(1, 3), "batch")
    heads, dim = data.draw(st.integers(1, 2), "heads"), data.draw(st.integers(1, 3), "dim")
    num_new = data.draw(st.integers(1, 4), "num_new")
    paged = data.draw(st.booleans(), "paged")
    g = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), "seed"))
    if paged:
        block_size, max_blocks = data.draw(st.integers(1, 3)), data.draw(st.integers(1, 4))
        num_blocks = data.draw(st.integers(1, 6), "num_blocks")
        shape = (num_blocks, block_size, heads, dim)
        capacity = block_size * max_blocks
        tables = torch.randint(-1, num_blocks + 1, (batch, max_blocks), generator=g,
                               dtype=torch.int32)
    else:
        capacity = data.draw(st.integers(1, 8), "capacity")
        shape, tables = (batch, heads, capacity, dim), None
    lens = torch.tensor(data.draw(st.lists(st.integers(-2, capacity + 1), min_size=batch,
                                           max_size=batch)), dtype=torch.int32)
    caches = [torch.randn(shape, generator=g) for _ in range(3)]
    news = [torch.randn(batch, heads, num_new, dim, generator=g) for _ in range(3)]
    expected = [c.clone() for c in caches]
    through_kv_write = [c.clone() for c in caches]
    before = specops.get_checks()
    specops.set_checks("off")
    try:
        for cache, new in zip(expected, news):   # the reference's composition (the spec)
            slots = lens.long()[:, None] + torch.arange(num_new)
            index, valid = slot_index(cache, slots, tables)
            masked_index_put_(slot_view(cache, tables is not None),
                              (index[0].flatten(), index[1].flatten()),
                              new.transpose(1, 2).reshape(-1, heads, dim), valid.flatten())
        for cache, new in zip(through_kv_write, news):
            specops.kv_write(cache, new, lens, tables)
        writer = specops.kv_ops.KVSlotWriter(caches[0], lens, num_new, tables)
        for cache, new in zip(caches, news):
            writer.write(cache, new)
    finally:
        specops.set_checks(before)
    for got, via_kv_write, want in zip(caches, through_kv_write, expected):
        assert torch.equal(got.view(torch.int32), want.view(torch.int32))
        assert torch.equal(via_kv_write.view(torch.int32), want.view(torch.int32))


def test_slot_writer_checks_values_once(checks):
    cache, new = torch.zeros(2, 1, 6, 2), torch.ones(2, 1, 3, 2)
    writer = specops.kv_ops.KVSlotWriter(cache, torch.tensor([0, 4], dtype=torch.int32), 3)
    with pytest.raises(ValueError, match="cache_lens"):   # 4 + 3 > 6, as kv_write says
        writer.write(cache, new)
    assert not cache.any()
    with pytest.raises(TypeError, match="new_entries"):
        writer.write(cache, new.half())


# ------------------------------------------------------------ registration: opcheck, compile


def _op_samples():
    g = torch.Generator().manual_seed(9)
    samples = []
    for paged in (False, True):
        step = random_tree_step(g, 3, 5, 9)
        logical = caches_before(step, 2, 2, 4, 9, torch.bfloat16, g)
        kv, tables = to_paged(logical, g, 4) if paged else (logical, None)
        samples.append((kv, step["cache_lens"], step["path"], step["num_accepted"], tables))
    return samples


def test_opcheck():
    for args in _op_samples():
        torch.library.opcheck(torch.ops.specops.kv_commit.default, args)


@pytest.mark.parametrize("backend", ["kernels", "reference"])
def test_compile_fullgraph_matches_eager(backend):
    """A decode step's cache bookkeeping: write the tree's entries, commit the path."""
    g = torch.Generator().manual_seed(4)
    step = random_tree_step(g, 3, 5, 10)
    logical = caches_before(step, 2, 2, 4, 10, torch.float32, g)
    new = [torch.randn(3, 2, 5, 4, generator=g) for _ in logical]

    def decode_step(kv, new, cache_lens, path, num_accepted):
        for cache, entries_ in zip(kv, new):
            specops.kv_write(cache, entries_, cache_lens)
        return specops.kv_commit(kv, cache_lens, path, num_accepted)

    args = (step["cache_lens"], step["path"], step["num_accepted"])
    eager_kv = [c.clone() for c in logical]
    compiled_kv = [c.clone() for c in logical]
    with specops.use_backend(backend):
        eager = decode_step(eager_kv, new, *args)
        compiled = torch.compile(decode_step, fullgraph=True)(compiled_kv, new, *args)
    assert torch.equal(compiled, eager)
    for a, b in zip(compiled_kv, eager_kv):
        assert torch.equal(a, b)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("paged", [False, True])
def test_cuda_graph_capture_and_replay(paged):
    """Captured once, replayed on new lengths, paths and cache contents in the same tensors."""
    g = torch.Generator().manual_seed(6)
    batch, heads, dim, num_nodes, capacity = 4, 2, 64, 6, 12
    step = random_tree_step(g, batch, num_nodes, capacity)
    logical = caches_before(step, 4, heads, dim, capacity, torch.bfloat16, g)
    kv, tables = to_paged(logical, g, 4) if paged else (logical, None)
    kv = [t.cuda() for t in kv]
    static = {k: step[k].cuda() for k in ("cache_lens", "path", "num_accepted")}
    gpu_tables = tables.cuda() if paged else None
    specops.kv_commit(kv, **static, block_tables=gpu_tables)  # warm-up: JIT, pointer table
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = specops.kv_commit(kv, **static, block_tables=gpu_tables)
    for trial in range(3):
        fresh = random_tree_step(g, batch, num_nodes, capacity)
        for name, t in static.items():
            t.copy_(fresh[name])
        logical = caches_before(fresh, 4, heads, dim, capacity, torch.bfloat16, g)
        for t, cache in zip(kv, logical):
            if paged:
                host = t.cpu()
                fill_paged(host, cache, tables)
                cache = host
            t.copy_(cache)
        expected = [t.cpu() for t in kv]
        expected_lens = kv_commit_ref(expected, fresh["cache_lens"], fresh["path"],
                                      fresh["num_accepted"], tables)
        graph.replay()
        torch.cuda.synchronize()
        assert torch.equal(out.cpu(), expected_lens), f"replay {trial}"
        for t, want in zip(kv, expected):
            assert torch.equal(t.cpu(), want), f"replay {trial}"


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
def test_cuda_checks_values_only_at_full(checks):
    """On a GPU, values are checked only at "full" (a sync), before any write; at "cheap"
    the kernel runs as with checks off and gives the reference's bytes."""
    args = _good(paged=True)
    args["path"] = torch.tensor([[3, 2, -1, -1], [1, -1, -1, -1]], dtype=torch.int32)
    expected = [t.clone() for t in args["kv"]]
    kv_commit_ref(expected, args["cache_lens"], args["path"], args["num_accepted"],
                  args["block_tables"])
    gpu = {k: ([t.cuda() for t in v] if k == "kv" else v.cuda()) for k, v in args.items()}
    checks("full")
    with pytest.raises(ValueError, match="path"):
        specops.kv_commit(**gpu)
    for t, old in zip(gpu["kv"], args["kv"]):
        assert torch.equal(t.cpu(), old)
    checks("cheap")
    specops.kv_commit(**gpu)
    for t, want in zip(gpu["kv"], expected):
        assert torch.equal(t.cpu(), want)


@needs_triton
def test_pointer_table_cache():
    kv = [torch.zeros(2, 1, 4, 2) for _ in range(3)]
    table = kv_triton.kv_pointer_table(kv)
    assert table.tolist() == [t.data_ptr() for t in kv]
    assert kv_triton.kv_pointer_table(kv) is table
    assert kv_triton.kv_pointer_table(kv[::-1]).tolist() == table.tolist()[::-1]


def test_docstring_examples():
    results = doctest.testmod(specops.kv_ops, extraglobs={"specops": specops, "torch": torch},
                              optionflags=doctest.NORMALIZE_WHITESPACE)
    assert results.attempted >= 4 and results.failed == 0


_COMPILE_FOR_HOPPER = textwrap.dedent("""
    import triton
    import triton.language as tl
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from specops.triton_kernels import kv

    fn = kv._kv_commit_kernel
    types = dict(kv_ptrs_ptr="*i64", cache_lens_ptr="*i32", path_ptr="*i32",
                 num_accepted_ptr="*i32", block_tables_ptr="*i32", new_lens_ptr="*i32")
    for paged, elem, vec, even in ((True, tl.int16, 8, True), (False, tl.int32, 1, False)):
        consts = dict(PAGED=paged, ELEM=elem, BLOCK_T=8, BLOCK_E=512, VEC=vec, EVEN_E=even)
        signature = {n: types.get(n, "constexpr" if n in consts else "i64") for n in fn.arg_names}
        triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts),
                       target=GPUTarget("cuda", 90, 32))
    print("compiled")
""")


@pytest.mark.skipif(CUDA or not TRITON, reason="on a GPU the other tests compile the kernel")
def test_kernel_compiles_for_hopper():
    """The kernel compiles to an sm_90 cubin (Triton's own ptxas, no GPU needed)."""
    assert_compiles_for_hopper(_COMPILE_FOR_HOPPER, timeout=300)
