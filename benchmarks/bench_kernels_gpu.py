"""Triton kernel benchmark on a GPU: one command,

    python benchmarks/bench_kernels_gpu.py --out benchmarks/results/

Qwen2.5-0.5B head (d=896, V=151936). Sections (``--sections``, run in this order; the JSON
holds one list per section):

- ``splits``: the stats and row passes (bf16 and fp32, T in {64, 256, 1024, 4096}) with the
  vocabulary split count the launch grid picks from the tuned BLOCK_T and the SM count, against
  forced counts: the earlier fixed plan (64-token tiles, 264 programs), 1, half and double.
- ``early_exit``: ``rosa_update(solver="cg", max_iter=16)`` on a problem whose CG converges
  before 16 iterations, with the Triton passes' early exit (the run flag of
  ``rosa_ext.common.device_flag``) on and off, and with ``max_iter`` = the iterations it needed
  (the floor); bf16 and fp32, T=1024, both modes. Needs the compiled CUDA CG (``rosa_ext._C``).
- ``precision``: fp32 with the kernels' dot precision "ieee", "tf32x3" (the default) and "tf32":
  ms of the stats pass and of one row + fused column pass, and their error against float64
  (lse over the whole vocabulary, the column pass on 4096 vocabulary columns).
- ``cases``: T in {64, 256, 1024, 4096}, bf16 and fp32, modes lora and hidden: milliseconds of
  the stats pass, one JVP+VJP pair and a whole rosa_update (solver cg and dual), Triton beside
  the chunked torch backend; TFLOP/s of the pair and its share of the 4*T*d*V roofline at the
  data-sheet dense peak (H100 SXM: 989 TFLOP/s bf16; fp32: 494.7 TFLOP/s TF32 with the default
  ``--fp32-precision tf32x3`` or ``tf32``, 67 TFLOP/s with "ieee"); extra memory over the inputs
  (torch.cuda.max_memory_allocated) of the pair and of the whole update; the relative
  difference of the Triton and torch cg updates (a correctness check at full size).

Cases run most important first (bf16 T=1024, the target) and the JSON is rewritten after
every row, so ``--budget-s`` (stop starting new rows, across all sections) or a killed run
still leaves the finished rows. The first call of each (T, dtype) includes Triton's autotuning (compiles
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
from types import SimpleNamespace

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
    from rosa_ext.backends import engine_for
    from rosa_ext.common import jacobian as J
    from rosa_ext.core.op import pack

    h, y, b = inputs["h"], inputs["y"], inputs["b"]
    a = inputs["a"] if mode == "lora" else None  # hidden rows: the default call, no LoRA term in the logits
    prob, cfg = pack(h, W, y, -1.0, mode=mode, lora_a=a, lora_b=b, damping=0.1, damping_mode="absolute",
                     solver="cg", backend=backend)
    be = engine_for(backend, prob.weight.device)
    warm_clock = common.Stopwatch()
    lin = J.Linearization.at(prob, be.stats(prob), mode, be)  # warm-up: autotunes the stats kernel per shape
    op = SimpleNamespace(jvp=lambda v: J.jvp(lin, be, v), vjp=lambda u: J.vjp(lin, be, u))
    v = torch.randn(1, prob.hidden_size + (prob.vocab_size if mode == "lora" else 0), device="cuda")
    op.vjp(op.jvp(v))  # warm-up: autotunes the row / column kernels
    torch.cuda.synchronize()
    warm_s = warm_clock.elapsed_s()
    pair_mb = _extra_mb(lambda: op.vjp(op.jvp(v)))
    t_stats = _ms(lambda: be.stats(prob))
    t_pair = _ms(lambda: op.vjp(op.jvp(v)))
    op = None  # free the operator's cache before the next measurements
    kw = dict(mode=mode, lora_a=a, lora_b=b, damping=0.1, damping_mode="absolute", backend=backend, max_iter=16, tol=1e-5)
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


def _qwen_inputs(W: torch.Tensor, T: int, seed: int, lora: bool = True) -> dict:
    g = torch.Generator(device="cuda").manual_seed(seed)
    return dict(h=torch.randn(T, D_MODEL, device="cuda", generator=g).to(W.dtype),
                y=torch.randint(0, VOCAB, (T,), device="cuda", generator=g),
                a=torch.randn(D_MODEL, device="cuda", generator=g) / D_MODEL ** 0.5,
                b=torch.randn(VOCAB, device="cuda", generator=g) * 0.01 if lora else None)


def _over(args, clock, result, what: dict) -> bool:
    if clock.elapsed_s() > args.budget_s:
        result["skipped"].append(dict(what, reason="budget"))
        return True
    return False


def section_splits(weight, args, result, clock, dump) -> None:
    """Stats and row passes: the split count picked in the launch grid against forced ones."""
    import rosa_ext.kernels as K
    from rosa_ext.kernels import _tiles
    from rosa_ext.kernels import reductions as R
    from rosa_ext.kernels import stats_pass as S

    sms = _tiles.sm_count(torch.device("cuda"))
    for dtype in args.dtypes:
        W = weight(dtype)
        for T in args.T:
            if _over(args, clock, result, dict(section="splits", dtype=dtype, T=T)):
                continue
            inp = _qwen_inputs(W, T, seed=T)
            h = inp["h"]
            seg = torch.zeros(T, dtype=torch.int32, device="cuda")
            lse = K.stats(h, W, inp["y"]).lse
            u = torch.randn(1, VOCAB, device="cuda")
            S.stats_partials(h, W, seg)  # tunes
            R.row_reduce(h, W, seg, lse, u)
            torch.cuda.synchronize()
            picks = {}
            for kern, tag in ((S._stats_kernel, "stats"), (R._row_kernel, "row")):
                bt = kern.best_config.kwargs["BLOCK_T"]
                picks[tag] = (bt, _tiles.split_plan(T, VOCAB, bt, sms)[0])
            old = _tiles.forced_splits(-(-264 // -(-T // 64)), VOCAB)
            row = dict(dtype=dtype, T=T, sm_count=sms, stats_block_t=picks["stats"][0], stats_splits=picks["stats"][1],
                       row_block_t=picks["row"][0], row_splits=picks["row"][1], old_plan_splits=old)
            for tag, n in (("auto", None), ("old_plan", old), ("one", 1), ("half", max(1, picks["row"][1] // 2)),
                           ("double", 2 * picks["row"][1])):
                row[f"stats_ms_{tag}"] = _ms(lambda n=n: S.stats_partials(h, W, seg, splits=n))
                row[f"row_ms_{tag}"] = _ms(lambda n=n: R.row_reduce(h, W, seg, lse, u, splits=n))
            result["splits"].append(row)
            dump()
            print(f"splits {dtype:>8} T={T:>5}: picked {picks['row'][1]:>3} (BLOCK_T {picks['row'][0]}) stats "
                  f"{row['stats_ms_auto']:.3f} ms / old plan ({old}) {row['stats_ms_old_plan']:.3f} ms; row "
                  f"{row['row_ms_auto']:.3f} / {row['row_ms_old_plan']:.3f} ms; one split {row['row_ms_one']:.3f}, "
                  f"half {row['row_ms_half']:.3f}, double {row['row_ms_double']:.3f}", flush=True)


def section_early_exit(weight, args, result, clock, dump) -> None:
    """CG with max_iter=16 converging early: the Triton passes' early exit on and off."""
    from rosa_ext import rosa_update
    from rosa_ext.common import device_flag
    try:
        from rosa_ext import _C
    except ImportError as e:  # not built (benchmarks/run_gpu.sh goes on without it)
        result["early_exit"].append(dict(error=f"rosa_ext._C is not built ({e}): no compiled CG, no run flag"))
        return
    if not _C.has_cuda():
        result["early_exit"].append(dict(error="rosa_ext._C was built without CUDA: no compiled CG, no run flag"))
        return
    T = 1024 if 1024 in args.T else max(args.T)
    for dtype in args.dtypes:
        W = weight(dtype)
        for mode in args.modes:
            if _over(args, clock, result, dict(section="early_exit", dtype=dtype, mode=mode)):
                continue
            inp = _qwen_inputs(W, T, seed=7, lora=mode == "lora")
            base = dict(mode=mode, lora_a=inp["a"] if mode == "lora" else None, lora_b=inp["b"], solver="cg",
                        backend="triton", damping=0.1, damping_mode="absolute")
            tol, it = 1e-3, None
            for tol in (1e-3, 1e-2, 1e-1):  # a tolerance CG reaches well before 16 iterations
                it = rosa_update(inp["h"], W, inp["y"], -1.0, max_iter=64, tol=tol, **base).iterations
                if it <= 8:
                    break
            kw = dict(base, tol=tol)

            def run(max_iter, kw=kw, inp=inp, W=W):
                return rosa_update(inp["h"], W, inp["y"], -1.0, max_iter=max_iter, **kw)

            row = dict(dtype=dtype, T=T, mode=mode, tol=tol, iterations=it)
            row["cg16_early_exit_ms"] = _ms(lambda: run(16), min_reps=3, max_reps=10)
            old = device_flag.set_enabled(False)
            try:
                row["cg16_no_early_exit_ms"] = _ms(lambda: run(16), min_reps=3, max_reps=10)
            finally:
                device_flag.set_enabled(old)
            row[f"cg{it}_ms"] = row["cg_floor_ms"] = _ms(lambda: run(max(1, it)), min_reps=3, max_reps=10)
            a, b = run(16).update, run(max(1, it)).update
            row["rel_diff_16_vs_floor"] = float((a - b).norm() / b.norm().clamp_min(1e-30))
            result["early_exit"].append(row)
            dump()
            print(f"early exit {dtype:>8} T={T} {mode:>6}: converged in {it} it (tol {tol:g}); max_iter 16: "
                  f"{row['cg16_early_exit_ms']:.2f} ms with early exit, {row['cg16_no_early_exit_ms']:.2f} ms without; "
                  f"max_iter {it}: {row['cg_floor_ms']:.2f} ms", flush=True)


