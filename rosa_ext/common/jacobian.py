"""The linearisation of ROSA, written once (MATH.md sections 1-3): the point it linearises at, the
target, and J and J^T of p(theta) for both parameterisations.

- :class:`Linearization`: p_t, h_t, b[y_t] and the target g = p* - p (:func:`residual_target`) at the
  current parameters, from an engine's pass; whether a target underflowed, whether the logits were finite.
- :func:`target_logit`, :func:`target_logp`: the logit and log p of an observed token (the one rule).
- :func:`jvp`, :func:`vjp`: the JVP and the VJP over an engine's streaming primitives
  (:class:`HeadPrimitives`), used by matrix-free CG (:mod:`rosa_ext.plans.cg_lora`, any engine) and by
  the tensor-level API of :mod:`rosa_ext.kernels` (the Triton kernels).

Parameter vectors are (B, P): P = d + V laid out ``[delta_a, delta_b]`` (lora) or P = d
(hidden), one row per conversation; token vectors are (N,), packed over the batch.

Every place where the algebra indexes a vocabulary-sized table by the observed tokens goes
through a primitive of :class:`WholeVocabulary` (gather at the targets, scatter at the targets,
the centred row reduction, sums over the vocabulary): a backend that holds the whole vocabulary
inherits the plain indexing, a vocabulary-parallel one (``rosa_ext.backends.distributed``)
replaces it by owner-only indexing and a sum across shards (MATH.md section 7).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Optional, Protocol

import torch

from .types import HeadProblem, HeadStats
from .validation import all_finite


class HeadPrimitives(Protocol):
    """The streaming reductions over the vocabulary a backend provides (MATH.md section 3).

    - ``row_reduce(prob, st, u)``: u (B, V) -> (N,), ``pi_t . u[seg_t]``
    - ``column_reduce(prob, st, w)``: w (N,) -> (B, V), ``sum_{t in b} w_t pi_t``
    - ``weight_matvec(prob, v)``: v (B, d) -> (B, V), ``W v``
    - ``weight_rmatvec(prob, q)``: q (B, V) -> (B, d), ``q W``
    - ``off_target_row_reduce(prob, st, u)`` / ``off_target_column_reduce(prob, st, w)``: the two
      reductions with r_t (pi_t without its target entry) in place of pi_t; needed only by a backend
      whose stats set ``q`` (the torch backend)
    - ``pi_sqnorm(prob, st)`` -> (N,), ``q_t . q_t``, q_t = pi_t without its target entry (the
      LoRA Gram diagonal: the relative ridge of matrix-free CG)
    - the target-indexed primitives of :class:`WholeVocabulary` (``gather_targets``,
      ``target_rows``, ``scatter_targets``, ``scatter_minus_column``, ``centered_row_reduce``,
      ``sum_vocab``)
    These are what matrix-free CG (:mod:`rosa_ext.plans.cg_lora`) and the public
    :mod:`rosa_ext.kernels` call; the one-pass plans stream their own tiles.
    All results in the problem's compute dtype (``target_rows``: the table's dtype or the
    compute dtype).
    """

    def row_reduce(self, prob: HeadProblem, st: HeadStats, u: torch.Tensor) -> torch.Tensor: ...

    def column_reduce(self, prob: HeadProblem, st: HeadStats, w: torch.Tensor) -> torch.Tensor: ...

    def weight_matvec(self, prob: HeadProblem, v: torch.Tensor) -> torch.Tensor: ...

    def weight_rmatvec(self, prob: HeadProblem, q: torch.Tensor) -> torch.Tensor: ...

    def pi_sqnorm(self, prob: HeadProblem, st: HeadStats) -> torch.Tensor: ...

    def off_target_row_reduce(self, prob: HeadProblem, st: HeadStats, u: torch.Tensor) -> torch.Tensor: ...

    def off_target_column_reduce(self, prob: HeadProblem, st: HeadStats, w: torch.Tensor) -> torch.Tensor: ...

    # -- indexing by the observed tokens (WholeVocabulary gives the one-process versions) --
    def gather_targets(self, prob: HeadProblem, table: torch.Tensor) -> torch.Tensor: ...

    def target_rows(self, prob: HeadProblem, table: torch.Tensor) -> torch.Tensor: ...

    def scatter_targets(self, prob: HeadProblem, q: torch.Tensor, w: torch.Tensor) -> torch.Tensor: ...

    def scatter_minus_column(self, prob: HeadProblem, st: HeadStats, w: torch.Tensor) -> torch.Tensor: ...

    def centered_row_reduce(self, prob: HeadProblem, st: HeadStats, u: torch.Tensor) -> torch.Tensor: ...

    def sum_vocab(self, prob: HeadProblem, x: torch.Tensor) -> torch.Tensor: ...


class WholeVocabulary:
    """The target-indexed primitives of a backend that holds the whole vocabulary (one process).

    - ``gather_targets(prob, table)``: table (B, V) -> (N,), ``table[seg_t, y_t]``
    - ``target_rows(prob, table)``: table (V, ...) -> (N, ...), ``table[y_t]`` (e.g. W[y_t], c[y_t])
    - ``scatter_targets(prob, q, w)``: q (B, V) += w_t at (seg_t, y_t), in place; returns q
    - ``scatter_minus_column(prob, st, w)``: w (N,) -> (B, V), ``scatter(y, w) - C(w)`` (the VJP
      through the softmax); here the column reduction then ``scatter_targets``, a backend may fuse
      the two (the Triton backend does: one pass, no ``index_put_``)
    - ``centered_row_reduce(prob, st, u)``: u (B, V) -> (N,), ``(e_{y_t} - pi_t) . u[seg_t]``; when the
      stats split the target off (``st.q``), as ``q_t u[y_t] - r_t . u`` with the backend's
      ``off_target_row_reduce`` (and ``scatter_minus_column`` as ``scatter(y, w q) - sum_t w_t r_t``
      with ``off_target_column_reduce``), so neither cancels for a confident token
    - ``sum_vocab(prob, x)``: x (B, V) -> (B, 1), the sum over the vocabulary

    A vocabulary-parallel backend overrides all of them: only the rank that owns ``y_t`` reads or
    writes it, and every result that is a sum over V is summed across the shards (MATH.md
    section 7).
    """

    def gather_targets(self, prob: HeadProblem, table: torch.Tensor) -> torch.Tensor:
        return table[prob.seg, prob.targets]

    def target_rows(self, prob: HeadProblem, table: torch.Tensor) -> torch.Tensor:
        return table[prob.targets]

    def scatter_targets(self, prob: HeadProblem, q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        q.index_put_((prob.seg, prob.targets), w, accumulate=True)
        return q

    def scatter_minus_column(self, prob: HeadProblem, st: HeadStats, w: torch.Tensor) -> torch.Tensor:
        if st.q is not None:  # scatter(y, w (1 - p)) - sum_t w_t r_t: exact when p_t -> 1
            return self.scatter_targets(prob, -self.off_target_column_reduce(prob, st, w), w * st.q)
        return self.scatter_targets(prob, -self.column_reduce(prob, st, w), w)

    def centered_row_reduce(self, prob: HeadProblem, st: HeadStats, u: torch.Tensor) -> torch.Tensor:
        if st.q is not None:  # (1 - p_t) u[y_t] - r_t . u: nothing cancels when p_t -> 1 (MATH.md section 4)
            return st.q * u[prob.seg, prob.targets] - self.off_target_row_reduce(prob, st, u)
        return u[prob.seg, prob.targets] - self.row_reduce(prob, st, u)

    def sum_vocab(self, prob: HeadProblem, x: torch.Tensor) -> torch.Tensor:
        return x.sum(-1, keepdim=True)

#: The one-process indexing, for callers that have no backend at hand.
WHOLE_VOCABULARY = WholeVocabulary()


@dataclass
class Linearization:
    """The point ROSA linearises at: what the algebra needs at the current parameters, compute dtype
    (N packed tokens; MATH.md sections 1-3).

    - ``prob``, ``stats``: the packed problem and an engine's per-token results
    - ``mode``: "lora" or "hidden" (which parameters J is the Jacobian of)
    - ``p`` (N,): probability of each observed token
    - ``h`` (N, d): lm_head inputs in the compute dtype
    - ``by`` (N,) or None: ``b_seg[y_t]``, the LoRA b entry of each observed token
    - ``g`` (N,) or None: the target g = p* - p (:func:`residual_target`), when the reward is known
    """

    prob: HeadProblem
    stats: HeadStats
    mode: str
    p: torch.Tensor
    h: torch.Tensor
    by: Optional[torch.Tensor]
    g: Optional[torch.Tensor] = None

    @classmethod
    def at(cls, prob: HeadProblem, stats: HeadStats, mode: str, prims: Optional[HeadPrimitives] = None,
           by: Optional[torch.Tensor] = None, beta: Optional[float] = None) -> "Linearization":
        """``prims``: the engine (its :meth:`~WholeVocabulary.gather_targets`); default one process.
        ``by``: b_seg[y_t] when the caller has it already. ``beta``: the KL coefficient; given, ``g`` is
        the target of ``prob.reward``."""
        prims = WHOLE_VOCABULARY if prims is None else prims
        if by is None and prob.lora_b is not None:
            by = prims.gather_targets(prob, prob.lora_b)
        g = None if beta is None else residual_target(stats.logp, prob.reward[prob.seg], beta)
        return cls(prob=prob, stats=stats, mode=mode, p=torch.exp(stats.logp), h=prob.hidden.to(prob.compute_dtype),
                   by=by, g=g)

    @classmethod
    def of_pass(cls, prob: HeadProblem, ps, mode: str, prims: HeadPrimitives, beta: float) -> "Linearization":
        """The linearisation from a one-pass result ``ps`` (a HiddenPass or GramPass: ``lse``, ``logp``,
        ``q``, ``ah``, ``pib_off`` = r . b without the target entry) and the target g."""
        by = None if prob.lora_b is None else prims.gather_targets(prob, prob.lora_b)
        pib = None if ps.pib_off is None else ps.pib_off + torch.exp(ps.logp) * by  # pi . b = r . b + p b[y]
        st = HeadStats(lse=ps.lse, logp=ps.logp, ah=ps.ah, pib=pib, q=ps.q, pib_off=ps.pib_off, engine=ps.engine)
        return cls.at(prob, st, mode, prims, by=by, beta=beta)

    def target_underflowed(self) -> torch.Tensor:
        """(B,) bool, no host sync: conversations with a nonzero reward in which every token's p_t is
        below the compute dtype's normal range (p_t < ~1e-38 in float32, log p_t finite): J (proportional
        to p_t) and g = p* - p are then 0 or subnormal, so the step would be a silent zero (or a few bits)
        where float64 gives a real one. (A tiny reward with normal p_t gives a tiny, correct step.)"""
        logp = self.stats.logp
        log_tiny = math.log(torch.finfo(logp.dtype).tiny)
        normal = segment_sum(self.prob, (logp >= log_tiny).to(logp.dtype).unsqueeze(1))[:, 0]
        finite = segment_sum(self.prob, torch.isfinite(logp).to(logp.dtype).unsqueeze(1))[:, 0]
        return (self.prob.reward != 0) & (normal == 0) & (finite > 0)

    def logits_finite(self) -> torch.Tensor:
        """Whether the pass's log-sum-exp and log p_t are finite (0-dim bool, no host sync)."""
        return all_finite(self.stats.lse) & all_finite(self.stats.logp)


