"""The torch engine's one-pass passes (hidden_pass, gram_pass + the plan's centring, off_target_vjp) against
dense float64 math.

Small heads, many chunks (a ragged last one), blocks of rows and of the block-triangle Gram smaller
than a conversation, lazy and eager rescaling (forced on every chunk), targets another rank owns.
"""
import pytest
import torch
from _helpers import make_inputs, shrink_onepass_tiles

from rosa_ext.backends import torch_engine
from rosa_ext.backends.torch_engine import TorchEngine
from rosa_ext.core.op import pack
from rosa_ext.plans import dual_lora

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _problem(B=2, T=9, d=10, V=301, mode="lora", bias=True, lora_term=True, dtype=torch.float64, mask=True, seed=0,
             logit_scale=2.0):
    inp = make_inputs(T=T, d=d, V=V, mode="lora", B=B, seed=seed, logit_scale=logit_scale, bias=bias, dtype=dtype)
    g = torch.Generator().manual_seed(seed + 17)
    a = torch.randn(B, d, dtype=torch.float64, generator=g) / d ** 0.5
    b = torch.randn(B, V, dtype=torch.float64, generator=g) * 0.3
    m = None
    if mask:
        m = torch.ones(B, T, dtype=torch.bool)
        m[0, :3] = False  # ragged: T_0 = T - 3
    lora = dict(lora_a=a.to(dtype), lora_b=b.to(dtype)) if (mode == "lora" or lora_term) else dict(lora_a=None,
                                                                                                   lora_b=None)
    return pack(inp["hidden"], inp["weight"], inp["targets"], torch.full((B,), -1.0), mode=mode,
                lora_scale=3.0, bias=inp["bias"], beta=1.0, damping=0.1, max_iter=10, tol=1e-6,
                solver="dual", backend="torch", mask=m, **lora)[0]


def _gram_pass(prob, keep=False, chunk=None):
    """The engine's gram pass, centred as the LoRA dual does."""
    gp = TorchEngine(chunk=chunk).gram_pass(prob, keep)
    dual_lora.center_gram(prob, gp)
    return gp


def _centered_vjp(prob, gp, w, chunk=None):
    """sum_t w_t (e_{y_t} - r̂_t) as the LoRA dual computes it: scatter(y, w) - engine.off_target_vjp."""
    engine = TorchEngine(chunk=chunk)
    out = engine.off_target_vjp(prob, gp, w).neg_()
    ok = (prob.targets >= 0) & (prob.targets < prob.vocab_size)
    out.index_put_((prob.seg[ok], prob.targets[ok]), w[ok], accumulate=True)
    return out


def _dense(prob):
    """Float64 truth: pi (N, V), r (off-target, normalised: r̂), p, lse, lse_off."""
    h = prob.hidden.double()
    W = prob.weight.double()
    z = h @ W.T
    if prob.bias is not None:
        z = z + prob.bias.double()
    ah = None
    if prob.lora_a is not None:
        ah = (h * prob.lora_a.double()[prob.seg]).sum(1)
        z = z + prob.lora_scale * ah.unsqueeze(1) * prob.lora_b.double()[prob.seg]
    pi = torch.softmax(z, 1)
    ar = torch.arange(prob.num_tokens)
    y = prob.targets
    ok = (y >= 0) & (y < z.shape[1])
    zo = z.clone()
    zo[ar[ok], y[ok]] = float("-inf")
    r = torch.softmax(zo, 1)  # r̂: the softmax of the other logits
    return dict(pi=pi, r=r, p=pi[ar, y.clamp(0, z.shape[1] - 1)], lse=torch.logsumexp(z, 1),
                lse_off=torch.logsumexp(zo, 1), ah=ah)


@pytest.fixture(params=["lazy", "eager"])
def rescale(request, monkeypatch):
    if request.param == "eager":  # the sync-free path other devices take
        monkeypatch.setattr(torch_engine, "lazy_rescaling", lambda device: False)
    return request.param


@pytest.fixture
def small_tiles(monkeypatch):
    shrink_onepass_tiles(monkeypatch, tile_elems=7 * 40, min_chunk=16, row_block=5, gram_block=4)


