"""Where a plain-decoding call's time goes: device kernel time against wall time, per token.

The first GPU run (an H200, 2026-11-27) measured specops plain decoding with CUDA graphs at
6.2 ms a token against 3.9 ms for Hugging Face's compiled static-cache ``generate``, but not
why. This script profiles one call of each mode (after the untimed calls that compile and
capture) with ``torch.profiler`` and reports, per new token: the wall time, the summed time
of the device kernels (``gpu_ms``; the GPU's busy time if kernels do not overlap, as in one
stream), the kernels launched, and the busiest kernels. ``gpu_ms`` far under ``wall_ms``
means the host (Python, launches, syncs) sets the pace; ``gpu_ms`` near it means the kernels
do, and their count and names say which fusions would pay.

Modes (``--modes``, default all that apply):
- ``specops-plain``: specops plain decoding (draft length 0), eager;
- ``specops-plain-graphs``: the same with ``cuda_graphs=True`` (CUDA only);
- ``specops-plain-graphs-unfused``: the same with the layer's elementwise work as PyTorch ops
  (``layer_kernels="torch"``) instead of the fused Triton layer kernels (CUDA only);
- ``specops-plain-graphs-compiled``: also ``compile=True`` (CUDA only; ``--modes
  specops-plain-compiled`` runs compile without graphs, on the CPU too);
- ``hf-static-compiled``: transformers ``generate`` with a static cache, compiled by
  transformers (CUDA only); ``hf-eager``: its dynamic-cache eager path.

The models are bench_gpu_e2e.py's (random weights at real shapes, ``--pair``, ``--tiny``).
On the CPU there are no device kernels: ``gpu_ms`` is empty and the busiest operators by CPU
time are listed instead (a check of the script in seconds with ``--tiny --device cpu``).

    python bench/profile_decode.py --pair qwen2.5-1.5b --out /tmp/profile
    python bench/profile_decode.py --tiny --device cpu --modes specops-plain,hf-eager

Output: ``profile_<pair>_<UTC date-time>.json`` in ``--out`` (default bench/results/gpu_e2e/)
and a table on stdout.
"""

import argparse
import datetime
import json
import shlex
import sys
import time
from pathlib import Path

import torch

BENCH = Path(__file__).resolve().parent
sys.path[:0] = [str(BENCH.parent), str(BENCH)]

import bench_gpu_e2e as e2e  # noqa: E402
import specops  # noqa: E402
from specops.models import SpecopsCausalLM  # noqa: E402
from bench_ops import git_commit, machine  # noqa: E402

MODES = ("specops-plain", "specops-plain-graphs", "specops-plain-graphs-unfused",
         "specops-plain-graphs-compiled", "specops-plain-compiled", "hf-eager",
         "hf-static-compiled")
CUDA_ONLY = {"specops-plain-graphs", "specops-plain-graphs-unfused",
             "specops-plain-graphs-compiled", "hf-static-compiled"}


def make_call(mode: str, target, prompts: torch.Tensor, new_tokens: int):
    """``(call, warm-up calls)`` for ``mode``: ``call()`` generates ``new_tokens`` per row."""
    if mode.startswith("hf-"):
        kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                      num_beams=1, pad_token_id=0, attention_mask=torch.ones_like(prompts))
        if mode == "hf-static-compiled":
            kwargs.update(cache_implementation="static")
        return (lambda: target.generate(prompts, **kwargs)), 2
    if "unfused" in mode:   # the layer as PyTorch ops, not the fused Triton layer kernels
        target = SpecopsCausalLM(target, layer_kernels="torch")
    gen = specops.SpeculativeGenerator(target, eos_token_id=[],
                                       cuda_graphs="graphs" in mode, compile="compiled" in mode)
    return (lambda: gen.generate(prompts, max_new_tokens=new_tokens)), 2


def device_events(prof) -> list:
    """The profile's device kernels (none on the CPU)."""
    return [e for e in prof.events()
            if e.device_type == torch.autograd.DeviceType.CUDA and e.device_time_total > 0]


