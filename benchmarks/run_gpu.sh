#!/usr/bin/env bash
# Everything that needs a GPU, in one call on the lent machine (torch/triton/transformers
# already installed there): build, the GPU-marked tests, the kernel / CG-overhead / update
# benchmarks. Results land in $OUT (default benchmarks/results/: JSON with device, versions,
# commit, date), each step's full log in $OUT/gpu_<step>.log.
#
# Every step runs under its own time budget (seconds; `timeout`, then SIGKILL 10 s later) and a
# failed or timed-out step does not stop the others: the summary at the end names each one that
# failed, and the script exits 1 if any did. Budgets (defaults fit a 10-minute call when the
# kernels are already compiled; the first run on a machine compiles and autotunes every Triton
# config, so give the tests and kernel benchmark more or run them in separate calls):
#   BUILD_S=240 TESTS_S=300 CG_S=60 KERNELS_S=240 UPDATE_S=300
# STEPS picks and orders the steps (default: "build device tests cg_overhead kernels update"),
# e.g. STEPS="tests" TESTS_S=500 bash benchmarks/run_gpu.sh. The benchmarks get their budget
# also as --budget-s (minus a margin), so they stop starting new cases and still write JSON.
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
STEPS="${STEPS:-build device tests cg_overhead kernels update}"
BUILD_S="${BUILD_S:-240}"
TESTS_S="${TESTS_S:-300}"
CG_S="${CG_S:-60}"
KERNELS_S="${KERNELS_S:-240}"
UPDATE_S="${UPDATE_S:-300}"
failed=()
T_ALL=$SECONDS

# step NAME BUDGET_S CMD...: run CMD under `timeout BUDGET_S`, log to $OUT/gpu_NAME.log, print its tail
step() {
  local name=$1 budget=$2 t0=$SECONDS rc
  shift 2
  echo "== $name (budget ${budget}s): $*"
  timeout --kill-after=10 "$budget" "$@" > "$OUT/gpu_$name.log" 2>&1
  rc=$?
  tail -n "${TAIL:-30}" "$OUT/gpu_$name.log"
  if [ "$rc" -ne 0 ]; then
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
      failed+=("$name (timed out after ${budget}s)")
    else
      failed+=("$name (exit $rc)")
    fi
  fi
  echo "== $name: exit $rc after $((SECONDS - t0))s"
}

margin() {  # a benchmark's own --budget-s: its step budget minus time to finish the case in flight
  local b=$(( $1 - $1 / 4 ))
  [ "$b" -lt 10 ] && b=10
  echo "$b"
}

for s in $STEPS; do
  case "$s" in
    build) step build "$BUILD_S" python -m pip install --no-build-isolation --no-deps -e . ;;
    device) step device 30 nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv ;;
    tests) step tests "$TESTS_S" python -m pytest python_tests -q -m gpu -p no:cacheprovider -rfEs ;;
    cg_overhead) step cg_overhead "$CG_S" python benchmarks/bench_cg_overhead.py --out "$OUT" ;;
    kernels) step kernels "$KERNELS_S" python benchmarks/bench_kernels_gpu.py --out "$OUT" \
               --budget-s "$(margin "$KERNELS_S")" ;;
    update) step update "$UPDATE_S" python benchmarks/bench_update.py --preset gpu --out "$OUT" \
              --budget-s "$(margin "$UPDATE_S")" ;;
    *) echo "== unknown step: $s"; failed+=("$s (unknown step)") ;;
  esac
done

echo "== run_gpu.sh: $((SECONDS - T_ALL))s in all; logs in $OUT/gpu_<step>.log"
if [ "${#failed[@]}" -ne 0 ]; then
  echo "== FAILED steps: ${failed[*]}"
  exit 1
fi
echo "== all steps passed: $STEPS"
