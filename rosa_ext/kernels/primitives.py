"""The backend primitives (MATH.md section 3) over the Triton kernels, on a packed problem.

:class:`TritonPrimitives` runs the stats pass and the two streaming reductions as the fused
kernels of :mod:`.stats_pass` and :mod:`.reductions` (logits tiles recomputed on chip, never
stored; no atomics, deterministic) and the W v / q W products as the GEMVs of :mod:`.matvec`
for bf16/fp16 (one read of W, where torch must widen W to fp32 first) or torch's GEMV for fp32
(already at the bandwidth roof). fp32/bf16/fp16 problems only (fp64 is the torch backend's).
It serves both the Triton backend of :mod:`rosa_ext.backends` and the tensor-level API of
:mod:`rosa_ext.kernels.ops`.
"""
from __future__ import annotations

from typing import Callable, Optional, Tuple

import torch

from ..common import device_flag
from ..common.jacobian import WholeVocabulary, observed_logp
from ..common.types import HeadProblem, HeadStats
from . import matvec as MV
from . import reductions as K
from .stats_pass import lse_and_pib


def stats_from_tensors(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, seg32: torch.Tensor, *,
                       bias: Optional[torch.Tensor], lora_b: Optional[torch.Tensor], ah: Optional[torch.Tensor],
                       lora_scale: float) -> HeadStats:
    """One fused pass over W -> HeadStats(lse, logp, ah, pib), each (N,) fp32.

    ``seg32`` (N,) int32 conversation of each token, ``lora_b`` (B, V) fp32 with ``ah`` (N,) = a_seg . h_t
    (both or neither). logp_t = z_t[y_t] - lse_t (<= 0), pib_t = pi_t . b_seg.
    """
    lse, pib = lse_and_pib(hidden, weight, seg32, bias=bias, lora_b=lora_b, ah=ah, lora_scale=lora_scale)
    y = targets.long()
    by = None
    if lora_b is not None:
        by = lora_b[0, y] if lora_b.shape[0] == 1 else lora_b[seg32.long(), y]
    logp = observed_logp(hidden.float(), weight, y, lse, bias=bias, ah=ah, by=by, lora_scale=lora_scale)
    return HeadStats(lse=lse, logp=logp, ah=ah, pib=pib)


