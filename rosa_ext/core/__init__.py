"""Core layer: the ROSA op on top of the solve plans.

- :mod:`.op`: the public :func:`rosa_update` and its :class:`RosaStep`, and ``build_problem`` (every
  tensor input checked and packed into a :class:`~rosa_ext.common.types.HeadProblem`); the options are a
  :class:`~rosa_ext.common.config.RosaConfig`; the plans of :mod:`rosa_ext.plans` do the solve on an
  engine of :mod:`rosa_ext.backends`
- :mod:`.distributed`: a vocabulary-parallel call's inputs, checked across ranks
"""
from .op import RosaStep, rosa_update

__all__ = ["RosaStep", "rosa_update"]
