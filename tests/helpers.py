"""Small helpers shared by the tests."""

import contextlib

import torch

DEVICES = ["cpu"] + (["cuda"] if torch.cuda.is_available() else [])


def assert_equal_rows(actual: torch.Tensor, expected: torch.Tensor, what: str = "") -> None:
    """Exact equality, printing the first mismatching rows (Liger-Kernel style)."""
    assert actual.shape == expected.shape, f"{what}: shape {actual.shape} != {expected.shape}"
    if torch.equal(actual, expected):
        return
    rows = (actual != expected).reshape(actual.shape[0], -1).any(-1).nonzero().flatten()[:5]
    lines = [f"row {int(r)}: got {actual[r].tolist()} expected {expected[r].tolist()}" for r in rows]
    raise AssertionError(f"{what}: {len(rows)}+ rows differ\n" + "\n".join(lines))


def random_chain_inputs(batch: int, num_draft: int, vocab: int, generator: torch.Generator,
                        with_draft_probs: bool = True, device: str = "cpu"):
    """Softmax rows for target and draft, drafts sampled from q, ragged lengths."""
    def rows(*shape):
        return (torch.randn(*shape, generator=generator) * 2).softmax(-1)
    target = rows(batch, num_draft + 1, vocab)
    draft = rows(batch, num_draft, vocab)
    if num_draft:
        tokens = torch.multinomial(draft.reshape(-1, vocab), 1, generator=generator)
        tokens = tokens.reshape(batch, num_draft)
    else:
        tokens = torch.zeros(batch, 0, dtype=torch.int64)
    lens = torch.randint(0, num_draft + 1, (batch,), generator=generator, dtype=torch.int32)
    seeds = torch.randint(-2**62, 2**62, (batch,), generator=generator)
    positions = torch.randint(0, 2**40, (batch,), generator=generator)
    out = dict(target_probs=target, draft_tokens=tokens,
               draft_probs=draft if with_draft_probs else None, draft_lens=lens,
               seeds=seeds, positions=positions)
    return {k: (v.to(device) if v is not None else None) for k, v in out.items()}


def assert_compiles_for_hopper(script: str, timeout: int = 600) -> None:
    """Runs ``script`` (which compiles Triton kernels for sm_90 and prints "compiled") in a
    child process without TRITON_INTERPRET, so code the interpreter accepts but Triton's real
    compiler (its own ptxas, no GPU needed) rejects fails in CI rather than on a GPU."""
    import os
    import subprocess
    import sys

    import pytest

    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    env["TRITON_DEFAULT_FP_FUSION"] = env.get("TRITON_DEFAULT_FP_FUSION", "1")
    root = os.path.dirname(os.path.dirname(os.path.abspath(__file__)))
    result = subprocess.run([sys.executable, "-c", script], env=env, cwd=root,
                            capture_output=True, text=True, timeout=timeout)
    if "No module named" in result.stderr and "backends" in result.stderr:
        pytest.skip("this Triton build has no NVIDIA backend")
    assert result.returncode == 0 and "compiled" in result.stdout, result.stderr[-4000:]


@contextlib.contextmanager
def check_level(level: int):
    """The C++ kernels' check level, 0 off, 1 cheap (the default), 2 full, for one block;
    always restores the default."""
    import specops

    specops._C.set_check_level(level)
    try:
        yield
    finally:
        specops._C.set_check_level(1)