_LOG_HALF = -0.6931471805599453


def residual_target(logp: torch.Tensor, reward_per_token: torch.Tensor, beta: float) -> torch.Tensor:
    """g = p* - p for each token (MATH.md section 1, paper Eq. 3), free of cancellation for p near 0 or 1.

        p*_t = p_t e^{r/beta} / (1 - p_t + p_t e^{r/beta}),   g_t = p*_t - p_t

    Written as ``p* = sigmoid(L + d)`` with ``L = logit(p_t)`` and ``d = r / beta``, the difference of two
    sigmoids is evaluated without subtracting them:

        g = sigmoid(L + d) - sigmoid(L) = sinh(d / 2) / (2 cosh(L / 2) cosh((L + d) / 2))

    so a confident token (1 - p below fp32's rounding of 1) or a weak reward keeps its full relative
    precision: nothing that rounds to 1 is subtracted from something else that rounds to 1.

    Args:
        logp: (N,) float, log p_t of the observed tokens (<= 0). Must itself be accurate near 0 when p is
            near 1 (e.g. ``log1p(-q)`` with q = 1 - p summed over the other tokens), since 1 - p is recovered
            from it as ``-expm1(logp)``.
        reward_per_token: (N,) float, the reward of each token's conversation.
        beta: KL coefficient (> 0).
    Returns:
        (N,) same dtype as ``logp``. Exactly zero where the reward is zero.
    """
    logp = torch.clamp(logp, max=0.0)
    d = reward_per_token.to(logp.dtype) / beta
    # log(1 - p) without cancellation: for p > 1/2 from 1 - p = -expm1(log p) (exact for tiny 1 - p),
    # below from log1p(-p).
    log1mp = torch.where(logp > _LOG_HALF, torch.log(-torch.expm1(logp)), torch.log1p(-torch.exp(logp)))
    L = logp - log1mp  # logit(p); +inf at p == 1, -inf at p == 0
    a = L + d  # logit(p*)
    # 2 cosh(x/2) = e^{|x|/2} (1 + e^{-|x|}) and 2 sinh(d/2) = sign(d) e^{|d|/2} (1 - e^{-|d|}), hence
    #   g = sign(d) (1 - e^{-|d|}) e^{E} / ((1 + e^{-|L|}) (1 + e^{-|a|})),  E = (|d| - |L| - |a|) / 2 <= 0,
    # where E is taken case by case so that it never subtracts two large equal numbers:
    #   L and d of one sign: |a| = |L| + |d|, E = -|L|;  opposite signs: E = -max(|L| - |d|, 0).
    absL, absd = L.abs(), d.abs()
    same = (L >= 0) == (d >= 0)
    E = torch.where(same, -absL, -torch.clamp(absL - absd, min=0.0))
    g = torch.sign(d) * (-torch.expm1(-absd)) * torch.exp(E) / ((1.0 + torch.exp(-absL)) * (1.0 + torch.exp(-a.abs())))
    return torch.where(reward_per_token == 0, torch.zeros_like(g), g)


