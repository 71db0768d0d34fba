"""Interleaved timing and CSV appending shared by bench_tree_attention.py, bench_kv_commit.py
and bench_linear.py."""

import time

import torch


def clock(fn, device: str) -> float:
    """One call of ``fn`` in microseconds (CUDA events on a GPU, perf_counter on the CPU)."""
    if device == "cuda":
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        return start.elapsed_time(end) * 1e3
    t = time.perf_counter_ns()
    fn()
    return (time.perf_counter_ns() - t) / 1e3


def run_case(fns: dict, device: str, budget_s: float, min_reps: int) -> dict[str, list[float]]:
    """Times every provider in ``fns`` for at least ``min_reps`` rounds and ``budget_s``
    seconds; providers alternate within a round, rotating who goes first, so they share the
    machine's noise."""
    for fn in fns.values():  # warm-up: JIT, page faults, caches, thread pools
        fn()
        fn()
    names = list(fns)
    times = {name: [] for name in names}
    deadline = time.monotonic() + budget_s
    rep = 0
    while rep < min_reps or time.monotonic() < deadline:
        for i in range(len(names)):
            name = names[(rep + i) % len(names)]
            times[name].append(clock(fns[name], device))
        rep += 1
    return times


def append_csv(path, columns: list[str], rows: list[dict]) -> None:
    """Appends ``rows`` to the CSV at ``path`` (a header first when the file is new)."""
    import csv
    from pathlib import Path

    path = Path(path)
    new = not path.exists()
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=columns)
        if new:
            writer.writeheader()
        writer.writerows(rows)
    print(f"appended {len(rows)} rows to {path}")
