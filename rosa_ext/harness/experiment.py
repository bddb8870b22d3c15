"""The multi-turn experiment (paper Section 5.2 / Appendix D.3) on generated problems.

``python -m rosa_ext.harness.experiment --problems 200 --turns 5 --seeds 0 --decoding greedy --out DIR`` runs
every method and control on the held-out problems (:mod:`rosa_ext.harness.problems`): each problem gets up
to K answers; after a wrong one the method updates (or not) and the feedback prompt is appended, as
:func:`rosa_ext.harness.conversation.interact` does for one conversation. Methods (:data:`METHODS`):

- controls, no learning (:mod:`rosa_ext.harness.controls`): ``baseline`` (plain multi-turn prompting),
  ``resample`` (later answers sampled at temperature 0.7; under sampled decoding it is the baseline),
  ``ban`` (decoding with the rejected boxed answers forbidden), ``guess`` (the first answer's number
  walked x+1, x-1, x+2, x-2);
- ``rosa-lora`` / ``rosa-hidden``: ROSA on the rank-1 LoRA / the hidden shift, rule-based reward (+1/-1);
  ``rosa-lora-dense`` with the dense reward; lever variants (e.g. a norm cap on the hidden shift,
  :class:`MethodSpec`);
- ``pg``: the single-sample policy gradient with the hand-set step (lr 10) of the first runs;
  ``pg-lora-fair`` / ``pg-hidden-fair``: its fair form (KL estimate clamped, the step scaled to ROSA's
  target change in log p or clipped to ROSA's step norm on the same answer; :mod:`rosa_ext.harness.pg_baseline`).

Conversations run *batched* and *chunk by chunk*: a chunk of ``--batch-size`` problems gets its turn-1
answers once (shared by every method, so all methods start from identical first answers), then each
method carries the chunk's failed conversations through turns 2..K. Each conversation is one user of a
:class:`~rosa_ext.integrations.users.RosaUsers` (per-row state on ``lm_head``, the answers' lm_head inputs
recorded during generation, one batched update of the failed conversations; the harness calls the
library, it does not re-implement the update). ROSA and PG change only ``lm_head``, so the key/value
cache of a conversation stays valid across turns: every turn continues from the cache of the one before
(the model's own answer tokens, then the feedback message), instead of re-encoding the whole chat.

Outputs (``--out``), written as the run goes so that a rerun of the same command continues where it
stopped: ``config.json`` (what the run is; a rerun with other settings is refused), ``runs.jsonl`` (one
line per method, seed and problem, appended chunk by chunk: every answer, reward and update),
``timing.jsonl`` (wall and CPU seconds per chunk and method), ``results.json`` / ``results.md`` (the
tables: accuracy with CIs against the controls, the degeneration table of
:mod:`rosa_ext.harness.degeneration`, accuracy counting only sensible corrections, per-turn curves;
marked PARTIAL until every problem is done) and ``accuracy_vs_turn.png``.
"""
from __future__ import annotations

import argparse
import copy
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch

from ..common import defaults
from ..core import rosa_update
from ..integrations.model_lookup import find_body, find_lm_head, head_bias, head_weight
from ..integrations.models import MODEL_NAMES
from ..integrations.head_hooks import eos_ids
from ..integrations.users import RosaUsers
from .attainment import target_attainment
from .controls import BanRejectedNumbers, guess_text
from .conversation import DEFAULT_FEEDBACK, TurnRecord, answer_token_span, start_messages
from .degeneration import degeneration_table, sensible_solved_at
from .metrics import accuracy, accuracy_curve, bootstrap_mean_ci, correction_uplift, paired_bootstrap_mean_diff, seed_spread
from .pg_baseline import DEFAULT_LR, pg_step
from .problems import PROBLEM_SETS, Problem
from .rewards import boxed_answer, centered, dense_reward, is_correct, normalize_answer, rule_reward

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


# --------------------------------------------------------------------------- adapters
def user_key(i: int) -> str:
    """The :class:`RosaUsers` user id of conversation ``i`` (user ids are strings)."""
    return f"conv{int(i)}"


def experiment_users(model: torch.nn.Module, spec: "MethodSpec", *, seed: int = 0) -> RosaUsers:
    """The conversations of one method as users of one :class:`RosaUsers` (fp32 states; a conversation's
    ``a`` drawn like PEFT's lora_A init from ``seed``, ``b`` = 0, ``delta`` = 0)."""
    return RosaUsers(model, spec.mode, beta=spec.beta, damping=spec.damping, damping_mode=spec.damping_mode,
                     lora_scale=defaults.LORA_SCALE, seed=seed)


# --------------------------------------------------------------------------- generation
def chat_tensor(tokenizer, messages: List[Dict[str, str]]) -> torch.Tensor:
    """(T,) ids of a chat with the generation prompt."""
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    return enc["input_ids"][0]


def _pad_id(tokenizer) -> int:
    return tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id


def _decode_kwargs(max_new_tokens: int, do_sample: bool, temperature: float, pad: int) -> Dict[str, Any]:
    kw: Dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad)
    if do_sample:
        kw.update(temperature=temperature, top_p=1.0, top_k=0)
    else:
        kw.update(temperature=None, top_p=None, top_k=None)
    return kw


def _cut(row: torch.Tensor, eos: Sequence[int]) -> torch.Tensor:
    """``row`` up to and including its first end-of-sequence token."""
    if eos:
        hit = torch.nonzero(torch.isin(row, torch.tensor(list(eos), dtype=row.dtype))).flatten()
        if hit.numel():
            return row[: int(hit[0]) + 1]
    return row


def generate_batch(model, tokenizer, prompts: Sequence[torch.Tensor], *, max_new_tokens: int, do_sample: bool,
                   temperature: float, seed: int, capture: bool = False, users: Optional[RosaUsers] = None,
                   user_ids: Optional[Sequence[int]] = None):
    """Left-padded batched ``generate``; returns each response's ids (cut after the first EOS, kept).

    With ``capture=True`` it returns ``(responses, hiddens)``: ``hiddens[i]`` (n_i, d) are the base
    lm_head inputs that predicted response i's tokens, recorded during generation (so the update
    needs no second forward of the body). With ``users`` the rows are ``user_ids``' conversations of
    that :class:`RosaUsers`, each generated with its own state and recorded there too.
    """
    ids, att = _left_pad(prompts, _pad_id(tokenizer))
    gen = _Gen(ids, att, None)
    out = _generate(model, tokenizer, gen, max_new_tokens=max_new_tokens, do_sample=do_sample,
                    temperature=temperature, seed=seed, capture=capture or users is not None, users=users,
                    user_ids=user_ids)
    return (out.resps, out.hids) if capture else out.resps


def _left_pad(seqs: Sequence[torch.Tensor], pad: int) -> Tuple[torch.Tensor, torch.Tensor]:
    L = max(p.numel() for p in seqs)
    ids = torch.full((len(seqs), L), pad, dtype=torch.long)
    att = torch.zeros((len(seqs), L), dtype=torch.long)
    for i, p in enumerate(seqs):
        ids[i, L - p.numel():] = p
        att[i, L - p.numel():] = 1
    return ids, att


@dataclass
class _Gen:
    """Rows of conversations in flight: ``ids`` (B, L) everything so far (left-padded; holes where an
    answer ended early), ``att`` (B, L) its mask, ``cache`` the key/value cache of ``ids[:, :-1]`` or a
    shorter prefix (None: nothing cached)."""

    ids: torch.Tensor
    att: torch.Tensor
    cache: Any


@dataclass
class _Out:
    seqs: torch.Tensor  # (B, L + n)
    cache: Any
    resps: List[torch.Tensor]  # cut after the first EOS
    hids: Optional[List[torch.Tensor]]


