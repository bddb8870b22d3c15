#!/usr/bin/env bash
# The first-contact script for a lent GPU machine: ONE call (a lent machine runs one command for at
# most 600 s, from a cold Triton cache) that checks the build tools, installs the package, measures the
# target cases first and writes results after every step. torch/triton/transformers are already
# installed there (in `python3`; the machine has no network).
#
#   bash benchmarks/run_gpu.sh            # run with timeout_s=600; finishes within ~560 s
#
# Python: $PYTHON, else python3, else python. The repository root is put first on PYTHONPATH, so every
# benchmark and test imports rosa_ext from this checkout even when the build fails: then the compiled CG
# (rosa_ext._C) is missing and CG runs its Python loop (rosa_ext.cg.cg falls back, with a warning on CUDA);
# the summary says whether _C imports (compiled_cg).
#
# Steps, in this order, each under its own budget (seconds; `timeout`, SIGKILL 5 s later); the budgets
# add to 540 s, and no step runs past TOTAL_S (default 560 s) after the start: a step's budget is cut to
# what is left, and a step with under MIN_STEP_S (5) s left is skipped. A failed, timed-out or skipped step does not
# stop the others.
#   device      10  nvidia-smi: name, driver, memory
#   preflight   20  what the build needs: cmake >= 3.18 (if missing: pip install cmake -- needs a network or a
#                   wheel cache; it fails fast without), the Python headers (Python.h), nvcc (else _C builds
#                   without CUDA)
#   build      110  pip install --no-build-isolation --no-deps -e .  (the compiled CG, rosa_ext._C, with nvcc);
#                   skipped when preflight found no cmake or no Python headers (it could only fail)
#   target     140  the targets (issue 24): Qwen2.5-0.5B head, T=1024, bf16, lora and hidden, the default
#                   call, the dual and CG (bench_update.py --preset target: <OUT>/gpu_target_<date>.{json,md})
#   prob_tiles  50  the probability-tile kernel + the GEMMs over it, T=1024 bf16 (prob_tiles_gpu.json)
#   tests      140  the GPU-marked tests; a module that cannot import is reported and the others still run
#                   (--continue-on-collection-errors)
#   cg_overhead 15  the compiled CG's per-iteration overhead (needs _C)
#   kernels     55  the Triton kernels at T=1024 bf16 against the torch backend (kernels_gpu json)
# Triton's autotuning compiles every config of a kernel on a cold machine (3-6 s each, 9 configs per
# kernel and specialisation), which alone would overrun 600 s; so every step here runs with
# ROSA_KERNEL_TUNING=first (rosa_ext/kernels/_tiles.py: the first config of each list, one compile per
# kernel): the timings are UNTUNED, and the summary says so. For tuned numbers run a step again in a
# later call with TUNING=full and a larger budget, e.g. STEPS="target" TUNING=full TARGET_S=500.
#
# Results: $OUT (default benchmarks/results/): each step's full log in $OUT/gpu_<step>.log, the
# benchmarks' own JSON/markdown, and a summary rewritten after every step,
# $OUT/gpu_run_<date>.{json,md} (commit, device, python, the preflight's findings, whether _C imports,
# each step's exit status -- a number, "timeout", "missing" (command not found) or "skipped" -- seconds
# and budget). STEPS picks and orders steps; a step's budget is overridden by <STEP>_S (e.g. TESTS_S=300).
# Exit status: 0 when every step passed, 1 otherwise.
set -uo pipefail
cd "$(dirname "$0")/.."
ROOT="$(pwd)"
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
if [ -z "${PYTHON:-}" ]; then
  if command -v python3 > /dev/null 2>&1; then PYTHON=python3; else PYTHON=python; fi
fi
export PYTHONPATH="$ROOT${PYTHONPATH:+:$PYTHONPATH}"
STEPS="${STEPS:-device preflight build target prob_tiles tests cg_overhead kernels}"
export ROSA_KERNEL_TUNING="${TUNING:-first}"
TOTAL_S="${TOTAL_S:-560}"
MIN_STEP_S="${MIN_STEP_S:-5}"
DEVICE_S="${DEVICE_S:-10}"
PREFLIGHT_S="${PREFLIGHT_S:-20}"
BUILD_S="${BUILD_S:-110}"
TARGET_S="${TARGET_S:-140}"
PROB_TILES_S="${PROB_TILES_S:-50}"
TESTS_S="${TESTS_S:-140}"
CG_OVERHEAD_S="${CG_OVERHEAD_S:-15}"
KERNELS_S="${KERNELS_S:-55}"
DATE="$(date -u +%Y-%m-%d)"
SUMMARY="$OUT/gpu_run_$DATE"
COMMIT="$(git rev-parse --short HEAD 2>/dev/null || echo unknown)$(git diff --quiet HEAD -- rosa_ext csrc benchmarks 2>/dev/null || echo +dirty)"
failed=()
entries=""
T_ALL=$SECONDS
GPU_NAME=unknown
CMAKE=unknown
HEADERS=unknown
NVCC=unknown
COMPILED_CG=unknown
BUILD_BLOCKER=""

