"""The solvers of the damped least-squares problem (MATH.md sections 1 and 4).

- :func:`solve_dual`: the exact step ``d = J^T (J J^T + lambda I)^{-1} g`` on the backend's
  one-pass primitives. Hidden mode: ONE pass (lse and pi W), the explicit T x d rows of J, then per
  conversation the smaller of the T_b x T_b dual and the d x d primal system (the same step).
  LoRA mode: ONE pass (lse, pi . b and the centred Gram of every conversation), the T_b x T_b
  system assembled in place, one VJP over the probability tiles kept by the pass (or one
  streaming pass when they do not fit ``keep_budget_bytes``; a batch that keeps them runs in
  groups of conversations). Every conversation's solve is checked (one host sync) and an
  ill-conditioned one re-solved in float64 (:func:`_spectral_hidden`, :func:`_spectral_gram`).
- :func:`solve_cg_hidden`: hidden-mode CG on the explicit T x d Jacobian (the same one pass, then CG
  iterations on J only: no pass over W per iteration).
- :func:`solve_cg`: matrix-free CG (one JVP + one VJP pass per iteration; LoRA mode).
- :func:`choose_plan`, :func:`choose_solver`, :func:`solver_costs`: ``solver="auto"``
  (:mod:`rosa_ext.core.cost_model`); :func:`run`: the whole solve of a packed problem.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Callable, Dict, List, Optional, Sequence, Tuple, Union

import torch

from ..cg import cg as default_cg
from ..common import defaults
from ..common import jacobian as J
from ..common import validation as V
from ..common.types import CGResult, GramPass, HeadProblem, HeadStats, HiddenPass
from ..common.validation import RosaNonFiniteError, RosaNumericalError
from . import cost_model
from .operator import RosaOperator
from .problem import sub_problem

WHO = "rosa_update"

Scalar = Union[int, float, torch.Tensor]
#: A CG implementation: ``cg(matvec, b, *, damping, max_iter, tol) -> CGResult`` (rosa_ext.cg).
CGImpl = Callable[..., CGResult]

#: The dual's Cholesky solve is accepted for a conversation when the relative residual of its
#: normal equations is at most this (by compute dtype); a conversation over it, or one whose
#: factorisation failed or gave NaN/Inf, is re-solved in float64 (MATH.md section 4).
DUAL_RESIDUAL_LIMIT = {torch.float32: 1e-4, torch.float64: 1e-10}


@dataclass
class Solved:
    """One solved update: ``update`` (B, P), per token ``logp`` and ``target`` (N,), CG
    ``iterations`` (0 for the dual) and the relative ``residual`` of the normal equations."""

    update: torch.Tensor
    logp: torch.Tensor
    target: torch.Tensor
    iterations: Scalar
    residual: Scalar


# ----------------------------------------------------------------------------- choosing
def choose_plan(prob: HeadProblem, backend: str = "torch", solver: Optional[str] = None) -> cost_model.Plan:
    """The plan of ``prob`` (``solver``, default ``prob.solver``: "auto" by the cost model;
    "dual"/"cg" as asked, the LoRA dual keeping its tiles or not by the same rules). The global V
    decides, so every rank of a vocabulary-parallel head takes the same plan."""
    return cost_model.choose(prob.mode, prob.lengths, prob.hidden_size, prob.global_vocab_size,
                             max_iter=prob.max_iter, keep_budget_bytes=prob.keep_budget_bytes,
                             gram_budget_bytes=prob.gram_budget_bytes, backend=backend, device=prob.device.type,
                             dtype=prob.compute_dtype, model_dtype=prob.weight.dtype,
                             solver=prob.solver if solver is None else solver)


def choose_solver(prob: HeadProblem, backend: str = "torch") -> str:
    """"dual" or "cg": what ``solver="auto"`` runs for ``prob`` (:func:`choose_plan`)."""
    return choose_plan(prob, backend, solver="auto").solver


def solver_costs(mode: str, lengths: Sequence[int], d: int, V: int, max_iter: int, *, backend: str = "torch",
                 device: str = "cpu", dtype: torch.dtype = torch.float32,
                 keep_budget_bytes: int = defaults.KEEP_BUDGET_BYTES,
                 gram_budget_bytes: int = defaults.GRAM_BUDGET_BYTES) -> Dict[str, float]:
    """Estimated seconds of each solver (:mod:`rosa_ext.core.cost_model`): ``dual`` (LoRA: keeping
    the tiles when the budget allows and it is cheaper, else streaming), ``cg``, and every plan."""
    plan = cost_model.choose(mode, lengths, d, V, max_iter=max_iter, keep_budget_bytes=keep_budget_bytes,
                             gram_budget_bytes=gram_budget_bytes, backend=backend, device=device, dtype=dtype,
                             solver="dual")
    est = dict(plan.estimates)
    if mode == "lora":
        est["dual"] = est["dual-keep" if plan.keep else "dual-stream"]
    return est


# ----------------------------------------------------------------------------- shared pieces
def _linearize(prob: HeadProblem, backend, ps, check: bool = True) -> RosaOperator:
    """The operator at the current parameters from a one-pass primitive's per-token results (no
    stats pass). ``check``: that the logits were finite, here (one host sync); the dual folds it
    into the sync of its acceptance test instead (:func:`_accept`)."""
    by = None if prob.lora_b is None else backend.gather_targets(prob, prob.lora_b)
    pib = None
    if ps.pib_off is not None:
        pib = ps.pib_off + torch.exp(ps.logp) * by  # pi . b = r . b + p b[y]
    st = HeadStats(lse=ps.lse, logp=ps.logp, ah=ps.ah, pib=pib)
    if check:
        V.finite_logits(WHO, prob.compute_dtype, st.lse, st.logp)
    return RosaOperator(prob, backend, stats=st, by=by)


def _logits_finite(op: RosaOperator) -> torch.Tensor:
    """Whether the pass's log-sum-exp and log p_t are finite (what :func:`V.finite_logits` checks)."""
    return V.all_finite(op.stats.lse) & V.all_finite(op.stats.logp)


