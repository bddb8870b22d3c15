"""The obvious alternative a user would write: torch.func through the full logits + Python CG.

This is the comparison point of the benchmarks, written the way the
paper's description suggests: ``p(theta)`` is computed through the full T x V
logits, each CG matvec is ``torch.func.jvp`` followed by the ``torch.func.vjp``
closure (which keeps the T x V softmax graph alive), and the loop is
:func:`rosa_ext.cg.cg_python` with the same damping, ``max_iter`` and ``tol`` as
the package. It computes in the compute dtype of the package (fp32 for
fp32/bf16/fp16 models), so accuracy is comparable.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from rosa_ext.cg import CGResult, cg_python
from rosa_ext.common import defaults
from rosa_ext.common.jacobian import residual_target
from rosa_ext.common.types import compute_dtype_of


def _p_function(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, mode: str,
                lora_a: Optional[torch.Tensor], lora_b: Optional[torch.Tensor], lora_scale: float,
                bias: Optional[torch.Tensor]) -> Tuple[Callable[[torch.Tensor], torch.Tensor], int]:
    cd = compute_dtype_of(weight.dtype)
    h, W = hidden.to(cd), weight.to(cd)
    c = None if bias is None else bias.to(cd)
    d = W.shape[1]
    a0 = None if lora_a is None else lora_a.reshape(-1).to(cd)
    b0 = None if lora_b is None else lora_b.reshape(-1).to(cd)
    if mode == "lora" and b0 is None:
        b0 = torch.zeros(W.shape[0], dtype=cd, device=W.device)

    def p_of(theta: torch.Tensor) -> torch.Tensor:
        if mode == "hidden":
            z = (h + theta) @ W.T
        else:
            a, b = a0 + theta[:d], b0 + theta[d:]
            z = h @ W.T + lora_scale * (h @ a).unsqueeze(1) * b
        if c is not None:
            z = z + c
        return torch.log_softmax(z, dim=-1).gather(1, targets.unsqueeze(1)).squeeze(1).exp()

    P = d if mode == "hidden" else d + W.shape[0]
    return p_of, P


class TorchFuncOperator:
    """J v and J^T u of p(theta) by torch.func through the full logits (the alternative)."""

    def __init__(self, hidden, weight, targets, reward: float, *, mode: str, lora_a=None, lora_b=None,
                 lora_scale: float = defaults.LORA_SCALE, bias=None, beta: float = defaults.BETA) -> None:
        self.p_of, P = _p_function(hidden, weight, targets, mode, lora_a, lora_b, lora_scale, bias)
        cd = compute_dtype_of(weight.dtype)
        self.theta0 = torch.zeros(P, dtype=cd, device=weight.device)
        p0, self._vjp_fn = torch.func.vjp(self.p_of, self.theta0)
        self.g = residual_target(torch.log(p0), torch.full_like(p0, float(reward)), beta)

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        return torch.func.jvp(self.p_of, (self.theta0,), (v,))[1]

    def vjp(self, u: torch.Tensor) -> torch.Tensor:
        return self._vjp_fn(u)[0]


def torch_func_update(hidden, weight, targets, reward: float, *, mode: str, lora_a=None, lora_b=None,
                      lora_scale: float = defaults.LORA_SCALE, bias=None, beta: float = defaults.BETA,
                      damping: float = defaults.DAMPING, max_iter: int = defaults.MAX_ITER,
                      tol: float = defaults.TOL) -> CGResult:
    """The alternative's whole update: (J^T J + damping I) d = J^T g by Python CG on torch.func products.

    Args (one conversation, as :func:`rosa_ext.rosa_update`): hidden (T, d) and weight
    (V, d) in the model dtype (cast to fp32 -- fp64 stays fp64 -- inside, as part of the
    timed work); targets (T,) int64; reward a float; lora_a (d,), lora_b (V,) or None.
    Returns the CG result: ``x`` is the flat update, (P,) fp32 (P = d + V lora, d hidden);
    ``iterations`` CG iterations (<= max_iter).
    Memory: the T x V logits, softmax and tangents live at once (the vjp closure keeps
    the forward graph for the whole solve), O(T V) floats.
    """
    op = TorchFuncOperator(hidden, weight, targets, reward, mode=mode, lora_a=lora_a, lora_b=lora_b,
                           lora_scale=lora_scale, bias=bias, beta=beta)
    rhs = op.vjp(op.g)
    return cg_python(lambda v: op.vjp(op.jvp(v)), rhs, damping=damping, max_iter=max_iter, tol=tol)
