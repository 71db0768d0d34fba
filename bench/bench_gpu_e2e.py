"""GPU suite: the specops loop at real model shapes with random weights and a SYNTHETIC drafter.

Nothing is downloaded: the models are built on the device from transformers configs with the
shapes of real checkpoints (``--pair``):

| pair | target | draft |
|---|---|---|
| ``llama3-8b`` | Llama-3-8B shape (32 layers, 4096 hidden, 32/8 heads, vocab 128256) | Llama-3.2-1B shape (16 layers, 2048 hidden, 32/8 heads) |
| ``qwen2.5-1.5b`` | Qwen2.5-1.5B shape (28 layers, 1536 hidden, 12/2 heads, vocab 151936) | Qwen2.5-0.5B shape (24 layers, 896 hidden, 14/2 heads) |

``--tiny`` shrinks both to 2 layers, 64 hidden, 4/2 heads, vocab 1024, to check the script on a
CPU in seconds. Weights are random in ``--dtype`` (default bfloat16 on CUDA, float32 on the CPU).

The synthetic drafter (``SyntheticDrafter``; its rows are labelled ``synthetic``): for each
draft position it proposes the target's own greedy token with probability ``alpha`` and a
random other token otherwise, so with greedy verification each draft token is accepted with
probability exactly ``alpha`` given the ones before it. It still pays a real draft model's
cost: every step it runs the draft model's forward (one token per row, over a static KV cache
as long as the row) once per draft position and discards the logits. The target's greedy
continuation comes from running specops plain greedy decoding (eager) once per batch and
indexing it by each row's length. The drafter checks every row
against that recording and counts rows that left it (``drift_rows``): a bfloat16 near-tie
decided differently by a 1-token and a (g+1)-token forward would do that. To make such ties
impossible, the target's ``lm_head`` is a copy of its input embedding and every attention and
MLP output projection is scaled by 1e-2 (``--natural-weights`` turns this off): each
position's greedy token is then its own input token by a margin of about sqrt(hidden) standard
deviations, so the greedy continuation repeats the last prompt token. Costs depend only on the
shapes, not on the values.

The drafter plugs into ``specops.generate`` as a draftless proposer: the loop has no public
drafter base class yet, so it subclasses ``specops.PromptLookup`` (whose ``propose(rows,
num_draft)`` the loop calls during the draft phase, timed as draft).

CUDA graphs (``--graphs``, default ``auto``: on where the device has graphs, which is CUDA;
``on`` refuses a device without them; ``off``): with graphs on, ``specops.generate`` runs with
``cuda_graphs=True``, which replays the target's verify forward (in plain decoding: each
one-token decode step) from a CUDA graph per input shape; the prefill stays eager. On the CPU
there are no graphs (``cuda_graphs=True`` would silently run eagerly), so ``auto`` turns them
off there and no row claims them. They are also off, with a printed note, for a target whose
specops forward the loop never graphs (``graph_safe`` false: a model without specops' compact
forward). The ``graphs`` column says which mode a specops row ran in (empty for the Hugging
Face rows: specops' ``cuda_graphs`` does not apply to them, though transformers' compiled
static-cache path may use CUDA graphs of its own through ``torch.compile``'s
"reduce-overhead" mode). Each measurement reuses one ``specops.SpeculativeGenerator``, which
keeps its caches and graphs between calls of the same batch size and room (``cuda_graphs`` in
its docstring); with graphs, one untimed call captures them and the timed calls replay them,
as an engine serving requests would (``specops.generate`` alone would capture at every
call). With graphs the synthetic drafter replays its draft model's one-token step from a
graph too (its own ``GraphedStep``, kept across repetitions as the loop's draft runner keeps
its own; before 2026-11-27 14:50 UTC it ran eagerly, 47 ms a forward on the H200, which made
that run's loop rows meaningless).

Measured, for each batch size in ``--batches``:
- ``verify_cost``: the target's forward (specops' static-cache forward, the one the loop uses)
  of ``n = 1..9`` tokens per row after a ``--prompt-len`` prefix: ``T(n)`` (eager).
- ``draft_cost``: the draft model's forward of one token per row: ``T_draft`` (eager).
- ``baseline``, in this order: ``specops-plain`` (the loop without a draft, draft length 0,
  eager), ``specops-plain-graphs`` (the same with ``cuda_graphs=True``; only with graphs on),
  ``specops-plain-graphs-compiled`` (the same with ``compile=True`` too, so the graphs
  capture TorchInductor's fused kernels; ``--specops-compile``, default on CUDA only, and
  ``specops-plain-compiled`` where graphs are off; its first, untimed call compiles, and
  its time over a timed call's is ``compile_seconds``; column ``compiled``),
  ``specops-plain-graphs-unfused`` (graphed, with specops' forward running its layer as plain
  PyTorch ops, ``layer_kernels="torch"``, instead of the fused Triton layer kernels it uses on
  CUDA since 2026-11-27: an A/B of those kernels in one run; with graphs only,
  ``--no-unfused`` skips it),
  ``hf-eager`` (transformers ``generate``, dynamic cache) and ``hf-static``
  (``cache_implementation="static"``, compiled by transformers' automatic ``torch.compile`` on
  CUDA, then named ``hf-static-compiled``; its first call compiles and is timed separately as
  ``compile_seconds``; ``--no-compile`` or a CPU run leaves it eager). The two specops rows
  carry ``speedup_vs_hf_static`` too, and a line ``plain decoding, batch B: ...`` printed after
  the baselines compares the four.
- ``loop``: tokens/s of ``specops.generate(target, ids, draft=SyntheticDrafter(alpha),
  num_draft_tokens=g)`` (with ``cuda_graphs=True`` when graphs are on) for alpha in
  ``--alphas`` and g in ``--draft-lengths``, with the ceiling ``B (1 - a^(g+1)) / (1 - a)``
  tokens per ``g T_draft + T(g+1)`` seconds (eager forward costs, so with graphs a row may
  exceed it), the measured mean emitted tokens per step against its expectation, and the
  speedup over the specops plain baseline of the same mode (``specops-plain-graphs`` when
  graphs are on, else ``specops-plain``) and over ``hf-static`` of the same run. The last step
  of a row is cut at ``max_new_tokens``, so at short runs the measured tau sits a little below
  the expectation even at alpha = 1.
- ``loop`` rows ``draft-model`` (g in ``--draft-lengths``) and ``draft-model-tree`` (an
  EAGLE-2 tree, depth 4, top-4, 16 nodes, fixed size): the real draft model through the loop's
  draft runner (catch-up feed, chain drafting, tree growth; graphed with graphs on). The draft
  is built like the target (``--natural-weights`` aside), so its greedy token also repeats its
  input and it agrees with the target at every position: acceptance 1 by construction, the
  best case of a draft of this size at its real cost. Columns as the synthetic rows', plus the
  last timed call's ``draft_seconds``, ``verify_seconds`` and ``overhead_seconds``
  (``GenerationStats``; with graphs no device sync separates the phases, so the split is
  approximate). ``--no-draft-model`` skips them.

Every row is generated with ``max_new_tokens`` (``--new-tokens``) and no stop token, from random
prompts of ``--prompt-len`` tokens (one per row). ``--budget-s`` (default 230) bounds the whole
invocation: a baseline or loop measurement that would start with less than ``--min-left-s``
left is recorded as skipped instead (the forward costs and the recording of the greedy
continuation always run once a batch has started; a measurement that has started runs to its
end, so the invocation may overrun the budget by one measurement). A configuration is one pair
at one batch size, one invocation each, so that each stays under 4 minutes on an H100 (not
yet measured on a GPU: the budget guards it; the compiled Hugging Face baseline's first call,
``torch.compile`` of the whole target, is likely the largest single item and is recorded as
``compile_seconds``). ``bench/run_gpu.sh`` runs the plain-decoding target's configuration:
``--pair qwen2.5-1.5b --batches 1`` with a short alpha and draft-length set.

    for b in 1 4 16 64; do python bench/bench_gpu_e2e.py --pair llama3-8b --batches $b; done
    for b in 1 4 16 64; do python bench/bench_gpu_e2e.py --pair qwen2.5-1.5b --batches $b; done
    python bench/bench_gpu_e2e.py --pair llama3-8b --batches 64 --alphas 0.6,0.8 --reps 3
    python bench/bench_gpu_e2e.py --tiny            # CPU check, tiny shapes, seconds

Output: ``bench/results/gpu_e2e/gpu_e2e_<pair>_<UTC date-time>.json`` (header + every
measurement, skipped ones included) and ``.csv`` (one row per measurement, ``section`` column).
Every row is also printed as it is measured, so a run killed by a timeout leaves its rows in
its log.
"""

