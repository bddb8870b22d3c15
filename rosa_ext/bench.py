"""Update-latency and memory benchmarks: ``python -m rosa_ext.bench --preset cpu|gpu|tiny``.

For every case (mode, dtype, T, head size d x V) it times, on the same inputs in the
same run: one full ROSA update and one JVP+VJP pair, for

- ``torch.func+CG``: the obvious alternative (:mod:`rosa_ext.bench_baseline`),
- ``rosa cg`` / ``rosa dual`` / ``rosa auto``: :func:`rosa_ext.rosa_update` with each
  solver on the default backend (chunked torch on the CPU, Triton on CUDA) and the
  compiled CG of ``rosa_ext._C``,
- ``reference``: the float64 torch.func + dense-solve reference (small cases only).

Each row reports the median and [min, max] latency over repeats, CG iterations, the
relative error of the update against the exact float64 dual solve of the same inputs,
extra peak memory (CUDA: ``torch.cuda.max_memory_allocated`` over the inputs; CPU: the
process's peak-RSS growth, measured in a fresh subprocess per row so rows don't mask
each other), achieved GFLOP/s of the JVP+VJP pair (4*T*d*V flops) and its share of the
machine's peak (CPU: a large fp32 matmul measured in the same run; CUDA: the data-sheet
dense peak), and the speedup over the alternative. Extra sections: solver choice vs T,
and B batched conversations in one call vs B calls. Outputs a table on the terminal,
JSON, markdown and a PNG (latency vs T per method).
"""
from __future__ import annotations

import argparse
import datetime
import json
import os
import pathlib
import platform
import resource
import statistics
import subprocess
import sys
import time
from typing import Any, Dict, List, Optional

import torch

#: Head sizes of real models (d, V).
MODELS = {"qwen2.5-0.5b": (896, 151936), "qwen3-0.6b": (1024, 151936), "qwen2.5-7b": (3584, 152064),
          "llama-3-8b": (4096, 128256), "cpu-small": (256, 32000), "tiny": (32, 500)}
#: Dense data-sheet peaks (TFLOP/s) used for the GPU roofline percentage.
GPU_PEAK_TFLOPS = {"H100": {"bfloat16": 989.0, "float32": 67.0}, "H200": {"bfloat16": 989.0, "float32": 67.0}}

PRESETS: Dict[str, Dict[str, Any]] = {
    "tiny": dict(models=["tiny"], T=[8, 32], modes=["lora", "hidden"], dtypes=["float32"], reps=2,
                 reference_max_T=32, batched_B=[1, 4], batched_T=8, subprocess_memory=False),
    "cpu": dict(models=["cpu-small"], T=[64, 256, 1024], modes=["lora", "hidden"], dtypes=["float32"], reps=3,
                reference_max_T=64, batched_B=[1, 4, 16, 64], batched_T=32, subprocess_memory=True),
    "gpu": dict(models=["qwen2.5-0.5b"], T=[64, 256, 1024, 4096], modes=["lora", "hidden"],
                dtypes=["bfloat16", "float32"], reps=10, reference_max_T=0, batched_B=[1, 4, 16, 64],
                batched_T=256, subprocess_memory=False,
                extra=[("qwen3-0.6b", 1024), ("qwen2.5-7b", 1024), ("llama-3-8b", 1024)]),
}
METHODS = ["torch.func+CG", "rosa cg", "rosa dual", "rosa auto", "reference"]
MAX_ITER, TOL, DAMPING = 16, 1e-5, 0.1


def _inputs(d: int, V: int, T: int, mode: str, dtype: torch.dtype, device: str, seed: int = 0) -> Dict[str, Any]:
    """Random head with realistic, peaked logits; targets drawn from the model's own softmax."""
    g = torch.Generator(device="cpu").manual_seed(seed + T)
    h = torch.randn(T, d, generator=g)
    W = torch.randn(V, d, generator=g) * (4.0 / d ** 0.5)
    # sample 16 rows at a time: never T x V at once, so input creation sets no memory peak
    y = torch.cat([torch.multinomial(torch.softmax(h[i:i + 16] @ W.T, -1), 1, generator=g).squeeze(1)
                   for i in range(0, T, 16)])
    a = torch.randn(d, generator=g) / d ** 0.5
    b = torch.randn(V, generator=g) * 0.01
    out = dict(hidden=h.to(device, dtype), weight=W.to(device, dtype), targets=y.to(device), reward=-1.0,
               mode=mode, lora_a=a.to(device), lora_b=b.to(device) if mode == "lora" else None)
    return out