def target_logit(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, bias: Optional[torch.Tensor],
                 ah: Optional[torch.Tensor], by: Optional[torch.Tensor], lora_scale: float) -> torch.Tensor:
    """z_t[y_t], the logit of each observed token, in h's dtype -> (N,): the ONE place this formula
    is written (``h . W[y] + c[y] + s (a . h) b[y]``).

    h (N, d) lm_head inputs in the compute dtype, weight (V, d), targets (N,) in [0, V), bias (V,)
    or None, and for a LoRA term ah (N,) = a_seg . h_t with by (N,) = b_seg[y_t].
    """
    z_y = (h * weight[targets].to(h.dtype)).sum(1)
    if bias is not None:
        z_y = z_y + bias[targets].to(h.dtype)
    if by is not None:
        z_y = z_y + lora_scale * ah * by.to(h.dtype)
    return z_y


def target_logp(z_y: torch.Tensor, lse: torch.Tensor, q: Optional[torch.Tensor] = None) -> torch.Tensor:
    """log p_t of the observed tokens -> (N,), clamped to <= 0: the ONE rule for it.

    ``z_y - lse`` (finite even where p_t underflows); when ``q`` (N,) = 1 - p_t summed off-target is
    known (the one-pass plans), :func:`accurate_logp`.
    """
    logp = z_y - lse
    return logp.clamp_max(0.0) if q is None else accurate_logp(logp, q)


