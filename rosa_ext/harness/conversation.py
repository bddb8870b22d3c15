"""The paper's multi-turn loop: generate, score, give feedback, update, repeat.

:func:`interact` runs one problem for up to ``turns`` turns. After a wrong
answer the reward goes to ``adapter.update`` (a :class:`~rosa_ext.integrations.session.RosaSession`,
the policy-gradient baseline, or None for plain multi-turn prompting) and the
feedback prompt is appended to the chat, as in the paper's evaluation
(Algorithm 1; Appendix D.3). The paper's extraction lost the exact wording of
its feedback prompt; :data:`DEFAULT_FEEDBACK` is ours.
"""
from __future__ import annotations

import time
from dataclasses import dataclass, field
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..common import defaults
from ..integrations.head_hooks import eos_ids
from ..integrations.model_lookup import find_lm_head, head_weight
from .problems import Problem
from .rewards import boxed_span, is_correct

#: Appended after the question (the rule-based reward reads the final \boxed{}).
ANSWER_INSTRUCTION = " Put the final answer in \\boxed{}."
#: The user's message after a wrong answer (ours; the paper's text was lost in extraction).
DEFAULT_FEEDBACK = ("Your answer is incorrect. Please check your reasoning and try again. "
                    "Put the final answer in \\boxed{}.")
#: One worked exchange put before every question. Without it SmolLM2-135M-Instruct
#: almost never writes ``\boxed{}`` (0-5% on our probe, so the rule-based reward
#: would score formatting, not arithmetic); with it ~100% of answers are boxed.
FEW_SHOT: List[Dict[str, str]] = [
    {"role": "user", "content": "What is 3 + 5?" + ANSWER_INSTRUCTION},
    {"role": "assistant", "content": "3 + 5 = 8. The answer is \\boxed{8}."},
]


@dataclass
class TurnRecord:
    """One answer of a conversation (:func:`interact` and the batched experiment).

    ``text``, ``reward``, ``correct``, ``tokens`` (response length). When an update followed
    this answer: ``update_ms`` its wall time (the session's includes its one no-grad body
    forward; the experiment's is the batched update divided by the batch size),
    ``update_norm`` ||delta||, ``logp_before``/``logp_after`` the mean log-prob of the
    update's target tokens (the whole response, or the answer span with
    ``update_on="answer_span"``) before/after the update (None unless measured);
    ``target_tokens`` how many tokens the update targeted and ``logp_target`` the mean of ROSA's
    target log p*_t over them (None for an update without a ROSA target, e.g. the PG step).
    ``exp(target_tokens * logp_before)`` is then the probability of the targeted tokens (e.g. the
    rejected answer) before the update, and likewise after it and the target.

    The experiment also records the step's target attainment (means per targeted token,
    :func:`rosa_ext.harness.attainment.target_attainment`): ``dlogp_achieved`` (after - before),
    ``dlogp_predicted`` (the linearised step's (J delta)_t / p_t), ``dlogp_target`` (ROSA's
    log p* - log p) and ``attainment`` = achieved / target (None when the target is 0); in hidden mode
    ``shift_norm`` (||delta|| after the update) and ``hidden_norm`` (the answer's mean lm_head input norm).
    """

    text: str
    reward: float
    correct: bool
    tokens: int
    update_ms: Optional[float] = None
    update_norm: Optional[float] = None
    logp_before: Optional[float] = None
    logp_after: Optional[float] = None
    target_tokens: Optional[int] = None
    logp_target: Optional[float] = None
    dlogp_achieved: Optional[float] = None
    dlogp_predicted: Optional[float] = None
    dlogp_target: Optional[float] = None
    attainment: Optional[float] = None
    shift_norm: Optional[float] = None
    hidden_norm: Optional[float] = None


@dataclass
class InteractResult:
    """Outcome of one problem: per-turn ``rewards`` and ``turns``, ``solved_at`` (0-based
    turn of the first correct answer, or None), and the chat ``transcript`` (from the
    question on; the few-shot prefix is left out)."""

    problem: Problem
    rewards: List[float] = field(default_factory=list)
    turns: List[TurnRecord] = field(default_factory=list)
    solved_at: Optional[int] = None
    transcript: List[Dict[str, str]] = field(default_factory=list)

    @property
    def steps(self) -> List[Dict[str, float]]:
        """One dict per update that ran: ``turn`` (0-based), ``update_ms``, ``update_norm``
        (||delta||), ``logp_before``, ``logp_after``, ``logp_change`` (after - before)."""
        out = []
        for k, t in enumerate(self.turns):
            if t.update_ms is None:
                continue
            change = None if t.logp_before is None else t.logp_after - t.logp_before
            out.append(dict(turn=k, update_ms=t.update_ms, update_norm=t.update_norm,
                            logp_before=t.logp_before, logp_after=t.logp_after, logp_change=change))
        return out


