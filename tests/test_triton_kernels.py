"""The Triton kernels (specops/triton_kernels/) against the reference, the executable spec.

Without a GPU the kernels run in Triton's interpreter on CPU tensors (tens of ms per program),
so these tests use small vocabularies with small chunks/blocks to hit the tile edges; with a
GPU the same tests run natively on CUDA tensors, plus the large-vocabulary ones.
"""

import os
import textwrap

import pytest
import torch
from helpers import assert_compiles_for_hopper

# Must happen before triton is imported (it decides at import, for its own tl.min etc. too),
# so before specops, whose package __init__ may import specops.triton_kernels.
if not torch.cuda.is_available():
    os.environ.setdefault("TRITON_INTERPRET", "1")

triton = pytest.importorskip("triton", reason="the Triton kernels need `pip install triton`")
import triton.language as tl  # noqa: E402
from triton.runtime.interpreter import InterpretedFunction  # noqa: E402
from hypothesis import given, settings  # noqa: E402
from hypothesis import strategies as st  # noqa: E402

from specops.reference import (  # noqa: E402
    chain_verify_greedy_ref,
    chain_verify_ref,
    sampling_probs_ref,
)
from specops.reference.random import PURPOSE_ACCEPT, PURPOSE_DRAW, uniform  # noqa: E402

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if not CUDA and not INTERPRET:
    pytest.skip("no GPU and TRITON_INTERPRET=0: the Triton kernels cannot run",
                allow_module_level=True)

from specops.triton_kernels import chain, philox, sampling  # noqa: E402

if INTERPRET and not isinstance(chain._chain_verify_draw_kernel, InterpretedFunction):
    pytest.skip("triton was imported before TRITON_INTERPRET=1 was set (no GPU): run with "
                "TRITON_INTERPRET=1 in the environment", allow_module_level=True)

philox4x32_10 = philox.philox4x32_10
philox_uniform = philox.philox_uniform
chain_verify_triton = chain.chain_verify_triton
chain_verify_greedy_triton = chain.chain_verify_greedy_triton
sampling_probs_triton = sampling.sampling_probs_triton

# inf - inf in deliberately bad rows.
pytestmark = pytest.mark.filterwarnings("ignore:invalid value encountered:RuntimeWarning")
INF, NAN = float("inf"), float("nan")


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


# ----------------------------------------------------------------------------------- Philox


@triton.jit
def _philox_words_kernel(
    counters_ptr,  # [N, 4] int64 holding uint32 values
    keys_ptr,  # [N, 2] int64 holding uint32 values
    out_ptr,  # [N, 4] int64, out
):
    i = tl.program_id(0)
    c = counters_ptr + 4 * i
    k = keys_ptr + 2 * i
    x0, x1, x2, x3 = philox4x32_10(
        tl.load(c).to(tl.uint32), tl.load(c + 1).to(tl.uint32), tl.load(c + 2).to(tl.uint32),
        tl.load(c + 3).to(tl.uint32), tl.load(k).to(tl.uint32), tl.load(k + 1).to(tl.uint32))
    tl.store(out_ptr + 4 * i, x0.to(tl.int64))
    tl.store(out_ptr + 4 * i + 1, x1.to(tl.int64))
    tl.store(out_ptr + 4 * i + 2, x2.to(tl.int64))
    tl.store(out_ptr + 4 * i + 3, x3.to(tl.int64))


@triton.jit
def _philox_uniform_kernel(
    seeds_ptr,  # [N] int64
    positions_ptr,  # [N] int64
    out_ptr,  # [N] float32, out
    n,
    SIBLING_RANK: tl.constexpr, PURPOSE: tl.constexpr, BLOCK: tl.constexpr,
):
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < n
    u = philox_uniform(tl.load(seeds_ptr + offs, mask=mask, other=0),
                              tl.load(positions_ptr + offs, mask=mask, other=0),
                              SIBLING_RANK, PURPOSE)
    tl.store(out_ptr + offs, u, mask=mask)