def _relative_ridge(prob: HeadProblem, diag_mean: torch.Tensor) -> torch.Tensor:
    """``damping_mode="relative"``: ``damping`` times the mean of a conversation's Gram diagonal
    (MATH.md section 6; a zero J keeps ``damping``). No host sync."""
    return torch.where(diag_mean > 0, prob.damping * diag_mean, torch.full_like(diag_mean, prob.damping))


def _factor_solve(A: torch.Tensor, rhs: torch.Tensor, lam) -> Tuple[torch.Tensor, torch.Tensor]:
    """(A + lam I)^{-1} rhs by Cholesky for symmetric A (restored up to rounding afterwards). One
    allocation of A's size (the factor); the triangular solves work in place. Returns (x, info)."""
    A.diagonal().add_(lam)
    L, info = torch.linalg.cholesky_ex(A)
    A.diagonal().sub_(lam)
    x = rhs.clone().unsqueeze(1)
    torch.linalg.solve_triangular(L, x, upper=False, out=x)
    torch.linalg.solve_triangular(L.mT, x, upper=True, out=x)
    return x.squeeze(1), info


def _dual_check(G0: torch.Tensor, g: torch.Tensor, alpha: torch.Tensor, lam, info: torch.Tensor
                ) -> Tuple[torch.Tensor, torch.Tensor, torch.Tensor]:
    """(||J^T e||^2, ||J^T g||^2, flags) of a dual solve, e = g - (G0 + lam I) alpha: the residual of
    the normal equations from the Gram matrix (MATH.md section 4); flags = [factored, G0 finite]. A
    NaN/Inf alpha makes the residual NaN, which fails the acceptance test."""
    e = g - G0 @ alpha - lam * alpha
    num = (e @ (G0 @ e)).clamp_min(0)
    den = (g @ (G0 @ g)).clamp_min(0)
    return num, den, torch.stack([info == 0, V.all_finite(G0)])


def _accept(prob: HeadProblem, nums: List[torch.Tensor], dens: List[torch.Tensor], flags: List[torch.Tensor],
            logits_finite: torch.Tensor) -> List[int]:
    """The conversations whose solve must be redone in float64 (one host sync for all of them, which
    also reads whether the pass's logits were finite). Raises for non-finite logits or Jacobian."""
    limit = DUAL_RESIDUAL_LIMIT[prob.compute_dtype]
    num, den, fl = torch.stack(nums), torch.stack(dens), torch.stack(flags)
    good = fl[:, 0] & (num <= (limit * limit) * den)
    B = len(nums)
    both = torch.cat([good, fl[:, 1], logits_finite.reshape(1)]).tolist()  # the one host sync of the check
    good_list, finite_list = both[:B], both[B:2 * B]
    if not both[-1]:
        V.nonfinite_logits(WHO, prob.compute_dtype)
    if not all(finite_list):
        V.nonfinite_jacobian(WHO)
    return [b for b, ok in enumerate(good_list) if not ok]


