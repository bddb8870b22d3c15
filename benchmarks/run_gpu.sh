#!/usr/bin/env bash
# Everything that needs a GPU, in one call on the lent machine (torch/triton/transformers
# already installed there): build, GPU tests, kernel / CG-overhead / update benchmarks.
# Results land in benchmarks/results/ (JSON with device, versions, commit, date).
set -uo pipefail
cd "$(dirname "$0")/.."
OUT="${OUT:-benchmarks/results}"
mkdir -p "$OUT"
pip install --no-build-isolation --no-deps -e . > "$OUT/gpu_build.log" 2>&1 || { tail -30 "$OUT/gpu_build.log"; exit 1; }
nvidia-smi --query-gpu=name,driver_version,memory.total --format=csv | tee "$OUT/gpu_device.txt"
python -m pytest python_tests -q -x -m "gpu or not gpu" 2>&1 | tail -15 | tee "$OUT/gpu_tests.txt"
python benchmarks/bench_cg_overhead.py --out "$OUT" 2>&1 | tail -8
python benchmarks/bench_kernels_gpu.py --out "$OUT" 2>&1 | tail -40
# the update benchmark stops starting new cases after --budget-s (writes JSON after every case)
timeout 590 python benchmarks/bench_update.py --preset gpu --out "$OUT" --budget-s "${BENCH_BUDGET_S:-420}" 2>&1 | tail -80