def _generate(model, tokenizer, gen: _Gen, *, max_new_tokens: int, do_sample: bool, temperature: float, seed: int,
              capture: bool = False, users: Optional[RosaUsers] = None, user_ids: Optional[Sequence[int]] = None,
              logits_processor: Optional[list] = None) -> _Out:
    """One ``generate`` over the rows of ``gen`` (continuing from its cache); ``users``: the rows are these
    users' conversations (each row with its own state, recorded in ``users``)."""
    dev = next(model.parameters()).device
    kw = _decode_kwargs(max_new_tokens, do_sample, temperature, _pad_id(tokenizer))
    kw.update(attention_mask=gen.att.to(dev), return_dict_in_generate=True, use_cache=True)
    if gen.cache is not None:
        kw[_cache_kw()] = gen.cache
    if logits_processor:
        from transformers import LogitsProcessorList
        kw["logits_processor"] = LogitsProcessorList(logits_processor)
    if do_sample:
        torch.manual_seed(seed)
    L = gen.ids.shape[1]
    eos = eos_ids(model, {})
    if users is not None:
        out = users.generate(gen.ids.to(dev), [user_key(u) for u in user_ids], **kw)
        seqs = out.sequences.cpu()
        answers = [users.answer(user_key(u)) for u in user_ids]
        resps = [a[1].cpu() for a in answers]
        hids = [a[0].float() for a in answers]
        return _Out(seqs, _cache_of(out), resps, hids)
    steps: List[torch.Tensor] = []
    handle = None
    if capture:
        def grab(module, args):
            steps.append(args[0][:, -1, :].detach().float().clone())
        handle = find_lm_head(model, "experiment").register_forward_pre_hook(grab, prepend=True)
    try:
        with torch.no_grad():
            out = model.generate(gen.ids.to(dev), **kw)
    finally:
        if handle is not None:
            handle.remove()
    seqs = out.sequences.cpu()
    resps = [_cut(row, eos) for row in seqs[:, L:]]
    hids = None
    if capture:
        allh = torch.stack(steps, 1)  # (B, steps, d)
        hids = [allh[i, : r.numel()] for i, r in enumerate(resps)]
    return _Out(seqs, _cache_of(out), resps, hids)


def _cache_of(out) -> Any:
    """The key/value cache a ``generate(..., return_dict_in_generate=True)`` returned (None if none)."""
    if not hasattr(out, "get"):
        return None
    cache = out.get("cache", None)
    return out.get("past_key_values", None) if cache is None else cache


def _cache_kw() -> str:
    """The name ``generate`` takes a cache under: ``cache`` (transformers >= 5.x), else ``past_key_values``."""
    import inspect

    from transformers.generation.utils import GenerationMixin

    return "cache" if "cache" in inspect.signature(GenerationMixin.prepare_inputs_for_generation).parameters \
        else "past_key_values"


_TAILS: Dict[Tuple[int, str], Tuple[torch.Tensor, torch.Tensor, int]] = {}


def feedback_tail(tokenizer, feedback: str) -> Tuple[torch.Tensor, torch.Tensor, int]:
    """The tokens that follow an answer in the chat up to the next answer: ``(after_end, full, end_id)``.

    ``full`` is the chat template's text after an assistant message (its end-of-turn marker, the user's
    ``feedback`` and the generation prompt) as ids; ``after_end`` the same without the end-of-turn token
    ``end_id`` (the tokenizer's EOS), for an answer that already ended with it.
    """
    key = (id(tokenizer), feedback)
    if key not in _TAILS:
        ph = "\u2063XQZ\u2063"
        msgs = [{"role": "user", "content": "Q"}, {"role": "assistant", "content": ph},
                {"role": "user", "content": feedback}]
        text = tokenizer.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
        tail = text[text.index(ph) + len(ph):]
        end = tokenizer.eos_token_id
        end_text = tokenizer.decode([end])
        enc = lambda s: torch.tensor(tokenizer(s, add_special_tokens=False)["input_ids"], dtype=torch.long)  # noqa: E731
        full = enc(tail)
        after = enc(tail[len(end_text):]) if tail.startswith(end_text) else full
        _TAILS[key] = (after, full, int(end))
    return _TAILS[key]


def _continue(gen: _Gen, out: _Out, keep: Sequence[int], tokenizer, feedback: str) -> _Gen:
    """The rows ``keep`` of ``gen`` after ``out`` (their answers) and the feedback message, ready for the
    next ``generate``; the cache is reduced to those rows (in place)."""
    after, full, end = feedback_tail(tokenizer, feedback)
    B, L = gen.ids.shape
    n = out.seqs.shape[1] - L
    gmask = torch.zeros((B, n), dtype=gen.att.dtype)
    for j, r in enumerate(out.resps):
        gmask[j, : r.numel()] = 1
    tails = [after if out.resps[j].numel() and int(out.resps[j][-1]) == end else full for j in keep]
    Lt = max(t.numel() for t in tails)
    block = torch.full((len(keep), Lt), _pad_id(tokenizer), dtype=torch.long)
    bmask = torch.zeros((len(keep), Lt), dtype=gen.att.dtype)
    for j, t in enumerate(tails):
        block[j, Lt - t.numel():] = t
        bmask[j, Lt - t.numel():] = 1
    sel = torch.tensor(list(keep), dtype=torch.long)
    cache = out.cache
    if cache is not None and len(keep) != B:
        cache.batch_select_indices(sel.to(_cache_device(cache)))
    ids = torch.cat([out.seqs[sel], block], 1)
    att = torch.cat([torch.cat([gen.att, gmask], 1)[sel], bmask], 1)
    return _Gen(ids, att, cache)


def _cache_device(cache) -> torch.device:
    for lay in getattr(cache, "layers", None) or []:
        k = getattr(lay, "keys", None)
        if isinstance(k, torch.Tensor):
            return k.device
    return torch.device("cpu")


# --------------------------------------------------------------------------- records
@dataclass
class Conversation:
    problem: Problem
    messages: List[Dict[str, str]]
    turns: List[TurnRecord] = field(default_factory=list)
    solved_at: Optional[int] = None
    last_prompt: Optional[torch.Tensor] = None
    last_resp: Optional[torch.Tensor] = None
    last_hidden: Optional[torch.Tensor] = None  # (n, d) base lm_head inputs that predicted last_resp
    rejected: Set[str] = field(default_factory=set)  # normalised boxed answers the user rejected


def _answer_masks(tokenizer, answers: Dict[int, tuple], spec: MethodSpec, dev) -> Dict[int, torch.Tensor]:
    masks = {}
    for i, (_, y) in answers.items():
        span = answer_token_span(tokenizer, y.tolist()) if spec.update_on == "answer_span" else None
        m = torch.ones(y.numel(), dtype=torch.bool, device=dev)
        if span is not None:
            m.zero_()
            m[span[0]: span[1]] = True
        masks[i] = m
    return masks


def _rosa_reference_step(h: torch.Tensor, W: torch.Tensor, bias, y: torch.Tensor, reward: float,
                         state: Dict[str, Any], spec: MethodSpec) -> Tuple[torch.Tensor, float]:
    """ROSA's step on this answer from this state (not applied) and its mean target change
    log p* - log p over the targeted tokens: the fair PG's yardsticks."""
    if state["mode"] == "hidden":
        step = rosa_update(h + state["delta"].to(h.dtype), W, y, float(reward), mode="hidden", bias=bias,
                           beta=spec.beta, damping=spec.damping, damping_mode=spec.damping_mode)
    else:
        step = rosa_update(h, W, y, float(reward), mode="lora", lora_a=state["a"].to(h.dtype),
                           lora_b=state["b"].to(h.dtype), lora_scale=state["lora_scale"], bias=bias, beta=spec.beta,
                           damping=spec.damping, damping_mode=spec.damping_mode)
    lp = step.logp.double()
    target = float((torch.log(torch.exp(lp) + step.target.double()) - lp).mean())
    return step.update.float(), target


