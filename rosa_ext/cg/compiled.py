"""Python side of the compiled CG (``rosa_ext._C``): buffers, dtype/device checks.

The extension takes raw pointers, so this module owns the work vectors
(x, r, p, Ap as torch tensors) and hands their addresses over:

- CPU: one C++ call runs the whole loop (without the GIL) and calls back into
  Python for each matvec (``Ap <- A p``).
- CUDA: the host loop only *launches* work on the current stream: the torch
  matvec, then ``_C.cg_cuda_step`` (4 small kernels). alpha, beta, the iteration
  count and the convergence flag live in a float64 state vector on the device;
  once the residual is under ``tol`` the flag freezes x, r and p, so the host
  never reads a value inside the loop and the ``max_iter`` launches can be
  captured in a CUDA graph. The matvecs after convergence are still launched, but
  the loop publishes the state's ``STATE_ACTIVE`` entry as the run flag of
  :mod:`rosa_ext.common.device_flag` around them: the flag-aware Triton passes of
  :mod:`rosa_ext.kernels` launched by the matvec read it on the device and, once it
  is 0, store zeros instead of passing over W (their result is ignored by then). Other
  work in the matvec (torch ops) still runs.

State layout (float64, ``_C.CG_STATE_SIZE`` entries, csrc/cg_cuda.h): index
``STATE_RR`` r.r, ``STATE_BB`` b.b, ``STATE_ACTIVE`` 1.0 while iterating and 0.0 once
converged, broken down or non-finite (it never returns to 1 within a solve),
``STATE_ITERS`` iterations run, ``STATE_BAD`` 1.0 once NaN/Inf was seen.

Can it run? ``_C.has_cuda()`` says how the extension was *built*; the CUDA runtime it links (the
toolkit's at build time, e.g. 13.0) also needs a driver at least that recent. :func:`cuda_unusable_reason`
checks that it can actually run on a device -- one tiny solve, cached per device -- so that
:func:`rosa_ext.cg.cg` falls back to the Python loop (with a warning) instead of raising mid-update
on an older driver.
"""
from __future__ import annotations

import ctypes
import math
from typing import Dict, Optional, Tuple

import torch

from .. import _C
from ..common import device_flag
from ..common import validation as checks
from ..common.types import CGResult, Matvec
from ..common.validation import RosaNumericalError
from .args import breakdown, check_cg_args, like, matvec_output, non_finite, rhs_scale_tensor

#: Indices into the CUDA state vector (csrc/cg_cuda.h, enum CgState).
STATE_RR, STATE_BB, STATE_ACTIVE, STATE_ITERS, STATE_BAD = 0, 1, 4, 5, 6


#: device index -> None (the compiled CUDA CG runs there) or why it cannot (the probe's error)
_RUNNABLE: Dict[int, Optional[str]] = {}


def _driver_version() -> Optional[int]:
    """The CUDA driver's version (e.g. 12040 for 12.4) from libcuda, or None where it cannot be read."""
    try:
        lib = ctypes.CDLL("libcuda.so.1")
        v = ctypes.c_int(0)
        return int(v.value) if lib.cuDriverGetVersion(ctypes.byref(v)) == 0 else None
    except (OSError, AttributeError):
        return None


def _capturing() -> bool:
    try:
        return bool(torch.cuda.is_current_stream_capturing())
    except Exception:  # a torch without CUDA
        return False


def _probe(device_index: int) -> None:
    """Solve 2 x = 1 (n = 1, float64) with the compiled CUDA CG on ``device_index``; raises if it cannot
    run (e.g. "CUDA driver version is insufficient for CUDA runtime version") or returns a wrong x."""
    dev = torch.device("cuda", device_index)
    with torch.cuda.device(dev):
        b = torch.ones(1, dtype=torch.float64, device=dev)
        x, _ = cg_cuda_launch(lambda v: 2.0 * v, b, damping=0.0, max_iter=2, tol=0.0)
        got = float(x[0])  # synchronises
    if abs(got - 0.5) > 1e-12:
        raise RuntimeError(f"the probe solve of 2 x = 1 gave x = {got}")


