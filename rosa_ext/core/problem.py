"""Validated, flattened inputs of one ROSA update (MATH.md sections 1-2).

`build_problem` is the single place where user inputs are checked. Every
error is raised before anything is allocated or modified, and says which
argument was wrong and how. The result, a :class:`HeadProblem`, is what the
backends and solvers consume: the response tokens of all conversations are
concatenated ("packed") into N rows, with `seg` telling which conversation a
row belongs to, so one pass over the head weight serves the whole batch.
"""
from __future__ import annotations

import math
import numbers
from typing import Optional

import torch

from ..common.types import BACKENDS, MODES, SOLVERS, HeadProblem, RewardLike


def _fail(msg: str) -> None:
    raise ValueError(f"rosa_update: {msg}")


def _check_tensor(name: str, x: object) -> torch.Tensor:
    if not isinstance(x, torch.Tensor):
        raise TypeError(f"rosa_update: `{name}` must be a torch.Tensor, got {type(x).__name__}")
    return x


def _check_float(name: str, x: torch.Tensor) -> None:
    if not x.is_floating_point():
        raise TypeError(f"rosa_update: `{name}` must be a floating-point tensor, got {x.dtype}")


def _check_device(name: str, x: torch.Tensor, device: torch.device) -> None:
    if x.device != device:
        _fail(f"`{name}` is on {x.device} but `weight` is on {device}; put all inputs on one device")


def _check_finite(name: str, x: torch.Tensor) -> None:
    if not bool(torch.isfinite(x).all()):
        _fail(f"`{name}` contains NaN or Inf")


def _positive_number(name: str, x: object, allow_zero: bool = False) -> float:
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        raise TypeError(f"rosa_update: `{name}` must be a real number, got {type(x).__name__}")
    v = float(x)
    if not math.isfinite(v) or v < 0 or (v == 0 and not allow_zero):
        _fail(f"`{name}` must be {'>= 0' if allow_zero else '> 0'} and finite, got {x!r}")
    return v


def _reward_vector(reward: RewardLike, batch: int, batched: bool, dtype: torch.dtype,
                   device: torch.device) -> torch.Tensor:
    if isinstance(reward, torch.Tensor):
        r = reward.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    elif isinstance(reward, numbers.Real) and not isinstance(reward, bool):
        r = torch.tensor([float(reward)], dtype=torch.float64)
    elif isinstance(reward, (list, tuple)):
        try:
            r = torch.tensor([float(v) for v in reward], dtype=torch.float64)
        except (TypeError, ValueError):
            raise TypeError("rosa_update: `reward` must be a number or a sequence of numbers") from None
    else:
        raise TypeError(f"rosa_update: `reward` must be a float (or a (B,) tensor for a batch), "
                        f"got {type(reward).__name__}")
    if r.numel() == 1 and batch > 1:
        r = r.expand(batch)
    if r.numel() != batch:
        _fail(f"`reward` has {r.numel()} values but there are {batch} conversations")
    if not bool(torch.isfinite(r).all()):
        _fail(f"`reward` must be finite, got {r.tolist() if batched else float(r[0])}")
    return r.to(device=device, dtype=dtype)


def _lora_matrix(name: str, x: Optional[torch.Tensor], batch: int, width: int, batched: bool,
                 device: torch.device, dtype: torch.dtype) -> Optional[torch.Tensor]:
    """Accept (width,), PEFT's (1, width) / (width, 1), or (B, width) for a batch."""
    if x is None:
        return None
    x = _check_tensor(name, x)
    _check_float(name, x)
    _check_device(name, x, device)
    if x.dim() == 1 and x.shape[0] == width:
        m = x.reshape(1, width)
    elif x.dim() == 2 and x.shape == (1, width):
        m = x
    elif x.dim() == 2 and x.shape == (width, 1):
        m = x.reshape(1, width)
    elif batched and x.dim() == 2 and x.shape == (batch, width):
        m = x
    else:
        want = f"({width},)" + (f" or ({batch}, {width})" if batched else f", (1, {width}) or ({width}, 1)")
        _fail(f"`{name}` must have shape {want}, got {tuple(x.shape)}")
    _check_finite(name, m)
    m = m.detach().to(dtype)
    if m.shape[0] == 1 and batch > 1:
        m = m.expand(batch, width)
    return m.contiguous()


