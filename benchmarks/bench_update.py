"""Update-latency benchmarks: ``python benchmarks/bench_update.py --preset tiny|cpu|gpu [--out DIR]``.

For every case (head d x V, T response tokens, mode, dtype) it times, on the same
inputs in the same run, one whole ROSA update (stats + solve) and one JVP+VJP pair for

- ``torch.func+CG``: the obvious alternative a user would write
  (:mod:`update_baseline`: torch.func through the full T x V logits + a Python CG);
- ``rosa default``: :func:`rosa_ext.rosa_update` as shipped (solver="auto", backend="auto");
- ``rosa torch/cg``, ``rosa torch/dual``: the portable chunked backend with each solver;
- ``rosa triton/cg``, ``rosa triton/dual``: the Triton backend (CUDA, when triton imports);
- ``rosa <backend>/cg pyCG``: CG with the Python loop instead of the compiled ``rosa_ext._C``
  one (CUDA, when ``_C`` is built; all other CG rows use ``_C`` whenever it is built);
- ``reference``: the float64 torch.func Jacobian + dense solve (small P = #params only).

Columns, memory and error definitions: ``benchmarks/README.md``. Extra sections:
dual vs CG as a function of T with the solver ``auto`` picks, and B
conversations in one batched call vs B calls. Outputs: progress lines and the
tables on the terminal; ``--out DIR`` writes ``<cpu|gpu>_<preset>_<date>.{json,md,png}``
(JSON rewritten after every case, so an interrupted run keeps what it measured).
"""
from __future__ import annotations

import argparse
import json
import os
import pathlib
import subprocess
import sys
from typing import Any, Dict, List, Optional, Tuple

import common
import torch
import update_report
from update_dense import dense_bytes
from update_measure import (
    BASELINE,
    BETA,
    DAMPING,
    DEFAULT,
    DENSE,
    LORA_SCALE,
    MAX_ITER,
    MODELS,
    REFERENCE,
    REFERENCE_MAX_BYTES,
    REWARD,
    TOL,
    compiled_cg_available,
    dense_max_bytes,
    make_inputs,
    measure_case,
    measure_memory,
    methods_for,
    reference_bytes,
    runner,
    triton_usable,
    truth_update,
)
from update_sweeps import batched_sweep, solver_sweep

__all__ = ["PRESETS", "MODELS", "MAX_ITER", "run", "main", "make_inputs", "runner", "truth_update", "methods_for"]

Case = Tuple[str, int, str, str]  # (model, T, mode, dtype)

#: Dense data-sheet peaks (TFLOP/s) for the GPU roofline percentage.
GPU_PEAK_TFLOPS = {"H200": {"bfloat16": 989.0, "float32": 67.0}, "H100": {"bfloat16": 989.0, "float32": 67.0}}

