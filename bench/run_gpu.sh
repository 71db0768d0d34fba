#!/usr/bin/env bash
# One run on a GPU machine (H100/H200; needs no network), from the repo root, in under 10 minutes
# (BUDGET_S, default 560 s, for the whole script; a step that would start with less than 10 s
# left is skipped, and each step is cut at its own cap and at the deadline):
#   1. build the extension at -O1 (150 s), then bench/error_probe.py (120 s): does a bad input
#      to a C++ kernel raise or crash the process (with cuda-gdb's backtrace of a crash);
#   2. the GPU graph tests: tests/test_graphs.py and the CUDA tests of tests/test_models.py
#      (150 s: with compile=True tests, each compiling a tiny model);
#   3. the end-to-end plain-decoding target, bench/bench_gpu_e2e.py on the Qwen2.5-1.5B shape
#      at batch 1 (180 s; its --budget-s is set 30 s under what the step may take): the plain
#      baselines first (specops-plain, specops-plain-graphs, specops-plain-graphs-compiled,
#      hf-eager, hf-static-compiled),
#      then a few loop points with CUDA graphs;
#   3b. bench/profile_decode.py (100 s): kernel time against wall time per token, and the
#       busiest kernels, of specops plain decoding (graphs, graphs + compile) and Hugging
#       Face's compiled generate;
#   4. the quick op benchmark (100 s);
#   5. the test files with CUDA paths, in 8 processes where pytest-xdist is installed, up to
#      20 failures (150 s);
#   6. compute-sanitizer memcheck + racecheck on a few calls of every Triton kernel (60 s each).
# Logs and results go to $OUT (default: a new temporary folder):
#   env.txt build.log errors.log gpu_tests.log e2e.log gpu_e2e_qwen2.5-1.5b_<UTC date-time>.json
#   gpu_e2e_qwen2.5-1.5b_<UTC date-time>.csv profile.log profile_qwen2.5-1.5b_<date-time>.json
#   bench.log pytest.log memcheck.log racecheck.log ops_gpu.csv summary.txt (15 files: pack
#   them into one archive where fewer may travel)
# ops_gpu.csv is bench/results/ops_gpu.csv after the run (earlier rows + this run's);
# copy it back over bench/results/ops_gpu.csv to record the run, and the gpu_e2e_* files to
# bench/results/gpu_e2e/. summary.txt has every step's exit status (124 = timed out) and the
# plain-decoding comparison line of e2e.log.
#
#   OUT=/some/dir bash bench/run_gpu.sh
#   BENCH_ARGS="--smoke --device cpu" SKIP_BUILD=1 SKIP_TESTS=1 \
#     E2E_ARGS="--tiny --device cpu --alphas 0.8 --draft-lengths 2" \
#     PROFILE_ARGS="--tiny --device cpu --modes specops-plain" bash bench/run_gpu.sh
# The last is a dry run on a CPU, in seconds (SKIP_E2E=1 instead of E2E_ARGS skips that step;
# without either, the e2e step asks for CUDA and fails at once on a CPU-only machine).
# SKIP_BUILD, SKIP_TESTS (steps 2 and 5) and SKIP_E2E skip steps; BENCH_ARGS, E2E_ARGS and
# PROFILE_ARGS replace the arguments of the op benchmark, of bench_gpu_e2e.py (the script adds
# --budget-s before them and --out "$OUT" after them) and of profile_decode.py (--out "$OUT"
# added).
set -uo pipefail

PY=${PYTHON:-python3}
OUT=${OUT:-$(mktemp -d)}
BENCH_ARGS=${BENCH_ARGS:---quick --device cuda}
E2E_DEFAULT="--device cuda --pair qwen2.5-1.5b --batches 1 --alphas 0.8 --draft-lengths 2,4"
E2E_ARGS=${E2E_ARGS:-$E2E_DEFAULT --reps 3}
PROFILE_MODES=specops-plain-graphs,specops-plain-graphs-unfused,specops-plain-graphs-compiled,hf-static-compiled
PROFILE_ARGS=${PROFILE_ARGS:---pair qwen2.5-1.5b --reps 1 --modes $PROFILE_MODES}
DEADLINE=$((SECONDS + ${BUDGET_S:-560}))
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
  "$PY" -c 'import transformers; print("transformers", transformers.__version__)' 2>&1
  nproc
  # the compiler's shared libstdc++: a missing one makes the linker take libstdc++.a without a
  # word (cmake/check_cxx_runtime.cmake: the lead for the 2026-11-27 crashes)
  for cxx in ${CXX:-} c++ g++; do
    command -v "$cxx" >/dev/null && echo "$cxx: $(command -v "$cxx"), libstdc++.so:" \
      "$("$cxx" -print-file-name=libstdc++.so)"
  done
} >"$OUT/env.txt" 2>&1

