"""The public functional op: :func:`rosa_update` -> :class:`RosaStep`.

A thin function over one typed engine call (MATH.md sections 1 and 6): it reads its options from one
:class:`~rosa_ext.common.config.RosaConfig`, checks and packs its tensors into a
:class:`~rosa_ext.common.types.HeadProblem` (:func:`build_problem`, every error naming the argument and
raised before anything is modified; the checks that read values are queued for the plan's one host
sync, MATH.md section 4), takes the engine of ``config.backend``
(:mod:`rosa_ext.backends`), runs the plan ``solver="auto"`` chooses (:mod:`rosa_ext.plans`) and
returns the step. A vocabulary-parallel head goes through :mod:`.distributed` first (MATH.md section 7).
"""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, List, Optional, Tuple, Union

import torch

from ..backends import engine_for
from ..common import validation as checks
from ..common.config import RosaConfig, compute_dtype_of, resolve
from ..common.types import HeadProblem, RewardLike
from ..plans import CGImpl, choose
from . import distributed

WHO = "rosa_update"


@dataclass
class RosaStep:
    """Result of one ROSA update.

    Attributes:
        update: the flat delta-theta, compute dtype (fp32, or fp64 for fp64 models).
            (P,) for one conversation, (B, P) for a batch; P = d + V laid out
            ``[delta_a, delta_b]`` (lora) or P = d (hidden).
        mode: "lora" or "hidden".
        solver: the solver that ran ("cg" or "dual").
        backend: the engine that ran the vocabulary work ("torch" or "triton"), as the engine's passes
            report it: ``backend="triton"`` reports "torch" where the Triton engine handed a pass to the
            torch engine (float64 problems; a hidden pass whose probability tiles exceed the budget).
        hidden_size: d.
        logp: (N,) log-prob of each response token before the update (packed over the batch).
        target: (N,) the residual target g = p* - p that the step fits.
    ``iterations`` and ``residual`` (relative residual of the normal equations)
    are read lazily: on CUDA reading them synchronises once.
    """

    update: torch.Tensor
    mode: str
    solver: str
    backend: str
    hidden_size: int
    logp: torch.Tensor
    target: torch.Tensor
    _iterations: Union[int, torch.Tensor] = field(repr=False, default=0)
    _residual: Union[float, torch.Tensor] = field(repr=False, default=0.0)

    @property
    def iterations(self) -> int:
        """CG iterations run (0 for the exact dual solve)."""
        return int(self._iterations)

    @property
    def residual(self) -> float:
        """Final ||J^T g - (J^T J + lambda I) d|| / ||J^T g|| (0 when g = 0)."""
        return float(self._residual)

    @property
    def delta(self) -> torch.Tensor:
        """Hidden mode: the shift, (d,) or (B, d). LoRA mode: same as ``update``."""
        return self.update

    @property
    def delta_a(self) -> torch.Tensor:
        """LoRA mode: the change of lora_A, (d,) or (B, d) (a view of ``update``)."""
        self._need_lora("delta_a")
        return self.update[..., :self.hidden_size]

    @property
    def delta_b(self) -> torch.Tensor:
        """LoRA mode: the change of lora_B, (V,) or (B, V) (a view of ``update``)."""
        self._need_lora("delta_b")
        return self.update[..., self.hidden_size:]

    def _need_lora(self, name: str) -> None:
        if self.mode != "lora":
            raise AttributeError(f"RosaStep.{name} exists in mode='lora' only; this step is "
                                 f"mode={self.mode!r}, use .delta")


