"""The registry of solve plans, and ``solver="auto"``: which plan an update runs, from the plans' cost
formulas in seconds and their memory rules (MATH.md section 4, "The cost model").

Every plan is a few passes over the head weight plus small dense algebra; each plan's file holds its
formula and memory rule, and the engine the measured throughput constants its formula reads
(``engine.throughput``):

=================  =====  ======  ==========================  ==========================================
plan               mode   solver  file                        what it runs
=================  =====  ======  ==========================  ==========================================
``dual``           hidden dual    :mod:`.dual_hidden`         ONE pass, then per conversation the smaller
                                                              of the T x T dual and the d x d primal
``cg``             hidden cg      :mod:`.cg_hidden`           the same pass, then CG on the explicit J
``dual-keep``      lora   dual    :mod:`.dual_lora`           one pass keeping the probability tiles for
                                                              a GEMV VJP
``dual-stream``    lora   dual    :mod:`.dual_lora`           one pass, then a second streaming VJP pass
``cg``             lora   cg      :mod:`.cg_lora`             the stats pass plus ``max_iter`` JVP + VJP
=================  =====  ======  ==========================  ==========================================

Rules (:func:`choose`): (1) memory first (each plan's ``fits``); (2) among the plans allowed, the
cheapest; the exact dual is kept unless CG is estimated more than :data:`DUAL_TIE` cheaper (CG stops at
``tol`` or ``max_iter``, the dual is exact). ``solver="dual"`` / ``"cg"`` force the solver (the LoRA
dual's keep-or-stream choice is still made here).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Callable, Dict, Sequence, Tuple

import torch

from ..backends import engine_for
from ..common.config import RosaConfig, compute_dtype_of
from ..common.types import Solved
from . import cg_hidden, cg_lora, dual_hidden, dual_lora

#: CG is taken over the exact dual only when it is estimated cheaper by more than this fraction.
DUAL_TIE = 0.1


@dataclass(frozen=True)
class PlanSpec:
    """One entry of the registry: ``mode``, ``solver``, ``run(prob, cfg, engine, cg)``, the cost formula
    ``cost(k, lengths, d, V, wpass, max_iter)`` (seconds) and the memory rule ``fits(lengths, d, V, esz, cfg)``."""

    name: str
    mode: str
    solver: str
    run: Callable[..., Solved]
    cost: Callable[..., float]
    fits: Callable[..., bool]


def _always(*args) -> bool:
    return True


#: Every plan, in the order ties are broken (the exact dual first).
PLANS: Tuple[PlanSpec, ...] = (
    PlanSpec("dual", "hidden", "dual", dual_hidden.solve, dual_hidden.cost, dual_hidden.fits),
    PlanSpec("cg", "hidden", "cg", cg_hidden.solve, cg_hidden.cost, _always),
    PlanSpec("dual-keep", "lora", "dual", functools.partial(dual_lora.solve, keep=True), dual_lora.cost_keep,
             dual_lora.fits_keep),
    PlanSpec("dual-stream", "lora", "dual", dual_lora.solve, dual_lora.cost_stream, dual_lora.fits),
    PlanSpec("cg", "lora", "cg", cg_lora.solve, cg_lora.cost, _always),
)


@dataclass(frozen=True)
class Plan:
    """What an update runs: the registry entry's ``name``, ``solver`` ("dual" or "cg"), ``keep`` (the LoRA
    dual keeps its probability tiles) and ``run(prob, cfg, engine, cg) -> Solved``, with the estimated
    seconds of every plan of the mode and the ones the memory budgets allow."""

    name: str
    solver: str
    keep: bool
    run: Callable[..., Solved] = field(compare=False)
    estimates: Dict[str, float] = field(default_factory=dict, compare=False)
    allowed: Tuple[str, ...] = field(default=(), compare=False)

    @classmethod
    def of(cls, spec: PlanSpec, estimates: Dict[str, float], allowed: Tuple[str, ...]) -> "Plan":
        return cls(spec.name, spec.solver, spec.name == "dual-keep", spec.run, estimates, allowed)


def weight_pass_seconds(k: Dict[str, float], V: int, d: int, model_dtype: torch.dtype) -> float:
    """Seconds one pass spends reading W (and widening bf16/fp16 chunks to fp32)."""
    s = V * d * model_dtype.itemsize / k["w_bw"]
    if model_dtype in (torch.bfloat16, torch.float16):
        s += V * d * k["widen"]
    return s


def estimate(cfg: RosaConfig, lengths: Sequence[int], d: int, V: int, k: Dict[str, float],
             model_dtype: torch.dtype) -> Dict[str, float]:
    """Estimated seconds of every plan of ``cfg.mode`` (``lengths``: tokens of each conversation; ``k``:
    the engine's throughput constants; ``model_dtype``: the weight's)."""
    wpass = weight_pass_seconds(k, V, d, model_dtype)
    return {p.name: p.cost(k, lengths, d, V, wpass, cfg.max_iter) for p in PLANS if p.mode == cfg.mode}


@functools.lru_cache(maxsize=256)
def choose(cfg: RosaConfig, lengths: Tuple[int, ...], d: int, V: int, engine_name: str = "torch",
           device_type: str = "cpu", model_dtype: torch.dtype = torch.float32) -> Plan:
    """The plan of an update (module doc, rules 1-2), cached: a session repeats the same shapes.

    ``lengths``: tokens of each conversation; ``V``: the global vocabulary (every rank of a
    vocabulary-parallel head takes the same plan); the engine ``engine_name`` on ``device_type`` gives
    the throughput constants; ``model_dtype``: the weight's dtype."""
    k = engine_for(engine_name, torch.device(device_type)).throughput(device_type, compute_dtype_of(model_dtype))
    est = estimate(cfg, lengths, d, V, k, model_dtype)
    esz = compute_dtype_of(model_dtype).itemsize
    specs = [p for p in PLANS if p.mode == cfg.mode]
    allowed = tuple(p.name for p in specs if p.fits(lengths, d, V, esz, cfg))
    duals = [p for p in specs if p.solver == "dual"]
    # the dual's variant: the cheapest one the memory allows (streaming, the last, needs only the Gram)
    dual = min((p for p in duals if p.name in allowed), key=lambda p: est[p.name], default=duals[-1])
    cg = next(p for p in specs if p.solver == "cg")
    if cfg.solver == "dual" or (cfg.solver == "auto" and dual.name in allowed
                                and est[dual.name] <= (1 + DUAL_TIE) * est[cg.name]):
        return Plan.of(dual, est, allowed)
    return Plan.of(cg, est, allowed)


def solver_costs(mode: str, lengths: Sequence[int], d: int, V: int, max_iter: int, *, backend: str = "torch",
                 device: str = "cpu", dtype: torch.dtype = torch.float32, keep_budget_bytes: int = 1 << 30,
                 gram_budget_bytes: int = 512 << 20) -> Dict[str, float]:
    """Estimated seconds of each solver on the engine ``backend``: ``dual`` (LoRA: keeping the tiles when
    the budget allows and it is cheaper, else streaming), ``cg``, and every plan (benchmarks print these)."""
    cfg = RosaConfig(mode=mode, max_iter=max_iter, solver="dual", keep_budget_bytes=keep_budget_bytes,
                     gram_budget_bytes=gram_budget_bytes)
    plan = choose(cfg, tuple(lengths), d, V, backend, device, dtype)
    est = dict(plan.estimates)
    est["dual"] = est[plan.name]
    return est
