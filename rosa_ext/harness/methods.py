"""The experiment's method catalogue: what each method and control of the multi-turn experiment is.

:class:`MethodSpec` (one method's settings), :data:`METHODS` (every named method: the controls
``baseline``, ``resample``, ``ban``, ``guess`` of :mod:`rosa_ext.harness.controls`; ``rosa-lora`` /
``rosa-hidden`` (ROSA on the rank-1 LoRA / the hidden shift, rule-based reward +1/-1) and
``rosa-lora-dense`` (dense reward); ``pg`` (the single-sample policy gradient with the hand-set step,
lr 10, of the first runs) and its fair forms ``pg-lora-fair`` / ``pg-hidden-fair`` (KL estimate clamped,
the step scaled to ROSA's target change in log p or clipped to ROSA's step norm on the same answer;
:mod:`rosa_ext.harness.pg_baseline`); the lever variants of :data:`LEVER_METHODS`), the default run's
:data:`DEFAULT_METHODS`, the reward functions :data:`REWARDS` and :func:`seed_dependent`.
"""
from __future__ import annotations

from dataclasses import dataclass, replace
from typing import Any, Callable, Dict, Optional

from ..common import defaults
from .pg_baseline import DEFAULT_LR
from .rewards import centered, dense_reward, rule_reward

#: Method kinds: "none" (no update), the controls "resample", "ban", "guess", and the learners "rosa", "pg".
KINDS = ("none", "resample", "ban", "guess", "rosa", "pg")
CONTROL_KINDS = ("none", "resample", "ban", "guess")
#: PG step rules: "lr" (lr x advantage x gradient), "clip" (that, its norm clipped to the norm of ROSA's
#: step on the same answer and state), "match" (the PG direction, scaled so that its linearised change of
#: the targeted tokens' mean log p equals ROSA's target change log p* - log p in size).
PG_STEPS = ("lr", "clip", "match")


@dataclass(frozen=True)
class MethodSpec:
    """One method of the experiment.

    kind: :data:`KINDS`. mode: "lora" | "hidden". reward: "rule" | "dense".
    beta, damping, damping_mode: ROSA's (beta also PG's KL weight). lr: PG step size. update_on:
    "response" | "answer_span" (the tokens the update targets). max_norm: clip every step's norm (None: no
    clip). shift_cap: hidden mode, cap the shift's norm ||delta|| at ``shift_cap`` x the mean norm of the
    answer's lm_head inputs (None: no cap). pg_step: :data:`PG_STEPS`. kl_clip: PG's KL estimate clamped to
    [-kl_clip, kl_clip] (None: no clamp). temperature: the ``resample`` control's sampling temperature.
    """

    name: str
    kind: str
    mode: str = "lora"
    reward: str = "rule"
    beta: float = defaults.BETA
    damping: float = defaults.DAMPING
    lr: float = DEFAULT_LR
    update_on: str = "response"
    max_norm: Optional[float] = None
    damping_mode: str = defaults.DAMPING_MODE
    shift_cap: Optional[float] = None
    pg_step: str = "lr"
    kl_clip: Optional[float] = None
    temperature: float = 0.7

    def __post_init__(self) -> None:
        if self.kind not in KINDS:
            raise ValueError(f"MethodSpec {self.name!r}: kind must be one of {KINDS}, got {self.kind!r}")
        if self.mode not in ("lora", "hidden"):
            raise ValueError(f"MethodSpec {self.name!r}: mode must be 'lora' or 'hidden', got {self.mode!r}")
        if self.update_on not in ("response", "answer_span"):
            raise ValueError(f"MethodSpec {self.name!r}: update_on must be 'response' or 'answer_span'")
        if self.pg_step not in PG_STEPS:
            raise ValueError(f"MethodSpec {self.name!r}: pg_step must be one of {PG_STEPS}, got {self.pg_step!r}")
        if self.shift_cap is not None and not self.shift_cap > 0:
            raise ValueError(f"MethodSpec {self.name!r}: shift_cap must be None or > 0, got {self.shift_cap}")

    @property
    def learns(self) -> bool:
        return self.kind in ("rosa", "pg")

    @property
    def control(self) -> bool:
        return self.kind in CONTROL_KINDS


