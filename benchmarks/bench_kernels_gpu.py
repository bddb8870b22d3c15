"""Triton kernel benchmark on a GPU: one command,

    python benchmarks/bench_kernels_gpu.py --out benchmarks/results/

Qwen2.5-0.5B head (d=896, V=151936), T in {64, 256, 1024, 4096}, bf16 and fp32, modes
lora and hidden: milliseconds of the stats pass, one JVP+VJP pair and a whole
rosa_update (solver cg and dual), Triton beside the chunked torch backend; TFLOP/s of
the pair and its share of the 4*T*d*V roofline at the data-sheet dense peak (H100 SXM:
989 TFLOP/s bf16; fp32: 67 TFLOP/s with the default exact input_precision="ieee",
494.7 TFLOP/s TF32 with ``--fp32-precision tf32x3`` or ``tf32``); extra memory over the inputs
(torch.cuda.max_memory_allocated) of the pair and of the whole update; the relative
difference of the Triton and torch cg updates (a correctness check at full size).

Cases run most important first (bf16 T=1024, the target) and the JSON is rewritten after
every case, so ``--budget-s`` (stop starting new cases) or a killed run still leaves the
finished rows. The first call of each (T, dtype) includes Triton's autotuning (compiles
every config of rosa_ext/kernels/_tiles.py): that is done in a warm-up, never timed.
Targets: pair < 1.2 ms at T=1024 bf16, extra memory < 64 MB.
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import pathlib
import statistics
import sys

import common
import torch

#: Dense data-sheet peaks used for the roofline share (H100 SXM; H200 has the same compute).
#: fp32 depends on the kernels' fp32 dot precision (--fp32-precision): "ieee" runs on the FP32
#: cores (67 TFLOP/s); "tf32" / "tf32x3" on the TF32 tensor cores (494.7 TFLOP/s dense; tf32x3
#: does three TF32 products per fp32 one, so its best case is a third of that share).
PEAK = {"bfloat16": 989e12, "float16": 989e12, "float32": 67e12}
PEAK_FP32 = {"ieee": 67e12, "tf32": 494.7e12, "tf32x3": 494.7e12}
D_MODEL, VOCAB = 896, 151936
PRIORITY = [("bfloat16", 1024), ("bfloat16", 256), ("bfloat16", 4096), ("bfloat16", 64),
            ("float32", 1024), ("float32", 256), ("float32", 64), ("float32", 4096)]


def _ms(fn, min_reps=5, max_reps=50, budget_s=0.5):
    """Median milliseconds of ``fn`` (CUDA events), after 2 warm-up calls."""
    return statistics.median(common.cuda_times_ms(fn, max_reps, min_reps=min_reps, budget_s=budget_s, warmup=2))


def _extra_mb(fn) -> float:
    """Peak allocation of ``fn`` above what was allocated before it, MiB."""
    torch.cuda.synchronize()
    torch.cuda.reset_peak_memory_stats()
    base = torch.cuda.memory_allocated()
    fn()
    torch.cuda.synchronize()
    return (torch.cuda.max_memory_allocated() - base) / 2 ** 20


def _best_configs() -> dict:
    """The autotuner's pick per kernel (last key tuned), for the record."""
    out = {}
    try:
        import rosa_ext.kernels as K
        mods = [getattr(K, n, None) for n in ("stats_pass", "reductions", "matvec")]
        for mod in mods:
            if mod is None:
                continue
            for name in dir(mod):
                fn = getattr(mod, name)
                cfg = getattr(fn, "best_config", None)
                if cfg is not None:
                    out[f"{mod.__name__.rsplit('.', 1)[-1]}.{name}"] = str(cfg)
    except Exception as e:  # never fail the benchmark over bookkeeping
        out["error"] = repr(e)
    return out


