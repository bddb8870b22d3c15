"""Reports of ``benchmarks/bench_update.py``: speedups, target checks, markdown, JSON and PNG."""
from __future__ import annotations

import json
import math
import pathlib
from typing import Any, Dict, List, Optional

from update_measure import BASELINE, DEFAULT, DENSE, REFERENCE

CASE_KEYS = ("model", "T", "mode", "dtype")


def _case(row: Dict[str, Any]) -> tuple:
    return tuple(row[k] for k in CASE_KEYS)


def add_speedups(rows: List[Dict[str, Any]]) -> None:
    """Per case: ``speedup_vs_torch_func`` and ``speedup_vs_dense`` = the peer's median / the row's median
    (absent where the peer did not run)."""
    for peer, key in ((BASELINE, "speedup_vs_torch_func"), (DENSE, "speedup_vs_dense")):
        base = {_case(r): r for r in rows if r["method"] == peer and "median_ms" in r}
        for r in rows:
            b = base.get(_case(r))
            if b is not None and "median_ms" in r:
                r[key] = b["median_ms"] / r["median_ms"]


def check_targets(rows: List[Dict[str, Any]], device: str, device_name: str) -> List[Dict[str, Any]]:
    """The performance targets, checked on the measured rows.

    CPU: the default path (solver="auto", backend="auto") >= 5x faster than the
    torch.func alternative at equal accuracy (its error <= max(2 x the alternative's
    error, 1e-5)), every case. GPU (H100): Qwen2.5-0.5B head, T=1024, bf16, each mode:
    whole update < 15 ms, < 64 MB extra memory, >= 100x faster than the alternative.
    """
    out = _dense_targets(rows, device)
    base = {_case(r): r for r in rows if r["method"] == BASELINE and "median_ms" in r}
    for r in rows:
        if r["method"] != DEFAULT or "median_ms" not in r or _case(r) not in base:
            continue
        b = base[_case(r)]
        case = f"{r['model']} T={r['T']} {r['mode']} {r['dtype']}"
        eq_acc = r["rel_error"] <= max(2 * b["rel_error"], 1e-5)
        if device == "cpu":
            out.append(dict(target="CPU default >= 5x torch.func at equal accuracy", case=case,
                            value=f"{r['speedup_vs_torch_func']:.1f}x, err {r['rel_error']:.1e} vs {b['rel_error']:.1e}",
                            met=bool(r["speedup_vs_torch_func"] >= 5 and eq_acc)))
        elif r["model"] == "qwen2.5-0.5b" and r["T"] == 1024 and r["dtype"] == "bfloat16":
            h100 = "H100" in device_name
            out.append(dict(target=f"GPU update < 15 ms{'' if h100 else ' (target is for H100)'}", case=case,
                            value=f"{r['median_ms']:.2f} ms", met=bool(r["median_ms"] < 15)))
            out.append(dict(target="GPU extra memory < 64 MB", case=case, value=f"{r['extra_mem_mb']:.1f} MB",
                            met=bool(r["extra_mem_mb"] < 64)))
            out.append(dict(target="GPU >= 100x torch.func at equal accuracy", case=case,
                            value=f"{r['speedup_vs_torch_func']:.0f}x, err {r['rel_error']:.1e} vs {b['rel_error']:.1e}",
                            met=bool(r["speedup_vs_torch_func"] >= 100 and eq_acc)))
    return out


#: The CPU targets against the dense peer: ours / dense time at most this, per mode, fp32.
DENSE_RATIO_TARGET = {"lora": 1.0, "hidden": 0.8}


