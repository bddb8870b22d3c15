"""Transcripts to read beside the experiment's counts: the conversations a method corrected, and some that
degenerated, turn by turn with the degeneration labels of every answer.

    python benchmarks/experiment/transcripts.py RUN_DIR [--per-method 3] [--methods a,b] [--out FILE]

RUN_DIR holds a run of ``python -m rosa_ext.harness.experiment`` (``runs.jsonl``, ``config.json``). For each
method, in problem order (seed by seed): up to ``--per-method`` conversations corrected after turn 1 (sensible
ones first), then up to ``--per-method`` whose later answers copy the feedback or walk. Every answer is
printed whole with its labels (``rosa_ext.harness.degeneration``: right / wrong, sensible, copies the
feedback, how the boxed number was derived, small step, walk, repeat). Writes ``RUN_DIR/transcripts.md``
(or ``--out``) and prints where.
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Any, Dict, List, Optional

from rosa_ext.harness.conversation import DEFAULT_FEEDBACK
from rosa_ext.harness.degeneration import AnswerLabels, label_conversation


def read_runs(path: str) -> List[Dict[str, Any]]:
    """The records of a ``runs.jsonl``, read only (a run may still be appending to it: a last line cut short
    is skipped, and the file is never rewritten)."""
    recs = []
    with open(path) as f:
        lines = f.read().split("\n")
    for k, line in enumerate(lines):
        if line.strip():
            try:
                recs.append(json.loads(line))
            except json.JSONDecodeError:
                if k < len(lines) - 2:
                    raise SystemExit(f"{path}: line {k + 1} is not JSON") from None
    return recs


def _labels_text(lab: AnswerLabels) -> str:
    parts = ["right" if lab.correct else "wrong", f"boxed {lab.boxed}" if lab.boxed is not None else "unboxed",
             lab.derivation]
    parts += [name for name, on in (("SENSIBLE", lab.sensible), ("COPIES THE FEEDBACK", lab.copies_feedback),
                                    ("small step", lab.small_step), ("walk", lab.walk),
                                    ("repeats a rejected answer", lab.repeat)) if on]
    return ", ".join(parts)


def conversation_md(rec: Dict[str, Any], feedback: str) -> str:
    """One conversation of ``runs.jsonl`` as markdown: the question, then every answer with its labels."""
    texts = [t["text"] for t in rec["turns"]]
    labels = label_conversation(texts, rec["question"], rec["answer"], feedback)
    lines = [f"**{rec['method']}**, seed {rec['seed']}, problem {rec['problem']}: {rec['question']} "
             f"(answer {rec['answer']}; solved at turn {'-' if rec['solved_at'] is None else rec['solved_at'] + 1})",
             ""]
    for k, (text, lab) in enumerate(zip(texts, labels), start=1):
        quoted = "\n".join("> " + ln for ln in (text.strip() or "(empty)").splitlines())
        lines += [f"turn {k} ({_labels_text(lab)}):", "", quoted, ""]
    return "\n".join(lines)


def pick(recs: List[Dict[str, Any]], method: str, per_method: int, feedback: str) -> List[Dict[str, Any]]:
    """The conversations of ``method`` to print: corrections (sensible first), then degenerate ones."""
    mine = sorted((r for r in recs if r["method"] == method), key=lambda r: (r["seed"], r["problem"]))
    corrected, sensible, degenerate = [], [], []
    for r in mine:
        texts = [t["text"] for t in r["turns"]]
        labels = label_conversation(texts, r["question"], r["answer"], feedback)
        if r["solved_at"] not in (None, 0):
            (sensible if labels[r["solved_at"]].sensible else corrected).append(r)
        elif any(lab.copies_feedback or lab.walk for lab in labels[1:]):
            degenerate.append(r)
    return (sensible + corrected)[:per_method] + degenerate[:per_method]


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("run_dir")
    ap.add_argument("--per-method", type=int, default=3)
    ap.add_argument("--methods", default=None, help="comma-separated (default: every method of the run)")
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    if args.per_method < 1:
        ap.error(f"--per-method must be >= 1, got {args.per_method}")
    runs = os.path.join(args.run_dir, "runs.jsonl")
    if not os.path.exists(runs):
        ap.error(f"run_dir: no runs.jsonl in {args.run_dir}")
    recs = read_runs(runs)
    cfg_path = os.path.join(args.run_dir, "config.json")
    cfg = json.load(open(cfg_path)) if os.path.exists(cfg_path) else {}
    feedback = cfg.get("feedback_prompt") or DEFAULT_FEEDBACK
    present = list(dict.fromkeys(r["method"] for r in recs))
    methods = present if args.methods is None else [m for m in args.methods.split(",") if m]
    unknown = [m for m in methods if m not in present]
    if unknown:
        ap.error(f"--methods: {unknown} not in this run (it has {present})")
    out = args.out or os.path.join(args.run_dir, "transcripts.md")
    parts = [f"# Transcripts of `{args.run_dir}`", "",
             f"Per method up to {args.per_method} conversations corrected after turn 1 (sensible corrections "
             f"first), then up to {args.per_method} whose later answers copy the feedback or walk; labels by "
             "`rosa_ext.harness.degeneration`. Written by `benchmarks/experiment/transcripts.py`.", ""]
    for m in methods:
        chosen = pick(recs, m, args.per_method, feedback)
        parts += [f"## {m}", ""] + (["(no corrected or degenerate conversation)", ""] if not chosen else [])
        parts += [conversation_md(r, feedback) for r in chosen]
    with open(out, "w") as f:
        f.write("\n".join(parts).rstrip() + "\n")
    print(f"transcripts: {out}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
