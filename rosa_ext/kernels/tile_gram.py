"""The LoRA dual's Gram over the probability tiles in two Triton launches (MATH.md section 4).

Per conversation b the LoRA dual needs the centred Gram of the normalised off-target distributions

    K[t, u] = (e_{y_t} - r̂_t) . (e_{y_u} - r̂_u) = r̂_t . r̂_u - r̂_t[y_u] - r̂_u[y_t] + 1(y_t = y_u)

(r̂_t has no target entry, so r̂_t[y_u] = 0 where y_u = y_t). Written as torch ops over the tiles
(:mod:`.tile_gemms`: bf16 hi/lo products per vocabulary split, the split scales, the cross terms gathered,
the centring) it is ~40 launches; here it is two:

1. ``_gram_partial_kernel`` -- grid (row blocks, column blocks, conversations x K-chunks). A program
   computes one BLOCK_T x BLOCK_T block of ``r̂_t . r̂_u`` over its K-chunk of the vocabulary splits: per
   split s its own fp32 accumulator of the stored products (bf16x2: ``hi hi^T + lo hi^T + hi lo^T``, the
   lo lo^T product dropped, at most 2^-16 relative; "bf16": hi hi^T; fp32 tiles: ``tl.dot`` at
   :func:`._tiles.fp32_precision`), then ``acc += scale_s[t] scale_s[u] acc_s`` -- so, as in
   :mod:`.tile_gemms`, no tensor-core accumulation chain is longer than one split (at most
   ``GEMM_K_MAX`` = 4096 columns). The K-chunks (``ks`` of them, chosen so that the grid has about two
   programs per SM) write their partial sums to a (ks, sum_b T_b^2) fp32 scratch: no atomics, a fixed order.
   With one tile set (``sym``) only the blocks on and below the diagonal are computed.
2. ``_gram_finish_kernel`` -- the same blocks: the partial sums added in order, the cross terms
   ``r̂_t[y_u]`` and ``r̂_u[y_t]`` gathered from the tiles (stored entry times its split's scale), and either
   the centred K written (``center``) or the raw ``r̂_t . r̂_u`` and ``X[t, u] = r̂_t[y_u]`` (what a
   vocabulary-parallel rank sums before centring), each block and its mirror image.

Conversations are packed: conversation b's (T_b, T_b) matrix is at ``sum_{c < b} T_c^2`` of the output,
row-major (``offsets`` on the device, the bases summed in the kernel: no host data per call), or at
``out[b, :T_b, :T_b]`` of a caller's padded (B, Tm, Tm) batch (the plan's batched algebra). A pair of two
tile sets (two token blocks of one long conversation, :mod:`rosa_ext.backends.tile_blocks`) is one
"conversation" of n_a x n_b.

Cost (unmeasured: no GPU here). The products are those of the torch path (2 T^2 V flops per
product, three products for bf16x2, half of them with one tile set); each program reads its two row blocks
of the tiles once per K-chunk, so the tiles are read about T / BLOCK_T times in all, from L2 when the
programs of one K-chunk run together (they sweep the same columns). The scratch is ks x 4 sum_b T_b^2
bytes (ks = 2 at T = 1024 on 132 SMs: 8 MB). Targets outside [0, V) contribute no cross term.
"""
from __future__ import annotations

from typing import List, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..common.validation import RosaInputError
from ._tiles import INTERPRET, fp32_precision, guard_launches, sm_count, tile_parts
from .tile_layout import ProbTiles

#: (BLOCK_T, BLOCK_K, num_warps, num_stages) of the partial Gram: a 64 x 64 output block per program (wgmma),
#: 32 columns per step, one loop over every split's chunks so that Triton pipelines it as one (nested loops
#: over splits and chunks were not pipelined; 8 warps split a 64-row wgmma accumulator in two layouts);
#: and (BLOCK_T, num_warps) of the finish, a gather-bound elementwise kernel (32 x 32 blocks: 64 x 64 spilled
#: its int64 gather addresses). Under the interpreter: small blocks (CPU tests).
GPU_CONFIG = (64, 32, 4, 4)
#: fp32 tiles (tf32x3 dots: three products per step) take 16 columns per step (32 spilled 8 bytes)
GPU_CONFIG_FP32 = (64, 16, 4, 4)
FINISH_CONFIG = (32, 4)
INTERPRET_CONFIG = (16, 32, 1, 1)
INTERPRET_FINISH = (16, 1)


