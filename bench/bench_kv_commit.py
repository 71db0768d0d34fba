"""Benchmark of specops.kv_commit (32 layers x K and V in one call) against per-layer PyTorch.

Providers, timed in one interleaved loop per case (rotating who goes first) so that they
share the machine's noise; every call moves the same slots in place (repeating a commit costs
what the first one did):
  torch-index         BASELINE, what a user writes: for each of the 2*L cache tensors,
                      x[rows, :, dst] = x[rows, :, src] (advanced-index gather, then
                      index_put_). Indices are built once outside the timing, as wide as the
                      largest num_accepted, known on the host for free (a real loop pays a
                      sync to learn it); rows with fewer accepted copy slot dst onto itself.
  torch-gather        the same with x.gather(2, src) and x.scatter_(2, dst, ...) (on the CPU
                      in bf16 far slower than indexing: tens of ms per B=8 tensor)
  specops-reference   specops' pure-PyTorch reference (use_backend("reference"))
  specops-kernel      the default backend: C++ on the CPU, Triton on CUDA

    python bench/bench_kv_commit.py --threads 1     # CPU, the headline cases
    python bench/bench_kv_commit.py --device cuda

Paths are increasing with steps of 1 to 3 from node 2 or 3 (e.g. [2, 3, 5, 6, 8]), so sources
overlap destinations; num_accepted is drawn per row in 4..8. Traffic per call: read and write
sum(num_accepted) * Hkv * D elements per tensor, x 2*L tensors. The caches are torch.zeros
(lazily backed pages) with random values in the tree window only: neither op touches anything
else, and the window stays hot in the CPU caches between repetitions (a real step's forward
pass would evict it). Rows are appended to bench/results/kv_commit_<device>.csv.
"""

import argparse
import datetime
import os
import platform
import shlex
import statistics
import sys
from pathlib import Path

import torch

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]  # this checkout's specops and bench helpers
import specops  # noqa: E402
from bench_ops import git_commit, machine  # noqa: E402
from timing import append_csv, run_case  # noqa: E402

LAYERS, T, HKV, D, S = 32, 64, 8, 128, 2048
CASES = [(1, "float32"), (1, "bfloat16"), (8, "float32"), (8, "bfloat16")]  # (B, dtype)
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
BASELINE = "torch-index"
COLUMNS = ["date", "commit", "machine", "device", "num_threads", "torch", "python", "command",
           "provider", "L", "B", "T", "Hkv", "D", "S", "dtype", "num_accepted", "median_us",
           "p10_us", "p90_us", "reps", "ratio_vs_torch_index", "GB_per_s", "equal_to_baseline",
           "load_avg"]


