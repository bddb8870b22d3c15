"""StateStore: per-user session states, copies in and out, copy-on-write updates."""
from __future__ import annotations

import pytest
import torch

import rosa_ext
from rosa_ext.common.validation import RosaInputError, RosaNonFiniteError, RosaStateError, RosaTypeError
from rosa_ext.integrations.models import tiny_causal_lm
from rosa_ext.integrations.store import StateStore

pytestmark = pytest.mark.usefixtures("one_torch_thread")
P0 = 10


def _ids(seed, V=64, T=20):
    return torch.randint(3, V, (1, T), generator=torch.Generator().manual_seed(seed))


def _session(mode="lora"):
    model = tiny_causal_lm("llama", vocab_size=64, hidden_size=32)
    return model, rosa_ext.attach(model, mode=mode)


def _equal(a, b):
    return a.keys() == b.keys() and all(
        torch.equal(a[k], b[k]) if isinstance(a[k], torch.Tensor) else a[k] == b[k] for k in a)


def test_get_put_has_and_copies():
    _, s = _session()
    store = StateStore(vocab_size=64, hidden_size=32)
    assert not store.has("alice") and len(store) == 0
    sd = s.state_dict()
    store.put("alice", sd)
    assert store.has("alice") and "alice" in store and store.users() == ["alice"]
    sd["a"].add_(1.0)  # the caller's dict is not the stored one
    got = store.get("alice")
    assert not torch.equal(got["a"], sd["a"])
    got["a"].zero_()  # nor is what get() returns
    assert torch.count_nonzero(store.get("alice")["a"]) > 0
    store.put(7, s.state_dict())
    assert store.get("alice")["a"] is not store.get(7)["a"]
    store.delete(7)
    assert store.users() == ["alice"]


@pytest.mark.parametrize("call", ["get", "delete", "update"])
def test_unknown_user_is_a_clear_error(call):
    store = StateStore()
    args = {"get": (), "delete": (), "update": (lambda st: st,)}[call]
    with pytest.raises(RosaInputError, match="no state stored for user_id='bob'") as e:
        getattr(store, call)("bob", *args)
    assert e.value.argument == "user_id"
    for bad in (None, True, "", 1.5):
        with pytest.raises(RosaTypeError) as e:
            store.has(bad)
        assert e.value.argument == "user_id"


def test_bad_states_are_refused_and_nothing_stored():
    _, s = _session()
    store = StateStore(vocab_size=64)
    sd = s.state_dict()
    bad = dict(sd, b=sd["b"].clone())
    bad["b"][0] = float("inf")
    with pytest.raises(RosaNonFiniteError) as e:
        store.put("u", bad)
    assert e.value.argument == "state['b']"
    with pytest.raises(RosaInputError) as e:
        store.put("u", dict(sd, vocab_size=65))
    assert e.value.argument.startswith("state[")
    with pytest.raises(RosaTypeError):
        store.put("u", [1, 2])
    assert not store.has("u")


def test_failed_update_leaves_the_stored_state_as_it_was():
    _, s = _session()
    store = StateStore()
    store.put("u", s.state_dict())
    snap = store.get("u")

    def boom(state):
        state["b"].add_(5.0)  # changes the private copy, then fails
        raise RuntimeError("judge crashed")

    with pytest.raises(RuntimeError, match="judge crashed"):
        store.update("u", boom)
    assert _equal(store.get("u"), snap)

    def nan(state):
        state["b"][1] = float("nan")
        return state

    with pytest.raises(RosaNonFiniteError):
        store.update("u", nan)
    assert _equal(store.get("u"), snap)
    new = store.update("u", lambda st: dict(st, b=st["b"] + 1.0))
    assert torch.equal(new["b"], snap["b"] + 1.0) and torch.equal(store.get("u")["b"], snap["b"] + 1.0)


@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_step_keeps_users_apart_and_matches_a_single_user_session(mode):
    model, s = _session(mode)
    store = StateStore()
    store.step("alice", s, _ids(1), -1.0, response_start=P0, create=True)
    store.step("bob", s, _ids(2), 1.0, response_start=P0, create=True)
    store.step("alice", s, _ids(3), 1.0, response_start=P0)
    # the same exchanges, each user on its own session
    for user, steps in (("alice", [(1, -1.0), (3, 1.0)]), ("bob", [(2, 1.0)])):
        m2, s2 = _session(mode)
        for seed, r in steps:
            s2.update(_ids(seed), r, response_start=P0)
        want = s2.state_dict()
        got = store.get(user)
        assert got["num_updates"] == want["num_updates"]
        for k in (("delta",) if mode == "hidden" else ("a", "b")):
            torch.testing.assert_close(got[k], want[k], rtol=1e-5, atol=1e-6)
        s2.detach()
    key = "delta" if mode == "hidden" else "b"
    assert not torch.allclose(store.get("alice")[key], store.get("bob")[key])


def test_failed_step_changes_neither_store_nor_session():
    _, s = _session()
    store = StateStore()
    store.step("alice", s, _ids(1), -1.0, response_start=P0, create=True)
    store.step("bob", s, _ids(2), 1.0, response_start=P0, create=True)  # the session now holds bob
    snap_a, snap_s = store.get("alice"), s.state_dict()
    with pytest.raises(RosaInputError) as e:
        store.step("alice", s, _ids(4), float("nan"), response_start=P0)  # a bad reward
    assert e.value.argument == "reward"
    assert _equal(store.get("alice"), snap_a) and _equal(s.state_dict(), snap_s)
    with pytest.raises(RosaInputError) as e:
        store.step("carol", s, _ids(4), 1.0, response_start=P0)
    assert e.value.argument == "user_id" and not store.has("carol")
    with pytest.raises(RosaInputError) as e:
        store.step("alice", s, _ids(4), 1.0, response_start=P0, non_blocking=True)
    assert e.value.argument == "non_blocking"


def test_concurrent_writer_is_detected():
    _, s = _session()
    store = StateStore()
    store.put("u", s.state_dict())

    def sneaky(state):
        store.put("u", s.state_dict())  # another writer replaces the entry meanwhile
        return state

    with pytest.raises(RosaStateError) as e:
        store.update("u", sneaky)
    assert e.value.argument == "user_id"
