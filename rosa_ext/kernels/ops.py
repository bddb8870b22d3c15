"""Tensor-level API of the Triton kernels: no HeadProblem, plain tensors in and out.

Shapes: T tokens (packed over B >= 1 conversations), hidden size d, vocabulary V.

- ``hidden`` (T, d) and ``weight`` (V, d): one dtype of fp32 / bf16 / fp16, any strides
  (fp64 is refused: the torch backend serves fp64 models).
- ``bias`` (V,) any float dtype or None; ``targets`` (T,) int64 token ids.
- ``seg`` (T,) int, conversation of each token, sorted (tokens of one conversation are
  contiguous); None means one conversation (B = 1).
- LoRA rank 1: ``lora_a`` (d,) or (B, d), ``lora_b`` (V,) or (B, V), scale ``lora_scale``
  (default 8); they add s (a_seg . h_t) b_seg to the logits. Both or neither.
- Every result is fp32 (accumulation is fp32 whatever the model dtype), and carries no
  autograd graph.

Checking, and host syncs. A plain call checks all its arguments first (with the helpers of
:mod:`rosa_ext.common.validation`): shapes, dtypes and devices without a host sync, then the
index values (``targets`` in [0, V), ``seg`` sorted and below the rows of every (B, .) table)
with one sync, so that no kernel reads out of bounds; errors name the argument. Values are not
checked for NaN/Inf here (that would cost a pass over W).

A solver that calls the kernels repeatedly on one problem validates it once instead:
``prob = prepare(hidden, weight, targets, seg=..., lora_a=..., ...)`` checks the shapes *and*
values with one sync and carries what the kernels need on the device (seg as int32, the
conversations' offsets, B, ``a . h_t``); every function accepts it as ``prob=`` and then checks
only the shapes of its per-call arguments (``lse``, ``u``, ``w``, ``v``, ``st``): **no host sync**,
so a loop of them is CUDA-graph capturable (capture after one eager call of each function: the
first launch of a kernel for a new shape compiles and autotunes, which a capture cannot hold;
``rosa_ext.attach`` warms the kernels up for its head). With ``prob`` the model arguments are taken from
it: the positional ones must be the very tensors it was prepared with (checked by identity),
the keyword ones may be omitted. A :class:`KernelProblem` keeps values derived from its tensors
(``a . h_t``, the stats when ``st`` is not passed): prepare again after changing them in place.
(The kernels themselves read nothing out of bounds whatever the seg ids or offsets: rows
outside a table read 0, offsets are clamped. Nor does a ``prob=`` call whose ``targets`` were
edited in place to ids outside [0, V) after :func:`prepare`: such a token's log p is NaN in
:func:`stats`, and so is what :func:`jvp` / :func:`vjp` compute from it.)

The JVP/VJP are of p_t = softmax(z_t)[y_t] (MATH.md section 2) w.r.t. the LoRA
parameters [a, b] (mode "lora", P = d + V per conversation) or a hidden-state shift
(mode "hidden", P = d); their algebra is :mod:`rosa_ext.common.jacobian`, the one the
core operator uses, here on the Triton primitives (:mod:`.primitives`). Pass the
:func:`stats` result as ``st`` to skip the stats pass when calling them repeatedly (a CG
loop): a JVP is then one row-reduction pass over W, a VJP one fused column pass (plus
one GEMV over W in hidden mode). Inside the compiled CUDA CG (:func:`rosa_ext.cg.cg`) these
passes skip their work once it has converged (:mod:`rosa_ext.common.device_flag`).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Dict, Optional, Tuple

import torch

from ..common import defaults, device_flag
from ..common import jacobian as J
from ..common import validation as checks
from ..common.types import HeadProblem, HeadStats, pack_layout
from . import checks as kchecks
from .primitives import TritonPrimitives, stats_from_tensors
from .reductions import column_reduce as _column_reduce
from .reductions import row_reduce as _row_reduce


@dataclass(eq=False)
class KernelProblem:
    """A packed problem checked once by :func:`prepare`; pass it as ``prob=`` to skip the checks.

    Holds the tensors it was prepared with (``hidden``, ``weight``, ``targets`` or None,
    ``bias``, ``lora_a``, ``lora_b``, ``seg`` as given) and, on their device: ``seg32`` (T,)
    int32, ``offsets32`` (B + 1,) int32 (conversation b owns tokens offsets[b]:offsets[b+1]),
    ``a`` (1 or B, d) / ``b`` (1 or B, V) fp32 and ``ah`` (T,) fp32 = a_seg . h_t (None
    without LoRA); on the host ``num_conversations`` (B) and ``offsets`` (B + 1 ints).
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    targets: Optional[torch.Tensor]
    bias: Optional[torch.Tensor]
    lora_a: Optional[torch.Tensor]
    lora_b: Optional[torch.Tensor]
    lora_scale: float
    seg: Optional[torch.Tensor]
    num_conversations: int
    offsets: Tuple[int, ...]
    seg32: torch.Tensor
    seg64: torch.Tensor
    offsets32: torch.Tensor
    a: Optional[torch.Tensor]
    b: Optional[torch.Tensor]
    ah: Optional[torch.Tensor]
    _cache: Dict[Any, Any] = field(default_factory=dict, repr=False)

    @property
    def num_tokens(self) -> int:
        return int(self.hidden.shape[0])

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    def __repr__(self) -> str:
        return (f"KernelProblem(T={self.num_tokens}, d={self.hidden_size}, V={self.vocab_size}, "
                f"B={self.num_conversations}, lora={self.lora_a is not None}, bias={self.bias is not None}, "
                f"{self.weight.dtype}, {self.weight.device})")


