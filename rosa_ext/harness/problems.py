"""Generated arithmetic and short word problems for the multi-turn experiment.

Every problem has a small integer answer that the rule-based reward reads from
``\\boxed{N}``. Problems come from a seeded ``random.Random`` so a (family, seed,
n) triple always gives the same list; :func:`heldout_split` returns a
development set (for choosing settings) and a disjoint held-out test set.

Families (``FAMILIES``), chosen so that SmolLM2-135M-Instruct is right on the
first try about half of the time (measured on a probe, see
``benchmarks/results/experiment/README.md``):

- ``add1``: one-digit addition, ``What is 7 + 5?``
- ``sub1``: ``a - b`` with a in 6..29 and b one-digit, ``What is 14 - 6?``
- ``word``: one-step word problems with one-digit numbers (apples, books, ...),
  addition or subtraction.
- ``mul1``: one-digit multiplication (harder for the model).
- ``add2``: two-digit addition (hard: ~10% first-try accuracy).

Harder families for larger models (Qwen2.5-Coder-0.5B-Instruct answers ~85% of the
default mix right on its first try). Its greedy first-try accuracy on 10 development problems
of each, 40 new tokens (benchmarks/results/experiment/qwen25_coder_dev_first_turn.json, "probe"):

- ``sub2``: two-digit subtraction, ``What is 82 - 44?`` (8/10)
- ``add3``: three-digit addition, ``What is 581 + 286?`` (8/10)
- ``multeen``: ``a * b`` with a in 11..49 and b in 11..19, ``What is 23 * 17?`` (6/10)
- ``mul21``: two-digit times one-digit, ``What is 47 * 8?`` (10/10)
- ``mul22``: two-digit times two-digit, ``What is 47 * 36?`` (2/10)
- ``chain3``: three two-digit terms, ``What is 47 + 38 - 19?`` (1/10)
- ``chain3s``: two-digit plus one-digit minus one-digit, ``What is 32 + 8 - 5?`` (1/10)
- ``muladd``: one product plus a two-digit term, ``What is 7 * 8 + 46?`` (2/10)
- ``muladds``: one product plus a one-digit term, ``What is 9 * 4 + 6?`` (0/10)
- ``word2``: two-step word problems (packs of items, then some given away) (0/10: the model
  reasons step by step and does not reach ``\boxed{}`` within 40 tokens)

(``add2``: 10/10 for this model.) :data:`PROBLEM_SETS` names the mixes the experiments use.
"""
from __future__ import annotations

import random
from dataclasses import dataclass
from typing import Callable, Dict, List, Sequence, Tuple


@dataclass
class Problem:
    """One task: ``question`` (str) and its ground-truth ``answer`` (str)."""

    question: str
    answer: str


_NAMES = ["Tom", "Anna", "Ben", "Lucy", "Sam", "Mia", "Leo", "Emma", "Max", "Zoe"]
_THINGS = ["apples", "books", "pencils", "cookies", "marbles", "stickers", "cards", "balls"]


def _add1(rng: random.Random) -> Problem:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return Problem(f"What is {a} + {b}?", str(a + b))


def _sub1(rng: random.Random) -> Problem:
    a = rng.randint(6, 29)
    b = rng.randint(2, min(9, a - 1))
    return Problem(f"What is {a} - {b}?", str(a - b))


def _mul1(rng: random.Random) -> Problem:
    a, b = rng.randint(2, 9), rng.randint(2, 9)
    return Problem(f"What is {a} * {b}?", str(a * b))


def _add2(rng: random.Random) -> Problem:
    a, b = rng.randint(10, 89), rng.randint(10, 89)
    return Problem(f"What is {a} + {b}?", str(a + b))


def _sub2(rng: random.Random) -> Problem:
    a = rng.randint(30, 99)
    b = rng.randint(11, a - 1)
    return Problem(f"What is {a} - {b}?", str(a - b))


def _add3(rng: random.Random) -> Problem:
    a, b = rng.randint(100, 899), rng.randint(100, 899)
    return Problem(f"What is {a} + {b}?", str(a + b))


def _mul_teen(rng: random.Random) -> Problem:
    a, b = rng.randint(11, 49), rng.randint(11, 19)
    return Problem(f"What is {a} * {b}?", str(a * b))


def _mul21(rng: random.Random) -> Problem:
    a, b = rng.randint(12, 99), rng.randint(3, 9)
    return Problem(f"What is {a} * {b}?", str(a * b))


def _mul22(rng: random.Random) -> Problem:
    a, b = rng.randint(12, 99), rng.randint(12, 99)
    return Problem(f"What is {a} * {b}?", str(a * b))


def _chain3(rng: random.Random) -> Problem:
    a, b = rng.randint(10, 99), rng.randint(10, 99)
    c = rng.randint(10, min(99, a + b - 1))
    return Problem(f"What is {a} + {b} - {c}?", str(a + b - c))