import argparse
import csv
import datetime
import functools
import json
import platform
import shlex
import statistics
import sys
import time
from pathlib import Path

import numpy as np
import torch

BENCH = Path(__file__).resolve().parent
ROOT = BENCH.parent
sys.path[:0] = [str(ROOT), str(BENCH)]
from bench_ops import git_commit, machine  # noqa: E402

import specops  # noqa: E402
from specops import PromptLookup  # noqa: E402
from specops.graphs import GraphedStep, graph_backend  # noqa: E402
from specops.models import SpecopsCausalLM, causal_lm  # noqa: E402

# Shapes of the public configs (config.json of each checkpoint); rope scaling and special
# tokens are left out: they do not change the cost, and no stop token may end a row early.
SHAPES = {
    "llama3-8b": dict(vocab_size=128256, hidden_size=4096, intermediate_size=14336,
                      num_hidden_layers=32, num_attention_heads=32, num_key_value_heads=8,
                      rope_theta=500000.0, tie_word_embeddings=False),
    "llama3.2-1b": dict(vocab_size=128256, hidden_size=2048, intermediate_size=8192,
                        num_hidden_layers=16, num_attention_heads=32, num_key_value_heads=8,
                        head_dim=64, rope_theta=500000.0, tie_word_embeddings=True),
    "qwen2.5-1.5b": dict(vocab_size=151936, hidden_size=1536, intermediate_size=8960,
                         num_hidden_layers=28, num_attention_heads=12, num_key_value_heads=2,
                         rope_theta=1000000.0, tie_word_embeddings=True),
    "qwen2.5-0.5b": dict(vocab_size=151936, hidden_size=896, intermediate_size=4864,
                         num_hidden_layers=24, num_attention_heads=14, num_key_value_heads=2,
                         rope_theta=1000000.0, tie_word_embeddings=True),
}
PAIRS = {"llama3-8b": ("llama", "llama3-8b", "llama3.2-1b"),
         "qwen2.5-1.5b": ("qwen2", "qwen2.5-1.5b", "qwen2.5-0.5b")}
