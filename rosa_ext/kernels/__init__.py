"""Triton kernels of the ROSA update, usable on their own (ROSA_SPEC.md section 3).

Tensor-level API for one conversation (T response tokens, hidden size d,
vocabulary V; fp32/bf16/fp16 ``hidden``/``weight`` of one dtype, any strides;
results fp32). ``lora_a`` (d,) / ``lora_b`` (V,) add the rank-1 LoRA term
``s (a . h_t) b`` to the logits, ``s = lora_scale``:

- :func:`stats` -> ``HeadStats(lse, logp, ah, pib)``, each (T,)
- :func:`row_reduce`: ``pi_t . u`` for u (V,) -> (T,)
- :func:`column_reduce`: ``sum_t w_t pi_t`` for w (T,) -> (V,)
- :func:`jvp`: ``J v`` -> (T,), :func:`vjp`: ``J^T u`` -> (P,), the Jacobian of
  ``p_t = softmax(z_t)[y_t]`` w.r.t. the LoRA ``[a, b]`` (P = d + V) or a hidden shift
  (P = d), so another framework can run its own solver on them.

The packed multi-conversation kernels are in :mod:`rosa_ext.kernels.reductions`.
Runs on CUDA, or on the CPU under ``TRITON_INTERPRET=1`` (tests).
"""
from __future__ import annotations

from typing import Optional

import torch

from . import reductions
from ..backends.base import HeadStats

__all__ = ["stats", "row_reduce", "column_reduce", "jvp", "vjp", "reductions"]


def _lora(hidden: torch.Tensor, lora_a: Optional[torch.Tensor], lora_b: Optional[torch.Tensor]):
    if lora_a is None or lora_b is None:
        return None, None
    ah = hidden.float() @ lora_a.reshape(-1).float()
    return ah, lora_b.reshape(1, -1).float()


def _seg(hidden: torch.Tensor) -> torch.Tensor:
    return torch.zeros(hidden.shape[0], dtype=torch.int32, device=hidden.device)


def stats(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
          lora_a: Optional[torch.Tensor] = None, lora_b: Optional[torch.Tensor] = None,
          lora_scale: float = 8.0) -> HeadStats:
    """One pass over W: lse_t, log p_t, a . h_t, pi_t . b (fp32, (T,) each).

    Args: hidden (T, d), weight (V, d), targets (T,) int64, bias (V,), lora_a (d,), lora_b (V,).
    """
    ah, lb = _lora(hidden, lora_a, lora_b)
    m, s, sb = reductions.stats_partials(hidden, weight, _seg(hidden), bias=bias, lora_b=lb, ah=ah,
                                         lora_scale=lora_scale)
    lse, pib = reductions.combine_stats(m, s, sb)
    z_y = (hidden.float() * weight[targets].float()).sum(1)
    if bias is not None:
        z_y = z_y + bias[targets].float()
    if ah is not None:
        z_y = z_y + lora_scale * ah * lb[0, targets]
    return HeadStats(lse=lse, logp=torch.clamp(z_y - lse, max=0.0), ah=ah, pib=pib)


def row_reduce(hidden: torch.Tensor, weight: torch.Tensor, lse: torch.Tensor, u: torch.Tensor, *,
               bias: Optional[torch.Tensor] = None, lora_a: Optional[torch.Tensor] = None,
               lora_b: Optional[torch.Tensor] = None, lora_scale: float = 8.0) -> torch.Tensor:
    """R(u)_t = pi_t . u for u (V,), given lse (T,) from :func:`stats` -> (T,) fp32."""
    ah, lb = _lora(hidden, lora_a, lora_b)
    return reductions.row_reduce(hidden, weight, _seg(hidden), lse, u.reshape(1, -1), bias=bias, lora_b=lb,
                                 ah=ah, lora_scale=lora_scale)


def column_reduce(hidden: torch.Tensor, weight: torch.Tensor, lse: torch.Tensor, w: torch.Tensor, *,
                  bias: Optional[torch.Tensor] = None, lora_a: Optional[torch.Tensor] = None,
                  lora_b: Optional[torch.Tensor] = None, lora_scale: float = 8.0) -> torch.Tensor:
    """C(w) = sum_t w_t pi_t for w (T,), given lse (T,) -> (V,) fp32."""
    ah, lb = _lora(hidden, lora_a, lora_b)
    off = torch.tensor([0, hidden.shape[0]], dtype=torch.int32, device=hidden.device)
    return reductions.column_reduce(hidden, weight, _seg(hidden), off, lse, w, bias=bias, lora_b=lb, ah=ah,
                                    lora_scale=lora_scale)[0]


def _operator(hidden, weight, targets, mode, bias, lora_a, lora_b, lora_scale):
    from .._problem import build_problem
    from ..backends.triton_backend import TritonBackend
    from ..jacobian import RosaOperator

    prob = build_problem(hidden, weight, targets, 0.0, mode=mode, lora_a=lora_a, lora_b=lora_b,
                         lora_scale=lora_scale, bias=bias, beta=1.0, damping=1.0, max_iter=1, tol=0.0,
                         solver="cg", backend="triton", mask=None)
    return RosaOperator(prob, TritonBackend())


def jvp(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, v: torch.Tensor, *, mode: str,
        bias: Optional[torch.Tensor] = None, lora_a: Optional[torch.Tensor] = None,
        lora_b: Optional[torch.Tensor] = None, lora_scale: float = 8.0) -> torch.Tensor:
    """J v: v (P,) -> (T,) fp32, J = dp/dtheta (P = d + V for mode "lora", d for "hidden")."""
    op = _operator(hidden, weight, targets, mode, bias, lora_a, lora_b, lora_scale)
    return op.jvp(v.reshape(1, -1).float())


def vjp(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, u: torch.Tensor, *, mode: str,
        bias: Optional[torch.Tensor] = None, lora_a: Optional[torch.Tensor] = None,
        lora_b: Optional[torch.Tensor] = None, lora_scale: float = 8.0) -> torch.Tensor:
    """J^T u: u (T,) -> (P,) fp32."""
    op = _operator(hidden, weight, targets, mode, bias, lora_a, lora_b, lora_scale)
    return op.vjp(u.float())[0]