def fair_pg_update(step_update: torch.Tensor, dlogp_linear: float, rosa_update_: torch.Tensor, rosa_target: float,
                   rule: str) -> torch.Tensor:
    """The fair PG's step from the plain PG step (``step_update``, its linearised change of the mean log p
    ``dlogp_linear``), ROSA's step on the same answer and ROSA's mean target change (``rosa_target``).

    rule "lr": the PG step as it is; "clip": its norm clipped to ``||rosa_update_||``; "match": rescaled so
    that its linearised change has the size of ``rosa_target`` (a zero step stays zero).
    """
    if rule == "lr":
        return step_update
    if rule == "clip":
        cap = float(torch.linalg.vector_norm(rosa_update_))
        n = float(torch.linalg.vector_norm(step_update))
        return step_update * (cap / n) if n > cap else step_update
    if rule == "match":
        if dlogp_linear == 0.0:
            return torch.zeros_like(step_update)
        return step_update * (abs(rosa_target) / abs(dlogp_linear))
    raise ValueError(f"fair_pg_update: rule must be one of {PG_STEPS}, got {rule!r}")


def cap_shift(delta: torch.Tensor, cap: float) -> torch.Tensor:
    """``delta`` scaled down to norm ``cap`` when longer (unchanged otherwise)."""
    n = float(torch.linalg.vector_norm(delta.float()))
    return delta * (cap / n) if n > cap else delta


def _update_chunk(model, tokenizer, convs: List[Conversation], idx: List[int], spec: MethodSpec,
                  users: RosaUsers, measure_logp: bool) -> None:
    """One batched update for the failed conversations ``idx`` (users of ``users``)."""
    t0 = time.perf_counter()
    head = find_lm_head(model, "experiment")
    W = head_weight(head, "experiment").detach()
    bias = head_bias(head)
    bias = None if bias is None else bias.detach()
    dev = W.device
    missing = [i for i in idx if users.answer(user_key(i)) is None]
    if missing:  # no recorded answer (e.g. a conversation built by hand): one body forward for them
        seqs = [torch.cat([convs[i].last_prompt, convs[i].last_resp]) for i in missing]
        L = max(q.numel() for q in seqs)
        ids = torch.zeros((len(missing), L), dtype=torch.long)
        att = torch.zeros((len(missing), L), dtype=torch.long)
        for j, q in enumerate(seqs):  # right padding: causal attention leaves real positions exact
            ids[j, : q.numel()], att[j, : q.numel()] = q, 1
        with torch.no_grad():
            hid = find_body(model, "experiment")(input_ids=ids.to(dev), attention_mask=att.to(dev),
                                                  use_cache=False).last_hidden_state
        for j, i in enumerate(missing):
            st = convs[i].last_prompt.numel()
            users.record(user_key(i), hid[j, st - 1: seqs[j].numel() - 1], convs[i].last_resp.to(dev))
    answers = {i: users.answer(user_key(i)) for i in idx}
    masks = _answer_masks(tokenizer, answers, spec, dev)
    rewards = {i: convs[i].turns[-1].reward for i in idx}
    before = {i: users.state(user_key(i)) for i in idx}
    if spec.kind == "rosa":
        steps = users.update({user_key(i): r for i, r in rewards.items()}, masks={user_key(i): m for i, m in masks.items()},
                             max_norm=spec.max_norm)
        upd = {i: steps[user_key(i)].update.float() for i in idx}
    elif spec.kind == "pg":
        upd = {}
        for i in idx:
            h, y = answers[i]
            hm, ym = h[masks[i]].float(), y[masks[i]]
            st = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in before[i].items()}
            step = pg_step(hm, W.float(), ym, float(rewards[i]), mode=spec.mode, lr=spec.lr, beta=spec.beta,
                           lora_a=st.get("a"), lora_b=st.get("b"), delta=st.get("delta"),
                           lora_scale=users.lora_scale, bias=None if bias is None else bias.float(),
                           kl_clip=spec.kl_clip)
            u = step.update.float()
            if spec.pg_step != "lr":
                ru, rt = _rosa_reference_step(hm.to(W.dtype), W, bias, ym, float(rewards[i]), st, spec)
                u = fair_pg_update(u, step.dlogp_linear, ru, rt, spec.pg_step)
            if spec.max_norm is not None:
                u = u * (spec.max_norm / torch.linalg.vector_norm(u).clamp_min(spec.max_norm))
            users.apply(user_key(i), u)
            upd[i] = u
    else:
        raise ValueError(f"_update_chunk: method kind {spec.kind!r} does not update")
    if spec.shift_cap is not None and spec.mode == "hidden":
        for i in idx:  # cap the accumulated shift relative to the norm of this answer's lm_head inputs
            st = users.state(user_key(i))
            cap = spec.shift_cap * float(torch.linalg.vector_norm(answers[i][0].float(), dim=-1).mean())
            new = cap_shift(st["delta"], cap)
            if new is not st["delta"]:
                st["delta"] = new
                users.load(user_key(i), st)
                upd[i] = (new - before[i]["delta"]).float().to(dev)
    per = 1000.0 * (time.perf_counter() - t0) / len(idx)  # the update alone, not the measurement
    for i in idx:
        rec = convs[i].turns[-1]
        rec.update_ms, rec.update_norm = per, float(torch.linalg.vector_norm(upd[i]))
        if measure_logp:  # from the state before the update
            h, y = answers[i]
            att = target_attainment(h[masks[i]], W, y[masks[i]], before[i], upd[i], float(rewards[i]), spec.beta)
            for k, v in att.items():
                setattr(rec, k, v)
        if spec.mode == "hidden":
            rec.shift_norm = float(torch.linalg.vector_norm(users.state(user_key(i))["delta"].float()))
            rec.hidden_norm = float(torch.linalg.vector_norm(answers[i][0].float(), dim=-1).mean())


def first_turn(model, tokenizer, problems: Sequence[Problem], *, seed: int, max_new_tokens: int, do_sample: bool,
               temperature: float, batch_size: int, progress: Optional[Callable[[int], None]] = None
               ) -> List[Any]:
    """Turn-1 ``(response ids, hidden (n, d))`` pairs (no adapter), shared by all methods of one seed."""
    out: List[Any] = []
    for c0 in range(0, len(problems), batch_size):
        chunk = problems[c0: c0 + batch_size]
        prompts = [chat_tensor(tokenizer, start_messages(p)) for p in chunk]
        resps, hids = generate_batch(model, tokenizer, prompts, max_new_tokens=max_new_tokens, do_sample=do_sample,
                                     temperature=temperature, seed=seed * 100003 + c0, capture=True)
        out += list(zip(resps, hids))
        if progress is not None:
            progress(len(chunk))
    return out


def _score(c: Conversation, tokenizer, reward_fn, resp: torch.Tensor, text: Optional[str] = None,
           tokens: Optional[int] = None) -> None:
    text = tokenizer.decode(resp, skip_special_tokens=True) if text is None else text
    rew = float(reward_fn(c.problem, text))
    c.turns.append(TurnRecord(text=text, reward=rew, correct=is_correct(c.problem, text),
                              tokens=int(resp.numel()) if tokens is None else tokens))
    c.last_resp = resp
    c.messages.append({"role": "assistant", "content": text})
    if c.turns[-1].correct:
        c.solved_at = len(c.turns) - 1
    else:
        got = boxed_answer(text)
        if got is not None:
            c.rejected.add(normalize_answer(got))


def _turn_seed(seed: int, turn: int, chunk_start: int) -> int:
    """The sampling seed of a turn (0-based; turn 0 is the shared first answer)."""
    return seed * 100003 + chunk_start + (turn * 1009 if turn else 0)


