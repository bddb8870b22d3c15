"""A mechanical degeneration measure for the multi-turn experiment's answers.

An update that only pushes the rejected answer down can make a model change its boxed number without
working the problem: it copies the user's feedback sentence as its reply and boxes a number it never
derived, and over the turns the boxed numbers walk (40, 42, 44 ...). Counting such a lucky number as a
correction credits guessing. This module labels every answer by rules on its text alone (no model):

- **copies the feedback**: the answer shares a run of :data:`COPY_WORDS` consecutive words with the
  user's feedback message (lower-cased words; :func:`copies_feedback`).
- **derived**: the boxed number is the right-hand end of an arithmetic chain in the text, ``E = ... = x``
  with an operator in ``E`` (right or wrong arithmetic: the number was worked out, :func:`chains`).
- **sound**: derived by a chain whose every side evaluates to ``x`` and whose first side uses only
  numbers of the question or values the answer derived before (``23 * 17 = 340 + 51 = 391``;
  ``32 + 8 = 40. 40 - 5 = 35``).
- **small step**: the boxed number differs from the previous answer's by 1 or 2.
- **walk**: this boxed number and the two before are strictly monotone (``10, 22, 28``; ``40, 42, 44``).
- **repeat**: the boxed number was already rejected in this conversation.

A **sensible correction** is a right answer after turn 1 that is sound and does not copy the feedback:
the response works the problem and boxes the right number. :func:`sensible_solved_at` counts only
those as solving a problem (turn 1 counts as it is: it is shared by every method), which gives the
"Acc@K, sensible corrections only" of the results.
"""
from __future__ import annotations

import ast
import re
from dataclasses import asdict, dataclass
from typing import Any, Dict, Iterable, List, Optional, Sequence, Set

from .rewards import boxed_answer, boxed_span, normalize_answer

#: Consecutive words an answer must share with the feedback message to count as copying it.
COPY_WORDS = 5

_WORD = re.compile(r"[a-z0-9']+")
_OPS = {"+", "-", "*", "/"}
# a number (thousands commas and a decimal part allowed), an operator, a bracket, "=", or anything else
_TOKEN = re.compile(r"\d{1,3}(?:,\d{3})+(?:\.\d+)?|\d+(?:\.\d+)?|[-+*/()=]|[A-Za-z]+|\S")
_UNITS = re.compile(r"(\d)\s*(?:[A-Za-z]+\s*){1,2}(?=[-+*/=)])")  # "5 apples - 3 apples" -> "5 - 3"


def _words(text: str) -> List[str]:
    return _WORD.findall(text.lower())


def copies_feedback(text: str, feedback: str, n: int = COPY_WORDS) -> bool:
    """True when ``text`` contains ``n`` consecutive words of ``feedback`` (case-insensitive)."""
    if not isinstance(text, str) or not isinstance(feedback, str):
        raise TypeError("copies_feedback: text and feedback must be str")
    if n < 1:
        raise ValueError(f"copies_feedback: n must be >= 1, got {n}")
    fb, tw = _words(feedback), _words(text)
    grams = {tuple(fb[i:i + n]) for i in range(len(fb) - n + 1)}
    return any(tuple(tw[i:i + n]) in grams for i in range(len(tw) - n + 1))


def _number(s: str) -> Optional[float]:
    try:
        return float(normalize_answer(s))
    except (TypeError, ValueError):
        return None


def _normalise_ops(text: str) -> str:
    for a, b in (("\\times", "*"), ("\\cdot", "*"), ("×", "*"), ("·", "*"), ("\\div", "/"), ("÷", "/"),
                 ("−", "-"), ("\\(", " "), ("\\)", " "), ("\\[", " "), ("\\]", " "), ("$", " ")):
        text = text.replace(a, b)
    text = re.sub(r"(?<=\d)\s*x\s*(?=\d)", " * ", text)  # "23 x 17"
    return _UNITS.sub(r"\1 ", text)


