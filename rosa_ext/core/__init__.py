"""Core layer: the ROSA op on top of the solve plans.

- :mod:`.problem`: validation of every input and packing into a
  :class:`~rosa_ext.common.types.HeadProblem`
- :mod:`.distributed`: a vocabulary-parallel call's inputs, checked across ranks
- :mod:`.op`: the public :func:`rosa_update` and its :class:`RosaStep` (the plans of
  :mod:`rosa_ext.plans` do the solve)
"""
from .op import RosaStep, rosa_update

__all__ = ["RosaStep", "rosa_update"]
