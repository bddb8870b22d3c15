"""Python side of the compiled CG (``rosa_ext._C``): buffers, dtype/device checks.

The extension takes raw pointers, so this module owns the work vectors
(x, r, p, Ap as torch tensors) and hands their addresses over:

- CPU: one C++ call runs the whole loop and calls back into Python for each
  matvec (``Ap <- A p``).
- CUDA: the host loop only *launches* work on the current stream: the torch
  matvec, then ``_C.cg_cuda_step``. alpha, beta, the iteration count and the
  convergence flag live in a float64 state vector on the device; once the
  residual is under ``tol`` the flag freezes x, r and p, so the host never reads
  a value inside the loop and the ``max_iter`` launches can be captured in a CUDA
  graph. The matvecs after convergence still run (their cost is the price of
  no host sync; pass a tighter ``max_iter`` if that matters).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import _C
from .cg import CGResult, Matvec, _check


def _check_tensor(name: str, t: torch.Tensor, b: torch.Tensor) -> None:
    if t.shape != b.shape or t.dtype != b.dtype or t.device != b.device:
        raise ValueError(f"cg: `{name}` must match b: shape {tuple(b.shape)}, {b.dtype}, {b.device}; got "
                         f"{tuple(t.shape)}, {t.dtype}, {t.device}")


def cg_compiled(matvec: Matvec, b: torch.Tensor, *, damping: float = 0.0, max_iter: int = 50,
                tol: float = 1e-6, x0: Optional[torch.Tensor] = None) -> CGResult:
    """Solve (A + damping I) x = b with the compiled solver of ``rosa_ext._C``.

    Args:
        matvec: v (n,) -> A v (n,) (same dtype/device), A symmetric positive semi-definite.
        b: (n,) float32 or float64 right-hand side, on the CPU or a CUDA device.
        damping: lambda >= 0 added to A's diagonal.
        max_iter: iteration cap (fixed number of launches on CUDA).
        tol: stop once ||r|| <= tol * ||b||.
        x0: optional (n,) initial guess.
    Returns:
        :class:`~rosa_ext.cg.CGResult`. On CUDA ``iterations`` and ``residual`` are 0-dim
        device tensors (reading them synchronises once); on the CPU plain numbers.
    Raises:
        FloatingPointError: the operator (or b) produced NaN/Inf. On CUDA this is
            detected on the device and raised when the result is finalised
            (``check_finite=True`` reads one flag at the end; see :func:`finish_cuda`).
        ValueError / TypeError: bad shapes, dtypes, devices; a matvec returning a wrong shape.
    """
    _check(b, damping, max_iter, tol)
    if x0 is not None:
        _check_tensor("x0", x0, b)
    if b.device.type == "cuda":
        return _cg_cuda(matvec, b, damping, max_iter, tol, x0, check_finite=True)
    if b.device.type != "cpu":
        raise ValueError(f"cg: the compiled solver runs on cpu or cuda tensors, got {b.device}")
    return _cg_cpu(matvec, b, damping, max_iter, tol, x0)


def _dtype_name(b: torch.Tensor) -> str:
    return "float32" if b.dtype == torch.float32 else "float64"


def _apply_into(matvec: Matvec, p: torch.Tensor, ap: torch.Tensor) -> None:
    out = matvec(p)
    if not isinstance(out, torch.Tensor) or out.shape != p.shape:
        raise ValueError(f"cg: matvec must return a tensor of shape {tuple(p.shape)}, got "
                         f"{tuple(getattr(out, 'shape', ())) or type(out).__name__}")
    ap.copy_(out)


def _cg_cpu(matvec: Matvec, b: torch.Tensor, damping: float, max_iter: int, tol: float,
            x0: Optional[torch.Tensor]) -> CGResult:
    b = b.contiguous()
    x = torch.zeros_like(b) if x0 is None else x0.detach().clone().contiguous()
    r, p, ap = torch.empty_like(b), torch.empty_like(b), torch.empty_like(b)
    with torch.no_grad():
        iters, residual, _ = _C.cg_cpu(lambda: _apply_into(matvec, p, ap), b.data_ptr(), x.data_ptr(),
                                       r.data_ptr(), p.data_ptr(), ap.data_ptr(), b.numel(), _dtype_name(b),
                                       float(damping), int(max_iter), float(tol), x0 is not None)
    return CGResult(x, int(iters), float(residual))


def _cg_cuda(matvec: Matvec, b: torch.Tensor, damping: float, max_iter: int, tol: float,
             x0: Optional[torch.Tensor], *, check_finite: bool) -> CGResult:
    if not _C.has_cuda():
        raise RuntimeError("cg: rosa_ext._C was built without CUDA (nvcc not found at build time); "
                           "reinstall on a machine with nvcc, or use rosa_ext.cg.cg_python")
    x, state = cg_cuda_launch(matvec, b, damping=damping, max_iter=max_iter, tol=tol, x0=x0)
    return finish_cuda(x, b, state, check_finite=check_finite)


def cg_cuda_launch(matvec: Matvec, b: torch.Tensor, *, damping: float, max_iter: int, tol: float,
                   x0: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
                   state: Optional[torch.Tensor] = None):
    """Launch the whole CUDA solve on the current stream; no host sync, graph-capturable.

    Returns ``(x, state)``: x (n,) and the float64 device state (see csrc/cg_cuda.h:
    state[5] iterations, state[0] r.r, state[1] b.b, state[6] NaN flag). Pass
    preallocated ``out``/``state`` to capture it in a CUDA graph with static buffers.
    """
    stream = torch.cuda.current_stream(b.device).cuda_stream
    n, dt = b.numel(), _dtype_name(b)
    b = b.contiguous()
    x = out if out is not None else torch.empty_like(b)
    if x0 is not None:
        x.copy_(x0)
    r, p, ap = torch.empty_like(b), torch.empty_like(b), torch.empty_like(b)
    if state is None:
        state = torch.empty(_C.CG_STATE_SIZE, dtype=torch.float64, device=b.device)
    with torch.no_grad():
        if x0 is not None:
            _apply_into(matvec, x, ap)  # ap = A x0
        _C.cg_cuda_init(b.data_ptr(), x.data_ptr(), r.data_ptr(), p.data_ptr(), ap.data_ptr(), state.data_ptr(),
                        n, dt, float(damping), float(tol), x0 is not None, stream)
        for _ in range(int(max_iter)):
            _apply_into(matvec, p, ap)
            _C.cg_cuda_step(x.data_ptr(), r.data_ptr(), p.data_ptr(), ap.data_ptr(), state.data_ptr(), n, dt,
                            float(damping), stream)
        # b = 0: the solution is 0 whatever x0 was (device-side select, no sync)
        x.copy_(torch.where(state[1] > 0, x, torch.zeros_like(x)))
    return x, state


def finish_cuda(x: torch.Tensor, b: torch.Tensor, state: torch.Tensor, *, check_finite: bool = True) -> CGResult:
    """Turn a launched solve into a :class:`CGResult`.

    ``iterations``/``residual`` stay 0-dim device tensors. With ``check_finite`` one
    flag is read (a single sync after the loop) and NaN/Inf raises FloatingPointError.
    """
    if check_finite and bool(state[6] != 0):
        raise FloatingPointError("cg: the operator or b produced NaN/Inf (detected on the device)")
    bb = state[1]
    residual = torch.where(bb > 0, torch.sqrt(state[0] / torch.where(bb > 0, bb, 1.0)), torch.zeros_like(bb))
    return CGResult(x, state[5].to(torch.int64), residual)
