"""Plan "cg", LoRA mode (and any CG that must stay matrix-free): CG on the normal equations with
one JVP and one VJP pass over W per iteration (MATH.md sections 3 and 4).

Read in order:

1. The pass over W: the engine's stats pass (``engine.stats``: lse, log p, a . h, pi . b per token;
   the fused Triton kernel on CUDA), then per iteration the engine's streaming reductions
   (``centered_row_reduce``, ``scatter_minus_column``), which recompute the logits tiles instead of
   storing them.
2. The Jacobian algebra: :func:`rosa_ext.common.jacobian.jvp` / :func:`~rosa_ext.common.jacobian.vjp`
   over those primitives (written once there; the public :mod:`rosa_ext.kernels` runs the same), with
   J rescaled by a power of two through the per-token factor p_t (every row of J is proportional to
   it, so the scaling is exact and the step invariant) chosen from the rows' sizes (:func:`row_scale`).
3. :func:`solve` -- CG with every conversation's ridge inside the matvec; the relative ridge needs the
   Gram diagonal (:func:`gram_diag`: one more pass for q_t . q_t).
4. Vocabulary-parallel: nothing here -- the engine is then the
   :class:`~rosa_ext.backends.distributed.DistributedEngine`, whose primitives combine the shards,
   and the CG is :func:`rosa_ext.cg.sharded.cg_sharded` (the parameters' b block is sharded; the core
   op passes it).
5. :func:`cost` -- its cost formula for ``solver="auto"`` (:mod:`.registry`).
"""
from __future__ import annotations

from dataclasses import replace
from typing import Dict, Optional, Sequence

import torch

from ..cg import cg as default_cg
from ..common import jacobian as J
from ..common.config import RosaConfig
from ..common.types import HeadProblem, Solved
from . import dense


def gram_diag(lin: J.Linearization, engine) -> torch.Tensor:
    """||J_t||^2 per token -> (N,) in the linearisation's scaled units, the diagonal of J J^T without
    forming it (MATH.md section 6): ||J_t,a||^2 + (s f_t (a . h_t))^2 ||e_{y_t} - r̂_t||^2, the last factor
    1 + r̂_t . r̂_t (``engine.pi_sqnorm``: one pass)."""
    prob, st = lin.prob, lin.stats
    s = prob.lora_scale
    ca = s * lin.f * J.b_gap(lin)
    c = s * lin.f * st.ah
    return ca * ca * (lin.h * lin.h).sum(1) + c * c * (1.0 + engine.pi_sqnorm(prob, st))


def row_scale(lin: J.Linearization) -> torch.Tensor:
    """The size of each row of J within a factor sqrt(2) -> (N,), without squaring anything:
    max(|J_t,a| entries, ||J_t,b||) with ||J_t,b|| = |s f_t (a . h_t)| ||e_{y_t} - r̂_t|| and
    ||e_{y_t} - r̂_t|| in [1, sqrt(2)]. What :func:`solve` rescales J by."""
    s = lin.prob.lora_scale
    b_part = (s * lin.f * lin.stats.ah).abs()
    a_part = (s * lin.f * J.b_gap(lin)).abs() * lin.h.abs().amax(1)
    return torch.maximum(a_part, b_part)


def solve(prob: HeadProblem, cfg: RosaConfig, engine, cg: Optional[dense.CGImpl] = None) -> Solved:
    """Matrix-free CG (module doc) -> :class:`~rosa_ext.common.types.Solved`. ``cg``: the CG implementation
    (default :func:`rosa_ext.cg.cg`, compiled when built; :func:`rosa_ext.cg.cg_python` the Python loop)."""
    cg = default_cg if cg is None else cg
    st = engine.stats(prob, cfg.keep_budget_bytes)
    if not st.split:
        raise TypeError(f"cg_lora.solve: the engine {engine.name!r} returned stats that do not split the target "
                        "off (lse_off, logq, rb); every engine's stats must (MATH.md section 4)")
    lin = engine.linearize(prob, st, "lora", cfg.beta)
    g = lin.g  # scaled by e^-shift per conversation, as lin.f
    unit = dense.power_of_two_scale(row_scale(lin).max())  # exact, the step is invariant to it
    lin = replace(lin, f=lin.f * unit)
    g_scaled = g * unit
    B, P = prob.num_conversations, prob.hidden_size + prob.vocab_size
    rhs = J.vjp(lin, engine, g_scaled).reshape(-1)
    if cfg.damping_mode == "absolute":
        lam = dense.ridge(cfg, torch.ones(B, dtype=prob.compute_dtype, device=prob.weight.device), unit, lin.shift)
    else:
        lam = dense.conversation_ridges(prob, cfg, gram_diag(lin, engine))
    dense.check_linearization(lin, cfg, lam)
    lam = lam.unsqueeze(1)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        v2 = v.reshape(B, P)
        return (J.vjp(lin, engine, J.jvp(lin, engine, v2)) + lam * v2).reshape(-1)

    res = dense.run_cg(cg, matvec, rhs, prob, cfg)  # the ridge is inside the matvec
    return Solved(res.x.reshape(B, P), lin.stats.logp, lin.target(), res.iterations, res.residual, engine=st.engine)


def cost(k: Dict[str, float], lengths: Sequence[int], d: int, V: int, wpass: float, max_iter: int) -> float:
    """Estimated seconds: the stats pass plus ``max_iter`` JVP + VJP pairs at the backend's measured pair
    throughput ``cg_pair`` (no early exit assumed), W read 1 + 2 max_iter times."""
    N, it = sum(lengths), max(1, max_iter)
    return (2 * N * d * V + it * 4 * N * d * V) / k["cg_pair"] + (1 + 2 * it) * wpass + k["call"]
