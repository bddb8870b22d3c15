"""The glue GEMVs of the hidden-state mode: W v (JVP) and q W (VJP), fp32 accumulation.

Both read W (V, d) once per conversation in its own dtype. For bf16/fp16 models that is
what pays: the torch route has to widen W (or a chunk of it) to fp32 first, which costs
about 5x the bytes of one read of W. For fp32 models torch's cuBLAS GEMV is already at the
bandwidth roof and is used instead (and everywhere the Triton kernel is not asked for).
These are memory-bound (one pass over W, ~0.09 ms for the bf16 Qwen2.5-0.5B head on an H100).
"""
from __future__ import annotations

from typing import List, Optional

import torch
import triton
import triton.language as tl

from ..common.validation import RosaInputError, RosaTypeError
from ._tiles import INTERPRET, autotuned, interpreter_safe, launch, loop_end
from .checks import kernel_device


def _configs() -> List[triton.Config]:
    if INTERPRET:
        return [triton.Config({"BLOCK_V": 16, "BLOCK_D": 16}, num_warps=1, num_stages=1)]
    return [triton.Config({"BLOCK_V": bv, "BLOCK_D": bd}, num_warps=w, num_stages=s)
            for bv, bd, w, s in [(32, 256, 4, 3), (64, 128, 4, 3), (64, 256, 8, 3), (128, 128, 8, 3),
                                 (16, 512, 4, 2)]]


@autotuned(_configs(), ["D", "V"])
@triton.jit
def _matvec_kernel(w_ptr, x_ptr, out_ptr, flag_ptr, D, V, s_wv, s_wd, s_x, s_out,
                   HAS_FLAG: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_v = tl.program_id(0)
    b = tl.program_id(1)
    offs_v = pid_v * BLOCK_V + tl.arange(0, BLOCK_V)
    mask_v = offs_v < V
    acc = tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32)
    d_end = loop_end(0, D, flag_ptr, HAS_FLAG)  # run flag 0: store zeros
    for d0 in range(0, d_end, BLOCK_D):
        offs_d = d0 + tl.arange(0, BLOCK_D)
        md = offs_d < D
        w = tl.load(w_ptr + offs_v[:, None] * s_wv + offs_d[None, :] * s_wd,
                    mask=mask_v[:, None] & md[None, :], other=0.0).to(tl.float32)
        x = tl.load(x_ptr + b * s_x + offs_d, mask=md, other=0.0).to(tl.float32)
        acc += w * x[None, :]
    tl.store(out_ptr + b * s_out + offs_v, tl.sum(acc, 1), mask=mask_v)


@autotuned(_configs(), ["D", "V"])
@triton.jit
def _rmatvec_kernel(w_ptr, q_ptr, part_ptr, flag_ptr, D, V, B, chunk, s_wv, s_wd, s_q,
                    HAS_FLAG: tl.constexpr, BLOCK_V: tl.constexpr, BLOCK_D: tl.constexpr):
    pid_d = tl.program_id(0)
    split = tl.program_id(1)
    b = tl.program_id(2)
    offs_d = pid_d * BLOCK_D + tl.arange(0, BLOCK_D)
    md = offs_d < D
    v_begin = split * chunk
    v_end = tl.minimum(v_begin + chunk, V)
    v_end = loop_end(v_begin, v_end, flag_ptr, HAS_FLAG)  # run flag 0: store zeros
    acc = tl.zeros((BLOCK_V, BLOCK_D), dtype=tl.float32)
    for v0 in range(v_begin, v_end, BLOCK_V):
        offs_v = v0 + tl.arange(0, BLOCK_V)
        mask_v = offs_v < v_end
        w = tl.load(w_ptr + offs_v[:, None] * s_wv + offs_d[None, :] * s_wd,
                    mask=mask_v[:, None] & md[None, :], other=0.0).to(tl.float32)
        q = tl.load(q_ptr + b * s_q + offs_v, mask=mask_v, other=0.0).to(tl.float32)
        acc += w * q[:, None]
    tl.store(part_ptr + (split * B + b) * D + offs_d, tl.sum(acc, 0), mask=md)


