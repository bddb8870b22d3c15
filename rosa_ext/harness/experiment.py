"""The multi-turn experiment (paper Section 5.2 / Appendix D.3) on generated problems.

``python -m rosa_ext.harness.experiment --problems 200 --turns 5 --seeds 0 --decoding greedy --out DIR`` runs
every method and control on the held-out problems (:mod:`rosa_ext.harness.problems`): each problem gets up
to K answers; after a wrong one the method updates (or not) and the feedback prompt is appended, as
:func:`rosa_ext.harness.conversation.interact` does for one conversation. This module is the command line
(:func:`main`, :func:`build_parser`, :func:`load_model`, :func:`load_problems`) and re-exports the parts:

- :mod:`rosa_ext.harness.methods`: the methods and controls (:data:`METHODS`, :class:`MethodSpec`:
  ``baseline``, ``resample``, ``ban``, ``guess``; ``rosa-lora`` / ``rosa-hidden``; the fair PG
  ``pg-lora-fair`` / ``pg-hidden-fair``; the legacy ``pg``; lever variants);
- :mod:`rosa_ext.harness.generation`: batched generation with the answers' lm_head inputs recorded, each
  conversation one user of a :class:`~rosa_ext.integrations.users.RosaUsers`; ROSA and PG change only
  ``lm_head``, so every turn continues from the key/value cache of the one before (the model's own answer
  tokens, then the feedback message) instead of re-encoding the whole chat;
- :mod:`rosa_ext.harness.runner`: conversations *batched* and *chunk by chunk*: a chunk of
  ``--batch-size`` problems gets its turn-1 answers once (shared by every method), then each method carries
  the chunk's failed conversations through turns 2..K, one batched update of the failed conversations per
  turn (the harness calls the library, it does not re-implement the update);
- :mod:`rosa_ext.harness.summary`: the tables (accuracy with CIs against the controls, the degeneration
  table of :mod:`rosa_ext.harness.degeneration`, accuracy counting only sensible corrections, per-turn
  curves) and the plot;
- :mod:`rosa_ext.harness.resumable`: the run written as it goes, so that a rerun of the same command
  continues where it stopped.

Outputs (``--out``): ``config.json`` (what the run is; a rerun with other settings is refused),
``runs.jsonl`` (one line per method, seed and problem, appended chunk by chunk: every answer, reward and
update), ``timing.jsonl`` (wall and CPU seconds per chunk and method), ``results.json`` / ``results.md``
(the tables; marked PARTIAL until every problem is done) and ``accuracy_vs_turn.png``.
"""
from __future__ import annotations

import argparse
import sys
import time
from dataclasses import replace
from typing import Any, Dict, List, Optional

import torch

from ..integrations.models import MODEL_NAMES
from .attainment import target_attainment
from .generation import (  # noqa: F401 -- re-exported (the tests use the private ones)
    _cache_kw,
    _continue,
    _Gen,
    _generate,
    _left_pad,
    chat_tensor,
    experiment_users,
    feedback_tail,
    generate_batch,
    user_key,
)
from .methods import (
    CONTROL_KINDS,
    DEFAULT_METHODS,
    KINDS,
    LEVER_METHODS,
    METHODS,
    PG_STEPS,
    REWARDS,
    MethodSpec,
    seed_dependent,
)
from .problems import PROBLEM_SETS, Problem
from .resumable import FROZEN, collect, conversations_from, read_records, run_resumable, timing_totals
from .runner import (  # noqa: F401 -- re-exported (the tests use the private one)
    Conversation,
    _update_chunk,
    cap_shift,
    fair_pg_update,
    first_turn,
    run_chunk,
    run_method,
)
from .summary import DEFAULT_CONTROLS, attainment_summary, markdown_table, plot, repeat_count, summarize

