"""``benchmarks/run_gpu.sh`` survives a machine where things fail, on the CPU in seconds: no nvidia-smi,
no cmake (and ``pip install cmake`` failing: no network), no Python headers, a step that overruns its budget,
a benchmark that fails, the total time running out. The Python is ``$PYTHON``, here a fake that logs its
calls and plays each step's part; one benchmark step runs the real interpreter on a probe script to show
that ``rosa_ext`` imports from the repository root (PYTHONPATH) with no install. Checked: the summary
files after the run (JSON and markdown, one row per step), each step's status, the exit status, and
that every step ran with the repository root first on PYTHONPATH.
"""
import json
import os
import pathlib
import shutil
import subprocess
import sys

import pytest

ROOT = pathlib.Path(__file__).resolve().parents[2]
SCRIPT = ROOT / "benchmarks" / "run_gpu.sh"
TOOLS = ("bash", "dirname", "mkdir", "date", "git", "timeout", "tail", "head", "tr", "cat", "sleep")

pytestmark = pytest.mark.skipif(shutil.which("bash") is None or shutil.which("timeout") is None,
                                reason="needs bash and coreutils' timeout")

FAKE_PYTHON = r"""#!/bin/bash
# a stand-in for python3: logs every call, then plays the part its arguments ask for
echo "CALL PYTHONPATH=$PYTHONPATH ARGS=$*" >> "$FAKE_LOG"
case "$*" in
  *sysconfig*include*) echo "$FAKE_INCLUDE" ;;
  *sysconfig*scripts*) echo "$FAKE_SCRIPTS" ;;
  *"sys.version"*) echo "3.11.0" ;;
  *"-m pip install"*cmake*) echo "ERROR: Could not find a version that satisfies the requirement cmake (network unreachable)"; exit 1 ;;
  *"-m pip install"*) [ -n "$FAKE_BUILD_OK" ] && { echo built; exit 0; }; echo "CMake Error: build failed"; exit 1 ;;
  *"import rosa_ext._C"*) [ -n "$FAKE_BUILD_OK" ] && exit 0; exit 1 ;;
  *bench_update.py*) [ -n "$FAKE_SLEEP_TARGET" ] && exec sleep 30; [ -n "$FAKE_PROBE" ] && exec "$REAL_PYTHON" "$PROBE"; exit 0 ;;
  *bench_prob_tiles.py*) [ -n "$FAKE_SLOW_TILES" ] && exec sleep 30; exit 0 ;;
  *bench_cg_overhead.py*) [ -n "$FAKE_BUILD_OK" ] && exit 0; echo "rosa_ext._C is not built"; exit 2 ;;
  *) exit 0 ;;
esac
"""

PROBE = """import sys
# as on a machine where nothing was installed: no editable-install import hook
sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()]
import rosa_ext
print("ROSA_FILE", rosa_ext.__file__)
"""


def _exe(path: pathlib.Path, text: str) -> None:
    path.write_text(text)
    path.chmod(0o755)


def _run(tmp_path, env_extra, fakes=()):
    """Run the script with a PATH of only the tools it needs (+ ``fakes``: name -> output), return
    (completed process, summary json, summary md, the fake python's log)."""
    bin_dir = tmp_path / "bin"
    bin_dir.mkdir()
    for tool in TOOLS:
        found = shutil.which(tool)
        if found:
            os.symlink(found, bin_dir / tool)
    for name, out in dict(fakes).items():
        _exe(bin_dir / name, f"#!/bin/bash\necho '{out}'\n")
    assert shutil.which("nvidia-smi", path=str(bin_dir)) is None or "nvidia-smi" in dict(fakes)
    _exe(tmp_path / "python3", FAKE_PYTHON)
    (tmp_path / "probe.py").write_text(PROBE)
    include = tmp_path / "include"
    include.mkdir()
    out = tmp_path / "out"
    env = dict(PATH=str(bin_dir), HOME=str(tmp_path), PYTHON=str(tmp_path / "python3"), OUT=str(out),
               FAKE_LOG=str(tmp_path / "calls.log"), FAKE_INCLUDE=str(include), FAKE_SCRIPTS=str(tmp_path / "scripts"),
               REAL_PYTHON=sys.executable, PROBE=str(tmp_path / "probe.py"), TAIL="3",
               DEVICE_S="2", PREFLIGHT_S="6", BUILD_S="3", TARGET_S="30", PROB_TILES_S="1", TESTS_S="3",
               CG_OVERHEAD_S="2", KERNELS_S="2")
    env.update(env_extra)
    if env_extra.get("HEADERS"):
        (include / "Python.h").write_text("/* fake */\n")
    proc = subprocess.run(["bash", str(SCRIPT)], env=env, capture_output=True, text=True, timeout=120)
    summaries = sorted(out.glob("gpu_run_*.json"))
    assert len(summaries) == 1, (proc.stdout, proc.stderr)
    summary = json.loads(summaries[0].read_text())
    md = summaries[0].with_suffix(".md").read_text()
    calls = (tmp_path / "calls.log").read_text().splitlines() if (tmp_path / "calls.log").exists() else []
    return proc, summary, md, calls