def _eval(tokens: List[str]) -> Optional[float]:
    """Value of an arithmetic expression given as tokens (numbers, + - * /, brackets), or None."""
    if not tokens:
        return None
    src = " ".join(t.replace(",", "") for t in tokens)
    try:
        tree = ast.parse(src, mode="eval")
    except SyntaxError:
        return None

    def ev(node: ast.AST) -> float:
        if isinstance(node, ast.Expression):
            return ev(node.body)
        if isinstance(node, ast.Constant) and isinstance(node.value, (int, float)):
            return float(node.value)
        if isinstance(node, ast.UnaryOp) and isinstance(node.op, (ast.USub, ast.UAdd)):
            v = ev(node.operand)
            return -v if isinstance(node.op, ast.USub) else v
        if isinstance(node, ast.BinOp) and isinstance(node.op, (ast.Add, ast.Sub, ast.Mult, ast.Div)):
            a, b = ev(node.left), ev(node.right)
            if isinstance(node.op, ast.Add):
                return a + b
            if isinstance(node.op, ast.Sub):
                return a - b
            if isinstance(node.op, ast.Mult):
                return a * b
            if b == 0:
                raise ZeroDivisionError
            return a / b
        raise ValueError("not arithmetic")

    try:
        return ev(tree)
    except (ValueError, ZeroDivisionError, RecursionError):
        return None


@dataclass
class Chain:
    """One ``E0 = E1 = ... = Em`` of an answer: ``sides`` (token lists), ``values`` (each side's value or
    None), ``numbers`` (the numbers of the first side)."""

    sides: List[List[str]]
    values: List[Optional[float]]
    numbers: List[float]

    @property
    def result(self) -> Optional[float]:
        """The value of the last side (what the chain claims to derive)."""
        return self.values[-1]

    @property
    def computes(self) -> bool:
        """An operator in some side but the last: the chain works something out."""
        return any(t in _OPS for side in self.sides[:-1] for t in side)

    @property
    def consistent(self) -> bool:
        """Every side evaluates, to the same value."""
        v = self.values
        return all(x is not None for x in v) and all(abs(x - v[0]) <= 1e-9 * max(1.0, abs(v[0])) for x in v)


def chains(text: str) -> List[Chain]:
    """The ``=`` chains of ``text`` outside its final ``\\boxed{}``, in order of appearance.

    Words, punctuation between clauses (``.`` ``,`` ``;`` ``:`` not inside a number) and the box break a
    chain; unit words right after a number (``5 apples - 3 apples``) are dropped.
    """
    span = boxed_span(text)
    if span is not None:
        text = text[: text.rfind("\\boxed", 0, span[0])] + " ; " + text[span[1] + 1:]
    out: List[Chain] = []
    cur: List[List[str]] = [[]]

    def close() -> None:
        nonlocal cur
        sides = [s for s in cur]
        if len(sides) >= 2 and all(sides):
            vals = [_eval(s) for s in sides]
            nums = [float(t.replace(",", "")) for t in sides[0] if t[0].isdigit()]
            out.append(Chain(sides, vals, nums))
        cur = [[]]

    for tok in _TOKEN.findall(_normalise_ops(text)):
        if tok == "=":
            cur.append([])
        elif tok[0].isdigit() or tok in _OPS or tok in "()":
            cur[-1].append(tok)
        else:  # a word or other punctuation ends the chain
            close()
    close()
    return out


def _question_numbers(question: str) -> Set[float]:
    return {float(t.replace(",", "")) for t in _TOKEN.findall(question) if t[0].isdigit()}


def derivation(text: str, question: str = "") -> str:
    """How the answer's boxed number ``x`` comes about: ``"unboxed"`` (no numeric box), ``"none"`` (no chain
    ends in ``x``), ``"derived"`` (a computing chain ends in ``x``, arithmetic possibly wrong) or ``"sound"``
    (a consistent chain ends in ``x`` and its first side uses only numbers of ``question`` or values the
    answer derived before it)."""
    x = _number(boxed_answer(text) or "")
    if x is None:
        return "unboxed"
    known = _question_numbers(question)
    best = "none"
    for ch in chains(text):
        ends = ch.result is not None and abs(ch.result - x) <= 1e-9 * max(1.0, abs(x))
        if ends and ch.computes:
            grounded = all(any(abs(n - k) <= 1e-9 * max(1.0, abs(k)) for k in known) for n in ch.numbers)
            if ch.consistent and grounded:
                return "sound"
            best = "derived"
        if ch.consistent and ch.values:  # a value worked out correctly may be used later
            known.add(ch.values[0])
    return best


