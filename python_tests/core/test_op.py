"""rosa_update against the float64 reference (MATH.md section 5)."""
import pytest
import torch
from _helpers import LinearizedHead, make_inputs, mean_logp_after, num_params

import rosa_ext
from rosa_ext import rosa_update
from rosa_ext.backends.torch_engine import TorchEngine
from rosa_ext.common import defaults
from rosa_ext.core.op import pack
from rosa_ext.reference import jvp_reference, rosa_update_reference, vjp_reference

EXACT = dict(max_iter=500, tol=1e-13)


def _problem(inp, mode, **kw):
    args = dict(mode=mode, lora_a=inp.get("lora_a"), lora_b=inp.get("lora_b"), lora_scale=8.0,
                bias=inp["bias"], beta=1.0, damping=1e-2, max_iter=10, tol=1e-6, solver="cg",
                backend="torch", mask=None)
    args.update(kw)
    return pack(inp["hidden"], inp["weight"], inp["targets"], -1.0, **args)


@pytest.mark.parametrize("mode", ["lora", "hidden"])
@pytest.mark.parametrize("solver", ["dual", "cg", "auto"])
@pytest.mark.parametrize("reward", [-1.0, 1.0, 0.37])
def test_matches_reference_float64(mode, solver, reward):
    inp = make_inputs(mode=mode)
    ref = rosa_update_reference(**inp, reward=reward, mode=mode, damping=1e-3)
    got = rosa_update(**inp, reward=reward, mode=mode, damping=1e-3, solver=solver, **EXACT)
    assert got.update.dtype == torch.float64
    assert got.update.shape == ref.update.shape
    torch.testing.assert_close(got.update, ref.update, rtol=0, atol=1e-8 * max(1.0, ref.update.abs().max().item()))
    assert got.residual < 1e-8


@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_float32_close_to_reference(mode):
    inp = make_inputs(mode=mode, dtype=torch.float32)
    ref = rosa_update_reference(**inp, reward=-1.0, mode=mode)
    for solver in ("dual", "cg"):
        got = rosa_update(**inp, reward=-1.0, mode=mode, solver=solver, **EXACT)
        assert got.update.dtype == torch.float32
        scale = ref.update.abs().max().item()
        assert (got.update.double() - ref.update).abs().max().item() < 2e-4 * scale


@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_bf16_model(mode):
    inp = make_inputs(mode=mode, dtype=torch.bfloat16)
    ref = rosa_update_reference(**inp, reward=1.0, mode=mode)
    got = rosa_update(**inp, reward=1.0, mode=mode)
    assert got.update.dtype == torch.float32
    rel = (got.update.double() - ref.update).norm() / ref.update.norm()
    assert rel < 1e-3


ADVERSARIAL = {
    "peaked": dict(logit_scale=40.0),
    "flat": dict(logit_scale=1e-3),
    "T1": dict(T=1),
    "lora_b_zero": dict(lora_b_zero=True),
    "no_bias": dict(bias=False),
    "longer": dict(T=40, V=101),
}


@pytest.mark.parametrize("case", sorted(ADVERSARIAL))
@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_adversarial_inputs(case, mode):
    inp = make_inputs(mode=mode, **ADVERSARIAL[case])
    ref = rosa_update_reference(**inp, reward=-1.0, mode=mode, damping=1e-3)
    for solver in ("dual", "cg"):
        got = rosa_update(**inp, reward=-1.0, mode=mode, damping=1e-3, solver=solver, **EXACT)
        tol = 1e-8 * max(1.0, ref.update.abs().max().item())
        assert (got.update - ref.update).abs().max().item() < tol, solver


@pytest.mark.parametrize("mode", ["lora", "hidden"])
@pytest.mark.parametrize("damping_mode,damping", [("absolute", 1e-3), ("relative", defaults.DAMPING)])
def test_p_near_zero_and_one(mode, damping_mode, damping):
    inp = make_inputs(mode=mode, T=4, logit_scale=30.0)
    H, W = inp["hidden"], inp["weight"]
    z = H @ W.T
    # first two tokens: the argmax (p ~ 1); last two: the argmin (p ~ 0)
    inp["targets"] = torch.cat([z[:2].argmax(-1), z[2:].argmin(-1)])
    kw = dict(damping=damping, damping_mode=damping_mode)
    ref = rosa_update_reference(**inp, reward=1.0, mode=mode, **kw)
    p = ref.logp.exp()
    assert p[:2].min() > 0.99 and p[2:].max() < 1e-6
    got = rosa_update(**inp, reward=1.0, mode=mode, solver="dual", **kw)
    torch.testing.assert_close(got.update, ref.update, rtol=0, atol=1e-8 * max(1.0, ref.update.abs().max().item()))


