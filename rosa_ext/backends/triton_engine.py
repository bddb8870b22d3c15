"""The Triton engine: the passes of the :class:`~rosa_ext.backends.protocol.Engine` protocol on the
Triton kernels of :mod:`rosa_ext.kernels` (CUDA, or the interpreter under ``TRITON_INTERPRET=1``).

- One-pass plans (:meth:`TritonEngine.hidden_pass`, :meth:`TritonEngine.gram_pass`): ONE logits pass --
  the probability-tile kernel takes every token's target off each logits tile (its logit kept apart)
  and computes the row statistics of the OTHER logits itself (online softmax per vocabulary split)
  while it writes the N x V tiles relative to per-split references with their row sums; a small combine
  (one launch, :mod:`rosa_ext.kernels.epilogue`) gives lse_off, the per-split scales that make the tiles r̂ (the softmax of the other logits), r̂ . b,
  and lse, log p, log(1 - p) exactly from logit(p) = z_y - lse_off (MATH.md section 4) -- then the
  products over the tiles are Triton kernels on the tensor cores, K-split at the vocabulary splits with
  the scales applied: hidden ``r̂ W`` in one launch (:mod:`rosa_ext.kernels.tile_weight`), the LoRA
  Gram centred with the cross terms ``r̂_t[y_u]`` gathered in two (:mod:`rosa_ext.kernels.tile_gram`),
  the centred VJP ``scatter(y, w) - w^T r̂`` in one (:mod:`rosa_ext.kernels.tile_vjp`); the
  linearisation kernel also forms the LoRA dual's Jacobian factors. Nothing in them depends on how confident or
  unlikely a token is: no 1 - p is formed, so no token is handed over for it. The linearisation of such a
  pass (:meth:`TritonEngine.linearize`) is one more launch. The tiles are stored as
  bf16 hi + lo parts (fp32 accuracy on bf16 tensor cores) for bf16/fp16 models, as fp32 otherwise.
  Used for float32 compute. **Token blocks** (:mod:`rosa_ext.backends.tile_blocks`): the tiles of one launch
  fit the budget -- ``keep_budget_bytes``, on CUDA at most half the free device memory, less a scratch
  share -- so a problem over it runs in blocks of tokens, each one launch and its kernels writing
  into preallocated outputs, all with the split plan of the first block (the LoRA Gram of a conversation
  longer than a block assembled blockwise, ``G[i, j]`` from the tiles of two blocks); hidden mode keeps
  at most :data:`~rosa_ext.backends.tile_blocks.HIDDEN_TILE_BYTES` of tiles at once (more where that would
  take over three blocks), since it needs only r̂ W (N x d) from them: memory ``min(N, n_b) V e + N d 4``
  bytes (e = 4: fp32 or the bf16 hi + lo parts). Only a budget below one token's tiles (two, for a Gram that must be blocked) hands
  the pass to the torch engine (reported "torch").
- Matrix-free CG: the split stats from the same one pass with fp32 tiles (the bytes of bf16 hi + lo),
  normalised once and kept, so that CG's two off-target reductions per iteration are one fp32 GEMV per
  conversation each (:func:`rosa_ext.kernels.tile_gemms.gemv_rows` / ``gemv_columns``: no K-split, no
  split scales -- the error bound is there) and ``pi_sqnorm`` is their r̂ . r̂; over the budget the tiles
  are recomputed block by block per reduction. The fused row / column kernels and the GEMVs of
  :class:`rosa_ext.kernels.primitives.TritonPrimitives` serve the reductions over pi (logits tiles
  recomputed on chip, never stored; they skip their work once the compiled CUDA CG has converged,
  :mod:`rosa_ext.common.device_flag`).
- float64 problems run entirely on the torch engine (no fp64 tensor-core dot in Triton).

No hand-over is silent: each reason (float64; a budget below one token's tiles in a hidden, Gram or CG
stats pass) warns once per process (:func:`rosa_ext.kernels.tile_gemms.fallback_warning`, a RuntimeWarning
naming it).
"""
from __future__ import annotations

from typing import Dict, Optional, Tuple

import torch

from ..common import defaults
from ..common.jacobian import Linearization, WholeVocabulary, pass_stats
from ..common.types import GramPass, HeadProblem, HeadStats, HiddenPass
from ..kernels import tile_gemms
from ..kernels.epilogue import linearize_tokens
from ..kernels.primitives import TritonPrimitives
from . import tile_blocks as TB
from .throughput import TRITON, lookup
from .tile_blocks import KeptProbTiles, RecomputedTiles
from .torch_engine import TorchEngine

__all__ = ["TritonEngine", "KeptProbTiles", "RecomputedTiles"]