# -- checks ---------------------------------------------------------------------------------------
def _check_model(who: str, hidden, weight, *, bias, targets, lora_a, lora_b, lora_scale, seg,
                 tables=None, tokens=None, lse=None, st=None, mode=None, num_conversations=None
                 ) -> Tuple[Dict[str, int], Optional[torch.Tensor]]:
    """Every check of a plain call (or of :func:`prepare`): shapes, dtypes and devices without a
    sync, then the index values with one. Returns ({name: rows} of the (B, .) tables, the int64
    CPU copy of ``seg`` or None).

    ``tables``: name -> (tensor, width) of (width,) / (B, width) per-conversation inputs (u, v);
    ``tokens``: name -> tensor of (T,) per-token inputs (w, u).
    """
    T, d, Vs = kchecks.kernel_model(who, hidden, weight, bias)
    dev = hidden.device
    if mode is not None:
        checks.choice(who, "mode", mode, ("lora", "hidden"))
        if mode == "lora" and lora_a is None:
            checks.fail(who, "lora_a", "mode='lora' needs lora_a and lora_b")
    checks.real(who, "lora_scale", lora_scale)
    rows = kchecks.kernel_lora(who, lora_a, lora_b, d, Vs, dev)
    for name, (x, width) in (tables or {}).items():
        rows[name] = kchecks.kernel_rows(who, name, x, width, dev)
    kchecks.kernel_tables_agree(who, rows)
    if num_conversations is not None:
        n = checks.integer(who, "num_conversations", num_conversations, minimum=1)
        multi = {k: r for k, r in rows.items() if r != 1}
        if multi and n != max(multi.values()):
            checks.fail(who, "num_conversations", f"num_conversations={n} but the tables have {multi} rows")
        rows["num_conversations"] = n
    _check_call(who, T, dev, tokens=tokens, lse=lse, st=st, lora=lora_a is not None)
    if targets is not None:
        kchecks.kernel_index(who, "targets", targets, T, dev, "token ids")
    if seg is not None:
        kchecks.kernel_index(who, "seg", seg, T, dev, "conversation ids")
    elif max(rows.values(), default=1) > 1:
        checks.fail(who, "seg", f"{max(rows.values())} conversations given (rows of {list(rows)}) but no `seg`")
    # the value checks: one host sync for all of them
    seg_host = kchecks.kernel_ranges(who, Vs, targets=targets, seg=seg,
                               rows={k: r for k, r in rows.items() if k != "num_conversations"})
    if num_conversations is not None and seg_host is not None and int(seg_host.max()) >= rows["num_conversations"]:
        checks.fail(who, "seg", f"`seg` holds conversation {int(seg_host.max())} but num_conversations="
                           f"{rows['num_conversations']}")
    return rows, seg_host


