"""Plan "dual", hidden mode: the exact step in ONE pass over W (MATH.md section 4).

Read in order:

1. The pass over W is the engine's (:meth:`~rosa_ext.backends.protocol.Engine.hidden_pass`): lse,
   log p_t, log(1 - p_t) and r̂_t W, where r̂_t is the softmax of the logits without the target entry --
   one online-softmax pass (torch tiles, or the probability tiles and a tensor-core GEMM on the GPU; on
   a vocabulary-parallel head the engine combines the shards). The linearisation (the rows' scale
   p_t (1 - p_t) in log space, the target g) follows from it
   (the engine's :meth:`~rosa_ext.common.jacobian.WholeVocabulary.linearize`: one kernel on the Triton engine).
2. :func:`hidden_rows` -- the Jacobian algebra: the explicit T x d rows of J in the off-target form
   ``J_t = p_t (1 - p_t) (W[y_t] - r̂_t W)`` (nothing cancels or underflows however confident the token).
3. :func:`solve` -- per conversation the smaller of the T_b x T_b dual ``J^T (J J^T + lambda I)^{-1} g``
   and the d x d primal ``(J^T J + lambda I)^{-1} J^T g`` (the same step), J rescaled by a power of
   two first, the conversations of each kind in padded batches (:class:`.dense.Padding`, one batch in the
   usual case: its launches do not grow with B); one host sync accepts them all; a rejected one is
   re-linearised in float64 (a float64 problem's: re-solved from the SVD) (:mod:`.dense`).
4. :func:`cost`, :func:`fits` -- its cost formula and memory rule for ``solver="auto"`` (:mod:`.registry`).

Hidden-mode CG (:mod:`.cg_hidden`) shares steps 1-2.
"""
from __future__ import annotations

from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..backends.torch_engine import HIDDEN_ROW_BLOCK
from ..common.config import RosaConfig
from ..common.jacobian import Linearization
from ..common.types import HeadProblem, HiddenPass, Solved
from . import dense


# ----------------------------------------------------------------------------- 2. the Jacobian algebra
def hidden_rows(prob: HeadProblem, engine, hp: HiddenPass, lin: Linearization) -> torch.Tensor:
    """The rows of J from one hidden pass -> (N, d) compute dtype, in the off-target form (MATH.md
    section 4), in the linearisation's scaled units (``lin.f`` = p_t (1 - p_t) e^-shift):

        J_t = f_t (W[y_t] - r̂_t W)  (+ f_t s (b[y_t] - r̂_t . b) a_seg with a LoRA term)

    with r̂_t the softmax of the other logits: no cancellation when p_t -> 1, no underflow when 1 - p_t
    or p_t leaves the dtype's range. J is built in the memory of W[y_t] (``engine.target_rows``: the
    owner's row on a sharded head).
    """
    J = engine.target_rows(prob, prob.weight).to(prob.compute_dtype)
    J.sub_(hp.rw)
    if prob.lora_b is not None:
        a = prob.lora_a[0].unsqueeze(0) if prob.num_conversations == 1 else prob.lora_a[prob.seg]
        J.add_((prob.lora_scale * (lin.by - hp.rb)).unsqueeze(1) * a)
    return J.mul_(lin.f.unsqueeze(1))


def pass_and_rows(prob: HeadProblem, cfg: RosaConfig, engine) -> Tuple[Linearization, torch.Tensor]:
    """Steps 1-2: (the linearisation with its target g, the rows of J (N, d))."""
    hp = engine.hidden_pass(prob, cfg.keep_budget_bytes)
    lin = engine.linearize(prob, hp, "hidden", cfg.beta)
    return lin, hidden_rows(prob, engine, hp, lin)


