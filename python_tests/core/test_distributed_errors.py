"""Vocabulary-parallel errors: one bad argument, on every rank or on one rank only, raises
the same error class with the same ``err.argument`` on every rank, after the one validation
all-gather, and never hangs (the group is killed after ``TIMEOUT`` s, which fails the test).

Before: ``vocab_start=2**63`` on one rank raised a plain ValueError there before the all-gather
and left the other rank blocked; no vocabulary-parallel error set ``argument``; a str or bool
``vocab_start`` raised the input class where README "Errors" says the type class; NaN in one
rank's ``hidden`` raised the non-finite class there and the input class elsewhere.

Runs python_tests/_dist_worker.py's suite ``errors`` on 1 and on 2 gloo processes.
"""
from __future__ import annotations

import pathlib
import tempfile

import pytest
from _dist import _Started

TIMEOUT = 240.0

#: case -> (class every rank raises, its argument)
EXPECT = {
    "start_str": ("RosaTypeError", "vocab_start"), "start_bool": ("RosaTypeError", "vocab_start"),
    "start_float": ("RosaTypeError", "vocab_start"), "start_negative": ("RosaInputError", "vocab_start"),
    "start_2**63": ("RosaInputError", "vocab_start"), "size_str": ("RosaTypeError", "vocab_size"),
    "size_bool": ("RosaTypeError", "vocab_size"), "size_zero": ("RosaInputError", "vocab_size"),
    "size_2**70": ("RosaInputError", "vocab_size"), "size_wrong": ("RosaInputError", "vocab_size"),
    "start_missing": ("RosaInputError", "vocab_start"), "group_str": ("RosaTypeError", "process_group"),
    "target_V": ("RosaInputError", "targets"), "weight_0rows": ("RosaInputError", "weight"),
    "weight_1d": ("RosaInputError", "weight"), "weight_list": ("RosaTypeError", "weight"),
    "hidden_nan": ("RosaNonFiniteError", "hidden"), "dtensor_replicated": ("RosaInputError", "weight"),
    "dtensor_size": ("RosaInputError", "vocab_size"), "dtensor_start": ("RosaInputError", "vocab_start"),
    "dtensor_lora_a": ("RosaInputError", "lora_a"), "mode": ("RosaInputError", "mode"),
    "damping": ("RosaInputError", "damping"),
}
ALL = ["start_str", "start_bool", "start_float", "start_negative", "start_2**63", "size_str", "size_bool", "size_zero",
       "size_2**70", "size_wrong", "start_missing", "group_str", "target_V", "weight_0rows", "weight_1d", "weight_list",
       "hidden_nan", "dtensor_replicated", "dtensor_size", "dtensor_start", "dtensor_lora_a"]
LAST = ["start_2**63", "size_2**70", "start_str", "hidden_nan", "weight_1d", "size_wrong", "mode", "damping"]

_GROUPS = {}


def _runs():
    """Start the 1- and 2-process groups together (once), then wait for both."""
    if not _GROUPS:
        started = {w: _Started(w, "errors", pathlib.Path(tempfile.mkdtemp(prefix=f"rosa_err{w}_")), TIMEOUT, "gloo")
                   for w in (1, 2)}
        for w, s in started.items():
            _GROUPS[w] = s.wait()
    return _GROUPS


def _check(world: int, what: str, who: str) -> None:
    run = _runs()[world]
    cls, arg = EXPECT[what]
    res = run.case(f"error/{what}/{who}")
    assert len(res) == world
    for rank, r in res.items():
        assert r.get("raised") == cls, (rank, r)
        assert r.get("argument") == arg, (rank, r)
    assert len({r["message"] for r in res.values()}) == 1 or what == "group_str", res  # one message everywhere


@pytest.mark.parametrize("what", ALL)
@pytest.mark.parametrize("world", [1, 2])
def test_bad_argument_on_every_rank(world, what):
    _check(world, what, "all")


@pytest.mark.parametrize("what", LAST)
def test_bad_argument_on_one_rank_raises_the_same_everywhere(what):
    _check(2, what, "last")


@pytest.mark.parametrize("world", [1, 2])
def test_group_still_in_step_and_nothing_hung(world):
    run = _runs()[world]
    assert not run.timed_out, f"the {world}-process group was killed after {TIMEOUT} s (a hang)"
    for rank, r in run.case("after_errors").items():
        assert "error" not in r, (rank, r.get("traceback"))
        assert r["same_on_all_ranks"]
