"""Tensor-level API of the Triton kernels: no HeadProblem, plain tensors in and out.

Shapes: T tokens (packed over B >= 1 conversations), hidden size d, vocabulary V.

- ``hidden`` (T, d) and ``weight`` (V, d): one dtype of fp32 / bf16 / fp16, any strides
  (fp64 is refused: the torch backend serves fp64 models).
- ``bias`` (V,) any float dtype or None; ``targets`` (T,) int64 token ids.
- ``seg`` (T,) int, conversation of each token, sorted (tokens of one conversation are
  contiguous); None means one conversation (B = 1).
- LoRA rank 1: ``lora_a`` (d,) or (B, d), ``lora_b`` (V,) or (B, V), scale ``lora_scale``;
  they add s (a_seg . h_t) b_seg to the logits. Both or neither.
- Every result is fp32 (accumulation is fp32 whatever the model dtype), and carries no
  autograd graph.

Every function checks its arguments first (:func:`_validate`, with the helpers of
:mod:`rosa_ext.common.validation`): shapes, dtypes and devices without a host sync, then the
index values (``targets`` in [0, V), ``seg`` sorted and below the rows of every (B, .) table)
with one sync each, so that no kernel reads out of bounds; errors name the argument. Values
are not checked for NaN/Inf here (that would cost a pass over W).

The JVP/VJP are of p_t = softmax(z_t)[y_t] (MATH.md section 2) w.r.t. the LoRA
parameters [a, b] (mode "lora", P = d + V per conversation) or a hidden-state shift
(mode "hidden", P = d); their algebra is :mod:`rosa_ext.common.jacobian`, the one the
core operator uses, here on the Triton primitives (:mod:`.primitives`). Pass the
:func:`stats` result as ``st`` to skip the stats pass when calling them repeatedly (a CG
loop): a JVP is then one row-reduction pass over W, a VJP one column-reduction pass (plus
one GEMV over W in hidden mode).
"""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..common import defaults
from ..common import jacobian as J
from ..common import validation as V
from ..common.types import HeadProblem, HeadStats
from .primitives import TritonPrimitives, stats_from_tensors
from .reductions import column_reduce as _column_reduce
from .reductions import row_reduce as _row_reduce


def _validate(who: str, hidden, weight, *, bias=None, targets=None, lora_a=None, lora_b=None,
              lora_scale=defaults.LORA_SCALE, seg=None, lse=None, tables=None, tokens=None, st=None,
              mode=None) -> None:
    """Check one call's arguments before any kernel runs.

    ``tables``: name -> (tensor, width) of (width,) / (B, width) per-conversation inputs (u, v);
    ``tokens``: name -> tensor of (T,) per-token inputs (w, u). The value checks (one host sync
    each) are the last step, :func:`rosa_ext.common.validation.kernel_ranges`.
    """
    T, d, Vs = V.kernel_model(who, hidden, weight, bias)
    dev = hidden.device
    if mode is not None:
        V.choice(who, "mode", mode, ("lora", "hidden"))
        if mode == "lora" and lora_a is None:
            V.fail(who, "lora_a", "mode='lora' needs lora_a and lora_b")
    V.real(who, "lora_scale", lora_scale)
    rows = V.kernel_lora(who, lora_a, lora_b, d, Vs, dev)
    for name, (x, width) in (tables or {}).items():
        rows[name] = V.kernel_rows(who, name, x, width, dev)
    V.kernel_tables_agree(who, rows)
    for name, x in (tokens or {}).items():
        V.kernel_vector(who, name, x, T, dev)
    if lse is not None:
        V.kernel_vector(who, "lse", lse, T, dev)
    if st is not None:
        V.kernel_stats(who, st, T, dev, lora=lora_a is not None)
    if targets is not None:
        V.kernel_index(who, "targets", targets, T, dev, "token ids")
    if seg is not None:
        V.kernel_index(who, "seg", seg, T, dev, "conversation ids")
    elif max(rows.values(), default=1) > 1:
        V.fail(who, "seg", f"{max(rows.values())} conversations given (rows of {list(rows)}) but no `seg`")
    # value checks: one host sync each (opt-out candidates on a hot path)
    V.kernel_ranges(who, Vs, targets=targets, seg=seg, rows=rows)


def _rows(x: Optional[torch.Tensor], width: int) -> Optional[torch.Tensor]:
    """(width,) or (B, width) -> (B, width) fp32 (shapes checked by :func:`_validate`)."""
    if x is None:
        return None
    return x.reshape(1, width).float() if x.dim() == 1 else x.float()