def cuda_unusable_reason(device: torch.device) -> Optional[str]:
    """None when the compiled CUDA CG can run on ``device`` (a CUDA device), else why not: built
    without CUDA, or a tiny probe solve failed (typically a driver older than the CUDA runtime the
    extension was built with). The probe runs once per device (one sync) and is cached; during a
    CUDA-graph capture nothing is probed (None: the capture's warm-up call outside it probes)."""
    if not _C.has_cuda():
        return "rosa_ext._C was built without CUDA (nvcc not found at build time)"
    idx = device.index if device.index is not None else torch.cuda.current_device()
    if idx in _RUNNABLE:
        return _RUNNABLE[idx]
    if _capturing():
        return None
    try:
        _probe(idx)
        reason = None
    except Exception as e:  # the extension's CUDA runtime cannot run here
        drv = _driver_version()
        reason = (f"the compiled CUDA CG of rosa_ext._C cannot run on cuda:{idx} ({type(e).__name__}: {e}); "
                  f"CUDA driver {drv if drv is not None else 'unknown'}, torch's CUDA {torch.version.cuda}, "
                  f"built for {getattr(_C, 'cuda_architectures', '?')}: rebuild rosa_ext with a toolkit the driver "
                  f"supports")
    _RUNNABLE[idx] = reason
    return reason


def _check_like(name: str, t: torch.Tensor, b: torch.Tensor) -> None:
    like("cg", name, t, b)


def cg_compiled(matvec: Matvec, b: torch.Tensor, *, damping: float = 0.0, max_iter: int = 50,
                tol: float = 1e-6, x0: Optional[torch.Tensor] = None) -> CGResult:
    """Solve (A + damping I) x = b with the compiled solver of ``rosa_ext._C``.

    Args:
        matvec: v (n,) -> A v (n,), same dtype and device as v; A symmetric positive
            semi-definite. Called ``max_iter`` times on CUDA (plus once for ``x0``).
        b: (n,) float32 or float64 right-hand side, on the CPU or a CUDA device.
        damping: lambda >= 0 added to A's diagonal.
        max_iter: iteration cap (a fixed number of launches on CUDA).
        tol: stop once ||r|| <= tol * ||b|| (r the recursively updated residual).
        x0: optional (n,) initial guess, like b.
    Returns:
        :class:`~rosa_ext.common.types.CGResult` with x (n,) like b. On CUDA ``iterations``
        (int64) and ``residual`` (float64) are 0-dim device tensors; on the CPU
        plain numbers.
    Raises:
        RosaTypeError / RosaInputError (TypeError / ValueError): bad shapes, dtypes, devices,
            options (named; before any work); a matvec returning a wrong shape/dtype/device.
        RosaNonFiniteError (a FloatingPointError): NaN/Inf in b or x0 (on CUDA: detected on the
            device, raised after the loop).
        RosaNumericalError (a FloatingPointError): the operator produced NaN/Inf, or A + damping I
            is not positive definite along a search direction (breakdown). On CUDA this is
            detected on the device and checked with one read after the loop.
        RuntimeError: a CUDA tensor while ``_C`` was built without CUDA, or cannot run on the
            device (:func:`cuda_unusable_reason`; :func:`rosa_ext.cg.cg` falls back instead).
    The result carries no autograd graph.
    """
    cuda = isinstance(b, torch.Tensor) and b.device.type == "cuda"
    cpu = isinstance(b, torch.Tensor) and b.device.type == "cpu"
    # the values of b and x0 are checked here on the CPU, on the device on CUDA (no extra sync)
    damping, max_iter, tol = check_cg_args(b, damping, max_iter, tol, x0, values=cpu, matvec=matvec)
    if b.device.type not in ("cpu", "cuda"):
        checks.fail("cg", "b", f"the compiled solver runs on cpu or cuda tensors, got `b` on {b.device}")
    if cuda:
        if not _C.has_cuda():
            raise RuntimeError("cg: rosa_ext._C was built without CUDA (nvcc not found at build time); "
                               "reinstall on a machine with nvcc, or use rosa_ext.cg.cg_python")
        reason = cuda_unusable_reason(b.device)
        if reason is not None:
            raise RuntimeError(f"cg: {reason}; or use rosa_ext.cg.cg_python")
        x, state = cg_cuda_launch(matvec, b, damping=damping, max_iter=max_iter, tol=tol, x0=x0)
        return finish_cuda(x, state, check_finite=True, max_iter=max_iter, tol=tol)
    return _cg_cpu(matvec, b, damping, max_iter, tol, x0)


