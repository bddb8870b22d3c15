"""Textbook conjugate gradient in torch: one host sync per iteration.

The portable solver, and the baseline the benchmarks compare the compiled one against.
"""
from __future__ import annotations

import math
from typing import Optional

import torch

from ..common.types import CGResult, Matvec
from .args import breakdown, check_cg_args, checked_matvec, non_finite, rhs_scale_tensor


def cg_python(matvec: Matvec, b: torch.Tensor, *, damping: float = 0.0, max_iter: int = 50,
              tol: float = 1e-6, x0: Optional[torch.Tensor] = None) -> CGResult:
    """Textbook CG in torch: one host sync per iteration (the convergence test).

    Args:
        matvec: v (n,) -> A v (n,), A symmetric positive semi-definite.
        b: (n,) float32/float64 right-hand side.
        damping: lambda >= 0 added to A's diagonal.
        max_iter: iteration cap (0 returns x0 or zeros).
        tol: stop once ||r|| <= tol * ||b||.
        x0: optional (n,) initial guess, like b.
    Raises:
        RosaTypeError / RosaInputError: bad arguments (named), before any work.
        RosaNonFiniteError (a FloatingPointError): NaN/Inf in b or x0.
        RosaNumericalError (a FloatingPointError): the operator produced NaN/Inf, or A + damping I
            is not positive definite along a search direction (breakdown).
    The result carries no autograd graph.
    """
    damping, max_iter, tol = check_cg_args(b, damping, max_iter, tol, x0, matvec=matvec)
    with torch.no_grad():
        b = b.detach()
        bb = float(torch.dot(b.double(), b.double()))  # float64: no over/underflow of ||b||^2
        if bb == 0.0:
            return CGResult(torch.zeros_like(b), 0, 0.0)
        # solve for x / scale against b / scale (a power of two ~ max |b|): the vectors below then have
        # the scale of A alone, not of A times ||b|| (which over/underflows fp32; args.rhs_scale)
        scale = rhs_scale_tensor(b)
        b = b / scale
        x = torch.zeros_like(b) if x0 is None else x0.detach() / scale
        bnorm = torch.linalg.vector_norm(b)
        r = b - (checked_matvec(matvec, x) + damping * x) if x0 is not None else b.clone()
        p = r.clone()
        rr = torch.dot(r, r)
        stop = tol * float(bnorm)
        it = 0
        while True:
            rr_f = float(rr)  # the convergence test's sync; NaN/Inf here means the operator produced it
            if not math.isfinite(rr_f):
                raise non_finite("in the initial residual b - A x0" if it == 0 else f"at iteration {it}")
            if it >= max_iter or math.sqrt(rr_f) <= stop:
                break
            ap = checked_matvec(matvec, p) + damping * p
            pap = float(torch.dot(p, ap))
            if not math.isfinite(pap):
                raise non_finite(f"at iteration {it}")
            if pap <= 0:
                raise breakdown(it, pap)
            alpha = rr / pap
            x = x + alpha * p
            r = r - alpha * ap
            rr_new = torch.dot(r, r)
            p = r + (rr_new / rr) * p
            rr = rr_new
            it += 1
        return CGResult(x * scale, it, float(torch.sqrt(rr) / bnorm))
