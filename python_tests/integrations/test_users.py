"""RosaUsers: many users' states on one model. Each row of a batched generation equals that user's
single-user session (tokens; the step of a batched update), a row without a user is the base model
bitwise, and a failed update leaves every state as it was."""
import pytest
import torch

import rosa_ext
from rosa_ext.integrations.models import tiny_causal_lm
from rosa_ext.integrations.users import RosaUsers

pytestmark = pytest.mark.usefixtures("one_torch_thread")

GEN = dict(max_new_tokens=6, do_sample=False, pad_token_id=0)


def _model():
    m = tiny_causal_lm("llama", vocab_size=300, hidden_size=32)
    m.generation_config.eos_token_id = 2
    return m


def _prompts(n=3, L=8):
    g = torch.Generator().manual_seed(7)
    return torch.randint(3, 300, (n, L), generator=g)


def _single(model, mode, state, prompt):
    """That user's single-user session: its state loaded, generate, then (later) update."""
    s = rosa_ext.attach(model, mode=mode, warmup=False)
    if state is not None:
        s.load_state_dict(state)
    out = s.generate(prompt.unsqueeze(0), **GEN)
    return s, out[0]


@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_rows_equal_single_user_sessions(mode):
    model = _model()
    users = RosaUsers(model, mode=mode)
    P = _prompts()
    ids = ["ann", None, "bob"]
    users.generate(P, ids, **GEN)
    users.update({"ann": -1.0, "bob": 1.0})  # now both have a state
    states = {u: users.state(u) for u in ("ann", "bob")}
    out = users.generate(P, ids, **GEN)
    steps = users.update({"ann": -1.0, "bob": -1.0})
    users.detach()
    for i, u in enumerate(ids):
        if u is None:
            with torch.no_grad():
                base = model.generate(P[i:i + 1], **GEN)[0]
            assert torch.equal(out[i], base)
            continue
        s, single_out = _single(model, mode, states[u], P[i])
        assert torch.equal(out[i], single_out), u
        step = s.update(reward=-1.0)
        torch.testing.assert_close(steps[u].update, step.update, rtol=1e-4, atol=1e-5)
        s.detach()


def test_base_row_logits_are_bitwise_the_base_model():
    model = _model()
    users = RosaUsers(model, mode="lora")
    P = _prompts()
    users.generate(P, ["a", "b", "c"], **GEN)
    users.update({"a": -1.0, "b": 1.0, "c": -1.0})
    kw = dict(GEN, max_new_tokens=1, output_logits=True, return_dict_in_generate=True)
    got = users.generate(P, ["a", None, "c"], **kw)
    users.detach()
    with torch.no_grad():
        base = model.generate(P, **kw)
    assert torch.equal(got.logits[0][1], base.logits[0][1])
    assert not torch.equal(got.logits[0][0], base.logits[0][0])


def test_a_failed_update_changes_no_state_and_errors_name_the_argument():
    model = _model()
    users = RosaUsers(model, mode="lora")
    P = _prompts()
    users.generate(P, ["a", "b", "c"], **GEN)
    users.update({"a": -1.0})
    before = {u: users.state(u) for u in users.users()}
    with pytest.raises(rosa_ext.RosaInputError) as info:
        users.update({"b": 1.0, "c": float("nan")})
    assert info.value.argument == "reward"
    with pytest.raises(rosa_ext.RosaInputError) as info:
        users.update({"nobody": 1.0})
    assert info.value.argument == "feedback"
    with pytest.raises(rosa_ext.RosaStateError) as info:
        users.update({"a": 1.0})  # its answer was used by the first update
    assert info.value.argument == "feedback"
    with pytest.raises(rosa_ext.RosaInputError) as info:
        users.state("nobody")
    assert info.value.argument == "user_id"
    with pytest.raises(rosa_ext.RosaInputError) as info:
        users.generate(P, ["a", "a", None], **GEN)
    assert info.value.argument == "users"
    after = {u: users.state(u) for u in users.users()}
    assert before.keys() == after.keys()
    for u in before:
        assert all(torch.equal(before[u][k], after[u][k]) for k in ("a", "b")) and \
            before[u]["num_updates"] == after[u]["num_updates"]
    users.update({"b": 1.0, "c": -1.0})  # the recordings are still there
    users.detach()
