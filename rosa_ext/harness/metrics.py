"""The paper's multi-turn metrics (Appendix D.3) with confidence intervals.

Input everywhere: ``solved_at``, a sequence with one entry per (problem, seed)
run: the 0-based turn of the first correct answer, or None if the problem was
never solved within the turns that ran.

- **Accuracy within K turns** (paper Eq. 48). With P the set of problems and
  ``s_i(K) = 1`` if problem i is solved at any turn ``k <= K``::

      Acc(K) = (1 / |P|) * sum_{i in P} s_i(K)

- **Correction Uplift** (paper Eq. 49). With F = {i : problem i is wrong at
  turn 1} the initially failed problems::

      Uplift(K) = (1 / |F|) * sum_{i in F} s_i(K)

  i.e. the fraction of first-turn failures corrected at some turn 2..K
  (0 when F is empty).

Confidence intervals: :func:`bootstrap_ci` resamples problems (clusters: all
seeds of one problem together, so repeated seeds do not shrink the interval
artificially) and takes percentiles; :func:`normal_ci` is the Wald interval
of a proportion for quick reads.
"""
from __future__ import annotations

import math
import random
from typing import Callable, Dict, List, Optional, Sequence, Tuple

SolvedAt = Optional[int]


def _check_k(k: int) -> int:
    if isinstance(k, bool) or int(k) != k or k < 1:
        raise ValueError(f"metrics: K must be an int >= 1, got {k!r}")
    return int(k)


def accuracy(solved_at: Sequence[SolvedAt], k: int) -> float:
    """Acc(K) = mean over problems of [solved at a turn <= K] (turns counted from 1).

    Args:
        solved_at: (n,) 0-based first-correct turn or None per problem run.
        k: number of turns K >= 1.
    """
    k = _check_k(k)
    if len(solved_at) == 0:
        raise ValueError("accuracy: no problems")
    return sum(s is not None and s < k for s in solved_at) / len(solved_at)


def correction_uplift(solved_at: Sequence[SolvedAt], k: int) -> float:
    """Uplift(K) = |{i in F : solved at a turn in 2..K}| / |F|, F = problems wrong at turn 1.

    Returns 0.0 when every problem was solved at turn 1 (F empty).
    """
    k = _check_k(k)
    failed = [s for s in solved_at if s != 0]
    if not failed:
        return 0.0
    return sum(s is not None and s < k for s in failed) / len(failed)


def accuracy_curve(solved_at: Sequence[SolvedAt], turns: int) -> List[float]:
    """[Acc(1), ..., Acc(turns)]."""
    return [accuracy(solved_at, k) for k in range(1, _check_k(turns) + 1)]


def normal_ci(p: float, n: int, z: float = 1.96) -> Tuple[float, float]:
    """Wald interval ``p +- z sqrt(p (1 - p) / n)`` clipped to [0, 1]."""
    if n < 1:
        raise ValueError("normal_ci: n must be >= 1")
    h = z * math.sqrt(max(p * (1 - p), 0.0) / n)
    return max(0.0, p - h), min(1.0, p + h)


def bootstrap_ci(runs: Dict[str, List[SolvedAt]], metric: Callable[[Sequence[SolvedAt]], float], *,
                 n_boot: int = 2000, level: float = 0.95, seed: int = 0) -> Tuple[float, float, float]:
    """Point estimate and percentile bootstrap interval, resampling problems.

    Args:
        runs: problem id -> that problem's ``solved_at`` over seeds (one entry per seed).
        metric: e.g. ``lambda s: accuracy(s, 5)``; applied to the pooled list.
        n_boot: bootstrap resamples; level: coverage (0.95).
    Returns:
        (estimate, low, high).
    """
    if not runs:
        raise ValueError("bootstrap_ci: no problems")
    if not 0 < level < 1:
        raise ValueError(f"bootstrap_ci: level must be in (0, 1), got {level}")
    keys = sorted(runs)
    pooled = [s for key in keys for s in runs[key]]
    est = metric(pooled)
    rng = random.Random(seed)
    stats = []
    for _ in range(n_boot):
        sample = [s for _ in keys for s in runs[keys[rng.randrange(len(keys))]]]
        stats.append(metric(sample))
    stats.sort()
    lo = stats[int(math.floor((1 - level) / 2 * (n_boot - 1)))]
    hi = stats[int(math.ceil((1 + level) / 2 * (n_boot - 1)))]
    return est, lo, hi


