"""The cost model behind ``solver="auto"``: measured throughput per backend and dtype (MATH.md section 4).

Every plan is a few passes over the head weight plus small dense algebra. Its estimated seconds:

    sum over its passes of  GEMM flops / gemm  +  tile elements x ew  +  W bytes / w_bw
    + the T x T (or d x d) algebra  (2 T^2 d / gemm + T^3 / 3 / chol per conversation)
    + call (the fixed Python/launch overhead of one update)

Plans (N tokens in conversations of T_b tokens, hidden size d, vocabulary V):

- hidden ``dual``: ONE pass (lse and pi W together, 4 N d V flops), then per conversation the
  smaller of the T_b x T_b dual and the d x d primal system (the same step).
- hidden ``cg``: the same pass, then CG on the explicit T x d Jacobian (``max_iter`` products with
  J and J^T, 4 N d flops each: no pass over W).
- lora ``dual-keep``: one pass (logits 2 N d V, block-triangle Gram ~sum_b T_b^2 V) keeping the
  N x V probability tiles, then the VJP as a GEMV over them (per element: ``keep_extra``, the first
  touch and cold writes of the kept memory, plus ``kept_gemv``). A batch is run in groups of
  conversations of at most max_b T_b rows (one pass each).
- lora ``dual-stream``: the same pass without keeping, then one streaming VJP pass (2 N d V).
- lora ``cg``: the stats pass plus ``max_iter`` JVP + VJP pairs, at the backend's measured pair
  throughput ``cg_pair`` (no early exit assumed).

Rules (:func:`choose`): (1) memory first: the LoRA dual needs its Gram matrices plus one factor,
``esz (sum_b T_b^2 + max_b T_b^2)`` bytes, within ``gram_budget_bytes``; hidden mode needs
``2 esz max_b min(T_b, d)^2``; keeping needs ``esz max_b T_b V`` within ``keep_budget_bytes``.
(2) Among the plans allowed, the cheapest; the exact dual is kept unless CG is estimated more than
:data:`DUAL_TIE` cheaper (CG stops at ``tol`` or ``max_iter``, the dual is exact).

The constants (:data:`THROUGHPUT`) are per (backend, device type, dtype). The CPU ones were
measured on the project's 2-core Intel Xeon VM (Sapphire Rapids, AVX-512/AMX), one torch thread,
torch 2.13 (``benchmarks/bench_throughput.py`` measures them on any machine; minima of interleaved
repetitions). The CUDA entries are NOT measured: data-sheet guesses for an H100/H200, kept only so
that `auto` decides by the same rules there; replace them with a measurement.
"""
from __future__ import annotations

import functools
from dataclasses import dataclass, field
from typing import Dict, List, Optional, Sequence, Tuple

import torch

#: CG is taken over the exact dual only when it is estimated cheaper by more than this fraction.
DUAL_TIE = 0.1

