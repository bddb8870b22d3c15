"""The linearised ROSA system of one packed problem (MATH.md sections 1-4).

:class:`RosaOperator` binds the Jacobian algebra of :mod:`rosa_ext.common.jacobian`
to a problem and a backend: it runs the backend's stats pass once, holds the
target g = p* - p, and exposes J v, J^T u, the explicit d-wide rows of J and the
Gram matrix J J^T. Vectors of parameters are (B, P): P = d + V laid out
``[delta_a, delta_b]`` (lora) or P = d (hidden), one row per conversation.
"""
from __future__ import annotations

from typing import Optional

import torch

from ..common import jacobian as J
from ..common.types import HeadProblem, HeadStats
from .target import residual_target


class RosaOperator:
    """The linearised ROSA system of one packed problem.

    Attributes (compute dtype, N packed tokens):
        stats: the backend's per-token cache
        lin: the :class:`~rosa_ext.common.jacobian.Linearization` at the current parameters
        p: (N,) probability of each observed token
        g: (N,) residual target p* - p (MATH.md section 1)
    """

    def __init__(self, prob: HeadProblem, backend, stats: Optional[HeadStats] = None,
                 by: Optional[torch.Tensor] = None) -> None:
        """``stats``: the per-token cache when the caller has it (a one-pass primitive made it);
        otherwise the backend's stats pass runs. ``by``: b_seg[y_t] when the caller has it."""
        self.prob = prob
        self.backend = backend
        self.stats = backend.stats(prob) if stats is None else stats
        self.lin = J.Linearization.at(prob, self.stats, backend, by=by)
        self.p = self.lin.p
        self.g = residual_target(self.stats.logp, prob.reward[prob.seg], prob.beta)

    def jvp(self, v: torch.Tensor) -> torch.Tensor:
        """u = J v for v (B, P) -> (N,)."""
        return J.jvp(self.lin, self.backend, v)

    def vjp(self, u: torch.Tensor) -> torch.Tensor:
        """J^T u for u (N,) -> (B, P)."""
        return J.vjp(self.lin, self.backend, u)

    def jacobian_rows(self) -> torch.Tensor:
        """Explicit d-wide rows of J -> (N, d) (:func:`rosa_ext.common.jacobian.jacobian_rows`)."""
        return J.jacobian_rows(self.lin, self.backend)

    def gram(self, rows: torch.Tensor) -> torch.Tensor:
        """J J^T within each conversation -> (B, Tmax, Tmax), zero-padded."""
        return J.gram(self.lin, self.backend, rows)

    def gram_diag(self, rows: Optional[torch.Tensor] = None) -> torch.Tensor:
        """||J_t||^2 per token -> (N,) (:func:`rosa_ext.common.jacobian.gram_diag`; ``rows`` are
        :meth:`jacobian_rows`, one pi W pass in hidden mode when not given)."""
        return J.gram_diag(self.lin, self.backend, self.jacobian_rows() if rows is None else rows)

    def ridge(self, diag: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The ridge lambda of each conversation -> (B,) compute dtype (MATH.md section 6).

        damping_mode "absolute": ``damping``. "relative": ``damping * mean_t ||J_t||^2`` over the
        conversation's tokens, from ``diag`` ((N,) :meth:`gram_diag`, computed when not given); a
        conversation whose J is exactly zero (its step is zero anyway) keeps ``damping``.
        """
        prob = self.prob
        lam = torch.full((prob.num_conversations,), prob.damping, dtype=prob.compute_dtype, device=prob.device)
        if prob.damping_mode == "absolute":
            return lam
        if diag is None:
            diag = self.gram_diag()
        counts = torch.tensor(prob.lengths, dtype=prob.compute_dtype, device=prob.device)
        mean = self.segment_sum(diag.unsqueeze(1))[:, 0] / counts
        return torch.where(mean > 0, prob.damping * mean, lam)

    def segment_sum(self, rows: torch.Tensor) -> torch.Tensor:
        """Sum (N, k) rows per conversation -> (B, k)."""
        return J.segment_sum(self.prob, rows)

    def pack(self, x: torch.Tensor) -> torch.Tensor:
        """(N,) packed per-token values -> (B, Tmax) zero-padded."""
        prob = self.prob
        out = torch.zeros(prob.num_conversations, prob.max_len, dtype=x.dtype, device=x.device)
        for b, n in enumerate(prob.lengths):
            out[b, :n] = x[prob.offsets[b]:prob.offsets[b + 1]]
        return out

    def unpack(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Tmax) -> (N,) packed."""
        return torch.cat([x[b, :n] for b, n in enumerate(self.prob.lengths)])
