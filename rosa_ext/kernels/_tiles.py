"""Shared Triton pieces: the recomputed logits tile, row loads, tile configs, launch helpers.

z[t, v] = h_t . W_v (+ c_v) (+ s (a . h_t) b[seg_t, v]), accumulated in fp32 with
``tl.dot`` over the hidden dimension in BLOCK_D chunks (MATH.md section 3: tiles
are recomputed from H, W and the per-token cache, never stored).

Precision: bf16/fp16 operands go to the tensor cores with fp32 accumulation; fp32
operands use ``tl.dot(..., input_precision=fp32_precision())``, "tf32x3" by default: each
fp32 product is split into three TF32 tensor-core products (hi*hi + hi*lo + lo*hi), about
2^-21 relative error per product against fp32's 2^-24, accumulated in fp32 -- the same order
as fp32 accumulation over d >= 64 terms, so the fp32 path keeps the torch backend's
tolerances. (A CPU emulation of the split on 256 x 8192 logits of d = 896, |z| up to ~20:
rms logit error 5.3e-7 and log-sum-exp error <= 3.3e-6, against 4.1e-7 / 3.7e-6 for exact
products with fp32 accumulation; one TF32 product: 3.1e-3 / 1.7e-2. The Triton interpreter
ignores ``input_precision``, so only the GPU tests measure the kernels themselves.)
:func:`set_fp32_precision` selects "ieee" (exact fp32 products on the FMA units, ~7x slower on
Hopper) or "tf32" (one TF32 product, ~1e-3 relative error: faster, not fp32-accurate).

Launch plumbing shared by the kernel families (all without a host sync):

- vocabulary splits (:func:`split_plan`) are chosen inside the launch grid from the autotuned
  BLOCK_T and the device's SM count (a wave-quantised cost model); the kernels derive their split width from the grid
  (:func:`split_range`), and the partial buffers are sized for the largest split count any
  config can take (:func:`max_splits`);
- a *run flag* (:func:`rosa_ext.common.device_flag`): a device scalar that, when 0, makes
  every flag-aware kernel skip its work and store zeros (the compiled CUDA CG's "active" entry,
  so the passes after convergence cost a launch, not a pass over W);
- :func:`autotuned`: ``triton.autotune`` with the results also cached on disk (Triton >= 3.2), and every
  launch under a device guard (:func:`launch_device`): Triton launches on the *current* CUDA device, so
  a head on ``cuda:1`` (``device_map="auto"``) would otherwise launch on ``cuda:0``.
"""
from __future__ import annotations

import contextlib
import functools
import inspect
import os
from typing import Dict, Optional, Sequence, Tuple

import torch
import triton
import triton.language as tl

from ..common.validation import RosaInputError, RosaTypeError
from .tile_layout import _OUT_MODE

#: True when kernels run in the Triton interpreter (CPU tests): one small tile config.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_FP32_PRECISIONS = ("ieee", "tf32", "tf32x3")
#: The default fp32 dot precision (module docstring): ~fp32 accuracy on the TF32 tensor cores.
DEFAULT_FP32_PRECISION = "tf32x3"
_fp32_precision = DEFAULT_FP32_PRECISION


def fp32_precision() -> str:
    """``input_precision`` of ``tl.dot`` for fp32 operands ("tf32x3" unless changed)."""
    return _fp32_precision


def set_fp32_precision(precision: str) -> None:
    """Set the fp32 dot precision: "tf32x3" (default, ~fp32 accuracy on tensor cores), "ieee"
    (exact fp32 products on the FMA units) or "tf32" (fastest, ~1e-3 relative error)."""
    global _fp32_precision
    if precision not in _FP32_PRECISIONS:
        raise RosaInputError(f"rosa_ext.kernels: fp32 precision must be one of {_FP32_PRECISIONS}, got "
                             f"{precision!r}", "precision")
    _fp32_precision = precision