def _check_call(who: str, T: int, dev: torch.device, *, tokens=None, lse=None, st=None, lora: bool) -> None:
    """The per-call arguments that are not tables: shapes and devices only (no sync)."""
    for name, x in (tokens or {}).items():
        kchecks.kernel_vector(who, name, x, T, dev)
    if lse is not None:
        kchecks.kernel_vector(who, "lse", lse, T, dev)
    if st is not None:
        kchecks.kernel_stats(who, st, T, dev, lora=lora)


def _build(hidden, weight, targets, *, bias, lora_a, lora_b, lora_scale, seg, rows, seg_host) -> KernelProblem:
    """The KernelProblem of checked arguments; no host sync (the offsets come from the host copy
    of seg made by the value check, the device offsets from a search on the device)."""
    T, d = hidden.shape
    Vs = weight.shape[0]
    dev = hidden.device
    if seg is None:
        B = 1
        offsets = (0, T)
        seg64 = torch.zeros(T, dtype=torch.int64, device=dev)
        off32 = torch.zeros(2, dtype=torch.int32, device=dev)
        off32[1:] = T  # a fill, not a host-to-device copy
    else:
        B = max([1, (int(seg_host.max()) + 1) if seg_host.numel() else 1] + list(rows.values()))
        counts = torch.bincount(seg_host, minlength=B).tolist()  # host tensor: no sync
        acc = [0]
        for c in counts:
            acc.append(acc[-1] + int(c))
        offsets = tuple(acc)
        seg64 = seg.to(torch.int64).contiguous()
        off32 = torch.searchsorted(seg64, torch.arange(B + 1, device=dev, dtype=torch.int64)).to(torch.int32)
    a = _rows(lora_a, d)
    b = _rows(lora_b, Vs)
    ah = None
    if a is not None:
        ah = (hidden.float() * (a[0] if a.shape[0] == 1 else a[seg64])).sum(1)
    return KernelProblem(hidden=hidden, weight=weight, targets=targets, bias=bias, lora_a=lora_a, lora_b=lora_b,
                         lora_scale=float(lora_scale), seg=seg, num_conversations=B, offsets=offsets,
                         seg32=seg64.to(torch.int32), seg64=seg64, offsets32=off32, a=a, b=b, ah=ah)


def _rows(x: Optional[torch.Tensor], width: int) -> Optional[torch.Tensor]:
    """(width,) or (B, width) -> (B, width) fp32 (shapes checked before)."""
    if x is None:
        return None
    return x.reshape(1, width).float() if x.dim() == 1 else x.float()


def prepare(hidden: torch.Tensor, weight: torch.Tensor, targets: Optional[torch.Tensor] = None, *,
            bias: Optional[torch.Tensor] = None, lora_a: Optional[torch.Tensor] = None,
            lora_b: Optional[torch.Tensor] = None, lora_scale: Optional[float] = None,
            seg: Optional[torch.Tensor] = None, num_conversations: Optional[int] = None) -> KernelProblem:
    """Check a packed problem once (shapes, and values with one host sync) -> :class:`KernelProblem`.

    Arguments as in the module docstring (``targets`` may be omitted when only
    :func:`row_reduce` / :func:`column_reduce` will be called; ``lora_scale`` defaults to 8);
    ``num_conversations``: B when some conversations of a batch have no token (default: the rows
    of the (B, .) tables or the largest seg id + 1). Pass the result as ``prob=`` to the
    functions of this module: they then run without any host sync.
    """
    who = "rosa_ext.kernels.prepare"
    lora_scale = defaults.LORA_SCALE if lora_scale is None else lora_scale
    rows, seg_host = _check_model(who, hidden, weight, bias=bias, targets=targets, lora_a=lora_a, lora_b=lora_b,
                                  lora_scale=lora_scale, seg=seg, num_conversations=num_conversations)
    return _build(hidden, weight, targets, bias=bias, lora_a=lora_a, lora_b=lora_b, lora_scale=lora_scale,
                  seg=seg, rows=rows, seg_host=seg_host)


