"""Triton kernels (rosa_ext.kernels, backend="triton") against float64 torch math and the
reference. On the CPU they run in the Triton interpreter (conftest sets TRITON_INTERPRET=1),
so sizes are tiny; V is never a multiple of the tile."""
import pytest
import torch

pytest.importorskip("triton")

import rosa_ext.kernels as K  # noqa: E402
from rosa_ext import rosa_update  # noqa: E402
from rosa_ext._problem import build_problem  # noqa: E402
from rosa_ext.backends.torch_chunked import TorchChunkedBackend  # noqa: E402
from rosa_ext.backends.triton_backend import TritonBackend  # noqa: E402
from rosa_ext.reference import jvp_reference, rosa_update_reference, vjp_reference  # noqa: E402

from _helpers import make_inputs  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = {torch.float32: 2e-5, torch.float16: 2e-3, torch.bfloat16: 2e-3}  # inputs rounded first: math is fp32


def _dense(h, W, bias=None, a=None, b=None, s=8.0):
    z = h.double() @ W.double().T
    if bias is not None:
        z = z + bias.double()
    if a is not None:
        z = z + s * (h.double() @ a.double()).unsqueeze(1) * b.double()
    return z


def _case(T, d, V, dtype, bias, lora, scale=1.0, seed=0):
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, d, generator=g).to(dtype)
    W = (torch.randn(V, d, generator=g) * scale / d ** 0.5).to(dtype)
    c = (torch.randn(V, generator=g) * 0.1).to(dtype) if bias else None
    a = torch.randn(d, generator=g) / d ** 0.5 if lora else None
    b = torch.randn(V, generator=g) * 0.1 if lora else None
    y = torch.randint(0, V, (T,), generator=g)
    return h, W, c, a, b, y


@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias,lora", [(False, False), (True, True)])
@pytest.mark.parametrize("T", [1, 7])
def test_stats_and_reductions_vs_dense(dtype, bias, lora, T):
    d, V = 24, 70
    h, W, c, a, b, y = _case(T, d, V, dtype, bias, lora)
    st = K.stats(h, W, y, bias=c, lora_a=a, lora_b=b)
    z = _dense(h, W, c, a, b)
    lse = torch.logsumexp(z, 1)
    pi = torch.softmax(z, 1)
    tol = TOL[dtype]
    torch.testing.assert_close(st.lse.double(), lse, rtol=tol, atol=tol)
    torch.testing.assert_close(st.logp.double(), (z.gather(1, y[:, None])[:, 0] - lse), rtol=tol, atol=tol)
    if lora:
        torch.testing.assert_close(st.pib.double(), pi @ b.double(), rtol=tol, atol=tol)
    u = torch.randn(V)
    w = torch.randn(T)
    r = K.row_reduce(h, W, st.lse, u, bias=c, lora_a=a, lora_b=b)
    col = K.column_reduce(h, W, st.lse, w, bias=c, lora_a=a, lora_b=b)
    assert r.dtype == col.dtype == torch.float32 and r.shape == (T,) and col.shape == (V,)
    torch.testing.assert_close(r.double(), pi @ u.double(), rtol=tol, atol=tol)
    torch.testing.assert_close(col.double(), w.double() @ pi, rtol=tol, atol=tol)


def test_peaked_softmax_and_repeated_tokens():
    T, d, V = 6, 16, 45
    h, W, c, _, _, _ = _case(T, d, V, torch.float32, True, False, scale=40.0)  # logits of order 100
    y = torch.full((T,), 3)
    st = K.stats(h, W, y, bias=c)
    z = _dense(h, W, c)
    torch.testing.assert_close(st.lse.double(), torch.logsumexp(z, 1), rtol=1e-6, atol=1e-4)
    assert torch.isfinite(st.logp).all() and (st.logp <= 0).all()
    w = torch.ones(T)
    col = K.column_reduce(h, W, st.lse, w, bias=c)
    torch.testing.assert_close(col.double(), torch.softmax(z, 1).sum(0), rtol=1e-4, atol=1e-5)


def test_strided_hidden():
    T, d, V = 5, 32, 50
    base = torch.randn(T, 2 * d)
    h = base[:, ::2]  # non-contiguous
    W = torch.randn(V, d) / d ** 0.5
    st = K.stats(h, W, torch.zeros(T, dtype=torch.long))
    torch.testing.assert_close(st.lse.double(), torch.logsumexp(_dense(h, W), 1), rtol=1e-6, atol=1e-5)


