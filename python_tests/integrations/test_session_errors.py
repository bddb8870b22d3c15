"""Property-based tests of attach / RosaSession (hypothesis; README "Errors").

- random valid exchanges on a float64 model: the step the session applies is the float64 reference's
  step on the model's own hidden states (1e-8), and the hooked head is z = W h + s (a.h) b / W (h + delta);
- random invalid arguments of attach, update, update_from_hidden and load_state_dict: a rosa_ext error
  that names the argument (or state key), and the model, its hooks, the session and the inputs
  unchanged -- PEFT's lora_A / lora_B included;
- reset after a failed background update still resets.
"""
from __future__ import annotations

import math
from typing import Any, Dict

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

import rosa_ext
from rosa_ext import RosaError
from rosa_ext.integrations import session as session_mod
from rosa_ext.integrations.models import tiny_causal_lm
from rosa_ext.reference import rosa_update_reference

pytestmark = pytest.mark.usefixtures("one_torch_thread")

SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
NAN = float("nan")
V, D = 64, 16


@pytest.fixture(scope="module")
def model64():
    return tiny_causal_lm("qwen2", vocab_size=V, hidden_size=D, num_layers=1, dtype=torch.float64, seed=5)


@pytest.fixture(scope="module")
def peft_model():
    from peft import LoraConfig, get_peft_model
    base = tiny_causal_lm("llama", vocab_size=V, hidden_size=D, num_layers=1, seed=6)
    pm = get_peft_model(base, LoraConfig(r=1, lora_alpha=8, lora_dropout=0.0, target_modules=["lm_head"])).eval()
    head = pm.get_base_model().lm_head
    with torch.no_grad():  # a nonzero B, as after some training
        head.lora_B["default"].weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    return pm


def _params(model) -> Dict[str, torch.Tensor]:
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same_params(model, snap) -> bool:
    sd = model.state_dict()
    return sd.keys() == snap.keys() and all(torch.equal(sd[k], snap[k]) for k in snap)


def _hooks(model) -> int:
    return sum(len(m._forward_hooks) + len(m._forward_pre_hooks) for m in model.modules())


def _session_state(s) -> Dict[str, Any]:
    return dict(num=s.num_updates, active=s.adapter.active, a=s.adapter.a.clone(), b=s.adapter.b.clone(),
                delta=s.adapter.delta.clone())


def _same_session(s, snap) -> bool:
    now = _session_state(s)
    return (now["num"] == snap["num"] and now["active"] == snap["active"]
            and all(torch.equal(now[k], snap[k]) for k in ("a", "b", "delta")))


def _ids(seed: int, T: int) -> torch.Tensor:
    return torch.randint(3, V, (1, T), generator=torch.Generator().manual_seed(seed))


# -- valid exchanges ----------------------------------------------------------------------------
@settings(max_examples=25, **SETTINGS)
@given(mode=st.sampled_from(["lora", "hidden"]), seed=st.integers(0, 10 ** 6), T=st.integers(3, 10),
       rewards=st.lists(st.floats(-2, 2), min_size=1, max_size=3), damping=st.floats(1e-3, 1.0),
       use_hidden=st.booleans())