def _not_finite(prob: HeadProblem) -> RosaNumericalError:
    return RosaNumericalError(f"rosa_update: the dual solve gave NaN/Inf even in float64 (damping="
                              f"{prob.damping:g}); check the scale of the inputs", "damping")


def _spectral_hidden(Jb: torch.Tensor, gb: torch.Tensor, lam: float, eps: float
                     ) -> Tuple[torch.Tensor, float, float]:
    """Hidden mode's float64 fallback (MATH.md section 4): from the SVD J = U diag(s) V^T (s above
    max(T, d) eps s_max), alpha = U diag(1 / (s^2 + lambda)) U^T g and delta = J^T alpha.
    Returns (delta float64, ||J^T e||^2, ||J^T g||^2)."""
    J64, g64 = Jb.to(torch.float64), gb.to(torch.float64)
    U, S, _ = torch.linalg.svd(J64, full_matrices=False)
    keep = S > max(J64.shape) * eps * S.max()
    U, mu = U[:, keep], S[keep] ** 2
    alpha = U @ ((U.T @ g64) / (mu + lam))
    e = g64 - J64 @ (J64.T @ alpha) - lam * alpha
    return J64.T @ alpha, float((J64.T @ e).square().sum()), float((J64.T @ g64).square().sum())


def _spectral_gram(G0: torch.Tensor, gb: torch.Tensor, lam: float, eps: float) -> torch.Tensor:
    """LoRA mode's float64 fallback: from the eigendecomposition of J J^T (eigenvalues above
    T eps mu_max), alpha = U diag(1 / (mu + lambda)) U^T g -> alpha (float64)."""
    mu, U = torch.linalg.eigh(G0.to(torch.float64))
    keep = mu > G0.shape[0] * eps * mu.max().clamp_min(0)
    U, mu = U[:, keep], mu[keep]
    return U @ ((U.T @ gb.to(torch.float64)) / (mu + lam))


def _relative_residual(num: torch.Tensor, den: torch.Tensor) -> torch.Tensor:
    return torch.where(den > 0, torch.sqrt(num / den.clamp_min(torch.finfo(den.dtype).tiny)), 0.0)


# ----------------------------------------------------------------------------- the dual solve
def _hidden_rows(prob: HeadProblem, backend, op: RosaOperator, hp: HiddenPass) -> torch.Tensor:
    w_y = backend.target_rows(prob, prob.weight).to(prob.compute_dtype)
    return J.hidden_rows_from_pass(op.lin, hp, w_y)


def _dual_hidden(prob: HeadProblem, backend) -> Solved:
    hp = backend.hidden_pass(prob)
    op = _linearize(prob, backend, hp, check=False)
    rows = _hidden_rows(prob, backend, op, hp)
    del hp
    g, off, d = op.g, prob.offsets, prob.hidden_size
    B = prob.num_conversations
    update = torch.empty(B, d, dtype=prob.compute_dtype, device=prob.device)
    nums, dens, flags, lams = [], [], [], []
    absolute = prob.damping_mode == "absolute"
    for b in range(B):
        Jb, gb = rows[off[b]:off[b + 1]], g[off[b]:off[b + 1]]
        lam = prob.damping if absolute else _relative_ridge(prob, Jb.square().sum() / Jb.shape[0])
        lams.append(lam)
        if Jb.shape[0] <= d:  # the dual: J^T (J J^T + lam I)^{-1} g, T_b x T_b
            G0 = Jb @ Jb.T
            alpha, info = _factor_solve(G0, gb, lam)
            num, den, fl = _dual_check(G0, gb, alpha, lam, info)
            torch.mv(Jb.T, alpha, out=update[b])
        else:  # the same step, primal: (J^T J + lam I)^{-1} J^T g, d x d
            A0 = Jb.T @ Jb
            rhs = Jb.T @ gb
            delta, info = _factor_solve(A0, rhs, lam)
            res = rhs - A0 @ delta - lam * delta
            num, den = res @ res, rhs @ rhs
            # ||delta - delta*|| <= ||res|| / lam (A0 is PSD): a bound on the error itself. The
            # residual alone would miss a component in the null space of J (rank-deficient J, tiny
            # damping), which the dual form cannot produce (its step is J^T alpha).
            limit = DUAL_RESIDUAL_LIMIT[prob.compute_dtype]
            fine = num <= (limit * limit) * (lam * lam) * (delta @ delta)
            fl = torch.stack([(info == 0) & fine, V.all_finite(A0)])
            update[b] = delta
        nums.append(num)
        dens.append(den)
        flags.append(fl)
    eps = torch.finfo(prob.compute_dtype).eps
    for b in _accept(prob, nums, dens, flags, _logits_finite(op)):
        delta, nb, db = _spectral_hidden(rows[off[b]:off[b + 1]], g[off[b]:off[b + 1]], float(lams[b]), eps)
        if not bool(V.all_finite(delta)):
            raise _not_finite(prob)
        update[b] = delta.to(update.dtype)
        nums[b] = torch.tensor(nb, dtype=update.dtype, device=update.device)
        dens[b] = torch.tensor(db, dtype=update.dtype, device=update.device)
    res = _relative_residual(sum(nums), sum(dens))
    return Solved(update, op.stats.logp, g, 0, res)


