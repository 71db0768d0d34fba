"""Op benchmark of specops: chain verification against the plain PyTorch it replaces.

Providers, timed in one interleaved loop per case so they share the machine's noise:
  torch-multinomial   BASELINE: the batched equivalent of Hugging Face's _speculative_sampling
  torch-exprace       BASELINE: the same accept test, then a sync-free exponential race
  torch-argmax        BASELINE (greedy): argmax over every row, compare, cumprod
  specops-reference   specops' pure-PyTorch reference (use_backend("reference"))
  specops-cpu         specops' C++ kernels (default backend on the CPU)
  specops-triton      specops' Triton kernels (default backend on CUDA)
On CUDA every provider except the reference is also timed as a replayed CUDA graph
("+graph"), and the ratios there are against the graphed baselines. The "floor" is a
``sum()`` over as many contiguous float32 values as the op must read at the least.

    python bench/bench_ops.py --quick                # subset, < 3 min on a 2-core CPU
    python bench/bench_ops.py                        # full grid
    python bench/bench_ops.py --quick --device cuda  # GPU (bench/run_gpu.sh)
    python bench/bench_ops.py --smoke                # tiny shapes, seconds, no CSV

Rows are appended to bench/results/ops_<cpu|gpu>.csv; see bench/README.md for the columns.
"""

import argparse
import csv
import datetime
import os
import platform
import shlex
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path

import torch
from torch import Tensor

ROOT = Path(__file__).resolve().parent.parent
HEADLINE = (1, 5, 151936)  # B, K, V: Qwen2-size vocabulary, 5 drafts, one sequence

# ---------------------------------------------------------------------------------------------
# Baselines: what a user writes without specops. They draw their own random numbers (torch's
# generator, not specops' Philox), so their tokens differ from specops'; they are checked for
# valid outputs only.
# ---------------------------------------------------------------------------------------------


def _emit(draft_tokens: Tensor, num_accepted: Tensor, final: Tensor) -> Tensor:
    """[B, K+1] int64: accepted drafts, then the final token, then -1."""
    batch, num_slots = draft_tokens.shape
    slots = torch.arange(num_slots + 1, device=draft_tokens.device)
    padded = torch.cat([draft_tokens, draft_tokens.new_full((batch, 1), -1)], dim=1)
    n = num_accepted.long()[:, None]
    return torch.where(slots == n, final[:, None], torch.where(slots < n, padded, -1))


def _accept_and_residual(target_probs: Tensor, draft_tokens: Tensor,
                         draft_probs: Tensor) -> tuple[Tensor, Tensor]:
    """Accept test with ``torch.rand``; returns (num_accepted [B] int32, row to draw [B, V]).

    The row to draw from is ``max(0, p - q)`` at the first rejection, or the target row after
    the last draft when every draft was accepted (the bonus token).
    """
    batch, num_rows, _ = target_probs.shape
    num_slots = num_rows - 1
    idx = draft_tokens[..., None]
    p_x = target_probs[:, :num_slots].gather(-1, idx).squeeze(-1)   # [B, K]
    q_x = draft_probs.gather(-1, idx).squeeze(-1)                    # [B, K]
    accepted = torch.rand_like(p_x) <= p_x / q_x                     # HF: r_i <= p_i / q_i
    num_accepted = accepted.int().cumprod(-1).sum(-1, dtype=torch.int32)
    n = num_accepted.long()
    rows = torch.arange(batch, device=target_probs.device)
    p_next = target_probs[rows, n]                                   # [B, V]
    q_next = draft_probs[rows, n.clamp(max=num_slots - 1)]           # [B, V]
    rejected = (n < num_slots)[:, None]
    return num_accepted, torch.where(rejected, (p_next - q_next).clamp_min(0), p_next)


def chain_verify_multinomial(target_probs: Tensor, draft_tokens: Tensor,
                             draft_probs: Tensor) -> tuple[Tensor, Tensor]:
    """BASELINE. transformers' ``_speculative_sampling`` batched without host syncs: where
    HF branches on ``n_matches`` (a Python int), this selects with ``torch.where``.
    Residual normalised as HF does, then ``torch.multinomial``."""
    num_accepted, residual = _accept_and_residual(target_probs, draft_tokens, draft_probs)
    residual = residual / residual.sum(-1, keepdim=True)
    final = torch.multinomial(residual, 1).squeeze(-1)
    return _emit(draft_tokens, num_accepted, final), num_accepted


