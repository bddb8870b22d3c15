"""J and J^T of p(theta) for both parameterisations, written once (MATH.md sections 2-3).

The algebra here turns a backend's streaming primitives (:class:`HeadPrimitives`) into
the JVP, the VJP, the explicit rows of J that are only d wide, and the T x T Gram matrix
J J^T. It is used by the core operator (:class:`rosa_ext.core.operator.RosaOperator`,
any backend) and by the tensor-level API of :mod:`rosa_ext.kernels` (the Triton kernels),
so the formulas exist in one place.

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
from typing import Optional, Protocol, Tuple

import torch

from .types import GramPass, HeadProblem, HeadStats, HiddenPass


class HeadPrimitives(Protocol):
    """The streaming reductions over the vocabulary a backend provides (MATH.md section 3).

    - ``row_reduce(prob, st, u)``: u (B, V) -> (N,), ``pi_t . u[seg_t]``
    - ``column_reduce(prob, st, w)``: w (N,) -> (B, V), ``sum_{t in b} w_t pi_t``
    - ``weight_matvec(prob, v)``: v (B, d) -> (B, V), ``W v``
    - ``weight_rmatvec(prob, q)``: q (B, V) -> (B, d), ``q W``
    - ``pi_weight(prob, st)`` -> (N, d), ``pi_t W`` (dual solver, hidden mode)
    - ``pi_gram(prob, st, drop_targets)`` -> (B, Tmax, Tmax), ``pi_t . pi_u`` within each
      conversation; with ``drop_targets`` ``q_t . q_u``, q_t = pi_t without its target entry
      (the LoRA Gram without cancellation, MATH.md section 4)
    - ``pi_sqnorm(prob, st)`` -> (N,), ``q_t . q_t`` (the LoRA Gram diagonal, relative damping with CG)
    - ``hidden_pass(prob)`` -> :class:`~rosa_ext.common.types.HiddenPass`: hidden mode's whole
      vocabulary work in one online-softmax pass (lse, 1 - p_t, pi_t W and pi_t . b with the target
      entry split off; 4 N d V flops, nothing N x V kept). The dual solver and hidden-mode CG.
    - ``lora_gram_pass(prob, keep)`` -> :class:`~rosa_ext.common.types.GramPass`: LoRA mode's one
      pass (lse, 1 - p_t, pi_t . b without the target entry, and per conversation the centred Gram
      ``(e_{y_t} - pi_t) . (e_{y_u} - pi_u)``); ``keep`` keeps the probability tiles for the VJP
    - ``centered_column_reduce(prob, gp, w, out=None)``: w (N,) -> (B, V),
      ``sum_{t in b} w_t (e_{y_t} - pi_t)`` after a :meth:`lora_gram_pass` (a GEMV over its kept
      tiles, or one streaming pass)
    - the target-indexed primitives of :class:`WholeVocabulary` (``gather_targets``,
      ``target_rows``, ``scatter_targets``, ``scatter_minus_column``, ``centered_row_reduce``,
      ``sum_vocab``, ``target_logits``)
    All results in the problem's compute dtype (``target_rows``: the table's dtype or the
    compute dtype).
    """

    def row_reduce(self, prob: HeadProblem, st: HeadStats, u: torch.Tensor) -> torch.Tensor: ...

    def column_reduce(self, prob: HeadProblem, st: HeadStats, w: torch.Tensor) -> torch.Tensor: ...

    def weight_matvec(self, prob: HeadProblem, v: torch.Tensor) -> torch.Tensor: ...

    def weight_rmatvec(self, prob: HeadProblem, q: torch.Tensor) -> torch.Tensor: ...

    def pi_weight(self, prob: HeadProblem, st: HeadStats) -> torch.Tensor: ...

    def pi_gram(self, prob: HeadProblem, st: HeadStats, drop_targets: bool = False) -> torch.Tensor: ...

    def pi_sqnorm(self, prob: HeadProblem, st: HeadStats) -> torch.Tensor: ...

    def hidden_pass(self, prob: HeadProblem) -> HiddenPass: ...

    def lora_gram_pass(self, prob: HeadProblem, keep: bool = False) -> GramPass: ...

    def centered_column_reduce(self, prob: HeadProblem, gp: GramPass, w: torch.Tensor,
                               out: Optional[torch.Tensor] = None) -> torch.Tensor: ...

    # -- indexing by the observed tokens (WholeVocabulary gives the one-process versions) --
    def gather_targets(self, prob: HeadProblem, table: torch.Tensor) -> torch.Tensor: ...

    def target_rows(self, prob: HeadProblem, table: torch.Tensor) -> torch.Tensor: ...

    def scatter_targets(self, prob: HeadProblem, q: torch.Tensor, w: torch.Tensor) -> torch.Tensor: ...

    def scatter_minus_column(self, prob: HeadProblem, st: HeadStats, w: torch.Tensor) -> torch.Tensor: ...

    def centered_row_reduce(self, prob: HeadProblem, st: HeadStats, u: torch.Tensor) -> torch.Tensor: ...

    def sum_vocab(self, prob: HeadProblem, x: torch.Tensor) -> torch.Tensor: ...

    def target_logits(self, prob: HeadProblem, h: torch.Tensor) -> torch.Tensor: ...


class WholeVocabulary:
    """The target-indexed primitives of a backend that holds the whole vocabulary (one process).

    - ``gather_targets(prob, table)``: table (B, V) -> (N,), ``table[seg_t, y_t]``
    - ``target_rows(prob, table)``: table (V, ...) -> (N, ...), ``table[y_t]`` (e.g. W[y_t], c[y_t])
    - ``scatter_targets(prob, q, w)``: q (B, V) += w_t at (seg_t, y_t), in place; returns q
    - ``scatter_minus_column(prob, st, w)``: w (N,) -> (B, V), ``scatter(y, w) - C(w)`` (the VJP
      through the softmax); here the column reduction then ``scatter_targets``, a backend may fuse
      the two (the Triton backend does: one pass, no ``index_put_``)
    - ``centered_row_reduce(prob, st, u)``: u (B, V) -> (N,), ``(e_{y_t} - pi_t) . u[seg_t]``
    - ``sum_vocab(prob, x)``: x (B, V) -> (B, 1), the sum over the vocabulary
    - ``target_logits(prob, h)``: h (N, d) compute dtype -> (B, Tmax, Tmax), ``[b, u, t] =
      h_u . W[y_t] + c[y_t]`` for tokens u, t of conversation b (the logit of one observed token
      at another position, without a LoRA term; zero-padded)

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
        return self.scatter_targets(prob, -self.column_reduce(prob, st, w), w)

    def centered_row_reduce(self, prob: HeadProblem, st: HeadStats, u: torch.Tensor) -> torch.Tensor:
        return u[prob.seg, prob.targets] - self.row_reduce(prob, st, u)

    def sum_vocab(self, prob: HeadProblem, x: torch.Tensor) -> torch.Tensor:
        return x.sum(-1, keepdim=True)

    def target_logits(self, prob: HeadProblem, h: torch.Tensor) -> torch.Tensor:
        B, Tm, off, cd = prob.num_conversations, prob.max_len, prob.offsets, prob.compute_dtype
        out = torch.zeros(B, Tm, Tm, dtype=cd, device=h.device)
        for b in range(B):
            sl = slice(off[b], off[b + 1])
            n, y = off[b + 1] - off[b], prob.targets[sl]
            z = h[sl] @ prob.weight[y].to(cd).T
            if prob.bias is not None:
                z = z + prob.bias[y].to(cd).unsqueeze(0)
            out[b, :n, :n] = z
        return out


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