@dataclass
class AnswerLabels:
    """The labels of one answer (module doc). ``boxed``: the numeric boxed answer (normalised) or None."""

    boxed: Optional[str]
    correct: bool
    copies_feedback: bool
    derivation: str
    small_step: bool
    walk: bool
    repeat: bool

    @property
    def derived(self) -> bool:
        return self.derivation in ("derived", "sound")

    @property
    def sensible(self) -> bool:
        """Right, sound and not a copy of the feedback."""
        return self.correct and self.derivation == "sound" and not self.copies_feedback


def label_conversation(texts: Sequence[str], question: str, answer: str, feedback: str) -> List[AnswerLabels]:
    """:class:`AnswerLabels` for every answer of one conversation (``texts`` in turn order)."""
    truth = normalize_answer(str(answer))
    out: List[AnswerLabels] = []
    nums: List[Optional[float]] = []
    rejected: Set[str] = set()
    for k, text in enumerate(texts):
        raw = boxed_answer(text)
        box = normalize_answer(raw) if raw is not None else None
        x = _number(raw) if raw is not None else None
        prev = nums[-1] if nums else None
        small = k > 0 and x is not None and prev is not None and 0 < abs(x - prev) <= 2
        walk = (k >= 2 and x is not None and None not in nums[-2:]
                and ((nums[-2] < nums[-1] < x) or (nums[-2] > nums[-1] > x)))
        out.append(AnswerLabels(box, box is not None and box == truth, copies_feedback(text, feedback),
                                derivation(text, question), bool(small), bool(walk),
                                k > 0 and box is not None and box in rejected))
        nums.append(x)
        if box is not None and box != truth:
            rejected.add(box)
    return out


def sensible_solved_at(texts: Sequence[str], question: str, answer: str, feedback: str,
                       solved_at: Optional[int]) -> Optional[int]:
    """``solved_at`` when the conversation was solved at turn 1 or by a sensible correction, else None."""
    if solved_at is None or solved_at == 0:
        return solved_at
    return solved_at if label_conversation(texts, question, answer, feedback)[solved_at].sensible else None


def degeneration_table(convs: Iterable[Any], turns: int, feedback: str) -> Dict[str, Any]:
    """Per turn k = 2..``turns`` over the later answers of ``convs`` (objects or dicts with ``problem``/
    ``question``, ``answer`` and ``turns`` of texts): counts of answers, copies, underived boxed numbers
    (boxed, not derived), unboxed, small steps, walks, repeats, right answers and sensible corrections;
    plus ``"all"`` (turns 2..K pooled) and ``"conversations_with_walk"``."""
    keys = ("answers", "copies_feedback", "underived", "unboxed", "small_step", "walk", "repeat", "correct",
            "sensible")
    per = {k: {key: 0 for key in keys} for k in range(2, turns + 1)}
    walks = failed = 0
    for c in convs:
        q, a, texts = _conv_fields(c)
        labels = label_conversation(texts, q, a, feedback)
        failed += bool(labels) and not labels[0].correct
        walks += any(lab.walk for lab in labels)
        for k, lab in enumerate(labels[1:], start=2):
            row = per[k]
            row["answers"] += 1
            row["copies_feedback"] += lab.copies_feedback
            row["underived"] += lab.boxed is not None and not lab.derived
            row["unboxed"] += lab.boxed is None
            row["small_step"] += lab.small_step
            row["walk"] += lab.walk
            row["repeat"] += lab.repeat
            row["correct"] += lab.correct
            row["sensible"] += lab.sensible
    total = {key: sum(per[k][key] for k in per) for key in keys}
    return {"per_turn": {str(k): v for k, v in per.items()}, "all": total, "conversations_with_walk": walks,
            "first_turn_failures": failed}


def _conv_fields(c: Any):
    if isinstance(c, dict):
        return c["question"], c["answer"], [t["text"] if isinstance(t, dict) else t.text for t in c["turns"]]
    return c.problem.question, c.problem.answer, [t.text for t in c.turns]


def labels_dict(labels: AnswerLabels) -> Dict[str, Any]:
    """JSON-friendly labels (with ``derived`` and ``sensible``)."""
    d = asdict(labels)
    d.update(derived=labels.derived, sensible=labels.sensible)
    return d
