"""StateStore, the one per-user store: validated string ids, copies in and out, per-user atomic and
serialised read-update-write (threads), a failed update changes nothing, SQLite persistence that survives
a restart and a kill -9 right after an acknowledged update."""
from __future__ import annotations

import os
import signal
import subprocess
import sys
import textwrap
import threading

import pytest
import torch

import rosa_ext
from rosa_ext.common.validation import RosaInputError, RosaNonFiniteError, RosaStateError, RosaTypeError
from rosa_ext.integrations.models import tiny_causal_lm
from rosa_ext.integrations.store import HiddenState, LoraState, StateStore, check_user_id

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


def _hidden(value=0.0, n=0, d=8, V=64):
    return HiddenState(vocab_size=V, hidden_size=d, lora_scale=8.0, num_updates=n, delta=torch.full((d,), float(value)))


def _plus_one(sd):
    return dict(sd, delta=sd["delta"] + 1.0, num_updates=sd["num_updates"] + 1)


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
    typed = store.state("alice")
    assert isinstance(typed, LoraState) and typed.mode == "lora"
    typed.b.add_(3.0)  # a typed copy too
    assert torch.count_nonzero(store.get("alice")["b"]) == 0
    store.put("u7", s.state_dict())
    assert store.get("alice")["a"] is not store.get("u7")["a"]
    store.delete("u7")
    assert store.users() == ["alice"]


@pytest.mark.parametrize("bad,cls", [
    (7, RosaTypeError), (True, RosaTypeError), (None, RosaTypeError), (1.5, RosaTypeError), (b"ann", RosaTypeError),
    (torch.tensor(3), RosaTypeError), (("a",), RosaTypeError),
    ("", RosaInputError), ("x/../bob", RosaInputError), ("a/b", RosaInputError), ("a\\b", RosaInputError),
    ("..", RosaInputError), ("a..b", RosaInputError), (".hidden", RosaInputError), ("-rf", RosaInputError),
    ("ann\n", RosaInputError), ("an n", RosaInputError), ("x" * 129, RosaInputError), ("é", RosaInputError),
])
def test_user_ids_are_validated_strings(bad, cls):
    store = StateStore()
    for call, args in (("has", ()), ("get", ()), ("put", (_hidden(),)), ("delete", ()), ("update", (_plus_one,))):
        with pytest.raises(cls) as e:
            getattr(store, call)(bad, *args)
        assert e.value.argument == "user_id", call
    assert len(store) == 0


def test_good_ids_and_no_int_str_aliasing():
    for good in ("a", "ann@example.com", "u-1_2.3+x", "A" * 128, "1"):
        assert check_user_id("t", good) == good
    store = StateStore()
    store.put("1", _hidden(1.0, 1))
    with pytest.raises(RosaTypeError, match="1 and '1'"):
        store.get(1)


@pytest.mark.parametrize("call", ["get", "delete", "update", "state", "revision"])
def test_unknown_user_is_a_clear_error(call):
    store = StateStore()
    args = {"update": (lambda st: st,)}.get(call, ())
    with pytest.raises(RosaInputError, match="no state stored for user_id='bob'") as e:
        getattr(store, call)("bob", *args)
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
    with pytest.raises(RosaInputError) as e:
        StateStore(mode="hidden").put("u", sd)  # a lora state in a hidden-mode store
    assert e.value.argument == "state['mode']"
    assert not store.has("u")


def test_failed_update_leaves_the_stored_state_as_it_was():
    _, s = _session()
    store = StateStore()
    store.put("u", s.state_dict())
    snap, rev = store.get("u"), store.revision("u")

    def boom(state):
        state["b"].add_(5.0)  # changes the private copy, then fails
        raise RuntimeError("judge crashed")

    with pytest.raises(RuntimeError, match="judge crashed"):
        store.update("u", boom)
    assert _equal(store.get("u"), snap) and store.revision("u") == rev

    def nan(state):
        state["b"][1] = float("nan")
        return state

    with pytest.raises(RosaNonFiniteError):
        store.update("u", nan)
    assert _equal(store.get("u"), snap)
    new = store.update("u", lambda st: dict(st, b=st["b"] + 1.0, num_updates=1))
    assert torch.equal(new["b"], snap["b"] + 1.0) and torch.equal(store.get("u")["b"], snap["b"] + 1.0)
    assert store.revision("u") > rev


