"""Plan "dual", LoRA mode: the exact step in one pass over W, keeping the probability tiles or
streaming them (MATH.md section 4).

Read in order:

1. The pass over W is the engine's (:meth:`~rosa_ext.backends.protocol.Engine.gram_pass`): lse,
   log p_t, log(1 - p_t), r̂_t . b and per conversation ``r̂_t . r̂_u`` and ``r̂_t[y_u]`` (r̂_t: the softmax
   of the logits without the target entry), optionally KEEPING the probability tiles so that the VJP
   is a GEMV over memory instead of a second pass. :func:`center_gram` assembles the centred Gram
   ``(e_{y_t} - r̂_t) . (e_{y_u} - r̂_u) = 1(y_t = y_u) - r̂_u[y_t] - r̂_t[y_u] + r̂_t . r̂_u`` in place: of
   order one however confident the tokens (e_y - pi_t = (1 - p_t)(e_y - r̂_t), the factor 1 - p_t
   carried in log space by the linearisation).
2. :func:`lora_factors` -- the Jacobian algebra: J_t,a = ca_t h_t and J_t,b = cb_t (e_{y_t} - r̂_t).
3. :func:`solve` -- J J^T assembled in place from each conversation's Gram (factors rescaled by a
   power of two first) and Cholesky, the conversations in padded batches (:class:`.dense.Padding`, one
   batch in the usual case, the engine writing the Grams straight into it), one host sync to accept every
   conversation, a float64 re-solve for a rejected one (:mod:`.dense`), then ONE VJP for all of them
   (``engine.centered_vjp``: ``scatter(y, w) - w^T r̂``). A batch that keeps its tiles runs in groups
   (:func:`keep_groups`).
4. :func:`cost_keep`, :func:`cost_stream`, :func:`fits`, :func:`fits_keep` -- its cost formulas and
   memory rules for ``solver="auto"`` (:mod:`.registry`).
"""
from __future__ import annotations

from typing import Dict, List, Sequence, Tuple

import torch

from ..backends.torch_engine import conversation_groups, gram_block
from ..common.config import RosaConfig
from ..common.jacobian import Linearization
from ..common.types import GramPass, HeadProblem, Solved
from . import dense

#: up to this many tokens the same-token term of the LoRA Gram is one vectorised T x T update
SAME_TOKEN_VECTOR_MAX = 512


# ----------------------------------------------------------------------------- 1. the centred Gram
def center_gram(prob: HeadProblem, gp: GramPass) -> None:
    """Turn ``gp.gram`` (r̂_t . r̂_u) into the centred Gram ``(e_{y_t} - r̂_t) . (e_{y_u} - r̂_u)`` of every
    conversation, in place (module doc); ``gp.cross`` is consumed. Nothing to do where the engine centred it
    (``gp.centered``)."""
    if gp.centered:
        return
    off = prob.offsets
    for b in range(prob.num_conversations):
        lo, hi = off[b], off[b + 1]
        M, X = gp.gram[b], gp.cross[b]
        M.sub_(X).sub_(X.T)
        same_token_pairs(M, prob.targets[lo:hi])
    gp.cross = []


# ----------------------------------------------------------------------------- 2. the Jacobian algebra
def lora_factors(lin: Linearization, gp: GramPass) -> Tuple[torch.Tensor, torch.Tensor]:
    """(ca, cb), (N,) each, after one gram pass, in the linearisation's scaled units (``lin.f`` =
    p_t (1 - p_t) e^-shift): J_t,a = ca_t h_t with ca = s f (b[y_t] - r̂_t . b), and J_t,b = cb_t
    (e_{y_t} - r̂_t) with cb = s f (a . h_t) (e_y - pi_t = (1 - p_t)(e_y - r̂_t)). The linearisation's own
    (``lin.ca``, ``lin.cb``: the Triton engine forms them in its linearisation kernel, the same formulas)
    when it has them."""
    if lin.ca is not None and lin.cb is not None:
        return lin.ca, lin.cb
    s = lin.prob.lora_scale
    return s * lin.f * (lin.by - gp.rb), s * lin.f * gp.ah


