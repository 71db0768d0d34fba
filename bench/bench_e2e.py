"""End-to-end decoding benchmark on real prompt sets (CPU suite).

Every method decodes the same prompts with the same target, token budget and stop tokens.
For each prompt (or batch of prompts) and each repetition, every method runs once, in an order
rotated by one per (prompt, repetition), so the methods share the machine's noise:

| method | what runs |
|---|---|
| ``plain`` | ``specops.generate(target, ids, draft=None)``: the specops loop with no draft (baseline) |
| ``hf-plain`` | ``target.generate(ids)``, Hugging Face, greedy (or sampling) |
| ``hf-assisted`` | ``target.generate(ids, assistant_model=draft)``, adaptive state reset before each call |
| ``chain-fixed-K`` | ``specops.generate(..., draft=draft, num_draft_tokens=K)`` (``--k``, default 4) |
| ``chain-auto`` | ``specops.generate(..., draft=draft)``: the cost-aware draft length |
| ``tree`` | ``specops.generate(..., draft=draft, tree=DynamicTree(depth=4, top_k=4, num_nodes=16))``: cost-aware size (up to 16 nodes verified, or plain steps) |
| ``tree-fixed`` | the same tree with ``adaptive=False``: all 16 nodes every step (not in the default set) |
| ``prompt-lookup`` | ``specops.generate(..., draft=PromptLookup(max_ngram=3))``, cost-aware length |
| ``hybrid`` | ``specops.generate(..., draft=Hybrid(draft, PromptLookup()))``, cost-aware length |
| ``hybrid-compare`` | ``Hybrid(..., compare=True)``: a match taken only where it pays (not in the default set) |

    python bench/bench_e2e.py --quick          # 2 prompts/category, 1 rep, 32 new tokens
    python bench/bench_e2e.py                  # 3 prompts/category, 2 reps, 96 new tokens
    python bench/bench_e2e.py --quick --categories code,chat --methods plain,chain-auto,tree
    python bench/bench_e2e.py --sampling       # temperature 1.0, top-p 0.95, code prompts
    python bench/bench_e2e.py --batch 4        # code prompts in batches of 4 (left padding)
    python bench/bench_e2e.py --target DIR --draft DIR --out /tmp/e2e   # other models

Estimated time with the default pair on 2 CPU cores (plain decoding of the 1.5B target at
about 3 tokens/s, prompts of 100-700 tokens; about 19 s per call at 64 new tokens measured
over a whole run): ``--quick --max-new-tokens 64`` (64 measured calls) about 20 minutes, the
full run (192 calls of 96 tokens) about 90 minutes; ``bench/run_cpu_suite.sh`` runs the full
greedy run, the sampling and batch-4 runs on code, and two short comparisons (cost-aware tree
against fixed tree; fixed draft lengths against the cost-aware one): about 2 hours 20 minutes.
``--categories``, ``--methods``, ``--prompts`` and ``--reps`` cut it down or widen it. Both models in memory take about 7.5 GB (target float32, draft
bfloat16).

Models: ``--target``/``--draft`` are names or folders for ``specops.pretrained.load_model``
(defaults ``default-target`` = Qwen2.5-Coder-1.5B-Instruct, ``default-draft`` = 0.5B). The
target is float32 (bf16 verification cost grows with the number of tokens on a CPU without
AMX); the draft is ``--draft-dtype`` (default bfloat16). Prompts: ``bench/prompts.py`` (fixed
seeded sample; ids recorded), each wrapped in the tokenizer's chat template when it has one.

Method details:
- Stop tokens: the target's ``generation_config.eos_token_id`` (else the tokenizer's eos), passed
  to every method; Hugging Face's other generation defaults of the checkpoint (Qwen ships
  ``repetition_penalty=1.1`` and sampling) are overridden, so ``hf-plain`` is plain greedy.
- ``hf-assisted`` (transformers 5.23): at the end of every call ``_assisted_decoding`` writes the
  candidate generator's adapted draft length back into
  ``draft.generation_config.num_assistant_tokens`` when the schedule is ``"heuristic"``
  (``generation/utils.py``); that is the state that carries over between calls. The confidence
  threshold adapts only on the candidate generator's private copies and only when scikit-learn
  is installed, so it never carries over. Before each call the harness sets
  ``num_assistant_tokens`` (``--hf-assistant-tokens``, 5), ``num_assistant_tokens_schedule``
  (``--hf-assistant-schedule``, ``heuristic``) and ``assistant_confidence_threshold``
  (``--hf-confidence-threshold``, 0.4 = the library default) on the draft's generation config.
  Left unset, transformers 5.23 would use 20 tokens, schedule ``constant``, threshold 0.4.
  Hugging Face refuses assisted generation for batches > 1: with ``--batch`` it is skipped.
- ``chain-auto``, ``prompt-lookup``, ``hybrid`` use one reusable ``SpeculativeGenerator`` per
  method: its cost model is measured once, in the warm-up call, like a server would; its
  acceptance estimates are reset before every measured call (``--carry-controller`` keeps them),
  the counterpart of resetting Hugging Face's adaptive state.
- A warm-up call per method (8 new tokens, first prompt) precedes the measurements.

Output (``--out``, default ``bench/results/e2e_cpu/``), files named ``e2e_<UTC date-time>``:
- ``.jsonl``: a header record (command, machine, CPU model and cores, threads, torch /
  transformers / specops versions, git commit, date, models, options, prompt ids per category),
  then one record per prompt x method x repetition: prompt ids, wall seconds, tokens/s (new
  tokens of all rows / wall time), new tokens per row, ``GenerationStats.as_dict()`` plus the raw
  counts and the cost models before and after the call (specops methods), a hash of the
  output token ids, whether the output (every row) is identical to that of ``plain`` and of
  ``hf-plain`` on the same prompt and repetition, and per row the first index where it
  differs (``null`` when identical; ``null`` flags when sampling).
- ``_summary.csv``: one row per category x method: tokens/s median, p10, p90 over runs;
  ``speedup_vs_plain`` / ``speedup_vs_hf_assisted`` = geometric mean over prompts of (median
  tokens/s of the method on the prompt / median of the baseline on the same prompt);
  ``decode_speedup_vs_plain`` = the same over ``plain`` for the decode phase alone (new tokens
  / (loop seconds - prefill seconds); specops methods only: Hugging Face's calls have no
  split); ``tau`` = mean tokens emitted per row and step; acceptance per draft position (pooled counts; ``-``
  where no run reached a position); mean draft length; prefill/draft/verify/overhead share of
  the loop's time; share of runs identical to plain greedy and to Hugging Face greedy (empty
  when sampling).
"""

