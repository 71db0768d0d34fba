"""skinny_linear: the CPU linear for a few rows, against its executable specification
``F.linear``.

Equality on hypothesis-drawn shapes (M = 1..16 rows and up to the float32 limit, K = 1..5000 with the SIMD tail sizes
15/17/1535/1537, N = 1..3000 with odd N and N = 1 so the 6-row groups of W leave every
remainder), with and without bias, with strided x and weight, in float32 and bfloat16; the
passthrough to F.linear (past each dtype's MAX_ROWS, float16, float64); the op itself beyond
16 rows; bad input;
opcheck and torch.compile.
"""

import math

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

import specops
from specops.linear_ops import MAX_ROWS

OPS = torch.ops.specops
# Two float32 sums of K products in different orders differ by about eps * sqrt(K) times
# sum |x_k w_k| (random walk of roundings); 1e-6 * sqrt(K) leaves a margin of ~10 while still
# catching one product dropped or counted twice (an error of ~1/K of that sum).
RTOL_PER_SQRT_K = 1e-6


def assert_close_linear(actual, x, weight, bias, what="y"):
    """Within float32 rounding of F.linear; on failure prints the first mismatches."""
    expected = F.linear(x, weight, bias)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == expected.dtype, f"{what}: dtype {actual.dtype} != {expected.dtype}"
    k = weight.shape[1]
    scale = F.linear(x.abs(), weight.abs(), None if bias is None else bias.abs())
    tol = RTOL_PER_SQRT_K * math.sqrt(max(k, 1)) * scale + 1e-30
    diff = (actual - expected).abs()
    bad = ~(diff <= tol)
    if bool(bad.any()):
        lines = [f"  at {tuple(i)}: got {actual[tuple(i)]:.7g}, expected "
                 f"{expected[tuple(i)]:.7g} (tolerance {tol[tuple(i)]:.3g})"
                 for i in bad.nonzero()[:5].tolist()]
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} values off, K={k}\n"
                             + "\n".join(lines))


def assert_close_linear_bf16(actual, x, weight, bias, what="y"):
    """bfloat16: within one rounding to bfloat16 of F.linear computed in float32.

    The kernel sums in float32 (another order than F.linear: error up to the float32 bound of
    assert_close_linear, ``delta``) and rounds once to bfloat16, nearest even: at most half a
    bfloat16 ulp, ``2**-8`` of the float32 sum's magnitude. So ``|actual - expected|`` stays
    within ``2**-8 * |expected| + (1 + 2**-8) * delta``, ``expected`` the float32 F.linear;
    where the float32 error moves a sum across a rounding boundary, the two bfloat16 results
    differ by one ulp, which this allows, while a product dropped or a wrong conversion of W
    (an error of ~1/K of the sum or more) is far outside it for the sizes drawn here."""
    x32, w32 = x.float(), weight.float()
    b32 = None if bias is None else bias.float()
    expected = F.linear(x32, w32, b32)
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    assert actual.dtype == torch.bfloat16, f"{what}: dtype {actual.dtype} != torch.bfloat16"
    k = weight.shape[1]
    scale = F.linear(x32.abs(), w32.abs(), None if b32 is None else b32.abs())
    delta = RTOL_PER_SQRT_K * math.sqrt(max(k, 1)) * scale
    tol = 2.0**-8 * expected.abs() + (1 + 2.0**-8) * delta + 1e-30
    diff = (actual.float() - expected).abs()
    bad = ~(diff <= tol)
    if bool(bad.any()):
        lines = [f"  at {tuple(i)}: got {actual[tuple(i)].item():.7g}, expected "
                 f"{expected[tuple(i)]:.7g} (tolerance {tol[tuple(i)]:.3g})"
                 for i in bad.nonzero()[:5].tolist()]
        raise AssertionError(f"{what}: {int(bad.sum())} of {bad.numel()} values off, K={k}\n"
                             + "\n".join(lines))


