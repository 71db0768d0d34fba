#!/usr/bin/env bash
# The CPU end-to-end suite (issue: evidence), in the background-friendly order a reader needs:
#   greedy:   every category, every method: 3 prompts/category, 2 repetitions, 96 new tokens
#   sampling: temperature 1.0 / top-p 0.95 on code: 3 prompts, 2 repetitions, 64 new tokens
#   batch:    batch 4 (left padded) on code, greedy: 4 prompts in one batch, 2 reps, 64 tokens
#   extras:   into bench/results/e2e_cpu_extra/: the cost-aware tree against the fixed-size
#             tree (code and chat, 2 prompts, 64 tokens), and fixed draft lengths 2-8 against
#             the cost-aware length on code (2 prompts, 96 tokens); 1 repetition each
# Each run writes its own e2e_<date>.jsonl + _summary.csv as it goes (one record per call,
# flushed), so a stopped run keeps what it measured. About 2 hours 20 minutes on 2 cores; run
# it on a quiet machine (other work on the cores shows up in the numbers).
#
#   nohup bash bench/run_cpu_suite.sh > /tmp/cpu_suite.log 2>&1 &
#   STEPS="sampling batch" THREADS=2 bash bench/run_cpu_suite.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
THREADS=${THREADS:-2}
STEPS=${STEPS:-greedy sampling batch extras}
EXTRA_OUT=bench/results/e2e_cpu_extra
run() { "$PY" bench/bench_e2e.py --threads "$THREADS" "$@"; }
for step in $STEPS; do
  case $step in
    greedy) run ;;
    sampling) run --sampling --prompts 3 --reps 2 --max-new-tokens 64 ;;
    batch) run --batch 4 --prompts 4 --reps 2 --max-new-tokens 64 ;;
    extras)
      run --categories code,chat --methods plain,chain-auto,tree,tree-fixed --prompts 2 \
          --reps 1 --max-new-tokens 64 --out "$EXTRA_OUT"
      run --categories code --prompts 2 --reps 1 --max-new-tokens 96 --out "$EXTRA_OUT" \
          --methods plain,chain-fixed-2,chain-fixed-3,chain-fixed-4,chain-fixed-6,chain-fixed-8,chain-auto
      ;;
    *) echo "unknown step $step (greedy, sampling, batch, extras)" >&2; exit 2 ;;
  esac
done
