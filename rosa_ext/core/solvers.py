"""The two solvers of the damped least-squares problem (MATH.md sections 1 and 4).

- ``solve_cg``:   (J^T J + lambda I) d = J^T g, matrix-free, one JVP + one VJP per iteration
- ``solve_dual``: d = J^T (J J^T + lambda I)^{-1} g, exact, via the T x T Gram matrix
- ``choose_solver``: the cost model behind ``solver="auto"`` (README, "Choosing a solver")
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch

from ..cg import cg as default_cg
from ..common.types import CGResult, HeadProblem
from .operator import RosaOperator

#: Above this many tokens in one conversation the T x T Gram matrix is not
#: formed (T^2 memory, T^3 Cholesky) and "auto" uses CG.
DUAL_MAX_TOKENS = 4096

Scalar = Union[int, float, torch.Tensor]
#: A CG implementation: ``cg(matvec, b, *, damping, max_iter, tol) -> CGResult`` (rosa_ext.cg).
CGImpl = Callable[..., CGResult]


def solver_costs(mode: str, lengths: Sequence[int], d: int, V: int, max_iter: int) -> Dict[str, float]:
    """Estimated flops of each solver beyond the shared stats pass (MATH.md section 4).

    CG: ``max_iter`` iterations of a row and a column pass (4NdV). Dual: one pass for the
    Gram matrix (hidden: pi W, 4NdV; lora: pi pi^T, 2NdV + 2 sum_b T_b^2 V), one VJP
    (lora, 2NdV) and a Cholesky (sum_b T_b^3 / 3).
    """
    N = sum(lengths)
    sq = sum(t * t for t in lengths)
    chol = sum(t ** 3 for t in lengths) / 3
    if mode == "hidden":
        dual = 4 * N * d * V + 2 * sq * d + chol
    else:
        dual = 2 * N * d * V + 2 * sq * V + 2 * sq * d + 2 * N * d * V + chol
    return {"dual": float(dual), "cg": float(max(1, max_iter) * 4 * N * d * V)}


def choose_solver(prob: HeadProblem) -> str:
    """Pick "dual" or "cg" by :func:`solver_costs`; ties go to the dual, which is exact.

    Conversations longer than :data:`DUAL_MAX_TOKENS` always take CG.
    """
    lens = prob.lengths
    if max(lens) > DUAL_MAX_TOKENS:
        return "cg"
    cost = solver_costs(prob.mode, lens, prob.hidden_size, prob.global_vocab_size, prob.max_iter)
    return "dual" if cost["dual"] <= cost["cg"] else "cg"


def solve_cg(op: RosaOperator, cg: Optional[CGImpl] = None) -> Tuple[torch.Tensor, Scalar, Scalar]:
    """Matrix-free CG on the normal equations. Returns (update (B, P), iterations, residual).

    ``cg``: the CG implementation (default :func:`rosa_ext.cg.cg`, compiled when built; e.g.
    :func:`rosa_ext.cg.cg_python` for the Python loop).
    """
    cg = default_cg if cg is None else cg
    prob = op.prob
    B, P = prob.num_conversations, prob.num_params
    rhs = op.vjp(op.g).reshape(-1)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        return op.vjp(op.jvp(v.reshape(B, P))).reshape(-1)

    res = cg(matvec, rhs, damping=prob.damping, max_iter=prob.max_iter, tol=prob.tol)
    return res.x.reshape(B, P), res.iterations, res.residual


def solve_dual(op: RosaOperator) -> Tuple[torch.Tensor, int, torch.Tensor]:
    """Exact dual solve. Returns (update (B, P), 0 iterations, relative residual).

    The residual of the normal equations is J^T e with e = g - (J J^T + lambda I) alpha,
    so its norm is sqrt(e^T (J J^T) e): it comes from the Gram matrix for free.
    """
    prob = op.prob
    rows = op.jacobian_rows()
    G0 = op.gram(rows)
    Tm = G0.shape[1]
    eye = torch.eye(Tm, dtype=G0.dtype, device=G0.device)
    G = G0 + prob.damping * eye
    # padding rows/cols of short conversations: make them identity so the factor exists
    lens = torch.tensor(prob.lengths, device=G0.device)
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
        update = op.segment_sum(a_packed.unsqueeze(1) * rows)
    else:
        update = op.vjp(a_packed)
    e = gpad - (G0 @ alpha.unsqueeze(-1)).squeeze(-1) - prob.damping * alpha
    e = e.masked_fill(pad, 0.0)
    num = torch.einsum("bt,btu,bu->", e, G0, e).clamp_min(0)
    den = torch.einsum("bt,btu,bu->", gpad, G0, gpad).clamp_min(0)
    residual = torch.where(den > 0, torch.sqrt(num / torch.where(den > 0, den, 1)), torch.zeros_like(den))
    return update, 0, residual
