"""Property-based tests of the op and the float64 reference (hypothesis; README "Errors").

- random valid inputs: ``rosa_update`` (every solver) agrees with ``rosa_update_reference`` to 1e-8
  in float64, touches no input, and returns no autograd graph;
- the dual solve at tiny damping on a rank-deficient J (hidden mode, T > d) is exact (MATH.md 4);
- random invalid inputs (one bad argument on top of valid ones): a rosa_ext error that names the
  argument, raised by the op and the reference alike, and every input tensor untouched.

Examples are derandomized (reproducible in CI) and small (the suite stays fast).
"""
from __future__ import annotations

import math
from typing import Any, Dict

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rosa_ext
from rosa_ext import RosaError, rosa_update
from rosa_ext.reference import rosa_update_reference

SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
EXACT = dict(max_iter=500, tol=1e-13)


@st.composite
def problems(draw, dtype=torch.float64, max_T=6, max_d=8, max_V=20, damping=(1e-5, 10.0)) -> Dict[str, Any]:
    """Valid keyword arguments of rosa_update (small, float64 by default)."""
    mode = draw(st.sampled_from(["lora", "hidden"]))
    B = draw(st.sampled_from([None, None, 1, 2, 3]))
    T = draw(st.integers(1, max_T))
    d = draw(st.integers(1, max_d))
    V = draw(st.integers(2, max_V))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    scale = draw(st.floats(0.1, 4.0))
    g = torch.Generator().manual_seed(seed)
    lead = (T,) if B is None else (B, T)
    H = torch.randn(*lead, d, generator=g, dtype=torch.float64)
    W = torch.randn(V, d, generator=g, dtype=torch.float64) * scale / math.sqrt(d)
    kw: Dict[str, Any] = dict(hidden=H.to(dtype), weight=W.to(dtype), mode=mode)
    kw["targets"] = torch.randint(0, V, lead, generator=g)
    if draw(st.booleans()):
        kw["bias"] = (torch.randn(V, generator=g, dtype=torch.float64) * 0.3).to(dtype)
    nb = 1 if B is None else B
    lora = mode == "lora" or draw(st.booleans())
    if lora:
        a = torch.randn(nb, d, generator=g, dtype=torch.float64) / math.sqrt(d)
        b = torch.randn(nb, V, generator=g, dtype=torch.float64) * draw(st.sampled_from([0.0, 0.05, 0.5]))
        kw["lora_a"], kw["lora_b"] = (a[0], b[0]) if B is None else (a, b)
        kw["lora_scale"] = draw(st.sampled_from([8.0, 1.0, -2.0, 0.5]))
    if draw(st.booleans()):
        m = torch.rand(*lead, generator=g) < 0.7
        m.reshape(-1, T)[:, 0] = True  # every conversation keeps a token
        kw["mask"] = m
    rewards = st.floats(-3.0, 3.0, allow_nan=False)
    if B is None:
        kw["reward"] = draw(st.one_of(rewards, st.integers(-2, 2)))
    else:
        r = draw(st.lists(rewards, min_size=B, max_size=B))
        kw["reward"] = draw(st.sampled_from([torch.tensor(r), r, tuple(r)]))
    kw["beta"] = draw(st.floats(0.2, 5.0))
    kw["damping"] = 10 ** draw(st.floats(math.log10(damping[0]), math.log10(damping[1])))
    return kw


def _snapshot(kw: Dict[str, Any]) -> Dict[str, torch.Tensor]:
    return {k: v.clone() for k, v in kw.items() if isinstance(v, torch.Tensor)}


def _untouched(kw: Dict[str, Any], snap: Dict[str, torch.Tensor]) -> None:
    for k, before in snap.items():
        after = kw[k]
        assert after.dtype == before.dtype and after.shape == before.shape, k
        torch.testing.assert_close(after, before, rtol=0, atol=0, equal_nan=True, msg=f"`{k}` was modified")


@settings(max_examples=40, **SETTINGS)
@given(kw=problems(), solver=st.sampled_from(["dual", "cg", "auto"]))
def test_random_valid_inputs_match_reference(kw, solver):
    snap = _snapshot(kw)
    ref = rosa_update_reference(**kw)
    got = rosa_update(**kw, solver=solver, **EXACT)
    _untouched(kw, snap)
    assert got.update.dtype == torch.float64 and got.update.shape == ref.update.shape
    scale = max(1.0, ref.update.abs().max().item())
    err = (got.update - ref.update).abs().max().item()
    assert err <= 1e-8 * scale, (err, got.solver, got.residual)
    torch.testing.assert_close(got.logp, ref.logp.to(got.logp.dtype), rtol=1e-10, atol=1e-10)