@triton.jit
def load_rows(ptr, seg, offs_t, offs_v, mask_t, mask_v, stride, rows, SINGLE: tl.constexpr):
    """fp32 tile of a (rows, V) table: row seg_t for each token (SINGLE: row 0, shape (1, BLOCK_V)).

    A seg id outside [0, rows) reads nothing (0.0): no bad index can read out of bounds. A
    table of one row shared by every conversation is passed with ``stride`` 0 and ``rows``
    :data:`ANY_ROW` (every seg id then reads row 0): :func:`table_rows`."""
    if SINGLE:
        x = tl.load(ptr + offs_v[None, :], mask=mask_v[None, :], other=0.0).to(tl.float32)
    else:
        seg_ok = (seg >= 0) & (seg < rows)
        row = tl.where(seg_ok, seg, 0).to(tl.int64)
        x = tl.load(ptr + row[:, None] * stride + offs_v[None, :],
                    mask=(mask_t & seg_ok)[:, None] & mask_v[None, :], other=0.0).to(tl.float32)
    return x


#: ``rows`` of a one-row table shared by every conversation (stride 0): any seg id reads row 0.
ANY_ROW = 2 ** 31 - 1


def table_rows(t: torch.Tensor) -> Tuple[int, int]:
    """(row stride, rows) of a (rows, V) table as :func:`load_rows` takes them: (0, ANY_ROW) for
    one row shared by every conversation."""
    return (0, ANY_ROW) if t.shape[0] == 1 else (t.stride(0), t.shape[0])


@triton.jit
def loop_end(begin, end, flag_ptr, HAS_FLAG: tl.constexpr):
    """``end``, or ``begin`` (an empty loop: the kernel stores zeros) when the run flag is 0.

    The run flag is a device scalar of any dtype (:mod:`rosa_ext.common.device_flag`); it is read
    once per program, so a skipped pass costs a launch and a store, not a pass over W."""
    if HAS_FLAG:
        end = tl.where(tl.load(flag_ptr) != 0, end, begin)
    return end


#: Split width granularity: a multiple of every BLOCK_V, so only the vocabulary's last tile is partial.
SPLIT_ALIGN = 256
_SPLIT_ALIGN_C = tl.constexpr(SPLIT_ALIGN)


@triton.jit
def split_range(V, split):
    """[v_begin, v_end) of vocabulary split ``split`` of ``tl.num_programs(1)`` splits.

    The width is a multiple of ALIGN (so of every BLOCK_V: only the vocabulary's last tile is
    partial) and the same as :func:`split_plan`'s, so the grid of :func:`split_grid` holds
    exactly the non-empty splits."""
    n = tl.num_programs(1)
    chunk = tl.cdiv(tl.cdiv(V, n), _SPLIT_ALIGN_C) * _SPLIT_ALIGN_C
    v_begin = split * chunk
    v_end = tl.minimum(v_begin + chunk, V)
    return v_begin, v_end


