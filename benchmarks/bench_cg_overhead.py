"""Per-iteration overhead of the compiled CUDA CG (issue 5), everything but the matvec.

One command on a GPU machine:

    python benchmarks/bench_cg_overhead.py --out benchmarks/results/

For n in {1e3, 1e4, 1e5, 2e5} it times ``max_iter`` iterations of the compiled solver
on a diagonal operator (one elementwise kernel), subtracts the same number of bare
matvecs (+ the copy into the work buffer), and reports microseconds per iteration,
eagerly launched and replayed from a CUDA graph; also the torch ``cg_python`` loop
(one host sync per iteration) for comparison. Target: < 20 us per iteration.
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import platform
import subprocess
import sys

import torch


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "HEAD"], text=True,
                                       cwd=pathlib.Path(__file__).parent).strip()
    except Exception:
        return "unknown"


def _time(fn, reps: int) -> float:
    """Median milliseconds of fn() over reps (CUDA events)."""
    times = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        times.append(a.elapsed_time(b))
    times.sort()
    return times[len(times) // 2]


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=200)
    ap.add_argument("--reps", type=int, default=11)
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--out", type=pathlib.Path, default=None, help="directory for the JSON result")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_cg_overhead: needs a CUDA device", file=sys.stderr)
        return 2
    from rosa_ext import _C
    from rosa_ext._cg_compiled import cg_cuda_launch
    from rosa_ext.cg import cg_python
    if not _C.has_cuda():
        print("bench_cg_overhead: rosa_ext._C was built without CUDA", file=sys.stderr)
        return 2
    dtype = getattr(torch, args.dtype)
    rows = []
    for n in (1_000, 10_000, 100_000, 200_000):
        diag = torch.rand(n, dtype=dtype, device="cuda") + 1.0
        b = torch.randn(n, dtype=dtype, device="cuda")
        buf = torch.empty_like(b)

        def matvec(v):
            return diag * v

        def solve():
            cg_cuda_launch(matvec, b, damping=0.1, max_iter=args.iters, tol=0.0, out=x, state=state)

        def bare():
            for _ in range(args.iters):
                buf.copy_(matvec(b))

        x = torch.empty_like(b)
        state = torch.empty(_C.CG_STATE_SIZE, dtype=torch.float64, device="cuda")
        solve(); bare(); torch.cuda.synchronize()  # noqa: E702 (warm-up)
        t_solve, t_bare = _time(solve, args.reps), _time(bare, args.reps)
        s = torch.cuda.Stream()
        s.wait_stream(torch.cuda.current_stream())
        with torch.cuda.stream(s):
            solve()
        torch.cuda.current_stream().wait_stream(s)
        g = torch.cuda.CUDAGraph()
        with torch.cuda.graph(g):
            solve()
        gb = torch.cuda.CUDAGraph()
        with torch.cuda.graph(gb):
            bare()
        t_graph, t_graph_bare = _time(g.replay, args.reps), _time(gb.replay, args.reps)
        t_py = _time(lambda: cg_python(matvec, b, damping=0.1, max_iter=args.iters, tol=0.0), max(3, args.reps // 3))
        row = dict(n=n, iters=args.iters,
                   overhead_us_eager=1000 * (t_solve - t_bare) / args.iters,
                   overhead_us_graph=1000 * (t_graph - t_graph_bare) / args.iters,
                   total_us_per_iter_eager=1000 * t_solve / args.iters,
                   total_us_per_iter_graph=1000 * t_graph / args.iters,
                   matvec_us=1000 * t_bare / args.iters,
                   python_cg_us_per_iter=1000 * t_py / args.iters)
        rows.append(row)
        print(f"n={n:>7}  overhead {row['overhead_us_eager']:6.1f} us/iter eager, "
              f"{row['overhead_us_graph']:6.1f} us/iter graph; python CG {row['python_cg_us_per_iter']:7.1f} us/iter",
              flush=True)
    result = dict(benchmark="cg_overhead", device=torch.cuda.get_device_name(), dtype=args.dtype,
                  torch=torch.__version__, python=platform.python_version(), commit=_commit(),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), rows=rows)
    print(json.dumps(result, indent=1))
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"gpu_cg_overhead_{datetime.date.today().isoformat()}.json"
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
