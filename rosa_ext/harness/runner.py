"""The experiment's loop: the conversations of a chunk of problems through K turns under each method.

:func:`run_chunk` generates a chunk's turn-1 answers once (shared by every method, so all methods start
from identical first answers), then carries each method's failed conversations through turns 2..K
(:func:`_run_spec`): after a wrong answer the learners update (:func:`_update_chunk`: one batched ROSA
update of the failed conversations through :class:`~rosa_ext.integrations.users.RosaUsers`, or the PG
step per conversation, fair forms through :func:`fair_pg_update`; the hidden shift capped by
:func:`cap_shift`), the feedback prompt is appended and the next answer continues from the key/value
cache (:mod:`rosa_ext.harness.generation`). :func:`run_method` runs one method over many chunks;
:func:`first_turn` gives the shared turn-1 answers alone. Each conversation is a :class:`Conversation`.
"""
from __future__ import annotations

import copy
import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Set, Tuple

import torch

from ..core import rosa_update
from ..integrations.model_lookup import find_body, find_lm_head, head_bias, head_weight
from ..integrations.users import RosaUsers
from .attainment import target_attainment
from .controls import BanRejectedNumbers, guess_text
from .conversation import DEFAULT_FEEDBACK, TurnRecord, answer_token_span, start_messages
from .generation import (
    _continue,
    _Gen,
    _generate,
    _left_pad,
    _Out,
    _pad_id,
    chat_tensor,
    experiment_users,
    generate_batch,
    user_key,
)
from .methods import PG_STEPS, REWARDS, MethodSpec
from .pg_baseline import pg_step
from .problems import Problem
from .rewards import boxed_answer, is_correct, normalize_answer


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
