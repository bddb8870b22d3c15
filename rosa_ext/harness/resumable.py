"""Resumable experiment runs: every method x seed, chunk by chunk, written as the run goes so that a
rerun of the same call continues where it stopped (:func:`run_resumable`).

An output folder holds ``config.json`` (what the run is; a rerun with other :data:`FROZEN` settings is
refused), ``runs.jsonl`` (one record per method, seed and problem, appended chunk by chunk:
:func:`read_records`, :func:`collect`), ``timing.jsonl`` (wall and CPU seconds per chunk and method:
:func:`timing_totals`) and ``results.json`` / ``results.md`` / ``accuracy_vs_turn.png``
(:mod:`rosa_ext.harness.summary`; PARTIAL until every problem is done).
"""
from __future__ import annotations

import json
import os
import platform
import subprocess
import time
from dataclasses import asdict
from typing import Any, Dict, List, Sequence, Tuple

import torch

from .conversation import DEFAULT_FEEDBACK, TurnRecord
from .methods import MethodSpec, seed_dependent
from .problems import Problem
from .runner import Conversation, run_chunk
from .summary import markdown_table, plot, summarize

#: config.json keys a rerun must repeat exactly (problems, seeds and methods may grow).
FROZEN = ("model", "problem_set", "split", "turns", "decoding", "temperature", "max_new_tokens", "batch_size",
          "feedback_prompt", "use_cache")


def _record(name: str, seed: int, j: int, c: Conversation) -> Dict[str, Any]:
    return {"method": name, "seed": seed, "problem": j, "question": c.problem.question, "answer": c.problem.answer,
            "solved_at": c.solved_at, "turns": [asdict(t) for t in c.turns]}


def read_records(path: str) -> List[Dict[str, Any]]:
    """The records of a ``runs.jsonl``; a last line cut short by a killed process is dropped (and removed
    from the file, so that appending continues cleanly)."""
    if not os.path.exists(path):
        return []
    with open(path) as f:
        lines = f.read().split("\n")
    recs, good = [], []
    for k, line in enumerate(lines):
        if not line.strip():
            continue
        try:
            recs.append(json.loads(line))
            good.append(line)
        except json.JSONDecodeError:
            if k < len(lines) - 2:  # only the last line may be cut short
                raise SystemExit(f"{path}: line {k + 1} is not JSON (not a cut-short last line); fix the file") from None
    if len(good) != sum(1 for x in lines if x.strip()):
        with open(path, "w") as f:
            f.write("".join(x + "\n" for x in good))
    return recs


def _append(path: str, lines: Sequence[Dict[str, Any]]) -> None:
    with open(path, "a") as f:
        f.write("".join(json.dumps(x) + "\n" for x in lines))
        f.flush()
        os.fsync(f.fileno())


def conversations_from(recs: Sequence[Dict[str, Any]]) -> List[Conversation]:
    """:class:`Conversation` records (for the summary) from ``runs.jsonl`` records."""
    return [Conversation(problem=Problem(r["question"], r["answer"]), messages=[],
                         turns=[TurnRecord(**t) for t in r["turns"]], solved_at=r["solved_at"]) for r in recs]


def collect(recs: Sequence[Dict[str, Any]], specs: Sequence[MethodSpec], seeds: Sequence[int], greedy: bool,
            n_problems: int) -> Tuple[Dict[str, Dict[int, List[Conversation]]], int]:
    """The runs of ``specs`` x ``seeds`` over the longest prefix of problems that every (method, seed) has
    done -> ({method: {seed: conversations}}, that prefix length). Under greedy decoding a seed-independent
    method's first seed stands for every seed (:func:`seed_dependent`)."""
    have: Dict[Tuple[str, int], Dict[int, Dict[str, Any]]] = {}
    for r in recs:
        have.setdefault((r["method"], r["seed"]), {})[r["problem"]] = r
    runs_for = {s.name: (list(seeds) if not greedy or seed_dependent(s) else [seeds[0]]) for s in specs}
    m = n_problems
    for s in specs:
        for sd in runs_for[s.name]:
            got = have.get((s.name, sd), {})
            k = 0
            while k < m and k in got:
                k += 1
            m = k
    runs: Dict[str, Dict[int, List[Conversation]]] = {}
    if m == 0:
        return runs, 0
    for s in specs:
        own = {sd: conversations_from([have[(s.name, sd)][j] for j in range(m)]) for sd in runs_for[s.name]}
        runs[s.name] = {sd: own.get(sd, own[runs_for[s.name][0]]) for sd in seeds}
    return runs, m


