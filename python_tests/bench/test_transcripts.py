"""benchmarks/experiment/transcripts.py: which conversations it prints, with which labels, and its errors."""
import json
import pathlib
import sys

import pytest

from rosa_ext.harness.conversation import DEFAULT_FEEDBACK

EXPERIMENT = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "experiment"
if str(EXPERIMENT) not in sys.path:
    sys.path.insert(0, str(EXPERIMENT))

import transcripts  # noqa: E402


def _rec(method, problem, texts, solved_at):
    return {"method": method, "seed": 0, "problem": problem, "question": "What is 9 - 1?", "answer": "8",
            "solved_at": solved_at, "turns": [{"text": t} for t in texts]}


def test_corrections_first_then_degenerate_and_a_cut_last_line_is_left_alone(tmp_path):
    copy = DEFAULT_FEEDBACK + " The answer is \\boxed{7}."
    recs = [_rec("rosa", 0, ["9 - 1 = 9. The answer is \\boxed{9}.", "9 - 1 = 8. The answer is \\boxed{8}."], 1),
            _rec("rosa", 1, ["9 - 1 = 9. The answer is \\boxed{9}.", copy], None),
            _rec("rosa", 2, ["9 - 1 = 9. The answer is \\boxed{9}.", "9 - 1 = 9. The answer is \\boxed{9}."], None),
            _rec("base", 3, ["9 - 1 = 8. The answer is \\boxed{8}."], 0)]
    text = "".join(json.dumps(r) + "\n" for r in recs) + '{"method": "rosa", "cut'
    (tmp_path / "runs.jsonl").write_text(text)
    assert transcripts.main([str(tmp_path), "--per-method", "1"]) == 0
    out = (tmp_path / "transcripts.md").read_text()
    rosa = out.split("## rosa")[1].split("## base")[0]
    assert "problem 0" in rosa and "SENSIBLE" in rosa  # the sensible correction
    assert "problem 1" in rosa and "COPIES THE FEEDBACK" in rosa  # the degenerate one
    assert "problem 2" not in rosa  # a plain repeat is neither
    assert "(no corrected or degenerate conversation)" in out.split("## base")[1]
    assert (tmp_path / "runs.jsonl").read_text() == text  # read only: a live run's file is never rewritten


def test_errors_name_the_argument(tmp_path, capsys):
    with pytest.raises(SystemExit):
        transcripts.main([str(tmp_path)])
    assert "run_dir" in capsys.readouterr().err
    (tmp_path / "runs.jsonl").write_text(json.dumps(_rec("rosa", 0, ["x"], None)) + "\n")
    with pytest.raises(SystemExit):
        transcripts.main([str(tmp_path), "--methods", "nope"])
    assert "--methods" in capsys.readouterr().err
    with pytest.raises(SystemExit):
        transcripts.main([str(tmp_path), "--per-method", "0"])
    assert "--per-method" in capsys.readouterr().err