def _dense_targets(rows: List[Dict[str, Any]], device: str) -> List[Dict[str, Any]]:
    """The default path against the dense solve: time ratio (ours / dense) within
    :data:`DENSE_RATIO_TARGET` and extra memory no larger, in every fp32 case where the dense
    solve ran; where it did not fit, the default path ran (with its extra memory)."""
    if device != "cpu":
        return []
    dense = {_case(r): r for r in rows if r["method"] == DENSE}
    out = []
    for r in rows:
        if r["method"] != DEFAULT or "median_ms" not in r or r["dtype"] != "float32" or _case(r) not in dense:
            continue
        d = dense[_case(r)]
        case = f"{r['model']} T={r['T']} {r['mode']} {r['dtype']}"
        if "median_ms" not in d:
            out.append(dict(target="default runs where the dense solve does not fit", case=case,
                            value=f"{r['median_ms']:.0f} ms, +{r['extra_mem_mb']:.0f} MB; dense: {d.get('error', '')[:60]}",
                            met=True))
            continue
        ratio = r["median_ms"] / d["median_ms"]
        lim = DENSE_RATIO_TARGET[r["mode"]]
        out.append(dict(target=f"CPU default / dense time <= {lim}", case=case, value=f"{ratio:.2f}",
                        met=bool(ratio <= lim)))
        out.append(dict(target="CPU default extra memory <= dense's", case=case,
                        value=f"{r['extra_mem_mb']:.1f} MB vs {d['extra_mem_mb']:.1f} MB",
                        met=bool(r["extra_mem_mb"] <= d["extra_mem_mb"])))
    return out


def _f(x: Optional[float], fmt: str) -> str:
    return "" if x is None or (isinstance(x, float) and math.isnan(x)) else format(x, fmt)


