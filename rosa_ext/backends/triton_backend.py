"""Triton backend: the stats pass and the two streaming reductions as fused kernels.

Same primitives as :class:`~rosa_ext.backends.torch_chunked.TorchChunkedBackend`
(MATH.md section 3), for fp32/bf16/fp16 models with fp32 accumulation:

- ``stats``, ``row_reduce``, ``column_reduce``, ``scatter_minus_column`` (the VJP's
  ``scatter(y, w) - C(w)`` in one column pass, no ``index_put_``), ``weight_matvec``,
  ``weight_rmatvec``: :class:`rosa_ext.kernels.primitives.TritonPrimitives` (fused kernels,
  logits tiles never stored; the reductions and GEMVs skip their work once the compiled CUDA
  CG has converged, :mod:`rosa_ext.common.device_flag`).
- ``pi_sqnorm`` (once per update: relative damping with CG) runs on the chunked torch backend.
- The one-pass plans (:mod:`rosa_ext.plans.dual_hidden`, :mod:`rosa_ext.plans.dual_lora`,
  :mod:`rosa_ext.plans.cg_hidden`) do not use a backend's passes: they stream torch tiles (fp32
  torch matmuls on the GPU), and their steps report the engine "torch".
- float64 problems run entirely on the torch backend (no fp64 tensor-core dot in Triton).
"""
from __future__ import annotations

import torch

from ..common.types import HeadProblem, HeadStats
from ..kernels.primitives import TritonPrimitives
from .torch_chunked import TorchChunkedBackend


class TritonBackend(TritonPrimitives):
    """Fused Triton implementation of the backend primitives (CUDA, or the Triton interpreter)."""

    name = "triton"

    def __init__(self) -> None:
        super().__init__()
        self._torch = TorchChunkedBackend()

    @staticmethod
    def _fp64(prob: HeadProblem) -> bool:
        return prob.compute_dtype == torch.float64

    def stats(self, prob: HeadProblem) -> HeadStats:
        """lse, log p, a.h, pi.b per token, (N,) each, from one fused pass over W."""
        return self._torch.stats(prob) if self._fp64(prob) else super().stats(prob)

    def row_reduce(self, prob: HeadProblem, st: HeadStats, u: torch.Tensor) -> torch.Tensor:
        """(pi_t . u[seg_t]) for u (B, V) -> (N,)."""
        return self._torch.row_reduce(prob, st, u) if self._fp64(prob) else super().row_reduce(prob, st, u)

    def column_reduce(self, prob: HeadProblem, st: HeadStats, w: torch.Tensor) -> torch.Tensor:
        """sum_{t in b} w_t pi_t for w (N,) -> (B, V)."""
        return self._torch.column_reduce(prob, st, w) if self._fp64(prob) else super().column_reduce(prob, st, w)

    def scatter_minus_column(self, prob: HeadProblem, st: HeadStats, w: torch.Tensor) -> torch.Tensor:
        """scatter(y, w) - C(w) -> (B, V): one fused column pass (no ``index_put_``)."""
        if self._fp64(prob):
            return self._torch.scatter_minus_column(prob, st, w)
        return super().scatter_minus_column(prob, st, w)

    def weight_matvec(self, prob: HeadProblem, v: torch.Tensor) -> torch.Tensor:
        """W v for v (B, d) -> (B, V) compute dtype."""
        return self._torch.weight_matvec(prob, v) if self._fp64(prob) else super().weight_matvec(prob, v)

    def weight_rmatvec(self, prob: HeadProblem, q: torch.Tensor) -> torch.Tensor:
        """q W for q (B, V) -> (B, d) compute dtype."""
        return self._torch.weight_rmatvec(prob, q) if self._fp64(prob) else super().weight_rmatvec(prob, q)

    def off_target_row_reduce(self, prob: HeadProblem, st: HeadStats, u: torch.Tensor) -> torch.Tensor:
        """r_t . u[seg_t] -> (N,) (chunked torch: only reached with stats that split the target off, i.e.
        float64 problems, whose stats run on torch)."""
        return self._torch.off_target_row_reduce(prob, st, u)

    def off_target_column_reduce(self, prob: HeadProblem, st: HeadStats, w: torch.Tensor) -> torch.Tensor:
        """sum_{t in b} w_t r_t -> (B, V) (chunked torch, as :meth:`off_target_row_reduce`)."""
        return self._torch.off_target_column_reduce(prob, st, w)

    def pi_sqnorm(self, prob: HeadProblem, st: HeadStats) -> torch.Tensor:
        """q_t . q_t per token -> (N,) (chunked torch; once per update: relative damping with CG)."""
        return self._torch.pi_sqnorm(prob, st)
