#!/usr/bin/env bash
# The GPU checks in one run, for a lent CUDA machine with torch, triton, pybind11, cmake and pytest
# already installed (nothing is downloaded): builds the C++ core in place, runs the Triton test matrix
# with compiled kernels (no TRITON_INTERPRET), then `python -m bench.bench_triton`.
#
#   bash bench/gpu_check.sh OUTDIR [TEST_SECONDS] [BENCH_SECONDS]
#
# Writes OUTDIR/{env,build,tests,bench}.log, OUTDIR/tests.xml (JUnit) and OUTDIR/triton.{jsonl,md}.
# Each step has its own time limit, so one that hangs still leaves the others' logs.
set -uo pipefail
cd "$(dirname "$0")/.."
out="${1:?usage: bash bench/gpu_check.sh OUTDIR [TEST_SECONDS] [BENCH_SECONDS]}"
test_s="${2:-220}"
bench_s="${3:-150}"
mkdir -p "$out"
export PYTHONUNBUFFERED=1 PYTHONPATH="$PWD${PYTHONPATH:+:$PYTHONPATH}"
unset TRITON_INTERPRET
PY="${PYTHON:-python3}"

{
  date -u; nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv
  "$PY" -c 'import sys, torch, triton; print(sys.version); print("torch", torch.__version__, "cuda", torch.version.cuda, torch.cuda.is_available()); print("triton", triton.__version__)'
  "$PY" -m pip list 2>/dev/null | grep -i -E '^(peft|transformers|numpy|pytest|pytest-xdist|hypothesis|pybind11) '
  nproc; command -v c++ g++ cmake ninja
} >"$out/env.log" 2>&1

start=$(date +%s)
CMAKE_BUILD_PARALLEL_LEVEL="$(nproc)" timeout 150 "$PY" setup.py -q build_ext --inplace >"$out/build.log" 2>&1
echo "build rc=$? in $(( $(date +%s) - start )) s" | tee -a "$out/build.log"
"$PY" -c 'import kmerge_fast as kf; print("backends:", kf.backends()); print("unavailable:", kf.ops.unavailable_reasons())' \
  >>"$out/build.log" 2>&1

start=$(date +%s)
xdist=()
"$PY" -c 'import xdist' 2>/dev/null && xdist=(-n 8)
timeout "$test_s" "$PY" -m pytest python_tests/test_triton.py python_tests/test_ops_conformance.py \
  python_tests/test_dispatch.py -q -p no:cacheprovider -rfE "${xdist[@]}" --durations=10 \
  --junitxml="$out/tests.xml" >"$out/tests.log" 2>&1
echo "tests rc=$? in $(( $(date +%s) - start )) s" | tee -a "$out/tests.log"
tail -n 3 "$out/tests.log"

start=$(date +%s)
timeout "$bench_s" "$PY" -m bench.bench_triton >"$out/bench.log" 2>&1
echo "bench rc=$? in $(( $(date +%s) - start )) s" | tee -a "$out/bench.log"
grep -E '^(PASS|MISS)' "$out/bench.log"
cp bench/results/triton.jsonl bench/results/triton.md "$out/" 2>/dev/null
exit 0
