"""Benchmark of specops.tree_attention against torch SDPA with an explicit tree mask.

Providers, timed in one interleaved loop per case (rotating who goes first) so that they
share the machine's noise:
  sdpa-mask           BASELINE: F.scaled_dot_product_attention(q, k, v, attn_mask, enable_gqa)
                      over slots [0, prefix + T) with the [B, 1, T, prefix + T] bool mask
                      [ones(T, prefix) | tree mask], built once outside the timing
  specops-reference   specops' pure-PyTorch reference (use_backend("reference"))
  specops-kernel      the default backend: C++ on the CPU, Triton on CUDA

    python bench/bench_tree_attention.py                 # CPU, the headline cases
    python bench/bench_tree_attention.py --device cuda

Traffic per call: K and V of the prefix and tree block, B*Hkv*(prefix+T)*D*2 elements, q and
out B*T*H*D each. Rows are appended to bench/results/tree_attention_<device>.csv.
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
import torch.nn.functional as F

# This checkout's specops (not another installed copy), and bench_ops' record helpers.
sys.path[:0] = [str(Path(__file__).resolve().parent.parent), str(Path(__file__).resolve().parent)]
from bench_ops import git_commit, machine  # noqa: E402
from timing import append_csv, run_case  # noqa: E402

import specops  # noqa: E402
from specops.reference.tree import tree_metadata_ref  # noqa: E402

ROOT = Path(__file__).resolve().parent.parent
CASES = [  # B, T, H, Hkv, D, prefix
    (1, 8, 32, 8, 128, 1024),
    (1, 64, 32, 8, 128, 1024),
    (4, 16, 32, 8, 128, 2048),
]
# The grid: 8B-model heads, prefix 1k/4k/16k, T in {1, 8, 64}, B in {1, 8} (--grid).
GRID = [(batch, nodes, 32, 8, 128, prefix) for batch in (1, 8) for nodes in (1, 8, 64)
        for prefix in (1024, 4096, 16384)]
DTYPES = {"float32": torch.float32, "bfloat16": torch.bfloat16}
COLUMNS = ["date", "commit", "machine", "device", "num_threads", "torch", "triton", "python",
           "command", "provider", "B", "T", "H", "Hkv", "D", "prefix", "dtype", "median_us",
           "p10_us", "p90_us", "reps", "ratio_vs_sdpa", "max_abs_err_vs_ref", "load_avg"]


def make_inputs(batch, num_nodes, heads, kv_heads, head_dim, prefix, dtype, device):
    gen = torch.Generator().manual_seed(0)
    parents = (torch.rand(batch, num_nodes, generator=gen) * torch.arange(num_nodes)).int()
    parents[:, 0] = -1
    mask, _ = tree_metadata_ref(parents, torch.full((batch,), num_nodes, dtype=torch.int32))
    slots = prefix + num_nodes
    q = torch.randn(batch, num_nodes, heads, head_dim, generator=gen).to(device, dtype)
    k = torch.randn(batch, kv_heads, slots, head_dim, generator=gen).to(device, dtype)
    v = torch.randn(batch, kv_heads, slots, head_dim, generator=gen).to(device, dtype)
    cache_lens = torch.full((batch,), prefix, dtype=torch.int32, device=device)
    full_mask = torch.cat([torch.ones(batch, num_nodes, prefix, dtype=torch.bool), mask], -1)
    return q, k, v, cache_lens, mask.to(device), full_mask[:, None].to(device)


def providers(q, k, v, cache_lens, mask, full_mask):
    q_heads_first = q.transpose(1, 2)

    def sdpa():
        return F.scaled_dot_product_attention(q_heads_first, k, v, attn_mask=full_mask,
                                              enable_gqa=True).transpose(1, 2)

    def reference():
        with specops.use_backend("reference"):
            return specops.tree_attention(q, k, v, cache_lens, mask)

    def kernel():
        return specops.tree_attention(q, k, v, cache_lens, mask)

    return {"sdpa-mask": sdpa, "specops-reference": reference, "specops-kernel": kernel}


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--device", default="cpu")
    parser.add_argument("--budget", type=float, default=4.0, help="seconds of timing per case")
    parser.add_argument("--min-reps", type=int, default=10)
    parser.add_argument("--csv", default=None)
    parser.add_argument("--no-csv", action="store_true")
    parser.add_argument("--grid", action="store_true",
                        help="the full grid (B 1/8 x T 1/8/64 x prefix 1k/4k/16k) instead of "
                             "the three headline cases")
    args = parser.parse_args()
    device = args.device
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "commit": git_commit(), "machine": machine(device), "device": device,
           "num_threads": str(torch.get_num_threads()), "torch": torch.__version__,
           "triton": triton_version, "python": platform.python_version(),
           "command": "python " + " ".join(shlex.quote(a) for a in sys.argv)}
    rows = []
    for dtype_name, dtype in DTYPES.items():
        for case in GRID if args.grid else CASES:
            inputs = make_inputs(*case, dtype, device)
            fns = providers(*inputs)
            with specops.use_backend("reference"):
                expected = specops.tree_attention(*inputs[:5]).float()
            errors = {name: (fn().float() - expected).abs().max().item()
                      for name, fn in fns.items()}
            load = f"{os.getloadavg()[0]:.2f}"
            times = run_case(fns, device, args.budget, args.min_reps)
            baseline = statistics.median(times["sdpa-mask"])
            for name, ts in times.items():
                q10, _, _, _, _, _, _, _, q90 = statistics.quantiles(ts, n=10)
                median = statistics.median(ts)
                row = dict(env, provider=name, B=case[0], T=case[1], H=case[2], Hkv=case[3],
                           D=case[4], prefix=case[5], dtype=dtype_name,
                           median_us=f"{median:.1f}", p10_us=f"{q10:.1f}", p90_us=f"{q90:.1f}",
                           reps=len(ts), ratio_vs_sdpa=f"{baseline / median:.2f}",
                           max_abs_err_vs_ref=f"{errors[name]:.2g}", load_avg=load)
                rows.append(row)
                print(f"{dtype_name:8} B={case[0]} T={case[1]:3} H={case[2]} Hkv={case[3]} "
                      f"D={case[4]} prefix={case[5]:5}  {name:18} {median:10.1f} us "
                      f"(p10 {q10:.1f}, p90 {q90:.1f}, {len(ts)} reps)  x{baseline / median:.2f}"
                      f" vs sdpa  err {errors[name]:.2g}  load {load}")
    if not args.no_csv:
        path = Path(args.csv or ROOT / "bench" / "results" / f"tree_attention_{device}.csv")
        append_csv(path, COLUMNS, rows)


if __name__ == "__main__":
    main()