def run_chunk(model, tokenizer, problems: Sequence[Problem], specs: Sequence[MethodSpec], *, turns: int = 5,
              seed: int = 0, max_new_tokens: int = 40, do_sample: bool = False, temperature: float = 0.7,
              chunk_start: int = 0, feedback_prompt: str = DEFAULT_FEEDBACK, measure_logp: bool = True,
              use_cache: bool = True, first: Optional[List[Any]] = None,
              progress: Optional[Callable[[int], None]] = None,
              on_method: Optional[Callable[[MethodSpec, List[Conversation], Dict[str, float]], None]] = None
              ) -> Dict[str, List[Conversation]]:
    """Every method of ``specs`` on one batch of problems, all from the same turn-1 answers.

    Args:
        problems: the chunk (one generate batch). specs: the methods. turns: K.
        seed: sampling seed and the LoRA init seed. chunk_start: the chunk's first problem index (enters
            the sampling seeds, so a chunk's answers do not depend on what ran before it).
        use_cache: continue every turn from the key/value cache of the turn before (False: re-encode the
            whole chat each turn; the same conversation up to floating-point rounding).
        first: the chunk's turn-1 ``(response, hidden)`` pairs (:func:`first_turn`) instead of generating them.
        progress: called with the number of generated answers after each generate call.
        on_method: called as ``(spec, conversations, timing)`` when a method has finished the chunk
            (``timing``: ``wall_s``, ``cpu_s``, ``answers``), e.g. to write its records at once.
    Returns:
        {method name: the chunk's :class:`Conversation` records}.
    """
    pad = _pad_id(tokenizer)
    t0, c0 = time.perf_counter(), time.process_time()
    prompts = [chat_tensor(tokenizer, start_messages(p)) for p in problems]
    ids0, att0 = _left_pad(prompts, pad)
    gen0 = _Gen(ids0, att0, None)
    if first is None:
        out0 = _generate(model, tokenizer, gen0, max_new_tokens=max_new_tokens, do_sample=do_sample,
                         temperature=temperature, seed=_turn_seed(seed, 0, chunk_start), capture=True)
        if progress is not None:
            progress(len(problems))
    else:  # given answers: nothing cached, the next turn encodes the whole chat
        resps = [r for r, _ in first]
        n = max(r.numel() for r in resps)
        seqs = torch.full((len(problems), ids0.shape[1] + n), pad, dtype=torch.long)
        seqs[:, : ids0.shape[1]] = ids0
        for i, r in enumerate(resps):
            seqs[i, ids0.shape[1]: ids0.shape[1] + r.numel()] = r
        out0 = _Out(seqs, None, resps, [h for _, h in first])
    first_cost = (time.perf_counter() - t0, time.process_time() - c0)
    results: Dict[str, List[Conversation]] = {}
    for spec in specs:
        t1, c1 = time.perf_counter(), time.process_time()
        convs, answers = _run_spec(model, tokenizer, problems, spec, out0, gen0, turns=turns, seed=seed,
                                   max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                   chunk_start=chunk_start, feedback_prompt=feedback_prompt,
                                   measure_logp=measure_logp, use_cache=use_cache, prompts=prompts,
                                   progress=progress)
        results[spec.name] = convs
        if on_method is not None:
            share = 1.0 / len(specs)  # the shared first turn, split evenly
            on_method(spec, convs, {"wall_s": time.perf_counter() - t1 + share * first_cost[0],
                                    "cpu_s": time.process_time() - c1 + share * first_cost[1],
                                    "answers": answers})
    return results


def _run_spec(model, tokenizer, problems, spec: MethodSpec, out0: _Out, gen0: _Gen, *, turns, seed, max_new_tokens,
              do_sample, temperature, chunk_start, feedback_prompt, measure_logp, use_cache, prompts, progress
              ) -> Tuple[List[Conversation], int]:
    reward_fn = REWARDS[spec.reward]
    convs = [Conversation(p, start_messages(p)) for p in problems]
    for i, c in enumerate(convs):
        c.last_prompt, c.last_hidden = prompts[i], (out0.hids[i] if out0.hids is not None else None)
        _score(c, tokenizer, reward_fn, out0.resps[i])
    users = experiment_users(model, spec, seed=seed) if spec.learns else None
    answers = 0
    try:
        if users is not None:
            for i, c in enumerate(convs):
                if c.last_resp.numel() and out0.hids is not None:
                    users.record(user_key(i), out0.hids[i], c.last_resp)
        out = _Out(out0.seqs, copy.deepcopy(out0.cache) if (use_cache and out0.cache is not None) else None,
                   out0.resps, out0.hids)
        gen, rows = gen0, list(range(len(convs)))  # rows[j]: the conversation of row j of `gen`/`out`
        for k in range(1, turns):
            failed = [j for j, i in enumerate(rows) if convs[i].solved_at is None]
            if not failed:
                break
            if users is not None:
                todo = [rows[j] for j in failed if convs[rows[j]].last_resp.numel() > 0]
                if todo:
                    _update_chunk(model, tokenizer, convs, todo, spec, users, measure_logp)
            for j in failed:
                convs[rows[j]].messages.append({"role": "user", "content": feedback_prompt})
            if spec.kind == "guess":
                for j in failed:
                    c = convs[rows[j]]
                    _score(c, tokenizer, reward_fn, c.last_resp, text=guess_text(c.turns[0].text, k),
                           tokens=c.turns[0].tokens)
                continue
            gen = _continue(gen, out, failed, tokenizer, feedback_prompt)
            rows = [rows[j] for j in failed]
            if not use_cache:
                gen.cache = None
            sample = do_sample or spec.kind == "resample"
            procs = None
            if spec.kind == "ban":
                procs = [BanRejectedNumbers(tokenizer, gen.ids.shape[1], [convs[i].rejected for i in rows])]
            out = _generate(model, tokenizer, gen, max_new_tokens=max_new_tokens, do_sample=sample,
                            temperature=spec.temperature if spec.kind == "resample" else temperature,
                            seed=_turn_seed(seed, k, chunk_start), users=users, user_ids=rows if users else None,
                            logits_processor=procs)
            answers += len(rows)
            if progress is not None:
                progress(len(rows))
            for j, i in enumerate(rows):
                convs[i].last_hidden = out.hids[j] if out.hids is not None else None
                _score(convs[i], tokenizer, reward_fn, out.resps[j])
    finally:
        if users is not None:
            users.detach()
    return convs, answers


def run_method(model, tokenizer, problems: Sequence[Problem], spec: MethodSpec, *, turns: int = 5, seed: int = 0,
               max_new_tokens: int = 40, do_sample: bool = False, temperature: float = 0.7, batch_size: int = 32,
               feedback_prompt: str = DEFAULT_FEEDBACK, first: Optional[List[Any]] = None,
               measure_logp: bool = True, progress: Optional[Callable[[int], None]] = None,
               use_cache: bool = True) -> List[Conversation]:
    """All problems through the K-turn loop under one method, ``batch_size`` problems at a time
    (:func:`run_chunk`).

    Args:
        problems: the problems (n). spec: the method. turns: K.
        seed: sampling seed (and the LoRA init seed).
        first: precomputed turn-1 ``(response, hidden)`` pairs (:func:`first_turn`, same seed/decoding).
        progress: called with the number of generated answers after each batch.
    Returns:
        n :class:`Conversation` records (``solved_at`` 0-based or None).
    """
    convs: List[Conversation] = []
    for c0 in range(0, len(problems), batch_size):
        chunk = list(problems[c0: c0 + batch_size])
        res = run_chunk(model, tokenizer, chunk, [spec], turns=turns, seed=seed, max_new_tokens=max_new_tokens,
                        do_sample=do_sample, temperature=temperature, chunk_start=c0, feedback_prompt=feedback_prompt,
                        measure_logp=measure_logp, use_cache=use_cache,
                        first=None if first is None else first[c0: c0 + batch_size], progress=progress)
        convs += res[spec.name]
    return convs


