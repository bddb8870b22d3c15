"""Argument checks shared by every CG implementation (Python loop, compiled).

The checks themselves live with every other public entry point's in
:mod:`rosa_ext.common.validation` (README, "Errors").
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch

from ..common import validation as checks
from ..common.validation import RosaNumericalError


def check_cg_args(b: Any, damping: Any, max_iter: Any, tol: Any, x0: Any = None, *,
                  values: bool = True, matvec: Any = None) -> Tuple[float, int, float]:
    """Check matvec (callable), b (1-D float32/float64), damping (>= 0), max_iter (int >= 0),
    tol (>= 0), x0 (like b) -> (damping, max_iter, tol). With ``values`` also that b and x0 are
    finite (one sync)."""
    return checks.cg_args("cg", b, damping, max_iter, tol, x0, values=values, matvec=matvec)


def rhs_scale(bb: float, dtype: torch.dtype = torch.float64) -> float:
    """A power of two at most ``sqrt(bb)`` = ||b|| and above half of it, kept within the normal range
    of ``dtype`` (1.0 when b = 0 or bb is not finite).

    Every CG loop solves ``(A + damping I) x' = b / s`` and returns ``x = s x'``: the same solve,
    but the vectors it stores (r, p and above all ``A p``, about ||A|| ||b||) no longer carry b's
    scale, which in fp32 underflows (||b|| ~ 1e-15 makes ``A p`` ~ 1e-45 for a Jacobian of size
    1e-15) or overflows (||b|| ~ 1e18) although the system itself is well posed. A power of two
    scales exactly: away from under/overflow the iterates are bitwise those of the unscaled loop.
    """
    if not (bb > 0.0) or not math.isfinite(bb):
        return 1.0
    fi = torch.finfo(dtype)
    e = math.frexp(math.sqrt(bb))[1] - 1
    return math.ldexp(1.0, min(max(e, math.frexp(fi.tiny)[1] - 1), math.frexp(fi.max)[1] - 1))


def rhs_scale_tensor(b: torch.Tensor) -> torch.Tensor:
    """:func:`rhs_scale` on the device, from ``m = max |b|`` (no host sync): a 0-dim tensor of b's
    dtype, the power of two in (m / 2, m] (1 when b = 0 or holds NaN/Inf). Taken as ``m / (2 mantissa(m))``
    (mantissa in [0.5, 1)), which is exact and never exceeds m, so it neither overflows nor underflows."""
    m = b.detach().abs().amax() if b.numel() else torch.zeros((), dtype=b.dtype, device=b.device)
    ok = torch.isfinite(m) & (m > 0)
    m = torch.where(ok, m, torch.ones_like(m))
    mant, _ = torch.frexp(m)
    return m / (2.0 * mant)


def checked_matvec(matvec: Any, v: Any):
    """matvec(v), checked to be a tensor like v (no sync)."""
    return checks.matvec_output("cg", matvec(v), v)


def breakdown(iteration: int, pap: Optional[float] = None) -> RosaNumericalError:
    """The error of a CG step along which A + damping I is not positive definite."""
    value = "" if pap is None else f" = {pap:.3g}"
    return RosaNumericalError(
        f"cg: breakdown at iteration {iteration}: p^T (A + damping I) p{value} <= 0, so A + damping I is "
        "not positive definite along the search direction (A must be symmetric positive semi-definite, "
        "with damping > 0 if A is singular)", "matvec")


def non_finite(where: str) -> RosaNumericalError:
    """The error of a CG solve that met NaN/Inf."""
    return RosaNumericalError(f"cg: the operator produced NaN/Inf ({where})", "matvec")
