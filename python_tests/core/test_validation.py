"""Every bad input gives a clear error, raised before anything is computed or modified."""
import math

import pytest
import torch
from _helpers import make_inputs

import rosa_ext
from rosa_ext import rosa_update
from rosa_ext.reference import rosa_update_reference


def _call(fn=rosa_update, mode="lora", **over):
    inp = make_inputs(mode="lora", dtype=torch.float32)
    kw = dict(inp, reward=-1.0, mode=mode)
    kw.update(over)
    return fn(**kw)


CASES = [
    (dict(mode="full"), ValueError, "unknown mode"),
    (dict(solver="newton"), ValueError, "unknown solver"),
    (dict(backend="cuda"), ValueError, "unknown backend"),
    (dict(beta=0.0), ValueError, "`beta` must be > 0"),
    (dict(beta=-1.0), ValueError, "`beta` must be > 0"),
    (dict(beta=float("nan")), ValueError, "`beta` must be > 0"),
    (dict(damping=0.0), ValueError, "`damping` must be > 0"),
    (dict(tol=-1e-3), ValueError, "`tol` must be >= 0"),
    (dict(max_iter=-1), ValueError, "`max_iter`"),
    (dict(max_iter=2.5), ValueError, "`max_iter`"),
    (dict(reward=float("nan")), ValueError, "`reward` must be finite"),
    (dict(reward=float("inf")), ValueError, "`reward` must be finite"),
    (dict(reward="good"), TypeError, "`reward` must be"),
    (dict(reward=[1.0, 2.0]), ValueError, "2 values but there are 1"),
    (dict(hidden=torch.randn(6, 5)), ValueError, "`hidden` must be"),
    (dict(hidden=torch.randn(6, 12, dtype=torch.float64)), ValueError, "must match"),
    (dict(hidden=torch.randint(0, 3, (6, 12))), TypeError, "floating-point"),
    (dict(hidden=torch.randn(2, 3, 4, 12)), ValueError, "`hidden` must be"),
    (dict(weight=torch.randn(37, 12, 1)), ValueError, "`weight` must be"),
    (dict(targets=torch.zeros(5, dtype=torch.long)), ValueError, "`targets` must have shape"),
    (dict(targets=torch.zeros(6)), TypeError, "int64"),
    (dict(targets=torch.full((6,), 37)), ValueError, "outside the vocabulary"),
    (dict(targets=torch.full((6,), -1)), ValueError, "outside the vocabulary"),
    (dict(hidden=torch.zeros(0, 12), targets=torch.zeros(0, dtype=torch.long)), ValueError, "empty"),
    (dict(mask=torch.zeros(6, dtype=torch.bool)), ValueError, "selects no response token"),
    (dict(mask=torch.ones(5, dtype=torch.bool)), ValueError, "`mask` must have shape"),
    (dict(mask=torch.ones(6)), TypeError, "bool"),
    (dict(bias=torch.randn(36)), ValueError, "`bias` must be"),
    (dict(bias=torch.full((37,), float("nan"))), ValueError, "`bias` contains NaN"),
    (dict(lora_a=torch.randn(11)), ValueError, "`lora_a` must have shape"),
    (dict(lora_b=torch.randn(2, 37)), ValueError, "`lora_b` must have shape"),
    (dict(lora_a=None), ValueError, "needs `lora_a`"),
    (dict(lora_a=torch.full((12,), float("inf"))), ValueError, "`lora_a` contains NaN or Inf"),
    (dict(lora_scale=float("nan")), ValueError, "`lora_scale` must be finite"),
    (dict(hidden="x"), TypeError, "`hidden` must be a torch.Tensor"),
]


@pytest.mark.parametrize("fn", [rosa_update, rosa_update_reference], ids=["op", "reference"])
@pytest.mark.parametrize("over,exc,msg", CASES, ids=[c[2][:30] + str(i) for i, c in enumerate(CASES)])
def test_bad_input(fn, over, exc, msg):
    with pytest.raises(exc, match=msg.replace("(", r"\(").replace(")", r"\)").replace("`", "`")):
        _call(fn, **over)


def test_nonfinite_hidden():
    inp = make_inputs(mode="hidden", dtype=torch.float32)
    inp["hidden"][2, 3] = float("nan")
    with pytest.raises(ValueError, match="`hidden` contains NaN"):
        rosa_update(**inp, reward=1.0, mode="hidden")


def test_nan_in_masked_row_is_fine():
    inp = make_inputs(mode="hidden", dtype=torch.float32)
    inp["hidden"][2] = float("nan")
    mask = torch.ones(6, dtype=torch.bool)
    mask[2] = False
    step = rosa_update(**inp, reward=1.0, mode="hidden", mask=mask)
    assert torch.isfinite(step.update).all()


def test_device_mismatch_meta():
    inp = make_inputs(mode="hidden", dtype=torch.float32)
    with pytest.raises(ValueError, match="is on meta but `weight` is on cpu"):
        rosa_update(**dict(inp, hidden=inp["hidden"].to("meta")), reward=1.0, mode="hidden")


def test_triton_backend_on_cpu_without_interpreter(monkeypatch):
    """(engine_for caches one engine per process: whether Triton can run does not change within one, as
    TRITON_INTERPRET is read when triton is imported; the cache is cleared to stand for another process.)"""
    from rosa_ext.backends import engine_for
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    engine_for.cache_clear()
    inp = make_inputs(mode="hidden", dtype=torch.float32)
    try:
        with pytest.raises(rosa_ext.RosaInputError, match="backend='triton' needs") as ei:
            rosa_update(**inp, reward=1.0, mode="hidden", backend="triton")
        assert ei.value.argument == "backend"
    finally:
        engine_for.cache_clear()


def test_batched_reward_count():
    inp = make_inputs(mode="hidden", dtype=torch.float32, B=3)
    with pytest.raises(ValueError, match="2 values but there are 3"):
        rosa_update(**inp, reward=torch.tensor([1.0, -1.0]), mode="hidden")
    with pytest.raises(ValueError, match="`reward` must be finite"):
        rosa_update(**inp, reward=torch.tensor([1.0, math.nan, 1.0]), mode="hidden")