#: Keys: gemm (flop/s of the tile GEMMs of the passes), ew_hidden / ew_lora (s per tile element and
#: pass: the rank-k fill, exp, sums, the target split), keep_extra (s per kept element: first touch
#: and cold writes), kept_gemv (s per kept element of the VJP GEMV), chol (flop/s of a T = 1024
#: Cholesky), cg_pair (useful flop/s, 4 N d V per JVP + VJP pair of the backend's CG), w_bw (bytes/s
#: at which a pass reads W; visible at small T), widen (s per W element and pass to widen bf16/fp16
#: chunks to fp32), call (s of fixed overhead per update).
THROUGHPUT: Dict[Tuple[str, str, torch.dtype], Dict[str, float]] = {
    # measured: 2-core Intel Xeon VM (Sapphire Rapids), one thread, torch 2.13.0+cpu (MKL), 2026-11-29
    ("torch", "cpu", torch.float32): dict(gemm=146e9, ew_hidden=1.1e-9, ew_lora=1.25e-9, keep_extra=2.1e-9,
                                          kept_gemv=0.17e-9, chol=28e9, cg_pair=52.5e9, w_bw=20e9, widen=0.3e-9,
                                          call=1.0e-3),
    ("torch", "cpu", torch.float64): dict(gemm=68e9, ew_hidden=4.3e-9, ew_lora=2.9e-9, keep_extra=2.75e-9,
                                          kept_gemv=0.41e-9, chol=17.8e9, cg_pair=27.6e9, w_bw=20e9, widen=0.0,
                                          call=1.0e-3),
    # NOT measured (no GPU was lent): H100/H200 data-sheet guesses. The one-pass primitives run as
    # fp32 torch matmuls on the GPU (no Triton kernel for them yet); Triton's CG pair on tensor cores.
    ("torch", "cuda", torch.float32): dict(gemm=40e12, ew_hidden=0.02e-9, ew_lora=0.02e-9, keep_extra=0.005e-9,
                                           kept_gemv=0.003e-9, chol=2e12, cg_pair=20e12, w_bw=2.5e12, widen=0.0,
                                           call=2e-3),
    ("triton", "cuda", torch.float32): dict(gemm=40e12, ew_hidden=0.02e-9, ew_lora=0.02e-9, keep_extra=0.005e-9,
                                            kept_gemv=0.003e-9, chol=2e12, cg_pair=100e12, w_bw=2.5e12, widen=0.0,
                                            call=2e-3),
}


@dataclass(frozen=True)
class Plan:
    """What an update runs: ``solver`` ("dual" or "cg"), ``keep`` (LoRA dual: keep the probability
    tiles between the pass and the VJP) and the estimated seconds of every plan considered."""

    solver: str
    keep: bool = False
    estimates: Dict[str, float] = field(default_factory=dict, compare=False)
    allowed: Tuple[str, ...] = field(default=(), compare=False)


def constants(backend: str, device: str, dtype: torch.dtype) -> Dict[str, float]:
    """The constants for a backend ("torch", "triton"), device type and compute dtype (nearest entry:
    the same device with the torch backend, then the CPU's fp32)."""
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    for key in ((backend, device, cd), ("torch", device, cd), ("torch", device, torch.float32),
                ("torch", "cpu", cd)):
        if key in THROUGHPUT:
            return THROUGHPUT[key]
    return THROUGHPUT[("torch", "cpu", torch.float32)]