import argparse
import csv
import datetime
import hashlib
import json
import math
import platform
import shlex
import statistics
import sys
import time
import dataclasses
from dataclasses import dataclass
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(BENCH)]
from bench_ops import git_commit, machine  # noqa: E402
from prompts import CATEGORIES, LABELS, load_prompts  # noqa: E402

import specops  # noqa: E402
from specops import DynamicTree, Hybrid, PromptLookup, SpeculativeGenerator  # noqa: E402

BASE_METHODS = ("plain", "hf-plain", "hf-assisted", "chain-fixed", "chain-auto", "tree",
                "prompt-lookup", "hybrid")
EXTRA_METHODS = ("tree-fixed", "hybrid-compare")   # named in --methods only
NEEDS_DRAFT = {"hf-assisted", "chain-auto", "tree", "tree-fixed", "hybrid",
               "hybrid-compare"}  # + chain-fixed-K
TREE = DynamicTree(depth=4, top_k=4, num_nodes=16)
SUMMARY_COLUMNS = [
    "date", "commit", "machine", "num_threads", "target", "draft", "draft_dtype", "category",
    "label", "method", "batch", "sampling", "max_new_tokens", "prompts", "reps", "runs",
    "tok_s_median", "tok_s_p10", "tok_s_p90", "speedup_vs_plain", "speedup_vs_hf_assisted",
    "decode_speedup_vs_plain", "tau", "acceptance_per_position", "mean_draft_length", "prefill_share", "draft_share",
    "verify_share", "overhead_share", "identical_to_plain", "identical_to_hf_plain",
    "mean_new_tokens"]