__all__ = [
    "CONTROL_KINDS", "DEFAULT_CONTROLS", "DEFAULT_METHODS", "FROZEN", "KINDS", "LEVER_METHODS", "METHODS",
    "PG_STEPS", "REWARDS", "Conversation", "MethodSpec", "Problem", "attainment_summary", "build_parser",
    "cap_shift", "chat_tensor", "collect", "conversations_from", "experiment_users", "fair_pg_update",
    "feedback_tail", "first_turn", "generate_batch", "load_model", "load_problems", "main", "markdown_table",
    "plot", "read_records", "repeat_count", "run_chunk", "run_method", "run_resumable", "seed_dependent",
    "summarize", "target_attainment", "timing_totals", "user_key",
]


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


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m rosa_ext.harness.experiment", description=__doc__.split("\n\n")[0])
    p.add_argument("--model", choices=list(MODEL_NAMES), default="smollm2")
    p.add_argument("--problem-set", choices=sorted(PROBLEM_SETS), default="default",
                   help="families of the dev/test split (rosa_ext.harness.problems.PROBLEM_SETS)")
    p.add_argument("--problems", type=int, default=200, help="number of held-out problems")
    p.add_argument("--split", choices=["test", "dev"], default="test")
    p.add_argument("--turns", type=int, default=5, help="K")
    p.add_argument("--seeds", type=int, nargs="+", default=[0, 1, 2])
    p.add_argument("--methods", default=",".join(DEFAULT_METHODS), help=f"comma list from {list(METHODS)}")
    p.add_argument("--decoding", choices=["greedy", "sample"], default="sample")
    p.add_argument("--temperature", type=float, default=0.7)
    p.add_argument("--max-new-tokens", type=int, default=40)
    p.add_argument("--batch-size", type=int, default=32, help="problems per chunk (one generate batch)")
    p.add_argument("--beta", type=float, default=None, help="override every method's beta")
    p.add_argument("--damping", type=float, default=None, help="override ROSA's damping")
    p.add_argument("--damping-mode", choices=["absolute", "relative"], default=None,
                   help="override ROSA's damping mode (relative: the ridge is damping x mean diag(J J^T))")
    p.add_argument("--update-on", choices=["response", "answer_span"], default=None)
    p.add_argument("--pg-lr", type=float, default=None)
    p.add_argument("--max-norm", type=float, default=None, help="clip every update's norm")
    p.add_argument("--no-cache", action="store_true",
                   help="re-encode the whole chat every turn instead of continuing from the key/value cache")
    p.add_argument("--n-boot", type=int, default=2000)
    p.add_argument("--out", default=None,
                   help="output folder; a rerun with the same settings continues the run it holds")
    p.add_argument("--threads", type=int, default=1, help="torch threads")
    p.add_argument("--quiet", action="store_true")
    return p


def load_problems(problem_set: str, split: str, n: int) -> List[Problem]:
    """The first ``n`` problems of a split (the test list is prefix-stable: a longer run extends a shorter one)."""
    from .problems import heldout_split

    if split == "dev" and n > 60:
        raise SystemExit("rosa_ext.harness.experiment: the dev split has 60 problems")
    dev, test = heldout_split(n_dev=60, n_test=max(240, n), families=PROBLEM_SETS[problem_set])
    return (test if split == "test" else dev)[:n]


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
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
    problems = load_problems(args.problem_set, args.split, args.problems)
    t0 = time.perf_counter()
    model, tok = load_model(args.model)
    load_s = time.perf_counter() - t0
    command = "python -m rosa_ext.harness.experiment " + " ".join(argv if argv is not None else sys.argv[1:])
    out = args.out
    tmp = None
    if not out:  # no folder asked for: a temporary one, printed tables only
        import tempfile
        tmp = tempfile.TemporaryDirectory()
        out = tmp.name
    config = {"command": command, "args": vars(args), "model": args.model, "problem_set": args.problem_set, "split": args.split,
              "load_s": load_s, "threads": torch.get_num_threads()}
    title = (f"{'SmolLM2-135M-Instruct' if args.model == 'smollm2' else args.model}, {args.split} "
             f"{args.problem_set}, {args.decoding}")
    try:
        summary = run_resumable(model, tok, problems, specs, out=out, config=config, seeds=args.seeds,
                                turns=args.turns, decoding=args.decoding, temperature=args.temperature,
                                max_new_tokens=args.max_new_tokens, batch_size=args.batch_size, n_boot=args.n_boot,
                                use_cache=not args.no_cache, title=title, quiet=args.quiet)
        print(markdown_table(summary, args.turns))
        print(f"wall time {time.perf_counter() - t0:.0f} s (model load {load_s:.0f} s)")
        if args.out:
            print(f"wrote {args.out}/results.json, results.md, accuracy_vs_turn.png, runs.jsonl")
    finally:
        if tmp is not None:
            tmp.cleanup()
    return 0


if __name__ == "__main__":
    sys.exit(main())
