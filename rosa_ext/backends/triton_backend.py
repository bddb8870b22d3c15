"""Triton backend: the stats pass and the two streaming reductions as fused kernels.

Same primitives as :class:`~rosa_ext.backends.torch_chunked.TorchChunkedBackend`
(MATH.md section 3), for fp32/bf16/fp16 models with fp32 accumulation:

- ``stats``, ``row_reduce``, ``column_reduce``, ``scatter_minus_column`` (the VJP's
  ``scatter(y, w) - C(w)`` in one column pass, no ``index_put_``), ``weight_matvec``,
  ``weight_rmatvec``: :class:`rosa_ext.kernels.primitives.TritonPrimitives` (fused kernels,
  logits tiles never stored; the reductions and GEMVs skip their work once the compiled CUDA
  CG has converged, :mod:`rosa_ext.common.device_flag`).
- ``pi_weight`` (pi W, N x d), ``pi_gram`` (pi pi^T per conversation), ``pi_sqnorm`` and the dual
  solver's one-pass primitives (``hidden_pass``, ``lora_gram_pass``, ``centered_column_reduce``,
  :mod:`.onepass`): used once per update, they run on the chunked torch backend (fp32 torch
  matmuls on the GPU; Triton kernels for them -- flash attention with K = V = W for the hidden
  pass, a Gram on tensor cores -- are not written yet).
- float64 problems run entirely on the torch backend (no fp64 tensor-core dot in Triton).
"""
from __future__ import annotations

from typing import Optional

import torch

from ..common.types import GramPass, HeadProblem, HeadStats, HiddenPass
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

    def pi_weight(self, prob: HeadProblem, st: HeadStats) -> torch.Tensor:
        """pi_t W -> (N, d) (chunked torch, see module doc)."""
        return self._torch.pi_weight(prob, st)

    def pi_gram(self, prob: HeadProblem, st: HeadStats, drop_targets: bool = False) -> torch.Tensor:
        """pi_t . pi_u (or q_t . q_u) within each conversation -> (B, Tmax, Tmax) (chunked torch)."""
        return self._torch.pi_gram(prob, st, drop_targets)

    def pi_sqnorm(self, prob: HeadProblem, st: HeadStats) -> torch.Tensor:
        """q_t . q_t per token -> (N,) (chunked torch; once per update: relative damping with CG)."""
        return self._torch.pi_sqnorm(prob, st)

    def hidden_pass(self, prob: HeadProblem) -> HiddenPass:
        """The dual's one hidden-mode pass (chunked torch, see module doc)."""
        return self._torch.hidden_pass(prob)

    def lora_gram_pass(self, prob: HeadProblem, keep: bool = False, raw: bool = False) -> GramPass:
        """The dual's one LoRA pass (chunked torch, see module doc)."""
        return self._torch.lora_gram_pass(prob, keep, raw)

    def centered_column_reduce(self, prob: HeadProblem, gp: GramPass, w: torch.Tensor,
                               out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """sum_{t in b} w_t (e_{y_t} - pi_t) -> (B, V) after :meth:`lora_gram_pass` (chunked torch)."""
        return self._torch.centered_column_reduce(prob, gp, w, out)
