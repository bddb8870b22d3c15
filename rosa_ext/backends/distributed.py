"""The engine of a vocabulary-parallel lm_head: one rank's rows plus the collectives of MATH.md
section 7.

Each rank of a process group holds rows ``[start, start + V_local)`` of the head weight (and the
same rows of its bias and of LoRA's b); the lm_head inputs, the targets (global token ids) and
the replicated parameters (LoRA's a, the hidden shift) are the same on every rank.
:class:`DistributedEngine` wraps the engine that runs on the local rows (torch or Triton) and
turns its partial results into the ones of the whole vocabulary (one code path for any number of
ranks: the plans never know):

=====================  ============================================  ==========================
primitive              what crosses ranks                            numbers (N tokens, B conv.)
=====================  ============================================  ==========================
``stats``              MAX of the per-token log-sum-exp, then SUM    N, then 2N (3N with LoRA)
                       of the rescaled sums, the owner's z_y, pi.b
``row_reduce``         SUM                                           N
``centered_row_red.``  SUM (owner's u[y] minus the partial pi.u)     N
``column_reduce``      nothing: each rank keeps its rows             0
``weight_matvec``      nothing: each rank keeps its rows             0
``weight_rmatvec``     SUM                                           B d
``gather_targets``     SUM (only the owner of y_t is non-zero)       N
``target_rows``        SUM (only the owner of y_t is non-zero)       N x (row size)
``scatter_targets``    nothing: only the owner writes                0
``scatter_minus_c.``   nothing: the local columns, owner's scatter   0
``pi_sqnorm``          SUM (the owner drops the target entry)        N
``sum_vocab``          SUM                                           B
=====================  ============================================  ==========================

The one-pass passes (``hidden_pass``, ``gram_pass``) run the local engine's pass, then MAX N and ONE
SUM of the per-token numbers (with r_t W, or the T x T Gram parts); ``off_target_vjp`` stays on each
rank's columns.

Every collective goes through :class:`VocabComm` (``torch.distributed`` on the given group),
which counts what each rank contributes in :data:`traffic`. Nothing of size V crosses ranks.
"""
from __future__ import annotations

import threading
from dataclasses import replace
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from ..common.jacobian import Linearization, split_logits, target_logit, target_logp
from ..common.types import GramPass, HeadProblem, HeadStats, HiddenPass, VocabShard


class CommCounter:
    """Collectives issued by this process, and the bytes it contributed to them.

    ``calls``, ``bytes``: totals since :meth:`reset`; ``by_label``: label -> [calls, bytes].
    An all-reduce of n elements of e bytes counts n*e (the payload; a ring all-reduce moves about
    twice that over each rank's link), an all-gather counts this rank's part.
    """

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self.reset()

    def reset(self) -> None:
        with self._lock:
            self.calls = 0
            self.bytes = 0
            self.by_label: Dict[str, List[int]] = {}

    def add(self, label: str, nbytes: int) -> None:
        with self._lock:
            self.calls += 1
            self.bytes += int(nbytes)
            entry = self.by_label.setdefault(label, [0, 0])
            entry[0] += 1
            entry[1] += int(nbytes)

    def snapshot(self) -> Dict[str, object]:
        with self._lock:
            return {"calls": self.calls, "bytes": self.bytes,
                    "by_label": {k: list(v) for k, v in self.by_label.items()}}


#: What this process has communicated for vocabulary-parallel updates (reset it to measure one).
traffic = CommCounter()


