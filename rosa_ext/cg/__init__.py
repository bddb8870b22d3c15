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

_warned: set = set()


def _warn_once(reason: str) -> None:
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"{reason}: CG on the GPU runs the Python loop (one host sync per iteration).",
                      RuntimeWarning, stacklevel=3)


def _compiled_unusable(b: torch.Tensor) -> Optional[str]:
    """Why the compiled solver cannot take ``b`` (a CUDA tensor while ``_C`` was built without CUDA
    or cannot run on that device: :func:`rosa_ext.cg.compiled.cuda_unusable_reason`), else None."""
    if not (isinstance(b, torch.Tensor) and b.device.type == "cuda"):
        return None
    from .compiled import cuda_unusable_reason
    return cuda_unusable_reason(b.device)


def cg(matvec: Matvec, b: torch.Tensor, *, damping: float = 0.0, max_iter: int = 50,
       tol: float = 1e-6, x0: Optional[torch.Tensor] = None) -> CGResult:
    """Solve (A + damping I) x = b; the compiled solver when available.

    Same arguments and result as :func:`cg_python` (on CUDA, with the compiled
    solver, ``iterations``/``residual`` are 0-dim device tensors and the only host
    sync is one NaN/Inf flag read after the loop). Falls back to :func:`cg_python`
    when ``rosa_ext._C`` is not built (with a warning, once, when b is on a CUDA device), and -- with a
    warning, once per reason -- when b is on a CUDA device that the compiled solver cannot serve: built
    without CUDA, or its CUDA runtime cannot run there (a driver older than the toolkit it was built with;
    checked once per device by a tiny probe solve, :func:`rosa_ext.cg.compiled.cuda_unusable_reason`).
    """
    try:
        from .compiled import cg_compiled
    except ImportError as e:  # rosa_ext._C not built (or not importable): the Python loop
        if isinstance(b, torch.Tensor) and b.device.type == "cuda":
            _warn_once(f"rosa_ext._C is not built or does not import ({e})")
        return cg_python(matvec, b, damping=damping, max_iter=max_iter, tol=tol, x0=x0)
    reason = _compiled_unusable(b)
    if reason is not None:
        _warn_once(reason)
        return cg_python(matvec, b, damping=damping, max_iter=max_iter, tol=tol, x0=x0)
    return cg_compiled(matvec, b, damping=damping, max_iter=max_iter, tol=tol, x0=x0)
