"""Solve plans: one file per plan, each read top to bottom -- its pass over W, its Jacobian algebra,
its per-conversation solve and fallback, its vocabulary-parallel combine and its cost formula
(MATH.md section 4 names the file of each plan).

- :mod:`.dual_hidden`: the exact hidden-mode step in ONE pass (T x T dual or d x d primal)
- :mod:`.dual_lora`: the exact LoRA-mode step in one pass, keeping or streaming the probability tiles
- :mod:`.cg_hidden`: hidden-mode CG on the explicit Jacobian (the same pass)
- :mod:`.cg_lora`: matrix-free CG, one JVP + VJP pass over W per iteration
- shared: :mod:`.dense` (the ridge rule, factor-and-accept, the float64 fallbacks), :mod:`.tiles` (the
  torch tiles with the target split off), :mod:`.target` (g = p* - p), :mod:`.base` (the result, the
  linearisation point, the vocabulary-parallel combine, the throughput constants)
- :mod:`.choose`: ``solver="auto"`` (memory first, then seconds) and :func:`run`

Layer: above the backends, kernels and cg; below the core op (``rosa_ext.core.op``).
"""
from .base import CGImpl, Solved
from .choose import Plan, choose_plan, run, solver_costs

__all__ = ["CGImpl", "Plan", "Solved", "choose_plan", "run", "solver_costs"]
