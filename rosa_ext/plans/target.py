"""The ROSA regression target (MATH.md section 1, paper Eq. 3).

    p*_t = p_t e^{r/beta} / (1 - p_t + p_t e^{r/beta}),   g_t = p*_t - p_t

Written as ``p* = sigmoid(logit(p_t) + r/beta)`` and evaluated from log p_t: for p_t >= 1/2 as
``g = (1 - p_t) - (1 - p*_t)`` with both complements computed directly (``-expm1(log p)`` and a
sigmoid of the negated log-odds), so it stays accurate when p_t is within rounding of 0 or 1.
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
    # 1 - p and log(1 - p) without cancellation near p = 1 (then from -expm1(log p), exact in fp32)
    one_minus_p = -torch.expm1(logp)
    log1mp = torch.where(logp > -0.6931471805599453, torch.log(one_minus_p), torch.log1p(-torch.exp(logp)))
    shifted = logp - log1mp + reward_per_token / beta  # logit(p*)
    # p >= 1/2: g = (1 - p) - (1 - p*), both complements exact; below: g = p* - p. Computing p* - p
    # directly near p = 1 subtracts two numbers that round to 1 in fp32 (a zero step for 1 - p < 3e-8).
    g = torch.where(logp > -0.6931471805599453, one_minus_p - torch.sigmoid(-shifted),
                    torch.sigmoid(shifted) - torch.exp(logp))
    return torch.where(reward_per_token == 0, torch.zeros_like(g), g)
