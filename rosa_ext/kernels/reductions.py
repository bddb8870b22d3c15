"""The two streaming reductions of MATH.md section 3, recomputing pi tiles on chip.

pi[t, v] = exp(z[t, v] - lse_t) with z recomputed from H (N, d), W (V, d), the optional
bias and the rank-1 LoRA term, so the N x V logits never exist in memory. Tokens are
packed over B conversations: ``seg`` (N,) int32 gives each token's conversation and
``offsets`` (B + 1,) int32 the token ranges (tokens of one conversation are contiguous).

- :func:`row_reduce`: R(u)_t = pi_t . u[seg_t] for u (B, V) (the JVP). Programs over
  (token tile, vocabulary split); the split count comes from the tuned BLOCK_T and the SM count
  (_tiles.split_plan), and the (splits, N) partials are summed in torch (two-stage, deterministic).
- :func:`column_reduce`: C(w)[b] = sum_{t in b} w_t pi_t for w (N,) (the VJP), or with the
  targets scatter(y, w) - C(w) in the same pass. Programs over (vocabulary tile, conversation),
  each looping over its conversation's tokens.
Every output is fp32 whatever the model dtype; no atomics, so results are deterministic. Both
read the run flag (:mod:`rosa_ext.common.device_flag`) when given one; neither synchronises
with the host, and no index (seg, offsets, targets) can make them read out of bounds.
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
    autotuned,
    check_model,
    fp32_precision,
    interpreter_safe,
    launch,
    load_rows,
    logits_tile,
    loop_end,
    lora_args,
    n_bucket,
    sm_count,
    split_launch,
    split_logits_tile,
    split_range,
    table_rows,
    tile_configs,
)


@autotuned(tile_configs(), AUTOTUNE_KEY, prune_configs_by=PRUNE)
@triton.jit
def _row_kernel(h_ptr, w_ptr, bias_ptr, lb_ptr, ah_ptr, seg_ptr, lse_ptr, u_ptr, out_ptr,
                N, D, V, s_hn, s_hd, s_wv, s_wd, s_lb, n_lb, s_u, n_u, lora_scale, flag_ptr,
                N_BUCKET, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
                SINGLE: tl.constexpr, IS_FP32: tl.constexpr, PRECISION: tl.constexpr, HAS_FLAG: tl.constexpr,
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
    v_begin, v_end = split_range(V, split)
    v_end = loop_end(v_begin, v_end, flag_ptr, HAS_FLAG)  # run flag 0: store zeros
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v, mask_v, bv, z = split_logits_tile(v0, v_end, h_ptr, w_ptr, bias_ptr, lb_ptr, ah, seg, offs_t, mask_t, D,
                                                  s_hn, s_hd, s_wv, s_wd, s_lb, n_lb, lora_scale, HAS_BIAS,
                                                  HAS_LORA, SINGLE, IS_FP32, PRECISION, BLOCK_T, BLOCK_V, BLOCK_D)
        pi = tl.exp(z - lse[:, None])
        u = load_rows(u_ptr, seg, offs_t, offs_v, mask_t, mask_v, s_u, n_u, SINGLE)
        acc += tl.sum(pi * u, 1)
    tl.store(out_ptr + split * N + offs_t, acc, mask=mask_t)


@autotuned(tile_configs(), AUTOTUNE_KEY + ["SCATTER"], prune_configs_by=PRUNE)
@triton.jit
def _column_kernel(h_ptr, w_ptr, bias_ptr, lb_ptr, ah_ptr, lse_ptr, wt_ptr, y_ptr, off_ptr, out_ptr,
                   N, D, V, s_hn, s_hd, s_wv, s_wd, s_lb, s_out, lora_scale, flag_ptr,
                   N_BUCKET, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, SINGLE: tl.constexpr,
                   IS_FP32: tl.constexpr, PRECISION: tl.constexpr, SCATTER: tl.constexpr, HAS_FLAG: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_v = tl.program_id(0)
    b = tl.program_id(1)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < V
    t_begin = tl.maximum(tl.load(off_ptr + b), 0)  # clamped to [0, N]: offsets are not checked on
    t_end = tl.minimum(tl.load(off_ptr + b + 1), N)  # the host (no sync), and never read out of bounds
    t_end = loop_end(t_begin, t_end, flag_ptr, HAS_FLAG)  # run flag 0: store zeros
    bv = 0.0
    if HAS_LORA:  # one conversation per program: its b row (SINGLE: row 0 for all), broadcast over tokens
        row_b = 0 if SINGLE else b
        bv = tl.load(lb_ptr + row_b * s_lb + offs_v[None, :], mask=mask_v[None, :], other=0.0).to(tl.float32)
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
        pi = tl.where(mask_t[:, None], tl.exp(z - lse[:, None]), 0.0)  # rows past t_end: nothing
        contrib = pi * wt[:, None]
        if SCATTER:  # scatter(y, w) - C(w): + w_t where y_t falls in this vocabulary tile
            y = tl.load(y_ptr + offs_t, mask=mask_t, other=-1)
            hit = y[:, None] == offs_v[None, :]
            contrib = tl.where(hit, wt[:, None], 0.0) - contrib
        acc += tl.sum(contrib, 0)
    tl.store(out_ptr + b * s_out + offs_v, acc, mask=mask_v)


def row_reduce(hidden: torch.Tensor, weight: torch.Tensor, seg: torch.Tensor, lse: torch.Tensor,
               u: torch.Tensor, *, bias: Optional[torch.Tensor] = None, lora_b: Optional[torch.Tensor] = None,
               ah: Optional[torch.Tensor] = None, lora_scale: float = 0.0, flag: Optional[torch.Tensor] = None,
               splits: Optional[int] = None) -> torch.Tensor:
    """R(u)_t = pi_t . u[seg_t] -> (N,) fp32.

    Args: hidden (N, d), weight (V, d) (fp32/bf16/fp16, one dtype, any strides), seg (N,) int32,
    lse (N,) from the stats pass, u (B, V) any float dtype, bias (V,), lora_b (B, V) with
    ah (N,) = a_seg . h_t (both or neither); ``flag``: the run flag (zeros when it is 0,
    :mod:`rosa_ext.common.device_flag`); ``splits``: force the vocabulary split count (benchmarks;
    default from the tuned BLOCK_T and the SM count). seg ids outside the rows of u / lora_b
    read nothing (no bounds are checked here, and none is read out of bounds); no host sync.
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
    single = u.shape[0] == 1 and ((not has_lora) or lb.shape[0] == 1)
    s_u, n_u = table_rows(u)  # one row serves every conversation
    s_lb, n_lb = table_rows(lb)
    sms = sm_count(hidden.device)
    rows, grid, rec = split_launch(N, V, _row_kernel.configs, sms, splits)
    part = torch.empty(rows, N, dtype=torch.float32, device=hidden.device)
    args = (hidden, weight, bias if bias is not None else part, lb, ah_, seg, lse.float().contiguous(), u, part,
            N, D, V, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), s_lb, n_lb,
            s_u, n_u, float(lora_scale))
    meta = dict(N_BUCKET=n_bucket(N), HAS_BIAS=bias is not None, HAS_LORA=has_lora, SINGLE=single,
                IS_FP32=hidden.dtype == torch.float32, PRECISION=fp32_precision())
    launch(_row_kernel, grid, args, meta, flag)
    n = rec["splits"]
    return part[0] if n == 1 else part[:n].sum(0)


