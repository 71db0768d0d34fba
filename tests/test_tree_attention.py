"""tree_attention (contract, "Tree attention").

The reference against torch's scaled_dot_product_attention with an explicit ``[T, prefix + T]``
boolean mask; the C++ CPU kernel and the Triton kernel (under the interpreter without a GPU)
against the reference, on hypothesis-drawn shapes, ragged prefixes (0 included), random trees,
GQA ratios 1/2/4, head dims 64/128/others, contiguous and paged caches, every dtype (dtype ->
tolerance table below). Then a chain tree against ordinary causal attention, registration
(opcheck, torch.compile, CUDA graphs) and bad input.
"""

import doctest
import os
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st
from torch.nn.attention.bias import causal_lower_right
from helpers import assert_compiles_for_hopper

import specops
import specops.attention_ops
from specops.reference.attention import logical_cache_ref, tree_attention_ref
from specops.reference.tree import tree_metadata_ref

CUDA = torch.cuda.is_available()
DEVICES = ["cpu"] + (["cuda"] if CUDA else [])
DTYPES = [torch.float32, torch.bfloat16, torch.float16]
# dtype -> (atol, rtol): float32 accumulation everywhere, so the low-precision dtypes differ
# from the reference by about one rounding of the output (bf16: 8 bits, fp16: 11 bits).
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.bfloat16: (2e-2, 2e-2),
             torch.float16: (2e-3, 2e-3)}
OPS = torch.ops.specops


