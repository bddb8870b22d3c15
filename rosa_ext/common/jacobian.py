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

from dataclasses import dataclass
from typing import Optional, Protocol

import torch

from .types import HeadProblem, HeadStats
from .validation import all_finite


class HeadPrimitives(Protocol):
    """The streaming reductions over the vocabulary an engine provides (MATH.md section 3).

    - ``row_reduce(prob, st, u)``: u (B, V) -> (N,), ``pi_t . u[seg_t]``
    - ``column_reduce(prob, st, w)``: w (N,) -> (B, V), ``sum_{t in b} w_t pi_t``
    - ``weight_matvec(prob, v)``: v (B, d) -> (B, V), ``W v``
    - ``weight_rmatvec(prob, q)``: q (B, V) -> (B, d), ``q W``
    - ``off_target_row_reduce(prob, st, u)`` / ``off_target_column_reduce(prob, st, w)``: the two
      reductions with r̂_t (the softmax of the logits without the target entry, from ``st.lse_off``) in
      place of pi_t; used with stats that split the target off (``st.split``)
    - ``pi_sqnorm(prob, st)`` -> (N,), ``r̂_t . r̂_t`` (the LoRA Gram diagonal: the relative ridge of
      matrix-free CG)
    - the target-indexed primitives of :class:`WholeVocabulary` (``gather_targets``,
      ``target_rows``, ``scatter_targets``, ``scatter_minus_column``, ``centered_row_reduce``,
      ``sum_vocab``) and ``linearize`` (the :class:`Linearization` of a pass)
    These are what matrix-free CG (:mod:`rosa_ext.plans.cg_lora`) and the public
    :mod:`rosa_ext.kernels` call. All results in the problem's compute dtype (``target_rows``: the
    table's dtype or the compute dtype).
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

    def linearize(self, prob: HeadProblem, ps, mode: str, beta: Optional[float]) -> "Linearization": ...


class WholeVocabulary:
    """The target-indexed primitives of an engine that holds the whole vocabulary (one process).

    - ``gather_targets(prob, table)``: table (B, V) -> (N,), ``table[seg_t, y_t]``
    - ``target_rows(prob, table)``: table (V, ...) -> (N, ...), ``table[y_t]`` (e.g. W[y_t], c[y_t])
    - ``scatter_targets(prob, q, w)``: q (B, V) += w_t at (seg_t, y_t), in place; returns q
    - ``scatter_minus_column(prob, st, w)``: w (N,) -> (B, V), ``sum_t w_t (e_{y_t} - rho_t)`` (the VJP
      through the softmax, MATH.md section 3), with rho_t = r̂_t when the stats split the target off
      (``off_target_column_reduce``) and pi_t otherwise (``column_reduce``; an engine may fuse the two
      steps: the Triton engine does, one pass, no ``index_put_``)
    - ``centered_vjp(prob, gp, w)``: w (N,) -> (B, V), ``sum_t w_t (e_{y_t} - r̂_t)`` after a gram pass
    - ``centered_row_reduce(prob, st, u)``: u (B, V) -> (N,), ``(e_{y_t} - rho_t) . u[seg_t]``, rho_t as above
    - ``sum_vocab(prob, x)``: x (B, V) -> (B, 1), the sum over the vocabulary
    - ``linearize(prob, ps, mode, beta)``: the :class:`Linearization` of a one-pass result or split stats
      (:meth:`Linearization.of_pass`; the Triton engine computes it in one kernel)
    With split stats e_y - pi_t = (1 - p_t)(e_y - r̂_t): the factor 1 - p_t is the linearisation's
    (:class:`Linearization`, in log space), so nothing cancels or underflows for a confident token.

    A vocabulary-parallel engine overrides all of them: only the rank that owns ``y_t`` reads or
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

    def centered_vjp(self, prob: HeadProblem, gp, w: torch.Tensor, out: Optional[torch.Tensor] = None
                     ) -> torch.Tensor:
        """w (N,) -> (B, V), ``sum_{t in b} w_t (e_{y_t} - r̂_t)`` after a gram pass ``gp`` (the LoRA dual's
        b-part of J^T alpha, MATH.md section 4): ``scatter(y, w) - off_target_vjp`` (the Triton engine: one
        kernel over its kept tiles)."""
        return self.scatter_targets(prob, self.off_target_vjp(prob, gp, w, out).neg_(), w)

    def scatter_minus_column(self, prob: HeadProblem, st: HeadStats, w: torch.Tensor) -> torch.Tensor:
        col = self.off_target_column_reduce(prob, st, w) if st.split else self.column_reduce(prob, st, w)
        return self.scatter_targets(prob, col.neg_(), w)

    def centered_row_reduce(self, prob: HeadProblem, st: HeadStats, u: torch.Tensor) -> torch.Tensor:
        row = self.off_target_row_reduce(prob, st, u) if st.split else self.row_reduce(prob, st, u)
        return u[prob.seg, prob.targets] - row

    def sum_vocab(self, prob: HeadProblem, x: torch.Tensor) -> torch.Tensor:
        return x.sum(-1, keepdim=True)

    def linearize(self, prob: HeadProblem, ps, mode: str, beta: Optional[float]) -> "Linearization":
        """The linearisation of ``ps`` (a HiddenPass, GramPass or split HeadStats) with its target g for
        ``beta`` (None: no g), in torch ops: :meth:`Linearization.of_pass`."""
        return Linearization.of_pass(prob, ps, mode, self, beta)

