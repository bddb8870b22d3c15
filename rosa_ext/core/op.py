"""The public functional op: :func:`rosa_update` -> :class:`RosaStep`."""
from __future__ import annotations

from dataclasses import dataclass, field
from typing import Any, Optional, Union

import torch

from ..backends import get_backend
from ..common import defaults
from ..common import validation as checks
from ..common.types import RewardLike
from ..plans import CGImpl, choose_plan, run
from .distributed import prepare_vocab_parallel, wants_vocab_parallel
from .problem import build_problem


@dataclass
class RosaStep:
    """Result of one ROSA update.

    Attributes:
        update: the flat delta-theta, compute dtype (fp32, or fp64 for fp64 models).
            (P,) for one conversation, (B, P) for a batch; P = d + V laid out
            ``[delta_a, delta_b]`` (lora) or P = d (hidden).
        mode: "lora" or "hidden".
        solver: the solver that ran ("cg" or "dual").
        backend: the engine that ran the vocabulary work ("torch" or "triton"): the dual plans and
            hidden-mode CG run torch tiles on every backend today, so a call with ``backend="triton"``
            reports "triton" only when the Triton kernels ran (matrix-free LoRA CG).
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


def rosa_update(hidden: torch.Tensor, weight: torch.Tensor, targets: torch.Tensor,
                reward: RewardLike, *, mode: str, lora_a: Optional[torch.Tensor] = None,
                lora_b: Optional[torch.Tensor] = None, lora_scale: float = defaults.LORA_SCALE,
                bias: Optional[torch.Tensor] = None, beta: float = defaults.BETA,
                damping: float = defaults.DAMPING, max_iter: int = defaults.MAX_ITER,
                tol: float = defaults.TOL, solver: str = defaults.SOLVER, backend: str = defaults.BACKEND,
                mask: Optional[torch.Tensor] = None, cg_impl: Optional[CGImpl] = None,
                process_group: Optional[Any] = None, vocab_start: Optional[int] = None,
                vocab_size: Optional[int] = None, damping_mode: str = defaults.DAMPING_MODE,
                keep_budget_bytes: int = defaults.KEEP_BUDGET_BYTES,
                gram_budget_bytes: int = defaults.GRAM_BUDGET_BYTES) -> RosaStep:
    """One ROSA step: solve (J^T J + lambda I) d = J^T g (MATH.md sections 1 and 6).

    Args:
        hidden: (T, d) inputs of lm_head at the positions that predict the response
            tokens, already including any current hidden shift; or (B, T, d) for B
            conversations (pad ragged ones and pass ``mask``). fp32/bf16/fp16/fp64.
        weight: (V, d) lm_head weight, same dtype and device as ``hidden``. Not modified.
        targets: (T,) or (B, T) int64 observed response tokens, in [0, V).
        reward: the feedback r (a float), or (B,) rewards for a batch. Must be finite.
        mode: "lora" (rank-1 LoRA on lm_head, moves [a, b]) or "hidden" (shift vector).
        lora_a: (d,) / PEFT's (1, d) lora_A weight, or (B, d); required for "lora" and
            optional in "hidden" mode (then the LoRA term is part of the logits).
        lora_b: (V,) / PEFT's (V, 1) lora_B weight, or (B, V); zeros if omitted.
        lora_scale: s = lora_alpha / r (paper: alpha 8, r 1).
        bias: (V,) lm_head bias or None.
        beta: KL coefficient (> 0); r / beta sets the target's re-weighting.
        damping: > 0, sets the ridge lambda of the damped normal equations (see ``damping_mode``).
        damping_mode: "absolute" (lambda = ``damping``) or "relative" (lambda = ``damping`` times
            the mean of diag(J J^T) = mean_t ||J_t||^2, one value per conversation:
            Levenberg-Marquardt scaling, invariant to the scale of J; MATH.md section 6).
        max_iter, tol: CG iteration cap and relative-residual tolerance.
        solver: "auto" (the cost model of :mod:`rosa_ext.plans.choose`: measured throughput per
            backend and dtype, memory budgets first, ties to the exact dual), "cg" or "dual" (exact:
            one pass over W, then the T x T -- or in hidden mode with T > d the d x d -- system).
        keep_budget_bytes: the LoRA dual keeps its N x V probability tiles for the VJP when the
            longest conversation's T x V numbers fit this (default 1 GiB); otherwise it streams
            them in a second pass. A batch that keeps them runs in groups of conversations.
        gram_budget_bytes: ``solver="auto"`` takes the dual only while its T x T matrices (every
            conversation's Gram matrix and one factor; hidden mode min(T, d)^2) fit this
            (default 512 MB), CG otherwise.
        backend: "auto" (Triton on CUDA, torch elsewhere), "torch" or "triton".
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
            that overflow the compute dtype (checked on the stats pass's output).
        RosaNumericalError (FloatingPointError): the solve broke down (see MATH.md section 4).
    The result never carries an autograd graph (the op runs under ``torch.no_grad()``).
    """
    with torch.no_grad():
        return _rosa_update(hidden, weight, targets, reward, mode=mode, lora_a=lora_a, lora_b=lora_b,
                            lora_scale=lora_scale, bias=bias, beta=beta, damping=damping, max_iter=max_iter,
                            tol=tol, solver=solver, backend=backend, mask=mask, cg_impl=cg_impl,
                            process_group=process_group, vocab_start=vocab_start, vocab_size=vocab_size,
                            damping_mode=damping_mode, keep_budget_bytes=keep_budget_bytes,
                            gram_budget_bytes=gram_budget_bytes)


def _rosa_update(hidden, weight, targets, reward, *, mode, lora_a, lora_b, lora_scale, bias, beta, damping,
                 max_iter, tol, solver, backend, mask, cg_impl, process_group, vocab_start, vocab_size,
                 damping_mode, keep_budget_bytes, gram_budget_bytes) -> RosaStep:
    kw = dict(mode=mode, lora_a=lora_a, lora_b=lora_b, lora_scale=lora_scale, bias=bias, beta=beta,
              damping=damping, max_iter=max_iter, tol=tol, solver=solver, backend=backend, mask=mask,
              damping_mode=damping_mode, keep_budget_bytes=keep_budget_bytes, gram_budget_bytes=gram_budget_bytes)
    if wants_vocab_parallel(weight, process_group, vocab_start, vocab_size):  # MATH.md section 7
        prob, be, cg_impl = prepare_vocab_parallel(hidden, weight, targets, reward, kw, process_group=process_group,
                                                   vocab_start=vocab_start, vocab_size=vocab_size, cg_impl=cg_impl)
    else:
        prob = build_problem(hidden, weight, targets, reward, **kw)
        be = get_backend(prob.backend, prob.device)
    plan = choose_plan(prob, be.name)
    out = run(prob, be, plan, cg_impl)
    upd = out.update
    checks.finite_result("rosa_update", upd, prob.damping)
    if not prob.batched:
        upd = upd[0]
    return RosaStep(update=upd, mode=prob.mode, solver=plan.solver, backend=out.engine,
                    hidden_size=prob.hidden_size, logp=out.logp, target=out.target,
                    _iterations=out.iterations, _residual=out.residual)