def _dtype_name(b: torch.Tensor) -> str:
    return "float32" if b.dtype == torch.float32 else "float64"


def _matvec_checked(matvec: Matvec, v: torch.Tensor) -> torch.Tensor:
    """matvec(v), checked to be a tensor of v's shape, dtype and device (no sync)."""
    return matvec_output("cg", matvec(v), v)


def _cg_cpu(matvec: Matvec, b: torch.Tensor, damping: float, max_iter: int, tol: float,
            x0: Optional[torch.Tensor]) -> CGResult:
    # the C++ loop solves for x / scale against b / scale (a power of two ~ max |b|), so that its fp32
    # vectors (A p above all) carry the scale of A alone, not of A times ||b|| (args.rhs_scale)
    scale = rhs_scale_tensor(b)
    b = (b.detach() / scale).contiguous()
    x = torch.zeros_like(b) if x0 is None else (x0.detach() / scale).contiguous()
    r, p, ap = torch.empty_like(b), torch.empty_like(b), torch.empty_like(b)

    def apply() -> None:  # called by C++ with the GIL held: ap <- A p
        ap.copy_(_matvec_checked(matvec, p))

    with torch.no_grad():
        try:
            iters, residual, broke = _C.cg_cpu(apply, b.data_ptr(), x.data_ptr(), r.data_ptr(), p.data_ptr(),
                                               ap.data_ptr(), b.numel(), _dtype_name(b), float(damping),
                                               int(max_iter), float(tol), x0 is not None)
        except _C.NonFiniteError as e:  # b was checked above: the operator produced it
            raise RosaNumericalError(str(e), "matvec") from None
    if not math.isfinite(residual):  # e.g. A x0 gave NaN: the loop never ran
        raise non_finite("in the initial residual b - A x0" if iters == 0 else f"at iteration {iters}")
    if broke:
        raise breakdown(int(iters), float(torch.dot(p.double(), ap.double()) + damping * torch.dot(p.double(), p.double())))
    return CGResult(x.mul_(scale), int(iters), float(residual))


