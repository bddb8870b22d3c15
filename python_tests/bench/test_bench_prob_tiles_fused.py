"""``benchmarks/bench_prob_tiles.py``'s fused-kernel measurement (``fused_rows``: tile_weight, tile_gram and
tile_vjp over one-pass tiles, timed, against the torch GEMMs and float64 of the same tiles) runs on the CPU
under the interpreter on tiny tiles, with the fields the GPU rows carry and errors at the fp32 level; and the
CLI knows which precisions run it."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pathlib  # noqa: E402
import sys  # noqa: E402

import pytest  # noqa: E402
import torch  # noqa: E402

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import bench_prob_tiles as BPT  # noqa: E402

NAMES = ("weight", "gram", "vjp")


@pytest.mark.triton_interp
@pytest.mark.parametrize("f64", [True, False])
def test_fused_rows_fields_and_errors(f64):
    from rosa_ext.kernels import _tiles
    from rosa_ext.kernels.prob_tiles import prob_tiles_from_tensors
    if not _tiles.INTERPRET:
        pytest.skip("the Triton interpreter is not active (a GPU machine)")
    T, d, V = 16, 16, 200
    h, W, y, w = BPT._inputs(T, d, V, "cpu")
    y[3] = y[9]  # a repeated target: the 1(y_t = y_u) term off the diagonal
    seg = torch.zeros(T, dtype=torch.int32)
    tiles = prob_tiles_from_tensors(h, W, seg, None, y, precision="bf16x2")
    row = BPT.fused_rows(tiles, W, y, w, f64=f64)
    for name in NAMES:
        assert row[f"fused_{name}_ms"] > 0, name
        assert row[f"fused_{name}_rel_vs_torch"] < 1e-5, (name, row)
        if f64:
            assert row[f"fused_{name}_rel_vs_f64"] < 1e-5, (name, row)
            assert row[f"torch_{name}_rel_vs_f64"] < 1e-5, (name, row)
        else:
            assert f"fused_{name}_rel_vs_f64" not in row and f"torch_{name}_rel_vs_f64" not in row
    assert all(isinstance(v, float) for v in row.values())  # the printed line formats floats


def test_float64_references_fit_at_1024_not_4096():
    assert 1024 * BPT.VOCAB * 8 <= BPT.F64_MAX_BYTES < 4096 * BPT.VOCAB * 8


def test_fused_precisions_default_and_choices(monkeypatch):
    seen = {}
    monkeypatch.setattr(BPT.torch.cuda, "is_available", lambda: True)
    monkeypatch.setattr(BPT, "gpu", lambda args: seen.setdefault("args", args))
    assert BPT.main(["--T", "1024"]) == 0
    assert seen["args"].fused_precisions == ["bf16x2"]
    seen.clear()
    assert BPT.main(["--fused-precisions", "fp32", "bf16"]) == 0
    assert seen["args"].fused_precisions == ["fp32", "bf16"]
    with pytest.raises(SystemExit):
        BPT.main(["--fused-precisions", "fp16"])