class TritonPrimitives(WholeVocabulary):
    """Row/column reductions, stats and GEMVs of a packed fp32/bf16/fp16 problem on Triton kernels.

    ``index``: optional precomputed ``(seg int32 (N,), offsets int32 (B + 1,))`` on the device;
    otherwise derived from the problem once and cached.
    """

    name = "triton"

    def __init__(self, index: Optional[Tuple[torch.Tensor, torch.Tensor]] = None) -> None:
        self._given = index
        self._index: Optional[Tuple[HeadProblem, Tuple]] = None
        self._hidden: Optional[Tuple[HeadProblem, Tuple]] = None

    def _per_problem(self, slot: str, prob: HeadProblem, make: Callable[[], Tuple]) -> Tuple:
        """``make()`` for ``prob``, cached in attribute ``slot`` as ONE (problem, value) pair, replaced whole: a
        reader never pairs one problem with another's value, even where threads share the engine."""
        hit = getattr(self, slot)
        if hit is None or hit[0] is not prob:
            hit = (prob, make())
            setattr(self, slot, hit)
        return hit[1]

    def hidden_and_ah(self, prob: HeadProblem) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
        """(h (N, d) in the compute dtype, a_seg . h_t (N,) or None without a LoRA term), cached per problem
        (the pass's launcher and the linearisation both read them): one conversion of h and one GEMV
        (a (d,) row shared by every conversation) or a row-wise dot (one a row per conversation)."""
        def make():
            h = prob.hidden.to(prob.compute_dtype)
            a = prob.lora_a
            if a is None:
                return h, None
            a = a.to(h.dtype)
            # one row: a GEMV; one per conversation: all rows against all (B small), each token's own picked
            return h, torch.mv(h, a[0]) if a.shape[0] == 1 else (h @ a.T).gather(1, prob.seg.unsqueeze(1)).squeeze(1)
        return self._per_problem("_hidden", prob, make)

    def index(self, prob: HeadProblem) -> Tuple[torch.Tensor, torch.Tensor]:
        """(seg int32 (N,), offsets int32 (B + 1,)) on the device, cached per problem."""
        if self._given is not None:
            return self._given

        def make():
            seg = prob.seg.to(torch.int32).contiguous()
            # from the sorted seg on the device (no host-to-device copy of prob.offsets, no sync)
            steps = torch.arange(prob.num_conversations + 1, device=prob.seg.device, dtype=prob.seg.dtype)
            return seg, torch.searchsorted(prob.seg.contiguous(), steps).to(torch.int32)
        return self._per_problem("_index", prob, make)

    @staticmethod
    def _kw(prob: HeadProblem, ah: Optional[torch.Tensor]):
        return dict(bias=prob.bias, lora_b=prob.lora_b if ah is not None else None, ah=ah,
                    lora_scale=prob.lora_scale)

    def stats(self, prob: HeadProblem) -> HeadStats:
        """lse, log p, a.h, pi.b per token, (N,) fp32 each, from one fused pass over W."""
        seg, _ = self.index(prob)
        return stats_from_tensors(prob.hidden, prob.weight, prob.targets, seg, **self._kw(prob, self.hidden_and_ah(prob)[1]))

    def row_reduce(self, prob: HeadProblem, st: HeadStats, u: torch.Tensor) -> torch.Tensor:
        """(pi_t . u[seg_t]) for u (B, V) -> (N,) fp32."""
        seg, _ = self.index(prob)
        return K.row_reduce(prob.hidden, prob.weight, seg, st.lse, u, flag=device_flag.current(),
                            **self._kw(prob, st.ah))

    def column_reduce(self, prob: HeadProblem, st: HeadStats, w: torch.Tensor) -> torch.Tensor:
        """sum_{t in b} w_t pi_t for w (N,) -> (B, V) fp32."""
        _, off = self.index(prob)
        return K.column_reduce(prob.hidden, prob.weight, off, st.lse, w, flag=device_flag.current(),
                               **self._kw(prob, st.ah))

    def scatter_minus_column(self, prob: HeadProblem, st: HeadStats, w: torch.Tensor) -> torch.Tensor:
        """scatter(y, w) - C(w) -> (B, V) fp32 in one fused pass: the column kernel adds w_t where y_t
        falls in its vocabulary tile (no ``index_put_``: deterministic, CUDA-graph capturable)."""
        _, off = self.index(prob)
        return K.column_reduce(prob.hidden, prob.weight, off, st.lse, w, targets=prob.targets,
                               flag=device_flag.current(), **self._kw(prob, st.ah))

    def weight_matvec(self, prob: HeadProblem, v: torch.Tensor) -> torch.Tensor:
        """W v for v (B, d) -> (B, V) fp32 (Triton GEMV for bf16/fp16, and for fp32 under a run flag;
        torch's for fp32 otherwise)."""
        flag = device_flag.current()
        if prob.weight.dtype == torch.float32 and flag is None:
            return v @ prob.weight.T
        return MV.weight_matvec(prob.weight, v, flag=flag)

    def weight_rmatvec(self, prob: HeadProblem, q: torch.Tensor) -> torch.Tensor:
        """q W for q (B, V) -> (B, d) fp32 (Triton GEMV for bf16/fp16, and for fp32 under a run flag;
        torch's for fp32 otherwise)."""
        flag = device_flag.current()
        if prob.weight.dtype == torch.float32 and flag is None:
            return q @ prob.weight
        return MV.weight_rmatvec(prob.weight, q, flag=flag)
