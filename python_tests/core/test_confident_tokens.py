"""Confident tokens: the target g = p* - p and the step stay accurate in fp32 when p is
within rounding of 1 (or of 0).

Before, ``g`` was ``sigmoid(logit p + r/beta) - exp(log p)``: both terms round to 1 in fp32 once
1 - p < ~3e-8, so the step was zero (``rosa_update([[25, 0]], eye(2), [0], -1, mode="hidden")``
returned zeros where float64 gives a step of norm 0.93). Now g is evaluated without subtracting
them (rosa_ext/plans/target.py, MATH.md section 1). The float64 side of these tests uses another
closed form, ``g = p q expm1(d) / (1 + p expm1(d))`` (q = 1 - p, d = r / beta), with its denominator
taken as ``q + p e^d`` when p > 1/2 so that it has no cancellation either.

The logits of the step tests are exact whatever the GEMM's accumulation order (W is the identity,
each h_t has one non-zero entry), so the outcome does not depend on the CPU.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

from rosa_ext import rosa_update
from rosa_ext.common.jacobian import residual_target
from rosa_ext.reference import rosa_update_reference

SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow])


def g_float64(logp: float, r: float, beta: float) -> float:
    """g = p* - p in float64 from log p, by the closed form of the module docstring."""
    p, q, d = math.exp(logp), -math.expm1(logp), r / beta
    den = q + p * math.exp(d) if p > 0.5 else 1.0 + p * math.expm1(d)
    return p * q * math.expm1(d) / den


rewards = st.one_of(st.floats(-3.0, -0.05), st.floats(0.05, 3.0))
betas = st.floats(0.1, 3.0)


@settings(max_examples=200, **SETTINGS)
@given(e=st.floats(-12.0, -2.0), near_one=st.booleans(), r=rewards, beta=betas)
def test_target_fp32_matches_float64_for_p_near_one_and_near_zero(e, near_one, r, beta):
    """1 - p (or p) in [1e-12, 1e-2]: the fp32 target from an fp32 log p is within 1e-4 (relative) of
    the float64 target of the same log p."""
    x = 10.0 ** e
    logp32 = torch.tensor([math.log1p(-x) if near_one else math.log(x)], dtype=torch.float32)
    g = residual_target(logp32, torch.tensor([r], dtype=torch.float32), beta)
    assert g.dtype == torch.float32
    want = g_float64(float(logp32.double()), r, beta)
    assert want != 0.0
    assert abs(float(g) - want) <= 1e-4 * abs(want), (float(g), want)


def test_target_edge_values():
    """p = 1 and p = 0 exactly give g = 0 (p* is then 1 or 0 too); r = 0 gives exactly 0; no NaN."""
    logp = torch.tensor([0.0, -math.inf, -1e-30, -0.5, -200.0])
    for r in (1.0, -1.0, 0.0):
        g = residual_target(logp, torch.full_like(logp, r), 1.0)
        assert torch.isfinite(g).all()
        assert g[0] == 0 and g[1] == 0
        if r == 0.0:
            assert (g == 0).all()
    g = residual_target(torch.tensor([-1e-30]), torch.tensor([-1.0]), 1.0)  # 1 - p = 1e-30 (p rounds to 1)
    assert float(g) == pytest.approx(1e-30 * (1.0 - math.e), rel=1e-5)  # = q - q*, q* = q e (to first order in q)


def _confident(q: float, V: int, mode: str, dtype: torch.dtype):
    """Two tokens whose 1 - p equals q (first) and ~q^0.9 (second), logits exact in any dtype."""
    z = -math.log(q / ((1.0 - q) * (V - 1)))  # (V - 1) e^-z / (1 + (V - 1) e^-z) = q
    W = torch.eye(V, dtype=torch.float64)
    h = torch.zeros(2, V, dtype=torch.float64)
    h[0, 0], h[1, 1] = z, 0.9 * z
    kw = dict(hidden=h.to(dtype), weight=W.to(dtype), targets=torch.tensor([0, 1]), mode=mode)
    if mode == "lora":
        kw["lora_a"] = (torch.ones(V, dtype=torch.float64) / math.sqrt(V)).to(dtype)
    return kw


@settings(max_examples=30, **SETTINGS)
@given(e=st.floats(-12.0, -2.0), V=st.sampled_from([2, 3, 5]), r=st.sampled_from([-1.0, 1.0, -0.3]),
       mode_solver=st.sampled_from([("hidden", "dual"), ("lora", "dual"), ("hidden", "cg")]))
def test_confident_step_fp32_matches_float64(e, V, r, mode_solver):
    """The fp32 step on confident tokens is within 1e-3 of the float64 reference: the dual (both
    modes, the one-pass log p) and hidden-mode CG (the hidden pass's log p)."""
    mode, solver = mode_solver  # LoRA-mode CG: test_confident_lora_cg_step
    q = 10.0 ** e
    ref = rosa_update_reference(reward=r, **_confident(q, V, mode, torch.float64)).update
    extra = dict(max_iter=100, tol=1e-10) if solver == "cg" else {}
    got = rosa_update(reward=r, solver=solver, **_confident(q, V, mode, torch.float32), **extra).update
    assert float(ref.norm()) > 0
    assert float((got.double() - ref).norm() / ref.norm()) <= 1e-3


@pytest.mark.parametrize("e", [-11.0, -7.0])
def test_confident_lora_cg_step(e):
    q = 10.0 ** e
    ref = rosa_update_reference(reward=-1.0, **_confident(q, 3, "lora", torch.float64)).update
    got = rosa_update(reward=-1.0, solver="cg", max_iter=100, tol=1e-10, **_confident(q, 3, "lora", torch.float32)).update
    assert float((got.double() - ref).norm() / ref.norm()) <= 1e-3


def test_reported_case_hidden_step_is_not_zero():
    """The reported case: p = 1 - 1.4e-11 in fp32; float64 gives a step of norm 0.93."""
    args = (torch.tensor([[25.0, 0.0]]), torch.eye(2), torch.tensor([0]), -1.0)
    ref = rosa_update_reference(*(a.double() if torch.is_tensor(a) and a.is_floating_point() else a for a in args),
                                mode="hidden").update
    assert float(ref.norm()) == pytest.approx(0.93, abs=0.01)
    for solver in ("dual", "cg"):
        got = rosa_update(*args, mode="hidden", solver=solver).update
        assert float((got.double() - ref).norm() / ref.norm()) <= 1e-3, solver