# --------------------------------------------------------------------------- summary
#: The controls a summary compares every method with, when present (see the module doc).
DEFAULT_CONTROLS = ("baseline", "resample", "ban", "guess")


def _solved_within(s: Optional[int], turns: int) -> float:
    return 1.0 if s is not None and s < turns else 0.0


def summarize(runs: Dict[str, Dict[int, List[Conversation]]], turns: int, n_boot: int = 2000, *,
              controls: Optional[Sequence[str]] = None, feedback: str = DEFAULT_FEEDBACK) -> Dict[str, Any]:
    """Per method: accuracy curve, Acc(K), Uplift(K) with bootstrap CIs over problems (seeds pooled),
    per-seed values, update latency / norm / log-prob change, the paired difference to the baseline and
    to every control (``controls``, default :data:`DEFAULT_CONTROLS` present in ``runs``) and to the
    strongest control, the same for Acc(K) counting only sensible corrections
    (:func:`rosa_ext.harness.degeneration.sensible_solved_at`), and the degeneration table."""
    out: Dict[str, Any] = {}
    ctrls = [c for c in (DEFAULT_CONTROLS if controls is None else controls) if c in runs]

    def by_problem(seedruns: Dict[int, List[Conversation]], key: str = "solved") -> Dict[str, List[Optional[int]]]:
        d: Dict[str, List[Optional[int]]] = {}
        for convs in seedruns.values():
            for j, c in enumerate(convs):
                s = c.solved_at if key == "solved" else _sensible(c, feedback)
                d.setdefault(f"{j:05d}", []).append(s)
        return d

    def scores(bp: Dict[str, List[Optional[int]]]) -> Dict[str, List[float]]:
        return {k: [_solved_within(s, turns) for s in v] for k, v in bp.items()}

    def paired(a: str, b: str, key: str) -> Optional[Dict[str, Any]]:
        common = [sd for sd in runs[a] if sd in runs[b]]
        if not common:
            return None
        x = scores(by_problem({sd: runs[a][sd] for sd in common}, key))
        y = scores(by_problem({sd: runs[b][sd] for sd in common}, key))
        d = paired_bootstrap_mean_diff(x, y, n_boot=n_boot)
        return {"value": d[0], "ci95": [d[1], d[2]], "seeds": sorted(common)}

    for name, seedruns in runs.items():
        bp = by_problem(seedruns)
        sens = by_problem(seedruns, "sensible")
        pooled = [s for v in bp.values() for s in v]
        pooled_s = [s for v in sens.values() for s in v]
        acc = bootstrap_mean_ci(scores(bp), n_boot=n_boot)
        acc_s = bootstrap_mean_ci(scores(sens), n_boot=n_boot)
        upl = _uplift_ci(bp, turns, n_boot)
        convs_all = [c for convs in seedruns.values() for c in convs]
        ups = [t for c in convs_all for t in c.turns if t.update_ms is not None]
        dl = [t.logp_after - t.logp_before for t in ups if t.logp_before is not None]
        shifts = [t.shift_norm for t in ups if getattr(t, "shift_norm", None) is not None]
        hnorms = [t.hidden_norm for t in ups if getattr(t, "hidden_norm", None) is not None]
        entry: Dict[str, Any] = {
            "accuracy_curve": accuracy_curve(pooled, turns),
            "accuracy": {"value": acc[0], "ci95": [acc[1], acc[2]]},
            "correction_uplift": {"value": upl[0], "ci95": [upl[1], upl[2]]},
            "first_turn_accuracy": accuracy(pooled, 1),
            "sensible_accuracy": {"value": acc_s[0], "ci95": [acc_s[1], acc_s[2]]},
            "sensible_accuracy_curve": accuracy_curve(pooled_s, turns),
            "corrections": sum(s is not None and 0 < s < turns for s in pooled),
            "sensible_corrections": sum(s is not None and 0 < s < turns for s in pooled_s),
            "seed_spread": {
                "accuracy": seed_spread({str(s): [c.solved_at for c in convs] for s, convs in seedruns.items()},
                                        lambda x: accuracy(x, turns)),
                "correction_uplift": seed_spread({str(s): [c.solved_at for c in convs]
                                                  for s, convs in seedruns.items()},
                                                 lambda x: correction_uplift(x, turns))},
            "per_seed": {str(s): {"accuracy": accuracy([c.solved_at for c in convs], turns),
                                  "correction_uplift": correction_uplift([c.solved_at for c in convs], turns)}
                         for s, convs in seedruns.items()},
            "n_problems": len(bp), "seeds": sorted(seedruns),
            "updates": len(ups),
            "update_ms_mean": (sum(t.update_ms for t in ups) / len(ups)) if ups else None,
            "update_norm_median": _median([t.update_norm for t in ups]) if ups else None,
            "update_norm_max": max(t.update_norm for t in ups) if ups else None,
            "shift_norm_median": _median(shifts), "shift_norm_max": max(shifts) if shifts else None,
            "hidden_norm_median": _median(hnorms),
            "logp_change_mean": (sum(dl) / len(dl)) if dl else None,
            "logp_change_min": min(dl) if dl else None,
            **attainment_summary(ups),
            "repeat": repeat_count(convs_all),
            "boxed_rate": sum("\\boxed" in t.text for c in convs_all for t in c.turns)
            / max(1, sum(len(c.turns) for c in convs_all)),
            "degeneration": degeneration_table(convs_all, turns, feedback),
        }
        if "baseline" in runs and name != "baseline":
            d = paired(name, "baseline", "solved")
            if d is not None:
                entry["accuracy_minus_baseline"] = d
        entry["vs_controls"] = {c: {"accuracy": paired(name, c, "solved"), "sensible": paired(name, c, "sensible")}
                                for c in ctrls if c != name}
        out[name] = entry
    for key, field_ in (("accuracy", "accuracy"), ("sensible", "sensible_accuracy")):
        if not ctrls:
            break
        best = max(ctrls, key=lambda c: out[c][field_]["value"])
        for name, e in out.items():
            e.setdefault("strongest_control", {})[key] = best
            if name != best and e["vs_controls"].get(best, {}).get(key) is not None:
                e.setdefault("minus_strongest_control", {})[key] = e["vs_controls"][best][key]
    return out


def _sensible(c: Conversation, feedback: str) -> Optional[int]:
    return sensible_solved_at([t.text for t in c.turns], c.problem.question, c.problem.answer, feedback, c.solved_at)


def _uplift_ci(bp: Dict[str, List[Optional[int]]], turns: int, n_boot: int) -> Tuple[float, float, float]:
    """Correction Uplift(K) with a bootstrap over problems: the ratio of two per-problem sums."""
    import numpy as np

    keys = sorted(bp)
    fails = np.array([float(sum(s != 0 for s in bp[k])) for k in keys])
    fixed = np.array([float(sum(s is not None and 0 < s < turns for s in bp[k])) for k in keys])
    est = float(fixed.sum() / fails.sum()) if fails.sum() else 0.0
    pick = np.random.default_rng(0).integers(0, len(keys), size=(n_boot, len(keys)))
    f = fails[pick].sum(1)
    stats = np.sort(np.where(f > 0, fixed[pick].sum(1) / np.maximum(f, 1), 0.0))
    return est, float(stats[int(0.025 * (n_boot - 1))]), float(stats[int(np.ceil(0.975 * (n_boot - 1)))])


def _median(xs: List[float]) -> Optional[float]:
    xs = sorted(xs)
    if not xs:
        return None
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else 0.5 * (xs[m - 1] + xs[m])


