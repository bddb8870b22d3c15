"""Merge the ``runs.jsonl`` of several ``python -m rosa_ext.harness.experiment`` invocations (e.g. seeds run
separately) into one summary: ``results.json``, ``results.md``, ``accuracy_vs_turn.png`` and
the merged ``runs.jsonl`` in ``--out``.

    python benchmarks/experiment/merge_runs.py --turns 5 --out DIR RUNS.jsonl[:SEEDS] ...

``RUNS.jsonl:0,1`` keeps only those seeds of that file (e.g. the complete seeds of an
interrupted run); a (method, seed) pair given twice is an error. ``--reuse-greedy M1,M2`` copies the
runs of methods that do not depend on the seed under greedy decoding (the baseline and the
zero-initialised hidden shift: ``rosa_ext.harness.methods.seed_dependent``) from their one seed to
every seed another method covers -- what the experiment itself does within one greedy invocation.
A method covering fewer seeds than the baseline is compared with the baseline's runs of its own seeds.
``--add-guess`` adds the guess control (``rosa_ext.harness.controls.guess_text``: the first answer's boxed
number walked x+1, x-1, x+2, x-2 over turns 2..5, no model needed) built from the baseline's first answers, so
that runs made before the control existed can be compared with it. The statistics are those of
:func:`rosa_ext.harness.summary.summarize` (bootstrap over problems, seeds pooled; paired difference to
the baseline).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import Dict, List, Optional, Set

from rosa_ext.harness.controls import guess_text
from rosa_ext.harness.conversation import TurnRecord
from rosa_ext.harness.experiment import Conversation, markdown_table, plot, summarize
from rosa_ext.harness.problems import Problem
from rosa_ext.harness.rewards import is_correct


def load(path: str, seeds: Optional[Set[int]]) -> Dict[str, Dict[int, List[dict]]]:
    """``{method: {seed: [record per problem, in problem order]}}`` from one runs.jsonl."""
    out: Dict[str, Dict[int, List[dict]]] = {}
    with open(path) as f:
        for line in f:
            r = json.loads(line)
            if seeds is not None and r["seed"] not in seeds:
                continue
            out.setdefault(r["method"], {}).setdefault(r["seed"], []).append(r)
    for m in out.values():
        for s, recs in m.items():
            recs.sort(key=lambda r: r["problem"])
            if [r["problem"] for r in recs] != list(range(len(recs))):
                raise SystemExit(f"merge_runs: {path}: seed {s} does not hold problems 0..{len(recs) - 1}")
    return out


def guess_record(base: dict, turns: int) -> dict:
    """The guess control's record for one problem, from the baseline's record of it (same first answer)."""
    first = base["turns"][0]
    out = dict(base, method="guess", turns=[first], solved_at=base["solved_at"] if base["solved_at"] == 0 else None)
    if out["solved_at"] == 0:
        return out
    problem = Problem(base["question"], base["answer"])
    for k in range(1, turns):
        text = guess_text(first["text"], k)
        ok = is_correct(problem, text)
        out["turns"].append({"text": text, "reward": 1.0 if ok else -1.0, "correct": ok, "tokens": first["tokens"]})
        if ok:
            out["solved_at"] = k
            break
    return out


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("inputs", nargs="+", help="runs.jsonl[:seed,seed...]")
    ap.add_argument("--turns", type=int, required=True)
    ap.add_argument("--out", required=True)
    ap.add_argument("--title", default="merged runs")
    ap.add_argument("--n-boot", type=int, default=2000)
    ap.add_argument("--reuse-greedy", default="", help="comma list of seed-independent methods of greedy runs "
                    "whose one seed is reused for every other seed (see the module doc)")
    ap.add_argument("--add-guess", action="store_true", help="add the guess control, built from the baseline's "
                    "first answers (see the module doc)")
    args = ap.parse_args(argv)
    merged: Dict[str, Dict[int, List[dict]]] = {}
    for spec in args.inputs:
        path, _, sel = spec.partition(":")
        seeds = {int(x) for x in sel.split(",")} if sel else None
        for method, seedruns in load(path, seeds).items():
            for seed, recs in seedruns.items():
                if seed in merged.setdefault(method, {}):
                    raise SystemExit(f"merge_runs: method {method!r} seed {seed} appears twice")
                merged[method][seed] = recs
    reused: Dict[str, int] = {}
    for method in [m for m in args.reuse_greedy.split(",") if m]:
        have = merged.get(method, {})
        if len(have) != 1:
            raise SystemExit(f"merge_runs: --reuse-greedy {method}: needs exactly one seed of it, got {sorted(have)}")
        (seed0, recs0), = have.items()
        reused[method] = seed0
        for seed in sorted({s for m in merged.values() for s in m} - {seed0}):
            have[seed] = [dict(r, seed=seed) for r in recs0]
    if args.add_guess:
        if "baseline" not in merged or "guess" in merged:
            raise SystemExit("merge_runs: --add-guess needs baseline runs and no guess runs")
        merged["guess"] = {s: [guess_record(r, args.turns) for r in recs] for s, recs in merged["baseline"].items()}
    sizes = {len(recs) for m in merged.values() for recs in m.values()}
    if len(sizes) != 1:
        raise SystemExit(f"merge_runs: runs cover different numbers of problems: {sorted(sizes)}")
    runs = {m: {s: [Conversation(problem=Problem(r["question"], r["answer"]), messages=[],
                                 turns=[TurnRecord(**t) for t in r["turns"]], solved_at=r["solved_at"])
                    for r in recs] for s, recs in sorted(seedruns.items())}
            for m, seedruns in merged.items()}
    order = ["baseline"] + [m for m in runs if m != "baseline"]
    runs = {m: runs[m] for m in order if m in runs}
    summary = summarize(runs, args.turns, n_boot=args.n_boot)
    os.makedirs(args.out, exist_ok=True)
    meta = {"merged_from": args.inputs, "seeds": {m: sorted(s) for m, s in runs.items()},
            "reused_greedy": {m: f"seed {s} reused for every seed" for m, s in reused.items()},
            "n_problems": sizes.pop(), "turns": args.turns}
    with open(os.path.join(args.out, "results.json"), "w") as f:
        json.dump({"meta": meta, "summary": summary}, f, indent=1)
    table = markdown_table(summary, args.turns)
    with open(os.path.join(args.out, "results.md"), "w") as f:
        f.write(f"Merged from {', '.join(f'`{x}`' for x in args.inputs)}; seeds per method: "
                f"{meta['seeds']}" + (f"; reused (greedy, seed-independent): {meta['reused_greedy']}"
                                      if reused else "") + "\n\n" + table)
    with open(os.path.join(args.out, "runs.jsonl"), "w") as f:
        for m in runs:
            for s in sorted(merged[m]):
                for r in merged[m][s]:
                    f.write(json.dumps(r) + "\n")
    plot(summary, args.turns, os.path.join(args.out, "accuracy_vs_turn.png"), args.title)
    print(table)
    return 0


if __name__ == "__main__":
    sys.exit(main())
