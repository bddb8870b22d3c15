"""Conjugate gradient for (A + damping I) x = b with A given as a matvec.

Public entry point: :func:`cg`. It runs the compiled solver of
``rosa_ext._C`` (C++ on the CPU, CUDA kernels with device-side scalars on
the GPU; :mod:`rosa_ext.cg.compiled`) when the extension is built, else
:func:`cg_python` (:mod:`rosa_ext.cg.python_loop`), the plain torch loop that is
also the baseline of the benchmarks. :func:`cg_sharded` (:mod:`rosa_ext.cg.sharded`) is the
same recurrence on a vector split across processes (a vocabulary-parallel head, MATH.md section 7).
"""
from __future__ import annotations

import warnings
from typing import Optional

import torch

from ..common.types import CGResult, Matvec
from .python_loop import cg_python
from .sharded import cg_sharded

__all__ = ["cg", "cg_python", "cg_sharded", "CGResult", "Matvec"]

_warned_no_cuda = False


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
        from .compiled import _C, cg_compiled
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