def attainment_summary(ups: List[TurnRecord]) -> Dict[str, Any]:
    """Target attainment over the updates ``ups`` (records with the measurement): median achieved /
    target and predicted / target, mean changes per token, and the share of updates that reached at
    least half of their target."""
    m = [t for t in ups if t.attainment is not None]
    return {
        "attainment_median": _median([t.attainment for t in m]),
        "predicted_over_target_median": _median([t.dlogp_predicted / t.dlogp_target for t in m]),
        "achieved_over_predicted_median": _median([t.dlogp_achieved / t.dlogp_predicted for t in m
                                                   if t.dlogp_predicted]),
        "dlogp_target_mean": (sum(t.dlogp_target for t in m) / len(m)) if m else None,
        "dlogp_predicted_mean": (sum(t.dlogp_predicted for t in m) / len(m)) if m else None,
        "dlogp_achieved_mean": (sum(t.dlogp_achieved for t in m) / len(m)) if m else None,
        "reached_half_target": (sum(t.attainment >= 0.5 for t in m) / len(m)) if m else None,
    }


def repeat_count(convs: List[Conversation]) -> Dict[str, Any]:
    """Answers after turn 1 whose boxed number was already given (and rejected) earlier in the same
    conversation: ``{"repeated": n, "later_answers": m, "share": n / m}``."""
    n = rep = 0
    for c in convs:
        seen = set()
        for k, t in enumerate(c.turns):
            a = boxed_answer(t.text)
            if k > 0:
                n += 1
                rep += a is not None and a in seen
            if a is not None:
                seen.add(a)
    return {"repeated": rep, "later_answers": n, "share": (rep / n) if n else None}


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _diff(d: Optional[Dict[str, Any]]) -> str:
    if not d:
        return "-"
    return f"{100 * d['value']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]"