def _status(summary):
    return {s["step"]: s["exit"] for s in summary["steps"]}


def test_a_broken_machine_still_runs_every_step_and_writes_the_summary(tmp_path):
    proc, summary, md, calls = _run(tmp_path, dict(FAKE_SLOW_TILES="1", FAKE_PROBE="1"))
    assert proc.returncode == 1, proc.stdout + proc.stderr
    assert _status(summary) == {"device": "missing", "preflight": "1", "build": "skipped", "target": "0",
                                "prob_tiles": "timeout", "tests": "0", "cg_overhead": "2", "kernels": "0"}
    assert summary["cmake"] == "missing" and summary["python_headers"].startswith("missing")
    assert summary["compiled_cg"].startswith("no") and summary["device"] == "unknown"
    assert summary["python"].endswith("python3") and summary["pythonpath_root"] == str(ROOT)
    build = next(s for s in summary["steps"] if s["step"] == "build")
    assert "no cmake" in build["note"] and "no Python headers" in build["note"]
    for step in ("device", "preflight", "build", "target", "prob_tiles", "tests", "cg_overhead", "kernels"):
        assert f"| {step} |" in md
    # pip install cmake was tried (and failed), the build itself never ran
    assert any("-m pip install" in c and "cmake" in c for c in calls)
    assert not any("--no-build-isolation" in c for c in calls)
    # every Python call had the repository root first on PYTHONPATH
    assert calls and all(c.startswith(f"CALL PYTHONPATH={ROOT}") for c in calls)
    # ... and so a benchmark imports rosa_ext from this checkout with nothing installed
    target_log = (tmp_path / "out" / "gpu_target.log").read_text()
    assert f"ROSA_FILE {ROOT / 'rosa_ext' / '__init__.py'}" in target_log
    assert "FAILED steps" in proc.stdout and "prob_tiles (timeout" in proc.stdout


def test_a_failed_build_does_not_stop_the_benchmarks(tmp_path):
    proc, summary, _, calls = _run(tmp_path, dict(HEADERS="1", STEPS="preflight build tests cg_overhead"),
                                   fakes={"cmake": "cmake version 3.30.0"})
    assert proc.returncode == 1
    assert _status(summary) == {"preflight": "0", "build": "1", "tests": "0", "cg_overhead": "2"}
    assert summary["cmake"] == "cmake version 3.30.0" and summary["python_headers"] == str(tmp_path / "include")
    assert "CMake Error" in (tmp_path / "out" / "gpu_build.log").read_text()
    assert any("--no-build-isolation --no-deps -e ." in c for c in calls)
    assert any("-m pytest python_tests -q -m gpu" in c for c in calls)


def test_everything_passing_exits_zero(tmp_path):
    proc, summary, _, _ = _run(tmp_path, dict(HEADERS="1", FAKE_BUILD_OK="1"),
                               fakes={"cmake": "cmake version 3.30.0", "nvidia-smi": "NVIDIA H100 80GB HBM3",
                                      "nvcc": "Build cuda_13.0"})
    assert proc.returncode == 0, proc.stdout + proc.stderr
    assert set(_status(summary).values()) == {"0"} and len(summary["steps"]) == 8
    assert summary["device"] == "NVIDIA H100 80GB HBM3" and summary["compiled_cg"] == "yes"
    assert summary["nvcc"] == "Build cuda_13.0" and "all steps passed" in proc.stdout


def test_the_total_time_limit_cuts_and_skips_steps(tmp_path):
    proc, summary, _, _ = _run(tmp_path, dict(STEPS="target tests kernels", TOTAL_S="2", MIN_STEP_S="1",
                                              FAKE_SLEEP_TARGET="1"))
    assert proc.returncode == 1
    assert _status(summary) == {"target": "timeout", "tests": "skipped", "kernels": "skipped"}
    target = summary["steps"][0]
    assert target["budget_s"] <= 2 and "budget cut" in target["note"] and target["seconds"] <= 4
    assert summary["seconds"] <= 5


def test_the_budgets_fit_one_call():
    """The default step budgets add to <= 540 s and the total limit stays under the 600 s of one call."""
    text = SCRIPT.read_text()
    import re
    budgets = {m.group(1): int(m.group(2)) for m in re.finditer(r'^([A-Z_]+)_S="\$\{\1_S:-(\d+)\}"', text, re.M)}
    total = budgets.pop("TOTAL")
    budgets.pop("MIN_STEP", None)
    assert set(budgets) == {"DEVICE", "PREFLIGHT", "BUILD", "TARGET", "PROB_TILES", "TESTS", "CG_OVERHEAD", "KERNELS"}
    assert sum(budgets.values()) <= 540 and total + 5 + 30 <= 600