def _as_problem(problem: Any) -> Problem:
    if isinstance(problem, Problem):
        return problem
    if isinstance(problem, dict) and "question" in problem and "answer" in problem:
        return Problem(str(problem["question"]), str(problem["answer"]))
    if hasattr(problem, "question") and hasattr(problem, "answer"):
        return Problem(str(problem.question), str(problem.answer))
    raise TypeError("interact: `problem` needs a `question` and an `answer` (Problem, dict or object)")


def chat_ids(tokenizer, messages: List[Dict[str, str]], device: torch.device) -> torch.Tensor:
    """(1, T) int64 ids of ``messages`` with the generation prompt appended."""
    enc = tokenizer.apply_chat_template(messages, add_generation_prompt=True, return_tensors="pt",
                                        return_dict=True)
    return enc["input_ids"].to(device)


def response_logp(model, ids: torch.Tensor, start: int, mask: Optional[torch.Tensor] = None) -> float:
    """Mean log-prob of ``ids[0, start:]`` under ``model`` (one forward).

    ``mask`` (T,) bool over ``ids`` (1, T): average only over the masked response tokens
    (e.g. :func:`answer_span_mask`, the tokens an ``update_on="answer_span"`` update targets).
    """
    with torch.no_grad():
        logits = model(ids).logits[0, start - 1:-1].float()
    lp = torch.log_softmax(logits, -1).gather(1, ids[0, start:, None]).squeeze(1)
    if mask is not None:
        lp = lp[mask[start:].to(lp.device)]
    return float(lp.mean())


def answer_token_span(tokenizer, response_ids: Sequence[int]) -> Optional[Tuple[int, int]]:
    """Token range ``[first, last)`` of the *content* of the final ``\\boxed{...}`` in a response.

    These are the tokens of the answer itself (``12`` in ``... \\boxed{12}.``): the
    tokens whose decoded characters overlap the box's content. None without a closed
    box or with an empty one. Token boundaries come from decoding growing prefixes
    (responses are short, so the quadratic cost is negligible).
    """
    toks = [int(t) for t in response_ids]
    text = tokenizer.decode(toks, skip_special_tokens=True)
    span = boxed_span(text)  # the box boxed_answer reads (an unclosed last box falls back)
    if span is None or not text[span[0]:span[1]].strip():
        return None
    lo, hi = span  # text[lo:hi] is the content
    first = last = None
    for i in range(len(toks)):
        n = len(tokenizer.decode(toks[: i + 1], skip_special_tokens=True))
        if first is None and n > lo:
            first = i
        if n >= hi:
            last = i + 1
            break
    if first is None or last is None or last <= first:
        return None
    return first, last


def answer_span_mask(tokenizer, ids: torch.Tensor, start: int) -> Optional[torch.Tensor]:
    """(T,) bool mask over ``ids`` (1, T) of the final boxed answer's content tokens
    (:func:`answer_token_span` of the response ``ids[0, start:]``), or None without a box."""
    span = answer_token_span(tokenizer, ids[0, start:].tolist())
    if span is None:
        return None
    mask = torch.zeros(ids.shape[1], dtype=torch.bool, device=ids.device)
    mask[start + span[0]: start + span[1]] = True
    return mask


def start_messages(problem: Problem, few_shot: Optional[List[Dict[str, str]]] = None) -> List[Dict[str, str]]:
    """The opening chat: the few-shot exchange (default :data:`FEW_SHOT`; ``[]`` for none) and the question."""
    shots = FEW_SHOT if few_shot is None else few_shot
    return [dict(m) for m in shots] + [{"role": "user", "content": problem.question + ANSWER_INSTRUCTION}]


