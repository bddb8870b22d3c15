"""Rule-based and judge rewards."""
import math

import pytest

from rosa_ext.harness.problems import Problem
from rosa_ext.harness.rewards import (
    boxed_answer,
    centered,
    dense_reward,
    is_correct,
    judge_reward,
    normalize_answer,
    rule_reward,
)


@pytest.mark.parametrize("text,want", [
    ("so \\boxed{42}.", "42"),
    ("\\boxed{ 4 2 }", "42"),
    ("\\boxed {7}", "7"),
    ("first \\boxed{1} then \\boxed{2}", "2"),
    ("\\boxed{\\frac{1}{2}}", "\\frac{1}{2}"),
    ("\\boxed{{42}}", "{42}"),
    ("\\boxed{}", ""),
    ("no box here", None),
    ("\\boxed{42", None),
    ("\\boxed{1} and an unclosed \\boxed{2", "1"),
])
def test_boxed_answer(text, want):
    assert boxed_answer(text) == want


@pytest.mark.parametrize("a,b", [("42", "42.0"), ("{42}", "42"), ("1,000", "1000"), ("$5$", "5"), ("-3", "-3.00")])
def test_normalize_equal(a, b):
    assert normalize_answer(a) == normalize_answer(b)


def test_rule_reward():
    p = Problem("What is 40 + 2?", "42")
    assert rule_reward(p, "The answer is \\boxed{42}.") == 1.0
    assert rule_reward(p, "The answer is \\boxed{ {42} }") == 1.0
    assert rule_reward(p, "The answer is \\boxed{43}.") == -1.0
    assert rule_reward(p, "The answer is 42.") == -1.0  # no box: wrong
    assert rule_reward({"question": "q", "answer": "42"}, "\\boxed{42}") == 1.0
    assert rule_reward("7", "\\boxed{7}") == 1.0
    assert is_correct(p, "\\boxed{41} no wait \\boxed{42}")


def test_dense_reward_is_graded():
    p = Problem("q", "42")
    right, near, far, none = (dense_reward(p, t) for t in ("\\boxed{42}", "\\boxed{41}", "\\boxed{400}", "42"))
    assert right == 1.0 and 0.5 >= near > far > 0 and none == 0.0


def test_judge_reward_checks_range():
    ok = judge_reward(lambda prob, text: 0.25)
    assert ok(None, "x") == 0.25
    assert centered(ok)(None, "x") == pytest.approx(-0.5)
    for bad in (1.5, -0.1, math.nan):
        with pytest.raises(ValueError, match=r"\[0, 1\]"):
            judge_reward(lambda prob, text, v=bad: v)(None, "x")
    with pytest.raises(TypeError):
        judge_reward(3)
