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
  step pytest 110 "$PY" -m pytest -q tests -x
fi

# 3. The quick benchmark, before the sanitizers: its numbers are the run's main product.
step bench 100 "$PY" bench/bench_ops.py $BENCH_ARGS
cp bench/results/ops_gpu.csv "$OUT/" 2>/dev/null

# 4. compute-sanitizer on a few calls of every Triton kernel (kv_commit's overlapping moves
#    race only on real hardware: racecheck is the test). Without the caching allocator every
#    tensor is its own allocation, so memcheck sees a read past a tensor's end.
SANITIZER=$(command -v compute-sanitizer || ls /usr/local/cuda*/bin/compute-sanitizer 2>/dev/null | head -1)
PROBE=$(mktemp --suffix=.py)
cat >"$PROBE" <<'EOF'
import os, torch, specops
dev = os.environ.get("PROBE_DEVICE", "cuda")
gen = torch.Generator().manual_seed(0)
for batch, num_slots, vocab in [(2, 3, 1000), (1, 5, 151936), (3, 2, 8193)]:
    p = torch.randn(batch, num_slots + 1, vocab, generator=gen).softmax(-1).to(dev)
    q = torch.randn(batch, num_slots, vocab, generator=gen).softmax(-1).to(dev)
    x = torch.randint(vocab, (batch, num_slots), generator=gen).to(dev)
    seeds = torch.arange(batch, device=dev)
    positions = torch.full((batch,), 10, device=dev)
    lens = torch.arange(batch, device=dev, dtype=torch.int32).clamp(max=num_slots)
    for draft_probs in (q, None):
        specops.chain_verify(p, x, draft_probs, lens, seeds=seeds, positions=positions)
    specops.chain_verify_greedy(p.log(), x, lens)
    specops.sampling_probs(p[:, 0].log(), temperature=0.8, top_k=50, top_p=0.9)
    # a tree: root, two children, a grandchild under each (duplicate tokens among siblings)
    parents = torch.tensor([[-1, 0, 0, 1, 2]] * batch, dtype=torch.int32, device=dev)
    tree_p = torch.randn(batch, 5, vocab, generator=gen).softmax(-1).to(dev)
    tree_q = torch.randn(batch, 5, vocab, generator=gen).softmax(-1).to(dev)
    tokens = torch.randint(vocab, (batch, 5), generator=gen).to(dev)
    tokens[:, 2] = tokens[:, 1]
    mask, depth = specops.tree_metadata(parents)
    for draft_probs in (tree_q, None):
        specops.tree_verify(tree_p, tokens, parents, None, draft_probs, seeds=seeds,
                            positions=positions)
    specops.tree_verify_greedy(tree_p.log(), tokens, parents)
    heads, kv_heads, dim, capacity = 8, 2, 64, 64
    cache_lens = torch.full((batch,), 20, dtype=torch.int32, device=dev)
    k_cache = torch.randn(batch, kv_heads, capacity, dim, generator=gen).to(dev)
    v_cache = torch.randn(batch, kv_heads, capacity, dim, generator=gen).to(dev)
    query = torch.randn(batch, 5, heads, dim, generator=gen).to(dev)
    specops.tree_attention(query, k_cache, v_cache, cache_lens, mask)
    overlapping = torch.tensor([[2, 4, -1, -1, -1]] * batch, dtype=torch.int32, device=dev)
    specops.kv_commit([k_cache, v_cache], cache_lens, overlapping,
                      torch.full((batch,), 2, dtype=torch.int32, device=dev))
if dev == "cuda":
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
