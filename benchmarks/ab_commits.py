"""A/B of two checkouts of rosa-ext: the same ``rosa_update`` calls on both, their steps compared and
their times interleaved (a refactor must not change a step beyond rounding nor slow the default call).

    python benchmarks/ab_commits.py --old /path/to/old/checkout [--new .] [--rounds 3] [--reps 5]

Each side runs in its own subprocess importing rosa_ext from its checkout (each needs its compiled
``rosa_ext/_C*.so`` in place, or runs CG on the Python loop); the inputs are drawn from one seed in
float64 and cast, so both sides see the same numbers. Prints, per case, the relative difference of the
steps (float32 and float64 inputs, every solver) and the minimum CPU ms of the default call per side over
interleaved rounds (one torch thread; the thread's CPU time, so that other jobs on the machine disturb
it little).
"""
from __future__ import annotations

import argparse
import json
import os
import subprocess
import sys
from typing import Dict, List

STEP_CASES = [  # (mode, T, d, V, dtype, solver, extra)
    (m, T, 64, 3001, dt, s, x) for m in ("hidden", "lora") for T in (16, 96) for dt in ("float32", "float64")
    for s in ("dual", "cg", "auto") for x in ("", "bias", "batched")
]
TIME_CASES = [(m, T, d, V) for (T, d, V) in ((64, 256, 32000), (256, 256, 32000), (256, 576, 49152))
              for m in ("hidden", "lora")]


def _inputs(mode, T, d, V, dtype, extra, seed=0):
    import torch
    g = torch.Generator().manual_seed(seed)
    B = 3 if extra == "batched" else None
    lead = (T,) if B is None else (B, T)
    dt = getattr(torch, dtype)
    h = torch.randn(*lead, d, generator=g, dtype=torch.float64)
    W = torch.randn(V, d, generator=g, dtype=torch.float64) * 3 / d ** 0.5
    y = torch.randint(0, V, lead, generator=g)
    kw = dict(hidden=h.to(dt), weight=W.to(dt), targets=y)
    if extra == "bias":
        kw["bias"] = (torch.randn(V, generator=g, dtype=torch.float64) * 0.1).to(dt)
    if mode == "lora":
        rows = () if B is None else (B,)
        kw["lora_a"] = (torch.randn(*rows, d, generator=g, dtype=torch.float64) / d ** 0.5).to(dt)
        kw["lora_b"] = (torch.randn(*rows, V, generator=g, dtype=torch.float64) * 0.05).to(dt)
    if B is not None:
        m = torch.ones(B, T, dtype=torch.bool)
        m[1, : T // 2] = False
        kw["mask"] = m
    r = -1.0 if B is None else torch.tensor([-1.0, 1.0, 0.5])
    return kw, r


def import_from(path: str):
    """rosa_ext imported from the checkout at ``path`` (an editable install's import hook, which would
    win over PYTHONPATH, is taken off ``sys.meta_path`` first; checked)."""
    sys.meta_path[:] = [f for f in sys.meta_path if "editable" not in type(f).__module__.lower()]
    sys.path.insert(0, os.path.abspath(path))
    import rosa_ext
    where = os.path.dirname(os.path.abspath(rosa_ext.__file__))
    if where != os.path.join(os.path.abspath(path), "rosa_ext"):
        raise RuntimeError(f"imported rosa_ext from {where}, not from {path}")
    return rosa_ext


def worker(out_path: str, rounds_reps: str, steps: bool = True) -> None:
    import time

    import torch
    torch.set_num_threads(1)
    rosa_update = import_from(os.environ["AB_CHECKOUT"]).rosa_update
    res: Dict[str, object] = {"steps": {}, "times": {}}
    for case in (STEP_CASES if steps else []):
        mode, T, d, V, dt, solver, extra = case
        kw, r = _inputs(mode, T, d, V, dt, extra)
        st = rosa_update(**kw, reward=r, mode=mode, solver=solver, max_iter=200, tol=1e-12)
        res["steps"][repr(case)] = st.update.double().reshape(-1).tolist()
    reps = int(rounds_reps)
    for case in TIME_CASES:
        mode, T, d, V = case
        kw, r = _inputs(mode, T, d, V, "float32", "")
        rosa_update(**kw, reward=r, mode=mode)  # warm-up
        best = float("inf")
        for _ in range(reps):  # CPU time of this (only) thread: a shared machine disturbs it little
            t = time.thread_time()
            rosa_update(**kw, reward=r, mode=mode)
            best = min(best, time.thread_time() - t)
        res["times"][repr(case)] = best * 1e3
    with open(out_path, "w") as f:
        json.dump(res, f)


def run_side(path: str, out: str, reps: int, steps: bool) -> Dict[str, object]:
    env = dict(os.environ, AB_CHECKOUT=os.path.abspath(path), OMP_NUM_THREADS="1")
    subprocess.run([sys.executable, os.path.abspath(__file__), "--worker", out, str(reps), "1" if steps else "0"],
                   check=True, env=env, cwd=os.path.abspath(path))
    with open(out) as f:
        return json.load(f)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--old", help="the old checkout (required)")
    ap.add_argument("--new", default=".")
    ap.add_argument("--rounds", type=int, default=3)
    ap.add_argument("--reps", type=int, default=5)
    ap.add_argument("--times-only", action="store_true", help="skip the step comparison")
    ap.add_argument("--worker", nargs=3, help=argparse.SUPPRESS)
    a = ap.parse_args(argv)
    if a.worker:
        worker(a.worker[0], a.worker[1], a.worker[2] == "1")
        return 0
    if not a.old:
        ap.error("--old is required")
    import torch
    runs: Dict[str, List[Dict[str, object]]] = {"old": [], "new": []}
    for k in range(a.rounds):
        for side in ("old", "new"):
            print(f"round {k + 1}/{a.rounds}: {side}", flush=True)
            runs[side].append(run_side(getattr(a, side), f"/tmp/ab_{side}_{os.getpid()}.json", a.reps,
                                       steps=k == 0 and not a.times_only))
    old, new = runs["old"][0]["steps"], runs["new"][0]["steps"]
    worst = {}
    if not old:
        print("(steps not compared: --times-only)")
    print(f"\n{'case':<60} rel. diff of the step")
    for key in old:
        o, n = torch.tensor(old[key], dtype=torch.float64), torch.tensor(new[key], dtype=torch.float64)
        rel = float((n - o).norm() / o.norm().clamp_min(1e-300))
        worst[key] = rel
        print(f"{key:<60} {rel:.2e}")
    for dt in ("float32", "float64"):
        for solver in ("dual", "cg", "auto"):
            sel = [v for k, v in worst.items() if f"'{dt}', '{solver}'" in k]
            if sel:
                print(f"max rel. diff {dt} {solver}: {max(sel):.2e}")
    print(f"\n{'default call (mode, T, d, V)':<40} {'old CPU ms':>11} {'new CPU ms':>11}")
    for key in runs["old"][0]["times"]:
        o = min(r["times"][key] for r in runs["old"])
        n = min(r["times"][key] for r in runs["new"])
        print(f"{key:<40} {o:11.1f} {n:11.1f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