class VocabComm:
    """The collectives of a vocabulary-parallel update on ``group`` (None: the default group).

    All of them are blocking ``torch.distributed`` calls on tensors of the data's device (gloo on
    the CPU, NCCL on CUDA), counted in :data:`traffic`.
    """

    def __init__(self, group: Optional[dist.ProcessGroup] = None) -> None:
        self.group = group
        self.rank = dist.get_rank(group)
        self.world_size = dist.get_world_size(group)

    def all_sum(self, t: torch.Tensor, label: str = "sum") -> torch.Tensor:
        """SUM across the group, in place on a contiguous copy; returns the result."""
        t = t.contiguous()
        traffic.add(label, t.numel() * t.element_size())
        dist.all_reduce(t, op=dist.ReduceOp.SUM, group=self.group)
        return t

    def all_max(self, t: torch.Tensor, label: str = "max") -> torch.Tensor:
        """MAX across the group (on a copy); returns the result."""
        t = t.clone(memory_format=torch.contiguous_format)
        traffic.add(label, t.numel() * t.element_size())
        dist.all_reduce(t, op=dist.ReduceOp.MAX, group=self.group)
        return t

    def all_gather(self, t: torch.Tensor, label: str = "gather") -> torch.Tensor:
        """(world_size, *t.shape): every rank's ``t`` in group-rank order."""
        t = t.contiguous()
        traffic.add(label, t.numel() * t.element_size())
        out = [torch.empty_like(t) for _ in range(self.world_size)]
        dist.all_gather(out, t, group=self.group)
        return torch.stack(out)