def assert_close(actual, expected, what: str = "out") -> None:
    """Within the dtype's tolerance; on failure prints the first mismatches (Liger style)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    atol, rtol = TOLERANCE[actual.dtype]
    a, e = actual.float().cpu(), expected.float().cpu()
    bad = ~torch.isclose(a, e, atol=atol, rtol=rtol)
    if bool(bad.any()):
        lines = [f"  at {tuple(i)}: got {a[tuple(i)]:.6g}, expected {e[tuple(i)]:.6g}"
                 for i in bad.nonzero()[:5].tolist()]
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} values outside "
                             f"atol={atol}, rtol={rtol}; max |diff| "
                             f"{(a - e).abs().nan_to_num(float('inf')).max():.3g}\n"
                             + "\n".join(lines))


# --------------------------------------------------------------------------------- inputs


def random_parents(batch: int, num_nodes: int, gen: torch.Generator) -> torch.Tensor:
    """[B, T] int32 random trees in topological order: parents[i] uniform in 0..i-1."""
    nodes = torch.arange(num_nodes)
    parents = (torch.rand(batch, num_nodes, generator=gen) * nodes).int()
    parents[:, 0] = -1
    return parents


def random_mask(batch: int, num_nodes: int, gen: torch.Generator, ragged: bool = True):
    """The tree mask of random trees; ragged: nodes past a random num_nodes have all-False
    rows (they attend to the prefix only, or to nothing when it is empty)."""
    parents = random_parents(batch, num_nodes, gen)
    used = torch.full((batch,), num_nodes, dtype=torch.int32)
    if ragged:
        used = torch.randint(1, num_nodes + 1, (batch,), generator=gen, dtype=torch.int32)
    return tree_metadata_ref(parents, used)[0]


def make_case(batch, num_nodes, num_heads, num_kv_heads, head_dim, dtype, gen, *, paged=False,
              block_size=16, max_prefix=70, spare=3, device="cpu", mask=None, cache_lens=None):
    """Inputs of one call; row 0 has an empty prefix (unless ``cache_lens`` [B] is given).
    Paged caches get shuffled blocks, -1 past the blocks a row uses, and spare blocks of
    noise."""
    if cache_lens is None:
        cache_lens = torch.randint(0, max_prefix + 1, (batch,), generator=gen, dtype=torch.int32)
        cache_lens[0] = 0
    capacity = int(cache_lens.max()) + num_nodes + spare
    q = torch.randn(batch, num_nodes, num_heads, head_dim, generator=gen).to(dtype)
    k = torch.randn(batch, num_kv_heads, capacity, head_dim, generator=gen).to(dtype)
    v = torch.randn(batch, num_kv_heads, capacity, head_dim, generator=gen).to(dtype)
    if mask is None:
        mask = random_mask(batch, num_nodes, gen)
    block_tables = None
    if paged:
        max_blocks = -(-capacity // block_size)
        num_blocks = batch * max_blocks + 3
        table = torch.randperm(num_blocks, generator=gen)[:batch * max_blocks]
        table = table.reshape(batch, max_blocks)
        pools = []
        for logical in (k, v):
            pool = torch.randn(num_blocks, block_size, num_kv_heads, head_dim,
                               generator=gen).to(dtype)
            padded = torch.zeros(batch, num_kv_heads, max_blocks * block_size, head_dim,
                                 dtype=dtype)
            padded[:, :, :capacity] = logical
            pool[table] = padded.transpose(1, 2).reshape(batch, max_blocks, block_size,
                                                         num_kv_heads, head_dim)
            pools.append(pool)
        k, v = pools
        used = torch.arange(max_blocks) * block_size < (cache_lens + num_nodes)[:, None]
        block_tables = torch.where(used, table, -1).int()
    case = dict(q=q, k_cache=k, v_cache=v, cache_lens=cache_lens, mask=mask, scale=None,
                block_tables=block_tables)
    return {name: t.to(device) if isinstance(t, torch.Tensor) else t for name, t in case.items()}


def args(case):
    return (case["q"], case["k_cache"], case["v_cache"], case["cache_lens"], case["mask"],
            case["scale"], case["block_tables"])


def sdpa_rows(case) -> torch.Tensor:
    """torch SDPA, one row at a time, over slots [0, prefix + T) with the explicit boolean
    mask [ones(T, prefix) | mask[b]] and kv heads repeated per group; float32."""
    q, mask, lens = case["q"].float(), case["mask"], case["cache_lens"]
    k = logical_cache_ref(case["k_cache"], case["block_tables"]).float()
    v = logical_cache_ref(case["v_cache"], case["block_tables"]).float()
    group = q.shape[2] // k.shape[1]
    outs = []
    for b in range(q.shape[0]):
        prefix, num_nodes = int(lens[b]), q.shape[1]
        allowed = torch.cat([mask.new_ones(num_nodes, prefix), mask[b]], dim=1)
        kb = k[b, :, :prefix + num_nodes].repeat_interleave(group, 0)
        vb = v[b, :, :prefix + num_nodes].repeat_interleave(group, 0)
        out = F.scaled_dot_product_attention(q[b].transpose(0, 1), kb, vb, attn_mask=allowed,
                                             scale=case["scale"]).transpose(0, 1)
        # SDPA leaves rows with no allowed slot undefined (NaN); the contract says zeros.
        outs.append(torch.where(allowed.any(-1)[:, None, None], out, 0.0))
    return torch.stack(outs)


SHAPES = st.fixed_dictionaries(dict(
    batch=st.integers(1, 3), num_nodes=st.integers(1, 40), group=st.sampled_from([1, 2, 4]),
    num_kv_heads=st.integers(1, 2), head_dim=st.sampled_from([64, 128, 8, 40, 80]),
    paged=st.booleans(), block_size=st.sampled_from([1, 7, 16, 32]),
    max_prefix=st.sampled_from([0, 31, 32, 33, 100]), seed=st.integers(0, 2**31 - 1)))


def case_from(shape, dtype, device="cpu"):
    gen = torch.Generator().manual_seed(shape["seed"])
    return make_case(shape["batch"], shape["num_nodes"], shape["group"] * shape["num_kv_heads"],
                     shape["num_kv_heads"], shape["head_dim"], dtype, gen, paged=shape["paged"],
                     block_size=shape["block_size"], max_prefix=shape["max_prefix"],
                     device=device)


# ------------------------------------------------------------------ reference against SDPA


@given(shape=SHAPES)
@settings(max_examples=30)
def test_reference_equals_sdpa_with_explicit_mask(shape):
    case = case_from(shape, torch.float32)
    assert_close(tree_attention_ref(*args(case)), sdpa_rows(case))


def test_reference_scale_and_low_precision_match_sdpa():
    gen = torch.Generator().manual_seed(1)
    for dtype in DTYPES:
        case = make_case(2, 6, 8, 2, 64, dtype, gen)
        case["scale"] = 0.3
        assert_close(tree_attention_ref(*args(case)), sdpa_rows(case).to(dtype))


# --------------------------------------------------------------- C++ kernel against reference


@given(shape=SHAPES, dtype=st.sampled_from(DTYPES))
def test_cpu_kernel_equals_reference(shape, dtype):
    case = case_from(shape, dtype)
    assert_close(OPS.tree_attention(*args(case)), tree_attention_ref(*args(case)))


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("head_dim", [64, 128, 96])
@pytest.mark.parametrize("group", [1, 2, 4])
def test_cpu_kernel_grid(dtype, paged, head_dim, group):
    """Every GQA ratio x head dim x layout x dtype, prefixes across the 32-slot blocks."""
    gen = torch.Generator().manual_seed(head_dim + group)
    case = make_case(3, 33, 2 * group, 2, head_dim, dtype, gen, paged=paged, max_prefix=65)
    assert_close(OPS.tree_attention(*args(case)), tree_attention_ref(*args(case)))


# The CPU kernel puts query rows across vector lanes (csrc/tree_attention_wide_cpu.h) from
# T * H / Hkv = 16 rows when head_dim % 8 == 0, in tiles of up to 128 rows padded to 32 lanes,
# over 64-slot blocks; below that, node tiles over 32-slot blocks.
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("paged", [False, True])
@pytest.mark.parametrize("num_nodes, group, head_dim", [
    (8, 4, 128),   # 32 rows: the 8B-model verification shape, one full tile
    (4, 4, 64),    # 16 rows: the smallest wide tile, half of its lanes padding
    (5, 3, 24),    # 15 rows: just below, node tiles
    (33, 4, 128),  # 132 rows: a 128-row tile and a 4-row one
    (20, 1, 40),   # group 1, a head dim of 5 tiles of 8
    (9, 2, 12),    # head dim not a multiple of 8: node tiles
])
def test_cpu_kernel_wide_tiles_at_block_edges(dtype, paged, num_nodes, group, head_dim):
    """Prefixes 0, 63, 64, 65, 127, 130 end just before, at and after the 64-slot blocks (the
    tree block then straddles one); row 0's ragged tree leaves nodes that see nothing."""
    gen = torch.Generator().manual_seed(num_nodes * group + head_dim)
    lens = torch.tensor([0, 63, 64, 65, 127, 130], dtype=torch.int32)
    case = make_case(6, num_nodes, 2 * group, 2, head_dim, dtype, gen, paged=paged,
                     cache_lens=lens)
    case["mask"][0, num_nodes // 2:] = False
    out = OPS.tree_attention(*args(case))
    assert_close(out, tree_attention_ref(*args(case)))
    blind = ~case["mask"][0].any(-1)
    assert torch.equal(out[0, blind], torch.zeros_like(out[0, blind]))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("backend", ["kernels", "reference"])
@pytest.mark.parametrize("dtype", DTYPES)
def test_chain_tree_is_causal_attention(device, backend, dtype):
    """A chain is ordinary causal attention over the new block after the whole prefix."""
    gen = torch.Generator().manual_seed(2)
    num_nodes, prefix = 9, 37
    chain = torch.arange(-1, num_nodes - 1, dtype=torch.int32)[None]
    mask, _ = tree_metadata_ref(chain, torch.tensor([num_nodes], dtype=torch.int32))
    case = make_case(1, num_nodes, 8, 4, 64, dtype, gen, mask=mask, max_prefix=0, spare=prefix,
                     device=device)
    case["cache_lens"].fill_(prefix)
    with specops.use_backend(backend):
        out = specops.tree_attention(*args(case))
    q, k, v = case["q"], case["k_cache"], case["v_cache"]
    causal = causal_lower_right(num_nodes, prefix + num_nodes)
    expected = F.scaled_dot_product_attention(
        q.transpose(1, 2).float(), k[:, :, :prefix + num_nodes].float(),
        v[:, :, :prefix + num_nodes].float(), attn_mask=causal, enable_gqa=True)
    assert_close(out, expected.transpose(1, 2).to(dtype))


@pytest.mark.parametrize("backend", ["kernels", "reference"])
@pytest.mark.parametrize("paged", [False, True])
def test_node_that_sees_nothing_outputs_zeros(backend, paged):
    gen = torch.Generator().manual_seed(3)
    case = make_case(2, 5, 4, 2, 16, torch.float32, gen, paged=paged)
    case["cache_lens"][0] = 0
    case["mask"][0, 2] = False
    case["mask"][1, 3] = False
    with specops.use_backend(backend):
        out = specops.tree_attention(*args(case))
    assert torch.equal(out[0, 2], torch.zeros_like(out[0, 2]))
    assert_close(out, tree_attention_ref(*args(case)))
    if int(case["cache_lens"][1]) > 0:  # a prefix to attend to: not zeros
        assert bool(out[1, 3].abs().sum() > 0)


def test_views_are_read_in_place_with_the_same_result():
    """Hugging Face's query is [B, H, T, D] transposed and its cache may be a slice of a
    larger one: strided inputs give bit-identical results to contiguous copies."""
    gen = torch.Generator().manual_seed(4)
    case = make_case(2, 7, 8, 2, 64, torch.bfloat16, gen)
    expected = OPS.tree_attention(*args(case))
    strided = dict(case)
    strided["q"] = case["q"].transpose(1, 2).contiguous().transpose(1, 2)
    big = torch.randn(4, 2, case["k_cache"].shape[2] + 5, 64).bfloat16()
    big[1:3, :, 2:-3] = case["k_cache"]
    strided["k_cache"] = big[1:3, :, 2:-3]
    assert not strided["q"].is_contiguous() and not strided["k_cache"].is_contiguous()
    assert torch.equal(OPS.tree_attention(*args(strided)), expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_cpu_kernel_rows_do_not_depend_on_the_batch_or_threads(dtype):
    """Node tiles depend on B, Hkv and the thread count; a row's result must not."""
    gen = torch.Generator().manual_seed(12)
    case = make_case(6, 37, 8, 2, 128, dtype, gen, paged=True, max_prefix=90)
    full = OPS.tree_attention(*args(case))
    threads = torch.get_num_threads()
    try:
        torch.set_num_threads(1)
        for b in (0, 5):
            single = dict(case, q=case["q"][b:b + 1], cache_lens=case["cache_lens"][b:b + 1],
                          mask=case["mask"][b:b + 1],
                          block_tables=case["block_tables"][b:b + 1])
            assert torch.equal(OPS.tree_attention(*args(single))[0], full[b]), f"row {b}"
    finally:
        torch.set_num_threads(threads)


@pytest.mark.parametrize("backend", ["kernels", "reference"])
def test_public_wrapper_and_doctest(backend):
    with specops.use_backend(backend):
        results = doctest.testmod(specops.attention_ops,
                                  extraglobs={"specops": specops, "torch": torch},
                                  optionflags=doctest.NORMALIZE_WHITESPACE)
        assert results.attempted >= 6 and results.failed == 0
        case = make_case(2, 4, 4, 4, 32, torch.float32, torch.Generator().manual_seed(5))
        out = specops.tree_attention(case["q"], case["k_cache"], case["v_cache"],
                                     case["cache_lens"], case["mask"], scale=2)
    case["scale"] = 2.0
    assert_close(out, tree_attention_ref(*args(case)))


# ---------------------------------------------------------- Triton kernel against reference


def _triton():
    triton = pytest.importorskip("triton", reason="the Triton kernels need `pip install triton`")
    if not CUDA and os.environ.get("TRITON_INTERPRET", "0") in ("", "0"):
        pytest.skip("no GPU and TRITON_INTERPRET=0: the Triton kernels cannot run")
    from specops.triton_kernels import attention
    return triton, attention


TRITON_DEVICE = "cuda" if CUDA else "cpu"


@given(shape=st.fixed_dictionaries(dict(
           batch=st.integers(1, 2), num_nodes=st.integers(1, 9), group=st.sampled_from([1, 2, 4]),
           num_kv_heads=st.integers(1, 2), head_dim=st.sampled_from([16, 32, 24]),
           paged=st.booleans(), block_size=st.sampled_from([1, 5, 16]),
           max_prefix=st.sampled_from([0, 15, 16, 17, 40]), seed=st.integers(0, 2**31 - 1))),
       dtype=st.sampled_from(DTYPES), num_splits=st.sampled_from([None, 1, 3]))
@settings(max_examples=12 if not CUDA else 60)
def test_triton_kernel_equals_reference(shape, dtype, num_splits):
    """Small shapes (the interpreter runs a program in tens of ms), blocks of 16 slots and
    16 query rows so that the block, split and row-tile edges are all crossed."""
    _, attention = _triton()
    case = case_from(shape, dtype, TRITON_DEVICE)
    out = attention.tree_attention_triton(*args(case), num_splits=num_splits, block_n=16,
                                          block_r=16)
    expected = tree_attention_ref(*args({k: v.cpu() if isinstance(v, torch.Tensor) else v
                                         for k, v in case.items()}))
    assert_close(out, expected)


@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_default_launch_head_dims_64_and_128(dtype):
    _, attention = _triton()
    gen = torch.Generator().manual_seed(6)
    for head_dim, paged in ((64, False), (128, True)):
        case = make_case(1, 5, 4, 2, head_dim, dtype, gen, paged=paged, max_prefix=40,
                         device=TRITON_DEVICE)
        out = attention.tree_attention_triton(*args(case))
        assert_close(out, tree_attention_ref(*args(case)).to(out.device))


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("dtype", DTYPES)
def test_triton_kernel_large_shapes(dtype):
    gen = torch.Generator().manual_seed(7)
    for (batch, num_nodes, heads, kv_heads, head_dim, prefix) in [(1, 64, 32, 8, 128, 1024),
                                                                   (4, 26, 28, 4, 128, 3000),
                                                                   (8, 8, 32, 32, 64, 500)]:
        case = make_case(batch, num_nodes, heads, kv_heads, head_dim, dtype, gen,
                         paged=batch == 4, max_prefix=prefix, device="cuda")
        assert_close(OPS.tree_attention(*args(case)), tree_attention_ref(*args(case)))


_COMPILE_FOR_HOPPER = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from specops.triton_kernels import attention

    def build(fn, consts, options=None, **types):
        signature = {n: types.get(n, "constexpr" if n in consts else "i32") for n in fn.arg_names}
        source = ASTSource(fn=fn, signature=signature, constexprs=consts)
        triton.compile(source, target=GPUTarget("cuda", 90, 32), options=options or {})

    parts = dict(part_m_ptr="*fp32", part_l_ptr="*fp32", part_acc_ptr="*fp32")
    strides = {name: "i64" for name in ("stride_qb", "stride_qt", "stride_qh", "stride_k_outer",
               "stride_k_slot", "stride_k_head", "stride_v_outer", "stride_v_slot",
               "stride_v_head")}
    for dtype in ("*fp32", "*bf16", "*fp16"):
        for paged in (False, True):
            for head_dim, block_d in ((64, 64), (128, 128), (80, 128)):
                build(attention._tree_attention_split_kernel,
                      dict(GROUP=4, HEAD_DIM=head_dim, BLOCK_D=block_d, BLOCK_R=64,
                           BLOCK_N=32 if dtype == "*fp32" else 64, PAGED=paged,
                           FP32_DOT=dtype == "*fp32"), dict(num_warps=8),
                      q_ptr=dtype, k_ptr=dtype, v_ptr=dtype, cache_lens_ptr="*i32",
                      mask_ptr="*u8", block_tables_ptr="*i32", scale_log2="fp32",
                      **strides, **parts)
        build(attention._tree_attention_combine_kernel,
              dict(GROUP=4, HEAD_DIM=128, BLOCK_D=128, BLOCK_R=64), out_ptr=dtype, **parts)
    print("compiled")
""")


@pytest.mark.skipif(CUDA, reason="on a GPU the other tests compile and run every kernel")
def test_triton_kernels_compile_for_hopper():
    """The split and combine kernels compile to sm_90 cubins (Triton's own ptxas, no GPU), so
    code the interpreter accepts but the compiler rejects fails here, not on a GPU."""
    pytest.importorskip("triton")
    assert_compiles_for_hopper(_COMPILE_FOR_HOPPER, timeout=600)


# ---------------------------------------------------------------------------- registration


def _op_samples(device):
    gen = torch.Generator().manual_seed(8)
    samples = [make_case(2, 5, 8, 2, 64, torch.float32, gen, device=device),
               make_case(2, 3, 4, 4, 40, torch.bfloat16, gen, paged=True, block_size=4,
                         device=device),
               make_case(1, 1, 2, 1, 128, torch.float16, gen, device=device)]
    samples[2]["scale"] = 0.5
    return samples


@pytest.mark.parametrize("device", DEVICES)
def test_opcheck(device):
    for case in _op_samples(device):
        torch.library.opcheck(OPS.tree_attention.default, args(case))


@pytest.mark.parametrize("device", DEVICES)
@pytest.mark.parametrize("paged", [False, True])
def test_compile_fullgraph_matches_eager(device, paged):
    gen = torch.Generator().manual_seed(9)
    case = make_case(2, 6, 8, 4, 64, torch.float32, gen, paged=paged, device=device)

    def step(q, k_cache, v_cache, cache_lens, mask, block_tables):
        out = specops.tree_attention(q, k_cache, v_cache, cache_lens, mask,
                                     block_tables=block_tables)
        return out * 2  # exact, so compiled and eager must agree bit for bit

    inputs = (case["q"], case["k_cache"], case["v_cache"], case["cache_lens"], case["mask"],
              case["block_tables"])
    eager = step(*inputs)
    compiled = torch.compile(step, fullgraph=True)(*inputs)
    torch.testing.assert_close(compiled, eager, rtol=0, atol=0)


@pytest.mark.skipif(not CUDA, reason="needs a CUDA GPU")
@pytest.mark.parametrize("paged", [False, True])
def test_cuda_graph_capture_and_replay_with_new_inputs(paged):
    gen = torch.Generator().manual_seed(10)
    static = make_case(4, 8, 8, 2, 128, torch.bfloat16, gen, paged=paged, device="cuda")
    specops.tree_attention(*args(static))  # warm-up (Triton JIT) outside the capture
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = specops.tree_attention(*args(static))
    for trial in range(3):
        fresh = dict(static)
        for name in ("q", "k_cache", "v_cache"):
            fresh[name] = torch.randn(static[name].shape, generator=gen).to(static[name])
        fresh["mask"] = random_mask(4, 8, gen).cuda()
        fresh["cache_lens"] = (static["cache_lens"] - trial).clamp(min=0)
        for name in ("q", "k_cache", "v_cache", "mask", "cache_lens"):
            static[name].copy_(fresh[name])
        graph.replay()
        assert_close(out, tree_attention_ref(*args(fresh)), f"replay {trial}")


# ------------------------------------------------------------------------------- bad input


@pytest.fixture(params=["kernels", "reference"])
def backend(request):
    with specops.use_backend(request.param):
        yield request.param


@pytest.fixture
def checks():
    yield specops.set_checks
    specops.set_checks("cheap")


def _bad_case(paged=False):
    return make_case(2, 4, 4, 2, 16, torch.float32, torch.Generator().manual_seed(11),
                     paged=paged, block_size=2)


@pytest.mark.parametrize("name, paged, change, error", [
    ("q", False, lambda c: c["q"].double(), TypeError),
    ("q", False, lambda c: c["q"][0], ValueError),
    ("k_cache", False, lambda c: c["k_cache"].half(), TypeError),
    ("k_cache", False, lambda c: c["k_cache"][:, :, :, :8], ValueError),
    ("k_cache", False, lambda c: c["k_cache"][:1], ValueError),
    ("k_cache", False, lambda c: torch.cat([c["k_cache"]] * 3, 1)[:, :3], ValueError),  # Hkv=3
    ("k_cache", False, lambda c: c["k_cache"][:, :, :3], ValueError),  # fewer slots than T
    ("v_cache", False, lambda c: c["v_cache"].bfloat16(), TypeError),
    ("v_cache", False, lambda c: c["v_cache"][:, :, 1:], ValueError),
    ("cache_lens", False, lambda c: c["cache_lens"].long(), TypeError),
    ("cache_lens", False, lambda c: c["cache_lens"][:1], ValueError),
    ("mask", False, lambda c: c["mask"].int(), TypeError),
    ("mask", False, lambda c: c["mask"][:, :3], ValueError),
    ("mask", False, lambda c: c["mask"].to("meta"), ValueError),
    ("block_tables", True, lambda c: c["block_tables"].long(), TypeError),
    ("block_tables", True, lambda c: c["block_tables"][:1], ValueError),
    ("block_tables", True, lambda c: c["block_tables"][:, :1], ValueError),  # too few slots
])
def test_wrong_dtype_shape_device_names_the_argument(backend, checks, name, paged, change,
                                                     error):
    for level in ("off", "cheap", "full"):
        checks(level)
        case = _bad_case(paged)
        case[name] = change(case)
        with pytest.raises(error, match=name):
            specops.tree_attention(*args(case))


@pytest.mark.parametrize("name, paged, change", [
    ("cache_lens", False, lambda c: c["cache_lens"].fill_(-1)),
    ("cache_lens", False, lambda c: c["cache_lens"].fill_(c["k_cache"].shape[2] - 3)),  # > S-T
    ("block_tables", True, lambda c: c["block_tables"].__setitem__((1, 0), 10**6)),
    ("block_tables", True, lambda c: c["block_tables"].__setitem__((0, 0), -1)),
])
def test_bad_values_raise_at_the_default_level_and_stay_in_bounds_when_off(
        backend, checks, name, paged, change):
    case = _bad_case(paged)
    change(case)
    with pytest.raises(ValueError, match=name):
        specops.tree_attention(*args(case))
    checks("off")
    out = specops.tree_attention(*args(case))  # clamped: no crash, no read past the cache
    assert_close(out, tree_attention_ref(*args(case)))


def test_unused_block_table_entries_are_ignored(checks):
    case = _bad_case(paged=True)
    used = torch.arange(case["block_tables"].shape[1]) * 2 < (case["cache_lens"] + 4)[:, None]
    assert not bool(used.all())
    case["block_tables"] = torch.where(used, case["block_tables"], 10**6)
    assert_close(specops.tree_attention(*args(case)), tree_attention_ref(*args(case)))