PRESETS: Dict[str, Dict[str, Any]] = {
    # seconds on 2 cores: the smoke test's preset
    "tiny": dict(cases=[("tiny", T, m, "float32") for m in ("lora", "hidden") for T in (8, 32)],
                 late_cases=[], reps=2, row_budget_s=2.0, reference_max_T=32, reference_max_P=2000,
                 solvers=dict(model="tiny", dtype="float32", T=[8, 64]),
                 batched=dict(model="tiny", dtype="float32", B=[1, 4], T=8), subprocess_memory=False,
                 budget_s=120.0),
    # minutes on 2 cores: scaled-down head (d=256, V=32000)
    "cpu": dict(cases=[("cpu-small", T, m, "float32") for m in ("lora", "hidden") for T in (64, 256, 1024)],
                late_cases=[("cpu-small", 256, m, "bfloat16") for m in ("lora", "hidden")],
                reps=5, row_budget_s=25.0, reference_max_T=64, reference_max_P=6000,
                solvers=dict(model="cpu-sweep", dtype="float32", T=[64, 256, 1024, 2048, 4096, 8192]),
                batched=dict(model="cpu-small", dtype="float32", B=[1, 4, 16, 64], T=64), subprocess_memory=True,
                budget_s=3600.0),
    # real heads on the CPU against the dense peer (the package's default path and the dense solve
    # only: CG and torch.func rows would take minutes each here). The update-memory budget is 2 GB:
    # the dense solve needs T x V floats and does not fit it at T=4096 on the Qwen2.5-0.5B head.
    "heads": dict(cases=[(mdl, T, m, "float32") for mdl, Ts in (("smollm2-135m", (64, 256, 1024)),
                                                                ("qwen2.5-0.5b", (64, 256, 1024, 4096)))
                         for T in Ts for m in ("lora", "hidden")],
                  late_cases=[], reps=5, row_budget_s=30.0, reference_max_T=0, reference_max_P=0,
                  methods=["dense solve", "rosa default"], dense_cap_gb=2.0,
                  solvers=None, batched=None, subprocess_memory=True, budget_s=5400.0),
    # the issue-24 target cases alone, for the first minutes on a lent GPU (benchmarks/run_gpu.sh runs it
    # first): Qwen2.5-0.5B head, T = 1024, bf16, both modes, the default call, the dual and CG
    "target": dict(cases=[("qwen2.5-0.5b", 1024, m, "bfloat16") for m in ("lora", "hidden")], late_cases=[],
                   reps=5, row_budget_s=3.0, reference_max_T=0, reference_max_P=0,
                   methods=[DEFAULT, "rosa triton/dual", "rosa triton/cg"],
                   solvers=None, batched=None, subprocess_memory=False, budget_s=150.0),
    # one H100/H200 call (< 10 min): Qwen2.5-0.5B head first (bf16, the target case), then
    # the sweeps, then fp32 and the larger heads at T=1024 while the time budget lasts
    "gpu": dict(cases=[("qwen2.5-0.5b", T, m, "bfloat16") for m in ("lora", "hidden") for T in (64, 256, 1024, 4096)],
                late_cases=[("qwen2.5-0.5b", T, m, "float32") for m in ("lora", "hidden") for T in (64, 256, 1024, 4096)]
                + [(mdl, 1024, m, "bfloat16") for mdl in ("qwen3-0.6b", "qwen2.5-7b", "llama-3-8b")
                   for m in ("lora", "hidden")],
                reps=10, row_budget_s=5.0, reference_max_T=0, reference_max_P=0,
                solvers=dict(model="qwen2.5-0.5b", dtype="bfloat16", T=[64, 256, 1024, 2048, 4096, 8192]),
                batched=dict(model="qwen2.5-0.5b", dtype="bfloat16", B=[1, 4, 16, 64], T=256),
                subprocess_memory=False, budget_s=480.0),
}


def _cpu_peak_gflops(n: int = 2048) -> float:
    """Best of 5 n^3 fp32 matmuls at the current thread count, GFLOP/s."""
    a = torch.randn(n, n)
    a @ a
    t = min(common.wall_times_ms(lambda: a @ a, 5, "cpu"))
    return 2 * n ** 3 / (t * 1e-3) / 1e9


def _memory_in_subprocess(spec: Dict[str, Any]) -> Dict[str, Any]:
    """CPU memory of one method in a fresh process (so freed memory of earlier rows can't hide it)."""
    cmd = [sys.executable, str(pathlib.Path(__file__).resolve()), "--one", json.dumps(spec)]
    res = subprocess.run(cmd, capture_output=True, text=True)
    if res.returncode != 0:
        # A negative return code is a signal (e.g. -9: killed, typically for memory), with no stderr.
        raise RuntimeError(f"memory subprocess exited with code {res.returncode}: {res.stderr.strip()[-1500:]}")
    return json.loads(res.stdout.strip().splitlines()[-1])