def _problem(who: str, prob: Optional[KernelProblem], hidden, weight, targets, *, needs_targets: bool, bias,
             lora_a, lora_b, lora_scale, seg, tables=None, tokens=None, lse=None, st=None, mode=None
             ) -> KernelProblem:
    """The call's KernelProblem: checked and built (plain call, one sync), or ``prob`` after the
    identity and per-call shape checks (no sync)."""
    if prob is None:
        scale = defaults.LORA_SCALE if lora_scale is None else lora_scale
        rows, seg_host = _check_model(who, hidden, weight, bias=bias, targets=targets, lora_a=lora_a,
                                      lora_b=lora_b, lora_scale=scale, seg=seg, tables=tables, tokens=tokens,
                                      lse=lse, st=st, mode=mode)
        return _build(hidden, weight, targets, bias=bias, lora_a=lora_a, lora_b=lora_b, lora_scale=scale, seg=seg,
                      rows=rows, seg_host=seg_host)
    if not isinstance(prob, KernelProblem):
        checks.fail(who, "prob", f"`prob` must be the KernelProblem of rosa_ext.kernels.prepare, got "
                            f"{type(prob).__name__}", checks.RosaTypeError)
    given = dict(hidden=hidden, weight=weight, targets=targets, bias=bias, lora_a=lora_a, lora_b=lora_b, seg=seg)
    for name, x in given.items():
        if x is not None and x is not getattr(prob, name):
            checks.fail(who, name, f"`{name}` is not the tensor `prob` was prepared with: pass that very tensor, or "
                              f"omit it (the keyword arguments) -- or prepare a new problem")
    if lora_scale is not None and checks.real(who, "lora_scale", lora_scale) != prob.lora_scale:
        checks.fail(who, "lora_scale", f"lora_scale={lora_scale} but `prob` was prepared with {prob.lora_scale}")
    if needs_targets and prob.targets is None:
        checks.fail(who, "targets", "`prob` was prepared without targets; prepare it with them for this function")
    if mode is not None:
        checks.choice(who, "mode", mode, ("lora", "hidden"))
        if mode == "lora" and prob.lora_a is None:
            checks.fail(who, "lora_a", "mode='lora' needs lora_a and lora_b (prepare `prob` with them)")
    dev, B = prob.hidden.device, prob.num_conversations
    for name, (x, width) in (tables or {}).items():
        n = kchecks.kernel_rows(who, name, x, width, dev)
        if n not in (1, B):
            checks.fail(who, name, f"`{name}` has {n} rows; `prob` has {B} conversations (give 1 or {B} rows)")
    _check_call(who, prob.num_tokens, dev, tokens=tokens, lse=lse, st=st, lora=prob.lora_a is not None)
    return prob


def _kw(p: KernelProblem) -> Dict[str, Any]:
    return dict(bias=p.bias, lora_b=p.b, ah=p.ah, lora_scale=p.lora_scale)


# -- the functions ----------------------------------------------------------------------------------
@torch.no_grad()
def stats(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, *, bias: Optional[torch.Tensor] = None,
          lora_a: Optional[torch.Tensor] = None, lora_b: Optional[torch.Tensor] = None,
          lora_scale: Optional[float] = None, seg: Optional[torch.Tensor] = None,
          prob: Optional[KernelProblem] = None) -> HeadStats:
    """One pass over W -> HeadStats(lse, logp, ah, pib), each (T,) fp32 (ah/pib None without LoRA).

    lse_t = logsumexp(z_t), logp_t = z_t[y_t] - lse_t (<= 0), ah_t = a_seg . h_t, pib_t = pi_t . b_seg.
    """
    p = _problem("rosa_ext.kernels.stats", prob, hidden, weight, targets, needs_targets=True, bias=bias,
                 lora_a=lora_a, lora_b=lora_b, lora_scale=lora_scale, seg=seg)
    return _stats(p)


