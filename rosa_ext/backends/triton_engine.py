"""The Triton engine: the passes of the :class:`~rosa_ext.backends.protocol.Engine` protocol on the
Triton kernels of :mod:`rosa_ext.kernels` (CUDA, or the interpreter under ``TRITON_INTERPRET=1``).

- One-pass plans (:meth:`TritonEngine.hidden_pass`, :meth:`TritonEngine.gram_pass`): ONE logits pass --
  the probability-tile kernel computes each token's row statistics itself (online softmax per
  vocabulary split) while it writes the N x V off-target probabilities P relative to per-split
  references, with their row sums (q = 1 - p_t, r . b, r . r); a small combine gives lse and the
  per-split scales -- then the products are GEMMs over P on the tensor cores, K-split at the
  vocabulary splits with the scales applied (:mod:`rosa_ext.kernels.tile_gemms`: hidden ``r W = P W``;
  LoRA ``P_b P_b^T`` with the cross terms ``P[t, y_u]`` gathered, the VJP ``w^T P``); MATH.md section 4. P is stored as bf16 hi + lo parts
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
from ..common.jacobian import target_logp
from ..common.types import GramPass, HeadProblem, HeadStats, HiddenPass
from ..kernels import tile_gemms
from ..kernels.primitives import TritonPrimitives
from ..kernels.prob_tiles import ProbTiles, prob_tiles_from_tensors
from .throughput import TRITON, lookup
from .torch_engine import TorchEngine


@dataclass
class KeptProbTiles:
    """The probability tiles a LoRA pass kept for the VJP, with the log-sum-exp they were normalised by."""

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

    # ------------------------------------------------------------------------- one-pass plans
    def prob_tiles(self, prob: HeadProblem) -> Tuple[ProbTiles, Optional[torch.Tensor], torch.Tensor]:
        """ONE pass over W -> (the probability tiles P, stored relative to per-split references with their
        ``split_scale``, carrying lse; a . h_t (N,) or None; log p_t (N,) from the pass's target logit,
        accurate near p_t = 1 from the tiles' off-target sum q)."""
        ah = None
        if prob.lora_a is not None:
            ah = (prob.hidden.float() * prob.lora_a[prob.seg].float()).sum(1)
        precision = "fp32" if prob.weight.dtype == torch.float32 else "bf16x2"
        tiles = prob_tiles_from_tensors(prob.hidden, prob.weight, self.index(prob)[0], None, prob.targets,
                                        bias=prob.bias, lora_b=prob.lora_b if ah is not None else None, ah=ah,
                                        lora_scale=prob.lora_scale if ah is not None else 0.0, precision=precision)
        return tiles, ah, target_logp(tiles.target_logit, tiles.lse, tiles.q)

    def hidden_pass(self, prob: HeadProblem, budget_bytes: int = defaults.KEEP_BUDGET_BYTES) -> HiddenPass:
        """lse, log p, q, r . b and r W = P W (one K-split GEMM over the tiles) when float32 compute and P
        (N V fp32 numbers) within ``budget_bytes``; the torch engine's pass otherwise."""
        if self._fp64(prob) or prob.num_tokens * prob.vocab_size * 4 > budget_bytes:
            return self.torch.hidden_pass(prob)
        tiles, ah, logp = self.prob_tiles(prob)
        return HiddenPass(lse=tiles.lse, logp=logp, q=tiles.q, ah=ah, pib_off=tiles.rb,
                          pi_weight=tile_gemms.off_target_weight(tiles, prob.weight), engine=self.name)

    def gram_pass(self, prob: HeadProblem, keep: bool, budget_bytes: int = defaults.KEEP_BUDGET_BYTES) -> GramPass:
        """The raw Gram parts as GEMMs over the tiles (``P_b P_b^T`` and the gathered ``P[t, y_u]``), the
        tiles kept for :meth:`off_target_vjp` (whatever ``keep`` says: they are written anyway): when
        float32 compute and P within ``budget_bytes``; the torch engine's pass otherwise."""
        if self._fp64(prob) or prob.num_tokens * prob.vocab_size * 4 > budget_bytes:
            return self.torch.gram_pass(prob, keep)
        tiles, ah, logp = self.prob_tiles(prob)
        return GramPass(lse=tiles.lse, logp=logp, q=tiles.q, ah=ah, pib_off=tiles.rb,
                        gram=tile_gemms.off_target_gram(tiles, prob.offsets),
                        cross=tile_gemms.cross_terms(tiles, prob.targets, prob.offsets),
                        kept=KeptProbTiles(tiles, tiles.lse), engine=self.name)

    def off_target_vjp(self, prob: HeadProblem, gp: GramPass, w: torch.Tensor,
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """sum_{t in b} w_t r_t -> (B, V), r_t normalised by ``gp.lse``: one K-split GEMM (B, N) @ P over the
        kept tiles, their split scales folded into w (and exp(lse_tiles - gp.lse), 1 unless a
        vocabulary-parallel combine moved lse)."""
        if not isinstance(gp.kept, KeptProbTiles):
            return self.torch.off_target_vjp(prob, gp, w, out)
        N, B = prob.num_tokens, prob.num_conversations
        wt = (w * torch.exp(gp.kept.lse - gp.lse)).float()
        Wb = torch.zeros(B, N, dtype=torch.float32, device=w.device)
        Wb[prob.seg, torch.arange(N, device=w.device)] = wt  # block-diagonal rows: one per conversation
        res = tile_gemms.tiles_rmatmul(gp.kept.tiles, Wb)
        return res if out is None else out.copy_(res)

    # ------------------------------------------------------------------------- matrix-free CG
    def stats(self, prob: HeadProblem) -> HeadStats:
        """lse, log p, a.h, pi.b per token, (N,) each, from one fused pass over W."""
        if self._fp64(prob):
            return self.torch.stats(prob)
        st = super().stats(prob)
        st.engine = self.name
        return st

    def row_reduce(self, prob: HeadProblem, st: HeadStats, u: torch.Tensor) -> torch.Tensor:
        """(pi_t . u[seg_t]) for u (B, V) -> (N,)."""
        return self.torch.row_reduce(prob, st, u) if self._fp64(prob) else super().row_reduce(prob, st, u)

    def column_reduce(self, prob: HeadProblem, st: HeadStats, w: torch.Tensor) -> torch.Tensor:
        """sum_{t in b} w_t pi_t for w (N,) -> (B, V)."""
        return self.torch.column_reduce(prob, st, w) if self._fp64(prob) else super().column_reduce(prob, st, w)

    def scatter_minus_column(self, prob: HeadProblem, st: HeadStats, w: torch.Tensor) -> torch.Tensor:
        """scatter(y, w) - C(w) -> (B, V): one fused column pass (no ``index_put_``)."""
        if self._fp64(prob):
            return self.torch.scatter_minus_column(prob, st, w)
        return super().scatter_minus_column(prob, st, w)

    def weight_matvec(self, prob: HeadProblem, v: torch.Tensor) -> torch.Tensor:
        """W v for v (B, d) -> (B, V) compute dtype."""
        return self.torch.weight_matvec(prob, v) if self._fp64(prob) else super().weight_matvec(prob, v)

    def weight_rmatvec(self, prob: HeadProblem, q: torch.Tensor) -> torch.Tensor:
        """q W for q (B, V) -> (B, d) compute dtype."""
        return self.torch.weight_rmatvec(prob, q) if self._fp64(prob) else super().weight_rmatvec(prob, q)

    def off_target_row_reduce(self, prob: HeadProblem, st: HeadStats, u: torch.Tensor) -> torch.Tensor:
        """r_t . u[seg_t] -> (N,) (torch engine: reached only with stats that split the target off, i.e.
        float64 problems, whose stats run on torch)."""
        return self.torch.off_target_row_reduce(prob, st, u)

    def off_target_column_reduce(self, prob: HeadProblem, st: HeadStats, w: torch.Tensor) -> torch.Tensor:
        """sum_{t in b} w_t r_t -> (B, V) (torch engine, as :meth:`off_target_row_reduce`)."""
        return self.torch.off_target_column_reduce(prob, st, w)

    def pi_sqnorm(self, prob: HeadProblem, st: HeadStats) -> torch.Tensor:
        """r_t . r_t per token -> (N,) (torch engine; once per update: relative damping with CG)."""
        return self.torch.pi_sqnorm(prob, st)