def _tri(T: int) -> float:
    """Share of the full T x T Gram product the block-triangle Gram computes."""
    blk = T if T <= 128 else (128 if T <= 1024 else 256)
    if T <= blk:
        return 1.0
    nb = -(-T // blk)
    return (nb + 1) / (2 * nb)


def estimate(mode: str, lengths: Sequence[int], d: int, V: int, *, max_iter: int, backend: str = "torch",
             device: str = "cpu", dtype: torch.dtype = torch.float32,
             model_dtype: Optional[torch.dtype] = None) -> Dict[str, float]:
    """Estimated seconds of every plan of one update (``lengths``: tokens of each conversation;
    ``dtype``: the compute dtype; ``model_dtype``: the weight's, when it is widened per chunk)."""
    k = constants(backend, device, dtype)
    cd = torch.float64 if dtype == torch.float64 else torch.float32
    R = k["gemm"]
    N = sum(lengths)
    wpass = V * d * (model_dtype or cd).itemsize / k["w_bw"]
    if model_dtype in (torch.bfloat16, torch.float16):
        wpass += V * d * k["widen"]
    chol = k["chol"]
    if mode == "hidden":
        blocks = max(1, -(-N // 1024))  # the hidden pass reads W once per block of 1024 rows
        one_pass = 4 * N * d * V / R + N * V * k["ew_hidden"] + blocks * wpass
        algebra = sum(min(2 * T * T * d / R + T ** 3 / 3 / chol, 2 * T * d * d / R + d ** 3 / 3 / chol)
                      for T in lengths)
        cg_iters = max(1, max_iter) * 4 * N * d / R
        return {"dual": one_pass + algebra + k["call"], "cg": one_pass + cg_iters + k["call"]}
    gram = sum(2 * T * T * V * _tri(T) for T in lengths)
    solve = sum(2 * T * T * d / R + T ** 3 / 3 / chol for T in lengths)
    groups = keep_groups(lengths)
    pass1 = (2 * N * d * V + gram) / R + N * V * k["ew_lora"]
    keep = pass1 + len(groups) * wpass + N * V * (k["keep_extra"] + k["kept_gemv"])
    stream = pass1 + wpass + 2 * N * d * V / R + N * V * k["ew_lora"] + wpass
    cg = (2 * N * d * V + max(1, max_iter) * 4 * N * d * V) / k["cg_pair"] + (1 + 2 * max(1, max_iter)) * wpass
    return {"dual-keep": keep + solve + k["call"], "dual-stream": stream + solve + k["call"], "cg": cg + k["call"]}


def keep_groups(lengths: Sequence[int]) -> List[Tuple[int, int]]:
    """Consecutive conversations grouped so that no group has more rows than the longest one
    (the kept tiles of a batch never exceed those of its longest conversation)."""
    cap = max(lengths)
    groups, g0, rows = [], 0, 0
    for k, n in enumerate(lengths):
        if k > g0 and rows + n > cap:
            groups.append((g0, k))
            g0, rows = k, 0
        rows += n
    groups.append((g0, len(lengths)))
    return groups


def memory_allows(mode: str, lengths: Sequence[int], d: int, V: int, esz: int, *, keep_budget_bytes: int,
                  gram_budget_bytes: int) -> Dict[str, bool]:
    """Which plans the memory budgets allow (module doc, rule 1)."""
    if mode == "hidden":
        m = max(min(T, d) for T in lengths)
        return {"dual": 2 * esz * m * m <= gram_budget_bytes, "cg": True}
    dual = esz * (sum(T * T for T in lengths) + max(lengths) ** 2) <= gram_budget_bytes
    return {"dual-keep": dual and esz * max(lengths) * V <= keep_budget_bytes, "dual-stream": dual, "cg": True}


def choose(mode: str, lengths: Sequence[int], d: int, V: int, *, max_iter: int, keep_budget_bytes: int,
           gram_budget_bytes: int, backend: str = "torch", device: str = "cpu", dtype: torch.dtype = torch.float32,
           model_dtype: Optional[torch.dtype] = None, solver: str = "auto") -> Plan:
    """The plan an update runs. ``solver``: "auto" (module doc), or "dual" / "cg" forced (then only
    the LoRA dual's keep-or-stream choice is made here, by the same rules). Cached: a session
    repeats the same shapes."""
    return _choose(mode, tuple(lengths), d, V, max_iter, keep_budget_bytes, gram_budget_bytes, backend, device, dtype,
                   model_dtype, solver)


@functools.lru_cache(maxsize=256)
def _choose(mode: str, lengths: Tuple[int, ...], d: int, V: int, max_iter: int, keep_budget_bytes: int,
            gram_budget_bytes: int, backend: str, device: str, dtype: torch.dtype, model_dtype: Optional[torch.dtype],
            solver: str) -> Plan:
    est = estimate(mode, lengths, d, V, max_iter=max_iter, backend=backend, device=device, dtype=dtype,
                   model_dtype=model_dtype)
    esz = 8 if dtype == torch.float64 else 4
    ok = memory_allows(mode, lengths, d, V, esz, keep_budget_bytes=keep_budget_bytes,
                       gram_budget_bytes=gram_budget_bytes)
    allowed = tuple(p for p in est if ok[p])
    if mode == "hidden":
        dual_ok = ok["dual"]
        best_dual, dual_s = "dual", est["dual"]
        keep = False
    else:
        keep = ok["dual-keep"] and est["dual-keep"] <= est["dual-stream"]
        best_dual = "dual-keep" if keep else "dual-stream"
        dual_s = est[best_dual]
        dual_ok = ok["dual-stream"]
    if solver == "dual":
        return Plan("dual", keep, est, allowed)
    if solver == "cg":
        return Plan("cg", False, est, allowed)
    if dual_ok and dual_s <= (1 + DUAL_TIE) * est["cg"]:
        return Plan("dual", keep, est, allowed)
    return Plan("cg", False, est, allowed)
