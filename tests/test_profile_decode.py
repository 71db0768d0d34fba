"""bench/profile_decode.py on the CPU at tiny shapes: the rows it writes and its refusals."""

import json
import sys
from pathlib import Path

import pytest

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import profile_decode  # noqa: E402


def test_tiny_profile_on_cpu(tmp_path, capsys):
    path = profile_decode.main([
        "--tiny", "--device", "cpu", "--modes", "specops-plain,hf-eager", "--new-tokens", "4",
        "--prompt-len", "8", "--reps", "1", "--top", "3", "--out", str(tmp_path)])
    data = json.loads(path.read_text())
    assert path.name.startswith("profile_qwen2.5-1.5b_tiny_")
    assert [r["mode"] for r in data["rows"]] == ["specops-plain", "hf-eager"]
    for row in data["rows"]:
        # no device kernels on the CPU: the busiest CPU operators instead
        assert row["gpu_ms"] is None and row["cpu_ops_per_token"] > 1
        assert row["wall_ms"] > 0 and len(row["top"]) == 3
        assert abs(row["tokens_per_s"] * row["wall_ms"] / 1e3 - 1) < 1e-6
    assert data["header"]["tiny"] and data["header"]["new_tokens"] == 4
    assert "specops-plain " in capsys.readouterr().out


def test_cuda_only_modes_are_refused_on_the_cpu(capsys):
    with pytest.raises(SystemExit):
        profile_decode.parse_args(["--device", "cpu", "--modes", "specops-plain-graphs"])
    assert "need CUDA" in capsys.readouterr().err
    defaults = profile_decode.parse_args(["--device", "cpu"]).modes
    assert defaults == ["specops-plain", "hf-eager"]
