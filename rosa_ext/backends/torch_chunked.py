"""Portable backend: the streaming reductions of MATH.md section 3 in plain torch.

Works wherever torch does. The vocabulary is processed in chunks of
``chunk_size`` columns; each chunk recomputes its (N, chunk) tile of logits
from H, W and the cached ``lse`` (flash-attention style), so peak extra
memory is O(N*d + V + N*chunk) and the N x V logits never exist. Accumulation
is in the compute dtype (fp32 for fp32/bf16/fp16 models, fp64 for fp64).

These are the primitives of matrix-free CG (:mod:`rosa_ext.plans.cg_lora`); the one-pass plans
stream their own torch tiles (:mod:`rosa_ext.plans.tiles`).
"""
from __future__ import annotations

from typing import Iterator, Optional, Tuple

import torch

from ..common.jacobian import WholeVocabulary, target_logit, target_logp
from ..common.types import HeadProblem, HeadStats

#: Target size, in elements, of one (N, chunk) logits tile (32 MB in fp32).
DEFAULT_TILE_ELEMENTS = 1 << 23


class TorchChunkedBackend(WholeVocabulary):
    """Chunked-vocabulary torch implementation of the backend primitives."""

    name = "torch"

    def __init__(self, chunk_size: Optional[int] = None) -> None:
        self.chunk_size = chunk_size

    # -- helpers -----------------------------------------------------------------
    def _chunk(self, prob: HeadProblem) -> int:
        if self.chunk_size is not None:
            return max(1, int(self.chunk_size))
        return int(max(256, min(prob.vocab_size, DEFAULT_TILE_ELEMENTS // max(1, prob.num_tokens))))

    def _hidden(self, prob: HeadProblem) -> torch.Tensor:
        return prob.hidden.to(prob.compute_dtype)

    def _logit_tiles(self, prob: HeadProblem, h: torch.Tensor, ah: Optional[torch.Tensor]
                     ) -> Iterator[Tuple[int, int, torch.Tensor, torch.Tensor]]:
        """Yield (v0, v1, W chunk (compute dtype), logits tile (N, v1 - v0))."""
        cd = prob.compute_dtype
        V = prob.vocab_size
        step = self._chunk(prob)
        single = prob.num_conversations == 1
        for v0 in range(0, V, step):
            v1 = min(V, v0 + step)
            wc = prob.weight[v0:v1].to(cd)
            z = h @ wc.T
            if prob.bias is not None:
                z += prob.bias[v0:v1].to(cd)
            if prob.lora_b is not None:
                bc = prob.lora_b[:, v0:v1]
                bc = bc[0].unsqueeze(0) if single else bc[prob.seg]
                z += (prob.lora_scale * ah).unsqueeze(1) * bc
            yield v0, v1, wc, z

    def _probs(self, prob: HeadProblem, st: HeadStats):
        h = self._hidden(prob)
        for v0, v1, wc, z in self._logit_tiles(prob, h, st.ah):
            yield v0, v1, wc, torch.exp(z - st.lse.unsqueeze(1))

    # -- primitives ---------------------------------------------------------------
    def stats(self, prob: HeadProblem) -> HeadStats:
        """One pass over W: online log-sum-exp, p_t, a.h_t, pi_t.b (MATH.md section 3). The sum of
        exp(z) without each token's target entry is accumulated too, so that log p_t = log1p(-(1 - p_t))
        stays accurate where p_t is within rounding of 1 (MATH.md section 4)."""
        cd = prob.compute_dtype
        h = self._hidden(prob)
        N = prob.num_tokens
        ah = None
        if prob.lora_a is not None:
            ah = (h * prob.lora_a[prob.seg]).sum(1)
        m = torch.full((N,), float("-inf"), dtype=cd, device=h.device)
        s = torch.zeros(N, dtype=cd, device=h.device)
        s_off = torch.zeros(N, dtype=cd, device=h.device)
        sb = torch.zeros(N, dtype=cd, device=h.device) if prob.lora_b is not None else None
        sb_off = torch.zeros(N, dtype=cd, device=h.device) if prob.lora_b is not None else None
        single = prob.num_conversations == 1
        for v0, v1, _, z in self._logit_tiles(prob, h, ah):
            m_new = torch.maximum(m, z.max(dim=1).values)
            rescale = torch.exp(m - m_new)
            e = torch.exp(z - m_new.unsqueeze(1))
            s = s * rescale + e.sum(1)
            e_off = self._drop_targets(prob, v0, v1, e)
            s_off = s_off * rescale + e_off.sum(1)
            if sb is not None:
                bc = prob.lora_b[:, v0:v1]
                bc = bc[0].unsqueeze(0) if single else bc[prob.seg]
                sb = sb * rescale + (e * bc).sum(1)
                sb_off = sb_off * rescale + (e_off * bc).sum(1)
            m = m_new
        lse = m + torch.log(s)
        by = None if prob.lora_b is None else prob.lora_b[prob.seg, prob.targets]
        z_y = target_logit(h, prob.weight, prob.targets, bias=prob.bias, ah=ah, by=by, lora_scale=prob.lora_scale)
        q = s_off / s
        logp = target_logp(z_y, lse, q)
        pib = None if sb is None else sb / s
        pib_off = None if sb_off is None else sb_off / s
        return HeadStats(lse=lse, logp=logp, ah=ah, pib=pib, q=q, pib_off=pib_off)

    def _tiles(self, prob: HeadProblem, st: HeadStats, drop_targets: bool):
        """(v0, v1, tile) of pi_t -- or of r_t, pi_t without its target entry, with ``drop_targets``."""
        for v0, v1, _, pi in self._probs(prob, st):
            yield v0, v1, (self._drop_targets(prob, v0, v1, pi) if drop_targets else pi)

    def _row_reduce(self, prob: HeadProblem, st: HeadStats, u: torch.Tensor, drop_targets: bool) -> torch.Tensor:
        out = torch.zeros(prob.num_tokens, dtype=prob.compute_dtype, device=prob.device)
        single = prob.num_conversations == 1
        for v0, v1, pi in self._tiles(prob, st, drop_targets):
            uc = u[:, v0:v1]
            out += (pi * (uc[0].unsqueeze(0) if single else uc[prob.seg])).sum(1)
        return out

    def _column_reduce(self, prob: HeadProblem, st: HeadStats, w: torch.Tensor, drop_targets: bool) -> torch.Tensor:
        B = prob.num_conversations
        out = torch.empty(B, prob.vocab_size, dtype=prob.compute_dtype, device=prob.device)
        for v0, v1, pi in self._tiles(prob, st, drop_targets):
            if B == 1:
                out[0, v0:v1] = w @ pi
            else:
                out[:, v0:v1] = torch.zeros(B, v1 - v0, dtype=pi.dtype, device=pi.device).index_add_(
                    0, prob.seg, pi * w.unsqueeze(1))
        return out

    def row_reduce(self, prob: HeadProblem, st: HeadStats, u: torch.Tensor) -> torch.Tensor:
        """(pi_t . u[seg_t]) for u (B, V) -> (N,)."""
        return self._row_reduce(prob, st, u, drop_targets=False)

    def column_reduce(self, prob: HeadProblem, st: HeadStats, w: torch.Tensor) -> torch.Tensor:
        """sum_{t in b} w_t pi_t for w (N,) -> (B, V)."""
        return self._column_reduce(prob, st, w, drop_targets=False)

    @staticmethod
    def _drop_targets(prob: HeadProblem, v0: int, v1: int, pi: torch.Tensor) -> torch.Tensor:
        """The tile with pi_t[y_t] set to 0 (q_t = pi_t - p_t e_{y_t}). Targets outside [0, V) --
        a vocabulary-parallel backend marks the tokens another rank owns so -- are never dropped."""
        hit = (prob.targets >= v0) & (prob.targets < v1)
        rows = torch.nonzero(hit).flatten()
        return pi.index_put((rows, prob.targets[rows] - v0), torch.zeros((), dtype=pi.dtype, device=pi.device))

    def off_target_row_reduce(self, prob: HeadProblem, st: HeadStats, u: torch.Tensor) -> torch.Tensor:
        """(r_t . u[seg_t]) for u (B, V) -> (N,), r_t = pi_t without its target entry."""
        return self._row_reduce(prob, st, u, drop_targets=True)

    def off_target_column_reduce(self, prob: HeadProblem, st: HeadStats, w: torch.Tensor) -> torch.Tensor:
        """sum_{t in b} w_t r_t for w (N,) -> (B, V), r_t = pi_t without its target entry."""
        return self._column_reduce(prob, st, w, drop_targets=True)

    def pi_sqnorm(self, prob: HeadProblem, st: HeadStats) -> torch.Tensor:
        """q_t . q_t = sum_{v != y_t} pi_t[v]^2 for every token -> (N,) (relative damping, LoRA mode)."""
        out = torch.zeros(prob.num_tokens, dtype=prob.compute_dtype, device=prob.device)
        for v0, v1, _, pi in self._probs(prob, st):
            q = self._drop_targets(prob, v0, v1, pi)
            out += (q * q).sum(1)
        return out

    def weight_matvec(self, prob: HeadProblem, v: torch.Tensor) -> torch.Tensor:
        """W v for v (B, d) -> (B, V), compute dtype, W read chunk by chunk."""
        cd = prob.compute_dtype
        if prob.weight.dtype == cd:
            return v @ prob.weight.T
        step = self._chunk(prob)
        out = torch.empty(v.shape[0], prob.vocab_size, dtype=cd, device=v.device)
        for v0 in range(0, prob.vocab_size, step):
            v1 = min(prob.vocab_size, v0 + step)
            out[:, v0:v1] = v @ prob.weight[v0:v1].to(cd).T
        return out

    def weight_rmatvec(self, prob: HeadProblem, q: torch.Tensor) -> torch.Tensor:
        """q W for q (B, V) -> (B, d), compute dtype, W read chunk by chunk."""
        cd = prob.compute_dtype
        if prob.weight.dtype == cd:
            return q @ prob.weight
        step = self._chunk(prob)
        out = torch.zeros(q.shape[0], prob.hidden_size, dtype=cd, device=q.device)
        for v0 in range(0, prob.vocab_size, step):
            v1 = min(prob.vocab_size, v0 + step)
            out += q[:, v0:v1] @ prob.weight[v0:v1].to(cd)
        return out