def rosa_update(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reward: RewardLike, *,
                config: Optional[RosaConfig] = None, lora_a: Optional[torch.Tensor] = None,
                lora_b: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
                mask: Optional[torch.Tensor] = None, cg_impl: Optional[CGImpl] = None,
                process_group: Optional[Any] = None, vocab_start: Optional[int] = None,
                vocab_size: Optional[int] = None, **options: Any) -> RosaStep:
    """One ROSA step: solve (J^T J + lambda I) d = J^T g (MATH.md sections 1 and 6).

    Args:
        hidden: (T, d) inputs of lm_head at the positions that predict the response
            tokens, already including any current hidden shift; or (B, T, d) for B
            conversations (pad ragged ones and pass ``mask``). fp32/bf16/fp16/fp64.
        weight: (V, d) lm_head weight, same dtype and device as ``hidden``. Not modified.
        targets: (T,) or (B, T) int64 observed response tokens, in [0, V).
        reward: the feedback r (a float), or (B,) rewards for a batch. Must be finite.
        config: the options (:class:`~rosa_ext.common.config.RosaConfig`: mode, beta, damping,
            damping_mode, solver, backend, max_iter, tol, lora_scale, keep_budget_bytes,
            gram_budget_bytes); None: the defaults.
        **options: any option of RosaConfig by name, overriding ``config`` (``mode="hidden"``,
            ``damping=0.1``, ...); without ``config``, ``mode`` is required.
        lora_a: (d,) / PEFT's (1, d) lora_A weight, or (B, d); required for "lora" and
            optional in "hidden" mode (then the LoRA term is part of the logits).
        lora_b: (V,) / PEFT's (V, 1) lora_B weight, or (B, V); zeros if omitted.
        bias: (V,) lm_head bias or None.
        mask: (T,) or (B, T) bool; False rows (padding, prompt tokens) are ignored.
        cg_impl: the CG implementation the "cg" solver runs (default :func:`rosa_ext.cg.cg`, the
            compiled solver when built; :func:`rosa_ext.cg.cg_python` is the Python loop). Hidden
            mode only on a vocabulary-parallel head.
        process_group, vocab_start, vocab_size: a vocabulary-parallel head (MATH.md section 7;
            :mod:`rosa_ext.core.distributed`): ``weight`` (and ``bias``, ``lora_b``) hold this rank's
            rows ``[vocab_start, vocab_start + V_local)`` of the head, ``process_group`` (default:
            the default group) is the group the head is split over, ``vocab_size`` the global V
            (checked when given); ``hidden``, ``targets`` (global ids), ``reward``, ``lora_a`` and
            ``mask`` are the same on every rank. A ``weight`` that is a DTensor sharded on dim 0
            (``ColwiseParallel``) needs none of the three. Every rank gets the step of the unsharded
            call: ``delta`` / ``delta_a`` identical on all ranks, ``delta_b`` this rank's rows.
    Returns:
        :class:`RosaStep`; add ``step.update`` to the parameters to apply it.
    Raises (README, "Errors"; the types are in :mod:`rosa_ext.common.validation`):
        RosaTypeError / RosaInputError (TypeError / ValueError): bad input, before any work is done
            (vocabulary-parallel: the same error on every rank of the group).
        RosaNonFiniteError (a ValueError and FloatingPointError): NaN/Inf in an input, or logits
            that overflow the compute dtype (checked on the pass's output).
        RosaNumericalError (FloatingPointError): the solve broke down, or every target of a
            conversation underflows the compute dtype (see MATH.md section 4).
    The result never carries an autograd graph (the op runs under ``torch.no_grad()``).
    """
    cfg = resolve(WHO, config, options)
    with torch.no_grad():
        if _vocab_parallel(weight, process_group, vocab_start, vocab_size):  # MATH.md section 7
            prob, engine, cg_impl = distributed.prepare_vocab_parallel(
                hidden, weight, targets, reward, cfg, dict(lora_a=lora_a, lora_b=lora_b, bias=bias, mask=mask),
                build=build_problem, process_group=process_group, vocab_start=vocab_start, vocab_size=vocab_size,
                cg_impl=cg_impl)
        else:
            prob = build_problem(hidden, weight, targets, reward, cfg, lora_a=lora_a, lora_b=lora_b, bias=bias,
                                 mask=mask, defer=True)
            engine = engine_for(cfg.backend, prob.weight.device)
        plan = choose(cfg, tuple(prob.lengths), prob.hidden_size, prob.global_vocab_size, engine.name,
                      prob.weight.device.type, prob.weight.dtype)
        out = plan.run(prob, cfg, engine, cg_impl)
        upd = out.update
        if not out.finite_checked:  # the dual plans read it in their one acceptance sync
            checks.finite_result(WHO, upd, cfg.damping)
        if not prob.batched:
            upd = upd[0]
        return RosaStep(update=upd, mode=cfg.mode, solver=plan.solver, backend=out.engine,
                        hidden_size=prob.hidden_size, logp=out.logp, target=out.target,
                        _iterations=out.iterations, _residual=out.residual)


