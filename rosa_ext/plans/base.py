"""What every solve plan shares: its result, the linearisation point, CG's call, the vocabulary-parallel
combine of per-token results, and the measured throughput its cost formula reads (MATH.md section 4).

- :class:`Solved`: one solved update (the step, log p and the target of every token, CG's
  iterations and residual, the engine that ran the vocabulary work).
- :func:`linearize`: the target g = p* - p and the Jacobian's per-token factors at the current
  parameters, from a stats pass or from a one-pass plan's per-token results.
- :func:`run_cg`: a CG implementation on a plan's matvec (a breakdown in the right-hand side is
  the inputs' fault and named so).
- :func:`combine_tokens`: a one-pass plan's per-token results over the whole vocabulary of a
  vocabulary-parallel head (MATH.md section 7).
- :data:`THROUGHPUT`, :func:`constants`, :func:`weight_pass_seconds`: the cost model's constants
  (module :mod:`.choose` applies its rules to the plans' formulas).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Callable, Dict, Optional, Tuple, Union

import torch

from ..common import jacobian as J
from ..common import validation as checks
from ..common.types import CGResult, HeadProblem, HeadStats, compute_dtype_of
from ..common.validation import RosaNonFiniteError, RosaNumericalError
from .target import residual_target

WHO = "rosa_update"

Scalar = Union[int, float, torch.Tensor]
#: A CG implementation: ``cg(matvec, b, *, damping, max_iter, tol) -> CGResult`` (rosa_ext.cg).
CGImpl = Callable[..., CGResult]


@dataclass
class Solved:
    """One solved update: ``update`` (B, P), per token ``logp`` and ``target`` (N,), CG
    ``iterations`` (0 for the dual), the relative ``residual`` of the normal equations and the
    ``engine`` that ran the vocabulary work ("torch" or "triton")."""

    update: torch.Tensor
    logp: torch.Tensor
    target: torch.Tensor
    iterations: Scalar
    residual: Scalar
    engine: str = "torch"


# ----------------------------------------------------------------------------- the linearisation point
def linearize(prob: HeadProblem, backend, ps: Optional[object] = None, check: bool = True
              ) -> Tuple[J.Linearization, torch.Tensor]:
    """(the Jacobian's per-token factors, the target g (N,)) at the current parameters.

    ``ps``: a one-pass plan's per-token results (``lse``, ``logp``, ``ah`` and ``pib_off`` = r . b
    without the target entry); otherwise the backend's stats pass runs. ``check``: raise here for
    logits that overflowed (one host sync); the dual folds that check into its acceptance sync.
    """
    if ps is None:
        st = backend.stats(prob)
        by = None
    else:
        by = None if prob.lora_b is None else backend.gather_targets(prob, prob.lora_b)
        pib = None if ps.pib_off is None else ps.pib_off + torch.exp(ps.logp) * by  # pi . b = r . b + p b[y]
        st = HeadStats(lse=ps.lse, logp=ps.logp, ah=ps.ah, pib=pib, q=ps.q, pib_off=ps.pib_off)
    lin = J.Linearization.at(prob, st, backend, by=by)
    g = residual_target(st.logp, prob.reward[prob.seg], prob.beta)
    if check:
        checks.finite_logits(WHO, prob.compute_dtype, st.lse, st.logp)
        if bool(target_underflowed(prob, st.logp).any()):  # a second host read, CG plans only
            raise_target_underflow(prob)
    return lin, g


def target_underflowed(prob: HeadProblem, logp: torch.Tensor) -> torch.Tensor:
    """(B,) bool, no host sync: conversations with a nonzero reward in which every token's p_t is below
    the compute dtype's normal range (p_t < ~1e-38 in float32, log p_t finite): J (proportional to p_t)
    and g = p* - p are then 0 or subnormal, so the step would be a silent zero (or a few bits) where
    float64 gives a real one. (A tiny reward with normal p_t gives a tiny g and a tiny, correct step.)"""
    log_tiny = math.log(torch.finfo(logp.dtype).tiny)
    normal = J.segment_sum(prob, (logp >= log_tiny).to(logp.dtype).unsqueeze(1))[:, 0]
    finite = J.segment_sum(prob, torch.isfinite(logp).to(logp.dtype).unsqueeze(1))[:, 0]
    return (prob.reward != 0) & (normal == 0) & (finite > 0)


def raise_target_underflow(prob: HeadProblem) -> None:
    """The error of :func:`target_underflowed`."""
    checks.fail(WHO, "targets", f"every response token of a conversation is so unlikely that its ROSA target "
                                f"g = p* - p underflows {prob.compute_dtype} (p below ~1e-38): the step would be 0 or "
                                "a few bits where float64 gives a real one; pass float64 inputs", checks.RosaNumericalError)


def logits_finite(lin: J.Linearization) -> torch.Tensor:
    """Whether the pass's log-sum-exp and log p_t are finite (0-dim bool, no host sync)."""
    return checks.all_finite(lin.stats.lse) & checks.all_finite(lin.stats.logp)


