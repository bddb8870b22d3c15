"""The LoRA dual's VJP over the probability tiles in one Triton launch (MATH.md section 4).

The b-part of the step ``J^T alpha`` is, per conversation b, ``sum_{t in b} w_t (e_{y_t} - r̂_t)`` with
w = alpha c (:mod:`rosa_ext.plans.dual_lora`): a weighted column sum of the tiles and a scatter of w at
the targets. As torch ops over bf16 tiles it is ~25 launches (w split into hi/lo, the split scales folded
into it, a batched GEMV per split, the negation, the scatter); here it is one:

``_tile_vjp_kernel`` -- grid (column blocks, conversations). A program owns BLOCK_V columns of one
conversation's output row and loops over that conversation's tile rows in blocks of BLOCK_T: each entry is
the stored value (hi + lo for bf16x2, widened exactly) times its split's scale and w_t, summed in fp32 over
the tokens (an fp32 FMA chain of at most T_b terms, rounded to nearest: a GEMV gains nothing from tensor
cores), minus w_t where the column is the token's target (``centered``; targets outside [0, V) scatter
nothing). Rows of one block of tokens (``rows0``, :mod:`rosa_ext.backends.tile_blocks`) add to the output
with ``accumulate``; conversations with no row in the block write 0 (or add nothing). No atomics, no host
sync; the tiles are read once.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..common.validation import RosaInputError
from ._tiles import INTERPRET, guard_launches, tile_parts
from .tile_layout import ProbTiles

#: (BLOCK_T, BLOCK_V, num_warps) on the GPU (16 x 128 per step: 32 x 256 spilled its int64 addresses); the
#: interpreter's small blocks
GPU_CONFIG = (16, 128, 4)
INTERPRET_CONFIG = (16, 64, 1)


@triton.jit
def _tile_vjp_kernel(t_ptr, t_lo_ptr, sc_ptr, w_ptr, ws_ptr, y_ptr, off_ptr, out_ptr, s_t, s_sc, s_out, n_rows, rows0, V,
                     width, ONE: tl.constexpr, HAS_SCALE: tl.constexpr, MODE: tl.constexpr, CENTERED: tl.constexpr,
                     ACCUMULATE: tl.constexpr, BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr):
    """Columns [pid0 BLOCK_V, ...) of conversation pid1's row (module doc)."""
    cols = tl.program_id(0) * BLOCK_V + tl.arange(0, BLOCK_V)
    b = tl.program_id(1)
    mc = cols < V
    if ONE:
        lo = rows0 * 0
        hi = n_rows + lo
    else:  # the conversation's rows within this block of tokens [rows0, rows0 + n_rows)
        lo = tl.minimum(tl.maximum(tl.load(off_ptr + b) - rows0, 0), n_rows)
        hi = tl.minimum(tl.maximum(tl.load(off_ptr + b + 1) - rows0, lo), n_rows)
    split = cols // width
    acc = tl.zeros([BLOCK_V], tl.float32)
    for t0 in range(lo, hi, BLOCK_T):
        rows = t0 + tl.arange(0, BLOCK_T)
        mr = rows < hi
        m = mr[:, None] & mc[None, :]
        at = rows[:, None].to(tl.int64) * s_t + cols[None, :]
        x = tl.load(t_ptr + at, mask=m, other=0.0).to(tl.float32)
        if MODE == 1:
            x += tl.load(t_lo_ptr + at, mask=m, other=0.0).to(tl.float32)
        if HAS_SCALE:
            x *= tl.load(sc_ptr + split[None, :] * s_sc + rows[:, None], mask=m, other=0.0)
        w = tl.load(w_ptr + rows, mask=mr, other=0.0)
        x = x * w[:, None]
        if CENTERED:  # the stored target entry is 0: w_t r̂_t - ws_t e_{y_t}, negated below
            y = tl.load(y_ptr + rows, mask=mr, other=-1)
            ws = tl.load(ws_ptr + rows, mask=mr, other=0.0)
            x = tl.where(y[:, None] == cols[None, :], -ws[:, None], x)
        acc += tl.sum(x, axis=0)
    if CENTERED:
        acc = -acc
    dst = out_ptr + b.to(tl.int64) * s_out + cols
    if ACCUMULATE:
        acc += tl.load(dst, mask=mc, other=0.0)
    tl.store(dst, acc, mask=mc)


