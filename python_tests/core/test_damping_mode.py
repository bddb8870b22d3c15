"""damping_mode="relative": lambda = damping * mean_t ||J_t||^2 per conversation (MATH.md section 6)."""
import pytest
import torch
from _helpers import LinearizedHead, make_inputs
from test_batched import _batch, _single

from rosa_ext import rosa_update
from rosa_ext.backends.torch_engine import TorchEngine
from rosa_ext.common import defaults
from rosa_ext.common.jacobian import Linearization
from rosa_ext.core.op import pack
from rosa_ext.plans import cg_lora, dense, dual_hidden, dual_lora
from rosa_ext.reference import jacobian_reference, rosa_update_reference

EXACT = dict(max_iter=500, tol=1e-13)


def _tol(ref):
    return 1e-8 * max(1.0, ref.update.abs().max().item())


@pytest.mark.parametrize("mode", ["lora", "hidden"])
@pytest.mark.parametrize("solver", ["dual", "cg"])
@pytest.mark.parametrize("damping_mode", ["absolute", "relative"])
@pytest.mark.parametrize("case", [dict(), dict(logit_scale=30.0), dict(T=1), dict(lora_b_zero=True)])
def test_matches_reference_float64(mode, solver, damping_mode, case):
    inp = make_inputs(mode=mode, **case)
    ref = rosa_update_reference(**inp, reward=-1.0, mode=mode, damping=0.3, damping_mode=damping_mode)
    got = rosa_update(**inp, reward=-1.0, mode=mode, damping=0.3, damping_mode=damping_mode, solver=solver,
                      **EXACT)
    assert (got.update - ref.update).abs().max().item() < _tol(ref)


@pytest.mark.parametrize("mode", ["lora", "hidden"])
@pytest.mark.parametrize("solver", ["dual", "cg"])
def test_batched_matches_reference(mode, solver):
    inp, mask, reward = _batch(mode)
    ref = rosa_update_reference(**inp, reward=reward, mode=mode, mask=mask, damping=0.1, damping_mode="relative")
    got = rosa_update(**inp, reward=reward, mode=mode, mask=mask, damping=0.1, damping_mode="relative",
                      solver=solver, **EXACT)
    assert (got.update - ref.update).abs().max().item() < _tol(ref)
    for b in range(3):  # each conversation its own ridge: the batch equals separate calls
        one = rosa_update(**_single(inp, mask, b), reward=float(reward[b]), mode=mode, damping=0.1,
                          damping_mode="relative", solver=solver, **EXACT)
        assert (got.update[b] - one.update).abs().max().item() < _tol(ref)


@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_gram_diag_and_ridge(mode):
    inp = make_inputs(mode=mode, T=5)
    prob, cfg = pack(inp["hidden"], inp["weight"], inp["targets"], -1.0, mode=mode, lora_a=inp.get("lora_a"),
                     lora_b=inp.get("lora_b"), lora_scale=8.0, bias=inp["bias"], beta=1.0, damping=0.5,
                     max_iter=10, tol=1e-6, solver="cg", backend="torch", mask=None, damping_mode="relative")
    be = TorchEngine(chunk=8)
    if mode == "lora":  # matrix-free CG's diagonal (one pass for r̂ . r̂)
        lin = LinearizedHead(prob, be, cfg).lin
        diag = cg_lora.gram_diag(lin, be)
    else:  # the hidden plans' explicit rows
        lin, rows = dual_hidden.pass_and_rows(prob, cfg, be)
        diag = (rows * rows).sum(1)
    diag = diag * torch.exp(2 * lin.shift[prob.seg])  # the plans' rows are scaled by e^-shift
    J = jacobian_reference(prob, mode=mode)
    torch.testing.assert_close(diag, (J * J).sum(1), rtol=1e-10, atol=1e-14)
    torch.testing.assert_close(dense.conversation_ridges(prob, cfg, diag), 0.5 * (J * J).sum(1).mean().reshape(1),
                               rtol=1e-10, atol=0)


