"""Triton kernels of ROSA_SPEC.md section 3: the stats pass and the two streaming reductions.

All three recompute logits tiles from H (N, d), W (V, d), the optional bias and
the rank-1 LoRA term, so the N x V logits never exist in memory. Tokens are packed
over B conversations: ``seg`` (N,) int32 gives each token's conversation and
``offsets`` (B + 1,) the token ranges (tokens of one conversation are contiguous).

- :func:`stats_partials` + :func:`combine_stats`: online softmax (flash-decoding style:
  the vocabulary is split across programs, the partial (max, sum, sum*b) are
  merged in torch) -> lse_t and pi_t . b_seg.
- :func:`row_reduce`: R(u)_t = pi_t . u[seg_t] for u (B, V) (the JVP).
- :func:`column_reduce`: C(w)[b] = sum_{t in b} w_t pi_t for w (N,) (the VJP).
Every output is fp32 whatever the model dtype; reductions are deterministic (no atomics).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch
import triton
import triton.language as tl

from ._tiles import INTERPRET, hopper_configs, logits_tile

#: Target number of programs along the token x vocab-split grid (about 2 waves of 132 SMs).
_TARGET_PROGRAMS = 264


def _n_bucket(n: int) -> int:
    return max(16, triton.next_power_of_2(int(n)))


def _splits(N: int, V: int) -> int:
    """Vocabulary splits so that the (token tiles x splits) grid fills the GPU."""
    token_tiles = max(1, triton.cdiv(N, 64))
    return int(max(1, min(triton.cdiv(V, 128), triton.cdiv(_TARGET_PROGRAMS, token_tiles))))


@triton.autotune(configs=hopper_configs(), key=["N_BUCKET", "D", "V"])
@triton.jit
def _stats_kernel(h_ptr, w_ptr, bias_ptr, lb_ptr, ah_ptr, seg_ptr, m_out, s_out, sb_out,
                  N, D, V, chunk, s_hn, s_hd, s_wv, s_wd, s_lb, lora_scale,
                  N_BUCKET: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, IEEE: tl.constexpr,
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
    v_begin = split * chunk
    v_end = tl.minimum(v_begin + chunk, V)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_end
        z = logits_tile(h_ptr, w_ptr, bias_ptr, lb_ptr, ah, seg, offs_t, offs_v, mask_t, mask_v, D,
                        s_hn, s_hd, s_wv, s_wd, s_lb, lora_scale, HAS_BIAS, HAS_LORA, IEEE,
                        BLOCK_T, BLOCK_V, BLOCK_D)
        m_new = tl.maximum(m, tl.max(z, 1))
        m_safe = tl.where(m_new == float("-inf"), 0.0, m_new)
        rescale = tl.exp(m - m_safe)
        e = tl.exp(z - m_safe[:, None])
        s = s * rescale + tl.sum(e, 1)
        if HAS_LORA:
            bv = tl.load(lb_ptr + seg[:, None] * s_lb + offs_v[None, :],
                         mask=mask_t[:, None] & mask_v[None, :], other=0.0).to(tl.float32)
            sb = sb * rescale + tl.sum(e * bv, 1)
        m = m_new
    tl.store(m_out + split * N + offs_t, m, mask=mask_t)
    tl.store(s_out + split * N + offs_t, s, mask=mask_t)
    if HAS_LORA:
        tl.store(sb_out + split * N + offs_t, sb, mask=mask_t)


@triton.autotune(configs=hopper_configs(), key=["N_BUCKET", "D", "V"])
@triton.jit
def _row_kernel(h_ptr, w_ptr, bias_ptr, lb_ptr, ah_ptr, seg_ptr, lse_ptr, u_ptr, out_ptr,
                N, D, V, chunk, s_hn, s_hd, s_wv, s_wd, s_lb, s_u, lora_scale,
                N_BUCKET: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, IEEE: tl.constexpr,
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
        z = logits_tile(h_ptr, w_ptr, bias_ptr, lb_ptr, ah, seg, offs_t, offs_v, mask_t, mask_v, D,
                        s_hn, s_hd, s_wv, s_wd, s_lb, lora_scale, HAS_BIAS, HAS_LORA, IEEE,
                        BLOCK_T, BLOCK_V, BLOCK_D)
        pi = tl.exp(z - lse[:, None])
        u = tl.load(u_ptr + seg[:, None] * s_u + offs_v[None, :], mask=mask_t[:, None] & mask_v[None, :], other=0.0)
        acc += tl.sum(pi * u, 1)
    tl.store(out_ptr + split * N + offs_t, acc, mask=mask_t)


@triton.autotune(configs=hopper_configs(), key=["N_BUCKET", "D", "V"])
@triton.jit
def _column_kernel(h_ptr, w_ptr, bias_ptr, lb_ptr, ah_ptr, seg_ptr, lse_ptr, wt_ptr, off_ptr, out_ptr,
                   N, D, V, s_hn, s_hd, s_wv, s_wd, s_lb, s_out, lora_scale,
                   N_BUCKET: tl.constexpr, HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, IEEE: tl.constexpr,
                   BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_v = tl.program_id(0)
    b = tl.program_id(1)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < V
    t_begin = tl.load(off_ptr + b)
    t_end = tl.load(off_ptr + b + 1)
    acc = tl.zeros((BLOCK_V,), dtype=tl.float32)
    for t0 in range(t_begin, t_end, BLOCK_T):
        offs_t = t0 + tl.arange(0, BLOCK_T)
        mask_t = offs_t < t_end
        seg = tl.load(seg_ptr + offs_t, mask=mask_t, other=0)
        lse = tl.load(lse_ptr + offs_t, mask=mask_t, other=0.0)
        wt = tl.load(wt_ptr + offs_t, mask=mask_t, other=0.0)
        ah = tl.zeros((BLOCK_T,), dtype=tl.float32)
        if HAS_LORA:
            ah = tl.load(ah_ptr + offs_t, mask=mask_t, other=0.0)
        z = logits_tile(h_ptr, w_ptr, bias_ptr, lb_ptr, ah, seg, offs_t, offs_v, mask_t, mask_v, D,
                        s_hn, s_hd, s_wv, s_wd, s_lb, lora_scale, HAS_BIAS, HAS_LORA, IEEE,
                        BLOCK_T, BLOCK_V, BLOCK_D)
        pi = tl.exp(z - lse[:, None])
        acc += tl.sum(pi * wt[:, None], 0)
    tl.store(out_ptr + b * s_out + offs_v, acc, mask=mask_v)


# -- launchers -------------------------------------------------------------------------------
def interpreter_safe(*tensors: Optional[torch.Tensor]):
    """The Triton interpreter (CPU tests) mis-reads bfloat16 buffers, so there bf16 inputs are
    widened to fp32 -- exact, and the math is the same as on the GPU (bf16 products are exact
    in fp32, accumulation is fp32); only the kernel's bf16 load path is then untested on the CPU."""
    if not INTERPRET:
        return tensors
    return tuple(t.float() if t is not None and t.dtype == torch.bfloat16 else t for t in tensors)


