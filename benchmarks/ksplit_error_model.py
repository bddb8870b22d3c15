"""The accumulation error of the GEMMs over the probability tiles against the length of their K chains:
a CPU MODEL of tensor-core accumulation, not a GPU measurement.

    python benchmarks/ksplit_error_model.py [--rows 4] [--cols 256] [--out benchmarks/results/]

Why: ``P W`` (hidden mode) and ``P P^T`` (the LoRA Gram) contract over the vocabulary, K = V = 151936 on
the Qwen2.5 head. A bf16 tensor-core GEMM adds each k-step's products (k = 16 for bf16 wgmma) to its fp32
accumulator with truncation rather than round-to-nearest, so the error grows with the number of steps of
ONE chain, and it is biased (toward zero), so it does not average out. The one-pass tiles
(:mod:`rosa_ext.kernels.prob_tiles`) are split over the vocabulary anyway (per-split references); the
GEMMs of :mod:`rosa_ext.kernels.tile_gemms` contract each split separately (a batched GEMM) and add the
splits' results in fp32 with round-to-nearest, so a chain is at most one split (``GEMM_K_MAX``) long.

The model, per output entry: the exact products of one k-step (16 of them, float64) summed exactly, then
added to an fp32 accumulator rounded toward zero (``--rounding rz``; ``rn``: round to nearest, an
ordinary fp32 accumulation, for comparison); the chains' results added in fp32 round-to-nearest. Inputs
like the Qwen head's: bf16 h (T rows sharing a direction, so softmaxes are peaked), bf16 W (V, d) with
entries ~3 / sqrt(d), P = softmax(h W^T) in fp32 with each row's target (drawn from its softmax) zeroed.
Reported: the relative Frobenius error against float64 of ``P W`` (``--rows`` x ``--cols`` of it) and
of the Gram ``P P^T`` of those rows, for chain lengths V (one chain), V / 4 and 16384 ... 1024. Results:
``ksplit_error_model.json`` (written at the end). The real hardware's accumulator may keep a few more
bits than fp32 in a k-step or align differently; only the GPU test measures the kernels' products
(python_tests/kernels/test_prob_tiles.py, ``test_gpu_*``).
"""
from __future__ import annotations

import argparse
import json
import pathlib
import time

import numpy as np
import torch

D_MODEL, VOCAB, KSTEP = 896, 151936, 16


def _inputs(rows: int, cols: int, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    base = torch.randn(D_MODEL, generator=g)
    h = (2.0 * base + torch.randn(rows, D_MODEL, generator=g)).to(torch.bfloat16)
    W = (torch.randn(VOCAB, D_MODEL, generator=g) * 3.0 / D_MODEL ** 0.5).to(torch.bfloat16)
    z = h.double() @ W.double().T
    pi = torch.softmax(z, 1)
    y = torch.multinomial(pi, 1, generator=g).squeeze(1)
    P = pi.float()
    P[torch.arange(rows), y] = 0
    return P.numpy(), W[:, :cols].float().numpy()


def _round_fp32(x64: np.ndarray, rounding: str) -> np.ndarray:
    r = x64.astype(np.float32)
    if rounding == "rz":  # the float64 sum rounded toward zero: step back where RN rounded away
        away = np.abs(r.astype(np.float64)) > np.abs(x64)
        r = np.where(away, np.nextafter(r, np.float32(0)), r)
    return r


def chained(a: np.ndarray, b: np.ndarray, chain: int, rounding: str) -> np.ndarray:
    """a (m, K) @ b (K, n) under the model: chains of ``chain`` columns (all chains at once), each an fp32
    accumulator fed one exact k-step sum at a time; the chains' results summed in fp32 round-to-nearest."""
    m, K = a.shape
    n = b.shape[1]
    S = -(-K // chain)
    pad = S * chain - K
    a = np.pad(a, ((0, 0), (0, pad))).astype(np.float64).reshape(m, S, chain)
    b = np.pad(b, ((0, pad), (0, 0))).astype(np.float64).reshape(S, chain, n)
    acc = np.zeros((S, m, n), dtype=np.float32)
    for k0 in range(0, chain, KSTEP):
        step = np.einsum("msk,skn->smn", a[:, :, k0:k0 + KSTEP], b[:, k0:k0 + KSTEP])
        acc = _round_fp32(acc.astype(np.float64) + step, rounding)
    out = np.zeros((m, n), dtype=np.float32)
    for s in range(S):  # torch's fp32 sum over the splits (round to nearest)
        out = (out + acc[s]).astype(np.float32)
    return out


def _rel(got: np.ndarray, want: np.ndarray) -> float:
    return float(np.linalg.norm(got.astype(np.float64) - want) / np.linalg.norm(want))


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--rows", type=int, default=4)
    ap.add_argument("--cols", type=int, default=256)
    ap.add_argument("--out", default=None, help="folder for ksplit_error_model.json")
    args = ap.parse_args()
    P, W = _inputs(args.rows, args.cols)
    want_pw = P.astype(np.float64) @ W.astype(np.float64)
    want_g = P.astype(np.float64) @ P.astype(np.float64).T
    chains = [VOCAB, -(-VOCAB // 4), 16384, 8192, 4096, 2048, 1024]
    rows = []
    for chain in chains:
        t0 = time.time()
        row = {"chain": chain, "splits": -(-VOCAB // chain)}
        for rounding in ("rz", "rn"):
            row[f"PW_{rounding}"] = _rel(chained(P, W, chain, rounding), want_pw)
            row[f"gram_{rounding}"] = _rel(chained(P, P.T.copy(), chain, rounding), want_g)
        row["seconds"] = round(time.time() - t0, 1)
        rows.append(row)
        print(json.dumps(row), flush=True)
    result = {"model": "exact k-step sums (k = 16) into an fp32 accumulator, rz = truncation / rn = "
                       "round-to-nearest; splits summed in fp32 (rn); a CPU model, not a GPU measurement",
              "V": VOCAB, "d": D_MODEL, "rows": args.rows, "cols": args.cols, "results": rows}
    if args.out:
        path = pathlib.Path(args.out) / "ksplit_error_model.json"
        path.write_text(json.dumps(result, indent=1) + "\n")
        print("wrote", path)


if __name__ == "__main__":
    main()
