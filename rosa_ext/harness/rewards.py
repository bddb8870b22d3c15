"""Rewards for the multi-turn loop: the rule-based ``\\boxed{}`` check and hooks.

- :func:`boxed_answer` extracts the content of the *last* ``\\boxed{...}`` in a
  response, matching nested braces (``\\boxed{\\frac{1}{2}}``).
- :func:`rule_reward`: +1 if that answer equals the ground truth, else -1
  (a missing box is wrong), as the paper's rule-based reward.
- :func:`judge_reward`: wraps any judge ``(problem, response) -> score in [0, 1]``
  (a model-based, dense reward) and checks the range.
- :func:`dense_reward`: a judge-free graded reward in [0, 1] (1 right; partial
  credit for a boxed number close to the answer), used by the experiment as the
  dense-reward variant.
"""
from __future__ import annotations

import math
import re
from typing import Any, Callable, Optional, Tuple

_BOX = "\\boxed"
_NUM = re.compile(r"^[+-]?(\d+(\.\d*)?|\.\d+)$")


def boxed_span(text: str) -> Optional[Tuple[int, int]]:
    """Character range ``[lo, hi)`` of the content of the last *closed* ``\\boxed{...}``
    in ``text`` (nested braces matched; an unclosed last box falls back to the one before),
    or None. :func:`boxed_answer` reads this span."""
    if not isinstance(text, str):
        raise TypeError(f"boxed_span: expected a str, got {type(text).__name__}")
    start = text.rfind(_BOX)
    while start != -1:
        i = start + len(_BOX)
        while i < len(text) and text[i].isspace():
            i += 1
        if i < len(text) and text[i] == "{":
            depth, j = 0, i
            while j < len(text):
                if text[j] == "{":
                    depth += 1
                elif text[j] == "}":
                    depth -= 1
                    if depth == 0:
                        return i + 1, j
                j += 1
        start = text.rfind(_BOX, 0, start)
    return None


def boxed_answer(text: str) -> Optional[str]:
    """The content of the last ``\\boxed{...}`` in ``text`` (nested braces matched), or None.

    Whitespace inside is removed (``\\boxed{ 4 2 }`` -> ``"42"``); an unclosed box
    gives None.
    """
    if not isinstance(text, str):
        raise TypeError(f"boxed_answer: expected a str, got {type(text).__name__}")
    span = boxed_span(text)
    return None if span is None else "".join(text[span[0]:span[1]].split())


def normalize_answer(ans: str) -> str:
    """Canonical form for comparison: no whitespace, outer braces and ``$`` stripped,
    thousands separators dropped, numbers as their value (``42.0`` == ``42``)."""
    s = "".join(str(ans).split()).strip("$")
    while s.startswith("{") and s.endswith("}"):
        s = s[1:-1]
    s = s.replace(",", "")
    if _NUM.match(s):
        v = float(s)
        return str(int(v)) if v.is_integer() else repr(v)
    return s


def _truth(problem: Any) -> str:
    ans = problem["answer"] if isinstance(problem, dict) else getattr(problem, "answer", problem)
    return normalize_answer(str(ans))


def is_correct(problem: Any, response: str) -> bool:
    """True when the response's final boxed answer equals the problem's answer."""
    got = boxed_answer(response)
    return got is not None and normalize_answer(got) == _truth(problem)


def rule_reward(problem: Any, response: str) -> float:
    """Rule-based reward: +1.0 if the final ``\\boxed{}`` answer is right, else -1.0.

    ``problem`` is anything with an ``answer`` (attribute or key) or the answer itself.
    """
    return 1.0 if is_correct(problem, response) else -1.0


def dense_reward(problem: Any, response: str) -> float:
    """Graded reward in [0, 1] without a judge model.

    1.0 for the right answer; for a wrong boxed number ``exp(-|got - truth| / max(1, |truth|))``
    scaled to at most 0.5 (closer answers score higher); 0.0 without a boxed number.
    Use with :func:`judge_reward` semantics (a score in [0, 1]).
    """
    if is_correct(problem, response):
        return 1.0
    got = boxed_answer(response)
    truth = _truth(problem)
    try:
        g, t = float(normalize_answer(got)), float(truth)
    except (TypeError, ValueError):
        return 0.0
    return 0.5 * math.exp(-abs(g - t) / max(1.0, abs(t)))


def judge_reward(judge: Callable[[Any, str], float]) -> Callable[[Any, str], float]:
    """Wrap a judge ``(problem, response) -> score in [0, 1]`` as a checked reward function.

    The wrapper raises ValueError for a score outside [0, 1] or not finite, so a
    broken judge never reaches the update.
    """
    if not callable(judge):
        raise TypeError("judge_reward: `judge` must be callable (problem, response) -> float in [0, 1]")

    def reward(problem: Any, response: str) -> float:
        score = float(judge(problem, response))
        if not (math.isfinite(score) and 0.0 <= score <= 1.0):
            raise ValueError(f"judge_reward: the judge returned {score}; scores must be in [0, 1]")
        return score

    reward.__name__ = f"judge_reward({getattr(judge, '__name__', 'judge')})"
    return reward


def centered(reward_fn: Callable[[Any, str], float], center: float = 0.5, scale: float = 2.0
             ) -> Callable[[Any, str], float]:
    """Map a [0, 1] score to a signed reward ``scale * (score - center)`` (0.5 -> 0, 1 -> +1, 0 -> -1),
    so that a judge's low scores push the response down and high scores up."""

    def reward(problem: Any, response: str) -> float:
        return scale * (reward_fn(problem, response) - center)

    reward.__name__ = f"centered({getattr(reward_fn, '__name__', 'reward')})"
    return reward