@settings(max_examples=25, **SETTINGS)
@given(kw=problems(), grad=st.sampled_from(["hidden", "weight", "lora_a", "bias"]),
       solver=st.sampled_from(["dual", "cg"]))
def test_requires_grad_inputs_give_no_graph(kw, grad, solver):
    if kw.get(grad) is None:
        grad = "hidden"
    kw[grad] = kw[grad].clone().requires_grad_(True)
    got = rosa_update(**kw, solver=solver, max_iter=5)
    for t in (got.update, got.logp, got.target):
        assert not t.requires_grad and t.grad_fn is None


@st.composite
def rank_deficient_hidden(draw, dtype):
    """Hidden mode with T > d: J (T x d) has rank d < T, so J J^T is singular."""
    d = draw(st.integers(1, 5))
    T = draw(st.integers(d + 1, 12))
    V = draw(st.integers(3, 30))
    seed = draw(st.integers(0, 2 ** 31 - 1))
    g = torch.Generator().manual_seed(seed)
    H = torch.randn(T, d, generator=g, dtype=torch.float64)
    W = torch.randn(V, d, generator=g, dtype=torch.float64) * draw(st.floats(0.3, 2.0)) / math.sqrt(d)
    y = torch.multinomial(torch.softmax(H @ W.T, -1), 1, generator=g).flatten()
    damping = draw(st.sampled_from([1e-300, 1e-100, 1e-30, 1e-12, 1e-10, 1e-8, 1e-6, 1e-4]))
    return dict(hidden=H.to(dtype), weight=W.to(dtype), targets=y, reward=draw(st.sampled_from([-1.0, 1.0, 0.3])),
                mode="hidden", damping=damping)


@settings(max_examples=30, **SETTINGS)
@given(kw=rank_deficient_hidden(torch.float64))
def test_dual_tiny_damping_rank_deficient_float64(kw):
    """The dual solve never returns a wrong step: at any damping it matches the reference."""
    ref = rosa_update_reference(**kw)
    got = rosa_update(**kw, solver="dual")
    rel = ((got.update - ref.update).norm() / ref.update.norm().clamp_min(1e-300)).item()
    assert rel <= 1e-8, (rel, got.residual)
    assert got.residual <= 1e-8


@settings(max_examples=15, **SETTINGS)
@given(kw=rank_deficient_hidden(torch.float32))
def test_dual_tiny_damping_rank_deficient_float32(kw):
    ref = rosa_update_reference(**kw)  # exact for the float32 inputs
    got = rosa_update(**kw, solver="dual")
    rel = ((got.update.double() - ref.update).norm() / ref.update.norm().clamp_min(1e-300)).item()
    assert rel <= 1e-4, (rel, got.residual)


def test_dual_tiny_damping_issue_numbers():
    """The case of the issue: damping 1e-300 / 1e-10, hidden mode, T = 24 > d = 8."""
    from _helpers import make_inputs
    for dtype, tol in ((torch.float64, 1e-12), (torch.float32, 1e-5)):
        inp = make_inputs(T=24, d=8, V=37, mode="hidden", dtype=dtype, seed=1)
        for damping in (1e-300, 1e-10):
            ref = rosa_update_reference(**inp, reward=-1.0, mode="hidden", damping=damping)
            for solver in ("dual", "auto"):
                got = rosa_update(**inp, reward=-1.0, mode="hidden", damping=damping, solver=solver)
                rel = ((got.update.double() - ref.update).norm() / ref.update.norm()).item()
                assert rel < tol, (dtype, damping, solver, rel)
                assert got.residual < 1e-4


# -- invalid inputs ---------------------------------------------------------------------------
NAN = float("nan")


