"""The cost model's constants of every engine (``solver="auto"``, :mod:`rosa_ext.plans.registry`), by
(device type, compute dtype): what an engine's ``throughput`` returns and the plans' cost formulas read.

Keys: gemm (flop/s of the tile GEMMs of the passes), ew_hidden / ew_lora (s per tile element and pass:
the rank-k fill, exp, sums, the target split), keep_extra (s per kept element: first touch and cold
writes), kept_gemv (s per kept element of the VJP GEMV), chol (flop/s of a T = 1024 Cholesky), cg_pair
(useful flop/s, 4 N d V per JVP + VJP pair of CG), w_bw (bytes/s at which a pass reads W; visible at
small T), widen (s per W element and pass to widen bf16/fp16 chunks to fp32), call (s of fixed overhead
per update).

CPU: measured on the project's 2-core Intel Xeon VM (Sapphire Rapids, AVX-512/AMX), one torch thread,
torch 2.13.0+cpu (MKL), 2026-11-29, minima of interleaved repetitions (``benchmarks/bench_throughput.py``
measures them on any machine). CUDA: NOT measured (no GPU was lent): H100/H200 data-sheet guesses, kept
only so that ``auto`` decides by the same rules there; replace them with a measurement.
"""
from __future__ import annotations

from typing import Dict, Tuple

import torch

Table = Dict[Tuple[str, torch.dtype], Dict[str, float]]

#: The torch engine (:mod:`.torch_engine`).
TORCH: Table = {
    ("cpu", torch.float32): dict(gemm=146e9, ew_hidden=1.1e-9, ew_lora=1.25e-9, keep_extra=2.1e-9, kept_gemv=0.17e-9,
                                 chol=28e9, cg_pair=52.5e9, w_bw=20e9, widen=0.3e-9, call=1.0e-3),
    ("cpu", torch.float64): dict(gemm=68e9, ew_hidden=4.3e-9, ew_lora=2.9e-9, keep_extra=2.75e-9, kept_gemv=0.41e-9,
                                 chol=17.8e9, cg_pair=27.6e9, w_bw=20e9, widen=0.0, call=1.0e-3),
    ("cuda", torch.float32): dict(gemm=40e12, ew_hidden=0.02e-9, ew_lora=0.02e-9, keep_extra=0.005e-9,
                                  kept_gemv=0.003e-9, chol=2e12, cg_pair=20e12, w_bw=2.5e12, widen=0.0, call=2e-3),
}

#: The Triton engine (:mod:`.triton_engine`): NOT measured -- no GPU was lent when they were written;
#: estimates for an H100 SXM (data sheet: 989 TFLOP/s dense bf16, 3.35 TB/s HBM3) and a bf16 head, kept so
#: that ``auto`` decides by the same rules on CUDA. Replace them with ``benchmarks/bench_throughput.py``.
#: They describe the probability-tile path (MATH.md section 4): ONE logits pass on the tensor cores writes P
#: (N x V: r̂, the off-target distribution, bf16 hi + lo) with its row sums, then the products are GEMMs over P:
#:
#: - gemm 350e12: useful flop/s of the pass's products as the plans count them (hidden 4 N d V: the logits
#:   2 N d V plus P W 2 N d V; LoRA: the logits plus the Gram P_b P_b^T). ~600 TFLOP/s sustained bf16, less
#:   the second bf16 GEMM that P's lo part costs (hi W + lo W, hi hi^T + lo hi^T: 1.5-2x the counted flops).
#: - ew_hidden 3e-12 s per tile element: P written as hi + lo (4 bytes) by the tile kernel and read back
#:   once by the GEMM (4 bytes) at ~3 TB/s, the exp under it (one logits pass: no second exp per element).
#: - ew_lora 4e-12: the same, P read by the Gram GEMM as both operands (about twice) and the cross terms.
#: - keep_extra 0: keeping P costs nothing extra on the GPU (the tile kernel writes it anyway; the caching
#:   allocator hands out warm memory). kept_gemv 1.3e-12: the VJP's GEMV w^T P reads hi + lo (4 bytes).
#: - chol 0.7e12: a T = 1024 Cholesky (cuSOLVER, ~0.5 ms: latency-bound at this size).
#: - cg_pair 300e12: useful flop/s (4 N d V) of a matrix-free CG pair, the row and column kernels each
#:   recomputing the logits on the tensor cores (4 N d V tensor-core flops plus 2 N V exps).
#: - w_bw 2.8e12 bytes/s; widen 0 (the kernels read bf16 W as it is).
#: - call 1.5e-3 s: the fixed glue of one update, ~200-300 launches at ~5 us and 4 host syncs
#:   (``benchmarks/count_launches.py`` counts them); about 0.3 ms once under 60 launches and 1 sync.
#:
#: An fp32 head is slower on this path (fp32 logits as three TF32 products, fp32 P: twice the bytes).
TRITON: Table = {
    ("cuda", torch.float32): dict(gemm=350e12, ew_hidden=3e-12, ew_lora=4e-12, keep_extra=0.0,
                                  kept_gemv=1.3e-12, chol=0.7e12, cg_pair=300e12, w_bw=2.8e12, widen=0.0, call=1.5e-3),
}


def lookup(table: Table, device_type: str, dtype: torch.dtype) -> Dict[str, float]:
    """``table``'s entry for (device type, compute dtype), else the nearest: that device in float32, then
    the CPU's (of :data:`TORCH`)."""
    for key in ((device_type, dtype), (device_type, torch.float32), ("cpu", dtype)):
        if key in table:
            return table[key]
    return TORCH[("cpu", dtype)] if ("cpu", dtype) in TORCH else TORCH[("cpu", torch.float32)]
