"""RosaServing (the engine-side ROSA of the vLLM plugin) without vLLM: a tiny model's decoding loop
driven the way the plugin drives it (rows -> requests through a plan, the base rows recorded at their
output position), compared with single-user sessions; feedback errors; the recording budget; the
state store it writes."""
from __future__ import annotations

import pytest
import torch

import rosa_ext
from rosa_ext.common.validation import RosaInputError, RosaNonFiniteError, RosaStateError, RosaTypeError
from rosa_ext.integrations.models import tiny_causal_lm
from rosa_ext.integrations.serving import RosaServing, ServingConfig, feedback_body, put_body, request_fields, reset_body, rpc_safe

pytestmark = pytest.mark.usefixtures("one_torch_thread")
V, D, NEW = 300, 32, 6


def _model():
    m = tiny_causal_lm("llama", vocab_size=V, hidden_size=D)
    m.generation_config.eos_token_id = None
    return m.eval()


def _prompt(seed, L=7):
    return torch.randint(3, V, (L,), generator=torch.Generator().manual_seed(seed)).tolist()


def _serving(model, tmp_path=None, **cfg):
    eng = RosaServing(dict({"damping": 1e-3, **({"store": str(tmp_path / "s.sqlite")} if tmp_path else {})}, **cfg))
    W = model.lm_head.weight.detach()
    eng.configure(V, D, W.dtype)
    eng.attach_head(W)
    return eng


def _decode(model, eng, requests, steps=NEW):
    """Greedy decoding of several requests in one batch, the plugin's way. ``requests``: list of
    (key, extra, prompt); returns {key: (tokens, logits per step)}."""
    outs = {k: [] for k, _, _ in requests}
    recs = [eng.admit(k, k + "-internal", extra, outs[k], steps) for k, extra, _ in requests]
    plan = eng.plan(recs, torch.device("cpu"))
    logits_seen = {k: [] for k in outs}
    W = model.lm_head.weight.detach()
    for _ in range(steps):
        with torch.no_grad():
            rows = torch.stack([model.model(torch.tensor([p + outs[k]])).last_hidden_state[0, -1]
                                for k, _, p in requests])
        logits = eng.logits(rows, plan, lambda h: h @ W.T)
        for i, (k, _, _) in enumerate(requests):
            logits_seen[k].append(logits[i].clone())
            outs[k].append(int(logits[i].argmax()))
    return {k: (outs[k], logits_seen[k]) for k in outs}


def _session(model, mode, state=None):
    s = rosa_ext.attach(model, mode=mode, damping=1e-3, warmup=False)
    if state is not None:
        s.load_state_dict(state)
    return s


@pytest.mark.parametrize("mode", ["hidden", "lora"])
def test_turn_feedback_next_turn_matches_a_session(mode):
    model = _model()
    eng = _serving(model, mode=mode)
    p_ann, p_bob = _prompt(1), _prompt(2)
    first = _decode(model, eng, [("r1", {"rosa_user": "ann", "rosa_record": True}, p_ann),
                                 ("r2", {"rosa_user": "bob", "rosa_record": True}, p_bob),
                                 ("r3", None, p_ann)])
    # no state yet: every row is the base model
    with torch.no_grad():
        base = model.generate(torch.tensor([p_ann]), max_new_tokens=NEW, do_sample=False, pad_token_id=0)[0, 7:].tolist()
    assert first["r1"][0] == base == first["r3"][0]
    out_a = eng.feedback("ann", "r1", -1.0)
    out_b = eng.feedback("bob", "r2", 1.0)
    assert out_a["num_updates"] == 1 and out_a["tokens"] == NEW and out_b["mode"] == mode
    # the same turn in single-user sessions
    want = {}
    for user, prompt, r in (("ann", p_ann, -1.0), ("bob", p_bob, 1.0)):
        s = _session(model, mode)
        s.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, pad_token_id=0)
        s.update(reward=r)
        want[user] = s.state_dict()
        s.detach()
        got = eng.store.get(user)
        for k in (("delta",) if mode == "hidden" else ("a", "b")):
            torch.testing.assert_close(got[k], want[user][k], rtol=1e-4, atol=1e-6)
    # the next request of each user is adapted (and equals its session); a base row stays the base
    second = _decode(model, eng, [("s1", {"rosa_user": "ann"}, p_ann), ("s2", None, p_ann),
                                  ("s3", {"rosa_user": "bob"}, p_bob)])
    assert second["s2"][0] == base
    for key, user, prompt in (("s1", "ann", p_ann), ("s3", "bob", p_bob)):
        s = _session(model, mode, want[user])
        with torch.no_grad():
            g = s.model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, pad_token_id=0,
                                 output_logits=True, return_dict_in_generate=True)
        s.detach()
        assert second[key][0] == g.sequences[0, 7:].tolist(), user
        for a, b in zip(second[key][1], g.logits):
            torch.testing.assert_close(a, b[0], rtol=1e-4, atol=1e-4)
    assert second["s1"][0] != base or mode == "lora"  # (a LoRA step may keep the argmax; logits differ)
    assert max((a - b).abs().max().item() for a, b in zip(second["s1"][1], first["r1"][1])) > 1e-3


