"""Backend registry: names -> implementations of :class:`~rosa_ext.backends.protocol.Backend`."""
from __future__ import annotations

import os

import torch

from .protocol import Backend


def triton_available(device: torch.device) -> bool:
    """True when the Triton backend can run on ``device``."""
    if device.type != "cuda":
        if os.environ.get("TRITON_INTERPRET") != "1":
            return False
    try:
        import triton  # noqa: F401
    except Exception:
        return False
    return True


def get_backend(name: str, device: torch.device) -> Backend:
    """Resolve a backend name ("auto", "torch", "triton") to a backend object.

    "auto" picks Triton on CUDA when it imports, else the portable chunked
    torch backend.
    """
    if name == "auto":
        name = "triton" if device.type == "cuda" and triton_available(device) else "torch"
    if name == "torch":
        from .torch_chunked import TorchChunkedBackend
        return TorchChunkedBackend()
    if name == "triton":
        if not triton_available(device):
            raise RuntimeError(
                "rosa_update: backend='triton' needs the `triton` package and a CUDA tensor "
                "(or TRITON_INTERPRET=1 set before triton is imported, for CPU testing)")
        from .triton_backend import TritonBackend
        return TritonBackend()
    raise ValueError(f"rosa_update: unknown backend {name!r}")
