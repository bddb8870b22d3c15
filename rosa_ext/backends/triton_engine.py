"""The Triton engine: the passes of the :class:`~rosa_ext.backends.protocol.Engine` protocol on the
Triton kernels of :mod:`rosa_ext.kernels` (CUDA, or the interpreter under ``TRITON_INTERPRET=1``).

- One-pass plans (:meth:`TritonEngine.hidden_pass`, :meth:`TritonEngine.gram_pass`): ONE logits pass --
  the probability-tile kernel takes every token's target off each logits tile (its logit kept apart)
  and computes the row statistics of the OTHER logits itself (online softmax per vocabulary split)
  while it writes the N x V tiles relative to per-split references with their row sums; a small combine
  (one launch, :mod:`rosa_ext.kernels.epilogue`) gives lse_off, the per-split scales that make the tiles r̂ (the softmax of the other logits), r̂ . b,
  and lse, log p, log(1 - p) exactly from logit(p) = z_y - lse_off (MATH.md section 4) -- then the
  products are GEMMs over the tiles on the tensor cores, K-split at the vocabulary splits with the
  scales applied (:mod:`rosa_ext.kernels.tile_gemms`: hidden ``r̂ W``; LoRA ``r̂_b r̂_b^T`` with the
  cross terms ``r̂_t[y_u]`` gathered, the VJP ``w^T r̂``). Nothing in them depends on how confident or
  unlikely a token is: no 1 - p is formed, so no token is handed over for it. The linearisation of such a
  pass (:meth:`TritonEngine.linearize`) is one more launch. The tiles are stored as
  bf16 hi + lo parts (fp32 accuracy on bf16 tensor cores) for bf16/fp16 models, as fp32 otherwise.
  Used for float32 compute when the tiles (N V fp32 numbers) fit ``keep_budget_bytes``; otherwise the
  pass is the torch engine's, and reports "torch".
- Matrix-free CG: the split stats from the same one pass (the tiles kept: CG's off-target reductions
  are GEMVs over them, ``pi_sqnorm`` their r̂ . r̂); over the budget the torch engine's split stats and
  streaming reductions. The fused row / column kernels and the GEMVs of
  :class:`rosa_ext.kernels.primitives.TritonPrimitives` serve the reductions over pi (logits tiles
  recomputed on chip, never stored; they skip their work once the compiled CUDA CG has converged,
  :mod:`rosa_ext.common.device_flag`).
- float64 problems run entirely on the torch engine (no fp64 tensor-core dot in Triton).

No hand-over is silent: each reason (float64; the tiles over the budget in a hidden, Gram or CG stats
pass) warns once per process (:func:`rosa_ext.kernels.tile_gemms.fallback_warning`, a RuntimeWarning
naming it).
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Dict, Optional, Tuple

import torch

from ..common import defaults
from ..common.jacobian import Linearization, WholeVocabulary, pass_stats
from ..common.types import GramPass, HeadProblem, HeadStats, HiddenPass
from ..kernels import tile_gemms
from ..kernels.epilogue import linearize_tokens
from ..kernels.primitives import TritonPrimitives
from ..kernels.prob_tiles import ProbTiles, prob_tiles_from_tensors
from .throughput import TRITON, lookup
from .torch_engine import TorchEngine


def _size(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB" if n >= 2 ** 20 else f"{n} bytes"


@dataclass
class KeptProbTiles:
    """The probability tiles a pass kept, with the log-sum-exp ``norm`` they are normalised by (the one
    pass's off-target tiles: this process's lse_off, so they are r̂): r̂_t = tiles_t exp(norm_t - lse_off_t)
    for any off-target log-sum-exp lse_off (this process's -- the factor is 1 -- or a vocabulary-parallel
    combine's)."""

    tiles: ProbTiles
    norm: torch.Tensor


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
        """True for a float64 problem (run on the torch engine; warned once per process)."""
        if prob.compute_dtype != torch.float64:
            return False
        tile_gemms.fallback_warning("triton_fp64", "the Triton engine runs float64 problems on the torch engine "
                                    "(no float64 tensor-core dot in Triton): fp64 torch tiles, no Triton kernels")
        return True

    @staticmethod
    def _over_budget(prob: HeadProblem, budget_bytes: int, what: str) -> bool:
        """True when the tiles (N x V fp32 numbers) exceed ``budget_bytes``: the ``what`` pass then runs on
        the torch engine (fp32 torch tiles, no tensor-core GEMMs over them), warned once per process and pass."""
        need = prob.num_tokens * prob.vocab_size * 4
        if need <= budget_bytes:
            return False
        tile_gemms.fallback_warning(
            f"triton_{what}_over_budget",
            f"the Triton engine's {what} pass hands {prob.num_tokens} tokens x {prob.vocab_size} vocabulary to the "
            f"torch engine: their probability tiles ({_size(need)} as fp32) exceed the budget "
            f"({_size(budget_bytes)}, keep_budget_bytes); fp32 torch tiles, no tensor-core GEMMs over P")
        return True

    # ------------------------------------------------------------------------- the probability tiles
    def prob_tiles(self, prob: HeadProblem, budget_bytes: int, what: str) -> Optional[Tuple[HeadStats, ProbTiles]]:
        """(the split stats, the off-target tiles r̂) of a float32 problem whose tiles (N V fp32 numbers) fit
        ``budget_bytes``, else None (float64, or over the budget: ``what`` names the pass in the one-time
        warning of that hand-over).

        ONE launch of the probability-tile kernel (no stats kernel, no host sync): every token's target is
        taken off its logits before any reference is formed, so the tiles, stored relative to per-split
        references, become r̂_t (the softmax of the other logits) with their ``split_scale``, and lse_off,
        r̂ . b and the target logit z_y come with them; lse, log p and log(1 - p) follow exactly from
        logit(p) = z_y - lse_off (:func:`rosa_ext.kernels.epilogue.combine_partials_fused`, the formulas of
        :func:`rosa_ext.common.jacobian.split_logits`: the rule of every engine). A target outside
        [0, V) (another rank's token) is not split off: z_y = -inf, lse = lse_off, log(1 - p) = 0."""
        if self._fp64(prob) or self._over_budget(prob, budget_bytes, what):
            return None
        ah = None
        if prob.lora_a is not None:
            ah = (prob.hidden.float() * prob.lora_a[prob.seg].float()).sum(1)
        precision = "fp32" if prob.weight.dtype == torch.float32 else "bf16x2"
        tiles = prob_tiles_from_tensors(prob.hidden, prob.weight, self.index(prob)[0], None, prob.targets,
                                        bias=prob.bias, lora_b=prob.lora_b if ah is not None else None, ah=ah,
                                        lora_scale=prob.lora_scale if ah is not None else 0.0, precision=precision)
        split = HeadStats(lse=tiles.lse, logp=tiles.logp, ah=ah, pib=None, lse_off=tiles.lse_off, logq=tiles.logq,
                          rb=tiles.rb, kept=KeptProbTiles(tiles, tiles.lse_off), engine=self.name, split=True)
        return split, tiles

    # ------------------------------------------------------------------------- one-pass plans
    def hidden_pass(self, prob: HeadProblem, budget_bytes: int = defaults.KEEP_BUDGET_BYTES) -> HiddenPass:
        """lse, lse_off, log p, log(1 - p), r̂ . b and r̂ W (one K-split GEMM over the tiles) when
        :meth:`prob_tiles` runs; the torch engine's pass otherwise."""
        pt = self.prob_tiles(prob, budget_bytes, "hidden")
        if pt is None:
            return self.torch.hidden_pass(prob)
        st, tiles = pt
        rw = tile_gemms.off_target_weight(tiles, prob.weight)
        return HiddenPass(lse=st.lse, lse_off=st.lse_off, logp=st.logp, logq=st.logq, ah=st.ah, rb=st.rb, rw=rw,
                          engine=self.name)

    def gram_pass(self, prob: HeadProblem, keep: bool, budget_bytes: int = defaults.KEEP_BUDGET_BYTES) -> GramPass:
        """The raw Gram parts as K-split GEMMs over the r̂ tiles (``r̂_b r̂_b^T`` and the gathered
        ``r̂_t[y_u]``), the tiles kept for :meth:`off_target_vjp` (whatever ``keep`` says: they are written
        anyway): when :meth:`prob_tiles` runs; the torch engine's pass otherwise."""
        pt = self.prob_tiles(prob, budget_bytes, "Gram")
        if pt is None:
            return self.torch.gram_pass(prob, keep)
        st, tiles = pt
        off = prob.offsets
        return GramPass(lse=st.lse, lse_off=st.lse_off, logp=st.logp, logq=st.logq, ah=st.ah, rb=st.rb,
                        gram=tile_gemms.off_target_gram(tiles, off), cross=tile_gemms.cross_terms(tiles, prob.targets, off),
                        kept=st.kept, engine=self.name)

    def off_target_vjp(self, prob: HeadProblem, gp: GramPass, w: torch.Tensor,
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """sum_{t in b} w_t r̂_t -> (B, V), r̂_t normalised by ``gp.lse_off``: one K-split GEMM (B, N) @ r̂ over
        the kept tiles, their split scales folded into w; the torch engine's pass when the tiles were not kept."""
        if not isinstance(gp.kept, KeptProbTiles):
            return self.torch.off_target_vjp(prob, gp, w, out)
        res = self._rmatmul(prob, gp.kept, gp.lse_off, w)
        return res if out is None else out.copy_(res)

    def _rmatmul(self, prob: HeadProblem, kept: KeptProbTiles, lse_off: torch.Tensor, w: torch.Tensor) -> torch.Tensor:
        """sum_{t in b} w_t r̂_t -> (B, V) over kept tiles: one GEMM (B, N) @ tiles with w_t exp(norm_t - lse_off_t)
        (1 unless a vocabulary-parallel combine moved lse_off)."""
        N, B = prob.num_tokens, prob.num_conversations
        wt = (w * torch.exp(kept.norm - lse_off)).float()
        Wb = torch.zeros(B, N, dtype=torch.float32, device=w.device)
        Wb[prob.seg, torch.arange(N, device=w.device)] = wt  # block-diagonal rows: one per conversation
        return tile_gemms.tiles_rmatmul(kept.tiles, Wb)

    def linearize(self, prob: HeadProblem, ps, mode: str, beta: Optional[float]) -> Linearization:
        """The linearisation of a pass this engine's tiles ran (split, fp32) in ONE kernel
        (:func:`rosa_ext.kernels.epilogue.linearize_tokens`: each conversation's scale, f, p, the target g
        and its unscaled value, b[y_t], the finiteness flags the dual reads in its acceptance sync); the
        torch formulas otherwise (a pass handed to the torch engine, no ``beta``)."""
        st = pass_stats(ps)
        if beta is None or st.engine != self.name or not st.split or st.logq is None:
            return super().linearize(prob, ps, mode, beta)
        _, off = self.index(prob)
        lb = prob.lora_b
        out = linearize_tokens(st.logp, st.logq, st.lse, off, prob.reward, beta, lora_b=lb,
                               targets=prob.targets if lb is not None else None)
        return Linearization(prob=prob, stats=st, mode=mode, p=out.p, f=out.f, shift=out.shift,
                             h=prob.hidden.to(prob.compute_dtype), by=out.by, g=out.g, reported=out.target,
                             finite=out.finite)

    # ------------------------------------------------------------------------- matrix-free CG
    def stats(self, prob: HeadProblem, budget_bytes: int = defaults.KEEP_BUDGET_BYTES) -> HeadStats:
        """The split stats (MATH.md section 4) from the one pass (the r̂ tiles kept: CG's off-target
        reductions are then GEMVs over them) when :meth:`prob_tiles` runs; the torch engine's split stats
        otherwise (its streaming reductions then serve CG). The stats kernel alone does not split the
        target off, and its expanded forms cancel for confident tokens."""
        pt = self.prob_tiles(prob, budget_bytes, "CG stats")
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
        """r̂_t . u[seg_t] -> (N,): a GEMV over the kept tiles (times exp(norm - lse_off), 1 on one process); the
        torch engine's streaming reduction when the stats kept none."""
        kept = st.kept
        if not isinstance(kept, KeptProbTiles):
            return self.torch.off_target_row_reduce(prob, st, u)
        dots = tile_gemms.off_target_dot(kept.tiles, u.float(), None if u.shape[0] == 1 else prob.seg)
        return dots * torch.exp(kept.norm - st.lse_off)

    def off_target_column_reduce(self, prob: HeadProblem, st: HeadStats, w: torch.Tensor) -> torch.Tensor:
        """sum_{t in b} w_t r̂_t -> (B, V): one GEMM over the kept tiles, or the torch engine's pass."""
        if not isinstance(st.kept, KeptProbTiles):
            return self.torch.off_target_column_reduce(prob, st, w)
        return self._rmatmul(prob, st.kept, st.lse_off, w)

    def pi_sqnorm(self, prob: HeadProblem, st: HeadStats) -> torch.Tensor:
        """r̂_t . r̂_t per token -> (N,): the kept tiles' r̂ . r̂ (times exp(2 (norm - lse_off)), 1 on one
        process), or the torch engine's pass."""
        kept = st.kept
        if not isinstance(kept, KeptProbTiles):
            return self.torch.pi_sqnorm(prob, st)
        return kept.tiles.ss * torch.exp(2 * (kept.norm - st.lse_off))