_tile_vjp_kernel = guard_launches(_tile_vjp_kernel)


def tile_vjp(tiles: ProbTiles, w: torch.Tensor, out: torch.Tensor, *, targets: Optional[torch.Tensor] = None,
             target_w: Optional[torch.Tensor] = None, offsets: Optional[torch.Tensor] = None, rows0: int = 0,
             accumulate: bool = False) -> torch.Tensor:
    """Per conversation b, ``sum_{t in b} w_t r̂_t`` -- or, with ``targets``, the centred
    ``sum_{t in b} (ws_t e_{y_t} - w_t r̂_t)`` with ws = ``target_w`` (default w: the tiles' rows exactly r̂;
    a caller whose tiles are normalised by another log-sum-exp folds that factor into w only) -- written into
    (or, ``accumulate``, added to) row b of ``out``, in one launch (module doc). Returns ``out``.

    Args:
        tiles: n rows of tokens (one block: tokens [rows0, rows0 + n)); r̂ = stored x ``split_scale``.
        w: (n,) fp32 weight of each tile row.
        out: (B, V) fp32, unit column stride (e.g. the b-part of the update, a column slice of a wider row).
        targets: (n,) int64 the rows' targets, for the centred form; None: the plain column sums.
        offsets: (B + 1,) int32 device offsets of the conversations' tokens (absolute: ``rows0`` subtracted in
            the kernel); None: one conversation, every row.
    """
    n, V = int(tiles.shape[0]), int(tiles.shape[1])
    who = "rosa_ext.kernels.tile_vjp"
    if w.shape != (n,) or w.dtype != torch.float32:
        raise RosaInputError(f"{who}: w must be ({n},) float32, got {tuple(w.shape)} {w.dtype}", "w")
    if out.dim() != 2 or out.shape[1] != V or out.dtype != torch.float32 or out.stride(1) != 1:
        raise RosaInputError(f"{who}: out must be (B, {V}) float32 with unit column stride, got {tuple(out.shape)} "
                             f"{out.dtype}", "out")
    B = int(out.shape[0])
    if B > 1 and offsets is None:
        raise RosaInputError(f"{who}: out has {B} rows but no offsets were given", "offsets")
    if targets is not None and tuple(targets.shape) != (n,):
        raise RosaInputError(f"{who}: targets must be ({n},), got {tuple(targets.shape)}", "targets")
    ws = w if target_w is None else target_w
    if ws.shape != (n,) or ws.dtype != torch.float32:
        raise RosaInputError(f"{who}: target_w must be ({n},) float32, got {tuple(ws.shape)} {ws.dtype}", "target_w")
    t, t_lo, mode = tile_parts(tiles)
    sc = tiles.split_scale
    bt, bv, nw = INTERPRET_CONFIG if INTERPRET else GPU_CONFIG
    w, ws = w.contiguous(), ws.contiguous()
    if B and V:
        _tile_vjp_kernel[(triton.cdiv(V, bv), B)](
            t, t_lo, sc if sc is not None else w, w, ws, targets if targets is not None else w,
            offsets if offsets is not None else w, out, t.stride(0), sc.stride(0) if sc is not None else 0,
            out.stride(0), n, int(rows0), V, tiles.width(), ONE=offsets is None, HAS_SCALE=sc is not None, MODE=mode,
            CENTERED=targets is not None, ACCUMULATE=accumulate, BLOCK_T=bt, BLOCK_V=bv, num_warps=nw)
    return out