def observed_logp(h: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, lse: torch.Tensor, *,
                  bias: Optional[torch.Tensor], ah: Optional[torch.Tensor], by: Optional[torch.Tensor],
                  lora_scale: float) -> torch.Tensor:
    """log p_t = z_t[y_t] - lse_t (clamped to <= 0) of the observed tokens, in h's dtype.

    h (N, d) lm_head inputs in the compute dtype, weight (V, d), targets (N,), lse (N,),
    bias (V,) or None, and for a LoRA term ah (N,) = a_seg . h_t with by (N,) = b_seg[y_t].
    """
    y = targets
    z_y = (h * weight[y].to(h.dtype)).sum(1)
    if bias is not None:
        z_y = z_y + bias[y].to(h.dtype)
    if by is not None:
        z_y = z_y + lora_scale * ah * by.to(h.dtype)
    return torch.clamp(z_y - lse, max=0.0)


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


def jvp(lin: Linearization, prims: HeadPrimitives, v: torch.Tensor) -> torch.Tensor:
    """u = J v for v (B, P) -> (N,)."""
    prob, st = lin.prob, lin.stats
    s, seg = prob.lora_scale, prob.seg
    d = prob.hidden_size
    if prob.mode == "lora":
        va, vb = v[:, :d], v[:, d:]
        hv = (lin.h * va[seg]).sum(1)
        centered = prims.centered_row_reduce(prob, st, vb)  # vb[seg, y] - pi . vb
        return s * lin.p * ((lin.by - st.pib) * hv + st.ah * centered)
    u_vocab = prims.weight_matvec(prob, v)  # (B, V) = W v
    if prob.lora_b is not None:  # W_eff = W + s b a^T
        u_vocab = u_vocab + s * (v * prob.lora_a).sum(1, keepdim=True) * prob.lora_b
    return lin.p * prims.centered_row_reduce(prob, st, u_vocab)  # u[seg, y] - pi . u