def _safe_targets(p: KernelProblem) -> Tuple[torch.Tensor, torch.Tensor]:
    """(targets with every id outside [0, V) replaced by 0, the mask of the ids inside), (T,) each, no
    sync. A plain call has checked the ids; a ``prob=`` call has not (its targets may have been
    edited in place since :func:`prepare`), and its reads of W, bias and lora_b at the targets
    must stay in bounds all the same (module docstring)."""
    y = p.targets.long()
    ok = (y >= 0) & (y < p.vocab_size)
    return torch.where(ok, y, torch.zeros_like(y)), ok


def _stats(p: KernelProblem) -> HeadStats:
    """The stats pass; log p of a target outside [0, V) is NaN (nothing is read for it)."""
    y, ok = _safe_targets(p)
    st = stats_from_tensors(p.hidden, p.weight, y, p.seg32, **_kw(p))
    logp = torch.where(ok, st.logp, torch.full_like(st.logp, float("nan")))
    return HeadStats(lse=st.lse, logp=logp, ah=st.ah, pib=st.pib)


def _weight_of(weight: Any, prob: Optional[KernelProblem]) -> Any:
    """The model weight a call's shapes are checked against: the argument, or ``prob``'s when omitted."""
    return prob.weight if weight is None and isinstance(prob, KernelProblem) else weight


@torch.no_grad()
def row_reduce(hidden: torch.Tensor, weight: torch.Tensor, lse: torch.Tensor, u: torch.Tensor, *,
               bias: Optional[torch.Tensor] = None, lora_a: Optional[torch.Tensor] = None,
               lora_b: Optional[torch.Tensor] = None, lora_scale: Optional[float] = None,
               seg: Optional[torch.Tensor] = None, prob: Optional[KernelProblem] = None) -> torch.Tensor:
    """R(u)_t = pi_t . u_seg for u (V,) or (B, V), given lse (T,) from :func:`stats` -> (T,) fp32."""
    w_ = _weight_of(weight, prob)
    p = _problem("rosa_ext.kernels.row_reduce", prob, hidden, weight, None, needs_targets=False, bias=bias,
                 lora_a=lora_a, lora_b=lora_b, lora_scale=lora_scale, seg=seg, lse=lse,
                 tables={"u": (u, w_.shape[0] if isinstance(w_, torch.Tensor) and w_.dim() == 2 else -1)})
    return _row_reduce(p.hidden, p.weight, p.seg32, lse, _rows(u, p.vocab_size), flag=device_flag.current(), **_kw(p))


@torch.no_grad()
def column_reduce(hidden: torch.Tensor, weight: torch.Tensor, lse: torch.Tensor, w: torch.Tensor, *,
                  bias: Optional[torch.Tensor] = None, lora_a: Optional[torch.Tensor] = None,
                  lora_b: Optional[torch.Tensor] = None, lora_scale: Optional[float] = None,
                  seg: Optional[torch.Tensor] = None, prob: Optional[KernelProblem] = None) -> torch.Tensor:
    """C(w) = sum_t w_t pi_t for w (T,) -> (V,) fp32, or (B, V) per conversation when ``seg`` is given."""
    p = _problem("rosa_ext.kernels.column_reduce", prob, hidden, weight, None, needs_targets=False, bias=bias,
                 lora_a=lora_a, lora_b=lora_b, lora_scale=lora_scale, seg=seg, lse=lse, tokens={"w": w})
    out = _column_reduce(p.hidden, p.weight, p.offsets32, lse, w, flag=device_flag.current(), **_kw(p))
    return out[0] if p.seg is None else out


