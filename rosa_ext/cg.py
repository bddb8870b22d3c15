"""Conjugate gradient for (A + damping I) x = b with A given as a matvec.

Public entry point: :func:`cg`. It runs the compiled solver of
``rosa_ext._C`` (C++ on the CPU, CUDA kernels with device-side scalars on
the GPU) when the extension is built, else :func:`cg_python`, the plain
torch loop that is also the baseline of the benchmarks.
"""
from __future__ import annotations

import warnings
from dataclasses import dataclass
from typing import Callable, Optional, Union

import torch

Matvec = Callable[[torch.Tensor], torch.Tensor]

_warned_no_cuda = False


@dataclass
class CGResult:
    """Result of one solve.

    ``x`` has the shape and dtype of ``b``. ``iterations`` and ``residual``
    (the final ||b - (A + damping I) x|| / ||b||, 0 when b = 0) may be 0-dim
    tensors on the solve's device so that reading them is the caller's choice
    (it synchronises a CUDA stream); use int()/float() to read.
    """

    x: torch.Tensor
    iterations: Union[int, torch.Tensor]
    residual: Union[float, torch.Tensor]


def _check(b: torch.Tensor, damping: float, max_iter: int, tol: float) -> None:
    if not isinstance(b, torch.Tensor) or b.dim() != 1:
        raise ValueError(f"cg: `b` must be a 1-D tensor, got {getattr(b, 'shape', type(b))}")
    if b.dtype not in (torch.float32, torch.float64):
        raise TypeError(f"cg: `b` must be float32 or float64, got {b.dtype}")
    if not (damping >= 0 and damping < float("inf")):
        raise ValueError(f"cg: `damping` must be >= 0 and finite, got {damping}")
    if int(max_iter) != max_iter or max_iter < 0:
        raise ValueError(f"cg: `max_iter` must be an int >= 0, got {max_iter}")
    if not (tol >= 0):
        raise ValueError(f"cg: `tol` must be >= 0, got {tol}")


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
    _check(b, damping, max_iter, tol)
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


def cg(matvec: Matvec, b: torch.Tensor, *, damping: float = 0.0, max_iter: int = 50,
       tol: float = 1e-6, x0: Optional[torch.Tensor] = None) -> CGResult:
    """Solve (A + damping I) x = b; the compiled solver when available.

    Same arguments and result as :func:`cg_python` (on CUDA, with the compiled
    solver, ``iterations``/``residual`` are 0-dim device tensors and the only host
    sync is one NaN/Inf flag read after the loop). Falls back to :func:`cg_python`
    when ``rosa_ext._C`` is not built, or was built without CUDA and b is on a
    CUDA device (with a warning, once).
    """
    try:
        from ._cg_compiled import cg_compiled, _C
    except ImportError:
        return cg_python(matvec, b, damping=damping, max_iter=max_iter, tol=tol, x0=x0)
    if isinstance(b, torch.Tensor) and b.device.type == "cuda" and not _C.has_cuda():
        global _warned_no_cuda
        if not _warned_no_cuda:
            _warned_no_cuda = True
            warnings.warn("rosa_ext._C was built without CUDA (no nvcc at install time): CG on the GPU "
                          "runs the Python loop (one host sync per iteration). Reinstall with nvcc on "
                          "PATH for the compiled solver.", RuntimeWarning, stacklevel=2)
        return cg_python(matvec, b, damping=damping, max_iter=max_iter, tol=tol, x0=x0)
    return cg_compiled(matvec, b, damping=damping, max_iter=max_iter, tol=tol, x0=x0)