def chain_verify_exprace(target_probs: Tensor, draft_tokens: Tensor,
                         draft_probs: Tensor) -> tuple[Tensor, Tensor]:
    """BASELINE. gpt-fast's sync-free draw, ``argmax(r / Exp(1))``: it materialises one
    exponential per vocabulary entry (B*V noise), which is this baseline's cost."""
    num_accepted, residual = _accept_and_residual(target_probs, draft_tokens, draft_probs)
    noise = torch.empty_like(residual).exponential_(1)
    final = (residual / noise).argmax(-1)
    return _emit(draft_tokens, num_accepted, final), num_accepted


def chain_verify_greedy_argmax(target_logits: Tensor,
                               draft_tokens: Tensor) -> tuple[Tensor, Tensor]:
    """BASELINE (greedy). Reads every row: argmax, compare, leading run, gather."""
    argmax = target_logits.argmax(-1)                                # [B, K+1]
    accepted = draft_tokens == argmax[:, :-1]
    num_accepted = accepted.int().cumprod(-1).sum(-1, dtype=torch.int32)
    final = argmax.gather(1, num_accepted.long()[:, None]).squeeze(1)
    return _emit(draft_tokens, num_accepted, final), num_accepted


# ---------------------------------------------------------------------------------------------
# Cases and the traffic each must move at the least.
# ---------------------------------------------------------------------------------------------


def make_case(op: str, case: str, batch: int, num_slots: int, vocab: int,
              device: str) -> dict[str, Tensor | None]:
    """Inputs for one case. ``random``: independent softmax(randn) rows for p and q (their
    overlap sum(min(p, q)) is about 0.48, so most chains stop at slot 0 or 1). ``accepted``:
    q = p, so every draft is accepted and the token is a bonus drawn from the last row.
    Greedy: ``random`` drafts are uniform ids (rejected at slot 0); ``accepted`` drafts are
    the rows' argmax (all accepted, every row must be read)."""
    gen = torch.Generator(device="cpu").manual_seed(1234 + batch * 7 + num_slots * 131 + vocab)
    shape = (batch, num_slots + 1, vocab)
    logits = torch.randn(shape, generator=gen).to(device)
    inputs: dict[str, Tensor | None] = {}
    if op == "chain_verify_greedy":
        inputs["target"] = logits
        if case == "accepted":
            inputs["draft_tokens"] = logits[:, :num_slots].argmax(-1)
        else:
            drafts = torch.randint(vocab, (batch, num_slots), generator=gen)
            inputs["draft_tokens"] = drafts.to(device)
        return inputs
    target = logits.softmax(-1)
    del logits
    if case == "accepted":
        draft = target[:, :num_slots].clone()
    else:
        draft = torch.randn((batch, num_slots, vocab), generator=gen).to(device).softmax(-1)
    torch.manual_seed(99)
    inputs["target"] = target
    inputs["draft_probs"] = draft
    inputs["draft_tokens"] = torch.multinomial(draft.view(-1, vocab), 1).view(batch, num_slots)
    inputs["seeds"] = torch.arange(batch, dtype=torch.int64, device=device) + 1000
    inputs["positions"] = torch.arange(batch, dtype=torch.int64, device=device) * 3 + 100
    return inputs


