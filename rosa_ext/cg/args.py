"""Argument checks shared by every CG implementation (Python loop, compiled), and the scaling and
errors of its loops. The checks every layer shares (scalars, finiteness) are in
:mod:`rosa_ext.common.validation` (README, "Errors").
"""
from __future__ import annotations

import math
from typing import Any, Optional, Tuple

import torch

from ..common.validation import RosaNumericalError, RosaTypeError, _show, fail, finite, integer, real


def check_cg_args(b: Any, damping: Any, max_iter: Any, tol: Any, x0: Any = None, *,
                  values: bool = True, matvec: Any = None) -> Tuple[float, int, float]:
    """Check matvec (callable), b (1-D float32/float64), damping (>= 0), max_iter (int >= 0),
    tol (>= 0), x0 (like b) -> (damping, max_iter, tol). With ``values`` also that b and x0 are
    finite (one sync)."""
    return cg_args("cg", b, damping, max_iter, tol, x0, values=values, matvec=matvec)


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
    return matvec_output("cg", matvec(v), v)


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


def cg_args(who: str, b: Any, damping: Any, max_iter: Any, tol: Any, x0: Any = None, *,
            values: bool = True, matvec: Any = None) -> Tuple[float, int, float]:
    """Check the arguments of a CG solve -> (damping, max_iter, tol).

    matvec: callable (when given); b: 1-D float32/float64 tensor; x0: None or a tensor like b. With
    ``values`` also that b and x0 are finite (one sync; the compiled CUDA solver checks that on the
    device instead).
    """
    if matvec is not None and not callable(matvec):
        fail(who, "matvec", f"`matvec` must be a callable v -> A v, got {_show(matvec)}", RosaTypeError)
    if not isinstance(b, torch.Tensor) or b.dim() != 1:
        fail(who, "b", f"`b` must be a 1-D tensor, got {_show(b)}")
    if b.dtype not in (torch.float32, torch.float64):
        fail(who, "b", f"`b` must be float32 or float64, got {b.dtype}", RosaTypeError)
    damping = real(who, "damping", damping, minimum=0.0)
    max_iter = integer(who, "max_iter", max_iter, minimum=0)
    tol = real(who, "tol", tol, minimum=0.0)
    if x0 is not None:
        like(who, "x0", x0, b)
    if values:
        finite(who, "b", b)
        if x0 is not None:
            finite(who, "x0", x0)
    return damping, max_iter, tol


def matvec_output(who: str, out: Any, v: torch.Tensor) -> torch.Tensor:
    """What a CG operator returned for v: a tensor of v's shape, dtype and device (no sync)."""
    if (not isinstance(out, torch.Tensor) or out.shape != v.shape or out.dtype != v.dtype
            or out.device != v.device):
        fail(who, "matvec", f"matvec must return a tensor of shape {tuple(v.shape)}, {v.dtype} on {v.device} "
                            f"(like its input); got {_show(out)}")
    return out


def like(who: str, name: str, t: Any, b: torch.Tensor) -> None:
    """``t`` is a tensor of b's shape, dtype and device."""
    if not isinstance(t, torch.Tensor) or t.shape != b.shape or t.dtype != b.dtype or t.device != b.device:
        fail(who, name, f"`{name}` must match b: shape {tuple(b.shape)}, {b.dtype}, {b.device}; got {_show(t)}")
