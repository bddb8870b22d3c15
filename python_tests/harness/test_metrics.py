"""Paper Appendix D.3 metrics (Accuracy within K turns, Correction Uplift) and their intervals."""
import pytest

from rosa_ext.harness.metrics import (
    accuracy,
    accuracy_curve,
    bootstrap_ci,
    correction_uplift,
    normal_ci,
    paired_bootstrap_diff,
    seed_spread,
)


def test_metrics_paper_definitions():
    s = [0, 1, None, 3, 0, None]  # 0-based first-correct turn per problem
    assert accuracy(s, 1) == pytest.approx(2 / 6)
    assert accuracy(s, 2) == pytest.approx(3 / 6)
    assert accuracy(s, 5) == pytest.approx(4 / 6)
    # F = problems wrong at turn 1 = {1, None, 3, None}; corrected within K=5: {1, 3}
    assert correction_uplift(s, 5) == pytest.approx(2 / 4)
    assert correction_uplift(s, 1) == 0.0
    assert correction_uplift([0, 0], 3) == 0.0  # nothing to correct
    assert accuracy_curve(s, 4) == [accuracy(s, k) for k in (1, 2, 3, 4)]
    with pytest.raises(ValueError, match="K"):
        accuracy(s, 0)
    lo, hi = normal_ci(0.5, 100)
    assert lo == pytest.approx(0.402, abs=1e-3) and hi == pytest.approx(0.598, abs=1e-3)


def test_bootstrap_intervals():
    runs = {f"p{i}": [0 if i % 2 else None, 0 if i % 3 else 2] for i in range(40)}
    est, lo, hi = bootstrap_ci(runs, lambda s: accuracy(s, 3), n_boot=300)
    assert lo <= est <= hi and 0 < hi - lo < 0.5
    same = paired_bootstrap_diff(runs, runs, lambda s: accuracy(s, 3), n_boot=100)
    assert same == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same problems"):
        paired_bootstrap_diff(runs, {"x": [0]}, lambda s: accuracy(s, 3))


def test_seed_spread():
    per_seed = {"0": [0, None, None, None], "1": [0, 1, None, None], "2": [0, 1, 2, None]}
    s = seed_spread(per_seed, lambda x: accuracy(x, 5))
    assert s["mean"] == pytest.approx(0.5) and s["std"] == pytest.approx(0.25)
    assert (s["min"], s["max"], s["n"]) == (0.25, 0.75, 3)
    assert seed_spread({"0": [0, None]}, lambda x: accuracy(x, 1))["std"] == 0.0
    with pytest.raises(ValueError):
        seed_spread({}, lambda x: accuracy(x, 1))


def test_uplift_ignores_first_turn_successes_and_late_fixes():
    # solved at turn 4 (0-based 3) counts for K=4 and K=5, not for K=3
    s = [None, 3, 0]
    assert correction_uplift(s, 3) == 0.0
    assert correction_uplift(s, 4) == pytest.approx(0.5)
    assert accuracy_curve(s, 5) == pytest.approx([1 / 3, 1 / 3, 1 / 3, 2 / 3, 2 / 3])


def test_vectorised_bootstrap_matches_the_pooled_mean():
    from rosa_ext.harness.metrics import bootstrap_mean_ci, paired_bootstrap_mean_diff
    a = {"p0": [1.0, 1.0], "p1": [0.0, 1.0], "p2": [0.0, 0.0], "p3": [1.0, 0.0]}
    b = {"p0": [1.0, 1.0], "p1": [0.0, 0.0], "p2": [0.0, 0.0], "p3": [0.0, 0.0]}
    est, lo, hi = bootstrap_mean_ci(a, n_boot=500)
    assert est == 0.5 and 0.0 <= lo < est < hi <= 1.0
    d, lo, hi = paired_bootstrap_mean_diff(a, b, n_boot=500)
    assert d == 0.25 and lo <= d <= hi and lo >= 0.0  # a is never below b on a problem
    same = paired_bootstrap_mean_diff(a, a, n_boot=100)
    assert same == (0.0, 0.0, 0.0)
    with pytest.raises(ValueError, match="same problems"):
        paired_bootstrap_mean_diff(a, {"p0": [1.0]})
