"""The vocabulary-parallel update (MATH.md section 7) on 2 and 3 CPU processes (gloo).

Each group runs once per module (python_tests/_dist_worker.py, suite ``core``): every rank holds
uneven rows of the head (one rank a single row), and every case compares the sharded call with
the unsharded call on the same float64 inputs (both modes, both solvers, batched ragged
conversations, bias and LoRA b sharded like W), a DTensor weight, the bytes communicated against
the documented formula, and bad input, which must raise the same error on every rank (the
group has a timeout, and the launcher kills it after ``TIMEOUT`` s, so a hang fails).
"""
from __future__ import annotations

import pytest
import torch
from _dist import SUITES, run_group, shared_group

from rosa_ext import RosaInputError
from rosa_ext.core.distributed import traffic_bytes

TIMEOUT = 240.0
TOL = 1e-8
MATCH = ["match/lora/dual/batched", "match/lora/cg/batched", "match/hidden/dual/batched", "match/hidden/cg/batched",
         "match/lora/cg/single-peft-shapes", "match/hidden/dual/lora-term", "match/hidden/cg/lora-term",
         "match/lora/auto", "match/lora/dual/relative", "match/lora/cg/relative", "match/hidden/dual/relative",
         "match/hidden/cg/relative", "after_bad"]
DTENSOR = ["dtensor/lora/dual", "dtensor/hidden/cg"]  # the 2-rank group (DTensor's import is slow)
BAD = {  # case -> (what every rank must raise, a phrase of the message)
    "gap": (RosaInputError, "held by no rank"),
    "overlap": (RosaInputError, "held twice"),
    "target": (RosaInputError, "outside the vocabulary [0, 23)"),
    "vocab_size": (RosaInputError, "the vocabulary has 24 rows"),
    "not_replicated": (RosaInputError, "hidden must be the same on every rank"),
    "one_rank": (RosaInputError, "`bias` must be"),
    "cg_impl": (RosaInputError, "`cg_impl` is not supported on a vocabulary-parallel head"),
}


@pytest.fixture(scope="module", params=[2, 3], ids=["2ranks", "3ranks"])
def group(request):
    world = request.param
    return world, shared_group(world, timeout=TIMEOUT)


@pytest.mark.parametrize("case", MATCH + DTENSOR)
def test_matches_unsharded_call(group, case):
    world, run = group
    if case in DTENSOR and world != 2:
        pytest.skip("DTensor cases run in the 2-rank group")
    res = run.case(case)
    for rank, r in res.items():
        assert "error" not in r, f"rank {rank}: {r.get('error')}\n{r.get('traceback')}"
        assert r["err_replicated"] <= TOL, (rank, r)
        assert r["err_logp"] <= TOL and r["err_target"] <= TOL, (rank, r)
        if "err_rows" in r:
            assert r["err_rows"] <= TOL, (rank, r)
            assert r["shape_rows"][-1] == r["rows"][1] - r["rows"][0]  # delta_b is this rank's rows
        assert r["same_on_all_ranks"], "delta_a / the hidden shift / log p differ across ranks"
        assert r["iterations"][0] == r["iterations"][1] and r["solver"][0] == r["solver"][1], r
        assert r["bytes"] == r["bytes_formula"], (r["bytes"], r["bytes_formula"], r["by_label"])
    if not case.startswith("dtensor"):  # uneven shards: rank 0 holds a single row
        assert res[0]["rows"] == [0, 1]


def test_fp32(group):
    _, run = group
    for r in run.case("match/hidden/cg/fp32").values():
        assert "error" not in r, r.get("traceback")
        assert r["err_replicated"] <= 1e-4 * max(1.0, r["scale"]), r
        assert r["same_on_all_ranks"]


