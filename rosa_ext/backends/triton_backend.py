"""Triton backend: the stats pass and the two streaming reductions as fused kernels.

Same primitives as :class:`~rosa_ext.backends.torch_chunked.TorchChunkedBackend`
(ROSA_SPEC.md section 3), for fp32/bf16/fp16 models with fp32 accumulation:

- ``stats``, ``row_reduce``, ``column_reduce``: Triton kernels of
  :mod:`rosa_ext.kernels.stats_pass` and :mod:`rosa_ext.kernels.reductions` (logits tiles
  recomputed on chip, never stored; no atomics, deterministic).
- ``weight_matvec`` / ``weight_rmatvec`` (W v, q W; hidden mode): the Triton GEMVs of
  :mod:`rosa_ext.kernels.matvec` for bf16/fp16 (one read of W, where torch must widen W to
  fp32 first); torch's cuBLAS GEMV for fp32 (already at the bandwidth roof).
- ``pi_weight`` (pi W, N x d) and ``pi_gram`` (pi pi^T per conversation): used once per
  update by the dual solver, they run on the chunked torch backend. A fused pi W kernel
  would hold an N-tile x d accumulator (d = 896..4096 does not fit on chip) or recompute the
  logits once per d-slice, so it does not pay.
- float64 problems run entirely on the torch backend (no fp64 tensor-core dot in Triton).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..common.types import HeadProblem
from ..kernels import matvec as MV
from ..kernels import reductions as K
from ..kernels.stats_pass import lse_and_pib
from ..common.types import HeadStats
from .torch_chunked import TorchChunkedBackend


class TritonBackend:
    """Fused Triton implementation of the backend primitives (CUDA, or the Triton interpreter)."""

    name = "triton"

    def __init__(self) -> None:
        self._torch = TorchChunkedBackend()
        self._cache_key: Optional[HeadProblem] = None
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

    @staticmethod
    def _kw(prob: HeadProblem, ah: Optional[torch.Tensor]):
        return dict(bias=prob.bias, lora_b=prob.lora_b if ah is not None else None, ah=ah,
                    lora_scale=prob.lora_scale)

    # -- primitives ----------------------------------------------------------------------
    def stats(self, prob: HeadProblem) -> HeadStats:
        """lse, log p, a.h, pi.b per token, (N,) fp32 each, from one fused pass over W."""
        if self._fp64(prob):
            return self._torch.stats(prob)
        seg, _ = self._index(prob)
        h = prob.hidden
        ah = None
        if prob.lora_a is not None:
            ah = (h.float() * prob.lora_a[prob.seg].float()).sum(1)
        lse, pib = lse_and_pib(h, prob.weight, seg, **self._kw(prob, ah))
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
        return K.row_reduce(prob.hidden, prob.weight, seg, st.lse, u, **self._kw(prob, st.ah))

    def column_reduce(self, prob: HeadProblem, st: HeadStats, w: torch.Tensor) -> torch.Tensor:
        """sum_{t in b} w_t pi_t for w (N,) -> (B, V) fp32."""
        if self._fp64(prob):
            return self._torch.column_reduce(prob, st, w)
        _, off = self._index(prob)
        return K.column_reduce(prob.hidden, prob.weight, off, st.lse, w, **self._kw(prob, st.ah))

    def pi_weight(self, prob: HeadProblem, st: HeadStats) -> torch.Tensor:
        """pi_t W -> (N, d) (chunked torch, see module doc)."""
        return self._torch.pi_weight(prob, st)

    def pi_gram(self, prob: HeadProblem, st: HeadStats) -> torch.Tensor:
        """pi_t . pi_u within each conversation -> (B, Tmax, Tmax) (chunked torch)."""
        return self._torch.pi_gram(prob, st)

    def weight_matvec(self, prob: HeadProblem, v: torch.Tensor) -> torch.Tensor:
        """W v for v (B, d) -> (B, V) compute dtype (Triton GEMV for bf16/fp16, cuBLAS for fp32/fp64)."""
        if prob.weight.dtype in (torch.float32, torch.float64):
            return self._torch.weight_matvec(prob, v)
        return MV.weight_matvec(prob.weight, v)

    def weight_rmatvec(self, prob: HeadProblem, q: torch.Tensor) -> torch.Tensor:
        """q W for q (B, V) -> (B, d) compute dtype (Triton GEMV for bf16/fp16, cuBLAS for fp32/fp64)."""
        if prob.weight.dtype in (torch.float32, torch.float64):
            return self._torch.weight_rmatvec(prob, q)
        return MV.weight_rmatvec(prob.weight, q)
