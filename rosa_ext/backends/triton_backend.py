"""Triton backend: the stats pass and the two streaming reductions as fused kernels.

Same primitives as :class:`~rosa_ext.backends.torch_chunked.TorchChunkedBackend`
(ROSA_SPEC.md section 3), for fp32/bf16/fp16 models with fp32 accumulation:

- ``stats``, ``row_reduce``, ``column_reduce``: Triton kernels of
  :mod:`rosa_ext.kernels.reductions` (logits tiles recomputed on chip, never stored).
- ``pi_weight``, ``pi_gram`` (dual solver) and ``weight_matvec`` / ``weight_rmatvec``
  (``W v``, ``q W``: plain GEMVs, cuBLAS is already at the bandwidth roof) run on the
  chunked torch backend.
- float64 problems run entirely on the torch backend (Triton's fp64 dot is not worth it).
"""
from __future__ import annotations

from typing import Tuple

import torch

from .._problem import HeadProblem
from ..kernels import reductions as K
from .base import HeadStats
from .torch_chunked import TorchChunkedBackend


class TritonBackend:
    """Fused Triton implementation of the backend primitives (CUDA, or the Triton interpreter)."""

    name = "triton"

    def __init__(self) -> None:
        self._torch = TorchChunkedBackend()
        self._cache_key = None
        self._cache: Tuple[torch.Tensor, torch.Tensor] = ()

    def _index(self, prob: HeadProblem) -> Tuple[torch.Tensor, torch.Tensor]:
        """(seg int32 (N,), offsets int32 (B + 1,)) on the device, cached per problem."""
        if self._cache_key is not prob:
            seg = prob.seg.to(torch.int32).contiguous()
            off = torch.tensor(prob.offsets, dtype=torch.int32, device=prob.device)
            self._cache_key, self._cache = prob, (seg, off)
        return self._cache

    @staticmethod
    def _fp64(prob: HeadProblem) -> bool:
        return prob.compute_dtype == torch.float64

    def _lora_kw(self, prob: HeadProblem, ah):
        return dict(bias=prob.bias, lora_b=prob.lora_b if ah is not None else None, ah=ah,
                    lora_scale=prob.lora_scale)

    # -- primitives ----------------------------------------------------------------------
    def stats(self, prob: HeadProblem) -> HeadStats:
        """lse, log p, a.h, pi.b per token (fp32) from one fused pass over W."""
        if self._fp64(prob):
            return self._torch.stats(prob)
        seg, _ = self._index(prob)
        h = prob.hidden
        ah = None
        if prob.lora_a is not None:
            ah = (h.float() * prob.lora_a[prob.seg].float()).sum(1)
        m, s, sb = K.stats_partials(h, prob.weight, seg, **self._lora_kw(prob, ah))
        lse, pib = K.combine_stats(m, s, sb)
        z_y = (h.float() * prob.weight[prob.targets].float()).sum(1)
        if prob.bias is not None:
            z_y = z_y + prob.bias[prob.targets].float()
        if ah is not None and prob.lora_b is not None:
            z_y = z_y + prob.lora_scale * ah * prob.lora_b[prob.seg, prob.targets].float()
        return HeadStats(lse=lse, logp=torch.clamp(z_y - lse, max=0.0), ah=ah, pib=pib)

    def row_reduce(self, prob: HeadProblem, st: HeadStats, u: torch.Tensor) -> torch.Tensor:
        """(pi_t . u[seg_t]) for u (B, V) -> (N,) fp32."""
        if self._fp64(prob):
            return self._torch.row_reduce(prob, st, u)
        seg, _ = self._index(prob)
        return K.row_reduce(prob.hidden, prob.weight, seg, st.lse, u, **self._lora_kw(prob, st.ah))

    def column_reduce(self, prob: HeadProblem, st: HeadStats, w: torch.Tensor) -> torch.Tensor:
        """sum_{t in b} w_t pi_t for w (N,) -> (B, V) fp32."""
        if self._fp64(prob):
            return self._torch.column_reduce(prob, st, w)
        seg, off = self._index(prob)
        return K.column_reduce(prob.hidden, prob.weight, seg, off, st.lse, w, **self._lora_kw(prob, st.ah))

    def pi_weight(self, prob: HeadProblem, st: HeadStats) -> torch.Tensor:
        """pi_t W -> (N, d) (chunked torch)."""
        return self._torch.pi_weight(prob, st)

    def pi_gram(self, prob: HeadProblem, st: HeadStats) -> torch.Tensor:
        """pi_t . pi_u within each conversation -> (B, Tmax, Tmax) (chunked torch)."""
        return self._torch.pi_gram(prob, st)

    def weight_matvec(self, prob: HeadProblem, v: torch.Tensor) -> torch.Tensor:
        """W v for v (B, d) -> (B, V) (torch GEMV)."""
        return self._torch.weight_matvec(prob, v)

    def weight_rmatvec(self, prob: HeadProblem, q: torch.Tensor) -> torch.Tensor:
        """q W for q (B, V) -> (B, d) (torch GEMV)."""
        return self._torch.weight_rmatvec(prob, q)
