"""The multi-turn experiment (paper Section 5.2 / Appendix D.3) on generated problems.

``python -m rosa_ext.harness.experiment --problems 200 --turns 5 --seeds 0 1 2`` runs every
method on the held-out problems (:mod:`rosa_ext.harness.problems`): each problem gets
up to K answers; after a wrong one the method updates (or not) and the
feedback prompt is appended, exactly as :func:`rosa_ext.harness.conversation.interact`
does for one conversation. Methods (:data:`METHODS`):

- ``baseline``: plain multi-turn prompting, no update.
- ``pg``: single-sample policy gradient on the rank-1 LoRA (:mod:`rosa_ext.harness.pg_baseline`).
- ``rosa-lora`` / ``rosa-hidden``: ROSA on the rank-1 LoRA / the hidden shift,
  rule-based reward (+1/-1).
- ``rosa-lora-dense``: ROSA-LoRA with the dense reward
  (:func:`rosa_ext.harness.rewards.dense_reward` mapped to [-1, 1] by :func:`~rosa_ext.harness.rewards.centered`).

To fit a CPU budget the conversations run *batched*, each conversation a user of one
:class:`~rosa_ext.integrations.users.RosaUsers` (the library's many-users-on-one-model serving
object): one ``generate`` call serves up to ``--batch-size`` conversations, each row with its own
state (per-row LoRA factors or shift on ``lm_head``), recording the lm_head inputs of the answers,
and the ROSA updates of the failed conversations are one batched update of that object (ragged
responses masked). The harness does not re-implement the update: it calls the library. The first
turn (no adapter yet) is generated once per seed and shared by all methods,
so the methods are compared on identical first answers.

Outputs (``--out``): ``results.json`` (config, command, versions, commit,
wall time, per-method metrics with bootstrap CIs, per-update latency),
``results.md`` (the table), ``accuracy_vs_turn.png`` and ``runs.jsonl``
(every conversation's answers and rewards).
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from dataclasses import asdict, dataclass, field, replace
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

from ..common import defaults
from ..integrations.model_lookup import find_body, find_lm_head, head_weight
from ..integrations.models import MODEL_NAMES
from ..integrations.users import RosaUsers
from .conversation import DEFAULT_FEEDBACK, TurnRecord, answer_token_span, start_messages
from .metrics import accuracy, accuracy_curve, bootstrap_ci, correction_uplift, paired_bootstrap_diff, seed_spread
from .pg_baseline import DEFAULT_LR, pg_step
from .problems import PROBLEM_SETS, Problem
from .rewards import boxed_answer, centered, dense_reward, is_correct, rule_reward


@dataclass(frozen=True)
class MethodSpec:
    """One method of the experiment.

    kind: "none" (baseline), "rosa" or "pg". mode: "lora" | "hidden". reward: "rule" | "dense".
    beta, damping, damping_mode: ROSA's (beta also PG's KL weight). lr: PG step size. update_on:
    "response" | "answer_span". max_norm: clip ||update|| to this (None: no clip).
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


#: The methods' settings, chosen on the development split (benchmarks/results/experiment/README.md
#: says how): ROSA and PG update on the boxed answer's own tokens, ROSA with the op's defaults.
_ROSA = dict(beta=defaults.BETA, update_on="answer_span")
METHODS: Dict[str, MethodSpec] = {
    "baseline": MethodSpec("baseline", "none"),
    "rosa-lora": MethodSpec("rosa-lora", "rosa", "lora", **_ROSA),
    "rosa-hidden": MethodSpec("rosa-hidden", "rosa", "hidden", **_ROSA),
    "pg": MethodSpec("pg", "pg", "lora", lr=DEFAULT_LR, update_on="answer_span"),
    "rosa-lora-dense": MethodSpec("rosa-lora-dense", "rosa", "lora", reward="dense", **_ROSA),
}

REWARDS: Dict[str, Callable[[Any, str], float]] = {"rule": rule_reward, "dense": centered(dense_reward)}


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


