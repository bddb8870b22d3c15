"""CG on systems of extreme but representable scale.

Every CG loop (Python, compiled C++ via rosa_ext._C, sharded) used to store A p, of size
||A|| ||b||: for a Jacobian of size eps (A ~ eps^2, b = J^T g ~ eps) that is eps^3, which leaves the
fp32 range at eps ~ 1e-15 (underflow: a "breakdown" p^T A p = 0) or eps ~ 1e13 (overflow: "the
operator produced NaN/Inf") although A x = b is well posed. The loops now solve against b / s, s a
power of two ~ ||b|| (rosa_ext/cg/args.py, rhs_scale): the vectors carry A's scale alone, and
since a power of two scales exactly, the iterates are bitwise those of the unscaled loop elsewhere.

The operators here are diagonal with power-of-two entries times the scale, so every product is
exact and the outcome cannot depend on the accumulation order.
"""
from __future__ import annotations

import math

import pytest
import torch

from rosa_ext import rosa_update
from rosa_ext.cg import cg, cg_python, cg_sharded
from rosa_ext.cg.args import rhs_scale, rhs_scale_tensor
from rosa_ext.cg.compiled import cg_compiled
from rosa_ext.reference import rosa_update_reference

DIAG = torch.tensor([1.0, 0.5, 0.25, 2.0, 4.0, 0.125])
RHS = torch.tensor([1.0, -2.0, 0.5, 3.0, -1.0, 0.25])


def _sharded(matvec, b, **kw):
    return cg_sharded(matvec, b, all_sum=lambda t: t, weights=torch.ones(b.shape[0], dtype=torch.float64), **kw)


SOLVERS = {"python": cg_python, "compiled": cg_compiled, "public": cg, "sharded": _sharded}


@pytest.mark.parametrize("solver", list(SOLVERS))
@pytest.mark.parametrize("eps", [1e-15, 1e-12, 1e-6, 1.0, 1e6, 1e13, 1e18])
def test_fp32_cg_solves_a_jacobian_of_any_representable_scale(solver, eps):
    """A = eps^2 D (D diagonal, 6 distinct eigenvalues: exact in 6 steps), b = eps c, damping = 0.01
    eps^2 (a relative ridge): x = c / (eps (D + 0.01)) to fp32 precision."""
    A = (DIAG.double() * eps * eps).float()
    b = (RHS.double() * eps).float()
    lam = 0.01 * eps * eps
    res = SOLVERS[solver](lambda v: A * v, b, damping=lam, max_iter=20, tol=1e-7)
    want = RHS.double() / (eps * (DIAG.double() + 0.01))
    assert torch.isfinite(res.x).all()
    assert float((res.x.double() - want).norm() / want.norm()) <= 1e-5
    assert float(res.residual) <= 1e-6


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_power_of_two_scaling_is_bitwise_invisible(solver):
    """Scaling b by a power of two scales x by the same power, bit for bit (and the iterates do not change)."""
    g = torch.Generator().manual_seed(3)
    M = torch.randn(8, 8, generator=g)
    A = M @ M.T / 8
    b = torch.randn(8, generator=g)
    base = SOLVERS[solver](lambda v: A @ v, b, damping=0.1, max_iter=5, tol=0.0)
    for k in (-40, 30):
        r = SOLVERS[solver](lambda v: A @ v, b * 2.0 ** k, damping=0.1, max_iter=5, tol=0.0)
        assert torch.equal(r.x, base.x * 2.0 ** k)
        assert int(r.iterations) == int(base.iterations) and float(r.residual) == float(base.residual)


def test_rhs_scale_helpers():
    assert rhs_scale(0.0) == 1.0 and rhs_scale(float("inf")) == 1.0 and rhs_scale(float("nan")) == 1.0
    for bb in (1e-80, 3.0, 4.0, 1e60):
        s = rhs_scale(bb)
        assert math.frexp(s)[0] == 0.5 and s <= math.sqrt(bb) < 2 * s
    # kept within the dtype's normal range (a python float divides an fp32 tensor as fp32)
    assert rhs_scale(1e-90, torch.float32) == torch.finfo(torch.float32).tiny
    assert rhs_scale(1e90, torch.float32) == 2.0 ** 127
    for dt, vals in ((torch.float32, (1e-45, 1e-40, 3.0, 4.0, 3e38)), (torch.float64, (1e-310, 3.0, 1.7e308))):
        for v in vals:
            b = torch.tensor([v, -v / 3], dtype=dt)
            t, m = rhs_scale_tensor(b), float(b[0])
            assert t.dtype == dt and math.frexp(float(t))[0] == 0.5 and float(t) <= m < 2 * float(t)
    assert float(rhs_scale_tensor(torch.zeros(3))) == 1.0 and float(rhs_scale_tensor(torch.zeros(0))) == 1.0
    assert float(rhs_scale_tensor(torch.tensor([1.0, float("nan")]))) == 1.0


