"""Triton kernel benchmark on a GPU (issue 4): one command,

    python benchmarks/bench_kernels_gpu.py --out benchmarks/results/

Qwen2.5-0.5B head (d=896, V=151936), T in {64, 256, 1024, 4096}, bf16 and fp32:
milliseconds of the stats pass, one JVP+VJP pair and a whole rosa_update (solver
cg and dual), Triton beside the chunked torch backend; TFLOP/s of the pair and its
share of the 4*T*d*V roofline at the data-sheet dense peak (H100/H200 SXM: 989
TFLOP/s bf16; 67 TFLOP/s fp32 without TF32, which the fp32 kernels use for
exactness); extra memory (torch.cuda.max_memory_allocated over the inputs).
Targets (issue 4): pair < 1.2 ms at T=1024 bf16 (within 1.5x of the roofline),
extra memory < 64 MB. Writes JSON with device, versions, commit and date.
"""
from __future__ import annotations

import argparse
import datetime
import json
import pathlib
import statistics
import subprocess
import sys

import torch

PEAK = {"bfloat16": 989e12, "float32": 67e12}


def _ms(fn, reps=20):
    for _ in range(3):
        fn()
    torch.cuda.synchronize()
    out = []
    for _ in range(reps):
        a, b = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        a.record()
        fn()
        b.record()
        torch.cuda.synchronize()
        out.append(a.elapsed_time(b))
    return statistics.median(out)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, nargs="+", default=[64, 256, 1024, 4096])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--out", type=pathlib.Path, default=None)
    args = ap.parse_args(argv)
    if not torch.cuda.is_available():
        print("bench_kernels_gpu: needs a CUDA device", file=sys.stderr)
        return 2
    import triton

    from rosa_ext import rosa_update
    from rosa_ext._problem import build_problem
    from rosa_ext.backends import get_backend
    from rosa_ext.jacobian import RosaOperator

    d, V = 896, 151936
    rows = []
    for dtype in args.dtypes:
        dt = getattr(torch, dtype)
        W = (torch.randn(V, d, device="cuda") * (4.0 / d ** 0.5)).to(dt)
        for T in args.T:
            for mode in ("lora", "hidden"):
                h = torch.randn(T, d, device="cuda").to(dt)
                y = torch.randint(0, V, (T,), device="cuda")
                a = torch.randn(d, device="cuda") / d ** 0.5
                b = torch.randn(V, device="cuda") * 0.01 if mode == "lora" else None
                for backend in ("triton", "torch"):
                    prob = build_problem(h, W, y, -1.0, mode=mode, lora_a=a, lora_b=b, lora_scale=8.0, bias=None,
                                         beta=1.0, damping=0.1, max_iter=16, tol=1e-5, solver="cg",
                                         backend=backend, mask=None)
                    be = get_backend(backend, prob.device)
                    torch.cuda.synchronize()
                    torch.cuda.reset_peak_memory_stats()
                    base = torch.cuda.memory_allocated()
                    op = RosaOperator(prob, be)
                    v = torch.randn(1, prob.num_params, device="cuda")
                    op.vjp(op.jvp(v))
                    torch.cuda.synchronize()
                    extra_mb = (torch.cuda.max_memory_allocated() - base) / 2 ** 20
                    t_stats = _ms(lambda: be.stats(prob))
                    t_pair = _ms(lambda: op.vjp(op.jvp(v)))
                    kw = dict(mode=mode, lora_a=a, lora_b=b, damping=0.1, backend=backend)
                    t_cg = _ms(lambda: rosa_update(h, W, y, -1.0, solver="cg", **kw).update, reps=5)
                    t_dual = _ms(lambda: rosa_update(h, W, y, -1.0, solver="dual", **kw).update, reps=5) \
                        if T <= 4096 else float("nan")
                    flops = 4.0 * T * d * V
                    row = dict(T=T, mode=mode, dtype=dtype, backend=backend, stats_ms=t_stats, pair_ms=t_pair,
                               pair_tflops=flops / (t_pair * 1e-3) / 1e12,
                               pair_pct_roofline=100 * flops / (t_pair * 1e-3) / PEAK[dtype],
                               update_cg_ms=t_cg, update_dual_ms=t_dual, pair_extra_mem_mb=extra_mb)
                    rows.append(row)
                    print(f"{dtype:>8} T={T:>5} {mode:>6} {backend:>6}: stats {t_stats:7.3f} ms  pair {t_pair:7.3f} ms "
                          f"({row['pair_tflops']:6.1f} TFLOP/s, {row['pair_pct_roofline']:5.1f}% roof)  "
                          f"update cg {t_cg:7.2f} ms dual {t_dual:7.2f} ms  +{extra_mb:.1f} MB", flush=True)
    try:
        commit = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True).strip()
    except Exception:
        commit = "unknown"
    result = dict(benchmark="kernels_gpu", device=torch.cuda.get_device_name(), torch=torch.__version__,
                  triton=triton.__version__, commit=commit, d=d, V=V,
                  date=datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"), rows=rows)
    if args.out is not None:
        args.out.mkdir(parents=True, exist_ok=True)
        path = args.out / f"gpu_kernels_{datetime.date.today().isoformat()}.json"
        path.write_text(json.dumps(result, indent=1))
        print(f"wrote {path}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