def vjp(lin: Linearization, prims: HeadPrimitives, u: torch.Tensor) -> torch.Tensor:
    """J^T u for u (N,) -> (B, P)."""
    prob, st = lin.prob, lin.stats
    s = prob.lora_scale
    if prob.mode == "lora":
        coef_a = s * u * lin.p * (lin.by - st.pib)
        grad_a = segment_sum(prob, coef_a.unsqueeze(1) * lin.h)
        grad_b = scatter_minus_column(lin, prims, s * u * lin.p * st.ah)
        return torch.cat([grad_a, grad_b], dim=1)
    q = scatter_minus_column(lin, prims, u * lin.p)
    grad = prims.weight_rmatvec(prob, q)
    if prob.lora_b is not None:
        grad = grad + s * prims.sum_vocab(prob, q * prob.lora_b) * prob.lora_a
    return grad


def jacobian_rows(lin: Linearization, prims: HeadPrimitives) -> torch.Tensor:
    """Explicit rows of J that are only d wide -> (N, d).

    hidden: J_t = p_t (W_eff[y_t] - W_eff^T pi_t)  (one extra pass for pi W)
    lora:   J_t,a = s p_t (b_{y_t} - pi_t.b) h_t   (no pass needed)
    """
    prob, st = lin.prob, lin.stats
    s, seg = prob.lora_scale, prob.seg
    if prob.mode == "lora":
        return (s * lin.p * (lin.by - st.pib)).unsqueeze(1) * lin.h
    w_y = prims.target_rows(prob, prob.weight).to(prob.compute_dtype)
    pi_w = prims.pi_weight(prob, st)
    if prob.lora_b is not None:
        a = prob.lora_a[seg]
        w_y = w_y + s * lin.by.unsqueeze(1) * a
        pi_w = pi_w + s * st.pib.unsqueeze(1) * a
    return lin.p.unsqueeze(1) * (w_y - pi_w)


def hidden_rows_from_pass(lin: Linearization, hp: HiddenPass, w_y: torch.Tensor) -> torch.Tensor:
    """Hidden mode's rows of J from one :meth:`HeadPrimitives.hidden_pass` -> (N, d), in the
    off-target form (no cancellation when p_t -> 1, MATH.md section 4):

        J_t = p_t ((1 - p_t) W[y_t] - r_t W)  (+ s ((1 - p_t) b[y_t] - r_t . b) a_seg with a LoRA term)

    ``w_y`` (N, d) compute dtype, W[y_t] (overwritten: J is built in its memory).
    """
    prob = lin.prob
    J = w_y.mul_(hp.q.unsqueeze(1)).sub_(hp.pi_weight)
    if prob.lora_b is not None:
        a = prob.lora_a[0].unsqueeze(0) if prob.num_conversations == 1 else prob.lora_a[prob.seg]
        J.add_((prob.lora_scale * (hp.q * lin.by - hp.pib_off)).unsqueeze(1) * a)
    return J.mul_(lin.p.unsqueeze(1))


