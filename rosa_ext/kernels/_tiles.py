"""Shared Triton pieces: the recomputed logits tile, row loads, tile configs, launch helpers.

z[t, v] = h_t . W_v (+ c_v) (+ s (a . h_t) b[seg_t, v]), accumulated in fp32 with
``tl.dot`` over the hidden dimension in BLOCK_D chunks (MATH.md section 3: tiles
are recomputed from H, W and the per-token cache, never stored).

Precision: bf16/fp16 operands go to the tensor cores with fp32 accumulation; fp32
operands use ``tl.dot(..., input_precision=fp32_precision())``, "ieee" by default (exact
fp32 products, no TF32) so the fp32 path meets the torch backend's tolerances;
:func:`set_fp32_precision` ("tf32", "tf32x3") trades that for speed.
"""
from __future__ import annotations

import os
from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ..common.validation import RosaInputError, RosaTypeError

#: True when kernels run in the Triton interpreter (CPU tests): one small tile config.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"

_FP32_PRECISIONS = ("ieee", "tf32", "tf32x3")
_fp32_precision = "ieee"


def fp32_precision() -> str:
    """``input_precision`` of ``tl.dot`` for fp32 operands ("ieee" unless changed)."""
    return _fp32_precision


def set_fp32_precision(precision: str) -> None:
    """Set the fp32 dot precision: "ieee" (exact, default), "tf32" or "tf32x3" (faster)."""
    global _fp32_precision
    if precision not in _FP32_PRECISIONS:
        raise RosaInputError(f"rosa_ext.kernels: fp32 precision must be one of {_FP32_PRECISIONS}, got "
                             f"{precision!r}", "precision")
    _fp32_precision = precision


@triton.jit
def load_rows(ptr, seg, offs_t, offs_v, mask_t, mask_v, stride, SINGLE: tl.constexpr):
    """fp32 tile of a (B, V) table: row seg_t for each token (SINGLE: row 0, shape (1, BLOCK_V))."""
    if SINGLE:
        x = tl.load(ptr + offs_v[None, :], mask=mask_v[None, :], other=0.0).to(tl.float32)
    else:
        x = tl.load(ptr + seg[:, None] * stride + offs_v[None, :],
                    mask=mask_t[:, None] & mask_v[None, :], other=0.0).to(tl.float32)
    return x


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


#: (BLOCK_T, BLOCK_V, BLOCK_D, num_warps, num_stages) tried on Hopper (H100/H200) for the heads
#: the project targets (d 576-4096, V 50k-152k), bf16/fp16 operands (wgmma) and fp32 with
#: "tf32"/"tf32x3". All compile for sm_90 with at most 192 KiB of shared memory (checked ahead
#: of time, python_tests/test_kernels.py). Each config costs a compile (3-6 s) per kernel and
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
#: Exact fp32 ("ieee": FMA, no tensor cores): small tiles. The large tiles above take 10-45 s
#: each to compile for fp32 ieee and cannot be faster on FMA units, so they are pruned.
_HOPPER_FP32_IEEE = [
    (64, 64, 32, 4, 3),
    (64, 128, 32, 8, 3),
    (32, 64, 32, 4, 3),
    (16, 64, 64, 4, 3),
]


def _config(bt, bv, bd, w, s):
    return triton.Config({"BLOCK_T": bt, "BLOCK_V": bv, "BLOCK_D": bd}, num_warps=w, num_stages=s)


def tile_configs():
    """Autotune configs (a single small config under the interpreter, to keep CPU tests fast).

    The union of the half-precision and fp32-ieee lists; :func:`prune_configs` keeps the list
    that fits the launch's operand dtype and token count."""
    if INTERPRET:
        return [triton.Config({"BLOCK_T": 16, "BLOCK_V": 32, "BLOCK_D": 16}, num_warps=1, num_stages=1)]
    return [_config(*c) for c in _HOPPER] + [_config(*c) for c in _HOPPER_FP32_IEEE]


def prune_configs(configs, named_args, **kwargs):
    """``early_config_prune`` of the logits-tile kernels (Triton <= 3.5 passes no kwargs; 3.6+ does).

    fp32 operands with "ieee" precision keep the small-tile list, everything else the wgmma list;
    token tiles taller than twice the padded token count are dropped (decode-sized updates)."""
    if len(configs) <= 1:
        return configs
    args = {**named_args, **kwargs}
    h = args.get("h_ptr")
    is_fp32 = bool(args.get("IS_FP32", getattr(h, "dtype", None) == torch.float32))
    ieee = is_fp32 and args.get("PRECISION", fp32_precision()) == "ieee"
    pool = {tuple(c) for c in (_HOPPER_FP32_IEEE if ieee else _HOPPER)}
    n = int(args.get("N", 1 << 20))
    tall = 2 * max(16, triton.next_power_of_2(max(1, n)))

    def key(c):
        k = c.kwargs
        return (k["BLOCK_T"], k["BLOCK_V"], k["BLOCK_D"], c.num_warps, c.num_stages)

    keep = [c for c in configs if key(c) in pool and c.kwargs["BLOCK_T"] <= tall]
    if not keep:
        keep = [c for c in configs if key(c) in pool] or list(configs)
        keep = [min(keep, key=lambda c: c.kwargs["BLOCK_T"])]
    return keep


#: Autotune key of the logits-tile kernels. N_BUCKET is a plain (non-constexpr) launch argument:
#: as a constexpr it would recompile every config for every token bucket.
AUTOTUNE_KEY = ["N_BUCKET", "D", "V", "PRECISION"]
PRUNE = {"early_config_prune": prune_configs}


def n_bucket(n: int) -> int:
    """Autotune key for the token count: next power of two, at least 16."""
    return max(16, triton.next_power_of_2(int(n)))


#: Target number of programs along the token x vocab-split grid (about 2 waves of 132 SMs).
_TARGET_PROGRAMS = 264
#: Split width granularity: a multiple of every BLOCK_V, so only the vocabulary's last tile is partial.
_SPLIT_ALIGN = 256


def vocab_splits(N: int, V: int) -> Tuple[int, int]:
    """(splits, chunk): vocabulary splits so that the (token tiles x splits) grid fills the GPU."""
    token_tiles = max(1, triton.cdiv(int(N), 64))
    splits = int(max(1, min(triton.cdiv(V, _SPLIT_ALIGN), triton.cdiv(_TARGET_PROGRAMS, token_tiles))))
    chunk = triton.cdiv(triton.cdiv(V, splits), _SPLIT_ALIGN) * _SPLIT_ALIGN
    return triton.cdiv(V, chunk), chunk


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