def markdown_table(summary: Dict[str, Any], turns: int) -> str:
    """The results tables (markdown): accuracy against the controls, the degeneration table (turns 2..K
    pooled and per turn), accuracy within k turns (all corrections and sensible ones only)."""
    K = turns
    lines = [f"| method | Acc@1 | Acc@{K} [95% CI] | Uplift@{K} [95% CI] | Acc@{K} - baseline [paired 95% CI] | "
             f"Acc@{K} - strongest control [paired 95% CI] | Acc@{K}, sensible corrections only [95% CI] | "
             f"sensible - strongest control [paired 95% CI] | corrections (sensible) | boxed | median ‖δ‖ | "
             f"median ‖shift‖ / ‖h‖ | update ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base_seeds = len(summary.get("baseline", {}).get("seeds", ()))
    for name, e in summary.items():
        a, u, s = e["accuracy"], e["correction_uplift"], e.get("sensible_accuracy")
        db = _diff(e.get("accuracy_minus_baseline"))
        if e.get("accuracy_minus_baseline") and len(e["accuracy_minus_baseline"]["seeds"]) < base_seeds:
            db += " (seeds " + ",".join(str(x) for x in e["accuracy_minus_baseline"]["seeds"]) + ")"
        strong = e.get("strongest_control", {})
        ms = e.get("minus_strongest_control", {})
        sa = (f"{strong['accuracy']}: {_diff(ms.get('accuracy'))}" if strong.get("accuracy") and ms.get("accuracy")
              else ("(strongest control)" if strong.get("accuracy") == name else "-"))
        ss = (f"{strong['sensible']}: {_diff(ms.get('sensible'))}" if strong.get("sensible") and ms.get("sensible")
              else ("(strongest control)" if strong.get("sensible") == name else "-"))
        sens = f"{_pct(s['value'])} [{_pct(s['ci95'][0])}, {_pct(s['ci95'][1])}]" if s else "-"
        nm = f"{e['update_norm_median']:.3g}" if e.get("update_norm_median") is not None else "-"
        sh = (f"{e['shift_norm_median']:.3g} / {e['hidden_norm_median']:.3g}"
              if e.get("shift_norm_median") is not None and e.get("hidden_norm_median") else "-")
        up = f"{e['update_ms_mean']:.0f}" if e.get("update_ms_mean") is not None else "-"
        lines.append(f"| {name} | {_pct(e['first_turn_accuracy'])} | {_pct(a['value'])} [{_pct(a['ci95'][0])}, "
                     f"{_pct(a['ci95'][1])}] | {_pct(u['value'])} [{_pct(u['ci95'][0])}, {_pct(u['ci95'][1])}] | "
                     f"{db} | {sa} | {sens} | {ss} | "
                     f"{e.get('corrections', '-')} ({e.get('sensible_corrections', '-')}) | "
                     f"{100 * e.get('boxed_rate', 0):.0f}% | {nm} | {sh} | {up} |")
    lines += ["", "Sensible correction: a right answer after turn 1 that derives its boxed number by correct arithmetic "
              "from the question's numbers and does not copy the feedback (rosa_ext.harness.degeneration). "
              "Strongest control: the control (baseline, resample, ban, guess) with the highest point estimate.",
              "", f"Degeneration, answers of turns 2..{K} pooled (share of those answers):", "",
              "| method | later answers | copies the feedback | boxed, not derived | unboxed | small step (±1, ±2) | "
              "walk | repeats a rejected answer | right | sensible | conversations with a walk |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in summary.items():
        dg = e.get("degeneration")
        if not dg:
            continue
        t = dg["all"]
        n = max(1, t["answers"])
        lines.append(f"| {name} | {t['answers']} | " + " | ".join(
            f"{100 * t[k] / n:.0f}% ({t[k]})" for k in ("copies_feedback", "underived", "unboxed", "small_step", "walk",
                                                         "repeat", "correct", "sensible"))
                     + f" | {dg['conversations_with_walk']} |")
    lines += ["", "Per turn (answers; copies the feedback / boxed, not derived / walk / sensible, in % of the turn's "
              "answers):", "", "| method | " + " | ".join(f"turn {k}" for k in range(2, K + 1)) + " |",
              "|---|" + "---|" * (K - 1)]
    for name, e in summary.items():
        dg = e.get("degeneration")
        if not dg:
            continue
        cells = []
        for k in range(2, K + 1):
            t = dg["per_turn"][str(k)]
            n = t["answers"]
            cells.append("-" if not n else f"{n}: {100 * t['copies_feedback'] / n:.0f} / {100 * t['underived'] / n:.0f}"
                                            f" / {100 * t['walk'] / n:.0f} / {100 * t['sensible'] / n:.0f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Accuracy within k turns (%), seeds pooled (all corrections | sensible corrections only):", "",
              "| method | " + " | ".join(f"k={k}" for k in range(1, K + 1)) + " |", "|---|" + "---|" * K]
    for name, e in summary.items():
        sc = e.get("sensible_accuracy_curve") or [None] * K
        lines.append(f"| {name} | " + " | ".join(f"{100 * v:.1f} \\| {_pct(w)}" for v, w in zip(e["accuracy_curve"], sc))
                     + " |")
    return "\n".join(lines) + "\n"


def plot(summary: Dict[str, Any], turns: int, path: str, title: str) -> None:
    """Accuracy vs turn, one line per method; right panel: sensible corrections only (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key, sub in ((axes[0], "accuracy_curve", "every correction"),
                         (axes[1], "sensible_accuracy_curve", "sensible corrections only")):
        for name, e in summary.items():
            if e.get(key) is None:
                continue
            ax.plot(range(1, turns + 1), [100 * v for v in e[key]], marker="o",
                    linestyle="--" if name in DEFAULT_CONTROLS else "-", label=name)
        ax.set_xlabel("turn K")
        ax.set_xticks(range(1, turns + 1))
        ax.set_title(f"{title}\n{sub}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy within K turns (%)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)


def _versions() -> Dict[str, str]:
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except Exception:  # noqa: BLE001 -- no git: record nothing
        commit = ""
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "platform": platform.platform(),
            "threads": str(torch.get_num_threads()), "commit": commit}


def load_model(name: str):
    """A ``--model`` name (:data:`rosa_ext.integrations.models.MODEL_NAMES`) -> (model, tokenizer), offline;
    a loader needs only the package of the model it loads ("tiny": a random tied Llama with the SmolLM2
    tokenizer, hidden size 32)."""
    import transformers

    transformers.logging.set_verbosity_error()
    from ..integrations.models import ModelNotInstalledError, load_named

    try:
        return load_named(name, tiny_hidden=32)
    except ModelNotInstalledError as e:
        raise SystemExit(f"rosa_ext.harness.experiment: {e}") from None


# --------------------------------------------------------------------------- resumable runs
#: config.json keys a rerun must repeat exactly (problems, seeds and methods may grow).
FROZEN = ("model", "problem_set", "split", "turns", "decoding", "temperature", "max_new_tokens", "batch_size",
          "feedback_prompt", "use_cache")


def _record(name: str, seed: int, j: int, c: Conversation) -> Dict[str, Any]:
    return {"method": name, "seed": seed, "problem": j, "question": c.problem.question, "answer": c.problem.answer,
            "solved_at": c.solved_at, "turns": [asdict(t) for t in c.turns]}


def read_records(path: str) -> List[Dict[str, Any]]:
    """The records of a ``runs.jsonl``; a last line cut short by a killed process is dropped (and removed
    from the file, so that appending continues cleanly)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().split("\n")
    recs, good = [], []
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            recs.append(json.loads(line))
            good.append(line)
        except json.JSONDecodeError:
            if k < len(lines) - 2:  # only the last line may be cut short
                raise SystemExit(f"{path}: line {k + 1} is not JSON (not a cut-short last line); fix the file") from None
    if len(good) != sum(1 for x in lines if x.strip()):
        with open(path, "w") as f:
            f.write("".join(x + "\n" for x in good))
    return recs


def _append(path: str, lines: Sequence[Dict[str, Any]]) -> None:
    with open(path, "a") as f:
        f.write("".join(json.dumps(x) + "\n" for x in lines))
        f.flush()
        os.fsync(f.fileno())


def conversations_from(recs: Sequence[Dict[str, Any]]) -> List[Conversation]:
    """:class:`Conversation` records (for the summary) from ``runs.jsonl`` records."""
    return [Conversation(problem=Problem(r["question"], r["answer"]), messages=[],
                         turns=[TurnRecord(**t) for t in r["turns"]], solved_at=r["solved_at"]) for r in recs]


def collect(recs: Sequence[Dict[str, Any]], specs: Sequence[MethodSpec], seeds: Sequence[int], greedy: bool,
            n_problems: int) -> Tuple[Dict[str, Dict[int, List[Conversation]]], int]:
    """The runs of ``specs`` x ``seeds`` over the longest prefix of problems that every (method, seed) has
    done -> ({method: {seed: conversations}}, that prefix length). Under greedy decoding a seed-independent
    method's first seed stands for every seed (:func:`seed_dependent`)."""
    have: Dict[Tuple[str, int], Dict[int, Dict[str, Any]]] = {}
    for r in recs:
        have.setdefault((r["method"], r["seed"]), {})[r["problem"]] = r
    runs_for = {s.name: (list(seeds) if not greedy or seed_dependent(s) else [seeds[0]]) for s in specs}
    m = n_problems
    for s in specs:
        for sd in runs_for[s.name]:
            got = have.get((s.name, sd), {})
            k = 0
            while k < m and k in got:
                k += 1
            m = k
    runs: Dict[str, Dict[int, List[Conversation]]] = {}
    if m == 0:
        return runs, 0
    for s in specs:
        own = {sd: conversations_from([have[(s.name, sd)][j] for j in range(m)]) for sd in runs_for[s.name]}
        runs[s.name] = {sd: own.get(sd, own[runs_for[s.name][0]]) for sd in seeds}
    return runs, m


def run_resumable(model, tokenizer, problems: Sequence[Problem], specs: Sequence[MethodSpec], *, out: str,
                  config: Dict[str, Any], seeds: Sequence[int], turns: int, decoding: str, temperature: float,
                  max_new_tokens: int, batch_size: int, n_boot: int = 2000, use_cache: bool = True,
                  feedback_prompt: str = DEFAULT_FEEDBACK, title: str = "", quiet: bool = False,
                  write_summary: bool = True) -> Dict[str, Any]:
    """Every method x seed on ``problems``, chunk by chunk, appending each method's records to
    ``out/runs.jsonl`` as soon as it has finished a chunk; what ``out`` already holds is skipped, so the
    same call after an interruption continues where it stopped. Writes ``config.json`` (checked against
    ``config`` on a rerun: the :data:`FROZEN` keys must match and a method's settings may not change),
    ``timing.jsonl`` and, after every chunk, ``results.json`` / ``results.md`` (PARTIAL until done).
    Returns the final summary (None entries when nothing ran)."""
    from tqdm.auto import tqdm

    os.makedirs(out, exist_ok=True)
    cfg_path = os.path.join(out, "config.json")
    config = dict(config, methods={s.name: asdict(s) for s in specs}, feedback_prompt=feedback_prompt,
                  use_cache=use_cache, turns=turns, decoding=decoding, temperature=temperature,
                  max_new_tokens=max_new_tokens, batch_size=batch_size)
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            old = json.load(f)
        bad = [k for k in FROZEN if old.get(k) != config.get(k)]
        bad += [f"method {n}" for n, sp in config["methods"].items() if n in old.get("methods", {})
                and old["methods"][n] != sp]
        if bad:
            raise SystemExit(f"run_resumable: {out} holds a run with other settings ({', '.join(bad)}); use another "
                             "--out or the same settings")
        merged = dict(old)
        merged["methods"] = {**old.get("methods", {}), **config["methods"]}
        merged["seeds"] = sorted(set(old.get("seeds", [])) | set(seeds))
        merged["problems"] = max(int(old.get("problems", 0)), len(problems))
        merged.setdefault("commands", []).append(config.get("command"))
        config = merged
    else:
        config = dict(config, seeds=sorted(seeds), problems=len(problems), commands=[config.get("command")])
    with open(cfg_path, "w") as f:
        json.dump(config, f, indent=1)
    runs_path, timing_path = os.path.join(out, "runs.jsonl"), os.path.join(out, "timing.jsonl")
    recs = read_records(runs_path)
    done = {(r["method"], r["seed"], r["problem"]) for r in recs}
    greedy = decoding == "greedy"
    t_start = time.perf_counter()

    def planned(spec: MethodSpec, seed: int) -> bool:
        if greedy and seed != seeds[0] and not seed_dependent(spec):
            return False  # the first seed's run stands for it
        return not (spec.kind == "resample" and not greedy)  # sampled: resample is the baseline itself

    active = [s for s in specs if any(planned(s, sd) for sd in seeds)]
    skipped = [s.name for s in specs if s not in active]
    todo_n = sum(1 for sd in seeds for s in active if planned(s, sd) for j in range(len(problems))
                 if (s.name, sd, j) not in done)
    bar = tqdm(total=todo_n, desc="conversations", unit="conv", disable=quiet, dynamic_ncols=True)
    summary: Dict[str, Any] = {}
    try:
        for seed in seeds:
            for c0 in range(0, len(problems), batch_size):
                chunk = list(problems[c0: c0 + batch_size])
                js = range(c0, c0 + len(chunk))
                todo = [s for s in active if planned(s, seed) and any((s.name, seed, j) not in done for j in js)]
                if not todo:
                    continue
                bar.set_postfix_str(f"seed {seed}, problems {c0}-{c0 + len(chunk) - 1}")

                def on_method(spec: MethodSpec, convs: List[Conversation], timing: Dict[str, float],
                              seed: int = seed, c0: int = c0) -> None:
                    lines = [_record(spec.name, seed, c0 + j, c) for j, c in enumerate(convs)
                             if (spec.name, seed, c0 + j) not in done]
                    _append(runs_path, lines)
                    _append(timing_path, [dict(timing, method=spec.name, seed=seed, chunk_start=c0,
                                               chunk_size=len(convs))])
                    for x in lines:
                        done.add((x["method"], x["seed"], x["problem"]))
                        recs.append(x)
                    bar.update(len(lines))

                run_chunk(model, tokenizer, chunk, todo, turns=turns, seed=seed, max_new_tokens=max_new_tokens,
                          do_sample=not greedy, temperature=temperature, chunk_start=c0,
                          feedback_prompt=feedback_prompt, use_cache=use_cache, on_method=on_method)
                if write_summary:
                    summary = _write_results(out, recs, active, seeds, greedy, len(problems), turns, config,
                                             min(n_boot, 300), feedback_prompt, title, skipped, final=False)
    finally:
        bar.close()
    if write_summary:
        summary = _write_results(out, recs, active, seeds, greedy, len(problems), turns, config, n_boot,
                                 feedback_prompt, title, skipped, final=True)
    if not quiet:
        print(f"run_resumable: {out}: {time.perf_counter() - t_start:.0f} s in this call")
    return summary


def timing_totals(out: str) -> Dict[str, Any]:
    """Sums of ``out/timing.jsonl``: wall and CPU seconds and generated answers, in all and per method."""
    path = os.path.join(out, "timing.jsonl")
    tot: Dict[str, Any] = {"wall_s": 0.0, "cpu_s": 0.0, "answers": 0, "per_method": {}}
    if not os.path.exists(path):
        return tot
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            t = json.loads(line)
            pm = tot["per_method"].setdefault(t["method"], {"wall_s": 0.0, "cpu_s": 0.0, "answers": 0})
            for k in ("wall_s", "cpu_s", "answers"):
                tot[k] += t[k]
                pm[k] += t[k]
    tot["cpu_hours"] = tot["cpu_s"] / 3600
    return tot


def _write_results(out: str, recs, specs, seeds, greedy: bool, n_problems: int, turns: int, config, n_boot: int,
                   feedback: str, title: str, skipped: Sequence[str], final: bool) -> Dict[str, Any]:
    runs, m = collect(recs, specs, seeds, greedy, n_problems)
    if not runs:
        return {}
    complete = m == n_problems and final
    summary = summarize(runs, turns, n_boot=n_boot, feedback=feedback)
    timing = timing_totals(out)
    meta = {"command": (config.get("commands") or [config.get("command")])[-1], "args": config.get("args"),
            "methods": [config["methods"][s.name] for s in specs], "config": config, "complete": complete,
            "problems_done": m, "problems_planned": n_problems,
            "timing": timing, "skipped_methods": list(skipped), "versions": _versions(),
            "greedy_seed_reuse": (None if not greedy else "seed-independent methods (baseline, ban, guess, hidden "
                                  "shift) ran on the first seed, which stands for every seed (seed_dependent())")}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"meta": meta, "summary": summary}, f, indent=1)
    state = "" if complete else f" — PARTIAL: {m} of {n_problems} problems done for every method"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"{title or os.path.basename(out)}: {m} problems x seeds {list(seeds)}, K={turns}, "
                f"{'greedy' if greedy else 'sampled'} decoding{state}; CPU time so far {timing['cpu_hours']:.2f} h "
                f"(`timing.jsonl`); commands in `config.json`"
                + (f"; not run: {', '.join(skipped)} (under sampled decoding `resample` is the baseline)"
                   if skipped else "") + "\n\n" + markdown_table(summary, turns))
    if complete:
        plot(summary, turns, os.path.join(out, "accuracy_vs_turn.png"), title or os.path.basename(out))
    return summary


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rosa_ext.harness.experiment", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=list(MODEL_NAMES), default="smollm2")
    p.add_argument("--problem-set", choices=sorted(PROBLEM_SETS), default="default",
                   help="families of the dev/test split (rosa_ext.harness.problems.PROBLEM_SETS)")
    p.add_argument("--problems", type=int, default=200, help="number of held-out problems")
    p.add_argument("--split", choices=["test", "dev"], default="test")
    p.add_argument("--turns", type=int, default=5, help="K")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma list from {list(METHODS)}")
    p.add_argument("--decoding", choices=["greedy", "sample"], default="sample")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=32, help="problems per chunk (one generate batch)")
    p.add_argument("--beta", type=float, default=None, help="override every method's beta")
    p.add_argument("--damping", type=float, default=None, help="override ROSA's damping")
    p.add_argument("--damping-mode", choices=["absolute", "relative"], default=None,
                   help="override ROSA's damping mode (relative: the ridge is damping x mean diag(J J^T))")
    p.add_argument("--update-on", choices=["response", "answer_span"], default=None)
    p.add_argument("--pg-lr", type=float, default=None)
    p.add_argument("--max-norm", type=float, default=None, help="clip every update's norm")
    p.add_argument("--no-cache", action="store_true",
                   help="re-encode the whole chat every turn instead of continuing from the key/value cache")
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--out", default=None,
                   help="output folder; a rerun with the same settings continues the run it holds")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--quiet", action="store_true")
    return p