def test_random_valid_updates_match_reference(model64, mode, seed, T, rewards, damping, use_hidden):
    s = rosa_ext.attach(model64, mode=mode, damping=damping, seed=seed)
    try:
        for i, r in enumerate(rewards):
            ids = _ids(seed + i, T)
            start = 1 + (seed + i) % (T - 1)
            with torch.no_grad():
                h = model64.model(ids).last_hidden_state[0, start - 1:-1]
            if mode == "hidden":  # the reference sees the shifted inputs and moves the shift
                ref = rosa_update_reference(h + s.delta, model64.lm_head.weight, ids[0, start:], r, mode="hidden",
                                            damping=damping)
                want = s.delta + ref.update
            else:
                ref = rosa_update_reference(h, model64.lm_head.weight, ids[0, start:], r, mode="lora",
                                            lora_a=s.a, lora_b=s.b, lora_scale=s.lora_scale, damping=damping)
                want = torch.cat([s.a, s.b]) + ref.update
            if use_hidden:
                step = s.update_from_hidden(h, ids[0, start:], r)
            else:
                step = s.update(ids, r, response_start=start)
            torch.testing.assert_close(step.update, ref.update, rtol=0, atol=1e-8 * max(1.0, ref.update.abs().max()))
            got = s.delta if mode == "hidden" else torch.cat([s.a, s.b])
            torch.testing.assert_close(got, want, rtol=0, atol=1e-8 * max(1.0, want.abs().max()))
        assert s.num_updates == len(rewards)
        with torch.no_grad():
            ids = _ids(seed, T)
            hh = model64.model(ids).last_hidden_state[0]
            W = model64.lm_head.weight
            want = ((hh + s.delta) @ W.T if mode == "hidden"
                    else hh @ W.T + s.lora_scale * (hh @ s.a).unsqueeze(-1) * s.b)
            torch.testing.assert_close(model64(ids).logits[0], want, rtol=1e-10, atol=1e-10)
    finally:
        s.detach()


# -- attach -------------------------------------------------------------------------------------
ATTACH_BAD = [
    ("mode", "full"), ("mode", None), ("beta", -1), ("beta", 0), ("beta", "1"), ("beta", NAN),
    ("damping", 0), ("damping", -0.1), ("damping", None), ("damping", math.inf), ("damping", "0.1"),
    ("max_iter", -1), ("max_iter", 2.5), ("max_iter", None), ("max_iter", "8"),
    ("tol", -1e-3), ("tol", None), ("tol", NAN), ("solver", "newton"), ("solver", None), ("backend", "cuda"),
    ("backend", 1), ("lora_scale", "8"), ("lora_scale", None), ("lora_scale", "abc"), ("lora_scale", NAN),
    ("lora_scale", True), ("seed", "x"), ("seed", -1), ("seed", 2.5), ("seed", 2 ** 64), ("seed", None),
    ("seed", True), ("model", "not a model"), ("model", torch.nn.Linear(3, 3)), ("warmup", "yes"), ("warmup", 1),
    ("warmup", None),
]


@settings(max_examples=80, **SETTINGS)
@given(case=st.sampled_from(ATTACH_BAD), mode=st.sampled_from(["lora", "hidden"]))
def test_attach_refuses_bad_options_before_installing_anything(model64, case, mode):
    name, value = case
    kw = dict(mode=mode)
    kw[name] = value
    target = kw.pop("model", model64)
    snap, hooks = _params(model64), _hooks(model64)
    with pytest.raises(RosaError) as info:
        rosa_ext.attach(target, **kw)
    assert info.value.argument == name, str(info.value)
    assert _hooks(model64) == hooks and not hasattr(model64, "_rosa_session")
    assert _same_params(model64, snap)


def test_attach_lora_scale_zero_and_triton_without_cuda(model64, monkeypatch):
    with pytest.raises(rosa_ext.RosaInputError) as info:
        rosa_ext.attach(model64, mode="lora", lora_scale=0.0)
    assert info.value.argument == "lora_scale"
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    with pytest.raises(rosa_ext.RosaInputError) as info:
        rosa_ext.attach(model64, mode="lora", backend="triton")
    assert info.value.argument == "backend" and _hooks(model64) == 0


