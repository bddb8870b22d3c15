"""``solver="auto"``: which plan an update runs, from the plans' cost formulas in seconds and their
memory rules (MATH.md section 4, "The cost model").

Every plan is a few passes over the head weight plus small dense algebra; each plan's file holds
its formula (importing the block sizes it models) and :mod:`.base` the measured throughput constants:

- hidden ``dual`` (:mod:`.dual_hidden`): ONE pass, then per conversation the smaller of the T x T
  dual and the d x d primal system.
- hidden ``cg`` (:mod:`.cg_hidden`): the same pass, then CG on the explicit Jacobian.
- lora ``dual-keep`` / ``dual-stream`` (:mod:`.dual_lora`): one pass keeping the probability tiles
  for a GEMV VJP, or a second streaming pass.
- lora ``cg`` (:mod:`.cg_lora`): the stats pass plus ``max_iter`` JVP + VJP pairs.

Rules (:func:`choose`): (1) memory first (each plan's ``fits``); (2) among the plans allowed, the
cheapest; the exact dual is kept unless CG is estimated more than :data:`DUAL_TIE` cheaper (CG stops
at ``tol`` or ``max_iter``, the dual is exact).
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Dict, Optional, Sequence, Tuple

import torch

from ..common.types import HeadProblem, compute_dtype_of
from . import cg_hidden, cg_lora, dual_hidden, dual_lora
from .base import CGImpl, Solved, constants, weight_pass_seconds

#: CG is taken over the exact dual only when it is estimated cheaper by more than this fraction.
DUAL_TIE = 0.1


@dataclass(frozen=True)
class Plan:
    """What an update runs: ``solver`` ("dual" or "cg"), ``keep`` (LoRA dual: keep the probability
    tiles between the pass and the VJP) and the estimated seconds of every plan considered."""

    solver: str
    keep: bool = False
    estimates: Dict[str, float] = field(default_factory=dict, compare=False)
    allowed: Tuple[str, ...] = field(default=(), compare=False)


def estimate(mode: str, lengths: Sequence[int], d: int, V: int, *, max_iter: int, backend: str = "torch",
             device: str = "cpu", dtype: torch.dtype = torch.float32,
             model_dtype: Optional[torch.dtype] = None) -> Dict[str, float]:
    """Estimated seconds of every plan of one update (``lengths``: tokens of each conversation;
    ``dtype``: the compute dtype; ``model_dtype``: the weight's, when it is widened per chunk)."""
    k = constants(backend, device, dtype)
    wpass = weight_pass_seconds(k, V, d, model_dtype or compute_dtype_of(dtype))
    if mode == "hidden":
        return {"dual": dual_hidden.cost(k, lengths, d, V, wpass),
                "cg": cg_hidden.cost(k, lengths, d, V, wpass, max_iter)}
    return {"dual-keep": dual_lora.cost_keep(k, lengths, d, V, wpass),
            "dual-stream": dual_lora.cost_stream(k, lengths, d, V, wpass),
            "cg": cg_lora.cost(k, lengths, d, V, wpass, max_iter)}


def memory_allows(mode: str, lengths: Sequence[int], d: int, V: int, esz: int, *, keep_budget_bytes: int,
                  gram_budget_bytes: int) -> Dict[str, bool]:
    """Which plans the memory budgets allow (rule 1)."""
    if mode == "hidden":
        return {"dual": dual_hidden.fits(lengths, d, esz, gram_budget_bytes), "cg": True}
    dual = dual_lora.fits(lengths, esz, gram_budget_bytes)
    return {"dual-keep": dual and dual_lora.fits_keep(lengths, V, esz, keep_budget_bytes), "dual-stream": dual,
            "cg": True}


def choose(mode: str, lengths: Sequence[int], d: int, V: int, *, max_iter: int, keep_budget_bytes: int,
           gram_budget_bytes: int, backend: str = "torch", device: str = "cpu", dtype: torch.dtype = torch.float32,
           model_dtype: Optional[torch.dtype] = None, solver: str = "auto") -> Plan:
    """The plan an update runs. ``solver``: "auto" (module doc), or "dual" / "cg" forced (then only
    the LoRA dual's keep-or-stream choice is made here, by the same rules). Cached: a session
    repeats the same shapes."""
    return _choose(mode, tuple(lengths), d, V, max_iter, keep_budget_bytes, gram_budget_bytes, backend, device, dtype,
                   model_dtype, solver)


@functools.lru_cache(maxsize=256)
def _choose(mode: str, lengths: Tuple[int, ...], d: int, V: int, max_iter: int, keep_budget_bytes: int,
            gram_budget_bytes: int, backend: str, device: str, dtype: torch.dtype, model_dtype: Optional[torch.dtype],
            solver: str) -> Plan:
    est = estimate(mode, lengths, d, V, max_iter=max_iter, backend=backend, device=device, dtype=dtype,
                   model_dtype=model_dtype)
    esz = compute_dtype_of(dtype).itemsize
    ok = memory_allows(mode, lengths, d, V, esz, keep_budget_bytes=keep_budget_bytes,
                       gram_budget_bytes=gram_budget_bytes)
    allowed = tuple(p for p in est if ok[p])
    if mode == "hidden":
        keep, dual_ok, dual_s = False, ok["dual"], est["dual"]
    else:
        keep = ok["dual-keep"] and est["dual-keep"] <= est["dual-stream"]
        dual_s = est["dual-keep" if keep else "dual-stream"]
        dual_ok = ok["dual-stream"]
    if solver == "dual":
        return Plan("dual", keep, est, allowed)
    if solver == "cg":
        return Plan("cg", False, est, allowed)
    if dual_ok and dual_s <= (1 + DUAL_TIE) * est["cg"]:
        return Plan("dual", keep, est, allowed)
    return Plan("cg", False, est, allowed)


def choose_plan(prob: HeadProblem, backend: str = "torch", solver: Optional[str] = None) -> Plan:
    """The plan of ``prob`` (``solver``, default ``prob.solver``). The global V decides, so every rank
    of a vocabulary-parallel head takes the same plan."""
    return choose(prob.mode, prob.lengths, prob.hidden_size, prob.global_vocab_size, max_iter=prob.max_iter,
                  keep_budget_bytes=prob.keep_budget_bytes, gram_budget_bytes=prob.gram_budget_bytes,
                  backend=backend, device=prob.device.type, dtype=prob.compute_dtype, model_dtype=prob.weight.dtype,
                  solver=prob.solver if solver is None else solver)


def solver_costs(mode: str, lengths: Sequence[int], d: int, V: int, max_iter: int, *, backend: str = "torch",
                 device: str = "cpu", dtype: torch.dtype = torch.float32, keep_budget_bytes: int = 1 << 30,
                 gram_budget_bytes: int = 512 << 20) -> Dict[str, float]:
    """Estimated seconds of each solver: ``dual`` (LoRA: keeping the tiles when the budget allows and
    it is cheaper, else streaming), ``cg``, and every plan (benchmarks print these)."""
    plan = choose(mode, lengths, d, V, max_iter=max_iter, keep_budget_bytes=keep_budget_bytes,
                  gram_budget_bytes=gram_budget_bytes, backend=backend, device=device, dtype=dtype, solver="dual")
    est = dict(plan.estimates)
    if mode == "lora":
        est["dual"] = est["dual-keep" if plan.keep else "dual-stream"]
    return est


def run(prob: HeadProblem, backend, plan: Plan, cg: Optional[CGImpl] = None) -> Solved:
    """The solve of ``plan`` on a packed problem (the whole update after packing)."""
    if plan.solver == "dual":
        if prob.mode == "hidden":
            return dual_hidden.solve(prob, backend)
        return dual_lora.solve(prob, backend, plan.keep)
    if prob.mode == "hidden":
        return cg_hidden.solve(prob, backend, cg)
    return cg_lora.solve(prob, backend, cg)