def run_resumable(model, tokenizer, problems: Sequence[Problem], specs: Sequence[MethodSpec], *, out: str,
                  config: Dict[str, Any], seeds: Sequence[int], turns: int, decoding: str, temperature: float,
                  max_new_tokens: int, batch_size: int, n_boot: int = 2000, use_cache: bool = True,
                  feedback_prompt: str = DEFAULT_FEEDBACK, title: str = "", quiet: bool = False,
                  write_summary: bool = True) -> Dict[str, Any]:
    """Every method x seed on ``problems``, chunk by chunk, appending each method's records to
    ``out/runs.jsonl`` as soon as it has finished a chunk; what ``out`` already holds is skipped, so the
    same call after an interruption continues where it stopped. Writes ``config.json`` (checked against
    ``config`` on a rerun: the :data:`FROZEN` keys must match and a method's settings may not change),
    ``timing.jsonl`` and, after every chunk, ``results.json`` / ``results.md`` (PARTIAL until done).
    Returns the final summary (None entries when nothing ran)."""
    from tqdm.auto import tqdm

    os.makedirs(out, exist_ok=True)
    cfg_path = os.path.join(out, "config.json")
    config = dict(config, methods={s.name: asdict(s) for s in specs}, feedback_prompt=feedback_prompt,
                  use_cache=use_cache, turns=turns, decoding=decoding, temperature=temperature,
                  max_new_tokens=max_new_tokens, batch_size=batch_size)
    if os.path.exists(cfg_path):
        with open(cfg_path) as f:
            old = json.load(f)
        bad = [k for k in FROZEN if old.get(k) != config.get(k)]
        bad += [f"method {n}" for n, sp in config["methods"].items() if n in old.get("methods", {})
                and old["methods"][n] != sp]
        if bad:
            raise SystemExit(f"run_resumable: {out} holds a run with other settings ({', '.join(bad)}); use another "
                             "--out or the same settings")
        merged = dict(old)
        merged["methods"] = {**old.get("methods", {}), **config["methods"]}
        merged["seeds"] = sorted(set(old.get("seeds", [])) | set(seeds))
        merged["problems"] = max(int(old.get("problems", 0)), len(problems))
        merged.setdefault("commands", []).append(config.get("command"))
        config = merged
    else:
        config = dict(config, seeds=sorted(seeds), problems=len(problems), commands=[config.get("command")])
    with open(cfg_path, "w") as f:
        json.dump(config, f, indent=1)
    runs_path, timing_path = os.path.join(out, "runs.jsonl"), os.path.join(out, "timing.jsonl")
    recs = read_records(runs_path)
    done = {(r["method"], r["seed"], r["problem"]) for r in recs}
    greedy = decoding == "greedy"
    t_start = time.perf_counter()

    def planned(spec: MethodSpec, seed: int) -> bool:
        if greedy and seed != seeds[0] and not seed_dependent(spec):
            return False  # the first seed's run stands for it
        return not (spec.kind == "resample" and not greedy)  # sampled: resample is the baseline itself

    active = [s for s in specs if any(planned(s, sd) for sd in seeds)]
    skipped = [s.name for s in specs if s not in active]
    todo_n = sum(1 for sd in seeds for s in active if planned(s, sd) for j in range(len(problems))
                 if (s.name, sd, j) not in done)
    bar = tqdm(total=todo_n, desc="conversations", unit="conv", disable=quiet, dynamic_ncols=True)
    summary: Dict[str, Any] = {}
    try:
        for seed in seeds:
            for c0 in range(0, len(problems), batch_size):
                chunk = list(problems[c0: c0 + batch_size])
                js = range(c0, c0 + len(chunk))
                todo = [s for s in active if planned(s, seed) and any((s.name, seed, j) not in done for j in js)]
                if not todo:
                    continue
                bar.set_postfix_str(f"seed {seed}, problems {c0}-{c0 + len(chunk) - 1}")

                def on_method(spec: MethodSpec, convs: List[Conversation], timing: Dict[str, float],
                              seed: int = seed, c0: int = c0) -> None:
                    lines = [_record(spec.name, seed, c0 + j, c) for j, c in enumerate(convs)
                             if (spec.name, seed, c0 + j) not in done]
                    _append(runs_path, lines)
                    _append(timing_path, [dict(timing, method=spec.name, seed=seed, chunk_start=c0,
                                               chunk_size=len(convs))])
                    for x in lines:
                        done.add((x["method"], x["seed"], x["problem"]))
                        recs.append(x)
                    bar.update(len(lines))

                run_chunk(model, tokenizer, chunk, todo, turns=turns, seed=seed, max_new_tokens=max_new_tokens,
                          do_sample=not greedy, temperature=temperature, chunk_start=c0,
                          feedback_prompt=feedback_prompt, use_cache=use_cache, on_method=on_method)
                if write_summary:
                    summary = _write_results(out, recs, active, seeds, greedy, len(problems), turns, config,
                                             min(n_boot, 300), feedback_prompt, title, skipped, final=False)
    finally:
        bar.close()
    if write_summary:
        summary = _write_results(out, recs, active, seeds, greedy, len(problems), turns, config, n_boot,
                                 feedback_prompt, title, skipped, final=True)
    if not quiet:
        print(f"run_resumable: {out}: {time.perf_counter() - t_start:.0f} s in this call")
    return summary


