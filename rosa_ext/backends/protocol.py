"""What a backend is: the stats pass plus the streaming primitives of MATH.md section 3."""
from __future__ import annotations

from typing import Protocol

from ..common.jacobian import HeadPrimitives
from ..common.types import HeadProblem, HeadStats


class Backend(HeadPrimitives, Protocol):
    """A backend: ``name``, ``stats(prob)`` (one pass over W -> :class:`HeadStats`) and the
    reductions and products of :class:`~rosa_ext.common.jacobian.HeadPrimitives`."""

    name: str

    def stats(self, prob: HeadProblem) -> HeadStats: ...
