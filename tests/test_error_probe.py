"""bench/error_probe.py: each bad-input case in a child process, crashes told apart from
errors (it is how a GPU machine run diagnoses the C++ kernels crashing instead of raising)."""

import sys
from pathlib import Path

sys.path.insert(0, str(Path(__file__).resolve().parent.parent / "bench"))
import error_probe  # noqa: E402


def test_every_case_raises_here(capsys):
    assert error_probe.main([]) == 0
    out = capsys.readouterr().out
    for name in error_probe.CASES:
        kind = name.split()[0]
        assert f"{name}: raised {kind}: " in out, out
    assert "_C." in out   # the loaded-libraries listing found the extension
    # numbers in a C++ error message come out whole: a second C++ runtime in _C (libstdc++
    # linked statically) cuts the message at its first number with GCC 12
    # (cmake/check_cxx_runtime.cmake)
    assert "must have 3 dims, got shape [4, 16]" in out, out
    assert "C++ runtime: one" in out, out


def test_a_crash_is_reported_and_fails(capsys, monkeypatch):
    monkeypatch.setattr(error_probe, "CASES", {
        "crash": "import os, signal; os.kill(os.getpid(), signal.SIGSEGV)",
        "fine": "OPS.chain_verify_greedy(logits, tokens, lens)",
    })
    assert error_probe.main([]) == 1
    out = capsys.readouterr().out
    assert "crash: crashed: signal 11" in out and "fine: no error" in out, out