def run_cg(cg: CGImpl, matvec, rhs: torch.Tensor, damping: float, prob: HeadProblem) -> CGResult:
    """``cg`` on (A + damping I) x = rhs; NaN/Inf in the right-hand side J^T g is the inputs' fault."""
    named = dict(mode=prob.mode, lora_scale=prob.lora_scale, dtype=prob.compute_dtype)
    try:
        return cg(matvec, rhs, damping=damping, max_iter=prob.max_iter, tol=prob.tol)
    except RosaNonFiniteError as e:
        if e.argument != "b":
            raise
        checks.nonfinite_jacobian(WHO, **named)  # the right-hand side J^T g: the inputs, not the solve
    except RosaNumericalError as e:
        if e.argument != "matvec" or "breakdown" in str(e):
            raise
        checks.nonfinite_jacobian(WHO, **named)  # NaN/Inf from J^T J v: the Jacobian's scale, not CG


# ----------------------------------------------------------------------------- the GPU's pass: probability tiles
def uses_prob_tiles(prob: HeadProblem, backend) -> bool:
    """Whether a one-pass plan runs its pass over W as Triton probability tiles (the stats kernel's lse,
    then the tile kernel writes the N x V off-target probabilities P, then GEMMs over P on tensor cores;
    MATH.md section 4) instead of the torch tiles: on the Triton backend, float32 compute, one process
    holding the whole vocabulary, and P within ``keep_budget_bytes``."""
    return (backend.name == "triton" and prob.compute_dtype == torch.float32 and prob.shard is None
            and prob.num_tokens * prob.vocab_size * 4 <= prob.keep_budget_bytes)


def prob_tiles(prob: HeadProblem, backend):
    """(stats of the Triton stats pass, :class:`~rosa_ext.kernels.prob_tiles.ProbTiles` of the problem,
    log p_t accurate near p_t = 1 from the tiles' off-target sum q). P is stored as bf16 hi + lo parts
    (fp32 accuracy on bf16 tensor cores, MATH.md section 4) for bf16/fp16 models, as fp32 otherwise."""
    from ..kernels.prob_tiles import prob_tiles_from_tensors
    st = backend.stats(prob)
    precision = "fp32" if prob.weight.dtype == torch.float32 else "bf16x2"
    tiles = prob_tiles_from_tensors(prob.hidden, prob.weight, prob.seg, st.lse, prob.targets, bias=prob.bias,
                                    lora_b=prob.lora_b, ah=st.ah, lora_scale=prob.lora_scale if st.ah is not None
                                    else 0.0, precision=precision)
    logp = torch.where(tiles.q <= 0.5, torch.log1p(-tiles.q), st.logp).clamp_max(0.0)
    return st, tiles, logp


# ----------------------------------------------------------------------------- vocabulary-parallel combine
def combine_tokens(prob: HeadProblem, backend, ps, label: str, wide: Optional[torch.Tensor] = None):
    """A local one-pass result's per-token values over the whole vocabulary (MATH.md section 7).

    MAX of the local log-sum-exp, then ONE SUM of e_k = exp(lse_k - m) with the e_k-weighted local
    results (each normalised by its shard's own sum): an online-softmax combine across shards.
    ``backend``: the :class:`~rosa_ext.backends.distributed.DistributedBackend` (its ``comm`` and
    ``owner_logit``). ``wide``: (N, k) more rows to combine the same way (hidden mode's r W).
    Returns (lse, logp, q, pib_off, the combined ``wide`` or None), (N,) each.
    """
    comm = backend.comm
    m = comm.all_max(ps.lse, f"{label}: max")
    e = torch.exp(ps.lse - m)
    cols = [e, e * ps.q, backend.owner_logit(prob, ps.ah)] + ([e * ps.pib_off] if ps.pib_off is not None else [])
    tok = torch.stack(cols, 1)
    if wide is not None:
        tok = torch.cat([tok, e.unsqueeze(1) * wide], 1)
    tot = comm.all_sum(tok, f"{label}: sums")
    s = tot[:, 0]
    lse = m + torch.log(s)
    q = tot[:, 1] / s
    logp = J.target_logp(tot[:, 2], lse, q)
    pib_off = tot[:, 3] / s if ps.pib_off is not None else None
    k = len(cols)
    return lse, logp, q, pib_off, (tot[:, k:] / s.unsqueeze(1) if wide is not None else None)