def jacobian_units(lin: Linearization, ca: torch.Tensor, cb: torch.Tensor) -> torch.Tensor:
    """(B,) the power of two per conversation that brings its J's entries into [1/2, 1) (MATH.md section 6,
    :func:`~rosa_ext.plans.dense.power_of_two_scale`) from the max-norm max(max |ca| max |h_t|, max |cb|):
    the linearisation's ``jmax`` when it has it (one vector op for every conversation), else per conversation."""
    jmax = lin.jmax
    if jmax is None:
        inf, off = float("inf"), lin.prob.offsets  # the max-norm: one reduction for max |x|
        jmax = torch.stack([torch.maximum(torch.linalg.vector_norm(ca[lo:hi], ord=inf)
                                          * torch.linalg.vector_norm(lin.h[lo:hi], ord=inf),
                                          torch.linalg.vector_norm(cb[lo:hi], ord=inf))
                            for lo, hi in zip(off[:-1], off[1:])])
    return dense.power_of_two_scale(jmax)


# ----------------------------------------------------------------------------- 3. the solve
def _solve_group(prob: HeadProblem, cfg: RosaConfig, engine, keep: bool) -> Tuple[Solved, List[float], List[float]]:
    """The LoRA dual of one group of conversations -> (Solved with the residual unset, the conversations'
    residual numerators and denominators, host floats). The T x T algebra of all of them at once, on a padded
    batch (:class:`.dense.Padding`)."""
    gp = engine.gram_pass(prob, keep, cfg.keep_budget_bytes, center=True)
    center_gram(prob, gp)
    lin = engine.linearize(prob, gp, "lora", cfg.beta)
    ca, cb = lora_factors(lin, gp)
    off = prob.offsets
    B, d, Vl = prob.num_conversations, prob.hidden_size, prob.vocab_size
    cd, dev = prob.compute_dtype, prob.weight.device
    update = torch.empty(B, d + Vl, dtype=cd, device=dev)
    wcol = torch.empty(prob.num_tokens, dtype=cd, device=dev)  # the VJP's weights w_t = alpha_t c_t
    # J rescaled by a power of two per conversation (exact; the step is invariant): entries of the Gram are <= 2
    units = jacobian_units(lin, ca, cb)
    facts: List[dense.SolveFacts] = [None] * B
    gs, Jas, cbs, grams = [None] * B, [None] * B, [None] * B, [None] * B  # per conversation: views
    for convs in dense.padded_groups(prob.lengths):  # each group one padded batch (one group, mostly)
        lay = dense.Padding(prob, convs)
        u = lay.select(units).unsqueeze(1)
        cbk = lay.pad(cb) * u  # (G, Tm)
        gb = lay.pad(lin.g) * u
        Ja = (lay.pad(ca) * u).unsqueeze(2) * lay.pad(lin.h)  # (G, Tm, d): J_t,a = ca_t h_t
        whole = lay.whole
        M = gp.padded if whole and gp.padded is not None else lay.pad_matrices([gp.gram[b] for b in convs])
        for b in convs:  # the engine's own copies (if any) go as their group is batched
            gp.gram[b] = None
        M.mul_(cbk.unsqueeze(2)).mul_(cbk.unsqueeze(1))  # (e_y - pi_t).(e_y - pi_u), made J J^T in place
        M.baddbmm_(Ja, Ja.transpose(1, 2))
        lam = dense.ridge(cfg, lay.token_mean(M.diagonal(dim1=1, dim2=2)), lay.select(units), lay.select(lin.shift))
        lay.fill_pad_diagonal(M)
        alpha, factored = dense.factor_solve(M, gb, lam)
        got = dense.dual_checks(M, gb, alpha, lam, factored)
        if B == 1:
            torch.mv(Ja[0].T, alpha[0], out=update[0, :d])
        else:
            lay.scatter(update[:, :d], torch.bmm(alpha.unsqueeze(1), Ja).squeeze(1))
        w = lay.unpad(alpha * cbk)
        if whole:
            wcol = w
        else:
            wcol[lay.token_rows(dev)] = w
        for k, (b, T) in enumerate(zip(convs, lay.lengths)):
            facts[b], gs[b], Jas[b], cbs[b], grams[b] = got[k], gb[k, :T], Ja[k, :T], cbk[k, :T], M[k, :T, :T]
    eps = torch.finfo(cd).eps

    def solve64(b: int) -> torch.Tensor:
        return dense.spectral_gram(grams[b], gs[b], float(facts[b].lam), eps)

    # the b-part of the update (the VJP below) is bounded by sum_t |w_t| (each r̂_t sums to 1): finite with it
    verdict = dense.accept(lin, cfg, facts, [*torch.aminmax(update[:, :d]), wcol.abs().sum()])
    nums, dens, rejected = verdict.nums, verdict.dens, verdict.rejected
    redone = {}  # conversation -> its whole step, re-linearised in float64 (dense.float64_problem)
    if cd != torch.float64:
        for b in rejected:
            redo = solve(dense.float64_problem(prob, b), cfg, engine)
            nums[b] = dens[b] * float(redo.residual) ** 2
            redone[b] = redo.update[0]
            wcol[off[b]:off[b + 1]] = 0  # its float32 alpha plays no part in the VJP below
        rejected = []
    for b, alpha in dense.float64_refinement(cfg, rejected, solve64):
        lo, hi = off[b], off[b + 1]
        alpha = alpha.to(cd)
        torch.mv(Jas[b].T, alpha, out=update[b, :d])
        wcol[lo:hi] = alpha * cbs[b]
        redo = dense.dual_check(grams[b], gs[b], alpha, facts[b].lam, facts[b].factored)
        nums[b], dens[b] = max(float(redo.num), 0.0), max(float(redo.den), 0.0)  # a redo: syncs of its own
    gp.gram, gp.padded, M, grams = [], None, None, []  # free the T x T matrices before the VJP
    # the b-part of J^T alpha: sum_t w_t (e_{y_t} - r̂_t) = scatter(y, w) - sum_t w_t r̂_t (nothing cancels)
    engine.centered_vjp(prob, gp, wcol, out=update[:, d:])
    for b, step in redone.items():
        update[b] = step.to(cd)
    rejected = rejected or list(redone)
    return (Solved(update, lin.stats.logp, lin.target(), 0, 0.0, engine=gp.engine, finite_checked=not rejected),
            nums, dens)


