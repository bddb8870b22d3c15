"""The torch engine: every pass of the :class:`~rosa_ext.backends.protocol.Engine` protocol as torch
tiles, on any device, over ONE logits-tile loop (MATH.md sections 3-4).

A tile is TRANSPOSED, (vocabulary chunk, tokens): ``zT = W_c h^T`` plus bias, LoRA term and reference
shift as one rank-k update (:class:`Logits`), then ``exp(z - ref)`` with every token's target entry split
off (:class:`OffTarget`), so the passes accumulate r_t (pi_t without its target entry) and 1 - p_t =
sum(r_t) never cancels when p_t -> 1. :func:`exp_tile`: a tile of a pass that finds the softmax reference
on the way; :func:`normalized_tiles`: the tiles of a pass that knows lse. :class:`TorchEngine` holds the
passes: ``hidden_pass`` (lse, 1 - p_t, r . b and r W in ONE online-softmax pass, 4 N d V flops; ``stats``
is it without r W), ``gram_pass`` (the Gram parts ``r_t . r_u`` and ``r_t[y_u]``, optionally keeping the
tiles for a GEMV ``off_target_vjp``) and the streaming reductions of matrix-free CG.

Numerics. On the CPU the reference is the row maximum of the first chunk, and a tile is redone with the
running maximum only when a row sum of exp(z - ref) exceeds e^TAU ("lazy rescaling": no max reduction
per chunk, entries bounded by e^TAU so a Gram cannot overflow; one host read per chunk); elsewhere every
tile moves the reference to the running maximum (the classic online softmax, no host sync). Targets
outside [0, V) (tokens another rank of a vocabulary-parallel head owns) are never split off. Compute in
float32 (float64 for float64 models), bf16/fp16 W widened one chunk at a time; the transposed layout and
the tile sizes were tuned for one thread of the project's 2-core CPU.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, Iterator, List, Optional, Sequence, Tuple

import torch

from ..common.jacobian import WholeVocabulary, split_logits
from ..common.types import GramPass, HeadProblem, HeadStats, HiddenPass
from ..common.validation import RosaInputError
from .throughput import TORCH, lookup

#: the smallest vocabulary chunk (GEMM efficiency)
MIN_CHUNK = 256
#: lazy rescaling: a tile is redone when a row sum of exp(z - ref) exceeds e^TAU
TAU = {torch.float32: 30.0, torch.float64: 200.0}


def chunk_for(rows: int, V: int, tile_elems: int, min_chunk: int) -> int:
    c = max(min_chunk, tile_elems // max(1, rows))
    c = (c // 64) * 64 or 64
    return max(1, min(V, c))


def lazy_rescaling(device: torch.device) -> bool:
    """Whether the passes on ``device`` rescale lazily (module doc): on the CPU, where a host read is cheap."""
    return device.type == "cpu"


def spans(offsets: Sequence[int], r0: int, r1: int) -> List[Tuple[int, int, int]]:
    """(conversation, lo, hi) of the conversations intersecting rows [r0, r1), local to r0."""
    out = []
    for b in range(len(offsets) - 1):
        lo, hi = max(offsets[b], r0), min(offsets[b + 1], r1)
        if lo < hi:
            out.append((b, lo - r0, hi - r0))
    return out


def conversation_groups(lengths: Sequence[int], rows: int) -> List[Tuple[int, int]]:
    """Consecutive conversations [b0, b1) whose tokens fit ``rows`` together; a conversation longer than
    ``rows`` is a group of its own (its Gram is then assembled from sub-blocks)."""
    if int(rows) < 1:
        raise RosaInputError(f"rosa_ext.backends.torch_engine.conversation_groups: rows must be >= 1, got {rows}", "rows")
    groups, g0, n = [], 0, 0
    for b, T in enumerate(lengths):
        if b > g0 and n + T > rows:
            groups.append((g0, b))
            g0, n = b, 0
        n += T
    groups.append((g0, len(lengths)))
    return groups


@dataclass
class TileInputs:
    """The per-token inputs of the tiles, compute dtype: h (N, d), bias (V,) or None, and with a LoRA
    term ah (N,) = a_seg . h_t, lq = s ah, lb (B, V)."""

    h: torch.Tensor
    cd: torch.dtype
    bias: Optional[torch.Tensor]
    ah: Optional[torch.Tensor]
    lq: Optional[torch.Tensor]
    lb: Optional[torch.Tensor]


def tile_inputs(prob: HeadProblem) -> TileInputs:
    cd = prob.compute_dtype
    h = prob.hidden.to(cd)
    bias = None if prob.bias is None else prob.bias.to(cd)
    ah = lq = lb = None
    if prob.lora_a is not None and prob.lora_b is not None:
        off = prob.offsets
        if prob.num_conversations == 1:
            ah = torch.mv(h, prob.lora_a[0].to(cd))
        else:
            ah = torch.empty(h.shape[0], dtype=cd, device=h.device)
            for k in range(prob.num_conversations):
                torch.mv(h[off[k]:off[k + 1]], prob.lora_a[k].to(cd), out=ah[off[k]:off[k + 1]])
        lq = ah * prob.lora_scale
        lb = prob.lora_b.to(cd)
    return TileInputs(h, cd, bias, ah, lq, lb)


class Logits:
    """Fills a transposed tile zT (chunk, rows) = W_c h^T + c_c + b_c[seg] (x) lora_q - 1 (x) ref.

    ``m`` is the reference (rows,) once set; ``lazy``: lazy rescaling (module doc)."""

    def __init__(self, x: TileInputs, r0: int, r1: int, W: torch.Tensor, span_list, lazy: bool) -> None:
        self.h, self.W, self.cd, self.bias = x.h[r0:r1], W, x.cd, x.bias
        self.lq, self.lb, self.spans, self.lazy = (None if x.lq is None else x.lq[r0:r1]), x.lb, span_list, lazy
        self.ones = torch.ones(r1 - r0, dtype=x.cd, device=x.h.device) if x.bias is not None else None
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

    def exp_(self, zT: torch.Tensor, shifted: bool) -> Optional[torch.Tensor]:
        """zT (the logits, minus ref when ``shifted``; the targets already -inf) <- exp(logits - ref).
        Not shifted: ref moves to the running maximum of this tile's (off-target) logits and the factor
        exp(ref_old - ref_new) the accumulators must be multiplied by is returned (None for the first)."""
        if shifted:
            zT.exp_()
            return None
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


class TargetIndex:
    """Which targets fall in which vocabulary chunk, per group of rows (one sort, one host read)."""

    def __init__(self, y: torch.Tensor, groups: Sequence[Tuple[int, int]], V: int, c: int) -> None:
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
        starts = torch.arange(0, nch + 1, device=y.device) * c
        starts[-1] = V
        self.per, bnds = [], []
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


class OffTarget:
    """Splits the target entry of every logits tile off: its logit z_t[y_t] is kept (``z_y``, -inf until
    seen: a target outside [0, V) is never split) and the entry set to -inf, so that the reference, the
    exp and every sum of the passes see only the other logits."""

    def __init__(self, y: torch.Tensor, n: int, V: int, c: int, cd: torch.dtype) -> None:
        self.idx = TargetIndex(y, [(0, n)], V, c)
        self.z_y = torch.full((n,), float("-inf"), dtype=cd, device=y.device)

    def take(self, zT: torch.Tensor, j: int, ref: Optional[torch.Tensor]) -> None:
        """Record the target logits of chunk j (zT holds logits minus ``ref`` when given) and mask them."""
        rows, cols = self.idx.rows_in_chunk(0, j)
        if rows.numel():
            vals = zT[cols, rows]
            self.z_y[rows] = vals if ref is None else vals + ref[rows]
            zT[cols, rows] = float("-inf")


def exp_tile(lg: Logits, ot: OffTarget, zT: torch.Tensor, Wc: torch.Tensor, v0: int, v1: int, j: int,
             thr: float) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """One exp tile of the off-target logits (the targets split off first: ``ot``), relative to the
    running reference ``lg.m``. Returns (row sums, rescale factor for the accumulators or None). Lazy
    rescaling: after the first tile the reference stays, and a tile whose row sum exceeds e^TAU (``thr``)
    is redone with the running maximum (rare)."""
    shifted = lg.m is not None and lg.lazy
    lg.fill(zT, Wc, v0, v1, shift=shifted)
    ot.take(zT, j, lg.m if shifted else None)
    r = lg.exp_(zT, shifted)
    cs = zT.sum(0)
    if shifted and float(cs.max()) > thr:  # rare: the first chunk's max was far below this one's
        lg.fill(zT, Wc, v0, v1, shift=False)
        ot.take(zT, j, None)
        mn = torch.maximum(lg.m, zT.amax(0))
        r = torch.exp(lg.m - mn)
        lg.m = mn
        zT.sub_(mn.unsqueeze(0)).exp_()
        cs = zT.sum(0)
    return cs, r


def finish_split(s: torch.Tensor, m: torch.Tensor, ot: OffTarget):
    """(lse, lse_off, log p, log(1 - p), 1 / s) from the off-target row sums s relative to the reference m
    and the target logits (:func:`~rosa_ext.common.jacobian.split_logits`); 1 / s normalises the
    off-target sums into r̂ (0 where there is no other logit)."""
    lse_off = m + torch.log(s)
    lse, logp, logq = split_logits(ot.z_y, lse_off)
    return lse, lse_off, logp, logq, torch.where(s > 0, 1.0 / s, torch.zeros_like(s))


def normalized_tiles(prob: HeadProblem, x: TileInputs, lse: torch.Tensor, chunk: int, drop_targets: bool = True
                     ) -> Iterator[Tuple[int, int, torch.Tensor]]:
    """(v0, v1, tile) for every vocabulary chunk: tile (v1 - v0, N) = exp(z - lse) with the target entries
    zeroed when ``drop_targets`` (r̂_t when ``lse`` is the stats' ``lse_off``; pi_t with the full ``lse``
    and no drop), recomputed from h, W and lse (one pass over W; the tile is a buffer reused by the next
    chunk)."""
    N, V = prob.num_tokens, prob.vocab_size
    lg = Logits(x, 0, N, prob.weight, spans(prob.offsets, 0, N), lazy=True)
    lg.m = lse  # tiles come out normalised: exp(z - lse)
    ot = OffTarget(prob.targets, N, V, chunk, x.cd) if drop_targets else None
    buf = torch.empty(N * chunk, dtype=x.cd, device=x.h.device)
    for j, v0 in enumerate(range(0, V, chunk)):
        v1 = min(V, v0 + chunk)
        zT = buf[:N * (v1 - v0)].view(v1 - v0, N)
        lg.fill(zT, lg.wchunk(v0, v1), v0, v1, shift=True)
        if ot is not None:
            ot.take(zT, j, lse)
        yield v0, v1, zT.exp_()


# ----------------------------------------------------------------------------- the engine
#: elements of one (chunk, rows) tile of the hidden pass and of the streaming reductions (4 MB fp32;
#: flat from 0.5 to 8 MB)
HIDDEN_TILE_ELEMS = 1 << 20
#: rows per block of the hidden pass (W is streamed once per block)
HIDDEN_ROW_BLOCK = 1024
#: elements of one (chunk, N) tile of the LoRA pass (all rows at once: the Gram needs every pair)
LORA_TILE_ELEMS = 1 << 20
#: the LoRA Gram wants a GEMM depth >= 512 (>= 1024 from 2048 rows: at T = 4096, K = 256, 512, 1024
#: gave 150, 210, 225 effective GF/s)
LORA_MIN_CHUNK = 512

@dataclass
class KeptTiles:
    """The exp tiles of :meth:`TorchEngine.gram_pass`, kept for :meth:`TorchEngine.off_target_vjp`:
    ``store`` holds chunk j (columns v0:v1) as a contiguous (v1 - v0, N) block exp(z - ref_j)^T with the
    target entries zeroed, ``refs[j]`` (N,) the reference of chunk j: r_t = store_j * exp(ref_j - lse)."""

    store: torch.Tensor
    chunk: int
    refs: List[torch.Tensor]


def gram_block(T: int) -> int:
    """Rows per block of the block-triangle Gram (measured: the full product below 128 rows)."""
    if T <= 128:
        return T
    return 128 if T <= 1024 else 256


def tri_gram(G: torch.Tensor, ET: torch.Tensor, blk: int) -> None:
    """G += ET^T ET (ET: (chunk, T)) on the lower block triangle (diagonal blocks in full)."""
    T = ET.shape[1]
    if T <= blk:
        G.addmm_(ET.T, ET)
        return
    for i0 in range(0, T, blk):
        i1 = min(T, i0 + blk)
        G[i0:i1, :i1].addmm_(ET[:, i0:i1].T, ET[:, :i1])


def sym_from_lower(G: torch.Tensor, blk: int) -> None:
    """Copy the lower block triangle onto the upper one, in place (no T x T temporary)."""
    T = G.shape[0]
    if T <= blk:
        return
    for i0 in range(blk, T, blk):
        i1 = min(T, i0 + blk)
        G[:i0, i0:i1].copy_(G[i0:i1, :i0].T)


class TorchEngine(WholeVocabulary):
    """The torch implementation of every pass (module doc). ``row_block`` / ``chunk``: force the hidden
    pass's row block and the vocabulary chunk of every pass (tests); default: the tuned sizes."""

    name = "torch"

    def __init__(self, chunk: Optional[int] = None, row_block: Optional[int] = None) -> None:
        self.chunk, self.row_block = chunk, row_block

    def throughput(self, device_type: str, dtype: torch.dtype) -> Dict[str, float]:
        """The cost model's constants of this engine (:data:`rosa_ext.backends.throughput.TORCH`)."""
        return lookup(TORCH, device_type, dtype)

    # ------------------------------------------------------------------------- one-pass plans
    def hidden_pass(self, prob: HeadProblem, budget_bytes: Optional[int] = None) -> HiddenPass:
        """lse, log p, log(1 - p), r̂ . b and r̂ W in one online-softmax pass (:meth:`online_pass`);
        ``budget_bytes`` is not needed (the tiles take a few MB)."""
        return self.online_pass(prob, with_weight=True)

    def online_pass(self, prob: HeadProblem, with_weight: bool) -> HiddenPass:
        """One online-softmax pass over the vocabulary -> HiddenPass (``rw`` None without ``with_weight``:
        then it is the stats pass).

        Per vocabulary chunk: ``zT = W_c h^T`` (GEMM), one rank-k update (bias, LoRA term, reference), the
        target logits taken off, ``exp``, row sums, ``E W += zT^T W_c`` (GEMM), and with a LoRA term
        ``E . b`` (GEMV); at the end everything is divided by the off-target sum (r̂). 4 N d V flops;
        extra memory one (chunk, row block) tile besides the (N, d) result.
        """
        x = tile_inputs(prob)
        N, d, V = prob.num_tokens, prob.hidden_size, prob.vocab_size
        cd, dev = x.cd, x.h.device
        rows = max(1, min(N, self.row_block or HIDDEN_ROW_BLOCK))
        out = {k: torch.empty(N, dtype=cd, device=dev) for k in ("lse", "lse_off", "logp", "logq")}
        rw = torch.empty(N, d, dtype=cd, device=dev) if with_weight else None
        rb = torch.empty(N, dtype=cd, device=dev) if x.lq is not None else None
        thr = math.exp(TAU[cd])
        for r0 in range(0, N, rows):
            r1 = min(N, r0 + rows)
            n = r1 - r0
            span_list = spans(prob.offsets, r0, r1)
            lg = Logits(x, r0, r1, prob.weight, span_list, lazy=lazy_rescaling(dev))
            c = min(V, self.chunk or chunk_for(n, V, HIDDEN_TILE_ELEMS, MIN_CHUNK))
            buf = torch.empty(n * c, dtype=cd, device=dev)
            ot = OffTarget(prob.targets[r0:r1], n, V, c, cd)
            s = torch.zeros(n, dtype=cd, device=dev)
            acc = None if rw is None else rw[r0:r1].zero_()
            sb = None if rb is None else rb[r0:r1].zero_()
            for j, v0 in enumerate(range(0, V, c)):
                v1 = min(V, v0 + c)
                Wc = lg.wchunk(v0, v1)
                zT = buf[:n * (v1 - v0)].view(v1 - v0, n)
                cs, r = exp_tile(lg, ot, zT, Wc, v0, v1, j, thr)
                if r is not None:
                    for a in (s, sb):
                        if a is not None:
                            a.mul_(r)
                    if acc is not None:
                        acc.mul_(r.unsqueeze(1))
                s.add_(cs)
                if acc is not None:
                    acc.addmm_(zT.T, Wc)
                if sb is not None:
                    for b, lo, hi in span_list:
                        sb[lo:hi].addmv_(zT[:, lo:hi].T, x.lb[b, v0:v1])
            lse, lse_off, logp, logq, inv = finish_split(s, lg.m, ot)
            for k, v in (("lse", lse), ("lse_off", lse_off), ("logp", logp), ("logq", logq)):
                out[k][r0:r1] = v
            if acc is not None:
                acc.mul_(inv.unsqueeze(1))
            if sb is not None:
                sb.mul_(inv)
        return HiddenPass(ah=x.ah, rb=rb, rw=rw, engine=self.name, **out)

    def gram_pass(self, prob: HeadProblem, keep: bool, budget_bytes: Optional[int] = None,
                  center: bool = False) -> GramPass:
        """One pass: lse, log p, log(1 - p), r̂_t . b, and per conversation ``r̂_t . r̂_u`` and ``r̂_t[y_u]``
        -> GramPass (raw parts, whatever ``center`` asks: the plan centres them).

        ``keep``: store the N x V exp tiles (the caller checked the memory budget: ``budget_bytes`` is not
        read here) so that :meth:`off_target_vjp` is a GEMV. Flops: 2 N d V for the logits and
        ~sum_b T_b^2 V for the block-triangle Gram.
        """
        x = tile_inputs(prob)
        N, V = prob.num_tokens, prob.vocab_size
        cd, dev = x.cd, x.h.device
        span_list = spans(prob.offsets, 0, N)
        lg = Logits(x, 0, N, prob.weight, span_list, lazy=lazy_rescaling(dev))
        c = min(V, self.chunk or chunk_for(N, V, LORA_TILE_ELEMS, LORA_MIN_CHUNK * (2 if N >= 2048 else 1)))
        store = torch.empty(N * V if keep else N * c, dtype=cd, device=dev)
        G = [torch.zeros(hi - lo, hi - lo, dtype=cd, device=dev) for _, lo, hi in span_list]
        X = [torch.zeros(hi - lo, hi - lo, dtype=cd, device=dev) for _, lo, hi in span_list]
        Xchunk = [torch.zeros(hi - lo, dtype=torch.long, device=dev) for _, lo, hi in span_list]
        blks = [gram_block(hi - lo) for _, lo, hi in span_list]
        y = prob.targets
        ot = OffTarget(y, N, V, c, cd)
        xidx = TargetIndex(y, [(lo, hi) for _, lo, hi in span_list], V, c)
        s = torch.zeros(N, dtype=cd, device=dev)
        sb = torch.zeros(N, dtype=cd, device=dev) if x.lq is not None else None
        refs: List[torch.Tensor] = []
        rescaled = False
        thr = math.exp(TAU[cd])
        for j, v0 in enumerate(range(0, V, c)):
            v1 = min(V, v0 + c)
            w = v1 - v0
            Wc = lg.wchunk(v0, v1)
            zT = (store[N * v0:N * v1] if keep else store[:N * w]).view(w, N)
            cs, r = exp_tile(lg, ot, zT, Wc, v0, v1, j, thr)
            if r is not None:
                rescaled = True
                for a in (s, sb):
                    if a is not None:
                        a.mul_(r)
                for (_, lo, hi), Gb in zip(span_list, G):
                    Gb.mul_(r[lo:hi].unsqueeze(1)).mul_(r[lo:hi].unsqueeze(0))
            s.add_(cs)
            for k, (b, lo, hi) in enumerate(span_list):
                Ek = zT[:, lo:hi]  # (w, T_k)
                if sb is not None:
                    sb[lo:hi].addmv_(Ek.T, x.lb[b, v0:v1])
                tri_gram(G[k], Ek, blks[k])
                us, cols = xidx.rows_in_chunk(k, j)
                if us.numel():
                    X[k][:, us - lo] = Ek[cols].T
                    Xchunk[k][us - lo] = j
            refs.append(lg.m)
        m = lg.m
        lse, lse_off, logp, logq, inv = finish_split(s, m, ot)
        for k, (_, lo, hi) in enumerate(span_list):
            sym_from_lower(G[k], blks[k])
            G[k].mul_(inv[lo:hi].unsqueeze(1)).mul_(inv[lo:hi].unsqueeze(0))
            if rescaled:  # X[t, u] is relative to the reference of the chunk holding y_u
                R = torch.stack([r_[lo:hi] for r_ in refs], 1)  # (T_b, chunks)
                X[k].mul_(torch.exp(R[:, Xchunk[k]] - m[lo:hi].unsqueeze(1)))
            X[k].mul_(inv[lo:hi].unsqueeze(1))
        rb = None if sb is None else sb.mul_(inv)
        return GramPass(lse=lse, lse_off=lse_off, logp=logp, logq=logq, ah=x.ah, rb=rb, gram=G, cross=X,
                        kept=KeptTiles(store, c, refs) if keep else None, engine=self.name)

    def off_target_vjp(self, prob: HeadProblem, gp: GramPass, w: torch.Tensor,
                       out: Optional[torch.Tensor] = None) -> torch.Tensor:
        """sum_{t in b} w_t r̂_t -> (B, V), r̂_t normalised by ``gp.lse_off``: a GEMV over ``gp.kept`` when
        the pass kept its tiles, else one streaming pass that recomputes each tile from h, W and lse_off."""
        N, V, B = prob.num_tokens, prob.vocab_size, prob.num_conversations
        span_list = spans(prob.offsets, 0, N)
        out = torch.empty(B, V, dtype=prob.compute_dtype, device=w.device) if out is None else out
        kept: Optional[KeptTiles] = gp.kept
        if kept is not None:
            for j, v0 in enumerate(range(0, V, kept.chunk)):
                v1 = min(V, v0 + kept.chunk)
                ET = kept.store[N * v0:N * v1].view(v1 - v0, N)
                coef = w * torch.exp(kept.refs[j] - gp.lse_off)
                for b, lo, hi in span_list:
                    torch.mv(ET[:, lo:hi], coef[lo:hi], out=out[b, v0:v1])
            return out
        c = min(V, self.chunk or chunk_for(N, V, LORA_TILE_ELEMS, LORA_MIN_CHUNK))
        for v0, v1, rT in normalized_tiles(prob, tile_inputs(prob), gp.lse_off, c):
            for b, lo, hi in span_list:
                torch.mv(rT[:, lo:hi], w[lo:hi], out=out[b, v0:v1])
        return out

    # ------------------------------------------------------------------------- matrix-free CG
    def stats(self, prob: HeadProblem, budget_bytes: Optional[int] = None) -> HeadStats:
        """The split stats (lse, lse_off, log p, log(1 - p), a . h, r̂ . b per token): :meth:`online_pass`
        without r̂ W."""
        hp = self.online_pass(prob, with_weight=False)
        return HeadStats(lse=hp.lse, logp=hp.logp, ah=hp.ah, pib=None, lse_off=hp.lse_off, logq=hp.logq, rb=hp.rb,
                         engine=self.name, split=True)

    def _tiles(self, prob: HeadProblem, st: HeadStats, drop_targets: bool):
        """r̂ tiles (from ``st.lse_off``) with ``drop_targets``, pi tiles (from ``st.lse``) without."""
        c = min(prob.vocab_size, self.chunk or chunk_for(prob.num_tokens, prob.vocab_size, HIDDEN_TILE_ELEMS, MIN_CHUNK))
        return normalized_tiles(prob, tile_inputs(prob), st.lse_off if drop_targets else st.lse, c, drop_targets)

    def _row_reduce(self, prob: HeadProblem, st: HeadStats, u: torch.Tensor, drop_targets: bool) -> torch.Tensor:
        out = torch.zeros(prob.num_tokens, dtype=prob.compute_dtype, device=u.device)
        span_list = spans(prob.offsets, 0, prob.num_tokens)
        for v0, v1, pT in self._tiles(prob, st, drop_targets):
            for b, lo, hi in span_list:
                out[lo:hi].addmv_(pT[:, lo:hi].T, u[b, v0:v1].to(pT.dtype))
        return out

    def _column_reduce(self, prob: HeadProblem, st: HeadStats, w: torch.Tensor, drop_targets: bool) -> torch.Tensor:
        out = torch.empty(prob.num_conversations, prob.vocab_size, dtype=prob.compute_dtype, device=w.device)
        span_list = spans(prob.offsets, 0, prob.num_tokens)
        for v0, v1, pT in self._tiles(prob, st, drop_targets):
            for b, lo, hi in span_list:
                torch.mv(pT[:, lo:hi], w[lo:hi], out=out[b, v0:v1])
        return out

    def row_reduce(self, prob: HeadProblem, st: HeadStats, u: torch.Tensor) -> torch.Tensor:
        """(pi_t . u[seg_t]) for u (B, V) -> (N,)."""
        return self._row_reduce(prob, st, u, drop_targets=False)

    def column_reduce(self, prob: HeadProblem, st: HeadStats, w: torch.Tensor) -> torch.Tensor:
        """sum_{t in b} w_t pi_t for w (N,) -> (B, V)."""
        return self._column_reduce(prob, st, w, drop_targets=False)

    def off_target_row_reduce(self, prob: HeadProblem, st: HeadStats, u: torch.Tensor) -> torch.Tensor:
        """:meth:`row_reduce` with r_t (pi_t without its target entry) in place of pi_t."""
        return self._row_reduce(prob, st, u, drop_targets=True)

    def off_target_column_reduce(self, prob: HeadProblem, st: HeadStats, w: torch.Tensor) -> torch.Tensor:
        """:meth:`column_reduce` with r_t in place of pi_t."""
        return self._column_reduce(prob, st, w, drop_targets=True)

    def pi_sqnorm(self, prob: HeadProblem, st: HeadStats) -> torch.Tensor:
        """r̂_t . r̂_t for every token -> (N,) (the relative ridge of LoRA CG)."""
        out = torch.zeros(prob.num_tokens, dtype=prob.compute_dtype, device=prob.weight.device)
        for _, _, rT in self._tiles(prob, st, drop_targets=True):
            out += (rT * rT).sum(0)
        return out

    def weight_matvec(self, prob: HeadProblem, v: torch.Tensor) -> torch.Tensor:
        """W v for v (B, d) -> (B, V), compute dtype (a bf16/fp16 W widened chunk by chunk)."""
        if prob.weight.dtype == prob.compute_dtype:
            return v @ prob.weight.T
        return torch.cat([v @ Wc.T for Wc in self._widened(prob)], 1)

    def weight_rmatvec(self, prob: HeadProblem, q: torch.Tensor) -> torch.Tensor:
        """q W for q (B, V) -> (B, d), compute dtype (a bf16/fp16 W widened chunk by chunk)."""
        if prob.weight.dtype == prob.compute_dtype:
            return q @ prob.weight
        step = self.chunk or MIN_CHUNK * 16
        return sum(q[:, i * step:(i + 1) * step] @ Wc for i, Wc in enumerate(self._widened(prob)))

    def _widened(self, prob: HeadProblem) -> Iterator[torch.Tensor]:
        step = self.chunk or MIN_CHUNK * 16
        for v0 in range(0, prob.vocab_size, step):
            yield prob.weight[v0:v0 + step].to(prob.compute_dtype)