# --------------------------------------------------------------------------- prompts -> ids
def encode(tokenizer, text: str) -> list[int]:
    """Token ids of one user message: through the chat template when the tokenizer has one."""
    if getattr(tokenizer, "chat_template", None):
        text = tokenizer.apply_chat_template([{"role": "user", "content": text}], tokenize=False,
                                             add_generation_prompt=True)
        return tokenizer(text, add_special_tokens=False)["input_ids"]
    return tokenizer(text)["input_ids"]


def left_pad(rows: list[list[int]], pad_id: int) -> tuple[torch.Tensor, torch.Tensor]:
    """``input_ids, attention_mask``: shape ``(len(rows), longest)`` int64, left padded."""
    width = max(len(r) for r in rows)
    ids = torch.full((len(rows), width), pad_id, dtype=torch.int64)
    mask = torch.zeros(len(rows), width, dtype=torch.int64)
    for b, row in enumerate(rows):
        ids[b, width - len(row):] = torch.tensor(row, dtype=torch.int64)
        mask[b, width - len(row):] = 1
    return ids, mask


def first_divergence(a: list[int], b: list[int]) -> int | None:
    """First index where two token lists differ (a length difference counts), else None."""
    for i, (x, y) in enumerate(zip(a, b)):
        if x != y:
            return i
    return None if len(a) == len(b) else min(len(a), len(b))


def output_hash(rows: list[list[int]]) -> str:
    return hashlib.sha1(json.dumps(rows).encode()).hexdigest()[:16]


# --------------------------------------------------------------------------- methods
@dataclass
class Options:
    max_new_tokens: int
    eos: list[int]
    pad_id: int
    sampling: bool
    seed: int


def method_names(spec: str | None, k: int) -> list[str]:
    """``--methods`` to method names: ``chain-fixed`` becomes ``chain-fixed-<k>``;
    ``chain-fixed-6`` names its own K (several are allowed)."""
    names = list(BASE_METHODS) if spec is None else [m.strip() for m in spec.split(",") if m]
    out = []
    for name in names:
        if name == "chain-fixed":
            name = f"chain-fixed-{k}"
        base = "chain-fixed" if name.startswith("chain-fixed-") else name
        known = BASE_METHODS + EXTRA_METHODS
        if base not in known or (base == "chain-fixed" and not name[12:].isdigit()):
            raise SystemExit(f"unknown method {name!r}; known: {', '.join(known)} "
                             f"(chain-fixed-K for a fixed K)")
        out.append(name)
    return out


def cost_models(gen: SpeculativeGenerator, batch: int) -> dict | None:
    """The generator's cost models for ``batch`` rows (``None`` before its first call with
    that batch size), in milliseconds: ``{kind: {"verify": {n: ms}, "draft_fixed": ms,
    "draft_per_token": ms}}``."""
    costs = gen.costs.get(batch)
    if costs is None:
        return None
    return {kind: {"verify": {n: round(s * 1e3, 2) for n, s in sorted(c.verify_seconds.items())},
                   "draft_fixed": round(c.draft_fixed_seconds * 1e3, 2),
                   "draft_per_token": round(c.draft_step_seconds * 1e3, 2)}
            for kind, c in costs.items()}