def test_rows_are_recorded_at_their_output_position():
    """A row computed again for the same position (chunked prefill, a resumed request) overwrites it."""
    model = _model()
    eng = _serving(model)
    out = []
    rec = eng.admit("k", "k-x", {"rosa_user": "u", "rosa_record": True}, out, 4)
    plan = eng.plan([rec], torch.device("cpu"))
    h1, h2 = torch.randn(1, D), torch.randn(1, D)
    eng.logits(h1, plan, lambda h: h @ model.lm_head.weight.T)  # a partial prefill's row, discarded
    eng.logits(h2, plan, lambda h: h @ model.lm_head.weight.T)  # the real one, same position 0
    assert torch.equal(rec.buf[0], h2[0]) and int(rec.filled.sum()) == 1
    assert eng.admit("k", "k-x", {"rosa_user": "u", "rosa_record": True}, out, 4) is rec  # resumed: same recording


def test_feedback_errors_change_nothing_and_name_the_field():
    model = _model()
    eng = _serving(model, max_pending=2)
    _decode(model, eng, [("a1", {"rosa_user": "ann", "rosa_record": True}, _prompt(1)),
                         ("b1", {"rosa_user": "bob"}, _prompt(2))])
    cases = [
        (dict(user="ann", request_id="nope", reward=1.0), RosaInputError, "request_id"),
        (dict(user="bob", request_id="a1", reward=1.0), RosaInputError, "request_id"),  # ann's answer
        (dict(user="bob", request_id="b1", reward=1.0), RosaInputError, "request_id"),  # not recorded
        (dict(user="ann", request_id="a1", reward=float("nan")), RosaInputError, "reward"),
        (dict(user="ann", request_id="a1", reward=True), RosaTypeError, "reward"),
        (dict(user="ann", request_id="a1", reward="1"), RosaTypeError, "reward"),
        (dict(user="x/../ann", request_id="a1", reward=1.0), RosaInputError, "user"),
        (dict(user=7, request_id="a1", reward=1.0), RosaTypeError, "user"),
        (dict(user="ann", request_id=3, reward=1.0), RosaTypeError, "request_id"),
    ]
    for kw, cls, arg in cases:
        with pytest.raises(cls) as e:
            eng.feedback(**kw)
        assert e.value.argument == arg, kw
    assert not eng.store.has("ann")
    with pytest.raises(RosaStateError) as e:
        eng.feedback("ann", "a1", 1.0, running=lambda rid: rid == "a1-internal")
    assert e.value.argument == "request_id" and "still generating" in str(e.value)
    assert eng.feedback("ann", "a1", 1.0)["num_updates"] == 1
    with pytest.raises(RosaStateError, match="already rated") as e:
        eng.feedback("ann", "a1", 1.0)
    assert eng.store.get("ann")["num_updates"] == 1 and eng.stats()["recordings"] == 0