@triton.jit
def _block_of(off_ptr, b, i, j, row0, na, nb, pad, ONE: tl.constexpr, SYM: tl.constexpr, BLOCK_T: tl.constexpr):
    """Block (i, j) of conversation b -> (first row of A, of B, rows of A, of B, base of the conversation's
    output and its row stride -- packed, or ``pad`` x ``pad`` per conversation when ``pad`` > 0 --, the
    block's A rows and B rows (relative), their masks, whether the block is computed at all)."""
    if ONE:
        lo = row0 * 0
        ta = na + lo
        tb = nb + lo
        base = lo.to(tl.int64)
    else:
        lo = tl.load(off_ptr + b) - row0
        ta = tl.load(off_ptr + b + 1) - row0 - lo
        tb = ta
        base = tl.zeros([], tl.int64)
        for c in range(0, b):
            n = (tl.load(off_ptr + c + 1) - tl.load(off_ptr + c)).to(tl.int64)
            base += n * n
    ld = tb
    if not ONE:  # the padded layout: conversation b at b pad^2, rows of pad
        base = tl.where(pad > 0, b.to(tl.int64) * pad * pad, base)
        ld = tl.where(pad > 0, pad, tb)
    ra = i * BLOCK_T + tl.arange(0, BLOCK_T)
    rb = j * BLOCK_T + tl.arange(0, BLOCK_T)
    live = (i * BLOCK_T < ta) & (j * BLOCK_T < tb)
    if SYM:
        live = live & (j <= i)
    ma = ra < tl.where(live, ta, 0)  # (the interpreter turns a scalar bool & a bool tensor into ints)
    mb = rb < tl.where(live, tb, 0)
    return lo, lo, ta, tb, base, ld, ra, rb, ma, mb, live


@triton.jit
def _gram_partial_kernel(a_ptr, a_lo_ptr, a_sc_ptr, b_ptr, b_lo_ptr, b_sc_ptr, off_ptr, part_ptr,
                         s_a, s_b, s_asc, s_bsc, s_part, na, nb, row0, pad, V, width, S, KS, per_chunk,
                         ONE: tl.constexpr, SYM: tl.constexpr, HAS_SCALE: tl.constexpr, MODE: tl.constexpr,
                         PRECISION: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_K: tl.constexpr):
    """Block (i, j) of conversation b's ``r̂_t . r̂_u`` over the splits of K-chunk k (module doc, step 1)."""
    i = tl.program_id(0)
    j = tl.program_id(1)
    b = tl.program_id(2) // KS
    k = tl.program_id(2) % KS
    lo_a, lo_b, ta, tb, base, ld, ra, rb, ma, mb, live = _block_of(off_ptr, b, i, j, row0, na, nb, pad, ONE, SYM,
                                                                    BLOCK_T)
    s0 = k * per_chunk
    s1 = tl.where(live, tl.minimum(S, s0 + per_chunk), s0)  # an idle program loops over nothing
    pa = (lo_a + ra).to(tl.int64) * s_a
    pb = (lo_b + rb).to(tl.int64) * s_b
    kk = tl.arange(0, BLOCK_K)
    per_split = tl.cdiv(width, BLOCK_K)  # chunks of a full split (the last split may be narrower)
    last = tl.cdiv(V - (S - 1) * width, BLOCK_K)
    chunks = tl.where(s1 >= S, (s1 - s0 - 1) * per_split + last, (s1 - s0) * per_split)
    chunks = tl.where(s1 > s0, chunks, 0)
    acc = tl.zeros([BLOCK_T, BLOCK_T], tl.float32)
    acc_s = tl.zeros([BLOCK_T, BLOCK_T], tl.float32)
    for c in range(0, chunks):  # one loop over every split's chunks (pipelined as one)
        s = s0 + c // per_split
        jc = c % per_split
        v1 = tl.minimum(s * width + width, V)
        cols = s * width + jc * BLOCK_K + kk
        mc = cols < v1
        mka = ma[:, None] & mc[None, :]
        mkb = mb[None, :] & mc[:, None]
        ia = pa[:, None] + cols[None, :]
        ib = pb[None, :] + cols[:, None]  # B transposed: (BLOCK_K, BLOCK_T)
        A = tl.load(a_ptr + ia, mask=mka, other=0.0)
        Bt = tl.load(b_ptr + ib, mask=mkb, other=0.0)
        if MODE == 0:
            acc_s = tl.dot(A, Bt, acc_s, input_precision=PRECISION)
        else:
            acc_s = tl.dot(A, Bt, acc_s)
            if MODE == 1:  # lo hi^T + hi lo^T (lo lo^T dropped)
                acc_s = tl.dot(tl.load(a_lo_ptr + ia, mask=mka, other=0.0), Bt, acc_s)
                acc_s = tl.dot(A, tl.load(b_lo_ptr + ib, mask=mkb, other=0.0), acc_s)
        if (jc == per_split - 1) | (c == chunks - 1):  # the split's last chunk: its product into the total
            if HAS_SCALE:
                sa = tl.load(a_sc_ptr + s * s_asc + lo_a + ra, mask=ma, other=0.0)
                sb = tl.load(b_sc_ptr + s * s_bsc + lo_b + rb, mask=mb, other=0.0)
                acc += acc_s * sa[:, None] * sb[None, :]
            else:
                acc += acc_s
            acc_s = tl.zeros([BLOCK_T, BLOCK_T], tl.float32)
    out = part_ptr + k.to(tl.int64) * s_part + base + ra[:, None].to(tl.int64) * ld + rb[None, :]
    tl.store(out, acc, mask=ma[:, None] & mb[None, :])