def profile_mode(mode: str, target, prompts: torch.Tensor, args) -> dict:
    call, warmups = make_call(mode, target, prompts, args.new_tokens)
    start = time.perf_counter()
    for _ in range(warmups):   # compiles, captures, allocates
        call()
    e2e.sync(args.device)
    warm_seconds = time.perf_counter() - start
    wall = min(e2e.timed(call, args.device) for _ in range(args.reps))
    activities = [torch.profiler.ProfilerActivity.CPU]
    if args.device.startswith("cuda"):
        activities.append(torch.profiler.ProfilerActivity.CUDA)
    with torch.profiler.profile(activities=activities) as prof:
        call()
        e2e.sync(args.device)
    tokens = prompts.shape[0] * args.new_tokens
    kernels = device_events(prof)
    row = dict(mode=mode, wall_ms=1e3 * wall / tokens, warm_seconds=warm_seconds,
               tokens_per_s=tokens / wall)
    if kernels:
        totals: dict[str, list[float]] = {}
        for e in kernels:
            totals.setdefault(e.name, []).append(e.device_time_total)
        busy_us = sum(sum(v) for v in totals.values())
        row.update(gpu_ms=busy_us / 1e3 / tokens, kernels_per_token=len(kernels) / tokens,
                   gpu_share=busy_us / 1e6 / wall, top=[
                       dict(name=name[:90], ms_per_token=sum(v) / 1e3 / tokens,
                            calls_per_token=len(v) / tokens)
                       for name, v in sorted(totals.items(), key=lambda kv: -sum(kv[1]))
                       [:args.top]])
    else:
        averages = sorted(prof.key_averages(), key=lambda a: -a.self_cpu_time_total)
        row.update(gpu_ms=None, kernels_per_token=None, gpu_share=None,
                   cpu_ops_per_token=sum(a.count for a in averages) / tokens, top=[
                       dict(name=a.key[:90], ms_per_token=a.self_cpu_time_total / 1e3 / tokens,
                            calls_per_token=a.count / tokens) for a in averages[:args.top]])
    return row


def print_row(row: dict) -> None:
    gpu = "-" if row["gpu_ms"] is None else f"{row['gpu_ms']:.3f}"
    count = row["kernels_per_token"] if row["kernels_per_token"] is not None else \
        row["cpu_ops_per_token"]
    what = "kernels" if row["gpu_ms"] is not None else "CPU ops"
    print(f"{row['mode']:32s} wall {row['wall_ms']:8.3f} ms/token  kernels {gpu:>8s} ms/token  "
          f"{count:7.1f} {what}/token  ({row['tokens_per_s']:.1f} tok/s)", flush=True)
    for t in row["top"]:
        print(f"    {t['ms_per_token']:8.4f} ms/token {t['calls_per_token']:6.1f}x  {t['name']}")


def parse_args(argv=None):
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--pair", choices=sorted(e2e.PAIRS), default="qwen2.5-1.5b")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU check)")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   help="default bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--modes", help=f"comma-separated, of {', '.join(MODES)}")
    p.add_argument("--new-tokens", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=128)
    p.add_argument("--reps", type=int, default=3, help="timed calls (the fastest is kept)")
    p.add_argument("--top", type=int, default=12, help="busiest kernels (or ops) listed")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=BENCH / "results" / "gpu_e2e")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    cuda = args.device.startswith("cuda")
    if args.modes:
        args.modes = [m.strip() for m in args.modes.split(",") if m.strip()]
        unknown = [m for m in args.modes if m not in MODES]
        if unknown:
            p.error(f"unknown modes {unknown}; choose from {', '.join(MODES)}")
        if not cuda and CUDA_ONLY & set(args.modes):
            p.error(f"{sorted(CUDA_ONLY & set(args.modes))} need CUDA")
    else:
        args.modes = [m for m in MODES if m != "specops-plain-compiled" and
                      (cuda or m not in CUDA_ONLY)]
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    family, target_name, _ = e2e.PAIRS[args.pair]
    shape = dict(e2e.SHAPES[target_name], **(e2e.TINY if args.tiny else {}))
    target = e2e.build_model(family, shape, getattr(torch, args.dtype), args.device, args.seed,
                             True, args.prompt_len + args.new_tokens + 64)
    generator = torch.Generator().manual_seed(args.seed)
    prompts = torch.randint(0, shape["vocab_size"], (1, args.prompt_len),
                            generator=generator).to(args.device)
    rows = []
    for mode in args.modes:
        rows.append(profile_mode(mode, target, prompts, args))
        print_row(rows[-1])
    now = datetime.datetime.now(datetime.timezone.utc)
    header = dict(command=" ".join(["python", *map(shlex.quote, sys.argv)]),
                  date=now.isoformat(timespec="seconds"), git_commit=git_commit(),
                  machine=machine("cuda" if args.device.startswith("cuda") else "cpu"),
                  torch=torch.__version__, pair=args.pair, tiny=args.tiny, dtype=args.dtype,
                  new_tokens=args.new_tokens, prompt_len=args.prompt_len, reps=args.reps)
    args.out.mkdir(parents=True, exist_ok=True)
    path = args.out / f"profile_{args.pair}{'_tiny' if args.tiny else ''}_" \
                      f"{now.strftime('%Y%m%dT%H%M%SZ')}.json"
    path.write_text(json.dumps(dict(header=header, rows=rows), indent=1))
    print(f"wrote {path}")
    return path


if __name__ == "__main__":
    main()