# ----------------------------------------------------------------------------- 3. the solve
def solve(prob: HeadProblem, cfg: RosaConfig, engine, cg=None) -> Solved:
    """The exact hidden-mode step of every conversation (module doc) -> :class:`~rosa_ext.common.types.Solved`.
    The conversations of at most d tokens in one padded batch of duals, the longer ones in one batch of primals
    (:class:`.dense.Padding`: the launches do not grow with B)."""
    lin, rows = pass_and_rows(prob, cfg, engine)
    d, cd = prob.hidden_size, prob.compute_dtype
    B = prob.num_conversations
    update = torch.empty(B, d, dtype=cd, device=prob.weight.device)
    facts: List[Optional[dense.SolveFacts]] = [None] * B
    Js: List[Optional[torch.Tensor]] = [None] * B  # each conversation's (scaled) rows of J and target
    gs: List[Optional[torch.Tensor]] = [None] * B
    short = [b for b, T in enumerate(prob.lengths) if T <= d]
    long_ = [b for b, T in enumerate(prob.lengths) if T > d]
    # the same step: J^T (J J^T + lam I)^{-1} g = (J^T J + lam I)^{-1} J^T g; each group one padded batch
    groups = [(g, False) for g in dense.padded_groups(prob.lengths, short)] + [
        (g, True) for g in dense.padded_groups(prob.lengths, long_)]
    for convs, primal in groups:
        lay = dense.Padding(prob, convs)
        J = lay.pad(rows)  # (G, Tm, d)
        unit = dense.power_of_two_scale(torch.linalg.vector_norm(J, ord=float("inf"), dim=(1, 2)))  # exact
        J.mul_(unit.view(-1, 1, 1))
        gb = lay.pad(lin.g) * unit.unsqueeze(1)
        shift = lay.select(lin.shift)
        if not primal:  # the dual, T_b x T_b
            G0 = torch.bmm(J, J.transpose(1, 2))
            lam = dense.ridge(cfg, lay.token_mean(G0.diagonal(dim1=1, dim2=2)), unit, shift)  # mean ||J_t||^2
            lay.fill_pad_diagonal(G0)
            alpha, factored = dense.factor_solve(G0, gb, lam)
            got = dense.dual_checks(G0, gb, alpha, lam, factored)
            if lay.whole:  # J^T alpha straight into the update
                torch.bmm(alpha.unsqueeze(1), J, out=update.unsqueeze(1))
                step = None
            else:
                step = torch.bmm(alpha.unsqueeze(1), J).squeeze(1)
        else:  # the primal, d x d: padded rows of J add nothing to J^T J
            A0 = torch.bmm(J.transpose(1, 2), J)
            counts = torch.tensor(lay.lengths, dtype=cd).to(A0.device, non_blocking=True)
            lam = dense.ridge(cfg, A0.diagonal(dim1=1, dim2=2).sum(1) / counts, unit, shift)  # trace J^T J / T
            rhs = torch.bmm(J.transpose(1, 2), gb.unsqueeze(2)).squeeze(2)
            step, factored = dense.factor_solve(A0, rhs, lam)
            got = dense.primal_checks(A0, rhs, step, lam, factored)
        if step is not None:
            lay.scatter(update, step)
        for k, (b, T) in enumerate(zip(convs, lay.lengths)):  # J and g kept only for a float64 problem's fallback
            facts[b] = got[k]
            if cd == torch.float64:
                Js[b], gs[b] = J[k, :T], gb[k, :T]
        J = gb = G0 = A0 = None  # this group's batch goes before the next is formed
    eps = torch.finfo(cd).eps
    verdict = dense.accept(lin, cfg, facts, torch.aminmax(update))
    nums, dens = verdict.nums, verdict.dens

    def solve64(b: int) -> torch.Tensor:
        if cd != torch.float64:  # re-linearised in float64 (dense.float64_problem); then solved as here
            redo = solve(dense.float64_problem(prob, b), cfg, engine)
            nums[b] = dens[b] * float(redo.residual) ** 2
            return redo.update[0]
        delta, nums[b], dens[b] = dense.spectral_hidden(Js[b], gs[b], float(facts[b].lam), eps)
        return delta

    for b, delta in dense.float64_refinement(cfg, verdict.rejected, solve64):
        update[b] = delta.to(update.dtype)
    return Solved(update, lin.stats.logp, lin.target(), 0, dense.relative_residual(nums, dens), engine=lin.stats.engine,
                  finite_checked=not verdict.rejected)


# ----------------------------------------------------------------------------- 4. cost and memory
def pass_seconds(k: Dict[str, float], lengths: Sequence[int], d: int, V: int, wpass: float) -> float:
    """Seconds of the hidden pass: 4 N d V flops, N V tile elements, W read once per row block."""
    N = sum(lengths)
    blocks = max(1, -(-N // HIDDEN_ROW_BLOCK))
    return 4 * N * d * V / k["gemm"] + N * V * k["ew_hidden"] + blocks * wpass


def cost(k: Dict[str, float], lengths: Sequence[int], d: int, V: int, wpass: float, max_iter: int) -> float:
    """Estimated seconds of this plan: the pass, then per conversation the cheaper of the T x T dual
    (2 T^2 d + T^3 / 3) and the d x d primal (2 T d^2 + d^3 / 3)."""
    R, chol = k["gemm"], k["chol"]
    algebra = sum(min(2 * T * T * d / R + T ** 3 / 3 / chol, 2 * T * d * d / R + d ** 3 / 3 / chol) for T in lengths)
    return pass_seconds(k, lengths, d, V, wpass) + algebra + k["call"]


def fits(lengths: Sequence[int], d: int, V: int, esz: int, cfg: RosaConfig) -> bool:
    """Memory rule: one padded batch's systems and their factors at a time, 2 max_g B_g min(Tm_g, d)^2 numbers
    (:func:`~rosa_ext.plans.dense.padded_sizes`; one conversation: 2 min(T, d)^2)."""
    short = [b for b, T in enumerate(lengths) if T <= d]
    long_ = [b for b, T in enumerate(lengths) if T > d]
    sizes = (dense.padded_sizes(lengths, short) if short else []) + (dense.padded_sizes(lengths, long_, d) if long_ else [])
    return 2 * esz * max(sizes) <= cfg.gram_budget_bytes
