"""The stats pass (MATH.md section 3): one sweep over W, online softmax per token.

Flash-decoding style: programs over (token tile, vocabulary split) -- the split count from the
tuned BLOCK_T and the SM count (a wave-quantised cost model) -- each keeps a running max m, sum
s = sum exp(z - m) and (LoRA) sb = sum exp(z - m) b over its split, and :func:`combine_stats`
merges the (splits, N) partials in torch into lse_t and pi_t . b.
Tokens are packed over B conversations; ``seg`` (N,) int32 gives each token's conversation
(used to gather the LoRA b row of that conversation).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._tiles import (
    AUTOTUNE_KEY,
    PRUNE,
    autotuned,
    check_model,
    fp32_precision,
    interpreter_safe,
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
def _stats_kernel(h_ptr, w_ptr, bias_ptr, lb_ptr, ah_ptr, seg_ptr, m_out, s_out, sb_out,
                  N, D, V, s_hn, s_hd, s_wv, s_wd, s_lb, n_lb, lora_scale,
                  N_BUCKET, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr,
                  SINGLE: tl.constexpr, IS_FP32: tl.constexpr, PRECISION: tl.constexpr,
                  BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_t = tl.program_id(0)
    split = tl.program_id(1)
    offs_t = pid_t * BLOCK_T + tl.arange(0, BLOCK_T)
    mask_t = offs_t < N
    seg = tl.load(seg_ptr + offs_t, mask=mask_t, other=0)
    ah = tl.zeros((BLOCK_T,), dtype=tl.float32)
    if HAS_LORA:
        ah = tl.load(ah_ptr + offs_t, mask=mask_t, other=0.0)
    m = tl.full((BLOCK_T,), float("-inf"), dtype=tl.float32)
    s = tl.zeros((BLOCK_T,), dtype=tl.float32)
    sb = tl.zeros((BLOCK_T,), dtype=tl.float32)
    v_begin, v_end = split_range(V, split)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v, mask_v, bv, z = split_logits_tile(v0, v_end, h_ptr, w_ptr, bias_ptr, lb_ptr, ah, seg, offs_t, mask_t, D,
                                                  s_hn, s_hd, s_wv, s_wd, s_lb, n_lb, lora_scale, HAS_BIAS,
                                                  HAS_LORA, SINGLE, IS_FP32, PRECISION, BLOCK_T, BLOCK_V, BLOCK_D)
        m_new = tl.maximum(m, tl.max(z, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        rescale = tl.exp(m - m_safe)
        e = tl.exp(z - m_safe[:, None])
        s = s * rescale + tl.sum(e, 1)
        if HAS_LORA:
            sb = sb * rescale + tl.sum(e * bv, 1)
        m = m_new
    tl.store(m_out + split * N + offs_t, m, mask=mask_t)
    tl.store(s_out + split * N + offs_t, s, mask=mask_t)
    if HAS_LORA:
        tl.store(sb_out + split * N + offs_t, sb, mask=mask_t)


def stats_partials(hidden: torch.Tensor, weight: torch.Tensor, seg: torch.Tensor, *,
                   bias: Optional[torch.Tensor] = None, lora_b: Optional[torch.Tensor] = None,
                   ah: Optional[torch.Tensor] = None, lora_scale: float = 0.0, splits: Optional[int] = None
                   ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Per-split online-softmax partials (m, s, sb), each (splits, N) fp32 (sb None without LoRA).

    Args: hidden (N, d) and weight (V, d) of one dtype (fp32/bf16/fp16, any strides), seg (N,)
    int32 conversation of each token, bias (V,), lora_b (B, V) with ah (N,) = a_seg . h_t (a seg
    id outside lora_b's rows reads b = 0). The split count comes from the tuned BLOCK_T and the
    SM count (:func:`rosa_ext.kernels._tiles.split_plan`; ``splits`` forces one, for benchmarks);
    no host sync.
    """
    N, D, V = check_model(hidden, weight, bias)
    hidden, weight, bias = interpreter_safe(hidden, weight, bias)
    has_lora, lb, ah_, s_lb = lora_args(hidden, lora_b, ah, V)
    sms = sm_count(hidden.device)
    rows, grid, rec = split_launch(N, V, _stats_kernel.configs, sms, splits)
    m = torch.empty(rows, N, dtype=torch.float32, device=hidden.device)
    s = torch.empty_like(m)
    sb = torch.empty_like(m) if has_lora else m
    single = (not has_lora) or lb.shape[0] == 1
    s_lb, n_lb = table_rows(lb)
    _stats_kernel[grid](
        hidden, weight, bias if bias is not None else m, lb, ah_, seg, m, s, sb, N, D, V, hidden.stride(0),
        hidden.stride(1), weight.stride(0), weight.stride(1), s_lb, n_lb, float(lora_scale), N_BUCKET=n_bucket(N),
        HAS_BIAS=bias is not None, HAS_LORA=has_lora, SINGLE=single, IS_FP32=hidden.dtype == torch.float32, PRECISION=fp32_precision())
    n = rec["splits"]
    return m[:n], s[:n], (sb[:n] if has_lora else None)


def combine_stats(m: torch.Tensor, s: torch.Tensor, sb: Optional[torch.Tensor]
                  ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Merge split partials (splits, N) -> lse (N,) and pi . b (N,) (or None), fp32."""
    M = m.max(0).values
    scale = torch.exp(m - M)
    S = (s * scale).sum(0)
    lse = M + torch.log(S)
    pib = None if sb is None else (sb * scale).sum(0) / S
    return lse, pib


def lse_and_pib(hidden: torch.Tensor, weight: torch.Tensor, seg: torch.Tensor, **kw
                ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """lse (N,) and pi . b (N,) or None, fp32: :func:`stats_partials` + :func:`combine_stats`."""
    return combine_stats(*stats_partials(hidden, weight, seg, **kw))
