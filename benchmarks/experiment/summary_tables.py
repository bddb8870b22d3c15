"""Compact markdown tables for the results README from one or more ``results.json`` of the experiment:

    python benchmarks/experiment/summary_tables.py DIR [DIR ...]

One row per method: Acc@5 and its paired difference to the strongest control (the control with the highest
point estimate among baseline, resample, ban, guess), the same counting only sensible corrections, the
corrections (sensible ones), and the degeneration of the later answers (copies of the feedback, boxed numbers
not derived, walks), plus the run's state (PARTIAL and how many problems) and its CPU hours.
"""
from __future__ import annotations

import json
import os
import sys
from typing import List, Optional


def _ci(d: Optional[dict]) -> str:
    return f"{100 * d['value']:+.1f} [{100 * d['ci95'][0]:+.1f}, {100 * d['ci95'][1]:+.1f}]" if d else "-"


def _acc(d: dict) -> str:
    return f"{100 * d['value']:.1f} [{100 * d['ci95'][0]:.1f}, {100 * d['ci95'][1]:.1f}]"


def table(folder: str) -> str:
    with open(os.path.join(folder, "results.json")) as f:
        res = json.load(f)
    meta, summ = res["meta"], res["summary"]
    state = ("complete" if meta.get("complete") else
             f"PARTIAL: {meta.get('problems_done')} of {meta.get('problems_planned')} problems")
    cpu = meta.get("timing", {}).get("cpu_hours")
    head = (f"`{folder}` ({state}; seeds {summ[next(iter(summ))]['seeds']}; "
            f"{'' if cpu is None else f'{cpu:.2f} CPU-h so far'})")
    lines = [head, "", "| method | Acc@1 | Acc@5 [95% CI] | - strongest control | Acc@5 sensible only | - strongest "
             "control (sensible) | corrections (sensible) | later answers: copies / not derived / walk |",
             "|---|---|---|---|---|---|---|---|"]
    for name, e in summ.items():
        st, ms = e.get("strongest_control", {}), e.get("minus_strongest_control", {})
        a = f"{st.get('accuracy')}: {_ci(ms.get('accuracy'))}" if ms.get("accuracy") else "(strongest control)"
        s = f"{st.get('sensible')}: {_ci(ms.get('sensible'))}" if ms.get("sensible") else "(strongest control)"
        dg = e["degeneration"]["all"]
        n = max(1, dg["answers"])
        lines.append(f"| {name} | {100 * e['first_turn_accuracy']:.1f} | {_acc(e['accuracy'])} | {a} | "
                     f"{_acc(e['sensible_accuracy'])} | {s} | {e['corrections']} ({e['sensible_corrections']}) | "
                     f"{100 * dg['copies_feedback'] / n:.0f}% / {100 * dg['underived'] / n:.0f}% / "
                     f"{100 * dg['walk'] / n:.0f}% of {dg['answers']} |")
    return "\n".join(lines) + "\n"


def main(argv: Optional[List[str]] = None) -> int:
    args = sys.argv[1:] if argv is None else argv
    if not args:
        raise SystemExit(__doc__)
    print("\n".join(table(d) for d in args))
    return 0


if __name__ == "__main__":
    sys.exit(main())
