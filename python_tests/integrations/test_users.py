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


# -- the store: ids, copies, one owner per model, nothing left behind by a failure (issues 29 / 31) ---------
def test_user_ids_are_validated_strings():
    model = _model()
    users = RosaUsers(model, mode="hidden")
    P = _prompts(2)
    for bad, cls in ((torch.tensor(1), rosa_ext.RosaTypeError), (1, rosa_ext.RosaTypeError),
                     ("x/../bob", rosa_ext.RosaInputError), ("", rosa_ext.RosaInputError)):
        with pytest.raises(cls) as info:
            users.generate(P, [bad, None], **GEN)
        assert info.value.argument == "users[0]"
        with pytest.raises(cls) as info:
            users.load(bad, users._new_state().to_dict())
        assert info.value.argument == "user_id"
    with pytest.raises(rosa_ext.RosaTypeError) as info:  # issue 31: load(None, state) was accepted
        users.load(None, users._new_state().to_dict())
    assert info.value.argument == "user_id"
    assert users.users() == []  # nothing was created by the refused calls
    users.detach()


def test_a_stored_tensor_id_state_is_applied_by_value():
    """A tensor id used to hash by identity (a stored state silently not applied); ids are strings now, so
    the state stored under "7" is the one every later "7" gets."""
    model = _model()
    users = RosaUsers(model, mode="hidden")
    P = _prompts(1)
    users.generate(P, ["7"], **GEN)
    users.update({"7": -1.0})
    kw = dict(GEN, max_new_tokens=1, output_logits=True, return_dict_in_generate=True)
    got = users.generate(P, [str(7)], **kw).logits[0]
    users.detach()
    with torch.no_grad():
        base = model.generate(P, **kw).logits[0]
    assert not torch.equal(got, base)


def test_record_copies_the_callers_buffers():
    model = _model()
    users = RosaUsers(model, mode="lora")
    h = torch.randn(5, 32)
    y = torch.randint(3, 300, (5,))
    users.record("ann", h, y)
    h.zero_()
    y.fill_(3)  # the caller reuses its buffers for bob
    users.record("bob", h, y)
    ann = users.answer("ann")
    assert torch.count_nonzero(ann[0]) > 0 and not torch.equal(ann[1], y)
    users.detach()


def test_recordings_do_not_keep_the_batch_alive():
    model = _model()
    users = RosaUsers(model, mode="lora")
    users.generate(_prompts(4), ["a", "b", "c", "d"], **GEN)
    h = users._recorded["a"][0]
    assert h.untyped_storage().nbytes() == h.numel() * h.element_size()  # its own rows, not a view of (4, n, d)
    users.detach()


@pytest.mark.parametrize("kw", [dict(num_return_sequences=2, do_sample=True), dict(num_beams=2),
                                dict(prompt_lookup_num_tokens=2)])
def test_more_than_one_sequence_per_row_is_refused_before_generating(kw):
    model = _model()
    users = RosaUsers(model, mode="lora")
    gen = dict(GEN, **kw)
    with pytest.raises(rosa_ext.RosaInputError) as info:
        users.generate(_prompts(2), ["ann", "bob"], **gen)
    assert info.value.argument == next(iter(kw))
    assert users.users() == [] and users.answer("ann") is None
    users.detach()


def test_failed_generate_leaves_no_new_user():
    model = _model()
    users = RosaUsers(model, mode="lora")
    with pytest.raises(ValueError):
        users.generate(_prompts(2), ["ann", "bob"], max_new_tokens=-5)  # transformers refuses it
    assert users.users() == []
    users.detach()


def test_apply_refuses_a_non_finite_step():
    model = _model()
    users = RosaUsers(model, mode="hidden")
    users.generate(_prompts(1), ["ann"], **GEN)
    before = users.state("ann")
    for bad in (torch.full((32,), float("nan")), torch.full((32,), float("inf"))):
        with pytest.raises(rosa_ext.RosaNonFiniteError) as info:
            users.apply("ann", bad)
        assert info.value.argument == "update"
    assert users.state("ann")["num_updates"] == before["num_updates"]
    users.apply("ann", torch.full((32,), 3e38))  # finite, and so is the state
    with pytest.raises(rosa_ext.RosaNonFiniteError) as info:  # a finite step that makes the state overflow
        users.apply("ann", torch.full((32,), 3e38))
    assert info.value.argument == "update"
    users.detach()
    assert torch.isfinite(users.state("ann")["delta"]).all()
    assert users.state("ann")["num_updates"] == before["num_updates"] + 1