def run_case(dtype: str, T: int, mode: str, backend: str, W: torch.Tensor, inputs: dict, ref_update=None):
    from rosa_ext import rosa_update
    from rosa_ext.backends import get_backend
    from rosa_ext.core.operator import RosaOperator
    from rosa_ext.core.problem import build_problem

    h, y, a, b = inputs["h"], inputs["y"], inputs["a"], inputs["b"]
    from rosa_ext.common import defaults
    prob = build_problem(h, W, y, -1.0, mode=mode, lora_a=a, lora_b=b, lora_scale=defaults.LORA_SCALE, bias=None,
                         beta=defaults.BETA, damping=defaults.DAMPING, max_iter=defaults.MAX_ITER, tol=defaults.TOL,
                         solver="cg", backend=backend, mask=None)
    be = get_backend(backend, prob.device)
    warm_clock = common.Stopwatch()
    op = RosaOperator(prob, be)  # warm-up: autotunes the stats kernel on the first call per shape
    v = torch.randn(1, prob.num_params, device="cuda")
    op.vjp(op.jvp(v))  # warm-up: autotunes the row / column kernels
    torch.cuda.synchronize()
    warm_s = warm_clock.elapsed_s()
    pair_mb = _extra_mb(lambda: op.vjp(op.jvp(v)))
    t_stats = _ms(lambda: be.stats(prob))
    t_pair = _ms(lambda: op.vjp(op.jvp(v)))
    op = None  # free the operator's cache before the next measurements
    kw = dict(mode=mode, lora_a=a, lora_b=b, damping=0.1, backend=backend, max_iter=16, tol=1e-5)
    res = {}
    upd_mb = _extra_mb(lambda: res.setdefault("cg", rosa_update(h, W, y, -1.0, solver="cg", **kw)))
    t_cg = _ms(lambda: rosa_update(h, W, y, -1.0, solver="cg", **kw), min_reps=3, max_reps=10)
    try:
        t_dual = _ms(lambda: rosa_update(h, W, y, -1.0, solver="dual", **kw), min_reps=3, max_reps=10)
    except Exception as e:  # e.g. out of memory for a large T; keep the row
        print(f"  dual failed: {e!r}", flush=True)
        t_dual = float("nan")
    upd = res["cg"].update.float()
    rel = float("nan") if ref_update is None else float((upd - ref_update).norm() / ref_update.norm().clamp_min(1e-30))
    flops = 4.0 * T * D_MODEL * VOCAB
    return dict(T=T, mode=mode, dtype=dtype, backend=backend, stats_ms=t_stats, pair_ms=t_pair,
                pair_tflops=flops / (t_pair * 1e-3) / 1e12,
                pair_pct_roofline=100 * flops / (t_pair * 1e-3) / PEAK[dtype],
                update_cg_ms=t_cg, update_dual_ms=t_dual, cg_iterations=getattr(res["cg"], "iterations", None),
                pair_extra_mem_mb=pair_mb, update_extra_mem_mb=upd_mb, warmup_s=warm_s,
                rel_diff_vs_torch_cg=rel), upd


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, nargs="+", default=[64, 256, 1024, 4096])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--modes", nargs="+", default=["lora", "hidden"])
    ap.add_argument("--backends", nargs="+", default=["triton", "torch"])
    ap.add_argument("--budget-s", type=float, default=float("inf"),
                    help="stop starting new (dtype, T) cases after this many seconds")
    ap.add_argument("--fp32-precision", choices=["ieee", "tf32x3", "tf32"], default="ieee",
                    help="tl.dot input_precision of the fp32 kernels (rosa_ext.kernels.set_fp32_precision)")
    ap.add_argument("--out", type=pathlib.Path, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels_gpu: needs a CUDA device", file=sys.stderr)
        return 2
    import rosa_ext.kernels as K
    K.set_fp32_precision(args.fp32_precision)
    PEAK["float32"] = PEAK_FP32[args.fp32_precision]
    order = [c for c in PRIORITY if c[0] in args.dtypes and c[1] in args.T]
    order += [(dt, T) for dt in args.dtypes for T in args.T if (dt, T) not in order]
    backends = sorted(args.backends, key=lambda b: b != "torch")  # torch first: its update is the reference
    env = common.versions()
    result = dict(benchmark="kernels_gpu", device=env["gpu"], torch=env["torch"],
                  triton=env["triton"], cuda=env["cuda"], commit=common.commit(), d=D_MODEL, V=VOCAB,
                  peak_flops=PEAK, fp32_precision=args.fp32_precision, date=common.utc_now(),
                  rows=[], skipped=[])
    path = None
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"gpu_kernels_{datetime.date.today().isoformat()}.json"

    def dump():
        result["best_configs"] = _best_configs()
        if path is not None:
            path.write_text(json.dumps(result, indent=1))

    clock = common.Stopwatch()
    weights = {}
    for dtype, T in order:
        if clock.elapsed_s() > args.budget_s:
            result["skipped"].append(dict(dtype=dtype, T=T, reason="budget"))
            continue
        dt = getattr(torch, dtype)
        if dtype not in weights:
            weights.clear()
            torch.cuda.empty_cache()
            g = torch.Generator(device="cuda").manual_seed(0)
            weights[dtype] = (torch.randn(VOCAB, D_MODEL, device="cuda", generator=g) * (4.0 / D_MODEL ** 0.5)).to(dt)
        W = weights[dtype]
        g = torch.Generator(device="cuda").manual_seed(T)
        for mode in args.modes:
            inputs = dict(h=torch.randn(T, D_MODEL, device="cuda", generator=g).to(dt),
                          y=torch.randint(0, VOCAB, (T,), device="cuda", generator=g),
                          a=torch.randn(D_MODEL, device="cuda", generator=g) / D_MODEL ** 0.5,
                          b=torch.randn(VOCAB, device="cuda", generator=g) * 0.01 if mode == "lora" else None)
            ref = None
            for backend in backends:
                try:
                    row, upd = run_case(dtype, T, mode, backend, W, inputs, ref)
                except Exception as e:
                    print(f"{dtype:>8} T={T:>5} {mode:>6} {backend:>6}: FAILED {e!r}", flush=True)
                    result["rows"].append(dict(T=T, mode=mode, dtype=dtype, backend=backend, error=repr(e)))
                    dump()
                    continue
                if backend == "torch":
                    ref = upd
                result["rows"].append(row)
                dump()
                print(f"{dtype:>8} T={T:>5} {mode:>6} {backend:>6}: stats {row['stats_ms']:8.3f} ms  pair "
                      f"{row['pair_ms']:8.3f} ms ({row['pair_tflops']:6.1f} TFLOP/s, {row['pair_pct_roofline']:5.1f}% "
                      f"roof)  update cg {row['update_cg_ms']:8.2f} dual {row['update_dual_ms']:8.2f} ms  "
                      f"+{row['pair_extra_mem_mb']:.1f}/{row['update_extra_mem_mb']:.1f} MB  "
                      f"rel.diff {row['rel_diff_vs_torch_cg']:.1e}  (warm-up {row['warmup_s']:.1f} s)", flush=True)
    target = [r for r in result["rows"] if r.get("backend") == "triton" and r.get("T") == 1024
              and r.get("dtype") == "bfloat16" and "pair_ms" in r]
    for r in target:
        ok = r["pair_ms"] < 1.2 and r["pair_extra_mem_mb"] < 64
        print(f"target ({r['mode']}): pair {r['pair_ms']:.3f} ms (< 1.2), +{r['pair_extra_mem_mb']:.1f} MB (< 64): "
              f"{'MET' if ok else 'NOT MET'}")
        result.setdefault("target_met", {})[r["mode"]] = ok
    result["wall_s"] = clock.elapsed_s()
    dump()
    if path is not None:
        print(f"wrote {path}")
    return 0 if all(not math.isnan(r.get("pair_ms", 0.0)) for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
