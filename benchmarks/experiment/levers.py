"""Lever study on the development problems: which ROSA settings move accuracy?

The lever study (``--study``): every lever of :data:`LEVERS` (what keeps the hidden shift from
degenerating, ROSA-LoRA's, the fair PG's step rule and learning rate) next to the controls, on the 60
development problems of one model, greedy, K=5, through the resumable runner of the experiment
(:func:`rosa_ext.harness.resumable.run_resumable`: the same chunked, cached loop, the same tables with
the degeneration measure and Acc@5 counting only sensible corrections). A rerun continues.

    python benchmarks/experiment/levers.py --study --model smollm2 [--problems 60] [--threads 1]
        [--out benchmarks/results/experiment/levers32/smollm2]

The older lever sets (``--run``; SmolLM2 only, one row per configuration in ``<tag>.json``):

    python benchmarks/experiment/levers.py [--run 5] [--problems 60] [--turns 5] [--only INDEX ...] [--tag NAME]
        [--append] [--sample]
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from dataclasses import asdict, replace

import torch

from rosa_ext.harness.experiment import (
    METHODS,
    attainment_summary,
    first_turn,
    load_model,
    load_problems,
    repeat_count,
    run_method,
    run_resumable,
)
from rosa_ext.harness.metrics import accuracy_curve, correction_uplift
from rosa_ext.harness.problems import heldout_split

sys.path.insert(0, os.path.join(os.path.dirname(os.path.abspath(__file__)), ".."))  # benchmarks/: common
import common  # noqa: E402

OUT = os.path.join(os.path.dirname(__file__), "..", "results", "experiment")

B, PG, RL, RH = METHODS["baseline"], METHODS["pg"], METHODS["rosa-lora"], METHODS["rosa-hidden"]
# (name, spec, decoding)
def R(spec, beta=1.0, damping=1e-2, on="response", **kw):
    return replace(spec, beta=beta, damping=damping, update_on=on, **kw)


# In priority order (the CPU budget may cut the tail). Run 3 (this list) starts from
# beta 0.1, damping 0.1, answer-span target (PG lr 10) and varies one lever at a time.
# Only its first two rows ran (levers_run3.json): beta 0.1 overshot on the second LoRA
# update (answers degenerate to "4444..."), so the committed run (rosa_ext.harness.methods.METHODS)
# went back to beta 1. The greedy baseline is known flat on the dev problems
# (levers_run1.json: 35% at every turn), so it is not re-run.
CONFIGS_RUN3 = [
    ("rosa-lora b0.1 l0.1 answer", R(RL, beta=0.1, damping=0.1, on="answer_span"), "greedy"),
    ("rosa-lora b0.1 l0.1 resp", R(RL, beta=0.1, damping=0.1, on="response"), "greedy"),
    ("rosa-hidden b0.1 l0.1 answer", R(RH, beta=0.1, damping=0.1, on="answer_span"), "greedy"),
    ("rosa-lora b0.01 l0.1 answer", R(RL, beta=0.01, damping=0.1, on="answer_span"), "greedy"),
    ("rosa-lora b0.1 l1 answer", R(RL, beta=0.1, damping=1.0, on="answer_span"), "greedy"),
    ("rosa-lora b1 l0.01 answer", R(RL, beta=1.0, damping=0.01, on="answer_span"), "greedy"),
    ("baseline", B, "sample"),
    ("rosa-lora b0.1 l0.1 answer", R(RL, beta=0.1, damping=0.1, on="answer_span"), "sample"),
    ("pg lr10 answer", R(PG, lr=10.0, on="answer_span"), "greedy"),
    ("baseline", B, "greedy"),
]

# Run 4: one lever at a time from the committed setting (beta 1, damping 0.1, answer
# span), after the committed run showed ROSA-hidden's steps too small to change an
# answer (median ||delta|| 0.006, mean log-prob change -0.01): smaller damping and beta.
CONFIGS_RUN4 = [
    ("baseline", B, "greedy"),
    ("rosa-hidden b1 l0.01 answer", R(RH, beta=1.0, damping=0.01, on="answer_span"), "greedy"),
    ("rosa-hidden b1 l0.001 answer", R(RH, beta=1.0, damping=0.001, on="answer_span"), "greedy"),
    ("rosa-lora b1 l0.01 answer", R(RL, beta=1.0, damping=0.01, on="answer_span"), "greedy"),
    ("rosa-lora b0.3 l0.1 answer", R(RL, beta=0.3, damping=0.1, on="answer_span"), "greedy"),
    ("rosa-hidden b0.3 l0.01 answer", R(RH, beta=0.3, damping=0.01, on="answer_span"), "greedy"),
    # PG at lr 10 (the committed run) degenerated the answers (14% boxed after turn 1):
    ("pg lr1 answer", R(PG, lr=1.0, on="answer_span"), "greedy"),
    ("pg lr0.1 answer", R(PG, lr=0.1, on="answer_span"), "greedy"),
]


# Run 5: damping relative to the Gram matrix (damping_mode="relative": lambda = damping x
# mean_t ||J_t||^2, Levenberg-Marquardt scaling) against the absolute 0.1, on the answer-span
# target, with the target attainment of every update measured. Priority order: the relative
# lambda sweep at beta 1 for both parameterisations (with the absolute 0.1 LoRA row and the
# baseline as references), then beta 0.3, then the remaining absolute rows.
def Q(spec, lam, beta, dm="relative"):
    return R(spec, beta=beta, damping=lam, on="answer_span", damping_mode=dm)


def _name(kind, lam, beta, dm="relative"):
    return f"{kind} {'rel' if dm == 'relative' else 'abs'}{lam:g} b{beta:g}"


CONFIGS_RUN5 = [
    (_name("rosa-lora", 0.1, 1), Q(RL, 0.1, 1.0), "greedy"),
    (_name("rosa-hidden", 0.1, 1), Q(RH, 0.1, 1.0), "greedy"),
    (_name("rosa-lora", 0.1, 1, "absolute"), Q(RL, 0.1, 1.0, "absolute"), "greedy"),
    ("baseline", B, "greedy"),
    (_name("rosa-lora", 0.3, 1), Q(RL, 0.3, 1.0), "greedy"),
    (_name("rosa-hidden", 0.3, 1), Q(RH, 0.3, 1.0), "greedy"),
    (_name("rosa-lora", 1.0, 1), Q(RL, 1.0, 1.0), "greedy"),
    (_name("rosa-hidden", 1.0, 1), Q(RH, 1.0, 1.0), "greedy"),
    (_name("rosa-lora", 0.03, 1), Q(RL, 0.03, 1.0), "greedy"),
    (_name("rosa-hidden", 0.03, 1), Q(RH, 0.03, 1.0), "greedy"),
    (_name("rosa-lora", 0.1, 0.3), Q(RL, 0.1, 0.3), "greedy"),
    (_name("rosa-hidden", 0.1, 0.3), Q(RH, 0.1, 0.3), "greedy"),
    (_name("rosa-lora", 0.3, 0.3), Q(RL, 0.3, 0.3), "greedy"),
    (_name("rosa-hidden", 0.3, 0.3), Q(RH, 0.3, 0.3), "greedy"),
    (_name("rosa-lora", 1.0, 0.3), Q(RL, 1.0, 0.3), "greedy"),
    (_name("rosa-hidden", 1.0, 0.3), Q(RH, 1.0, 0.3), "greedy"),
    (_name("rosa-hidden", 0.1, 1, "absolute"), Q(RH, 0.1, 1.0, "absolute"), "greedy"),
    (_name("rosa-lora", 0.1, 0.3, "absolute"), Q(RL, 0.1, 0.3, "absolute"), "greedy"),
    (_name("rosa-hidden", 0.1, 0.3, "absolute"), Q(RH, 0.1, 0.3, "absolute"), "greedy"),
    (_name("rosa-lora", 0.03, 0.3), Q(RL, 0.03, 0.3), "greedy"),
    (_name("rosa-hidden", 0.03, 0.3), Q(RH, 0.03, 0.3), "greedy"),
]
RUNS = {3: CONFIGS_RUN3, 4: CONFIGS_RUN4, 5: CONFIGS_RUN5}


#: The dev study, one lever at a time from the defaults (relative ridge 0.3, beta 1, the boxed
#: answer's tokens), in priority order. The choice rule, fixed before the runs: per family (ROSA-hidden,
#: ROSA-LoRA, PG on the LoRA, PG on the shift) the setting with the highest dev Acc@5 counting only
#: sensible corrections; ties go to the fewer degenerate later answers (copies of the feedback plus boxed
#: numbers not derived), then to the default.
LEVERS = [METHODS[n] for n in ("baseline", "resample", "ban", "guess", "rosa-hidden")] + [
    replace(METHODS[n], name=n.replace("-cap", " cap").replace("-b", " b").replace("-rel", " rel")
            .replace("-response", " response")) for n in (
        "rosa-hidden-cap0.02", "rosa-hidden-cap0.05", "rosa-hidden-b3", "rosa-hidden-rel1", "rosa-hidden-rel3",
        "rosa-hidden-response")] + [METHODS["rosa-lora"]] + [
    replace(METHODS[n], name=n.replace("-b", " b").replace("-rel", " rel")) for n in ("rosa-lora-b0.5",
                                                                                    "rosa-lora-rel0.1")] + [
    replace(METHODS[n], name=n.replace("-match", " match").replace("-clip-", " clip ")) for n in (
        "pg-lora-match", "pg-lora-clip-lr1", "pg-lora-clip-lr10", "pg-hidden-match", "pg-hidden-clip-lr1",
        "pg-hidden-clip-lr10")]


def study(argv) -> int:
    ap = argparse.ArgumentParser(description="the lever study on the dev split")
    ap.add_argument("--study", action="store_true")
    ap.add_argument("--model", default="smollm2")
    ap.add_argument("--problem-set", default=None, help="default: qwen-mix for qwen25-coder, else default")
    ap.add_argument("--problems", type=int, default=60)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--max-new-tokens", type=int, default=None, help="default: 32 (smollm2), 40 (others)")
    ap.add_argument("--batch-size", type=int, default=30)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--only", default=None, help="comma list of lever names (default: all)")
    ap.add_argument("--out", default=None)
    ap.add_argument("--quiet", action="store_true")
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    pset = args.problem_set or ("qwen-mix" if args.model == "qwen25-coder" else "default")
    mnt = args.max_new_tokens or (32 if args.model == "smollm2" else 40)
    specs = LEVERS if not args.only else [s for s in LEVERS if s.name in args.only.split(",")]
    out = args.out or os.path.join(OUT, "levers32", args.model)
    problems = load_problems(pset, "dev", args.problems)
    model, tok = load_model(args.model)
    cmd = "python benchmarks/experiment/levers.py " + " ".join(argv)
    run_resumable(model, tok, problems, specs, out=out, seeds=[0], turns=args.turns, decoding="greedy",
                  temperature=0.7, max_new_tokens=mnt, batch_size=args.batch_size,
                  config={"command": cmd, "model": args.model, "problem_set": pset, "split": "dev",
                          "threads": torch.get_num_threads()},
                  title=f"lever study, {args.model}, dev {pset}", quiet=args.quiet)
    return 0


def repeat_rate(convs) -> float:
    """Fraction of answers after turn 1 whose boxed number was already given (and rejected)
    earlier in the same conversation: what a pure 'push the wrong answer down' update can fix."""
    return repeat_count(convs)["share"] or 0.0


def main() -> int:
    if "--study" in sys.argv[1:]:
        return study(sys.argv[1:])
    ap = argparse.ArgumentParser()
    ap.add_argument("--problems", type=int, default=30)
    ap.add_argument("--turns", type=int, default=5)
    ap.add_argument("--seed", type=int, default=0)
    ap.add_argument("--max-new-tokens", type=int, default=32)
    ap.add_argument("--batch-size", type=int, default=40)
    ap.add_argument("--only", nargs="*", default=None, help="config indices to run")
    ap.add_argument("--run", type=int, choices=sorted(RUNS), default=5, help="which list of configurations")
    ap.add_argument("--threads", type=int, default=1, help="torch threads (1 on a shared CPU)")
    ap.add_argument("--tag", default="levers")
    ap.add_argument("--append", action="store_true", help="add the rows to an existing <tag>.json")
    ap.add_argument("--sample", action="store_true",
                    help="run the selected configs with sampled decoding instead (temperature 0.7, --seed)")
    args = ap.parse_args()
    torch.set_num_threads(args.threads)  # 2 threads ran 2.5-5x slower on a shared CPU
    dev, _ = heldout_split()
    problems = dev[: args.problems]
    model, tok = load_model("smollm2")
    os.makedirs(OUT, exist_ok=True)
    rows = []
    firsts = {}
    configs = RUNS[args.run]
    todo = [configs[int(i)] for i in args.only] if args.only else configs
    if args.sample:
        todo = [(n, sp, "sample") for n, sp, _ in todo]
    path = os.path.join(OUT, f"{args.tag}.json")
    if args.append and os.path.exists(path):
        with open(path) as f:
            rows = json.load(f)["rows"]
    total = common.Stopwatch()
    for name, spec, decoding in todo:
        clock = common.Stopwatch()
        sample = decoding == "sample"
        if decoding not in firsts:
            print(f"first turn ({decoding}) ...", flush=True)
            firsts[decoding] = first_turn(model, tok, problems, seed=args.seed, max_new_tokens=args.max_new_tokens,
                                          do_sample=sample, temperature=0.7, batch_size=args.batch_size)
            print(f"  first turn {clock.elapsed_s():.0f}s", flush=True)
            clock = common.Stopwatch()
        convs = run_method(model, tok, problems, spec, turns=args.turns, seed=args.seed,
                           max_new_tokens=args.max_new_tokens, do_sample=sample, temperature=0.7,
                           batch_size=args.batch_size, first=firsts[decoding])
        s = [c.solved_at for c in convs]
        ups = [t for c in convs for t in c.turns if t.update_ms is not None]
        dl = [t.logp_after - t.logp_before for t in ups]
        boxed = sum("\\boxed" in t.text for c in convs for t in c.turns) / sum(len(c.turns) for c in convs)
        row = {"config": name, "decoding": decoding, "spec": asdict(spec),
               "acc_curve": accuracy_curve(s, args.turns), "uplift": correction_uplift(s, args.turns),
               "median_norm": sorted(t.update_norm for t in ups)[len(ups) // 2] if ups else None,
               "mean_dlogp": sum(dl) / len(dl) if dl else None, "boxed_rate": boxed,
               "repeat_rate": repeat_rate(convs), "repeat": repeat_count(convs), **attainment_summary(ups),
               "first_failures_corrected": sum(x is not None and x > 0 for x in s),
               "first_failures": sum(x != 0 for x in s),
               "update_ms": sum(t.update_ms for t in ups) / len(ups) if ups else None,
               "seconds": clock.elapsed_s(),
               "example": [t.text for t in max(convs, key=lambda c: len(c.turns)).turns]}
        rows.append(row)
        curve = " ".join(f"{100 * v:.0f}" for v in row["acc_curve"])
        att = row["attainment_median"]
        print(f"{name:34s} {decoding:6s} acc/turn {curve}  uplift {100 * row['uplift']:.0f}  "
              f"|d| {row['median_norm'] or 0:.3g}  dlogp {row['mean_dlogp'] or 0:+.2f}  "
              f"attain {'-' if att is None else format(att, '.2f')}  boxed {boxed:.2f}  "
              f"repeat {row['repeat_rate']:.2f}  {row['seconds']:.0f}s (total {total.elapsed_s():.0f}s)", flush=True)
        with open(path, "w") as f:
            json.dump({"problems": args.problems, "turns": args.turns, "seed": args.seed, "rows": rows}, f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