def pack(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reward: RewardLike, *,
         config: Optional[RosaConfig] = None, lora_a: Optional[torch.Tensor] = None,
         lora_b: Optional[torch.Tensor] = None, bias: Optional[torch.Tensor] = None,
         mask: Optional[torch.Tensor] = None, **options: Any) -> Tuple[HeadProblem, RosaConfig]:
    """The checked, packed problem and the config of a one-process :func:`rosa_update` call, without the
    solve (arguments as there): for tools that run an engine's passes or a plan themselves."""
    cfg = resolve(WHO, config, options)
    return build_problem(hidden, weight, targets, reward, cfg, lora_a=lora_a, lora_b=lora_b, bias=bias, mask=mask), cfg


def _vocab_parallel(weight: Any, process_group: Any, vocab_start: Any, vocab_size: Any) -> bool:
    """Whether a call is vocabulary-parallel: any of the three arguments, or a DTensor ``weight``."""
    if process_group is not None or vocab_start is not None or vocab_size is not None:
        return True
    return type(weight) not in (torch.Tensor, torch.nn.Parameter) and distributed.is_dtensor(weight)


# ----------------------------------------------------------------------------- the inputs, checked and packed
def _tensor(name: str, x: Any, device: Optional[torch.device] = None, floating: bool = False) -> torch.Tensor:
    x = checks.float_tensor(WHO, name, x) if floating else checks.tensor(WHO, name, x)
    if device is not None:
        checks.same_device(WHO, name, x, device, "weight")
    return x


def _selected(mask2: Optional[torch.Tensor], B: int, T: int, device: torch.device,
              batched: bool) -> Tuple[List[int], Optional[torch.Tensor]]:
    """(tokens per conversation, the flat (B T) rows the mask selects -- None without a mask). The mask decides
    the shapes: ONE read of it (a device mask: one sync), the rows then gathered by an index sent non_blocking
    (boolean indexing on the device would read its count back once per tensor)."""
    if mask2 is None:
        return [T] * B, None
    mh = mask2.to("cpu")
    counts = mh.sum(dim=1).tolist()
    for b, n in enumerate(counts):
        if n == 0:
            checks.fail(WHO, "mask", "`mask` selects no response token" + (f" in conversation {b}" if batched else ""))
    return counts, mh.reshape(-1).nonzero().squeeze(1).to(device, non_blocking=True)


def _lora_matrix(name: str, x: Optional[torch.Tensor], batch: int, width: int, batched: bool,
                 device: torch.device, dtype: torch.dtype, values: checks.PendingChecks) -> Optional[torch.Tensor]:
    """Accept (width,), PEFT's (1, width) / (width, 1), or (B, width) for a batch."""
    if x is None:
        return None
    x = _tensor(name, x, device, floating=True)
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
        checks.fail(WHO, name, f"`{name}` must have shape {want}, got {tuple(x.shape)}")
    values.finite(WHO, name, m)
    m = m.detach().to(dtype)
    if m.shape[0] == 1 and batch > 1:
        m = m.expand(batch, width)
    return m.contiguous()


