"""Backends: the stats pass and the streaming reductions of MATH.md section 3.

Every backend (:class:`~rosa_ext.backends.protocol.Backend`) implements the same primitives
over a packed :class:`~rosa_ext.common.types.HeadProblem` (N tokens, B conversations):

- ``stats(prob)`` -> :class:`~rosa_ext.common.types.HeadStats` (lse, log p, a.h, pi.b per token)
- ``row_reduce(prob, st, u)``: u (B, V) -> (N,), ``pi_t . u[seg_t]``
- ``column_reduce(prob, st, w)``: w (N,) -> (B, V), ``sum_{t in b} w_t pi_t``
- ``weight_matvec(prob, v)`` (W v) and ``weight_rmatvec(prob, q)`` (q W)
- ``pi_weight(prob, st)`` -> (N, d), ``pi_t W`` (dual solver, hidden mode)
- ``pi_gram(prob, st)`` -> (B, Tmax, Tmax), ``pi_t . pi_u`` within each
  conversation, zero-padded (dual solver, LoRA mode)

Implementations: :mod:`.torch_chunked` (portable) and :mod:`.triton_backend` (CUDA); the
registry (:func:`get_backend`) picks one. The Jacobian algebra on top of them lives once, in
:mod:`rosa_ext.common.jacobian`.
"""
from .protocol import Backend
from .registry import get_backend, triton_available

__all__ = ["Backend", "get_backend", "triton_available"]