class DistributedEngine:
    """The engine of this rank's rows of a vocabulary-parallel head (MATH.md section 7).

    Args:
        local: the engine that runs on the local rows (:class:`~rosa_ext.backends.torch_engine.TorchEngine`,
            :class:`~rosa_ext.backends.triton_engine.TritonEngine`).
        shard: this rank's :class:`~rosa_ext.common.types.VocabShard`; ``shard.comm`` is the
            :class:`VocabComm` of the group.
    The problems it is given hold the local rows in ``weight``/``bias``/``lora_b`` and the global
    token ids in ``targets``; the local engine sees the same problem with the targets turned into
    local row indices (-1, never split off, where another rank owns the token; or any valid row, masked
    out here, for the streaming reductions). Results are those of the whole vocabulary: per-token and
    d-sized ones identical on every rank, vocabulary-sized ones (column reduction, W v, scatter, the
    VJP) this rank's rows. The plans run unchanged on it.
    """

    def __init__(self, local, shard: VocabShard) -> None:
        self.local = local
        self.shard = shard
        self.comm: VocabComm = shard.comm
        self.name = local.name
        self._key: Optional[HeadProblem] = None
        self._view_cache: Tuple[HeadProblem, torch.Tensor, torch.Tensor] = ()

    def throughput(self, device_type: str, dtype: torch.dtype) -> Dict[str, float]:
        return self.local.throughput(device_type, dtype)

    # -- the local view of a problem ---------------------------------------------------
    def _view(self, prob: HeadProblem) -> Tuple[HeadProblem, torch.Tensor, torch.Tensor]:
        """(the problem with local row indices as targets, own (N,) bool, idx (N,) int64), cached."""
        if self._key is not prob:
            y = prob.targets - self.shard.start
            own = (y >= 0) & (y < self.shard.rows)
            idx = torch.where(own, y, torch.zeros_like(y))
            view = replace(prob, targets=idx, shard=None, global_vocab_size=prob.vocab_size)
            self._key, self._view_cache = prob, (view, own, idx)
        return self._view_cache

    def owned_targets_view(self, prob: HeadProblem) -> HeadProblem:
        """The local view with the targets of tokens another rank owns set to -1 (never split off)."""
        lp, own, idx = self._view(prob)
        return replace(lp, targets=torch.where(own, idx, torch.full_like(idx, -1)))

    @staticmethod
    def _mask(own: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x with the rows of tokens this rank does not own set to 0 (x (N, ...))."""
        return torch.where(own.reshape(-1, *([1] * (x.dim() - 1))), x, torch.zeros((), dtype=x.dtype, device=x.device))

    def owner_logit(self, prob: HeadProblem, ah: Optional[torch.Tensor]) -> torch.Tensor:
        """z_t[y_t] (:func:`~rosa_ext.common.jacobian.target_logit`) on the rank that owns y_t, 0 elsewhere -> (N,)."""
        _, own, idx = self._view(prob)
        by = None if prob.lora_b is None else prob.lora_b[prob.seg, idx]
        z_y = target_logit(prob.hidden.to(prob.compute_dtype), prob.weight, idx, bias=prob.bias, ah=ah, by=by,
                           lora_scale=prob.lora_scale)
        return self._mask(own, z_y)

    # -- the one-pass plans: the local pass, then MAX N and one SUM ------------------------------
    def combine_tokens(self, prob: HeadProblem, ps, label: str, wide: Optional[torch.Tensor] = None):
        """A local pass's per-token values over the whole vocabulary (MATH.md section 7).

        MAX of the local off-target log-sum-exp, then ONE SUM of e_k = exp(lse_off_k - m) with the
        e_k-weighted local r̂ quantities (each normalised by its shard's own off-target sum) and the
        owner's target logit: an online-softmax combine across shards. ``ps``: the local result on the
        owned-targets view (``lse_off``, ``ah``, ``rb``); ``wide``: (N, k) more rows to combine the same way
        (hidden mode's r̂ W).
        Returns (lse, lse_off, logp, logq, rb, the combined ``wide`` or None, w) with w (N,) this shard's
        weight exp(lse_off_k - lse_off) in r̂_t.
        """
        m = self.comm.all_max(ps.lse_off, f"{label}: max")
        e = torch.exp(ps.lse_off - m)
        cols = [e, self.owner_logit(prob, ps.ah)] + ([e * ps.rb] if ps.rb is not None else [])
        tok = torch.stack(cols, 1)
        if wide is not None:
            tok = torch.cat([tok, e.unsqueeze(1) * wide], 1)
        tot = self.comm.all_sum(tok, f"{label}: sums")
        s = tot[:, 0]
        lse_off = m + torch.log(s)
        lse, logp, logq = split_logits(tot[:, 1], lse_off)
        rb = tot[:, 2] / s if ps.rb is not None else None
        k = len(cols)
        rest = tot[:, k:] / s.unsqueeze(1) if wide is not None else None
        return lse, lse_off, logp, logq, rb, rest, torch.exp(ps.lse_off - lse_off)

    def hidden_pass(self, prob: HeadProblem, budget_bytes: Optional[int] = None) -> HiddenPass:
        """The local hidden pass on this rank's rows (the owner of y_t splits the target off), then MAX N
        and one SUM of N (d + 2 + L) numbers."""
        hp = self.local.hidden_pass(self.owned_targets_view(prob), budget_bytes)
        lse, lse_off, logp, logq, rb, rw, _ = self.combine_tokens(prob, hp, "hidden_pass", wide=hp.rw)
        return HiddenPass(lse=lse, lse_off=lse_off, logp=logp, logq=logq, ah=hp.ah, rb=rb, rw=rw, engine=hp.engine)

    def gram_pass(self, prob: HeadProblem, keep: bool, budget_bytes: Optional[int] = None,
                  center: bool = False) -> GramPass:
        """The local LoRA pass (the tiles, when kept, stay local), MAX N, one SUM of 2N (3N with LoRA)
        per-token numbers and one SUM of 2 sum_b T_b^2 (r̂_t . r̂_u and r̂_t[y_u] per conversation): raw parts
        whatever ``center`` asks (the ranks' Grams and cross terms are weighted differently before the sum)."""
        gp = self.local.gram_pass(self.owned_targets_view(prob), keep, budget_bytes)
        lse, lse_off, logp, logq, rb, _, w = self.combine_tokens(prob, gp, "lora_gram_pass")
        off = prob.offsets
        parts = []
        for b, (R, X) in enumerate(zip(gp.gram, gp.cross)):
            wb = w[off[b]:off[b + 1]]
            parts += [(R * wb.unsqueeze(1) * wb.unsqueeze(0)).reshape(-1), (X * wb.unsqueeze(1)).reshape(-1)]
        flat = self.comm.all_sum(torch.cat(parts), "lora_gram_pass: gram")
        grams, cross, pos = [], [], 0
        for n in prob.lengths:
            grams.append(flat[pos:pos + n * n].view(n, n))
            cross.append(flat[pos + n * n:pos + 2 * n * n].view(n, n))
            pos += 2 * n * n
        return GramPass(lse=lse, lse_off=lse_off, logp=logp, logq=logq, ah=gp.ah, rb=rb, gram=grams, cross=cross,
                        kept=gp.kept, engine=gp.engine)

    def off_target_vjp(self, prob: HeadProblem, gp: GramPass, w: torch.Tensor,
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """sum_{t in b} w_t r̂_t -> (B, V_local): the local engine on this rank's columns (its kept tiles or
        one local pass with the global lse_off), no communication."""
        return self.local.off_target_vjp(self.owned_targets_view(prob), gp, w, out)

    def centered_vjp(self, prob: HeadProblem, gp: GramPass, w: torch.Tensor,
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """sum_{t in b} w_t (e_{y_t} - r̂_t) -> (B, V_local): this rank's columns, then the owner-only scatter
        (not the local engine's fused version: the same reason as :meth:`scatter_minus_column`)."""
        return self.scatter_targets(prob, self.off_target_vjp(prob, gp, w, out).neg_(), w)

    # -- stats -----------------------------------------------------------------------------
    def stats(self, prob: HeadProblem, budget_bytes: Optional[int] = None) -> HeadStats:
        """The split stats of the whole vocabulary (lse, lse_off, log p, log(1 - p), a.h, r̂.b): the local
        engine's on the owned-targets view, then MAX N and one SUM of 2N (3N with LoRA) numbers. A local
        engine whose stats do not split the target off: lse, log p and pi.b, the same two collectives."""
        view = self.owned_targets_view(prob)
        st = self.local.stats(view) if budget_bytes is None else self.local.stats(view, budget_bytes)
        if st.split:
            lse, lse_off, logp, logq, rb, _, _ = self.combine_tokens(prob, st, "stats")
            return HeadStats(lse=lse, logp=logp, ah=st.ah, pib=None, lse_off=lse_off, logq=logq, rb=rb,
                             kept=st.kept, engine=st.engine, split=True)
        z_y = self.owner_logit(prob, st.ah)
        m = self.comm.all_max(st.lse, "stats: max")
        e = torch.exp(st.lse - m)  # this shard's sum of exp(z - m)
        parts = [e, z_y] + ([e * st.pib] if st.pib is not None else [])
        tot = self.comm.all_sum(torch.stack(parts), "stats: sums")
        lse = m + torch.log(tot[0])
        logp = target_logp(tot[1], lse)
        pib = None if st.pib is None else tot[2] / tot[0]
        return HeadStats(lse=lse, logp=logp, ah=st.ah, pib=pib, engine=st.engine)

    # -- the streaming reductions ------------------------------------------------------------
    def row_reduce(self, prob: HeadProblem, st: HeadStats, u: torch.Tensor) -> torch.Tensor:
        """(pi_t . u[seg_t]) for u (B, V_local) -> (N,): SUM of the shards' partial sums."""
        lp, _, _ = self._view(prob)
        return self.comm.all_sum(self.local.row_reduce(lp, st, u), "row_reduce")

    def column_reduce(self, prob: HeadProblem, st: HeadStats, w: torch.Tensor) -> torch.Tensor:
        """sum_{t in b} w_t pi_t -> (B, V_local): this rank's columns, no communication."""
        lp, _, _ = self._view(prob)
        return self.local.column_reduce(lp, st, w)

    def weight_matvec(self, prob: HeadProblem, v: torch.Tensor) -> torch.Tensor:
        """W v -> (B, V_local): this rank's rows, no communication."""
        lp, _, _ = self._view(prob)
        return self.local.weight_matvec(lp, v)

    def weight_rmatvec(self, prob: HeadProblem, q: torch.Tensor) -> torch.Tensor:
        """q W for q (B, V_local) -> (B, d): SUM."""
        lp, _, _ = self._view(prob)
        return self.comm.all_sum(self.local.weight_rmatvec(lp, q), "weight_rmatvec")

    def off_target_row_reduce(self, prob: HeadProblem, st: HeadStats, u: torch.Tensor) -> torch.Tensor:
        """(r_t . u[seg_t]) for u (B, V_local) -> (N,): SUM (only the owner drops the target entry)."""
        return self.comm.all_sum(self.local.off_target_row_reduce(self.owned_targets_view(prob), st, u),
                                 "off_target_row_reduce")

    def off_target_column_reduce(self, prob: HeadProblem, st: HeadStats, w: torch.Tensor) -> torch.Tensor:
        """sum_{t in b} w_t r_t -> (B, V_local): this rank's columns (the owner drops the target entry)."""
        return self.local.off_target_column_reduce(self.owned_targets_view(prob), st, w)

    def pi_sqnorm(self, prob: HeadProblem, st: HeadStats) -> torch.Tensor:
        """r_t . r_t per token -> (N,): SUM (the owner drops the target entry)."""
        return self.comm.all_sum(self.local.pi_sqnorm(self.owned_targets_view(prob), st), "pi_sqnorm")

    # -- indexing by the observed tokens (owner only, then SUM) ----------------------------------
    def gather_targets(self, prob: HeadProblem, table: torch.Tensor) -> torch.Tensor:
        """table (B, V_local) -> (N,) ``table[seg_t, y_t]`` of the whole vocabulary: SUM."""
        _, own, idx = self._view(prob)
        return self.comm.all_sum(self._mask(own, table[prob.seg, idx]), "gather_targets")

    def target_rows(self, prob: HeadProblem, table: torch.Tensor) -> torch.Tensor:
        """table (V_local, ...) -> (N, ...) ``table[y_t]`` in the compute dtype: SUM."""
        _, own, idx = self._view(prob)
        return self.comm.all_sum(self._mask(own, table[idx].to(prob.compute_dtype)), "target_rows")

    def scatter_targets(self, prob: HeadProblem, q: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """q (B, V_local) += w_t at (seg_t, y_t) for the tokens this rank owns; in place."""
        _, own, idx = self._view(prob)
        q.index_put_((prob.seg[own], idx[own]), w[own], accumulate=True)
        return q

    def scatter_minus_column(self, prob: HeadProblem, st: HeadStats, w: torch.Tensor) -> torch.Tensor:
        """sum_t w_t (e_{y_t} - rho_t) -> (B, V_local) (rho = r̂ with split stats, else pi): this rank's
        columns, then the owner-only scatter; no communication. (Not the local engine's fused version:
        its problem's targets are remapped to a valid local row for the tokens this rank does not own.)"""
        col = self.off_target_column_reduce(prob, st, w) if st.split else self.column_reduce(prob, st, w)
        return self.scatter_targets(prob, col.neg_(), w)

    def centered_row_reduce(self, prob: HeadProblem, st: HeadStats, u: torch.Tensor) -> torch.Tensor:
        """(e_{y_t} - rho_t) . u[seg_t] for u (B, V_local) -> (N,): one SUM for both terms."""
        lp, own, idx = self._view(prob)
        row = (self.local.off_target_row_reduce(self.owned_targets_view(prob), st, u) if st.split
               else self.local.row_reduce(lp, st, u))
        return self.comm.all_sum(self._mask(own, u[prob.seg, idx]) - row, "centered_row_reduce")

    def sum_vocab(self, prob: HeadProblem, x: torch.Tensor) -> torch.Tensor:
        """x (B, V_local) -> (B, 1), the sum over the whole vocabulary: SUM."""
        return self.comm.all_sum(x.sum(-1, keepdim=True), "sum_vocab")

    def linearize(self, prob: HeadProblem, ps, mode: str, beta: Optional[float]) -> Linearization:
        """The linearisation of a combined pass (torch ops; b[y_t] by :meth:`gather_targets`: one SUM)."""
        return Linearization.of_pass(prob, ps, mode, self, beta)
