"""Probability tiles: the off-target distribution written to memory in ONE pass over W (MATH.md section 4).

One Triton pass over W writes, per token t and vocabulary entry v, the tiles of one of two forms:

- the one pass (no lse given; the engines' path): r̂, the softmax of the logits WITHOUT the target
  entry,

      R[t, v] = r̂_t[v] = exp(z_t[v] - lse_off_t)   for v != y_t,      R[t, y_t] = 0,

  each row summing to 1 and of order one however confident or unlikely the token is;
- with a given lse (a log-sum-exp from elsewhere): P, pi_t's off-target entries,

      P[t, v] = pi_t[v] = exp(z_t[v] - lse_t)      for v != y_t,      P[t, y_t] = 0

  (P = (1 - p_t) r̂_t: ``r_t`` of MATH.md section 4), each row summing to 1 - p_t;

and per token, accumulated in fp32 in the same pass (:class:`ProbTiles`):

- ``q`` (N,) = 1 - p_t: with a given lse the sum of P's entries (never formed as ``1 - p``, which is
  rounding noise once p_t is within a few ulps of 1); in the one pass exp(log(1 - p_t)) from
  logit(p_t) = z_y - lse_off, exact;
- ``pt`` (N,) = p_t, the target's probability (0 for a target outside [0, V): the rows another rank of
  a vocabulary-parallel head owns are never split);
- ``rb`` (N,) = (tile row) . b_seg -- r̂_t . b, or P_t . b (LoRA), or None without a LoRA term;
- ``ss`` (N,) = (tile row) . (tile row), for the relative ridge (section 6);
- ``lse`` (N,); in the one pass also ``lse_off`` (N,), the log-sum-exp of the other logits, and the
  target logit z_t[y_t], from which lse, log p and log(1 - p) are exact however large |z_y - lse_off|.

After it every heavy product of the dual and of CG is a GEMM or GEMV over the tiles
(:mod:`.tile_gemms`): hidden ``r̂ W``, the LoRA Gram ``r̂ r̂^T`` with the target cross terms
``r̂_t[y_u]`` gathered, the VJP ``w^T r̂``; no logits are recomputed.

**The one pass: the target split off, references, headroom, the combine.** Every logits tile has its
targets' entries set to -inf FIRST, so that the references, the exponentials and every sum of the pass
see only the other logits (their target logit comes from one row dot per owning split, before the
loop, stored at once). lse_off is not known while the tiles are written, so (as flash-attention /
flash-decoding do) each program -- one token tile x one vocabulary split -- keeps its own statistics.
Its *reference* for token t is the row maximum of the split's first tile with a finite off-target
entry, and it stores exp(z - ref) with no rescaling as it goes. A later tile may rise above the
reference; :data:`HEADROOM` (33: entries up to e^33 ~ 2^47.6) is what the stored formats and every
product over them can hold (squares and Gram sums of up to 2^20 entries stay below 2^115). The program
keeps the running row maximum too, and if at the end of its split some row's maximum exceeds its
reference by more than the headroom (entries may have overflowed), it writes the whole split again
with the row maxima as references (entries then <= 1): at most once, and only that (token tile, split)
pays it -- so no entry overflows and no row is silently wrong, at the cost of recomputing that split's
logits. The program stores per (split, token) its reference ref_s and the sums q_s, rb_s, ss_s relative
to it, and its split's target logit (-inf where the split does not hold the target). The combine
(one small launch, :func:`.epilogue.combine_partials_fused`; :func:`combine_partials` is the torch
formula): M = max_s ref_s, lse_off = M + log
sum_s exp(ref_s - M) q_s, ``split_scale`` = exp(ref_s - lse_off), r̂ . b = sum_s scale_s rb_s and so on,
z_y the maximum over splits, and lse = logaddexp(lse_off, z_y), log p = -softplus(lse_off - z_y),
log(1 - p) = -softplus(z_y - lse_off) (:func:`rosa_ext.common.jacobian.split_logits`). The tiles stay as
stored: ``r̂ = stored x split_scale`` per split, and the GEMMs apply the scales (their K-split is at the
same splits, at most :data:`GEMM_K_MAX` wide: :mod:`.tile_gemms`). Since the target never enters a
reference, a confident token (p_t within 1e-40 of 1) or an unlikely one (p_t below 1e-40) gives tiles,
sums and products of order one: nothing is handed elsewhere for it. Underflow is no worse than
normalising by lse_off directly: ref_s <= lse_off, so an entry flushes only where z - lse_off < -87 as
there; a split whose whole scale is subnormal (ref_s < lse_off - 87) holds only entries below
e^(33 - 87) = e^-54 of r̂'s mass, which then carry the scale's reduced precision
(python_tests/kernels/test_prob_tiles.py, a jump of 100 inside a split).

With ``lse`` given (:func:`prob_tiles_from_tensors`; the FIXED_REF specialisation) the reference is
that lse: the tiles are P itself, ``split_scale`` None (the two-pass form, for a log-sum-exp from
elsewhere). The tensor-level :func:`probability_tiles` returns P either way (the one pass's r̂ times
1 - p_t: :meth:`ProbTiles.normalize_` with ``pi=True``).

Unmeasured (no GPU here): the time of the one pass against the stats pass + tile kernel it replaces,
how often real logits make a split rewrite itself (the headroom is chosen from the overflow bound, not
from measured logits), and the registers the autotuned configs use at run time (the ahead-of-time
compiles for sm_90 in python_tests/kernels/test_prob_tiles.py, ``ROSA_AOT_ALL=1`` for every
specialisation, show no spill).

The logits tile is the one of the other kernels (:func:`._tiles.logits_tile`: ``tl.dot`` with fp32
accumulation; fp32 operands at :func:`._tiles.fp32_precision`, "tf32x3" by default on the GPU --
the interpreter ignores it and multiplies exactly). Grid: (token tiles, vocabulary splits) as the
stats pass (split count from the tuned BLOCK_T and the SM count, at least V / :data:`GEMM_K_MAX`),
each program loops over the vocabulary tiles of its split and stores them; the per-split partials
(6, splits, N) are combined by a second, small launch. No atomics (deterministic), no host sync, nothing read out of
bounds whatever the seg ids or targets.

Storage precisions of the tiles (``precision``; written for P below, the same for r̂):

- ``"fp32"``: P (N, V) fp32 -- exact to the fp32 rounding of each entry;
- ``"bf16x2"``: P_hi, P_lo (N, V) bf16 with P_hi = bf16(P), P_lo = bf16(P - P_hi) (round to
  nearest even, done with integer ops in the kernel so that the interpreter, which truncates on a
  bf16 cast, rounds the same way as the GPU): P_hi + P_lo = P to 2^-16 relative per entry (a
  bound: bf16 keeps 8 significant bits, so |P - P_hi| <= 2^-8 P and P_lo rounds that to 2^-8
  of itself; P - P_hi itself is exact in fp32). Same bytes as fp32, but the GEMMs over it run on the
  bf16 tensor cores (two products into one fp32 accumulator) at about fp32 accuracy;
- ``"bf16"`` (opt-in, fast): P_hi only, 2^-8 relative per entry; half the bytes and half the GEMMs.

The bounds are per stored entry, so they hold for one-pass tiles too: r̂ = stored x ``split_scale``
adds one fp32 rounding (2^-24) where the products apply the scale.

Measured error of each -- a CPU EMULATION, not the GPU: ``benchmarks/bench_prob_tiles.py --emulate``
runs the kernel's arithmetic in torch (fp32 logits from exact products of the bf16 inputs, fp32 lse,
the target split, round-to-nearest hi/lo) and the GEMMs of :mod:`.tile_gemms`, whose bf16 parts are
widened on the CPU (exact products, fp32 accumulation: what a bf16 tensor-core GEMM with fp32
output computes, in another order). T = 256, d = 896, V = 32000, bf16 h with correlated rows and
bf16 W; relative Frobenius error against float64 on the same inputs (results file
``benchmarks/results/prob_tiles_emulation.json``):

    =========  =======  =======  ===========  ======================
    precision  P        P W      LoRA Gram K  VJP w^T (e_y - pi)
    =========  =======  =======  ===========  ======================
    fp32       1.3e-06  1.3e-06  1.3e-06      9.2e-07
    bf16x2     2.6e-06  2.5e-06  2.0e-06      2.3e-06
    bf16       1.6e-03  1.6e-03  1.0e-03      7.2e-04
    =========  =======  =======  ===========  ======================

(fp32's error is that of the fp32 logits and lse, |z| up to 33 here (median max pi_t 0.45); bf16x2 adds its 2^-16
bound's worth; bf16 alone is ~1e-3. The emulation normalises by lse as the two-pass form does and its
GEMMs accumulate by rounding to nearest; the tensor cores' truncating accumulation and the K-split
that bounds it are in :mod:`.tile_gemms`. The kernel's own output is checked under the interpreter in
python_tests/kernels/test_prob_tiles.py, where V = 32000 would be too slow.)
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..common.validation import RosaInputError
from ._tiles import (
    AUTOTUNE_KEY,
    autotuned,
    check_model,
    fp32_precision,
    interpreter_safe,
    lora_args,
    make_prune,
    n_bucket,
    sm_count,
    split_launch,
    split_logits_tile,
    split_range,
    split_width,
    table_rows,
    tile_configs,
)
from .epilogue import combine_partials_fused

# the tiles' layout and the combine of the partials (re-exported: callers import them from here too)
from .tile_layout import (  # noqa: F401
    _OUT_MODE,
    PRECISIONS,
    ProbTiles,
    check_precision,
    combine_partials,
    split_row_views,
    split_views,
    tile_buffers,
)

#: (BLOCK_T, BLOCK_V, BLOCK_D, num_warps, num_stages) of this kernel on Hopper: at most 32 tile
#: elements per thread. Besides the logits tile it holds the probabilities, the target split and
#: the stored parts, and ahead-of-time compiles for sm_90 (ptxas -v; every OUT_MODE, LoRA with one
#: or per-conversation b rows and without) showed the stats kernels' 64-per-thread tiles spilling
#: here: 128x128x64 with 8 warps 16-308 bytes, with 4 warps 450-2100, 128x256 up to 1.8 KB, and
#: 64x256 92 bytes (fp32 P, per-conversation b). These compile with no spill in every
#: specialisation (both reference modes too), the wgmma ones (BLOCK_T >= 64) with wgmma
#: (python_tests/kernels/test_prob_tiles.py). The decode-sized 16x128 tile takes a 6th entry, maxnreg
#: 192: without it ptxas (Triton 3.9's, --regAllocOptLevel=2) caps itself at 168 registers and the
#: one-pass bf16x2 specialisation spilled 16-24 bytes; with it, 178-189 registers and no spill.
#: Several tf32x3 specialisations use 250-254 registers (128x64x32 with per-conversation b rows and a
#: given lse: 254): a change to the kernel body can tip them into spilling -- rerun the compile test with
#: ROSA_AOT_ALL=1 (taking the targets off before the reference tipped the one pass's 128x64x32 into an
#: 8-byte spill until the target logit was stored before the loop instead of held through it).
#: Registers of every specialisation: benchmarks/results/prob_tiles_sm90_registers.txt.
_HALF = [
    (64, 128, 64, 8, 3),
    (128, 64, 64, 8, 3),
    (64, 64, 64, 4, 4),
    (16, 128, 64, 4, 3, 192),
]
_FP32_TC = [
    (128, 64, 32, 8, 3),
    (64, 128, 32, 8, 3),
    (64, 64, 32, 4, 3),
    (32, 64, 32, 4, 3),
]
#: (the one-pass specialisation of a 32x64x32 tile with 4 warps spilled 16-24 bytes at 168-255 registers;
#: with 8 warps it needs 146-178 and spills nothing)
_FP32_IEEE = [
    (64, 64, 32, 8, 3),
    (32, 64, 32, 8, 3),
    (16, 64, 64, 4, 3),
]
POOLS = (_HALF, _FP32_TC, _FP32_IEEE)


@triton.jit
def round_bf16(x):
    """fp32 -> the nearest bf16 value (ties to even), still as fp32, by integer ops on the bits.

    The result is exactly representable in bf16, so a later ``.to(tl.bfloat16)`` is exact whatever
    rounding the cast does (the interpreter truncates). Finite inputs only (P is in [0, 1])."""
    bits = x.to(tl.int32, bitcast=True)
    rounded = (bits + 0x7FFF + ((bits >> 16) & 1)) & -65536  # -65536 = 0xFFFF0000 as int32
    return rounded.to(tl.float32, bitcast=True)


#: The most an entry of a one-pass tile may exceed its split's reference by: e^33 (~2^47.6). A
#: stored entry is then <= 2^47.6, its square <= 2^95.2, and a sum of up to 2^20 squares (a split's
#: ``r . r``, one entry of the Gram over a split, V <= 2^20) <= 2^115.2: nothing the kernel or the
#: GEMMs over its tiles form can overflow fp32 (2^128), with 2^12 to spare for the other operand of
#: a product (|W|, u, the VJP's weights). A tile whose row maximum is further above the reference
#: makes its program write the split again relative to the row maxima (module docstring).
HEADROOM = 33.0


@triton.jit
def _emit_tile(z, bv, ref, y, offs_v, mask_v, mask_t, p_base, lo_base, row, q, pt, rb, ss,
               HAS_LORA: tl.constexpr, OUT_MODE: tl.constexpr, ONE_PASS: tl.constexpr):
    """Store one tile exp(z - ref) of P with the target entries split off and zeroed, and add its row
    sums to the per-token partials -> (q, pt, rb, ss). ONE_PASS: the caller has set the target entries of
    ``z`` to -inf already (before the reference saw them), and ``pt`` is not summed (the combine has the
    target logit); otherwise the target entries are split off here and ``pt`` sums them. A row whose
    reference is -inf (every logit so far -inf) stores zeros."""
    ref_safe = tl.where(ref == float("-inf"), 0.0, ref)
    pi = tl.exp(z - ref_safe[:, None])  # masked vocabulary columns (and ONE_PASS targets): exp(-inf) = 0
    if ONE_PASS:
        r = pi
    else:
        hit = y[:, None] == offs_v[None, :]  # the target split (MATH.md section 4)
        pt += tl.sum(tl.where(hit, pi, 0.0), 1)
        r = tl.where(hit, 0.0, pi)
    q += tl.sum(r, 1)
    ss += tl.sum(r * r, 1)
    if HAS_LORA:
        rb += tl.sum(r * bv, 1)
    loc = row[:, None] + offs_v[None, :]
    keep = mask_t[:, None] & mask_v[None, :]
    if OUT_MODE == 0:
        tl.store(p_base + loc, r, mask=keep)
    else:
        hi = round_bf16(r)
        tl.store(p_base + loc, hi.to(tl.bfloat16), mask=keep)
        if OUT_MODE == 1:
            tl.store(lo_base + loc, round_bf16(r - hi).to(tl.bfloat16), mask=keep)
    return q, pt, rb, ss


@triton.jit
def _target_logit(h_ptr, w_ptr, bias_ptr, lb_ptr, ah, seg, y, own, offs_t, D, s_hn, s_hd, s_wv, s_wd, s_lb, n_lb,
                  lora_scale, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, SINGLE: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr):
    """z_t[y_t] = h_t . W[y_t] (+ c[y_t]) (+ s (a . h_t) b_seg[y_t]) of the tokens whose target ``own``
    says this program's split holds (-inf elsewhere: the combine takes the maximum over splits) -> (BLOCK_T,) fp32: fp32 products of the rows, summed
    over d in BLOCK_D chunks, before the vocabulary loop (only the result is live during it)."""
    row_t = offs_t.to(tl.int64)
    row_y = tl.where(own, y, 0).to(tl.int64)
    acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
    for d0 in tl.range(0, D, BLOCK_D, num_stages=1):  # not pipelined: a few rows, once per program
        offs_d = d0 + tl.arange(0, BLOCK_D)
        m = own[:, None] & (offs_d < D)[None, :]
        h = tl.load(h_ptr + row_t[:, None] * s_hn + offs_d[None, :] * s_hd, mask=m, other=0.0).to(tl.float32)
        w = tl.load(w_ptr + row_y[:, None] * s_wv + offs_d[None, :] * s_wd, mask=m, other=0.0).to(tl.float32)
        acc += tl.sum(h * w, 1)
    if HAS_BIAS:
        acc += tl.load(bias_ptr + row_y, mask=own, other=0.0).to(tl.float32)
    if HAS_LORA:
        if SINGLE:
            by = tl.load(lb_ptr + row_y, mask=own, other=0.0)
        else:
            seg_ok = (seg >= 0) & (seg < n_lb)
            by = tl.load(lb_ptr + tl.where(seg_ok, seg, 0).to(tl.int64) * s_lb + row_y, mask=own & seg_ok, other=0.0)
        acc += lora_scale * ah * by
    return tl.where(own, acc, float("-inf"))


@autotuned(tile_configs(POOLS), AUTOTUNE_KEY + ["OUT_MODE", "FIXED_REF"],
           prune_configs_by={"early_config_prune": make_prune(*POOLS)})
@triton.jit
def _prob_tile_kernel(h_ptr, w_ptr, bias_ptr, lb_ptr, ah_ptr, seg_ptr, lse_ptr, y_ptr, p_ptr, lo_ptr,
                      ref_out, q_out, pt_out, rb_out, ss_out, zy_out,
                      N, D, V, s_hn, s_hd, s_wv, s_wd, s_lb, n_lb, s_p, lora_scale, headroom,
                      N_BUCKET, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
                      SINGLE: tl.constexpr, IS_FP32: tl.constexpr, PRECISION: tl.constexpr, OUT_MODE: tl.constexpr,
                      FIXED_REF: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """One program: token tile ``pid_t`` x vocabulary split ``split``; stores its tiles of P relative to
    its reference (OUT_MODE 0: fp32 into p_ptr; 1: bf16 hi into p_ptr and lo into lo_ptr; 2: bf16 hi
    only), row stride s_p, and its (N,) partials at row ``split`` of the (splits, N) buffers: the
    reference, q, pt, rb, ss (relative to the reference) and the target logit z_t[y_t] (-inf where the
    target is not in the split, :func:`_target_logit`; 0 with FIXED_REF).

    FIXED_REF: the reference is lse_ptr's log-sum-exp (the tiles are P itself: the two-pass form; pt
    sums the target entries). Otherwise (the one pass) every token's target entry is taken off each
    logits tile FIRST (set to -inf), so that the reference, the exponentials and every sum see only the
    OTHER logits (MATH.md section 4: nothing then depends on how confident or unlikely the token is); pt
    is 0. The reference of each token is the row maximum of the split's first tile with a finite
    off-target entry (the running maximum is kept as well); if, at the end of the split, some row's
    maximum is more than ``headroom`` above its reference, the program writes the whole split again
    with the maxima as references (module docstring)."""
    pid_t = tl.program_id(0)
    split = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < N
    seg = tl.load(seg_ptr + offs_t, mask=mask_t, other=0)
    y = tl.load(y_ptr + offs_t, mask=mask_t, other=-1)
    if not FIXED_REF:  # 32-bit ids (a register less per row here); one outside [0, V) is never split off
        y = tl.where((y >= 0) & (y < V), y, -1).to(tl.int32)
    ah = tl.zeros((BLOCK_T,), dtype=tl.float32)
    if HAS_LORA:
        ah = tl.load(ah_ptr + offs_t, mask=mask_t, other=0.0)
    if FIXED_REF:
        ref = tl.load(lse_ptr + offs_t, mask=mask_t, other=0.0)
    else:
        ref = tl.full((BLOCK_T,), float("-inf"), dtype=tl.float32)
    m = tl.full((BLOCK_T,), float("-inf"), dtype=tl.float32)
    q = tl.zeros((BLOCK_T,), dtype=tl.float32)
    pt = tl.zeros((BLOCK_T,), dtype=tl.float32)
    rb = tl.zeros((BLOCK_T,), dtype=tl.float32)
    ss = tl.zeros((BLOCK_T,), dtype=tl.float32)
    # stores: int32 offsets within this token tile from one int64 base (fewer registers than an int64
    # address tile; 128 * s_p < 2^31 is checked at launch)
    p_base = p_ptr + (pid_t * BLOCK_T).to(tl.int64) * s_p
    lo_base = lo_ptr + (pid_t * BLOCK_T).to(tl.int64) * s_p
    row = tl.arange(0, BLOCK_T) * s_p
    v_begin, v_end = split_range(V, split)
    out = split * N + offs_t
    zy = tl.zeros((BLOCK_T,), dtype=tl.float32)
    if not FIXED_REF:  # the target logit of the tokens whose target this split holds, before the loop
        zy = _target_logit(h_ptr, w_ptr, bias_ptr, lb_ptr, ah, seg, y, mask_t & (y >= v_begin) & (y < v_end), offs_t,
                           D, s_hn, s_hd, s_wv, s_wd, s_lb, n_lb, lora_scale, HAS_BIAS, HAS_LORA, SINGLE, BLOCK_T,
                           BLOCK_D)
    tl.store(zy_out + out, zy, mask=mask_t)  # stored now: not live during the loop
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v, mask_v, bv, z = split_logits_tile(v0, v_end, h_ptr, w_ptr, bias_ptr, lb_ptr, ah, seg, offs_t,
                                                  mask_t, D, s_hn, s_hd, s_wv, s_wd, s_lb, n_lb, lora_scale,
                                                  HAS_BIAS, HAS_LORA, SINGLE, IS_FP32, PRECISION, BLOCK_T, BLOCK_V,
                                                  BLOCK_D)
        if not FIXED_REF:  # the target split off before the reference sees it
            z = tl.where(y[:, None] == offs_v[None, :], float("-inf"), z)
            mt = tl.max(z, 1)
            ref = tl.where(ref == float("-inf"), mt, ref)
            m = tl.maximum(m, mt)
        q, pt, rb, ss = _emit_tile(z, bv, ref, y, offs_v, mask_v, mask_t, p_base, lo_base, row, q, pt, rb, ss,
                                   HAS_LORA, OUT_MODE, not FIXED_REF)
    if not FIXED_REF:
        # a row whose split rose more than `headroom` above its reference (its entries may have
        # overflowed): the whole split again, each row relative to its maximum (no entry then exceeds 1)
        if tl.max((m > ref + headroom).to(tl.int32), 0) > 0:
            ref = m
            q = tl.zeros((BLOCK_T,), dtype=tl.float32)
            rb = tl.zeros((BLOCK_T,), dtype=tl.float32)
            ss = tl.zeros((BLOCK_T,), dtype=tl.float32)
            for v0 in range(v_begin, v_end, BLOCK_V):
                offs_v, mask_v, bv, z = split_logits_tile(v0, v_end, h_ptr, w_ptr, bias_ptr, lb_ptr, ah, seg,
                                                          offs_t, mask_t, D, s_hn, s_hd, s_wv, s_wd, s_lb, n_lb,
                                                          lora_scale, HAS_BIAS, HAS_LORA, SINGLE, IS_FP32, PRECISION,
                                                          BLOCK_T, BLOCK_V, BLOCK_D)
                z = tl.where(y[:, None] == offs_v[None, :], float("-inf"), z)
                q, pt, rb, ss = _emit_tile(z, bv, ref, y, offs_v, mask_v, mask_t, p_base, lo_base, row, q, pt,
                                           rb, ss, HAS_LORA, OUT_MODE, True)
    tl.store(ref_out + out, ref, mask=mask_t)
    tl.store(q_out + out, q, mask=mask_t)
    tl.store(pt_out + out, pt, mask=mask_t)
    tl.store(ss_out + out, ss, mask=mask_t)
    tl.store(rb_out + out, rb, mask=mask_t)  # zeros without a LoRA term (pt: zeros in the one pass)


#: The widest vocabulary split of a probability-tile launch (a multiple of 256): its splits are the
#: K-split of every GEMM over the tiles (:mod:`.tile_gemms`), so no tensor-core accumulation chain is
#: longer than this (module docstring: the error against float64).
GEMM_K_MAX = 4096


def prob_tiles_from_tensors(hidden: torch.Tensor, weight: torch.Tensor, seg: torch.Tensor,
                            lse: Optional[torch.Tensor], targets: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
                            lora_b: Optional[torch.Tensor] = None, ah: Optional[torch.Tensor] = None,
                            lora_scale: float = 0.0, precision: str = "fp32", out=None,
                            splits: Optional[int] = None, stats_out: Optional[torch.Tensor] = None) -> ProbTiles:
    """Write the off-target probability tiles of N tokens -> :class:`ProbTiles` (one Triton launch over W,
    then a small combine of its (splits, N) partials: one more launch, :mod:`.epilogue`; in torch with a
    given lse): P normalised by a given ``lse``, or (the
    one pass) r̂, the softmax of the other logits, with lse, lse_off and the target logit.

    Args:
        hidden: (N, d) and ``weight`` (V, d), one dtype of fp32 / bf16 / fp16, any strides.
        seg: (N,) int32 conversation of each token (gathers the LoRA b row; sorted is not needed here).
        lse: (N,) fp32 log-sum-exp of each token's logits to normalise by (e.g. a vocabulary-parallel
            head's global one): the tiles are then P itself. None (the one pass): the launch computes
            the row statistics itself, the target split off before any reference is taken; the tiles
            are stored relative to per-(split, token) references and ``split_scale`` normalises them
            to r̂ (``off_target``; module docstring); ``lse``, ``lse_off`` and ``target_logit`` of the
            result are the pass's.
        targets: (N,) int token ids; an id outside [0, V) is never split off.
        bias: (V,) or None; ``lora_b`` (B, V) / (V,) fp32 with ``ah`` (N,) = a_seg . h_t and
            ``lora_scale`` s: the LoRA term s (a . h_t) b of the logits (both or neither).
        precision: "fp32" (default), "bf16x2" or "bf16" (module docstring).
        out: optional ``(p, lo)`` from :func:`tile_buffers` (row stride >= V, unit column stride) to
            write into, e.g. rows of a kept buffer when tokens are blocked.
        splits: force the vocabulary split count (benchmarks, tests; default from the tuned BLOCK_T, the
            SMs and :data:`GEMM_K_MAX`).
        stats_out: the one pass only: a (9, N) fp32 tensor (unit column stride) the combine writes the
            per-token results into (:data:`.epilogue.COMBINE_ROWS`; e.g. columns of a blocked pass's table).
    Returns:
        :class:`ProbTiles`; no host sync. Rows whose seg id is outside lora_b's rows read b = 0.
    """
    who = "rosa_ext.kernels.prob_tiles"
    mode = check_precision(who, precision)
    N, D, V = check_model(hidden, weight, bias)
    for name, x in (("lse", lse), ("seg", seg), ("targets", targets)):
        if x is not None and tuple(x.shape) != (N,):
            raise RosaInputError(f"{who}: {name} must be ({N},), got {tuple(x.shape)}", name)
    if targets.dtype.is_floating_point or seg.dtype.is_floating_point:
        raise RosaInputError(f"{who}: targets and seg must be integer tensors, got {targets.dtype} / {seg.dtype}",
                             "targets")
    if out is None:
        p, lo = tile_buffers(N, V, precision, hidden.device)
    else:
        p, lo = out
        want = torch.float32 if mode == 0 else torch.bfloat16
        for name, x in (("out[0]", p), ("out[1]", lo if mode == 1 else p)):
            if (x is None or x.dtype != want or x.dim() != 2 or tuple(x.shape) != (N, V) or x.stride(1) != 1
                    or x.device != hidden.device):
                raise RosaInputError(f"{who}: {name} must be a ({N}, {V}) {want} tensor with unit column stride on "
                                     f"{hidden.device}", "out")
        if mode == 1 and lo.stride(0) != p.stride(0):
            raise RosaInputError(f"{who}: out's hi and lo must have one row stride", "out")
    if stats_out is not None and lse is not None:
        raise RosaInputError(f"{who}: stats_out is the one pass's (no given lse)", "stats_out")
    if 128 * p.stride(0) >= 2 ** 31:  # the kernel's int32 offsets within a token tile (BLOCK_T <= 128)
        raise RosaInputError(f"{who}: a row stride of {p.stride(0)} elements is too large (at most "
                             f"{(2 ** 31 - 1) // 128})", "out" if out is not None else "weight")
    hidden, weight, bias = interpreter_safe(hidden, weight, bias)
    has_lora, lb, ah_, _ = lora_args(hidden, lora_b, ah, V)
    sms = sm_count(hidden.device)
    rows, grid, rec = split_launch(N, V, _prob_tile_kernel.configs, sms, splits, GEMM_K_MAX)
    part = torch.empty(6, rows, N, dtype=torch.float32, device=hidden.device)
    single = (not has_lora) or lb.shape[0] == 1
    s_lb, n_lb = table_rows(lb)
    fixed = lse is not None
    _prob_tile_kernel[grid](
        hidden, weight, bias if bias is not None else part, lb, ah_, seg.to(torch.int32).contiguous(),
        lse.float().contiguous() if fixed else part, targets.contiguous(), p, lo if lo is not None else p,
        part[0], part[1], part[2], part[3], part[4], part[5],
        N, D, V, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), s_lb, n_lb, p.stride(0),
        float(lora_scale), HEADROOM, N_BUCKET=n_bucket(N), HAS_BIAS=bias is not None, HAS_LORA=has_lora,
        SINGLE=single, IS_FP32=hidden.dtype == torch.float32, PRECISION=fp32_precision(), OUT_MODE=mode,
        FIXED_REF=fixed)
    n = rec["splits"]
    if fixed:
        lse_, lse_off, scale, q, pt, rb, ss, zy, logp, logq = combine_partials(part[:, :n], lse.float())
    else:  # the one pass: its combine in one launch (.epilogue)
        lse_, lse_off, scale, q, pt, rb, ss, zy, logp, logq = combine_partials_fused(part[:, :n], has_lora,
                                                                                      out=stats_out)
    hi_or_p = dict(p=p, hi=None, lo=None) if mode == 0 else dict(p=None, hi=p, lo=lo)
    return ProbTiles(precision, q=q, pt=pt, rb=rb if has_lora else None, ss=ss, split_scale=scale,
                     split_width=split_width(V, n) if n > 1 else 0, lse=lse_, target_logit=zy,
                     off_target=not fixed, lse_off=lse_off, logp=logp, logq=logq, **hi_or_p)


@torch.no_grad()
def probability_tiles(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *,
               lse: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
               lora_a: Optional[torch.Tensor] = None, lora_b: Optional[torch.Tensor] = None,
               lora_scale: Optional[float] = None, seg: Optional[torch.Tensor] = None,
               precision: str = "fp32", prob=None) -> ProbTiles:
    """The tensor-level call (arguments as :mod:`rosa_ext.kernels.ops`): :class:`ProbTiles` of the
    packed problem, P normalised (``split_scale`` None, ``off_target`` False) by ``lse`` (T,) when given,
    else by the problem's own log-sum-exp: for "fp32" tiles from the one pass itself (then
    :meth:`ProbTiles.normalize_` with ``pi=True``, one more fp32 rounding per entry); for the bf16 parts
    from :func:`rosa_ext.kernels.stats` first (one more pass over W), so that their per-entry bounds
    (module docstring) hold as documented -- rescaling stored bf16 parts would round them twice. (The
    engines keep the one pass's r̂ tiles as they are: their GEMMs apply the scales.) With ``prob``
    (:func:`rosa_ext.kernels.prepare`, with targets) no host sync."""
    from .ops import _kw, _problem, _stats  # the ops layer's checks (ops imports nothing from here)

    who = "rosa_ext.kernels.prob_tiles"
    check_precision(who, precision)
    p = _problem(who, prob, hidden, weight, targets, needs_targets=True, bias=bias, lora_a=lora_a, lora_b=lora_b,
                 lora_scale=lora_scale, seg=seg, lse=lse)
    if lse is None and precision != "fp32":
        if "stats" not in p._cache:
            p._cache["stats"] = _stats(p)
        lse = p._cache["stats"].lse
    tiles = prob_tiles_from_tensors(p.hidden, p.weight, p.seg32, lse, p.targets, precision=precision, **_kw(p))
    return tiles.normalize_(pi=True)