_gram_partial_kernel = guard_launches(_gram_partial_kernel)


@triton.jit
def _entries_at(t_ptr, t_lo_ptr, sc_ptr, rows, s_t, s_sc, y, ok, m, width, HAS_SCALE: tl.constexpr,
                MODE: tl.constexpr):
    """r̂ of the tile rows ``rows`` (a column vector) at the columns ``y`` (a row vector, clamped ids):
    the stored entry (hi + lo for bf16x2) times its split's scale, 0 where not ``ok`` or not ``m``."""
    at = rows.to(tl.int64) * s_t + y
    x = tl.load(t_ptr + at, mask=m, other=0.0).to(tl.float32)
    if MODE == 1:
        x += tl.load(t_lo_ptr + at, mask=m, other=0.0).to(tl.float32)
    if HAS_SCALE:
        x *= tl.load(sc_ptr + (y // width) * s_sc + rows, mask=m, other=0.0)
    return tl.where(ok & m, x, 0.0)


@triton.jit
def _gram_finish_kernel(part_ptr, a_ptr, a_lo_ptr, a_sc_ptr, ya_ptr, b_ptr, b_lo_ptr, b_sc_ptr, yb_ptr, off_ptr,
                        out_ptr, x_ptr, s_a, s_b, s_asc, s_bsc, s_part, na, nb, row0, pad, V, width, KS,
                        ONE: tl.constexpr, SYM: tl.constexpr, HAS_SCALE: tl.constexpr, MODE: tl.constexpr,
                        CENTER: tl.constexpr, BLOCK_T: tl.constexpr):
    """Block (i, j) of conversation b: the partial sums added, the cross terms gathered, K (``CENTER``) or
    the raw Gram and cross terms written with the block's mirror image (module doc, step 2)."""
    i = tl.program_id(0)
    j = tl.program_id(1)
    b = tl.program_id(2)
    lo_a, lo_b, ta, tb, base, ld, ra, rb, ma, mb, _ = _block_of(off_ptr, b, i, j, row0, na, nb, pad, ONE, SYM, BLOCK_T)
    m2 = ma[:, None] & mb[None, :]
    at = base + ra[:, None].to(tl.int64) * ld + rb[None, :]
    G = tl.zeros([BLOCK_T, BLOCK_T], tl.float32)
    pp = part_ptr + at
    for _ in range(0, KS):  # the K-chunks in order (deterministic)
        G += tl.load(pp, mask=m2, other=0.0)
        pp += s_part
    ya = tl.load(ya_ptr + lo_a + ra, mask=ma, other=-1)
    yb = tl.load(yb_ptr + lo_b + rb, mask=mb, other=-1)
    oka = (ya >= 0) & (ya < V)
    okb = (yb >= 0) & (yb < V)
    yac = tl.where(oka, ya, 0)
    ybc = tl.where(okb, yb, 0)
    # X_A[t, u] = r̂_t[y_u] (A's tiles at B's targets), X_B[t, u] = r̂_u[y_t] (B's tiles at A's targets)
    xa = _entries_at(a_ptr, a_lo_ptr, a_sc_ptr, (lo_a + ra)[:, None], s_a, s_asc, ybc[None, :], okb[None, :], m2,
                     width, HAS_SCALE, MODE)
    xb = _entries_at(b_ptr, b_lo_ptr, b_sc_ptr, (lo_b + rb)[None, :], s_b, s_bsc, yac[:, None], oka[:, None], m2,
                     width, HAS_SCALE, MODE)
    mirror = base + rb[None, :].to(tl.int64) * ld + ra[:, None]  # (u, t) of the transposed block (SYM: ta = tb)
    direct = m2
    if SYM:  # each position written once: t >= u directly, its mirror (u, t) for t > u (exactly symmetric)
        direct = m2 & (ra[:, None] >= rb[None, :])
    below = m2 & (ra[:, None] > rb[None, :])
    if CENTER:
        K = G - xa - xb + ((ya[:, None] == yb[None, :]) & m2).to(tl.float32)
        tl.store(out_ptr + at, K, mask=direct)
        if SYM:
            tl.store(out_ptr + mirror, K, mask=below)
    else:
        tl.store(out_ptr + at, G, mask=direct)
        tl.store(x_ptr + at, xa, mask=direct)
        if SYM:
            tl.store(out_ptr + mirror, G, mask=below)
            tl.store(x_ptr + mirror, xb, mask=below)


_gram_finish_kernel = guard_launches(_gram_finish_kernel)


def _chunks(S: int, programs: int, device: torch.device) -> Tuple[int, int]:
    """(K-chunks, splits per chunk): about two programs per SM in all, at most one chunk per split."""
    want = max(1, -(-2 * sm_count(device) // max(1, programs)))
    ks = max(1, min(S, want))
    per = -(-S // ks)
    return -(-S // per), per


def tile_gram(ta: ProbTiles, ya: torch.Tensor, lengths: Sequence[int], *, offsets: Optional[torch.Tensor] = None,
              row0: int = 0, tb: Optional[ProbTiles] = None, yb: Optional[torch.Tensor] = None,
              center: bool = True, out: Optional[torch.Tensor] = None
              ) -> Tuple[List[torch.Tensor], Optional[List[torch.Tensor]]]:
    """The Gram of the tile rows per conversation in two launches (module doc) -> (matrices, cross terms).

    Args:
        ta: the tiles (rows: tokens); ``ya`` (n_a,) int64 their targets.
        lengths: host ints, the conversations' token counts (sum = the rows used); with ``tb`` one pair.
        offsets: (B + 1,) int32 device offsets of the conversations' rows (``row0`` subtracted: the first row
            of ``ta`` is token ``row0``); needed for more than one conversation.
        tb, yb: a second tile set and its targets (the same split plan and precision): then ONE block
            ``r̂_t . r̂_u`` for t in ``ta``, u in ``tb`` ((n_a, n_b); ``lengths`` = [n_a]).
        center: write K (``(T_b, T_b)`` fp32 per conversation; cross terms None); else the raw ``r̂_t . r̂_u``
            and ``X[t, u] = r̂_t[y_u]``.
        out: (B, Tm, Tm) fp32 contiguous, Tm >= every T_b, to write conversation b's matrix into
            ``out[b, :T_b, :T_b]`` (a padded batch for batched algebra; the rest of ``out`` is not written: zero it
            first where it matters); ``center`` only, not with ``tb``.
    Returns:
        (list of (T_b, T_b) fp32 views of one packed buffer, or of ``out`` (pair: one (n_a, n_b)), list of X
        views or None).
    """
    pair = tb is not None
    tb_, yb_ = (tb, yb) if pair else (ta, ya)
    na = int(lengths[0])
    nb = int(tb.shape[0]) if pair else na
    B = 1 if pair else len(lengths)
    if (tb_.precision != ta.precision or tb_.width() != ta.width() or int(tb_.shape[1]) != int(ta.shape[1])
            or (ta.split_scale is None) != (tb_.split_scale is None)):
        raise RosaInputError("rosa_ext.kernels.tile_gram: the two tile sets must come from one split plan and "
                             "precision", "tb")
    if B > 1 and offsets is None:
        raise RosaInputError("rosa_ext.kernels.tile_gram: more than one conversation needs offsets", "offsets")
    V, dev = int(ta.shape[1]), ya.device
    sizes = [(na, nb)] if pair else [(int(n), int(n)) for n in lengths]
    pad = 0
    if out is not None:
        pad = int(out.shape[-1]) if out.dim() == 3 else 0
        if (pair or not center or out.dim() != 3 or tuple(out.shape) != (B, pad, pad) or pad < max(n for n, _ in sizes)
                or out.dtype != torch.float32 or not out.is_contiguous() or out.device != dev):
            raise RosaInputError(f"rosa_ext.kernels.tile_gram: out must be a contiguous ({B}, Tm, Tm) float32 tensor on "
                                 f"{dev} with Tm >= {max(n for n, _ in sizes)} (the centred Gram of conversations, not "
                                 f"a pair), got {tuple(out.shape)} {out.dtype}", "out")
        total = B * pad * pad
        views = [out[b, :n, :n] for b, (n, _) in enumerate(sizes)]
        flat = out.view(-1)
    else:
        total = sum(a * c for a, c in sizes)
        flat = torch.empty(total, dtype=torch.float32, device=dev)
        views = []
    x = None if center else torch.empty(total, dtype=torch.float32, device=dev)
    xviews, pos = [] if x is not None else None, 0
    for a, c in (sizes if out is None else []):
        views.append(flat[pos:pos + a * c].view(a, c))
        if x is not None:
            xviews.append(x[pos:pos + a * c].view(a, c))
        pos += a * c
    if total == 0:
        return views, xviews
    bt, bk, nw, ns = INTERPRET_CONFIG if INTERPRET else (GPU_CONFIG_FP32 if ta.p is not None else GPU_CONFIG)
    tmax = max(max(a, c) for a, c in sizes)
    nblk = triton.cdiv(tmax, bt)
    sc_a, sc_b = ta.split_scale, tb_.split_scale
    S = 1 if sc_a is None else int(sc_a.shape[0])
    width = ta.width()
    ks, per = _chunks(S, B * (nblk * (nblk + 1) // 2 if not pair else nblk * nblk), dev)
    part = torch.empty(ks, total, dtype=torch.float32, device=dev)
    a, a_lo, mode = tile_parts(ta)
    b, b_lo, _ = tile_parts(tb_)
    off = offsets if offsets is not None else ya
    ones = dict(ONE=B == 1 and offsets is None or pair, SYM=not pair, HAS_SCALE=sc_a is not None, MODE=mode)
    sa = sc_a if sc_a is not None else flat
    sb = sc_b if sc_b is not None else flat
    s_asc = sc_a.stride(0) if sc_a is not None else 0
    s_bsc = sc_b.stride(0) if sc_b is not None else 0
    _gram_partial_kernel[(nblk, nblk, B * ks)](
        a, a_lo, sa, b, b_lo, sb, off, part, a.stride(0), b.stride(0), s_asc, s_bsc, total, na, nb, int(row0), pad, V,
        width, S, ks, per, PRECISION=fp32_precision(), BLOCK_T=bt, BLOCK_K=bk, num_warps=nw, num_stages=ns, **ones)
    fb, fw = INTERPRET_FINISH if INTERPRET else FINISH_CONFIG
    nf = triton.cdiv(tmax, fb)
    _gram_finish_kernel[(nf, nf, B)](
        part, a, a_lo, sa, ya, b, b_lo, sb, yb_, off, flat, x if x is not None else flat, a.stride(0), b.stride(0),
        s_asc, s_bsc, total, na, nb, int(row0), pad, V, width, ks, CENTER=center, BLOCK_T=fb, num_warps=fw, **ones)
    return views, xviews