def markdown(result: Dict[str, Any]) -> str:
    """Everything in ``result`` as markdown tables (also what the terminal shows at the end)."""
    s = result["settings"]
    lines = [f"**Device** {result['device_name']} ({result['device']}; {result['cores']} cores, torch threads "
             f"{result['torch_threads']}) -- torch {result['torch']}, triton {result['triton']}, python "
             f"{result['python']}, compiled CG (_C): {result['compiled_cg']} -- commit {result['commit']} -- "
             f"{result['date']} -- preset `{result['preset']}`, wall {result['wall_s']} s.", "",
             f"Settings: damping {s['damping']}, beta {s['beta']}, reward {s['reward']}, CG max_iter {s['max_iter']}, "
             f"tol {s['tol']}, lora_scale {s['lora_scale']}; up to {s['reps']} timed repeats per row. "
             f"{result['peak_note']}. Memory: {result['mem_note']}. Error: {result['error_note']}.", "",
             "| model (d, V) | T | mode | dtype | method (ran) | median ms [min, max] | n | CG it | rel. error | "
             "extra MB (RSS) | update GFLOP/s | pair ms | pair GFLOP/s (% peak) | speedup vs torch.func | "
             "speedup vs dense |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for r in result["rows"]:
        if "error" in r:
            lines.append(f"| {r['model']} | {r['T']} | {r['mode']} | {r['dtype']} | {r['method']} | "
                         f"FAILED: {r['error'][:80]} ||||||||||")
            continue
        gf = f"{r['pair_gflops']:.1f} ({r.get('pair_pct_of_peak', float('nan')):.1f}%)" if "pair_gflops" in r else ""
        sp = f"{r['speedup_vs_torch_func']:.1f}x" if "speedup_vs_torch_func" in r else ""
        sd = f"{r['speedup_vs_dense']:.2f}x" if "speedup_vs_dense" in r else ""
        lines.append(f"| {r['model']} ({r['d']}, {r['V']}) | {r['T']} | {r['mode']} | {r['dtype']} | {r['method']} "
                     f"({r['ran']}) | {r['median_ms']:.1f} [{r['min_ms']:.1f}, {r['max_ms']:.1f}] | {r['reps']} | "
                     f"{r['iterations']} | {r['rel_error']:.1e} | {r['extra_mem_mb']:.1f}"
                     f"{' (%.0f)' % r['rss_extra_mb'] if 'rss_extra_mb' in r else ''} | "
                     f"{_f(r.get('update_gflops'), '.1f')} | {_f(r.get('pair_ms'), '.2f')} | {gf} | {sp} | {sd} |")
    if result.get("targets"):
        lines += ["", "**Targets**", "", "| target | case | measured | met |", "|---|---|---|---|"]
        lines += [f"| {t['target']} | {t['case']} | {t['value']} | {'yes' if t['met'] else 'NO'} |"
                  for t in result["targets"]]
    if result.get("solvers"):
        lines += ["", "**Dual vs CG by T** (auto = the cost model's pick; faster = measured)", "",
                  "| model (d, V) | mode | T | CG ms (it) | dual ms | auto picks | faster | cost model ms cg / dual | "
                  "CG vs dual rel. diff |", "|---|---|---|---|---|---|---|---|---|"]
        for r in result["solvers"]:
            lines.append(f"| {r['model']} ({r['d']}, {r['V']}) {r['dtype']} | {r['mode']} | {r['T']} | "
                         f"{r['cg_ms']:.1f} ({r['cg_iterations']}) | {r['dual_ms']:.1f} | {r['auto_picks']} | "
                         f"{r['faster']} | {r['model_cg_ms']:.1f} / {r['model_dual_ms']:.1f} | "
                         f"{r['cg_vs_dual_rel_diff']:.1e} |")
    if result.get("batched"):
        lines += ["", "**Batched: one call with (B, T, d) + mask + (B,) rewards vs B calls**", "",
                  "| model (d, V) | mode | B | tokens (T <= ) | one call ms (solver) | B calls ms | speedup | "
                  "max rel. diff |", "|---|---|---|---|---|---|---|---|"]
        for b in result["batched"]:
            lines.append(f"| {b['model']} ({b['d']}, {b['V']}) {b['dtype']} | {b['mode']} | {b['B']} | {b['tokens']} "
                         f"({b['T']}) | {b['batched_ms']:.1f} ({b['solver_batched']}) | {b['separate_ms']:.1f} | "
                         f"{b['speedup']:.2f}x | {b['max_rel_diff']:.1e} |")
    if result.get("skipped"):
        lines += ["", f"Skipped (time budget): {', '.join(result['skipped'])}"]
    return "\n".join(lines)


def stem(result: Dict[str, Any]) -> str:
    return f"{'gpu' if result['device'] == 'cuda' else 'cpu'}_{result['preset']}_{result['date'][:10]}"


def write(result: Dict[str, Any], out: pathlib.Path, plot: bool = True) -> List[pathlib.Path]:
    """``<stem>.json``, ``<stem>.md`` and (``plot``) ``<stem>.png`` into ``out``; returns the paths."""
    out.mkdir(parents=True, exist_ok=True)
    paths = [out / f"{stem(result)}.json", out / f"{stem(result)}.md"]
    paths[0].write_text(json.dumps(result, indent=1))
    paths[1].write_text(markdown(result) + "\n")
    if plot:
        p = plot_png(result, out / f"{stem(result)}.png")
        if p is not None:
            paths.append(p)
    return paths


def _plain_xticks(ax, xs) -> None:
    """Ticks at the measured x values, as plain integers (log axes otherwise print 2x10^1)."""
    from matplotlib.ticker import FixedLocator, NullFormatter, ScalarFormatter
    xs = sorted(set(xs))
    ax.xaxis.set_major_locator(FixedLocator(xs))
    ax.xaxis.set_major_formatter(ScalarFormatter())
    ax.xaxis.set_minor_formatter(NullFormatter())


def plot_png(result: Dict[str, Any], path: pathlib.Path) -> Optional[pathlib.Path]:
    """Latency vs T per method (one panel per model/mode/dtype), plus dual-vs-CG and batched panels."""
    try:
        import matplotlib
        matplotlib.use("Agg")
        import matplotlib.pyplot as plt
    except Exception:
        return None
    rows = [r for r in result["rows"] if "median_ms" in r]
    combos = sorted({(r["model"], r["mode"], r["dtype"]) for r in rows
                     if len({x["T"] for x in rows if (x["model"], x["mode"], x["dtype"]) == (r["model"], r["mode"], r["dtype"])}) > 1})
    extra = [k for k in ("solvers", "batched") if result.get(k)]
    n = len(combos) + len(extra)
    if n == 0:
        return None
    ncol = min(4, n)
    nrow = (n + ncol - 1) // ncol
    fig, axes = plt.subplots(nrow, ncol, figsize=(4.6 * ncol, 3.9 * nrow), squeeze=False)
    axs = list(axes.flat)
    methods = list(dict.fromkeys(r["method"] for r in rows))
    for ax, (model, mode, dtype) in zip(axs, combos):
        for m in methods:
            pts = sorted((r["T"], r["median_ms"], r["min_ms"], r["max_ms"]) for r in rows
                         if r["method"] == m and (r["model"], r["mode"], r["dtype"]) == (model, mode, dtype))
            if pts:
                ax.errorbar([p[0] for p in pts], [p[1] for p in pts],
                            yerr=[[p[1] - p[2] for p in pts], [p[3] - p[1] for p in pts]],
                            marker="o", ms=3, capsize=2, label=m,
                            lw=2.2 if m == DEFAULT else 1.0, ls="--" if m in (BASELINE, DENSE, REFERENCE) else "-")
        ax.set(xscale="log", yscale="log", xlabel="response tokens T", ylabel="whole update, ms (median, min-max)",
               title=f"{model} {mode} {dtype}")
        _plain_xticks(ax, [r["T"] for r in rows if (r["model"], r["mode"], r["dtype"]) == (model, mode, dtype)])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    k = len(combos)
    if "solvers" in extra:
        ax = axs[k]
        k += 1
        for mode in dict.fromkeys(r["mode"] for r in result["solvers"]):
            rs = sorted((r for r in result["solvers"] if r["mode"] == mode), key=lambda r: r["T"])
            for solver, mk in (("cg", "o"), ("dual", "s")):
                ax.plot([r["T"] for r in rs], [r[f"{solver}_ms"] for r in rs], marker=mk, ms=4, label=f"{mode} {solver}")
            for r in rs:  # ring the solver auto picks
                ax.plot([r["T"]], [r[f"{r['auto_picks']}_ms"]], marker="o", ms=10, mfc="none", mec="k")
        r0 = result["solvers"][0]
        ax.set(xscale="log", yscale="log", xlabel="T", ylabel="update ms",
               title=f"dual vs CG ({r0['model']}, d={r0['d']}, V={r0['V']}); ring = auto")
        _plain_xticks(ax, [r["T"] for r in result["solvers"]])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    if "batched" in extra:
        ax = axs[k]
        k += 1
        for mode in dict.fromkeys(b["mode"] for b in result["batched"]):
            bs = [b for b in result["batched"] if b["mode"] == mode]
            ax.plot([b["B"] for b in bs], [b["batched_ms"] for b in bs], marker="o", label=f"{mode}: one call")
            ax.plot([b["B"] for b in bs], [b["separate_ms"] for b in bs], marker="s", ls="--", label=f"{mode}: B calls")
        b0 = result["batched"][0]
        ax.set(xscale="log", yscale="log", xlabel="conversations B", ylabel="ms",
               title=f"batched (T<={b0['T']} each, {b0['model']})")
        _plain_xticks(ax, [b["B"] for b in result["batched"]])
        ax.grid(True, which="both", alpha=0.3)
        ax.legend(fontsize=7)
    for ax in axs[k:]:
        ax.axis("off")
    fig.suptitle(f"ROSA update latency -- {result['device_name']}, torch threads {result['torch_threads']} "
                 f"({result['date'][:10]}, {result['commit']})", fontsize=10)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)
    return path
