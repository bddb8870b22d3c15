#!/usr/bin/env bash
# The first-contact script for a lent GPU machine: ONE call (a lent machine runs one command for at
# most 600 s, from a cold Triton cache) that installs the package, measures the target cases first
# and writes results after every step. torch/triton/transformers are already installed there.
#
#   bash benchmarks/run_gpu.sh            # run with timeout_s=600; finishes within ~545 s
#
# Steps, in this order, each under its own budget (seconds; `timeout`, SIGKILL 5 s later); the
# budgets add to 540 s. A failed or timed-out step does not stop the others.
#   device      10  nvidia-smi: name, driver, memory
#   build      110  pip install --no-build-isolation --no-deps -e .  (the compiled CG, rosa_ext._C, with nvcc)
#   target     140  the targets (issue 24): Qwen2.5-0.5B head, T=1024, bf16, lora and hidden, the default
#                   call, the dual and CG (bench_update.py --preset target: <OUT>/gpu_target_<date>.{json,md})
#   prob_tiles  50  the probability-tile kernel + the GEMMs over it, T=1024 bf16 (prob_tiles_gpu.json)
#   tests      150  the GPU-marked tests; a module that cannot import is reported and the others still run
#                   (--continue-on-collection-errors)
#   cg_overhead 20  the compiled CG's per-iteration overhead
#   kernels     60  the Triton kernels at T=1024 bf16 against the torch backend (kernels_gpu json)
# Triton's autotuning compiles every config of a kernel on a cold machine (3-6 s each, 9 configs per
# kernel and specialisation), which alone would overrun 600 s; so every step here runs with
# ROSA_KERNEL_TUNING=first (rosa_ext/kernels/_tiles.py: the first config of each list, one compile per
# kernel): the timings are UNTUNED, and the summary says so. For tuned numbers run a step again in a
# later call with TUNING=full and a larger budget, e.g. STEPS="target" TUNING=full TARGET_S=500.
#
# Results: $OUT (default benchmarks/results/): each step's full log in $OUT/gpu_<step>.log, the
# benchmarks' own JSON/markdown, and a summary rewritten after every step,
# $OUT/gpu_run_<date>.{json,md} (commit, device, each step's exit status, seconds and budget).
# STEPS picks and orders steps; a step's budget is overridden by <STEP>_S (e.g. TESTS_S=300).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
STEPS="${STEPS:-device build target prob_tiles tests cg_overhead kernels}"
export ROSA_KERNEL_TUNING="${TUNING:-first}"
DEVICE_S="${DEVICE_S:-10}"
BUILD_S="${BUILD_S:-110}"
TARGET_S="${TARGET_S:-140}"
PROB_TILES_S="${PROB_TILES_S:-50}"
TESTS_S="${TESTS_S:-150}"
CG_OVERHEAD_S="${CG_OVERHEAD_S:-20}"
KERNELS_S="${KERNELS_S:-60}"
DATE="$(date -u +%Y-%m-%d)"
SUMMARY="$OUT/gpu_run_$DATE"
COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- rosa_ext csrc benchmarks 2>/dev/null || echo +dirty)"
failed=()
entries=""
T_ALL=$SECONDS

{
  echo "# GPU first-contact run, $DATE"
  echo
  echo "commit $COMMIT; kernel tuning: $ROSA_KERNEL_TUNING$([ "$ROSA_KERNEL_TUNING" = first ] && echo ' (first config of each list: untuned timings)')"
  echo
  echo "| step | exit | seconds | budget |"
  echo "|---|---|---|---|"
} > "$SUMMARY.md"

# step NAME BUDGET_S CMD...: run CMD under `timeout BUDGET_S`, log to $OUT/gpu_NAME.log, print its
# tail, and rewrite the summary
step() {
  local name=$1 budget=$2 t0=$SECONDS rc
  shift 2
  echo "== $name (budget ${budget}s, t=$((SECONDS - T_ALL))s): $*"
  timeout --kill-after=5 "$budget" "$@" > "$OUT/gpu_$name.log" 2>&1
  rc=$?
  tail -n "${TAIL:-25}" "$OUT/gpu_$name.log"
  local status="$rc"
  if [ "$rc" -ne 0 ]; then
    if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
      status="timeout"
      failed+=("$name (timed out after ${budget}s)")
    else
      failed+=("$name (exit $rc)")
    fi
  fi
  local took=$((SECONDS - t0))
  echo "== $name: exit $rc after ${took}s"
  echo "| $name | $status | $took | $budget |" >> "$SUMMARY.md"
  entries="${entries:+$entries,}{\"step\": \"$name\", \"exit\": \"$status\", \"seconds\": $took, \"budget_s\": $budget}"
  printf '{"commit": "%s", "date": "%s", "kernel_tuning": "%s", "device": "%s", "steps": [%s]}\n' \
    "$COMMIT" "$DATE" "$ROSA_KERNEL_TUNING" "${GPU_NAME:-unknown}" "$entries" > "$SUMMARY.json"
}

margin() {  # a benchmark's own --budget-s: its step budget minus time to finish the row in flight
  local b=$(( $1 - $1 / 4 ))
  [ "$b" -lt 10 ] && b=10
  echo "$b"
}

GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
for s in $STEPS; do
  case "$s" in
    device) step device "$DEVICE_S" nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv ;;
    build) step build "$BUILD_S" python -m pip install --no-build-isolation --no-deps -e . ;;
    target) step target "$TARGET_S" python benchmarks/bench_update.py --preset target --out "$OUT" \
              --budget-s "$(margin "$TARGET_S")" ;;
    prob_tiles) step prob_tiles "$PROB_TILES_S" python benchmarks/bench_prob_tiles.py --T 1024 --out "$OUT" \
                  --budget-s "$(margin "$PROB_TILES_S")" ;;
    tests) step tests "$TESTS_S" python -m pytest python_tests -q -m gpu -p no:cacheprovider -rfEs \
             --continue-on-collection-errors ;;
    cg_overhead) step cg_overhead "$CG_OVERHEAD_S" python benchmarks/bench_cg_overhead.py --out "$OUT" ;;
    kernels) step kernels "$KERNELS_S" python benchmarks/bench_kernels_gpu.py --out "$OUT" --sections cases \
               --T 1024 --dtypes bfloat16 --budget-s "$(margin "$KERNELS_S")" ;;
    *) echo "== unknown step: $s"; failed+=("$s (unknown step)") ;;
  esac
done

echo "== run_gpu.sh: $((SECONDS - T_ALL))s in all; logs in $OUT/gpu_<step>.log, summary $SUMMARY.{json,md}"
if [ "${#failed[@]}" -ne 0 ]; then
  echo "== FAILED steps: ${failed[*]}"
  exit 1
fi
echo "== all steps passed: $STEPS"