def min_traffic(op: str, batch: int, num_slots: int, vocab: int,
                num_accepted: Tensor) -> tuple[int, int]:
    """(bytes the math must move, float32 values in the rows it must read), given where the
    chains stop (``num_accepted`` from the reference: a deterministic function of the inputs).

    chain_verify, per call:
      accept tests read p(x) and q(x) at the draft tokens: 2*B*K floats, plus the tokens
        B*K int64 (an upper bound: a row may stop testing at its first rejection);
      the draw reads the full target row p[b, n_b] once per batch row, and for a row whose
        chain stopped at a rejection (n_b < K) the draft row q[b, n_b] too:
        (B + num_rejected) * V floats, i.e. B*V*4 bytes (all accepted) .. B*2*V*4 (all rejected);
      seeds and positions 2*B int64; writes tokens B*(K+1) int64 and num_accepted B int32.
    chain_verify_greedy, per call:
      slot j's test needs the argmax of row j, and the output is the argmax of row n_b, so a
        row reads rows 0..n_b: sum(n_b + 1) * V floats; plus the drafts B*K int64 and the
        same writes. (The torch-argmax baseline reads all B*(K+1)*V.)
    """
    n = num_accepted.long().cpu()
    io = 8 * batch * num_slots + 8 * batch * (num_slots + 1) + 4 * batch
    if op == "chain_verify_greedy":
        row_floats = int((n + 1).sum()) * vocab
        return 4 * row_floats + io, row_floats
    num_rejected = int((n < num_slots).sum())
    row_floats = (batch + num_rejected) * vocab
    return 4 * row_floats + 4 * 2 * batch * num_slots + 16 * batch + io, row_floats


def check_outputs(out: tuple[Tensor, Tensor], draft_tokens: Tensor, vocab: int,
                  all_accepted: bool) -> None:
    """Raises AssertionError unless ``out`` is a well-formed chain result."""
    tokens, num_accepted = out
    batch, num_slots = draft_tokens.shape
    assert tokens.shape == (batch, num_slots + 1) and tokens.dtype == torch.int64, \
        f"tokens: {tuple(tokens.shape)} {tokens.dtype}"
    assert num_accepted.shape == (batch,) and num_accepted.dtype == torch.int32, \
        f"num_accepted: {tuple(num_accepted.shape)} {num_accepted.dtype}"
    t, n, d = tokens.cpu(), num_accepted.long().cpu(), draft_tokens.cpu()
    assert bool(((n >= 0) & (n <= num_slots)).all()), f"num_accepted out of range: {n.tolist()}"
    slots = torch.arange(num_slots + 1)
    padded = torch.cat([d, torch.full((batch, 1), -1)], dim=1)
    prefix = slots < n[:, None]
    assert bool((t[prefix] == padded[prefix]).all()), "accepted tokens differ from the drafts"
    final = t.gather(1, n[:, None]).squeeze(1)
    assert bool(((final >= 0) & (final < vocab)).all()), f"final token out of range: {final}"
    assert bool((t[slots > n[:, None]] == -1).all()), "slots after the final token are not -1"
    if all_accepted:
        assert bool((n == num_slots).all()), f"q = p but not all accepted: {n.tolist()}"


# ---------------------------------------------------------------------------------------------
# Timing: providers alternate inside each repetition (rotating who goes first).
# ---------------------------------------------------------------------------------------------


def _rotations(names: list[str], reps: int):
    for rep in range(reps):
        k = rep % len(names)
        yield names[k:] + names[:k]


def time_cpu(fns: dict[str, Callable], reps: int) -> dict[str, list[float]]:
    samples: dict[str, list[float]] = {name: [] for name in fns}
    for order in _rotations(list(fns), reps):
        for name in order:
            start = time.perf_counter_ns()
            fns[name]()
            samples[name].append((time.perf_counter_ns() - start) / 1e3)
    return samples


def time_cuda(fns: dict[str, Callable], reps: int) -> dict[str, list[float]]:
    """CUDA events around each call, as triton.testing.do_bench does (caches stay warm, as
    for the floor). An eager provider's time includes its launch gaps when the GPU waits
    for the host, which is what it costs in a decode loop."""
    pairs: dict[str, list] = {name: [] for name in fns}
    for order in _rotations(list(fns), reps):
        for name in order:
            start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
            start.record()
            fns[name]()
            end.record()
            pairs[name].append((start, end))
    torch.cuda.synchronize()
    return {name: [s.elapsed_time(e) * 1e3 for s, e in ev] for name, ev in pairs.items()}


def cuda_graphed(fn: Callable) -> tuple[Callable, Callable]:
    """(replay, result): ``fn`` captured once in a CUDA graph; ``result()`` reads its outputs."""
    stream = torch.cuda.Stream()
    stream.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(stream):
        for _ in range(3):
            fn()
    torch.cuda.current_stream().wait_stream(stream)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = fn()
    return graph.replay, lambda: (graph.replay(), out)[1]