TINY = dict(vocab_size=1024, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
            num_attention_heads=4, num_key_value_heads=2, head_dim=16)
COLUMNS = ["date", "commit", "machine", "pair", "tiny", "dtype", "section", "method", "batch",
           "n", "alpha", "g", "seconds", "p10_seconds", "p90_seconds", "tokens_per_s",
           "ceiling_tokens_per_s", "vs_ceiling", "tau", "tau_expected", "acceptance_per_position",
           "speedup_vs_plain", "speedup_vs_hf_static", "drift_rows", "compile_seconds", "reps",
           "graphs", "compiled", "draft_seconds", "verify_seconds", "overhead_seconds", "status"]


# --------------------------------------------------------------------------- models
def build_model(family: str, shape: dict, dtype: torch.dtype, device: str, seed: int,
                stable_greedy: bool, max_positions: int):
    """A randomly initialised causal LM of ``shape``, built directly on ``device``."""
    import transformers
    config_class, model_class = {
        "llama": (transformers.LlamaConfig, transformers.LlamaForCausalLM),
        "qwen2": (transformers.Qwen2Config, transformers.Qwen2ForCausalLM),
    }[family]
    config = config_class(**shape, max_position_embeddings=max_positions, bos_token_id=None,
                          eos_token_id=None, pad_token_id=None)
    torch.manual_seed(seed)
    default = torch.get_default_dtype()
    torch.set_default_dtype(dtype)   # built in dtype: an 8B model never exists in float32
    try:
        with torch.device(device):
            model = model_class(config).eval()
    finally:
        torch.set_default_dtype(default)
    if stable_greedy:
        with torch.no_grad():
            if not config.tie_word_embeddings:
                model.lm_head.weight.copy_(model.model.embed_tokens.weight)
            for layer in model.model.layers:
                layer.self_attn.o_proj.weight.mul_(1e-2)
                layer.mlp.down_proj.weight.mul_(1e-2)
    return model


def ceiling_tokens(alpha: float, g: int) -> float:
    """Expected tokens per row and step: (1 - a^(g+1)) / (1 - a), = g + 1 at a = 1."""
    return g + 1.0 if alpha >= 1.0 else (1.0 - alpha ** (g + 1)) / (1.0 - alpha)