@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_repeated_tokens(mode):
    inp = make_inputs(mode=mode, T=8)
    inp["targets"] = torch.tensor([3, 3, 3, 5, 5, 3, 7, 3])
    ref = rosa_update_reference(**inp, reward=-1.0, mode=mode)
    for solver in ("dual", "cg"):
        got = rosa_update(**inp, reward=-1.0, mode=mode, solver=solver, **EXACT)
        torch.testing.assert_close(got.update, ref.update, rtol=0, atol=1e-9)


@pytest.mark.parametrize("mode", ["lora", "hidden"])
@pytest.mark.parametrize("chunk", [1, 7, 36, 1000])
def test_chunking_is_exact(mode, chunk):
    """V = 37 is not a multiple of any of these chunk sizes (spec section 5)."""
    inp = make_inputs(mode=mode)
    prob, cfg = _problem(inp, mode)
    op_ref = LinearizedHead(prob, TorchEngine(chunk=10 ** 6), cfg)
    op = LinearizedHead(prob, TorchEngine(chunk=chunk), cfg)
    torch.testing.assert_close(op.stats.lse, op_ref.stats.lse, rtol=0, atol=1e-12)
    v = torch.randn(1, num_params(prob, mode), dtype=torch.float64)
    torch.testing.assert_close(op.jvp(v), op_ref.jvp(v), rtol=0, atol=1e-12)
    u = torch.randn(prob.num_tokens, dtype=torch.float64)
    torch.testing.assert_close(op.vjp(u), op_ref.vjp(u), rtol=0, atol=1e-12)


@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_jvp_vjp_match_torch_func(mode):
    inp = make_inputs(mode=mode, T=5)
    prob, cfg = _problem(inp, mode)
    op = LinearizedHead(prob, TorchEngine(chunk=8), cfg)
    v = torch.randn(num_params(prob, mode), dtype=torch.float64)
    u = torch.randn(prob.num_tokens, dtype=torch.float64)
    torch.testing.assert_close(op.jvp(v.unsqueeze(0)), jvp_reference(prob, v, mode=mode), rtol=1e-10, atol=1e-13)
    torch.testing.assert_close(op.vjp(u)[0], vjp_reference(prob, u, mode=mode), rtol=1e-10, atol=1e-13)


def test_hidden_mode_with_lora_term_in_logits():
    inp = make_inputs(mode="lora")
    ref = rosa_update_reference(**inp, reward=-1.0, mode="hidden")
    got = rosa_update(**inp, reward=-1.0, mode="hidden", solver="dual")
    torch.testing.assert_close(got.update, ref.update, rtol=0, atol=1e-10)
    got_cg = rosa_update(**inp, reward=-1.0, mode="hidden", solver="cg", **EXACT)
    torch.testing.assert_close(got_cg.update, ref.update, rtol=0, atol=1e-9)


@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_mask_equals_dropping_rows(mode):
    inp = make_inputs(mode=mode, T=9)
    mask = torch.tensor([0, 1, 1, 0, 1, 1, 1, 0, 1], dtype=torch.bool)
    got = rosa_update(**inp, reward=-1.0, mode=mode, mask=mask, solver="dual")
    kept = dict(inp, hidden=inp["hidden"][mask], targets=inp["targets"][mask])
    ref = rosa_update_reference(**kept, reward=-1.0, mode=mode)
    torch.testing.assert_close(got.update, ref.update, rtol=0, atol=1e-10)
    # garbage in masked-out rows (even out-of-range ids) is ignored
    bad = dict(inp)
    bad["targets"] = inp["targets"].clone()
    bad["targets"][~mask] = 10 ** 6
    got2 = rosa_update(**bad, reward=-1.0, mode=mode, mask=mask, solver="dual")
    assert torch.equal(got.update, got2.update)


