"""Validated, flattened inputs of one ROSA update (MATH.md sections 1-2).

`build_problem` checks every input of :func:`rosa_ext.rosa_update` (with the helpers and
error types of :mod:`rosa_ext.common.validation`, shared by every public entry point). Every
error is raised before anything is allocated or modified, and names the argument that was
wrong and the expected form. The result, a :class:`HeadProblem`, is what the
backends and solvers consume: the response tokens of all conversations are
concatenated ("packed") into N rows, with `seg` telling which conversation a
row belongs to, so one pass over the head weight serves the whole batch.
"""
from __future__ import annotations

from typing import Callable, List, Optional, Tuple

import torch

from ..common import defaults, validation
from ..common.types import MODES, HeadProblem, RewardLike, compute_dtype_of

WHO = "rosa_update"


def _fail(msg: str, argument: Optional[str] = None) -> None:
    validation.fail(WHO, argument, msg)


def _check_tensor(name: str, x: object) -> torch.Tensor:
    return validation.tensor(WHO, name, x)


def _check_float(name: str, x: torch.Tensor) -> None:
    validation.float_tensor(WHO, name, x)


def _check_device(name: str, x: torch.Tensor, device: torch.device) -> None:
    validation.same_device(WHO, name, x, device, "weight")


class _ValueChecks:
    """The checks of ``build_problem`` that read tensor values (finite entries, the targets' range, a
    dead LoRA), queued as 0-dim tensors and read with ONE host synchronisation (:meth:`run`), then
    raised in the order they were queued (each names its argument, as when checked one by one)."""

    def __init__(self) -> None:
        self.items: List[Tuple[torch.Tensor, Callable[[float], None]]] = []

    def add(self, value: torch.Tensor, check: Callable[[float], None]) -> None:
        self.items.append((value, check))

    def finite(self, name: str, x: torch.Tensor) -> None:
        if x.numel():
            def bad(v: float, name: str = name) -> None:
                if not v:
                    validation.fail(WHO, name, f"`{name}` contains NaN or Inf; it must be finite (no NaN/Inf)",
                           validation.RosaNonFiniteError)
            self.add(validation.all_finite(x), bad)

    def run(self) -> None:
        if not self.items:
            return
        vals = torch.stack([v.to(torch.float64) for v, _ in self.items]).tolist()  # the one host sync
        for v, (_, check) in zip(vals, self.items):
            check(v)


def _lora_matrix(name: str, x: Optional[torch.Tensor], batch: int, width: int, batched: bool,
                 device: torch.device, dtype: torch.dtype, checks: _ValueChecks) -> Optional[torch.Tensor]:
    """Accept (width,), PEFT's (1, width) / (width, 1), or (B, width) for a batch."""
    if x is None:
        return None
    x = _check_tensor(name, x)
    _check_float(name, x)
    _check_device(name, x, device)
    if x.dim() == 1 and x.shape[0] == width:
        m = x.reshape(1, width)
    elif x.dim() == 2 and x.shape == (1, width):
        m = x
    elif x.dim() == 2 and x.shape == (width, 1):
        m = x.reshape(1, width)
    elif batched and x.dim() == 2 and x.shape == (batch, width):
        m = x
    else:
        want = f"({width},)" + (f" or ({batch}, {width})" if batched else f", (1, {width}) or ({width}, 1)")
        _fail(f"`{name}` must have shape {want}, got {tuple(x.shape)}", name)
    checks.finite(name, m)
    m = m.detach().to(dtype)
    if m.shape[0] == 1 and batch > 1:
        m = m.expand(batch, width)
    return m.contiguous()


