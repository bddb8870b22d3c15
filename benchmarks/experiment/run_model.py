"""The experiment CLI with a choice of model and problem set -- kept so that the commands recorded with
the Qwen2.5-Coder runs (benchmarks/results/experiment/qwen25_coder/) still run as written:

    python benchmarks/experiment/run_model.py --model qwen25-coder --problem-set qwen-mix [options]

is exactly ``python -m rosa_ext.harness.experiment --model qwen25-coder --problem-set qwen-mix [options]``:
the experiment module takes ``--model`` (every name of :data:`rosa_ext.integrations.models.MODEL_NAMES`)
and ``--problem-set`` (:data:`rosa_ext.harness.problems.PROBLEM_SETS`) itself.
"""
from __future__ import annotations

import sys
from typing import List, Optional

from rosa_ext.harness.experiment import main as experiment_main


def main(argv: Optional[List[str]] = None) -> int:
    return experiment_main(argv)


if __name__ == "__main__":
    sys.exit(main())