def make_methods(names: list[str], target, draft, opts: Options, args) -> dict:
    """``{name: call(input_ids, attention_mask, max_new_tokens, rep) -> (new rows, stats)}``;
    ``stats`` is a dict for specops methods and None for Hugging Face's."""
    temperature, top_p = (1.0, 0.95) if opts.sampling else (0.0, 1.0)
    methods = {}

    def specops_method(draft_arg, **kwargs):
        gen = SpeculativeGenerator(target, draft_arg, temperature=temperature, top_p=top_p,
                                   eos_token_id=opts.eos, pad_token_id=opts.pad_id, **kwargs)

        def call(ids, mask, max_new_tokens, rep):
            gen.seed = opts.seed + rep
            if not args.carry_controller:
                gen.reset_estimates()
            before = cost_models(gen, ids.shape[0])
            out = gen.generate(ids, mask, max_new_tokens=max_new_tokens)
            width = ids.shape[1]
            rows = [out.sequences[b, width:width + n].tolist()
                    for b, n in enumerate(out.num_new_tokens)]
            stats = out.stats.as_dict()
            for raw in ("emitted", "row_steps", "tried", "accepted"):  # pooled summaries
                if hasattr(out.stats, raw):
                    stats[raw] = getattr(out.stats, raw)
            # what the controllers priced steps by: explains a call that decoded plainly
            stats["cost_models"] = {"before": before, "after": cost_models(gen, ids.shape[0])}
            return rows, stats
        return call

    def hf_method(assistant):
        sample = dict(do_sample=True, temperature=1.0, top_p=0.95, top_k=0) if opts.sampling \
            else dict(do_sample=False, temperature=None, top_p=None, top_k=None)

        def call(ids, mask, max_new_tokens, rep):
            extra = {}
            if assistant is not None:
                config = assistant.generation_config
                config.num_assistant_tokens = args.hf_assistant_tokens
                config.num_assistant_tokens_schedule = args.hf_assistant_schedule
                config.assistant_confidence_threshold = args.hf_confidence_threshold
                extra["assistant_model"] = assistant
            torch.manual_seed(opts.seed + rep)
            with torch.no_grad():
                seqs = target.generate(
                    input_ids=ids, attention_mask=mask, max_new_tokens=max_new_tokens,
                    min_new_tokens=0, num_beams=1, repetition_penalty=1.0,
                    eos_token_id=opts.eos or None, pad_token_id=opts.pad_id, **sample, **extra)
            rows = []
            for b in range(ids.shape[0]):
                row = seqs[b, ids.shape[1]:].tolist()
                ends = [i for i, t in enumerate(row) if t in opts.eos]
                rows.append(row[:ends[0] + 1] if ends else row)
            return rows, None
        return call

    for name in names:
        if name == "plain":
            methods[name] = specops_method(None, num_draft_tokens=0)
        elif name == "hf-plain":
            methods[name] = hf_method(None)
        elif name == "hf-assisted":
            methods[name] = hf_method(draft)
        elif name.startswith("chain-fixed-"):
            methods[name] = specops_method(draft, num_draft_tokens=int(name[12:]))
        elif name == "chain-auto":
            methods[name] = specops_method(draft)
        elif name == "tree":
            methods[name] = specops_method(draft, tree=TREE)
        elif name == "tree-fixed":
            methods[name] = specops_method(draft, tree=dataclasses.replace(TREE, adaptive=False))
        elif name == "prompt-lookup":
            methods[name] = specops_method(PromptLookup(max_ngram=3))
        elif name == "hybrid":
            methods[name] = specops_method(Hybrid(draft, PromptLookup()))
        elif name == "hybrid-compare":
            methods[name] = specops_method(Hybrid(draft, PromptLookup(), compare=True))
    return methods