def _common(hidden: torch.Tensor, weight: torch.Tensor, bias: Optional[torch.Tensor],
            lora_b: Optional[torch.Tensor], ah: Optional[torch.Tensor]):
    if hidden.dtype != weight.dtype or hidden.dtype not in (torch.float32, torch.bfloat16, torch.float16):
        raise TypeError(f"rosa_ext.kernels: hidden/weight must share a dtype in fp32/bf16/fp16, got "
                        f"{hidden.dtype}/{weight.dtype} (fp64 runs on the torch backend)")
    N, D = hidden.shape
    V = weight.shape[0]
    has_lora = lora_b is not None
    if has_lora and (ah is None or lora_b.dim() != 2 or lora_b.shape[1] != V):
        raise ValueError("rosa_ext.kernels: lora_b must be (B, V) with ah (N,) given")
    dummy = hidden.new_empty(1, dtype=torch.float32)
    lb = lora_b.float().contiguous() if has_lora else dummy
    return dict(N=N, D=D, V=V, has_lora=has_lora, has_bias=bias is not None,
                bias=bias if bias is not None else dummy, lb=lb,
                ah=ah.float().contiguous() if has_lora else dummy,
                s_lb=lb.stride(0) if has_lora else 0, ieee=hidden.dtype == torch.float32)


