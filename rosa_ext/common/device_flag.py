"""The run flag: how a device-side solver tells the Triton passes inside its matvec to skip work.

The compiled CUDA CG (:mod:`rosa_ext.cg.compiled`) launches a fixed ``max_iter`` iterations
without reading anything back (graph-capturable); once it has converged (or broken down) its
float64 state's ``active`` entry is 0 and every later step ignores the matvec's result. While
its loop runs, it publishes that entry here (:func:`publish`), and the flag-aware kernels of
:mod:`rosa_ext.kernels` (the row and column reductions, the GEMVs) launched from the matvec read
it on the device: when it is 0 they store zeros instead of passing over W. The host never reads
it, so the launches stay the same and remain capturable in a CUDA graph.

The flag is a context variable (per thread, per asyncio task), set only around the matvecs of
the CG loop -- never around the right-hand side or ``A x0``. A matvec whose kernel results are
used for anything but the CG step (say, logged) sees zeros after convergence; wrap such work
in ``publish(None)``. :func:`set_enabled` (False) turns the mechanism off process-wide (the
benchmarks compare both).

Leaf layer: imports nothing from the rest of the package.
"""
from __future__ import annotations

import contextlib
from contextvars import ContextVar
from typing import Iterator, Optional

import torch

_flag: ContextVar[Optional[torch.Tensor]] = ContextVar("rosa_ext_run_flag", default=None)
_enabled = True


def current() -> Optional[torch.Tensor]:
    """The run flag published in this context (a 1-element device tensor), or None."""
    return _flag.get() if _enabled else None


@contextlib.contextmanager
def publish(flag: Optional[torch.Tensor]) -> Iterator[None]:
    """Publish ``flag`` (a 1-element tensor, any dtype: 0 means "skip") for the block; None hides
    any outer one."""
    if flag is not None and (not isinstance(flag, torch.Tensor) or flag.numel() != 1):
        raise TypeError(f"the run flag must be a 1-element tensor, got {type(flag).__name__}")
    token = _flag.set(flag)
    try:
        yield
    finally:
        _flag.reset(token)


def set_enabled(enabled: bool) -> bool:
    """Turn the early exit on or off process-wide; returns the previous setting."""
    global _enabled
    old, _enabled = _enabled, bool(enabled)
    return old


def enabled() -> bool:
    """Whether flag-aware kernels honour a published flag."""
    return _enabled