def _batched_problem(mode, dtype=torch.float32):
    inp = make_inputs(mode=mode, B=3, T=6, d=16, V=53)
    mask = torch.arange(6).unsqueeze(0) < torch.tensor([6, 2, 4]).unsqueeze(1)
    for k in ("hidden", "weight", "bias"):
        inp[k] = inp[k].to(dtype)
    g = torch.Generator().manual_seed(1)
    if mode == "lora":
        inp["lora_a"] = torch.randn(3, 16, generator=g) / 4
        inp["lora_b"] = torch.randn(3, 53, generator=g) * 0.1
    return build_problem(inp["hidden"], inp["weight"], inp["targets"], torch.tensor([-1.0, 1.0, 0.5]),
                         mode=mode, lora_a=inp.get("lora_a"), lora_b=inp.get("lora_b"), lora_scale=8.0,
                         bias=inp["bias"], beta=1.0, damping=0.1, max_iter=5, tol=0.0, solver="cg",
                         backend="triton", mask=mask)


@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_backend_batched_ragged_matches_torch_backend(mode):
    prob = _batched_problem(mode)
    tr, to = TritonBackend(), TorchChunkedBackend(chunk_size=16)
    s1, s2 = tr.stats(prob), to.stats(prob)
    torch.testing.assert_close(s1.lse, s2.lse, rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(s1.logp, s2.logp, rtol=1e-5, atol=1e-5)
    if mode == "lora":
        torch.testing.assert_close(s1.pib, s2.pib, rtol=1e-5, atol=1e-5)
    u = torch.randn(3, 53)
    w = torch.randn(prob.num_tokens)
    torch.testing.assert_close(tr.row_reduce(prob, s1, u), to.row_reduce(prob, s2, u), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tr.column_reduce(prob, s1, w), to.column_reduce(prob, s2, w), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["lora", "hidden"])
@pytest.mark.parametrize("solver", ["cg", "dual"])
def test_rosa_update_triton_vs_reference(mode, solver):
    inp = make_inputs(mode=mode, T=7, d=20, V=61)
    ref = rosa_update_reference(**inp, reward=-1.0, mode=mode, damping=1e-2)
    f32 = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inp.items()}
    got = rosa_update(**f32, reward=-1.0, mode=mode, damping=1e-2, backend="triton", solver=solver,
                      max_iter=300, tol=1e-7)
    assert got.backend == "triton"
    err = (got.update.double() - ref.update).norm() / ref.update.norm()
    assert err < 1e-4, err


@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_jvp_vjp_wrappers_vs_reference(mode):
    inp = make_inputs(mode=mode, T=5, d=12, V=37)
    prob64 = build_problem(inp["hidden"], inp["weight"], inp["targets"], 0.0, mode=mode, lora_a=inp.get("lora_a"),
                           lora_b=inp.get("lora_b"), lora_scale=8.0, bias=inp["bias"], beta=1.0, damping=1.0,
                           max_iter=1, tol=0.0, solver="cg", backend="torch", mask=None)
    P = prob64.num_params
    v = torch.randn(P, dtype=torch.float64)
    u = torch.randn(5, dtype=torch.float64)
    kw = dict(mode=mode, bias=inp["bias"].float(), lora_scale=8.0,
              lora_a=None if inp.get("lora_a") is None else inp["lora_a"].float(),
              lora_b=None if inp.get("lora_b") is None else inp["lora_b"].float())
    h, W, y = inp["hidden"].float(), inp["weight"].float(), inp["targets"]
    jv = K.jvp(h, W, y, v.float(), **kw)
    vj = K.vjp(h, W, y, u.float(), **kw)
    torch.testing.assert_close(jv.double(), jvp_reference(prob64, v), rtol=1e-4, atol=1e-6)
    torch.testing.assert_close(vj.double(), vjp_reference(prob64, u), rtol=1e-4, atol=1e-6)


def test_fp64_falls_back_to_torch_and_bad_dtypes():
    inp = make_inputs(mode="hidden", T=4)
    step = rosa_update(**inp, reward=1.0, mode="hidden", backend="triton")
    assert step.backend == "triton" and step.update.dtype == torch.float64
    with pytest.raises(TypeError, match="share a dtype"):
        K.stats(torch.randn(3, 8), torch.randn(10, 8, dtype=torch.float16), torch.zeros(3, dtype=torch.long))


# -- GPU (when lent) ---------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_gpu_real_head_sizes_match_torch_backend(dtype, mode):
    T, d, V = 300, 896, 151936
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(T, d, device="cuda", generator=g).to(dtype)
    W = (torch.randn(V, d, device="cuda", generator=g) / d ** 0.5 * 4).to(dtype)
    y = torch.randint(0, V, (T,), device="cuda", generator=g)
    a = torch.randn(d, device="cuda", generator=g) / d ** 0.5
    b = torch.randn(V, device="cuda", generator=g) * 0.01
    kw = dict(mode=mode, lora_a=a, lora_b=b if mode == "lora" else None, solver="cg", max_iter=8, tol=0.0)
    t = rosa_update(h, W, y, -1.0, backend="triton", **kw)
    ref = rosa_update(h, W, y, -1.0, backend="torch", **kw)
    err = (t.update - ref.update).norm() / ref.update.norm()
    assert err < (1e-3 if dtype == torch.bfloat16 else 1e-4), err