def quantile(sorted_values: list[float], q: float) -> float:
    pos = q * (len(sorted_values) - 1)
    lo = int(pos)
    hi = min(lo + 1, len(sorted_values) - 1)
    return sorted_values[lo] + (sorted_values[hi] - sorted_values[lo]) * (pos - lo)


# ---------------------------------------------------------------------------------------------
# One case: build providers, validate each once, time them together.
# ---------------------------------------------------------------------------------------------


def providers_for(op: str, inputs: dict, device: str, specops) -> dict[str, Callable]:
    """name -> a callable returning (tokens, num_accepted). Providers that cannot run here
    are still listed; their first call raises and becomes an error row."""
    target, drafts = inputs["target"], inputs["draft_tokens"]
    kernels = "specops-cpu" if device == "cpu" else "specops-triton"

    def reference(fn):
        def call():
            with specops.use_backend("reference"):
                return fn()
        return call

    if op == "chain_verify_greedy":
        def specops_call():
            return specops.chain_verify_greedy(target, drafts)
        return {"torch-argmax": lambda: chain_verify_greedy_argmax(target, drafts),
                "specops-reference": reference(specops_call), kernels: specops_call}
    draft_probs, seeds, positions = inputs["draft_probs"], inputs["seeds"], inputs["positions"]

    def specops_call():
        return specops.chain_verify(target, drafts, draft_probs, seeds=seeds, positions=positions)
    return {"torch-multinomial": lambda: chain_verify_multinomial(target, drafts, draft_probs),
            "torch-exprace": lambda: chain_verify_exprace(target, drafts, draft_probs),
            "specops-reference": reference(specops_call), kernels: specops_call}


