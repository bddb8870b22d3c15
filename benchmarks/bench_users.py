"""Many users on one model: users served per second and update latency, RosaUsers vs B single-user sessions.

For B in ``--batch`` (default 1, 8, 32) and each mode: B users each send a ``--prompt``-token prompt and
get a ``--new``-token greedy answer, then all B rate their answers (reward -1). Two ways to serve them:

- ``RosaUsers``: one batched ``generate`` with every row carrying its user's state, then ONE batched ROSA
  step for all B users (:mod:`rosa_ext.integrations.users`);
- ``sessions``: one ``attach``-ed session per user, used in turn (``session.generate`` then
  ``session.update(reward=...)``; the sessions' states swapped in with ``load_state_dict``, as a server
  holding one model would).

Timed (wall clock, ``--threads`` torch threads, median of ``--reps`` rounds after a warm-up round):
a round's generate seconds, its update seconds, and users served per second (B / the round's seconds).
``--out DIR`` writes ``users_<date>.json`` and ``.md`` with the machine and commit.
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
from rosa_ext.integrations.users import RosaUsers


def _model(name: str):
    from rosa_ext.integrations.models import load_smollm2, tiny_causal_lm
    if name == "tiny":
        m = tiny_causal_lm("llama", vocab_size=2048, hidden_size=128, num_layers=2)
    else:
        m, _ = load_smollm2(fresh=True)
    m.generation_config.eos_token_id = None  # every answer exactly --new tokens long
    return m


def _round_users(users: RosaUsers, ids: torch.Tensor, gen_kw: dict):
    t0 = time.perf_counter()
    users.generate(ids, [f"u{i}" for i in range(ids.shape[0])], **gen_kw)
    t1 = time.perf_counter()
    users.update({f"u{i}": -1.0 for i in range(ids.shape[0])})
    return t1 - t0, time.perf_counter() - t1


def _round_sessions(s, states: List[dict], ids: torch.Tensor, gen_kw: dict):
    tg = tu = 0.0
    for i in range(ids.shape[0]):
        s.load_state_dict(states[i])
        t0 = time.perf_counter()
        s.generate(ids[i:i + 1], **gen_kw)
        t1 = time.perf_counter()
        s.update(reward=-1.0)
        tu += time.perf_counter() - t1
        tg += t1 - t0
        states[i] = s.state_dict()
    return tg, tu


def measure(model, name: str, mode: str, B: int, prompt: int, new: int, reps: int) -> Dict[str, Any]:
    V = model.config.vocab_size
    ids = torch.randint(3, V, (B, prompt), generator=torch.Generator().manual_seed(B))
    gen_kw = dict(max_new_tokens=new, min_new_tokens=new, do_sample=False, pad_token_id=0)
    users = RosaUsers(model, mode=mode)
    rounds = [_round_users(users, ids, gen_kw) for _ in range(reps + 1)][1:]
    users.detach()
    s = rosa_ext.attach(model, mode=mode, warmup=False)
    states = [s.state_dict() for _ in range(B)]
    srounds = [_round_sessions(s, states, ids, gen_kw) for _ in range(reps + 1)][1:]
    s.detach()

    def med(rs, k):
        return statistics.median(r[k] for r in rs)

    ug, uu, sg, su = med(rounds, 0), med(rounds, 1), med(srounds, 0), med(srounds, 1)
    return dict(model=name, mode=mode, B=B, prompt_tokens=prompt, answer_tokens=new,
                users_generate_s=ug, users_update_s=uu, users_per_s=B / (ug + uu),
                sessions_generate_s=sg, sessions_update_s=su, sessions_per_s=B / (sg + su),
                update_latency_users_ms=1e3 * uu, update_latency_sessions_ms=1e3 * su / B)


def markdown(res: Dict[str, Any]) -> str:
    lines = [f"# Many users on one model ({res['date']})", "",
             f"Machine: {res['cpu']}, {res['threads']} torch thread(s); torch {res['versions'].get('torch')}; commit "
             f"{res['commit']}. Median of {res['reps']} rounds (after a warm-up round); each round: B users, one "
             f"prompt + answer each, then every user rates its answer.", "",
             "| model | mode | B | RosaUsers: users/s | sessions: users/s | RosaUsers: batched update ms (all B) | "
             "sessions: update ms per user | RosaUsers generate s | sessions generate s |",
             "|---|---|---|---|---|---|---|---|---|"]
    for r in res["rows"]:
        lines.append(f"| {r['model']} | {r['mode']} | {r['B']} | {r['users_per_s']:.2f} | {r['sessions_per_s']:.2f} | "
                     f"{r['update_latency_users_ms']:.1f} | {r['update_latency_sessions_ms']:.1f} | "
                     f"{r['users_generate_s']:.2f} | {r['sessions_generate_s']:.2f} |")
    return "\n".join(lines) + "\n"


def main(argv: List[str] | None = None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--models", default="tiny,smollm2")
    ap.add_argument("--modes", default="lora,hidden")
    ap.add_argument("--batch", default="1,8,32")
    ap.add_argument("--prompt", type=int, default=48)
    ap.add_argument("--new", type=int, default=16)
    ap.add_argument("--reps", type=int, default=3)
    ap.add_argument("--threads", type=int, default=1)
    ap.add_argument("--out", default=None)
    args = ap.parse_args(argv)
    torch.set_num_threads(args.threads)
    res: Dict[str, Any] = dict(date=common.utc_now(), cpu=common.cpu_name(), threads=args.threads, reps=args.reps,
                               commit=common.commit(), versions=common.versions(), rows=[])
    for name in args.models.split(","):
        model = _model(name)
        for mode in args.modes.split(","):
            for B in (int(b) for b in args.batch.split(",")):
                print(f"  {name} {mode} B={B} ...", flush=True)
                row = measure(model, name, mode, B, args.prompt, args.new, args.reps)
                print("   ", {k: (round(v, 3) if isinstance(v, float) else v) for k, v in row.items()}, flush=True)
                res["rows"].append(row)
    print(markdown(res))
    if args.out:
        os.makedirs(args.out, exist_ok=True)
        stem = os.path.join(args.out, f"users_{res['date'][:10]}")
        with open(stem + ".json", "w") as f:
            json.dump(res, f, indent=1)
        with open(stem + ".md", "w") as f:
            f.write(markdown(res))
    return 0


if __name__ == "__main__":
    raise SystemExit(main())
