"""session.generate records the lm_head inputs of the answer; update(reward=r) / update_from_generation
then takes the step without a second forward of the body: the same step as update(ids, reward,
response_start=L) on the same text (KV-cache rounding apart), in both modes, after earlier updates
(the shift / LoRA applied during generation), for batched (left-padded) and sampled generations."""
import pytest
import torch

import rosa_ext
from rosa_ext.integrations.models import tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_torch_thread")

TOL = dict(rtol=2e-4, atol=2e-5)


def _model(tied=False):
    m = tiny_causal_lm("qwen2", tied=tied, vocab_size=300, hidden_size=32)
    m.generation_config.eos_token_id = 2
    m.generation_config.pad_token_id = 0
    return m


def _prompt(seed, L=9):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, 300, (L,), generator=g)


def _count_body_forwards(model):
    calls = []
    h = model.model.register_forward_hook(lambda *a: calls.append(1))
    return calls, h


@pytest.mark.parametrize("mode", ["lora", "hidden"])
@pytest.mark.parametrize("tied", [False, True])
def test_recorded_step_equals_the_step_on_the_text(mode, tied):
    model = _model(tied)
    s = rosa_ext.attach(model, mode=mode, warmup=False)
    p = _prompt(0)
    s.update(torch.cat([p, _prompt(5, 6)]), -1.0, response_start=p.numel())  # a state to generate with
    out = s.generate(p.unsqueeze(0), max_new_tokens=7, do_sample=False)
    state = s.state_dict()
    calls, h = _count_body_forwards(model)
    got = s.update(reward=-1.0)
    h.remove()
    assert not calls, "the update from the generation must not run the body"
    s.load_state_dict(state)
    want = s.update(out[0], -1.0, response_start=p.numel())
    torch.testing.assert_close(got.update, want.update, **TOL)
    s.detach()


@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_batched_padded_and_sampled_generation(mode):
    model = _model()
    s = rosa_ext.attach(model, mode=mode, warmup=False)
    s.update(torch.cat([_prompt(1), _prompt(2, 5)]), 1.0, response_start=9)
    prompts = [_prompt(3, 9), _prompt(4, 6)]
    L = 9
    ids = torch.zeros(2, L, dtype=torch.long)
    att = torch.zeros(2, L, dtype=torch.long)
    for i, q in enumerate(prompts):  # left padding
        ids[i, L - q.numel():], att[i, L - q.numel():] = q, 1
    torch.manual_seed(0)
    out = s.generate(ids, attention_mask=att, max_new_tokens=6, do_sample=True, top_k=0, top_p=1.0)
    state = s.state_dict()
    with pytest.raises(rosa_ext.RosaInputError) as info:
        s.update(reward=-1.0)  # two sequences: which one?
    assert info.value.argument == "row"
    got = s.update(reward=-1.0, row=1)
    s.load_state_dict(state)
    new = out[1, L:]
    hit = torch.nonzero(new == 2).flatten()
    new = new[: int(hit[0]) + 1] if hit.numel() else new
    text = torch.cat([prompts[1], new])
    want = s.update(text, -1.0, response_start=prompts[1].numel())
    torch.testing.assert_close(got.update, want.update, **TOL)
    s.detach()


def test_no_recording_is_a_clear_error_and_changes_nothing():
    model = _model()
    s = rosa_ext.attach(model, mode="lora", warmup=False)
    before = s.state_dict()
    with pytest.raises(rosa_ext.RosaStateError) as info:
        s.update(reward=-1.0)
    assert info.value.argument == "input_ids"
    s.generate(_prompt(0).unsqueeze(0), max_new_tokens=3, do_sample=False)
    s.update(reward=-1.0)
    with pytest.raises(rosa_ext.RosaStateError):  # used once
        s.update_from_generation(-1.0)
    with pytest.raises(rosa_ext.RosaInputError) as info:
        s.update(reward=-1.0, row=0, response_start=3)
    assert info.value.argument == "input_ids"
    s.reset()
    assert all(torch.equal(before[k], s.state_dict()[k]) for k in ("a", "b"))
    s.detach()
