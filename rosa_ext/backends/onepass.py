"""The one-pass primitives of the dual solve in plain torch (MATH.md section 4).

The chunked torch backend (:class:`~rosa_ext.backends.torch_chunked.TorchChunkedBackend`) runs
these; the Triton backend delegates to it, and the vocabulary-parallel backend runs them on its
rows and combines the results across ranks (:mod:`.distributed`).

- :func:`hidden_pass`: hidden mode's whole vocabulary work in ONE online-softmax pass
  (flash attention with K = V = W): lse, 1 - p_t and r_t W, where r_t is pi_t without its
  target entry. Two GEMMs per tile (4 N d V flops), nothing of size N x V kept.
- :func:`lora_gram_pass`: LoRA mode's pass: lse, 1 - p_t, r_t . b and the centred Gram
  ``(e_{y_t} - pi_t) . (e_{y_u} - pi_u)`` of every conversation (one GEMM for the logits and the
  Gram ``E^T E`` on the lower block triangle only), optionally KEEPING the exp tiles so that
  the VJP (:func:`centered_column_reduce`) is a GEMV over memory instead of a second pass.
- :func:`centered_column_reduce`: ``sum_t w_t (e_{y_t} - pi_t)`` per conversation, from the kept
  tiles or in one streaming pass.

Numerics. Tiles are TRANSPOSED, (vocabulary chunk, tokens): on the CPU ``W_c h^T``, the Gram
``E^T E`` and the reductions over the vocabulary are as fast or faster (the Gram up to 1.5x at
T <= 128) than in the (tokens, vocabulary) layout. Bias, LoRA term and the shift by the per-token
reference are one rank-k update after the GEMM. On the CPU the reference is the row maximum of
the first chunk, and a tile is redone with the running maximum only when its row sum of
exp(z - ref) exceeds e^TAU ("lazy rescaling": no max reduction per chunk, accumulators almost
never rescaled, entries bounded by e^TAU so the Gram cannot overflow); it needs one host read per
chunk, so on other devices every tile moves the reference to the running maximum instead
(the classic online softmax, no host sync). The target entry of every tile is gathered and zeroed
(:class:`_OffTarget`), so 1 - p_t = sum(r_t) is exact to rounding and neither J (hidden) nor the
LoRA Gram diagonal cancels when p_t -> 1. Targets outside [0, V) (the tokens another rank of a
vocabulary-parallel head owns) are never split off.

Dtypes: compute in float32, or float64 for float64 models; bf16/fp16 weights are widened one
chunk at a time. Tile sizes were tuned for one thread of the project's 2-core CPU (any thread
count and device work).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from ..common.types import GramPass, HeadProblem, HiddenPass

#: elements of one (chunk, rows) logits tile of the hidden pass (4 MB fp32; flat from 0.5 to 8 MB)
HIDDEN_TILE_ELEMS = 1 << 20
#: rows per block of the hidden pass (W is streamed once per block)
HIDDEN_ROW_BLOCK = 1024
#: elements of one (chunk, N) tile of the LoRA pass (all rows at once: the Gram needs every pair)
LORA_TILE_ELEMS = 1 << 20
#: the smallest vocabulary chunk (GEMM efficiency)
MIN_CHUNK = 256
#: the LoRA Gram wants a GEMM depth >= 512 (>= 1024 from 2048 rows: at T = 4096, K = 256, 512, 1024
#: gave 150, 210, 225 effective GF/s)
LORA_MIN_CHUNK = 512
#: up to this many tokens the same-token term of the LoRA Gram is one vectorised T x T update
SAME_TOKEN_VECTOR_MAX = 512
#: columns per block when the cross terms are read back from the kept tiles
CROSS_BLOCK = 128
#: lazy rescaling: a tile is redone when a row sum of exp(z - ref) exceeds e^TAU
TAU = {torch.float32: 30.0, torch.float64: 200.0}


def gram_block(T: int) -> int:
    """Rows per block of the block-triangle Gram (measured: the full product below 128 rows)."""
    if T <= 128:
        return T
    return 128 if T <= 1024 else 256


def _chunk_for(rows: int, V: int, tile_elems: int, min_chunk: int) -> int:
    c = max(min_chunk, tile_elems // max(1, rows))
    c = (c // 64) * 64 or 64
    return max(1, min(V, c))


def _spans(offsets: Sequence[int], r0: int, r1: int) -> List[Tuple[int, int, int]]:
    """(conversation, lo, hi) of the conversations intersecting rows [r0, r1), local to r0."""
    out = []
    for b in range(len(offsets) - 1):
        lo, hi = max(offsets[b], r0), min(offsets[b + 1], r1)
        if lo < hi:
            out.append((b, lo - r0, hi - r0))
    return out


def _lazy(device: torch.device) -> bool:
    return device.type == "cpu"


class _Logits:
    """Fills a transposed tile zT (chunk, rows) = W_c h^T + c_c + b_c[seg] (x) lora_q - 1 (x) ref."""

    def __init__(self, h: torch.Tensor, W: torch.Tensor, cd: torch.dtype, bias: Optional[torch.Tensor],
                 lora_q: Optional[torch.Tensor], lora_b: Optional[torch.Tensor], spans) -> None:
        self.h, self.W, self.cd, self.bias, self.lq, self.lb, self.spans = h, W, cd, bias, lora_q, lora_b, spans
        self.ones = torch.ones(h.shape[0], dtype=cd, device=h.device) if bias is not None else None
        self.m: Optional[torch.Tensor] = None
        self._A: Optional[torch.Tensor] = None  # (3, n) and (chunk, 3) buffers of the rank-k update
        self._B: Optional[torch.Tensor] = None

    def wchunk(self, v0: int, v1: int) -> torch.Tensor:
        return self.W[v0:v1].to(self.cd)  # no copy when W is in the compute dtype

    def fill(self, zT: torch.Tensor, Wc: torch.Tensor, v0: int, v1: int, shift: bool) -> None:
        torch.mm(Wc, self.h.T, out=zT)
        w, n = zT.shape
        for b, lo, hi in (self.spans if self.lq is not None else [(0, 0, n)]):
            cols, rows = [], []  # zT[:, lo:hi] += sum_i rows_i (x) cols_i
            if self.lq is not None:
                cols.append(self.lq[lo:hi])
                rows.append(self.lb[b, v0:v1])
            if self.bias is not None:
                cols.append(self.ones[lo:hi])
                rows.append(self.bias[v0:v1])
            if shift:
                cols.append(-self.m[lo:hi])
                rows.append(None)
            if not cols:
                return
            if len(cols) == 1 and shift:
                zT[:, lo:hi].sub_(self.m[lo:hi].unsqueeze(0))
            elif len(cols) == 1:
                zT[:, lo:hi].addr_(rows[0], cols[0])
            else:
                k = len(cols)
                if self._B is None or self._B.shape[0] < w:
                    self._A = torch.empty(3, n, dtype=self.cd, device=zT.device)
                    self._B = torch.empty(max(w, zT.shape[0]), 3, dtype=self.cd, device=zT.device)
                A, Bm = self._A[:k, lo:hi], self._B[:w, :k]
                for i in range(k):
                    A[i] = cols[i]
                    if rows[i] is None:
                        Bm[:, i] = 1.0
                    else:
                        Bm[:, i] = rows[i]
                zT[:, lo:hi].addmm_(Bm, A)

    def fill_exp(self, zT: torch.Tensor, Wc: torch.Tensor, v0: int, v1: int) -> Optional[torch.Tensor]:
        """zT <- exp(logits - ref). Lazy mode: the first tile sets ref (its row max); returns None.
        Eager mode: ref moves to the running max; returns the factor exp(ref_old - ref_new) that the
        accumulators must be multiplied by (None on the first tile)."""
        if self.m is not None and self.lazy:
            self.fill(zT, Wc, v0, v1, shift=True)
            zT.exp_()
            return None
        self.fill(zT, Wc, v0, v1, shift=False)
        mx = zT.amax(0)
        r = None
        if self.m is None:
            mn = torch.where(torch.isfinite(mx), mx, torch.zeros_like(mx))
        else:
            mn = torch.maximum(self.m, mx)
            r = torch.exp(self.m - mn)
        self.m = mn
        zT.sub_(mn.unsqueeze(0)).exp_()
        return r

    def refill_rescaled(self, zT: torch.Tensor, Wc: torch.Tensor, v0: int, v1: int) -> torch.Tensor:
        """Lazy mode's rare path: recompute the tile, move ref to the running max; returns exp(old - new)."""
        self.fill(zT, Wc, v0, v1, shift=False)
        mn = torch.maximum(self.m, zT.amax(0))
        r = torch.exp(self.m - mn)
        self.m = mn
        zT.sub_(mn.unsqueeze(0)).exp_()
        return r

    lazy = True


