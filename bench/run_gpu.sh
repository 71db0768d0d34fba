#!/usr/bin/env bash
# One run on a GPU machine (H100/H200; needs no network), from the repo root, in under 4 minutes:
# build the extension, run the tests, compute-sanitizer memcheck + racecheck on the Triton
# chain_verify, then the quick op benchmark. Logs and the CSV go to $OUT (default: a new
# temporary folder), at most 8 files:
#   env.txt build.log pytest.log bench.log memcheck.log racecheck.log ops_gpu.csv summary.txt
# ops_gpu.csv is bench/results/ops_gpu.csv after the run (earlier rows + this run's);
# copy it back over bench/results/ops_gpu.csv to record the run.
#
#   OUT=/some/dir bash bench/run_gpu.sh
#   BENCH_ARGS="--smoke --device cpu" SKIP_BUILD=1 SKIP_TESTS=1 bash bench/run_gpu.sh  # CPU dry run
set -uo pipefail

PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
BENCH_ARGS=${BENCH_ARGS:---quick --device cuda}
DEADLINE=$((SECONDS + ${BUDGET_S:-230}))
mkdir -p "$OUT"
: >"$OUT/summary.txt"

# step NAME CAP_S CMD...: runs CMD with its output in $OUT/NAME.log, for at most CAP_S seconds
# and never past the deadline; records the exit status (124 = timed out) in summary.txt.
step() {
  local name=$1 cap=$2 left rc start=$SECONDS
  shift 2
  left=$((DEADLINE - SECONDS))
  if ((left < 10)); then
    echo "$name: skipped, out of time" | tee -a "$OUT/summary.txt"
    return 1
  fi
  ((cap > left)) && cap=$left
  timeout --kill-after=5 "$cap" "$@" >>"$OUT/$name.log" 2>&1
  rc=$?
  echo "$name: rc=$rc in $((SECONDS - start)) s (limit $cap s)" | tee -a "$OUT/summary.txt"
  return "$rc"
}

{
  date -u +%Y-%m-%dT%H:%M:%SZ
  echo "commit $(git rev-parse --short HEAD 2>/dev/null)$(git status --porcelain 2>/dev/null | grep -q . && echo -dirty)"
  nvidia-smi 2>&1 | head -20
  "$PY" -c 'import sys, torch; print("python", sys.version.split()[0], "torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.get_device_name() if torch.cuda.is_available() else "no GPU")'
  "$PY" -c 'import triton; print("triton", triton.__version__)' 2>&1
  nproc
} >"$OUT/env.txt" 2>&1

# 1. Build specops._C from source. pip's editable install needs a recent setuptools (no
#    network here to fetch one); the in-place build is the fallback.
if [[ -z ${SKIP_BUILD:-} ]]; then
  step build 120 "$PY" -m pip install --no-build-isolation --no-deps -e . ||
    step build 120 "$PY" setup.py build_ext --inplace
fi

# 2. Tests (the GPU tests run natively here); this also compiles the Triton kernels, so the
#    sanitizer runs below find them in the cache.
if [[ -z ${SKIP_TESTS:-} ]]; then
  step pytest 80 "$PY" -m pytest -q tests -x
fi

# 3. The quick benchmark, before the sanitizers: its numbers are the run's main product.
step bench 100 "$PY" bench/bench_ops.py $BENCH_ARGS
cp bench/results/ops_gpu.csv "$OUT/" 2>/dev/null

# 4. compute-sanitizer on a few Triton chain_verify calls. Without the caching allocator every
#    tensor is its own allocation, so memcheck sees a read past a tensor's end.
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
PROBE=$(mktemp --suffix=.py)
cat >"$PROBE" <<'EOF'
import torch, specops
gen = torch.Generator().manual_seed(0)
for batch, num_slots, vocab in [(2, 3, 1000), (1, 5, 151936), (3, 2, 8193)]:
    p = torch.randn(batch, num_slots + 1, vocab, generator=gen).softmax(-1).cuda()
    q = torch.randn(batch, num_slots, vocab, generator=gen).softmax(-1).cuda()
    x = torch.randint(vocab, (batch, num_slots), generator=gen).cuda()
    seeds = torch.arange(batch, device="cuda")
    positions = torch.full((batch,), 10, device="cuda")
    lens = torch.arange(batch, device="cuda", dtype=torch.int32).clamp(max=num_slots)
    for draft_probs in (q, None):
        specops.chain_verify(p, x, draft_probs, lens, seeds=seeds, positions=positions)
    specops.chain_verify_greedy(p.log(), x, lens)
torch.cuda.synchronize()
print("probe ok")
EOF
for tool in memcheck racecheck; do
  if [[ -z $SANITIZER ]]; then
    echo "compute-sanitizer not found" | tee "$OUT/$tool.log" | sed "s/^/$tool: /" >>"$OUT/summary.txt"
    continue
  fi
  step "$tool" 60 env PYTORCH_NO_CUDA_MEMORY_CACHING=1 \
    "$SANITIZER" --tool "$tool" --error-exitcode 1 "$PY" "$PROBE"
done
rm -f "$PROBE"

echo "--- results in $OUT" | tee -a "$OUT/summary.txt"
grep -A4 '^Targets' "$OUT/bench.log" | tee -a "$OUT/summary.txt"