@triton.jit
def logits_tile(h_ptr, w_ptr, bias_ptr, bv, ah, offs_t, offs_v, mask_t, mask_v, D,
                s_hn, s_hd, s_wv, s_wd, lora_scale,
                HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, IS_FP32: tl.constexpr,
                PRECISION: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp32 logits tile (BLOCK_T, BLOCK_V); masked vocabulary columns are -inf.

    ``bv`` is the LoRA b tile ((BLOCK_T, BLOCK_V) or (1, BLOCK_V), fp32) and ``ah`` (BLOCK_T,)
    the per-token a . h_t; both are ignored without HAS_LORA. Offsets are int64 so that
    V * d (or N * d) above 2^31 elements cannot overflow.
    """
    row_t = offs_t.to(tl.int64)
    row_v = offs_v.to(tl.int64)
    acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        md = offs_d < D
        h = tl.load(h_ptr + row_t[:, None] * s_hn + offs_d[None, :] * s_hd,
                    mask=mask_t[:, None] & md[None, :], other=0.0)
        wt = tl.load(w_ptr + offs_d[:, None] * s_wd + row_v[None, :] * s_wv,
                     mask=md[:, None] & mask_v[None, :], other=0.0)
        if IS_FP32:
            acc += tl.dot(h, wt, input_precision=PRECISION)
        else:
            acc += tl.dot(h, wt)
    if HAS_BIAS:
        c = tl.load(bias_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)
        acc += c[None, :]
    if HAS_LORA:
        acc += (lora_scale * ah)[:, None] * bv
    return tl.where(mask_v[None, :], acc, float("-inf"))


@triton.jit
def split_logits_tile(v0, v_end, h_ptr, w_ptr, bias_ptr, lb_ptr, ah, seg, offs_t, mask_t, D,
                      s_hn, s_hd, s_wv, s_wd, s_lb, n_lb, lora_scale,
                      HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, SINGLE: tl.constexpr,
                      IS_FP32: tl.constexpr, PRECISION: tl.constexpr,
                      BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """One step of the vocabulary loop the token-tile kernels share (stats, row reduction, probability
    tiles): the tile of columns [v0, v0 + BLOCK_V) of a split ending at ``v_end`` -> (offs_v, mask_v,
    bv, z): its column ids and mask, the LoRA b tile of each token's conversation (:func:`load_rows`;
    0.0 without HAS_LORA) and the fp32 logits tile (:func:`logits_tile`, -inf in masked columns)."""
    offs_v = v0 + tl.arange(0, BLOCK_V)
    mask_v = offs_v < v_end
    bv = 0.0
    if HAS_LORA:
        bv = load_rows(lb_ptr, seg, offs_t, offs_v, mask_t, mask_v, s_lb, n_lb, SINGLE)
    z = logits_tile(h_ptr, w_ptr, bias_ptr, bv, ah, offs_t, offs_v, mask_t, mask_v, D,
                    s_hn, s_hd, s_wv, s_wd, lora_scale, HAS_BIAS, HAS_LORA, IS_FP32, PRECISION,
                    BLOCK_T, BLOCK_V, BLOCK_D)
    return offs_v, mask_v, bv, z


#: (BLOCK_T, BLOCK_V, BLOCK_D, num_warps, num_stages) tried on Hopper (H100/H200) for the heads
#: the project targets (d 576-4096, V 50k-152k), bf16/fp16 operands (wgmma). All compile for
#: sm_90 with at most 192 KiB of shared memory (checked ahead of time,
#: python_tests/kernels/test_kernels.py). Each config costs a compile (3-6 s) per kernel and
#: specialisation on first use, so the list is short.
_HOPPER = [
    (128, 128, 64, 8, 3),
    (128, 128, 64, 4, 3),
    (128, 256, 64, 8, 3),
    (64, 256, 64, 8, 3),
    (64, 128, 64, 4, 4),
    (128, 64, 64, 4, 4),
    (64, 64, 64, 4, 4),
    (32, 128, 128, 4, 3),
    (16, 128, 128, 4, 3),
]
#: fp32 operands on the TF32 tensor cores ("tf32x3", the default, and "tf32"): fp32 tiles take
#: twice the shared memory of bf16 ones, and tf32x3 keeps the hi/lo halves of each operand in
#: registers. Chosen by compiling the stats, row and column kernels ahead of time for sm_90
#: (tf32x3, LoRA + bias; ptxas -v; no GPU): the bf16 list's 128x256, 64x256 and 64x128x64x4
#: tiles need 208-320 KiB of shared memory (a block may use 227 KiB) and most of its 64-deep
#: 4-warp tiles spill 1-3.6 KB of registers. These use at most 128 KiB and spill nothing, except
#: 128x128x32 (up to 272 bytes), 64x64x64 (112) and the decode-sized 16x128x64 (308, no wgmma).
_HOPPER_FP32_TC = [
    (128, 128, 32, 8, 3),
    (128, 64, 32, 8, 3),
    (64, 128, 32, 8, 3),
    (64, 64, 64, 4, 4),
    (64, 64, 32, 4, 3),
    (16, 128, 64, 4, 3),
]
#: Exact fp32 ("ieee": FMA, no tensor cores): small tiles. The large tiles above take 10-45 s
#: each to compile for fp32 ieee and cannot be faster on FMA units, so they are pruned.
_HOPPER_FP32_IEEE = [
    (64, 64, 32, 4, 3),
    (64, 128, 32, 8, 3),
    (32, 64, 32, 4, 3),
    (16, 64, 64, 4, 3),
]


def _config(bt, bv, bd, w, s, maxnreg=None):
    """A config from a list entry (BLOCK_T, BLOCK_V, BLOCK_D, num_warps, num_stages[, maxnreg]): ``maxnreg``
    lets ptxas use that many registers per thread where its own occupancy target would spill."""
    return triton.Config({"BLOCK_T": bt, "BLOCK_V": bv, "BLOCK_D": bd}, num_warps=w, num_stages=s, maxnreg=maxnreg)


def tile_configs(pools: Sequence[Sequence[tuple]] = ()):
    """Autotune configs (a single small config under the interpreter, to keep CPU tests fast).

    The union of the half-precision, fp32 tensor-core and fp32-ieee lists (``pools``: a kernel's
    own three lists, default this module's); :func:`prune_configs` keeps the list that fits the
    launch's operand dtype, fp32 precision and token bucket."""
    if INTERPRET:
        return [triton.Config({"BLOCK_T": 16, "BLOCK_V": 32, "BLOCK_D": 16}, num_warps=1, num_stages=1)]
    half, tc, ieee = pools or (_HOPPER, _HOPPER_FP32_TC, _HOPPER_FP32_IEEE)
    if tuning() == "first":  # one config per list: a cold machine compiles each kernel once, tunes nothing
        half, tc, ieee = half[:1], tc[:1], ieee[:1]
    pool = list(half) + [c for c in list(tc) + list(ieee) if c not in half]
    return [_config(*c) for c in dict.fromkeys(pool)]


#: Environment variable read once at import: "full" (default) autotunes over every config of a list;
#: "first" keeps the first config of each list (no tuning: a cold cache compiles each kernel once,
#: ~4 s, instead of once per config; for first-contact GPU runs that must finish in minutes, whose
#: timings are then untuned and say so).
TUNING_ENV = "ROSA_KERNEL_TUNING"


def tuning() -> str:
    """The autotuning mode of this process (:data:`TUNING_ENV`): "full" or "first"."""
    mode = os.environ.get(TUNING_ENV, "full").strip().lower() or "full"
    if mode not in ("full", "first"):
        raise RosaInputError(f"rosa_ext.kernels: {TUNING_ENV} must be 'full' or 'first', got {mode!r}", TUNING_ENV)
    return mode


def make_prune(half: Sequence[tuple], fp32_tc: Sequence[tuple], fp32_ieee: Sequence[tuple]):
    """The ``early_config_prune`` of a logits-tile kernel whose configs are the union of these three
    lists (bf16/fp16 operands, fp32 on the TF32 tensor cores, fp32 "ieee"): :func:`prune_configs`
    is the one of this module's lists. (With :func:`tuning` "first", the first config of each list.)"""
    if tuning() == "first":
        half, fp32_tc, fp32_ieee = half[:1], fp32_tc[:1], fp32_ieee[:1]
    pools = tuple(frozenset(tuple(c[:5]) for c in lst) for lst in (half, fp32_tc, fp32_ieee))

    def prune(configs, named_args, **kwargs):
        """bf16/fp16 operands keep the half-precision list, fp32 ones the fp32 tensor-core list
        ("tf32x3", "tf32") or the "ieee" list; token tiles taller than twice the token bucket are
        dropped (decode-sized updates). Depends only on the autotune key (the bucket, not N), so
        every launch of one key tunes the same list. (Triton <= 3.5 passes no kwargs; 3.6+ does.)"""
        if len(configs) <= 1:
            return configs
        args = {**named_args, **kwargs}
        h = args.get("h_ptr")
        is_fp32 = bool(args.get("IS_FP32", getattr(h, "dtype", None) == torch.float32))
        precision = args.get("PRECISION", fp32_precision())
        pool = pools[0] if not is_fp32 else pools[2] if precision == "ieee" else pools[1]
        bucket = int(args.get("N_BUCKET") or n_bucket(int(args.get("N", 1 << 20))))
        tall = 2 * bucket

        def key(c):
            k = c.kwargs
            return (k["BLOCK_T"], k["BLOCK_V"], k["BLOCK_D"], c.num_warps, c.num_stages)

        keep = [c for c in configs if key(c) in pool and c.kwargs["BLOCK_T"] <= tall]
        if not keep:
            keep = [c for c in configs if key(c) in pool] or list(configs)
            keep = [min(keep, key=lambda c: c.kwargs["BLOCK_T"])]
        return keep

    return prune


#: Autotune key of the logits-tile kernels: the sizes and every specialisation that changes the
#: work of a tile (the operand dtypes are added by Triton itself: it keys on every tensor
#: argument's dtype). N_BUCKET is a plain (non-constexpr) launch argument: as a constexpr it
#: would recompile every config for every token bucket. HAS_FLAG (the run flag) is left out on
#: purpose: a flagged launch does the same work per tile, so it reuses the config tuned without
#: the flag (:func:`ensure_tuned` makes sure that one was tuned first: tuning *with* a flag that
#: is 0 would time empty kernels).
AUTOTUNE_KEY = ["N_BUCKET", "D", "V", "PRECISION", "IS_FP32", "HAS_BIAS", "HAS_LORA", "SINGLE"]
#: ``early_config_prune`` of the kernels on this module's lists (:func:`make_prune`).
prune_configs = make_prune(_HOPPER, _HOPPER_FP32_TC, _HOPPER_FP32_IEEE)
PRUNE = {"early_config_prune": prune_configs}

#: Token-count buckets of the autotune key: powers of 4 from 16 to 16384 (a new bucket re-tunes,
#: so they are coarse; tile choice stops changing beyond a few thousand tokens).
N_BUCKETS = (16, 64, 256, 1024, 4096, 16384)


def n_bucket(n: int) -> int:
    """Autotune key for the token count: the smallest of :data:`N_BUCKETS` >= n (the last above)."""
    n = int(n)
    for b in N_BUCKETS:
        if n <= b:
            return b
    return N_BUCKETS[-1]


def autotuned(configs, key, **kw):
    """``triton.autotune`` whose results are also cached on disk (``cache_results``, Triton >= 3.2:
    a new process on the same GPU, Triton and kernel source does not re-tune); the in-process
    cache is Triton's own, one entry per key. Every launch (``kernel[grid](...)``, the autotuner's
    timing runs included) runs under :func:`launch_device` of its first tensor argument
    (:func:`guard_launches`)."""
    if "cache_results" in inspect.signature(triton.autotune).parameters:
        kw.setdefault("cache_results", True)
    tune = triton.autotune(configs=configs, key=key, **kw)
    return lambda fn: guard_launches(tune(fn))


def launch_device(t: Optional[torch.Tensor]):
    """The device guard of a Triton launch: ``torch.cuda.device(t.device)`` for a CUDA tensor (Triton
    launches on the current device and stream; the guard makes them the tensor's); a no-op context for
    anything else (CPU tensors under the interpreter, None)."""
    dev = getattr(t, "device", None)
    if not isinstance(dev, torch.device) or dev.type != "cuda":
        return contextlib.nullcontext()
    return torch.cuda.device(dev)


def _first_tensor(args: Sequence, kwargs: Dict) -> Optional[torch.Tensor]:
    for a in list(args) + list(kwargs.values()):
        if isinstance(a, torch.Tensor):
            return a
    return None


def guard_launches(kernel):
    """Make every launch of ``kernel`` (a Triton ``KernelInterface``: ``kernel[grid](...)`` calls
    ``kernel.run``) run under :func:`launch_device` of its first tensor argument; returns ``kernel``
    (its ``run`` replaced by a guarded one, marked ``run.device_guarded``)."""
    if getattr(kernel.run, "device_guarded", False):
        return kernel
    unguarded = kernel.run

    def run(*args, **kwargs):
        with launch_device(_first_tensor(args, kwargs)):
            return unguarded(*args, **kwargs)

    run.device_guarded = True
    kernel.run = run
    return kernel


_tuned: set = set()


def _capturing(device: torch.device) -> bool:
    return device.type == "cuda" and torch.cuda.is_current_stream_capturing()


def launch(kernel, grid, args: Sequence, meta: Dict, flag: Optional[torch.Tensor]) -> None:
    """``kernel[grid](*args, flag_ptr=..., HAS_FLAG=..., **meta)`` for a flag-aware autotuned kernel.

    ``flag``: the run flag (:mod:`rosa_ext.common.device_flag`), a 1-element tensor on the launch's
    device, or None. It is passed as float64 (a view of the CUDA CG's state needs no copy; without
    a flag an unread float64 placeholder), so flagged and unflagged launches share one autotune key.
    The first flagged launch of a key that was never launched without the flag first runs it once
    unflagged (result discarded): the autotuner then times real work, not kernels that a 0 flag
    leaves empty; later flagged launches reuse that config and add no extra work."""
    dev = args[0].device
    if flag is not None:
        if flag.numel() != 1 or flag.device != dev:
            raise RosaInputError(f"rosa_ext.kernels: the run flag must be a 1-element tensor on {dev}, got "
                                 f"{tuple(flag.shape)} on {flag.device}", "flag")
        if flag.dtype != torch.float64:
            flag = flag.reshape(1).to(torch.float64)
    bound = dict(zip(kernel.arg_names, args))
    bound.update(meta)
    key = (id(kernel), str(dev)) + tuple(bound.get(k) for k in getattr(kernel, "keys", ())) + tuple(
        str(v.dtype) for v in bound.values() if isinstance(v, torch.Tensor))

    def go(f):
        kernel[grid](*args, flag_ptr=f if f is not None else torch.empty(1, dtype=torch.float64, device=dev),
                     HAS_FLAG=f is not None, **meta)

    # (one config under the interpreter; under CUDA-graph capture nothing can be tuned, and an extra
    # launch would be replayed every time)
    if flag is not None and key not in _tuned and not INTERPRET and not _capturing(dev):
        go(None)
    _tuned.add(key)
    go(flag)


#: The split kernels' grid is at most this many waves of the device's SMs (a wave: one program
#: per SM; the large tiles are register-bound to about one program per SM).
MAX_WAVES = 8
#: SM count assumed where no GPU is queried (the interpreter): an H100 SXM.
DEFAULT_SMS = 132


@functools.lru_cache(maxsize=None)
def _sm_count(device_index: int) -> int:
    return int(torch.cuda.get_device_properties(device_index).multi_processor_count)


def sm_count(device: torch.device) -> int:
    """Streaming multiprocessors of ``device`` (cached; :data:`DEFAULT_SMS` off CUDA)."""
    if device.type != "cuda":
        return DEFAULT_SMS
    return _sm_count(device.index if device.index is not None else torch.cuda.current_device())


@functools.lru_cache(maxsize=4096)
def split_plan(N: int, V: int, block_t: int, sms: int, max_chunk: int = 0) -> Tuple[int, int]:
    """(splits, chunk): the vocabulary splits of the (token tiles x splits) grid of the stats and
    row kernels, each ``chunk`` wide (a multiple of :data:`SPLIT_ALIGN`, none empty).

    The count minimises the modelled time ``waves x chunk`` -- ``waves = ceil(tiles x splits / sms)``
    rounds of one program per SM, each program streaming ``chunk`` vocabulary rows -- over the
    counts up to :data:`MAX_WAVES` waves (and one more), ties to fewer splits (less to merge). So a small token count is spread
    over the vocabulary until the SMs are busy (about two waves where the 256-row granularity
    allows), and a large one gets one split. ``max_chunk`` (a multiple of :data:`SPLIT_ALIGN`; 0: none)
    caps the width: the probability-tile kernel's splits are also the K-split of the GEMMs over its
    tiles (:mod:`.prob_tiles`), so at least ``ceil(V / max_chunk)`` of them. Cached: computed once
    per (N, V, BLOCK_T, SMs, max_chunk)."""
    tiles = max(1, triton.cdiv(int(N), int(block_t)))
    least = triton.cdiv(V, max_chunk) if max_chunk else 1
    top = max(least, min(triton.cdiv(V, SPLIT_ALIGN), triton.cdiv(MAX_WAVES * sms, tiles) + 1))
    best = None
    for s in range(least, top + 1):
        chunk = triton.cdiv(triton.cdiv(V, s), SPLIT_ALIGN) * SPLIT_ALIGN
        n = triton.cdiv(V, chunk)
        cost = triton.cdiv(tiles * n, sms) * chunk
        if best is None or cost < best[0]:
            best = (cost, n, chunk)
    return best[1], best[2]


def split_width(V: int, splits: int) -> int:
    """The width of each of ``splits`` vocabulary splits (the last may be narrower), as the kernels'
    :func:`split_range` computes it."""
    return triton.cdiv(triton.cdiv(V, splits), SPLIT_ALIGN) * SPLIT_ALIGN


def forced_splits(splits: int, V: int) -> int:
    """A split count asked for explicitly (benchmarks), rounded as :func:`split_plan` rounds it so
    that no split is empty."""
    splits = max(1, min(int(splits), triton.cdiv(V, SPLIT_ALIGN)))
    return triton.cdiv(V, split_width(V, splits))


def max_splits(N: int, V: int, configs: Sequence, sms: int, max_chunk: int = 0) -> int:
    """The most splits any of ``configs`` can launch with (the rows of the partial buffers)."""
    return max(split_plan(N, V, c.kwargs["BLOCK_T"], sms, max_chunk)[0] for c in configs)


def split_launch(N: int, V: int, configs: Sequence, sms: int, splits: Optional[int], max_chunk: int = 0):
    """(rows of the partial buffers, launch grid, record) of a split kernel: from the tuned BLOCK_T
    and the SM count (:func:`max_splits`, :func:`split_grid`; ``max_chunk`` as :func:`split_plan`), or
    ``splits`` forced (:func:`forced_splits`). ``record["splits"]`` holds the split count of the launch
    that ran."""
    record: Dict[str, int] = {}
    if splits is None:  # from the tuned BLOCK_T, in the launch grid; the buffers fit every config
        return (max_splits(N, V, configs, sms, max_chunk), split_grid(N, V, sms, record, max_chunk), record)
    rows = record["splits"] = forced_splits(splits, V)
    return rows, (lambda meta: (triton.cdiv(N, meta["BLOCK_T"]), rows)), record


def split_grid(N: int, V: int, sms: int, record: Dict[str, int], max_chunk: int = 0):
    """The launch grid (token tiles, splits) of the split kernels, computed from the config's
    BLOCK_T; the split count of the last launch (the one whose result is kept: the autotuner
    launches every config first when it tunes) is left in ``record["splits"]``."""
    def grid(meta):
        splits = split_plan(N, V, meta["BLOCK_T"], sms, max_chunk)[0]
        record["splits"] = splits
        return (triton.cdiv(N, meta["BLOCK_T"]), splits)
    return grid


def check_model(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor]) -> Tuple[int, int, int]:
    """Validate hidden (N, d) / weight (V, d) / bias (V,); return (N, d, V)."""
    if hidden.dtype != weight.dtype or hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise RosaTypeError(f"rosa_ext.kernels: hidden/weight must share a dtype in fp32/bf16/fp16, got "
                            f"{hidden.dtype}/{weight.dtype} (fp64 runs on the torch backend)", "hidden")
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        raise RosaInputError(f"rosa_ext.kernels: hidden must be (N, d) and weight (V, d), got "
                             f"{tuple(hidden.shape)} and {tuple(weight.shape)}", "hidden")
    N, D = hidden.shape
    V = weight.shape[0]
    if bias is not None and tuple(bias.shape) != (V,):
        raise RosaInputError(f"rosa_ext.kernels: bias must be ({V},), got {tuple(bias.shape)}", "bias")
    return int(N), int(D), int(V)


