"""Vocabulary-parallel ROSA updates on CPU processes (gloo): time and bytes communicated per update.

    python benchmarks/bench_distributed.py --out benchmarks/results            # d=256, V=32000, T=64/256
    python benchmarks/bench_distributed.py --preset tiny                       # seconds, a smoke check

For each number of ranks (default 1, 2 and 4) it starts that many processes (gloo, rendezvous
through a file), splits a random fp32 head by vocabulary rows (``torch.chunk`` blocks, as
``ColwiseParallel`` does) and times ``rosa_update`` on every case (mode x solver x T), the
inputs replicated and ``vocab_start`` per rank. Per case:

- **ms**: wall time of one update, the slowest rank's (all ranks start together after a
  barrier), median and [min, max] over ``--reps`` calls after one warm-up call;
- **bytes/rank**: what each rank contributed to the collectives of one update, counted by
  ``rosa_ext.backends.distributed.traffic`` (an all-reduce of n numbers counts n numbers; a ring
  all-reduce sends about 2(k-1)/k times that over each rank's link), the formula of MATH.md
  section 7 (``rosa_ext.core.distributed.traffic_bytes``) beside it, and the number of collectives;
- **unsharded ms**: the plain one-process call on the whole head (1-rank run only).

On a machine with fewer cores than ranks the ranks share cores, so the times show the
overhead of the collectives and of splitting, not a speed-up.
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import statistics
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict, List

import common
import torch

PRESETS = {
    "cpu": dict(d=256, V=32000, T=[64, 256], ranks=[1, 2, 4], reps=5),
    "tiny": dict(d=32, V=500, T=[8], ranks=[1, 2], reps=2),
}
MODES = ("lora", "hidden")
SOLVERS = ("dual", "cg")


def _inputs(T: int, d: int, V: int, seed: int = 0) -> Dict[str, torch.Tensor]:
    """A random peaked head as in bench_update.py: W ~ N(0, 16/d), h ~ N(0, 1), targets from the
    model's softmax, LoRA a ~ PEFT init, b ~ N(0, 1e-4)."""
    g = torch.Generator().manual_seed(seed)
    H = torch.randn(T, d, generator=g)
    W = torch.randn(V, d, generator=g) * (4.0 / d ** 0.5)
    y = torch.multinomial(torch.softmax(H @ W.T, -1), 1, generator=g).reshape(-1)
    a = (torch.rand(d, generator=g) * 2 - 1) / d ** 0.5
    b = torch.randn(V, generator=g) * 1e-2
    return dict(hidden=H, weight=W, targets=y, lora_a=a, lora_b=b)


