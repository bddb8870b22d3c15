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
difference of each product from the "fp32" tiles (exact fp32 GEMMs, allow_tf32 off).

The engine (rosa_ext.kernels) runs the products over the one-pass tiles as fused Triton kernels, not the
torch GEMMs: for the precisions in ``--fused-precisions`` (default "bf16x2", the engines' storage for bf16
models; each adds one compile per kernel, no autotuning) the same row times them on the same tiles, the same
way (``fused_rows``): ``fused_weight_ms`` (tile_weight: r̂ W), ``fused_gram_ms`` (tile_gram: the centred
Gram K = (E - R)(E - R)^T of one conversation of T tokens) and ``fused_vjp_ms`` (tile_vjp, centred:
sum_t w_t (e_{y_t} - r̂_t)). The torch GEMMs are the control measured in the same run: ``fused_*_rel_vs_torch``
is each kernel's relative difference from the torch path on the same tiles (off_target_weight; K = G - X -
X^T + 1(y_t = y_u) from off_target_gram / cross_terms, combined in fp32 as the plan does; -tiles_rmatmul
plus w scattered at the targets), and, where T V doubles fit ``F64_MAX_BYTES`` (T = 1024, not 4096),
``fused_*_rel_vs_f64`` / ``torch_*_rel_vs_f64`` the errors of both against float64 products of the same
tiles. (``one_gram_ms`` times the pi-form centered_gram, the same GEMMs plus the q scaling.) The JSON
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
#: the float64 references of the fused kernels need T V doubles (and their difference from E): T = 1024
#: on the Qwen head (1.2 GB) fits, 4096 (5 GB) is skipped
F64_MAX_BYTES = 2 << 30


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


def _ms(fn, device: str = "cuda") -> float:
    if device != "cuda":  # the CPU (tests, the interpreter): wall clock, a few calls
        return statistics.median(common.wall_times_ms(fn, 3, device, budget_s=0.5, min_reps=1))
    return statistics.median(common.cuda_times_ms(fn, 20, min_reps=3, budget_s=0.5, warmup=2))


def _torch_refs(tiles, W: torch.Tensor, y: torch.Tensor, w: torch.Tensor):
    """The torch path over the tiles of one conversation: r̂ W (off_target_weight), the centred Gram
    K = G - X - X^T + 1(y_t = y_u) (off_target_gram, cross_terms; in fp32, as the plan centres it) and the
    centred VJP sum_t w_t (e_{y_t} - r̂_t) (tiles_rmatmul negated, w scattered at the targets)."""
    from rosa_ext.kernels import tile_gemms as TG

    T = int(tiles.shape[0])
    G, X = TG.off_target_gram(tiles, [0, T])[0], TG.cross_terms(tiles, y, [0, T])[0]
    K = G.sub_(X).sub_(X.T).add_((y.unsqueeze(0) == y.unsqueeze(1)).float())
    vjp = TG.tiles_rmatmul(tiles, w.unsqueeze(0))[0].neg_().index_add_(0, y, w)
    return TG.off_target_weight(tiles, W), K, vjp


def _f64_refs(tiles, W: torch.Tensor, y: torch.Tensor, w: torch.Tensor):
    """The same three products in float64 of the tiles (r̂ = stored x split scales; T V doubles)."""
    R = tiles.stored().double()
    scale = tiles.column_scale()
    if scale is not None:
        R.mul_(scale)
    del scale
    rW = R @ W.double()
    D = R.neg_()  # E - R, in place
    D[torch.arange(len(y), device=y.device), y] += 1.0
    return rW, D @ D.T, w.double() @ D


def fused_rows(tiles, W: torch.Tensor, y: torch.Tensor, w: torch.Tensor, f64: bool = True) -> dict:
    """The engine's fused kernels over the tiles of ONE conversation (T tokens): the ms of tile_weight,
    tile_gram (centred) and tile_vjp (centred), timed as the torch GEMMs are (``_ms``; the first calls,
    untimed, compile), and their relative differences from the torch path on the same tiles (and, ``f64``,
    of both from float64) -> the row's ``fused_*`` / ``torch_*`` fields."""
    from rosa_ext.kernels.tile_gram import tile_gram
    from rosa_ext.kernels.tile_vjp import tile_vjp
    from rosa_ext.kernels.tile_weight import tile_weight

    T, V = int(tiles.shape[0]), int(tiles.shape[1])
    dev = W.device.type
    buf = torch.empty(1, V, dtype=torch.float32, device=W.device)
    got = (tile_weight(tiles, W), tile_gram(tiles, y, [T], center=True)[0][0],
           tile_vjp(tiles, w, torch.empty_like(buf), targets=y)[0])
    row = dict(fused_weight_ms=_ms(lambda: tile_weight(tiles, W), dev),
               fused_gram_ms=_ms(lambda: tile_gram(tiles, y, [T], center=True), dev),
               fused_vjp_ms=_ms(lambda: tile_vjp(tiles, w, buf, targets=y), dev))
    names = ("weight", "gram", "vjp")
    ref = _torch_refs(tiles, W, y, w)
    for name, a, b in zip(names, got, ref):
        row[f"fused_{name}_rel_vs_torch"] = _rel(a, b.double())
    if f64:
        for name, a, b, c in zip(names, got, ref, _f64_refs(tiles, W, y, w)):
            row[f"fused_{name}_rel_vs_f64"] = _rel(a, c)
            row[f"torch_{name}_rel_vs_f64"] = _rel(b, c)
    return row


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
            if prec in args.fused_precisions:  # what the engine runs over these tiles, next to the torch GEMMs
                row.update(fused_rows(tiles, W, y, w, f64=T * VOCAB * 8 <= F64_MAX_BYTES))
                torch.cuda.empty_cache()
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
    ap.add_argument("--fused-precisions", nargs="*", default=["bf16x2"], choices=PRECISIONS,
                    help="precisions whose one-pass tiles also time the fused kernels (one compile each)")
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