def make_x(layout: str, m: int, k: int, gen: torch.Generator) -> torch.Tensor:
    """m rows of x in one of the layouts a model hands over."""
    if layout == "2d":
        return torch.randn(m, k, generator=gen)
    if layout == "1d":  # a single row without a leading dim (more rows: 2-D)
        return torch.randn(k, generator=gen) if m == 1 else torch.randn(m, k, generator=gen)
    if layout == "rows_strided":  # (1, m, k) view of a wider buffer: row stride k + 3
        return torch.randn(1, m, k + 3, generator=gen)[..., :k]
    # "leading_transposed": (b, t, k) whose leading dims cannot be viewed as one
    t = 2 if m % 2 == 0 else 1
    return torch.randn(t, m // t, k, generator=gen).transpose(0, 1)


K_SIZES = st.one_of(st.sampled_from([1, 15, 16, 17, 31, 1535, 1536, 1537]),
                    st.integers(1, 5000))
N_SIZES = st.one_of(st.sampled_from([1, 5, 6, 7, 13, 257]), st.integers(1, 3000))
LAYOUTS = st.sampled_from(["2d", "1d", "rows_strided", "leading_transposed"])


@settings(max_examples=40)
@given(m=st.one_of(st.integers(1, 16), st.sampled_from([17, 33, MAX_ROWS[torch.float32]])),
       k=K_SIZES, n=N_SIZES, with_bias=st.booleans(), layout=LAYOUTS,
       weight_strided=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_equals_f_linear(m, k, n, with_bias, layout, weight_strided, seed):
    gen = torch.Generator().manual_seed(seed)
    x = make_x(layout, m, k, gen)
    if weight_strided:  # a view with row stride k + 5, read in place
        weight = torch.randn(n, k + 5, generator=gen)[:, 2:k + 2]
    else:
        weight = torch.randn(n, k, generator=gen)
    bias = torch.randn(n, generator=gen) if with_bias else None
    y = specops.skinny_linear(x, weight, bias)
    assert_close_linear(y, x, weight, bias)
    assert y.is_contiguous()
    assert_close_linear(OPS.skinny_linear(x, weight, bias), x, weight, bias, "op")


@settings(max_examples=30)
@given(m=st.integers(1, 16), k=K_SIZES, n=N_SIZES, with_bias=st.booleans(), layout=LAYOUTS,
       weight_strided=st.booleans(), seed=st.integers(0, 2**31 - 1))
def test_bfloat16_equals_f_linear_in_float32(m, k, n, with_bias, layout, weight_strided, seed):
    gen = torch.Generator().manual_seed(seed)
    x = make_x(layout, m, k, gen).bfloat16()
    if weight_strided:
        weight = torch.randn(n, k + 5, generator=gen).bfloat16()[:, 2:k + 2]
    else:
        weight = torch.randn(n, k, generator=gen).bfloat16()
    bias = torch.randn(n, generator=gen).bfloat16() if with_bias else None
    op = OPS.skinny_linear(x, weight, bias)
    assert_close_linear_bf16(op, x, weight, bias, "op")
    y = specops.skinny_linear(x, weight, bias)
    assert y.is_contiguous()
    # up to its rows the wrapper runs the kernel for bfloat16 (deterministic: each output has
    # one sum order), above them F.linear, which is the specification itself
    expected = op if m <= MAX_ROWS[torch.bfloat16] else F.linear(x, weight, bias)
    assert torch.equal(y, expected.reshape(y.shape))


def test_bfloat16_rounds_to_nearest_even():
    """Sums exactly halfway between two bfloat16 values go to the even one, as torch's cast:
    1 + 2**-8 (halfway between 1 and 1 + 2**-7) -> 1; 1 + 3 * 2**-8 -> 1 + 2**-6."""
    x = torch.tensor([[1.0, 2.0**-8], [1.0, 3 * 2.0**-8]], dtype=torch.bfloat16)
    w = torch.ones(1, 2, dtype=torch.bfloat16)
    y = specops.skinny_linear(x, w)
    assert y.dtype == torch.bfloat16
    assert y.flatten().tolist() == [1.0, 1.0 + 2.0**-6]


def test_weight_with_strided_last_dim_is_copied():
    gen = torch.Generator().manual_seed(0)
    x, weight = torch.randn(3, 40, generator=gen), torch.randn(40, 33, generator=gen).t()
    assert_close_linear(specops.skinny_linear(x, weight), x, weight, None)


def test_literal():
    x = torch.tensor([[1.0, 2.0], [3.0, 4.0]])
    w = torch.tensor([[1.0, 0.0], [1.0, 1.0], [0.0, -1.0]])
    y = specops.skinny_linear(x, w, torch.tensor([0.0, 0.5, 0.0]))
    assert y.tolist() == [[1.0, 3.5, -2.0], [3.0, 7.5, -4.0]]


@pytest.mark.parametrize("m", [17, 40])
def test_op_beyond_16_rows(m):
    """The op itself takes any number of rows (tiles of rows share each group of W)."""
    gen = torch.Generator().manual_seed(m)
    x, w, b = torch.randn(m, 300, generator=gen), torch.randn(77, 300, generator=gen), None
    assert_close_linear(OPS.skinny_linear(x, w, b), x, w, b)


def test_empty_rows_and_zero_k():
    w, b = torch.randn(5, 8), torch.randn(5)
    assert OPS.skinny_linear(torch.randn(0, 8), w, b).shape == (0, 5)
    assert torch.equal(OPS.skinny_linear(torch.randn(3, 0), torch.randn(5, 0), b),
                       b.expand(3, 5))


@pytest.mark.parametrize("case", ["float32_rows", "bfloat16_rows", "float16", "float64"])
def test_passthrough_to_f_linear(case):
    """Shapes and dtypes the kernel does not serve give exactly F.linear's result."""
    gen = torch.Generator().manual_seed(1)
    if case.endswith("_rows"):
        dtype = getattr(torch, case.removesuffix("_rows"))
        m = MAX_ROWS[dtype] + 1
    else:
        m, dtype = 4, getattr(torch, case)
    x = torch.randn(m, 129, generator=gen).to(dtype)
    w, b = torch.randn(70, 129, generator=gen).to(dtype), torch.randn(70, generator=gen).to(dtype)
    assert torch.equal(specops.skinny_linear(x, w, b), F.linear(x, w, b))


def test_reference_backend_is_f_linear():
    gen = torch.Generator().manual_seed(2)
    x, w = torch.randn(3, 65, generator=gen), torch.randn(9, 65, generator=gen)
    with specops.use_backend("reference"):
        assert torch.equal(specops.skinny_linear(x, w), F.linear(x, w))


@pytest.mark.parametrize("call", ["wrapper", "op"])
@pytest.mark.parametrize("args, error, name", [
    ((torch.ones(2, 4, dtype=torch.int64), torch.ones(3, 4), None), TypeError, "x"),
    ((torch.ones(2, 4), torch.ones(3, 4, dtype=torch.float64), None), TypeError, "weight"),
    ((torch.ones(2, 4), torch.ones(3, 4), torch.ones(3, dtype=torch.float64)), TypeError,
     "bias"),
    ((torch.ones(2, 5), torch.ones(3, 4), None), ValueError, "x.shape[-1]"),
    ((torch.ones(2, 4), torch.ones(12), None), ValueError, "weight"),
    ((torch.ones(2, 4), torch.ones(3, 4), torch.ones(4)), ValueError, "bias"),
])
def test_bad_input(call, args, error, name):
    fn = specops.skinny_linear if call == "wrapper" else OPS.skinny_linear
    with pytest.raises(error, match="skinny_linear: " + name.replace("[", r"\[")):
        fn(*args)


def test_op_refuses_float16():
    with pytest.raises(TypeError, match="skinny_linear: x must be float32 or bfloat16"):
        OPS.skinny_linear(torch.ones(2, 4, dtype=torch.float16),
                          torch.ones(3, 4, dtype=torch.float16), None)


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("with_bias", [False, True])
def test_opcheck(with_bias, dtype):
    gen = torch.Generator().manual_seed(3)
    x = torch.randn(2, 5, 37, generator=gen).to(dtype)
    w = torch.randn(11, 37, generator=gen).to(dtype)
    b = torch.randn(11, generator=gen).to(dtype) if with_bias else None
    torch.library.opcheck(OPS.skinny_linear, (x, w, b))


def test_compile_fullgraph():
    def mlp(x, w1, b1, w2):
        return specops.skinny_linear(F.silu(specops.skinny_linear(x, w1, b1)), w2)

    gen = torch.Generator().manual_seed(4)
    x, w1, b1 = (torch.randn(1, 5, 64, generator=gen), torch.randn(96, 64, generator=gen),
                 torch.randn(96, generator=gen))
    w2 = torch.randn(64, 96, generator=gen)
    compiled = torch.compile(mlp, fullgraph=True)
    expected = F.linear(F.silu(F.linear(x, w1, b1)), w2)
    # |y| reaches ~200 here: float32 rounding of a 96-term sum of such products is ~1e-4
    torch.testing.assert_close(compiled(x, w1, b1, w2), expected, rtol=1e-4, atol=1e-3)