def build_problem(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                  reward: RewardLike, *, mode: str, lora_a: Optional[torch.Tensor],
                  lora_b: Optional[torch.Tensor], lora_scale: float, bias: Optional[torch.Tensor],
                  beta: float, damping: float, max_iter: int, tol: float, solver: str,
                  backend: str, mask: Optional[torch.Tensor], damping_mode: str = defaults.DAMPING_MODE,
                  keep_budget_bytes: int = defaults.KEEP_BUDGET_BYTES,
                  gram_budget_bytes: int = defaults.GRAM_BUDGET_BYTES) -> HeadProblem:
    """Check every input of :func:`rosa_ext.rosa_update` and pack it. See module doc."""
    mode = validation.choice(WHO, "mode", mode, MODES)
    checks = _ValueChecks()
    opts = validation.solver_options(WHO, beta=beta, damping=damping, max_iter=max_iter, tol=tol, solver=solver,
                            backend=backend, lora_scale=lora_scale, damping_mode=damping_mode)
    keep_budget_bytes = validation.integer(WHO, "keep_budget_bytes", keep_budget_bytes, minimum=0, maximum=None)
    gram_budget_bytes = validation.integer(WHO, "gram_budget_bytes", gram_budget_bytes, minimum=0, maximum=None)

    weight = _check_tensor("weight", weight)
    hidden = _check_tensor("hidden", hidden)
    targets = _check_tensor("targets", targets)
    _check_float("weight", weight)
    _check_float("hidden", hidden)
    device = weight.device
    if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] == 0:
        _fail(f"`weight` must be (V, d) with V >= 1 and d >= 1, got shape {tuple(weight.shape)}", "weight")
    Vs, d = weight.shape
    _check_device("hidden", hidden, device)
    _check_device("targets", targets, device)
    if hidden.dtype != weight.dtype:
        _fail(f"`hidden` is {hidden.dtype} but `weight` is {weight.dtype}; they must match "
              f"(the model's lm_head input and weight dtype)", "hidden")
    if hidden.dim() not in (2, 3) or hidden.shape[-1] != d:
        _fail(f"`hidden` must be (T, d) or (B, T, d) with d={d} (weight is {tuple(weight.shape)}), "
              f"got {tuple(hidden.shape)}", "hidden")
    batched = hidden.dim() == 3
    if batched and hidden.shape[0] == 0:
        _fail(f"`hidden` holds no conversation (B = 0), got shape {tuple(hidden.shape)}", "hidden")
    validation.index_tensor(WHO, "targets", targets)
    if targets.shape != hidden.shape[:-1]:
        _fail(f"`targets` must have shape {tuple(hidden.shape[:-1])} to match `hidden`, "
              f"got {tuple(targets.shape)}", "targets")
    if mask is not None:
        mask = _check_tensor("mask", mask)
        _check_device("mask", mask, device)
        if mask.dtype != torch.bool:
            validation.fail(WHO, "mask", f"`mask` must be a bool tensor, got {mask.dtype}", validation.RosaTypeError)
        if mask.shape != targets.shape:
            _fail(f"`mask` must have shape {tuple(targets.shape)}, got {tuple(mask.shape)}", "mask")
    if bias is not None:
        bias = _check_tensor("bias", bias)
        _check_float("bias", bias)
        _check_device("bias", bias, device)
        if bias.shape != (Vs,):
            _fail(f"`bias` must be ({Vs},), got {tuple(bias.shape)}", "bias")
        checks.finite("bias", bias)

    compute_dtype = compute_dtype_of(weight.dtype)
    # damping and lora_scale enter tensors of the compute dtype: they must be finite there
    validation.real(WHO, "damping", opts["damping"], dtype=compute_dtype)
    validation.real(WHO, "lora_scale", opts["lora_scale"], dtype=compute_dtype)

    hidden3 = hidden if batched else hidden.unsqueeze(0)
    targets2 = (targets if batched else targets.unsqueeze(0)).long()
    mask2 = None if mask is None else (mask if batched else mask.unsqueeze(0))
    B, T = targets2.shape
    if T == 0:
        _fail("the response is empty (T = 0); there is nothing to update on", "targets")
    counts = [T] * B if mask2 is None else mask2.sum(dim=1).tolist()
    for b, n in enumerate(counts):
        if n == 0:
            _fail("`mask` selects no response token" + (f" in conversation {b}" if batched else ""), "mask")
    sel_targets = targets2.reshape(-1) if mask2 is None else targets2[mask2]

    def target_range(lo: float, hi: float) -> None:
        if lo < 0 or hi >= Vs:
            _fail(f"`targets` holds token id {int(hi if hi >= Vs else lo)}, outside the vocabulary [0, {Vs})",
                  "targets")

    checks.add(sel_targets.min(), lambda v: target_range(v, 0))
    checks.add(sel_targets.max(), lambda v: target_range(0, v))
    sel_hidden = hidden3.reshape(-1, d) if mask2 is None else hidden3[mask2]
    checks.finite("hidden", sel_hidden)

    r = validation.rewards(WHO, reward, B)
    # a reward beyond the compute dtype's range would become +-inf there
    for v in r.tolist():
        validation.real(WHO, "reward", v, dtype=compute_dtype)
    r = r.to(device=device, dtype=compute_dtype)
    a = _lora_matrix("lora_a", lora_a, B, d, batched, device, compute_dtype, checks)
    bvec = _lora_matrix("lora_b", lora_b, B, Vs, batched, device, compute_dtype, checks)
    if mode == "lora":
        if a is None:
            _fail("mode='lora' needs `lora_a` (the (d,) / (1, d) lora_A weight); with a = 0 and b = 0 the "
                  "Jacobian is zero. Initialise it as LoRA does (random), and `lora_b` to zeros", "lora_a")
        if opts["lora_scale"] == 0:
            _fail("`lora_scale` must be nonzero in mode='lora' (with s = 0 the Jacobian is zero)", "lora_scale")
        # a = 0 and b = 0 (per conversation): the Jacobian is zero, as with lora_a=None
        dead = (a == 0).all(1) & ((bvec == 0).all(1) if bvec is not None else torch.ones_like(a[:, 0], dtype=torch.bool))
        first = torch.where(dead.any(), dead.to(torch.int64).argmax(), -1)

        def not_dead(v: float) -> None:
            if v >= 0:
                which = f" (conversation {int(v)})" if batched else ""
                _fail(f"`lora_a` is all zeros and `lora_b` is zero{which}: the Jacobian of a rank-1 LoRA at a = 0, "
                      "b = 0 is zero, so the step would be zero. Initialise `lora_a` as LoRA does (random)", "lora_a")

        checks.add(first, not_dead)
    checks.run()
    if a is not None and bvec is None:
        bvec = torch.zeros(B, Vs, dtype=compute_dtype, device=device)
    if bvec is not None and a is None:
        a = torch.zeros(B, d, dtype=compute_dtype, device=device)

    offsets = [0]
    for n in counts:
        offsets.append(offsets[-1] + int(n))
    if B == 1:
        seg = torch.zeros(offsets[-1], dtype=torch.int64, device=device)
    else:
        seg = torch.repeat_interleave(torch.arange(B, device=device), torch.tensor(counts, device=device))
    return HeadProblem(hidden=sel_hidden, weight=weight, bias=bias, targets=sel_targets.contiguous(),
                       seg=seg, offsets=offsets, reward=r, mode=mode, lora_a=a, lora_b=bvec,
                       lora_scale=opts["lora_scale"], beta=opts["beta"], damping=opts["damping"],
                       max_iter=opts["max_iter"], tol=opts["tol"], solver=opts["solver"],
                       backend=opts["backend"], batched=batched, compute_dtype=compute_dtype,
                       damping_mode=opts["damping_mode"], keep_budget_bytes=keep_budget_bytes,
                       gram_budget_bytes=gram_budget_bytes)