def test_completion_index_and_the_feedback_window():
    model = _model()
    eng = _serving(model, max_pending=2)
    reqs = [(f"cmpl-x-{i}", {"rosa_user": "ann", "rosa_record": True}, _prompt(i)) for i in range(3)]
    _decode(model, eng, reqs, steps=2)
    with pytest.raises(RosaStateError, match="max_pending"):  # the oldest of ann's three was freed
        eng.feedback("ann", "cmpl-x", 1.0, index=0)
    assert eng.feedback("ann", "cmpl-x", 1.0, index=2)["tokens"] == 2
    eng.config.window_s = 1e-9
    with pytest.raises(RosaStateError, match="window"):
        eng.feedback("ann", "cmpl-x", 1.0, index=1)
    assert eng.stats()["reserved_mb"] == 0


def test_budget_duplicate_ids_and_bad_request_fields():
    model = _model()
    eng = _serving(model, max_record_mb=1e-3)  # 1 KiB: one row of d=32 fp32 is 128 bytes
    _decode(model, eng, [("big", {"rosa_user": "ann", "rosa_record": True}, _prompt(1))], steps=2)
    recs = [eng.admit("small", "i1", {"rosa_user": "bob", "rosa_record": True}, [], 2),
            eng.admit("huge", "i2", {"rosa_user": "bob", "rosa_record": True}, [], 100)]
    assert recs[0].record and not recs[1].record
    with pytest.raises(RosaStateError, match="budget") as e:
        eng.feedback("bob", "huge", 1.0)
    assert e.value.argument == "request_id"
    eng.admit("dup", "i3", {"rosa_user": "bob", "rosa_record": True}, [], 2)
    eng.admit("dup", "i4", {"rosa_user": "bob", "rosa_record": True}, [], 2)  # a second request with that id
    with pytest.raises(RosaStateError, match="two requests"):
        eng.feedback("bob", "dup", 1.0)
    for extra, cls, arg in (({"rosa_usr": "a"}, RosaInputError, "rosa_usr"), ({"rosa_record": True}, RosaInputError, "rosa_user"),
                            ({"rosa_user": 3}, RosaTypeError, "rosa_user"), ({"rosa_user": "a/b"}, RosaInputError, "rosa_user"),
                            ({"rosa_user": "a", "rosa_record": 2}, RosaTypeError, "rosa_record")):
        with pytest.raises(cls) as e:
            request_fields("t", extra)
        assert e.value.argument == arg
    assert request_fields("t", {"temperature_hint": 1}) is None and request_fields("t", None) is None


def test_user_states_as_json_and_persistence(tmp_path):
    model = _model()
    eng = _serving(model, tmp_path)
    _decode(model, eng, [("a1", {"rosa_user": "ann", "rosa_record": True}, _prompt(1))])
    eng.feedback("ann", "a1", -1.0)
    got = eng.get_user("ann", tensors=True)
    assert got["mode"] == "hidden" and got["num_updates"] == 1 and len(got["delta"]) == D
    put = dict(got)
    for k in ("user", "revision"):
        put.pop(k)
    assert eng.put_user("carl", put)["num_updates"] == 1
    bad = [(dict(put, delta=[0.0] * (D - 1)), RosaInputError, "state['delta']"),
           (dict(put, delta=[float("nan")] * D), RosaNonFiniteError, "state['delta']"),
           (dict(put, delta=[1e300] * D), RosaNonFiniteError, "state['delta']"),  # overflows float32
           (dict(put, delta=[10 ** 400] * D), RosaInputError, "state['delta']"),
           (dict(put, delta=[True] * D), RosaTypeError, "state['delta']"),
           (dict(put, mode="nope"), RosaInputError, "state['mode']"),
           ([1, 2], RosaTypeError, "state")]
    for state, cls, arg in bad:
        with pytest.raises(cls) as e:
            eng.put_user("dora", state)
        assert e.value.argument == arg
    assert not eng.store.has("dora")
    with pytest.raises(RosaInputError) as e:
        eng.get_user("nobody")
    assert e.value.argument == "user"
    assert eng.reset_user("ann", "lora")["mode"] == "lora"
    rev = eng.store.revision("carl")
    eng.store.close()
    again = _serving(model, tmp_path)  # a restarted server reads its users back
    assert again.get_user("carl")["num_updates"] == 1 and again.store.revision("carl") == rev
    assert again.get_user("ann")["mode"] == "lora"


