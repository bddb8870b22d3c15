"""Backends: the streaming reductions of ROSA_SPEC.md section 3.

Every backend implements the same primitives over a packed
:class:`~rosa_ext._problem.HeadProblem` (N tokens, B conversations):

- ``stats(prob)`` -> :class:`HeadStats` (lse, log p, a.h, pi.b per token)
- ``row_reduce(prob, st, u)``: u (B, V) -> (N,), ``pi_t . u[seg_t]``
- ``column_reduce(prob, st, w)``: w (N,) -> (B, V), ``sum_{t in b} w_t pi_t``
- ``pi_weight(prob, st)`` -> (N, d), ``pi_t W`` (dual solver, hidden mode)
- ``pi_gram(prob, st)`` -> (B, Tmax, Tmax), ``pi_t . pi_u`` within each
  conversation, zero-padded (dual solver, LoRA mode)

The Jacobian algebra on top of them lives once, in :mod:`rosa_ext.jacobian`.
"""
from .base import HeadStats, get_backend

__all__ = ["HeadStats", "get_backend"]