#: The methods' settings, chosen on the development split (benchmarks/results/experiment/README.md
#: says how): ROSA and PG update on the boxed answer's own tokens, ROSA with the op's defaults.
_ROSA = dict(beta=defaults.BETA, update_on="answer_span")
_FAIR_PG = dict(update_on="answer_span", pg_step="match", kl_clip=1.0)
METHODS: Dict[str, MethodSpec] = {
    "baseline": MethodSpec("baseline", "none"),
    "resample": MethodSpec("resample", "resample"),
    "ban": MethodSpec("ban", "ban"),
    "guess": MethodSpec("guess", "guess"),
    "rosa-lora": MethodSpec("rosa-lora", "rosa", "lora", **_ROSA),
    "rosa-hidden": MethodSpec("rosa-hidden", "rosa", "hidden", **_ROSA),
    "pg": MethodSpec("pg", "pg", "lora", lr=DEFAULT_LR, update_on="answer_span"),
    "pg-lora-fair": MethodSpec("pg-lora-fair", "pg", "lora", **_FAIR_PG),
    "pg-hidden-fair": MethodSpec("pg-hidden-fair", "pg", "hidden", **_FAIR_PG),
    "rosa-lora-dense": MethodSpec("rosa-lora-dense", "rosa", "lora", reward="dense", **_ROSA),
}


def _lever(base: str, name: str, **kw: Any) -> MethodSpec:
    return replace(METHODS[base], name=name, **kw)


#: The levers of the development study (benchmarks/experiment/levers.py runs them under the same settings
#: with the names spelled with spaces, "rosa-hidden cap0.02"): one setting at a time from the defaults.
LEVER_METHODS: Dict[str, MethodSpec] = {s.name: s for s in (
    _lever("rosa-hidden", "rosa-hidden-cap0.02", shift_cap=0.02),
    _lever("rosa-hidden", "rosa-hidden-cap0.05", shift_cap=0.05),
    _lever("rosa-hidden", "rosa-hidden-b3", beta=3.0),
    _lever("rosa-hidden", "rosa-hidden-rel1", damping=1.0),
    _lever("rosa-hidden", "rosa-hidden-rel3", damping=3.0),
    _lever("rosa-hidden", "rosa-hidden-response", update_on="response"),
    _lever("rosa-lora", "rosa-lora-b0.5", beta=0.5),
    _lever("rosa-lora", "rosa-lora-rel0.1", damping=0.1),
    _lever("pg-lora-fair", "pg-lora-match"),
    _lever("pg-lora-fair", "pg-lora-clip-lr1", pg_step="clip", lr=1.0),
    _lever("pg-lora-fair", "pg-lora-clip-lr10", pg_step="clip", lr=10.0),
    _lever("pg-hidden-fair", "pg-hidden-match"),
    _lever("pg-hidden-fair", "pg-hidden-clip-lr1", pg_step="clip", lr=1.0),
    _lever("pg-hidden-fair", "pg-hidden-clip-lr10", pg_step="clip", lr=10.0),
)}
METHODS.update(LEVER_METHODS)

#: The methods of a default run (the legacy ``pg`` and ``rosa-lora-dense`` on request).
DEFAULT_METHODS = ("baseline", "resample", "ban", "guess", "rosa-lora", "rosa-hidden", "pg-lora-fair",
                   "pg-hidden-fair")

REWARDS: Dict[str, Callable[[Any, str], float]] = {"rule": rule_reward, "dense": centered(dense_reward)}


def seed_dependent(spec: MethodSpec) -> bool:
    """Whether a method's greedy run depends on the seed: through the LoRA ``a`` draw or the resample
    control's sampling (the baseline, ban, guess and the zero-initialised hidden shift are deterministic
    under greedy decoding)."""
    return spec.kind == "resample" or (spec.learns and spec.mode == "lora")