@pytest.mark.parametrize("solver", list(SOLVERS))
def test_rhs_near_the_float32_limits(solver):
    """b with entries near fp32's largest and smallest magnitudes, A = I: x = b / (1 + damping)."""
    for v in (3e38, 1e-37):
        b = torch.tensor([v, -v / 2, v / 4])
        res = SOLVERS[solver](lambda u: u, b, damping=1.0, max_iter=5, tol=1e-7)
        assert torch.isfinite(res.x).all()
        torch.testing.assert_close(res.x.double(), b.double() / 2, rtol=1e-6, atol=0)


def _f64(kw):
    return {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}


def _inputs(seed=0, T=6, d=8, V=20):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, d, generator=g)
    W = torch.randn(V, d, generator=g) / 3
    y = torch.randint(0, V, (T,), generator=g)
    a = torch.randn(d, generator=g) / 3
    return h, W, y, a


@pytest.mark.parametrize("case", ["hidden_tiny", "hidden_huge", "lora_1e18", "lora_1e-12"])
def test_rosa_update_cg_on_tiny_or_huge_jacobians_matches_float64(case):
    """The reported cases: hidden / 1e-15 with weight x 1e-15 (and the reverse), lora_scale 1e18 and
    1e-12 with b = 0: CG (defaults: 16 iterations, tol 1e-5) agrees with float64 like the dual does."""
    h, W, y, a = _inputs()
    # power-of-two factors near 1e15: the logits h W^T are then bitwise those of (h, W)
    k = 2.0 ** 50
    kw = {"hidden_tiny": dict(hidden=h * k, weight=W / k, mode="hidden"),
          "hidden_huge": dict(hidden=h / k, weight=W * k, mode="hidden"),
          "lora_1e18": dict(hidden=h, weight=W, mode="lora", lora_a=a, lora_scale=1e18),
          "lora_1e-12": dict(hidden=h, weight=W, mode="lora", lora_a=a, lora_scale=1e-12)}[case]
    kw.update(targets=y, reward=-1.0)
    ref = rosa_update_reference(**_f64(kw)).update
    for solver in ("cg", "dual"):
        got = rosa_update(solver=solver, **kw).update
        assert float((got.double() - ref).norm() / ref.norm()) <= 1e-3, solver


def test_jacobian_overflow_message_names_lora_scale():
    """Given the problem's mode, the error of a non-finite Gram matrix with finite logits names the LoRA
    scale in LoRA mode (there J J^T is built from h, pi, a, b only, all finite: it can only overflow)."""
    from rosa_ext.common import validation as V
    with pytest.raises(V.RosaNonFiniteError, match="lora_scale`=1e\\+25.*overflow|overflows.*lora_scale") as ei:
        V.nonfinite_jacobian("rosa_update", mode="lora", lora_scale=1e25, dtype=torch.float32)
    assert ei.value.argument == "lora_scale" and "torch.float32" in str(ei.value)
    with pytest.raises(V.RosaNonFiniteError, match="softmax weighs by 0.*overflows") as ei:
        V.nonfinite_jacobian("rosa_update", mode="hidden")
    assert ei.value.argument == "weight"


@pytest.mark.parametrize("solver", ["dual", "cg"])
def test_rosa_update_lora_scale_1e25_is_solved(solver):
    """lora_scale = 1e25 with finite inputs: J J^T would overflow fp32 (the float64 step is finite); the
    plans rescale J by a power of two first (exact), so the fp32 step matches float64."""
    h, W, y, a = _inputs()
    ref = rosa_update_reference(h.double(), W.double(), y, -1.0, mode="lora", lora_a=a.double(), lora_scale=1e25)
    assert torch.isfinite(ref.update).all()
    got = rosa_update(h, W, y, -1.0, mode="lora", lora_a=a, lora_scale=1e25, solver=solver, max_iter=200, tol=1e-10)
    err = float((got.update.double() - ref.update).norm() / ref.update.norm())
    assert err < 1e-3, err
