"""Per-iteration overhead of the compiled CUDA CG: everything but the matvec.

One command on a GPU machine (JSON on stdout, progress on stderr):

    python benchmarks/bench_cg_overhead.py [--out benchmarks/results/]

For n in {1e3, 1e4, 1e5, 2e5} it times ``--iters`` iterations of the compiled solver
(``rosa_ext.cg.compiled.cg_cuda_launch``) on a diagonal operator (one elementwise
kernel) with eigenvalues log-spaced over [1e-6, 1] and tol = 0, so that no iteration
converges or underflows and every one does the full work (``iterations_run`` checks
it), subtracts ``--iters`` bare matvecs, and reports microseconds per iteration:

- ``overhead_us_eager``: launched from Python each iteration (host-bound when the
  matvec is this cheap: pybind11 call + 4 kernel launches);
- ``overhead_us_graph``: the same solve captured once in a CUDA graph and replayed
  (device time of the solver's kernels);
- ``python_cg_us_per_iter``: the torch ``cg_python`` loop (one host sync per
  iteration), total per iteration including its matvec, for comparison.

Target: overhead < 20 us per iteration for every n (``meets_target``).
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import sys

import common
import torch

TARGET_US = 20.0
DAMPING = 1e-7
SIZES = (1_000, 10_000, 100_000, 200_000)


def _time_ms(fn, reps: int) -> float:
    """Median milliseconds of fn() over ``reps`` runs (CUDA events on the current stream; upper median)."""
    times = sorted(common.cuda_times_ms(fn, reps))
    return times[len(times) // 2]


def _capture(fn) -> torch.cuda.CUDAGraph:
    """fn() once on a side stream (warm-up), then captured in a CUDA graph."""
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):
        fn()
    torch.cuda.current_stream().wait_stream(s)
    g = torch.cuda.CUDAGraph()
    with torch.cuda.graph(g):
        fn()
    torch.cuda.synchronize()
    return g


def _row(n: int, dtype: torch.dtype, iters: int, reps: int) -> dict:
    from rosa_ext import _C
    from rosa_ext.cg import cg_python
    from rosa_ext.cg.compiled import STATE_ITERS, cg_cuda_launch

    # condition number 1e6: CG is far from converged after a few hundred iterations
    diag = torch.logspace(-6, 0, n, dtype=dtype, device="cuda")[torch.randperm(n, device="cuda")]
    b = torch.randn(n, dtype=dtype, device="cuda")
    x = torch.empty_like(b)
    state = torch.empty(_C.CG_STATE_SIZE, dtype=torch.float64, device="cuda")

    def matvec(v: torch.Tensor) -> torch.Tensor:
        return diag * v

    def solve() -> None:
        cg_cuda_launch(matvec, b, damping=DAMPING, max_iter=iters, tol=0.0, out=x, state=state)

    def bare() -> None:
        for _ in range(iters):
            matvec(b)

    solve(); bare(); torch.cuda.synchronize()  # noqa: E702 (warm-up: kernels loaded)
    ran = int(state[STATE_ITERS])
    t_solve, t_bare = _time_ms(solve, reps), _time_ms(bare, reps)
    g_solve, g_bare = _capture(solve), _capture(bare)
    t_graph, t_graph_bare = _time_ms(g_solve.replay, reps), _time_ms(g_bare.replay, reps)
    py_iters = cg_python(matvec, b, damping=DAMPING, max_iter=iters, tol=0.0).iterations
    t_py = _time_ms(lambda: cg_python(matvec, b, damping=DAMPING, max_iter=iters, tol=0.0), max(3, reps // 3))
    eager = 1000 * (t_solve - t_bare) / iters
    graph = 1000 * (t_graph - t_graph_bare) / iters
    if ran != iters:
        print(f"warning: n={n}: only {ran} of {iters} iterations were active; the overhead is "
              f"underestimated", file=sys.stderr)
    return dict(n=n, iters=iters, iterations_run=ran,
                overhead_us_eager=round(eager, 3), overhead_us_graph=round(graph, 3),
                total_us_per_iter_eager=round(1000 * t_solve / iters, 3),
                total_us_per_iter_graph=round(1000 * t_graph / iters, 3),
                matvec_us_eager=round(1000 * t_bare / iters, 3),
                matvec_us_graph=round(1000 * t_graph_bare / iters, 3),
                python_cg_us_per_iter=round(1000 * t_py / max(1, py_iters), 3),
                meets_target=bool(eager < TARGET_US and graph < TARGET_US))


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--iters", type=int, default=200, help="CG iterations per timed solve")
    ap.add_argument("--reps", type=int, default=11, help="timed repetitions (median)")
    ap.add_argument("--dtype", choices=["float32", "float64"], default="float32")
    ap.add_argument("--out", type=pathlib.Path, default=None, help="directory for the JSON result")
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print(json.dumps(dict(benchmark="cg_overhead", error="needs a CUDA device")))
        return 2
    try:
        from rosa_ext import _C
    except ImportError as e:  # the build failed or was skipped (benchmarks/run_gpu.sh): nothing to measure
        print(json.dumps(dict(benchmark="cg_overhead", error=f"rosa_ext._C is not built ({e})")))
        return 2
    if not _C.has_cuda():
        print(json.dumps(dict(benchmark="cg_overhead", error="rosa_ext._C was built without CUDA (no nvcc)")))
        return 2
    dtype = getattr(torch, args.dtype)
    rows = []
    for n in SIZES:
        row = _row(n, dtype, args.iters, args.reps)
        rows.append(row)
        print(f"n={n:>7}  overhead {row['overhead_us_eager']:6.1f} us/iter eager, "
              f"{row['overhead_us_graph']:6.1f} us/iter graph; matvec {row['matvec_us_eager']:5.1f} us; "
              f"python CG {row['python_cg_us_per_iter']:7.1f} us/iter", file=sys.stderr, flush=True)
    env = common.versions()
    result = dict(benchmark="cg_overhead", device=env["gpu"], dtype=args.dtype,
                  target_us=TARGET_US, meets_target=all(r["meets_target"] for r in rows),
                  torch=env["torch"], cuda=env["cuda"], rosa_ext_C=_C.__version__,
                  cuda_architectures=_C.cuda_architectures, python=env["python"],
                  commit=common.commit(), date=common.utc_now(),
                  rows=rows)
    text = json.dumps(result, indent=1)
    print(text)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"gpu_cg_overhead_{datetime.date.today().isoformat()}.json"
        path.write_text(text + "\n")
        print(f"wrote {path}", file=sys.stderr)
    return 0


if __name__ == "__main__":
    sys.exit(main())
