"""CPU float32 linear layers for a few rows: specops.skinny_linear against torch's F.linear.

Part "layers": the Qwen2.5-1.5B projection shapes (in_features K x out_features N: q/o
1536x1536, k/v 1536x256, gate/up 1536x8960, down 8960x1536, lm_head 1536x151936) for
M = 1, 2, 4, 5, 9, 16 rows (tokens in a verify step). Providers, interleaved in one timing
loop so they share the machine's noise: F.linear on the M rows, skinny_linear on them, and
F.linear on one row (the GEMV a plain decoding step pays). A skinny linear should cost about
one read of the weight (N * K * 4 bytes) whatever M, i.e. ratio_vs_gemv near 1; from about
M = 5 the M * N * K FMAs take longer than that read on this kind of CPU.

Part "forward": the whole Qwen2.5-Coder-1.5B forward through specops.models for T = 1, 2, 5,
9 new tokens over a 128-token cache, with every projection on F.linear ("f_linear", before)
or through specops' routing ("skinny_linear", after). Needs the converted model in
~/.cache/specops/models/qwen2.5-coder-1.5b-instruct (about 7 GB of RAM while it runs).

Rows are appended to bench/results/linear_cpu.csv with the date, machine, versions and this
command. The machine may be shared: compare ratios from one run, and rerun when load_avg
(the 1-minute load when the case started) exceeds the number of threads used elsewhere.

    python bench/bench_linear.py --threads 1 2          # both parts
    python bench/bench_linear.py --part layers --threads 1 --budget 1
"""

import argparse
import datetime
import gc
import os
import platform
import shlex
import statistics
import sys
from pathlib import Path

import torch
import torch.nn.functional as F

ROOT = Path(__file__).resolve().parent.parent
sys.path[:0] = [str(ROOT), str(ROOT / "bench")]  # this checkout's specops and bench helpers
import specops  # noqa: E402
import specops.models  # noqa: E402
import specops.models.llama as llama  # noqa: E402
from bench_ops import git_commit, machine  # noqa: E402
from timing import append_csv, run_case  # noqa: E402

SHAPES = [(1536, 1536, "q_proj/o_proj"), (1536, 256, "k_proj/v_proj"),
          (1536, 8960, "gate_proj/up_proj"), (8960, 1536, "down_proj"),
          (1536, 151936, "lm_head")]
ROWS = [1, 2, 4, 5, 9, 16]
TOKENS = [1, 2, 5, 9]
MODEL_DIR = "~/.cache/specops/models/qwen2.5-coder-1.5b-instruct"
PREFIX = 128  # cached tokens before the T new ones
COLUMNS = ["date", "commit", "machine", "device", "num_threads", "torch", "python", "command",
           "part", "provider", "layer", "K", "N", "M", "median_us", "p10_us", "p90_us", "reps",
           "ratio_vs_f_linear", "ratio_vs_one_row", "ratio_vs_gemv", "weight_GB_per_s",
           "max_abs_diff_vs_f_linear", "load_avg"]


def summary(ts: list[float]) -> tuple[float, float, float]:
    q10, *_, q90 = statistics.quantiles(ts, n=10, method="inclusive")
    return statistics.median(ts), q10, q90


def bench_layers(env: dict, args) -> list[dict]:
    rows = []
    for k, n, layer in SHAPES:
        gen = torch.Generator().manual_seed(k + n)
        weight = torch.randn(n, k, generator=gen) / k ** 0.5
        bias = torch.randn(n, generator=gen) if layer == "k_proj/v_proj" else None
        one = torch.randn(1, k, generator=gen)
        skinny_m1 = None
        for m in ROWS:
            x = torch.randn(m, k, generator=gen)
            diff = (specops.skinny_linear(x, weight, bias) - F.linear(x, weight, bias)).abs()
            fns = {"f_linear": lambda: F.linear(x, weight, bias),
                   "skinny_linear": lambda: specops.skinny_linear(x, weight, bias),
                   "gemv": lambda: F.linear(one, weight, bias)}
            load = os.getloadavg()[0]
            times = run_case(fns, "cpu", args.budget, args.min_reps)
            med = {name: summary(ts)[0] for name, ts in times.items()}
            if m == 1:
                skinny_m1 = med["skinny_linear"]
            one_row = {"f_linear": med["gemv"], "skinny_linear": skinny_m1, "gemv": med["gemv"]}
            for name in ("f_linear", "skinny_linear", "gemv"):
                median, q10, q90 = summary(times[name])
                rows.append(dict(env, part="layers", provider=name, layer=layer, K=k, N=n, M=m,
                                 median_us=f"{median:.1f}", p10_us=f"{q10:.1f}",
                                 p90_us=f"{q90:.1f}", reps=len(times[name]),
                                 ratio_vs_f_linear=f"{med['f_linear'] / median:.2f}",
                                 ratio_vs_one_row=f"{median / one_row[name]:.2f}",
                                 ratio_vs_gemv=f"{median / med['gemv']:.2f}",
                                 weight_GB_per_s=f"{n * k * 4 / median / 1e3:.1f}",
                                 max_abs_diff_vs_f_linear=(f"{diff.max():.2g}"
                                                           if name == "skinny_linear" else ""),
                                 load_avg=f"{load:.2f}"))
            print(f"{layer:18} K={k:5} N={n:6} M={m:2}  F.linear {med['f_linear'] / 1e3:8.2f} ms"
                  f"  skinny {med['skinny_linear'] / 1e3:8.2f} ms  gemv(M=1) "
                  f"{med['gemv'] / 1e3:8.2f} ms  skinny/gemv "
                  f"{med['skinny_linear'] / med['gemv']:.2f}  F.linear/skinny "
                  f"{med['f_linear'] / med['skinny_linear']:.2f}  load {load:.2f}", flush=True)
        del weight
    return rows


