"""The experiment's tables: per-method accuracy with bootstrap CIs against the controls, the
degeneration table (:mod:`rosa_ext.harness.degeneration`), accuracy counting only sensible
corrections, target attainment, per-turn curves (:func:`summarize`), as markdown
(:func:`markdown_table`) and as a plot (:func:`plot`).

``runs`` are ``{method: {seed: [Conversation, ...]}}``, the conversations of every seed over the same
problems in the same order (:class:`rosa_ext.harness.runner.Conversation`).
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Sequence, Tuple

from .conversation import DEFAULT_FEEDBACK, TurnRecord
from .degeneration import degeneration_table, sensible_solved_at
from .metrics import accuracy, accuracy_curve, bootstrap_mean_ci, correction_uplift, paired_bootstrap_mean_diff, seed_spread
from .rewards import boxed_answer
from .runner import Conversation

#: The controls a summary compares every method with, when present (:data:`rosa_ext.harness.methods.METHODS`).
DEFAULT_CONTROLS = ("baseline", "resample", "ban", "guess")


def _solved_within(s: Optional[int], turns: int) -> float:
    return 1.0 if s is not None and s < turns else 0.0


def summarize(runs: Dict[str, Dict[int, List[Conversation]]], turns: int, n_boot: int = 2000, *,
              controls: Optional[Sequence[str]] = None, feedback: str = DEFAULT_FEEDBACK) -> Dict[str, Any]:
    """Per method: accuracy curve, Acc(K), Uplift(K) with bootstrap CIs over problems (seeds pooled),
    per-seed values, update latency / norm / log-prob change, the paired difference to the baseline and
    to every control (``controls``, default :data:`DEFAULT_CONTROLS` present in ``runs``) and to the
    strongest control, the same for Acc(K) counting only sensible corrections
    (:func:`rosa_ext.harness.degeneration.sensible_solved_at`), and the degeneration table."""
    out: Dict[str, Any] = {}
    ctrls = [c for c in (DEFAULT_CONTROLS if controls is None else controls) if c in runs]

    def by_problem(seedruns: Dict[int, List[Conversation]], key: str = "solved") -> Dict[str, List[Optional[int]]]:
        d: Dict[str, List[Optional[int]]] = {}
        for convs in seedruns.values():
            for j, c in enumerate(convs):
                s = c.solved_at if key == "solved" else _sensible(c, feedback)
                d.setdefault(f"{j:05d}", []).append(s)
        return d

    def scores(bp: Dict[str, List[Optional[int]]]) -> Dict[str, List[float]]:
        return {k: [_solved_within(s, turns) for s in v] for k, v in bp.items()}

    def paired(a: str, b: str, key: str) -> Optional[Dict[str, Any]]:
        common = [sd for sd in runs[a] if sd in runs[b]]
        if not common:
            return None
        x = scores(by_problem({sd: runs[a][sd] for sd in common}, key))
        y = scores(by_problem({sd: runs[b][sd] for sd in common}, key))
        d = paired_bootstrap_mean_diff(x, y, n_boot=n_boot)
        return {"value": d[0], "ci95": [d[1], d[2]], "seeds": sorted(common)}

    for name, seedruns in runs.items():
        bp = by_problem(seedruns)
        sens = by_problem(seedruns, "sensible")
        pooled = [s for v in bp.values() for s in v]
        pooled_s = [s for v in sens.values() for s in v]
        acc = bootstrap_mean_ci(scores(bp), n_boot=n_boot)
        acc_s = bootstrap_mean_ci(scores(sens), n_boot=n_boot)
        upl = _uplift_ci(bp, turns, n_boot)
        convs_all = [c for convs in seedruns.values() for c in convs]
        ups = [t for c in convs_all for t in c.turns if t.update_ms is not None]
        dl = [t.logp_after - t.logp_before for t in ups if t.logp_before is not None]
        shifts = [t.shift_norm for t in ups if getattr(t, "shift_norm", None) is not None]
        hnorms = [t.hidden_norm for t in ups if getattr(t, "hidden_norm", None) is not None]
        entry: Dict[str, Any] = {
            "accuracy_curve": accuracy_curve(pooled, turns),
            "accuracy": {"value": acc[0], "ci95": [acc[1], acc[2]]},
            "correction_uplift": {"value": upl[0], "ci95": [upl[1], upl[2]]},
            "first_turn_accuracy": accuracy(pooled, 1),
            "sensible_accuracy": {"value": acc_s[0], "ci95": [acc_s[1], acc_s[2]]},
            "sensible_accuracy_curve": accuracy_curve(pooled_s, turns),
            "corrections": sum(s is not None and 0 < s < turns for s in pooled),
            "sensible_corrections": sum(s is not None and 0 < s < turns for s in pooled_s),
            "seed_spread": {
                "accuracy": seed_spread({str(s): [c.solved_at for c in convs] for s, convs in seedruns.items()},
                                        lambda x: accuracy(x, turns)),
                "correction_uplift": seed_spread({str(s): [c.solved_at for c in convs]
                                                  for s, convs in seedruns.items()},
                                                 lambda x: correction_uplift(x, turns))},
            "per_seed": {str(s): {"accuracy": accuracy([c.solved_at for c in convs], turns),
                                  "correction_uplift": correction_uplift([c.solved_at for c in convs], turns)}
                         for s, convs in seedruns.items()},
            "n_problems": len(bp), "seeds": sorted(seedruns),
            "updates": len(ups),
            "update_ms_mean": (sum(t.update_ms for t in ups) / len(ups)) if ups else None,
            "update_norm_median": _median([t.update_norm for t in ups]) if ups else None,
            "update_norm_max": max(t.update_norm for t in ups) if ups else None,
            "shift_norm_median": _median(shifts), "shift_norm_max": max(shifts) if shifts else None,
            "hidden_norm_median": _median(hnorms),
            "logp_change_mean": (sum(dl) / len(dl)) if dl else None,
            "logp_change_min": min(dl) if dl else None,
            **attainment_summary(ups),
            "repeat": repeat_count(convs_all),
            "boxed_rate": sum("\\boxed" in t.text for c in convs_all for t in c.turns)
            / max(1, sum(len(c.turns) for c in convs_all)),
            "degeneration": degeneration_table(convs_all, turns, feedback),
        }
        if "baseline" in runs and name != "baseline":
            d = paired(name, "baseline", "solved")
            if d is not None:
                entry["accuracy_minus_baseline"] = d
        entry["vs_controls"] = {c: {"accuracy": paired(name, c, "solved"), "sensible": paired(name, c, "sensible")}
                                for c in ctrls if c != name}
        out[name] = entry
    for key, field_ in (("accuracy", "accuracy"), ("sensible", "sensible_accuracy")):
        if not ctrls:
            break
        best = max(ctrls, key=lambda c: out[c][field_]["value"])
        for name, e in out.items():
            e.setdefault("strongest_control", {})[key] = best
            if name != best and e["vs_controls"].get(best, {}).get(key) is not None:
                e.setdefault("minus_strongest_control", {})[key] = e["vs_controls"][best][key]
    return out


def _sensible(c: Conversation, feedback: str) -> Optional[int]:
    return sensible_solved_at([t.text for t in c.turns], c.problem.question, c.problem.answer, feedback, c.solved_at)


def _uplift_ci(bp: Dict[str, List[Optional[int]]], turns: int, n_boot: int) -> Tuple[float, float, float]:
    """Correction Uplift(K) with a bootstrap over problems: the ratio of two per-problem sums."""
    import numpy as np

    keys = sorted(bp)
    fails = np.array([float(sum(s != 0 for s in bp[k])) for k in keys])
    fixed = np.array([float(sum(s is not None and 0 < s < turns for s in bp[k])) for k in keys])
    est = float(fixed.sum() / fails.sum()) if fails.sum() else 0.0
    pick = np.random.default_rng(0).integers(0, len(keys), size=(n_boot, len(keys)))
    f = fails[pick].sum(1)
    stats = np.sort(np.where(f > 0, fixed[pick].sum(1) / np.maximum(f, 1), 0.0))
    return est, float(stats[int(0.025 * (n_boot - 1))]), float(stats[int(np.ceil(0.975 * (n_boot - 1)))])


def _median(xs: List[float]) -> Optional[float]:
    xs = sorted(xs)
    if not xs:
        return None
    m = len(xs) // 2
    return xs[m] if len(xs) % 2 else 0.5 * (xs[m - 1] + xs[m])


def attainment_summary(ups: List[TurnRecord]) -> Dict[str, Any]:
    """Target attainment over the updates ``ups`` (records with the measurement): median achieved /
    target and predicted / target, mean changes per token, and the share of updates that reached at
    least half of their target."""
    m = [t for t in ups if t.attainment is not None]
    return {
        "attainment_median": _median([t.attainment for t in m]),
        "predicted_over_target_median": _median([t.dlogp_predicted / t.dlogp_target for t in m]),
        "achieved_over_predicted_median": _median([t.dlogp_achieved / t.dlogp_predicted for t in m
                                                   if t.dlogp_predicted]),
        "dlogp_target_mean": (sum(t.dlogp_target for t in m) / len(m)) if m else None,
        "dlogp_predicted_mean": (sum(t.dlogp_predicted for t in m) / len(m)) if m else None,
        "dlogp_achieved_mean": (sum(t.dlogp_achieved for t in m) / len(m)) if m else None,
        "reached_half_target": (sum(t.attainment >= 0.5 for t in m) / len(m)) if m else None,
    }


def repeat_count(convs: List[Conversation]) -> Dict[str, Any]:
    """Answers after turn 1 whose boxed number was already given (and rejected) earlier in the same
    conversation: ``{"repeated": n, "later_answers": m, "share": n / m}``."""
    n = rep = 0
    for c in convs:
        seen = set()
        for k, t in enumerate(c.turns):
            a = boxed_answer(t.text)
            if k > 0:
                n += 1
                rep += a is not None and a in seen
            if a is not None:
                seen.add(a)
    return {"repeated": rep, "later_answers": n, "share": (rep / n) if n else None}


def _pct(x: Optional[float]) -> str:
    return "-" if x is None else f"{100 * x:.1f}"


def _diff(d: Optional[Dict[str, Any]]) -> str:
    if not d:
        return "-"
    return f"{100 * d['value']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]"


def markdown_table(summary: Dict[str, Any], turns: int) -> str:
    """The results tables (markdown): accuracy against the controls, the degeneration table (turns 2..K
    pooled and per turn), accuracy within k turns (all corrections and sensible ones only)."""
    K = turns
    lines = [f"| method | Acc@1 | Acc@{K} [95% CI] | Uplift@{K} [95% CI] | Acc@{K} - baseline [paired 95% CI] | "
             f"Acc@{K} - strongest control [paired 95% CI] | Acc@{K}, sensible corrections only [95% CI] | "
             f"sensible - strongest control [paired 95% CI] | corrections (sensible) | boxed | median ‖δ‖ | "
             f"median ‖shift‖ / ‖h‖ | update ms |",
             "|---|---|---|---|---|---|---|---|---|---|---|---|---|"]
    base_seeds = len(summary.get("baseline", {}).get("seeds", ()))
    for name, e in summary.items():
        a, u, s = e["accuracy"], e["correction_uplift"], e.get("sensible_accuracy")
        db = _diff(e.get("accuracy_minus_baseline"))
        if e.get("accuracy_minus_baseline") and len(e["accuracy_minus_baseline"]["seeds"]) < base_seeds:
            db += " (seeds " + ",".join(str(x) for x in e["accuracy_minus_baseline"]["seeds"]) + ")"
        strong = e.get("strongest_control", {})
        ms = e.get("minus_strongest_control", {})
        sa = (f"{strong['accuracy']}: {_diff(ms.get('accuracy'))}" if strong.get("accuracy") and ms.get("accuracy")
              else ("(strongest control)" if strong.get("accuracy") == name else "-"))
        ss = (f"{strong['sensible']}: {_diff(ms.get('sensible'))}" if strong.get("sensible") and ms.get("sensible")
              else ("(strongest control)" if strong.get("sensible") == name else "-"))
        sens = f"{_pct(s['value'])} [{_pct(s['ci95'][0])}, {_pct(s['ci95'][1])}]" if s else "-"
        nm = f"{e['update_norm_median']:.3g}" if e.get("update_norm_median") is not None else "-"
        sh = (f"{e['shift_norm_median']:.3g} / {e['hidden_norm_median']:.3g}"
              if e.get("shift_norm_median") is not None and e.get("hidden_norm_median") else "-")
        up = f"{e['update_ms_mean']:.0f}" if e.get("update_ms_mean") is not None else "-"
        lines.append(f"| {name} | {_pct(e['first_turn_accuracy'])} | {_pct(a['value'])} [{_pct(a['ci95'][0])}, "
                     f"{_pct(a['ci95'][1])}] | {_pct(u['value'])} [{_pct(u['ci95'][0])}, {_pct(u['ci95'][1])}] | "
                     f"{db} | {sa} | {sens} | {ss} | "
                     f"{e.get('corrections', '-')} ({e.get('sensible_corrections', '-')}) | "
                     f"{100 * e.get('boxed_rate', 0):.0f}% | {nm} | {sh} | {up} |")
    lines += ["", "Sensible correction: a right answer after turn 1 that derives its boxed number by correct arithmetic "
              "from the question's numbers and does not copy the feedback (rosa_ext.harness.degeneration). "
              "Strongest control: the control (baseline, resample, ban, guess) with the highest point estimate.",
              "", f"Degeneration, answers of turns 2..{K} pooled (share of those answers):", "",
              "| method | later answers | copies the feedback | boxed, not derived | unboxed | small step (±1, ±2) | "
              "walk | repeats a rejected answer | right | sensible | conversations with a walk |",
              "|---|---|---|---|---|---|---|---|---|---|---|"]
    for name, e in summary.items():
        dg = e.get("degeneration")
        if not dg:
            continue
        t = dg["all"]
        n = max(1, t["answers"])
        lines.append(f"| {name} | {t['answers']} | " + " | ".join(
            f"{100 * t[k] / n:.0f}% ({t[k]})" for k in ("copies_feedback", "underived", "unboxed", "small_step", "walk",
                                                         "repeat", "correct", "sensible"))
                     + f" | {dg['conversations_with_walk']} |")
    lines += ["", "Per turn (answers; copies the feedback / boxed, not derived / walk / sensible, in % of the turn's "
              "answers):", "", "| method | " + " | ".join(f"turn {k}" for k in range(2, K + 1)) + " |",
              "|---|" + "---|" * (K - 1)]
    for name, e in summary.items():
        dg = e.get("degeneration")
        if not dg:
            continue
        cells = []
        for k in range(2, K + 1):
            t = dg["per_turn"][str(k)]
            n = t["answers"]
            cells.append("-" if not n else f"{n}: {100 * t['copies_feedback'] / n:.0f} / {100 * t['underived'] / n:.0f}"
                                            f" / {100 * t['walk'] / n:.0f} / {100 * t['sensible'] / n:.0f}")
        lines.append(f"| {name} | " + " | ".join(cells) + " |")
    lines += ["", "Accuracy within k turns (%), seeds pooled (all corrections | sensible corrections only):", "",
              "| method | " + " | ".join(f"k={k}" for k in range(1, K + 1)) + " |", "|---|" + "---|" * K]
    for name, e in summary.items():
        sc = e.get("sensible_accuracy_curve") or [None] * K
        lines.append(f"| {name} | " + " | ".join(f"{100 * v:.1f} \\| {_pct(w)}" for v, w in zip(e["accuracy_curve"], sc))
                     + " |")
    return "\n".join(lines) + "\n"


def plot(summary: Dict[str, Any], turns: int, path: str, title: str) -> None:
    """Accuracy vs turn, one line per method; right panel: sensible corrections only (PNG)."""
    import matplotlib
    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, axes = plt.subplots(1, 2, figsize=(11, 4), sharey=True)
    for ax, key, sub in ((axes[0], "accuracy_curve", "every correction"),
                         (axes[1], "sensible_accuracy_curve", "sensible corrections only")):
        for name, e in summary.items():
            if e.get(key) is None:
                continue
            ax.plot(range(1, turns + 1), [100 * v for v in e[key]], marker="o",
                    linestyle="--" if name in DEFAULT_CONTROLS else "-", label=name)
        ax.set_xlabel("turn K")
        ax.set_xticks(range(1, turns + 1))
        ax.set_title(f"{title}\n{sub}", fontsize=9)
        ax.grid(alpha=0.3)
    axes[0].set_ylabel("accuracy within K turns (%)")
    axes[1].legend(fontsize=7)
    fig.tight_layout()
    fig.savefig(path, dpi=120)
    plt.close(fig)
