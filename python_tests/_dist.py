"""Run a suite of vocabulary-parallel cases (python_tests/_dist_worker.py) on a group of processes.

:func:`run_group` starts ``world`` Python processes (gloo, rendezvous through a file, so no port
is needed), waits at most ``timeout`` seconds -- then kills them all, so a hang fails the tests
instead of blocking them -- and returns what each rank recorded: ``{rank: {case: result}}``.
Each worker writes its results after every case, so a hung or crashed run still reports the
cases it finished; the tests treat a missing case as a failure and show the workers' stderr.
"""
from __future__ import annotations

import json
import os
import pathlib
import subprocess
import sys
import tempfile
import time
from typing import Any, Dict

WORKER = pathlib.Path(__file__).with_name("_dist_worker.py")
ROOT = pathlib.Path(__file__).resolve().parents[1]


class GroupRun:
    """The outcome of one :func:`run_group`: per-rank results, stderr tails, wall time."""

    def __init__(self, results: Dict[int, Dict[str, Any]], logs: Dict[int, str], seconds: float,
                 timed_out: bool) -> None:
        self.results, self.logs, self.seconds, self.timed_out = results, logs, seconds, timed_out

    def case(self, name: str) -> Dict[int, Dict[str, Any]]:
        """{rank: result} of one case; AssertionError (with the logs) when a rank has none."""
        missing = [r for r, res in self.results.items() if name not in res]
        if missing:
            tail = "\n".join(f"--- rank {r} stderr ---\n{self.logs.get(r, '')[-3000:]}" for r in sorted(self.logs))
            raise AssertionError(f"case {name!r}: no result from rank(s) {missing} "
                                 f"({'timed out' if self.timed_out else 'crashed or skipped'})\n{tail}")
        return {r: res[name] for r, res in self.results.items()}


class _Started:
    """A group of worker processes that were started and not yet waited for."""

    def __init__(self, world: int, suite: str, workdir: pathlib.Path, timeout: float, backend: str) -> None:
        workdir.mkdir(parents=True, exist_ok=True)
        self.workdir, self.timeout, self.t0 = workdir, timeout, time.time()
        env = dict(os.environ)
        env["PYTHONPATH"] = os.pathsep.join([str(ROOT)] + [p for p in env.get("PYTHONPATH", "").split(os.pathsep) if p])
        env.setdefault("OMP_NUM_THREADS", "1")
        self.procs = []
        for rank in range(world):
            err = open(workdir / f"rank{rank}.err", "w")
            env_r = dict(env, RANK=str(rank), WORLD_SIZE=str(world))
            self.procs.append((subprocess.Popen(
                [sys.executable, str(WORKER), suite, str(workdir / "rendezvous"), str(workdir), backend],
                env=env_r, stdout=err, stderr=subprocess.STDOUT), err))

    def wait(self) -> GroupRun:
        timed_out = False
        for p, _ in self.procs:
            try:
                p.wait(timeout=max(self.timeout - (time.time() - self.t0), 0.1))
            except subprocess.TimeoutExpired:
                timed_out = True
                break
        if timed_out:
            for p, _ in self.procs:
                if p.poll() is None:
                    p.kill()
            for p, _ in self.procs:
                p.wait()
        results: Dict[int, Dict[str, Any]] = {}
        logs: Dict[int, str] = {}
        for rank, (_, err) in enumerate(self.procs):
            err.close()
            logs[rank] = (self.workdir / f"rank{rank}.err").read_text(errors="replace")
            path = self.workdir / f"rank{rank}.json"
            results[rank] = json.loads(path.read_text()) if path.exists() else {}
        return GroupRun(results, logs, time.time() - self.t0, timed_out)


def run_group(world: int, suite: str, workdir: pathlib.Path, *, timeout: float = 180.0,
              backend: str = "gloo") -> GroupRun:
    """Run ``suite`` of :mod:`_dist_worker` on ``world`` processes; see the module docstring."""
    return _Started(world, suite, workdir, timeout, backend).wait()


#: The CPU groups the test files share, started together once per pytest process (importing
#: torch, DTensor and transformers in every worker is most of their cost).
SUITES = {2: "core+dtensor+session", 3: "core"}
_STARTED: Dict[int, _Started] = {}
_RUNS: Dict[int, GroupRun] = {}


def shared_group(world: int, timeout: float = 240.0) -> GroupRun:
    """The run of ``SUITES[world]`` on ``world`` gloo processes (all of SUITES start at the first call)."""
    if not _STARTED:
        for w, suite in SUITES.items():
            _STARTED[w] = _Started(w, suite, pathlib.Path(tempfile.mkdtemp(prefix=f"rosa_dist{w}_")), timeout, "gloo")
    if world not in _RUNS:
        _RUNS[world] = _STARTED[world].wait()
    return _RUNS[world]