def run_case(op: str, case: str, batch: int, num_slots: int, vocab: int, args,
             specops, kernels_error: str | None) -> list[dict]:
    device = args.device
    inputs = make_case(op, case, batch, num_slots, vocab, device)
    calls = providers_for(op, inputs, device, specops)
    drafts = inputs["draft_tokens"]
    all_accepted = case == "accepted"
    kernels = "specops-cpu" if device == "cpu" else "specops-triton"

    # Validate each provider once; on CUDA add the graphed variants (not the reference).
    timed: dict[str, Callable] = {}
    errors: dict[str, str] = {}
    outputs: dict[str, tuple[Tensor, Tensor]] = {}
    variants = [(name, fn, False) for name, fn in calls.items()]
    if device == "cuda":
        variants += [(name + "+graph", fn, True) for name, fn in calls.items()
                     if name != "specops-reference"]
    for name, fn, graphed in variants:
        base = name.removesuffix("+graph")
        if base == kernels and kernels_error:
            errors[name] = kernels_error
            continue
        try:
            if graphed:
                replay, result = cuda_graphed(fn)
                out, timed[name] = result(), replay
            else:
                out, timed[name] = fn(), fn
            check_outputs(out, drafts, vocab, all_accepted)
            outputs[name] = out
        except Exception as error:  # a provider that fails is a row, not a crash
            timed.pop(name, None)
            errors[name] = f"{type(error).__name__}: {str(error).strip().splitlines()[0][:160]}"

    reference = outputs.get("specops-reference")
    if reference is None:  # traffic needs where the chains stop; recompute without timing
        with specops.use_backend("reference"):
            reference = calls["specops-reference"]()
    num_bytes, row_floats = min_traffic(op, batch, num_slots, vocab, reference[1])
    floor_src = inputs["target"].reshape(-1)[:row_floats]
    if device == "cuda":
        timed["floor"], _ = cuda_graphed(lambda: floor_src.sum())
    else:
        timed["floor"] = lambda: floor_src.sum()

    # Warm up, then size the repetitions to the time budget.
    sync = torch.cuda.synchronize if device == "cuda" else (lambda: None)
    rounds = []
    for _ in range(max(args.warmup, 2)):
        start = time.perf_counter()
        for fn in timed.values():
            fn()
        sync()
        rounds.append(time.perf_counter() - start)
    per_round = max(sorted(rounds[1:])[len(rounds[1:]) // 2], 1e-6)  # the first one compiles
    reps = int(min(args.max_reps, max(args.min_reps, args.budget / per_round)))
    load = f"{os.getloadavg()[0]:.2f}"  # other work on the machine skews every provider
    samples = (time_cuda if device == "cuda" else time_cpu)(timed, reps)

    stats = {}
    for name, values in samples.items():
        values.sort()
        stats[name] = (quantile(values, 0.5), quantile(values, 0.1), quantile(values, 0.9))
    floor_us = stats.pop("floor")[0]
    suffix = "+graph" if device == "cuda" else ""
    bases = {"multinomial": "torch-multinomial" + suffix, "exprace": "torch-exprace" + suffix,
             "argmax": "torch-argmax" + suffix}
    rows = []
    for name, _, _ in variants:
        row = {"op": op, "provider": name, "B": batch, "K": num_slots, "V": vocab, "case": case,
               "reps": reps, "min_bytes": num_bytes, "floor_us": f"{floor_us:.2f}",
               "load_avg": load}
        if name in stats:
            median, p10, p90 = stats[name]
            row.update(median_us=f"{median:.2f}", p10_us=f"{p10:.2f}", p90_us=f"{p90:.2f}",
                       gbps=f"{num_bytes / median / 1e3:.2f}", vs_floor=f"{median / floor_us:.2f}",
                       mean_accepted=f"{outputs[name][1].float().mean().item():.2f}")
            for key, base in bases.items():
                if base in stats:
                    row[f"ratio_vs_{key}"] = f"{stats[base][0] / median:.2f}"
            if name.startswith("specops-") and name.removesuffix("+graph") != "specops-reference":
                same = (outputs[name][0].cpu() == reference[0].cpu()).all(-1)
                row["check"] = "ok, = reference" if bool(same.all()) else \
                    f"ok, {int((~same).sum())}/{batch} rows differ from reference"
            else:
                row["check"] = "ok"
        else:
            row["error"] = errors[name]
        rows.append(row)
    del inputs, calls, timed, outputs, reference, floor_src
    return rows


# ---------------------------------------------------------------------------------------------
# Recording: environment, CSV, table, targets.
# ---------------------------------------------------------------------------------------------

COLUMNS = ["date", "commit", "machine", "device", "num_threads", "torch", "triton", "python",
           "command", "op", "provider", "B", "K", "V", "case", "median_us", "p10_us", "p90_us",
           "reps", "ratio_vs_multinomial", "ratio_vs_exprace", "ratio_vs_argmax", "gbps",
           "min_bytes", "floor_us", "vs_floor", "mean_accepted", "check", "checks_level",
           "load_avg", "error"]


def git_commit() -> str:
    def git(*cmd):
        return subprocess.run(["git", *cmd], cwd=ROOT, capture_output=True, text=True,
                              check=True).stdout.strip()
    try:
        commit = git("rev-parse", "--short", "HEAD")
        dirty = [line for line in git("status", "--porcelain").splitlines()
                 if not line[3:].startswith("bench/results/")]
        return commit + ("-dirty" if dirty else "")
    except (OSError, subprocess.CalledProcessError):
        return "unknown"


def machine(device: str) -> str:
    if device == "cuda":
        return f"{torch.cuda.get_device_name()} (CUDA {torch.version.cuda})"
    model = platform.processor() or "unknown CPU"
    try:
        for line in Path("/proc/cpuinfo").read_text().splitlines():
            if line.startswith("model name"):
                model = line.split(":", 1)[1].strip()
                break
    except OSError:
        pass
    return f"{model}, {os.cpu_count()} cores"


def environment(device: str, specops) -> dict[str, str]:
    try:
        import triton
        triton_version = triton.__version__
    except ImportError:
        triton_version = "none"
    return {"date": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            "commit": git_commit(), "machine": machine(device), "device": device,
            "num_threads": str(torch.get_num_threads()), "torch": torch.__version__,
            "triton": triton_version, "python": platform.python_version(),
            "command": " ".join(["python", *map(shlex.quote, sys.argv)]),
            "checks_level": specops.get_checks() if hasattr(specops, "get_checks") else ""}


def append_csv(path: Path, rows: list[dict]) -> None:
    path.parent.mkdir(parents=True, exist_ok=True)
    if path.exists() and path.stat().st_size > 0:
        with path.open() as f:
            header = next(csv.reader(f))
        if header != COLUMNS:
            raise SystemExit(f"{path} has other columns; move it aside or pass --csv")
    new = not path.exists() or path.stat().st_size == 0
    with path.open("a", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        if new:
            writer.writeheader()
        writer.writerows(rows)


def print_rows(rows: list[dict]) -> None:
    head = (f"{'provider':<24}{'median us':>11}{'p10-p90 us':>20}{'x multi':>9}{'x exprace':>10}"
            f"{'x argmax':>9}{'GB/s':>8}{'/floor':>8}{'acc':>6}  check")
    first = rows[0]
    print(f"\n{first['op']}  B={first['B']} K={first['K']} V={first['V']}  case={first['case']}  "
          f"floor={first['floor_us']} us  min traffic={int(first['min_bytes']) / 1e6:.2f} MB  "
          f"reps={first['reps']}  load={first['load_avg']}")
    print(head)
    for row in rows:
        if "error" in row:
            print(f"{row['provider']:<24}  ERROR {row['error']}")
            continue
        spread = f"{row['p10_us']}-{row['p90_us']}"
        print(f"{row['provider']:<24}{row['median_us']:>11}{spread:>20}"
              f"{row.get('ratio_vs_multinomial', '-'):>9}{row.get('ratio_vs_exprace', '-'):>10}"
              f"{row.get('ratio_vs_argmax', '-'):>9}{row['gbps']:>8}{row['vs_floor']:>8}"
              f"{row['mean_accepted']:>6}  {row['check']}")
    sys.stdout.flush()


def print_targets(rows: list[dict], device: str) -> None:
    """The issue's targets beside what this run measured; a target whose row was not measured
    says so instead of passing or failing."""
    def find(provider, batch, num_slots, vocab, case="random"):
        for row in rows:
            if (row["op"], row["provider"], row["B"], row["K"], row["V"], row["case"]) == \
                    ("chain_verify", provider, batch, num_slots, vocab, case):
                return row if "median_us" in row else None
        return None

    def verdict(row, key, goal, at_least):
        if row is None or not row.get(key):
            return "not measured"
        value = float(row[key])
        met = value >= goal if at_least else value <= goal
        unit = "x" if key.startswith("ratio") else " us"
        return f"{value:.2f}{unit}: {'MET' if met else 'NOT MET'}"

    print("\nTargets (chain_verify, case=random unless named):")
    if device == "cpu":
        for case in ("random", "accepted"):
            row = find("specops-cpu", *HEADLINE, case)
            print(f"  CPU B=1 K=5 V=151936 {case}: specops-cpu >= 20x torch-multinomial: "
                  f"{verdict(row, 'ratio_vs_multinomial', 20, True)}; >= 10x torch-exprace: "
                  f"{verdict(row, 'ratio_vs_exprace', 10, True)}")
    else:
        for provider in ("specops-triton+graph", "specops-triton"):
            head = find(provider, *HEADLINE)
            big = find(provider, 32, 8, 128256)
            print(f"  GPU {provider}: B=1 K=5 V=151936 <= 8 us: "
                  f"{verdict(head, 'median_us', 8, False)}; B=32 K=8 V=128256 <= 25 us: "
                  f"{verdict(big, 'median_us', 25, False)}; >= 20x torch-multinomial+graph at "
                  f"B=1 K=5 V=151936: {verdict(head, 'ratio_vs_multinomial', 20, True)}")


# ---------------------------------------------------------------------------------------------


def grid(mode: str) -> list[tuple[str, str, int, int, int]]:
    """(op, case, B, K, V) in run order."""
    cases = [("chain_verify", c, *HEADLINE) for c in ("random", "accepted")]
    if mode == "smoke":
        return ([("chain_verify", c, b, k, 1000) for b in (1, 2) for k in (1, 2)
                 for c in ("random", "accepted")]
                + [("chain_verify_greedy", c, 2, 2, 1000) for c in ("random", "accepted")])
    if mode == "quick":
        cases += [("chain_verify", "random", 1, 4, 32000), ("chain_verify", "random", 8, 4, 128256),
                  ("chain_verify", "random", 32, 8, 128256),
                  ("chain_verify", "accepted", 32, 8, 128256)]
    else:
        cases += [("chain_verify", c, b, k, v) for v in (32000, 128256, 151936)
                  for b in (1, 8, 32, 64) for k in (1, 4, 8) for c in ("random", "accepted")]
    cases += [("chain_verify_greedy", c, *HEADLINE) for c in ("random", "accepted")]
    return cases


def import_specops():
    """specops, and why its kernels cannot run here (None if they can)."""
    try:
        import specops
    except ImportError as error:  # extension missing or stale: keep the reference rows
        os.environ["SPECOPS_BACKEND"] = "reference"
        for name in [m for m in sys.modules if m == "specops" or m.startswith("specops.")]:
            del sys.modules[name]
        import specops
        return specops, f"ImportError: {str(error).splitlines()[0][:160]}"
    try:
        specops.set_backend("kernels")
    except RuntimeError as error:
        return specops, f"RuntimeError: {error}"
    return specops, None


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n\n")[0],
                                     formatter_class=argparse.RawDescriptionHelpFormatter)
    mode = parser.add_mutually_exclusive_group()
    mode.add_argument("--quick", action="store_true", help="headline shape and a few others")
    mode.add_argument("--smoke", action="store_true", help="tiny shapes, a few seconds, no CSV")
    parser.add_argument("--device", choices=("cpu", "cuda"), default="cpu")
    parser.add_argument("--csv", type=Path, help="default bench/results/ops_<cpu|gpu>.csv")
    parser.add_argument("--no-csv", action="store_true")
    parser.add_argument("--budget", type=float, help="seconds of timing per case")
    parser.add_argument("--warmup", type=int, default=3)
    parser.add_argument("--min-reps", type=int, help="repetitions per provider, at least")
    parser.add_argument("--max-reps", type=int, default=2000)
    args = parser.parse_args()
    mode_name = "smoke" if args.smoke else "quick" if args.quick else "full"
    gpu = args.device == "cuda"
    if args.budget is None:
        args.budget = {"smoke": 0.05, "quick": 3.0, "full": 3.0}[mode_name] / (5 if gpu else 1)
    if args.min_reps is None:
        args.min_reps = {"smoke": 5, "quick": 10, "full": 10}[mode_name] * (5 if gpu else 1)
    if gpu and not torch.cuda.is_available():
        raise SystemExit("--device cuda: no CUDA device visible")
    write_csv = not args.no_csv and (args.csv is not None or not args.smoke)
    csv_path = args.csv or ROOT / "bench" / "results" / f"ops_{'gpu' if gpu else 'cpu'}.csv"

    specops, kernels_error = import_specops()
    env = environment(args.device, specops)
    print(f"{env['date']}  {env['commit']}  {env['machine']}  threads={env['num_threads']}  "
          f"torch {env['torch']}  triton {env['triton']}  python {env['python']}  "
          f"checks={env['checks_level']}\n{env['command']}")
    if kernels_error:
        print(f"specops kernels unavailable: {kernels_error}")
    load = os.getloadavg()[0]
    if load > 0.5 * (os.cpu_count() or 1):
        print(f"WARNING: load average {load:.2f} on {os.cpu_count()} cores: other work is "
              f"running and will skew these timings (recorded in the load_avg column)")

    all_rows = []
    for op, case, batch, num_slots, vocab in grid(mode_name):
        rows = run_case(op, case, batch, num_slots, vocab, args, specops, kernels_error)
        print_rows(rows)
        rows = [{**env, **row} for row in rows]
        if write_csv:
            append_csv(csv_path, rows)
        all_rows += rows
    print_targets(all_rows, args.device)
    if write_csv:
        print(f"\nappended {len(all_rows)} rows to {csv_path}")


if __name__ == "__main__":
    main()