def paired_bootstrap_diff(a: Dict[str, List[SolvedAt]], b: Dict[str, List[SolvedAt]],
                          metric: Callable[[Sequence[SolvedAt]], float], *, n_boot: int = 2000,
                          level: float = 0.95, seed: int = 0) -> Tuple[float, float, float]:
    """metric(a) - metric(b) with a paired bootstrap interval (same problems resampled for both).

    ``a`` and ``b`` must cover the same problem ids (the same problems under two methods).
    """
    if sorted(a) != sorted(b):
        raise ValueError("paired_bootstrap_diff: the two methods must cover the same problems")
    keys = sorted(a)
    est = metric([s for k in keys for s in a[k]]) - metric([s for k in keys for s in b[k]])
    rng = random.Random(seed)
    diffs = []
    for _ in range(n_boot):
        pick = [keys[rng.randrange(len(keys))] for _ in keys]
        diffs.append(metric([s for k in pick for s in a[k]]) - metric([s for k in pick for s in b[k]]))
    diffs.sort()
    lo = diffs[int(math.floor((1 - level) / 2 * (n_boot - 1)))]
    hi = diffs[int(math.ceil((1 + level) / 2 * (n_boot - 1)))]
    return est, lo, hi


def seed_spread(per_seed: Dict[str, List[SolvedAt]], metric: Callable[[Sequence[SolvedAt]], float]
                ) -> Dict[str, float]:
    """Spread of a metric over seeds: ``{"mean", "std", "min", "max", "n"}``.

    Args:
        per_seed: seed -> that seed's ``solved_at`` over all problems.
        metric: applied to each seed's list separately.
    ``std`` is the sample standard deviation (ddof=1; 0.0 for a single seed). Unlike
    :func:`bootstrap_ci` (problem sampling), this shows the variation that comes from the
    seed alone (sampled decoding, the LoRA ``a`` draw).
    """
    if not per_seed:
        raise ValueError("seed_spread: no seeds")
    vals = [metric(per_seed[k]) for k in sorted(per_seed)]
    m = sum(vals) / len(vals)
    sd = math.sqrt(sum((v - m) ** 2 for v in vals) / (len(vals) - 1)) if len(vals) > 1 else 0.0
    return {"mean": m, "std": sd, "min": min(vals), "max": max(vals), "n": len(vals)}


def _per_problem(scores: Dict[str, Sequence[float]], keys: Sequence[str]):
    import numpy as np

    sums = np.array([float(sum(scores[k])) for k in keys])
    counts = np.array([float(len(scores[k])) for k in keys])
    if (counts == 0).any():
        raise ValueError("bootstrap: every problem needs at least one score")
    return sums, counts


def bootstrap_mean_ci(scores: Dict[str, Sequence[float]], *, n_boot: int = 2000, level: float = 0.95,
                      seed: int = 0) -> Tuple[float, float, float]:
    """Pooled mean of per-(problem, seed) scores and its percentile bootstrap interval, resampling
    problems (vectorised; e.g. 0/1 "solved within K turns" gives Acc@K as :func:`bootstrap_ci` does).

    Args:
        scores: problem id -> that problem's scores (one per seed).
    Returns:
        (estimate, low, high).
    """
    import numpy as np

    if not scores:
        raise ValueError("bootstrap_mean_ci: no problems")
    if not 0 < level < 1:
        raise ValueError(f"bootstrap_mean_ci: level must be in (0, 1), got {level}")
    keys = sorted(scores)
    sums, counts = _per_problem(scores, keys)
    est = float(sums.sum() / counts.sum())
    pick = np.random.default_rng(seed).integers(0, len(keys), size=(n_boot, len(keys)))
    stats = np.sort(sums[pick].sum(1) / counts[pick].sum(1))
    lo = stats[int(math.floor((1 - level) / 2 * (n_boot - 1)))]
    hi = stats[int(math.ceil((1 + level) / 2 * (n_boot - 1)))]
    return est, float(lo), float(hi)


def paired_bootstrap_mean_diff(a: Dict[str, Sequence[float]], b: Dict[str, Sequence[float]], *, n_boot: int = 2000,
                               level: float = 0.95, seed: int = 0) -> Tuple[float, float, float]:
    """mean(a) - mean(b) of per-(problem, seed) scores with a paired bootstrap interval (the same problems
    resampled for both; vectorised). ``a`` and ``b`` must cover the same problem ids."""
    import numpy as np

    if sorted(a) != sorted(b):
        raise ValueError("paired_bootstrap_mean_diff: the two methods must cover the same problems")
    if not a:
        raise ValueError("paired_bootstrap_mean_diff: no problems")
    keys = sorted(a)
    sa, ca = _per_problem(a, keys)
    sb, cb = _per_problem(b, keys)
    est = float(sa.sum() / ca.sum() - sb.sum() / cb.sum())
    pick = np.random.default_rng(seed).integers(0, len(keys), size=(n_boot, len(keys)))
    d = np.sort(sa[pick].sum(1) / ca[pick].sum(1) - sb[pick].sum(1) / cb[pick].sum(1))
    lo = d[int(math.floor((1 - level) / 2 * (n_boot - 1)))]
    hi = d[int(math.ceil((1 + level) / 2 * (n_boot - 1)))]
    return est, float(lo), float(hi)