# --------------------------------------------------------------------------- measurement
def run_suite(methods: dict, batches: dict[str, list[tuple[list[str], list[list[int]]]]],
              opts: Options, reps: int, write) -> None:
    """Runs every (category, batch, rep) with all methods in a rotated order; ``write`` gets
    one record per run, identity flags filled in once every method of the rep has run."""
    names = list(methods)
    first = next(iter(batches.values()))[0]
    ids, mask = left_pad(first[1], opts.pad_id)
    for name in names:  # warm-up: first calls allocate, compile kernels, measure costs
        methods[name](ids, mask, min(8, opts.max_new_tokens), 0)
    turn = 0
    for category, groups in batches.items():
        for prompt_ids, rows in groups:
            ids, mask = left_pad(rows, opts.pad_id)
            for rep in range(reps):
                results = {}
                for i in range(len(names)):
                    name = names[(turn + i) % len(names)]
                    start = time.perf_counter()
                    out_rows, stats = methods[name](ids, mask, opts.max_new_tokens, rep)
                    wall = time.perf_counter() - start
                    results[name] = (i, wall, out_rows, stats)
                turn += 1
                for name in names:
                    order, wall, out_rows, stats = results[name]
                    record = dict(type="run", category=category, prompt_ids=prompt_ids,
                                  batch=len(rows), rep=rep, method=name, order=order,
                                  prompt_tokens=[len(r) for r in rows], wall_seconds=wall,
                                  new_tokens=[len(r) for r in out_rows],
                                  tokens_per_second=sum(len(r) for r in out_rows) / wall,
                                  output_hash=output_hash(out_rows), stats=stats)
                    for ref, key in (("plain", "plain"), ("hf-plain", "hf_plain")):
                        same, where = None, None
                        if ref in results and not opts.sampling:
                            where = [first_divergence(a, b)
                                     for a, b in zip(out_rows, results[ref][2])]
                            same = all(w is None for w in where)
                        record[f"identical_to_{key}"] = same
                        record[f"first_divergence_vs_{key}"] = where
                    write(record)


# --------------------------------------------------------------------------- summary
def quantile(values: list[float], q: float) -> float:
    return float(np.percentile(values, q * 100))


def geomean(values: list[float]) -> float | None:
    values = [v for v in values if v > 0]
    return math.exp(sum(map(math.log, values)) / len(values)) if values else None


def summarise(records: list[dict], header: dict) -> list[dict]:
    """One row per category x method (columns: :data:`SUMMARY_COLUMNS`)."""
    runs = [r for r in records if r.get("type") == "run"]
    per_prompt: dict[tuple, list[float]] = {}
    for r in runs:
        key = (r["category"], tuple(r["prompt_ids"]), r["method"])
        per_prompt.setdefault(key, []).append(r["tokens_per_second"])
    medians = {key: statistics.median(v) for key, v in per_prompt.items()}
    # the decode phase alone: new tokens over the loop's time minus prefill (specops only)
    per_prompt_decode: dict[tuple, list[float]] = {}
    for r in runs:
        s = r["stats"]
        if s and s["total_seconds"] > s["prefill_seconds"]:
            key = (r["category"], tuple(r["prompt_ids"]), r["method"])
            per_prompt_decode.setdefault(key, []).append(
                sum(r["new_tokens"]) / (s["total_seconds"] - s["prefill_seconds"]))
    decode_medians = {key: statistics.median(v) for key, v in per_prompt_decode.items()}
    rows = []
    keys = sorted({(r["category"], r["method"]) for r in runs},
                  key=lambda cm: (CATEGORIES.index(cm[0]) if cm[0] in CATEGORIES else 99,
                                  header["methods"].index(cm[1])))
    for category, method in keys:
        mine = [r for r in runs if r["category"] == category and r["method"] == method]
        speeds = [r["tokens_per_second"] for r in mine]
        prompts = sorted({tuple(r["prompt_ids"]) for r in mine})

        def speedup(baseline, table=medians):
            ratios = [table[(category, p, method)] / table[(category, p, baseline)]
                      for p in prompts
                      if (category, p, baseline) in table and (category, p, method) in table]
            return geomean(ratios)

        stats = [r["stats"] for r in mine if r["stats"]]
        row = dict(date=header["date"], commit=header["git_commit"], machine=header["machine"],
                   num_threads=header["num_threads"], target=header["target"],
                   draft=header["draft"], draft_dtype=header["draft_dtype"], category=category,
                   label=LABELS.get(category, category), method=method, batch=header["batch"],
                   sampling=header["sampling"], max_new_tokens=header["max_new_tokens"],
                   prompts=len(prompts), reps=header["reps"], runs=len(mine),
                   tok_s_median=statistics.median(speeds), tok_s_p10=quantile(speeds, 0.1),
                   tok_s_p90=quantile(speeds, 0.9), speedup_vs_plain=speedup("plain"),
                   speedup_vs_hf_assisted=speedup("hf-assisted"),
                   decode_speedup_vs_plain=speedup("plain", decode_medians),
                   mean_new_tokens=statistics.mean(sum(r["new_tokens"]) / len(r["new_tokens"])
                                                   for r in mine))
        row.update(_stats_columns(stats))
        for key in ("plain", "hf_plain"):
            flags = [r[f"identical_to_{key}"] for r in mine if r[f"identical_to_{key}"] is not None]
            row[f"identical_to_{key}"] = sum(flags) / len(flags) if flags else None
        rows.append(row)
    return rows


