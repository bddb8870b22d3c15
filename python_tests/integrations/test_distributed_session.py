"""rosa_ext.attach on a tiny transformers model whose lm_head is ColwiseParallel (a DTensor
weight sharded by vocabulary rows), 2 CPU processes with gloo, each running the same
conversation (MATH.md section 7). The head is untied (its weight is not the embedding matrix): the
first step must be the float64 reference's on lm_head's weight, and neither matrix may change.
Compared with an unsharded copy of the model in the same process: the logits after two updates (the second in the background), generation, each rank's
rows in ``state_dict``, ``load_state_dict``, and ``reset`` / ``detach`` back to the base outputs
bitwise. The group is shared with python_tests/core/test_distributed.py (python_tests/_dist.py).
"""
from __future__ import annotations

import pytest
from _dist import shared_group

TOL = 1e-8


@pytest.fixture(scope="module")
def run():
    pytest.importorskip("transformers")
    return shared_group(2)


@pytest.mark.parametrize("case", ["session/lora", "session/hidden", "session/lora/sharded-logits"])
def test_session_on_colwise_parallel_head(run, case):
    res = run.case(case)
    for rank, r in res.items():
        if "skip" in r:
            pytest.skip(r["skip"])
        assert "error" not in r, f"rank {rank}: {r.get('error')}\n{r.get('traceback')}"
        assert r["err_logits"] <= TOL, (rank, r)
        # the head is untied: the step is the reference's on lm_head's weight, far from the embeddings' one
        assert r["err_first_step_vs_lm_head"] <= TOL * max(1.0, r["first_step_scale"]), r
        assert r["first_step_gap_to_embedding"] > 1e-3 * r["first_step_scale"], r
        assert r["embeddings_unchanged"] and r["head_rows_unchanged"], r
        assert r["num_updates"] == 2 and r["vocab_size"] == 61
        start, rows = r["rows"]
        assert rows == (31 if rank == 0 else 30) and start == (0 if rank == 0 else 31)
        if case.startswith("session/lora"):
            assert r["err_a"] <= TOL and r["err_b"] <= TOL, r
            assert r["state_b"] == [rows], "state_dict holds this rank's rows of b"
            assert r["a_same_on_all_ranks"]
        else:
            assert r["err_delta"] <= TOL and r["delta_same_on_all_ranks"], r
        if case.endswith("sharded-logits"):  # ColwiseParallel's default output: each rank its columns
            assert r["logits_width"] == rows
        else:
            assert r["logits_width"] == 61 and r["generate_equal"]
        assert r["reset_bitwise"] and r["detach_bitwise"], r
        assert r["reload_err"] == 0.0, r


def test_background_update_refused_when_the_body_is_tensor_parallel(run):
    res = run.case("session/parallel-body")
    for rank, r in res.items():
        if "skip" in r:
            pytest.skip(r["skip"])
        assert "error" not in r, f"rank {rank}: {r.get('error')}\n{r.get('traceback')}"
        assert r["err_logits"] <= TOL, r  # a synchronous update on a TP body + TP head
        assert r["raised"] == "RosaInputError" and "non_blocking" in r["message"], r
        assert r["num_updates"] == 1, "the refused update changed nothing"
