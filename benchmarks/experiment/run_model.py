"""The experiment CLI with a choice of model and problem set.

    python benchmarks/experiment/run_model.py --model qwen25-coder --problem-set qwen-hard \\
        [every option of python -m rosa_ext.harness.experiment]

``python -m rosa_ext.harness.experiment`` loads SmolLM2-135M-Instruct (or the tiny random
model) and draws the default problem mix. This wrapper runs that same ``main`` -- same methods,
batching, outputs (results.json / .md / png, runs.jsonl) and statistics -- with ``--model``
taking every name of :data:`rosa_ext.integrations.models.MODEL_NAMES` (loaded by
:func:`~rosa_ext.integrations.models.load_named`, which needs only the package of the model it
loads) and ``--problem-set`` choosing the families of
:func:`rosa_ext.harness.problems.heldout_split` (:data:`rosa_ext.harness.problems.PROBLEM_SETS`).
It does so by substituting three names of :mod:`rosa_ext.harness.experiment` for the duration of
the call; once that module takes these two options itself, this file reduces to a call of its main.
The recorded command (results.json, ``meta.command``) is the experiment module's with
``--model NAME``; the problem set is recorded in ``meta.args.problem_set``.
"""
from __future__ import annotations

import argparse
import functools
import sys
from contextlib import contextmanager
from typing import Iterator, List, Optional

from rosa_ext.harness import experiment
from rosa_ext.harness import problems as problems_mod
from rosa_ext.integrations.models import MODEL_NAMES, ModelNotInstalledError, load_named


@contextmanager
def _patched(problem_set: str) -> Iterator[None]:
    """Within the block, the experiment's parser accepts every model name and ``--problem-set``,
    its loader is :func:`load_named`, and its split draws ``PROBLEM_SETS[problem_set]``."""
    saved = experiment.build_parser, experiment.load_model, problems_mod.heldout_split
    original_parser = experiment.build_parser

    def build_parser() -> argparse.ArgumentParser:
        p = original_parser()
        for action in p._actions:  # widen --model's choices (the option itself is the experiment's)
            if "--model" in action.option_strings:
                action.choices = list(MODEL_NAMES)
        p.add_argument("--problem-set", choices=sorted(problems_mod.PROBLEM_SETS), default=problem_set,
                       help="families of the dev/test split (rosa_ext.harness.problems.PROBLEM_SETS)")
        return p

    def load_model(name: str):
        try:
            return load_named(name, tiny_hidden=32)
        except ModelNotInstalledError as e:
            raise SystemExit(f"run_model: {e}") from None

    experiment.build_parser = build_parser
    experiment.load_model = load_model
    problems_mod.heldout_split = functools.partial(saved[2], families=problems_mod.PROBLEM_SETS[problem_set])
    try:
        yield
    finally:
        experiment.build_parser, experiment.load_model, problems_mod.heldout_split = saved


def main(argv: Optional[List[str]] = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    pre = argparse.ArgumentParser(add_help=False)
    pre.add_argument("--problem-set", choices=sorted(problems_mod.PROBLEM_SETS), default="default")
    known, _ = pre.parse_known_args(argv)
    with _patched(known.problem_set):
        return experiment.main(argv)


if __name__ == "__main__":
    sys.exit(main())