#: The one-process indexing, for callers that have no backend at hand.
WHOLE_VOCABULARY = WholeVocabulary()


@dataclass
class Linearization:
    """The point ROSA linearises at: what the algebra needs at the current parameters, compute dtype
    (N packed tokens; MATH.md sections 1-4).

    Every row of J is a per-token scalar times a vector of order one: with split stats
    ``J_t = p_t (1 - p_t) R_t`` (R_t built from r̂_t), otherwise ``J_t = p_t R_t`` (R_t from pi_t). The
    scalar is carried in log space and shifted per conversation so that its largest value is 1
    (``f``), and the target g by the same factor: the step is invariant to that scaling (J -> c J,
    g -> c g, lambda -> c^2 lambda), so tokens with p_t or 1 - p_t far below the compute dtype's range
    keep full relative precision (MATH.md section 6).

    - ``prob``, ``stats``: the packed problem and an engine's per-token results
    - ``mode``: "lora" or "hidden" (which parameters J is the Jacobian of)
    - ``p`` (N,): probability of each observed token (unscaled; may underflow)
    - ``f`` (N,): the rows' scalar, ``exp(log(p_t (1 - p_t)) - shift_b)`` (split) or ``p_t`` (not split)
    - ``shift`` (B,): the log of each conversation's scale (0 when not split); J = e^shift f R
    - ``h`` (N, d): lm_head inputs in the compute dtype
    - ``by`` (N,) or None: ``b_seg[y_t]``, the LoRA b entry of each observed token
    - ``g`` (N,) or None: the target g = p* - p times e^-shift (:func:`residual_target`), when the
      reward is known
    - ``reported`` (N,) or None: g e^shift when an engine computed it with g (else :meth:`target` does)
    - ``finite`` (B,) bool or None: per conversation, whether the pass's lse and log p_t are finite, when an
      engine computed it (else :meth:`logits_finite` does)
    - ``ca``, ``cb`` (N,) and ``jmax`` (B,) or None: LoRA mode's Jacobian factors and the max-norm of J's
      entries per conversation, when an engine computed them with the rest
      (:func:`rosa_ext.plans.dual_lora.lora_factors` otherwise)
    """

    prob: HeadProblem
    stats: HeadStats
    mode: str
    p: torch.Tensor
    f: torch.Tensor
    shift: torch.Tensor
    h: torch.Tensor
    by: Optional[torch.Tensor]
    g: Optional[torch.Tensor] = None
    reported: Optional[torch.Tensor] = None
    finite: Optional[torch.Tensor] = None
    ca: Optional[torch.Tensor] = None
    cb: Optional[torch.Tensor] = None
    jmax: Optional[torch.Tensor] = None

    @classmethod
    def at(cls, prob: HeadProblem, stats: HeadStats, mode: str, prims: Optional[HeadPrimitives] = None,
           by: Optional[torch.Tensor] = None, beta: Optional[float] = None) -> "Linearization":
        """``prims``: the engine (its :meth:`~WholeVocabulary.gather_targets`); default one process.
        ``by``: b_seg[y_t] when the caller has it already. ``beta``: the KL coefficient; given, ``g`` is
        the (scaled) target of ``prob.reward``."""
        prims = WHOLE_VOCABULARY if prims is None else prims
        if by is None and prob.lora_b is not None:
            by = prims.gather_targets(prob, prob.lora_b)
        logp = stats.logp
        if stats.split:
            logf = logp + stats.logq
            shift = segment_max(prob, logf)
            shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
            f = torch.exp(logf - shift[prob.seg])
        else:
            shift = torch.zeros(prob.num_conversations, dtype=logp.dtype, device=logp.device)
            f = torch.exp(logp)
        g = None
        if beta is not None:
            g = residual_target(logp, prob.reward[prob.seg], beta, logq=stats.logq, shift=shift[prob.seg])
        return cls(prob=prob, stats=stats, mode=mode, p=torch.exp(logp), f=f, shift=shift,
                   h=prob.hidden.to(prob.compute_dtype), by=by, g=g)

    @classmethod
    def of_pass(cls, prob: HeadProblem, ps, mode: str, prims: HeadPrimitives, beta: Optional[float]) -> "Linearization":
        """The linearisation from a one-pass result ``ps`` (a HiddenPass or GramPass, or HeadStats) and the
        target g (``beta`` given)."""
        by = None if prob.lora_b is None else prims.gather_targets(prob, prob.lora_b)
        return cls.at(prob, pass_stats(ps), mode, prims, by=by, beta=beta)

    def target(self) -> torch.Tensor:
        """The target g = p* - p itself -> (N,) (``g`` times e^shift: what a step reports; it may underflow)."""
        if self.reported is not None:
            return self.reported
        return self.g * torch.exp(self.shift[self.prob.seg])

    def logits_finite(self) -> torch.Tensor:
        """Whether the pass's log-sum-exp and log p_t are finite (0-dim bool, no host sync)."""
        if self.finite is not None:
            return self.finite.all()
        return all_finite(self.stats.lse) & all_finite(self.stats.logp)

    def finite_flags(self) -> torch.Tensor:
        """:meth:`logits_finite` as a 1-D bool tensor, no host sync: ``finite`` (B,) when an engine computed
        it (no further launch), else (1,)."""
        return self.finite if self.finite is not None else self.logits_finite().reshape(1)