def _check(weight: torch.Tensor, x: torch.Tensor, axis: int, name: str) -> None:
    """weight (V, d) fp32/bf16/fp16; x (B, weight.shape[axis]) float on its device."""
    if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or weight.dtype not in (
            torch.float32, torch.bfloat16, torch.float16):
        raise RosaTypeError(f"rosa_ext.kernels.{name}: weight must be a (V, d) fp32/bf16/fp16 tensor, got "
                            f"{getattr(weight, 'shape', type(weight).__name__)} {getattr(weight, 'dtype', '')}",
                            "weight")
    kernel_device(f"rosa_ext.kernels.{name}", "weight", weight)
    arg, width = ("x" if name == "weight_matvec" else "q"), weight.shape[axis]
    if (not isinstance(x, torch.Tensor) or x.dim() != 2 or x.shape[1] != width or not x.is_floating_point()
            or x.device != weight.device):
        raise RosaInputError(f"rosa_ext.kernels.{name}: `{arg}` must be a (B, {width}) float tensor on "
                             f"{weight.device}, got {getattr(x, 'shape', type(x).__name__)} "
                             f"{getattr(x, 'dtype', '')} on {getattr(x, 'device', '')}", arg)


def weight_matvec(weight: torch.Tensor, x: torch.Tensor, *, flag: Optional[torch.Tensor] = None) -> torch.Tensor:
    """W x for every row of x: weight (V, d) fp32/bf16/fp16, x (B, d) -> (B, V) fp32.

    ``flag``: the run flag (:mod:`rosa_ext.common.device_flag`): zeros when it is 0."""
    _check(weight, x, 1, "weight_matvec")
    V, D = weight.shape
    (weight,) = interpreter_safe(weight)
    x = x.float().contiguous()
    B = x.shape[0]
    out = torch.empty(B, V, dtype=torch.float32, device=weight.device)
    grid = lambda meta: (triton.cdiv(V, meta["BLOCK_V"]), B)  # noqa: E731
    launch(_matvec_kernel, grid, (weight, x, out), dict(D=D, V=V, s_wv=weight.stride(0), s_wd=weight.stride(1),
                                                        s_x=x.stride(0), s_out=out.stride(0)), flag)
    return out


#: Vocabulary rows per program of the q W reduction (a multiple of every BLOCK_V).
_RMATVEC_CHUNK = 2048


def weight_rmatvec(weight: torch.Tensor, q: torch.Tensor, *, flag: Optional[torch.Tensor] = None) -> torch.Tensor:
    """q W for every row of q: weight (V, d) fp32/bf16/fp16, q (B, V) -> (B, d) fp32.

    Programs over (d tile, vocabulary split of ``_RMATVEC_CHUNK`` rows, conversation); the
    (splits, B, d) partials are summed in torch (deterministic, no atomics). ``flag``: the run
    flag: zeros when it is 0."""
    _check(weight, q, 0, "weight_rmatvec")
    V, D = weight.shape
    (weight,) = interpreter_safe(weight)
    q = q.float().contiguous()
    B = q.shape[0]
    chunk = _RMATVEC_CHUNK if not INTERPRET else 64
    splits = triton.cdiv(V, chunk)
    part = torch.empty(splits, B, D, dtype=torch.float32, device=weight.device)
    grid = lambda meta: (triton.cdiv(D, meta["BLOCK_D"]), splits, B)  # noqa: E731
    launch(_rmatvec_kernel, grid, (weight, q, part), dict(D=D, V=V, B=B, chunk=chunk, s_wv=weight.stride(0),
                                                         s_wd=weight.stride(1), s_q=q.stride(0)), flag)
    return part.sum(0)
