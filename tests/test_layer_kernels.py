"""The fused Triton layer kernels (specops/triton_kernels/layers.py) against the PyTorch
composition of specops' forward (specops/models/llama.py), which tests/test_models.py checks
against transformers; and the forward run through them against the forward without them.

Without a GPU the kernels run in Triton's interpreter on CPU tensors. The interpreter rounds
float32 to bfloat16 by truncation, not to nearest as a GPU and PyTorch do, so bfloat16 gets a
tolerance of a few of its ulps here; float16 and float32 round as on a GPU.
"""

import os
import textwrap

import pytest
import torch
import torch.nn.functional as F
from hypothesis import given, settings
from hypothesis import strategies as st

CUDA = torch.cuda.is_available()
if not CUDA:
    os.environ.setdefault("TRITON_INTERPRET", "1")   # before triton is imported

pytest.importorskip("triton", reason="the layer kernels need `pip install triton`")
from helpers import assert_compiles_for_hopper  # noqa: E402
from loop_models import tiny_model  # noqa: E402

import specops  # noqa: E402
from specops.models.llama import SpecopsCausalLM, _rms_norm, _rotary  # noqa: E402
from specops.triton_kernels import layers  # noqa: E402

DEVICE = "cuda" if CUDA else "cpu"
INTERPRET = os.environ.get("TRITON_INTERPRET", "0") not in ("", "0")
if not CUDA and not INTERPRET:
    pytest.skip("no GPU and TRITON_INTERPRET=0: the Triton kernels cannot run",
                allow_module_level=True)

# dtype -> (atol, rtol) of a kernel against the composition (a few ulps of the dtype: the
# float32 sum of squares is reduced in another order; bfloat16 as the module doc says)
TOLERANCE = {torch.float32: (1e-5, 1e-5), torch.float16: (2e-3, 2e-3),
             torch.bfloat16: (3e-2, 3e-2)}


def close(actual, expected, what):
    atol, rtol = TOLERANCE[expected.dtype]
    assert actual.dtype == expected.dtype and actual.shape == expected.shape, what
    torch.testing.assert_close(actual, expected, atol=atol, rtol=rtol,
                               msg=lambda m: f"{what}: {m}")


class _Norm(torch.nn.Module):
    """The two attributes of a Hugging Face RMSNorm the forward reads."""

    def __init__(self, weight: torch.Tensor, eps: float):
        super().__init__()
        self.weight, self.variance_epsilon = weight, eps


dtypes = st.sampled_from(list(TOLERANCE))


@settings(max_examples=25)
@given(rows=st.integers(0, 5), n_cols=st.sampled_from([1, 2, 31, 32, 33, 96, 255, 257]),
       dtype=dtypes, with_delta=st.booleans(), seed=st.integers(0, 2**16))
def test_add_rms_norm_equals_composition(rows, n_cols, dtype, with_delta, seed):
    gen = torch.Generator().manual_seed(seed)
    x = (torch.randn(rows, 1, n_cols, generator=gen) * 3).to(dtype).to(DEVICE)
    delta = torch.randn(x.shape, generator=gen).to(dtype).to(DEVICE) if with_delta else None
    norm = _Norm(torch.randn(n_cols, generator=gen).to(dtype).to(DEVICE), 1e-6)
    total, normed = layers.add_rms_norm_triton(x, delta, norm.weight, norm.variance_epsilon)
    want_total = x + delta if with_delta else x
    if with_delta:
        close(total, want_total, "x + delta")
    else:
        assert total is x
    close(normed, _rms_norm(want_total, norm), "RMSNorm")


@settings(max_examples=25)
@given(batch=st.integers(1, 3), num_new=st.integers(0, 4),
       heads=st.sampled_from([(1, 1), (4, 2), (12, 2), (3, 3), (40, 8)]),
       head_dim=st.sampled_from([2, 6, 8, 64, 128]), capacity=st.integers(1, 9),
       dtype=dtypes, data=st.data())