def accurate_logp(logp: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """log p_t from ``logp`` = z_y - lse and the off-target sum ``q`` = 1 - p_t -> (N,), <= 0:
    ``log1p(-q)`` where p_t >= 1/2, accurate near p_t = 1 where ``z_y - lse`` would lose the small
    1 - p_t (MATH.md section 4)."""
    return torch.where(q <= 0.5, torch.log1p(-q), logp).clamp_max(0.0)


def observed_logp(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, *,
                  bias: Optional[torch.Tensor], ah: Optional[torch.Tensor], by: Optional[torch.Tensor],
                  lora_scale: float) -> torch.Tensor:
    """log p_t = z_t[y_t] - lse_t (clamped to <= 0) of the observed tokens, in h's dtype
    (:func:`target_logit`, :func:`target_logp`)."""
    return target_logp(target_logit(h, weight, targets, bias=bias, ah=ah, by=by, lora_scale=lora_scale), lse)


def segment_sum(prob: HeadProblem, rows: torch.Tensor) -> torch.Tensor:
    """Sum (N, k) rows per conversation -> (B, k)."""
    B = prob.num_conversations
    if B == 1:
        return rows.sum(0, keepdim=True)
    return torch.zeros(B, rows.shape[1], dtype=rows.dtype, device=rows.device).index_add_(0, prob.seg, rows)


def scatter_minus_column(lin: Linearization, prims: HeadPrimitives, w: torch.Tensor) -> torch.Tensor:
    """scatter_add(y, w) - C(w) -> (B, V): the VJP through the softmax (MATH.md section 3);
    the backend's primitive (fused into one pass on the Triton backend)."""
    return prims.scatter_minus_column(lin.prob, lin.stats, w)


def b_gap(lin: Linearization) -> torch.Tensor:
    """b[y_t] - pi_t . b -> (N,): ``(1 - p_t) b[y_t] - r_t . b`` when the stats split the target off
    (no cancellation when p_t -> 1), else the expanded difference."""
    st = lin.stats
    if st.q is not None and st.pib_off is not None:
        return st.q * lin.by - st.pib_off
    return lin.by - st.pib


def jvp(lin: Linearization, prims: HeadPrimitives, v: torch.Tensor) -> torch.Tensor:
    """u = J v for v (B, P) -> (N,)."""
    prob, st = lin.prob, lin.stats
    s, seg = prob.lora_scale, prob.seg
    d = prob.hidden_size
    if lin.mode == "lora":
        va, vb = v[:, :d], v[:, d:]
        hv = (lin.h * va[seg]).sum(1)
        centered = prims.centered_row_reduce(prob, st, vb)  # vb[seg, y] - pi . vb
        return s * lin.p * (b_gap(lin) * hv + st.ah * centered)
    u_vocab = prims.weight_matvec(prob, v)  # (B, V) = W v
    if prob.lora_b is not None:  # W_eff = W + s b a^T
        u_vocab = u_vocab + s * (v * prob.lora_a).sum(1, keepdim=True) * prob.lora_b
    return lin.p * prims.centered_row_reduce(prob, st, u_vocab)  # u[seg, y] - pi . u


def vjp(lin: Linearization, prims: HeadPrimitives, u: torch.Tensor) -> torch.Tensor:
    """J^T u for u (N,) -> (B, P)."""
    prob, st = lin.prob, lin.stats
    s = prob.lora_scale
    if lin.mode == "lora":
        coef_a = s * u * lin.p * b_gap(lin)
        grad_a = segment_sum(prob, coef_a.unsqueeze(1) * lin.h)
        grad_b = scatter_minus_column(lin, prims, s * u * lin.p * st.ah)
        return torch.cat([grad_a, grad_b], dim=1)
    q = scatter_minus_column(lin, prims, u * lin.p)
    grad = prims.weight_rmatvec(prob, q)
    if prob.lora_b is not None:
        grad = grad + s * prims.sum_vocab(prob, q * prob.lora_b) * prob.lora_a
    return grad
