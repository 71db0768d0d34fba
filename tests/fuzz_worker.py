"""Fuzzes the ops with random, often invalid, arguments (run by test_bad_input.py in a child
process so that a crash shows as a bad exit code). Only TypeError/ValueError may escape an op;
when a call succeeds, its outputs must be in bounds."""

import sys

import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import specops

DTYPES = [torch.float32, torch.float16, torch.int32, torch.int64, torch.bfloat16]
FLOATS = st.sampled_from([0.0, 1.0, -1.0, 0.5, 1e-30, 1e30, float("nan"), float("inf"),
                          float("-inf")])
INTS = st.sampled_from([0, 1, 2, 3, -1, -7, 2**31 - 1, 2**40, -2**62])


@st.composite
def tensors(draw, batch, num_draft, vocab, dtype, kind):
    """A tensor that is usually the right shape and dtype, sometimes not."""
    shape = {"probs": (batch, num_draft + 1, vocab), "q": (batch, num_draft, vocab),
             "tokens": (batch, num_draft), "row": (batch,)}[kind]
    if draw(st.integers(0, 9)) == 0:
        shape = tuple(max(0, s + draw(st.integers(-1, 1))) for s in shape)
    if draw(st.integers(0, 9)) == 0:
        dtype = draw(st.sampled_from(DTYPES))
    if dtype.is_floating_point:
        t = torch.rand(shape)
        for _ in range(draw(st.integers(0, 3))):
            if t.numel():
                t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(FLOATS)
    else:
        t = torch.randint(-1, vocab + 1, shape)
        for _ in range(draw(st.integers(0, 3))):
            if t.numel():
                t.view(-1)[draw(st.integers(0, t.numel() - 1))] = draw(INTS)
    return t.to(dtype)


def _in_bounds(tokens, num_accepted, vocab):
    assert ((tokens == -1) | ((tokens >= 0) & (tokens < vocab))).all(), tokens
    assert (num_accepted >= 0).all(), num_accepted


@settings(max_examples=300, deadline=None, derandomize=True,
          suppress_health_check=list(HealthCheck))
@given(st.data(), st.integers(1, 3), st.integers(0, 4), st.integers(1, 40),
       st.sampled_from(["off", "cheap", "full"]), st.sampled_from(["kernels", "reference"]),
       st.booleans())
def fuzz(data, batch, num_draft, vocab, level, backend, with_q):
    specops.set_checks(level)
    specops.set_backend(backend)
    probs = data.draw(tensors(batch, num_draft, vocab, torch.float32, "probs"))
    q = data.draw(tensors(batch, num_draft, vocab, torch.float32, "q")) if with_q else None
    tokens = data.draw(tensors(batch, num_draft, vocab, torch.int64, "tokens"))
    lens = data.draw(tensors(batch, num_draft, vocab, torch.int32, "row"))
    seeds = data.draw(tensors(batch, num_draft, vocab, torch.int64, "row"))
    positions = data.draw(tensors(batch, num_draft, vocab, torch.int64, "row"))
    try:
        out = specops.chain_verify(probs, tokens, q, lens, seeds=seeds, positions=positions)
        _in_bounds(*out, vocab)
    except (TypeError, ValueError):
        pass
    try:
        out = specops.chain_verify_greedy(probs.to(data.draw(st.sampled_from(DTYPES))), tokens,
                                          lens)
        _in_bounds(*out, vocab)
    except (TypeError, ValueError):
        pass
    try:
        temperature = data.draw(tensors(probs.shape[0], 0, vocab, torch.float32, "row"))
        top_k = data.draw(tensors(probs.shape[0], 0, vocab, torch.int32, "row"))
        top_p = data.draw(tensors(probs.shape[0], 0, vocab, torch.float32, "row"))
        flat = probs.reshape(-1, probs.shape[-1]) if probs.dim() == 3 else probs
        specops.sampling_probs(flat[: temperature.shape[0]], temperature, top_k, top_p)
    except (TypeError, ValueError):
        pass


if __name__ == "__main__":
    fuzz()
    print("fuzzed")
    sys.exit(0)