def _chain3_small(rng: random.Random) -> Problem:
    a, b, c = rng.randint(10, 49), rng.randint(2, 9), rng.randint(2, 9)
    return Problem(f"What is {a} + {b} - {c}?", str(a + b - c))


def _muladd_small(rng: random.Random) -> Problem:
    a, b, c = rng.randint(2, 9), rng.randint(2, 9), rng.randint(2, 9)
    return Problem(f"What is {a} * {b} + {c}?", str(a * b + c))


def _muladd(rng: random.Random) -> Problem:
    a, b, c = rng.randint(3, 9), rng.randint(3, 9), rng.randint(11, 99)
    return Problem(f"What is {a} * {b} + {c}?", str(a * b + c))


def _word2(rng: random.Random) -> Problem:
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    boxes, per, start = rng.randint(3, 9), rng.randint(4, 12), rng.randint(5, 30)
    gone = rng.randint(2, start + boxes * per - 1)
    q = (f"{name} has {start} {thing} and buys {boxes} packs of {per} {thing} each. Then {name} gives {gone} "
         f"{thing} away. How many {thing} does {name} have now?")
    return Problem(q, str(start + boxes * per - gone))


def _word(rng: random.Random) -> Problem:
    name, thing = rng.choice(_NAMES), rng.choice(_THINGS)
    a = rng.randint(3, 9)
    if rng.random() < 0.5:
        b = rng.randint(2, 9)
        q = f"{name} has {a} {thing} and gets {b} more. How many {thing} does {name} have now?"
        return Problem(q, str(a + b))
    b = rng.randint(1, a - 1)
    q = f"{name} has {a} {thing} and gives {b} away. How many {thing} does {name} have left?"
    return Problem(q, str(a - b))


FAMILIES: Dict[str, Callable[[random.Random], Problem]] = {
    "add1": _add1, "sub1": _sub1, "word": _word, "mul1": _mul1, "add2": _add2,
    "sub2": _sub2, "add3": _add3, "multeen": _mul_teen, "mul21": _mul21, "mul22": _mul22,
    "chain3": _chain3, "chain3s": _chain3_small, "muladd": _muladd, "muladds": _muladd_small, "word2": _word2,
}
#: The experiment's mix (see the module docstring).
DEFAULT_MIX: Tuple[str, ...] = ("sub1", "word")
#: Named mixes for :func:`heldout_split` (``--problem-set`` of the experiment CLI):
#: ``default`` for SmolLM2-135M-Instruct, ``qwen-mix`` for Qwen2.5-Coder-0.5B-Instruct (chosen on
#: the development split, benchmarks/results/experiment/qwen25_coder_dev_first_turn.json).
PROBLEM_SETS: Dict[str, Tuple[str, ...]] = {
    "default": DEFAULT_MIX,
    "qwen-mix": ("multeen", "chain3s", "mul22"),
}


def make_problems(n: int, *, seed: int = 0, families: Sequence[str] = DEFAULT_MIX,
                  exclude: Sequence[Problem] = ()) -> List[Problem]:
    """``n`` distinct problems, drawn round-robin from ``families`` with ``random.Random(seed)``.

    Args:
        n: how many (>= 1).
        seed: generator seed; the same arguments always give the same list.
        families: names from :data:`FAMILIES`.
        exclude: problems whose questions must not appear (keeps splits disjoint).
    Raises:
        ValueError: unknown family, or fewer than ``n`` distinct problems exist.
    """
    if n < 1:
        raise ValueError(f"make_problems: n must be >= 1, got {n}")
    bad = [f for f in families if f not in FAMILIES]
    if bad or not families:
        raise ValueError(f"make_problems: unknown families {bad}; choose from {sorted(FAMILIES)}")
    rng = random.Random(seed)
    seen = {p.question for p in exclude}
    out: List[Problem] = []
    tries = 0
    while len(out) < n:
        fam = families[len(out) % len(families)]
        p = FAMILIES[fam](rng)
        tries += 1
        if tries > 200 * n:
            raise ValueError(f"make_problems: could not draw {n} distinct problems from {list(families)}")
        if p.question in seen:
            continue
        seen.add(p.question)
        out.append(p)
    return out


def heldout_split(n_dev: int = 60, n_test: int = 240, *, seed: int = 2024,
                  families: Sequence[str] = DEFAULT_MIX) -> Tuple[List[Problem], List[Problem]]:
    """(dev, test): ``n_dev`` problems for choosing settings and ``n_test`` disjoint held-out ones."""
    dev = make_problems(n_dev, seed=seed, families=families)
    test = make_problems(n_test, seed=seed + 1, families=families, exclude=dev)
    return dev, test