def _dual_lora_group(prob: HeadProblem, backend, keep: bool) -> Tuple[Solved, torch.Tensor, torch.Tensor]:
    """The LoRA dual of one group of conversations -> (Solved with the residual unset, sum of the
    residual numerators, sum of the denominators)."""
    gp: GramPass = backend.lora_gram_pass(prob, keep=keep)
    op = _linearize(prob, backend, gp, check=False)
    ca, cb = J.lora_factors_from_pass(op.lin, gp)
    h, g, off = op.lin.h, op.g, prob.offsets
    B, d, Vl = prob.num_conversations, prob.hidden_size, prob.vocab_size
    cd, dev = prob.compute_dtype, prob.device
    update = torch.empty(B, d + Vl, dtype=cd, device=dev)
    wcol = torch.empty(prob.num_tokens, dtype=cd, device=dev)
    nums, dens, flags, lams = [], [], [], []
    absolute = prob.damping_mode == "absolute"
    for b in range(B):
        lo, hi = off[b], off[b + 1]
        M = gp.gram[b]  # (e_y - pi_t).(e_y - pi_u), made J J^T in place
        cbk = cb[lo:hi]
        M.mul_(cbk.unsqueeze(1)).mul_(cbk.unsqueeze(0))
        Ja = ca[lo:hi].unsqueeze(1) * h[lo:hi]
        M.addmm_(Ja, Ja.T)
        lam = prob.damping if absolute else _relative_ridge(prob, M.diagonal().mean())
        alpha, info = _factor_solve(M, g[lo:hi], lam)
        num, den, fl = _dual_check(M, g[lo:hi], alpha, lam, info)
        torch.mv(Ja.T, alpha, out=update[b, :d])
        wcol[lo:hi] = alpha * cbk
        nums.append(num)
        dens.append(den)
        flags.append(fl)
        lams.append(lam)
    eps = torch.finfo(cd).eps
    for b in _accept(prob, nums, dens, flags, _logits_finite(op)):
        lo, hi = off[b], off[b + 1]
        alpha = _spectral_gram(gp.gram[b], g[lo:hi], float(lams[b]), eps)
        if not bool(V.all_finite(alpha)):
            raise _not_finite(prob)
        alpha = alpha.to(cd)
        Ja = ca[lo:hi].unsqueeze(1) * h[lo:hi]
        torch.mv(Ja.T, alpha, out=update[b, :d])
        wcol[lo:hi] = alpha * cb[lo:hi]
        nums[b], dens[b], _ = _dual_check(gp.gram[b], g[lo:hi], alpha, lams[b], torch.zeros((), dtype=torch.int32))
    gp.gram = []  # free the T x T matrices before the VJP
    backend.centered_column_reduce(prob, gp, wcol, out=update[:, d:])
    return Solved(update, op.stats.logp, g, 0, 0.0), sum(nums), sum(dens)


