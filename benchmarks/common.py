"""What every benchmark script shares: the environment of a result and the timers.

- :func:`commit`: the checkout's short HEAD sha, marked ``+dirty:<files>`` when the
  code that produces the numbers has uncommitted changes;
- :func:`versions`, :func:`cpu_name`, :func:`gpu_name`, :func:`utc_now`: what a result
  records about the machine and the software;
- :func:`cuda_times_ms`: CUDA-event timings (device time of the work queued by a call);
- :func:`wall_times_ms`, :func:`timed_call_s`, :func:`sync`, :class:`Stopwatch`:
  wall-clock timings (synchronised on CUDA).

Scripts import it by plain name (``import common``): a script run as ``python
benchmarks/<script>.py`` and the pytest files in this folder have ``benchmarks/`` on
``sys.path`` already; scripts in sub-folders (``benchmarks/experiment/``) and tests in
``python_tests/`` put it there first.
"""
from __future__ import annotations

import datetime
import importlib
import pathlib
import platform
import subprocess
import time
from typing import Any, Callable, Dict, List, Optional, Sequence

import torch

#: The repository root (this file is ``<root>/benchmarks/common.py``).
ROOT = pathlib.Path(__file__).resolve().parents[1]

#: Paths whose uncommitted changes :func:`commit` reports: the package, its C++/CUDA
#: sources and the benchmark code (not the results the benchmarks write).
SOURCE_PATHS = ("rosa_ext", "csrc", "benchmarks", ":(exclude)benchmarks/results")


# ----------------------------------------------------------------------------- environment
def commit(paths: Sequence[str] = SOURCE_PATHS) -> str:
    """Short HEAD sha, plus ``+dirty:<file names>`` for uncommitted changes under ``paths``.

    "unknown" when git or the repository is not available.
    """
    try:
        sha = subprocess.check_output(["git", "rev-parse", "--short", "HEAD"], text=True, cwd=ROOT,
                                      stderr=subprocess.DEVNULL).strip()
        dirty = subprocess.check_output(["git", "diff", "--name-only", "HEAD", "--", *paths], text=True,
                                        cwd=ROOT, stderr=subprocess.DEVNULL).split()
        return sha + (f"+dirty:{','.join(pathlib.Path(f).name for f in dirty)}" if dirty else "")
    except Exception:
        return "unknown"


def cpu_name() -> str:
    """The CPU's model name (``/proc/cpuinfo``; else what :mod:`platform` knows)."""
    try:
        with open("/proc/cpuinfo") as f:
            for line in f:
                if line.startswith("model name"):
                    return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return platform.processor() or platform.machine()


def gpu_name() -> Optional[str]:
    """The current CUDA device's name, or None without one."""
    return torch.cuda.get_device_name() if torch.cuda.is_available() else None


def _module_version(name: str) -> Optional[str]:
    try:
        return str(importlib.import_module(name).__version__)
    except Exception:
        return None


def _dist_version(dist: str) -> Optional[str]:
    """Installed version without importing the package (transformers takes seconds to import)."""
    try:
        from importlib.metadata import version
        return version(dist)
    except Exception:
        return None


def versions() -> Dict[str, Any]:
    """The software and machine a result comes from; None for what is not installed / present.

    Keys: torch, triton, python, cuda (torch's CUDA version, None without a CUDA
    device), transformers, rosa_ext, platform, cpu, gpu. A script records the keys it
    needs (``{k: v[k] for k in (...)}``).
    """
    return dict(torch=torch.__version__, triton=_module_version("triton"), python=platform.python_version(),
                cuda=torch.version.cuda if torch.cuda.is_available() else None,
                transformers=_dist_version("transformers"), rosa_ext=_module_version("rosa_ext"),
                platform=platform.platform(), cpu=cpu_name(), gpu=gpu_name())


def utc_now() -> str:
    """The current UTC time, ISO 8601 to the second (the ``date`` of a result)."""
    return datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")


# ----------------------------------------------------------------------------- timers
def sync(device: str) -> None:
    """Wait for the queued CUDA work (no-op on the CPU)."""
    if device == "cuda":
        torch.cuda.synchronize()


class Stopwatch:
    """Wall-clock seconds since it was made (``time.perf_counter``; no device synchronisation)."""

    def __init__(self) -> None:
        self.start = time.perf_counter()

    def elapsed_s(self) -> float:
        return time.perf_counter() - self.start


def timed_call_s(fn: Callable[[], Any], device: str) -> float:
    """Wall seconds of one call of ``fn``, synchronised before and after on CUDA."""
    sync(device)
    t0 = time.perf_counter()
    fn()
    sync(device)
    return time.perf_counter() - t0


def wall_times_ms(fn: Callable[[], Any], reps: int, device: str = "cpu", budget_s: float = float("inf"),
                  min_reps: int = 3) -> List[float]:
    """Wall times (ms) of ``fn``: ``reps`` calls, fewer (but >= ``min_reps``) once ``budget_s`` is spent."""
    out: List[float] = []
    t_all = time.perf_counter()
    while len(out) < reps and (len(out) < min_reps or time.perf_counter() - t_all < budget_s):
        out.append(1000.0 * timed_call_s(fn, device))
    return out


def cuda_times_ms(fn: Callable[[], Any], reps: int, *, min_reps: Optional[int] = None,
                  budget_s: float = float("inf"), warmup: int = 0) -> List[float]:
    """CUDA-event times (ms) of ``fn`` on the current stream, one sample per call.

    ``warmup`` untimed calls (then a synchronisation) first; then up to ``reps`` timed
    calls, fewer (but >= ``min_reps``, default ``reps``) once ``budget_s`` wall seconds
    have passed. Each sample synchronises after its end event.
    """
    for _ in range(warmup):
        fn()
    if warmup:
        torch.cuda.synchronize()
    min_reps = reps if min_reps is None else min_reps
    out: List[float] = []
    t0 = time.perf_counter()
    while len(out) < reps and (len(out) < min_reps or time.perf_counter() - t0 < budget_s):
        start, end = torch.cuda.Event(enable_timing=True), torch.cuda.Event(enable_timing=True)
        start.record()
        fn()
        end.record()
        torch.cuda.synchronize()
        out.append(start.elapsed_time(end))
    return out