# --------------------------------------------------------------------------- drafter
class SyntheticDrafter(PromptLookup):
    """SYNTHETIC drafter: the target's greedy token with probability ``alpha``, else a random
    other token; pays a real draft model's forward per draft position (module docstring).

    Args:
        recorded: ``batch_size`` rows, each the prompt then the target's greedy continuation
            (from plain greedy decoding), token ids.
        alpha: Probability of proposing the greedy token, in ``[0, 1]``.
        draft_lm: The draft model (``specops.models.SpecopsCausalLM``) whose cost is paid, or
            None for a free drafter.
        vocab_size: Random tokens are drawn from ``0..vocab_size - 1``.
        seed: Seed of the proposals' randomness.
    """

    def __init__(self, recorded: list[list[int]], alpha: float, draft_lm, vocab_size: int,
                 seed: int = 0, graphs: bool = False):
        super().__init__(max_ngram=1, min_ngram=1, num_draft=8)
        self.recorded = recorded
        self.alpha = alpha
        self.draft_lm = draft_lm
        self.vocab_size = vocab_size
        self.graphs = graphs
        self.cache = self._one_token = None   # built at the first draft step, then kept
        self.reset(seed)

    def reset(self, seed: int) -> None:
        """A fresh start for the next call (its draft cache is prefilled again; the cache
        and its graphed step are kept, as the loop's draft runner keeps its own), drawing
        from ``seed``: one drafter, and so one generator, serves every repetition."""
        self.rng = np.random.default_rng(seed)
        self.prefilled = False
        self.drifted = [False] * len(self.recorded)
        self.checked = [0] * len(self.recorded)

    def _pay_draft_cost(self, rows, num_draft: int) -> None:
        lm, batch = self.draft_lm, len(rows)
        if self.cache is None:
            capacity = max(len(r) for r in self.recorded) + 16
            cache = self.cache = lm.new_cache(batch, capacity)

            def one_token(token, lens, positions):
                return lm(token, cache, lens, positions)
            # like the loop's draft runner: the one-token step replayed from a device graph
            self._one_token = (GraphedStep(one_token, device=lm.device) if self.graphs
                               else one_token)
        if not self.prefilled:   # first step: prefill the prompts, like a real draft model
            self.prefilled = True
            width = min(len(r) for r in rows) - 1
            if width > 0:
                tokens = torch.tensor([r[:width] for r in rows], device=lm.device)
                zeros = torch.zeros(batch, dtype=torch.int32, device=lm.device)
                positions = torch.arange(width, device=lm.device).expand(batch, -1)
                lm(tokens, self.cache, zeros, positions,
                   logits_index=torch.zeros(batch, 1, dtype=torch.int64, device=lm.device),
                   prefill=True)
        capacity = self.cache.capacity
        lens = torch.tensor([min(len(r), capacity - num_draft - 1) for r in rows],
                            dtype=torch.int32, device=lm.device)
        token = torch.tensor([[r[-1]] for r in rows], device=lm.device)
        for j in range(num_draft):   # the logits are discarded: only the cost matters
            self._one_token(token, lens + j, (lens + j).long()[:, None])

    def propose(self, rows, num_draft: int) -> list[list[int]]:
        if self.draft_lm is not None and num_draft > 0:
            self._pay_draft_cost(rows, num_draft)
        out = []
        for b, row in enumerate(rows):
            recorded = self.recorded[b]
            if not self.drifted[b]:
                start = self.checked[b]
                if list(row[start:]) != recorded[start:len(row)]:
                    self.drifted[b] = True
                self.checked[b] = len(row)
            proposal = []
            for position in range(len(row), min(len(row) + num_draft, len(recorded))):
                greedy = recorded[position]
                if self.rng.random() < self.alpha:
                    proposal.append(greedy)
                else:   # any token but the greedy one: certainly rejected
                    other = int(self.rng.integers(self.vocab_size - 1))
                    proposal.append(other + (other >= greedy))
            out.append(proposal)
        return out

    @property
    def drift_rows(self) -> int:
        """Rows whose committed tokens left the recorded greedy continuation."""
        return sum(self.drifted)

    def __repr__(self) -> str:
        return f"SyntheticDrafter(alpha={self.alpha}, rows={len(self.recorded)})"


# --------------------------------------------------------------------------- timing
def sync(device: str) -> None:
    if device.startswith("cuda"):
        torch.cuda.synchronize()


def timed(fn, device: str) -> float:
    sync(device)
    start = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - start


def spread(values: list[float]) -> dict:
    return dict(seconds=statistics.median(values), p10_seconds=float(np.percentile(values, 10)),
                p90_seconds=float(np.percentile(values, 90)), reps=len(values))


class Budget:
    def __init__(self, seconds: float):
        self.deadline = time.monotonic() + seconds

    def left(self) -> float:
        return self.deadline - time.monotonic()


# --------------------------------------------------------------------------- sections
def forward_costs(target_lm, draft_lm, prompts: torch.Tensor, device: str, reps: int,
                  max_n: int) -> tuple[list[dict], dict[int, float], float]:
    """Rows for ``T(n)``, n = 1..max_n, and ``T_draft``; returns them and the medians."""
    batch, prompt_len = prompts.shape
    rows, verify = [], {}
    for name, lm, sizes in (("verify_cost", target_lm, range(1, max_n + 1)),
                            ("draft_cost", draft_lm, [1])):
        cache = lm.new_cache(batch, prompt_len + max_n + 1)
        zeros = torch.zeros(batch, dtype=torch.int32, device=device)
        positions = torch.arange(prompt_len, device=device).expand(batch, -1)
        lm(prompts, cache, zeros, positions, logits_index=zeros.long()[:, None], prefill=True)
        lens = torch.full((batch,), prompt_len, dtype=torch.int32, device=device)
        for n in sizes:
            tokens = prompts[:, :n]
            pos = lens.long()[:, None] + torch.arange(n, device=device)
            lm(tokens, cache, lens, pos)   # warm-up of this shape
            times = [timed(lambda: lm(tokens, cache, lens, pos), device) for _ in range(reps)]
            rows.append(dict(section=name, method=name.split("_")[0], batch=batch, n=n,
                             **spread(times), status="ok"))
            if name == "verify_cost":
                verify[n] = statistics.median(times)
    return rows, verify, rows[-1]["seconds"]


