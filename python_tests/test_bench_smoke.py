"""The benchmark CLI runs end to end on a tiny preset and reports sane rows."""
import json

from rosa_ext import bench


def test_bench_tiny_preset(tmp_path, capsys):
    res = bench.run("tiny", "cpu", tmp_path, reps=1, threads=1)
    methods = {r["method"] for r in res["rows"]}
    assert methods == set(bench.METHODS)
    for r in res["rows"]:
        assert r["median_ms"] > 0 and r["min_ms"] <= r["median_ms"] <= r["max_ms"]
        exact = r["method"] in ("rosa dual", "rosa auto", "reference") or r["iterations"] < bench.MAX_ITER
        assert r["rel_error"] < (1e-4 if exact else 5e-2), r  # CG capped at MAX_ITER is approximate
        assert r["speedup_vs_torch_func"] > 0
    for name in ("json", "md", "png"):
        assert len(list(tmp_path.glob(f"cpu_tiny_*.{name}"))) == 1
    saved = json.loads(next(tmp_path.glob("cpu_tiny_*.json")).read_text())
    assert saved["settings"]["max_iter"] == bench.MAX_ITER and saved["batched"][0]["B"] == 1
    assert "| tiny (32, 500) |" in capsys.readouterr().out