def _bad_values(kw: Dict[str, Any]):
    """(argument, bad value or a function of the inputs giving it) pairs."""
    H, W, y = kw["hidden"], kw["weight"], kw["targets"]
    V, d = W.shape
    B = None if H.dim() == 2 else H.shape[0]

    def with_nan(t, at=0):
        t = t.clone()
        t.reshape(-1)[at] = NAN
        return t

    out = [
        ("mode", "full"), ("mode", None), ("mode", 3),
        ("solver", "newton"), ("solver", None), ("backend", "cuda"), ("backend", 0),
        ("beta", 0.0), ("beta", -1), ("beta", NAN), ("beta", math.inf), ("beta", "1"), ("beta", None), ("beta", True),
        ("beta", 10 ** 400),
        ("damping", 0), ("damping", -1e-3), ("damping", NAN), ("damping", math.inf), ("damping", "0.1"),
        ("damping", None), ("damping", 1j),
        ("tol", -1.0), ("tol", NAN), ("tol", "x"), ("tol", None),
        ("max_iter", -1), ("max_iter", 2.5), ("max_iter", "16"), ("max_iter", None), ("max_iter", True),
        ("lora_scale", NAN), ("lora_scale", math.inf), ("lora_scale", "8"), ("lora_scale", None), ("lora_scale", True),
        ("lora_scale", 2 + 0j),
        ("reward", NAN), ("reward", math.inf), ("reward", "good"), ("reward", None), ("reward", True),
        ("reward", 1 + 1j), ("reward", torch.tensor(True)), ("reward", torch.tensor(1 + 1j)), ("reward", 10 ** 400),
        ("reward", [1.0] * ((B or 1) + 1)), ("reward", torch.tensor([NAN])), ("reward", [True]),
        ("hidden", torch.zeros(*H.shape[:-1], d + 1, dtype=H.dtype)), ("hidden", H.long()), ("hidden", "h"),
        ("hidden", H.to(torch.float32 if H.dtype == torch.float64 else torch.float64)),
        ("hidden", H.unsqueeze(0).unsqueeze(0)), ("hidden", H.to(torch.complex128)),
        ("weight", W.unsqueeze(0)), ("weight", W.long()), ("weight", W[:, :0]), ("weight", with_nan(W, W.numel() - 1)),
        ("weight", W.to(torch.complex128)),
        ("targets", y.double()), ("targets", y[..., :-1] if y.shape[-1] > 1 else y.reshape(-1)[:0]),
        ("targets", torch.full_like(y, V)), ("targets", torch.full_like(y, -1)), ("targets", "y"),
        ("mask", torch.ones(y.shape, dtype=torch.float32)), ("mask", torch.zeros(y.shape, dtype=torch.bool)),
        ("mask", torch.ones(*y.shape, 2, dtype=torch.bool)),
        ("bias", torch.zeros(V + 1, dtype=W.dtype)), ("bias", torch.full((V,), NAN, dtype=W.dtype)),
        ("bias", torch.zeros(V, dtype=torch.long)),
        ("lora_a", torch.zeros(d + 1, dtype=torch.float64)), ("lora_a", torch.full((d,), math.inf, dtype=torch.float64)),
        ("lora_a", torch.ones(d, dtype=torch.long)),
        ("lora_b", torch.zeros(V + 1, dtype=torch.float64)), ("lora_b", torch.full((V,), NAN, dtype=torch.float64)),
    ]
    if kw.get("mask") is None:  # a NaN in a selected row
        out.append(("hidden", with_nan(H)))
    if kw["mode"] == "lora":
        out += [("lora_a", None), ("lora_scale", 0.0)]
        out.append(("lora_a", lambda k: torch.zeros_like(k["lora_a"]) if k.get("lora_b") is not None
                    and not bool(k["lora_b"].any()) else "zero-a"))
    if W.dtype == torch.float32:
        out += [("damping", 1e300), ("lora_scale", 1e300), ("reward", 1e300)]
    return out


@settings(max_examples=120, **SETTINGS)
@given(kw=problems(max_T=4, max_d=5, max_V=9), pick=st.integers(0, 10 ** 6),
       fn=st.sampled_from([rosa_update, rosa_update_reference]), f32=st.booleans())
