"""J and J^T of p(theta) for both parameterisations, written once (MATH.md sections 2-3).

The algebra here turns a backend's streaming primitives (:class:`HeadPrimitives`) into the JVP
and the VJP. It is used by matrix-free CG (:mod:`rosa_ext.plans.cg_lora`, any backend) and by the
tensor-level API of :mod:`rosa_ext.kernels` (the Triton kernels), so the formulas exist in one
place; the logit and log p of an observed token (:func:`target_logit`, :func:`target_logp`) too.

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
    """What the algebra needs at the current parameters, compute dtype (N packed tokens).

    - ``prob``, ``stats``: the packed problem and the backend's per-token cache
    - ``p`` (N,): probability of each observed token
    - ``h`` (N, d): lm_head inputs in the compute dtype
    - ``by`` (N,) or None: ``b_seg[y_t]``, the LoRA b entry of each observed token
    """

    prob: HeadProblem
    stats: HeadStats
    p: torch.Tensor
    h: torch.Tensor
    by: Optional[torch.Tensor]

    @classmethod
    def at(cls, prob: HeadProblem, stats: HeadStats, prims: Optional[HeadPrimitives] = None,
           by: Optional[torch.Tensor] = None) -> "Linearization":
        """``prims``: the backend (its :meth:`~WholeVocabulary.gather_targets`); default one process.
        ``by``: b_seg[y_t] when the caller has it already."""
        prims = WHOLE_VOCABULARY if prims is None else prims
        if by is None and prob.lora_b is not None:
            by = prims.gather_targets(prob, prob.lora_b)
        return cls(prob=prob, stats=stats, p=torch.exp(stats.logp), h=prob.hidden.to(prob.compute_dtype), by=by)


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
    known (the one-pass plans), ``log1p(-q)`` where p_t >= 1/2, accurate near p_t = 1 where
    ``z_y - lse`` would lose the small 1 - p_t (MATH.md section 4).
    """
    logp = z_y - lse
    if q is not None:
        logp = torch.where(q <= 0.5, torch.log1p(-q), logp)
    return logp.clamp_max(0.0)


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
    if prob.mode == "lora":
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
    if prob.mode == "lora":
        coef_a = s * u * lin.p * b_gap(lin)
        grad_a = segment_sum(prob, coef_a.unsqueeze(1) * lin.h)
        grad_b = scatter_minus_column(lin, prims, s * u * lin.p * st.ah)
        return torch.cat([grad_a, grad_b], dim=1)
    q = scatter_minus_column(lin, prims, u * lin.p)
    grad = prims.weight_rmatvec(prob, q)
    if prob.lora_b is not None:
        grad = grad + s * prims.sum_vocab(prob, q * prob.lora_b) * prob.lora_a
    return grad
