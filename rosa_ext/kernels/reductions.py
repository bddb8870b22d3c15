"""The two streaming reductions of MATH.md section 3, recomputing pi tiles on chip.

pi[t, v] = exp(z[t, v] - lse_t) with z recomputed from H (N, d), W (V, d), the optional
bias and the rank-1 LoRA term, so the N x V logits never exist in memory. Tokens are
packed over B conversations: ``seg`` (N,) int32 gives each token's conversation and
``offsets`` (B + 1,) int32 the token ranges (tokens of one conversation are contiguous).

- :func:`row_reduce`: R(u)_t = pi_t . u[seg_t] for u (B, V) (the JVP). Programs over
  (token tile, vocabulary split); the (splits, N) partials are summed in torch (two-stage,
  deterministic).
- :func:`column_reduce`: C(w)[b] = sum_{t in b} w_t pi_t for w (N,) (the VJP). Programs over
  (vocabulary tile, conversation), each looping over its conversation's tokens.
Every output is fp32 whatever the model dtype; no atomics, so results are deterministic.
The stats pass that produces ``lse`` is in :mod:`rosa_ext.kernels.stats_pass`.
"""
from __future__ import annotations

from typing import Optional

import torch
import triton
import triton.language as tl

from ..common.validation import RosaInputError
from ._tiles import (
    AUTOTUNE_KEY,
    PRUNE,
    check_model,
    fp32_precision,
    interpreter_safe,
    load_rows,
    logits_tile,
    lora_args,
    n_bucket,
    tile_configs,
    vocab_splits,
)