def test_bad_masks_name_the_user_entry():
    model = _model()
    users = RosaUsers(model, mode="lora")
    users.generate(_prompts(2), ["ann", "bob"], **GEN)
    n = users.answer("ann")[1].numel()
    with pytest.raises(rosa_ext.RosaTypeError) as info:
        users.update({"ann": 1.0}, masks={"ann": torch.ones(n, dtype=torch.long)})
    assert info.value.argument == "masks['ann']"
    with pytest.raises(rosa_ext.RosaInputError) as info:
        users.update({"ann": 1.0}, masks={"ann": torch.ones(n + 1, dtype=torch.bool)})
    assert info.value.argument == "masks['ann']"
    with pytest.raises(rosa_ext.RosaInputError) as info:
        users.update({"ann": 1.0}, masks={"bob": torch.ones(n, dtype=torch.bool)})
    assert info.value.argument == "masks"
    users.update({"ann": 1.0, "bob": -1.0})
    users.detach()


def test_one_rosa_owner_per_model_and_detach_is_final():
    model = _model()
    users = RosaUsers(model, mode="lora")
    with pytest.raises(rosa_ext.RosaStateError):
        rosa_ext.attach(model, mode="lora")
    with pytest.raises(rosa_ext.RosaStateError):
        RosaUsers(model, mode="hidden")
    users.detach()
    n_hooks = len(users.head._forward_pre_hooks) + len(users.head._forward_hooks)
    with pytest.raises(rosa_ext.RosaStateError):  # issue 31: generate after detach put a hook back
        users.generate(_prompts(1), ["ann"], **GEN)
    assert len(users.head._forward_pre_hooks) + len(users.head._forward_hooks) == n_hooks
    s = rosa_ext.attach(model, mode="lora", warmup=False)  # the model is free again
    s.detach()


def test_users_persist_in_a_file_store_and_threads_keep_them_apart(tmp_path):
    import threading

    from rosa_ext.integrations.store import StateStore

    path = tmp_path / "users.sqlite"
    model = _model()
    users = RosaUsers(model, mode="hidden", store=StateStore(path))
    P = _prompts(2)
    users.generate(P, ["ann", "bob"], **GEN)
    users.update({"ann": -1.0, "bob": 1.0})
    errors = []

    def turn(u, row):  # two threads: generate + update for their own user, twice
        try:
            for _ in range(2):
                users.generate(P[row:row + 1], [u], **GEN)
                users.update({u: -1.0})
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    ts = [threading.Thread(target=turn, args=(u, i)) for i, u in enumerate(("ann", "bob"))]
    for t in ts:
        t.start()
    for t in ts:
        t.join()
    assert not errors
    want = {u: users.state(u) for u in ("ann", "bob")}
    assert want["ann"]["num_updates"] == 3 and want["bob"]["num_updates"] == 3
    users.detach()
    users.store.close()
    again = RosaUsers(model, mode="hidden", store=StateStore(path))
    for u in want:
        assert torch.equal(again.state(u)["delta"], want[u]["delta"])
    again.detach()


def test_two_threads_in_session_generate_keep_their_recordings_whole():
    """Issue 29: two threads in session.generate mixed one recording; generations on one session are now
    serialised, so the recording left is one generation's own rows."""
    import threading

    model = _model()
    s = rosa_ext.attach(model, mode="hidden", warmup=False)
    P = _prompts(2)
    outs, errors = {}, []

    def run(i):
        try:
            outs[i] = s.generate(P[i:i + 1], **GEN)[0, P.shape[1]:]
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    for _ in range(3):
        ts = [threading.Thread(target=run, args=(i,)) for i in range(2)]
        for t in ts:
            t.start()
        for t in ts:
            t.join()
        assert not errors
        rec = s._recorded
        k = 0 if torch.equal(rec.tokens[0], outs[0][:rec.tokens[0].numel()]) else 1
        assert torch.equal(rec.tokens[0], outs[k][:rec.tokens[0].numel()])
        with torch.no_grad():  # the rows are that generation's: the body's last hidden states of its tokens
            seq = torch.cat([P[k], outs[k]])[None, :-1]
            h = model.model(seq).last_hidden_state[0, P.shape[1] - 1:]
        torch.testing.assert_close(rec.hidden[0], h[:rec.hidden[0].shape[0]], rtol=1e-4, atol=1e-5)
    s.detach()


def test_remove_forgets_the_recorded_answer_and_reset_keeps_it():
    """As the vLLM server's DELETE: a removed user's recorded answer cannot be rated (it does not bring the
    user back); a reset only puts the state back to the base, the answer can still be rated."""
    from rosa_ext.common.validation import RosaInputError

    model = _model()
    users = RosaUsers(model, mode="hidden")
    P = _prompts()
    users.generate(P, ["ann", "bob", None], **GEN)
    users.update({"ann": -1.0})
    users.generate(P, ["ann", "bob", None], **GEN)
    users.remove("ann")
    assert users.answer("ann") is None and not users.has("ann")
    with pytest.raises(RosaInputError) as e:
        users.update({"ann": 1.0})
    assert e.value.argument == "feedback"
    assert not users.has("ann")
    users.reset("bob")
    assert users.answer("bob") is not None
    assert users.update({"bob": 1.0})["bob"].update.abs().max() > 0 and users.state("bob")["num_updates"] == 1
    users.detach()