def _recorded_update(model, tokenizer, session, rec: TurnRecord, hidden: torch.Tensor, resp: torch.Tensor,
                     reward: float, update_on: str, measure: bool) -> None:
    """One ROSA step of ``session`` on the answer it just generated and recorded, without a second forward:
    ``session.update(reward=r)`` on every response token, or, for ``update_on="answer_span"``, the step on
    the boxed answer's tokens from the recorded lm_head inputs (``hidden`` (n, d), the harness's copy of
    them) via ``session.update_from_hidden``. Fills ``rec``'s update fields (log p before/after/target of
    the targeted tokens from ``hidden``, exact, no forward)."""
    from .attainment import target_attainment

    mask = torch.ones(resp.numel(), dtype=torch.bool, device=resp.device)
    span = answer_token_span(tokenizer, resp.tolist()) if update_on == "answer_span" else None
    if span is not None:
        mask.zero_()
        mask[span[0]: span[1]] = True
    before = session.state_dict() if measure else None
    t0 = time.perf_counter()
    if span is None:
        step = session.update(reward=reward)
    else:
        step = session.update_from_hidden(hidden[mask.to(hidden.device)], resp[mask], reward)
    rec.update_ms = 1000.0 * (time.perf_counter() - t0)
    rec.update_norm = float(torch.linalg.vector_norm(step.update.float()))
    if measure:
        W = head_weight(find_lm_head(model, "interact"), "interact").detach()
        h = hidden[mask.to(hidden.device)].to(W.device)
        att = target_attainment(h, W, resp[mask].to(W.device), before, step.update.to(W.device), float(reward),
                                float(session.config.beta))
        for key, v in att.items():
            setattr(rec, key, v)


def interact(model, tokenizer, problem: Any, reward_fn: Callable[[Any, str], float], turns: int = 5, *,
             session: Any = None, adapter: Any = None, mode: Optional[str] = None, beta: float = defaults.BETA,
             damping: float = defaults.DAMPING, damping_mode: str = defaults.DAMPING_MODE,
             feedback_prompt: str = DEFAULT_FEEDBACK, max_new_tokens: int = 48,
             do_sample: bool = False, temperature: float = 0.7, seed: int = 0, update_on: str = "response",
             few_shot: Optional[List[Dict[str, str]]] = None, measure_logp: bool = True,
             is_solved: Callable[[Any, str], bool] = is_correct,
             on_turn: Optional[Callable[[int, TurnRecord], None]] = None) -> InteractResult:
    """Run the multi-turn feedback loop on one problem.

    Args:
        model, tokenizer: a transformers causal LM and its tokenizer (chat template).
        problem: a :class:`Problem` (or dict/object with ``question`` and ``answer``).
        reward_fn: ``(problem, response_text) -> float``, e.g. :func:`rosa_ext.harness.rewards.rule_reward`.
        turns: K, the maximum number of answers.
        session: what learns from the rewards: a :class:`~rosa_ext.integrations.session.RosaSession`,
            the policy-gradient baseline (:class:`rosa_ext.harness.pg_baseline.PGSession`) -- any object with
            ``update(input_ids, reward, response_start=.. | response_mask=..)`` and ``reset()``.
            It is reset at the start and updated after every wrong answer but the last.
            ``adapter`` is an alias. With neither, ``mode="lora"|"hidden"`` attaches a ROSA
            session (``beta``, ``damping``, ``damping_mode``) for this call and detaches it at the end; with
            no mode either, this is plain multi-turn prompting (the baseline).
        feedback_prompt: the user's message after a wrong answer.
        max_new_tokens, do_sample, temperature, seed: decoding (sampling is seeded per turn).
        update_on: "response" (every response token enters the target) or "answer_span"
            (only the final boxed answer's content tokens, :func:`answer_token_span`; all
            response tokens when there is no box).
            "answer" is accepted as an alias of "answer_span".
        few_shot: messages put before the question (default :data:`FEW_SHOT`, ``[]`` for none).
        measure_logp: record the response's mean log-prob before/after each update.
        is_solved: ``(problem, text) -> bool``; default: the boxed answer is right.
        on_turn: callback ``(turn_index, TurnRecord)`` after each turn (progress output).
    Returns:
        :class:`InteractResult`.
    """
    prob = _as_problem(problem)
    if isinstance(turns, bool) or int(turns) != turns or turns < 1:
        raise ValueError(f"interact: `turns` must be an int >= 1, got {turns}")
    if update_on == "answer":
        update_on = "answer_span"
    if update_on not in ("response", "answer_span"):
        raise ValueError(f"interact: `update_on` must be 'response' or 'answer_span', got {update_on!r}")
    if session is not None and adapter is not None and session is not adapter:
        raise ValueError("interact: pass `session` or `adapter` (an alias), not both")
    adapter = session if session is not None else adapter
    own = None
    if adapter is None and mode is not None:
        from ..integrations.session import attach
        own = adapter = attach(model, mode=mode, beta=beta, damping=damping, damping_mode=damping_mode)
    try:
        return _loop(model, tokenizer, prob, reward_fn, int(turns), adapter, feedback_prompt, max_new_tokens,
                     do_sample, temperature, seed, update_on, few_shot, measure_logp, is_solved, on_turn)
    finally:
        if own is not None:
            own.detach()


