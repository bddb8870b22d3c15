"""The argument checks of the tensor-level kernel API (:mod:`rosa_ext.kernels.ops`): shapes, dtypes
and devices without a host sync; the index values (targets, seg) with one. The checks every layer
shares are in :mod:`rosa_ext.common.validation`.
"""
from __future__ import annotations

import os
from typing import Any, Dict, Optional, Tuple

import torch

from ..common.validation import RosaTypeError, _show, fail, float_tensor, index_tensor, same_device, tensor

KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def kernel_model(who: str, hidden: Any, weight: Any, bias: Any = None) -> Tuple[int, int, int]:
    """hidden (T, d) and weight (V, d) of one dtype in fp32/bf16/fp16, one device; bias (V,) -> (T, d, V)."""
    hidden = tensor(who, "hidden", hidden)
    weight = tensor(who, "weight", weight)
    if hidden.dtype != weight.dtype or hidden.dtype not in KERNEL_DTYPES:
        fail(who, "hidden", f"hidden/weight must share a dtype in fp32/bf16/fp16, got {hidden.dtype}/"
                            f"{weight.dtype} (fp64 runs on the torch backend)", RosaTypeError)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        fail(who, "hidden", f"`hidden` must be (N, d) and `weight` (V, d), got {tuple(hidden.shape)} and "
                            f"{tuple(weight.shape)}")
    T, d = hidden.shape
    V = weight.shape[0]
    if T == 0 or d == 0 or V == 0:
        fail(who, "hidden", f"need at least one token, one hidden unit and one vocabulary entry, got hidden "
                            f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}")
    same_device(who, "weight", weight, hidden.device, "hidden")
    kernel_device(who, "hidden", hidden)
    if bias is not None:
        float_tensor(who, "bias", bias)
        same_device(who, "bias", bias, hidden.device, "hidden")
        if tuple(bias.shape) != (V,):
            fail(who, "bias", f"`bias` must be ({V},), got {tuple(bias.shape)}")
    return int(T), int(d), int(V)


def kernel_device(who: str, name: str, x: torch.Tensor) -> None:
    """The Triton kernels run on CUDA tensors, or anywhere under TRITON_INTERPRET=1 (the CPU tests)."""
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        fail(who, name, f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before triton is "
                        f"imported), got `{name}` on {x.device}; on the CPU use rosa_update(backend='torch')")


def kernel_vector(who: str, name: str, x: Any, size: int, device: torch.device) -> torch.Tensor:
    """A float tensor of shape (size,) on ``device``."""
    x = float_tensor(who, name, x)
    if tuple(x.shape) != (size,):
        fail(who, name, f"`{name}` must be ({size},), got {tuple(x.shape)}")
    same_device(who, name, x, device, "hidden")
    return x


def kernel_rows(who: str, name: str, x: Any, width: int, device: torch.device) -> int:
    """A float tensor (width,) or (B, width) on ``device`` -> its number of rows (1 for a vector)."""
    x = float_tensor(who, name, x)
    if not ((x.dim() == 1 and x.shape[0] == width) or (x.dim() == 2 and x.shape[1] == width and x.shape[0] >= 1)):
        fail(who, name, f"`{name}` must be ({width},) or (B, {width}), got {tuple(x.shape)}")
    same_device(who, name, x, device, "hidden")
    return 1 if x.dim() == 1 else int(x.shape[0])


def kernel_index(who: str, name: str, x: Any, T: int, device: torch.device, what: str) -> torch.Tensor:
    """An integer tensor of shape (T,) on ``device``."""
    x = index_tensor(who, name, x, what)
    if tuple(x.shape) != (T,):
        fail(who, name, f"`{name}` must be ({T},), got {tuple(x.shape)}")
    same_device(who, name, x, device, "hidden")
    return x


def kernel_ranges(who: str, V: int, targets: Optional[torch.Tensor] = None, seg: Optional[torch.Tensor] = None,
                  rows: Optional[Dict[str, int]] = None) -> Optional[torch.Tensor]:
    """The value checks of the kernel API, with one device sync for all of them: targets in [0, V);
    seg >= 0, sorted, and below the rows of every (B, .) table in ``rows`` (name -> rows; 1
    broadcasts). Returns ``seg`` as an int64 CPU tensor (the same transfer; the caller derives the
    conversations' offsets from it), or None without ``seg``."""
    parts = []
    if targets is not None and targets.numel():
        parts.append(torch.stack([targets.min(), targets.max()]).to(torch.int64))
    if seg is not None:
        parts.append(seg.reshape(-1).to(torch.int64))
    if not parts:
        return None
    host = torch.cat(parts).cpu()  # the one sync
    if targets is not None and targets.numel():
        lo, hi = int(host[0]), int(host[1])
        if lo < 0 or hi >= V:
            fail(who, "targets", f"`targets` holds token id {hi if hi >= V else lo}, outside [0, {V})")
        host = host[2:]
    if seg is None:
        return None
    if host.numel():
        if int(host.min()) < 0 or (host.numel() > 1 and not bool((host[1:] >= host[:-1]).all())):
            fail(who, "seg", "`seg` must be >= 0 and sorted (each conversation's tokens contiguous)")
        hi = int(host.max())
        for name, n in (rows or {}).items():
            if n != 1 and hi >= n:
                fail(who, "seg", f"`seg` holds conversation {hi} but `{name}` has only {n} rows")
    return host


def kernel_lora(who: str, lora_a: Any, lora_b: Any, d: int, V: int, device: torch.device) -> Dict[str, int]:
    """Both or neither of lora_a ((d,) / (B, d)) and lora_b ((V,) / (B, V)) -> {name: rows}."""
    if (lora_a is None) != (lora_b is None):
        fail(who, "lora_a" if lora_a is None else "lora_b", "give both lora_a and lora_b, or neither")
    if lora_a is None:
        return {}
    rows = {"lora_a": kernel_rows(who, "lora_a", lora_a, d, device),
            "lora_b": kernel_rows(who, "lora_b", lora_b, V, device)}
    if 1 not in rows.values() and rows["lora_a"] != rows["lora_b"]:
        fail(who, "lora_b", f"`lora_a` has {rows['lora_a']} rows but `lora_b` {rows['lora_b']}")
    return rows


def kernel_tables_agree(who: str, rows: Dict[str, int]) -> None:
    """Per-conversation tables ({name: rows}) have one row (shared) or the same number B of rows."""
    multi = {name: n for name, n in rows.items() if n != 1}
    if len(set(multi.values())) > 1:
        names = sorted(multi, key=lambda k: multi[k])
        fail(who, names[-1], f"per-conversation inputs disagree on the number of conversations: "
                             f"{multi} rows (each must have 1 row or the same B rows)")


def kernel_stats(who: str, st: Any, T: int, device: torch.device, lora: bool) -> None:
    """A HeadStats of this call's T tokens: lse and logp (T,), and ah, pib (T,) with a LoRA term."""
    if not all(hasattr(st, k) for k in ("lse", "logp", "ah", "pib")):
        fail(who, "st", f"`st` must be the HeadStats returned by rosa_ext.kernels.stats, got {_show(st)}",
             RosaTypeError)
    for k in ("lse", "logp") + (("ah", "pib") if lora else ()):
        v = getattr(st, k)
        if v is None:
            fail(who, "st", f"`st.{k}` is None: pass the stats of a call with the same lora_a/lora_b")
        kernel_vector(who, f"st.{k}", v, T, device)
