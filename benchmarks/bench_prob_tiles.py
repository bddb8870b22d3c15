"""Probability tiles + the GEMMs over them (rosa_ext.kernels.prob_tiles / tile_gemms): error and speed.

    python benchmarks/bench_prob_tiles.py --emulate            # CPU: the error table of each precision
    python benchmarks/bench_prob_tiles.py --out benchmarks/results/   # GPU: milliseconds and error

``--emulate`` (no GPU, no Triton): the kernel's arithmetic in torch on the CPU -- fp32 logits
(exact products of the bf16 inputs, fp32 accumulation), lse, P = exp(z - lse) with the targets
split off, hi/lo rounded to nearest even as the kernel does -- and the GEMMs of
:mod:`rosa_ext.kernels.tile_gemms` on it (on the CPU they widen bf16 parts to fp32: exact
products, fp32 accumulation, what a bf16 tensor-core GEMM with fp32 output computes). It is an
emulation: the GPU's GEMMs accumulate in another order and its logits use tl.dot. Reports the
relative Frobenius error against float64 on the same (bf16-rounded) inputs of P, r W (hidden),
the centred Gram K (LoRA) and the VJP w^T (e_y - pi), for "fp32", "bf16x2" and "bf16".

GPU (default): the Qwen2.5-0.5B head (d = 896, V = 151936), bf16, T in ``--T`` (1024 first):
per precision the ms of the stats pass, the tile kernel given its lse, r W, the Gram and the VJP (the
two-pass form: ``two_pass_*_ms``), then, in the same run, the ONE pass the engines run (the tile kernel
computing its own statistics: ``one_pass_ms``) and the GEMMs over its tiles (``one_*_ms``;
``hidden_pass_ms`` / ``lora_pass_ms`` are the one-pass totals), the tile memory, and the relative
difference of each product from the "fp32" tiles (exact fp32 GEMMs, allow_tf32 off). The JSON
(``prob_tiles_gpu.json``) is rewritten after every row; ``--budget-s`` stops starting rows. The first
call of each shape autotunes the tile kernel (a warm-up, untimed).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import statistics
import sys

import common
import torch

D_MODEL, VOCAB = 896, 151936
PRECISIONS = ("fp32", "bf16x2", "bf16")


def _inputs(T: int, d: int, V: int, device: str, seed: int = 0):
    """bf16 h (T, d) with correlated rows (a shared direction, so softmaxes are peaked and alike),
    bf16 W (V, d), targets drawn from the model's own softmax, a LoRA-like w (T,)."""
    g = torch.Generator(device=device).manual_seed(seed)
    base = torch.randn(d, device=device, generator=g)
    h = (2.0 * base + torch.randn(T, d, device=device, generator=g)).to(torch.bfloat16)
    W = (torch.randn(V, d, device=device, generator=g) * 3.0 / d ** 0.5).to(torch.bfloat16)
    z = (h.float() @ W.float().T)
    y = torch.multinomial(torch.softmax(z, 1), 1, generator=g).squeeze(1)
    w = torch.randn(T, device=device, generator=g)
    return h, W, y, w


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want).norm() / want.norm())


def emulate(args) -> dict:
    from rosa_ext.kernels import tile_gemms as TG
    from rosa_ext.kernels.prob_tiles import ProbTiles

    T, d, V = args.emu_T, args.emu_d, args.emu_V
    h, W, y, w = _inputs(T, d, V, "cpu")
    rows = torch.arange(T)
    z64 = h.double() @ W.double().T
    pi64 = torch.softmax(z64, 1)
    P64 = pi64.clone()
    P64[rows, y] = 0
    E64 = torch.nn.functional.one_hot(y, V).double() - pi64
    rW64 = P64 @ W.double()
    K64 = E64 @ E64.T
    vjp64 = w.double() @ E64
    z = h.float() @ W.float().T  # the kernel: exact products, fp32 accumulation
    lse = torch.logsumexp(z, 1)
    pi = torch.exp(z - lse[:, None])
    pt = pi[rows, y].clone()
    pi[rows, y] = 0
    q, ss = pi.sum(1), (pi * pi).sum(1)
    out = dict(kind="cpu-emulation", T=T, d=d, V=V, device=common.cpu_name(), commit=common.commit(),
               date=common.utc_now(), rows=[])
    for prec in PRECISIONS:
        if prec == "fp32":
            tiles = ProbTiles(prec, pi, None, None, q, pt, None, ss)
        else:
            hi = pi.to(torch.bfloat16)  # round to nearest even, as the kernel's round_bf16
            lo = (pi - hi.float()).to(torch.bfloat16) if prec == "bf16x2" else None
            tiles = ProbTiles(prec, None, hi, lo, q, pt, None, ss)
        row = dict(precision=prec, P=_rel(tiles.dense(), P64), rW=_rel(TG.off_target_weight(tiles, W), rW64),
                   gram=_rel(TG.centered_gram(tiles, y, [0, T])[0], K64),
                   vjp=_rel(TG.centered_vjp(tiles, w, y)[0], vjp64))
        out["rows"].append(row)
        print(f"{prec:>7}: P {row['P']:.1e}  rW {row['rW']:.1e}  Gram {row['gram']:.1e}  VJP {row['vjp']:.1e}",
              flush=True)
    return out


def _ms(fn) -> float:
    return statistics.median(common.cuda_times_ms(fn, 20, min_reps=3, budget_s=0.5, warmup=2))