def test_rotary_kv_write_equals_composition(batch, num_new, heads, head_dim, capacity, dtype,
                                            data):
    """q and k rotated in place and k, v written to the cache as kv_write writes them, for
    head counts past one head block (40 heads of 128: 2 blocks), a head_dim whose half is not
    a power of two (6), and slots outside the cache (dropped, as kv_write with checks off)."""
    num_heads, num_kv_heads = heads
    gen = torch.Generator().manual_seed(data.draw(st.integers(0, 2**16), label="seed"))

    def rand(*shape):
        return torch.randn(shape, generator=gen).to(dtype).to(DEVICE)

    q, k = rand(batch, num_new, num_heads, head_dim), rand(batch, num_new, num_kv_heads, head_dim)
    v = rand(batch, num_new, num_kv_heads, head_dim)
    cos, sin = rand(batch, num_new, head_dim), rand(batch, num_new, head_dim)
    lens = data.draw(st.lists(st.integers(-2, capacity + 1), min_size=batch, max_size=batch),
                     label="cache_lens")
    cache_lens = torch.tensor(lens, dtype=torch.int32, device=DEVICE)
    k_cache, v_cache = (rand(batch, num_kv_heads, capacity, head_dim) for _ in range(2))
    want_q = _rotary(q, cos.unsqueeze(2), sin.unsqueeze(2))
    want_k = _rotary(k, cos.unsqueeze(2), sin.unsqueeze(2))
    want_k_cache, want_v_cache = k_cache.clone(), v_cache.clone()
    before = specops.get_checks()
    specops.set_checks("off")
    try:
        specops.kv_write(want_k_cache, want_k.transpose(1, 2), cache_lens)
        specops.kv_write(want_v_cache, v.transpose(1, 2), cache_lens)
    finally:
        specops.set_checks(before)
    v_before = v.clone()
    layers.rotary_kv_write_triton_(q, k, v, cos, sin, k_cache, v_cache, cache_lens)
    close(q, want_q, "q")
    close(k, want_k, "k")
    assert torch.equal(v, v_before)
    close(k_cache, want_k_cache, "k_cache")
    assert torch.equal(v_cache, want_v_cache)   # copied bytes


def test_rotary_kv_write_refuses_a_strided_tensor():
    q = torch.zeros(1, 2, 4, 8, device=DEVICE).transpose(1, 2)
    cache = torch.zeros(1, 4, 5, 8, device=DEVICE)
    with pytest.raises(ValueError, match="contiguous"):
        layers.rotary_kv_write_triton_(q, q, q, torch.zeros(1, 4, 8, device=DEVICE),
                                       torch.zeros(1, 4, 8, device=DEVICE), cache, cache,
                                       torch.zeros(1, dtype=torch.int32, device=DEVICE))


@pytest.mark.parametrize("n", [0, 1, 1023, 1024, 1025, 3000])
@pytest.mark.parametrize("dtype", list(TOLERANCE))
def test_silu_mul_equals_composition(n, dtype):
    gen = torch.Generator().manual_seed(n)
    gate = (torch.randn(n, generator=gen) * 8).to(dtype).to(DEVICE)   # saturating tails too
    up = torch.randn(n, generator=gen).to(dtype).to(DEVICE)
    close(layers.silu_mul_triton(gate, up), F.silu(gate) * up, "silu(gate) * up")


def _forward_steps(lm: SpecopsCausalLM) -> list[torch.Tensor]:
    """Logits of a ragged prefill, a chain step and a tree step on one fresh cache, and the
    cache after them."""
    gen = torch.Generator().manual_seed(4)
    vocab, batch = lm.vocab_size, 2
    cache = lm.new_cache(batch, 32)
    prompt = torch.randint(vocab, (batch, 7), generator=gen).to(DEVICE)
    zeros = torch.zeros(batch, dtype=torch.int32, device=DEVICE)
    positions = torch.arange(7, device=DEVICE).expand(batch, -1)
    last = torch.tensor([[6], [3]], device=DEVICE)
    out = [lm(prompt, cache, zeros, positions, logits_index=last, prefill=True)]
    lens = torch.tensor([7, 4], dtype=torch.int32, device=DEVICE)
    chain = torch.randint(vocab, (batch, 3), generator=gen).to(DEVICE)
    out.append(lm(chain, cache, lens, lens.long()[:, None] + torch.arange(3, device=DEVICE)))
    parents = torch.tensor([[-1, 0, 0, 1], [-1, 0, 1, 2]], dtype=torch.int32)
    mask, depth = specops.tree_metadata(parents, torch.tensor([4, 4], dtype=torch.int32))
    tree = torch.randint(vocab, (batch, 4), generator=gen).to(DEVICE)
    lens = lens + 3
    out.append(lm(tree, cache, lens, lens.long()[:, None] + depth.long().to(DEVICE),
                  mask.to(DEVICE)))
    return out + list(cache.tensors())


# dtype -> largest difference of a whole forward (logits, cache), relative to the largest
# magnitude: two layers compound the kernels' roundings; the interpreter's truncating
# bfloat16 drifts most (measured 0.05 on these models; a wrong kernel is off by about 1)
FORWARD_TOLERANCE = {torch.float32: 1e-5, torch.float16: 4e-3,
                     torch.bfloat16: 0.03 if CUDA else 0.12}