def build_problem(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  reward: RewardLike, *, mode: str, lora_a: Optional[torch.Tensor],
                  lora_b: Optional[torch.Tensor], lora_scale: float, bias: Optional[torch.Tensor],
                  beta: float, damping: float, max_iter: int, tol: float, solver: str,
                  backend: str, mask: Optional[torch.Tensor]) -> HeadProblem:
    """Check every input of :func:`rosa_ext.rosa_update` and pack it. See module doc."""
    if mode not in MODES:
        _fail(f"unknown mode {mode!r}; expected one of {MODES}")
    if solver not in SOLVERS:
        _fail(f"unknown solver {solver!r}; expected one of {SOLVERS}")
    if backend not in BACKENDS:
        _fail(f"unknown backend {backend!r}; expected one of {BACKENDS}")
    beta = _positive_number("beta", beta)
    damping = _positive_number("damping", damping)
    tol = _positive_number("tol", tol, allow_zero=True)
    lora_scale = float(lora_scale)
    if not math.isfinite(lora_scale):
        _fail(f"`lora_scale` must be finite, got {lora_scale}")
    if isinstance(max_iter, bool) or not isinstance(max_iter, numbers.Integral) or max_iter < 0:
        _fail(f"`max_iter` must be an int >= 0, got {max_iter!r}")

    weight = _check_tensor("weight", weight)
    hidden = _check_tensor("hidden", hidden)
    targets = _check_tensor("targets", targets)
    _check_float("weight", weight)
    _check_float("hidden", hidden)
    device = weight.device
    if weight.dim() != 2:
        _fail(f"`weight` must be (V, d), got shape {tuple(weight.shape)}")
    V, d = weight.shape
    _check_device("hidden", hidden, device)
    _check_device("targets", targets, device)
    if hidden.dtype != weight.dtype:
        _fail(f"`hidden` is {hidden.dtype} but `weight` is {weight.dtype}; they must match "
              f"(the model's lm_head input and weight dtype)")
    if hidden.dim() not in (2, 3) or hidden.shape[-1] != d:
        _fail(f"`hidden` must be (T, d) or (B, T, d) with d={d} (weight is {tuple(weight.shape)}), "
              f"got {tuple(hidden.shape)}")
    batched = hidden.dim() == 3
    if targets.dtype not in (torch.int64, torch.int32):
        raise TypeError(f"rosa_update: `targets` must be int64 token ids, got {targets.dtype}")
    if targets.shape != hidden.shape[:-1]:
        _fail(f"`targets` must have shape {tuple(hidden.shape[:-1])} to match `hidden`, "
              f"got {tuple(targets.shape)}")
    if mask is not None:
        mask = _check_tensor("mask", mask)
        _check_device("mask", mask, device)
        if mask.dtype != torch.bool:
            raise TypeError(f"rosa_update: `mask` must be a bool tensor, got {mask.dtype}")
        if mask.shape != targets.shape:
            _fail(f"`mask` must have shape {tuple(targets.shape)}, got {tuple(mask.shape)}")
    if bias is not None:
        bias = _check_tensor("bias", bias)
        _check_float("bias", bias)
        _check_device("bias", bias, device)
        if bias.shape != (V,):
            _fail(f"`bias` must be ({V},), got {tuple(bias.shape)}")
        _check_finite("bias", bias)

    hidden3 = hidden if batched else hidden.unsqueeze(0)
    targets2 = (targets if batched else targets.unsqueeze(0)).long()
    mask2 = None if mask is None else (mask if batched else mask.unsqueeze(0))
    B, T = targets2.shape
    if T == 0:
        _fail("the response is empty (T = 0); there is nothing to update on")
    counts = [T] * B if mask2 is None else mask2.sum(dim=1).tolist()
    for b, n in enumerate(counts):
        if n == 0:
            _fail("`mask` selects no response token" + (f" in conversation {b}" if batched else ""))
    sel_targets = targets2.reshape(-1) if mask2 is None else targets2[mask2]
    lo, hi = int(sel_targets.min()), int(sel_targets.max())
    if lo < 0 or hi >= V:
        _fail(f"`targets` holds token id {hi if hi >= V else lo}, outside the vocabulary [0, {V})")
    sel_hidden = hidden3.reshape(-1, d) if mask2 is None else hidden3[mask2]
    _check_finite("hidden", sel_hidden)

    compute_dtype = torch.float64 if weight.dtype == torch.float64 else torch.float32
    r = _reward_vector(reward, B, batched, compute_dtype, device)
    a = _lora_matrix("lora_a", lora_a, B, d, batched, device, compute_dtype)
    bvec = _lora_matrix("lora_b", lora_b, B, V, batched, device, compute_dtype)
    if mode == "lora" and a is None:
        _fail("mode='lora' needs `lora_a` (the (d,) / (1, d) lora_A weight); with a = 0 the "
              "Jacobian is zero. Initialise it as LoRA does (random), and `lora_b` to zeros")
    if a is not None and bvec is None:
        bvec = torch.zeros(B, V, dtype=compute_dtype, device=device)
    if bvec is not None and a is None:
        a = torch.zeros(B, d, dtype=compute_dtype, device=device)

    offsets = [0]
    for n in counts:
        offsets.append(offsets[-1] + int(n))
    seg = torch.repeat_interleave(torch.arange(B, device=device), torch.tensor(counts, device=device))
    return HeadProblem(hidden=sel_hidden, weight=weight, bias=bias, targets=sel_targets.contiguous(),
                       seg=seg, offsets=offsets, reward=r, mode=mode, lora_a=a, lora_b=bvec,
                       lora_scale=lora_scale, beta=beta, damping=damping, max_iter=int(max_iter),
                       tol=tol, solver=solver, backend=backend, batched=batched,
                       compute_dtype=compute_dtype)