def cg_cuda_launch(matvec: Matvec, b: torch.Tensor, *, damping: float, max_iter: int, tol: float,
                   x0: Optional[torch.Tensor] = None, out: Optional[torch.Tensor] = None,
                   state: Optional[torch.Tensor] = None) -> Tuple[torch.Tensor, torch.Tensor]:
    """Launch the whole CUDA solve on the current stream; no host sync, graph-capturable.

    Args:
        matvec, b, damping, max_iter, tol, x0: as :func:`cg_compiled` (b on a CUDA device).
        out: optional (n,) buffer like b that receives x (a static buffer for graph capture).
        state: optional float64 (``_C.CG_STATE_SIZE``,) buffer on b's device.
    Returns:
        ``(x, state)``: x (n,) and the float64 device state (module docstring). damping,
        tol and max_iter are baked into a captured graph; b, x0 and A's data are read
        at replay.
    """
    damping, max_iter, tol = check_cg_args(b, damping, max_iter, tol, x0, values=False, matvec=matvec)  # no sync
    if b.device.type != "cuda":
        checks.fail("cg_cuda_launch", "b", f"`b` must be a CUDA tensor, got {b.device}")
    if out is not None:
        _check_like("out", out, b)
        if not out.is_contiguous():
            checks.fail("cg_cuda_launch", "out", "`out` must be contiguous")
    n_state = _C.CG_STATE_SIZE
    if state is not None and (state.shape != (n_state,) or state.dtype != torch.float64
                              or state.device != b.device or not state.is_contiguous()):
        checks.fail("cg_cuda_launch", "state", f"`state` must be a contiguous float64 ({n_state},) tensor on "
                                          f"{b.device}; got {tuple(state.shape)}, {state.dtype}, {state.device}")
    dev = b.device.index if b.device.index is not None else torch.cuda.current_device()
    stream = torch.cuda.current_stream(dev).cuda_stream
    n, dt, damping = b.numel(), _dtype_name(b), float(damping)
    with torch.no_grad(), torch.cuda.device(dev):
        # solve for x / scale against b / scale, scale a power of two ~ max |b| computed on the device
        # (no sync): the vectors then carry the scale of A alone, not A times ||b|| (args.rhs_scale)
        scale = rhs_scale_tensor(b)
        b = (b.detach() / scale).contiguous()
        x = out if out is not None else torch.empty_like(b)
        if x0 is not None:
            x.copy_(x0 / scale)
        r, p, ap = torch.empty_like(b), torch.empty_like(b), torch.empty_like(b)
        if state is None:
            state = torch.empty(n_state, dtype=torch.float64, device=b.device)
        xp, rp, pp, sp = x.data_ptr(), r.data_ptr(), p.data_ptr(), state.data_ptr()
        if x0 is not None:
            ap.copy_(_matvec_checked(matvec, x))  # ap = A x0
        _C.cg_cuda_init(b.data_ptr(), xp, rp, pp, ap.data_ptr(), sp, n, dt, damping, float(tol), x0 is not None,
                        dev, stream)
        # the run flag (set by cg_cuda_init, so never published around A x0 above): once it is 0,
        # the Triton passes in the matvec skip their work on the device (module docstring)
        with device_flag.publish(state[STATE_ACTIVE:STATE_ACTIVE + 1]):
            for _ in range(int(max_iter)):
                av = _matvec_checked(matvec, p)
                if not av.is_contiguous():  # else read in place: no copy kernel
                    ap.copy_(av)
                    av = ap
                # av stays alive until the step is enqueued; a later reuse of its memory by
                # the caching allocator is ordered after it on this stream.
                _C.cg_cuda_step(xp, rp, pp, av.data_ptr(), sp, n, dt, damping, dev, stream)
        # b = 0: the solution is 0 whatever x0 was (device-side select, no sync)
        x.copy_(torch.where(state[STATE_BB] > 0, x * scale, torch.zeros_like(x)))
    return x, state


def finish_cuda(x: torch.Tensor, state: torch.Tensor, *, check_finite: bool = True,
                max_iter: Optional[int] = None, tol: Optional[float] = None) -> CGResult:
    """Turn a launched solve (:func:`cg_cuda_launch`) into a :class:`CGResult`.

    ``iterations`` (int64) and ``residual`` (float64, ||r|| / ||b||, 0 when b = 0)
    stay 0-dim device tensors. With ``check_finite`` one read of the state (the single
    sync of the solve) raises RosaNumericalError on NaN/Inf and, given the solve's
    ``max_iter`` and ``tol``, on a breakdown (the loop stopped before ``max_iter``
    with the residual above ``tol``: A + damping I not positive definite along p);
    without it nothing is read.
    """
    if check_finite:
        bad, iters, rr, bb = state[[STATE_BAD, STATE_ITERS, STATE_RR, STATE_BB]].tolist()
        if bad != 0:
            raise non_finite("or b / x0 held NaN/Inf; detected on the device")
        if max_iter is not None and tol is not None and bb > 0 and iters < max_iter and rr > tol * tol * bb:
            raise breakdown(int(iters))
    bb = state[STATE_BB]
    residual = torch.where(bb > 0, torch.sqrt(state[STATE_RR] / torch.where(bb > 0, bb, 1.0)),
                           torch.zeros_like(bb))
    return CGResult(x, state[STATE_ITERS].to(torch.int64), residual)