def test_values_beyond_float32_are_refused_up_front_on_a_float32_model():
    model = tiny_causal_lm("qwen2", vocab_size=V, hidden_size=D, num_layers=1)
    for kw in (dict(damping=1e300), dict(lora_scale=-1e39)):
        with pytest.raises(rosa_ext.RosaInputError, match="overflows"):
            rosa_ext.attach(model, mode="lora", **kw)
    s = rosa_ext.attach(model, mode="hidden", damping=1e30)
    try:
        with pytest.raises(rosa_ext.RosaInputError, match="overflows") as info:
            s.update(_ids(0, 6), 1e300, response_start=2, non_blocking=True)  # not in the background
        assert info.value.argument == "reward"
        h = torch.full((3, D), 1e300, dtype=torch.float64)
        with pytest.raises(rosa_ext.RosaNonFiniteError) as info:
            s.update_from_hidden(h, torch.zeros(3, dtype=torch.long), 1.0, non_blocking=True)
        assert info.value.argument == "hidden" and s.num_updates == 0
        s.update(_ids(0, 6), -1.0, response_start=2)  # a damping of 1e30 is valid: a tiny step
        assert s.num_updates == 1 and bool(torch.isfinite(s.delta).all())
    finally:
        s.detach()


def test_second_attach_and_detached_use_are_state_errors(model64):
    s = rosa_ext.attach(model64, mode="hidden")
    try:
        with pytest.raises(rosa_ext.RosaStateError):
            rosa_ext.attach(model64, mode="lora")
    finally:
        s.detach()
    with pytest.raises(rosa_ext.RosaStateError, match="detached"):
        s.update(_ids(0, 6), 1.0, response_start=3)


# -- update / update_from_hidden ------------------------------------------------------------------
def _update_bad(T: int):
    ids = _ids(1, T)
    return [
        ("input_ids", ids.double()), ("input_ids", ids.repeat(2, 1)), ("input_ids", ids[:, :1]),
        ("input_ids", torch.full_like(ids, V)), ("input_ids", torch.full_like(ids, -1)), ("input_ids", "ids"),
        ("input_ids", ids.reshape(1, 1, -1)),
        ("reward", NAN), ("reward", "good"), ("reward", None), ("reward", True), ("reward", 1 + 1j),
        ("reward", 10 ** 400), ("reward", torch.tensor([1.0, 2.0])), ("reward", torch.tensor(True)),
        ("reward", -math.inf),
        ("reward", [1.0]),
        ("response_start", 0), ("response_start", T), ("response_start", "abc"), ("response_start", 2.5),
        ("response_start", True),
        ("response_mask", torch.ones(T + 1, dtype=torch.bool)), ("response_mask", torch.ones(T)),
        ("response_mask", torch.zeros(T, dtype=torch.bool)), ("response_mask", torch.ones(T, dtype=torch.bool)),
        ("response_mask", "mask"),
        ("attention_mask", torch.ones(T + 2, dtype=torch.long)), ("attention_mask", "am"),
        ("non_blocking", "yes"), ("non_blocking", None),
    ]


@settings(max_examples=80, **SETTINGS)
@given(mode=st.sampled_from(["lora", "hidden"]), pick=st.integers(0, 10 ** 6), T=st.integers(4, 9),
       warm=st.booleans())
def test_update_refuses_bad_arguments_and_changes_nothing(model64, mode, pick, T, warm):
    s = rosa_ext.attach(model64, mode=mode)
    try:
        if warm:
            s.update(_ids(7, T), -1.0, response_start=2)
        bad = _update_bad(T)
        name, value = bad[pick % len(bad)]
        kw: Dict[str, Any] = dict(input_ids=_ids(1, T), reward=-1.0)
        if name != "response_mask":
            kw["response_start"] = 2
        kw[name] = value
        before, logits = _session_state(s), model64(_ids(1, T)).logits
        with pytest.raises(RosaError) as info:
            s.update(**kw)
        assert info.value.argument in (name, "response_start"), str(info.value)
        assert _same_session(s, before) and torch.equal(model64(_ids(1, T)).logits, logits)
    finally:
        s.detach()


