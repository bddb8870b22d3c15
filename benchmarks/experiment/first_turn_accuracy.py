"""First-turn accuracy of a model on a problem set's development split (for choosing the set).

    python benchmarks/experiment/first_turn_accuracy.py --model qwen25-coder --problem-set qwen-mix \\
        --problems 30 --out benchmarks/results/experiment/qwen25_coder_dev_first_turn.json

Turn 1 exactly as the experiment generates it (:func:`rosa_ext.harness.runner.first_turn`:
the one-shot prompt, batched, greedy unless ``--decoding sample``), scored by the rule-based
reward. Writes the accuracy (overall and per family), every answer, the commit, the machine,
torch's thread count and the wall time. The held-out split is never touched.
"""
from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import time
from typing import List, Optional

import torch

from rosa_ext.harness.experiment import first_turn
from rosa_ext.harness.problems import PROBLEM_SETS, heldout_split
from rosa_ext.harness.rewards import boxed_answer, is_correct
from rosa_ext.integrations.models import MODEL_NAMES, load_named


def _commit() -> str:
    try:
        here = os.path.dirname(os.path.abspath(__file__))
        out = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10, cwd=here).stdout
        dirty = subprocess.run(["git", "status", "--porcelain", "--untracked-files=no"], capture_output=True, text=True,
                               timeout=10, cwd=here).stdout.strip()
        return out.strip() + ("+dirty" if dirty else "")
    except Exception:  # noqa: BLE001 -- no git: record nothing
        return ""


def main(argv: Optional[List[str]] = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n\n")[0])
    ap.add_argument("--model", choices=list(MODEL_NAMES), default="qwen25-coder")
    ap.add_argument("--problem-set", choices=sorted(PROBLEM_SETS), default="qwen-mix")
    ap.add_argument("--problems", type=int, default=30, help="the first N development problems (<= 60)")
    ap.add_argument("--max-new-tokens", type=int, default=40)
    ap.add_argument("--decoding", choices=["greedy", "sample"], default="greedy")
    ap.add_argument("--temperature", type=float, default=0.7)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--batch-size", type=int, default=16)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None, help="JSON file to write")
    args = ap.parse_args(argv)
    if not 1 <= args.problems <= 60:
        raise SystemExit("first_turn_accuracy: --problems must be in 1..60 (the development split)")
    torch.set_num_threads(args.threads)
    families = PROBLEM_SETS[args.problem_set]
    dev, _ = heldout_split(n_dev=60, n_test=240, families=families)
    problems = dev[: args.problems]
    t0 = time.perf_counter()
    model, tok = load_named(args.model)
    load_s = time.perf_counter() - t0
    t1 = time.perf_counter()
    out = first_turn(model, tok, problems, seed=args.seed, max_new_tokens=args.max_new_tokens,
                     do_sample=args.decoding == "sample", temperature=args.temperature, batch_size=args.batch_size)
    gen_s = time.perf_counter() - t1
    rows = []
    for j, (p, (resp, _)) in enumerate(zip(problems, out)):
        text = tok.decode(resp, skip_special_tokens=True)
        rows.append(dict(problem=j, family=families[j % len(families)], question=p.question, answer=p.answer,
                         response=text, boxed=boxed_answer(text), correct=is_correct(p, text), tokens=int(resp.numel())))
    per_family = {f: [r["correct"] for r in rows if r["family"] == f] for f in families}
    res = dict(
        model=args.model, problem_set=args.problem_set, families=list(families), split="dev", n_problems=len(rows),
        decoding=args.decoding, max_new_tokens=args.max_new_tokens, seed=args.seed,
        first_turn_accuracy=sum(r["correct"] for r in rows) / len(rows),
        correct=sum(r["correct"] for r in rows), boxed=sum(r["boxed"] is not None for r in rows),
        per_family={f: f"{sum(v)}/{len(v)}" for f, v in per_family.items()},
        generated_tokens=sum(r["tokens"] for r in rows), load_s=round(load_s, 1), generate_s=round(gen_s, 1),
        tokens_per_s=round(sum(r["tokens"] for r in rows) / gen_s, 2),
        command="python benchmarks/experiment/first_turn_accuracy.py " + " ".join(sys.argv[1:] if argv is None else argv),
        commit=_commit(), machine=f"{platform.machine()} {platform.processor() or ''} {os.cpu_count()} cores".strip(),
        platform=platform.platform(), torch=torch.__version__, threads=torch.get_num_threads(), rows=rows)
    print(f"{args.model} on {args.problem_set} dev[:{len(rows)}]: first-turn accuracy {res['correct']}/{len(rows)} "
          f"= {100 * res['first_turn_accuracy']:.1f}% (boxed {res['boxed']}), per family {res['per_family']}; "
          f"generate {gen_s:.0f} s ({res['tokens_per_s']} tok/s), load {load_s:.0f} s")
    if args.out:
        prev = {}
        if os.path.exists(args.out):
            with open(args.out) as f:
                prev = json.load(f)
        prev.setdefault("runs", []).append(res)
        with open(args.out, "w") as f:
            json.dump(prev, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