def pass_stats(ps) -> HeadStats:
    """The split :class:`HeadStats` of a one-pass result (a HiddenPass or GramPass; HeadStats as they are)."""
    if isinstance(ps, HeadStats):
        return ps
    return HeadStats(lse=ps.lse, logp=ps.logp, ah=ps.ah, pib=None, lse_off=ps.lse_off, logq=ps.logq, rb=ps.rb,
                     engine=ps.engine, split=True)


def segment_max(prob: HeadProblem, x: torch.Tensor) -> torch.Tensor:
    """The maximum of x (N,) over each conversation -> (B,) (-inf for a conversation of -inf only)."""
    if prob.num_conversations == 1:
        return x.max().reshape(1)
    out = torch.full((prob.num_conversations,), float("-inf"), dtype=x.dtype, device=x.device)
    return out.scatter_reduce_(0, prob.seg, x, reduce="amax", include_self=True)


def split_logits(z_y: torch.Tensor, lse_off: torch.Tensor) -> "tuple[torch.Tensor, torch.Tensor, torch.Tensor]":
    """(lse, log p_t, log(1 - p_t)) from the observed token's logit z_y and the log-sum-exp of the other
    logits lse_off, (N,) each: the ONE rule once a pass has split the target off (MATH.md section 4).
    With L = z_y - lse_off = logit(p_t): log p = -softplus(-L), log(1 - p) = -softplus(L), both exact
    however large |L| (nothing rounds to 1 and is subtracted); lse = logaddexp(lse_off, z_y)."""
    L = z_y - lse_off
    sp = torch.nn.functional.softplus
    return torch.logaddexp(lse_off, z_y), -sp(-L), -sp(L)


_LOG_HALF = -0.6931471805599453