def _from_hidden_bad(N: int):
    h = torch.randn(N, D, dtype=torch.float64, generator=torch.Generator().manual_seed(N))
    y = torch.randint(0, V, (N,), generator=torch.Generator().manual_seed(N))
    nan = h.clone()
    nan[0, 0] = NAN
    return h, y, [
        ("hidden", h.long()), ("hidden", h[:, :-1]), ("hidden", h[:0]), ("hidden", nan), ("hidden", "h"),
        ("hidden", h.to(torch.complex128)), ("hidden", h.unsqueeze(0)),
        ("targets", y.double()), ("targets", y[:-1]), ("targets", torch.full_like(y, V)),
        ("targets", torch.full_like(y, -3)), ("targets", "y"),
        ("reward", NAN), ("reward", "x"), ("reward", 1 + 0j), ("reward", torch.tensor(False)),
        ("includes_shift", "no"), ("non_blocking", 1),
    ]


@settings(max_examples=50, **SETTINGS)
@given(mode=st.sampled_from(["lora", "hidden"]), pick=st.integers(0, 10 ** 6), N=st.integers(2, 6),
       non_blocking=st.booleans())
def test_update_from_hidden_refuses_bad_arguments_up_front(model64, mode, pick, N, non_blocking):
    s = rosa_ext.attach(model64, mode=mode)
    try:
        h, y, bad = _from_hidden_bad(N)
        name, value = bad[pick % len(bad)]
        kw: Dict[str, Any] = dict(hidden=h, targets=y, reward=1.0, non_blocking=non_blocking)
        kw[name] = value
        before = _session_state(s)
        snap = {k: v.clone() for k, v in kw.items() if isinstance(v, torch.Tensor)}
        with pytest.raises(RosaError) as info:  # raised by the call itself, even with non_blocking
            s.update_from_hidden(**kw)
        assert info.value.argument == name, str(info.value)
        assert _same_session(s, before)
        for k, v in snap.items():
            torch.testing.assert_close(kw[k], v, rtol=0, atol=0, equal_nan=True)
        s.wait()
    finally:
        s.detach()


def test_update_from_hidden_with_requires_grad_input_gives_no_graph(model64):
    s = rosa_ext.attach(model64, mode="hidden")
    try:
        h, y, _ = _from_hidden_bad(5)
        step = s.update_from_hidden(h.clone().requires_grad_(True), y, 1.0)
        assert not step.update.requires_grad and not s.delta.requires_grad
    finally:
        s.detach()


# -- load_state_dict --------------------------------------------------------------------------------
def _state_bad(sd: Dict[str, Any]):
    keys = ["delta"] if "delta" in sd else ["a", "b"]
    out = [
        ("state['num_updates']", dict(sd, num_updates="abc")), ("state['num_updates']", dict(sd, num_updates=None)),
        ("state['num_updates']", dict(sd, num_updates=-1)), ("state['num_updates']", dict(sd, num_updates=2.5)),
        ("state['num_updates']", dict(sd, num_updates=True)),
        ("state['version']", dict(sd, version=2)), ("state['version']", dict(sd, version=True)),
        ("state['version']", {k: v for k, v in sd.items() if k != "version"}),
        ("state['mode']", dict(sd, mode="lora" if "delta" in sd else "hidden")),
        ("state['vocab_size']", dict(sd, vocab_size=V + 1)), ("state['hidden_size']", dict(sd, hidden_size="16")),
        ("state['lora_scale']", dict(sd, lora_scale=sd["lora_scale"] / 2)),
        ("state['lora_scale']", dict(sd, lora_scale="8")),
        ("state['extra']", dict(sd, extra=1)), ("state", "not a state"), ("state", None),
    ]
    for k in keys:
        t = sd[k]
        nan = t.clone()
        nan[-1] = NAN
        out += [(f"state[{k!r}]", dict(sd, **{k: t[:-1]})), (f"state[{k!r}]", dict(sd, **{k: nan})),
                (f"state[{k!r}]", dict(sd, **{k: t.long()})), (f"state[{k!r}]", dict(sd, **{k: t.tolist()})),
                (f"state[{k!r}]", dict(sd, **{k: t.to(torch.complex64)})),
                (f"state[{k!r}]", {kk: v for kk, v in sd.items() if kk != k})]
    return out