def stats_partials(hidden: torch.Tensor, weight: torch.Tensor, seg: torch.Tensor, *,
                   bias: Optional[torch.Tensor] = None, lora_b: Optional[torch.Tensor] = None,
                   ah: Optional[torch.Tensor] = None, lora_scale: float = 0.0
                   ) -> Tuple[torch.Tensor, torch.Tensor, Optional[torch.Tensor]]:
    """Per-split online-softmax partials: (m, s, sb), each (splits, N) fp32."""
    hidden, weight, bias = interpreter_safe(hidden, weight, bias)
    c = _common(hidden, weight, bias, lora_b, ah)
    N, D, V = c["N"], c["D"], c["V"]
    splits = _splits(N, V)
    chunk = triton.cdiv(V, splits)
    m = torch.empty(splits, N, dtype=torch.float32, device=hidden.device)
    s = torch.empty_like(m)
    sb = torch.empty_like(m) if c["has_lora"] else m
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_T"]), splits)  # noqa: E731
    _stats_kernel[grid](hidden, weight, c["bias"], c["lb"], c["ah"], seg, m, s, sb, N, D, V, chunk,
                        hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1), c["s_lb"],
                        float(lora_scale), N_BUCKET=_n_bucket(N), HAS_BIAS=c["has_bias"],
                        HAS_LORA=c["has_lora"], IEEE=c["ieee"])
    return m, s, (sb if c["has_lora"] else None)


def combine_stats(m: torch.Tensor, s: torch.Tensor, sb: Optional[torch.Tensor]
                  ) -> Tuple[torch.Tensor, Optional[torch.Tensor]]:
    """Merge split partials: lse (N,) and pi . b (N,) (or None), fp32."""
    M = m.max(0).values
    scale = torch.exp(m - M)
    S = (s * scale).sum(0)
    lse = M + torch.log(S)
    pib = None if sb is None else (sb * scale).sum(0) / S
    return lse, pib


def row_reduce(hidden: torch.Tensor, weight: torch.Tensor, seg: torch.Tensor, lse: torch.Tensor,
               u: torch.Tensor, *, bias: Optional[torch.Tensor] = None, lora_b: Optional[torch.Tensor] = None,
               ah: Optional[torch.Tensor] = None, lora_scale: float = 0.0) -> torch.Tensor:
    """R(u)_t = pi_t . u[seg_t]: u (B, V) -> (N,) fp32."""
    hidden, weight, bias = interpreter_safe(hidden, weight, bias)
    c = _common(hidden, weight, bias, lora_b, ah)
    N, D, V = c["N"], c["D"], c["V"]
    u = u.float().contiguous()
    splits = _splits(N, V)
    chunk = triton.cdiv(V, splits)
    part = torch.empty(splits, N, dtype=torch.float32, device=hidden.device)
    grid = lambda meta: (triton.cdiv(N, meta["BLOCK_T"]), splits)  # noqa: E731
    _row_kernel[grid](hidden, weight, c["bias"], c["lb"], c["ah"], seg, lse.float().contiguous(), u, part,
                      N, D, V, chunk, hidden.stride(0), hidden.stride(1), weight.stride(0), weight.stride(1),
                      c["s_lb"], u.stride(0), float(lora_scale), N_BUCKET=_n_bucket(N), HAS_BIAS=c["has_bias"],
                      HAS_LORA=c["has_lora"], IEEE=c["ieee"])
    return part.sum(0)


def column_reduce(hidden: torch.Tensor, weight: torch.Tensor, seg: torch.Tensor, offsets: torch.Tensor,
                  lse: torch.Tensor, w: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
                  lora_b: Optional[torch.Tensor] = None, ah: Optional[torch.Tensor] = None,
                  lora_scale: float = 0.0) -> torch.Tensor:
    """C(w)[b] = sum_{t in conversation b} w_t pi_t: w (N,) -> (B, V) fp32."""
    hidden, weight, bias = interpreter_safe(hidden, weight, bias)
    c = _common(hidden, weight, bias, lora_b, ah)
    N, D, V = c["N"], c["D"], c["V"]
    B = offsets.numel() - 1
    out = torch.empty(B, V, dtype=torch.float32, device=hidden.device)
    grid = lambda meta: (triton.cdiv(V, meta["BLOCK_V"]), B)  # noqa: E731
    _column_kernel[grid](hidden, weight, c["bias"], c["lb"], c["ah"], seg, lse.float().contiguous(),
                         w.float().contiguous(), offsets, out, N, D, V, hidden.stride(0), hidden.stride(1),
                         weight.stride(0), weight.stride(1), c["s_lb"], out.stride(0), float(lora_scale),
                         N_BUCKET=_n_bucket(N), HAS_BIAS=c["has_bias"], HAS_LORA=c["has_lora"], IEEE=c["ieee"])
    return out
