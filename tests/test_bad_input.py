"""Bad input (contract, "Bad input"): clear errors naming the argument, never a crash."""

import os
import subprocess
import sys
from pathlib import Path

import pytest
import torch

import specops
from helpers import random_chain_inputs

BACKENDS = ["kernels", "reference"]


@pytest.fixture(params=BACKENDS)
def backend(request):
    with specops.use_backend(request.param):
        yield request.param


@pytest.fixture
def checks():
    """Sets a check level for one test and restores the default after it."""
    yield specops.set_checks
    specops.set_checks("cheap")


def _inputs(**overrides):
    d = random_chain_inputs(3, 4, 20, torch.Generator().manual_seed(0))
    d["draft_lens"] = torch.tensor([4, 2, 0], dtype=torch.int32)
    d.update(overrides)
    return d


def _verify(d):
    return specops.chain_verify(d["target_probs"], d["draft_tokens"], d["draft_probs"],
                                d["draft_lens"], seeds=d["seeds"], positions=d["positions"])


@pytest.mark.parametrize("name, value, error", [
    ("target_probs", lambda d: d["target_probs"].double(), TypeError),
    ("target_probs", lambda d: d["target_probs"][0], ValueError),
    ("draft_tokens", lambda d: d["draft_tokens"].int(), TypeError),
    ("draft_tokens", lambda d: d["draft_tokens"][:, :3], ValueError),
    ("draft_probs", lambda d: d["draft_probs"].half(), TypeError),
    ("draft_probs", lambda d: d["draft_probs"][:, :, :19], ValueError),
    ("draft_lens", lambda d: d["draft_lens"].long(), TypeError),
    ("draft_lens", lambda d: d["draft_lens"][:2], ValueError),
    ("seeds", lambda d: d["seeds"].float(), TypeError),
    ("positions", lambda d: d["positions"][None], ValueError),
    ("positions", lambda d: d["positions"].to("meta"), ValueError),
])
def test_wrong_dtype_shape_device_names_the_argument(backend, checks, name, value, error):
    for level in ("off", "cheap", "full"):
        checks(level)
        d = _inputs()
        d[name] = value(d)
        with pytest.raises(error, match=name):
            _verify(d)


@pytest.mark.parametrize("name, bad_value", [
    ("draft_lens", torch.tensor([4, 5, 0], dtype=torch.int32)),
    ("draft_lens", torch.tensor([4, -1, 0], dtype=torch.int32)),
    ("draft_tokens", torch.tensor([[0, 1, 2, 20], [0, 0, 0, 0], [0, 0, 0, 0]])),
    ("draft_tokens", torch.tensor([[0, 1, 2, 3], [0, -1, 0, 0], [0, 0, 0, 0]])),
    ("positions", torch.tensor([0, -3, 0])),
])
def test_bad_values_raise_at_cheap_level(backend, name, bad_value):
    with pytest.raises(ValueError, match=name):
        _verify(_inputs(**{name: bad_value}))


def test_tokens_past_the_length_are_ignored(backend):
    d = _inputs()
    d["draft_tokens"][1, 2:] = -1
    d["draft_tokens"][2, :] = 10**9
    tokens, num_accepted = _verify(d)
    assert (tokens >= -1).all() and (tokens < 20).all()


def _nan_row(d):
    d["target_probs"][1, 2, 5] = float("nan")
    return d


def _negative_row(d):
    d["draft_probs"][0, 1, 3] = -0.5
    return d


def _zero_row(d):
    d["target_probs"][0, 0] = 0.0
    return d


@pytest.mark.parametrize("spoil, name", [(_nan_row, "target_probs"),
                                         (_negative_row, "draft_probs"),
                                         (_zero_row, "target_probs")])
def test_bad_rows_raise_only_with_full_checks(backend, checks, spoil, name):
    checks("full")
    with pytest.raises(ValueError, match=name):
        _verify(spoil(_inputs()))
    for level in ("cheap", "off"):
        checks(level)
        tokens, num_accepted = _verify(spoil(_inputs()))
        assert ((tokens >= 0) & (tokens < 20) | (tokens == -1)).all()
        assert ((num_accepted >= 0) & (num_accepted <= 4)).all()


def test_bad_rows_documented_outcome_matches_reference(checks):
    """With checks off, kernels and reference agree on bad rows (their outcome is defined)."""
    checks("off")
    d = _inputs(draft_tokens=torch.tensor([[0, 1, 2, 77], [-5, 0, 0, 0], [0, 0, 0, 0]]),
                draft_lens=torch.tensor([9, 4, -2], dtype=torch.int32))
    d["target_probs"][0, 1] = float("nan")
    d["target_probs"][2, 0] = 0.0
    d["draft_probs"][1, 0, :5] = -1.0
    kernels = _verify(d)
    with specops.use_backend("reference"):
        reference = _verify(d)
    assert torch.equal(kernels[0], reference[0]) and torch.equal(kernels[1], reference[1])
    assert kernels[0][2, 0] == 0  # a row with no positive mass draws token 0


def test_greedy_and_sampling_checks(backend, checks):
    logits = torch.randn(2, 3, 10)
    with pytest.raises(ValueError, match="draft_tokens"):
        specops.chain_verify_greedy(logits, torch.tensor([[0, 10], [0, 0]]))
    with pytest.raises(ValueError, match="draft_lens"):
        specops.chain_verify_greedy(logits, torch.zeros(2, 2, dtype=torch.long),
                                    torch.tensor([3, 0], dtype=torch.int32))
    with pytest.raises(TypeError, match="target_logits"):
        specops.chain_verify_greedy(logits.double(), torch.zeros(2, 2, dtype=torch.long))
    logits[1, 0, 0] = float("nan")
    specops.chain_verify_greedy(logits, torch.zeros(2, 2, dtype=torch.long))
    checks("full")
    with pytest.raises(ValueError, match="target_logits"):
        specops.chain_verify_greedy(logits, torch.zeros(2, 2, dtype=torch.long))
    checks("cheap")
    for kwargs, name in [({"temperature": -1.0}, "temperature"),
                         ({"temperature": float("nan")}, "temperature"),
                         ({"top_k": -2}, "top_k"), ({"top_p": 1.5}, "top_p")]:
        with pytest.raises(ValueError, match=name):
            specops.sampling_probs(torch.randn(2, 10), **kwargs)
    specops.sampling_probs(logits[:, 0])
    checks("full")
    with pytest.raises(ValueError, match="logits"):
        specops.sampling_probs(logits[:, 0])


def test_fuzz_in_subprocess():
    """Random garbage at every check level, in a child process where a crash would show."""
    worker = Path(__file__).with_name("fuzz_worker.py")
    env = dict(os.environ, PYTHONPATH=str(worker.parent))
    result = subprocess.run([sys.executable, str(worker)], capture_output=True, text=True,
                            env=env, timeout=600)
    assert result.returncode == 0, (f"fuzz worker exited with {result.returncode}\n"
                                    f"{result.stdout[-3000:]}\n{result.stderr[-3000:]}")
    assert "fuzzed" in result.stdout
