"""Recording a generation, from the user's side (hardening round 3): decoding modes whose lm_head
forwards are not one row per returned sequence and token are refused before anything runs; bad prompt
ids get a named error; a row ended by a stopping criterion has no padding in its step; a recording holds
only its own rows; a step that fails keeps the recording, so the update can be retried."""
import pytest
import torch
from transformers import StoppingCriteria, StoppingCriteriaList

import rosa_ext
from rosa_ext.integrations.models import tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _model():
    m = tiny_causal_lm("qwen2", vocab_size=300, hidden_size=32)
    m.generation_config.eos_token_id = 2
    m.generation_config.pad_token_id = 0
    return m


def _prompt(seed, L=9):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (L,), generator=g)


@pytest.mark.parametrize("kw,name", [(dict(num_beams=3), "num_beams"), (dict(prompt_lookup_num_tokens=3), "prompt_lookup_num_tokens"),
                                     (dict(penalty_alpha=0.6, top_k=4), "penalty_alpha")])
def test_unrecordable_decoding_is_refused_before_generating(kw, name):
    model = _model()
    s = rosa_ext.attach(model, mode="hidden", warmup=False)
    calls = []
    h = model.model.register_forward_hook(lambda *a: calls.append(1))
    with pytest.raises(rosa_ext.RosaInputError) as ei:
        s.generate(_prompt(0).unsqueeze(0), max_new_tokens=4, do_sample=False, **kw)
    h.remove()
    assert ei.value.argument == name and not calls  # nothing ran
    with pytest.raises(rosa_ext.RosaStateError):  # and nothing was recorded
        s.update(reward=-1.0)
    s.detach()


@pytest.mark.parametrize("bad,cls", [(torch.tensor([[3.0, 4.0]]), rosa_ext.RosaTypeError),
                                     (torch.tensor([[3, -1]]), rosa_ext.RosaInputError),
                                     (torch.tensor([[3, 300]]), rosa_ext.RosaInputError),
                                     (torch.zeros(1, 0, dtype=torch.long), rosa_ext.RosaInputError)])
def test_bad_prompt_ids_are_named(bad, cls):
    s = rosa_ext.attach(_model(), mode="lora", warmup=False)
    with pytest.raises(cls) as ei:
        s.generate(bad, max_new_tokens=3)
    assert ei.value.argument == "input_ids"
    s.detach()


class _StopAfter(StoppingCriteria):
    """Ends row ``row`` after ``n`` new tokens (the others run on)."""

    def __init__(self, start, row, n):
        self.start, self.row, self.n = start, row, n

    def __call__(self, input_ids, scores, **kw):
        done = torch.zeros(input_ids.shape[0], dtype=torch.bool)
        done[self.row] = input_ids.shape[1] - self.start >= self.n
        return done


@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_row_ended_by_a_stopping_criterion_has_no_padding(mode):
    model = _model()
    model.generation_config.eos_token_id = 299  # rarely generated: rows run to max_new_tokens unless stopped
    s = rosa_ext.attach(model, mode=mode, warmup=False)
    p = torch.stack([_prompt(1), _prompt(2)])
    out = s.generate(p, max_new_tokens=8, do_sample=False, stopping_criteria=StoppingCriteriaList([_StopAfter(9, 0, 3)]))
    new = out[0, 9:]
    assert (new[3:] == 0).all() and (new[:3] != 0).all(), new  # row 0 stopped after 3 tokens, then padded
    state = s.state_dict()
    got = s.update(reward=-1.0, row=0)
    s.load_state_dict(state)
    want = s.update(out[0, :12], -1.0, response_start=9)  # the 3 real tokens, no padding
    torch.testing.assert_close(got.update, want.update, rtol=2e-4, atol=2e-5)
    s.detach()


def test_a_recording_holds_only_its_own_rows():
    s = rosa_ext.attach(_model(), mode="hidden", warmup=False)
    s.generate(torch.stack([_prompt(3), _prompt(4), _prompt(5)]), max_new_tokens=5, do_sample=False)
    rec = s._recorded
    for h in rec.hidden:
        assert h.untyped_storage().nbytes() == h.numel() * h.element_size()  # not a view of the batch's buffer
    s.detach()


@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_a_failed_step_keeps_the_recording(mode, monkeypatch):
    from rosa_ext.integrations import session as session_mod
    s = rosa_ext.attach(_model(), mode=mode, warmup=False)
    s.generate(_prompt(6).unsqueeze(0), max_new_tokens=5, do_sample=False)
    real = session_mod.rosa_update

    def broken(*a, **k):
        raise rosa_ext.RosaNumericalError("rosa_update: injected", "damping")

    monkeypatch.setattr(session_mod, "rosa_update", broken)
    with pytest.raises(rosa_ext.RosaNumericalError):
        s.update(reward=-1.0)
    assert s.num_updates == 0
    monkeypatch.setattr(session_mod, "rosa_update", real)
    step = s.update(reward=-1.0)  # retried on the same recording
    assert s.num_updates == 1 and step.update.abs().sum() > 0
    with pytest.raises(rosa_ext.RosaStateError):  # used once
        s.update(reward=-1.0)
    s.detach()


def test_hf_folder_checks_the_dtype_before_writing(tmp_path):
    from rosa_ext.integrations.hf_folder import smollm2_hf_folder
    with pytest.raises(rosa_ext.RosaTypeError) as ei:
        smollm2_hf_folder(tmp_path / "out", dtype=torch.int8)
    assert ei.value.argument == "dtype" and not (tmp_path / "out").exists()
