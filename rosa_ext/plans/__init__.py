"""Solve plans: one file per plan, each read top to bottom -- the engine's pass it asks for, its
Jacobian algebra, its per-conversation solve and fallback, and its cost formula (MATH.md section 4
names the file of each plan). Plans call only the engine protocol (:mod:`rosa_ext.backends.protocol`)
and hold only the algebra: the same code runs on one process or a vocabulary-parallel head.

- :mod:`.dual_hidden`: the exact hidden-mode step in ONE pass (T x T dual or d x d primal)
- :mod:`.dual_lora`: the exact LoRA-mode step in one pass, keeping or streaming the probability tiles
- :mod:`.cg_hidden`: hidden-mode CG on the explicit Jacobian (the same pass)
- :mod:`.cg_lora`: matrix-free CG, one JVP + VJP pass over W per iteration
- shared: :mod:`.dense` (the ridge rule, the exact rescaling, factor-and-accept, the float64
  refinement, the CG call); the linearisation (p, the target g) is :mod:`rosa_ext.common.jacobian`
- :mod:`.registry`: the plans and ``solver="auto"`` (memory first, then seconds)

Layer: above the engines, kernels and cg; below the core op (``rosa_ext.core.op``).
"""
from .dense import CGImpl
from .registry import PLANS, Plan, choose, solver_costs

__all__ = ["CGImpl", "PLANS", "Plan", "choose", "solver_costs"]
