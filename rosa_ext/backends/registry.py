"""The engine registry: a name ("auto", "torch", "triton") and a device -> the engine that runs the
passes (:class:`~rosa_ext.backends.protocol.Engine`)."""
from __future__ import annotations

import functools
import os

import torch

from ..common.validation import RosaInputError
from .protocol import Engine


def triton_available(device: torch.device) -> bool:
    """True when the Triton engine can run on ``device``: a CUDA device with triton importable, or the
    Triton interpreter (``TRITON_INTERPRET=1``, set before triton is imported)."""
    if device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        return False
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


@functools.lru_cache(maxsize=None)
def engine_for(name: str, device: torch.device) -> Engine:
    """The engine ``name`` on ``device`` ("auto": Triton on CUDA when it imports, else torch).
    A new instance per call (an engine's per-problem caches -- the device index, h in the compute dtype --
    are each one (problem, value) pair, safe to share all the same).

    Raises RosaInputError (argument ``backend``) for "triton" where Triton cannot run."""
    device_type = device.type
    if name == "auto":
        name = "triton" if device_type == "cuda" and triton_available(device) else "torch"
    if name == "torch":
        from .torch_engine import TorchEngine
        return TorchEngine()
    if name == "triton":
        if not triton_available(device):
            raise RosaInputError(
                "rosa_update: backend='triton' needs the `triton` package and CUDA tensors (or TRITON_INTERPRET=1 "
                f"set before triton is imported, for CPU testing); the inputs are on {device_type}: use "
                "backend='torch' or 'auto'", "backend")
        from .triton_engine import TritonEngine
        return TritonEngine()
    raise RosaInputError(f"rosa_update: unknown backend {name!r}", "backend")


def get_backend(name: str, device: torch.device) -> Engine:
    """:func:`engine_for` (the name the earlier releases used)."""
    return engine_for(name, device)