def _check_load_refused(s, model, sd, pick):
    bad = _state_bad(sd)
    name, state = bad[pick % len(bad)]
    before, params, hooks = _session_state(s), _params(model), _hooks(model)
    with pytest.raises(RosaError) as info:
        s.load_state_dict(state)
    assert info.value.argument == name, (name, str(info.value))
    assert _same_session(s, before) and _same_params(model, params) and _hooks(model) == hooks


@settings(max_examples=80, **SETTINGS)
@given(mode=st.sampled_from(["lora", "hidden"]), pick=st.integers(0, 10 ** 6), updates=st.integers(0, 2))
def test_load_state_dict_is_atomic(model64, mode, pick, updates):
    s = rosa_ext.attach(model64, mode=mode)
    try:
        for i in range(updates):
            s.update(_ids(i, 8), -1.0, response_start=3)
        sd = s.state_dict()
        s.update(_ids(9, 8), 1.0, response_start=4)  # the session now differs from sd
        _check_load_refused(s, model64, sd, pick)
        s.load_state_dict(sd)  # the valid state still loads
        assert s.num_updates == updates
    finally:
        s.detach()


@settings(max_examples=20, **SETTINGS)
@given(mode=st.sampled_from(["lora", "hidden"]), pick=st.integers(0, 10 ** 6))
def test_load_state_dict_is_atomic_on_peft(peft_model, mode, pick):
    head = peft_model.get_base_model().lm_head
    A0, B0 = head.lora_A["default"].weight.clone(), head.lora_B["default"].weight.clone()
    s = rosa_ext.attach(peft_model, mode=mode)
    try:
        ids = torch.randint(3, V, (1, 8), generator=torch.Generator().manual_seed(pick))
        s.update(ids, -1.0, response_start=3)
        sd = s.state_dict()
        s.update(ids, -1.0, response_start=3)
        _check_load_refused(s, peft_model, sd, pick)
    finally:
        s.detach()
    assert torch.equal(head.lora_A["default"].weight, A0) and torch.equal(head.lora_B["default"].weight, B0)


def test_load_state_dict_num_updates_zero_and_scale_mismatch(model64):
    s = rosa_ext.attach(model64, mode="hidden", lora_scale=8.0)
    try:
        s.update(_ids(0, 8), -1.0, response_start=3)
        sd = s.state_dict()
        with pytest.raises(rosa_ext.RosaInputError, match="num_updates` is 0"):
            s.load_state_dict(dict(sd, num_updates=0))
        s.reset()
        s.load_state_dict(s.state_dict())  # a reset state (zero delta, 0 updates) loads
    finally:
        s.detach()
    s2 = rosa_ext.attach(model64, mode="hidden", lora_scale=4.0)
    try:
        with pytest.raises(rosa_ext.RosaInputError, match="lora_scale") as info:
            s2.load_state_dict(sd)
        assert info.value.argument == "state['lora_scale']"
    finally:
        s2.detach()


# -- reset after a failed background update -----------------------------------------------------------
@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_reset_after_failed_background_update_resets_then_raises(model64, monkeypatch, mode):
    ids = _ids(3, 10)
    base = model64(ids).logits
    s = rosa_ext.attach(model64, mode=mode)
    try:
        s.update(ids, -1.0, response_start=4)
        assert not torch.equal(model64(ids).logits, base)

        def boom(*a, **k):
            raise FloatingPointError("solver blew up")

        monkeypatch.setattr(session_mod, "rosa_update", boom)
        s.update(ids, -1.0, response_start=4, non_blocking=True)
        with pytest.raises(FloatingPointError, match="blew up"):
            s.reset()
        monkeypatch.undo()
        assert s.num_updates == 0 and not s.adapter.active
        assert torch.equal(model64(ids).logits, base), "reset must reset even when it re-raises"
        s.reset()  # the error surfaced once
    finally:
        s.detach()