@pytest.mark.parametrize("mode", ["lora", "hidden"])
@pytest.mark.parametrize("logit_scale", [1.0, 10.0])
def test_relative_is_scale_free(mode, logit_scale):
    """One token: the linearised step reaches J delta = g / (1 + damping) of its target with the
    relative ridge, whatever the scale of J; with the absolute ridge a confident token (tiny J)
    reaches only a small share."""
    inp = make_inputs(mode=mode, T=1, logit_scale=logit_scale, seed=3)
    z = inp["hidden"] @ inp["weight"].T
    inp["targets"] = z.argmax(-1)  # the most likely token; p ~ 0.99 at logit scale 10
    shares = {}
    for dm in ("relative", "absolute"):
        prob, cfg = pack(inp["hidden"], inp["weight"], inp["targets"], -1.0, mode=mode,
                         lora_a=inp.get("lora_a"), lora_b=inp.get("lora_b"), lora_scale=8.0, bias=inp["bias"],
                         beta=1.0, damping=0.1, max_iter=10, tol=1e-6, solver="dual", backend="torch",
                         mask=None, damping_mode=dm)
        op = LinearizedHead(prob, TorchEngine(), cfg)
        step = rosa_update(**inp, reward=-1.0, mode=mode, damping=0.1, damping_mode=dm, solver="dual")
        shares[dm] = float(op.jvp(step.update.unsqueeze(0))[0] / op.g[0])
    assert abs(shares["relative"] - 1 / 1.1) < 1e-9
    if logit_scale > 1:
        assert shares["absolute"] < 0.1


def test_validation():
    inp = make_inputs(mode="hidden")
    with pytest.raises(ValueError, match="damping_mode"):
        rosa_update(**inp, reward=-1.0, mode="hidden", damping_mode="lm")


def test_defaults_are_relative_0p3_bitwise():
    """The default ridge is the relative one at 0.3 (README, "Defaults"), and it differs from the
    absolute ridge of the same value."""
    assert (defaults.DAMPING_MODE, defaults.DAMPING) == ("relative", 0.3)
    inp = make_inputs(mode="lora", dtype=torch.float32, T=10, V=200)
    for solver in ("dual", "cg"):
        a = rosa_update(**inp, reward=-1.0, mode="lora", solver=solver)
        b = rosa_update(**inp, reward=-1.0, mode="lora", solver=solver, damping=0.3, damping_mode="relative")
        c = rosa_update(**inp, reward=-1.0, mode="lora", solver=solver, damping=0.3, damping_mode="absolute")
        assert torch.equal(a.update, b.update)
        assert not torch.allclose(a.update, c.update)


def test_lora_gram_fp32_confident_tokens():
    """The LoRA Gram in fp32 for confident tokens (1 - p down to ~1e-4), as the dual plan assembles it
    and as matrix-free CG reads its diagonal: the expanded form 1 - pi_u[y_t] - pi_t[y_u] + pi_t.pi_u
    cancelled to noise (errors of 30-100% on the diagonal)."""
    inp = make_inputs(mode="lora", T=6, V=2000, d=64, logit_scale=25.0, seed=1, lora_b_zero=True)
    inp["targets"] = (inp["hidden"] @ inp["weight"].T).argmax(-1)
    grams = {}
    for dt in (torch.float64, torch.float32):
        prob, cfg = pack(inp["hidden"].to(dt), inp["weight"].to(dt), inp["targets"], -1.0, mode="lora",
                         lora_a=inp["lora_a"].to(dt), lora_b=inp["lora_b"].to(dt), lora_scale=8.0, bias=None,
                         beta=1.0, damping=0.1, max_iter=10, tol=1e-6, solver="dual", backend="torch",
                         mask=None, damping_mode="relative")
        be = TorchEngine()
        gp = be.gram_pass(prob, keep=False)  # the dual's Gram, assembled as the plan does
        dual_lora.center_gram(prob, gp)
        lin = Linearization.of_pass(prob, gp, "lora", be, cfg.beta)
        ca, cb = dual_lora.lora_factors(lin, gp)
        Ja = ca.unsqueeze(1) * lin.h
        G = gp.gram[0] * cb.unsqueeze(1) * cb.unsqueeze(0) + Ja @ Ja.T
        diag = cg_lora.gram_diag(LinearizedHead(prob, be, cfg).lin, be)  # matrix-free CG's diagonal
        scale = torch.exp(lin.shift[0]).double()  # both in the linearisation's scaled units
        grams[dt] = (G.double() * scale ** 2, diag.double() * scale ** 2, lin.p.double())
    ref, ref_diag, p = grams[torch.float64]
    got, got_diag, _ = grams[torch.float32]
    assert float((1 - p).min()) < 1e-3  # the regime that matters
    torch.testing.assert_close(ref.diagonal(), ref_diag, rtol=1e-9, atol=0)
    ok = (1 - p) > 1e-4
    rel = ((got.diagonal() - ref.diagonal()) / ref.diagonal())[ok].abs().max()
    assert rel < 0.05
    torch.testing.assert_close(got_diag, got.diagonal(), rtol=1e-4, atol=0)