def test_update_many_is_all_or_nothing():
    store = StateStore()
    store.put("a", _hidden(0.0))
    store.put("b", _hidden(0.0))

    def half_bad(cur):
        return {"a": _hidden(1.0, 1), "b": _hidden(float("nan"), 1)}

    with pytest.raises(RosaNonFiniteError) as e:
        store.update_many(["a", "b"], half_bad)
    assert e.value.argument == "state['b']['delta']"
    assert store.get("a")["num_updates"] == 0 and store.get("b")["num_updates"] == 0
    out = store.update_many(["a", "b"], lambda cur: {u: _hidden(2.0, 1) for u in cur})
    assert set(out) == {"a", "b"} and torch.equal(store.get("b")["delta"], torch.full((8,), 2.0))
    with pytest.raises(RosaInputError):
        store.update_many(["a", "a"], lambda cur: {})


def test_copy_on_write_a_reader_keeps_its_snapshot():
    store = StateStore()
    store.put("u", _hidden(1.0, 1))
    snap, rev = store.peek("u")
    store.update("u", _plus_one)
    assert torch.equal(snap.delta, torch.full((8,), 1.0)) and store.revision("u") == rev + 1


def test_reentrant_write_during_update_is_detected():
    _, s = _session()
    store = StateStore()
    store.put("u", s.state_dict())

    def sneaky(state):
        store.put("u", s.state_dict())  # another write of the same user meanwhile
        return state

    with pytest.raises(RosaStateError) as e:
        store.update("u", sneaky)
    assert e.value.argument == "user_id"


def test_threads_updating_one_user_are_serialised_none_lost():
    store = StateStore()
    store.put("u", _hidden(0.0))
    store.put("v", _hidden(0.0))
    N, K = 8, 25
    errors = []

    def work(user):
        try:
            for _ in range(K):
                store.update(user, _plus_one)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=("u" if i % 2 else "v",)) for i in range(N)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for u in ("u", "v"):
        got = store.get(u)
        assert got["num_updates"] == N // 2 * K and torch.equal(got["delta"], torch.full((8,), float(N // 2 * K)))


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


def test_two_threads_stepping_users_through_one_session_do_not_mix():
    """Issue: two threads on one session interleaved load/update/state_dict (bob had 3 updates after 2)."""
    _, s = _session("hidden")
    store = StateStore()
    K = 4
    errors = []

    def work(user, seed):
        try:
            for _ in range(K):
                store.step(user, s, _ids(seed), -1.0, response_start=P0, create=True)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=work, args=(u, seed)) for u, seed in (("ann", 1), ("bob", 2))]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    assert not errors
    for user, seed in (("ann", 1), ("bob", 2)):
        _, ref = _session("hidden")
        for _ in range(K):
            ref.update(_ids(seed), -1.0, response_start=P0)
        got = store.get(user)
        assert got["num_updates"] == K
        torch.testing.assert_close(got["delta"], ref.state_dict()["delta"], rtol=1e-5, atol=1e-6)


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