def _stats_columns(stats: list[dict]) -> dict:
    """tau, pooled acceptance per position, mean draft length and time shares of specops runs."""
    if not stats:
        return {}
    if all("row_steps" in s for s in stats):
        steps = sum(s["row_steps"] for s in stats)
        tau = sum(s["emitted"] for s in stats) / steps if steps else None
    else:
        tau = statistics.mean(s["mean_emitted_per_step"] for s in stats)
    if all("tried" in s for s in stats):
        width = max(len(s["tried"]) for s in stats)
        tried = [sum(s["tried"][i] for s in stats if i < len(s["tried"])) for i in range(width)]
        accepted = [sum(s["accepted"][i] for s in stats if i < len(s["accepted"]))
                    for i in range(width)]
        acceptance = [a / t if t else None for a, t in zip(accepted, tried)]
    else:
        width = max(len(s["acceptance_per_position"]) for s in stats)
        acceptance = [statistics.mean(s["acceptance_per_position"][i] for s in stats
                                      if i < len(s["acceptance_per_position"]))
                      for i in range(width)]
    lengths: dict[int, int] = {}
    for s in stats:
        for k, v in s["draft_lengths"].items():
            lengths[int(k)] = lengths.get(int(k), 0) + v
    total = sum(s["total_seconds"] for s in stats) or 1.0
    # "-": a position no run drafted (its rate is unknown, not 0)
    out = dict(tau=tau, acceptance_per_position=" ".join("-" if a is None else f"{a:.3f}"
                                                         for a in acceptance),
               mean_draft_length=(sum(k * v for k, v in lengths.items()) / sum(lengths.values())
                                  if lengths else None))
    for phase in ("prefill", "draft", "verify", "overhead"):
        out[f"{phase}_share"] = sum(s[f"{phase}_seconds"] for s in stats) / total
    # a call's cost warm-up (0 here: every method is warmed up before the measured calls;
    # records before 2026-11-28 have no such field and counted it as overhead) stays in
    # overhead, so that the four shares still add up to the whole call
    out["overhead_share"] += sum(s.get("warmup_seconds", 0.0) for s in stats) / total
    return out


def write_summary(path: Path, rows: list[dict]) -> None:
    def fmt(v):
        return "" if v is None else f"{v:.4g}" if isinstance(v, float) else v
    with path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=SUMMARY_COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: fmt(row.get(k)) for k in SUMMARY_COLUMNS})


def print_summary(rows: list[dict]) -> None:
    print(f"\n{'category':<14}{'method':<16}{'tok/s':>8}{'p10':>8}{'p90':>8}{'vs plain':>10}"
          f"{'vs hf-as':>10}{'tau':>7}{'=plain':>8}{'=hf':>7}")

    def f(v, spec):
        return format(v, spec) if v is not None else format("-", spec.split(".")[0])
    for r in rows:
        print(f"{r['category']:<14}{r['method']:<16}{r['tok_s_median']:>8.2f}{r['tok_s_p10']:>8.2f}"
              f"{r['tok_s_p90']:>8.2f}{f(r['speedup_vs_plain'], '>10.2f')}"
              f"{f(r['speedup_vs_hf_assisted'], '>10.2f')}{f(r.get('tau'), '>7.2f')}"
              f"{f(r['identical_to_plain'], '>8.0%')}{f(r['identical_to_hf_plain'], '>7.0%')}")


