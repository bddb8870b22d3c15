"""The per-token epilogue of the one pass in two small Triton launches (MATH.md sections 1, 4 and 6).

After the probability-tile kernel (:mod:`.prob_tiles`) everything the plans need per token is a few
elementwise formulas on its (splits, N) partials; written as torch ops they are dozens of tiny launches.
Here they are two kernels, formula for formula the torch rules they replace:

- :func:`combine_partials_fused` -- one program per block of tokens: the online-softmax combine of the
  per-(split, token) partials (:func:`rosa_ext.kernels.tile_layout.combine_partials`, the one pass's
  branch): lse_off, the split scales, r̂ . b, r̂ . r̂, the target logit z_y, and lse, log p, log(1 - p) from
  logit(p) = z_y - lse_off (:func:`rosa_ext.common.jacobian.split_logits`), q = 1 - p and p.
- :func:`linearize_tokens` -- one program per conversation: the linearisation of
  :meth:`rosa_ext.common.jacobian.Linearization.at` with split stats -- the conversation's scale
  ``shift = max_t (log p_t + log(1 - p_t))`` (0 where not finite), the rows' scalar
  ``f = exp(log p + log(1 - p) - shift)``, p, the target ``g = (p* - p) e^-shift`` of
  :func:`rosa_ext.common.jacobian.residual_target` and the unscaled target ``g e^shift``, b[y_t] of a LoRA,
  and whether the conversation's lse and log p are all finite (the flag the dual reads in its one
  acceptance sync); after a LoRA gram pass also the dual's Jacobian factors ca, cb and the max-norm of J's
  entries (:func:`rosa_ext.plans.dual_lora.lora_factors`, :func:`~rosa_ext.plans.dual_lora.jacobian_units`).

The formulas keep the torch rules' care: nothing that rounds to 1 is subtracted (log1p and expm1 are
series here -- ``tl`` has neither, and ``tl.log(1 + u)`` would lose u's digits), a token with no other
finite logit gets lse_off = -inf and scale 0, a target outside [0, V) z_y = -inf, log(1 - p) = 0, and NaN
propagates through every maximum (a NaN logit never hides as a finite number). No host sync, no atomics.
"""
from __future__ import annotations

from typing import NamedTuple, Optional

import torch
import triton
import triton.language as tl

from ..common.validation import RosaInputError
from ._tiles import guard_launches, interpreter_safe

#: tokens per program of the combine (and per step of a conversation's loop in the linearisation)
BLOCK_TOKENS = 256
#: columns of h per step of the LoRA factors' max |h_t| (a BLOCK_TOKENS x BLOCK_D tile)
BLOCK_D = 16
_FLT_MAX = 3.4028234663852886e38


@triton.jit
def _nan_max(acc, x):
    """Elementwise max that propagates NaN (``tl.maximum`` does not)."""
    return tl.where((x > acc) | (x != x), x, acc)


@triton.jit
def _log1p_unit(u):
    """log(1 + u) for u in [0, 1] (NaN propagates) as 2 atanh(s), s = u / (2 + u) <= 1/3, by its odd
    series to s^19 (the rest < 1e-10 relative): a few ulps, also where 1 + u rounds to 1; u itself for a
    u below 1e-20."""
    s = u / (2.0 + u)
    s2 = s * s
    p = 0.05263157894736842
    p = p * s2 + 0.058823529411764705
    p = p * s2 + 0.06666666666666667
    p = p * s2 + 0.07692307692307693
    p = p * s2 + 0.09090909090909091
    p = p * s2 + 0.1111111111111111
    p = p * s2 + 0.14285714285714285
    p = p * s2 + 0.2
    p = p * s2 + 0.3333333333333333
    return tl.where(u < 1e-20, u, 2.0 * s * (1.0 + s2 * p))  # u itself below: exact, subnormals too