# -- persistence --------------------------------------------------------------------------------------
def test_persisted_store_survives_a_restart(tmp_path):
    path = tmp_path / "users.sqlite"
    _, s = _session()
    store = StateStore(path, vocab_size=64, hidden_size=32)
    store.step("alice", s, _ids(1), -1.0, response_start=P0, create=True)
    store.put("hid", dict(_hidden(0.5, 2, d=32).to_dict()))
    want = {u: store.get(u) for u in store.users()}
    rev = store.revision("alice")
    store.close()
    with pytest.raises(RosaStateError):  # a closed store serves nothing (not even what it had cached)
        store.get("alice")
    again = StateStore(path)
    assert again.users() == ["alice", "hid"] and len(again) == 2
    for u in want:
        assert _equal(again.get(u), want[u]), u
    assert isinstance(again.state("hid"), HiddenState) and again.revision("alice") == rev
    again.put("carol", _hidden(1.0, 1, d=32))
    assert again.revision("carol") > max(again.revision("alice"), again.revision("hid"))  # never reused
    again.delete("hid")
    again.close()
    third = StateStore(path)
    assert third.users() == ["alice", "carol"]
    with pytest.raises(RosaInputError):  # the file remembers its model's sizes
        third.put("x", _hidden(0.0, 0, d=8))
    third.close()
    with pytest.raises(RosaStateError) as e:
        StateStore(path, hidden_size=8)
    assert e.value.argument == "hidden_size"


def test_persisted_failed_update_writes_nothing(tmp_path):
    path = tmp_path / "s.sqlite"
    store = StateStore(path)
    store.put("a", _hidden(0.0))
    store.put("b", _hidden(0.0))
    with pytest.raises(RosaNonFiniteError):
        store.update_many(["a", "b"], lambda cur: {"a": _hidden(1.0, 1), "b": _hidden(float("inf"), 1)})
    store.close()
    again = StateStore(path)
    assert again.get("a")["num_updates"] == 0 and again.get("b")["num_updates"] == 0


def test_bad_paths_are_clear_errors(tmp_path):
    with pytest.raises(RosaInputError) as e:
        StateStore(tmp_path / "missing" / "x.sqlite")
    assert e.value.argument == "path"
    with pytest.raises(RosaInputError):
        StateStore(tmp_path)  # a folder
    junk = tmp_path / "junk.sqlite"
    junk.write_bytes(b"not a database" * 100)
    with pytest.raises(RosaStateError):
        StateStore(junk)
    with pytest.raises(RosaTypeError):
        StateStore(3)


_CHILD = textwrap.dedent("""
    import sys, torch
    from rosa_ext.integrations.store import HiddenState, StateStore
    store = StateStore(sys.argv[1], mode="hidden", vocab_size=64, hidden_size=8)
    for u in ("a", "b"):
        if not store.has(u):
            store.put(u, HiddenState(vocab_size=64, hidden_size=8, lora_scale=8.0, num_updates=0, delta=torch.zeros(8)))
    print("READY", flush=True)
    k = 0
    while True:
        u = "ab"[k % 2]
        new = store.update(u, lambda sd: dict(sd, delta=sd["delta"] + 1.0, num_updates=sd["num_updates"] + 1))
        print(u, new["num_updates"], flush=True)   # the acknowledgement, after the write returned
        k += 1
""")


def test_kill_9_right_after_an_acknowledged_update_loses_nothing(tmp_path):
    path = tmp_path / "kill.sqlite"
    script = tmp_path / "child.py"
    script.write_text(_CHILD)
    for round_ in range(2):  # the second round restarts on the file the first one was killed on
        proc = subprocess.Popen([sys.executable, str(script), str(path)], stdout=subprocess.PIPE, text=True,
                                env=dict(os.environ, OMP_NUM_THREADS="1"))
        acked = {}
        try:
            assert proc.stdout.readline().strip() == "READY"
            for _ in range(40 + 7 * round_):
                u, n = proc.stdout.readline().split()
                acked[u] = int(n)
            os.kill(proc.pid, signal.SIGKILL)  # right after reading an acknowledgement
        finally:
            proc.kill()
            proc.wait()
        store = StateStore(path)
        for u in ("a", "b"):
            got = store.get(u)
            n = got["num_updates"]
            assert n >= acked[u], (u, n, acked[u])  # nothing acknowledged is lost
            assert n <= acked[u] + 1  # at most the one update in flight
            assert torch.equal(got["delta"], torch.full((8,), float(n)))  # and never a torn state
        store.close()