def _loop(model, tokenizer, prob: Problem, reward_fn, turns: int, adapter, feedback_prompt: str,
          max_new_tokens: int, do_sample: bool, temperature: float, seed: int, update_on: str,
          few_shot, measure_logp: bool, is_solved, on_turn) -> InteractResult:
    device = next(model.parameters()).device
    if adapter is not None:
        adapter.reset()
    # a ROSA session updates from what its own generate recorded: no second forward of the body
    recording = adapter is not None and hasattr(adapter, "generate") and hasattr(adapter, "update_from_hidden")
    messages = start_messages(prob, few_shot)
    n_prefix = len(messages) - 1
    result = InteractResult(problem=prob)
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else tokenizer.eos_token_id
    for k in range(turns):
        prompt = chat_ids(tokenizer, messages, device)
        start = prompt.shape[1]
        gen_kwargs: Dict[str, Any] = dict(max_new_tokens=max_new_tokens, do_sample=do_sample, pad_token_id=pad,
                                          attention_mask=torch.ones_like(prompt))
        if do_sample:
            gen_kwargs.update(temperature=temperature, top_p=1.0, top_k=0)
            torch.manual_seed(int(seed) * 1000 + k)
        else:
            gen_kwargs.update(temperature=None, top_p=None, top_k=None)
        rows: List[torch.Tensor] = []
        if recording:  # the session records lm_head's inputs; the harness keeps a copy for its measurement
            handle = find_lm_head(model, "interact").register_forward_pre_hook(
                lambda mod, a, rows=rows: rows.append(a[0][:, -1, :].detach().float().clone()), prepend=True)
            try:
                out = adapter.generate(prompt, **gen_kwargs)
            finally:
                handle.remove()
        else:
            with torch.no_grad():
                out = model.generate(prompt, **gen_kwargs)
        resp = out[0, start:]
        eos = eos_ids(model, gen_kwargs) if recording else [tokenizer.eos_token_id]
        hit = torch.nonzero(torch.isin(resp, torch.tensor([e for e in eos if e is not None], dtype=resp.dtype,
                                                          device=resp.device))).flatten()
        if hit.numel():  # keep the first EOS, drop what follows
            resp = resp[: int(hit[0]) + 1]
        text = tokenizer.decode(resp, skip_special_tokens=True)
        reward = float(reward_fn(prob, text))
        rec = TurnRecord(text=text, reward=reward, correct=bool(is_solved(prob, text)),
                         tokens=int(resp.numel()))
        result.rewards.append(reward)
        result.turns.append(rec)
        messages.append({"role": "assistant", "content": text})
        if rec.correct:
            result.solved_at = k
        elif recording and k < turns - 1 and resp.numel() > 0:
            _recorded_update(model, tokenizer, adapter, rec, torch.stack(rows[: resp.numel()], 1)[0], resp,
                             reward, update_on, measure_logp)
        elif adapter is not None and k < turns - 1 and resp.numel() > 0:
            ids = torch.cat([prompt, resp.unsqueeze(0)], dim=1)
            kw: Dict[str, Any] = {"response_start": start}
            mask = None
            if update_on == "answer_span":
                mask = answer_span_mask(tokenizer, ids, start)
                if mask is not None:
                    kw = {"response_mask": mask}
            if measure_logp:
                rec.logp_before = response_logp(model, ids, start, mask)
            t0 = time.perf_counter()
            step = adapter.update(ids, reward, **kw)
            rec.update_ms = 1000.0 * (time.perf_counter() - t0)
            upd = getattr(step, "update", None)
            if isinstance(upd, torch.Tensor):
                rec.update_norm = float(torch.linalg.vector_norm(upd.float()))
            lp, g = getattr(step, "logp", None), getattr(step, "target", None)
            if isinstance(lp, torch.Tensor) and isinstance(g, torch.Tensor) and lp.numel() > 0:
                rec.target_tokens = int(lp.numel())
                rec.logp_target = float(torch.log(torch.exp(lp.double()) + g.double()).mean())
            if measure_logp:
                rec.logp_after = response_logp(model, ids, start, mask)
        if on_turn is not None:
            on_turn(k, rec)
        if rec.correct or k == turns - 1:
            break
        messages.append({"role": "user", "content": feedback_prompt})
    result.transcript = messages[n_prefix:]
    return result