def f_linear(x, proj):
    return F.linear(x, proj.weight, proj.bias)


def bench_forward(args) -> list[dict]:
    """One model load for every thread count (it takes ~7 GB; never two at once)."""
    import transformers

    path = os.path.expanduser(MODEL_DIR)
    model = transformers.AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    model.eval()
    lm = specops.models.causal_lm(model)
    routed = llama._linear
    cache = lm.new_cache(batch_size=1, capacity=PREFIX + max(TOKENS))
    gen = torch.Generator().manual_seed(0)
    rows = []
    try:
        prompt = torch.randint(0, lm.vocab_size, (1, PREFIX), generator=gen)
        lm(prompt, cache, torch.zeros(1, dtype=torch.int32),
           torch.arange(PREFIX).unsqueeze(0), prefill=True)
        cache_lens = torch.tensor([PREFIX], dtype=torch.int32)
        for threads in args.threads:
            env = make_env(threads)
            rows += forward_cases(lm, cache, cache_lens, routed, env, args, gen)
    finally:
        llama._linear = routed
        del lm, model, cache
        gc.collect()
    return rows


def forward_cases(lm, cache, cache_lens, routed, env, args, gen) -> list[dict]:
    rows, one_row = [], {}
    for t in TOKENS:
        tokens = torch.randint(0, lm.vocab_size, (1, t), generator=gen)
        positions = torch.arange(PREFIX, PREFIX + t).unsqueeze(0)

        def run(linear):
            llama._linear = linear
            try:  # rewrites the same T slots of the cache every call
                return lm(tokens, cache, cache_lens, positions)
            finally:
                llama._linear = routed

        diff = (run(routed) - run(f_linear)).abs().max()
        fns = {"f_linear": lambda: run(f_linear), "skinny_linear": lambda: run(routed)}
        load = os.getloadavg()[0]
        times = run_case(fns, "cpu", args.forward_budget, args.forward_reps)
        med = {name: summary(ts)[0] for name, ts in times.items()}
        if t == 1:
            one_row = dict(med)
        for name in fns:
            median, q10, q90 = summary(times[name])
            rows.append(dict(env, part="forward", provider=name,
                             layer="Qwen2.5-Coder-1.5B forward", K="", N="", M=t,
                             median_us=f"{median:.1f}", p10_us=f"{q10:.1f}",
                             p90_us=f"{q90:.1f}", reps=len(times[name]),
                             ratio_vs_f_linear=f"{med['f_linear'] / median:.2f}",
                             ratio_vs_one_row=f"{median / one_row[name]:.2f}",
                             ratio_vs_gemv=f"{median / one_row['f_linear']:.2f}",
                             weight_GB_per_s="",
                             max_abs_diff_vs_f_linear=(f"{diff:.2g}"
                                                       if name == "skinny_linear" else ""),
                             load_avg=f"{load:.2f}"))
        print(f"forward T={t}  F.linear {med['f_linear'] / 1e3:7.1f} ms "
              f"(x{med['f_linear'] / one_row['f_linear']:.2f} of T=1)  skinny "
              f"{med['skinny_linear'] / 1e3:7.1f} ms "
              f"(x{med['skinny_linear'] / one_row['skinny_linear']:.2f} of T=1)  "
              f"max |logit diff| {diff:.2g}  load {load:.2f}", flush=True)
    return rows


def make_env(threads: int) -> dict:
    """Sets the thread count; the columns every row of this run shares."""
    torch.set_num_threads(threads)
    env = {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
           "commit": git_commit(), "machine": machine("cpu"), "device": "cpu",
           "num_threads": str(torch.get_num_threads()), "torch": torch.__version__,
           "python": platform.python_version(),
           "command": "python " + " ".join(shlex.quote(a) for a in sys.argv)}
    print(f"--- {threads} thread(s), {env['machine']}, torch {torch.__version__}", flush=True)
    return env


def main():
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--part", choices=["layers", "forward", "all"], default="all")
    parser.add_argument("--threads", type=int, nargs="+", default=[1, 2])
    parser.add_argument("--budget", type=float, default=1.0,
                        help="seconds of timing per layer case")
    parser.add_argument("--min-reps", type=int, default=10)
    parser.add_argument("--forward-budget", type=float, default=8.0,
                        help="seconds of timing per forward case")
    parser.add_argument("--forward-reps", type=int, default=5)
    parser.add_argument("--csv", default=None)
    parser.add_argument("--no-csv", action="store_true")
    args = parser.parse_args()
    rows = []
    with torch.no_grad():
        if args.part in ("layers", "all"):
            for threads in args.threads:
                rows += bench_layers(make_env(threads), args)
        if args.part in ("forward", "all"):
            rows += bench_forward(args)
    if not args.no_csv:
        path = Path(args.csv or ROOT / "bench" / "results" / "linear_cpu.csv")
        append_csv(path, COLUMNS, rows)


if __name__ == "__main__":
    main()