def generate_batch(model, tokenizer, prompts: Sequence[torch.Tensor], *, max_new_tokens: int, do_sample: bool,
                   temperature: float, seed: int, capture: bool = False, users: Optional[RosaUsers] = None,
                   user_ids: Optional[Sequence[int]] = None):
    """Left-padded batched ``generate``; returns each response's ids (cut after the first EOS, kept).

    With ``capture=True`` it returns ``(responses, hiddens)``: ``hiddens[i]`` (n_i, d) are the base
    lm_head inputs that predicted response i's tokens, recorded during generation (so the update
    needs no second forward of the body). With ``users`` the rows are ``user_ids``' conversations of
    that :class:`RosaUsers`, each generated with its own state and recorded there too.
    """
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    eos = tokenizer.eos_token_id
    L = max(p.numel() for p in prompts)
    ids = torch.full((len(prompts), L), pad, dtype=torch.long)
    att = torch.zeros((len(prompts), L), dtype=torch.long)
    for i, p in enumerate(prompts):
        ids[i, L - p.numel():] = p
        att[i, L - p.numel():] = 1
    dev = next(model.parameters()).device
    kw: Dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad)
    if do_sample:
        kw.update(temperature=temperature, top_p=1.0, top_k=0)
        torch.manual_seed(seed)
    else:
        kw.update(temperature=None, top_p=None, top_k=None)
    if users is not None:
        uids = [user_key(u) for u in user_ids]
        out = users.generate(ids.to(dev), uids, attention_mask=att.to(dev), **kw)[:, L:].cpu()
        res = [users.answer(u)[1].cpu() for u in uids]
        return (res, [users.answer(u)[0].float() for u in uids]) if capture else res
    steps: List[torch.Tensor] = []
    handle = None
    if capture:
        def grab(module, args):
            steps.append(args[0][:, -1, :].detach().float().clone())
        handle = find_lm_head(model, "experiment").register_forward_pre_hook(grab, prepend=True)
    try:
        with torch.no_grad():
            out = model.generate(ids.to(dev), attention_mask=att.to(dev), **kw)[:, L:].cpu()
    finally:
        if handle is not None:
            handle.remove()
    res = []
    for row in out:
        hit = torch.nonzero(row == eos).flatten() if eos is not None else torch.empty(0)
        res.append(row[: int(hit[0]) + 1] if hit.numel() else row)
    if not capture:
        return res
    allh = torch.stack(steps, 1)  # (B, steps, d)
    return res, [allh[i, : r.numel()] for i, r in enumerate(res)]


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


def target_attainment(h: torch.Tensor, W: torch.Tensor, y: torch.Tensor, state: Dict[str, Any],
                      update: torch.Tensor, reward: float, beta: float) -> Dict[str, Any]:
    """How far one update moved its target tokens, from their lm_head inputs (no body forward).

    ``h`` (n, d) base lm_head inputs of the targeted tokens ``y`` (n,), ``state`` the conversation's
    state *before* ``update`` (the flat (P,) step) is applied, in the session's ``state_dict()``
    format (``mode``, ``lora_scale``, ``a``/``b`` or ``delta``). Per token: log p before and after
    (exact, dense logits), the change the linearised step predicted, d/de log p(theta + e delta) at
    e = 0 = (J delta)_t / p_t (one ``torch.func.jvp``), and ROSA's target change log p*_t - log p_t
    at ``beta`` (for a PG step: the ROSA target of the same reward, as a yardstick).
    Returns means over the tokens (the :class:`~rosa_ext.harness.conversation.TurnRecord` fields
    ``target_tokens``, ``logp_before``, ``logp_after``, ``logp_target``, ``dlogp_achieved``,
    ``dlogp_predicted``, ``dlogp_target``) and ``attainment`` = achieved / target (None if the
    target is 0).
    """
    from torch.func import jvp

    from ..common.jacobian import residual_target

    h = h.float()
    W = W.float()
    d = h.shape[1]

    def logp(theta: torch.Tensor) -> torch.Tensor:
        if state["mode"] == "hidden":
            z = (h + state["delta"].float().to(h.device) + theta) @ W.T
        else:
            a, b = state["a"].float().to(h.device) + theta[:d], state["b"].float().to(h.device) + theta[d:]
            z = h @ W.T + state["lora_scale"] * (h @ a).unsqueeze(-1) * b
        return torch.log_softmax(z, -1).gather(-1, y.unsqueeze(-1)).squeeze(-1)

    upd = update.float()
    before, pred = jvp(logp, (torch.zeros_like(upd),), (upd,))
    after = logp(upd)
    lp = before.double()
    g = residual_target(lp, torch.full_like(lp, float(reward)), beta)
    target = torch.log(torch.exp(lp) + g) - lp
    ach, tgt = float((after - before).mean()), float(target.mean())
    return dict(target_tokens=int(y.numel()), logp_before=float(before.mean()), logp_after=float(after.mean()),
                logp_target=float((lp + target).mean()), dlogp_achieved=ach, dlogp_predicted=float(pred.mean()),
                dlogp_target=tgt, attainment=(ach / tgt) if tgt != 0 else None)