def _adapter(cfg: RosaConfig, lora_a: Any, lora_b: Any, B: int, d: int, V: int, batched: bool, device: torch.device,
             dtype: torch.dtype, values: checks.PendingChecks) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """The LoRA (a (B, d), b (B, V) in the compute dtype, or None) checked: shapes now, values queued on
    ``values``; in mode "lora" ``lora_a`` is required and a = 0 with b = 0 refused (its Jacobian is zero)."""
    a = _lora_matrix("lora_a", lora_a, B, d, batched, device, dtype, values)
    bvec = _lora_matrix("lora_b", lora_b, B, V, batched, device, dtype, values)
    if cfg.mode != "lora":
        return a, bvec
    if a is None:
        checks.fail(WHO, "lora_a", "mode='lora' needs `lora_a` (the (d,) / (1, d) lora_A weight); with a = 0 and b = 0 "
                                   "the Jacobian is zero. Initialise it as LoRA does (random), and `lora_b` to zeros")
    # a = 0 and b = 0 (per conversation): the Jacobian is zero, as with lora_a=None. A zero-Jacobian
    # check: a dual solve runs it only when it finds J exactly zero (PendingChecks)
    def first_dead() -> Tuple[torch.Tensor]:
        dead = (a == 0).all(1)
        if bvec is not None:
            dead &= (bvec == 0).all(1)
        return (torch.where(dead.any(), dead.to(torch.int64).argmax(), -1),)

    def not_dead(v: List[float]) -> None:
        if v[0] >= 0:
            which = f" (conversation {int(v[0])})" if batched else ""
            checks.fail(WHO, "lora_a", f"`lora_a` is all zeros and `lora_b` is zero{which}: the Jacobian of a rank-1 LoRA "
                                       "at a = 0, b = 0 is zero, so the step would be zero. Initialise `lora_a` as LoRA "
                                       "does (random)")

    values.zero_jacobian.append((first_dead, not_dead))
    return a, bvec