@pytest.mark.parametrize("mode", ["lora", "hidden"])
@pytest.mark.parametrize("reward", [1.0, -1.0])
def test_sign_property(mode, reward):
    inp = make_inputs(mode=mode, T=12)
    before = mean_logp_after(inp, rosa_update(**inp, reward=0.0, mode=mode), mode)
    step = rosa_update(**inp, reward=reward, mode=mode)
    after = mean_logp_after(inp, step, mode)
    assert (after - before) * reward > 0


@pytest.mark.parametrize("mode", ["lora", "hidden"])
@pytest.mark.parametrize("solver", ["dual", "cg"])
def test_zero_reward_is_zero_update(mode, solver):
    inp = make_inputs(mode=mode)
    step = rosa_update(**inp, reward=0.0, mode=mode, solver=solver)
    assert torch.count_nonzero(step.update) == 0
    assert step.residual == 0.0


@pytest.mark.parametrize("mode", ["lora", "hidden"])
@pytest.mark.parametrize("solver", ["dual", "cg"])
def test_deterministic_bitwise(mode, solver):
    inp = make_inputs(mode=mode, T=20, V=300, dtype=torch.float32)
    a = rosa_update(**inp, reward=-1.0, mode=mode, solver=solver)
    b = rosa_update(**inp, reward=-1.0, mode=mode, solver=solver)
    assert torch.equal(a.update, b.update)


def test_inputs_not_modified():
    inp = make_inputs(mode="lora", dtype=torch.float32)
    snap = {k: v.clone() for k, v in inp.items() if isinstance(v, torch.Tensor)}
    rosa_update(**inp, reward=-1.0, mode="lora")
    for k, v in snap.items():
        assert torch.equal(inp[k], v), k


def test_step_views():
    inp = make_inputs(mode="lora")
    d, V = inp["weight"].shape[1], inp["weight"].shape[0]
    step = rosa_update(**inp, reward=-1.0, mode="lora")
    assert step.delta_a.shape == (d,) and step.delta_b.shape == (V,)
    assert step.delta_a.data_ptr() == step.update.data_ptr()
    assert step.solver in ("cg", "dual") and step.backend == "torch"
    hid = rosa_update(**make_inputs(mode="hidden"), reward=-1.0, mode="hidden")
    assert hid.delta.shape == (d,)
    with pytest.raises(AttributeError, match="mode='lora' only"):
        _ = hid.delta_a


def test_peft_shaped_lora_weights():
    inp = make_inputs(mode="lora")
    ref = rosa_update(**inp, reward=-1.0, mode="lora")
    peft_like = dict(inp, lora_a=inp["lora_a"].reshape(1, -1), lora_b=inp["lora_b"].reshape(-1, 1))
    got = rosa_update(**peft_like, reward=-1.0, mode="lora")
    assert torch.equal(ref.update, got.update)


def test_public_names():
    assert rosa_ext.rosa_update is rosa_update
    from rosa_ext import RosaStep, cg, reference  # noqa: F401
    assert callable(reference.rosa_update_reference)
    assert callable(cg.cg)


@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_cg_impl_argument(mode):
    """``cg_impl`` replaces the CG function of the CG solver (and is ignored by the dual)."""
    from rosa_ext.cg import cg_python
    calls = []

    def spy(*args, **kw):
        calls.append(kw)
        return cg_python(*args, **kw)

    inp = make_inputs(mode=mode)
    default = rosa_update(**inp, reward=-1.0, mode=mode, solver="cg", **EXACT)
    got = rosa_update(**inp, reward=-1.0, mode=mode, solver="cg", cg_impl=spy, **EXACT)
    assert calls == [dict(damping=0.0 if defaults.DAMPING_MODE == "relative" else defaults.DAMPING,
                          max_iter=EXACT["max_iter"], tol=EXACT["tol"])]
    torch.testing.assert_close(got.update, default.update)
    assert got.iterations == default.iterations
    rosa_update(**inp, reward=-1.0, mode=mode, solver="dual", cg_impl=spy)
    assert len(calls) == 1