def _segments(hidden: torch.Tensor, seg: Optional[torch.Tensor], num: int) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """(seg int32 (T,), offsets int32 (B + 1,), B) on the device of ``hidden`` (seg checked by :func:`_validate`)."""
    T = hidden.shape[0]
    if seg is None:
        return (torch.zeros(T, dtype=torch.int32, device=hidden.device),
                torch.tensor([0, T], dtype=torch.int32, device=hidden.device), 1)
    B = max(num, int(seg.max()) + 1)
    counts = torch.bincount(seg.long(), minlength=B)
    offsets = torch.zeros(B + 1, dtype=torch.int32, device=hidden.device)
    offsets[1:] = torch.cumsum(counts, 0).to(torch.int32)
    return seg.to(torch.int32).contiguous(), offsets, B


def _lora(hidden, weight, lora_a, lora_b, seg32):
    """(a (B, d), b (B, V), ah (T,)) fp32, or Nones."""
    if lora_a is None:
        return None, None, None
    a = _rows(lora_a, hidden.shape[1])
    b = _rows(lora_b, weight.shape[0])
    ah = (hidden.float() * (a[0] if a.shape[0] == 1 else a[seg32.long()])).sum(1)
    return a, b, ah


def _num(*xs: Optional[torch.Tensor]) -> int:
    return max([1] + [x.shape[0] for x in xs if x is not None and x.dim() == 2])


@torch.no_grad()
def stats(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
          lora_a: Optional[torch.Tensor] = None, lora_b: Optional[torch.Tensor] = None,
          lora_scale: float = defaults.LORA_SCALE, seg: Optional[torch.Tensor] = None) -> HeadStats:
    """One pass over W -> HeadStats(lse, logp, ah, pib), each (T,) fp32 (ah/pib None without LoRA).

    lse_t = logsumexp(z_t), logp_t = z_t[y_t] - lse_t (<= 0), ah_t = a_seg . h_t, pib_t = pi_t . b_seg.
    """
    _validate("rosa_ext.kernels.stats", hidden, weight, bias=bias, targets=targets, lora_a=lora_a, lora_b=lora_b,
              lora_scale=lora_scale, seg=seg)
    return _stats(hidden, weight, targets, bias=bias, lora_a=lora_a, lora_b=lora_b, lora_scale=lora_scale, seg=seg)


def _stats(hidden, weight, targets, *, bias, lora_a, lora_b, lora_scale, seg) -> HeadStats:
    seg32, _, B = _segments(hidden, seg, _num(lora_a, lora_b))
    _, b, ah = _lora(hidden, weight, lora_a, lora_b, seg32)
    return stats_from_tensors(hidden, weight, targets, seg32, bias=bias, lora_b=b, ah=ah, lora_scale=lora_scale)


@torch.no_grad()
def row_reduce(hidden: torch.Tensor, weight: torch.Tensor, lse: torch.Tensor, u: torch.Tensor, *,
               bias: Optional[torch.Tensor] = None, lora_a: Optional[torch.Tensor] = None,
               lora_b: Optional[torch.Tensor] = None, lora_scale: float = defaults.LORA_SCALE,
               seg: Optional[torch.Tensor] = None) -> torch.Tensor:
    """R(u)_t = pi_t . u_seg for u (V,) or (B, V), given lse (T,) from :func:`stats` -> (T,) fp32."""
    _validate("rosa_ext.kernels.row_reduce", hidden, weight, bias=bias, lora_a=lora_a, lora_b=lora_b,
              lora_scale=lora_scale, seg=seg, lse=lse, tables={"u": (u, weight.shape[0])})
    u2 = _rows(u, weight.shape[0])
    seg32, _, _ = _segments(hidden, seg, _num(u2, lora_a, lora_b))
    _, b, ah = _lora(hidden, weight, lora_a, lora_b, seg32)
    return _row_reduce(hidden, weight, seg32, lse, u2, bias=bias, lora_b=b, ah=ah, lora_scale=lora_scale)


