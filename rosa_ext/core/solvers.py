"""The two solvers of the damped least-squares problem (MATH.md sections 1 and 4).

- ``solve_cg``:   (J^T J + lambda I) d = J^T g, matrix-free, one JVP + one VJP per iteration
- ``solve_dual``: d = J^T (J J^T + lambda I)^{-1} g, exact, via the T x T Gram matrix
- ``choose_solver``: the cost model behind ``solver="auto"`` (README, "Choosing a solver")
"""
from __future__ import annotations

from typing import Callable, Dict, Optional, Sequence, Tuple, Union

import torch

from ..cg import cg as default_cg
from ..common import validation as V
from ..common.types import CGResult, HeadProblem
from ..common.validation import RosaNonFiniteError, RosaNumericalError
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
    if prob.damping_mode == "absolute":
        damping = prob.damping

        def matvec(v: torch.Tensor) -> torch.Tensor:
            return op.vjp(op.jvp(v.reshape(B, P))).reshape(-1)
    else:  # one ridge per conversation (MATH.md section 6): added inside the matvec, CG's own damping 0
        damping, lam = 0.0, op.ridge().unsqueeze(1)

        def matvec(v: torch.Tensor) -> torch.Tensor:
            v2 = v.reshape(B, P)
            return (op.vjp(op.jvp(v2)) + lam * v2).reshape(-1)

    try:
        res = cg(matvec, rhs, damping=damping, max_iter=prob.max_iter, tol=prob.tol)
    except RosaNonFiniteError as e:
        if e.argument != "b":
            raise
        V.nonfinite_jacobian("rosa_update")  # the right-hand side J^T g: the inputs, not the solve
    return res.x.reshape(B, P), res.iterations, res.residual


#: The dual's Cholesky solve is accepted for a conversation when the relative residual of its
#: normal equations is at most this (by compute dtype); a conversation over it, or one whose
#: factorisation failed or gave NaN/Inf, is re-solved by :func:`_spectral_alpha` (MATH.md section 4).
DUAL_RESIDUAL_LIMIT = {torch.float32: 1e-4, torch.float64: 1e-10}