@triton.jit
def _one_minus_exp_neg(x):
    """1 - e^-x = -expm1(-x) for x >= 0 (NaN propagates): the Taylor series below 1/2 (no cancellation
    for a tiny x), 1 - exp(-x) above."""
    small = x < 0.5
    xs = tl.where(small, x, 0.0)
    p = 1.0 - xs * 0.07692307692307693
    p = 1.0 - xs * 0.08333333333333333 * p
    p = 1.0 - xs * 0.09090909090909091 * p
    p = 1.0 - xs * 0.1 * p
    p = 1.0 - xs * 0.1111111111111111 * p
    p = 1.0 - xs * 0.125 * p
    p = 1.0 - xs * 0.14285714285714285 * p
    p = 1.0 - xs * 0.16666666666666666 * p
    p = 1.0 - xs * 0.2 * p
    p = 1.0 - xs * 0.25 * p
    p = 1.0 - xs * 0.3333333333333333 * p
    p = 1.0 - xs * 0.5 * p
    return tl.where(small, xs * p, 1.0 - tl.exp(-x))


@triton.jit
def _softplus(x):
    """torch's softplus (threshold 20): x above 20, else log(1 + e^x) = max(x, 0) + log1p(e^-|x|)."""
    return tl.where(x > 20.0, x, tl.where(x > 0.0, x, 0.0) + _log1p_unit(tl.exp(-tl.abs(x))))


@triton.jit
def _logaddexp(a, b):
    """torch.logaddexp: a where a and b are the same infinity, else max + log1p(e^-|a - b|)."""
    m = tl.where(a < b, b, a)
    r = m + _log1p_unit(tl.exp(-tl.abs(a - b)))
    return tl.where((tl.abs(a) == float("inf")) & (a == b), a, r)


@triton.jit
def _combine_kernel(part_ptr, S, N, s_k, lse_ptr, lse_off_ptr, scale_ptr, q_ptr, pt_ptr, rb_ptr, ss_ptr, zy_ptr,
                    logp_ptr, logq_ptr, big, HAS_LORA: tl.constexpr, BLOCK: tl.constexpr):
    """Tokens [pid BLOCK, (pid + 1) BLOCK) of the combine (:func:`combine_partials_fused`): the partials
    ``part[k, s, t]`` at ``part_ptr + k s_k + s N + t`` (k: 0 ref, 1 q, 3 rb, 4 ss, 5 z_y); writes the (N,)
    results and the (S, N) scales."""
    offs = tl.program_id(0) * BLOCK + tl.arange(0, BLOCK)
    mask = offs < N
    M = tl.full([BLOCK], float("-inf"), tl.float32)
    zy = tl.full([BLOCK], float("-inf"), tl.float32)
    for s in range(S):  # (lanes past N read harmless values: the interpreter warns on log(0) and inf - inf)
        M = _nan_max(M, tl.load(part_ptr + s * N + offs, mask=mask, other=0.0))
        zy = _nan_max(zy, tl.load(part_ptr + 5 * s_k + s * N + offs, mask=mask, other=0.0))
    # no other finite logit: w = 0 and lse_off = -inf (M clamped, so no inf - inf); NaN stays NaN
    M = tl.where(M > big, big, tl.where(M < -big, -big, M))
    tot = tl.zeros([BLOCK], tl.float32)
    for s in range(S):
        ref = tl.load(part_ptr + s * N + offs, mask=mask, other=0.0)
        tot += tl.exp(ref - M) * tl.load(part_ptr + s_k + s * N + offs, mask=mask, other=1.0)
    lse_off = M + tl.log(tot)
    none = lse_off == float("-inf")  # nothing stored for such a token: scale 0, not exp(-inf + inf)
    rb = tl.zeros([BLOCK], tl.float32)
    ss = tl.zeros([BLOCK], tl.float32)
    for s in range(S):
        ref = tl.load(part_ptr + s * N + offs, mask=mask, other=0.0)
        sc = tl.where(none, 0.0, tl.exp(ref - lse_off))
        tl.store(scale_ptr + s * N + offs, sc, mask=mask)
        if HAS_LORA:
            rb += tl.load(part_ptr + 3 * s_k + s * N + offs, mask=mask, other=0.0) * sc
        ss += tl.load(part_ptr + 4 * s_k + s * N + offs, mask=mask, other=0.0) * sc * sc
    L = zy - lse_off  # logit(p)
    logp = -_softplus(-L)
    logq = -_softplus(L)
    tl.store(lse_ptr + offs, _logaddexp(lse_off, zy), mask=mask)
    tl.store(lse_off_ptr + offs, lse_off, mask=mask)
    tl.store(q_ptr + offs, tl.exp(logq), mask=mask)
    tl.store(pt_ptr + offs, tl.exp(logp), mask=mask)
    if HAS_LORA:
        tl.store(rb_ptr + offs, rb, mask=mask)
    tl.store(ss_ptr + offs, ss, mask=mask)
    tl.store(zy_ptr + offs, zy, mask=mask)
    tl.store(logp_ptr + offs, logp, mask=mask)
    tl.store(logq_ptr + offs, logq, mask=mask)