def section_precision(weight, args, result, clock, dump) -> None:
    """fp32 kernels with each dot precision: speed and error against float64."""
    import rosa_ext.kernels as K

    if "float32" not in args.dtypes:
        return
    W = weight("float32")
    for T in [t for t in (256, 1024) if t in args.T] or args.T[:1]:
        inp = _qwen_inputs(W, T, seed=11)
        h, y = inp["h"], inp["y"]
        lora = dict(lora_a=inp["a"], lora_b=inp["b"])
        z64 = torch.empty(T, dtype=torch.float64, device="cuda")
        for i in range(0, T, 256):  # float64 lse in row blocks (T x V float64 would be 1.2 GB at T=1024)
            zz = h[i:i + 256].double() @ W.double().T + 8.0 * (h[i:i + 256].double() @ inp["a"].double())[:, None] \
                * inp["b"].double()
            z64[i:i + 256] = torch.logsumexp(zz, 1)
        w = torch.randn(T, device="cuda")
        cols = slice(0, 4096)
        zc = h.double() @ W[cols].double().T + 8.0 * (h.double() @ inp["a"].double())[:, None] * inp["b"][cols].double()
        col64 = w.double() @ torch.exp(zc - z64[:, None])
        for prec in ("ieee", "tf32x3", "tf32"):
            if _over(args, clock, result, dict(section="precision", T=T, precision=prec)):
                continue
            K.set_fp32_precision(prec)
            prob = K.prepare(h, W, y, **lora)
            st = K.stats(h, W, y, prob=prob)
            u = torch.randn(VOCAB, device="cuda")
            K.column_reduce(h, W, st.lse, w, prob=prob)
            K.row_reduce(h, W, st.lse, u, prob=prob)
            torch.cuda.synchronize()
            col = K.column_reduce(h, W, st.lse, w, prob=prob)[cols].double()
            row = dict(T=T, precision=prec, stats_ms=_ms(lambda prob=prob: K.stats(h, W, y, prob=prob)),
                       row_plus_column_ms=_ms(lambda prob=prob, st=st, u=u: (K.row_reduce(h, W, st.lse, u, prob=prob),
                                                                             K.column_reduce(h, W, st.lse, w, prob=prob))),
                       lse_max_abs_err=float((st.lse.double() - z64).abs().max()),
                       column_rel_err=float((col - col64).norm() / col64.norm()))
            result["precision"].append(row)
            dump()
            print(f"precision fp32 T={T:>5} {prec:>6}: stats {row['stats_ms']:.3f} ms, row+column "
                  f"{row['row_plus_column_ms']:.3f} ms; lse err {row['lse_max_abs_err']:.1e}, column rel. err "
                  f"{row['column_rel_err']:.1e}", flush=True)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, nargs="+", default=[64, 256, 1024, 4096])
    ap.add_argument("--dtypes", nargs="+", default=["bfloat16", "float32"])
    ap.add_argument("--modes", nargs="+", default=["lora", "hidden"])
    ap.add_argument("--backends", nargs="+", default=["triton", "torch"])
    ap.add_argument("--budget-s", type=float, default=float("inf"),
                    help="stop starting new (dtype, T) cases after this many seconds")
    ap.add_argument("--fp32-precision", choices=["ieee", "tf32x3", "tf32"], default="tf32x3",
                    help="tl.dot input_precision of the fp32 kernels in the cases section "
                         "(rosa_ext.kernels.set_fp32_precision; tf32x3 is the library's default)")
    ap.add_argument("--sections", default="splits,early_exit,precision,cases",
                    help="comma list of splits, early_exit, precision, cases (run in this order)")
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
                  sm_count=torch.cuda.get_device_properties(0).multi_processor_count,
                  peak_flops=PEAK, fp32_precision=args.fp32_precision, date=common.utc_now(),
                  rows=[], skipped=[], splits=[], early_exit=[], precision=[])
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

    def weight(dtype: str) -> torch.Tensor:
        if dtype not in weights:
            weights.clear()
            torch.cuda.empty_cache()
            g = torch.Generator(device="cuda").manual_seed(0)
            weights[dtype] = (torch.randn(VOCAB, D_MODEL, device="cuda", generator=g)
                              * (4.0 / D_MODEL ** 0.5)).to(getattr(torch, dtype))
        return weights[dtype]

    sections = [x.strip() for x in args.sections.split(",") if x.strip()]
    extra = dict(splits=section_splits, early_exit=section_early_exit, precision=section_precision)
    for name in sections:
        if name in extra:
            try:
                extra[name](weight, args, result, clock, dump)
            except Exception as e:  # keep going: the other sections still run
                print(f"section {name}: FAILED {e!r}", flush=True)
                result[name].append(dict(error=repr(e)))
            finally:
                K.set_fp32_precision(args.fp32_precision)
            dump()
    for dtype, T in (order if "cases" in sections else []):
        if clock.elapsed_s() > args.budget_s:
            result["skipped"].append(dict(dtype=dtype, T=T, reason="budget"))
            continue
        dt = getattr(torch, dtype)
        W = weight(dtype)
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
    failed = [r for sec in ("rows", "splits", "early_exit", "precision") for r in result[sec] if "error" in r]
    return 0 if not failed and all(not math.isnan(r.get("pair_ms", 0.0)) for r in result["rows"]) else 1


if __name__ == "__main__":
    sys.exit(main())