def _child(spec_json: str) -> int:
    """``--one SPEC``: memory of one method in this fresh process, printed as one JSON line."""
    spec = json.loads(spec_json)
    if spec.get("threads", 0) > 0:
        torch.set_num_threads(spec["threads"])
    d, V = MODELS[spec["model"]]
    inp = make_inputs(d, V, spec["T"], spec["mode"], getattr(torch, spec["dtype"]), spec["device"])
    if spec["method"] == DENSE:
        cap = dense_max_bytes(spec["device"], spec.get("dense_cap_gb"))
        if dense_bytes(spec["T"], d, V, spec["mode"]) > cap:
            raise SystemExit(f"does not fit: the dense solve needs ~{dense_bytes(spec['T'], d, V, spec['mode']) / 2 ** 30:.1f}"
                             f" GB of T x V buffers, over the {cap / 2 ** 30:.1f} GB allowed")
    mem = measure_memory(spec["method"], inp, spec["device"])
    print(json.dumps({k: v for k, v in mem.items() if k != "update"}))
    return 0


def _print_row(r: Dict[str, Any]) -> None:
    if "error" in r:
        print(f"    {r['method']:<22} FAILED: {r['error'].splitlines()[-1][:150]}", flush=True)
        return
    pair = f"  pair {r['pair_ms']:.2f} ms ({r['pair_gflops']:.1f} GFLOP/s)" if "pair_ms" in r else ""
    print(f"    {r['method']:<22} {r['median_ms']:10.2f} ms [{r['min_ms']:.2f}, {r['max_ms']:.2f}] n={r['reps']:<2} "
          f"it={r['iterations']:>2}  err={r['rel_error']:.1e}  mem=+{r['extra_mem_mb']:.1f} MB"
          f"{' (RSS +%.0f)' % r['rss_extra_mb'] if 'rss_extra_mb' in r else ''}  ran={r['ran']}{pair}",
          flush=True)


def _reference_ok(cfg: Dict[str, Any], case: Case) -> bool:
    model, T, mode, _ = case
    d, V = MODELS[model]
    P = d if mode == "hidden" else d + V
    return (T <= cfg["reference_max_T"] and P <= cfg["reference_max_P"]
            and reference_bytes(T, d, V, mode) <= REFERENCE_MAX_BYTES)


