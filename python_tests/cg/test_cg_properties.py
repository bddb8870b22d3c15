"""Property-based tests of rosa_ext.cg (hypothesis; README "Errors").

For every implementation (``cg``, ``cg_python``, ``cg_compiled``): random SPD systems are solved to
the dense float64 answer; random invalid arguments raise a rosa_ext error naming the argument, and
touch neither b nor x0; NaN/Inf met during the solve and a non-positive-definite operator raise
(never a silent x0, zeros or NaN).
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rosa_ext import RosaError, RosaNonFiniteError, RosaNumericalError
from rosa_ext.cg import cg, cg_python
from rosa_ext.cg.compiled import STATE_BAD, STATE_BB, STATE_ITERS, STATE_RR, cg_compiled, finish_cuda

SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow])
IMPLS = [cg, cg_python, cg_compiled]
NAN = float("nan")


def _spd(n: int, seed: int, cond: float) -> torch.Tensor:
    g = torch.Generator().manual_seed(seed)
    Q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    eig = torch.logspace(0, -math.log10(cond), n, dtype=torch.float64)
    return (Q * eig) @ Q.T


@settings(max_examples=40, **SETTINGS)
@given(n=st.integers(1, 12), seed=st.integers(0, 10 ** 6), cond=st.floats(1.0, 1e4),
       damping=st.sampled_from([0.0, 1e-3, 0.1, 3.0]), impl=st.sampled_from(IMPLS), use_x0=st.booleans())
def test_random_spd_systems_match_dense(n, seed, cond, damping, impl, use_x0):
    A = _spd(n, seed, cond)
    g = torch.Generator().manual_seed(seed + 1)
    b = torch.randn(n, generator=g, dtype=torch.float64)
    x0 = torch.randn(n, generator=g, dtype=torch.float64) if use_x0 else None
    snap = (b.clone(), None if x0 is None else x0.clone())
    res = impl(lambda v: A @ v, b, damping=damping, max_iter=10 * n + 50, tol=1e-13, x0=x0)
    want = torch.linalg.solve(A + damping * torch.eye(n, dtype=torch.float64), b)
    torch.testing.assert_close(res.x, want, rtol=1e-8, atol=1e-8 * want.abs().max().item())
    assert float(res.residual) <= 1e-12
    assert torch.equal(b, snap[0]) and (x0 is None or torch.equal(x0, snap[1]))


def _bad(n: int):
    b = torch.randn(n, dtype=torch.float64)
    return [
        ("b", b.reshape(n, 1)), ("b", b.half()), ("b", b.long()), ("b", "b"), ("b", None),
        ("b", b.clone().fill_(NAN)), ("b", b.clone().fill_(math.inf)),
        ("damping", -1.0), ("damping", NAN), ("damping", math.inf), ("damping", None), ("damping", "0.1"),
        ("damping", True), ("max_iter", -1), ("max_iter", 2.5), ("max_iter", None), ("max_iter", "9"),
        ("tol", -1e-3), ("tol", NAN), ("tol", None), ("tol", "x"),
        ("x0", torch.zeros(n + 1, dtype=torch.float64)), ("x0", torch.zeros(n, dtype=torch.float32)),
        ("x0", torch.full((n,), NAN, dtype=torch.float64)), ("x0", torch.full((n,), -math.inf, dtype=torch.float64)),
        ("x0", "x0"),
    ]


@settings(max_examples=80, **SETTINGS)
@given(n=st.integers(1, 8), pick=st.integers(0, 10 ** 6), impl=st.sampled_from(IMPLS))
def test_random_invalid_arguments_raise_a_named_error(n, pick, impl):
    bad = _bad(n)
    name, value = bad[pick % len(bad)]
    kw = dict(b=torch.randn(n, dtype=torch.float64), damping=0.1, max_iter=20, tol=1e-10, x0=None)
    kw[name] = value
    snap = {k: v.clone() for k, v in kw.items() if isinstance(v, torch.Tensor)}
    calls = []
    with pytest.raises(RosaError) as info:
        impl(lambda v: calls.append(1) or v, kw.pop("b"), **kw)
    assert info.value.argument == name, str(info.value)
    assert f"`{name}`" in str(info.value)
    assert not calls, "the operator must not run on invalid arguments"
    kw_after = dict(kw, b=value if name == "b" else None)
    for k, v in snap.items():
        if kw_after.get(k) is not None:
            torch.testing.assert_close(kw_after[k], v, rtol=0, atol=0, equal_nan=True)


@pytest.mark.parametrize("impl", IMPLS, ids=lambda f: f.__name__)
def test_non_finite_during_the_solve_and_breakdown_raise(impl):
    b = torch.randn(6, dtype=torch.float64)
    x0 = torch.ones(6, dtype=torch.float64)
    calls = [0]

    def nan_first(v):
        calls[0] += 1
        return v * NAN if calls[0] == 1 else v

    with pytest.raises(RosaNumericalError, match="NaN/Inf"):  # A x0 is NaN: no silent x0
        impl(nan_first, b, x0=x0, max_iter=5)
    calls[0] = 0
    with pytest.raises(RosaNumericalError, match="NaN/Inf"):
        impl(nan_first, b, max_iter=5)
    with pytest.raises(RosaNonFiniteError, match="NaN/Inf"):  # no silent zeros
        impl(lambda v: v, b.clone().fill_(NAN))
    with pytest.raises(RosaNumericalError, match="breakdown"):  # not positive definite
        impl(lambda v: -v, b, max_iter=5)
    D = torch.tensor([1.0, -1.0, 2.0, 3.0, 1.0, 1.0], dtype=torch.float64)  # indefinite
    with pytest.raises(RosaNumericalError, match="breakdown"):
        impl(lambda v: D * v, b, max_iter=50, tol=1e-12)
    assert torch.equal(x0, torch.ones(6, dtype=torch.float64))


def test_cuda_breakdown_is_read_from_the_device_state():
    """finish_cuda's check on a (CPU-held) state vector: the logic that reads the CUDA solve."""
    x = torch.zeros(3, dtype=torch.float64)

    def state(bad, iters, rr, bb):
        s = torch.zeros(8, dtype=torch.float64)
        s[STATE_BAD], s[STATE_ITERS], s[STATE_RR], s[STATE_BB] = bad, iters, rr, bb
        return s

    assert int(finish_cuda(x, state(0, 3, 1e-30, 1.0), max_iter=10, tol=1e-10).iterations) == 3  # converged
    assert int(finish_cuda(x, state(0, 10, 1.0, 1.0), max_iter=10, tol=1e-10).iterations) == 10  # ran out
    assert float(finish_cuda(x, state(0, 0, 4.0, 0.0), max_iter=10, tol=1e-10).residual) == 0.0  # b = 0
    with pytest.raises(RosaNumericalError, match="breakdown"):  # stopped early, not converged
        finish_cuda(x, state(0, 2, 1.0, 1.0), max_iter=10, tol=1e-10)
    with pytest.raises(RosaNumericalError, match="NaN/Inf"):
        finish_cuda(x, state(1, 2, 1.0, 1.0), max_iter=10, tol=1e-10)
    finish_cuda(x, state(1, 2, 1.0, 1.0), check_finite=False)  # nothing read


def test_requires_grad_b_gives_no_graph():
    A = _spd(5, 0, 10.0).requires_grad_(True)
    b = torch.randn(5, dtype=torch.float64, requires_grad=True)
    for impl in IMPLS:
        res = impl(lambda v: A @ v, b, damping=0.1, max_iter=30)
        assert not res.x.requires_grad


@pytest.mark.parametrize("impl", IMPLS, ids=lambda f: f.__name__)
def test_operator_and_scalar_forms(impl):
    b = torch.randn(4, dtype=torch.float64)
    with pytest.raises(RosaError, match="callable") as info:
        impl(3, b)
    assert info.value.argument == "matvec"
    with pytest.raises(RosaError, match="matvec must return") as info:
        impl(lambda v: v[:-1], b)
    assert info.value.argument == "matvec"
    with pytest.raises(RosaError, match="max_iter"):
        impl(lambda v: v, b, max_iter=10 ** 30)
    # one-element tensors are read as numbers
    res = impl(lambda v: v, b, damping=torch.tensor(1.0), max_iter=torch.tensor(5), tol=torch.tensor(0.0))
    torch.testing.assert_close(res.x, b / 2)
