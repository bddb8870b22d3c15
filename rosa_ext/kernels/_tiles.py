"""Shared Triton pieces: recompute one (BLOCK_T, BLOCK_V) tile of logits.

z[t, v] = h_t . W_v (+ c_v) (+ s (a . h_t) b[seg_t, v]), accumulated in fp32 with
``tl.dot`` over the hidden dimension in BLOCK_D chunks (ROSA_SPEC.md section 3:
tiles are recomputed from H, W and the per-token cache, never stored).
"""
from __future__ import annotations

import os

import triton
import triton.language as tl

#: True when kernels run in the Triton interpreter (CPU tests): one small tile config.
INTERPRET = os.environ.get("TRITON_INTERPRET") == "1"


@triton.jit
def logits_tile(h_ptr, w_ptr, bias_ptr, lb_ptr, ah, seg, offs_t, offs_v, mask_t, mask_v, D,
                s_hn, s_hd, s_wv, s_wd, s_lb, lora_scale,
                HAS_BIAS: tl.constexpr, HAS_LORA: tl.constexpr, IEEE: tl.constexpr,
                BLOCK_T: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    """fp32 logits tile (BLOCK_T, BLOCK_V); masked vocabulary columns are -inf."""
    acc = tl.zeros((BLOCK_T, BLOCK_V), dtype=tl.float32)
    for d0 in range(0, D, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        md = offs_d < D
        h = tl.load(h_ptr + offs_t[:, None] * s_hn + offs_d[None, :] * s_hd,
                    mask=mask_t[:, None] & md[None, :], other=0.0)
        wt = tl.load(w_ptr + offs_d[:, None] * s_wd + offs_v[None, :] * s_wv,
                     mask=md[:, None] & mask_v[None, :], other=0.0)
        if IEEE:
            acc += tl.dot(h, wt, input_precision="ieee")
        else:
            acc += tl.dot(h, wt)
    if HAS_BIAS:
        c = tl.load(bias_ptr + offs_v, mask=mask_v, other=0.0).to(tl.float32)
        acc += c[None, :]
    if HAS_LORA:
        bv = tl.load(lb_ptr + seg[:, None] * s_lb + offs_v[None, :],
                     mask=mask_t[:, None] & mask_v[None, :], other=0.0).to(tl.float32)
        acc += (lora_scale * ah)[:, None] * bv
    return tl.where(mask_v[None, :], acc, float("-inf"))


def hopper_configs():
    """Tile configs autotuned on Hopper (H100/H200) for d in [576, 4096], V ~ 50k-152k."""
    if INTERPRET:
        return [triton.Config({"BLOCK_T": 16, "BLOCK_V": 32, "BLOCK_D": 16}, num_warps=1, num_stages=1)]
    cfgs = []
    for bt in (64, 128):
        for bv in (64, 128):
            for bd in (64, 128):
                for warps in (4, 8):
                    cfgs.append(triton.Config({"BLOCK_T": bt, "BLOCK_V": bv, "BLOCK_D": bd},
                                              num_warps=warps, num_stages=3))
    # small-T config (decode-sized updates)
    cfgs.append(triton.Config({"BLOCK_T": 16, "BLOCK_V": 128, "BLOCK_D": 128}, num_warps=4, num_stages=3))
    return cfgs