def _size(n: int) -> str:
    return f"{n / 2 ** 20:.1f} MiB" if n >= 2 ** 20 else f"{n} bytes"


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

    # ------------------------------------------------------------------------- the probability tiles
    def tile_plan(self, prob: HeadProblem, budget_bytes: int, what: str, precision: Optional[str] = None,
                  per_block: int = 1) -> Optional[Tuple[TB.TileLauncher, TB.Budget, int]]:
        """(the launcher of the one-pass tile kernel, the pass's :class:`~rosa_ext.backends.tile_blocks.Budget`,
        the most tokens of one block) of a float32 problem, else None: float64, or a budget that does not
        hold ``per_block`` tokens' tiles -- that pass (``what``) then runs on the torch engine, with a one-time
        warning. ``precision``: the tiles' storage (default: "fp32" for an fp32 model, "bf16x2" otherwise).

        The budget is ``budget_bytes`` (``keep_budget_bytes``), on CUDA at most half the free device memory,
        less the K-split scratch (:class:`~rosa_ext.backends.tile_blocks.Budget`); a problem whose N x V tiles
        exceed it runs in token blocks (:mod:`rosa_ext.backends.tile_blocks`), each one launch and its GEMMs,
        every block with the split plan of the first."""
        if self._fp64(prob):
            return None
        if precision is None:
            precision = "fp32" if prob.weight.dtype == torch.float32 else "bf16x2"
        budget = TB.Budget.of(budget_bytes, prob.weight.device)
        rows = budget.rows(prob.vocab_size, precision)
        if rows < per_block:
            return self._refuse(prob, budget, what, per_block)
        return TB.TileLauncher(prob, self.index(prob)[0], precision, self.hidden_and_ah(prob)[1]), budget, rows

    @staticmethod
    def _refuse(prob: HeadProblem, budget: TB.Budget, what: str, per_block: int) -> None:
        """Warn once per process and pass that ``what`` runs on the torch engine: its budget does not hold
        ``per_block`` tokens' tiles. Returns None."""
        tile_gemms.fallback_warning(
            f"triton_{what}_over_budget",
            f"the Triton engine's {what} pass hands {prob.num_tokens} tokens x {prob.vocab_size} vocabulary to the "
            f"torch engine: not even {per_block} token(s)' probability tiles ({_size(per_block * prob.vocab_size * 4)}) "
            f"fit the budget ({_size(budget.total)}: keep_budget_bytes, on CUDA at most half the free memory, "
            f"{_size(budget.scratch)} of it the GEMMs' scratch); fp32 torch tiles, no tensor-core GEMMs over P")
        return None

    # ------------------------------------------------------------------------- one-pass plans
    def hidden_pass(self, prob: HeadProblem, budget_bytes: int = defaults.KEEP_BUDGET_BYTES) -> HiddenPass:
        """lse, lse_off, log p, log(1 - p), r̂ . b and r̂ W (one K-split kernel over the tiles per block) in token
        blocks of at most :data:`~rosa_ext.backends.tile_blocks.HIDDEN_TILE_BYTES` of tiles, or of a third of the
        tokens where that is more, within the budget (:func:`~rosa_ext.backends.tile_blocks.hidden_rows`):
        memory ``min(N, n_b) V e + N d 4`` bytes; the torch engine's pass when :meth:`tile_plan` refuses."""
        plan = self.tile_plan(prob, budget_bytes, "hidden")
        if plan is None:
            return self.torch.hidden_pass(prob)
        launch, budget, rows = plan
        rows = TB.hidden_rows(prob.num_tokens, prob.vocab_size, launch.precision, budget, rows)
        return TB.hidden_pass(launch, TB.balanced_blocks(0, prob.num_tokens, rows), self.name)

    def gram_pass(self, prob: HeadProblem, keep: bool, budget_bytes: int = defaults.KEEP_BUDGET_BYTES,
                  center: bool = False) -> GramPass:
        """The raw Gram parts as K-split GEMMs over the r̂ tiles (``r̂_b r̂_b^T`` and the gathered ``r̂_t[y_u]``):
        the tiles kept for :meth:`off_target_vjp` (whatever ``keep`` says) when they fit the budget, else in
        token blocks, a long conversation's Gram blockwise, and the VJP recomputes them
        (:func:`rosa_ext.backends.tile_blocks.gram_pass`); the torch engine's pass when :meth:`tile_plan`
        refuses (two tokens are needed once a conversation must be cut)."""
        plan = self.tile_plan(prob, budget_bytes, "Gram")
        if plan is not None and plan[2] < 2 and prob.num_tokens > plan[2] and max(prob.lengths) > 1:
            plan = self._refuse(prob, plan[1], "Gram", 2)  # a conversation cut in blocks needs two at once
        if plan is None:
            return self.torch.gram_pass(prob, keep)
        launch, budget, rows = plan
        return TB.gram_pass(launch, rows, self.name, self.index(prob)[1], center)

    def off_target_vjp(self, prob: HeadProblem, gp: GramPass, w: torch.Tensor,
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """sum_{t in b} w_t r̂_t -> (B, V), r̂_t normalised by ``gp.lse_off``: one K-split GEMM (B, N) @ r̂ over
        the kept tiles (per block, the tiles recomputed, over the budget), their split scales folded into w;
        the torch engine's pass when the torch engine ran the Gram pass."""
        if not isinstance(gp.kept, (KeptProbTiles, RecomputedTiles)):
            return self.torch.off_target_vjp(prob, gp, w, out)
        return TB.column_sums(gp.kept, prob, w, gp.lse_off, out, offsets=self.index(prob)[1])

    def centered_vjp(self, prob: HeadProblem, gp: GramPass, w: torch.Tensor,
                     out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """sum_{t in b} w_t (e_{y_t} - r̂_t) -> (B, V): the scatter of w at the targets fused into the column
        sums over the kept tiles (:func:`rosa_ext.kernels.tile_vjp.tile_vjp`, one launch per block of tokens);
        the torch engine's when the torch engine ran the Gram pass."""
        if not isinstance(gp.kept, (KeptProbTiles, RecomputedTiles)):
            return self.torch.centered_vjp(prob, gp, w, out)
        return TB.column_sums(gp.kept, prob, w, gp.lse_off, out, offsets=self.index(prob)[1], centered=True)

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
        h = self.hidden_and_ah(prob)[0]
        factors = {}
        if mode == "lora" and isinstance(ps, GramPass) and lb is not None and ps.rb is not None and ps.ah is not None:
            factors = dict(rb=ps.rb, ah=ps.ah, hidden=h, lora_scale=prob.lora_scale)
        out = linearize_tokens(st.logp, st.logq, st.lse, off, prob.reward, beta, lora_b=lb,
                               targets=prob.targets if lb is not None else None, **factors)
        return Linearization(prob=prob, stats=st, mode=mode, p=out.p, f=out.f, shift=out.shift, h=h, by=out.by,
                             g=out.g, reported=out.target, finite=out.finite, ca=out.ca, cb=out.cb, jmax=out.jmax)

    # ------------------------------------------------------------------------- matrix-free CG
    def stats(self, prob: HeadProblem, budget_bytes: int = defaults.KEEP_BUDGET_BYTES) -> HeadStats:
        """The split stats (MATH.md section 4) from the one pass, with fp32 tiles for CG's off-target
        reductions: kept and normalised once when they fit the budget (each reduction one fp32 GEMV per
        conversation), else recomputed block by block per reduction
        (:func:`rosa_ext.backends.tile_blocks.cg_stats`); the torch engine's split stats (and streaming
        reductions) when :meth:`tile_plan` refuses. The stats kernel alone does not split the target off,
        and its expanded forms cancel for confident tokens."""
        plan = self.tile_plan(prob, budget_bytes, "CG stats", precision="fp32")
        if plan is None:
            return self.torch.stats(prob)
        launch, budget, rows = plan
        return TB.cg_stats(launch, rows, self.name)

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
        """r̂_t . u[seg_t] -> (N,): one fp32 GEMV per conversation over the kept normalised tiles (per block, the
        tiles recomputed, over the budget), times exp(norm - lse_off) (1 on one process); the torch engine's
        streaming reduction when the torch engine ran the stats."""
        if not isinstance(st.kept, (KeptProbTiles, RecomputedTiles)):
            return self.torch.off_target_row_reduce(prob, st, u)
        return TB.row_dots(st.kept, prob, u, st.lse_off)

    def off_target_column_reduce(self, prob: HeadProblem, st: HeadStats, w: torch.Tensor) -> torch.Tensor:
        """sum_{t in b} w_t r̂_t -> (B, V): one fp32 GEMV per conversation over the kept tiles (or per block,
        recomputed), or the torch engine's pass."""
        if not isinstance(st.kept, (KeptProbTiles, RecomputedTiles)):
            return self.torch.off_target_column_reduce(prob, st, w)
        return TB.column_sums(st.kept, prob, w, st.lse_off, offsets=self.index(prob)[1])

    def pi_sqnorm(self, prob: HeadProblem, st: HeadStats) -> torch.Tensor:
        """r̂_t . r̂_t per token -> (N,): the pass's r̂ . r̂ (times exp(2 (norm - lse_off)), 1 on one process), or
        the torch engine's pass."""
        if not isinstance(st.kept, (KeptProbTiles, RecomputedTiles)):
            return self.torch.pi_sqnorm(prob, st)
        return TB.sqnorms(st.kept, st.lse_off)