def test_philox_known_answers():
    """The three Random123 known-answer vectors of Philox4x32-10."""
    counters = [[0, 0, 0, 0], [0xFFFFFFFF] * 4, [0x243F6A88, 0x85A308D3, 0x13198A2E, 0x03707344]]
    keys = [[0, 0], [0xFFFFFFFF] * 2, [0xA4093822, 0x299F31D0]]
    expected = [[0x6627E8D5, 0xE169C58D, 0xBC57AC4C, 0x9B00DBD8],
                [0x408F276D, 0x41C83B0E, 0xA20BC7C6, 0x6D5451FD],
                [0xD16CFE09, 0x94FDCCEB, 0x5001E420, 0x24126EA1]]
    out = torch.empty(3, 4, dtype=torch.int64, device=DEVICE)
    _philox_words_kernel[(3,)](torch.tensor(counters, device=DEVICE),
                               torch.tensor(keys, device=DEVICE), out)
    assert out.tolist() == expected


@pytest.mark.parametrize("sibling_rank, purpose", [(0, PURPOSE_ACCEPT), (0, PURPOSE_DRAW),
                                                    (3, PURPOSE_ACCEPT)])
def test_philox_uniform_equals_reference(sibling_rank, purpose):
    gen = torch.Generator().manual_seed(7 + purpose + sibling_rank)
    n = 4096 if CUDA else 300
    seeds = torch.randint(-2**63, 2**63 - 1, (n,), generator=gen)
    positions = torch.randint(-2**63, 2**63 - 1, (n,), generator=gen)
    positions[:4] = torch.tensor([0, 2**32 - 1, 2**32, -1])  # the 32-bit carry and the sign
    out = torch.empty(n, device=DEVICE)
    _philox_uniform_kernel[(triton.cdiv(n, 256),)](seeds.to(DEVICE), positions.to(DEVICE), out,
                                                    n, sibling_rank, purpose, BLOCK=256)
    assert_same(out, uniform(seeds, positions, sibling_rank, purpose), "u")


# ------------------------------------------------------------------------------ chain_verify


def test_chain_verify_literal():
    """One-hot target rows (argmax [1, 5, 3, 4]), draft [1, 2, 3]: 1 accepted, then 5."""
    target = torch.nn.functional.one_hot(torch.tensor([[1, 5, 3, 4]]), 8).float()
    args = (target.to(DEVICE), torch.tensor([[1, 2, 3]], device=DEVICE), None,
            torch.tensor([3], dtype=torch.int32, device=DEVICE),
            torch.tensor([123], device=DEVICE), torch.tensor([40], device=DEVICE))
    tokens, num_accepted = chain_verify_triton(*args, chunk_size=4)
    assert tokens.tolist() == [[1, 5, -1, -1]] and num_accepted.tolist() == [1]
    tokens, num_accepted = chain_verify_triton(*args[:3], args[3] * 0 + 1, *args[4:],
                                               chunk_size=4)
    assert tokens.tolist() == [[1, 5, -1, -1]] and num_accepted.tolist() == [1]  # bonus token