# --------------------------------------------------------------------------- main
def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--quick", action="store_true",
                   help="2 prompts per category, 1 rep, 32 new tokens")
    p.add_argument("--prompts", type=int, help="prompts per category (default 3; quick 2)")
    p.add_argument("--reps", type=int, help="repetitions (default 2; quick 1)")
    p.add_argument("--max-new-tokens", type=int, help="default 96; quick 32")
    p.add_argument("--categories", help=f"comma-separated, of {','.join(CATEGORIES)} (default: "
                   "all; code alone with --sampling or --batch)")
    p.add_argument("--methods", help=f"comma-separated, of {','.join(BASE_METHODS)} "
                   "(chain-fixed-K for a fixed K; default: all)")
    p.add_argument("--k", type=int, default=4, help="K of chain-fixed (default 4)")
    p.add_argument("--sampling", action="store_true", help="temperature 1.0, top-p 0.95")
    p.add_argument("--batch", type=int, default=1, help="prompts per call (left padded)")
    p.add_argument("--target", default="default-target")
    p.add_argument("--draft", default="default-draft")
    p.add_argument("--draft-dtype", choices=("bfloat16", "float32"), default="bfloat16")
    p.add_argument("--device", default="cpu")
    p.add_argument("--threads", type=int,
                   help="torch.set_num_threads (default: torch's choice; recorded either way)")
    p.add_argument("--seed", type=int, default=0, help="prompt sample and sampling seed")
    p.add_argument("--hf-assistant-tokens", type=int, default=5)
    p.add_argument("--hf-assistant-schedule", default="heuristic",
                   choices=("heuristic", "heuristic_transient", "constant"))
    p.add_argument("--hf-confidence-threshold", type=float, default=0.4)
    p.add_argument("--carry-controller", action="store_true",
                   help="keep the controller's acceptance estimates across calls")
    p.add_argument("--out", type=Path, default=BENCH / "results" / "e2e_cpu")
    p.add_argument("--resummarise", type=Path, metavar="JSONL",
                   help="rewrite JSONL's _summary.csv from its records (no models, no runs)")
    args = p.parse_args(argv)
    args.prompts = args.prompts or (2 if args.quick else 3)
    args.reps = args.reps or (1 if args.quick else 2)
    args.max_new_tokens = args.max_new_tokens or (32 if args.quick else 96)
    if args.categories:
        args.categories = [c.strip() for c in args.categories.split(",") if c.strip()]
    else:
        args.categories = ["code"] if args.sampling or args.batch > 1 else list(CATEGORIES)
    unknown = set(args.categories) - set(CATEGORIES)
    if unknown:
        p.error(f"unknown categories {sorted(unknown)}; known: {', '.join(CATEGORIES)}")
    args.methods = method_names(args.methods, args.k)
    if args.batch > 1 and "hf-assisted" in args.methods:
        print("hf-assisted skipped: Hugging Face's assisted generation takes batch size 1")
        args.methods.remove("hf-assisted")
    return args


def stop_ids(target, tokenizer) -> list[int]:
    eos = getattr(target.generation_config, "eos_token_id", None)
    if eos is None:
        eos = tokenizer.eos_token_id
    return [] if eos is None else [eos] if isinstance(eos, int) else list(eos)


