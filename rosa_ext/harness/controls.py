"""Controls for the multi-turn experiment: ways to change a rejected answer without learning.

ROSA's claim is a gain over what a user gets without it. Besides plain multi-turn prompting (the
``baseline``, which under greedy decoding repeats its rejected answer), the experiment runs:

- **ban** (:class:`BanRejectedNumbers`): the same model, no update, decoding with the rejected boxed
  answers forbidden: a token that would complete a number the user already rejected in this
  conversation gets probability 0 anywhere in the reply (``scope="all"``; ``"box"``: inside
  ``\\boxed{}`` only), so the model writes its next most likely number instead (what a user of a chat API
  gets for free with a list of banned words).
- **resample**: no update, later answers sampled (temperature 0.7) instead of greedy
  (:data:`rosa_ext.harness.methods.METHODS`); under sampled decoding this is the baseline itself.
- **guess** (:func:`guess_text`): no model call after turn 1; answer k re-sends the first answer with its
  boxed number x replaced by x+1, x-1, x+2, x-2 (turns 2..5): a number walk that learns nothing, against
  which a method whose corrections are guesses looks no better.
"""
from __future__ import annotations

import re
from typing import Dict, List, Optional, Sequence, Set, Tuple

import torch

from .rewards import boxed_answer, boxed_span, normalize_answer

#: The guess control's offsets for turns 2, 3, 4, 5, ... (cycled further out after that).
GUESS_OFFSETS = (1, -1, 2, -2, 3, -3, 4, -4)


def guess_text(first: str, turn: int) -> str:
    """The guess control's answer at 0-based ``turn`` >= 1: ``first`` with its boxed integer x replaced by
    ``x + GUESS_OFFSETS[turn - 1]``; ``first`` unchanged when it has no boxed integer."""
    if turn < 1:
        raise ValueError(f"guess_text: turn must be >= 1 (turn 0 is the model's own answer), got {turn}")
    span = boxed_span(first)
    box = boxed_answer(first)
    try:
        x = int(normalize_answer(box)) if box is not None else None
    except ValueError:
        x = None
    if span is None or x is None:
        return first
    off = GUESS_OFFSETS[(turn - 1) % len(GUESS_OFFSETS)] * (1 + (turn - 1) // len(GUESS_OFFSETS))
    return first[: span[0]] + str(x + off) + first[span[1]:]


_DIGITS = re.compile(r"(\s*)(\d+)")
_GROUPS: Dict[int, Dict[Tuple[bool, str], torch.Tensor]] = {}


def digit_tokens(tokenizer) -> Dict[Tuple[bool, str], torch.Tensor]:
    """{(starts a new number, leading digits): ids} of the tokens whose text starts with digits (after
    optional whitespace, which starts a new number), for ``tokenizer`` (computed once per tokenizer)."""
    key = id(tokenizer)
    if key not in _GROUPS:
        groups: Dict[Tuple[bool, str], List[int]] = {}
        for tid in sorted(tokenizer.get_vocab().values()):
            m = _DIGITS.match(tokenizer.decode([tid]))
            if m:
                groups.setdefault((bool(m.group(1)), m.group(2)), []).append(tid)
        _GROUPS[key] = {k: torch.tensor(v, dtype=torch.long) for k, v in groups.items()}
    return _GROUPS[key]


def open_box(text: str) -> Optional[str]:
    """The content written so far of an unclosed final ``\\boxed{`` in ``text``, or None."""
    i = text.rfind("\\boxed")
    if i < 0:
        return None
    j = i + len("\\boxed")
    while j < len(text) and text[j].isspace():
        j += 1
    if j >= len(text) or text[j] != "{" or "}" in text[j + 1:]:
        return None
    return text[j + 1:]


def _trailing_number(text: str) -> str:
    m = re.search(r"\d+$", text)
    return m.group(0) if m else ""


class BanRejectedNumbers:
    """A ``transformers`` logits processor: row i may not write a number in ``rejected[i]``.

    Args:
        tokenizer: the model's tokenizer.
        prompt_len: length of the (left-padded) prompt in the ``input_ids`` that ``generate`` passes; the
            generated text of a row is decoded from there on.
        rejected: per row, the normalised answers (:func:`rosa_ext.harness.rewards.normalize_answer`) the
            user rejected; only non-negative integers are banned (others are ignored).
        scope: "all" (anywhere in the reply) or "box" (as the content of ``\\boxed{}`` only).
    At every step, a token whose leading digits would complete the row's trailing digits to a rejected
    number gets -inf (``14`` rejected: after ``1`` the digit ``4`` is banned, so are a token ``14`` and a
    token `` 14`` starting a new number). A longer number with the rejected one as its prefix is then
    out of reach too (``140`` after ``14`` rejected, with one-digit tokens).
    """

    def __init__(self, tokenizer, prompt_len: int, rejected: Sequence[Set[str]], scope: str = "all") -> None:
        if prompt_len < 0:
            raise ValueError(f"BanRejectedNumbers: prompt_len must be >= 0, got {prompt_len}")
        if scope not in ("all", "box"):
            raise ValueError(f"BanRejectedNumbers: scope must be 'all' or 'box', got {scope!r}")
        self.tokenizer, self.prompt_len, self.scope = tokenizer, int(prompt_len), scope
        self.rejected = [{r for r in rows if r.isdigit()} for rows in rejected]
        self.groups = digit_tokens(tokenizer)
        self.banned = 0  # how many (row, step) pairs had a token banned

    def __call__(self, input_ids: torch.Tensor, scores: torch.Tensor) -> torch.Tensor:
        if input_ids.shape[0] != len(self.rejected):
            raise ValueError(f"BanRejectedNumbers: {input_ids.shape[0]} rows, {len(self.rejected)} rejected sets")
        for i, rej in enumerate(self.rejected):
            if not rej:
                continue
            text = self.tokenizer.decode(input_ids[i, self.prompt_len:], skip_special_tokens=True)
            if self.scope == "box":
                content = open_box(text)
                if content is None or (content.strip() and not content.strip().isdigit()):
                    continue  # outside a box, or the box holds more than a number
                prefix = content.strip() if content == content.rstrip() else ""
            else:
                prefix = _trailing_number(text)
            hit = False
            for (fresh, lead), ids in self.groups.items():
                run = lead if (fresh or not prefix) else prefix + lead
                if run in rej:
                    scores[i, ids.to(scores.device)] = float("-inf")
                    hit = True
            self.banned += hit
        return scores