def solve(prob: HeadProblem, cfg: RosaConfig, engine, cg=None, keep: bool = False) -> Solved:
    """The exact LoRA-mode step of every conversation (module doc) -> :class:`~rosa_ext.common.types.Solved`.
    ``keep``: keep the probability tiles between the pass and the VJP (the caller checked the budget)."""
    groups = keep_groups(prob.lengths) if keep else [(0, prob.num_conversations)]
    parts = [_solve_group(prob if len(groups) == 1 else prob.conversations(b0, b1), cfg, engine, keep)
             for b0, b1 in groups]
    nums = [x for p in parts for x in p[1]]
    dens = [x for p in parts for x in p[2]]
    if len(parts) == 1:
        s = parts[0][0]
        s.residual = dense.relative_residual(nums, dens)
        return s
    return Solved(torch.cat([p[0].update for p in parts]), torch.cat([p[0].logp for p in parts]),
                  torch.cat([p[0].target for p in parts]), 0, dense.relative_residual(nums, dens),
                  engine=parts[0][0].engine, finite_checked=all(p[0].finite_checked for p in parts))


def keep_groups(lengths: Sequence[int]) -> List[Tuple[int, int]]:
    """Consecutive conversations grouped so that no group has more rows than the longest one
    (the kept tiles of a batch never exceed those of its longest conversation)."""
    return conversation_groups(lengths, max(1, max(lengths)))