def hf_baseline(target, prompts: torch.Tensor, new_tokens: int, static: bool, compile_: bool,
                device: str, reps: int) -> dict:
    kwargs = dict(max_new_tokens=new_tokens, min_new_tokens=new_tokens, do_sample=False,
                  num_beams=1, pad_token_id=0, attention_mask=torch.ones_like(prompts))
    if static:
        kwargs.update(cache_implementation="static", disable_compile=not compile_)
    call = lambda: target.generate(prompts, **kwargs)  # noqa: E731
    first = timed(call, device)   # compiles (static + compile), allocates
    times = [timed(call, device) for _ in range(reps)]
    method = ("hf-static-compiled" if compile_ else "hf-static") if static else "hf-eager"
    return dict(section="baseline", method=method, batch=prompts.shape[0], **spread(times),
                tokens_per_s=prompts.shape[0] * new_tokens / statistics.median(times),
                compile_seconds=first - statistics.median(times) if static and compile_ else None,
                status="ok")


def plain_summary(batch: int, rows: list[dict]) -> str:
    """One line comparing the measured plain-decoding baselines, fastest first (the target:
    ``specops-plain-graphs`` at least ``hf-static-compiled``); skipped ones are left out."""
    ranked = sorted(rows, key=lambda r: -r["tokens_per_s"])
    text = ", ".join(f"{r['method']} {r['tokens_per_s']:.1f} tok/s" for r in ranked)
    return f"plain decoding, batch {batch}: {text or 'nothing measured'}"


