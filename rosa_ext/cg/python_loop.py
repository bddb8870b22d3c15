"""Textbook conjugate gradient in torch: one host sync per iteration.

The portable solver, and the baseline the benchmarks compare the compiled one against.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..common.types import CGResult, Matvec
from .args import check_cg_args


def cg_python(matvec: Matvec, b: torch.Tensor, *, damping: float = 0.0, max_iter: int = 50,
              tol: float = 1e-6, x0: Optional[torch.Tensor] = None) -> CGResult:
    """Textbook CG in torch: one host sync per iteration (the convergence test).

    Args:
        matvec: v (n,) -> A v (n,), A symmetric positive semi-definite.
        b: (n,) float32/float64 right-hand side.
        damping: lambda >= 0 added to A's diagonal.
        max_iter: iteration cap (0 returns x0 or zeros).
        tol: stop once ||r|| <= tol * ||b||.
    Raises:
        FloatingPointError: the operator produced NaN/Inf.
    """
    check_cg_args(b, damping, max_iter, tol)
    x = torch.zeros_like(b) if x0 is None else x0.clone()
    r = b - (matvec(x) + damping * x) if x0 is not None else b.clone()
    bnorm = torch.linalg.vector_norm(b)
    if float(bnorm) == 0.0:
        return CGResult(torch.zeros_like(b), 0, 0.0)
    p = r.clone()
    rr = torch.dot(r, r)
    it = 0
    while it < max_iter and float(torch.sqrt(rr)) > tol * float(bnorm):
        ap = matvec(p) + damping * p
        pap = torch.dot(p, ap)
        if not torch.isfinite(pap):
            raise FloatingPointError(f"cg: the operator returned NaN/Inf at iteration {it}")
        if float(pap) <= 0:
            break
        alpha = rr / pap
        x = x + alpha * p
        r = r - alpha * ap
        rr_new = torch.dot(r, r)
        p = r + (rr_new / rr) * p
        rr = rr_new
        it += 1
    return CGResult(x, it, float(torch.sqrt(rr) / bnorm))