@triton.autotune(configs=tile_configs(), key=AUTOTUNE_KEY, prune_configs_by=PRUNE)
@triton.jit
def _row_kernel(h_ptr, w_ptr, bias_ptr, lb_ptr, ah_ptr, seg_ptr, lse_ptr, u_ptr, out_ptr,
                N, D, V, chunk, s_hn, s_hd, s_wv, s_wd, s_lb, s_u, lora_scale,
                N_BUCKET, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
                SINGLE: tl.constexpr, IS_FP32: tl.constexpr, PRECISION: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_t = tl.program_id(0)
    split = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < N
    seg = tl.load(seg_ptr + offs_t, mask=mask_t, other=0)
    lse = tl.load(lse_ptr + offs_t, mask=mask_t, other=0.0)
    ah = tl.zeros((BLOCK_T,), dtype=tl.float32)
    if HAS_LORA:
        ah = tl.load(ah_ptr + offs_t, mask=mask_t, other=0.0)
    acc = tl.zeros((BLOCK_T,), dtype=tl.float32)
    v_begin = split * chunk
    v_end = tl.minimum(v_begin + chunk, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_end
        bv = 0.0
        if HAS_LORA:
            bv = load_rows(lb_ptr, seg, offs_t, offs_v, mask_t, mask_v, s_lb, SINGLE)
        z = logits_tile(h_ptr, w_ptr, bias_ptr, bv, ah, offs_t, offs_v, mask_t, mask_v, D,
                        s_hn, s_hd, s_wv, s_wd, lora_scale, HAS_BIAS, HAS_LORA, IS_FP32, PRECISION,
                        BLOCK_T, BLOCK_V, BLOCK_D)
        pi = tl.exp(z - lse[:, None])
        u = load_rows(u_ptr, seg, offs_t, offs_v, mask_t, mask_v, s_u, SINGLE)
        acc += tl.sum(pi * u, 1)
    tl.store(out_ptr + split * N + offs_t, acc, mask=mask_t)


@triton.autotune(configs=tile_configs(), key=AUTOTUNE_KEY, prune_configs_by=PRUNE)
@triton.jit
def _column_kernel(h_ptr, w_ptr, bias_ptr, lb_ptr, ah_ptr, lse_ptr, wt_ptr, off_ptr, out_ptr,
                   N, D, V, s_hn, s_hd, s_wv, s_wd, s_lb, s_out, lora_scale,
                   N_BUCKET, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
                   IS_FP32: tl.constexpr, PRECISION: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_v = tl.program_id(0)
    b = tl.program_id(1)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < V
    t_begin = tl.maximum(tl.load(off_ptr + b), 0)  # clamped to [0, N]: offsets are not checked on
    t_end = tl.minimum(tl.load(off_ptr + b + 1), N)  # the host (no sync), and never read out of bounds
    bv = 0.0
    if HAS_LORA:  # one conversation per program: its b row, broadcast over tokens
        bv = tl.load(lb_ptr + b * s_lb + offs_v[None, :], mask=mask_v[None, :], other=0.0).to(tl.float32)
    acc = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for t0 in range(t_begin, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < t_end
        lse = tl.load(lse_ptr + offs_t, mask=mask_t, other=0.0)
        wt = tl.load(wt_ptr + offs_t, mask=mask_t, other=0.0)
        ah = tl.zeros((BLOCK_T,), dtype=tl.float32)
        if HAS_LORA:
            ah = tl.load(ah_ptr + offs_t, mask=mask_t, other=0.0)
        z = logits_tile(h_ptr, w_ptr, bias_ptr, bv, ah, offs_t, offs_v, mask_t, mask_v, D,
                        s_hn, s_hd, s_wv, s_wd, lora_scale, HAS_BIAS, HAS_LORA, IS_FP32, PRECISION,
                        BLOCK_T, BLOCK_V, BLOCK_D)
        pi = tl.exp(z - lse[:, None])  # rows past t_end: wt = 0
        acc += tl.sum(pi * wt[:, None], 0)
    tl.store(out_ptr + b * s_out + offs_v, acc, mask=mask_v)


def row_reduce(hidden: torch.Tensor, weight: torch.Tensor, seg: torch.Tensor, lse: torch.Tensor,
               u: torch.Tensor, *, bias: Optional[torch.Tensor] = None, lora_b: Optional[torch.Tensor] = None,
               ah: Optional[torch.Tensor] = None, lora_scale: float = 0.0) -> torch.Tensor:
    """R(u)_t = pi_t . u[seg_t] -> (N,) fp32.

    Args: hidden (N, d), weight (V, d) (fp32/bf16/fp16, one dtype, any strides), seg (N,) int32,
    lse (N,) from the stats pass, u (B, V) any float dtype, bias (V,), lora_b (B, V) with
    ah (N,) = a_seg . h_t (both or neither).
    """
    N, D, V = check_model(hidden, weight, bias)
    if u.dim() != 2 or u.shape[1] != V:
        raise RosaInputError(f"rosa_ext.kernels.row_reduce: u must be (B, {V}), got {tuple(u.shape)}", "u")
    if lse.shape != (N,) or seg.shape != (N,):
        raise RosaInputError(f"rosa_ext.kernels.row_reduce: lse and seg must be ({N},), got {tuple(lse.shape)} "
                             f"and {tuple(seg.shape)}", "lse")
    hidden, weight, bias = interpreter_safe(hidden, weight, bias)
    has_lora, lb, ah_, s_lb = lora_args(hidden, lora_b, ah, V)
    u = u.float().contiguous()
    splits, chunk = vocab_splits(N, V)
    part = torch.empty(splits, N, dtype=torch.float32, device=hidden.device)
    single = u.shape[0] == 1 and ((not has_lora) or lb.shape[0] == 1)
    s_u = 0 if u.shape[0] == 1 else u.stride(0)  # one row serves every conversation
    s_lb = 0 if has_lora and lb.shape[0] == 1 else s_lb
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_T"]), splits)  # noqa: E731
    _row_kernel[grid](hidden, weight, bias if bias is not None else part, lb, ah_, seg, lse.float().contiguous(),
                      u, part, N, D, V, chunk, hidden.stride(0), hidden.stride(1), weight.stride(0),
                      weight.stride(1), s_lb, s_u, float(lora_scale), N_BUCKET=n_bucket(N),
                      HAS_BIAS=bias is not None, HAS_LORA=has_lora, SINGLE=single,
                      IS_FP32=hidden.dtype == torch.float32, PRECISION=fp32_precision())
    return part[0] if splits == 1 else part.sum(0)


def column_reduce(hidden: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, lse: torch.Tensor,
                  w: torch.Tensor, *, bias: Optional[torch.Tensor] = None, lora_b: Optional[torch.Tensor] = None,
                  ah: Optional[torch.Tensor] = None, lora_scale: float = 0.0) -> torch.Tensor:
    """C(w)[b] = sum_{t in conversation b} w_t pi_t -> (B, V) fp32.

    Args: hidden (N, d), weight (V, d) as in :func:`row_reduce`, offsets (B + 1,) int32 on the
    device (conversation b owns tokens offsets[b]:offsets[b+1]), lse (N,), w (N,),
    bias (V,), lora_b (B, V) with ah (N,).
    """
    N, D, V = check_model(hidden, weight, bias)
    if w.shape != (N,) or lse.shape != (N,):
        raise RosaInputError(f"rosa_ext.kernels.column_reduce: w and lse must be ({N},), got "
                             f"{tuple(w.shape)} and {tuple(lse.shape)}", "w")
    if offsets.dim() != 1 or offsets.numel() < 2 or offsets.dtype.is_floating_point:
        raise RosaInputError(f"rosa_ext.kernels.column_reduce: offsets must be an integer (B + 1,) tensor, got "
                             f"{tuple(offsets.shape)} {offsets.dtype}", "offsets")
    hidden, weight, bias = interpreter_safe(hidden, weight, bias)
    has_lora, lb, ah_, s_lb = lora_args(hidden, lora_b, ah, V)
    B = offsets.numel() - 1
    if has_lora and lb.shape[0] == 1:
        s_lb = 0  # one b row serves every conversation
    elif has_lora and lb.shape[0] != B:
        raise RosaInputError(f"rosa_ext.kernels.column_reduce: lora_b has {lb.shape[0]} rows for {B} conversations",
                             "lora_b")
    out = torch.empty(B, V, dtype=torch.float32, device=hidden.device)
    grid = lambda meta: (triton.cdiv(V, meta["BLOCK_V"]), B)  # noqa: E731
    _column_kernel[grid](hidden, weight, bias if bias is not None else out, lb, ah_, lse.float().contiguous(),
                         w.float().contiguous(), offsets.to(torch.int32), out, N, D, V, hidden.stride(0),
                         hidden.stride(1), weight.stride(0), weight.stride(1), s_lb, out.stride(0),
                         float(lora_scale), N_BUCKET=n_bucket(N), HAS_BIAS=bias is not None,
                         HAS_LORA=has_lora, IS_FP32=hidden.dtype == torch.float32, PRECISION=fp32_precision())
    return out