def chain_inputs(batch, num_draft, vocab, gen, with_draft_probs, bad_rows=False):
    """Random chain inputs: target rows close to the draft rows and drafts sampled from q (from
    p without draft_probs), so runs of accepts happen; ragged lengths (one row below 0, one
    above K); full-range seeds; positions across the 32-bit carry. With ``bad_rows``, row b
    gets corruption b % 8 (tokens out of range, q(x) = 0, NaN/inf/negative p, zero rows,
    p == q, mass only on the last token)."""
    draft_logits = torch.randn(batch, num_draft + 1, vocab, generator=gen) * 3
    target_logits = draft_logits + torch.randn(draft_logits.shape, generator=gen) * 0.5
    target = target_logits.softmax(-1)
    draft = draft_logits[:, :num_draft].softmax(-1)
    sampled_from = draft if with_draft_probs else target[:, :num_draft]
    if num_draft:
        tokens = torch.multinomial(sampled_from.reshape(-1, vocab), 1, generator=gen)
        tokens = tokens.reshape(batch, num_draft)
    else:
        tokens = torch.zeros(batch, 0, dtype=torch.int64)
    lens = torch.randint(0, num_draft + 1, (batch,), generator=gen, dtype=torch.int32)
    lens[1::5] = -1
    lens[2::5] = num_draft + 1
    seeds = torch.randint(-2**63, 2**63 - 1, (batch,), generator=gen)
    positions = torch.randint(0, 2**40, (batch,), generator=gen)
    positions[::3] = 2**32 - 2
    if bad_rows:
        for b in range(batch):
            kind = b % 8
            if kind == 1 and num_draft:
                tokens[b, 0] = -1
                tokens[b, -1] = vocab
            elif kind == 2 and num_draft:
                draft[b, 0, tokens[b, 0]] = 0.0  # q(x) = 0: always rejected
            elif kind == 3:
                target[b, :, 0] = NAN
                target[b, :, -1] = INF if vocab > 1 else NAN
                target[b, :, vocab // 2] = -1.0
            elif kind == 4:
                target[b] = 0.0
            elif kind == 5 and num_draft:
                target[b, :num_draft] = draft[b]  # rejection only by u; residual may be empty
            elif kind == 6:
                target[b] = 0.0
                target[b, :, -1] = 1.0
            elif kind == 7:
                target[b, :, :-1] = 0.0  # one valid lane in the last chunk, rest masked
                target[b, :, -1] = 1e-30
    out = dict(target_probs=target, draft_tokens=tokens,
               draft_probs=draft if with_draft_probs else None, draft_lens=lens,
               seeds=seeds, positions=positions)
    return {k: (v.to(DEVICE) if v is not None else None) for k, v in out.items()}


def check_chain(inputs, chunk_size=None):
    tokens, num_accepted = chain_verify_triton(**inputs, chunk_size=chunk_size)
    expected_tokens, expected_num = chain_verify_ref(**inputs)
    assert_same(num_accepted, expected_num, "num_accepted")
    assert_same(tokens, expected_tokens, "tokens")
    vocab = inputs["target_probs"].shape[-1]
    drawn = tokens.gather(1, num_accepted.long()[:, None])
    assert ((drawn >= 0) & (drawn < vocab)).all()


@pytest.mark.parametrize("vocab", [1, 2, 7, 8, 9, 17])
@pytest.mark.parametrize("with_draft_probs", [True, False])
def test_chain_verify_tile_edges(vocab, with_draft_probs):
    """Chunks of 8 lanes: V = 1, 2, CHUNK - 1, CHUNK, CHUNK + 1, 2 * CHUNK + 1, bad rows."""
    gen = torch.Generator().manual_seed(vocab * 2 + with_draft_probs)
    for num_draft in (0, 3):
        check_chain(chain_inputs(8, num_draft, vocab, gen, with_draft_probs, bad_rows=True),
                    chunk_size=8)


@settings(max_examples=25 if not CUDA else 100, deadline=None)
@given(batch=st.integers(1, 4), num_draft=st.integers(0, 4), vocab=st.integers(1, 40),
       chunk_size=st.sampled_from([4, 16, 64]), with_draft_probs=st.booleans(),
       seed=st.integers(0, 2**31))
def test_chain_verify_hypothesis(batch, num_draft, vocab, chunk_size, with_draft_probs, seed):
    gen = torch.Generator().manual_seed(seed)
    check_chain(chain_inputs(batch, num_draft, vocab, gen, with_draft_probs), chunk_size)


@pytest.mark.skipif(not CUDA, reason="large vocabularies need a GPU")
@pytest.mark.parametrize("batch, num_draft, vocab", [(1, 0, 151936), (1, 8, 151936),
                                                     (32, 8, 128256), (64, 5, 151936)])
@pytest.mark.parametrize("with_draft_probs", [True, False])
def test_chain_verify_large(batch, num_draft, vocab, with_draft_probs):
    gen = torch.Generator().manual_seed(batch + num_draft)
    check_chain(chain_inputs(batch, num_draft, vocab, gen, with_draft_probs, bad_rows=True))


@pytest.mark.skipif(not CUDA, reason="CUDA graphs need a GPU")
def test_chain_verify_cuda_graph():
    gen = torch.Generator().manual_seed(3)
    inputs = chain_inputs(8, 4, 32000, gen, True)
    expected = chain_verify_triton(**inputs)  # compiles outside the capture
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        captured = chain_verify_triton(**inputs)
    graph.replay()
    assert_same(captured[0], expected[0], "tokens")
    inputs["seeds"] += 1
    graph.replay()
    assert_same(captured[0], chain_verify_ref(**inputs)[0], "tokens after new seeds")


# ----------------------------------------------------------------------- chain_verify_greedy


def test_chain_verify_greedy_literal():
    logits = torch.nn.functional.one_hot(torch.tensor([[1, 5, 3, 4]]), 8).float()
    tokens, num_accepted = chain_verify_greedy_triton(
        logits.to(DEVICE), torch.tensor([[1, 2, 3]], device=DEVICE),
        torch.tensor([3], dtype=torch.int32, device=DEVICE), chunk_size=4)
    assert tokens.tolist() == [[1, 5, -1, -1]] and num_accepted.tolist() == [1]


def greedy_inputs(batch, num_draft, vocab, dtype, gen):
    """Integer logits (ties everywhere), NaN in some rows, a row of -inf; drafts mostly equal
    to the argmax so that runs of accepts happen, some wrong or out of range."""
    logits = torch.randint(-3, 3, (batch, num_draft + 1, vocab), generator=gen).to(dtype)
    logits[0, 0] = -INF
    if vocab > 3:
        logits[1 % batch, 0, vocab - 1] = NAN
        logits[2 % batch, :, vocab // 2] = NAN
        logits[2 % batch, :, 1] = NAN
    argmax = logits.argmax(-1)
    tokens = argmax[:, :num_draft].clone()
    wrong = torch.rand(tokens.shape, generator=gen) < 0.2
    tokens = torch.where(wrong, torch.randint(-1, vocab + 1, tokens.shape, generator=gen), tokens)
    lens = torch.randint(-1, num_draft + 2, (batch,), generator=gen, dtype=torch.int32)
    return logits.to(DEVICE), tokens.to(DEVICE), lens.to(DEVICE)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@pytest.mark.parametrize("vocab", [1, 7, 8, 9])
def test_chain_verify_greedy_tile_edges(dtype, vocab):
    gen = torch.Generator().manual_seed(vocab)
    for num_draft in (0, 3):
        args = greedy_inputs(4, num_draft, vocab, dtype, gen)
        tokens, num_accepted = chain_verify_greedy_triton(*args, chunk_size=8)
        expected_tokens, expected_num = chain_verify_greedy_ref(*args)
        assert_same(num_accepted, expected_num, "num_accepted")
        assert_same(tokens, expected_tokens, "tokens")


@settings(max_examples=15 if not CUDA else 100, deadline=None)
@given(batch=st.integers(1, 4), num_draft=st.integers(0, 4), vocab=st.integers(1, 40),
       chunk_size=st.sampled_from([4, 16, 64]),
       dtype=st.sampled_from([torch.float32, torch.bfloat16, torch.float16]),
       seed=st.integers(0, 2**31))
def test_chain_verify_greedy_hypothesis(batch, num_draft, vocab, chunk_size, dtype, seed):
    args = greedy_inputs(batch, num_draft, vocab, dtype, torch.Generator().manual_seed(seed))
    tokens, num_accepted = chain_verify_greedy_triton(*args, chunk_size=chunk_size)
    expected_tokens, expected_num = chain_verify_greedy_ref(*args)
    assert_same(num_accepted, expected_num, "num_accepted")
    assert_same(tokens, expected_tokens, "tokens")


def test_chain_verify_greedy_masked_lanes_lose():
    """All-equal and all -inf rows: the first index wins, never a masked lane (ids >= V)."""
    for value in (0.0, -INF):
        logits = torch.full((1, 2, 9), value, device=DEVICE)
        tokens, _ = chain_verify_greedy_triton(logits, torch.tensor([[0]], device=DEVICE),
                                               torch.tensor([1], dtype=torch.int32,
                                                            device=DEVICE), chunk_size=8)
        assert tokens.tolist() == [[0, 0]]


@pytest.mark.skipif(not CUDA, reason="large vocabularies need a GPU")
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("batch, num_draft, vocab", [(1, 8, 151936), (32, 8, 128256)])
def test_chain_verify_greedy_large(dtype, batch, num_draft, vocab):
    gen = torch.Generator().manual_seed(batch)
    args = greedy_inputs(batch, num_draft, vocab, dtype, gen)
    tokens, num_accepted = chain_verify_greedy_triton(*args)
    expected_tokens, expected_num = chain_verify_greedy_ref(*args)
    assert_same(num_accepted, expected_num, "num_accepted")
    assert_same(tokens, expected_tokens, "tokens")


# ---------------------------------------------------------------------------- sampling_probs


def check_sampling(logits, temperature, top_k, top_p, block_size=None):
    args = [t.to(DEVICE) for t in (logits, temperature, top_k, top_p)]
    probs = sampling_probs_triton(*args, block_size=block_size)
    expected = sampling_probs_ref(*args)
    torch.testing.assert_close(probs, expected, atol=1e-6, rtol=0, equal_nan=True)
    assert_same(probs > 0, expected > 0, "kept tokens")


def test_sampling_probs_literal_rows():
    """Ties at the top-k and top-p cuts, -0.0, -inf, top_p <= 0, NaN/inf rows (all NaN)."""
    rows = [
        ([2.0, 2.0, 2.0, 1.0], 1.0, 2, 1.0),  # top-k ties keep more: [1/3, 1/3, 1/3, 0]
        ([2.0, 2.0, 2.0, 1.0], 1.0, 0, 0.5),  # top-p ties by lower id: [1/2, 1/2, 0, 0]
        ([0.0, -0.0, 0.0, -0.0], 1.0, 1, 0.3),  # -0.0 ties +0.0
        ([1.0, -INF, -INF, 0.5], 1.0, 3, 0.9),
        ([-INF, 1.0, -INF, 1.0], 0.5, -3, 0.5),  # k < 0: off
        ([5.0, 1.0, 1.0, 1.0], 1.0, 10, -0.5),  # k > V: off; top_p <= 0 keeps one
        ([2.0, 2.0, 2.0, 1.0], -1.0, 2, NAN),  # negative temperature; NaN top_p: off
        ([1.0, NAN, 2.0, 3.0], 1.0, 0, 0.5),
        ([1.0, INF, 2.0, 3.0], 1.0, 2, 1.0),
        ([-INF, -INF, -INF, -INF], 1.0, 0, 0.5),
        ([1.0, NAN, 3.0, 3.0], 0.0, 2, 0.5),  # greedy: NaN is the largest
        ([1.0, 3.0, 3.0, -INF], 0.0, 0, 1.0),  # greedy: first maximal index
    ]
    logits = torch.tensor([r[0] for r in rows])
    temperature = torch.tensor([r[1] for r in rows])
    top_k = torch.tensor([r[2] for r in rows], dtype=torch.int32)
    top_p = torch.tensor([r[3] for r in rows])
    check_sampling(logits, temperature, top_k, top_p, block_size=2)
    probs = sampling_probs_triton(logits.to(DEVICE), temperature.to(DEVICE), top_k.to(DEVICE),
                                  top_p.to(DEVICE))
    assert probs[0].tolist() == pytest.approx([1 / 3, 1 / 3, 1 / 3, 0.0])
    assert probs[1].tolist() == pytest.approx([0.5, 0.5, 0.0, 0.0])
    assert probs[10].tolist() == [0.0, 1.0, 0.0, 0.0] and probs[11].tolist() == [0, 1, 0, 0]


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_sampling_probs_tile_edges(dtype):
    """Blocks of 8 lanes, V = 1, 7, 8, 9, 17; integer logits for ties; every option mixed."""
    gen = torch.Generator().manual_seed(11)
    for vocab in (1, 7, 8, 9, 17):
        n = 6
        logits = (torch.randint(-4, 4, (n, vocab), generator=gen).float()
                  + torch.randn(n, vocab, generator=gen) * (torch.arange(n) % 2)[:, None])
        temperature = torch.tensor([0.0, 1.0, 0.7, 1.5, 1.0, 2.0])
        top_k = torch.tensor([3, 0, 2, 5, 1, 4], dtype=torch.int32)
        top_p = torch.tensor([0.5, 0.8, 1.0, 0.6, 0.9, 0.3])
        check_sampling(logits.to(dtype), temperature, top_k, top_p, block_size=8)


@settings(max_examples=15 if not CUDA else 100, deadline=None)
@given(num_rows=st.integers(1, 3), vocab=st.integers(1, 48), block_size=st.sampled_from([16, 64]),
       seed=st.integers(0, 2**31), ties=st.booleans())
def test_sampling_probs_hypothesis(num_rows, vocab, block_size, seed, ties):
    gen = torch.Generator().manual_seed(seed)
    logits = torch.randn(num_rows, vocab, generator=gen) * 3
    if ties:
        logits = logits.round()
    temperature = torch.rand(num_rows, generator=gen) * 2
    temperature[0] = 0.0 if seed % 3 == 0 else temperature[0]
    top_k = torch.randint(-1, vocab + 2, (num_rows,), generator=gen, dtype=torch.int32)
    top_p = torch.rand(num_rows, generator=gen) * 1.2
    check_sampling(logits, temperature, top_k, top_p, block_size)


@pytest.mark.skipif(not CUDA, reason="large vocabularies need a GPU")
def test_sampling_probs_large():
    gen = torch.Generator().manual_seed(5)
    n, vocab = 16, 151936
    logits = torch.randn(n, vocab, generator=gen) * 4
    logits[::4] = logits[::4].round()  # ties at the cuts
    temperature = torch.tensor([0.0, 0.6, 1.0, 1.3] * 4)
    top_k = torch.tensor([0, 50, 0, 1000] * 2 + [20, 0, 100000, 0] * 2, dtype=torch.int32)
    top_p = torch.tensor([1.0, 0.9, 0.95, 0.5] * 2 + [1.0, 0.8, 0.99, 0.3] * 2)
    check_sampling(logits, temperature, top_k, top_p)


# ------------------------------------------------------------------- compiles for the H100

_COMPILE_FOR_HOPPER = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from specops.triton_kernels import chain, sampling

    def build(fn, consts, options=None, **types):
        names = fn.arg_names
        signature = {n: types.get(n, "constexpr" if n in consts else "i32") for n in names}
        source = ASTSource(fn=fn, signature=signature, constexprs=consts)
        triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options or {})

    probs = dict(target_probs_ptr="*fp32", draft_tokens_ptr="*i64", draft_probs_ptr="*fp32",
                 draft_lens_ptr="*i32", seeds_ptr="*i64", positions_ptr="*i64",
                 num_accepted_ptr="*i32", chunk_mass_ptr="*fp64", tokens_ptr="*i64")
    for has in (True, False):
        build(chain._chain_verify_chunk_mass_kernel,
              dict(HAS_DRAFT_PROBS=has, BLOCK_K=8, CHUNK=4096), **probs)
        build(chain._chain_verify_draw_kernel,
              dict(HAS_DRAFT_PROBS=has, BLOCK_SLOTS=16, BLOCK_CHUNKS=64, CHUNK=4096), **probs)
    for dtype in ("*fp32", "*bf16", "*fp16"):
        build(chain._chain_verify_greedy_argmax_kernel, dict(CHUNK=4096), target_logits_ptr=dtype,
              draft_lens_ptr="*i32", chunk_max_ptr="*fp32", chunk_argmax_ptr="*i32")
        build(sampling._sampling_probs_kernel, dict(BLOCK=2048), dict(num_warps=8),
              logits_ptr=dtype, temperature_ptr="*fp32", top_k_ptr="*i32", top_p_ptr="*fp32",
              probs_ptr="*fp32")
    build(chain._chain_verify_greedy_accept_kernel, dict(BLOCK_SLOTS=16, BLOCK_CHUNKS=64),
          draft_tokens_ptr="*i64", draft_lens_ptr="*i32", chunk_max_ptr="*fp32",
          chunk_argmax_ptr="*i32", tokens_ptr="*i64", num_accepted_ptr="*i32")
    print("compiled")
""")


@pytest.mark.skipif(CUDA, reason="on a GPU the other tests compile and run every kernel")
def test_kernels_compile_for_hopper():
    """Every kernel compiles to an sm_90 cubin (Triton's own ptxas, no GPU needed), so code
    the interpreter accepts but the compiler rejects fails here rather than on a GPU."""
    assert_compiles_for_hopper(_COMPILE_FOR_HOPPER, timeout=600)
