"""The benchmark CLI (``python benchmarks/bench_update.py``) runs end to end on the tiny preset.

Checks the JSON fields, that every method ran, and that every row's reported
accuracy is what the method promises: exact solves agree with the float64
update, CG rows either converged (then they are accurate) or hit ``max_iter``
(then the package's CG is no worse than the torch.func alternative's).
"""
import json
import pathlib
import re
import sys

import pytest

# The benchmarks live outside the package, in benchmarks/, and import each other by plain name.
BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import bench_update  # noqa: E402
import common  # noqa: E402
from update_measure import BASELINE, DEFAULT, MAX_ITER, REFERENCE, methods_for  # noqa: E402

ROW_FIELDS = {"method", "ran", "model", "d", "V", "T", "mode", "dtype", "median_ms", "min_ms", "max_ms", "reps",
              "iterations", "rel_error", "extra_mem_mb", "speedup_vs_torch_func"}
TOP_FIELDS = {"device", "device_name", "torch", "triton", "python", "commit", "date", "settings", "rows",
              "solvers", "batched", "targets", "peak_note", "mem_note", "error_note", "compiled_cg"}


@pytest.fixture(scope="module")
def result(tmp_path_factory):
    out = tmp_path_factory.mktemp("bench")
    return bench_update.run("tiny", "cpu", out, reps=2, threads=1), out


def test_files_and_fields(result, capsys):
    res, out = result
    for ext in ("json", "md", "png"):
        assert len(list(out.glob(f"cpu_tiny_*.{ext}"))) == 1, ext
    saved = json.loads(next(out.glob("cpu_tiny_*.json")).read_text())
    assert TOP_FIELDS <= set(saved), TOP_FIELDS - set(saved)
    assert saved["settings"]["max_iter"] == MAX_ITER
    assert {r["method"] for r in saved["rows"]} == set(methods_for("cpu"))
    assert not saved["skipped"]
    for r in saved["rows"]:
        assert "error" not in r, r
        assert ROW_FIELDS <= set(r), ROW_FIELDS - set(r)
        assert 0 < r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        assert r["speedup_vs_torch_func"] > 0
    assert "| tiny (32, 500) |" in (out / next(out.glob("cpu_tiny_*.md")).name).read_text()


def test_every_row_is_accurate(result):
    res, _ = result
    base = {(r["T"], r["mode"]): r for r in res["rows"] if r["method"] == BASELINE}
    for r in res["rows"]:
        exact = r["ran"].endswith("dual") or r["method"] == REFERENCE
        if exact or r["iterations"] < MAX_ITER:
            assert r["rel_error"] < 1e-4, r
        else:  # CG stopped at max_iter: approximate, but as good as the alternative's CG
            assert r["rel_error"] <= 2 * base[(r["T"], r["mode"])]["rel_error"] + 1e-6, r
        if r["method"] == REFERENCE:
            assert r["rel_error"] < 1e-10, r  # fp64 reference vs fp64 dual of the same inputs


def test_sweeps(result):
    res, _ = result
    assert {(s["mode"], s["T"]) for s in res["solvers"]} == {(m, T) for m in ("lora", "hidden") for T in (8, 64)}
    for s in res["solvers"]:
        assert s["auto_picks"] in ("cg", "dual") and s["cg_ms"] > 0 and s["dual_ms"] > 0
    assert [b["B"] for b in res["batched"]] == [1, 4, 1, 4]
    for b in res["batched"]:
        assert b["max_rel_diff"] < 1e-4, b  # one batched call == B separate calls
    assert any(t["case"].startswith("tiny T=32") for t in res["targets"])
    assert all(r["method"] != DEFAULT or r["ran"] == "torch/dual" for r in res["rows"])


def test_common_environment_and_timers():
    """benchmarks/common.py: what every benchmark script records, and its wall-clock timer."""
    assert re.fullmatch(r"[0-9a-f]{7,40}(\+dirty:\S+)?|unknown", common.commit()), common.commit()
    v = common.versions()
    assert {"torch", "triton", "python", "cuda", "transformers", "rosa_ext", "platform", "cpu", "gpu"} <= set(v)
    assert v["torch"] and v["python"] and v["cpu"]
    calls = []
    assert len(common.wall_times_ms(lambda: calls.append(1), 5)) == 5 == len(calls)
    times = common.wall_times_ms(lambda: None, 50, budget_s=0.0, min_reps=2)  # budget spent: stop at min_reps
    assert len(times) == 2 and all(t >= 0 for t in times)
    assert common.Stopwatch().elapsed_s() >= 0
    assert re.fullmatch(r"\d{4}-\d\d-\d\dT\d\d:\d\d:\d\d\+00:00", common.utc_now())
