"""The options of a ROSA update, in one object: :class:`RosaConfig` (in the way PEFT's ``LoraConfig``
holds a LoRA's), validated in one place.

:func:`rosa_ext.rosa_update` reads every option from a config (``config=``, then any keyword
overrides); ``rosa_ext.attach``, :class:`~rosa_ext.integrations.users.RosaUsers` and the experiment
CLI take one too. The defaults are those of :mod:`rosa_ext.common.defaults` (README, "Defaults").

    cfg = RosaConfig(mode="hidden", damping=0.3)
    step = rosa_update(hidden, weight, targets, -1.0, config=cfg)
    step = rosa_update(hidden, weight, targets, -1.0, config=cfg, solver="cg")   # one option overridden
    step = rosa_update(hidden, weight, targets, -1.0, mode="hidden")              # no config: the defaults

Every option is checked when the config is made (an error names the option); a config is frozen
and hashable, so a plan chosen for it can be cached.
"""
from __future__ import annotations

from dataclasses import dataclass, fields
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from . import defaults
from . import validation as checks

MODES = ("lora", "hidden")
SOLVERS = ("auto", "cg", "dual")
BACKENDS = ("auto", "torch", "triton")
#: "absolute": the ridge is ``damping``; "relative": ``damping * mean_t ||J_t||^2`` of each
#: conversation (Levenberg-Marquardt scaling, MATH.md section 6).
DAMPING_MODES = ("absolute", "relative")


def compute_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """The dtype ROSA computes in for a model (head weight) of ``dtype``: float64 for float64 models,
    float32 for every other (bf16/fp16 are widened). The one place this rule is written."""
    return torch.float64 if dtype == torch.float64 else torch.float32


@dataclass(frozen=True)
class RosaConfig:
    """The options of one ROSA update (MATH.md sections 1, 4 and 6; README, "Defaults").

    Attributes:
        mode: "lora" (rank-1 LoRA on lm_head, moves [a, b]) or "hidden" (one shift vector added to
            the lm_head input). Required.
        beta: KL coefficient (> 0); r / beta sets the target's re-weighting.
        damping: > 0, sets the ridge lambda of the damped normal equations (see ``damping_mode``).
        damping_mode: "absolute" (lambda = ``damping``) or "relative" (lambda = ``damping`` times the
            mean of diag(J J^T) of each conversation: Levenberg-Marquardt scaling, MATH.md section 6).
        solver: "auto" (the cost model of :mod:`rosa_ext.plans.registry`), "cg" or "dual" (exact).
        backend: the engine of the vocabulary work: "auto" (Triton on CUDA, torch elsewhere), "torch"
            or "triton".
        max_iter, tol: CG's iteration cap (int >= 0) and relative-residual tolerance (>= 0).
        lora_scale: s = lora_alpha / r of the rank-1 LoRA (the paper: alpha 8, r 1); finite, and
            nonzero in mode "lora".
        keep_budget_bytes: the LoRA dual keeps its N x V probability tiles for the VJP when the
            longest conversation's T x V numbers fit this (default 1 GiB); otherwise it streams them.
            The Triton engine's tile budget (on CUDA at most half the free memory): over it, its tiles
            run in token blocks (MATH.md section 4, "Token blocks").
        gram_budget_bytes: ``solver="auto"`` takes the dual only while its T x T matrices fit this
            (default 512 MB), CG otherwise.
    """

    mode: str
    beta: float = defaults.BETA
    damping: float = defaults.DAMPING
    damping_mode: str = defaults.DAMPING_MODE
    solver: str = defaults.SOLVER
    backend: str = defaults.BACKEND
    max_iter: int = defaults.MAX_ITER
    tol: float = defaults.TOL
    lora_scale: float = defaults.LORA_SCALE
    keep_budget_bytes: int = defaults.KEEP_BUDGET_BYTES
    gram_budget_bytes: int = defaults.GRAM_BUDGET_BYTES

    def __post_init__(self) -> None:
        for name, value in _checked("RosaConfig", {f.name: getattr(self, f.name) for f in fields(self)}).items():
            object.__setattr__(self, name, value)

    def replace(self, **overrides: Any) -> "RosaConfig":
        """A copy with ``overrides`` (option names of this class; anything else is refused)."""
        return resolve("RosaConfig", self, overrides)


#: The option names of :class:`RosaConfig`, in order.
OPTIONS: Tuple[str, ...] = tuple(f.name for f in fields(RosaConfig))


def _checked(who: str, values: Mapping[str, Any]) -> Dict[str, Any]:
    """``values`` (every option) checked and normalised; an error names the option and ``who``."""
    mode = checks.choice(who, "mode", values["mode"], MODES)
    lora_scale = checks.real(who, "lora_scale", values["lora_scale"])
    if mode == "lora" and lora_scale == 0:
        checks.fail(who, "lora_scale", "`lora_scale` must be nonzero in mode='lora' (with s = 0 the Jacobian is zero)")
    return dict(
        mode=mode,
        beta=checks.real(who, "beta", values["beta"], minimum=0.0, strict=True),
        damping=checks.real(who, "damping", values["damping"], minimum=0.0, strict=True),
        damping_mode=checks.choice(who, "damping_mode", values["damping_mode"], DAMPING_MODES),
        solver=checks.choice(who, "solver", values["solver"], SOLVERS),
        backend=checks.choice(who, "backend", values["backend"], BACKENDS),
        max_iter=checks.integer(who, "max_iter", values["max_iter"], minimum=0),
        tol=checks.real(who, "tol", values["tol"], minimum=0.0),
        lora_scale=lora_scale,
        keep_budget_bytes=checks.integer(who, "keep_budget_bytes", values["keep_budget_bytes"], minimum=0, maximum=None),
        gram_budget_bytes=checks.integer(who, "gram_budget_bytes", values["gram_budget_bytes"], minimum=0, maximum=None),
    )


def resolve(who: str, config: Optional[RosaConfig], overrides: Mapping[str, Any]) -> RosaConfig:
    """The config of one call: ``config`` (or, when None, the defaults) with ``overrides`` applied.

    ``overrides`` are option names of :class:`RosaConfig` (an unknown name is a :class:`RosaTypeError`
    naming it, as Python names an unexpected keyword); without ``config`` they must include ``mode``.
    Errors name the option and ``who`` (the entry point), before anything is computed.
    """
    unknown = [k for k in overrides if k not in OPTIONS]
    if unknown:
        checks.fail(who, unknown[0], f"got an unexpected keyword argument {unknown[0]!r}; the options are "
                                     f"{', '.join(OPTIONS)} (RosaConfig)", checks.RosaTypeError)
    if config is None:
        if "mode" not in overrides:
            checks.fail(who, "mode", "`mode` is required: \"lora\" or \"hidden\" (as a keyword, or in `config`)")
        values = {f.name: f.default for f in fields(RosaConfig) if f.name != "mode"}
    elif isinstance(config, RosaConfig):
        if not overrides:
            return config
        values = {name: getattr(config, name) for name in OPTIONS}
    else:
        checks.fail(who, "config", f"`config` must be a rosa_ext.RosaConfig (or None), got {checks._show(config)}",
                    checks.RosaTypeError)
    values.update(overrides)
    return RosaConfig(**_checked(who, values))  # checked here first so that an error names ``who``