_combine_kernel = guard_launches(_combine_kernel)


#: The rows of the combine's per-token output, in order (``out=`` of :func:`combine_partials_fused`).
COMBINE_ROWS = ("lse", "lse_off", "q", "pt", "rb", "ss", "target_logit", "logp", "logq")


def combine_partials_fused(part: torch.Tensor, has_lora: bool = True, out: Optional[torch.Tensor] = None):
    """The one pass's combine of :func:`rosa_ext.kernels.tile_layout.combine_partials` (no given lse) in ONE
    launch: ``part`` (6, S, N) fp32 partials (rows 0 ref, 1 q, 3 rb, 4 ss, 5 z_y; unit stride over tokens,
    split stride N) -> (lse, lse_off, split_scale (S, N), q, pt, rb, ss, target_logit, log p, log(1 - p)),
    (N,) fp32 each but the scales; ``rb`` None without a LoRA term (``has_lora`` False). ``out``: a (9, N)
    fp32 tensor with unit column stride (e.g. columns of a whole problem's table, filled block by block) to
    write the per-token results into, rows :data:`COMBINE_ROWS`; the results are then views of it."""
    _, S, N = part.shape
    if part.stride(2) != 1 or part.stride(1) != N:
        part = part.contiguous()
    dev = part.device
    if out is None:
        out = torch.empty(9, N, dtype=torch.float32, device=dev)
    elif tuple(out.shape) != (9, N) or out.dtype != torch.float32 or out.stride(1) != 1 or out.device != dev:
        raise RosaInputError(f"rosa_ext.kernels.combine_partials_fused: out must be a (9, {N}) float32 tensor "
                             f"with unit column stride on {dev}, got {tuple(out.shape)} {out.dtype}", "out")
    scale = torch.empty(S, N, dtype=torch.float32, device=dev)
    lse, lse_off, q, pt, rb, ss, zy, logp, logq = out.unbind(0)
    if N:
        _combine_kernel[(triton.cdiv(N, BLOCK_TOKENS),)](
            part, S, N, part.stride(0), lse, lse_off, scale, q, pt, rb, ss, zy, logp, logq, _FLT_MAX,
            HAS_LORA=has_lora, BLOCK=BLOCK_TOKENS, num_warps=4)
    return lse, lse_off, scale, q, pt, rb if has_lora else None, ss, zy, logp, logq


