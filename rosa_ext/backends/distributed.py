"""The backend of a vocabulary-parallel lm_head: one rank's rows plus the collectives of MATH.md
section 7.

Each rank of a process group holds rows ``[start, start + V_local)`` of the head weight (and the
same rows of its bias and of LoRA's b); the lm_head inputs, the targets (global token ids) and
the replicated parameters (LoRA's a, the hidden shift) are the same on every rank.
:class:`DistributedBackend` wraps the backend that runs on the local rows (torch or Triton) and
turns its partial results into the ones of the whole vocabulary:

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
``pi_weight``          SUM                                           N d
``pi_gram``            SUM                                           B Tmax^2
``gather_targets``     SUM (only the owner of y_t is non-zero)       N
``target_rows``        SUM (only the owner of y_t is non-zero)       N x (row size)
``target_logits``      SUM (the owner of y_t fills column t)         B Tmax^2
``scatter_targets``    nothing: only the owner writes                0
``scatter_minus_c.``   nothing: the local columns, owner's scatter   0
``sum_vocab``          SUM                                           B
``hidden_pass``        MAX of the local lse, then one SUM of the     N, then N (d + 3 + L)
                       weighted per-token results and r W
``lora_gram_pass``     MAX; SUM per token; SUM of r_t . r_u and      N, 4N, 2 sum_b T_b^2
                       r_t[y_u] per conversation
``centered_column_r``  nothing: this rank's columns (kept tiles      0
                       or one local pass), the owner's scatter
=====================  ============================================  ==========================

Every collective goes through :class:`VocabComm` (``torch.distributed`` on the given group),
which counts what each rank contributes in :data:`traffic`. Nothing of size V crosses ranks.
"""
from __future__ import annotations

import threading
from dataclasses import replace
from typing import Dict, List, Optional, Tuple

import torch
import torch.distributed as dist

from ..common.types import GramPass, HeadProblem, HeadStats, HiddenPass, VocabShard
from .onepass import same_token_pairs, subtract_cross


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