def gpu(args) -> dict:
    import rosa_ext.kernels as K
    from rosa_ext.kernels import tile_gemms as TG
    from rosa_ext.kernels.prob_tiles import prob_tiles_from_tensors

    torch.backends.cuda.matmul.allow_tf32 = False
    clock = common.Stopwatch()
    out = dict(kind="gpu", d=D_MODEL, V=VOCAB, dtype="bfloat16", device=common.gpu_name(), commit=common.commit(),
               date=common.utc_now(), versions=common.versions(), rows=[], skipped=[])
    path = pathlib.Path(args.out) / "prob_tiles_gpu.json"
    path.parent.mkdir(parents=True, exist_ok=True)

    def dump():
        path.write_text(json.dumps(out, indent=1))

    for T in args.T:
        h, W, y, w = _inputs(T, D_MODEL, VOCAB, "cuda")
        seg = torch.zeros(T, dtype=torch.int32, device="cuda")
        prob = K.prepare(h, W, y)
        st = K.stats(h, W, y, prob=prob)
        ref = ref1 = None
        for prec in PRECISIONS:
            if clock.elapsed_s() > args.budget_s:
                out["skipped"].append(dict(T=T, precision=prec, reason="budget"))
                dump()
                continue
            run = lambda prec=prec: prob_tiles_from_tensors(h, W, seg, st.lse, y, precision=prec)  # noqa: E731
            tiles = run()  # autotunes on first use
            torch.cuda.synchronize()
            rW = TG.off_target_weight(tiles, W)
            Kg = TG.centered_gram(tiles, y, [0, T])[0]
            vj = TG.centered_vjp(tiles, w, y)[0]
            row = dict(T=T, precision=prec, stats_ms=_ms(lambda: K.stats(h, W, y, prob=prob)), tiles_ms=_ms(run),
                       rW_ms=_ms(lambda t=tiles: TG.off_target_weight(t, W)),
                       gram_ms=_ms(lambda t=tiles: TG.centered_gram(t, y, [0, T])),
                       vjp_ms=_ms(lambda t=tiles: TG.centered_vjp(t, w, y)),
                       tile_mb=sum(x.numel() * x.element_size() for x in (tiles.p, tiles.hi, tiles.lo)
                                   if x is not None) / 2 ** 20,
                       row_sum_err=float(((tiles.q + tiles.pt) - 1).abs().max()))
            row["two_pass_hidden_ms"] = row["stats_ms"] + row["tiles_ms"] + row["rW_ms"]
            row["two_pass_lora_ms"] = row["stats_ms"] + row["tiles_ms"] + row["gram_ms"] + row["vjp_ms"]
            del tiles
            # the engines' path: ONE pass (its own statistics; tiles relative to per-split references, the
            # GEMMs apply the scales), timed in the same run as the two passes above
            one = lambda prec=prec: prob_tiles_from_tensors(h, W, seg, None, y, precision=prec)  # noqa: E731
            tiles = one()  # autotunes the one-pass specialisation
            torch.cuda.synchronize()
            row.update(one_pass_ms=_ms(one), one_rW_ms=_ms(lambda t=tiles: TG.off_target_weight(t, W)),
                       one_gram_ms=_ms(lambda t=tiles: TG.centered_gram(t, y, [0, T])),
                       one_vjp_ms=_ms(lambda t=tiles: TG.centered_vjp(t, w, y)),
                       one_lse_vs_stats=float((tiles.lse - st.lse).abs().max()))
            row["hidden_pass_ms"] = row["one_pass_ms"] + row["one_rW_ms"]
            row["lora_pass_ms"] = row["one_pass_ms"] + row["one_gram_ms"] + row["one_vjp_ms"]
            # the one pass's tiles are r̂ (off-target normalised): its r̂ W against the fp32 one pass's, the
            # pi-form Gram and VJP against the two-pass fp32 ones
            one_rW = TG.off_target_weight(tiles, W)
            if prec == "fp32":
                ref1 = one_rW.double()
            else:
                row.update(one_rW_rel_vs_fp32=_rel(one_rW, ref1),
                           one_gram_rel_vs_fp32=_rel(TG.centered_gram(tiles, y, [0, T])[0], ref[1]),
                           one_vjp_rel_vs_fp32=_rel(TG.centered_vjp(tiles, w, y)[0], ref[2]))
            del one_rW
            if prec == "fp32":
                ref = (rW.double(), Kg.double(), vj.double())
            else:
                row.update(rW_rel_vs_fp32=_rel(rW, ref[0]), gram_rel_vs_fp32=_rel(Kg, ref[1]),
                           vjp_rel_vs_fp32=_rel(vj, ref[2]))
            out["rows"].append(row)
            dump()
            print(" ".join(f"{k}={v:.4g}" if isinstance(v, float) else f"{k}={v}" for k, v in row.items()), flush=True)
            del tiles
            torch.cuda.empty_cache()
    return out


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--emulate", action="store_true", help="CPU emulation of the error table (no GPU)")
    ap.add_argument("--emu-T", type=int, default=256)
    ap.add_argument("--emu-d", type=int, default=D_MODEL)
    ap.add_argument("--emu-V", type=int, default=32000)
    ap.add_argument("--T", type=int, nargs="+", default=[1024, 256, 4096])
    ap.add_argument("--budget-s", type=float, default=float("inf"))
    ap.add_argument("--out", default="benchmarks/results")
    args = ap.parse_args(argv)
    if args.emulate:
        res = emulate(args)
        path = pathlib.Path(args.out) / "prob_tiles_emulation.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(res, indent=1))
        return 0
    if not torch.cuda.is_available():
        print("bench_prob_tiles: no CUDA device (use --emulate for the CPU error table)", file=sys.stderr)
        return 2
    gpu(args)
    return 0


if __name__ == "__main__":
    sys.exit(main())