def _proc_status_kb(field: str) -> Optional[int]:
    try:
        for line in open("/proc/self/status"):
            if line.startswith(field + ":"):
                return int(line.split()[1])
    except OSError:
        pass
    return None


def _rss_mark() -> Optional[int]:
    """Current RSS (kB) after resetting the peak-RSS counter (Linux clear_refs 5), or None."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _proc_status_kb("VmRSS")


def _sync(device: str) -> None:
    if device == "cuda":
        torch.cuda.synchronize()


def _time(fn, reps: int, device: str) -> List[float]:
    out = []
    for _ in range(reps):
        _sync(device)
        t0 = time.perf_counter()
        fn()
        _sync(device)
        out.append(1000.0 * (time.perf_counter() - t0))
    return out


def _runner(method: str, inp: Dict[str, Any]):
    """(update_fn -> (update, iterations), pair_factory -> pair_fn or None) for one method."""
    from . import rosa_update
    from .bench_baseline import TorchFuncOperator, torch_func_update

    kw = dict(mode=inp["mode"], lora_a=inp["lora_a"], lora_b=inp["lora_b"])
    args = (inp["hidden"], inp["weight"], inp["targets"], inp["reward"])
    if method == "torch.func+CG":
        def update():
            r = torch_func_update(*args, **kw, damping=DAMPING, max_iter=MAX_ITER, tol=TOL)
            return r.x, r.iterations
        def pair_factory():
            op = TorchFuncOperator(*args, **kw)
            v = torch.randn_like(op.theta0)
            return lambda: op.vjp(op.jvp(v))
        return update, pair_factory
    if method == "reference":
        from .reference import rosa_update_reference

        def update():
            s = rosa_update_reference(*args, **kw, damping=DAMPING)
            return s.update, 0
        return update, lambda: None
    solver = method.split()[-1]

    def update():
        s = rosa_update(*args, **kw, damping=DAMPING, max_iter=MAX_ITER, tol=TOL, solver=solver)
        return s.update, s.iterations
    if solver != "cg":
        return update, lambda: None

    def pair_factory():
        from ._problem import build_problem
        from .backends import get_backend
        from .jacobian import RosaOperator
        prob = build_problem(*args, **kw, lora_scale=8.0, bias=None, beta=1.0, damping=DAMPING, max_iter=MAX_ITER,
                             tol=TOL, solver="cg", backend="auto", mask=None)
        op = RosaOperator(prob, get_backend("auto", prob.device))
        v = torch.randn(1, prob.num_params, dtype=prob.compute_dtype, device=prob.device)
        return lambda: op.vjp(op.jvp(v))
    return update, pair_factory


def _truth(inp: Dict[str, Any]) -> torch.Tensor:
    """Exact float64 update (dual solve) of the same inputs."""
    from . import rosa_update
    f64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inp.items()}
    s = rosa_update(f64["hidden"], f64["weight"], f64["targets"], f64["reward"], mode=f64["mode"],
                    lora_a=f64["lora_a"], lora_b=f64["lora_b"], damping=DAMPING, solver="dual", backend="torch")
    return s.update


def measure(method: str, model: str, T: int, mode: str, dtype: str, device: str, reps: int,
            truth: Optional[torch.Tensor]) -> Dict[str, Any]:
    """One row: latency, iterations, error, extra memory, GFLOP/s of the pair."""
    d, V = MODELS[model]
    inp = _inputs(d, V, T, mode, getattr(torch, dtype), device)
    update, pair_factory = _runner(method, inp)
    if device == "cuda":
        torch.cuda.synchronize()
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
    rss0 = _rss_mark()
    maxrss0 = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss
    upd, iters = update()  # warm-up (and the memory high-water mark)
    _sync(device)
    if device == "cuda":
        extra_mb = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
    elif rss0 is not None:  # peak RSS during the update over the RSS before it
        extra_mb = (_proc_status_kb("VmHWM") - rss0) / 1024.0
    else:
        extra_mb = (resource.getrusage(resource.RUSAGE_SELF).ru_maxrss - maxrss0) / 1024.0
    times = _time(update, reps, device)
    row: Dict[str, Any] = dict(method=method, model=model, d=d, V=V, T=T, mode=mode, dtype=dtype, device=device,
                               median_ms=statistics.median(times), min_ms=min(times), max_ms=max(times),
                               iterations=int(iters), extra_mem_mb=round(extra_mb, 2))
    if truth is None:
        truth = _truth(inp)
    row["rel_error"] = float((upd.double().cpu() - truth.cpu()).norm() / truth.norm().clamp_min(1e-300))
    pair = pair_factory()
    if pair is not None:
        pair()
        pt = statistics.median(_time(pair, reps, device))
        row["pair_ms"] = pt
        row["pair_gflops"] = 4.0 * T * d * V / (pt * 1e-3) / 1e9
    return row


def _child(argv: List[str]) -> int:
    """``--one``: measure one row in this (fresh) process and print it as JSON."""
    method, model, T, mode, dtype, device, reps, truth_path, threads = argv
    if int(threads) > 0:
        torch.set_num_threads(int(threads))
    truth = torch.load(truth_path) if truth_path != "-" else None
    print(json.dumps(measure(method, model, int(T), mode, dtype, device, int(reps), truth)))
    return 0


def _cpu_peak_gflops() -> float:
    a = torch.randn(2048, 2048)
    a @ a
    t = statistics.median(_time(lambda: a @ a, 5, "cpu"))
    return 2 * 2048 ** 3 / (t * 1e-3) / 1e9


def _commit() -> str:
    try:
        return subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True,
                                       cwd=pathlib.Path(__file__).resolve().parents[1],
                                       stderr=subprocess.DEVNULL).strip()
    except Exception:
        return "unknown"


def _batched(device: str, model: str, dtype: str, Bs: List[int], T: int, reps: int) -> List[Dict[str, Any]]:
    """B conversations (hidden mode, T tokens each) in one rosa_update call vs B calls."""
    from . import rosa_update
    d, V = MODELS[model]
    rows = []
    for B in Bs:
        g = torch.Generator().manual_seed(B)
        dt = getattr(torch, dtype)
        W = (torch.randn(V, d, generator=g) * (4.0 / d ** 0.5)).to(device, dt)
        H = torch.randn(B, T, d, generator=g).to(device, dt)
        Y = torch.randint(0, V, (B, T), generator=g).to(device)
        r = torch.where(torch.arange(B) % 2 == 0, -1.0, 1.0).to(device)
        one = lambda: rosa_update(H, W, Y, r, mode="hidden", damping=DAMPING)  # noqa: E731

        def many():
            for i in range(B):
                rosa_update(H[i], W, Y[i], float(r[i]), mode="hidden", damping=DAMPING)
        one(), many()
        t1, tb = statistics.median(_time(one, reps, device)), statistics.median(_time(many, reps, device))
        rows.append(dict(B=B, T=T, model=model, batched_ms=t1, separate_ms=tb, speedup=tb / t1))
        print(f"  batched B={B:>3}: one call {t1:9.1f} ms   {B} calls {tb:9.1f} ms   x{tb / t1:.2f}", flush=True)
    return rows


def run(preset: str, device: str, out: Optional[pathlib.Path], reps: Optional[int] = None,
        threads: int = 0) -> Dict[str, Any]:
    """Run a preset; returns the result dict (and writes JSON/markdown/PNG into ``out``).

    ``threads`` > 0 sets torch's CPU thread count (in every subprocess too): on a machine
    shared with other work, 1 thread avoids the oversubscription stalls of torch's
    parallel regions (seen here: 2 threads under load ran a 2 ms update in 90 ms).
    """
    cfg = PRESETS[preset]
    if threads > 0:
        torch.set_num_threads(threads)
    reps = reps or cfg["reps"]
    cases = [(m, T) for m in cfg["models"] for T in cfg["T"]] + list(cfg.get("extra", []))
    rows: List[Dict[str, Any]] = []
    t_start = time.perf_counter()
    tmp = pathlib.Path(os.environ.get("TMPDIR", "/tmp")) / f"rosa_bench_{os.getpid()}"
    tmp.mkdir(exist_ok=True)
    total = len(cases) * len(cfg["modes"]) * len(cfg["dtypes"])
    k = 0
    for dtype in cfg["dtypes"]:
        for mode in cfg["modes"]:
            for model, T in cases:
                k += 1
                d, V = MODELS[model]
                truth = _truth(_inputs(d, V, T, mode, getattr(torch, dtype), device)).cpu()
                tpath = tmp / f"truth_{model}_{T}_{mode}_{dtype}.pt"
                torch.save(truth, tpath)
                print(f"[{k}/{total}] {model} d={d} V={V} T={T} {mode} {dtype}", flush=True)
                for method in METHODS:
                    P = d + V if mode == "lora" else d
                    if method == "reference" and (T > cfg["reference_max_T"] or P > 8192):
                        continue  # the reference solves a dense P x P system (8 GB at P = 32k)
                    if cfg["subprocess_memory"]:
                        cmd = [sys.executable, "-m", "rosa_ext.bench", "--one", method, model, str(T), mode, dtype,
                               device, str(reps), str(tpath), str(threads)]
                        res = subprocess.run(cmd, capture_output=True, text=True)
                        if res.returncode != 0:
                            raise RuntimeError(f"bench row {method} failed:\n{res.stderr[-2000:]}")
                        row = json.loads(res.stdout.strip().splitlines()[-1])
                    else:
                        row = measure(method, model, T, mode, dtype, device, reps, truth)
                    rows.append(row)
                    print(f"    {method:<14} {row['median_ms']:10.2f} ms  [{row['min_ms']:.2f}, {row['max_ms']:.2f}]"
                          f"  it={row['iterations']:>3}  err={row['rel_error']:.1e}  mem=+{row['extra_mem_mb']:.1f} MB",
                          flush=True)
    for row in rows:  # speedup over the alternative of the same case
        base = next(r for r in rows if r["method"] == "torch.func+CG" and all(
            r[f] == row[f] for f in ("model", "T", "mode", "dtype")))
        row["speedup_vs_torch_func"] = base["median_ms"] / row["median_ms"]
    if device == "cuda":
        name = torch.cuda.get_device_name()
        peaks = next((v for k_, v in GPU_PEAK_TFLOPS.items() if k_ in name), None)
        peak_note = f"data-sheet dense peak of {name}" if peaks else "unknown GPU: no roofline"
    else:
        cpu_peak = _cpu_peak_gflops()
        peaks = {dt: cpu_peak / 1000.0 for dt in ("float32", "bfloat16")}
        name = platform.processor() or platform.machine()
        peak_note = f"CPU peak = 2048^3 fp32 matmul measured in this run: {cpu_peak:.1f} GFLOP/s"
    for row in rows:
        if "pair_gflops" in row and peaks:
            row["pair_pct_of_peak"] = 100.0 * row["pair_gflops"] / (1000.0 * peaks[row["dtype"]])
    print("batched conversations (hidden mode):", flush=True)
    batched = _batched(device, cfg["models"][0], cfg["dtypes"][0], cfg["batched_B"], cfg["batched_T"],
                       max(1, reps // 2))
    result = dict(preset=preset, device=device, device_name=name, cores=os.cpu_count(),
                  torch_threads=torch.get_num_threads(),
                  torch=torch.__version__, python=platform.python_version(), commit=_commit(),
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
                  settings=dict(max_iter=MAX_ITER, tol=TOL, damping=DAMPING, beta=1.0, reward=-1.0, reps=reps),
                  peak_note=peak_note, wall_s=round(time.perf_counter() - t_start, 1), rows=rows, batched=batched)
    try:
        import triton
        result["triton"] = triton.__version__
    except Exception:
        result["triton"] = None
    print(markdown(result))
    if out is not None:
        write(result, out)
    return result


def markdown(result: Dict[str, Any]) -> str:
    """The result as a markdown table."""
    lines = [f"Device: {result['device_name']} ({result['device']}, {result['cores']} cores), torch {result['torch']}, "
             f"commit {result['commit']}, {result['date']}. {result['peak_note']}. Settings: {result['settings']}.", "",
             "| model (d, V) | T | mode | dtype | method | median ms [min, max] | CG it | rel. error | extra MB |"
             " pair ms | pair GFLOP/s (% peak) | speedup vs torch.func |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        pair = f"{r['pair_ms']:.2f}" if "pair_ms" in r else ""
        gf = (f"{r['pair_gflops']:.1f} ({r.get('pair_pct_of_peak', float('nan')):.0f}%)" if "pair_gflops" in r else "")
        lines.append(f"| {r['model']} ({r['d']}, {r['V']}) | {r['T']} | {r['mode']} | {r['dtype']} | {r['method']} | "
                     f"{r['median_ms']:.1f} [{r['min_ms']:.1f}, {r['max_ms']:.1f}] | {r['iterations']} | "
                     f"{r['rel_error']:.1e} | {r['extra_mem_mb']:.1f} | {pair} | {gf} | "
                     f"{r['speedup_vs_torch_func']:.1f}x |")
    lines += ["", "| B conversations (T each) | one batched call ms | B separate calls ms | speedup |", "|---|---|---|---|"]
    for b in result["batched"]:
        lines.append(f"| {b['B']} ({b['T']}) | {b['batched_ms']:.1f} | {b['separate_ms']:.1f} | {b['speedup']:.2f}x |")
    return "\n".join(lines)


def write(result: Dict[str, Any], out: pathlib.Path) -> None:
    """JSON, markdown and PNG into ``out`` (named by device and date)."""
    out.mkdir(parents=True, exist_ok=True)
    stem = f"{'gpu' if result['device'] == 'cuda' else 'cpu'}_{result['preset']}_{result['date'][:10]}"
    (out / f"{stem}.json").write_text(json.dumps(result, indent=1))
    (out / f"{stem}.md").write_text(markdown(result) + "\n")
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return
    combos = sorted({(r["mode"], r["dtype"], r["model"]) for r in result["rows"]})
    fig, axes = plt.subplots(1, len(combos), figsize=(5 * len(combos), 4), squeeze=False)
    for ax, (mode, dtype, model) in zip(axes[0], combos):
        for method in METHODS:
            pts = sorted((r["T"], r["median_ms"]) for r in result["rows"]
                         if r["method"] == method and r["mode"] == mode and r["dtype"] == dtype and r["model"] == model)
            if pts:
                ax.plot([p[0] for p in pts], [p[1] for p in pts], marker="o", label=method)
        ax.set(xscale="log", yscale="log", xlabel="response tokens T", ylabel="update latency (ms)",
               title=f"{model} {mode} {dtype}")
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=8)
    fig.suptitle(f"ROSA update latency, {result['device_name']} ({result['date'][:10]}, {result['commit']})")
    fig.tight_layout()
    fig.savefig(out / f"{stem}.png", dpi=110)
    plt.close(fig)


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--one"]:
        return _child(argv[1:])
    p = argparse.ArgumentParser(prog="python -m rosa_ext.bench", description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--reps", type=int, default=None)
    p.add_argument("--out", type=pathlib.Path, default=None, help="directory for JSON/markdown/PNG")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    a = p.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    run(a.preset, device, a.out, a.reps, a.threads)
    return 0


if __name__ == "__main__":
    sys.exit(main())