class DistributedBackend:
    """A backend on this rank's rows of a vocabulary-parallel head (MATH.md section 7).

    Args:
        local: the backend that runs on the local rows (``TorchChunkedBackend``, ``TritonBackend``).
        shard: this rank's :class:`~rosa_ext.common.types.VocabShard`; ``shard.comm`` is the
            :class:`VocabComm` of the group.
    The problems it is given hold the local rows in ``weight``/``bias``/``lora_b`` and the global
    token ids in ``targets``; the local backend sees the same problem with the targets turned into
    local row indices (any valid row where this rank does not own the token, masked out here).
    Results are those of the whole vocabulary: per-token and d-sized ones identical on every
    rank, vocabulary-sized ones (column reduction, W v, scatter) this rank's rows.
    """

    def __init__(self, local, shard: VocabShard) -> None:
        self.local = local
        self.shard = shard
        self.comm: VocabComm = shard.comm
        self.name = local.name
        self._key: Optional[HeadProblem] = None
        self._view_cache: Tuple[HeadProblem, torch.Tensor, torch.Tensor] = ()

    # -- the local view of a problem ---------------------------------------------------
    def _view(self, prob: HeadProblem) -> Tuple[HeadProblem, torch.Tensor, torch.Tensor]:
        """(the problem with local row indices as targets, own (N,) bool, idx (N,) int64), cached."""
        if self._key is not prob:
            y = prob.targets - self.shard.start
            own = (y >= 0) & (y < self.shard.rows)
            idx = torch.where(own, y, torch.zeros_like(y))
            self._key, self._view_cache = prob, (replace(prob, targets=idx, shard=None), own, idx)
        return self._view_cache

    @staticmethod
    def _mask(own: torch.Tensor, x: torch.Tensor) -> torch.Tensor:
        """x with the rows of tokens this rank does not own set to 0 (x (N, ...))."""
        return torch.where(own.reshape(-1, *([1] * (x.dim() - 1))), x, torch.zeros((), dtype=x.dtype, device=x.device))

    # -- stats -----------------------------------------------------------------------------
    def stats(self, prob: HeadProblem) -> HeadStats:
        """lse, log p, a.h, pi.b of the whole vocabulary: two collectives (MAX N, SUM 2N or 3N)."""
        lp, own, idx = self._view(prob)
        st = self.local.stats(lp)  # lse_k and pi.b over the local rows (its logp is not used)
        z_y = self._owner_logit(prob, st.ah)
        m = self.comm.all_max(st.lse, "stats: max")
        e = torch.exp(st.lse - m)  # this shard's sum of exp(z - m)
        parts = [e, z_y] + ([e * st.pib] if st.pib is not None else [])
        tot = self.comm.all_sum(torch.stack(parts), "stats: sums")
        lse = m + torch.log(tot[0])
        logp = torch.clamp(tot[1] - lse, max=0.0)
        pib = None if st.pib is None else tot[2] / tot[0]
        return HeadStats(lse=lse, logp=logp, ah=st.ah, pib=pib)

    def _owner_logit(self, prob: HeadProblem, ah: Optional[torch.Tensor]) -> torch.Tensor:
        """z_t[y_t], as observed_logp computes it, on the rank that owns y_t (0 elsewhere) -> (N,)."""
        _, own, idx = self._view(prob)
        cd = prob.compute_dtype
        z_y = (prob.hidden.to(cd) * prob.weight[idx].to(cd)).sum(1)
        if prob.bias is not None:
            z_y = z_y + prob.bias[idx].to(cd)
        if prob.lora_b is not None:
            z_y = z_y + prob.lora_scale * ah * prob.lora_b[prob.seg, idx].to(cd)
        return self._mask(own, z_y)

    def _combine_tokens(self, prob: HeadProblem, ps, label: str, wide: Optional[torch.Tensor] = None):
        """The per-token results of a local one-pass primitive over the whole vocabulary: MAX of the
        local log-sum-exp, then ONE SUM of e_k = exp(lse_k - m) with the e_k-weighted local results
        (each normalised by its shard's own sum) -- an online-softmax combine across shards.
        ``wide``: (N, k) more rows to combine the same way (pi W). Returns (lse, logp, q, pib_off,
        combined wide or None)."""
        m = self.comm.all_max(ps.lse, f"{label}: max")
        e = torch.exp(ps.lse - m)
        cols = [e, e * ps.q, self._owner_logit(prob, ps.ah)] + ([e * ps.pib_off] if ps.pib_off is not None else [])
        tok = torch.stack(cols, 1)
        if wide is not None:
            tok = torch.cat([tok, e.unsqueeze(1) * wide], 1)
        tot = self.comm.all_sum(tok, f"{label}: sums")
        s = tot[:, 0]
        lse = m + torch.log(s)
        q = tot[:, 1] / s
        z_y = tot[:, 2]
        logp = torch.where(q <= 0.5, torch.log1p(-q), z_y - lse).clamp_max(0.0)
        pib_off = tot[:, 3] / s if ps.pib_off is not None else None
        k = len(cols)
        return lse, logp, q, pib_off, (tot[:, k:] / s.unsqueeze(1) if wide is not None else None)

    # -- the one-pass primitives of the dual solve (MATH.md sections 4 and 7) -----------------
    def hidden_pass(self, prob: HeadProblem) -> HiddenPass:
        """lse, 1 - p_t, pi W and pi . b without the target entry, of the whole vocabulary: the local
        pass (the owner splits the target off), then MAX N and one SUM of N (d + 3 + L) numbers."""
        lp = self._owned_targets_view(prob)
        hp = self.local.hidden_pass(lp)
        lse, logp, q, pib_off, piW = self._combine_tokens(prob, hp, "hidden_pass", wide=hp.pi_weight)
        return HiddenPass(lse=lse, logp=logp, q=q, ah=hp.ah, pib_off=pib_off, pi_weight=piW)

    def lora_gram_pass(self, prob: HeadProblem, keep: bool = False, raw: bool = False) -> GramPass:
        """lse, 1 - p_t, pi . b without the target entry and the centred Gram of every conversation,
        of the whole vocabulary: the local pass (raw parts; the tiles, when kept, stay local), MAX N,
        one SUM of 3N (4N with LoRA) per-token numbers and one SUM of 2 sum_b T_b^2 (r_t . r_u and
        r_t[y_u] per conversation); the Gram is then centred identically on every rank."""
        if raw:
            raise NotImplementedError("raw parts of a vocabulary-parallel pass")
        lp = self._owned_targets_view(prob)
        gp = self.local.lora_gram_pass(lp, keep=keep, raw=True)
        lse, logp, q, pib_off, _ = self._combine_tokens(prob, gp, "lora_gram_pass")
        e = torch.exp(gp.lse - lse)  # this shard's share of each token's mass: r_t = e r_t(local)
        off = prob.offsets
        parts = []
        for b, (R, X) in enumerate(zip(gp.gram, gp.cross)):
            eb = e[off[b]:off[b + 1]]
            parts += [(R * eb.unsqueeze(1) * eb.unsqueeze(0)).reshape(-1), (X * eb.unsqueeze(1)).reshape(-1)]
        flat = self.comm.all_sum(torch.cat(parts), "lora_gram_pass: gram")
        grams, pos = [], 0
        for b in range(prob.num_conversations):
            n = off[b + 1] - off[b]
            R = flat[pos:pos + n * n].view(n, n)
            X = flat[pos + n * n:pos + 2 * n * n].view(n, n)
            pos += 2 * n * n
            subtract_cross(R, X, q[off[b]:off[b + 1]])
            same_token_pairs(R, prob.targets[off[b]:off[b + 1]], q[off[b]:off[b + 1]])
            grams.append(R)
        return GramPass(lse=lse, logp=logp, q=q, ah=gp.ah, pib_off=pib_off, gram=grams, kept=gp.kept)

    def centered_column_reduce(self, prob: HeadProblem, gp: GramPass, w: torch.Tensor,
                               out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """sum_{t in b} w_t (e_{y_t} - pi_t) -> (B, V_local): this rank's columns (its kept tiles or
        one local pass with the global lse; the owner scatters), no communication."""
        return self.local.centered_column_reduce(self._owned_targets_view(prob), gp, w, out)

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

    def pi_weight(self, prob: HeadProblem, st: HeadStats) -> torch.Tensor:
        """pi_t W -> (N, d): SUM."""
        lp, _, _ = self._view(prob)
        return self.comm.all_sum(self.local.pi_weight(lp, st), "pi_weight")

    def _owned_targets_view(self, prob: HeadProblem) -> HeadProblem:
        """The local view with the targets of tokens another rank owns set to -1 (never dropped)."""
        lp, own, idx = self._view(prob)
        return replace(lp, targets=torch.where(own, idx, torch.full_like(idx, -1)))

    def pi_gram(self, prob: HeadProblem, st: HeadStats, drop_targets: bool = False) -> torch.Tensor:
        """pi_t . pi_u (or q_t . q_u: the owner drops the target entry) within each conversation
        -> (B, Tmax, Tmax): SUM."""
        lp = self._owned_targets_view(prob) if drop_targets else self._view(prob)[0]
        return self.comm.all_sum(self.local.pi_gram(lp, st, drop_targets), "pi_gram")

    def pi_sqnorm(self, prob: HeadProblem, st: HeadStats) -> torch.Tensor:
        """q_t . q_t per token -> (N,): SUM (the owner drops the target entry)."""
        return self.comm.all_sum(self.local.pi_sqnorm(self._owned_targets_view(prob), st), "pi_sqnorm")

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
        """scatter(y, w) - C(w) -> (B, V_local): this rank's columns, then the owner-only scatter; no
        communication. (Not the local backend's fused version: its problem's targets are remapped
        to a valid local row for the tokens this rank does not own.)"""
        return self.scatter_targets(prob, -self.column_reduce(prob, st, w), w)

    def centered_row_reduce(self, prob: HeadProblem, st: HeadStats, u: torch.Tensor) -> torch.Tensor:
        """(e_{y_t} - pi_t) . u[seg_t] for u (B, V_local) -> (N,): one SUM for both terms."""
        lp, own, idx = self._view(prob)
        part = self._mask(own, u[prob.seg, idx]) - self.local.row_reduce(lp, st, u)
        return self.comm.all_sum(part, "centered_row_reduce")

    def sum_vocab(self, prob: HeadProblem, x: torch.Tensor) -> torch.Tensor:
        """x (B, V_local) -> (B, 1), the sum over the whole vocabulary: SUM."""
        return self.comm.all_sum(x.sum(-1, keepdim=True), "sum_vocab")

    def target_logits(self, prob: HeadProblem, h: torch.Tensor) -> torch.Tensor:
        """[b, u, t] = h_u . W[y_t] + c[y_t] -> (B, Tmax, Tmax): the owner of y_t fills column t; SUM."""
        _, own, idx = self._view(prob)
        B, Tm, off, cd = prob.num_conversations, prob.max_len, prob.offsets, prob.compute_dtype
        w_y = self._mask(own, prob.weight[idx].to(cd))
        c_y = None if prob.bias is None else self._mask(own, prob.bias[idx].to(cd))
        out = torch.zeros(B, Tm, Tm, dtype=cd, device=h.device)
        for b in range(B):
            sl = slice(off[b], off[b + 1])
            z = h[sl] @ w_y[sl].T
            if c_y is not None:
                z = z + c_y[sl].unsqueeze(0)
            out[b, :off[b + 1] - off[b], :off[b + 1] - off[b]] = z
        return self.comm.all_sum(out, "target_logits")
