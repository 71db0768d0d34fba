"""bench/profile_decode.py on the CPU at tiny shapes: the rows it writes and its refusals."""

import json
import sys
from pathlib import Path

import pytest
import torch

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


def test_unfused_mode_runs_the_layer_as_pytorch_ops(monkeypatch):
    """The unfused mode's generator wraps the target with layer_kernels="torch" (checked
    here, where it runs eagerly: its graphs and the fused kernels are CUDA's)."""
    from loop_models import tiny_model

    import specops
    wrapped = []
    original = specops.SpeculativeGenerator.__init__

    def spy(self, target, *args, **kwargs):
        wrapped.append(target)
        original(self, target, *args, **kwargs)
    monkeypatch.setattr(specops.SpeculativeGenerator, "__init__", spy)
    model = tiny_model("qwen2")
    prompts = torch.tensor([[3, 4, 5, 6]])
    plain, _ = profile_decode.make_call("specops-plain", model, prompts, 4)
    unfused, _ = profile_decode.make_call("specops-plain-graphs-unfused", model, prompts, 4)
    assert wrapped[0] is model
    assert wrapped[1].layer_kernels == "torch" and wrapped[1].hf_model is model
    assert unfused().sequences.tolist() == plain().sequences.tolist()
