"""The ROSA regression target (MATH.md section 1, paper Eq. 3).

    p*_t = p_t e^{r/beta} / (1 - p_t + p_t e^{r/beta}),   g_t = p*_t - p_t

Written as ``p* = sigmoid(logit(p_t) + r/beta)`` and evaluated from log p_t,
so it stays accurate when p_t is within rounding of 0 or 1.
"""
from __future__ import annotations

import torch


def residual_target(logp: torch.Tensor, reward_per_token: torch.Tensor, beta: float) -> torch.Tensor:
    """g = p* - p for each token.

    Args:
        logp: (N,) float, log p_t of the observed tokens (<= 0).
        reward_per_token: (N,) float, the reward of each token's conversation.
        beta: KL coefficient (> 0).
    Returns:
        (N,) same dtype as ``logp``. Exactly zero where the reward is zero.
    """
    logp = torch.clamp(logp, max=0.0)
    p = torch.exp(logp)
    # log(1 - p) computed without cancellation near p = 1.
    log1mp = torch.where(logp > -0.6931471805599453, torch.log(-torch.expm1(logp)), torch.log1p(-p))
    p_star = torch.sigmoid(logp - log1mp + reward_per_token / beta)
    g = p_star - p
    return torch.where(reward_per_token == 0, torch.zeros_like(g), g)
