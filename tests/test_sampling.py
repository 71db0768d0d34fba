"""sampling_probs against Hugging Face transformers' warpers + softmax (contract, "Sampling
distributions"), on every backend, with ties."""

import pytest
import torch
from hypothesis import given
from hypothesis import strategies as st

import specops

transformers = pytest.importorskip("transformers", reason="the comparison needs transformers")
from transformers.generation.logits_process import (  # noqa: E402
    TemperatureLogitsWarper,
    TopKLogitsWarper,
    TopPLogitsWarper,
)

BACKENDS = ["kernels", "reference"]


def hf_probs(logits: torch.Tensor, temperature: float, top_k: int, top_p: float) -> torch.Tensor:
    scores = logits.float()[None]
    if temperature != 1.0:
        scores = TemperatureLogitsWarper(temperature)(None, scores)
    if top_k > 0:
        scores = TopKLogitsWarper(top_k)(None, scores)
    if top_p < 1.0:
        scores = TopPLogitsWarper(top_p)(None, scores)
    return scores.softmax(-1)[0]


@st.composite
def logit_rows(draw):
    vocab = draw(st.sampled_from([1, 2, 7, 64, 255, 256, 257, 1000]))
    rows = draw(st.integers(1, 6))
    seed = draw(st.integers(0, 2**31))
    logits = torch.randn(rows, vocab, generator=torch.Generator().manual_seed(seed)) * 3
    if draw(st.booleans()):  # ties: quantise so equal logits are common
        logits = logits.round()
    params = [(draw(st.sampled_from([0.3, 0.7, 1.0, 1.5])), draw(st.integers(0, vocab + 2)),
               draw(st.sampled_from([0.1, 0.5, 0.9, 0.95, 1.0]))) for _ in range(rows)]
    return logits, params


@pytest.mark.parametrize("backend", BACKENDS)
@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
@given(case=logit_rows())
def test_matches_transformers_warpers(backend, dtype, case):
    logits, params = case
    logits = logits.to(dtype)
    temperature = torch.tensor([p[0] for p in params])
    top_k = torch.tensor([p[1] for p in params], dtype=torch.int32)
    top_p = torch.tensor([p[2] for p in params])
    with specops.use_backend(backend):
        probs = specops.sampling_probs(logits, temperature, top_k, top_p)
    for row, (t, k, p) in enumerate(params):
        expected = hf_probs(logits[row], t, k, p)
        kept, kept_hf = probs[row] > 0, expected > 0
        if not torch.equal(kept, kept_hf):
            scaled = logits[row].float() / t
            _assert_allowed_top_p_difference(scaled, kept, kept_hf, p)
            own = scaled.masked_fill(~kept, float("-inf")).softmax(-1)
            torch.testing.assert_close(probs[row], own, rtol=1e-5, atol=1e-6)
            continue
        torch.testing.assert_close(probs[row], expected, rtol=1e-5, atol=1e-6)


def _assert_allowed_top_p_difference(scaled, kept, kept_hf, top_p):
    """Kept sets may differ only at the top-p cut, where either float rounding decides it or
    equal probabilities are ordered by token id (specops: lower id first; transformers'
    unstable sort: unspecified)."""
    differ = kept != kept_hf
    tied = scaled[differ]
    if bool((tied == tied[0]).all()) and int(kept.sum()) == int(kept_hf.sum()):
        # a tie at the cut: specops keeps the lower ids among the tied tokens
        tie_ids = (scaled == tied[0]).nonzero().flatten()
        kept_ids = tie_ids[kept[tie_ids]]
        dropped_ids = tie_ids[~kept[tie_ids]]
        assert kept_ids.numel() == 0 or dropped_ids.numel() == 0 or kept_ids.max() < dropped_ids.min()
        return
    probs = scaled.masked_fill(~(kept | kept_hf), float("-inf")).softmax(-1)
    mass = torch.sort(probs, descending=True).values.double().cumsum(0)
    assert (mass - top_p).abs().min() < 1e-5, (kept, kept_hf)


@pytest.mark.parametrize("backend", BACKENDS)
def test_literal_cases(backend):
    logits = torch.tensor([[1.0, 3.0, 3.0, 0.0],    # tie at the max
                           [2.0, 1.0, 1.0, 1.0],    # ties at the k-th value
                           [0.0, 0.0, 0.0, 0.0]])   # all equal
    with specops.use_backend(backend):
        greedy = specops.sampling_probs(logits, temperature=0.0)
        top1 = specops.sampling_probs(logits, top_k=torch.tensor([1, 2, 1], dtype=torch.int32))
        top_p = specops.sampling_probs(logits[2:], top_p=0.5)
    assert greedy.tolist() == [[0, 1, 0, 0], [1, 0, 0, 0], [1, 0, 0, 0]]
    # top-k keeps every logit >= the k-th largest, so ties keep more than k
    assert (top1[0] > 0).tolist() == [False, True, True, False]
    assert (top1[1] > 0).tolist() == [True, True, True, True]
    assert (top1[2] > 0).tolist() == [True, True, True, True]
    # equal probabilities: lower token ids first, smallest set reaching 0.5 = {0, 1}
    assert top_p.tolist() == [[0.5, 0.5, 0.0, 0.0]]