def test_random_invalid_inputs_raise_a_named_error_and_touch_nothing(kw, pick, fn, f32):
    if f32:
        for k in ("hidden", "weight", "bias"):
            if kw.get(k) is not None:
                kw[k] = kw[k].float()
    bad = _bad_values(kw)
    name, value = bad[pick % len(bad)]
    if callable(value):
        value = value(kw)
    call = dict(kw)
    call[name] = value
    snap = _snapshot(kw)
    snap_value = value.clone() if isinstance(value, torch.Tensor) else None
    with pytest.raises(RosaError) as info:
        fn(**call)
    assert info.value.argument == name, (name, info.value.argument, str(info.value))
    assert f"`{name}`" in str(info.value) or name in ("mode", "solver", "backend"), str(info.value)
    _untouched(kw, snap)
    if snap_value is not None:
        torch.testing.assert_close(value, snap_value, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("batched", [False, True])
@pytest.mark.parametrize("dtype", [torch.float64, torch.float32])
@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_every_bad_value_of_the_catalogue(mode, dtype, batched):
    """The whole catalogue above, once, on fixed inputs (the property test samples it)."""
    from _helpers import make_inputs
    B = 2 if batched else None
    kw = dict(make_inputs(mode=mode, dtype=dtype, B=B, T=4, d=5, V=9), mode=mode,
              reward=[1.0, -1.0] if batched else -1.0)
    if mode == "lora" and batched:
        kw["lora_a"], kw["lora_b"] = kw["lora_a"].expand(2, -1).clone(), kw["lora_b"].expand(2, -1).clone()
    snap = _snapshot(kw)
    for name, value in _bad_values(kw):
        value = value(kw) if callable(value) else value
        for fn in (rosa_update, rosa_update_reference):
            with pytest.raises(RosaError) as info:
                fn(**dict(kw, **{name: value}))
            assert info.value.argument == name, (name, str(info.value))
    _untouched(kw, snap)


def test_error_types_are_exported_and_compatible():
    assert issubclass(rosa_ext.RosaInputError, ValueError) and issubclass(rosa_ext.RosaTypeError, TypeError)
    assert issubclass(rosa_ext.RosaNonFiniteError, ValueError)
    assert issubclass(rosa_ext.RosaNonFiniteError, FloatingPointError)
    assert issubclass(rosa_ext.RosaNumericalError, FloatingPointError)
    assert issubclass(rosa_ext.RosaStateError, RuntimeError)
    for cls in (rosa_ext.RosaInputError, rosa_ext.RosaTypeError, rosa_ext.RosaNonFiniteError,
                rosa_ext.RosaNumericalError, rosa_ext.RosaStateError):
        assert issubclass(cls, rosa_ext.RosaError)


@pytest.mark.parametrize("case", ["B0", "d0", "V0"])
def test_empty_sizes_are_named(case):
    W = torch.randn(7, 4)
    if case == "B0":
        args = (torch.zeros(0, 3, 4), W, torch.zeros(0, 3, dtype=torch.long))
    elif case == "d0":
        args = (torch.zeros(3, 0), torch.zeros(7, 0), torch.zeros(3, dtype=torch.long))
    else:
        args = (torch.zeros(3, 4), torch.zeros(0, 4), torch.zeros(3, dtype=torch.long))
    with pytest.raises(rosa_ext.RosaInputError) as info:
        rosa_update(*args, 1.0, mode="hidden")
    assert info.value.argument in ("hidden", "weight")


def test_overflowing_logits_and_nan_weight_raise_instead_of_a_zero_step():
    from _helpers import make_inputs
    inp = make_inputs(mode="hidden", dtype=torch.float32)
    # A logit that overflows float32 in ANY summation order: positive h and a positive row of W, so
    # every partial sum of h . W[3] grows towards 12 x 1e38 (the GEMM's blocking cannot matter).
    inp["hidden"] = inp["hidden"].abs() + 0.5
    overflow = inp["weight"].clone()
    overflow[3] = 1e38  # finite in float32, but the logit of row 3 is > 6e38 (not float64's)
    nan = inp["weight"].clone().index_fill_(0, torch.tensor([3]), NAN)  # a row no target uses
    for W, fns in ((overflow, (rosa_update,)), (nan, (rosa_update, rosa_update_reference))):
        for fn in fns:
            with pytest.raises(rosa_ext.RosaNonFiniteError, match="logits are not finite") as info:
                fn(**dict(inp, weight=W), reward=1.0, mode="hidden")
            assert info.value.argument == "weight"


def test_lora_a_zero_is_refused_like_none_but_not_with_a_nonzero_b():
    from _helpers import make_inputs
    inp = make_inputs(mode="lora")
    for bad in (dict(lora_a=None), dict(lora_a=torch.zeros(12), lora_b=torch.zeros(37)), dict(lora_a=torch.zeros(12),
                                                                                            lora_b=None)):
        with pytest.raises(rosa_ext.RosaInputError, match="lora_a") as info:
            rosa_update(**dict(inp, **bad), reward=1.0, mode="lora")
        assert info.value.argument == "lora_a"
    # a = 0 with b != 0: the a-block of J is nonzero, a valid (if unusual) state
    got = rosa_update(**dict(inp, lora_a=torch.zeros(12, dtype=torch.float64)), reward=1.0, mode="lora")
    ref = rosa_update_reference(**dict(inp, lora_a=torch.zeros(12, dtype=torch.float64)), reward=1.0, mode="lora")
    torch.testing.assert_close(got.update, ref.update, rtol=0, atol=1e-9)
    assert got.delta_a.abs().max() > 0


@pytest.mark.parametrize("solver", ["dual", "cg"])
def test_inf_weight_hidden_from_the_logits_is_named(solver):
    """-inf in a weight entry that no logit shows (every token's softmax weighs it by 0) still
    reaches the hidden-mode Jacobian through W^T pi: named, not a linear-algebra error."""
    from _helpers import make_inputs
    inp = make_inputs(mode="hidden", dtype=torch.float32)
    inp["hidden"][:, 0] = inp["hidden"][:, 0].abs() + 0.1
    inp["weight"][3, 0] = -math.inf
    inp["targets"][inp["targets"] == 3] = 4
    with pytest.raises(rosa_ext.RosaNonFiniteError, match="Jacobian is not finite") as info:
        rosa_update(**inp, reward=-1.0, mode="hidden", solver=solver)
    assert info.value.argument == "weight"