def _residual_parts(G0: torch.Tensor, g: torch.Tensor, alpha: torch.Tensor, lam: torch.Tensor,
                    pad: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """Per conversation ``(||J^T e||^2, ||J^T g||^2)`` with ``e = g - (G0 + lambda_b I) alpha``, from G0
    (``lam`` (B,): each conversation's ridge)."""
    e = g - (G0 @ alpha.unsqueeze(-1)).squeeze(-1) - lam.unsqueeze(1) * alpha
    e = e.masked_fill(pad, 0.0)
    num = torch.einsum("bt,btu,bu->b", e, G0, e).clamp_min(0)
    den = torch.einsum("bt,btu,bu->b", g, G0, g).clamp_min(0)
    return num, den


def _spectral_alpha(op: RosaOperator, rows: torch.Tensor, G0: torch.Tensor, g: torch.Tensor, b: int, lam: float
                    ) -> Tuple[torch.Tensor, Optional[Tuple[float, float]]]:
    """The fallback of the dual solve for conversation ``b``, in float64 (MATH.md section 4).

    alpha = U diag(1 / (mu + lambda)) U^T g over the numerically nonzero part of J J^T = U diag(mu) U^T:
    hidden mode from the SVD of the explicit T_b x d rows of J (mu = s^2, s > max(T_b, d) eps s_max),
    lora mode from the eigendecomposition of the Gram matrix (mu > T_b eps mu_max); eps is the compute
    dtype's. The directions dropped are those J J^T cannot resolve in the compute dtype (a rank-deficient
    J: T > d in hidden mode, repeated tokens); J^T maps them to zero up to rounding, so delta = J^T alpha is
    the damped least-squares step, for any damping > 0. Returns (alpha (Tmax,) compute dtype, and in
    hidden mode the exact residual parts (||J^T e||^2, ||J^T g||^2) from the rows, else None).
    """
    prob = op.prob
    n = prob.lengths[b]
    eps = torch.finfo(prob.compute_dtype).eps
    gb = g[b, :n].to(torch.float64)
    parts = None
    if prob.mode == "hidden":
        Jb = rows[prob.offsets[b]:prob.offsets[b + 1]].to(torch.float64)
        U, S, _ = torch.linalg.svd(Jb, full_matrices=False)
        keep = S > max(Jb.shape) * eps * S.max()
        U, mu = U[:, keep], S[keep] ** 2
    else:
        mu, U = torch.linalg.eigh(G0[b, :n, :n].to(torch.float64))
        keep = mu > n * eps * mu.max().clamp_min(0)
        U, mu = U[:, keep], mu[keep]
    alpha = torch.zeros(g.shape[1], dtype=g.dtype, device=g.device)
    alpha[:n] = (U @ ((U.T @ gb) / (mu + lam))).to(g.dtype)
    if prob.mode == "hidden":  # the residual of the alpha returned (compute dtype), in float64
        ab = alpha[:n].to(torch.float64)
        e = gb - Jb @ (Jb.T @ ab) - lam * ab
        parts = (float((Jb.T @ e).square().sum()), float((Jb.T @ gb).square().sum()))
    return alpha, parts


def solve_dual(op: RosaOperator) -> Tuple[torch.Tensor, int, torch.Tensor]:
    """Exact dual solve. Returns (update (B, P), 0 iterations, relative residual).

    The residual of the normal equations is J^T e with e = g - (J J^T + lambda I) alpha,
    so its norm is sqrt(e^T (J J^T) e): it comes from the Gram matrix for free. It is also the
    acceptance test of the Cholesky solve: a conversation whose factorisation fails, gives NaN/Inf
    or leaves a relative residual above :data:`DUAL_RESIDUAL_LIMIT` (J J^T + lambda I ill-conditioned:
    a tiny damping and a rank-deficient J) is re-solved in float64 by :func:`_spectral_alpha`.
    Well-conditioned problems pay one host sync for the test and nothing else.
    """
    prob = op.prob
    rows = op.jacobian_rows()
    G0 = op.gram(rows)
    Tm = G0.shape[1]
    eye = torch.eye(Tm, dtype=G0.dtype, device=G0.device)
    # the ridge of each conversation; relative damping reads ||J_t||^2 off the Gram diagonal (section 6)
    lam = op.ridge(op.unpack(G0.diagonal(dim1=1, dim2=2)) if prob.damping_mode == "relative" else None)
    G = G0 + lam.view(-1, 1, 1) * eye
    # padding rows/cols of short conversations: make them identity so the factor exists
    lens = torch.tensor(prob.lengths, device=G0.device)
    pad = torch.arange(Tm, device=G0.device).unsqueeze(0) >= lens.unsqueeze(1)
    G = G + torch.diag_embed(pad.to(G.dtype))
    gpad = op.pack(op.g)
    L, info = torch.linalg.cholesky_ex(G)
    alpha = torch.cholesky_solve(gpad.unsqueeze(-1), L).squeeze(-1)
    alpha = alpha.masked_fill(pad, 0.0)
    num, den = _residual_parts(G0, gpad, alpha, lam, pad)
    limit = DUAL_RESIDUAL_LIMIT[G0.dtype]
    ok = (info == 0) & torch.isfinite(alpha).all(1) & (num <= (limit * limit) * den)
    finite = torch.isfinite(G0).flatten(1).all(1)
    ok_list, finite_list = torch.stack([ok, finite]).tolist()  # the one host sync of the acceptance test
    if not all(finite_list):
        V.nonfinite_jacobian("rosa_update")
    bad = [b for b, good in enumerate(ok_list) if not good]
    if bad:
        alpha = alpha.clone()
        exact = {}
        for b in bad:
            alpha[b], parts = _spectral_alpha(op, rows, G0, gpad, b, float(lam[b]))
            if parts is not None:
                exact[b] = parts
        if not bool(torch.isfinite(alpha).all()):
            raise RosaNumericalError(f"rosa_update: the dual solve gave NaN/Inf even in float64 (damping="
                                     f"{prob.damping:g}); check the scale of the inputs", "damping")
        num, den = _residual_parts(G0, gpad, alpha, lam, pad)
        for b, (nb, db) in exact.items():
            num[b], den[b] = nb, db
    a_packed = op.unpack(alpha)
    if prob.mode == "hidden":
        update = op.segment_sum(a_packed.unsqueeze(1) * rows)
    else:
        update = op.vjp(a_packed)
    num, den = num.sum(), den.sum()
    residual = torch.where(den > 0, torch.sqrt(num / torch.where(den > 0, den, 1)), torch.zeros_like(den))
    return update, 0, residual