def _update_chunk(model, tokenizer, convs: List[Conversation], idx: List[int], spec: MethodSpec,
                  users: RosaUsers, measure_logp: bool) -> None:
    """One batched update for the failed conversations ``idx`` (users of ``users``)."""
    t0 = time.perf_counter()
    W = head_weight(find_lm_head(model, "experiment"), "experiment").detach()
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
    masks = {}
    for i in idx:
        y = answers[i][1]
        span = answer_token_span(tokenizer, y.tolist()) if spec.update_on == "answer_span" else None
        m = torch.ones(y.numel(), dtype=torch.bool, device=dev)
        if span is not None:
            m.zero_()
            m[span[0]: span[1]] = True
        masks[i] = m
    rewards = {i: convs[i].turns[-1].reward for i in idx}
    before = {i: users.state(user_key(i)) for i in idx} if measure_logp else {}
    if spec.kind == "rosa":
        steps = users.update({user_key(i): r for i, r in rewards.items()}, masks={user_key(i): m for i, m in masks.items()},
                             max_norm=spec.max_norm)
        upd = {i: steps[user_key(i)].update.float() for i in idx}
    elif spec.kind == "pg":
        upd = {}
        for i in idx:
            h, y = answers[i]
            st = {k: (v.to(dev) if isinstance(v, torch.Tensor) else v) for k, v in users.state(user_key(i)).items()}
            step = pg_step(h[masks[i]].float(), W.float(), y[masks[i]], float(rewards[i]), mode=spec.mode,
                           lr=spec.lr, beta=spec.beta, lora_a=st.get("a"), lora_b=st.get("b"), delta=st.get("delta"),
                           lora_scale=users.lora_scale)
            u = step.update.float()
            if spec.max_norm is not None:
                u = u * (spec.max_norm / torch.linalg.vector_norm(u).clamp_min(spec.max_norm))
            users.apply(user_key(i), u)
            upd[i] = u
    else:
        raise ValueError(f"_update_chunk: method kind {spec.kind!r} does not update")
    per = 1000.0 * (time.perf_counter() - t0) / len(idx)  # the update alone, not the measurement
    for i in idx:
        rec = convs[i].turns[-1]
        rec.update_ms, rec.update_norm = per, float(torch.linalg.vector_norm(upd[i]))
        if measure_logp:  # from the state before the update
            h, y = answers[i]
            att = target_attainment(h[masks[i]], W, y[masks[i]], before[i], upd[i], float(rewards[i]), spec.beta)
            for k, v in att.items():
                setattr(rec, k, v)


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