@pytest.mark.parametrize("dtype", list(TOLERANCE))
@pytest.mark.parametrize("kind", ["qwen2", "llama"])
def test_forward_through_the_kernels_equals_the_composition(kind, dtype):
    """Prefill, chain and tree steps: logits and the KV cache written (rotated keys)."""
    model = tiny_model(kind).to(DEVICE, dtype)
    fused = _forward_steps(SpecopsCausalLM(model, layer_kernels="triton"))
    plain = _forward_steps(SpecopsCausalLM(model, layer_kernels="torch"))
    names = ["prefill logits", "chain logits", "tree logits"]
    names += [f"cache tensor {i}" for i in range(len(plain) - 3)]
    for got, want, what in zip(fused, plain, names):
        assert got.dtype == want.dtype and got.shape == want.shape, what
        error = (got.float() - want.float()).abs().max() / want.float().abs().max()
        assert error <= FORWARD_TOLERANCE[dtype], f"{what}: relative difference {error:.3g}"


def test_layer_kernels_choice():
    model = tiny_model("qwen2")
    auto = SpecopsCausalLM(model)
    assert auto.layer_kernels == "auto"
    assert auto._fused_kernels(torch.device("cpu")) is None
    assert auto._fused_kernels(torch.device("cuda")) is layers   # (only looked up here)
    assert SpecopsCausalLM(model, layer_kernels="torch")._fused_kernels(
        torch.device("cuda")) is None
    assert SpecopsCausalLM(model, layer_kernels="triton")._fused_kernels(
        torch.device("cpu")) is layers
    with pytest.raises(ValueError, match="layer_kernels='fast'"):
        SpecopsCausalLM(model, layer_kernels="fast")


def test_compiled_forward_runs_the_composition(monkeypatch):
    """Under torch.compile the forward traces the PyTorch composition (Inductor fuses it),
    even when the Triton kernels were asked for: no kernel launch is traced."""
    def refuse(*args, **kwargs):
        raise AssertionError("a Triton layer kernel ran under torch.compile")

    for name in ("add_rms_norm_triton", "rotary_kv_write_triton_", "silu_mul_triton"):
        monkeypatch.setattr(layers, name, refuse)
    lm = SpecopsCausalLM(tiny_model("llama"), layer_kernels="triton")
    plain = SpecopsCausalLM(lm.hf_model, layer_kernels="torch")
    token = torch.tensor([[5], [9]])
    lens = torch.tensor([0, 0], dtype=torch.int32)
    expected = plain(token, plain.new_cache(2, 8), lens, torch.zeros(2, 1, dtype=torch.long))
    actual = lm.compiled()(token, lm.new_cache(2, 8), lens, torch.zeros(2, 1, dtype=torch.long))
    torch.testing.assert_close(actual, expected, atol=1e-5, rtol=1e-5)
    with pytest.raises(AssertionError, match="under torch.compile"):   # the guard can fail
        lm(token, lm.new_cache(2, 8), lens, torch.zeros(2, 1, dtype=torch.long))


_COMPILE_FOR_HOPPER = textwrap.dedent("""
    import triton
    from triton.backends.compiler import GPUTarget
    from triton.compiler import ASTSource
    from specops.triton_kernels import layers

    def build(fn, types, consts):
        signature = {n: types.get(n, "constexpr" if n in consts else "i32") for n in fn.arg_names}
        triton.compile(ASTSource(fn=fn, signature=signature, constexprs=consts),
                       target=GPUTarget("cuda", 90, 32))

    for elem in ("*bf16", "*fp32"):
        for has_delta in (True, False):
            build(layers._add_rms_norm_kernel,
                  dict(x_ptr=elem, delta_ptr=elem, sum_ptr=elem, out_ptr=elem, weight_ptr=elem,
                       eps="fp32"), dict(HAS_DELTA=has_delta, BLOCK=2048))
        build(layers._rotary_kv_write_kernel,
              dict(q_ptr=elem, k_ptr=elem, v_ptr=elem, cos_ptr=elem, sin_ptr=elem,
                   k_cache_ptr=elem, v_cache_ptr=elem, cache_lens_ptr="*i32",
                   stride_cache_b="i64", stride_cache_h="i64", stride_cache_s="i64"),
              dict(HALF=64, BLOCK_H=16, BLOCK_D=64))
        build(layers._silu_mul_kernel, dict(gate_ptr=elem, up_ptr=elem, out_ptr=elem),
              dict(BLOCK=1024))
    print("compiled")
""")


@pytest.mark.skipif(CUDA, reason="on a GPU the other tests compile the kernels")
def test_kernels_compile_for_hopper():
    """The kernels compile to sm_90 cubins (Triton's own ptxas, no GPU needed)."""
    assert_compiles_for_hopper(_COMPILE_FOR_HOPPER, timeout=300)