def run_batch(args, target, draft_lm, batch: int, budget: Budget, log) -> list[dict]:
    device, vocab = args.device, target.config.vocab_size
    target_lm = causal_lm(target)
    gen = torch.Generator().manual_seed(args.seed + batch)
    prompts = torch.randint(0, vocab, (batch, args.prompt_len), generator=gen).to(device)
    max_g = max(args.draft_lengths)
    rows, verify, t_draft = forward_costs(target_lm, draft_lm, prompts, device, args.reps_cost,
                                          max_g + 1)
    for r in rows:
        log(r)

    # The greedy continuation, recorded once, eagerly (max_g tokens longer than any loop run
    # needs; also the eager warm-up), then specops plain decoding timed as the baseline: eager,
    # and with CUDA graphs when they are on (after one untimed call: module docstring).
    out = specops.generate(target, prompts, max_new_tokens=args.new_tokens + max_g,
                           eos_token_id=[], cuda_graphs=False)
    recorded = [r[:args.prompt_len + n] for r, n in zip(out.sequences.tolist(),
                                                        out.num_new_tokens)]

    # by (graphs, compiled) mode, the fused layer kernels' (the default); a skipped one is
    # missing; the unfused row (its layer in plain PyTorch ops) is an A/B of those kernels
    plain_rows: dict[tuple[bool, bool], dict] = {}
    unfused_row = None
    modes = [(False, False, True)] + [(True, False, True)] * args.graphs + \
        [(True, False, False)] * (args.graphs and args.unfused) + \
        [(args.graphs, True, True)] * args.specops_compile
    for graphs, compiled, fused in modes:
        method = "specops-plain" + "-graphs" * graphs + "-compiled" * compiled + \
            "-unfused" * (not fused)
        base = dict(section="baseline", method=method, batch=batch, graphs=graphs,
                    compiled=compiled)
        if budget.left() < args.min_left_s:
            rows.append(log(dict(base, status="skipped (budget)")))
            continue

        model = target if fused else SpecopsCausalLM(target, layer_kernels="torch")
        plain = functools.partial(specops.SpeculativeGenerator(
            model, eos_token_id=[], cuda_graphs=graphs, compile=compiled).generate, prompts,
            max_new_tokens=args.new_tokens)
        first = None
        if graphs or compiled:   # untimed: captures the graphs (compiles the steps) that the
            first = timed(plain, device)    # timed calls replay
        times = [timed(plain, device) for _ in range(args.reps)]
        median = statistics.median(times)
        row = dict(base, **spread(times), status="ok",
                   tokens_per_s=batch * args.new_tokens / median,
                   compile_seconds=first - median if compiled else None)
        if fused:
            plain_rows[graphs, compiled] = row
        else:
            unfused_row = row
        rows.append(log(row))

    hf_static, hf_rows = None, {}
    for static in (False, True):
        compile_ = static and args.compile
        method = ("hf-static-compiled" if compile_ else "hf-static") if static else "hf-eager"
        if budget.left() < args.min_left_s:
            rows.append(log(dict(section="baseline", method=method, batch=batch,
                                 status="skipped (budget)")))
            continue
        row = hf_baseline(target, prompts, args.new_tokens, static, compile_, device, args.reps)
        rows.append(log(row))
        hf_rows[method] = row
        if static:
            hf_static = row["tokens_per_s"]
    specops_rows = [*plain_rows.values(), *([unfused_row] if unfused_row else [])]
    for row in specops_rows:
        row["speedup_vs_hf_static"] = row["tokens_per_s"] / hf_static if hf_static else None
    print(plain_summary(batch, [*specops_rows, *hf_rows.values()]), flush=True)

    for alpha in args.alphas:
        for g in args.draft_lengths:
            base = dict(section="loop", method="synthetic", batch=batch, alpha=alpha, g=g,
                        graphs=args.graphs)
            if budget.left() < args.min_left_s:
                rows.append(log(dict(base, status="skipped (budget)")))
                continue
            times, stats, drift = [], None, 0
            drafter = SyntheticDrafter(recorded, alpha, draft_lm, vocab, graphs=args.graphs)
            gen = specops.SpeculativeGenerator(target, drafter, num_draft_tokens=g,
                                               eos_token_id=[], cuda_graphs=args.graphs)

            def call(seed: int) -> specops.GenerationOutput:
                drafter.reset(seed)
                return gen.generate(prompts, max_new_tokens=args.new_tokens)
            if args.graphs:
                call(args.seed + args.reps)   # untimed: captures what the timed calls replay
            for rep in range(args.reps):
                result = []
                times.append(timed(lambda: result.append(call(args.seed + rep)), device))
                stats, drift = result[0].stats, max(drift, drafter.drift_rows)
            tps = batch * args.new_tokens / statistics.median(times)
            expected = ceiling_tokens(alpha, g)
            # the plain baseline of the same mode (loop rows are never compiled)
            same_mode = plain_rows.get((args.graphs, False))
            ceiling = batch * expected / (g * t_draft + verify[g + 1])
            rows.append(log(dict(
                base, **spread(times), tokens_per_s=tps, ceiling_tokens_per_s=ceiling,
                vs_ceiling=tps / ceiling, tau=stats.mean_emitted_per_step, tau_expected=expected,
                acceptance_per_position=" ".join(
                    f"{a / t:.3f}" if t else "-" for a, t in zip(stats.accepted, stats.tried)),
                speedup_vs_plain=tps / same_mode["tokens_per_s"] if same_mode else None,
                speedup_vs_hf_static=tps / hf_static if hf_static else None, drift_rows=drift,
                status="ok")))

    # The real draft model through the loop's draft runner (its catch-up, chain drafting and
    # tree growth, graphed with graphs on). Built like the target, its greedy token repeats
    # its input as the target's does, so it always agrees: acceptance 1 by construction,
    # the best case of a draft this size, at its real cost.
    same_mode = plain_rows.get((args.graphs, False))
    for method, g, options in agreeing_draft_methods(args):
        base = dict(section="loop", method=method, batch=batch, g=g, graphs=args.graphs)
        if budget.left() < args.min_left_s:
            rows.append(log(dict(base, status="skipped (budget)")))
            continue
        gen = specops.SpeculativeGenerator(target, draft_lm.hf_model, eos_token_id=[],
                                           cuda_graphs=args.graphs, **options)
        call = functools.partial(gen.generate, prompts, max_new_tokens=args.new_tokens)
        if args.graphs:
            call()                        # untimed: captures what the timed calls replay
        times, result = [], []
        for _ in range(args.reps):
            times.append(timed(lambda: result.append(call()), device))
        out = result[-1]
        drift = sum(seq[:len(rec)] != rec for seq, rec in
                    zip(out.sequences.tolist(), [r[:args.prompt_len + args.new_tokens]
                                                 for r in recorded]))
        tps = batch * args.new_tokens / statistics.median(times)
        stats = out.stats
        rows.append(log(dict(
            base, **spread(times), tokens_per_s=tps, tau=stats.mean_emitted_per_step,
            acceptance_per_position=" ".join(
                f"{a / t:.3f}" if t else "-" for a, t in zip(stats.accepted, stats.tried)),
            draft_seconds=stats.draft_seconds, verify_seconds=stats.verify_seconds,
            overhead_seconds=stats.overhead_seconds,
            speedup_vs_plain=tps / same_mode["tokens_per_s"] if same_mode else None,
            speedup_vs_hf_static=tps / hf_static if hf_static else None, drift_rows=drift,
            status="ok")))
    return rows