@pytest.mark.parametrize("lora_term", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_hidden_pass(small_tiles, rescale, lora_term, bias):
    prob = _problem(mode="hidden", lora_term=lora_term, bias=bias)
    t = _dense(prob)
    hp = TorchEngine().hidden_pass(prob)
    assert torch.allclose(hp.lse, t["lse"], atol=1e-12, rtol=0)
    assert torch.allclose(hp.lse_off, t["lse_off"], atol=1e-12, rtol=0)
    assert torch.allclose(hp.logp, torch.log(t["p"]), atol=1e-12, rtol=0)
    assert torch.allclose(hp.logq, torch.log1p(-t["p"]), atol=1e-12, rtol=0)
    assert torch.allclose(hp.rw, t["r"] @ prob.weight.double(), atol=1e-12, rtol=0)
    if lora_term:
        assert torch.allclose(hp.rb, (t["r"] * prob.lora_b[prob.seg]).sum(1), atol=1e-12, rtol=0)
        assert torch.allclose(hp.ah, t["ah"], atol=1e-12, rtol=0)
    else:
        assert hp.rb is None and hp.ah is None


@pytest.mark.parametrize("keep", [False, True])
@pytest.mark.parametrize("bias", [False, True])
def test_lora_gram_pass_and_vjp(small_tiles, rescale, keep, bias):
    prob = _problem(bias=bias, T=11)
    t = _dense(prob)
    gp = _gram_pass(prob, keep=keep)
    assert torch.allclose(gp.lse, t["lse"], atol=1e-12, rtol=0)
    assert torch.allclose(gp.logq, torch.log1p(-t["p"]), atol=1e-12, rtol=0)
    assert torch.allclose(gp.rb, (t["r"] * prob.lora_b[prob.seg]).sum(1), atol=1e-12, rtol=0)
    E = torch.zeros_like(t["pi"])
    E[torch.arange(prob.num_tokens), prob.targets] = 1
    C = E - t["r"]  # e_y - r̂ (e_y - pi = (1 - p)(e_y - r̂))
    off = prob.offsets
    for k in range(prob.num_conversations):
        Ck = C[off[k]:off[k + 1]]
        assert torch.allclose(gp.gram[k], Ck @ Ck.T, atol=1e-12, rtol=0), k
    assert (gp.kept is not None) == keep
    w = torch.randn(prob.num_tokens, dtype=torch.float64)
    got = _centered_vjp(prob, gp, w)
    want = torch.zeros(prob.num_conversations, prob.vocab_size, dtype=torch.float64).index_add_(
        0, prob.seg, w.unsqueeze(1) * C)
    assert torch.allclose(got, want, atol=1e-12, rtol=0)


def test_lora_gram_pass_raw(small_tiles, rescale):
    prob = _problem(T=8)
    t = _dense(prob)
    for keep in (False, True):
        gp = TorchEngine().gram_pass(prob, keep)  # the raw parts
        off = prob.offsets
        for k in range(prob.num_conversations):
            sl = slice(off[k], off[k + 1])
            r = t["r"][sl]
            assert torch.allclose(gp.gram[k], r @ r.T, atol=1e-12, rtol=0)
            assert torch.allclose(gp.cross[k], r[:, prob.targets[sl]], atol=1e-12, rtol=0)  # r_t[y_u]


def test_forced_rescale_every_chunk(small_tiles, monkeypatch):
    """TAU tiny: the lazy path redoes (nearly) every tile with the running max."""
    monkeypatch.setattr(torch_engine, "TAU", {torch.float32: 0.5, torch.float64: 0.5})
    prob = _problem(T=7)
    t = _dense(prob)
    hp = TorchEngine().hidden_pass(prob)
    assert torch.allclose(hp.rw, t["r"] @ prob.weight.double(), atol=1e-12, rtol=0)
    for keep in (False, True):
        gp = _gram_pass(prob, keep=keep)
        w = torch.randn(prob.num_tokens, dtype=torch.float64)
        got = _centered_vjp(prob, gp, w)
        E = torch.zeros_like(t["pi"])
        E[torch.arange(prob.num_tokens), prob.targets] = 1
        want = torch.zeros_like(got).index_add_(0, prob.seg, w.unsqueeze(1) * (E - t["r"]))
        assert torch.allclose(got, want, atol=1e-12, rtol=0)
        C = (E - t["r"])[prob.offsets[1]:]
        assert torch.allclose(gp.gram[1], C @ C.T, atol=1e-12, rtol=0)


def test_logits_far_above_the_first_chunk(small_tiles):
    """A later chunk's logits 60 above the first chunk's maximum (> TAU): rescale, no overflow."""
    prob = _problem(T=6, bias=True)
    prob.bias = prob.bias.clone()
    prob.bias[150:] += 60.0
    t = _dense(prob)
    hp = TorchEngine().hidden_pass(prob)
    assert torch.allclose(hp.lse, t["lse"], atol=1e-12, rtol=0)
    assert torch.allclose(hp.rw, t["r"] @ prob.weight.double(), atol=1e-12, rtol=0)
    gp = _gram_pass(prob, keep=True)
    assert all(bool(torch.isfinite(g).all()) for g in gp.gram)
    f32 = _problem(T=6, bias=True, dtype=torch.float32)
    f32.bias = prob.bias.float()
    hp32 = TorchEngine().hidden_pass(f32)
    assert torch.allclose(hp32.lse.double(), t["lse"], atol=1e-4, rtol=0)


def test_targets_owned_elsewhere_are_not_split(small_tiles):
    """Targets outside [0, V) (another rank's tokens): no entry split off, 1 - p = 1, nothing scattered."""
    prob = _problem(T=6)
    prob.targets = prob.targets.clone()
    prob.targets[::2] = -1
    t = _dense(_problem(T=6))
    out = prob.targets < 0
    hp = TorchEngine().hidden_pass(prob)
    assert torch.equal(hp.logq[out], torch.zeros_like(hp.logq[out]))  # nothing split off: 1 - p = 1
    assert torch.allclose(hp.rw[out], t["pi"][out] @ prob.weight.double(), atol=1e-12, rtol=0)
    gp = _gram_pass(prob, keep=False)
    w = torch.zeros(prob.num_tokens, dtype=torch.float64)
    w[out] = 1.0
    got = _centered_vjp(prob, gp, w)
    want = -torch.zeros_like(got).index_add_(0, prob.seg[out], t["pi"][out])
    assert torch.allclose(got, want, atol=1e-12, rtol=0)


@pytest.mark.parametrize("vec_max", [0, 512])
def test_same_token_pairs(monkeypatch, vec_max):
    monkeypatch.setattr(dual_lora, "SAME_TOKEN_VECTOR_MAX", vec_max)
    y = torch.tensor([3] * 25 + [1, 2, 4, 7, 7, 7, 7, 9, 9, 5])
    M = torch.zeros(y.numel(), y.numel(), dtype=torch.float64)
    dual_lora.same_token_pairs(M, y)
    assert torch.equal(M, (y.unsqueeze(0) == y.unsqueeze(1)).double())


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16, torch.float16])
def test_low_precision_models(dtype):
    """bf16/fp16 weights are widened per chunk; results in float32 close to float64 math on the same numbers."""
    prob = _problem(dtype=dtype, T=6)
    t = _dense(prob)
    hp = TorchEngine().hidden_pass(prob)
    assert hp.rw.dtype == torch.float32
    assert torch.allclose(hp.rw.double(), t["r"] @ prob.weight.double(), atol=1e-5, rtol=0)
    gp = _gram_pass(prob, keep=True)
    C = torch.eye(prob.vocab_size, dtype=torch.float64)[prob.targets] - t["r"]
    assert torch.allclose(gp.gram[1].double(), C[prob.offsets[1]:] @ C[prob.offsets[1]:].T, atol=1e-5, rtol=0)


def test_passes_take_an_explicit_chunk():
    prob = _problem(T=5)
    t = _dense(prob)
    hp = TorchEngine(chunk=7).hidden_pass(prob)
    assert torch.allclose(hp.rw, t["r"] @ prob.weight.double(), atol=1e-12, rtol=0)
    gp = _gram_pass(prob, keep=True, chunk=7)
    assert gp.kept.chunk == 7
    w = torch.randn(prob.num_tokens, dtype=torch.float64)
    assert torch.allclose(_centered_vjp(prob, gp, w, chunk=7), _centered_vjp(prob, _gram_pass(prob), w), atol=1e-12, rtol=0)