def run(preset: str, device: str, out: Optional[pathlib.Path] = None, reps: Optional[int] = None,
        threads: int = 0, budget_s: Optional[float] = None, sections: Tuple[str, ...] = ("cases", "solvers", "batched"),
        solver_T: Optional[List[int]] = None) -> Dict[str, Any]:
    """Run a preset on ``device``; returns the result dict and (``out``) writes JSON/markdown/PNG.

    Args:
        preset: a key of :data:`PRESETS`.
        device: "cpu" or "cuda".
        out: directory for the files, or None.
        reps: timed repeats per row (default: the preset's; rows stop earlier, at >= 3,
            once their time budget is spent).
        threads: > 0 sets torch's CPU thread count (also in the per-row subprocesses).
        budget_s: wall-clock budget (default: the preset's); cases/sections not started
            before it runs out are listed under ``skipped``.
        sections: which of "cases", "solvers", "batched" to run.
        solver_T: T values of the dual-vs-CG sweep (default: the preset's).
    """
    cfg = PRESETS[preset]
    if threads > 0:
        torch.set_num_threads(threads)
    reps = reps or cfg["reps"]
    budget = cfg["budget_s"] if budget_s is None else budget_s
    clock = common.Stopwatch()
    methods = [m for m in methods_for(device) if m in cfg.get("methods", methods_for(device))]
    if device == "cuda":
        name = torch.cuda.get_device_name()
        peaks = next((v for k, v in GPU_PEAK_TFLOPS.items() if k in name), None)
        peak_note = (f"% peak: of the data-sheet dense peak of {name} ({peaks} TFLOP/s)" if peaks
                     else f"unknown GPU {name}: no % of peak")
        cpu_peak = None
    else:
        name = common.cpu_name()
        cpu_peak = _cpu_peak_gflops()
        peaks = {dt: cpu_peak / 1000.0 for dt in ("float32", "bfloat16")}
        peak_note = (f"% peak: of a 2048^3 fp32 matmul at {torch.get_num_threads()} thread(s), best of 5, measured "
                     f"at the start of this run: {cpu_peak:.1f} GFLOP/s")
    print(f"bench_update preset={preset} device={device} ({name}) threads={torch.get_num_threads()} "
          f"methods={methods} budget={budget:.0f}s", flush=True)
    if cpu_peak is not None:
        print(f"  CPU peak (2048^3 fp32 matmul, best of 5): {cpu_peak:.1f} GFLOP/s", flush=True)
    env = common.versions()
    result: Dict[str, Any] = dict(
        preset=preset, device=device, device_name=name, cores=os.cpu_count(), torch_threads=torch.get_num_threads(),
        **{k: env[k] for k in ("torch", "triton", "python", "cuda")}, compiled_cg=compiled_cg_available(), triton_backend=triton_usable(device),
        commit=common.commit(), date=common.utc_now(),
        settings=dict(max_iter=MAX_ITER, tol=TOL, damping=DAMPING, beta=BETA, reward=REWARD, lora_scale=LORA_SCALE,
                      reps=reps, row_budget_s=cfg["row_budget_s"]),
        methods=methods, peak_note=peak_note, cpu_peak_gflops=cpu_peak,
        mem_note=("CUDA max_memory_allocated during a warm call minus allocated before it (inputs and W excluded)"
                  if device == "cuda" else
                  "extra MB = peak of torch CPU tensor allocations during one call (torch.profiler profile_memory, "
                  "alloc/free events replayed in order; inputs excluded); RSS MB = growth of the process's peak RSS "
                  "(VmHWM after clear_refs) during the first call" + (", each row in a fresh subprocess"
                                                                       if cfg["subprocess_memory"] else
                                                                       ", in-process (rows can reuse freed memory)")),
        error_note="||update - exact|| / ||exact||, exact = float64 dual solve of the same (dtype-rounded) inputs; "
                   "`reference` rows show the float64 torch.func reference against the same exact update",
        rows=[], solvers=[], batched=[], targets=[], skipped=[], wall_s=0.0)

    def save(final: bool = False) -> None:
        result["wall_s"] = round(clock.elapsed_s(), 1)
        update_report.add_speedups(result["rows"])
        for r in result["rows"]:
            if "pair_gflops" in r and peaks:
                r["pair_pct_of_peak"] = 100.0 * r["pair_gflops"] / (1000.0 * peaks[r["dtype"]])
        result["targets"] = update_report.check_targets(result["rows"], device, name)
        if out is not None:
            update_report.write(result, out, plot=final)

    def run_cases(cases: List[Case], start_k: int, total: int) -> None:
        for k, case in enumerate(cases, start_k):
            model, T, mode, dtype = case
            if clock.elapsed_s() > budget:
                result["skipped"].append(f"{model} T={T} {mode} {dtype}")
                continue
            d, V = MODELS[model]
            print(f"[{k}/{total}] {model} d={d} V={V} T={T} {mode} {dtype}  "
                  f"(t={clock.elapsed_s():.0f}s)", flush=True)
            todo = [m for m in methods if (m != REFERENCE or _reference_ok(cfg, case))
                    and (m != BASELINE or T * d * V <= cfg.get("baseline_max_tdv", float("inf")))]
            errors: Dict[str, str] = {}

            def fail(method: str, e: BaseException) -> None:
                errors[method] = f"{type(e).__name__}: {e}"
            try:
                truth = truth_update(make_inputs(d, V, T, mode, getattr(torch, dtype), device)).cpu()
            except Exception as e:  # noqa: BLE001 -- e.g. out of memory in fp64: report, go on
                for method in todo:
                    fail(method, RuntimeError(f"fp64 truth failed: {type(e).__name__}: {e}"))
                todo = []
                if device == "cuda":
                    torch.cuda.empty_cache()

            memory: Dict[str, Dict[str, Any]] = {}
            if cfg["subprocess_memory"]:
                for method in todo:
                    spec = dict(method=method, model=model, T=T, mode=mode, dtype=dtype, device=device,
                                threads=threads, dense_cap_gb=cfg.get("dense_cap_gb"))
                    try:
                        memory[method] = _memory_in_subprocess(spec)
                        print(f"    memory {method:<22} +{memory[method]['extra_mem_mb']:.1f} MB "
                              f"(RSS +{memory[method]['rss_extra_mb']:.0f})", flush=True)
                    except Exception as e:  # noqa: BLE001
                        fail(method, e)
                todo = [m for m in todo if m not in errors]
            rows: List[Dict[str, Any]] = []
            if todo:
                try:
                    rows = measure_case(todo, model, T, mode, dtype, device, reps, truth, cfg["row_budget_s"],
                                        memory=memory, on_error=fail, verbose=True,
                                        dense_cap_gb=cfg.get("dense_cap_gb"))
                except Exception as e:  # noqa: BLE001 -- the case failed as a whole (e.g. making its inputs)
                    for method in todo:
                        fail(method, e)
            for method in methods:
                row = next((r for r in rows if r["method"] == method), None)
                if row is None and method in errors:
                    row = dict(method=method, model=model, d=d, V=V, T=T, mode=mode, dtype=dtype, device=device,
                               error=errors[method])
                if row is not None:
                    result["rows"].append(row)
                    _print_row(row)
            save()

    total = len(cfg["cases"]) + len(cfg["late_cases"])
    if "cases" in sections:
        run_cases(cfg["cases"], 1, total)
    for sec in ("solvers", "batched"):
        if sec not in sections:
            continue
        if not cfg.get(sec):
            continue
        if clock.elapsed_s() > budget:
            result["skipped"].append(f"section {sec}")
            continue
        s = cfg[sec]
        print(f"{'dual vs CG by T' if sec == 'solvers' else 'batched vs separate calls'} "
              f"({s['model']}, {s['dtype']}; t={clock.elapsed_s():.0f}s)", flush=True)
        try:
            if sec == "solvers":
                result["solvers"] = solver_sweep(device, s["model"], s["dtype"], solver_T or s["T"], ["lora", "hidden"],
                                                 max(3, reps // 2), budget_s=cfg["row_budget_s"])
            else:
                result["batched"] = batched_sweep(device, s["model"], s["dtype"], s["B"], s["T"], ["lora", "hidden"],
                                                  max(3, reps // 2), budget_s=cfg["row_budget_s"])
        except Exception as e:
            result[f"{sec}_error"] = f"{type(e).__name__}: {e}"
            print(f"  {sec} FAILED: {e}", flush=True)
        save()
    if "cases" in sections:
        run_cases(cfg["late_cases"], len(cfg["cases"]) + 1, total)
    save(final=True)
    print()
    print(update_report.markdown(result))
    if out is not None:
        print(f"\nwrote {', '.join(str(p) for p in sorted(out.glob(update_report.stem(result) + '.*')))}")
    return result


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    if argv[:1] == ["--one"]:
        return _child(argv[1])
    p = argparse.ArgumentParser(prog="python benchmarks/bench_update.py", description=__doc__.splitlines()[0])
    p.add_argument("--preset", choices=sorted(PRESETS), default="cpu")
    p.add_argument("--device", default=None, help="cpu or cuda (default: cuda if available)")
    p.add_argument("--reps", type=int, default=None, help="timed repeats per row (default: the preset's)")
    p.add_argument("--out", type=pathlib.Path, default=None, help="directory for JSON/markdown/PNG")
    p.add_argument("--threads", type=int, default=0, help="torch CPU threads (0: torch's default)")
    p.add_argument("--budget-s", type=float, default=None, help="wall-clock budget in seconds (default: preset's)")
    p.add_argument("--sections", default="cases,solvers,batched", help="comma list of cases,solvers,batched")
    p.add_argument("--solver-T", default=None, help="comma list of T for the dual-vs-CG sweep (default: preset's)")
    a = p.parse_args(argv)
    device = a.device or ("cuda" if torch.cuda.is_available() else "cpu")
    run(a.preset, device, a.out, a.reps, a.threads, a.budget_s, tuple(a.sections.split(",")),
        [int(t) for t in a.solver_T.split(",")] if a.solver_T else None)
    return 0


if __name__ == "__main__":
    sys.exit(main())