def make_inputs(batch, dtype, device, gen):
    cache_lens = torch.randint(S // 2, S - T, (batch,), generator=gen, dtype=torch.int32)
    num_accepted = torch.randint(4, 9, (batch,), generator=gen, dtype=torch.int32)
    path = torch.full((batch, T), -1, dtype=torch.int32)
    for b in range(batch):
        steps = torch.randint(1, 4, (int(num_accepted[b]),), generator=gen)
        steps[0] = int(torch.randint(2, 4, (), generator=gen))
        path[b, : int(num_accepted[b])] = steps.cumsum(0).int()
    rows = torch.arange(batch)[:, None]
    window = cache_lens.long()[:, None] + torch.arange(T)  # [B, T] the tree's slots
    kv = []
    for _ in range(2 * LAYERS):
        x = torch.zeros(batch, HKV, S, D, dtype=dtype, device=device)
        x[rows, :, window] = torch.randn(batch, T, HKV, D, generator=gen).to(device, dtype)
        kv.append(x)
    return kv, cache_lens.to(device), path.to(device), num_accepted.to(device)


def providers(kv, cache_lens, path, num_accepted):
    device = kv[0].device
    width = int(num_accepted.max())  # host-side for the baselines only, outside the timing
    k = torch.arange(width, device=device)
    dst = cache_lens.long()[:, None] + 1 + k  # [B, width]
    src = torch.where(k < num_accepted[:, None], cache_lens.long()[:, None] + path[:, :width],
                      dst)  # past num_accepted: copy a slot onto itself
    rows = torch.arange(len(cache_lens), device=device)[:, None]
    shape = (len(cache_lens), HKV, width, D)
    src_g, dst_g = (i[:, None, :, None].expand(shape) for i in (src, dst))

    def torch_index():
        for x in kv:
            x[rows, :, dst] = x[rows, :, src]
        return cache_lens + 1 + num_accepted

    def torch_gather():
        for x in kv:
            x.scatter_(2, dst_g, x.gather(2, src_g))
        return cache_lens + 1 + num_accepted

    def reference():
        with specops.use_backend("reference"):
            return specops.kv_commit(kv, cache_lens, path, num_accepted)

    def kernel():
        return specops.kv_commit(kv, cache_lens, path, num_accepted)

    return {BASELINE: torch_index, "torch-gather": torch_gather, "specops-reference": reference,
            "specops-kernel": kernel}


def check_equal(fns, kv, cache_lens):
    """Runs each provider once from the same cache state; True where its tree window (the
    only slots any of them writes) and new lengths equal the baseline's bit for bit."""
    rows = torch.arange(len(cache_lens), device=kv[0].device)[:, None]
    window = cache_lens.long()[:, None] + torch.arange(T, device=kv[0].device)
    before = [x[rows, :, window].clone() for x in kv]
    results = {}
    for name, fn in fns.items():
        lens = fn()
        results[name] = (lens.clone(), [x[rows, :, window].clone() for x in kv])
        for x, saved in zip(kv, before):
            x[rows, :, window] = saved
    lens0, windows0 = results[BASELINE]
    return {name: bool(torch.equal(lens, lens0)
                       and all(torch.equal(a, b) for a, b in zip(windows, windows0)))
            for name, (lens, windows) in results.items()}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--budget", type=float, default=3.0, help="seconds of timing per case")
    parser.add_argument("--min-reps", type=int, default=10)
    parser.add_argument("--threads", type=int, default=None,
                        help="torch.set_num_threads; on a shared 2-core machine 1 is far "
                             "steadier (a parallel op waits for a preempted thread)")
    parser.add_argument("--csv", default=None)
    parser.add_argument("--no-csv", action="store_true")
    args = parser.parse_args()
    device = args.device
    if args.threads:
        torch.set_num_threads(args.threads)
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "commit": git_commit(), "machine": machine(device), "device": device,
           "num_threads": str(torch.get_num_threads()), "torch": torch.__version__,
           "python": platform.python_version(),
           "command": "python " + " ".join(shlex.quote(a) for a in sys.argv)}
    rows = []
    for batch, dtype_name in CASES:
        gen = torch.Generator().manual_seed(batch)
        kv, cache_lens, path, num_accepted = make_inputs(batch, DTYPES[dtype_name], device, gen)
        fns = providers(kv, cache_lens, path, num_accepted)
        equal = check_equal(fns, kv, cache_lens)
        load = f"{os.getloadavg()[0]:.2f}"
        times = run_case(fns, device, args.budget, args.min_reps)
        # read + write of every moved entry, in every tensor
        moved_bytes = 2 * len(kv) * int(num_accepted.sum()) * HKV * D * kv[0].element_size()
        accepted = " ".join(map(str, num_accepted.tolist()))
        baseline = statistics.median(times[BASELINE])
        for name, ts in times.items():
            q10, *_, q90 = statistics.quantiles(ts, n=10, method="inclusive")
            median = statistics.median(ts)
            rows.append(dict(env, provider=name, L=LAYERS, B=batch, T=T, Hkv=HKV, D=D, S=S,
                             dtype=dtype_name, num_accepted=accepted, median_us=f"{median:.1f}",
                             p10_us=f"{q10:.1f}", p90_us=f"{q90:.1f}", reps=len(ts),
                             ratio_vs_torch_index=f"{baseline / median:.2f}",
                             GB_per_s=f"{moved_bytes / median / 1e3:.2f}",
                             equal_to_baseline=equal[name], load_avg=load))
            print(f"{dtype_name:8} B={batch} accepted=[{accepted}]  {name:17} "
                  f"{median:9.1f} us (p10 {q10:.1f}, p90 {q90:.1f}, {len(ts)} reps)  "
                  f"x{baseline / median:.2f} vs {BASELINE}  {moved_bytes / median / 1e3:.2f} "
                  f"GB/s  equal={equal[name]}  load {load}")
        del kv, fns
    if not args.no_csv:
        path = Path(args.csv or ROOT / "bench" / "results" / f"kv_commit_{device}.csv")
        append_csv(path, COLUMNS, rows)


if __name__ == "__main__":
    main()