@triton.jit
def _residual(logp, logq, r, d, shift):
    """:func:`rosa_ext.common.jacobian.residual_target` of one block (reward r, d = r / beta) times e^-shift."""
    logp = tl.where(logp > 0.0, 0.0, logp)
    L = logp - logq
    a = L + d
    absL = tl.abs(L)
    absd = tl.abs(d)
    same = (L >= 0.0) == (d >= 0.0)
    over = absL - absd
    E = tl.where(same, -absL, -tl.where(over < 0.0, 0.0, over)) - shift
    sgn = tl.where(d > 0.0, 1.0, tl.where(d < 0.0, -1.0, d))
    g = sgn * _one_minus_exp_neg(absd) * tl.exp(E) / ((1.0 + tl.exp(-absL)) * (1.0 + tl.exp(-tl.abs(a))))
    return tl.where(r == 0.0, 0.0, g)


@triton.jit
def _abs_max_rows(h_ptr, offs, m, D, s_hn, s_hd, BLOCK_D: tl.constexpr):
    """max |h[t, :]| over the rows ``offs`` (where ``m``) -> a vector over those rows (NaN propagates)."""
    mx = tl.zeros([offs.shape[0]], tl.float32)
    for d0 in range(0, D, BLOCK_D):
        cols = d0 + tl.arange(0, BLOCK_D)
        x = tl.load(h_ptr + offs[:, None].to(tl.int64) * s_hn + cols[None, :] * s_hd,
                    mask=m[:, None] & (cols < D)[None, :], other=0.0).to(tl.float32)
        a = tl.abs(x)
        bad = tl.max((a != a).to(tl.int32), axis=1) > 0
        mx = _nan_max(mx, tl.where(bad, float("nan"), tl.max(tl.where(a != a, 0.0, a), axis=1)))
    return mx


