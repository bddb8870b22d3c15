"""Conjugate gradient on a vector split across processes (MATH.md section 7).

On a vocabulary-parallel head the LoRA parameter vector ``[a, b]`` is partly replicated (``a``,
d numbers, the same on every rank) and partly sharded (``b``, each rank its rows of the
vocabulary). CG's only global operations are its inner products; :func:`cg_sharded` runs the
recurrences of the compiled CPU solver (csrc/cg_cpu.cpp: same initialisation, the damping added
inside, the same stopping rule) and takes every inner product as one sum across processes of
weighted local partial products: weight 1 on the entries this process owns, 0 on copies of
entries another process counts. Every process therefore sees the same scalars, runs the same
number of iterations and issues the same collectives. Per iteration: the matvec, then two
all-reduces (2 float64 numbers for p.Ap and p.p, 1 for r.r).

The reduction is passed in (``all_sum``), so this module needs no ``torch.distributed``.
"""
from __future__ import annotations

import math
from typing import Callable, Optional

import torch

from ..common import validation as checks
from ..common.types import CGResult, Matvec
from .args import check_cg_args, rhs_scale

#: SUM across the processes of a float64 tensor (returns the result; may work in place).
AllSum = Callable[[torch.Tensor], torch.Tensor]


def cg_sharded(matvec: Matvec, b: torch.Tensor, *, all_sum: AllSum, weights: torch.Tensor,
               damping: float = 0.0, max_iter: int = 50, tol: float = 1e-6,
               x0: Optional[torch.Tensor] = None) -> CGResult:
    """Solve (A + damping I) x = b where x, b are split across processes.

    Args:
        matvec: v (n,) -> A v (n,), this process's part of A v given this process's part of v
            (it communicates as it needs; it is called the same number of times everywhere).
        b: (n,) float32/float64, this process's part of the right-hand side.
        all_sum: SUM across the processes of a float64 tensor.
        weights: (n,) float64, each entry's weight in the local partial inner product: 1 where
            this process counts the entry, 0 where another process counts it (a replicated
            entry is counted by exactly one process).
        damping, max_iter, tol, x0: as :func:`rosa_ext.cg.cg`.
    Returns:
        :class:`~rosa_ext.common.types.CGResult`: x (n,) this process's part; ``iterations``
        and ``residual`` (||r|| / ||b|| over all processes) the same on every process.
    Raises:
        FloatingPointError: NaN/Inf in b or from the operator (on every process alike).
    """
    check_cg_args(b, damping, max_iter, tol)
    if weights.shape != b.shape:
        checks.fail("cg_sharded", "weights", f"`weights` must have b's shape {tuple(b.shape)}, got {tuple(weights.shape)}")
    wts = weights.to(device=b.device, dtype=torch.float64)

    def dots(*pairs) -> torch.Tensor:
        part = torch.stack([(x.double() * y.double() * wts).sum() for x, y in pairs])
        return all_sum(part)

    b = b.detach()
    bb = float(dots((b, b))[0])
    if not math.isfinite(bb):  # a Python float (torch.tensor(bb) would round it to float32)
        raise FloatingPointError("cg: the right-hand side b contains NaN/Inf")
    # solve for x / scale against b / scale (scale a power of two ~ ||b||, the same on every process):
    # the vectors then carry the scale of A alone, not A times ||b|| (which over/underflows fp32)
    scale = rhs_scale(bb, b.dtype)
    b = b / scale
    bb = bb / (scale * scale)
    if x0 is not None:
        x = x0.detach() / scale
        r = b - (matvec(x) + damping * x)
    else:
        x = torch.zeros_like(b)
        r = b.clone()
    if bb == 0.0:
        return CGResult(torch.zeros_like(b), 0, 0.0)
    rr = float(dots((r, r))[0])
    stop = tol * tol * bb
    p = r.clone()
    it = 0
    while it < max_iter and rr > stop:
        ap = matvec(p)
        pap_pp = dots((p, ap), (p, p))
        pap = float(pap_pp[0]) + damping * float(pap_pp[1])
        if not math.isfinite(pap):
            raise FloatingPointError(f"cg: the operator returned NaN/Inf at iteration {it}")
        if pap <= 0.0:  # A + damping I not positive definite along p: stop
            break
        alpha = rr / pap
        x = x + alpha * p
        r = r - alpha * (ap + damping * p)
        rr_new = float(dots((r, r))[0])
        p = r + (rr_new / rr) * p
        rr = rr_new
        it += 1
    return CGResult(x * scale, it, float((rr / bb) ** 0.5))
