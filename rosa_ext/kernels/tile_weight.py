"""Hidden mode's product over the probability tiles, ``r̂ W``, in ONE Triton launch (MATH.md section 4).

:func:`tile_weight` computes, for tiles of N tokens over V vocabulary entries (:class:`.tile_layout.ProbTiles`)
and the head's weight W (V, d),

    out[t, :] = sum_s split_scale[s, t] * sum_{v in split s} stored[t, v] * W[v, :]      (N, d) fp32,

exactly what :func:`rosa_ext.kernels.tile_gemms.off_target_weight` returns (``stored``: ``p`` for "fp32"
tiles, ``hi + lo`` for "bf16x2", ``hi`` for "bf16"; without ``split_scale`` no scales, the splits still
``tiles.width()`` wide). There it is about ten torch launches per token block (bf16 hi/lo parts, a batched
K-split GEMM per group of vocabulary splits, the tail split, the scales multiplied, the splits summed);
here one launch writes the result straight into ``out`` (e.g. rows of a larger tensor).

**Grid and the K-split.** Grid (cdiv(N, BLOCK_T), cdiv(d, BLOCK_D)); each program owns a BLOCK_T x BLOCK_D
block of ``out`` and runs over the vocabulary splits s in turn, each split in chunks of BLOCK_K columns
(masked at the split's end and at V: splits of any width, V and d of any size) -- one loop over the chunks of
every split, so that Triton pipelines it as one. Each split's product is accumulated in its own fp32
accumulator, added to the total times ``split_scale[s, rows]`` after the split's last chunk: no
tensor-core accumulation chain is longer than a split (at most ``GEMM_K_MAX`` = 4096 columns: the K-split
of :mod:`.tile_gemms`, whose module docstring gives why -- truncating accumulation -- and the error
model), the same chains as the torch GEMMs'.

**Precision** (the rules of :mod:`.tile_gemms`):

- "bf16x2" tiles with bf16 W: ``hi W + lo W``, two bf16 tensor-core products into the fp32 accumulator;
- "bf16x2" tiles with fp32 W (an fp16 W is widened to fp32 in the kernel, exactly): W split in the kernel
  into ``W_hi = bf16(W)``, ``W_lo = bf16(W - W_hi)`` (round to nearest even with the integer helper
  :func:`.prob_tiles.round_bf16`, so the interpreter -- which truncates on a bf16 cast -- splits as the GPU
  does) and ``hi W_hi + lo W_hi + hi W_lo`` (lo x W_lo dropped: at most 2^-16 relative);
- "bf16" tiles: the hi part only (``hi W``, or ``hi W_hi + hi W_lo`` with fp32 W);
- "fp32" tiles: fp32 ``tl.dot`` at :func:`._tiles.fp32_precision` ("tf32x3" by default: ~2^-21 relative
  per product), a bf16 / fp16 W widened to fp32 in the kernel.

The Triton interpreter multiplies bf16 operands wrongly (``tl.dot`` of bf16 tiles returns garbage there),
so under it (:data:`._tiles.INTERPRET`) the bf16 parts are widened to fp32 just before each ``tl.dot``:
exact products, fp32 accumulation -- the arithmetic of a bf16 tensor-core product with fp32 output, as
:func:`rosa_ext.kernels.tile_gemms.mm_f32` does on the CPU. The GPU's bf16 dot is checked only by the
ahead-of-time compile (python_tests/kernels/test_tile_weight.py: wgmma, no spill) and the GPU tests.

**Cost, and a design doubt.** The tiles are read once per column of programs, cdiv(d, BLOCK_D) times
(d = 896 with BLOCK_D = 128: 7 reads of the N x V tiles; the programs of one token tile run at about the
same time, so L2 may serve most of the repeats), and W once per token tile, cdiv(N, BLOCK_T) times. The grid
has only cdiv(N, BLOCK_T) cdiv(d, BLOCK_D) programs, each looping over all V columns: a hidden-mode block of
the Qwen2.5 head (V = 151936, at most 441 tokens of bf16x2 tiles in 256 MiB) gives at most 7 x 7 = 49
programs on an H100's 132 SMs, each moving ~64 flops per byte it loads. cuBLAS's batched GEMM over the 38
splits (:mod:`.tile_gemms`) has more parallelism and its own tuning, but writes and re-reads the (S, N, d)
fp32 per-split products and runs ~10 launches. Which is faster is unmeasured (no GPU here): a split-K grid
dimension (partials combined by a second launch) is the obvious change if the GPU shows the grid too small.
No atomics (deterministic), no host sync.
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..common.validation import RosaInputError, RosaTypeError
from ._tiles import INTERPRET, fp32_precision, guard_launches
from .prob_tiles import round_bf16
from .tile_layout import _OUT_MODE, ProbTiles

#: (BLOCK_T, BLOCK_D, BLOCK_K, num_warps, num_stages) on the GPU where V, d and the split width are multiples
#: of 16 (Triton then specialises them as such, the k masks are constant over 16-element runs and every load
#: is a pipelined asynchronous copy). Compiled ahead of time for sm_90 (python_tests/kernels/test_tile_weight.py;
#: Triton 3.9): wgmma, pipelined, no spill, 177-251 registers, 48-104 KiB of shared memory. Why these: with
#: 8 warps a 64-row tile gets two wgmma layouts (Triton's layout choice takes two dots into one accumulator for
#: a chain of dots) and converts the accumulator through shared memory twice per chunk; 128-row tiles halve the grid (module
#: docstring); BLOCK_K 64 with 4 warps spills 8 bytes for an fp16 W and 24 for fp32 tiles.
GPU_CONFIG = (64, 128, 32, 4, 4)
#: Otherwise (e.g. V = 50257): the loads are not vectorised nor pipelined, and the 128-wide tile spills
#: (168-264 bytes); the 64-wide one does not (168-244 registers).
GPU_CONFIG_UNALIGNED = (64, 64, 32, 4, 4)
#: Under the interpreter: small blocks (CPU tests).
INTERPRET_CONFIG = (16, 32, 32, 1, 1)


def tile_config(V: int, d: int, width: int) -> Tuple[int, int, int, int, int]:
    """(BLOCK_T, BLOCK_D, BLOCK_K, num_warps, num_stages) of :func:`tile_weight` for V columns, d of W and
    splits of ``width`` columns: :data:`GPU_CONFIG` when all three are multiples of 16, else
    :data:`GPU_CONFIG_UNALIGNED`; :data:`INTERPRET_CONFIG` under the interpreter."""
    if INTERPRET:
        return INTERPRET_CONFIG
    return GPU_CONFIG if V % 16 == 0 and d % 16 == 0 and width % 16 == 0 else GPU_CONFIG_UNALIGNED


@triton.jit
def _dot(a, b, acc, WIDEN: tl.constexpr):
    """acc + a @ b for bf16 a, b (fp32 accumulation); WIDEN (the interpreter): both widened to fp32 first."""
    if WIDEN:
        acc = tl.dot(a.to(tl.float32), b.to(tl.float32), acc, input_precision="ieee")
    else:
        acc = tl.dot(a, b, acc)
    return acc


@triton.jit
def _chunk(acc, p_ptr, lo_ptr, w_ptr, row_p, row_lo, offs_k, mk, mask_t, offs_d, mask_d, s_wv, s_wd,
           TILES: tl.constexpr, W_BF16: tl.constexpr, PRECISION: tl.constexpr, WIDEN: tl.constexpr):
    """acc (BLOCK_T, BLOCK_D) fp32 + the product of the tiles' columns ``offs_k`` (mask ``mk``) with W's rows
    ``offs_k``: TILES 0 fp32 p, 1 bf16 hi + lo, 2 bf16 hi (module docstring: the precision rules)."""
    mt = mask_t[:, None] & mk[None, :]
    w = tl.load(w_ptr + offs_k.to(tl.int64)[:, None] * s_wv + offs_d[None, :] * s_wd,
                mask=mk[:, None] & mask_d[None, :], other=0.0)
    hi = tl.load(p_ptr + row_p[:, None] + offs_k[None, :], mask=mt, other=0.0)
    if TILES == 0:
        acc = tl.dot(hi, w.to(tl.float32), acc, input_precision=PRECISION)
    elif W_BF16:
        acc = _dot(hi, w, acc, WIDEN)
        if TILES == 1:
            acc = _dot(tl.load(lo_ptr + row_lo[:, None] + offs_k[None, :], mask=mt, other=0.0), w, acc, WIDEN)
    else:
        wf = w.to(tl.float32)
        w_hi = round_bf16(wf)
        w_lo = round_bf16(wf - w_hi).to(tl.bfloat16)
        w_hi = w_hi.to(tl.bfloat16)  # exact: round_bf16's values are bf16 values
        acc = _dot(hi, w_hi, acc, WIDEN)
        if TILES == 1:
            acc = _dot(tl.load(lo_ptr + row_lo[:, None] + offs_k[None, :], mask=mt, other=0.0), w_hi, acc, WIDEN)
        acc = _dot(hi, w_lo, acc, WIDEN)
    return acc


@triton.jit
def _tile_weight_kernel(p_ptr, lo_ptr, w_ptr, scale_ptr, out_ptr, N, V, D, S, width,
                        s_p, s_lo, s_wv, s_wd, s_sc, s_st, s_out,
                        TILES: tl.constexpr, W_BF16: tl.constexpr, HAS_SCALE: tl.constexpr,
                        PRECISION: tl.constexpr, WIDEN: tl.constexpr,
                        BLOCK_T: tl.constexpr, BLOCK_D: tl.constexpr, BLOCK_K: tl.constexpr):
    """out[rows, cols] of program (token tile, column block): over the S vocabulary splits of ``width`` columns
    (the last may be narrower), each split's product in its own fp32 accumulator, added to the total times
    ``scale[s, t]`` (at ``scale_ptr + s s_sc + t s_st``; HAS_SCALE False: no scales). Tiles: (N, V) with row
    strides s_p (p / hi) and s_lo (lo), unit column stride; W (V, D) strides (s_wv, s_wd); out row stride s_out."""
    pid_t = tl.program_id(0)
    pid_d = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < N
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    mask_d = offs_d < D
    row_p = offs_t.to(tl.int64) * s_p
    row_lo = offs_t.to(tl.int64) * s_lo
    total = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    per_split = tl.cdiv(width, BLOCK_K)  # chunks of a full split
    chunks = (S - 1) * per_split + tl.cdiv(V - (S - 1) * width, BLOCK_K)
    for c in range(0, chunks):  # one loop over every split's chunks (pipelined as one)
        s = c // per_split
        j = c - s * per_split
        k_begin = s * width
        k_end = tl.minimum(k_begin + width, V)
        offs_k = k_begin + j * BLOCK_K + tl.arange(0, BLOCK_K)
        acc = _chunk(acc, p_ptr, lo_ptr, w_ptr, row_p, row_lo, offs_k, offs_k < k_end, mask_t, offs_d, mask_d,
                     s_wv, s_wd, TILES, W_BF16, PRECISION, WIDEN)
        if (j == per_split - 1) | (c == chunks - 1):  # the split's last chunk: its product into the total
            if HAS_SCALE:
                sc = tl.load(scale_ptr + s * s_sc + offs_t * s_st, mask=mask_t, other=0.0)
                total += acc * sc[:, None]
            else:
                total += acc
            acc = tl.zeros((BLOCK_T, BLOCK_D), dtype=tl.float32)
    tl.store(out_ptr + offs_t.to(tl.int64)[:, None] * s_out + offs_d[None, :], total,
             mask=mask_t[:, None] & mask_d[None, :])


_tile_weight_kernel = guard_launches(_tile_weight_kernel)


def _check(tiles: ProbTiles, weight: torch.Tensor, out: Optional[torch.Tensor]) -> Tuple[int, int, int]:
    """Validate the arguments of :func:`tile_weight` -> (N, V, d); a named error otherwise."""
    who = "rosa_ext.kernels.tile_weight"
    if not isinstance(tiles, ProbTiles) or tiles.precision not in _OUT_MODE:
        raise RosaTypeError(f"{who}: tiles must be ProbTiles of a known precision, got {type(tiles).__name__}", "tiles")
    N, V = (int(x) for x in tiles.shape)
    parts = [tiles.p] if tiles.p is not None else [tiles.hi] + ([tiles.lo] if tiles.lo is not None else [])
    if any(x.stride(1) != 1 and x.shape[1] > 1 for x in parts):
        raise RosaInputError(f"{who}: the tiles must have unit column stride", "tiles")
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.shape[0] != V:
        raise RosaInputError(f"{who}: weight must be ({V}, d), got "
                             f"{tuple(weight.shape) if isinstance(weight, torch.Tensor) else type(weight).__name__}",
                             "weight")
    if weight.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise RosaTypeError(f"{who}: weight must be fp32, bf16 or fp16, got {weight.dtype}", "weight")
    dev = parts[0].device
    if weight.device != dev:
        raise RosaInputError(f"{who}: weight must be on the tiles' device {dev}, got {weight.device}", "weight")
    d = int(weight.shape[1])
    if out is not None and (not isinstance(out, torch.Tensor) or out.dtype != torch.float32
                            or tuple(out.shape) != (N, d) or out.device != dev or (d > 1 and out.stride(1) != 1)):
        got = (f"{tuple(out.shape)} {out.dtype} on {out.device}" if isinstance(out, torch.Tensor)
               else type(out).__name__)
        raise RosaInputError(f"{who}: out must be a ({N}, {d}) float32 tensor with unit column stride on {dev}, "
                             f"got {got}", "out")
    sc = tiles.split_scale
    if sc is not None and V and tuple(sc.shape) != (triton.cdiv(V, tiles.width()), N):
        raise RosaInputError(f"{who}: split_scale must be ({triton.cdiv(V, tiles.width())}, {N}) for splits of "
                             f"{tiles.width()} columns, got {tuple(sc.shape)}", "tiles")
    return N, V, d


def tile_weight(tiles: ProbTiles, weight: torch.Tensor, out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """r̂ W over the tile rows -> (N, d) fp32 in ONE launch (module docstring), the value of
    :func:`rosa_ext.kernels.tile_gemms.off_target_weight`.

    Args:
        tiles: :class:`ProbTiles` (N, V) of any storage precision, rows possibly strided views (unit column
            stride), with or without ``split_scale`` (S, N) fp32.
        weight: (V, d) fp32, bf16 or fp16, any strides, on the tiles' device (bf16 used as is with bf16
            tiles; fp32 / fp16 split into bf16 hi + lo in the kernel; widened to fp32 for fp32 tiles).
        out: (N, d) fp32 with unit column stride (any row stride: e.g. rows of a larger tensor) to write
            into; allocated when None.
    Returns:
        ``out``. No host sync; rows of a larger tensor outside ``out`` are not touched.
    """
    N, V, d = _check(tiles, weight, out)
    if out is None:
        out = torch.empty(N, d, dtype=torch.float32, device=weight.device)
    if N == 0 or d == 0:
        return out
    if V == 0:
        return out.zero_()
    mode = _OUT_MODE[tiles.precision]
    p = tiles.p if mode == 0 else tiles.hi
    lo = tiles.lo if mode == 1 else p
    sc = tiles.split_scale
    width = tiles.width()
    bt, bd, bk, nw, ns = tile_config(V, d, width)
    _tile_weight_kernel[(triton.cdiv(N, bt), triton.cdiv(d, bd))](
        p, lo, weight, sc if sc is not None else out, out, N, V, d, triton.cdiv(V, width), width,
        p.stride(0), lo.stride(0), weight.stride(0), weight.stride(1),
        sc.stride(0) if sc is not None else 0, sc.stride(1) if sc is not None else 0, out.stride(0),
        TILES=mode, W_BF16=weight.dtype == torch.bfloat16, HAS_SCALE=sc is not None, PRECISION=fp32_precision(),
        WIDEN=INTERPRET, BLOCK_T=bt, BLOCK_D=bd, BLOCK_K=bk, num_warps=nw, num_stages=ns)
    return out
