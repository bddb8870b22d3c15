"""The two solvers of the damped least-squares problem (ROSA_SPEC.md sections 1 and 4).

- ``solve_cg``:   (J^T J + lambda I) d = J^T g, matrix-free, one JVP + one VJP per iteration
- ``solve_dual``: d = J^T (J J^T + lambda I)^{-1} g, exact, via the T x T Gram matrix
- ``choose_solver``: the cost model behind ``solver="auto"`` (README, "Choosing a solver")
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple, Union

import torch

from ._problem import HeadProblem
from .cg import cg
from .jacobian import RosaOperator

#: Above this many tokens in one conversation the T x T Gram matrix is not
#: formed (T^2 memory, T^3 Cholesky) and "auto" uses CG.
DUAL_MAX_TOKENS = 4096

Scalar = Union[int, float, torch.Tensor]


def choose_solver(prob: HeadProblem) -> str:
    """Pick "dual" or "cg" by estimated flops.

    CG costs a stats pass (2NdV) plus ``max_iter`` iterations of a row and a
    column pass (4NdV). The dual costs the stats pass, one pass for the Gram
    matrix (hidden: pi W, 4NdV; lora: pi pi^T, 2NdV + 2 sum_b T_b^2 V), one
    VJP (lora, 2NdV) and a Cholesky (sum_b T_b^3 / 3). Ties go to the dual,
    which is exact.
    """
    N, d, V = prob.num_tokens, prob.hidden_size, prob.vocab_size
    lens = [prob.offsets[i + 1] - prob.offsets[i] for i in range(prob.num_conversations)]
    if max(lens) > DUAL_MAX_TOKENS:
        return "cg"
    sq = sum(t * t for t in lens)
    chol = sum(t ** 3 for t in lens) / 3
    if prob.mode == "hidden":
        dual = 4 * N * d * V + 2 * sq * d + chol
    else:
        dual = 2 * N * d * V + 2 * sq * V + 2 * sq * d + 2 * N * d * V + chol
    cg_cost = max(1, prob.max_iter) * 4 * N * d * V
    return "dual" if dual <= cg_cost else "cg"


def solve_cg(op: RosaOperator, cg_impl: Optional[Callable] = None) -> Tuple[torch.Tensor, Scalar, Scalar]:
    """Matrix-free CG on the normal equations. Returns (update (B, P), iterations, residual).

    ``cg_impl``: the CG function (signature of :func:`rosa_ext.cg.cg`); None: :func:`rosa_ext.cg.cg`.
    """
    prob = op.prob
    B, P = prob.num_conversations, prob.num_params
    rhs = op.vjp(op.g).reshape(-1)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        return op.vjp(op.jvp(v.reshape(B, P))).reshape(-1)

    res = (cg if cg_impl is None else cg_impl)(matvec, rhs, damping=prob.damping, max_iter=prob.max_iter,
                                                tol=prob.tol)
    return res.x.reshape(B, P), res.iterations, res.residual


def solve_dual(op: RosaOperator) -> Tuple[torch.Tensor, int, torch.Tensor]:
    """Exact dual solve. Returns (update (B, P), 0 iterations, relative residual).

    The residual of the normal equations is J^T e with e = g - (J J^T + lambda I) alpha,
    so its norm is sqrt(e^T (J J^T) e): it comes from the Gram matrix for free.
    """
    prob = op.prob
    rows = op.jacobian_rows()
    G0 = op.gram(rows)
    B, Tm = G0.shape[0], G0.shape[1]
    eye = torch.eye(Tm, dtype=G0.dtype, device=G0.device)
    G = G0 + prob.damping * eye
    # padding rows/cols of short conversations: make them identity so the factor exists
    lens = torch.tensor([prob.offsets[i + 1] - prob.offsets[i] for i in range(B)], device=G0.device)
    pad = torch.arange(Tm, device=G0.device).unsqueeze(0) >= lens.unsqueeze(1)
    G = G + torch.diag_embed(pad.to(G.dtype))
    gpad = op.pack(op.g)
    L, info = torch.linalg.cholesky_ex(G)
    if bool((info != 0).any()):
        alpha = torch.linalg.solve(G, gpad.unsqueeze(-1)).squeeze(-1)
    else:
        alpha = torch.cholesky_solve(gpad.unsqueeze(-1), L).squeeze(-1)
    alpha = alpha.masked_fill(pad, 0.0)
    if not bool(torch.isfinite(alpha).all()):
        raise FloatingPointError("rosa_update: the dual solve produced NaN/Inf "
                                 "(check the inputs' scale or raise `damping`)")
    a_packed = op.unpack(alpha)
    if prob.mode == "hidden":
        update = op._segment_sum(a_packed.unsqueeze(1) * rows)
    else:
        update = op.vjp(a_packed)
    e = gpad - (G0 @ alpha.unsqueeze(-1)).squeeze(-1) - prob.damping * alpha
    e = e.masked_fill(pad, 0.0)
    num = torch.einsum("bt,btu,bu->", e, G0, e).clamp_min(0)
    den = torch.einsum("bt,btu,bu->", gpad, G0, gpad).clamp_min(0)
    residual = torch.where(den > 0, torch.sqrt(num / torch.where(den > 0, den, 1)), torch.zeros_like(den))
    return update, 0, residual