def run_method(model, tokenizer, problems: Sequence[Problem], spec: MethodSpec, *, turns: int = 5, seed: int = 0,
               max_new_tokens: int = 40, do_sample: bool = False, temperature: float = 0.7, batch_size: int = 32,
               feedback_prompt: str = DEFAULT_FEEDBACK, first: Optional[List[torch.Tensor]] = None,
               measure_logp: bool = True, progress: Optional[Callable[[int], None]] = None) -> List[Conversation]:
    """All problems through the K-turn loop under one method; conversations batched.

    Args:
        problems: the problems (n). spec: the method. turns: K.
        seed: sampling seed (and the LoRA init seed).
        first: precomputed turn-1 ``(response, hidden)`` pairs (:func:`first_turn`, same seed/decoding).
        progress: called with the number of generated answers after each batch.
    Returns:
        n :class:`Conversation` records (``solved_at`` 0-based or None).
    """
    reward_fn = REWARDS[spec.reward]
    convs = [Conversation(p, start_messages(p)) for p in problems]
    users = experiment_users(model, spec, seed=seed) if spec.kind != "none" else None
    try:
        for k in range(turns):
            active = [i for i, c in enumerate(convs) if c.solved_at is None and len(c.turns) == k]
            if not active:
                break
            for c0 in range(0, len(active), batch_size):
                chunk = active[c0: c0 + batch_size]
                prompts = [chat_tensor(tokenizer, convs[i].messages) for i in chunk]
                if k == 0 and first is not None:
                    resps, hids = [first[i][0] for i in chunk], [first[i][1] for i in chunk]
                    if users is not None:  # the shared first answers become the users' recorded answers
                        for i, r, hd in zip(chunk, resps, hids):
                            if r.numel():
                                users.record(user_key(i), hd, r)
                elif users is not None:
                    resps, hids = generate_batch(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                                 do_sample=do_sample, temperature=temperature,
                                                 seed=seed * 100003 + k * 1009 + c0, capture=True, users=users,
                                                 user_ids=chunk)
                else:
                    resps = generate_batch(model, tokenizer, prompts, max_new_tokens=max_new_tokens,
                                           do_sample=do_sample, temperature=temperature, seed=seed * 100003 + k * 1009 + c0)
                    hids = [None] * len(chunk)
                for i, p, r, hd in zip(chunk, prompts, resps, hids):
                    c = convs[i]
                    text = tokenizer.decode(r, skip_special_tokens=True)
                    rew = float(reward_fn(c.problem, text))
                    c.turns.append(TurnRecord(text=text, reward=rew, correct=is_correct(c.problem, text),
                                              tokens=int(r.numel())))
                    c.last_prompt, c.last_resp, c.last_hidden = p, r, hd
                    c.messages.append({"role": "assistant", "content": text})
                    if c.turns[-1].correct:
                        c.solved_at = k
                if progress is not None and not (k == 0 and first is not None):
                    progress(len(chunk))
            failed = [i for i in active if convs[i].solved_at is None]
            if users is not None and k < turns - 1:
                todo = [i for i in failed if convs[i].last_resp.numel() > 0]
                for c0 in range(0, len(todo), batch_size):
                    _update_chunk(model, tokenizer, convs, todo[c0: c0 + batch_size], spec, users, measure_logp)
            for i in failed:
                if k < turns - 1:
                    convs[i].messages.append({"role": "user", "content": feedback_prompt})
    finally:
        if users is not None:
            users.detach()
    return convs


