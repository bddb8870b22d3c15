"""The vLLM shift processor's bookkeeping, without vLLM: W delta per request, both interfaces' batch moves,
bad shifts refused with nothing changed, and no vllm import at package import time."""
from __future__ import annotations

import subprocess
import sys
from types import SimpleNamespace as NS

import pytest
import torch

import rosa_ext
from rosa_ext.common.validation import RosaInputError, RosaNonFiniteError
from rosa_ext.integrations.models import tiny_causal_lm
from rosa_ext.integrations.vllm_processor import (
    EXTRA_ARGS_KEY,
    ShiftRows,
    check_shift,
    load_head_weight,
    shift_extra_args,
)

Vs, D = 40, 6
ARG = "extra_args['rosa_shift']"


def _w():
    # small integers: W delta is exact in float32 whatever the summation order
    g = torch.Generator().manual_seed(0)
    return torch.randint(-4, 5, (Vs, D), generator=g).float()


def _params(shift=None):
    return NS(extra_args=None if shift is None else {EXTRA_ARGS_KEY: shift})


def _shift(k):
    return [float(k), -1.0, 0.5, 2.0, 0.0, float(-k)]


def _want(W, k):
    return (W.double() @ torch.tensor(_shift(k), dtype=torch.float64)).float()


def _batch(removed=(), added=(), moved=()):
    return NS(removed=list(removed), added=list(added), moved=list(moved), batch_size=0)


SWAP, UNI = NS(name="SWAP"), NS(name="UNIDIRECTIONAL")


def test_v1_rows_follow_adds_removes_and_moves():
    W = _w()
    rows = ShiftRows(W)
    rows.update_state(_batch(added=[(0, _params(), [1], []), (1, _params(_shift(1)), [1], []),
                                    (2, _params(_shift(2)), [1], [])]))
    logits = torch.zeros(3, Vs)
    rows.apply_rows(logits)
    assert torch.count_nonzero(logits[0]) == 0, "a request without a shift is untouched (bitwise)"
    assert torch.equal(logits[1], _want(W, 1)) and torch.equal(logits[2], _want(W, 2))
    # swap 0 <-> 2, then request at 1 leaves and a plain one takes its place
    rows.update_state(_batch(moved=[(0, 2, SWAP)]))
    rows.update_state(_batch(removed=[1], added=[(1, _params(), [1], [])]))
    logits = torch.ones(3, Vs)
    rows.apply_rows(logits)
    assert torch.equal(logits[0], 1 + _want(W, 2)) and torch.equal(logits[1], torch.ones(Vs))
    assert torch.equal(logits[2], torch.ones(Vs))
    # one-way move 0 -> 1 (condensing the batch)
    rows.update_state(_batch(moved=[(0, 1, UNI)]))
    logits = torch.zeros(2, Vs)
    rows.apply_rows(logits)
    assert torch.count_nonzero(logits[0]) == 0 and torch.equal(logits[1], _want(W, 2))
    rows.update_state(None)  # no change
    assert set(rows.biases) == {1}


def test_v2_slots_map_rows_through_the_context():
    W = _w()
    rows = ShiftRows(W)
    assert rows.add_request(5, _params(_shift(3))) is True
    assert rows.add_request(2, _params()) is False
    logits = torch.zeros(3, Vs)
    rows.apply_slots(logits, torch.tensor([2, 5, 5]))  # a request may own several rows
    assert torch.count_nonzero(logits[0]) == 0
    assert torch.equal(logits[1], _want(W, 3)) and torch.equal(logits[2], _want(W, 3))
    assert rows.add_request(5, _params()) is False, "a reused slot is reinitialised"
    logits = torch.zeros(2, Vs)
    rows.apply_slots(logits, torch.tensor([5, 2]))
    assert torch.count_nonzero(logits) == 0