# ----------------------------------------------------------------------------- the cost model's constants
#: Keys: gemm (flop/s of the tile GEMMs of the passes), ew_hidden / ew_lora (s per tile element and
#: pass: the rank-k fill, exp, sums, the target split), keep_extra (s per kept element: first touch
#: and cold writes), kept_gemv (s per kept element of the VJP GEMV), chol (flop/s of a T = 1024
#: Cholesky), cg_pair (useful flop/s, 4 N d V per JVP + VJP pair of the backend's CG), w_bw (bytes/s
#: at which a pass reads W; visible at small T), widen (s per W element and pass to widen bf16/fp16
#: chunks to fp32), call (s of fixed overhead per update).
#:
#: The CPU entries were measured on the project's 2-core Intel Xeon VM (Sapphire Rapids, AVX-512/AMX),
#: one torch thread, torch 2.13 (``benchmarks/bench_throughput.py`` measures them on any machine;
#: minima of interleaved repetitions). The CUDA entries are NOT measured: data-sheet guesses for an
#: H100/H200, kept only so that ``auto`` decides by the same rules there; replace them with a measurement.
THROUGHPUT: Dict[Tuple[str, str, torch.dtype], Dict[str, float]] = {
    # measured: 2-core Intel Xeon VM (Sapphire Rapids), one thread, torch 2.13.0+cpu (MKL), 2026-11-29
    ("torch", "cpu", torch.float32): dict(gemm=146e9, ew_hidden=1.1e-9, ew_lora=1.25e-9, keep_extra=2.1e-9,
                                          kept_gemv=0.17e-9, chol=28e9, cg_pair=52.5e9, w_bw=20e9, widen=0.3e-9,
                                          call=1.0e-3),
    ("torch", "cpu", torch.float64): dict(gemm=68e9, ew_hidden=4.3e-9, ew_lora=2.9e-9, keep_extra=2.75e-9,
                                          kept_gemv=0.41e-9, chol=17.8e9, cg_pair=27.6e9, w_bw=20e9, widen=0.0,
                                          call=1.0e-3),
    # NOT measured (no GPU was lent): H100/H200 data-sheet guesses. On the Triton backend the one-pass
    # plans run the probability tiles and tensor-core GEMMs over them; Triton's CG pair on tensor cores.
    ("torch", "cuda", torch.float32): dict(gemm=40e12, ew_hidden=0.02e-9, ew_lora=0.02e-9, keep_extra=0.005e-9,
                                           kept_gemv=0.003e-9, chol=2e12, cg_pair=20e12, w_bw=2.5e12, widen=0.0,
                                           call=2e-3),
    ("triton", "cuda", torch.float32): dict(gemm=40e12, ew_hidden=0.02e-9, ew_lora=0.02e-9, keep_extra=0.005e-9,
                                            kept_gemv=0.003e-9, chol=2e12, cg_pair=100e12, w_bw=2.5e12, widen=0.0,
                                            call=2e-3),
}


def constants(backend: str, device: str, dtype: torch.dtype) -> Dict[str, float]:
    """The constants for a backend ("torch", "triton"), device type and compute dtype (nearest entry:
    the same device with the torch backend, then the CPU's fp32)."""
    cd = compute_dtype_of(dtype)
    for key in ((backend, device, cd), ("torch", device, cd), ("torch", device, torch.float32),
                ("torch", "cpu", cd)):
        if key in THROUGHPUT:
            return THROUGHPUT[key]
    return THROUGHPUT[("torch", "cpu", torch.float32)]


def weight_pass_seconds(k: Dict[str, float], V: int, d: int, model_dtype: torch.dtype) -> float:
    """Seconds one pass spends reading W (and widening bf16/fp16 chunks to fp32)."""
    s = V * d * model_dtype.itemsize / k["w_bw"]
    if model_dtype in (torch.bfloat16, torch.float16):
        s += V * d * k["widen"]
    return s