def header_record(args, prompts: dict, opts: Options) -> dict:
    import transformers
    now = datetime.datetime.now(datetime.timezone.utc)
    cpu = machine("cpu")
    return dict(type="header", command=" ".join(["python", *map(shlex.quote, sys.argv)]),
                date=now.isoformat(timespec="seconds"), git_commit=git_commit(),
                machine=machine(args.device), cpu=cpu, cores=__import__("os").cpu_count(),
                num_threads=torch.get_num_threads(), python=platform.python_version(),
                torch=torch.__version__, transformers=transformers.__version__,
                specops=specops.__version__, device=args.device, target=args.target,
                draft=args.draft, target_dtype="float32", draft_dtype=args.draft_dtype,
                methods=args.methods, categories=args.categories,
                max_new_tokens=args.max_new_tokens, reps=args.reps, batch=args.batch,
                sampling=args.sampling, temperature=1.0 if args.sampling else 0.0,
                top_p=0.95 if args.sampling else 1.0, seed=args.seed, eos_token_id=opts.eos,
                tree=dict(depth=TREE.depth, top_k=TREE.top_k, num_nodes=TREE.num_nodes),
                hf_assistant=dict(num_assistant_tokens=args.hf_assistant_tokens,
                                  num_assistant_tokens_schedule=args.hf_assistant_schedule,
                                  assistant_confidence_threshold=args.hf_confidence_threshold),
                carry_controller=args.carry_controller,
                prompt_ids={c: [p.id for p in ps] for c, ps in prompts.items()},
                prompt_sources={c: ps[0].source for c, ps in prompts.items() if ps})


def resummarise(jsonl: Path) -> Path:
    """Rewrites the summary of a finished (or stopped) run from its raw records."""
    records = [json.loads(line) for line in jsonl.read_text().splitlines() if line.strip()]
    rows = summarise(records, records[0])
    summary = jsonl.with_name(jsonl.stem + "_summary.csv")
    write_summary(summary, rows)
    print_summary(rows)
    return summary


def main(argv=None) -> Path:
    args = parse_args(argv)
    if args.resummarise:
        return resummarise(args.resummarise)
    if args.threads:
        torch.set_num_threads(args.threads)
    from specops.pretrained import load_model
    dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32}[args.draft_dtype]
    target, tokenizer = load_model(args.target, torch.float32, device=args.device)
    draft = None
    if any(m in NEEDS_DRAFT or m.startswith("chain-fixed-") for m in args.methods):
        draft, _ = load_model(args.draft, dtype, device=args.device)
    eos = stop_ids(target, tokenizer)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (eos or [0])[0]
    opts = Options(args.max_new_tokens, eos, pad, args.sampling, args.seed)

    prompts = {c: load_prompts(c, args.prompts, seed=args.seed) for c in args.categories}
    batches = {}
    for category, ps in prompts.items():
        groups = [ps[i:i + args.batch] for i in range(0, len(ps), args.batch)]
        batches[category] = [([p.id for p in g], [encode(tokenizer, p.text) for p in g])
                             for g in groups]

    methods = make_methods(args.methods, target, draft, opts, args)
    header = header_record(args, prompts, opts)
    args.out.mkdir(parents=True, exist_ok=True)
    stamp = header["date"].replace(":", "").replace("-", "").replace("+0000", "Z")
    jsonl = args.out / f"e2e_{stamp}.jsonl"
    records = [header]
    with jsonl.open("w") as f:
        f.write(json.dumps(header) + "\n")

        def write(record):
            records.append(record)
            f.write(json.dumps(record) + "\n")
            f.flush()
            print(f"{record['category']:<14}{','.join(record['prompt_ids'])[:28]:<30}"
                  f"rep {record['rep']} {record['method']:<16}"
                  f"{record['tokens_per_second']:8.2f} tok/s  {sum(record['new_tokens'])} tokens"
                  f"  ={'plain' if record['identical_to_plain'] else '     '}", flush=True)

        run_suite(methods, batches, opts, args.reps, write)
    rows = summarise(records, header)
    summary = args.out / f"e2e_{stamp}_summary.csv"
    write_summary(summary, rows)
    print_summary(rows)
    print(f"\nwrote {jsonl}\n      {summary}")
    return summary


if __name__ == "__main__":
    main()