@triton.jit
def _linearize_kernel(logp_ptr, logq_ptr, lse_ptr, off_ptr, reward_ptr, beta, lb_ptr, y_ptr, s_lb, V,
                      p_ptr, f_ptr, g_ptr, tgt_ptr, by_ptr, shift_ptr, finite_ptr,
                      rb_ptr, ah_ptr, h_ptr, D, s_hn, s_hd, lora_scale, ca_ptr, cb_ptr, jmax_ptr,
                      HAS_LORA: tl.constexpr, FACTORS: tl.constexpr, BLOCK: tl.constexpr, BLOCK_D: tl.constexpr):
    """Conversation ``pid`` (tokens [off[pid], off[pid + 1])) of :func:`linearize_tokens`: one loop for its
    scale and finiteness, one for the per-token results (and, ``FACTORS``, the LoRA Jacobian factors and
    their max-norm)."""
    b = tl.program_id(0)
    lo = tl.load(off_ptr + b)
    hi = tl.load(off_ptr + b + 1)
    mx = tl.full([BLOCK], float("-inf"), tl.float32)
    bad = tl.zeros([BLOCK], tl.int32)
    for t0 in range(lo, hi, BLOCK):
        offs = t0 + tl.arange(0, BLOCK)
        m = offs < hi
        lp = tl.load(logp_ptr + offs, mask=m, other=0.0)
        ls = tl.load(lse_ptr + offs, mask=m, other=0.0)
        lf = tl.where(m, lp + tl.load(logq_ptr + offs, mask=m, other=0.0), float("-inf"))
        mx = _nan_max(mx, lf)
        nonfinite = (lp != lp) | (tl.abs(lp) == float("inf")) | (ls != ls) | (tl.abs(ls) == float("inf"))
        bad = tl.maximum(bad, nonfinite.to(tl.int32))
    has_nan = tl.max((mx != mx).to(tl.int32), axis=0)
    top = tl.max(tl.where(mx != mx, float("-inf"), mx), axis=0)
    shift = tl.where((has_nan > 0) | (tl.abs(top) == float("inf")), 0.0, top)  # 0 where not finite
    tl.store(shift_ptr + b, shift)
    tl.store(finite_ptr + b, (tl.max(bad, axis=0) == 0).to(tl.int8))
    r = tl.load(reward_ptr + b)
    d = r / beta
    up = tl.exp(shift)
    amax = tl.zeros([BLOCK], tl.float32)  # max |ca_t|, max |h_t|, max |cb_t| (FACTORS)
    hmax = tl.zeros([BLOCK], tl.float32)
    bmax = tl.zeros([BLOCK], tl.float32)
    for t0 in range(lo, hi, BLOCK):
        offs = t0 + tl.arange(0, BLOCK)
        m = offs < hi
        lp = tl.load(logp_ptr + offs, mask=m, other=0.0)
        lq = tl.load(logq_ptr + offs, mask=m, other=0.0)
        tl.store(p_ptr + offs, tl.exp(lp), mask=m)
        f = tl.exp(lp + lq - shift)
        tl.store(f_ptr + offs, f, mask=m)
        g = _residual(lp, lq, r, d, shift)
        tl.store(g_ptr + offs, g, mask=m)
        tl.store(tgt_ptr + offs, g * up, mask=m)
        if HAS_LORA:
            y = tl.load(y_ptr + offs, mask=m, other=0)
            ok = m & (y >= 0) & (y < V)
            by = tl.load(lb_ptr + b.to(tl.int64) * s_lb + y, mask=ok, other=0.0)
            tl.store(by_ptr + offs, by, mask=m)
            if FACTORS:  # J_t,a = ca_t h_t, J_t,b = cb_t (e_{y_t} - r̂_t) (plans.dual_lora.lora_factors)
                sf = lora_scale * f
                ca = sf * (by - tl.load(rb_ptr + offs, mask=m, other=0.0))
                cb = sf * tl.load(ah_ptr + offs, mask=m, other=0.0)
                tl.store(ca_ptr + offs, ca, mask=m)
                tl.store(cb_ptr + offs, cb, mask=m)
                amax = _nan_max(amax, tl.where(m, tl.abs(ca), 0.0))
                bmax = _nan_max(bmax, tl.where(m, tl.abs(cb), 0.0))
                hmax = _nan_max(hmax, _abs_max_rows(h_ptr, offs, m, D, s_hn, s_hd, BLOCK_D))
    if FACTORS:  # the max-norm of J's entries: max(max |ca| max |h|, max |cb|), NaN kept
        a_ = tl.max(tl.where(amax != amax, float("inf"), amax), axis=0)
        h_ = tl.max(tl.where(hmax != hmax, float("inf"), hmax), axis=0)
        b_ = tl.max(tl.where(bmax != bmax, float("inf"), bmax), axis=0)
        nan = tl.max(((amax != amax) | (hmax != hmax) | (bmax != bmax)).to(tl.int32), axis=0)
        j = a_ * h_
        j = tl.where(b_ > j, b_, j)
        tl.store(jmax_ptr + b, tl.where(nan > 0, float("nan"), j))


_linearize_kernel = guard_launches(_linearize_kernel)


class TokenLinearization(NamedTuple):
    """What :func:`linearize_tokens` returns: ``p``, ``f``, ``g``, ``target`` (N,) fp32; ``by`` (N,) fp32 or
    None; ``shift`` (B,) fp32; ``finite`` (B,) bool; with the LoRA factors asked for, ``ca``, ``cb`` (N,) fp32
    and ``jmax`` (B,) fp32, else None."""

    p: torch.Tensor
    f: torch.Tensor
    g: torch.Tensor
    target: torch.Tensor
    by: Optional[torch.Tensor]
    shift: torch.Tensor
    finite: torch.Tensor
    ca: Optional[torch.Tensor] = None
    cb: Optional[torch.Tensor] = None
    jmax: Optional[torch.Tensor] = None


