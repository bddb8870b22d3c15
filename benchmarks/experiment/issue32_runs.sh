#!/bin/bash
# Issue 32's held-out runs, one after another, each resumable: rerunning this script (or any one line)
# continues every run from what its --out folder already holds. Run from the repository root:
#   nohup bash benchmarks/experiment/issue32_runs.sh [smollm2|qwen|all] > issue32_runs.log 2>&1 &
# One torch thread (the machine is shared). The methods are the choices of the dev study
# (benchmarks/results/experiment/README.md, "Issue 32"): per model, the controls, ROSA with its defaults,
# the dev-chosen ROSA-hidden lever (Qwen: the shift capped at 0.05 x the lm_head input norm) and the fair
# PG's dev-chosen step rule for each parameterisation.
set -e
export OMP_NUM_THREADS=1 PYTHONPATH="${PYTHONPATH:-.}"
R=benchmarks/results/experiment/issue32
X="python -m rosa_ext.harness.experiment --turns 5 --threads 1 --quiet --batch-size 40"
SMOL="baseline,resample,ban,guess,rosa-lora,rosa-hidden,pg-lora-clip-lr1,pg-hidden-match"
QWEN="${QWEN_METHODS:-baseline,resample,ban,guess,rosa-lora,rosa-hidden,rosa-hidden-cap0.05,pg-lora-clip-lr1,pg-hidden-match}"
what="${1:-all}"
if [ "$what" = smollm2 ] || [ "$what" = all ]; then
  $X --model smollm2 --problem-set default --max-new-tokens 32 --problems 200 --seeds 0 --decoding greedy \
     --methods "$SMOL" --out $R/smollm2/greedy
  $X --model smollm2 --problem-set default --max-new-tokens 32 --problems 100 --seeds 0 1 2 --decoding sample \
     --methods "$SMOL" --out $R/smollm2/sampled
fi
if [ "$what" = qwen ] || [ "$what" = all ]; then
  $X --model qwen25-coder --problem-set qwen-mix --max-new-tokens 40 --problems 200 --seeds 0 --decoding greedy \
     --methods "$QWEN" --out $R/qwen25_coder/greedy
  $X --model qwen25-coder --problem-set qwen-mix --max-new-tokens 40 --problems 100 --seeds 0 1 2 --decoding sample \
     --methods "$QWEN" --out $R/qwen25_coder/sampled
fi