def test_config_is_validated():
    for cfg, arg in (({"mode": "x"}, "config['mode']"), ({"damping": -1}, "damping"), ({"nope": 1}, "config['nope']"),
                     ({"max_pending": 0}, "config['max_pending']"), ({"store": 3}, "config['store']")):
        with pytest.raises((RosaInputError, RosaTypeError)) as e:
            ServingConfig.from_mapping(cfg)
        assert e.value.argument == arg, cfg


# -- what a client sends to the HTTP routes (checked in vLLM's front end, before the engine) ------------
def test_feedback_body_names_each_bad_field_and_only_int64_numbers_reach_the_engine():
    """A feedback's numbers are converted before anything is sent to the engine: vLLM's RPC cannot carry an
    int beyond 64 bits, so an int that large must be refused (or converted) here, naming its field."""
    ok = feedback_body({"user": "alice", "request_id": "cmpl-x", "reward": 10 ** 25, "index": 2})
    assert ok == {"user": "alice", "request_id": "cmpl-x", "reward": 1e25, "index": 2}
    assert type(ok["reward"]) is float
    rpc_safe("feedback", ok)
    assert feedback_body({"user": "alice", "request_id": "r", "reward": -1})["index"] is None
    cases = [({"user": "alice", "request_id": "r", "reward": 10 ** 400}, RosaInputError, "reward"),  # > float max
             ({"user": "alice", "request_id": "r", "reward": float("inf")}, RosaInputError, "reward"),
             ({"user": "alice", "request_id": "r", "reward": [1.0]}, RosaTypeError, "reward"),
             ({"user": "alice", "request_id": "r", "reward": None}, RosaTypeError, "reward"),
             ({"user": "alice", "request_id": "r", "reward": 1.0, "index": 10 ** 23}, RosaInputError, "index"),
             ({"user": "alice", "request_id": "r", "reward": 1.0, "index": -1}, RosaInputError, "index"),
             ({"user": "alice", "request_id": "r", "reward": 1.0, "index": 0.5}, RosaInputError, "index"),
             ({"user": "alice", "request_id": "r", "reward": 1.0, "index": True}, RosaTypeError, "index"),
             ({"user": "alice", "request_id": 10 ** 30, "reward": 1.0}, RosaTypeError, "request_id"),
             ({"user": 10 ** 30, "request_id": "r", "reward": 1.0}, RosaTypeError, "user"),
             ({"user": "alice", "reward": 1.0}, RosaInputError, "request_id"),
             ({"user": "alice", "request_id": "r", "reward": 1.0, "rewrad": 10 ** 30}, RosaInputError, "rewrad"),
             ([1, 2], RosaTypeError, "body"), (None, RosaTypeError, "body")]
    for body, cls, arg in cases:
        with pytest.raises(cls) as e:
            feedback_body(body)
        assert e.value.argument == arg, body
    # the last check before the engine names the field of any int beyond 64 bits
    for payload, arg in (({"user": "a", "tensors": 2 ** 64}, "tensors"), ({"state": {"num_updates": -2 ** 63 - 1}},
                                                                           "state['num_updates']"),
                         ({"state": {"delta": [0.0, 10 ** 20]}}, "state['delta']")):
        with pytest.raises(RosaInputError) as e:
            rpc_safe("put", payload)
        assert e.value.argument == arg
    rpc_safe("put", {"state": {"delta": [0.0, 2 ** 63 - 1, -2 ** 63], "mode": "hidden", "x": None, "y": True}})