def linearize_tokens(logp: torch.Tensor, logq: torch.Tensor, lse: torch.Tensor, offsets: torch.Tensor,
                     reward: torch.Tensor, beta: float, lora_b: Optional[torch.Tensor] = None,
                     targets: Optional[torch.Tensor] = None, *, rb: Optional[torch.Tensor] = None,
                     ah: Optional[torch.Tensor] = None, hidden: Optional[torch.Tensor] = None,
                     lora_scale: float = 0.0) -> TokenLinearization:
    """The split-stats linearisation of N packed tokens in ONE launch (module doc), fp32.

    Args:
        logp, logq, lse: (N,) fp32 log p_t, log(1 - p_t) (exact, from a pass that split the target off) and
            the log-sum-exp, contiguous.
        offsets: (B + 1,) int32 device tensor, conversation b holds tokens [offsets[b], offsets[b + 1]).
        reward: (B,) fp32, each conversation's reward; ``beta`` the KL coefficient (> 0).
        lora_b: (B, V) fp32 with unit column stride (row stride 0: one row shared), and ``targets`` (N,)
            int64: then ``by`` = lora_b[b, y_t] (0 for a target outside [0, V)); None: ``by`` None.
        rb, ah: (N,) fp32 r̂_t . b and a . h_t of a LoRA gram pass, ``hidden`` (N, d) and ``lora_scale`` s
            (with ``lora_b``): then also the LoRA dual's Jacobian factors (``plans.dual_lora.lora_factors``)
            ``ca`` = s f (by - rb), ``cb`` = s f ah and per conversation ``jmax`` = max(max_t |ca_t| max_t
            max|h_t|, max_t |cb_t|), the max-norm of J's entries (NaN where any of them is NaN).
    Returns:
        :class:`TokenLinearization`: ``p`` = exp(log p), ``f`` = exp(log p + log(1 - p) - shift_b),
        ``g`` = (p* - p) e^-shift_b (exactly 0 for a zero reward), ``target`` = g e^shift_b (what a step
        reports; may underflow), ``shift`` (B,) the max of log p + log(1 - p) over each conversation (0
        where not finite), ``finite`` (B,) whether its lse and log p are all finite. No host sync.
    """
    N, B = logp.shape[0], reward.shape[0]
    dev = logp.device
    out = torch.empty(5, N, dtype=torch.float32, device=dev)
    p, f, g, tgt, by = out.unbind(0)
    shift = torch.empty(B, dtype=torch.float32, device=dev)
    finite = torch.empty(B, dtype=torch.int8, device=dev)
    has_lora = lora_b is not None
    if has_lora and lora_b.stride(-1) != 1:
        lora_b = lora_b.contiguous()
    lb = lora_b if has_lora else out
    V = int(lora_b.shape[-1]) if has_lora else 0
    # one row of b shared by every conversation ((V,) or (1, V), as _tiles.table_rows reads it): row stride 0
    s_lb = (lora_b.stride(0) if lora_b.dim() == 2 and lora_b.shape[0] > 1 else 0) if has_lora else 0
    factors = has_lora and rb is not None and ah is not None and hidden is not None
    if factors:
        (h,) = interpreter_safe(hidden)
        ca, cb = torch.empty(2, N, dtype=torch.float32, device=dev).unbind(0)
        jmax = torch.empty(B, dtype=torch.float32, device=dev)
    else:
        h, ca, cb, jmax = out, None, None, None
    if B:
        _linearize_kernel[(B,)](
            logp, logq, lse, offsets, reward, float(beta), lb, targets if has_lora else offsets, s_lb, V,
            p, f, g, tgt, by, shift, finite, rb if factors else out, ah if factors else out, h,
            int(h.shape[-1]) if factors else 0, h.stride(0) if factors else 0, h.stride(-1) if factors else 0,
            float(lora_scale), ca if factors else out, cb if factors else out, jmax if factors else shift,
            HAS_LORA=has_lora, FACTORS=factors, BLOCK=BLOCK_TOKENS, BLOCK_D=BLOCK_D, num_warps=4)
    return TokenLinearization(p, f, g, tgt, by if has_lora else None, shift, finite.view(torch.bool), ca, cb, jmax)

