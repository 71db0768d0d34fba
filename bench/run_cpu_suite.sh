#!/usr/bin/env bash
# The CPU end-to-end suite (issue: evidence), in the background-friendly order a reader needs:
#   1. greedy, every category, every method: 3 prompts/category, 2 repetitions, 96 new tokens
#   2. temperature 1.0 / top-p 0.95 on code: 3 prompts, 2 repetitions, 64 new tokens
#   3. batch 4 (left padded) on code, greedy: 4 prompts in one batch, 2 repetitions, 64 tokens
# Each step writes its own e2e_<date>.jsonl + _summary.csv under bench/results/e2e_cpu/ as it
# goes (one record per call, flushed), so a stopped run keeps what it measured. About 2 hours
# on 2 cores; run it on a quiet machine (other work on the cores shows up in the numbers).
#
#   nohup bash bench/run_cpu_suite.sh > /tmp/cpu_suite.log 2>&1 &
#   THREADS=2 EXTRA="--categories code" bash bench/run_cpu_suite.sh
set -euo pipefail
cd "$(dirname "$0")/.."
PY=${PYTHON:-python}
THREADS=${THREADS:-2}
EXTRA=${EXTRA:-}
# shellcheck disable=SC2086
"$PY" bench/bench_e2e.py --threads "$THREADS" $EXTRA
# shellcheck disable=SC2086
"$PY" bench/bench_e2e.py --threads "$THREADS" --sampling --prompts 3 --reps 2 \
    --max-new-tokens 64 $EXTRA
# shellcheck disable=SC2086
"$PY" bench/bench_e2e.py --threads "$THREADS" --batch 4 --prompts 4 --reps 2 \
    --max-new-tokens 64 $EXTRA
