"""Argument checks shared by every CG implementation (Python loop, compiled)."""
from __future__ import annotations

import torch


def check_cg_args(b: torch.Tensor, damping: float, max_iter: int, tol: float) -> None:
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
