"""Float64 reference of the ROSA update (MATH.md section 5).

Deliberately naive: full (T, V) logits in float64, ``torch.func.jvp`` / ``torch.func.vjp`` of the exact
map theta -> L(theta), the logit of each observed token against the others (L = z_y - logsumexp of the
other logits = log(p / (1 - p))), the explicit Jacobian ``dp/dtheta = p (1 - p) dL/dtheta`` with
p (1 - p) = exp(logsigmoid(L) + logsigmoid(-L)), and the damped least-squares step from its SVD
(:func:`ridge_solve`; exact for any damping, also where the P x P normal equations are singular).
Written this way it stays exact for very confident tokens (1 - p far below float64's rounding of 1,
where softmax's own derivative ``p (1 - p)`` would round to 0) and very unlikely ones. Every fast path is
tested against it. Memory is O(T*V + T*P): small problems only.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch
from torch.func import jvp, vjp, vmap

from .common import validation as checks
from .common.config import RosaConfig, resolve
from .common.jacobian import residual_target
from .common.types import HeadProblem, RewardLike
from .core.op import RosaStep, build_problem

F64 = torch.float64


def _logit_map(prob: HeadProblem, b: int, mode: str) -> Tuple[Callable[[torch.Tensor], torch.Tensor], torch.Tensor]:
    """theta -> L (T_b,) = z_y - logsumexp(other logits) for conversation b, in float64, and theta_0 (zeros:
    a step)."""
    sl = slice(prob.offsets[b], prob.offsets[b + 1])
    h = prob.hidden[sl].to(F64)
    W = prob.weight.to(F64)
    c = None if prob.bias is None else prob.bias.to(F64)
    y = prob.targets[sl]
    s = prob.lora_scale
    a0 = None if prob.lora_a is None else prob.lora_a[b].to(F64)
    b0 = None if prob.lora_b is None else prob.lora_b[b].to(F64)
    d = prob.hidden_size
    hit = torch.zeros(y.numel(), W.shape[0], dtype=torch.bool, device=y.device)
    hit[torch.arange(y.numel(), device=y.device), y] = True

    def logits(hh: torch.Tensor, a: Optional[torch.Tensor], bb: Optional[torch.Tensor]) -> torch.Tensor:
        z = hh @ W.T
        if c is not None:
            z = z + c
        if a is not None:
            z = z + s * (hh @ a).unsqueeze(1) * bb.unsqueeze(0)
        return z

    def L_of(theta: torch.Tensor) -> torch.Tensor:
        if mode == "lora":
            z = logits(h, a0 + theta[:d], b0 + theta[d:])
        else:
            z = logits(h + theta, a0, b0)
        z_y = (z * hit).sum(1)
        return z_y - torch.logsumexp(z.masked_fill(hit, float("-inf")), dim=1)

    P = d + (prob.vocab_size if mode == "lora" else 0)
    return L_of, torch.zeros(P, dtype=F64, device=prob.weight.device)


def _mode(prob: HeadProblem, mode: Optional[str], size: Optional[int] = None) -> str:
    """The parameterisation J is taken for: ``mode`` when given; else "lora" for a vector of d + V numbers,
    "hidden" for one of d; else "lora" when the problem carries a LoRA, "hidden" otherwise."""
    if mode is not None:
        return checks.choice("rosa_ext.reference", "mode", mode, ("lora", "hidden"))
    if size is not None and size in (prob.hidden_size, prob.hidden_size + prob.vocab_size):
        return "hidden" if size == prob.hidden_size else "lora"
    return "lora" if prob.lora_a is not None else "hidden"


def _pq(L: torch.Tensor) -> torch.Tensor:
    """p (1 - p) from L = logit(p), exact however large |L|."""
    return torch.exp(torch.nn.functional.logsigmoid(L) + torch.nn.functional.logsigmoid(-L))


def jacobian_reference(prob: HeadProblem, b: int = 0, *, mode: Optional[str] = None) -> torch.Tensor:
    """Explicit J = dp/dtheta (T_b, P) of conversation b (``mode``: :func:`_mode`): p (1 - p) dL/dtheta,
    the rows of dL/dtheta by ``torch.func.vjp``."""
    L_of, theta0 = _logit_map(prob, b, _mode(prob, mode))
    L, pullback = vjp(L_of, theta0)
    eye = torch.eye(L.shape[0], dtype=F64, device=L.device)
    return _pq(L).unsqueeze(1) * vmap(lambda e: pullback(e)[0])(eye)


def jvp_reference(prob: HeadProblem, v: torch.Tensor, b: int = 0, *, mode: Optional[str] = None) -> torch.Tensor:
    """J v for conversation b by ``torch.func.jvp``: v (P,) -> (T_b,), float64."""
    L_of, theta0 = _logit_map(prob, b, _mode(prob, mode, v.numel()))
    L, dL = jvp(L_of, (theta0,), (v.to(F64),))
    return _pq(L) * dL


def vjp_reference(prob: HeadProblem, u: torch.Tensor, b: int = 0, *, mode: Optional[str] = None) -> torch.Tensor:
    """J^T u for conversation b by ``torch.func.vjp``: u (T_b,) -> (P,), float64."""
    L_of, theta0 = _logit_map(prob, b, _mode(prob, mode))
    L, pullback = vjp(L_of, theta0)
    return pullback(_pq(L) * u.to(F64))[0]


def ridge_solve(J: torch.Tensor, g: torch.Tensor, damping: float) -> torch.Tensor:
    """argmin ||J d - g||^2 + damping ||d||^2 = V diag(s / (s^2 + damping)) U^T g from the SVD of J.

    Exact for any damping > 0, also when J^T J is singular (P > T, repeated tokens) and damping
    is tiny, where a dense solve of the P x P normal equations returns an arbitrary solution;
    singular values below max(T, P) eps s_max (numerically zero) are dropped, as a pseudo-inverse does.
    """
    U, S, Vh = torch.linalg.svd(J, full_matrices=False)
    if S.numel() == 0:
        return torch.zeros(J.shape[1], dtype=J.dtype, device=J.device)
    keep = S > max(J.shape) * torch.finfo(J.dtype).eps * S.max()
    U, S, Vh = U[:, keep], S[keep], Vh[keep]
    return Vh.T @ ((S / (S * S + damping)) * (U.T @ g))


def rosa_update_reference(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                          reward: RewardLike, *, config: Optional[RosaConfig] = None,
                          lora_a: Optional[torch.Tensor] = None, lora_b: Optional[torch.Tensor] = None,
                          bias: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                          **options) -> RosaStep:
    """Same signature and result type as :func:`rosa_ext.rosa_update`, computed exactly in float64.

    The options (``config`` and keyword overrides, :class:`~rosa_ext.common.config.RosaConfig`) are
    validated as there; ``max_iter``, ``tol``, ``solver`` and ``backend`` have no effect: the solve is
    always a dense exact one. With ``damping_mode="relative"`` the ridge is ``damping * mean_t ||J_t||^2``
    of each conversation, from the explicit J (``damping`` where J is exactly zero; MATH.md section 6).
    """
    cfg = resolve("rosa_update_reference", config, options)
    with torch.no_grad():
        prob = build_problem(hidden, weight, targets, reward, cfg, lora_a=lora_a, lora_b=lora_b, bias=bias, mask=mask)
        return _reference(prob, cfg)


def _reference(prob: HeadProblem, cfg: RosaConfig) -> RosaStep:
    updates, logps, gs = [], [], []
    num = den = 0.0
    for b in range(prob.num_conversations):
        L_of, theta0 = _logit_map(prob, b, cfg.mode)
        L = L_of(theta0)
        logp = torch.nn.functional.logsigmoid(L)
        checks.finite_logits("rosa_update_reference", F64, logp)
        r = prob.reward[b].to(F64).expand_as(L)
        g = residual_target(logp, r, cfg.beta, logq=torch.nn.functional.logsigmoid(-L))
        J = jacobian_reference(prob, b, mode=cfg.mode)
        lam = cfg.damping
        if cfg.damping_mode == "relative":  # MATH.md section 6: damping times mean_t ||J_t||^2
            mean_diag = float((J * J).sum(1).mean())
            lam = cfg.damping * mean_diag if mean_diag > 0 else cfg.damping
        A = J.T @ J + lam * torch.eye(J.shape[1], dtype=F64, device=J.device)
        rhs = J.T @ g
        delta = ridge_solve(J, g, lam)
        res = rhs - A @ delta
        num += float(res @ res)
        den += float(rhs @ rhs)
        updates.append(delta)
        logps.append(logp)
        gs.append(g)
    upd = torch.stack(updates)
    residual = (num / den) ** 0.5 if den > 0 else 0.0
    return RosaStep(update=upd if prob.batched else upd[0], mode=cfg.mode, solver="dense",
                    backend="reference", hidden_size=prob.hidden_size, logp=torch.cat(logps),
                    target=torch.cat(gs), _iterations=0, _residual=residual)
