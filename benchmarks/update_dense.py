"""The dense peer: the ROSA step as a competent user writes it in a few lines of torch.

Materialise the T x V logits once, softmax in place, form the Jacobian explicitly (hidden:
T x d; LoRA: T x d for ``a`` and T x V for ``b``, written over the probabilities), the T x T
Gram matrix J J^T + lambda I, a Cholesky solve, and the step J^T alpha (the dual form of
MATH.md section 4). It is exact and fast while T x V fits in memory; its extra memory is
about one T x V buffer in the compute dtype (the probabilities, reused as J_b in LoRA mode).

This is the bar the package's default path is measured against (``dense solve`` rows of
``bench_update.py``); it is deliberately good: no second T x V copy, no autograd.
"""
from __future__ import annotations

from typing import Optional

import torch

from rosa_ext.common import defaults
from rosa_ext.common.jacobian import residual_target
from rosa_ext.common.types import compute_dtype_of


def dense_bytes(T: int, d: int, V: int, mode: str) -> float:
    """Peak extra bytes of :func:`dense_update` in fp32: the T x V buffer, J, the Gram matrix."""
    return 4.0 * (T * V + 2 * T * d + T * T + (V if mode == "lora" else 0))


def dense_update(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reward: float, *, mode: str,
                 lora_a: Optional[torch.Tensor] = None, lora_b: Optional[torch.Tensor] = None,
                 lora_scale: float = defaults.LORA_SCALE, bias: Optional[torch.Tensor] = None,
                 beta: float = defaults.BETA, damping: float = defaults.DAMPING) -> torch.Tensor:
    """One conversation's step: hidden (T, d), weight (V, d), targets (T,) -> (d,) (hidden) or (d + V,) (lora).

    Computes in fp32 (fp64 for fp64 weights); bf16/fp16 weights are widened once (a V x d copy).
    """
    cd = compute_dtype_of(weight.dtype)
    h, W, y = hidden.to(cd), weight.to(cd), targets
    T = h.shape[0]
    s = lora_scale
    a = None if lora_a is None else lora_a.reshape(-1).to(cd)
    b = None if lora_b is None else lora_b.reshape(-1).to(cd)
    if mode == "lora" and b is None:
        b = torch.zeros(W.shape[0], dtype=cd, device=W.device)
    z = h @ W.T if bias is None else torch.addmm(bias.to(cd), h, W.T)   # (T, V): the one big buffer
    ah = None
    if a is not None and b is not None:
        ah = h @ a
        z.addr_(ah, b, alpha=s)                                           # + s (a.h) b
    pi = z.sub_(z.amax(1, keepdim=True)).exp_()                           # softmax in place
    pi.div_(pi.sum(1, keepdim=True))
    rows = torch.arange(T, device=h.device)
    p = pi[rows, y]
    g = residual_target(torch.log(p), torch.full_like(p, float(reward)), beta)
    if mode == "hidden":
        Wy = W[y]
        piW = pi @ W
        if ah is not None:                                                # W_eff = W + s b a^T
            Wy.add_(s * b[y].unsqueeze(1) * a)
            piW.add_(s * (pi @ b).unsqueeze(1) * a)
        del pi, z
        J = Wy.sub_(piW).mul_(p.unsqueeze(1))                             # (T, d)
        G = J @ J.T
        G.diagonal().add_(damping)
        alpha = torch.cholesky_solve(g.unsqueeze(1), torch.linalg.cholesky(G)).squeeze(1)
        return J.T @ alpha
    pib = pi @ b
    Ja = (s * p * (b[y] - pib)).unsqueeze(1) * h                          # (T, d)
    cb = s * p * ah
    Jb = pi.mul_(-cb.unsqueeze(1))                                        # (T, V), over the probabilities
    Jb[rows, y] += cb
    G = Jb @ Jb.T
    G.addmm_(Ja, Ja.T)
    G.diagonal().add_(damping)
    alpha = torch.cholesky_solve(g.unsqueeze(1), torch.linalg.cholesky(G)).squeeze(1)
    return torch.cat([Ja.T @ alpha, Jb.T @ alpha])
