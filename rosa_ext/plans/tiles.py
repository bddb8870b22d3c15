"""The torch tiles of the one-pass plans (MATH.md section 4): logits tiles of the head, their exp
with an online (or lazy) softmax reference, and the target entry of every tile split off.

The dual plans (:mod:`.dual_hidden`, :mod:`.dual_lora`) and hidden-mode CG (:mod:`.cg_hidden`) stream
the vocabulary through these helpers:

- :class:`Logits`: fills a TRANSPOSED tile (vocabulary chunk, tokens) ``zT = W_c h^T`` plus bias,
  LoRA term and reference shift as one rank-k update after the GEMM; :meth:`Logits.fill_exp` makes
  it ``exp(z - ref)``.
- :class:`OffTarget`: gathers and zeroes the target entry of every tile, so that the off-target
  distribution r_t (pi_t without its target entry) is what the plans accumulate; 1 - p_t = sum(r_t)
  is then exact to rounding and nothing cancels when p_t -> 1.
- :func:`exp_tile`: one tile with its targets split off (and the lazy rescaling's rare redo).
- :func:`tile_inputs`, :func:`observed_logp_split`: the per-token inputs and log p_t.

Numerics. On the CPU ``W_c h^T``, the Gram ``E^T E`` and the reductions over the vocabulary are as
fast or faster in the transposed layout (the Gram up to 1.5x at T <= 128). On the CPU the reference
is the row maximum of the first chunk, and a tile is redone with the running maximum only when its
row sum of exp(z - ref) exceeds e^TAU ("lazy rescaling": no max reduction per chunk, accumulators
almost never rescaled, entries bounded by e^TAU so a Gram cannot overflow); it needs one host read
per chunk, so on other devices every tile moves the reference to the running maximum instead (the
classic online softmax, no host sync). Targets outside [0, V) (the tokens another rank of a
vocabulary-parallel head owns) are never split off.

Dtypes: compute in float32, or float64 for float64 models; bf16/fp16 weights are widened one chunk
at a time. Tile sizes (in each plan's file) were tuned for one thread of the project's 2-core CPU.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import List, Optional, Sequence, Tuple

import torch

from ..common.jacobian import target_logit, target_logp
from ..common.types import HeadProblem

#: the smallest vocabulary chunk (GEMM efficiency)
MIN_CHUNK = 256
#: lazy rescaling: a tile is redone when a row sum of exp(z - ref) exceeds e^TAU
TAU = {torch.float32: 30.0, torch.float64: 200.0}


def chunk_for(rows: int, V: int, tile_elems: int, min_chunk: int) -> int:
    c = max(min_chunk, tile_elems // max(1, rows))
    c = (c // 64) * 64 or 64
    return max(1, min(V, c))


def spans(offsets: Sequence[int], r0: int, r1: int) -> List[Tuple[int, int, int]]:
    """(conversation, lo, hi) of the conversations intersecting rows [r0, r1), local to r0."""
    out = []
    for b in range(len(offsets) - 1):
        lo, hi = max(offsets[b], r0), min(offsets[b + 1], r1)
        if lo < hi:
            out.append((b, lo - r0, hi - r0))
    return out


def lazy_rescaling(device: torch.device) -> bool:
    return device.type == "cpu"


class Logits:
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


class TargetIndex:
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


class OffTarget:
    """Splits each exp tile into its target entries E[t, y_t] (gathered) and the rest (zeroed)."""

    def __init__(self, y: torch.Tensor, n: int, V: int, c: int, cd: torch.dtype) -> None:
        self.idx = TargetIndex(y, [(0, n)], V, c)
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


def exp_tile(lg: Logits, ot: OffTarget, zT: torch.Tensor, Wc: torch.Tensor, v0: int, v1: int, j: int,
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
class TileInputs:
    h: torch.Tensor            # (N, d) compute dtype
    cd: torch.dtype
    bias: Optional[torch.Tensor]
    ah: Optional[torch.Tensor]
    lq: Optional[torch.Tensor]  # s * ah
    lb: Optional[torch.Tensor]  # (B, V) compute dtype


def tile_inputs(prob: HeadProblem) -> TileInputs:
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
    return TileInputs(h, cd, bias, ah, lq, lb)


def observed_logp_split(prob: HeadProblem, x: TileInputs, lse: torch.Tensor, q: torch.Tensor) -> torch.Tensor:
    """log p_t from a pass that summed q = 1 - p_t off-target (:func:`~rosa_ext.common.jacobian.target_logp`).
    Targets outside [0, V) get a meaningless value (the vocabulary-parallel combine replaces it)."""
    y = prob.targets.clamp(0, prob.vocab_size - 1)
    by = None if x.lq is None else x.lb[prob.seg, y]
    z_y = target_logit(x.h, prob.weight, y, bias=x.bias, ah=x.ah, by=by, lora_scale=prob.lora_scale)
    return target_logp(z_y, lse, q)