def column_reduce(hidden: torch.Tensor, weight: torch.Tensor, offsets: torch.Tensor, lse: torch.Tensor,
                  w: torch.Tensor, *, bias: Optional[torch.Tensor] = None, lora_b: Optional[torch.Tensor] = None,
                  ah: Optional[torch.Tensor] = None, lora_scale: float = 0.0, targets: Optional[torch.Tensor] = None,
                  flag: Optional[torch.Tensor] = None) -> torch.Tensor:
    """C(w)[b] = sum_{t in conversation b} w_t pi_t -> (B, V) fp32; with ``targets``,
    scatter(y, w) - C(w) (the VJP through the softmax, MATH.md section 3) in the same pass.

    Args: hidden (N, d), weight (V, d) as in :func:`row_reduce`, offsets (B + 1,) int32 on the
    device (conversation b owns tokens offsets[b]:offsets[b+1]; clamped to [0, N] on the
    device), lse (N,), w (N,), bias (V,), lora_b (B, V) or (V,) / (1, V) shared, with ah (N,);
    targets (N,) int token ids (ids outside [0, V) add nothing); ``flag``: the run flag. Each
    program owns a vocabulary tile of one conversation and loops over its tokens: no atomics,
    no ``index_put_``, deterministic, no host sync (CUDA-graph capturable).
    """
    N, D, V = check_model(hidden, weight, bias)
    if w.shape != (N,) or lse.shape != (N,):
        raise RosaInputError(f"rosa_ext.kernels.column_reduce: w and lse must be ({N},), got "
                             f"{tuple(w.shape)} and {tuple(lse.shape)}", "w")
    if offsets.dim() != 1 or offsets.numel() < 2 or offsets.dtype.is_floating_point:
        raise RosaInputError(f"rosa_ext.kernels.column_reduce: offsets must be an integer (B + 1,) tensor, got "
                             f"{tuple(offsets.shape)} {offsets.dtype}", "offsets")
    if targets is not None and (targets.shape != (N,) or targets.dtype.is_floating_point):
        raise RosaInputError(f"rosa_ext.kernels.column_reduce: targets must be integer ({N},), got "
                             f"{tuple(targets.shape)} {targets.dtype}", "targets")
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
    y = targets.contiguous() if targets is not None else offsets
    args = (hidden, weight, bias if bias is not None else out, lb, ah_, lse.float().contiguous(), w.float().contiguous(),
            y, offsets.to(torch.int32), out, N, D, V, hidden.stride(0), hidden.stride(1), weight.stride(0),
            weight.stride(1), s_lb, out.stride(0), float(lora_scale))
    meta = dict(N_BUCKET=n_bucket(N), HAS_BIAS=bias is not None, HAS_LORA=has_lora,
                SINGLE=has_lora and lb.shape[0] == 1, IS_FP32=hidden.dtype == torch.float32,
                PRECISION=fp32_precision(), SCATTER=targets is not None)
    launch(_column_kernel, grid, args, meta, flag)
    return out