@torch.no_grad()
def column_reduce(hidden: torch.Tensor, weight: torch.Tensor, lse: torch.Tensor, w: torch.Tensor, *,
                  bias: Optional[torch.Tensor] = None, lora_a: Optional[torch.Tensor] = None,
                  lora_b: Optional[torch.Tensor] = None, lora_scale: float = defaults.LORA_SCALE,
                  seg: Optional[torch.Tensor] = None) -> torch.Tensor:
    """C(w) = sum_t w_t pi_t for w (T,) -> (V,) fp32, or (B, V) per conversation when ``seg`` is given."""
    _validate("rosa_ext.kernels.column_reduce", hidden, weight, bias=bias, lora_a=lora_a, lora_b=lora_b,
              lora_scale=lora_scale, seg=seg, lse=lse, tokens={"w": w})
    seg32, off, _ = _segments(hidden, seg, _num(lora_a, lora_b))
    _, b, ah = _lora(hidden, weight, lora_a, lora_b, seg32)
    out = _column_reduce(hidden, weight, off, lse, w, bias=bias, lora_b=b, ah=ah, lora_scale=lora_scale)
    return out[0] if seg is None else out


def _num_params(hidden: torch.Tensor, weight: torch.Tensor, mode: str) -> int:
    """P = d + V (lora) or d (hidden); 0 before the shapes are checked."""
    try:
        return int(weight.shape[1]) + (int(weight.shape[0]) if mode == "lora" else 0)
    except (AttributeError, IndexError, TypeError):
        return 0


def _params(v: torch.Tensor, P: int, B: int) -> torch.Tensor:
    return _rows(v, P).expand(B, P)


def _linearization(hidden, weight, targets, mode, lora_a, lora_b, seg, st, bias, lora_scale, extra=None
                   ) -> Tuple[J.Linearization, TritonPrimitives]:
    """The packed problem of the tensor-level call, its stats and the Triton primitives over it."""
    seg32, off, B = _segments(hidden, seg, _num(lora_a, lora_b, extra))
    a, b, _ = _lora(hidden, weight, lora_a, lora_b, seg32)
    if st is None:
        st = _stats(hidden, weight, targets, bias=bias, lora_a=lora_a, lora_b=lora_b, lora_scale=lora_scale, seg=seg)
    if a is not None:
        a, b = a.expand(B, -1), b.expand(B, -1)
    prob = HeadProblem(hidden=hidden, weight=weight, bias=bias, targets=targets.long(), seg=seg32.long(),
                       offsets=off.tolist(), reward=torch.zeros(B, device=hidden.device), mode=mode, lora_a=a,
                       lora_b=b, lora_scale=float(lora_scale), beta=defaults.BETA, damping=defaults.DAMPING,
                       max_iter=defaults.MAX_ITER, tol=defaults.TOL, solver="cg", backend="triton",
                       batched=seg is not None, compute_dtype=torch.float32)
    return J.Linearization.at(prob, st), TritonPrimitives(index=(seg32, off))


@torch.no_grad()
def jvp(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, v: torch.Tensor, *, mode: str,
        bias: Optional[torch.Tensor] = None, lora_a: Optional[torch.Tensor] = None,
        lora_b: Optional[torch.Tensor] = None, lora_scale: float = defaults.LORA_SCALE,
        seg: Optional[torch.Tensor] = None, st: Optional[HeadStats] = None) -> torch.Tensor:
    """u = J v: v (P,) or (B, P) (P = d + V laid out [v_a, v_b] for "lora", d for "hidden") -> (T,) fp32."""
    _validate("rosa_ext.kernels.jvp", hidden, weight, bias=bias, targets=targets, lora_a=lora_a, lora_b=lora_b,
              lora_scale=lora_scale, seg=seg, st=st, mode=mode,
              tables={"v": (v, _num_params(hidden, weight, mode))})
    lin, prims = _linearization(hidden, weight, targets, mode, lora_a, lora_b, seg, st, bias, lora_scale,
                                v if v.dim() == 2 else None)
    prob = lin.prob
    return J.jvp(lin, prims, _params(v, prob.num_params, prob.num_conversations))


@torch.no_grad()
def vjp(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, u: torch.Tensor, *, mode: str,
        bias: Optional[torch.Tensor] = None, lora_a: Optional[torch.Tensor] = None,
        lora_b: Optional[torch.Tensor] = None, lora_scale: float = defaults.LORA_SCALE,
        seg: Optional[torch.Tensor] = None, st: Optional[HeadStats] = None) -> torch.Tensor:
    """J^T u: u (T,) -> (P,) fp32, or (B, P) per conversation when ``seg`` is given."""
    _validate("rosa_ext.kernels.vjp", hidden, weight, bias=bias, targets=targets, lora_a=lora_a, lora_b=lora_b,
              lora_scale=lora_scale, seg=seg, st=st, mode=mode, tokens={"u": u})
    lin, prims = _linearization(hidden, weight, targets, mode, lora_a, lora_b, seg, st, bias, lora_scale)
    grad = J.vjp(lin, prims, u.float())
    return grad[0] if seg is None else grad