def agreeing_draft_methods(args) -> list[tuple[str, int, dict]]:
    """``(method, g, generator options)`` of the agreeing-draft rows: a chain of each of
    ``--draft-lengths`` and an EAGLE-2 tree of ``TREE`` (fixed size, g = its depth); none
    with ``--no-draft-model``."""
    if not args.draft_model:
        return []
    chains = [("draft-model", g, dict(num_draft_tokens=g)) for g in args.draft_lengths]
    tree = specops.DynamicTree(**TREE, adaptive=False)
    return chains + [("draft-model-tree", tree.depth, dict(tree=tree))]


# The agreeing draft's tree rows: the CPU end-to-end suite's tree (bench_e2e.py)
TREE = dict(depth=4, top_k=4, num_nodes=16)


# --------------------------------------------------------------------------- main
def floats(text: str) -> list[float]:
    return [float(x) for x in text.split(",") if x.strip()]


def ints(text: str) -> list[int]:
    return [int(x) for x in text.split(",") if x.strip()]


def parse_args(argv=None) -> argparse.Namespace:
    p = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    p.add_argument("--pair", choices=sorted(PAIRS), default="llama3-8b")
    p.add_argument("--tiny", action="store_true", help="tiny shapes (CPU check)")
    p.add_argument("--device", help="default: cuda if available, else cpu")
    p.add_argument("--dtype", choices=("bfloat16", "float16", "float32"),
                   help="default: bfloat16 on CUDA, float32 on the CPU")
    p.add_argument("--batches", type=ints, help="default 1 (tiny: 1,2)")
    p.add_argument("--alphas", type=floats, default=[0.6, 0.7, 0.8, 0.9])
    p.add_argument("--draft-lengths", type=ints, default=list(range(1, 9)))
    p.add_argument("--new-tokens", type=int, help="per row (default 64; tiny 16)")
    p.add_argument("--prompt-len", type=int, help="random prompt tokens (default 128; tiny 16)")
    p.add_argument("--reps", type=int, default=1, help="timed calls per loop/baseline point")
    p.add_argument("--reps-cost", type=int, default=10, help="timed calls per forward cost")
    p.add_argument("--budget-s", type=float, default=230.0,
                   help="wall budget of the whole invocation (seconds)")
    p.add_argument("--min-left-s", type=float,
                   help="skip a measurement when less than this is left (default 15; tiny 0)")
    p.add_argument("--graphs", choices=("auto", "on", "off"), default="auto",
                   help="specops with cuda_graphs=True: auto = on where the device has graphs "
                        "(CUDA), off on the CPU; on refuses a device without them")
    p.add_argument("--no-compile", dest="compile", action="store_false",
                   help="hf-static without torch.compile (always so on the CPU)")
    p.add_argument("--specops-compile", choices=("auto", "on", "off"), default="auto",
                   help="also measure specops plain decoding with compile=True (and graphs "
                        "when they are on): auto = on CUDA only")
    p.add_argument("--no-unfused", dest="unfused", action="store_false",
                   help="skip specops-plain-graphs-unfused (with graphs on, graphed plain "
                        "decoding with the layer in PyTorch ops instead of the fused Triton "
                        "layer kernels: an A/B of those)")
    p.add_argument("--no-draft-model", dest="draft_model", action="store_false",
                   help="skip the agreeing draft model's loop rows (draft-model, "
                        "draft-model-tree)")
    p.add_argument("--natural-weights", action="store_true",
                   help="plain random init (greedy continuation may drift under bf16)")
    p.add_argument("--threads", type=int, help="torch.set_num_threads (CPU runs)")
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--out", type=Path, default=BENCH / "results" / "gpu_e2e")
    args = p.parse_args(argv)
    args.device = args.device or ("cuda" if torch.cuda.is_available() else "cpu")
    args.dtype = args.dtype or ("bfloat16" if args.device.startswith("cuda") else "float32")
    args.batches = args.batches or ([1, 2] if args.tiny else [1])
    args.new_tokens = args.new_tokens or (16 if args.tiny else 64)
    args.prompt_len = args.prompt_len or (16 if args.tiny else 128)
    args.min_left_s = args.min_left_s if args.min_left_s is not None else (0 if args.tiny else 15)
    if not args.device.startswith("cuda"):
        args.compile = False
    args.specops_compile = (args.specops_compile == "on" or args.specops_compile == "auto"
                            and args.device.startswith("cuda"))
    # cuda_graphs=True runs eagerly where the device has no graph backend: never claim graphs
    has_graphs = graph_backend(args.device) is not None
    if args.graphs == "on" and not has_graphs:
        p.error(f"--graphs on: no device graphs on {args.device} (CUDA only); use --graphs off")
    args.graphs_option = args.graphs
    args.graphs = has_graphs if args.graphs == "auto" else args.graphs == "on"
    if any(not 0 <= a <= 1 for a in args.alphas) or any(g < 1 for g in args.draft_lengths):
        p.error("alphas must be in [0, 1] and draft lengths >= 1")
    if args.prompt_len < max(args.draft_lengths) + 1:
        p.error("--prompt-len must be at least the longest draft length + 1")
    return args