def timing_totals(out: str) -> Dict[str, Any]:
    """Sums of ``out/timing.jsonl``: wall and CPU seconds and generated answers, in all and per method."""
    path = os.path.join(out, "timing.jsonl")
    tot: Dict[str, Any] = {"wall_s": 0.0, "cpu_s": 0.0, "answers": 0, "per_method": {}}
    if not os.path.exists(path):
        return tot
    with open(path) as f:
        for line in f:
            if not line.strip():
                continue
            t = json.loads(line)
            pm = tot["per_method"].setdefault(t["method"], {"wall_s": 0.0, "cpu_s": 0.0, "answers": 0})
            for k in ("wall_s", "cpu_s", "answers"):
                tot[k] += t[k]
                pm[k] += t[k]
    tot["cpu_hours"] = tot["cpu_s"] / 3600
    return tot


def _write_results(out: str, recs, specs, seeds, greedy: bool, n_problems: int, turns: int, config, n_boot: int,
                   feedback: str, title: str, skipped: Sequence[str], final: bool) -> Dict[str, Any]:
    runs, m = collect(recs, specs, seeds, greedy, n_problems)
    if not runs:
        return {}
    complete = m == n_problems and final
    summary = summarize(runs, turns, n_boot=n_boot, feedback=feedback)
    timing = timing_totals(out)
    meta = {"command": (config.get("commands") or [config.get("command")])[-1], "args": config.get("args"),
            "methods": [config["methods"][s.name] for s in specs], "config": config, "complete": complete,
            "problems_done": m, "problems_planned": n_problems,
            "timing": timing, "skipped_methods": list(skipped), "versions": _versions(),
            "greedy_seed_reuse": (None if not greedy else "seed-independent methods (baseline, ban, guess, hidden "
                                  "shift) ran on the first seed, which stands for every seed (seed_dependent())")}
    with open(os.path.join(out, "results.json"), "w") as f:
        json.dump({"meta": meta, "summary": summary}, f, indent=1)
    state = "" if complete else f" — PARTIAL: {m} of {n_problems} problems done for every method"
    with open(os.path.join(out, "results.md"), "w") as f:
        f.write(f"{title or os.path.basename(out)}: {m} problems x seeds {list(seeds)}, K={turns}, "
                f"{'greedy' if greedy else 'sampled'} decoding{state}; CPU time so far {timing['cpu_hours']:.2f} h "
                f"(`timing.jsonl`); commands in `config.json`"
                + (f"; not run: {', '.join(skipped)} (under sampled decoding `resample` is the baseline)"
                   if skipped else "") + "\n\n" + markdown_table(summary, turns))
    if complete:
        plot(summary, turns, os.path.join(out, "accuracy_vs_turn.png"), title or os.path.basename(out))
    return summary


def _versions() -> Dict[str, str]:
    import transformers

    try:
        commit = subprocess.run(["git", "rev-parse", "HEAD"], capture_output=True, text=True, timeout=10,
                                cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    except Exception:  # noqa: BLE001 -- no git: record nothing
        commit = ""
    return {"python": platform.python_version(), "torch": torch.__version__,
            "transformers": transformers.__version__, "platform": platform.platform(),
            "threads": str(torch.get_num_threads()), "commit": commit}