def _dual_lora(prob: HeadProblem, backend, keep: bool) -> Solved:
    groups = cost_model.keep_groups(prob.lengths) if keep else [(0, prob.num_conversations)]
    parts = [_dual_lora_group(sub_problem(prob, b0, b1), backend, keep) for b0, b1 in groups]
    if len(parts) == 1:
        s, num, den = parts[0]
        s.residual = _relative_residual(num, den)
        return s
    num = torch.stack([p[1] for p in parts]).sum()
    den = torch.stack([p[2] for p in parts]).sum()
    return Solved(torch.cat([p[0].update for p in parts]), torch.cat([p[0].logp for p in parts]),
                  torch.cat([p[0].target for p in parts]), 0, _relative_residual(num, den))


def solve_dual(prob: HeadProblem, backend, keep: bool = False) -> Solved:
    """The exact dual solve on the one-pass primitives (module doc; MATH.md section 4).

    ``keep`` (LoRA mode): keep the probability tiles between the pass and the VJP. Each
    conversation's solve is accepted when it factored, is finite and its relative residual
    ``sqrt(e^T G e / g^T G g)`` (G = J J^T, e = g - (G + lambda I) alpha; in the primal form the
    residual of the d x d system) is at most :data:`DUAL_RESIDUAL_LIMIT`; the others are re-solved
    in float64 from a spectral decomposition -- one host sync, no further pass over W.
    """
    if prob.mode == "hidden":
        return _dual_hidden(prob, backend)
    return _dual_lora(prob, backend, keep)


# ----------------------------------------------------------------------------- CG
def _run_cg(cg: CGImpl, matvec, rhs: torch.Tensor, damping: float, prob: HeadProblem) -> CGResult:
    try:
        return cg(matvec, rhs, damping=damping, max_iter=prob.max_iter, tol=prob.tol)
    except RosaNonFiniteError as e:
        if e.argument != "b":
            raise
        V.nonfinite_jacobian(WHO)  # the right-hand side J^T g: the inputs, not the solve


def solve_cg_hidden(prob: HeadProblem, backend, cg: Optional[CGImpl] = None) -> Solved:
    """Hidden-mode CG on the explicit T x d Jacobian: the one pass of :meth:`hidden_pass` gives J,
    then each CG iteration is ``J^T (J v)`` (4 N d flops), no pass over W."""
    cg = default_cg if cg is None else cg
    hp = backend.hidden_pass(prob)
    op = _linearize(prob, backend, hp)
    rows = _hidden_rows(prob, backend, op, hp)
    del hp
    B, d, seg = prob.num_conversations, prob.hidden_size, prob.seg
    rhs = op.segment_sum(op.g.unsqueeze(1) * rows)

    def jtj(v2: torch.Tensor) -> torch.Tensor:
        if B == 1:
            return (rows.T @ (rows @ v2[0])).unsqueeze(0)
        return op.segment_sum((rows * v2[seg]).sum(1, keepdim=True) * rows)

    if prob.damping_mode == "absolute":
        damping = prob.damping

        def matvec(v: torch.Tensor) -> torch.Tensor:
            return jtj(v.reshape(B, d)).reshape(-1)
    else:  # one ridge per conversation (MATH.md section 6): inside the matvec, CG's own damping 0
        damping, lam = 0.0, op.ridge((rows * rows).sum(1)).unsqueeze(1)

        def matvec(v: torch.Tensor) -> torch.Tensor:
            v2 = v.reshape(B, d)
            return (jtj(v2) + lam * v2).reshape(-1)

    res = _run_cg(cg, matvec, rhs.reshape(-1), damping, prob)
    return Solved(res.x.reshape(B, d), op.stats.logp, op.g, res.iterations, res.residual)


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

    res = _run_cg(cg, matvec, rhs, damping, prob)
    return res.x.reshape(B, P), res.iterations, res.residual


def run(prob: HeadProblem, backend, plan: cost_model.Plan, cg: Optional[CGImpl] = None) -> Solved:
    """The solve of ``plan`` on a packed problem (the whole update after packing)."""
    if plan.solver == "dual":
        return solve_dual(prob, backend, keep=plan.keep)
    if prob.mode == "hidden":
        return solve_cg_hidden(prob, backend, cg)
    op = RosaOperator(prob, backend)
    V.finite_logits(WHO, prob.compute_dtype, op.stats.lse, op.stats.logp)
    upd, iters, res = solve_cg(op, cg)
    return Solved(upd, op.stats.logp, op.g, iters, res)