def load_problems(problem_set: str, split: str, n: int) -> List[Problem]:
    """The first ``n`` problems of a split (the test list is prefix-stable: a longer run extends a shorter one)."""
    from .problems import heldout_split

    if split == "dev" and n > 60:
        raise SystemExit("rosa_ext.harness.experiment: the dev split has 60 problems")
    dev, test = heldout_split(n_dev=60, n_test=max(240, n), families=PROBLEM_SETS[problem_set])
    return (test if split == "test" else dev)[:n]


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if args.turns < 1 or args.problems < 1:
        raise SystemExit("rosa_ext.harness.experiment: --turns and --problems must be >= 1")
    if args.threads:
        torch.set_num_threads(args.threads)
    names = [m.strip() for m in args.methods.split(",") if m.strip()]
    unknown = [m for m in names if m not in METHODS]
    if unknown:
        raise SystemExit(f"rosa_ext.harness.experiment: unknown methods {unknown}; choose from {list(METHODS)}")
    over: Dict[str, Any] = {}
    for key, val in (("beta", args.beta), ("damping", args.damping), ("damping_mode", args.damping_mode),
                     ("update_on", args.update_on),
                     ("lr", args.pg_lr), ("max_norm", args.max_norm)):
        if val is not None:
            over[key] = val
    specs = [replace(METHODS[m], **over) for m in names]
    problems = load_problems(args.problem_set, args.split, args.problems)
    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    load_s = time.perf_counter() - t0
    command = "python -m rosa_ext.harness.experiment " + " ".join(argv if argv is not None else sys.argv[1:])
    out = args.out
    tmp = None
    if not out:  # no folder asked for: a temporary one, printed tables only
        import tempfile
        tmp = tempfile.TemporaryDirectory()
        out = tmp.name
    config = {"command": command, "args": vars(args), "model": args.model, "problem_set": args.problem_set, "split": args.split,
              "load_s": load_s, "threads": torch.get_num_threads()}
    title = (f"{'SmolLM2-135M-Instruct' if args.model == 'smollm2' else args.model}, {args.split} "
             f"{args.problem_set}, {args.decoding}")
    try:
        summary = run_resumable(model, tok, problems, specs, out=out, config=config, seeds=args.seeds,
                                turns=args.turns, decoding=args.decoding, temperature=args.temperature,
                                max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, n_boot=args.n_boot,
                                use_cache=not args.no_cache, title=title, quiet=args.quiet)
        print(markdown_table(summary, args.turns))
        print(f"wall time {time.perf_counter() - t0:.0f} s (model load {load_s:.0f} s)")
        if args.out:
            print(f"wrote {args.out}/results.json, results.md, accuracy_vs_turn.png, runs.jsonl")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
