"""Extra sections of the update benchmark: dual vs CG as a function of T, and batched updates.

- :func:`solver_sweep`: for each mode and T, one update with ``solver="cg"`` and one
  with ``solver="dual"`` (the device's default backend), the plan ``"auto"`` picks
  for that problem (:func:`rosa_ext.plans.choose`, the cost model of
  :mod:`rosa_ext.plans.registry`, not a timing), the cost model's estimates in ms, and which
  one was measured faster.
- :func:`batched_sweep`: B conversations of ragged length (<= T tokens, mask) with
  rewards alternating +-1 in ONE ``rosa_update`` call ((B, T, d) hidden, (B, T) mask,
  (B,) rewards) vs B separate calls on the unpadded conversations; the two results
  are compared (max relative difference).
"""
from __future__ import annotations

import statistics
from typing import Any, Dict, List

import torch
from common import sync, wall_times_ms
from update_measure import BETA, DAMPING, DAMPING_MODE, LORA_SCALE, MAX_ITER, MODELS, TOL, make_inputs


def _cost_model(plan) -> Dict[str, float]:
    """The seconds the cost model of ``solver="auto"`` estimates for the dual (its best allowed
    plan) and for CG, in ms (rosa_ext.plans.registry)."""
    est = plan.estimates
    if "dual" in est:  # hidden mode
        dual = est["dual"]
    elif "dual-keep" in plan.allowed and est["dual-keep"] <= est["dual-stream"]:
        dual = est["dual-keep"]
    else:
        dual = est["dual-stream"]
    return dict(model_dual_ms=dual * 1e3, model_cg_ms=est["cg"] * 1e3)


def solver_sweep(device: str, model: str, dtype: str, Ts: List[int], modes: List[str], reps: int,
                 budget_s: float = 20.0) -> List[Dict[str, Any]]:
    """Rows: mode, T, cg_ms, dual_ms (medians), cg iterations, auto's choice, faster, cost-model flops."""
    from rosa_ext import rosa_update
    from rosa_ext.backends import engine_for
    from rosa_ext.core.op import pack
    from rosa_ext.plans import choose
    d, V = MODELS[model]
    rows = []
    for mode in modes:
        for T in Ts:
            inp = make_inputs(d, V, T, mode, getattr(torch, dtype), device)
            args = (inp["hidden"], inp["weight"], inp["targets"], inp["reward"])
            kw = dict(mode=mode, lora_a=inp["lora_a"], lora_b=inp["lora_b"], lora_scale=LORA_SCALE, beta=BETA,
                      damping=DAMPING, damping_mode=DAMPING_MODE, max_iter=MAX_ITER, tol=TOL)
            prob, cfg = pack(*args, **kw, solver="auto", backend="auto")
            engine = engine_for("auto", prob.weight.device)
            plan = choose(cfg, tuple(prob.lengths), d, V, engine.name, prob.weight.device.type, prob.weight.dtype)
            auto = plan.solver
            row: Dict[str, Any] = dict(model=model, d=d, V=V, mode=mode, T=T, dtype=dtype, auto_picks=auto,
                                       auto_keeps=plan.keep, **_cost_model(plan))
            res = {}
            for solver in ("cg", "dual"):
                fn = lambda s=solver: rosa_update(*args, **kw, solver=s)  # noqa: E731
                res[solver] = fn()  # warm-up
                sync(device)
                times = wall_times_ms(fn, reps, device, budget_s=budget_s, min_reps=1)
                row[f"{solver}_ms"] = statistics.median(times)
                row[f"{solver}_reps"] = len(times)
            row["cg_iterations"] = res["cg"].iterations
            u_cg, u_dual = res["cg"].update.double(), res["dual"].update.double()
            row["cg_vs_dual_rel_diff"] = float((u_cg - u_dual).norm() / u_dual.norm().clamp_min(1e-300))
            row["faster"] = "dual" if row["dual_ms"] < row["cg_ms"] else "cg"
            rows.append(row)
            print(f"  solvers {mode:<6} T={T:>5}: cg {row['cg_ms']:9.1f} ms ({row['cg_iterations']} it)   "
                  f"dual {row['dual_ms']:9.1f} ms   auto picks {auto:<4}  (faster: {row['faster']})", flush=True)
    return rows


def batched_sweep(device: str, model: str, dtype: str, Bs: List[int], T: int, modes: List[str], reps: int,
                  budget_s: float = 20.0) -> List[Dict[str, Any]]:
    """Rows: mode, B, T, batched_ms, separate_ms, speedup, max relative difference of the updates."""
    from rosa_ext import rosa_update
    d, V = MODELS[model]
    dt = getattr(torch, dtype)
    rows = []
    for mode in modes:
        for B in Bs:
            g = torch.Generator(device="cpu").manual_seed(1000 + B)
            base = make_inputs(d, V, B * T, mode, dt, device, seed=B)
            H = base["hidden"].reshape(B, T, d)
            Y = base["targets"].reshape(B, T)
            lens = torch.randint(T // 2, T + 1, (B,), generator=g)
            lens[0] = T
            mask = (torch.arange(T).unsqueeze(0) < lens.unsqueeze(1)).to(device)
            r = torch.where(torch.arange(B) % 2 == 0, -1.0, 1.0)
            kw = dict(mode=mode, lora_scale=LORA_SCALE, beta=BETA, damping=DAMPING, damping_mode=DAMPING_MODE,
                      max_iter=MAX_ITER, tol=TOL)
            if mode == "lora":
                A = base["lora_a"].unsqueeze(0).expand(B, d).contiguous()
                Bv = base["lora_b"].unsqueeze(0).expand(B, V).contiguous()
            one = lambda: rosa_update(H, base["weight"], Y, r.to(device), mask=mask,  # noqa: E731
                                      **(dict(lora_a=A, lora_b=Bv) if mode == "lora" else {}), **kw)

            def many():
                out = []
                for i in range(B):
                    n = int(lens[i])
                    extra = dict(lora_a=A[i], lora_b=Bv[i]) if mode == "lora" else {}
                    out.append(rosa_update(H[i, :n], base["weight"], Y[i, :n], float(r[i]), **extra, **kw))
                return out
            s1, sb = one(), many()  # warm-up
            sync(device)
            u1 = s1.update.double()
            ub = torch.stack([s.update for s in sb]).double()
            diff = float(((u1 - ub).norm(dim=1) / ub.norm(dim=1).clamp_min(1e-300)).max())
            t1 = statistics.median(wall_times_ms(one, reps, device, budget_s=budget_s, min_reps=1))
            tb = statistics.median(wall_times_ms(many, reps, device, budget_s=budget_s, min_reps=1))
            rows.append(dict(mode=mode, B=B, T=T, tokens=int(lens.sum()), model=model, d=d, V=V, dtype=dtype,
                             batched_ms=t1, separate_ms=tb, speedup=tb / t1, solver_batched=s1.solver,
                             max_rel_diff=diff))
            print(f"  batched {mode:<6} B={B:>3} (T<={T}, {int(lens.sum())} tokens): one call {t1:9.1f} ms   "
                  f"{B} calls {tb:9.1f} ms   x{tb / t1:.2f}   max rel diff {diff:.1e}", flush=True)
    return rows