def main(argv=None) -> Path:
    args = parse_args(argv)
    if args.threads:
        torch.set_num_threads(args.threads)
    budget = Budget(args.budget_s)
    dtype = getattr(torch, args.dtype)
    family, target_name, draft_name = PAIRS[args.pair]
    target_shape, draft_shape = SHAPES[target_name], SHAPES[draft_name]
    if args.tiny:
        target_shape = dict(target_shape, **TINY)
        draft_shape = dict(draft_shape, **TINY)
    positions = args.prompt_len + args.new_tokens + 64
    start = time.perf_counter()
    target = build_model(family, target_shape, dtype, args.device, args.seed,
                         not args.natural_weights, positions)
    # the draft's greedy token repeats its input, like the target's (the agreeing-draft rows)
    draft = build_model(family, draft_shape, dtype, args.device, args.seed + 1,
                        not args.natural_weights, positions)
    build_seconds = time.perf_counter() - start
    if args.graphs and not causal_lm(target).graph_safe:
        # the loop would run this target's forward eagerly under cuda_graphs=True
        print(f"graphs off: specops never graphs the forward of {type(target).__name__}")
        args.graphs = False
    if args.specops_compile and not causal_lm(target).graph_safe:
        print(f"specops compile off: {type(target).__name__} has no specops forward")
        args.specops_compile = False
    import transformers
    now = datetime.datetime.now(datetime.timezone.utc)
    header = dict(command=" ".join(["python", *map(shlex.quote, sys.argv)]),
                  date=now.isoformat(timespec="seconds"), git_commit=git_commit(),
                  machine=machine("cuda" if args.device.startswith("cuda") else "cpu"),
                  cpu=machine("cpu"), python=platform.python_version(), torch=torch.__version__,
                  transformers=transformers.__version__, specops=specops.__version__,
                  pair=args.pair, target_shape=target_shape, draft_shape=draft_shape,
                  tiny=args.tiny, dtype=args.dtype, device=args.device,
                  stable_greedy=not args.natural_weights, batches=args.batches,
                  alphas=args.alphas, draft_lengths=args.draft_lengths,
                  new_tokens=args.new_tokens, prompt_len=args.prompt_len, reps=args.reps,
                  budget_s=args.budget_s, compile=args.compile, graphs=args.graphs,
                  specops_compile=args.specops_compile,
                  graphs_option=args.graphs_option,
                  num_threads=torch.get_num_threads(),
                  build_seconds=build_seconds, drafter="synthetic (see bench_gpu_e2e.py)")
    common = dict(date=header["date"], commit=header["git_commit"], machine=header["machine"],
                  pair=args.pair, tiny=args.tiny, dtype=args.dtype)

    def log(row: dict) -> dict:
        print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}"
                       for k, v in row.items() if v is not None), flush=True)
        return row

    rows = []
    draft_lm = causal_lm(draft)
    for batch in args.batches:
        if budget.left() < args.min_left_s:
            rows.append(log(dict(section="batch", batch=batch, status="skipped (budget)")))
            continue
        rows += run_batch(args, target, draft_lm, batch, budget, log)
    header["total_seconds"] = args.budget_s - budget.left()

    args.out.mkdir(parents=True, exist_ok=True)
    stamp = header["date"].replace(":", "").replace("-", "").replace("+0000", "Z")
    # names are joined, not with_suffix'd: "qwen2.5-1.5b" holds dots, and with_suffix would
    # cut the name at the last one ("gpu_e2e_qwen2.5-1.json", one file for every run)
    stem = f"gpu_e2e_{args.pair}{'_tiny' if args.tiny else ''}_{stamp}"
    json_path, csv_path = args.out / f"{stem}.json", args.out / f"{stem}.csv"
    json_path.write_text(json.dumps(dict(header=header, rows=rows), indent=1))
    with csv_path.open("w", newline="") as f:
        writer = csv.DictWriter(f, fieldnames=COLUMNS)
        writer.writeheader()
        for row in rows:
            writer.writerow({k: ("" if v is None else f"{v:.5g}" if isinstance(v, float) else v)
                             for k, v in {**common, **row}.items() if k in COLUMNS})
    print(f"wrote {json_path} and .csv ({header['total_seconds']:.0f} s)")
    return csv_path


if __name__ == "__main__":
    main()