class _TargetIndex:
    """Which targets fall in which vocabulary chunk, per group of rows (one sort, one host read)."""

    def __init__(self, y: torch.Tensor, groups: Sequence[Tuple[int, int]], V: int, c: int) -> None:
        dev = y.device
        nch = -(-V // c)
        self.c = c
        if nch == 1:  # one chunk: no sort (targets outside [0, V) are still left out)
            self.per, self.bnd = [], []
            for lo, hi in groups:
                yk = y[lo:hi]
                inside = torch.nonzero((yk >= 0) & (yk < V)).flatten()
                self.per.append((yk[inside], inside + lo))
                self.bnd.append([0, inside.numel()])
            return
        starts = torch.arange(0, nch + 1, device=dev) * c
        starts[-1] = V
        self.per = []
        bnds = []
        for lo, hi in groups:
            ys, order = torch.sort(y[lo:hi])
            self.per.append((ys, order + lo))
            bnds.append(torch.searchsorted(ys, starts))
        self.bnd = torch.stack(bnds).tolist() if bnds else []

    def rows_in_chunk(self, k: int, j: int) -> Tuple[torch.Tensor, torch.Tensor]:
        """(rows of group k whose target is in chunk j, the target's column in the chunk)."""
        ys, order = self.per[k]
        i0, i1 = self.bnd[k][j], self.bnd[k][j + 1]
        return order[i0:i1], ys[i0:i1] - j * self.c


class _OffTarget:
    """Splits each exp tile into its target entries E[t, y_t] (gathered) and the rest (zeroed)."""

    def __init__(self, y: torch.Tensor, n: int, V: int, c: int, cd: torch.dtype) -> None:
        self.idx = _TargetIndex(y, [(0, n)], V, c)
        self.raw = torch.zeros(n, dtype=cd, device=y.device)  # E[t, y_t] relative to the ref of its chunk
        self.ref = torch.zeros(n, dtype=cd, device=y.device)

    def split(self, zT: torch.Tensor, j: int):
        rows, cols = self.idx.rows_in_chunk(0, j)
        if not rows.numel():
            return None
        vals = zT[cols, rows]
        zT[cols, rows] = 0
        return rows, vals

    def record(self, part, m: torch.Tensor) -> None:
        if part is not None:
            rows, vals = part
            self.raw[rows] = vals
            self.ref[rows] = m[rows]

    def finish(self, s: torch.Tensor, m: torch.Tensor):
        """(total, 1 - p_t) from the off-target row sums s (relative to the final ref m)."""
        tot = s + self.raw * torch.exp(self.ref - m)
        return tot, s / tot


def _tile(lg: _Logits, ot: _OffTarget, zT: torch.Tensor, Wc: torch.Tensor, v0: int, v1: int, j: int,
          thr: float):
    """One exp tile with its target entries split off. Returns (split part, row sums, rescale
    factor for the accumulators or None)."""
    r = lg.fill_exp(zT, Wc, v0, v1)
    part = ot.split(zT, j)
    cs = zT.sum(0)
    if lg.lazy:
        peak = cs.max() if part is None else torch.maximum(cs.max(), part[1].max())
        if float(peak) > thr:  # rare: the first chunk's max was far below this one's
            r = lg.refill_rescaled(zT, Wc, v0, v1)
            part = ot.split(zT, j)
            cs = zT.sum(0)
    return part, cs, r


@dataclass
class _Inputs:
    h: torch.Tensor            # (N, d) compute dtype
    cd: torch.dtype
    bias: Optional[torch.Tensor]
    ah: Optional[torch.Tensor]
    lq: Optional[torch.Tensor]  # s * ah
    lb: Optional[torch.Tensor]  # (B, V) compute dtype


def _inputs(prob: HeadProblem) -> _Inputs:
    cd = prob.compute_dtype
    h = prob.hidden.to(cd)
    bias = None if prob.bias is None else prob.bias.to(cd)
    ah = lq = lb = None
    if prob.lora_a is not None and prob.lora_b is not None:
        off = prob.offsets
        B = prob.num_conversations
        if B == 1:
            ah = torch.mv(h, prob.lora_a[0].to(cd))
        else:
            ah = torch.empty(h.shape[0], dtype=cd, device=h.device)
            for k in range(B):
                torch.mv(h[off[k]:off[k + 1]], prob.lora_a[k].to(cd), out=ah[off[k]:off[k + 1]])
        lq = ah * prob.lora_scale
        lb = prob.lora_b.to(cd)
    return _Inputs(h, cd, bias, ah, lq, lb)


def _logp(prob: HeadProblem, x: _Inputs, lse: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """log p_t: log1p(-q) where p_t >= 1/2 (accurate near 1, where z_t[y_t] - lse_t would lose the
    small 1 - p_t), z_t[y_t] - lse_t below (finite even where p_t underflows). Targets outside
    [0, V) get a meaningless value (the vocabulary-parallel wrapper replaces it)."""
    V = prob.vocab_size
    y = prob.targets.clamp(0, V - 1)
    z_y = (x.h * prob.weight[y].to(x.cd)).sum(1)
    if x.bias is not None:
        z_y = z_y + x.bias[y]
    if x.lq is not None:
        z_y = z_y + x.lq * x.lb[prob.seg, y]
    return torch.where(q <= 0.5, torch.log1p(-q), z_y - lse).clamp_max(0.0)


# ----------------------------------------------------------------------------- hidden mode
def hidden_pass(prob: HeadProblem, *, row_block: Optional[int] = None, chunk: Optional[int] = None) -> HiddenPass:
    """One online-softmax pass over the vocabulary -> :class:`~rosa_ext.common.types.HiddenPass`.

    Per vocabulary chunk: ``zT = W_c h^T`` (GEMM), one rank-k update (bias, LoRA term, reference),
    ``exp``, the target entries split off, row sums, ``pi W += zT^T W_c`` (GEMM), and with a LoRA
    term ``r . b`` (GEMV). 4 N d V flops; extra memory one (chunk, row block) tile besides the
    (N, d) result.
    """
    x = _inputs(prob)
    N, d, V = prob.num_tokens, prob.hidden_size, prob.vocab_size
    cd, dev = x.cd, x.h.device
    rb = max(1, min(N, row_block or HIDDEN_ROW_BLOCK))
    lse = torch.empty(N, dtype=cd, device=dev)
    piW = torch.empty(N, d, dtype=cd, device=dev)
    pib = torch.empty(N, dtype=cd, device=dev) if x.lq is not None else None
    q = torch.empty(N, dtype=cd, device=dev)
    thr = math.exp(TAU[cd])
    lazy = _lazy(dev)
    for r0 in range(0, N, rb):
        r1 = min(N, r0 + rb)
        n = r1 - r0
        spans = _spans(prob.offsets, r0, r1)
        lg = _Logits(x.h[r0:r1], prob.weight, cd, x.bias, None if x.lq is None else x.lq[r0:r1], x.lb, spans)
        lg.lazy = lazy
        c = min(V, chunk or _chunk_for(n, V, HIDDEN_TILE_ELEMS, MIN_CHUNK))
        buf = torch.empty(n * c, dtype=cd, device=dev)
        ot = _OffTarget(prob.targets[r0:r1], n, V, c, cd)
        s = torch.zeros(n, dtype=cd, device=dev)
        acc = piW[r0:r1].zero_()
        sb = None if pib is None else pib[r0:r1].zero_()
        for j, v0 in enumerate(range(0, V, c)):
            v1 = min(V, v0 + c)
            Wc = lg.wchunk(v0, v1)
            zT = buf[:n * (v1 - v0)].view(v1 - v0, n)
            part, cs, r = _tile(lg, ot, zT, Wc, v0, v1, j, thr)
            if r is not None:
                s.mul_(r)
                acc.mul_(r.unsqueeze(1))
                if sb is not None:
                    sb.mul_(r)
            ot.record(part, lg.m)
            s.add_(cs)
            acc.addmm_(zT.T, Wc)
            if sb is not None:
                for b, lo, hi in spans:
                    sb[lo:hi].addmv_(zT[:, lo:hi].T, x.lb[b, v0:v1])
        tot, qb = ot.finish(s, lg.m)
        acc.div_(tot.unsqueeze(1))
        if sb is not None:
            sb.div_(tot)
        lse[r0:r1] = lg.m + torch.log(tot)
        q[r0:r1] = qb
    logp = _logp(prob, x, lse, q)
    return HiddenPass(lse=lse, logp=logp, q=q, ah=x.ah, pib_off=pib, pi_weight=piW)


# ----------------------------------------------------------------------------- lora mode
@dataclass
class KeptTiles:
    """The exp tiles of :func:`lora_gram_pass`, kept for :func:`centered_column_reduce`.

    ``store`` holds chunk j (columns v0:v1) as a contiguous (v1 - v0, N) block exp(z - ref_j)^T with
    the target entries zeroed (r_t), ``refs[j]`` (N,) the reference of chunk j:
    r_t = store_j * exp(ref_j - lse).
    """

    store: torch.Tensor
    chunk: int
    refs: List[torch.Tensor]


def _tri_gram(G: torch.Tensor, ET: torch.Tensor, blk: int) -> None:
    """G += ET^T ET (ET: (chunk, T)) on the lower block triangle (diagonal blocks in full)."""
    T = ET.shape[1]
    if T <= blk:
        G.addmm_(ET.T, ET)
        return
    for i0 in range(0, T, blk):
        i1 = min(T, i0 + blk)
        G[i0:i1, :i1].addmm_(ET[:, i0:i1].T, ET[:, :i1])


def _sym_from_lower(G: torch.Tensor, blk: int) -> None:
    """Copy the lower block triangle onto the upper one, in place (no T x T temporary)."""
    T = G.shape[0]
    if T <= blk:
        return
    for i0 in range(blk, T, blk):
        i1 = min(T, i0 + blk)
        G[:i0, i0:i1].copy_(G[i0:i1, :i0].T)


def lora_gram_pass(prob: HeadProblem, *, keep: bool = False, raw: bool = False, chunk: Optional[int] = None,
                   gram_blk: Optional[int] = None) -> GramPass:
    """One pass: lse, 1 - p_t, r_t . b and the centred Gram of every conversation ->
    :class:`~rosa_ext.common.types.GramPass`.

    ``keep``: store the N x V exp tiles (the caller checks the memory budget) so that
    :func:`centered_column_reduce` is a GEMV; the cross terms ``r_t[y_u]`` are then read back from
    them CROSS_BLOCK columns at a time (no T x T temporary next to the tiles). Streaming gathers the
    cross terms during the pass (one T_b x T_b matrix per conversation). ``raw``: return
    ``r_t . r_u`` and the cross terms uncombined (:class:`GramPass`), for the vocabulary-parallel
    wrapper. Flops: 2 N d V for the logits and ~sum_b T_b^2 V for the block-triangle Gram.
    """
    x = _inputs(prob)
    N, V = prob.num_tokens, prob.vocab_size
    cd, dev = x.cd, x.h.device
    off = prob.offsets
    spans = _spans(off, 0, N)
    lg = _Logits(x.h, prob.weight, cd, x.bias, x.lq, x.lb, spans)
    lg.lazy = _lazy(dev)
    c = min(V, chunk or _chunk_for(N, V, LORA_TILE_ELEMS, LORA_MIN_CHUNK * (2 if N >= 2048 else 1)))
    nch = -(-V // c)
    store = torch.empty(N * V if keep else N * c, dtype=cd, device=dev)
    G = [torch.zeros(hi - lo, hi - lo, dtype=cd, device=dev) for _, lo, hi in spans]
    blks = [gram_blk or gram_block(hi - lo) for _, lo, hi in spans]
    y = prob.targets
    ot = _OffTarget(y, N, V, c, cd)
    gather_x = raw or not keep
    xidx = _TargetIndex(y, [(lo, hi) for _, lo, hi in spans], V, c) if gather_x else None
    X = [torch.zeros(hi - lo, hi - lo, dtype=cd, device=dev) for _, lo, hi in spans] if gather_x else None
    Xchunk = [torch.zeros(hi - lo, dtype=torch.long, device=dev) for _, lo, hi in spans] if gather_x else None
    s = torch.zeros(N, dtype=cd, device=dev)
    sb = torch.zeros(N, dtype=cd, device=dev) if x.lq is not None else None
    refs: List[torch.Tensor] = []
    rescaled = False
    thr = math.exp(TAU[cd])
    for j in range(nch):
        v0 = j * c
        v1 = min(V, v0 + c)
        w = v1 - v0
        Wc = lg.wchunk(v0, v1)
        zT = (store[N * v0:N * v1] if keep else store[:N * w]).view(w, N)
        part, cs, r = _tile(lg, ot, zT, Wc, v0, v1, j, thr)
        if r is not None:
            rescaled = True
            s.mul_(r)
            if sb is not None:
                sb.mul_(r)
            for (_, lo, hi), Gb in zip(spans, G):
                Gb.mul_(r[lo:hi].unsqueeze(1)).mul_(r[lo:hi].unsqueeze(0))
        ot.record(part, lg.m)
        s.add_(cs)
        for k, ((b, lo, hi), Gb) in enumerate(zip(spans, G)):
            Ek = zT[:, lo:hi]  # (w, T_k)
            if sb is not None:
                sb[lo:hi].addmv_(Ek.T, x.lb[b, v0:v1])
            _tri_gram(Gb, Ek, blks[k])
            if gather_x:
                us, cols = xidx.rows_in_chunk(k, j)
                if us.numel():
                    X[k][:, us - lo] = Ek[cols].T
                    Xchunk[k][us - lo] = j
        refs.append(lg.m)
    m = lg.m
    tot, q = ot.finish(s, m)
    lse = m + torch.log(tot)
    inv = 1.0 / tot
    for k, ((_, lo, hi), Gb) in enumerate(zip(spans, G)):
        _sym_from_lower(Gb, blks[k])
        Gb.mul_(inv[lo:hi].unsqueeze(1)).mul_(inv[lo:hi].unsqueeze(0))
        if gather_x:
            if rescaled:  # X[t, u] is relative to the reference of the chunk holding y_u
                R = torch.stack([r_[lo:hi] for r_ in refs], 1)  # (T_b, chunks)
                X[k].mul_(torch.exp(R[:, Xchunk[k]] - m[lo:hi].unsqueeze(1)))
            X[k].mul_(inv[lo:hi].unsqueeze(1))
    pib = None if sb is None else sb.mul_(inv)
    logp = _logp(prob, x, lse, q)
    kept = KeptTiles(store, c, refs) if keep else None
    gp = GramPass(lse=lse, logp=logp, q=q, ah=x.ah, pib_off=pib, gram=G, kept=kept)
    if raw:
        gp.cross = X
        return gp
    for k, (_, lo, hi) in enumerate(spans):
        if X is not None:
            subtract_cross(G[k], X[k], q[lo:hi])
            X[k] = None
        else:
            _subtract_cross_kept(G[k], gp, y, lo, hi, s_total=tot)
        same_token_pairs(G[k], y[lo:hi], q[lo:hi])
    return gp


def subtract_cross(M: torch.Tensor, X: torch.Tensor, q: torch.Tensor) -> None:
    """M -= Y + Y^T with Y[t, u] = r_t[y_u] (1 - p_u) = X[t, u] q_u, in place (X is overwritten)."""
    X.mul_(q.unsqueeze(0))
    M.sub_(X).sub_(X.T)


def _subtract_cross_kept(M: torch.Tensor, gp: GramPass, y: torch.Tensor, lo: int, hi: int,
                         s_total: torch.Tensor) -> None:
    """:func:`subtract_cross` for rows lo:hi, reading r_t[y_u] from the kept tiles CROSS_BLOCK columns
    at a time (temporaries T x CROSS_BLOCK)."""
    kept: KeptTiles = gp.kept
    N = gp.lse.shape[0]
    V = kept.store.numel() // N
    c = kept.chunk
    T = hi - lo
    m = kept.refs[-1]
    qk = gp.q[lo:hi]
    idx = _TargetIndex(y[lo:hi], [(0, T)], V, c)
    scale = 1.0 / s_total[lo:hi]
    for j, v0 in enumerate(range(0, V, c)):
        us_all, cols_all = idx.rows_in_chunk(0, j)
        if not us_all.numel():
            continue
        v1 = min(V, v0 + c)
        Ek = kept.store[N * v0:N * v1].view(v1 - v0, N)[:, lo:hi]  # (w, T)
        ref = kept.refs[j]
        f = scale if ref is m else scale * torch.exp(ref[lo:hi] - m[lo:hi])
        for i0 in range(0, us_all.numel(), CROSS_BLOCK):
            us, cols = us_all[i0:i0 + CROSS_BLOCK], cols_all[i0:i0 + CROSS_BLOCK]
            Xb = Ek.index_select(0, cols).T  # (T, bs): E_j[t, y_u]
            Xb.mul_(f.unsqueeze(1)).mul_(qk[us].unsqueeze(0)).neg_()  # -Y[:, us]
            M.index_add_(1, us, Xb)
            M.index_add_(0, us, Xb.T)


def same_token_pairs(M: torch.Tensor, y: torch.Tensor, q: torch.Tensor) -> None:
    """M[t, u] += q_t q_u where y_t == y_u (the diagonal included), in place."""
    if y.numel() <= SAME_TOKEN_VECTOR_MAX:  # one vectorised update (temporaries: T^2 numbers and bools)
        M.add_(torch.outer(q, q).mul_(y.unsqueeze(0) == y.unsqueeze(1)))
        return
    M.diagonal().add_(q * q)
    ys, order = torch.sort(y)
    _, counts = torch.unique_consecutive(ys, return_counts=True)
    if int(counts.max()) < 2:
        return
    starts = torch.cumsum(counts, 0) - counts
    rep = counts > 1
    for st, cn in zip(starts[rep].tolist(), counts[rep].tolist()):
        idx = order[st:st + cn]
        for r0 in range(0, cn, 1024):  # bounded temporaries even for one long run
            ri = idx[r0:r0 + 1024]
            blk = q[ri].unsqueeze(1) * q[idx].unsqueeze(0)
            ar = torch.arange(ri.numel(), device=M.device)
            blk[ar, ar + r0] = 0  # the diagonal is done
            M.index_put_((ri.unsqueeze(1).expand_as(blk), idx.unsqueeze(0).expand_as(blk)), blk, accumulate=True)


def centered_column_reduce(prob: HeadProblem, gp, w: torch.Tensor, *, out: Optional[torch.Tensor] = None,
                           chunk: Optional[int] = None) -> torch.Tensor:
    """sum_{t in b} w_t (e_{y_t} - pi_t) -> (B, V), as ``scatter(y, w (1 - p)) - sum_t w_t r_t``.

    ``gp``: a :class:`GramPass` (its ``lse``, ``q`` and ``kept``; any object with those). With kept
    tiles a GEMV over them; else one streaming pass that recomputes each tile from h, W and lse.
    Targets outside [0, V) scatter nothing.
    """
    N, V, B = prob.num_tokens, prob.vocab_size, prob.num_conversations
    cd = prob.compute_dtype
    dev = w.device
    spans = _spans(prob.offsets, 0, N)
    out = torch.empty(B, V, dtype=cd, device=dev) if out is None else out
    kept: Optional[KeptTiles] = gp.kept
    if kept is not None:
        c = kept.chunk
        for j, v0 in enumerate(range(0, V, c)):
            v1 = min(V, v0 + c)
            ET = kept.store[N * v0:N * v1].view(v1 - v0, N)
            coef = w * torch.exp(kept.refs[j] - gp.lse)
            for b, lo, hi in spans:
                torch.mv(ET[:, lo:hi], coef[lo:hi], out=out[b, v0:v1])
    else:
        x = _inputs(prob)
        lg = _Logits(x.h, prob.weight, cd, x.bias, x.lq, x.lb, spans)
        lg.m = gp.lse  # tiles come out normalised: exp(z - lse) = pi
        lg.lazy = True
        c = min(V, chunk or _chunk_for(N, V, LORA_TILE_ELEMS, LORA_MIN_CHUNK))
        ot = _OffTarget(prob.targets, N, V, c, cd)
        buf = torch.empty(N * c, dtype=cd, device=dev)
        for j, v0 in enumerate(range(0, V, c)):
            v1 = min(V, v0 + c)
            zT = buf[:N * (v1 - v0)].view(v1 - v0, N)
            lg.fill_exp(zT, lg.wchunk(v0, v1), v0, v1)
            ot.split(zT, j)
            for b, lo, hi in spans:
                torch.mv(zT[:, lo:hi], w[lo:hi], out=out[b, v0:v1])
    out.neg_()
    y = prob.targets
    wq = (w * gp.q).masked_fill_((y < 0) | (y >= V), 0.0)  # no host sync
    out.index_put_((prob.seg, y.clamp(0, V - 1)), wq, accumulate=True)
    return out
