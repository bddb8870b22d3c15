"""The constants of the ``solver="auto"`` cost model (an engine's ``THROUGHPUT``:
``rosa_ext/backends/torch_engine.py``), measured here.

``python benchmarks/bench_throughput.py [--threads 1] [--out benchmarks/results]`` times, on the
torch engine of this machine (one shape, N=256, d=512, V=32768, fp32 and fp64), the tile GEMMs of the
one-pass passes, the one passes themselves (hidden; LoRA kept and streamed), the GEMV over kept tiles,
a T=1024 Cholesky and the package's CG pair (LoRA mode, one JVP + one VJP), and derives the per-element
and per-flop constants of ``rosa_ext.backends.torch_engine.THROUGHPUT``. Each number is
the minimum over interleaved repetitions (CPU time of this thread), so a shared machine disturbs
it little. It prints the entries to paste into ``THROUGHPUT`` and writes
``throughput_<cpu|gpu>_<date>.json`` with ``--out``.
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import time
from typing import Callable, Dict

import common
import torch

from rosa_ext.backends import torch_engine as TE
from rosa_ext.core.op import pack


def interleaved(fns: Dict[str, Callable[[], object]], target_s: float) -> Dict[str, float]:
    """Minimum CPU seconds of each function over interleaved repetitions."""
    for f in fns.values():
        f()
    t = time.thread_time()
    for f in fns.values():
        f()
    reps = max(5, int(target_s / max(time.thread_time() - t, 1e-4)))
    ts: Dict[str, list] = {k: [] for k in fns}
    for _ in range(reps):
        for k, f in fns.items():
            t = time.thread_time()
            f()
            ts[k].append(time.thread_time() - t)
    return {k: min(v) for k, v in ts.items()} | {f"{k}_median": statistics.median(v) for k, v in ts.items()}


def measure(dt: torch.dtype, N: int = 256, d: int = 512, V: int = 32768, target_s: float = 20.0) -> Dict[str, float]:
    g = torch.Generator().manual_seed(0)
    h = torch.randn(N, d, generator=g, dtype=torch.float64).to(dt)
    W = (torch.randn(V, d, generator=g, dtype=torch.float64) * 4 / d ** 0.5).to(dt)
    y = torch.randint(0, V, (N,), generator=g)
    a = (torch.randn(d, generator=g, dtype=torch.float64) / d ** 0.5).to(dt)
    b = (torch.randn(V, generator=g, dtype=torch.float64) * 0.01).to(dt)
    common_kw = dict(lora_scale=8.0, beta=1.0, damping=0.1, damping_mode="absolute", max_iter=16, tol=1e-30, backend="torch")
    ph, _ = pack(h, W, y, -1.0, mode="hidden", solver="dual", **common_kw)
    pl, _ = pack(h, W, y, -1.0, mode="lora", lora_a=a, lora_b=b, solver="dual", **common_kw)
    engine = TE.TorchEngine()
    c = TE.chunk_for(N, V, TE.HIDDEN_TILE_ELEMS, TE.MIN_CHUNK)
    zT = torch.empty(c, N, dtype=dt)
    acc = torch.zeros(N, d, dtype=dt)
    G = torch.zeros(N, N, dtype=dt)
    nt = N * V
    t = interleaved({
        "hidden_pass": lambda: engine.hidden_pass(ph),
        "lora_pass_stream": lambda: engine.gram_pass(pl, keep=False),
        "lora_pass_keep": lambda: engine.gram_pass(pl, keep=True),
        "tile_gemm1": lambda: [torch.mm(W[v0:v0 + c], h.T, out=zT[:min(c, V - v0)]) for v0 in range(0, V, c)],
        "tile_gemm2": lambda: [acc.addmm_(zT[:min(c, V - v0)].T, W[v0:v0 + c]) for v0 in range(0, V, c)],
        "tile_gram": lambda: [G.addmm_(zT.T, zT) for _ in range(0, V, c)],
    }, target_s)
    f2 = 2 * N * d * V
    out = {"shape": dict(N=N, d=d, V=V, chunk=c)}
    out["gemm"] = 3 * f2 / (t["tile_gemm1"] + t["tile_gemm2"] + t["tile_gram"] * f2 / (2 * N * N * V))
    out["gemm1_GFs"] = f2 / t["tile_gemm1"] / 1e9
    out["gemm2_GFs"] = f2 / t["tile_gemm2"] / 1e9
    out["gram_GFs"] = 2 * N * N * V / t["tile_gram"] / 1e9
    out["ew_hidden"] = (t["hidden_pass"] - t["tile_gemm1"] - t["tile_gemm2"]) / nt
    blk = TE.gram_block(N)
    nb = -(-N // blk)
    tri = (nb * (nb + 1) / 2) / (nb * nb) if N > blk else 1.0
    out["ew_lora"] = (t["lora_pass_stream"] - t["tile_gemm1"] - t["tile_gram"] * tri) / nt
    out["keep_extra"] = max(0.0, (t["lora_pass_keep"] - t["lora_pass_stream"]) / nt)
    gp = engine.gram_pass(pl, keep=True)
    w = torch.randn(N, dtype=dt)
    t2 = interleaved({"vjp_kept": lambda: engine.off_target_vjp(pl, gp, w)}, target_s / 4)
    out["kept_gemv"] = t2["vjp_kept"] / nt
    T = 1024
    A = torch.randn(T, T, dtype=dt)
    S = A @ A.T + T * torch.eye(T, dtype=dt)
    t3 = interleaved({"chol": lambda: torch.linalg.cholesky_ex(S)}, target_s / 4)
    out["chol"] = T ** 3 / 3 / t3["chol"]
    # the package's CG pair in LoRA mode (matrix-free JVP + VJP): from 2 and 6 iterations
    import rosa_ext
    kw = dict(mode="lora", lora_a=a, lora_b=b, solver="cg", backend="torch", tol=1e-30, damping=0.1,
              damping_mode="absolute")
    t4 = interleaved({"it2": lambda: rosa_ext.rosa_update(h, W, y, -1.0, max_iter=2, **kw),
                      "it6": lambda: rosa_ext.rosa_update(h, W, y, -1.0, max_iter=6, **kw)}, target_s)
    out["cg_pair"] = 4 * N * d * V / ((t4["it6"] - t4["it2"]) / 4)
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--target-s", type=float, default=20.0, help="seconds per group of interleaved timings")
    ap.add_argument("--out", default=None)
    a = ap.parse_args()
    torch.set_num_threads(a.threads)
    res = {"date": common.utc_now(), "threads": a.threads, "versions": common.versions(), "commit": common.commit()}
    for dt in (torch.float32, torch.float64):
        name = str(dt).split(".")[1]
        res[name] = measure(dt, target_s=a.target_s)
        r = res[name]
        print(f'("cpu", torch.{name}): dict(gemm={r["gemm"]:.3g}, ew_hidden={r["ew_hidden"]:.3g}, '
              f'ew_lora={r["ew_lora"]:.3g}, keep_extra={r["keep_extra"]:.3g}, kept_gemv={r["kept_gemv"]:.3g}, '
              f'chol={r["chol"]:.3g}, cg_pair={r["cg_pair"]:.3g}),', flush=True)
    if a.out:
        out = pathlib.Path(a.out)
        out.mkdir(parents=True, exist_ok=True)
        path = out / f"throughput_cpu_{res['date'][:10]}.json"
        path.write_text(json.dumps(res, indent=1, default=str))
        print("wrote", path)


if __name__ == "__main__":
    main()