def worker(args: argparse.Namespace) -> None:
    import torch.distributed as dist

    from rosa_ext import rosa_update
    from rosa_ext.backends.distributed import traffic
    from rosa_ext.core.distributed import traffic_bytes

    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(args.threads)
    dist.init_process_group("gloo", init_method=f"file://{args.store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=600))
    rows: List[Dict[str, Any]] = []
    for T in args.T:
        x = _inputs(T, args.d, args.V)
        per = -(-args.V // world)  # torch.chunk's blocks
        s, e = min(args.V, rank * per), min(args.V, (rank + 1) * per)
        for mode in MODES:
            for solver in SOLVERS:
                lk = dict(lora_a=x["lora_a"], lora_b=x["lora_b"][s:e]) if mode == "lora" else {}
                kw = dict(mode=mode, solver=solver, backend="torch", damping=0.1, damping_mode="absolute")

                def call():
                    return rosa_update(x["hidden"], x["weight"][s:e], x["targets"], -1.0, vocab_start=s,
                                       vocab_size=args.V, **kw, **lk)

                times = []
                step = None
                for rep in range(args.reps + 1):
                    dist.barrier()
                    traffic.reset()
                    t0 = time.perf_counter()
                    step = call()
                    t = torch.tensor([time.perf_counter() - t0], dtype=torch.float64)
                    snap = traffic.snapshot()
                    dist.all_reduce(t, op=dist.ReduceOp.MAX)
                    if rep > 0:
                        times.append(1000.0 * float(t))
                row = dict(ranks=world, T=T, mode=mode, solver=solver, ms_median=statistics.median(times),
                           ms_min=min(times), ms_max=max(times), n=len(times), iterations=step.iterations,
                           bytes=snap["bytes"], collectives=snap["calls"], by_label=snap["by_label"],
                           bytes_formula=traffic_bytes(mode, solver, [T], args.d, elem_bytes=4,
                                                       iterations=step.iterations),
                           rows_rank0=per)
                if world == 1:  # the plain call on the whole head, for reference
                    full = dict(lora_a=x["lora_a"], lora_b=x["lora_b"]) if mode == "lora" else {}
                    ut = []
                    for rep in range(args.reps + 1):
                        t0 = time.perf_counter()
                        rosa_update(x["hidden"], x["weight"], x["targets"], -1.0, **kw, **full)
                        if rep > 0:
                            ut.append(1000.0 * (time.perf_counter() - t0))
                    row["unsharded_ms_median"] = statistics.median(ut)
                rows.append(row)
                if rank == 0:
                    print(f"  ranks={world} T={T} {mode}/{solver}: {row['ms_median']:.1f} ms, "
                          f"{row['bytes']} B/rank ({row['collectives']} collectives)", flush=True)
    if rank == 0:
        pathlib.Path(args.result).write_text(json.dumps(rows))
    dist.destroy_process_group()


def run_ranks(world: int, args: argparse.Namespace) -> List[Dict[str, Any]]:
    tmp = pathlib.Path(tempfile.mkdtemp(prefix="rosa_bench_dist_"))
    result = tmp / "rows.json"
    cmd = [sys.executable, __file__, "--worker", "--store", str(tmp / "rendezvous"), "--result", str(result),
           "--d", str(args.d), "--V", str(args.V), "--T", ",".join(map(str, args.T)), "--reps", str(args.reps),
           "--threads", str(args.threads)]
    env = dict(os.environ, WORLD_SIZE=str(world))
    procs = [subprocess.Popen(cmd, env=dict(env, RANK=str(r))) for r in range(world)]
    codes = [p.wait() for p in procs]
    if any(codes):
        raise SystemExit(f"bench_distributed: a {world}-rank run failed (exit codes {codes})")
    return json.loads(result.read_text())


def report(rows: List[Dict[str, Any]], meta: Dict[str, Any]) -> str:
    lines = [f"# Vocabulary-parallel ROSA updates on CPU ranks (gloo), {meta['date'][:10]}", "",
             f"Commit {meta['commit']}; {meta['cpu']} ({meta['cores']} cores, load average {meta['load_start']} at the "
             f"start, {meta['load_end']} at the end); torch {meta['torch']}; {meta['threads']} torch thread(s) per rank. "
             f"Random fp32 head d={meta['d']}, V={meta['V']} split in torch.chunk blocks; reward -1, damping 0.1, "
             f"CG max_iter 16, backend torch; {meta['reps']} timed calls after one warm-up. Command: "
             f"`{meta['command']}`.", "",
             "| T | mode | solver | ranks | ms median [min, max] | unsharded ms | CG it | bytes/rank (formula) | "
             "collectives |", "|---|---|---|---|---|---|---|---|---|"]
    unsharded = {(r["T"], r["mode"], r["solver"]): r.get("unsharded_ms_median") for r in rows if r["ranks"] == 1}
    for r in sorted(rows, key=lambda r: (r["T"], r["mode"], r["solver"], r["ranks"])):
        u = unsharded.get((r["T"], r["mode"], r["solver"]))
        lines.append(f"| {r['T']} | {r['mode']} | {r['solver']} | {r['ranks']} | {r['ms_median']:.1f} "
                     f"[{r['ms_min']:.1f}, {r['ms_max']:.1f}] | {'' if u is None else f'{u:.1f}'} | {r['iterations']} | "
                     f"{r['bytes']:,} ({r['bytes_formula']:,}) | {r['collectives']} |")
    return "\n".join(lines) + "\n"


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    ap.add_argument("--ranks", help="comma-separated numbers of ranks (default: the preset's)")
    ap.add_argument("--d", type=int)
    ap.add_argument("--V", type=int)
    ap.add_argument("--T", help="comma-separated response lengths")
    ap.add_argument("--reps", type=int)
    ap.add_argument("--threads", type=int, default=1, help="torch threads per rank")
    ap.add_argument("--out", help="folder for distributed_cpu_<preset>_<date>.json/.md")
    ap.add_argument("--worker", action="store_true", help=argparse.SUPPRESS)
    ap.add_argument("--store", help=argparse.SUPPRESS)
    ap.add_argument("--result", help=argparse.SUPPRESS)
    args = ap.parse_args()
    p = PRESETS[args.preset]
    args.d = args.d or p["d"]
    args.V = args.V or p["V"]
    args.reps = args.reps or p["reps"]
    args.T = [int(t) for t in args.T.split(",")] if isinstance(args.T, str) else p["T"]
    if args.worker:
        worker(args)
        return
    ranks = [int(k) for k in args.ranks.split(",")] if args.ranks else p["ranks"]
    load_start = os.getloadavg()[0]
    rows: List[Dict[str, Any]] = []
    for k in ranks:
        print(f"{k} rank(s):", flush=True)
        rows += run_ranks(k, args)
    v = common.versions()
    meta = dict(date=common.utc_now(), commit=common.commit(), cpu=v["cpu"], cores=os.cpu_count(), torch=v["torch"],
                threads=args.threads, d=args.d, V=args.V, T=args.T, reps=args.reps, ranks=ranks,
                load_start=round(load_start, 1), load_end=round(os.getloadavg()[0], 1),
                command="python benchmarks/bench_distributed.py " + " ".join(sys.argv[1:]))
    md = report(rows, meta)
    print(md)
    if args.out:
        out = pathlib.Path(args.out)
        out.mkdir(parents=True, exist_ok=True)
        stem = f"distributed_cpu_{args.preset}_{meta['date'][:10]}"
        (out / f"{stem}.json").write_text(json.dumps(dict(meta=meta, rows=rows), indent=1))
        (out / f"{stem}.md").write_text(md)
        print(f"wrote {out / stem}.json/.md")


if __name__ == "__main__":
    main()
