"""Single-sample policy-gradient baseline (paper Appendix E.4.1, "RL").

The paper's ablation replaces ROSA's solve by a plain policy-gradient step on
the RLHF objective ``max E[r] - beta KL(pi_theta || pi_ref)`` estimated from the
one response the user just scored. This module does exactly that on the *same*
parameters ROSA moves (rank-1 LoRA ``[a, b]`` on ``lm_head``, or the hidden
shift ``delta``), so the two differ only in how the step is computed:

    A      = r - beta * mean_t (log pi_theta(y_t) - log pi_ref(y_t))     (detached)
    grad   = A * d/dtheta mean_t log pi_theta(y_t)                       (REINFORCE)
    theta <- theta + lr * grad

``pi_ref`` is the base model (adapter off); at the first update the KL term is
0. With ``kl_clip`` the KL estimate is clamped to ``[-kl_clip, kl_clip]`` before it enters A: estimated on
the very tokens the step pushes down, it grows without bound once they are improbable (on Qwen2.5-Coder an
unclamped estimate turned into advantages of -1e5 and steps of norm ~1e3). The token *mean* (not the sum) keeps the step size independent of the
response length. ``lr`` is ours to pick and the paper gives none: :data:`DEFAULT_LR`
is set by hand (``benchmarks/results/experiment/README.md`` reports runs with other step
sizes).

:func:`pg_step` is the functional step (any tensors, also batched by looping);
:class:`PGSession` wraps it with the same ``update``/``reset``/``detach``
interface as :class:`rosa_ext.integrations.session.RosaSession` so :func:`rosa_ext.harness.conversation.interact`
can run it.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional

import torch

from ..common import defaults
from ..common.types import compute_dtype_of
from ..integrations.head_hooks import HeadAdapter
from ..integrations.model_lookup import find_body, find_lm_head, head_bias, head_weight

#: Default learning rate of the PG step (see the module docstring).
DEFAULT_LR = 10.0


@dataclass
class PGStep:
    """One PG step. ``update``: flat (P,) change ([delta_a, delta_b] for lora, delta for hidden);
    ``logp``: (N,) response log-probs before the step; ``advantage``: the scalar A."""

    update: torch.Tensor
    logp: torch.Tensor
    advantage: float
    mode: str
    solver: str = "pg"
    dlogp_linear: float = 0.0  # d/de mean_t log p(theta + e update) at e = 0: the step's linearised change


def _logits(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor], mode: str,
            a: torch.Tensor, b: torch.Tensor, delta: torch.Tensor, scale: float) -> torch.Tensor:
    if mode == "hidden":
        z = (hidden + delta) @ weight.T
    else:
        z = hidden @ weight.T + scale * (hidden @ a).unsqueeze(-1) * b
    return z if bias is None else z + bias


def pg_step(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reward: float, *, mode: str,
            lr: float = DEFAULT_LR, beta: float = 1.0, lora_a: Optional[torch.Tensor] = None,
            lora_b: Optional[torch.Tensor] = None, delta: Optional[torch.Tensor] = None,
            lora_scale: float = defaults.LORA_SCALE, bias: Optional[torch.Tensor] = None,
            kl_clip: Optional[float] = None) -> PGStep:
    """One single-sample policy-gradient step on the lm_head adapter.

    Args:
        hidden: (N, d) lm_head inputs of the base body at the positions predicting ``targets``
            (without the hidden shift; ``delta`` is added here).
        weight: (V, d) lm_head weight (not modified). bias: (V,) or None.
        targets: (N,) int64 response tokens.
        reward: the scalar r.
        mode: "lora" (moves a (d,) and b (V,)) or "hidden" (moves delta (d,)).
        lr: step size (> 0). beta: KL coefficient (>= 0).
        lora_a, lora_b: current (d,), (V,) LoRA factors (lora mode). delta: current (d,) shift.
        lora_scale: s of the LoRA term.
        kl_clip: clamp the KL estimate to [-kl_clip, kl_clip] (None: no clamp).
    Returns:
        :class:`PGStep` with ``update`` laid out like ROSA's (``[delta_a, delta_b]`` or ``delta``).
    """
    if mode not in ("lora", "hidden"):
        raise ValueError(f"pg_step: mode must be 'lora' or 'hidden', got {mode!r}")
    if not (lr > 0 and math.isfinite(lr)):
        raise ValueError(f"pg_step: lr must be a finite number > 0, got {lr}")
    if not (beta >= 0 and math.isfinite(beta)):
        raise ValueError(f"pg_step: beta must be finite and >= 0, got {beta}")
    if kl_clip is not None and not (kl_clip >= 0 and math.isfinite(kl_clip)):
        raise ValueError(f"pg_step: kl_clip must be None or finite and >= 0, got {kl_clip}")
    if not math.isfinite(float(reward)):
        raise ValueError(f"pg_step: reward must be finite, got {reward}")
    if hidden.dim() != 2 or targets.shape != hidden.shape[:1]:
        raise ValueError(f"pg_step: hidden must be (N, d) and targets (N,), got {tuple(hidden.shape)} "
                         f"and {tuple(targets.shape)}")
    d, V = weight.shape[1], weight.shape[0]
    dt = compute_dtype_of(weight.dtype)
    W, H = weight.detach().to(dt), hidden.detach().to(dt)
    c = None if bias is None else bias.detach().to(dt)
    zero_d, zero_v = torch.zeros(d, dtype=dt, device=W.device), torch.zeros(V, dtype=dt, device=W.device)
    a = (zero_d if lora_a is None else lora_a.detach().reshape(-1).to(dt)).clone()
    b = (zero_v if lora_b is None else lora_b.detach().reshape(-1).to(dt)).clone()
    dl = (zero_d if delta is None else delta.detach().reshape(-1).to(dt)).clone()
    if mode == "lora" and lora_a is None:
        raise ValueError("pg_step: mode='lora' needs lora_a")
    params = (a, b) if mode == "lora" else (dl,)
    for p in params:
        p.requires_grad_(True)
    y = targets.long().unsqueeze(-1)
    with torch.enable_grad():
        logp = torch.log_softmax(_logits(H, W, c, mode, a, b, dl, lora_scale), -1).gather(-1, y).squeeze(-1)
        with torch.no_grad():
            ref = torch.log_softmax(H @ W.T + (0 if c is None else c), -1).gather(-1, y).squeeze(-1)
            kl = float((logp - ref).mean())
            if kl_clip is not None:
                kl = max(-kl_clip, min(kl_clip, kl))
            adv = float(reward) - beta * kl
        grads = torch.autograd.grad(logp.mean(), params)
    grad = torch.cat([g.reshape(-1) for g in grads])
    update = grad * (lr * adv)
    lin = float((grad.double() * update.double()).sum())
    return PGStep(update=update.detach(), logp=logp.detach(), advantage=adv, mode=mode, dlogp_linear=lin)


class PGSession:
    """The PG baseline as a session on a live model: hooks ``lm_head`` like ROSA's session.

    Args:
        model: a transformers causal LM with ``lm_head`` (possibly tied), or a PeftModel.
        mode: "lora" or "hidden". lr, beta: see :func:`pg_step`. lora_scale: s.
        seed: seed of lora_A's init (``U(-1/sqrt(d), 1/sqrt(d))`` as PEFT; ``b = 0``).
    """

    def __init__(self, model: torch.nn.Module, mode: str = "lora", *, lr: float = DEFAULT_LR, beta: float = 1.0,
                 lora_scale: float = defaults.LORA_SCALE, seed: int = 0) -> None:
        if mode not in ("lora", "hidden"):
            raise ValueError(f"PGSession: mode must be 'lora' or 'hidden', got {mode!r}")
        self.model, self.mode = model, mode
        self.head = find_lm_head(model, "PGSession")
        self.body = find_body(model, "PGSession")
        self.weight = head_weight(self.head, "PGSession")
        self.bias = head_bias(self.head)
        self.lr, self.beta, self.lora_scale = float(lr), float(beta), float(lora_scale)
        V, d = self.weight.shape
        self.dtype = compute_dtype_of(self.weight.dtype)
        self.adapter = HeadAdapter(self.head, mode, 1, vocab_size=V, hidden_size=d, lora_scale=lora_scale,
                                   seed=seed, dtype=self.dtype, device=self.weight.device)

    def reset(self) -> None:
        """Back to the base model (a to its init, b = 0, delta = 0)."""
        self.adapter.reset()

    def detach(self) -> None:
        """Remove the hook; the model is as before."""
        self.adapter.remove()

    def update(self, input_ids: torch.Tensor, reward: float, *, response_start: Optional[int] = None,
               response_mask: Optional[torch.Tensor] = None) -> PGStep:
        """One PG step on prompt+response ``input_ids`` (T,) or (1, T); response given by
        ``response_start`` or a (T,) bool ``response_mask`` (exactly one)."""
        ids = input_ids.reshape(-1)
        if (response_start is None) == (response_mask is None):
            raise ValueError("PGSession.update: give exactly one of response_start / response_mask")
        if response_mask is None:
            pos = torch.arange(int(response_start), ids.numel(), device=ids.device)
        else:
            pos = torch.nonzero(response_mask.reshape(-1)).flatten()
        if pos.numel() == 0 or int(pos[0]) < 1:
            raise ValueError("PGSession.update: the response must be non-empty and start after position 0")
        with torch.no_grad():
            h = self.body(input_ids=ids.unsqueeze(0), use_cache=False).last_hidden_state[0, pos - 1]
        ad = self.adapter
        step = pg_step(h, self.weight, ids[pos], reward, mode=self.mode, lr=self.lr, beta=self.beta,
                       lora_a=ad.a[0], lora_b=ad.b[0], delta=ad.delta[0], lora_scale=self.lora_scale,
                       bias=self.bias)
        ad.apply(torch.zeros(1, dtype=torch.long, device=self.weight.device), step.update.unsqueeze(0))
        return step