# --------------------------------------------------------------------------- summary
def summarize(runs: Dict[str, Dict[int, List[Conversation]]], turns: int, n_boot: int = 2000) -> Dict[str, Any]:
    """Per method: accuracy curve, Acc(K), Uplift(K) with bootstrap CIs over problems (seeds pooled),
    per-seed values, update latency / norm / log-prob change, and the paired difference to the baseline."""
    out: Dict[str, Any] = {}

    def by_problem(seedruns: Dict[int, List[Conversation]]) -> Dict[str, List[Optional[int]]]:
        d: Dict[str, List[Optional[int]]] = {}
        for convs in seedruns.values():
            for j, c in enumerate(convs):
                d.setdefault(f"{j:05d}", []).append(c.solved_at)
        return d

    base = by_problem(runs["baseline"]) if "baseline" in runs else None
    for name, seedruns in runs.items():
        bp = by_problem(seedruns)
        pooled = [s for v in bp.values() for s in v]
        acc = bootstrap_ci(bp, lambda s: accuracy(s, turns), n_boot=n_boot)
        upl = bootstrap_ci(bp, lambda s: correction_uplift(s, turns), n_boot=n_boot)
        ups = [t for convs in seedruns.values() for c in convs for t in c.turns if t.update_ms is not None]
        dl = [t.logp_after - t.logp_before for t in ups if t.logp_before is not None]
        entry: Dict[str, Any] = {
            "accuracy_curve": accuracy_curve(pooled, turns),
            "accuracy": {"value": acc[0], "ci95": [acc[1], acc[2]]},
            "correction_uplift": {"value": upl[0], "ci95": [upl[1], upl[2]]},
            "first_turn_accuracy": accuracy(pooled, 1),
            "seed_spread": {
                "accuracy": seed_spread({str(s): [c.solved_at for c in convs] for s, convs in seedruns.items()},
                                        lambda x: accuracy(x, turns)),
                "correction_uplift": seed_spread({str(s): [c.solved_at for c in convs]
                                                  for s, convs in seedruns.items()},
                                                 lambda x: correction_uplift(x, turns))},
            "per_seed": {str(s): {"accuracy": accuracy([c.solved_at for c in convs], turns),
                                  "correction_uplift": correction_uplift([c.solved_at for c in convs], turns)}
                         for s, convs in seedruns.items()},
            "updates": len(ups),
            "update_ms_mean": (sum(t.update_ms for t in ups) / len(ups)) if ups else None,
            "update_norm_median": (sorted(t.update_norm for t in ups)[len(ups) // 2]) if ups else None,
            "logp_change_mean": (sum(dl) / len(dl)) if dl else None,
            **attainment_summary(ups),
            "repeat": repeat_count([c for convs in seedruns.values() for c in convs]),
            "boxed_rate": sum("\\boxed" in t.text for convs in seedruns.values() for c in convs for t in c.turns)
            / max(1, sum(len(c.turns) for convs in seedruns.values() for c in convs)),
        }
        if base is not None and name != "baseline":
            # paired on (problem, seed): against the baseline's runs of the same seeds only (a method
            # may cover fewer seeds than the baseline, e.g. runs merged from an interrupted experiment)
            common = [sd for sd in seedruns if sd in runs["baseline"]]
            if common:
                mine = bp if len(common) == len(seedruns) else by_problem({sd: seedruns[sd] for sd in common})
                theirs = (base if len(common) == len(runs["baseline"])
                          else by_problem({sd: runs["baseline"][sd] for sd in common}))
                d = paired_bootstrap_diff(mine, theirs, lambda s: accuracy(s, turns), n_boot=n_boot)
                entry["accuracy_minus_baseline"] = {"value": d[0], "ci95": [d[1], d[2]], "seeds": sorted(common)}
        out[name] = entry
    return out


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


def markdown_table(summary: Dict[str, Any], turns: int) -> str:
    """The results table (markdown)."""
    lines = [f"| method | Acc@1 | Acc@{turns} [95% CI] | Correction Uplift@{turns} [95% CI] | "
             f"Acc@{turns} over seeds (mean ± sd) | Uplift over seeds (mean ± sd) | "
             f"Acc - baseline [95% CI] | update ms | median ‖δ‖ | mean Δ log p | attainment | repeat |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in summary.items():
        a, u = e["accuracy"], e["correction_uplift"]
        diff = e.get("accuracy_minus_baseline")
        ds = f"{100 * diff['value']:+.1f} [{100 * diff['ci95'][0]:+.1f}, {100 * diff['ci95'][1]:+.1f}]" if diff else "-"
        if diff and len(diff.get("seeds", ())) < len(summary.get("baseline", {}).get("per_seed", {})):
            ds += " (seeds " + ",".join(str(x) for x in diff["seeds"]) + ")"
        ms = f"{e['update_ms_mean']:.0f}" if e["update_ms_mean"] is not None else "-"
        nm = f"{e['update_norm_median']:.3g}" if e["update_norm_median"] is not None else "-"
        lp = f"{e['logp_change_mean']:+.3f}" if e["logp_change_mean"] is not None else "-"
        at = f"{e['attainment_median']:.2f}" if e.get("attainment_median") is not None else "-"
        rp = e.get("repeat") or {}
        rs = f"{rp['repeated']}/{rp['later_answers']}" if rp.get("later_answers") else "-"
        lines.append(f"| {name} | {100 * e['first_turn_accuracy']:.1f} | {100 * a['value']:.1f} "
                     f"[{100 * a['ci95'][0]:.1f}, {100 * a['ci95'][1]:.1f}] | {100 * u['value']:.1f} "
                     f"[{100 * u['ci95'][0]:.1f}, {100 * u['ci95'][1]:.1f}] | {sp(e, 'accuracy')} | "
                     f"{sp(e, 'correction_uplift')} | {ds} | {ms} | {nm} | {lp} | {at} | {rs} |")
    lines += ["", "attainment: median over updates of (achieved mean change of the targeted tokens' log p) / "
              "(ROSA's target change log p* - log p); repeat: later answers repeating a rejected boxed answer.",
              "", "Accuracy within k turns (%), seeds pooled:", "",
              "| method | " + " | ".join(f"k={k}" for k in range(1, turns + 1)) + " |",
              "|---|" + "---|" * turns]
    for name, e in summary.items():
        lines.append(f"| {name} | " + " | ".join(f"{100 * v:.1f}" for v in e["accuracy_curve"]) + " |")
    return "\n".join(lines) + "\n"


def sp(e: Dict[str, Any], key: str) -> str:
    """'mean ± sd (n seeds)' in percent."""
    s = e.get("seed_spread", {}).get(key)
    return f"{100 * s['mean']:.1f} ± {100 * s['std']:.1f} (n={s['n']})" if s else "-"


def plot(summary: Dict[str, Any], turns: int, path: str, title: str) -> None:
    """Accuracy vs turn, one line per method (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    for name, e in summary.items():
        ax.plot(range(1, turns + 1), [100 * v for v in e["accuracy_curve"]], marker="o",
                linestyle="--" if name == "baseline" else "-", label=name)
    ax.set_xlabel("turn K")
    ax.set_ylabel("accuracy within K turns (%)")
    ax.set_xticks(range(1, turns + 1))
    ax.set_title(title, fontsize=9)
    ax.grid(alpha=0.3)
    ax.legend(fontsize=8)
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


def run_experiment(model, tokenizer, problems: Sequence[Problem], specs: Sequence[MethodSpec], *, turns: int,
                   seeds: Sequence[int], max_new_tokens: int, do_sample: bool, temperature: float, batch_size: int,
                   quiet: bool = False, on_done: Optional[Callable[[Dict[str, Dict[int, List[Conversation]]]], None]]
                   = None) -> Dict[str, Dict[int, List[Conversation]]]:
    """Every method x seed on ``problems``; a tqdm bar counts generated answers.
    ``on_done(runs so far)`` is called after each (seed, method), e.g. to save partial results."""
    from tqdm.auto import tqdm

    # Upper bound of answers: turn 1 once per seed, then <= turns - 1 per problem and method.
    total = len(seeds) * len(problems) * (1 + len(specs) * (turns - 1))
    bar = tqdm(total=total, desc="answers", unit="ans", disable=quiet, dynamic_ncols=True)
    runs: Dict[str, Dict[int, List[Conversation]]] = {s.name: {} for s in specs}
    first0 = None
    try:
        for seed in seeds:
            bar.set_postfix_str(f"seed {seed}: turn 1")
            if do_sample or first0 is None:
                first = first_turn(model, tokenizer, problems, seed=seed, max_new_tokens=max_new_tokens,
                                   do_sample=do_sample, temperature=temperature, batch_size=batch_size,
                                   progress=bar.update)
                first0 = first
            else:  # greedy: turn 1 does not depend on the seed
                first = first0
                bar.update(len(problems))
            for spec in specs:
                if not do_sample and seed != seeds[0] and not seed_dependent(spec):
                    # greedy + no seed-dependent init: the run would repeat seed 0's exactly
                    runs[spec.name][seed] = runs[spec.name][seeds[0]]
                    bar.update(len(problems) * (turns - 1))
                    continue
                bar.set_postfix_str(f"seed {seed}: {spec.name}")
                done0 = bar.n
                convs = run_method(model, tokenizer, problems, spec, turns=turns, seed=seed,
                                   max_new_tokens=max_new_tokens, do_sample=do_sample, temperature=temperature,
                                   batch_size=batch_size, first=first, progress=bar.update)
                # Answers that solved problems never needed: count them so the bar ends at its total.
                bar.update(max(0, done0 + len(problems) * (turns - 1) - bar.n))
                runs[spec.name][seed] = convs
                if on_done is not None:
                    on_done({k: v for k, v in runs.items() if v})
    finally:
        bar.close()
    return runs


def seed_dependent(spec: MethodSpec) -> bool:
    """Whether a method's greedy run depends on the seed: only through the LoRA ``a`` draw
    (baseline and the zero-initialised hidden shift are deterministic under greedy decoding)."""
    return spec.kind != "none" and spec.mode == "lora"


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rosa_ext.harness.experiment", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=list(MODEL_NAMES), default="smollm2")
    p.add_argument("--problem-set", choices=sorted(PROBLEM_SETS), default="default",
                   help="families of the dev/test split (rosa_ext.harness.problems.PROBLEM_SETS)")
    p.add_argument("--problems", type=int, default=200, help="number of held-out problems")
    p.add_argument("--split", choices=["test", "dev"], default="test")
    p.add_argument("--turns", type=int, default=5, help="K")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", default=",".join(METHODS), help=f"comma list from {list(METHODS)}")
    p.add_argument("--decoding", choices=["greedy", "sample"], default="sample")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=32)
    p.add_argument("--beta", type=float, default=None, help="override every method's beta")
    p.add_argument("--damping", type=float, default=None, help="override ROSA's damping")
    p.add_argument("--damping-mode", choices=["absolute", "relative"], default=None,
                   help="override ROSA's damping mode (relative: the ridge is damping x mean diag(J J^T))")
    p.add_argument("--update-on", choices=["response", "answer_span"], default=None)
    p.add_argument("--pg-lr", type=float, default=None)
    p.add_argument("--max-norm", type=float, default=None, help="clip every update's norm")
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--out", default=None, help="output folder (results.json/.md, png, runs.jsonl)")
    p.add_argument("--threads", type=int, default=1,
                   help="torch threads")
    p.add_argument("--quiet", action="store_true")
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    from .problems import heldout_split

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
    if args.split == "dev" and args.problems > 60:
        raise SystemExit("rosa_ext.harness.experiment: the dev split has 60 problems")
    dev, test = heldout_split(n_dev=60, n_test=max(240, args.problems),  # test: a prefix-stable list
                              families=PROBLEM_SETS[args.problem_set])
    problems = (test if args.split == "test" else dev)[: args.problems]
    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    load_s = time.perf_counter() - t0
    command = "python -m rosa_ext.harness.experiment " + " ".join(argv if argv is not None else sys.argv[1:])

    def write(runs: Dict[str, Dict[int, List[Conversation]]], final: bool) -> Dict[str, Any]:
        wall = time.perf_counter() - t0
        summary = summarize(runs, args.turns, n_boot=args.n_boot if final else min(args.n_boot, 500))
        if not args.out:
            return summary
        os.makedirs(args.out, exist_ok=True)
        meta = {"command": command, "complete": final, "args": vars(args), "methods": [asdict(s) for s in specs],
                "n_problems": len(problems),
                "greedy_seed_reuse": (None if args.decoding == "sample" else
                                      "seed-independent methods (baseline, hidden shift) and turn 1 run once and "
                                      "are reused for every seed; see seed_dependent()"),
                "feedback_prompt": DEFAULT_FEEDBACK, "wall_s": wall, "load_s": load_s,
                "versions": _versions()}
        with open(os.path.join(args.out, "results.json"), "w") as f:
            json.dump({"meta": meta, "summary": summary}, f, indent=1)
        with open(os.path.join(args.out, "results.md"), "w") as f:
            f.write(f"`{command}` — {len(problems)} problems x {len(args.seeds)} seeds, K={args.turns}, "
                    f"{args.decoding} decoding, wall {wall:.0f} s{'' if final else ' (PARTIAL)'}\n\n"
                    + markdown_table(summary, args.turns))
        with open(os.path.join(args.out, "runs.jsonl"), "w") as f:
            for name, seedruns in runs.items():
                for seed, convs in seedruns.items():
                    for j, c in enumerate(convs):
                        f.write(json.dumps({"method": name, "seed": seed, "problem": j, "question": c.problem.question,
                                            "answer": c.problem.answer, "solved_at": c.solved_at,
                                            "turns": [asdict(t) for t in c.turns]}) + "\n")
        if not final:  # partial results: the table and JSON only, the PNG once at the end
            return summary
        plot(summary, args.turns, os.path.join(args.out, "accuracy_vs_turn.png"),
             f"SmolLM2-135M-Instruct, {len(problems)} problems x {len(args.seeds)} seeds, {args.decoding}"
             if args.model == "smollm2" else f"{args.model} model")
        return summary

    runs = run_experiment(model, tok, problems, specs, turns=args.turns, seeds=args.seeds,
                          max_new_tokens=args.max_new_tokens, do_sample=args.decoding == "sample",
                          temperature=args.temperature, batch_size=args.batch_size, quiet=args.quiet,
                          on_done=(lambda r: write(r, False)) if args.out else None)
    summary = write(runs, True)
    print(markdown_table(summary, args.turns))
    print(f"wall time {time.perf_counter() - t0:.0f} s (model load {load_s:.0f} s)")
    if args.out:
        print(f"wrote {args.out}/results.json, results.md, accuracy_vs_turn.png, runs.jsonl")
    return 0


if __name__ == "__main__":
    sys.exit(main())