# ----------------------------------------------------------------------------- 4. cost and memory
def _tri(T: int) -> float:
    """Share of the full T x T Gram product the block-triangle Gram computes (:func:`gram_block`)."""
    blk = gram_block(T)
    if T <= blk:
        return 1.0
    nb = -(-T // blk)
    return (nb + 1) / (2 * nb)


def _pass_and_solve(k: Dict[str, float], lengths: Sequence[int], d: int, V: int) -> Tuple[float, float]:
    """(seconds of the pass without its W reads, seconds of the T x T algebra)."""
    R, N = k["gemm"], sum(lengths)
    gram = sum(2 * T * T * V * _tri(T) for T in lengths)
    solve_s = sum(2 * T * T * d / R + T ** 3 / 3 / k["chol"] for T in lengths)
    return (2 * N * d * V + gram) / R + N * V * k["ew_lora"], solve_s


def cost_keep(k: Dict[str, float], lengths: Sequence[int], d: int, V: int, wpass: float, max_iter: int) -> float:
    """Estimated seconds keeping the tiles: the pass per group (logits 2 N d V, block-triangle Gram
    ~sum_b T_b^2 V), the kept memory's first touch, the VJP as a GEMV over it, the T x T algebra."""
    pass_s, solve_s = _pass_and_solve(k, lengths, d, V)
    N = sum(lengths)
    return (pass_s + len(keep_groups(lengths)) * wpass + N * V * (k["keep_extra"] + k["kept_gemv"])
            + solve_s + k["call"])


def cost_stream(k: Dict[str, float], lengths: Sequence[int], d: int, V: int, wpass: float, max_iter: int) -> float:
    """Estimated seconds streaming: the same pass, then one streaming VJP pass (2 N d V)."""
    pass_s, solve_s = _pass_and_solve(k, lengths, d, V)
    N = sum(lengths)
    return pass_s + wpass + 2 * N * d * V / k["gemm"] + N * V * k["ew_lora"] + wpass + solve_s + k["call"]


def fits(lengths: Sequence[int], d: int, V: int, esz: int, cfg: RosaConfig) -> bool:
    """Memory rule: every conversation's Gram matrix in its padded batch plus one batch's factors, esz (sum_g P_g +
    max_g P_g) with P_g = B_g Tm_g^2 (:func:`~rosa_ext.plans.dense.padded_sizes`; one conversation: 2 T^2)."""
    sizes = dense.padded_sizes(lengths)
    return esz * (sum(sizes) + max(sizes)) <= cfg.gram_budget_bytes


def fits_keep(lengths: Sequence[int], d: int, V: int, esz: int, cfg: RosaConfig) -> bool:
    """Memory rule of keeping: :func:`fits`, and the longest conversation's T x V tiles within
    ``keep_budget_bytes``."""
    return fits(lengths, d, V, esz, cfg) and esz * max(lengths) * V <= cfg.keep_budget_bytes


# ----------------------------------------------------------------------------- helpers of step 1
def same_token_pairs(M: torch.Tensor, y: torch.Tensor) -> None:
    """M[t, u] += 1 where y_t == y_u (the diagonal included), in place."""
    if y.numel() <= SAME_TOKEN_VECTOR_MAX:  # one vectorised update (a T^2 bool temporary)
        M.add_(y.unsqueeze(0) == y.unsqueeze(1))
        return
    M.diagonal().add_(1.0)
    ys, order = torch.sort(y)
    _, counts = torch.unique_consecutive(ys, return_counts=True)
    if int(counts.max()) < 2:
        return
    starts = torch.cumsum(counts, 0) - counts
    rep = counts > 1
    for st, cn in zip(starts[rep].tolist(), counts[rep].tolist()):
        idx = order[st:st + cn]
        for r0 in range(0, cn, 1024):  # bounded temporaries even for one long run
            ri = idx[r0:r0 + 1024]
            blk = torch.ones(ri.numel(), cn, dtype=M.dtype, device=M.device)
            ar = torch.arange(ri.numel(), device=M.device)
            blk[ar, ar + r0] = 0  # the diagonal is done
            M.index_put_((ri.unsqueeze(1).expand_as(blk), idx.unsqueeze(0).expand_as(blk)), blk, accumulate=True)