# 1. Build specops._C from source, in place (no pip install: the machine's setuptools may be
#    too old for an editable install, and a failed one would cost a second build). Every step
#    imports this checkout's specops through PYTHONPATH, the sanitizer probe in /tmp too.
export PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
#    At -O1 (SPECOPS_OPT, CMakeLists.txt): this run never times the CPU kernels, and at -O3
#    tree_attention_cpu.cpp alone outran 120 s there (GCC 13, no LTO; 20 s at -O1 here).
if [[ -z ${SKIP_BUILD:-} ]]; then
  step build 150 env SPECOPS_OPT="${SPECOPS_OPT:--O1}" "$PY" setup.py build_ext --inplace
  # which C++ runtime the module links against (none listed: libstdc++ was linked statically)
  { echo "--- NEEDED of the module"; (readelf -d specops/_C*.so || ldd specops/_C*.so) 2>&1 |
      grep -E "NEEDED|=>"; } >>"$OUT/build.log"
fi

# 1b. Do the C++ kernels raise on bad input or crash? (bench/error_probe.py: the 2026-11-27 run
#     lost three test processes to segmentation faults there.) With cuda-gdb, a backtrace.
GDB=$(command -v cuda-gdb || ls /usr/local/cuda*/bin/cuda-gdb 2>/dev/null | head -1)
step errors 120 "$PY" bench/error_probe.py ${GDB:+--gdb "$GDB"}

# 2. The GPU graph tests first (the whole suite below may not reach them in its time): CUDA graph
#    replay against eager decoding, and the CUDA tests of the model forward ("cuda" selects
#    test_models.py's cuda-parametrised forward tests and its CUDA graph capture test; every
#    test of test_graphs.py matches "graph").
if [[ -z ${SKIP_TESTS:-} ]]; then
  step gpu_tests 150 "$PY" -m pytest -q tests/test_graphs.py tests/test_models.py -k "cuda or graph"
fi

# 3. The end-to-end plain-decoding target (bench/bench_gpu_e2e.py's docstring). Its own budget
#    stays 30 s under the step's cap (imports, writing the results, one measurement's overrun).
if [[ -z ${SKIP_E2E:-} ]]; then
  e2e_cap=$((DEADLINE - SECONDS))
  ((e2e_cap > 180)) && e2e_cap=180
  e2e_budget=$((e2e_cap > 60 ? e2e_cap - 30 : e2e_cap / 2))
  step e2e 180 "$PY" bench/bench_gpu_e2e.py --budget-s "$e2e_budget" $E2E_ARGS --out "$OUT"
fi

# 3b. Where a decoding step's time goes (bench/profile_decode.py): kernel time against wall
#     time per token, kernels per token and the busiest kernels, for specops plain decoding
#     with graphs, with graphs and compile, and Hugging Face's compiled generate.
step profile 100 "$PY" bench/profile_decode.py $PROFILE_ARGS --out "$OUT"

# 4. The quick op benchmark, before the suite: the suite's 8 processes left a load average of
#    52 behind them on 16 cores in the 2026-11-27 run, which its eager timings then carried.
#    Each timed op is also checked against the reference here.
step bench 100 "$PY" bench/bench_ops.py $BENCH_ARGS
cp bench/results/ops_gpu.csv "$OUT/" 2>/dev/null

# 5. The test files with CUDA paths (the GPU tests run natively here; the whole suite reached
#    7% in 110 s there). With pytest-xdist (the GPU image has it) in 8 processes: Triton's
#    compiles and the CPU tests take the time, not the GPU. Up to 20 failures are reported.
#    This also compiles the Triton kernels, so the sanitizer runs below find them cached.
if [[ -z ${SKIP_TESTS:-} ]]; then
  XDIST=$("$PY" -c 'import xdist' 2>/dev/null && echo "-n 8")
  step pytest 150 "$PY" -m pytest -q $XDIST --maxfail=20 tests/test_triton_kernels.py \
    tests/test_tree_triton.py tests/test_kv_commit.py tests/test_tree_attention.py \
    tests/test_tree.py tests/test_api.py tests/test_layer_kernels.py
fi

# 6. compute-sanitizer on a few calls of every Triton kernel (kv_commit's overlapping moves
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
    # the forward's fused layer kernels; the last rows' slots run past the cache (dropped)
    from specops.triton_kernels import layers
    hidden = torch.randn(batch, 3, 896, generator=gen).to(dev, torch.bfloat16)
    layers.add_rms_norm_triton(hidden, hidden.clone(), hidden[0, 0], 1e-6)
    layers.silu_mul_triton(hidden, hidden.clone())
    q = torch.randn(batch, 3, 14, 64, generator=gen).to(dev, torch.bfloat16)
    k, v = (torch.randn(batch, 3, 2, 64, generator=gen).to(dev, torch.bfloat16) for _ in "kv")
    cos, sin = (torch.randn(batch, 3, 64, generator=gen).to(dev, torch.bfloat16) for _ in "cs")
    caches = [torch.zeros(batch, 2, 8, 64, device=dev, dtype=torch.bfloat16) for _ in "kv"]
    layers.rotary_kv_write_triton_(q, k, v, cos, sin, *caches,
                                   torch.arange(batch, device=dev, dtype=torch.int32) * 3 + 2)
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
grep -h '^plain decoding' "$OUT/e2e.log" 2>/dev/null | tee -a "$OUT/summary.txt"
grep -A4 '^Targets' "$OUT/bench.log" | tee -a "$OUT/summary.txt"