def interpreter_safe(*tensors: Optional[torch.Tensor]):
    """The Triton interpreter (CPU tests) mis-reads bfloat16 buffers, so there bf16 inputs are
    widened to fp32 -- exact, and the math is the same as on the GPU (bf16 products are exact
    in fp32, accumulation is fp32); only the kernel's bf16 load path is untested on the CPU."""
    if not INTERPRET:
        return tensors
    return tuple(t.float() if t is not None and t.dtype == torch.bfloat16 else t for t in tensors)


def tile_parts(tiles) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """(the stored tiles ``p`` or the bf16 ``hi`` part, the ``lo`` part -- or the first again where there is
    none --, the storage's OUT_MODE) of :class:`.tile_layout.ProbTiles`, as a kernel over them reads them: bf16
    parts widened under the interpreter (:func:`interpreter_safe`)."""
    if tiles.p is not None:
        return tiles.p, tiles.p, _OUT_MODE[tiles.precision]
    hi, lo = interpreter_safe(tiles.hi, tiles.lo if tiles.lo is not None else tiles.hi)
    return hi, lo, _OUT_MODE[tiles.precision]


def lora_args(hidden: torch.Tensor, lora_b: Optional[torch.Tensor], ah: Optional[torch.Tensor], V: int):
    """(has_lora, lb (B, V) fp32, ah (N,) fp32, row stride of lb); dummies without LoRA."""
    if lora_b is None and ah is None:
        dummy = hidden.new_empty(1, dtype=torch.float32)
        return False, dummy, dummy, 0
    if lora_b is None or ah is None:
        raise RosaInputError("rosa_ext.kernels: lora_b (B, V) and ah (N,) go together", "lora_b")
    lb = lora_b.reshape(1, -1) if lora_b.dim() == 1 else lora_b
    if lb.dim() != 2 or lb.shape[1] != V:
        raise RosaInputError(f"rosa_ext.kernels: lora_b must be (B, {V}), got {tuple(lora_b.shape)}", "lora_b")
    if ah.shape != (hidden.shape[0],):
        raise RosaInputError(f"rosa_ext.kernels: ah must be ({hidden.shape[0]},), got {tuple(ah.shape)}", "ah")
    lb = lb.float().contiguous()
    return True, lb, ah.float().contiguous(), lb.stride(0)