def test_padded_logit_columns_are_left_alone():
    W = _w()
    rows = ShiftRows(W)
    rows.add_request(0, _params(_shift(1)))
    logits = torch.zeros(1, Vs + 8)
    rows.apply_slots(logits, torch.tensor([0]))
    assert torch.equal(logits[0, :Vs], _want(W, 1)) and torch.count_nonzero(logits[0, Vs:]) == 0


@pytest.mark.parametrize("bad,exc,match", [
    ([0.0] * (D - 1), RosaInputError, "hidden size is d=6"),
    ([0.0] * (D - 1) + [float("nan")], RosaNonFiniteError, "NaN"),
    ([0.0] * (D - 1) + [float("inf")], RosaNonFiniteError, "NaN or Inf"),
    ("abc", RosaInputError, "list of d floats"),  # a ValueError: vLLM answers HTTP 400
    ([True] * D, RosaInputError, "list of d floats"),
    ([], RosaInputError, "empty"),
    ([0.0] * (D - 1) + [1e300], RosaNonFiniteError, "norm"),  # issue 31: finite in float64, overflows W delta in fp32
    ([0.0] * (D - 1) + [10 ** 400], RosaInputError, "too large for a float"),  # issue 31: was a raw OverflowError
])
def test_bad_shift_is_refused_and_nothing_changes(bad, exc, match):
    W = _w()
    rows = ShiftRows(W)
    rows.update_state(_batch(added=[(0, _params(_shift(1)), [1], [])]))
    rows.add_request(7, _params(_shift(2)))
    before = {k: v.clone() for k, v in rows.biases.items()}
    with pytest.raises(exc, match=match) as e:
        rows.update_state(_batch(removed=[0], added=[(1, _params(_shift(3)), [1], []), (2, _params(bad), [1], [])]))
    assert e.value.argument == ARG
    with pytest.raises(exc) as e:
        rows.add_request(7, _params(bad))
    assert e.value.argument == ARG
    assert rows.biases.keys() == before.keys() and all(torch.equal(rows.biases[k], before[k]) for k in before)


def test_shift_extra_args_from_a_hidden_session_gives_its_logits():
    """The served logits (base + W delta) equal the hidden-mode session's, within fp32 rounding."""
    model = tiny_causal_lm("llama", vocab_size=64, hidden_size=32)
    ids = torch.randint(3, 64, (1, 20), generator=torch.Generator().manual_seed(1))
    with torch.no_grad():
        base = model(ids).logits[0]
    s = rosa_ext.attach(model, mode="hidden")
    s.update(ids, reward=-1.0, response_start=10)
    with torch.no_grad():
        want = model(ids).logits[0]
    extra = shift_extra_args(s)
    assert extra == shift_extra_args(s.state_dict()) and len(extra[EXTRA_ARGS_KEY]) == 32
    rows = ShiftRows(model.lm_head.weight)
    rows.add_request(0, _params(extra[EXTRA_ARGS_KEY]))
    got = base.clone()
    rows.apply_slots(got, torch.zeros(got.shape[0], dtype=torch.long))
    assert (want - base).abs().max() > 1e-2
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    s.detach()


def test_shift_extra_args_refuses_a_lora_state():
    model = tiny_causal_lm("llama", vocab_size=64, hidden_size=32)
    s = rosa_ext.attach(model, mode="lora")
    with pytest.raises(RosaInputError, match="hidden-mode") as e:
        shift_extra_args(s)
    assert e.value.argument == "state"
    with pytest.raises(RosaNonFiniteError):
        shift_extra_args(torch.tensor([1.0, float("nan")]))
    assert check_shift(torch.ones(3), 3).dtype == torch.float64


