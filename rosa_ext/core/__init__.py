"""Core layer: the ROSA op on top of the backends and CG.

- :mod:`.problem`: validation of every input and packing into a
  :class:`~rosa_ext.common.types.HeadProblem`
- :mod:`.target`: the regression target g = p* - p
- :mod:`.operator`: the linearised system (J v, J^T u, Gram) of one problem
- :mod:`.solvers`: the dual and CG solvers and the cost model behind ``solver="auto"``
- :mod:`.op`: the public :func:`rosa_update` and its :class:`RosaStep`
"""
from .op import RosaStep, rosa_update

__all__ = ["RosaStep", "rosa_update"]