def build_problem(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor, reward: RewardLike,
                  cfg: RosaConfig, *, lora_a: Optional[torch.Tensor] = None, lora_b: Optional[torch.Tensor] = None,
                  bias: Optional[torch.Tensor] = None, mask: Optional[torch.Tensor] = None,
                  defer: bool = False) -> HeadProblem:
    """Check every tensor input of :func:`rosa_update` and pack it -> HeadProblem (module doc): the
    response tokens of all conversations are concatenated ("packed") into N rows, with ``seg`` telling
    which conversation a row belongs to, so one pass over the head weight serves the whole batch. Every
    error names the argument and is raised before anything is modified: the checks of shapes, dtypes and
    devices here; the checks that read tensor values (finite entries, the targets' range, a dead LoRA)
    with one host sync here, or, with ``defer``, queued on ``prob.pending`` for the solve plan to read in
    its own first sync (MATH.md section 4, "One host sync"), so that a dual update syncs once in all."""
    fail = checks.fail
    values = checks.PendingChecks()
    weight = _tensor("weight", weight, floating=True)
    hidden = _tensor("hidden", hidden, floating=True)
    targets = _tensor("targets", targets)
    device = weight.device
    if weight.dim() != 2 or weight.shape[0] == 0 or weight.shape[1] == 0:
        fail(WHO, "weight", f"`weight` must be (V, d) with V >= 1 and d >= 1, got shape {tuple(weight.shape)}")
    Vs, d = weight.shape
    checks.same_device(WHO, "hidden", hidden, device, "weight")
    checks.same_device(WHO, "targets", targets, device, "weight")
    if hidden.dtype != weight.dtype:
        fail(WHO, "hidden", f"`hidden` is {hidden.dtype} but `weight` is {weight.dtype}; they must match "
                            f"(the model's lm_head input and weight dtype)")
    if hidden.dim() not in (2, 3) or hidden.shape[-1] != d:
        fail(WHO, "hidden", f"`hidden` must be (T, d) or (B, T, d) with d={d} (weight is {tuple(weight.shape)}), "
                            f"got {tuple(hidden.shape)}")
    batched = hidden.dim() == 3
    if batched and hidden.shape[0] == 0:
        fail(WHO, "hidden", f"`hidden` holds no conversation (B = 0), got shape {tuple(hidden.shape)}")
    checks.index_tensor(WHO, "targets", targets)
    if targets.shape != hidden.shape[:-1]:
        fail(WHO, "targets", f"`targets` must have shape {tuple(hidden.shape[:-1])} to match `hidden`, "
                             f"got {tuple(targets.shape)}")
    if mask is not None:
        mask = _tensor("mask", mask, device)
        if mask.dtype != torch.bool:
            fail(WHO, "mask", f"`mask` must be a bool tensor, got {mask.dtype}", checks.RosaTypeError)
        if mask.shape != targets.shape:
            fail(WHO, "mask", f"`mask` must have shape {tuple(targets.shape)}, got {tuple(mask.shape)}")
    if bias is not None:
        bias = _tensor("bias", bias, device, floating=True)
        if bias.shape != (Vs,):
            fail(WHO, "bias", f"`bias` must be ({Vs},), got {tuple(bias.shape)}")
        values.finite(WHO, "bias", bias)

    compute_dtype = compute_dtype_of(weight.dtype)
    # damping and lora_scale enter tensors of the compute dtype: they must be finite there
    checks.real(WHO, "damping", cfg.damping, dtype=compute_dtype)
    checks.real(WHO, "lora_scale", cfg.lora_scale, dtype=compute_dtype)

    hidden3 = hidden if batched else hidden.unsqueeze(0)
    targets2 = (targets if batched else targets.unsqueeze(0)).long()
    mask2 = None if mask is None else (mask if batched else mask.unsqueeze(0))
    B, T = targets2.shape
    if T == 0:
        fail(WHO, "targets", "the response is empty (T = 0); there is nothing to update on")
    counts, pick = _selected(mask2, B, T, device, batched)
    sel_targets = targets2.reshape(-1) if pick is None else targets2.reshape(-1)[pick]

    def target_range(v: List[float]) -> None:
        lo, hi = v
        if lo < 0 or hi >= Vs:
            fail(WHO, "targets", f"`targets` holds token id {int(lo if lo < 0 else hi)}, outside the vocabulary "
                                 f"[0, {Vs})")

    values.add(torch.aminmax(sel_targets), target_range)
    if defer:  # read in the solve's first sync: clamped meanwhile, used only if the check passes
        sel_targets = sel_targets.clamp(0, Vs - 1)
    sel_hidden = hidden3.reshape(-1, d) if pick is None else hidden3.reshape(-1, d)[pick]
    values.finite(WHO, "hidden", sel_hidden)

    r = checks.rewards(WHO, reward, B)
    for v in r.tolist():  # a reward beyond the compute dtype's range would become +-inf there
        checks.real(WHO, "reward", v, dtype=compute_dtype)
    r = r.to(dtype=compute_dtype).to(device, non_blocking=True)  # staged at once: no wait for the stream
    a, bvec = _adapter(cfg, lora_a, lora_b, B, d, Vs, batched, device, compute_dtype, values)
    if not defer:
        values.run()
    if a is not None and bvec is None:
        bvec = torch.zeros(B, Vs, dtype=compute_dtype, device=device)
    if bvec is not None and a is None:
        a = torch.zeros(B, d, dtype=compute_dtype, device=device)

    offsets = [0] + torch.tensor([int(n) for n in counts]).cumsum(0).tolist()
    # conversation ids built on the host, sent without a stream sync (a device repeat_interleave reads its size back)
    seg = torch.zeros(offsets[-1], dtype=torch.int64, device=device) if B == 1 else torch.repeat_interleave(
        torch.arange(B), torch.tensor([int(n) for n in counts])).to(device, non_blocking=True)
    return HeadProblem(hidden=sel_hidden, weight=weight, bias=bias, targets=sel_targets.contiguous(), seg=seg,
                       offsets=offsets, lengths=[int(n) for n in counts], reward=r, lora_a=a, lora_b=bvec,
                       lora_scale=cfg.lora_scale, batched=batched, compute_dtype=compute_dtype,
                       num_tokens=offsets[-1], num_conversations=B, hidden_size=int(d), vocab_size=int(Vs),
                       global_vocab_size=int(Vs), pending=values if defer else None)
