"""Argument checks shared by every CG implementation (Python loop, compiled).

The checks themselves live with every other public entry point's in
:mod:`rosa_ext.common.validation` (README, "Errors").
"""
from __future__ import annotations

from typing import Any, Optional, Tuple

from ..common import validation as V
from ..common.validation import RosaNumericalError


def check_cg_args(b: Any, damping: Any, max_iter: Any, tol: Any, x0: Any = None, *,
                  values: bool = True, matvec: Any = None) -> Tuple[float, int, float]:
    """Check matvec (callable), b (1-D float32/float64), damping (>= 0), max_iter (int >= 0),
    tol (>= 0), x0 (like b) -> (damping, max_iter, tol). With ``values`` also that b and x0 are
    finite (one sync)."""
    return V.cg_args("cg", b, damping, max_iter, tol, x0, values=values, matvec=matvec)


def checked_matvec(matvec: Any, v: Any):
    """matvec(v), checked to be a tensor like v (no sync)."""
    return V.matvec_output("cg", matvec(v), v)


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