def test_get_output_goes_back_with_put_and_huge_numbers_name_their_field():
    """README: PUT takes the JSON of GET ?tensors=true as is (its `user` must be the path's, its `revision`
    is ignored); every number of the state is checked before the engine sees it."""
    model = _model()
    eng = _serving(model)
    _decode(model, eng, [("a1", {"rosa_user": "ann", "rosa_record": True}, _prompt(1))])
    eng.feedback("ann", "a1", -1.0)
    got = eng.get_user("ann", tensors=True)
    before = eng.store.state("ann")
    payload = put_body("ann", got)  # verbatim
    rpc_safe("put", payload)
    out = eng.put_user(payload["user"], payload["state"])
    assert out["revision"] > got["revision"] and out["num_updates"] == 1
    assert torch.equal(eng.store.state("ann").delta, before.delta)
    # a stale revision is ignored (a PUT restores a saved state), not compared
    assert put_body("ann", dict(got, revision=0))["state"]["delta"] == got["delta"]
    # the same JSON under another user: leave `user` out
    with pytest.raises(RosaInputError) as e:
        put_body("bob", got)
    assert e.value.argument == "user" and "'ann'" in str(e.value)
    eng.put_user("bob", put_body("bob", {k: v for k, v in got.items() if k != "user"})["state"])
    assert torch.equal(eng.store.state("bob").delta, before.delta)
    d = len(got["delta"])
    cases = [(dict(got, num_updates=10 ** 23), RosaInputError, "state['num_updates']"),
             (dict(got, num_updates=-1), RosaInputError, "state['num_updates']"),
             (dict(got, vocab_size=10 ** 30), RosaInputError, "state['vocab_size']"),
             (dict(got, hidden_size=2 ** 64), RosaInputError, "state['hidden_size']"),
             (dict(got, version=10 ** 30), RosaInputError, "state['version']"),
             (dict(got, lora_scale=10 ** 400), RosaInputError, "state['lora_scale']"),
             (dict(got, delta=[10 ** 400] * d), RosaInputError, "state['delta']"),
             (dict(got, revision=10 ** 30), RosaInputError, "revision"),
             (dict(got, revision="7"), RosaTypeError, "revision"),
             (dict(got, user=7), RosaInputError, "user"),
             (dict(got, extra=1), RosaInputError, "state['extra']"),
             ([1.0] * d, RosaTypeError, "state")]
    for body, cls, arg in cases:
        with pytest.raises(cls) as e:
            put_body("ann", body)
        assert e.value.argument == arg, (arg, str(e.value))
    # an int that a float holds is a number of the state (converted), checked against the model by the engine
    big = put_body("ann", dict(got, delta=[10 ** 39] + [0.0] * (d - 1)))
    rpc_safe("put", big)
    with pytest.raises(RosaNonFiniteError) as e:  # 1e39 overflows the served float32
        eng.put_user("ann", big["state"])
    assert e.value.argument == "state['delta']"
    assert eng.store.state("ann").num_updates == 1
    for body, arg in (({"mode": "lora"}, None), (None, None), ({"mode": 10 ** 30}, "mode"), ({"mod": "lora"}, "mod"),
                      ([1], "body")):
        if arg is None:
            assert reset_body("ann", body)["mode"] == (body or {}).get("mode")
            continue
        with pytest.raises((RosaInputError, RosaTypeError)) as e:
            reset_body("ann", body)
        assert e.value.argument == arg


def test_an_index_past_the_prompts_names_index_and_its_range():
    model = _model()
    eng = _serving(model)
    _decode(model, eng, [("cmpl-x-0", {"rosa_user": "ann", "rosa_record": True}, _prompt(1)),
                         ("cmpl-y-0", {"rosa_user": "bob", "rosa_record": True}, _prompt(2)),
                         ("cmpl-y-1", {"rosa_user": "bob", "rosa_record": True}, _prompt(3)),
                         ("chatcmpl-z", {"rosa_user": "cy", "rosa_record": True}, _prompt(4))], steps=2)
    for user, rid, index, want in (("ann", "cmpl-x", 1, "[0, 0]"), ("bob", "cmpl-y", 5, "[0, 1]"),
                                   ("cy", "chatcmpl-z", 0, "leave `index` out")):
        with pytest.raises(RosaInputError) as e:
            eng.feedback(user, rid, 1.0, index=index)
        assert e.value.argument == "index" and want in str(e.value), str(e.value)
    assert eng.feedback("bob", "cmpl-y", 1.0, index=1)["tokens"] == 2
    assert eng.feedback("cy", "chatcmpl-z", 1.0)["tokens"] == 2
    with pytest.raises(RosaInputError) as e:  # an unknown request is still about the request
        eng.feedback("ann", "cmpl-nope", 1.0, index=1)
    assert e.value.argument == "request_id"


