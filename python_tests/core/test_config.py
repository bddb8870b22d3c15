"""RosaConfig: the options of an update in one object, validated in one place; every keyword of
``rosa_update`` that worked before it keeps working (as an override of the config)."""
import dataclasses
import math

import pytest
import torch
from _helpers import make_inputs

import rosa_ext
from rosa_ext import RosaConfig, rosa_update
from rosa_ext.common import defaults
from rosa_ext.integrations.models import tiny_causal_lm
from rosa_ext.integrations.users import RosaUsers

#: Every keyword argument of rosa_update before RosaConfig (and a valid value that is not the default).
OLD_KEYWORDS = dict(mode="lora", lora_scale=4.0, beta=0.5, damping=0.2, max_iter=40, tol=1e-9, solver="dual",
                    backend="torch", damping_mode="absolute", keep_budget_bytes=1 << 20, gram_budget_bytes=1 << 25,
                    lora_a=None, lora_b=None, bias=None, mask=None, cg_impl=None, process_group=None,
                    vocab_start=None, vocab_size=None)
#: The options among them (the others are data: tensors, the CG implementation, the head's layout).
OPTIONS = ("mode", "lora_scale", "beta", "damping", "max_iter", "tol", "solver", "backend", "damping_mode",
           "keep_budget_bytes", "gram_budget_bytes")

BAD = [("mode", "full"), ("mode", None), ("beta", 0), ("beta", -1.0), ("beta", "1"), ("damping", 0.0),
       ("damping", math.inf), ("damping_mode", "lm"), ("solver", "newton"), ("backend", "cuda"), ("max_iter", -1),
       ("max_iter", 2.5), ("tol", -1e-3), ("tol", math.nan), ("lora_scale", "8"), ("lora_scale", math.nan),
       ("lora_scale", 0.0), ("keep_budget_bytes", -1), ("gram_budget_bytes", "1GB")]


def _inputs():
    inp = make_inputs(mode="lora", T=7, V=41)
    inp.pop("bias")
    return inp


def test_every_old_keyword_still_works_and_equals_the_config():
    inp = _inputs()
    kw = dict(OLD_KEYWORDS, lora_a=inp["lora_a"], lora_b=inp["lora_b"])
    old = rosa_update(inp["hidden"], inp["weight"], inp["targets"], -1.0, **kw)
    cfg = RosaConfig(**{k: kw[k] for k in OPTIONS})
    data = {k: v for k, v in kw.items() if k not in OPTIONS}
    new = rosa_update(inp["hidden"], inp["weight"], inp["targets"], -1.0, config=cfg, **data)
    assert torch.equal(old.update, new.update) and old.solver == new.solver == "dual"
    assert set(OPTIONS) == {f.name for f in dataclasses.fields(RosaConfig)}


def test_overrides_win_over_the_config_which_is_not_modified():
    inp = _inputs()
    cfg = RosaConfig(mode="lora", damping=0.5, damping_mode="absolute")
    a = rosa_update(**inp, reward=-1.0, config=cfg, damping=0.1)
    b = rosa_update(**inp, reward=-1.0, mode="lora", damping=0.1, damping_mode="absolute")
    assert torch.equal(a.update, b.update) and cfg.damping == 0.5
    assert cfg.replace(damping=0.1) == RosaConfig(mode="lora", damping=0.1, damping_mode="absolute")
    with pytest.raises(dataclasses.FrozenInstanceError):
        cfg.damping = 1.0
    assert hash(cfg) == hash(RosaConfig(mode="lora", damping=0.5, damping_mode="absolute"))


def test_defaults_are_the_documented_ones():
    cfg = RosaConfig(mode="hidden")
    assert (cfg.beta, cfg.damping, cfg.damping_mode, cfg.max_iter, cfg.tol, cfg.lora_scale, cfg.solver,
            cfg.backend) == (defaults.BETA, defaults.DAMPING, defaults.DAMPING_MODE, defaults.MAX_ITER, defaults.TOL,
                             defaults.LORA_SCALE, defaults.SOLVER, defaults.BACKEND)


@pytest.mark.parametrize("name,value", BAD)
def test_each_option_is_checked_in_one_place_and_named(name, value):
    inp = _inputs()
    base = dict(mode="lora")
    with pytest.raises(rosa_ext.RosaError) as ei:
        RosaConfig(**dict(base, **{name: value}))
    assert ei.value.argument == name
    with pytest.raises(rosa_ext.RosaError) as ei:
        rosa_update(**inp, reward=-1.0, **dict(base, **{name: value}))
    assert ei.value.argument == name and str(ei.value).startswith("rosa_update:")


def test_unknown_option_and_missing_mode():
    inp = _inputs()
    with pytest.raises(rosa_ext.RosaTypeError, match="unexpected keyword argument 'dampin'") as ei:
        rosa_update(**inp, reward=-1.0, mode="lora", dampin=0.1)
    assert ei.value.argument == "dampin"
    with pytest.raises(rosa_ext.RosaInputError, match="`mode` is required") as ei:
        rosa_update(**inp, reward=-1.0)
    assert ei.value.argument == "mode"
    with pytest.raises(rosa_ext.RosaTypeError) as ei:
        rosa_update(**inp, reward=-1.0, config={"mode": "lora"})
    assert ei.value.argument == "config"
    with pytest.raises(rosa_ext.RosaTypeError, match="unexpected keyword argument 'x'"):
        RosaConfig(mode="lora").replace(x=1)


def test_sessions_and_users_take_a_config():
    cfg = RosaConfig(mode="hidden", damping=0.2, damping_mode="absolute")
    model = tiny_causal_lm("qwen2")
    s = rosa_ext.attach(model, config=cfg, warmup=False)
    try:
        assert s.mode == "hidden" and s.config == cfg
    finally:
        s.detach()
    s = rosa_ext.attach(model, "lora", config=cfg, damping=0.3)  # mode and options override the config
    try:
        assert s.mode == "lora" and s.config == cfg.replace(mode="lora", damping=0.3)
    finally:
        s.detach()
    users = RosaUsers(model, config=cfg)
    try:
        assert users.mode == "hidden" and users.config == cfg
    finally:
        users.detach()
    assert rosa_ext.attach(model).config == RosaConfig(mode="lora")  # no mode, no config: "lora"
    model._rosa_session.detach()
    for bad in (dict(mode=None), dict(config="lora"), dict(dampng=0.1)):
        with pytest.raises(rosa_ext.RosaError):
            rosa_ext.attach(model, **bad)
        assert getattr(model, "_rosa_session", None) is None