def lora_factors_from_pass(lin: Linearization, gp: GramPass) -> Tuple[torch.Tensor, torch.Tensor]:
    """LoRA mode after one :meth:`HeadPrimitives.lora_gram_pass` -> (ca, cb), (N,) each:
    J_t,a = ca_t h_t with ca = s p (b[y_t] - pi_t . b) = s p ((1 - p) b[y_t] - r_t . b), and
    J_t,b = cb_t (e_{y_t} - pi_t) with cb = s p (a . h_t)."""
    s = lin.prob.lora_scale
    return s * lin.p * (gp.q * lin.by - gp.pib_off), s * lin.p * gp.ah


def gram(lin: Linearization, prims: HeadPrimitives, rows: torch.Tensor) -> torch.Tensor:
    """J J^T within each conversation -> (B, Tmax, Tmax), zero-padded.

    ``rows`` are :func:`jacobian_rows`. For lora the b-block adds (MATH.md section 4)
    s^2 p_t p_u (a.h_t)(a.h_u) (e_{y_t} - pi_t).(e_{y_u} - pi_u), evaluated with q_t = pi_t less
    its target entry as ``(1-p_t)(1-p_u) 1(y_t = y_u) - (1-p_t) q_u[y_t] - (1-p_u) q_t[y_u] + q_t.q_u``:
    the expanded ``1 - pi_u[y_t] - pi_t[y_u] + pi_t.pi_u`` cancels to rounding noise in fp32 once
    1 - p_t < ~1e-3 (a confident answer token).
    """
    prob, st = lin.prob, lin.stats
    B, Tm, off = prob.num_conversations, prob.max_len, prob.offsets
    cd = prob.compute_dtype
    G = torch.zeros(B, Tm, Tm, dtype=cd, device=prob.device)
    qq = prims.pi_gram(prob, st, drop_targets=True) if prob.mode == "lora" else None
    zc = prims.target_logits(prob, lin.h) if qq is not None else None  # z_u[y_t] without the LoRA term
    omp = -torch.expm1(st.logp)  # 1 - p_t without cancellation
    for b in range(B):
        sl = slice(off[b], off[b + 1])
        n = off[b + 1] - off[b]
        Jb = rows[sl]
        G[b, :n, :n] = Jb @ Jb.T
        if qq is None:
            continue
        y = prob.targets[sl]
        same = (y.unsqueeze(0) == y.unsqueeze(1)).to(cd)
        # qcross[u, t] = q_u[y_t] = pi_u[y_t] = exp(z_u[y_t] - lse_u) where y_t != y_u, else 0
        z = zc[b, :n, :n] + prob.lora_scale * st.ah[sl].unsqueeze(1) * lin.by[sl].unsqueeze(0)
        qcross = torch.exp(z - st.lse[sl].unsqueeze(1)) * (1 - same)
        o = omp[sl]
        m = (o.unsqueeze(1) * o.unsqueeze(0) * same - o.unsqueeze(1) * qcross.T
             - o.unsqueeze(0) * qcross + qq[b, :n, :n])
        c = prob.lora_scale * lin.p[sl] * st.ah[sl]
        G[b, :n, :n] += c.unsqueeze(1) * m * c.unsqueeze(0)
    return G


def gram_diag(lin: Linearization, prims: HeadPrimitives, rows: torch.Tensor) -> torch.Tensor:
    """||J_t||^2 per token -> (N,): the diagonal of J J^T without forming it (MATH.md section 6).

    hidden: ||rows_t||^2. lora: ||J_t,a||^2 + (s p_t (a.h_t))^2 ||e_{y_t} - pi_t||^2, the last factor
    as (1 - p_t)^2 + q_t.q_t (one pass over the vocabulary, :meth:`HeadPrimitives.pi_sqnorm`).
    ``rows`` are :func:`jacobian_rows`.
    """
    diag = (rows * rows).sum(1)
    if lin.prob.mode == "lora":
        c = lin.prob.lora_scale * lin.p * lin.stats.ah
        omp = -torch.expm1(lin.stats.logp)
        diag = diag + c * c * (omp * omp + prims.pi_sqnorm(lin.prob, lin.stats))
    return diag