def residual_target(logp: torch.Tensor, reward_per_token: torch.Tensor, beta: float,
                    logq: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """g = p* - p for each token (MATH.md section 1, paper Eq. 3), free of cancellation for p near 0 or 1,
    times ``exp(-shift)`` when ``shift`` is given.

        p*_t = p_t e^{r/beta} / (1 - p_t + p_t e^{r/beta}),   g_t = p*_t - p_t

    Written as ``p* = sigmoid(L + d)`` with ``L = logit(p_t)`` and ``d = r / beta``, the difference of two
    sigmoids is evaluated without subtracting them:

        g = sigmoid(L + d) - sigmoid(L) = sinh(d / 2) / (2 cosh(L / 2) cosh((L + d) / 2))

    so a confident token (1 - p below fp32's rounding of 1) or a weak reward keeps its full relative
    precision: nothing that rounds to 1 is subtracted from something else that rounds to 1.

    Args:
        logp: (N,) float, log p_t of the observed tokens (<= 0).
        reward_per_token: (N,) float, the reward of each token's conversation.
        beta: KL coefficient (> 0).
        logq: (N,) log(1 - p_t), exact (a pass that split the target off); None: recovered from logp,
            which then must itself be accurate near 0 when p is near 1 (e.g. ``log1p(-q)``), as
            ``log(-expm1(logp))`` -- exact only while 1 - p_t is a normal number of the dtype.
        shift: (N,) g is returned times exp(-shift) (the linearisation's per-conversation scale, in log
            space, so that a g far below the dtype's range keeps its precision).
    Returns:
        (N,) same dtype as ``logp``. Exactly zero where the reward is zero.
    """
    logp = torch.clamp(logp, max=0.0)
    d = reward_per_token.to(logp.dtype) / beta
    if logq is None:
        # log(1 - p) without cancellation: for p > 1/2 from 1 - p = -expm1(log p) (exact for tiny 1 - p),
        # below from log1p(-p).
        logq = torch.where(logp > _LOG_HALF, torch.log(-torch.expm1(logp)), torch.log1p(-torch.exp(logp)))
    L = logp - logq  # logit(p); +inf at p == 1, -inf at p == 0
    a = L + d  # logit(p*)
    # 2 cosh(x/2) = e^{|x|/2} (1 + e^{-|x|}) and 2 sinh(d/2) = sign(d) e^{|d|/2} (1 - e^{-|d|}), hence
    #   g = sign(d) (1 - e^{-|d|}) e^{E} / ((1 + e^{-|L|}) (1 + e^{-|a|})),  E = (|d| - |L| - |a|) / 2 <= 0,
    # where E is taken case by case so that it never subtracts two large equal numbers:
    #   L and d of one sign: |a| = |L| + |d|, E = -|L|;  opposite signs: E = -max(|L| - |d|, 0).
    absL, absd = L.abs(), d.abs()
    same = (L >= 0) == (d >= 0)
    E = torch.where(same, -absL, -torch.clamp(absL - absd, min=0.0))
    if shift is not None:
        E = E - shift.to(E.dtype)
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


def target_logp(z_y: torch.Tensor, lse: torch.Tensor) -> torch.Tensor:
    """log p_t = z_y - lse of the observed tokens -> (N,), clamped to <= 0 (a pass that did not split the
    target off; otherwise :func:`split_logits`)."""
    return (z_y - lse).clamp_max(0.0)


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
    """b[y_t] - rho_t . b -> (N,): rho_t = r̂_t with split stats (``rb``), pi_t otherwise (``pib``)."""
    st = lin.stats
    return lin.by - (st.rb if st.split else st.pib)


def jvp(lin: Linearization, prims: HeadPrimitives, v: torch.Tensor) -> torch.Tensor:
    """u = J v for v (B, P) -> (N,), in the linearisation's scaled units (J / e^shift)."""
    prob, st = lin.prob, lin.stats
    s, seg = prob.lora_scale, prob.seg
    d = prob.hidden_size
    if lin.mode == "lora":
        va, vb = v[:, :d], v[:, d:]
        hv = (lin.h * va[seg]).sum(1)
        centered = prims.centered_row_reduce(prob, st, vb)  # vb[seg, y] - rho . vb
        return s * lin.f * (b_gap(lin) * hv + st.ah * centered)
    u_vocab = prims.weight_matvec(prob, v)  # (B, V) = W v
    if prob.lora_b is not None:  # W_eff = W + s b a^T
        u_vocab = u_vocab + s * (v * prob.lora_a).sum(1, keepdim=True) * prob.lora_b
    return lin.f * prims.centered_row_reduce(prob, st, u_vocab)  # u[seg, y] - rho . u


def vjp(lin: Linearization, prims: HeadPrimitives, u: torch.Tensor) -> torch.Tensor:
    """J^T u for u (N,) -> (B, P), in the linearisation's scaled units."""
    prob, st = lin.prob, lin.stats
    s = prob.lora_scale
    if lin.mode == "lora":
        coef_a = s * u * lin.f * b_gap(lin)
        grad_a = segment_sum(prob, coef_a.unsqueeze(1) * lin.h)
        grad_b = scatter_minus_column(lin, prims, s * u * lin.f * st.ah)
        return torch.cat([grad_a, grad_b], dim=1)
    q = scatter_minus_column(lin, prims, u * lin.f)
    grad = prims.weight_rmatvec(prob, q)
    if prob.lora_b is not None:
        grad = grad + s * prims.sum_vocab(prob, q * prob.lora_b) * prob.lora_a
    return grad
