"""The Triton engine: the passes of the :class:`~rosa_ext.backends.protocol.Engine` protocol on the
Triton kernels of :mod:`rosa_ext.kernels` (CUDA, or the interpreter under ``TRITON_INTERPRET=1``).

- One-pass plans (:meth:`TritonEngine.hidden_pass`, :meth:`TritonEngine.gram_pass`): the stats kernel's
  lse, then the probability-tile kernel writes the N x V off-target probabilities P with their row sums
  (q = 1 - p_t, r . b), then the products are GEMMs over P on the tensor cores
  (:mod:`rosa_ext.kernels.tile_gemms`: hidden ``r W = P W``; LoRA ``P_b P_b^T`` with the cross terms
  ``P[t, y_u]`` gathered, the VJP ``w^T P``); MATH.md section 4. P is stored as bf16 hi + lo parts
  (fp32 accuracy on bf16 tensor cores) for bf16/fp16 models, as fp32 otherwise. Used for float32
  compute when P fits the budget (hidden) or the plan keeps its tiles (LoRA); otherwise the pass is the
  torch engine's, and reports "torch".
- Matrix-free CG: the fused stats / row / column kernels and the GEMVs of
  :class:`rosa_ext.kernels.primitives.TritonPrimitives` (logits tiles recomputed on chip, never stored;
  they skip their work once the compiled CUDA CG has converged, :mod:`rosa_ext.common.device_flag`);
  ``pi_sqnorm`` (once per update: the relative ridge) and the off-target reductions on the torch engine.
- float64 problems run entirely on the torch engine (no fp64 tensor-core dot in Triton).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from ..common import defaults
from ..common.jacobian import WholeVocabulary, split_logits
from ..common.types import GramPass, HeadProblem, HeadStats, HiddenPass
from ..kernels import tile_gemms
from ..kernels.primitives import TritonPrimitives
from ..kernels.prob_tiles import ProbTiles, prob_tiles_from_tensors
from .throughput import TRITON, lookup
from .torch_engine import TorchEngine


@dataclass
class KeptProbTiles:
    """The probability tiles P = exp(z - lse) (target entries 0) a pass kept, with the ``lse`` they were
    written with: r̂_t = P_t exp(lse_t - lse_off_t) for any off-target log-sum-exp lse_off (this
    process's, or a vocabulary-parallel combine's)."""

    tiles: ProbTiles
    lse: torch.Tensor


class TritonEngine(TritonPrimitives):
    """The Triton implementation of every pass (module doc)."""

    name = "triton"

    def __init__(self) -> None:
        super().__init__()
        self.torch = TorchEngine()

    def throughput(self, device_type: str, dtype: torch.dtype) -> Dict[str, float]:
        """The cost model's constants of this engine (:data:`rosa_ext.backends.throughput.TRITON`; the
        torch engine's off CUDA, where the interpreter runs the kernels)."""
        return lookup(TRITON, device_type, dtype) if (device_type, dtype) in TRITON else self.torch.throughput(device_type, dtype)

    @staticmethod
    def _fp64(prob: HeadProblem) -> bool:
        return prob.compute_dtype == torch.float64

    # ------------------------------------------------------------------------- the probability tiles
    def prob_tiles(self, prob: HeadProblem, budget_bytes: int, min_q: float = 1e-12
                   ) -> Optional[Tuple[HeadStats, ProbTiles]]:
        """(the split stats, the probability tiles P) of a float32 problem whose P (N V fp32 numbers) fits
        ``budget_bytes``, else None. The stats kernel's lse, then the tile kernel's P and its off-target sum
        q = 1 - p_t: lse_off = lse + log q. None too when some 1 - p_t is below ``min_q`` (one host read):
        the tile kernel normalises by lse, so a token that confident has P ~ (1 - p_t) r̂_t, whose entries
        (1e-30: the linear products of the hidden pass) or whose products P P^T and r . r (1e-12: the LoRA
        Gram and the CG's reductions) leave float32's range; the torch engine, whose reference excludes the
        target, then runs the pass."""
        if self._fp64(prob) or prob.num_tokens * prob.vocab_size * 4 > budget_bytes:
            return None
        st = TritonPrimitives.stats(self, prob)
        precision = "fp32" if prob.weight.dtype == torch.float32 else "bf16x2"
        tiles = prob_tiles_from_tensors(prob.hidden, prob.weight, self.index(prob)[0], st.lse, prob.targets,
                                        bias=prob.bias, lora_b=prob.lora_b, ah=st.ah,
                                        lora_scale=prob.lora_scale if st.ah is not None else 0.0, precision=precision)
        if bool((tiles.q < min_q).any()):
            return None
        lse, logp, logq = split_logits(st.logp + st.lse, st.lse + torch.log(tiles.q))
        rb = None if tiles.rb is None else tiles.rb / tiles.q
        split = HeadStats(lse=lse, logp=logp, ah=st.ah, pib=None, lse_off=st.lse + torch.log(tiles.q), logq=logq,
                          rb=rb, kept=KeptProbTiles(tiles, st.lse), engine=self.name, split=True)
        return split, tiles

    # ------------------------------------------------------------------------- one-pass plans
    def hidden_pass(self, prob: HeadProblem, budget_bytes: int = defaults.KEEP_BUDGET_BYTES) -> HiddenPass:
        """lse, log p, log(1 - p), r̂ . b and r̂ W = (P W) / q (one GEMM over the tiles) when
        :meth:`prob_tiles` runs; the torch engine's pass otherwise."""
        pt = self.prob_tiles(prob, budget_bytes, min_q=1e-30)
        if pt is None:
            return self.torch.hidden_pass(prob)
        st, tiles = pt
        rw = tile_gemms.off_target_weight(tiles, prob.weight).div_(tiles.q.unsqueeze(1))
        return HiddenPass(lse=st.lse, lse_off=st.lse_off, logp=st.logp, logq=st.logq, ah=st.ah, rb=st.rb, rw=rw,
                          engine=self.name)

    def gram_pass(self, prob: HeadProblem, keep: bool, budget_bytes: int = defaults.KEEP_BUDGET_BYTES) -> GramPass:
        """The raw Gram parts as GEMMs over the tiles (``P_b P_b^T`` and the gathered ``P[t, y_u]``, divided
        by q), the tiles kept for :meth:`off_target_vjp` (whatever ``keep`` says: they are written anyway):
        when :meth:`prob_tiles` runs; the torch engine's pass otherwise."""
        pt = self.prob_tiles(prob, budget_bytes)
        if pt is None:
            return self.torch.gram_pass(prob, keep)
        st, tiles = pt
        off = prob.offsets
        inv = 1.0 / tiles.q
        grams = [G.mul_(inv[lo:hi].unsqueeze(1)).mul_(inv[lo:hi].unsqueeze(0))
                 for G, lo, hi in zip(tile_gemms.off_target_gram(tiles, off), off[:-1], off[1:])]
        cross = [X.mul_(inv[lo:hi].unsqueeze(1))
                 for X, lo, hi in zip(tile_gemms.cross_terms(tiles, prob.targets, off), off[:-1], off[1:])]
        return GramPass(lse=st.lse, lse_off=st.lse_off, logp=st.logp, logq=st.logq, ah=st.ah, rb=st.rb, gram=grams,
                        cross=cross, kept=st.kept, engine=self.name)

    def off_target_vjp(self, prob: HeadProblem, gp: GramPass, w: torch.Tensor,
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """sum_{t in b} w_t r̂_t -> (B, V), r̂_t normalised by ``gp.lse_off``: one GEMM (B, N) @ P over the kept
        tiles; the torch engine's pass when the tiles were not kept."""
        if not isinstance(gp.kept, KeptProbTiles):
            return self.torch.off_target_vjp(prob, gp, w, out)
        res = self._rmatmul(prob, gp.kept, gp.lse_off, w)
        return res if out is None else out.copy_(res)

    def _rmatmul(self, prob: HeadProblem, kept: KeptProbTiles, lse_off: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """sum_{t in b} w_t r̂_t -> (B, V) over kept tiles: one GEMM (B, N) @ P with w_t exp(lse_t - lse_off_t)."""
        N, B = prob.num_tokens, prob.num_conversations
        wt = (w * torch.exp(kept.lse - lse_off)).float()
        Wb = torch.zeros(B, N, dtype=torch.float32, device=w.device)
        Wb[prob.seg, torch.arange(N, device=w.device)] = wt  # block-diagonal rows: one per conversation
        return tile_gemms.tiles_rmatmul(kept.tiles, Wb)

    # ------------------------------------------------------------------------- matrix-free CG
    def stats(self, prob: HeadProblem, budget_bytes: int = defaults.KEEP_BUDGET_BYTES) -> HeadStats:
        """The split stats (MATH.md section 4) from the probability tiles (kept: CG's reductions are then
        GEMVs over them) when :meth:`prob_tiles` runs; the torch engine's split stats otherwise (its
        streaming reductions then serve CG). The stats kernel alone does not split the target off, and
        its expanded forms cancel for confident tokens."""
        pt = self.prob_tiles(prob, budget_bytes)
        return self.torch.stats(prob) if pt is None else pt[0]

    def row_reduce(self, prob: HeadProblem, st: HeadStats, u: torch.Tensor) -> torch.Tensor:
        """(pi_t . u[seg_t]) for u (B, V) -> (N,)."""
        return self.torch.row_reduce(prob, st, u) if self._fp64(prob) else super().row_reduce(prob, st, u)

    def column_reduce(self, prob: HeadProblem, st: HeadStats, w: torch.Tensor) -> torch.Tensor:
        """sum_{t in b} w_t pi_t for w (N,) -> (B, V)."""
        return self.torch.column_reduce(prob, st, w) if self._fp64(prob) else super().column_reduce(prob, st, w)

    def scatter_minus_column(self, prob: HeadProblem, st: HeadStats, w: torch.Tensor) -> torch.Tensor:
        """sum_t w_t (e_{y_t} - rho_t) -> (B, V): with split stats the off-target form (GEMV over the kept
        tiles, or the torch engine); otherwise one fused column pass (no ``index_put_``)."""
        if st.split or self._fp64(prob):
            return WholeVocabulary.scatter_minus_column(self, prob, st, w)
        return super().scatter_minus_column(prob, st, w)

    def weight_matvec(self, prob: HeadProblem, v: torch.Tensor) -> torch.Tensor:
        """W v for v (B, d) -> (B, V) compute dtype."""
        return self.torch.weight_matvec(prob, v) if self._fp64(prob) else super().weight_matvec(prob, v)

    def weight_rmatvec(self, prob: HeadProblem, q: torch.Tensor) -> torch.Tensor:
        """q W for q (B, V) -> (B, d) compute dtype."""
        return self.torch.weight_rmatvec(prob, q) if self._fp64(prob) else super().weight_rmatvec(prob, q)

    def off_target_row_reduce(self, prob: HeadProblem, st: HeadStats, u: torch.Tensor) -> torch.Tensor:
        """r̂_t . u[seg_t] -> (N,): a GEMV over the kept tiles (P u, times exp(lse - lse_off)); the torch
        engine's streaming reduction when the stats kept none."""
        kept = st.kept
        if not isinstance(kept, KeptProbTiles):
            return self.torch.off_target_row_reduce(prob, st, u)
        dots = tile_gemms.off_target_dot(kept.tiles, u.float(), None if u.shape[0] == 1 else prob.seg)
        return dots * torch.exp(kept.lse - st.lse_off)

    def off_target_column_reduce(self, prob: HeadProblem, st: HeadStats, w: torch.Tensor) -> torch.Tensor:
        """sum_{t in b} w_t r̂_t -> (B, V): one GEMM over the kept tiles, or the torch engine's pass."""
        if not isinstance(st.kept, KeptProbTiles):
            return self.torch.off_target_column_reduce(prob, st, w)
        return self._rmatmul(prob, st.kept, st.lse_off, w)

    def pi_sqnorm(self, prob: HeadProblem, st: HeadStats) -> torch.Tensor:
        """r̂_t . r̂_t per token -> (N,): the kept tiles' r . r / q^2, or the torch engine's pass."""
        kept = st.kept
        if not isinstance(kept, KeptProbTiles):
            return self.torch.pi_sqnorm(prob, st)
        return kept.tiles.ss * torch.exp(2 * (kept.lse - st.lse_off))