def _num_params(weight: Any, mode: Any) -> int:
    """P = d + V (lora) or d (hidden); -1 before the shapes are checked."""
    try:
        return int(weight.shape[1]) + (int(weight.shape[0]) if mode == "lora" else 0)
    except (AttributeError, IndexError, TypeError):
        return -1


def _linearization(p: KernelProblem, mode: str, st: Optional[HeadStats]) -> Tuple[J.Linearization, TritonPrimitives]:
    """The packed problem of the tensor-level call, its stats and the Triton primitives over it
    (cached in ``p``: a loop that passes the same ``st`` builds them once)."""
    cache = p._cache
    if st is None:
        if "stats" not in cache:
            cache["stats"] = _stats(p)
        st = cache["stats"]
    hit = cache.get(("lin", mode))
    if hit is not None and hit[0] is st:
        return hit[1], hit[2]
    head = cache.get(("head", mode))
    if head is None:
        B = p.num_conversations
        a = None if p.a is None else p.a.expand(B, -1)
        b = None if p.b is None else p.b.expand(B, -1)
        head = HeadProblem(hidden=p.hidden, weight=p.weight, bias=p.bias, targets=_safe_targets(p)[0],
                           seg=p.seg64, reward=torch.zeros(B, device=p.hidden.device), lora_a=a, lora_b=b,
                           lora_scale=p.lora_scale, batched=p.seg is not None, compute_dtype=torch.float32,
                           **pack_layout(p.weight, p.offsets))
        cache[("head", mode)] = head
    prims = cache.get("prims")
    if prims is None:
        prims = cache["prims"] = TritonPrimitives(index=(p.seg32, p.offsets32))
    lin = J.Linearization.at(head, st, mode)
    cache[("lin", mode)] = (st, lin, prims)
    return lin, prims


@torch.no_grad()
def jvp(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, v: torch.Tensor, *, mode: str,
        bias: Optional[torch.Tensor] = None, lora_a: Optional[torch.Tensor] = None,
        lora_b: Optional[torch.Tensor] = None, lora_scale: Optional[float] = None,
        seg: Optional[torch.Tensor] = None, st: Optional[HeadStats] = None,
        prob: Optional[KernelProblem] = None) -> torch.Tensor:
    """u = J v: v (P,) or (B, P) (P = d + V laid out [v_a, v_b] for "lora", d for "hidden") -> (T,) fp32."""
    p = _problem("rosa_ext.kernels.jvp", prob, hidden, weight, targets, needs_targets=True, bias=bias,
                 lora_a=lora_a, lora_b=lora_b, lora_scale=lora_scale, seg=seg, st=st, mode=mode,
                 tables={"v": (v, _num_params(_weight_of(weight, prob), mode))})
    lin, prims = _linearization(p, mode, st)
    P, B = _num_params(p.weight, mode), p.num_conversations
    return J.jvp(lin, prims, _rows(v, P).expand(B, P))


@torch.no_grad()
def vjp(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, u: torch.Tensor, *, mode: str,
        bias: Optional[torch.Tensor] = None, lora_a: Optional[torch.Tensor] = None,
        lora_b: Optional[torch.Tensor] = None, lora_scale: Optional[float] = None,
        seg: Optional[torch.Tensor] = None, st: Optional[HeadStats] = None,
        prob: Optional[KernelProblem] = None) -> torch.Tensor:
    """J^T u: u (T,) -> (P,) fp32, or (B, P) per conversation when ``seg`` is given."""
    p = _problem("rosa_ext.kernels.vjp", prob, hidden, weight, targets, needs_targets=True, bias=bias,
                 lora_a=lora_a, lora_b=lora_b, lora_scale=lora_scale, seg=seg, st=st, mode=mode, tokens={"u": u})
    lin, prims = _linearization(p, mode, st)
    grad = J.vjp(lin, prims, u.float())
    return grad[0] if p.seg is None else grad