json_str() {  # a JSON string literal of $1 (quotes and backslashes escaped, control characters dropped)
  local s=${1//\\/\\\\}
  s=${s//\"/\\\"}
  printf '"%s"' "$(printf '%s' "$s" | tr -d '\000-\037')"
}

write_json() {
  printf '{"commit": %s, "date": %s, "kernel_tuning": %s, "device": %s, "python": %s, "pythonpath_root": %s, "cmake": %s, "python_headers": %s, "nvcc": %s, "compiled_cg": %s, "seconds": %s, "steps": [%s]}\n' \
    "$(json_str "$COMMIT")" "$(json_str "$DATE")" "$(json_str "$ROSA_KERNEL_TUNING")" "$(json_str "$GPU_NAME")" \
    "$(json_str "$PYTHON")" "$(json_str "$ROOT")" "$(json_str "$CMAKE")" "$(json_str "$HEADERS")" "$(json_str "$NVCC")" \
    "$(json_str "$COMPILED_CG")" "$((SECONDS - T_ALL))" "$entries" > "$SUMMARY.json"
}

{
  echo "# GPU first-contact run, $DATE"
  echo
  echo "commit $COMMIT; kernel tuning: $ROSA_KERNEL_TUNING$([ "$ROSA_KERNEL_TUNING" = first ] && echo ' (first config of each list: untuned timings)'); python: $PYTHON; PYTHONPATH starts with the repository root"
  echo
  echo "| step | exit | seconds | budget | note |"
  echo "|---|---|---|---|---|"
} > "$SUMMARY.md"
write_json

# record NAME STATUS SECONDS BUDGET NOTE: one row of the summary (both files rewritten)
record() {
  local name=$1 status=$2 took=$3 budget=$4 note=${5:-}
  [ "$status" != 0 ] && failed+=("$name ($status${note:+: $note})")
  echo "| $name | $status | $took | $budget | $note |" >> "$SUMMARY.md"
  entries="${entries:+$entries, }{\"step\": $(json_str "$name"), \"exit\": $(json_str "$status"), \"seconds\": $took, \"budget_s\": $budget, \"note\": $(json_str "$note")}"
  write_json
}

# step NAME BUDGET_S CMD...: run CMD under `timeout` (the budget, cut to what TOTAL_S leaves), log to
# $OUT/gpu_NAME.log, print its tail, and record it in the summary
step() {
  local name=$1 budget=$2 t0=$SECONDS rc status note=""
  shift 2
  local left=$((TOTAL_S - (SECONDS - T_ALL)))
  if [ "$left" -lt "$MIN_STEP_S" ]; then
    echo "== $name: skipped (${left}s left of TOTAL_S=${TOTAL_S}s)"
    record "$name" skipped 0 "$budget" "no time left"
    return
  fi
  if [ "$budget" -gt "$left" ]; then
    note="budget cut to ${left}s"
    budget=$left
  fi
  if ! command -v "$1" > /dev/null 2>&1; then
    echo "== $name: $1 not found"
    echo "$1: command not found (PATH=$PATH)" > "$OUT/gpu_$name.log"
    record "$name" missing 0 "$budget" "$1 not found"
    return
  fi
  echo "== $name (budget ${budget}s, t=$((SECONDS - T_ALL))s): $*"
  timeout --kill-after=5 "$budget" "$@" > "$OUT/gpu_$name.log" 2>&1
  rc=$?
  tail -n "${TAIL:-25}" "$OUT/gpu_$name.log"
  status=$rc
  if [ "$rc" -eq 124 ] || [ "$rc" -eq 137 ]; then
    status=timeout
    note="${note:+$note; }timed out after ${budget}s"
  fi
  echo "== $name: exit $rc after $((SECONDS - t0))s"
  record "$name" "$status" "$((SECONDS - t0))" "$budget" "$note"
}

# the preflight's checks (each finding into the summary; no step fails on nvcc alone)
preflight() {
  local scripts inc ver
  scripts="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_path("scripts"))' 2>/dev/null)"
  [ -n "$scripts" ] && export PATH="$PATH:$scripts"  # where pip puts cmake
  if ! command -v cmake > /dev/null 2>&1; then
    echo "cmake not found: trying $PYTHON -m pip install cmake (needs a network or a wheel cache)"
    timeout --kill-after=5 "$((PREFLIGHT_S > 10 ? PREFLIGHT_S - 5 : 5))" \
      "$PYTHON" -m pip install --retries 0 --timeout 5 --disable-pip-version-check cmake 2>&1 | tail -n 3
  fi
  if command -v cmake > /dev/null 2>&1; then
    ver="$(cmake --version 2>/dev/null | head -n 1)"
    CMAKE="${ver:-cmake (version unknown)}"
  else
    CMAKE=missing
  fi
  inc="$("$PYTHON" -c 'import sysconfig; print(sysconfig.get_paths()["include"])' 2>/dev/null)"
  if [ -n "$inc" ] && [ -f "$inc/Python.h" ]; then HEADERS="$inc"; else HEADERS="missing (no Python.h in '${inc:-?}')"; fi
  if command -v nvcc > /dev/null 2>&1; then
    NVCC="$(nvcc --version 2>/dev/null | tail -n 1)"
  elif [ -x "${CUDA_HOME:-/usr/local/cuda}/bin/nvcc" ]; then
    NVCC="${CUDA_HOME:-/usr/local/cuda}/bin/nvcc"
  else
    NVCC="missing (rosa_ext._C would build without CUDA)"
  fi
  echo "python: $PYTHON ($("$PYTHON" -c 'import sys; print(sys.version.split()[0])' 2>/dev/null)); cmake: $CMAKE; headers: $HEADERS; nvcc: $NVCC"
  BUILD_BLOCKER=""
  [ "$CMAKE" = missing ] && BUILD_BLOCKER="no cmake"
  [[ "$HEADERS" == missing* ]] && BUILD_BLOCKER="${BUILD_BLOCKER:+$BUILD_BLOCKER, }no Python headers"
  [ -z "$BUILD_BLOCKER" ]
}

check_compiled() {  # does rosa_ext._C import (from this checkout)?
  if timeout --kill-after=5 60 "$PYTHON" -c 'import rosa_ext._C' > /dev/null 2>&1; then COMPILED_CG=yes; else COMPILED_CG="no (CG runs its Python loop)"; fi
  write_json
}

margin() {  # a benchmark's own --budget-s: its step budget minus time to finish the row in flight
  local b=$(( $1 - $1 / 4 ))
  [ "$b" -lt 10 ] && b=10
  echo "$b"
}

if command -v nvidia-smi > /dev/null 2>&1; then
  GPU_NAME="$(nvidia-smi --query-gpu=name --format=csv,noheader 2>/dev/null | head -n 1)"
  GPU_NAME="${GPU_NAME:-unknown}"
fi
write_json
for s in $STEPS; do
  case "$s" in
    device) step device "$DEVICE_S" nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv ;;
    preflight)
      t0=$SECONDS
      echo "== preflight (budget ${PREFLIGHT_S}s)"
      preflight > "$OUT/gpu_preflight.log" 2>&1
      ok=$?
      cat "$OUT/gpu_preflight.log"
      record preflight "$([ "$ok" -eq 0 ] && echo 0 || echo 1)" "$((SECONDS - t0))" "$PREFLIGHT_S" "${BUILD_BLOCKER}" ;;
    build)
      if [ -n "$BUILD_BLOCKER" ]; then
        echo "== build: skipped ($BUILD_BLOCKER); everything else imports rosa_ext from $ROOT without _C"
        record build skipped 0 "$BUILD_S" "$BUILD_BLOCKER"
      else
        step build "$BUILD_S" "$PYTHON" -m pip install --no-build-isolation --no-deps -e .
      fi
      check_compiled ;;
    target) step target "$TARGET_S" "$PYTHON" benchmarks/bench_update.py --preset target --out "$OUT" \
              --budget-s "$(margin "$TARGET_S")" ;;
    prob_tiles) step prob_tiles "$PROB_TILES_S" "$PYTHON" benchmarks/bench_prob_tiles.py --T 1024 --out "$OUT" \
                  --budget-s "$(margin "$PROB_TILES_S")" ;;
    tests) step tests "$TESTS_S" "$PYTHON" -m pytest python_tests -q -m gpu -p no:cacheprovider -rfEs \
             --continue-on-collection-errors ;;
    cg_overhead) step cg_overhead "$CG_OVERHEAD_S" "$PYTHON" benchmarks/bench_cg_overhead.py --out "$OUT" ;;
    kernels) step kernels "$KERNELS_S" "$PYTHON" benchmarks/bench_kernels_gpu.py --out "$OUT" --sections cases \
               --T 1024 --dtypes bfloat16 --budget-s "$(margin "$KERNELS_S")" ;;
    *) echo "== unknown step: $s"; record "$s" unknown 0 0 "unknown step" ;;
  esac
done

[ "$COMPILED_CG" = unknown ] && [ $((TOTAL_S - (SECONDS - T_ALL))) -gt 30 ] && check_compiled
echo "== run_gpu.sh: $((SECONDS - T_ALL))s in all; logs in $OUT/gpu_<step>.log, summary $SUMMARY.{json,md}"
if [ "${#failed[@]}" -ne 0 ]; then
  echo "== FAILED steps: ${failed[*]}"
  exit 1
fi
echo "== all steps passed: $STEPS"