@pytest.mark.parametrize("tied", [False, True])
def test_head_weight_is_read_from_a_saved_checkpoint(tmp_path, tied):
    model = tiny_causal_lm("llama", tied=tied, vocab_size=64, hidden_size=32)
    model.save_pretrained(str(tmp_path / "m"))
    W = load_head_weight(str(tmp_path / "m"))
    assert torch.equal(W, model.lm_head.weight.detach())
    assert load_head_weight(str(tmp_path / "m")) is W, "read once per process"
    with pytest.raises(FileNotFoundError):
        load_head_weight(str(tmp_path / "nothing"))


def test_package_import_does_not_import_vllm():
    code = ("import sys, rosa_ext, rosa_ext.integrations.vllm_processor, rosa_ext.integrations.export, "
            "rosa_ext.integrations.store; assert 'vllm' not in sys.modules; print('ok')")
    out = subprocess.run([sys.executable, "-c", code], capture_output=True, text=True, timeout=120)
    assert out.returncode == 0 and "ok" in out.stdout, out.stderr[-2000:]


def test_processor_class_needs_vllm():
    try:
        import vllm  # noqa: F401
    except ImportError:
        from rosa_ext.integrations import vllm_processor
        with pytest.raises(ImportError):
            vllm_processor.RosaShiftLogitsProcessor  # noqa: B018
    else:
        pytest.skip("vllm is installed here (tested by test_vllm_serving.py)")


def test_admission_check_needs_the_hidden_size(monkeypatch):
    """validate_params (vLLM's admission hook) refuses shifts when d is unknown in the process; with
    ROSA_VLLM_HIDDEN_SIZE (a server's front end) or a processor built in-process it checks the size."""
    from rosa_ext.integrations import vllm_processor as vp

    monkeypatch.setattr(vp, "_KNOWN_D", set())
    monkeypatch.delenv(vp.HIDDEN_SIZE_ENV, raising=False)
    check = vp._ProcessorMixin.validate_params
    check(_params())  # no shift: nothing to check
    with pytest.raises(RosaInputError, match="ROSA_VLLM_HIDDEN_SIZE=d") as e:
        check(_params(_shift(1)))
    assert e.value.argument == vp.HIDDEN_SIZE_ENV
    monkeypatch.setenv(vp.HIDDEN_SIZE_ENV, str(D))
    check(_params(_shift(1)))
    with pytest.raises(RosaInputError, match="hidden size is d=6") as e:
        check(_params(_shift(1)[:-1]))
    assert e.value.argument == ARG
    monkeypatch.setenv(vp.HIDDEN_SIZE_ENV, "six")
    with pytest.raises(RosaInputError) as e:
        check(_params(_shift(1)))
    assert e.value.argument == vp.HIDDEN_SIZE_ENV
    monkeypatch.delenv(vp.HIDDEN_SIZE_ENV)
    monkeypatch.setattr(vp, "_KNOWN_D", {D})  # a processor built in this process
    with pytest.raises(RosaNonFiniteError):
        check(_params([float("nan")] * D))


def test_hidden_size_env_must_match_the_model(monkeypatch, tmp_path):
    from rosa_ext.integrations import vllm_processor as vp

    model = tiny_causal_lm("llama", vocab_size=64, hidden_size=32)
    model.save_pretrained(str(tmp_path / "m"))
    cfg = NS(model_config=NS(model=str(tmp_path / "m"), hf_config=NS(tie_word_embeddings=False)))
    monkeypatch.setattr(vp, "_KNOWN_D", set())
    monkeypatch.setenv(vp.HIDDEN_SIZE_ENV, "31")
    with pytest.raises(RosaInputError, match="d=32") as e:
        vp._ProcessorMixin(cfg, torch.device("cpu"), False)
    assert e.value.argument == vp.HIDDEN_SIZE_ENV and vp._KNOWN_D == set()
    monkeypatch.setenv(vp.HIDDEN_SIZE_ENV, "32")
    proc = vp._ProcessorMixin(cfg, NS(device="cpu"))  # the V2 form
    assert proc.rows.hidden_size == 32 and vp._KNOWN_D == {32} and proc.is_argmax_invariant() is False