@pytest.mark.parametrize("what", sorted(BAD))
def test_bad_input_raises_on_every_rank(group, what):
    world, run = group
    cls, phrase = BAD[what]
    res = run.case(f"bad/{what}")
    for rank, r in res.items():
        assert r.get("raised") == cls.__name__, (rank, r)
        assert phrase in r["message"], (rank, r["message"])
        if what == "one_rank" and rank != 1:
            assert "rank 1 of the group rejected its input" in r["message"], r["message"]


def test_process_group_of_another_size(group):
    world, run = group
    if world == 3:  # ranks 0 and 1 of a 3-way split form the group, vocab_size says 23 rows
        res = run.case("bad/small_group")
        for rank in (0, 1):
            assert res[rank]["raised"] == "RosaInputError" and "the vocabulary has 23 rows" in res[rank]["message"], res
    else:  # a DTensor over both ranks with a group of rank 0 only
        res = run.case("bad/dtensor_group")
        assert res[0]["raised"] == "RosaInputError" and "`process_group` has 1 ranks" in res[0]["message"], res
    last = world - 1
    assert res[last]["raised"] == "RosaInputError" and "not a member" in res[last]["message"], res


def test_group_finished(group):
    world, run = group
    assert not run.timed_out, f"the {world}-rank group was killed after {TIMEOUT} s"
    print(f"{world} ranks ({SUITES[world]}): {run.seconds:.1f} s")


def test_traffic_formula_has_no_vocabulary_term():
    """What crosses ranks does not grow with V (MATH.md section 7); spot values of the formula."""
    for mode in ("lora", "hidden"):
        for solver in ("dual", "cg"):
            small = traffic_bytes(mode, solver, [64], 896, elem_bytes=4, iterations=16)
            assert small == traffic_bytes(mode, solver, [64], 896, elem_bytes=4, iterations=16)
    # lora dual, one conversation of 256 tokens, fp32: 664 + 6*256*4 + 2*256^2*4 bytes (MATH.md section 7)
    assert traffic_bytes("lora", "dual", [256], 4096, elem_bytes=4) == 664 + 5 * 256 * 4 + 2 * 256 * 256 * 4


def _gpu_group(world: int, backend: str, tmp_path):
    run = run_group(world, "gpu", tmp_path, timeout=TIMEOUT, backend=backend)
    for case in [c for c in run.results[0] if c.startswith("match/")]:
        for rank, r in run.case(case).items():
            assert "error" not in r, (case, rank, r.get("traceback"))
            tol = TOL if "fp32" not in case else 1e-4 * max(1.0, r["scale"])
            assert r["err_replicated"] <= tol and r.get("err_rows", 0.0) <= tol, (case, rank, r)
            assert r["same_on_all_ranks"], (case, rank)
    assert run.results[0], "the GPU group ran no case"


@pytest.mark.gpu
def test_nccl_across_gpus(tmp_path):
    """NCCL, one rank per GPU (needs 2 or more GPUs; NCCL refuses two ranks on one GPU)."""
    n = torch.cuda.device_count()
    if n < 2:
        pytest.skip(f"NCCL needs a GPU per rank; {n} visible")
    _gpu_group(min(n, 4), "nccl", tmp_path)


@pytest.mark.gpu
def test_gloo_on_one_gpu(tmp_path):
    """gloo collectives on CUDA tensors, both ranks on one GPU: the Triton backend (fp32) and the
    torch backend (fp64) under the distributed wrapper."""
    _gpu_group(2, "gloo", tmp_path)


@pytest.mark.parametrize("case", [f"confident/{m}/{s}/{g}" for m in ("lora", "hidden") for s in ("dual", "cg")
                                  for g in ("60", "100")])
def test_confident_tokens_fp32_match_float64(group, case):
    """Hardening round 3: the vocabulary-parallel engine (fp32 shards, a fresh adapter, every token
    leading by 60 or 100 nats) within 1e-3 of the float64 reference."""
    world, run = group
    for rank, r in run.case(case).items():
        assert "error" not in r, f"rank {rank}: {r.get('error')}\n{r.get('traceback')}"
        assert r["rel"] <= 1e-3, (rank, r)