def test_delete_drops_the_users_pending_answers_and_reset_keeps_them(tmp_path):
    """Deleting a user forgets it all: rating one of its recorded answers afterwards is refused (naming
    request_id) and does not bring the user back. A reset changes the state only."""
    model = _model()
    eng = _serving(model, tmp_path)
    _decode(model, eng, [("a1", {"rosa_user": "ann", "rosa_record": True}, _prompt(1))])
    eng.feedback("ann", "a1", -1.0)
    _decode(model, eng, [("a2", {"rosa_user": "ann", "rosa_record": True}, _prompt(2)),
                         ("a3", {"rosa_user": "ann", "rosa_record": True}, _prompt(3)),
                         ("b1", {"rosa_user": "bob", "rosa_record": True}, _prompt(4)),
                         ("c1", {"rosa_user": "cy", "rosa_record": True}, _prompt(5))])
    reserved = eng.stats()["reserved_mb"]
    out = eng.delete_user("ann")
    assert out["state_deleted"] and out["recordings_dropped"] == 2
    assert eng.stats()["reserved_mb"] == pytest.approx(reserved / 2)
    for rid in ("a2", "a3"):
        with pytest.raises(RosaStateError) as e:
            eng.feedback("ann", rid, 1.0)
        assert e.value.argument == "request_id" and "deleted" in str(e.value)
    assert not eng.store.has("ann")
    # a user with recorded answers but no state yet (never rated) is deleted too
    out = eng.delete_user("bob")
    assert not out["state_deleted"] and out["recordings_dropped"] == 1
    with pytest.raises(RosaStateError):
        eng.feedback("bob", "b1", 1.0)
    assert not eng.store.has("bob")
    with pytest.raises(RosaInputError) as e:  # nothing left of bob: 404
        eng.delete_user("bob")
    assert e.value.argument == "user" and "no state stored" in str(e.value)
    # a reset keeps the pending answer: it is rated from the base state
    eng.reset_user("cy")
    assert eng.feedback("cy", "c1", 1.0)["num_updates"] == 1
    # a new answer after the delete is a new user's
    _decode(model, eng, [("a4", {"rosa_user": "ann", "rosa_record": True}, _prompt(6))])
    assert eng.feedback("ann", "a4", 1.0)["num_updates"] == 1


def test_vllm_serve_names_the_flag_of_a_bad_option(capsys, tmp_path):
    """`python -m rosa_ext.integrations.vllm_serve --rosa-mode x`: one line naming --rosa-mode, exit 2,
    before vLLM is imported."""
    from rosa_ext.integrations import vllm_serve

    for argv, flag in ((["--rosa-mode", "x"], "--rosa-mode"), (["--rosa-damping", "-1"], "--rosa-damping"),
                       (["--rosa-lora-scale", "0"], "--rosa-lora-scale"), (["--rosa-seed", "abc"], "--rosa-seed"),
                       (["--rosa-max-pending", "0"], "--rosa-max-pending"),
                       (["--rosa-store", str(tmp_path / "no" / "s.sqlite")], "--rosa-store"),
                       (["--rosa-store", str(tmp_path)], "--rosa-store")):
        with pytest.raises(SystemExit) as e:
            vllm_serve.main(["--model", "m"] + argv)
        assert e.value.code == 2
        err = capsys.readouterr().err
        assert err.count("\n") == 1 and f"argument {flag}:" in err, err
        assert "config[" not in err and "Traceback" not in err, err
