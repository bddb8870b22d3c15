"""The ROSA regression target (MATH.md section 1, paper Eq. 3).

    p*_t = p_t e^{r/beta} / (1 - p_t + p_t e^{r/beta}),   g_t = p*_t - p_t

Written as ``p* = sigmoid(L + d)`` with ``L = logit(p_t)`` and ``d = r / beta``, the difference of two
sigmoids is evaluated without subtracting them (MATH.md section 1):

    g = sigmoid(L + d) - sigmoid(L) = sinh(d / 2) / (2 cosh(L / 2) cosh((L + d) / 2))

so a confident token (1 - p below fp32's rounding of 1) or a weak reward keeps its full relative
precision: every factor is a product of quantities with relative error ~eps; nothing that rounds to
1 is subtracted from something else that rounds to 1.
"""
from __future__ import annotations

import torch

_LOG_HALF = -0.6931471805599453


def residual_target(logp: torch.Tensor, reward_per_token: torch.Tensor, beta: float) -> torch.Tensor:
    """g = p* - p for each token, free of cancellation for p near 0 or 1 (MATH.md section 1).

    Args:
        logp: (N,) float, log p_t of the observed tokens (<= 0). Must itself be accurate near 0 when p is
            near 1 (e.g. ``log1p(-q)`` with q = 1 - p summed over the other tokens), since 1 - p is recovered
            from it as ``-expm1(logp)``.
        reward_per_token: (N,) float, the reward of each token's conversation.
        beta: KL coefficient (> 0).
    Returns:
        (N,) same dtype as ``logp``. Exactly zero where the reward is zero.
    """
    logp = torch.clamp(logp, max=0.0)
    d = reward_per_token.to(logp.dtype) / beta
    # log(1 - p) without cancellation: for p > 1/2 from 1 - p = -expm1(log p) (exact for tiny 1 - p),
    # below from log1p(-p).
    log1mp = torch.where(logp > _LOG_HALF, torch.log(-torch.expm1(logp)), torch.log1p(-torch.exp(logp)))
    L = logp - log1mp  # logit(p); +inf at p == 1, -inf at p == 0
    a = L + d  # logit(p*)
    # 2 cosh(x/2) = e^{|x|/2} (1 + e^{-|x|}) and 2 sinh(d/2) = sign(d) e^{|d|/2} (1 - e^{-|d|}), hence
    #   g = sign(d) (1 - e^{-|d|}) e^{E} / ((1 + e^{-|L|}) (1 + e^{-|a|})),  E = (|d| - |L| - |a|) / 2 <= 0,
    # where E is taken case by case so that it never subtracts two large equal numbers:
    #   L and d of one sign: |a| = |L| + |d|, E = -|L|;  opposite signs: E = -max(|L| - |d|, 0).
    absL, absd = L.abs(), d.abs()
    same = (L >= 0) == (d >= 0)
    E = torch.where(same, -absL, -torch.clamp(absL - absd, min=0.0))
    g = torch.sign(d) * (-torch.expm1(-absd)) * torch.exp(E) / ((1.0 + torch.exp(-absL)) * (1.0 + torch.exp(-a.abs())))
    return torch.where(reward_per_token == 0, torch.zeros_like(g), g)
