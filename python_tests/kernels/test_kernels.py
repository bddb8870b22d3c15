"""Triton kernels (rosa_ext.kernels, backend="triton") against float64 math and the reference.

On the CPU they run in the Triton interpreter (conftest sets TRITON_INTERPRET=1), so sizes are
tiny; V is never a multiple of the tile (interpreter tile: 16 tokens x 32 vocab x 16 hidden).
Half-precision inputs are compared with float64 math on the *same rounded* inputs: the kernels
multiply exactly and accumulate in fp32, so one fp32-level tolerance serves every dtype.
"""

import pytest
import torch

pytest.importorskip("triton")

from _helpers import (  # noqa: E402
    build_problem,
    make_inputs,  # noqa: E402
    num_params,
)

import rosa_ext.kernels as K  # noqa: E402
from rosa_ext import rosa_update  # noqa: E402
from rosa_ext.backends.torch_engine import TorchEngine  # noqa: E402
from rosa_ext.backends.triton_engine import TritonEngine  # noqa: E402
from rosa_ext.reference import jvp_reference, rosa_update_reference, vjp_reference  # noqa: E402

DTYPES = [torch.float32, torch.float16, torch.bfloat16]
TOL = 3e-5  # fp32 accumulation of exact products, against float64 on the rounded inputs


def _dense(h, W, bias=None, a=None, b=None, s=8.0, seg=None):
    """float64 logits (T, V); a (B, d) / b (B, V) gathered by seg."""
    z = h.double() @ W.double().T
    if bias is not None:
        z = z + bias.double()
    if a is not None:
        a2, b2 = a.double().reshape(-1, h.shape[1]), b.double().reshape(-1, W.shape[0])
        idx = torch.zeros(h.shape[0], dtype=torch.long) if seg is None else seg
        z = z + s * (h.double() * a2[idx]).sum(1, keepdim=True) * b2[idx]
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


def _close(got, want, tol=TOL):
    torch.testing.assert_close(got.double(), want.double(), rtol=tol, atol=tol)


def _prob64(inp, mode, mask=None, reward=0.0):
    return build_problem(inp["hidden"].double(), inp["weight"].double(), inp["targets"], reward, mode=mode,
                         lora_a=inp.get("lora_a"), lora_b=inp.get("lora_b"), lora_scale=8.0,
                         bias=None if inp.get("bias") is None else inp["bias"].double(), beta=1.0, damping=1.0,
                         max_iter=1, tol=0.0, solver="cg", backend="torch", mask=mask)


# -- stats and the two reductions ------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
@pytest.mark.parametrize("bias,lora", [(False, False), (True, True)])
@pytest.mark.parametrize("T", [1, 19])
def test_stats_and_reductions_vs_dense(dtype, bias, lora, T):
    d, V = 24, 70  # T = 19: two token tiles, the second ragged
    h, W, c, a, b, y = _case(T, d, V, dtype, bias, lora)
    st = K.stats(h, W, y, bias=c, lora_a=a, lora_b=b)
    z = _dense(h, W, c, a, b)
    lse, pi = torch.logsumexp(z, 1), torch.softmax(z, 1)
    assert st.lse.dtype == st.logp.dtype == torch.float32 and st.lse.shape == (T,)
    _close(st.lse, lse)
    _close(st.logp, z.gather(1, y[:, None])[:, 0] - lse)
    if lora:
        _close(st.pib, pi @ b.double())
        _close(st.ah, h.double() @ a.double())
    else:
        assert st.ah is None and st.pib is None
    u, w = torch.randn(V), torch.randn(T)
    r = K.row_reduce(h, W, st.lse, u, bias=c, lora_a=a, lora_b=b)
    col = K.column_reduce(h, W, st.lse, w, bias=c, lora_a=a, lora_b=b)
    assert r.dtype == col.dtype == torch.float32 and r.shape == (T,) and col.shape == (V,)
    _close(r, pi @ u.double())
    _close(col, w.double() @ pi)


def test_batched_tensor_api_ragged_conversations():
    """B = 3 conversations of 5, 1 and 12 tokens packed with seg; LoRA state and u per conversation."""
    d, V, lens = 16, 53, [5, 1, 12]
    T = sum(lens)
    g = torch.Generator().manual_seed(3)
    h = torch.randn(T, d, generator=g)
    W = torch.randn(V, d, generator=g) / d ** 0.5 * 2
    c = torch.randn(V, generator=g) * 0.1
    a = torch.randn(3, d, generator=g) / d ** 0.5
    b = torch.randn(3, V, generator=g) * 0.2
    y = torch.randint(0, V, (T,), generator=g)
    seg = torch.repeat_interleave(torch.arange(3), torch.tensor(lens))
    kw = dict(bias=c, lora_a=a, lora_b=b, seg=seg)
    st = K.stats(h, W, y, **kw)
    z = _dense(h, W, c, a, b, seg=seg)
    pi = torch.softmax(z, 1)
    _close(st.lse, torch.logsumexp(z, 1))
    _close(st.pib, (pi * b.double()[seg]).sum(1))
    u, w = torch.randn(3, V), torch.randn(T)
    _close(K.row_reduce(h, W, st.lse, u, **kw), (pi * u.double()[seg]).sum(1))
    want = torch.zeros(3, V, dtype=torch.float64).index_add_(0, seg, w.double().unsqueeze(1) * pi)
    col = K.column_reduce(h, W, st.lse, w, **kw)
    assert col.shape == (3, V)
    _close(col, want)
    # one u row shared by every conversation
    _close(K.row_reduce(h, W, st.lse, u[0], **kw), pi @ u[0].double())


def test_peaked_softmax_p_near_0_and_1_repeated_tokens():
    T, d, V = 6, 16, 45
    h, W, c, _, _, _ = _case(T, d, V, torch.float32, True, False, scale=40.0)  # logits of order 100
    z = _dense(h, W, c)
    y = z.argmax(1)
    y[3:] = z[3:].argmin(1)  # p_t ~ 1 for t < 3, p_t ~ e^-100 for the rest
    y[1] = y[0]  # a repeated token
    st = K.stats(h, W, y, bias=c)
    lse = torch.logsumexp(z, 1)
    torch.testing.assert_close(st.lse.double(), lse, rtol=1e-6, atol=1e-4)
    logp = z.gather(1, y[:, None])[:, 0] - lse
    torch.testing.assert_close(st.logp.double(), logp, rtol=1e-5, atol=1e-4)
    assert torch.isfinite(st.logp).all() and (st.logp <= 0).all() and (st.logp[3:] < -20).all()
    col = K.column_reduce(h, W, st.lse, torch.ones(T), bias=c)
    torch.testing.assert_close(col.double(), torch.softmax(z, 1).sum(0), rtol=1e-4, atol=1e-5)


def test_peaked_jvp_vjp_vs_reference():
    inp = make_inputs(mode="lora", T=6, d=12, V=37, logit_scale=12.0, seed=4)
    prob = _prob64(inp, "lora")
    p = torch.exp(TorchEngine().stats(prob).logp)
    assert p.max() > 0.99  # the regime the test is about
    f = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inp.items()}
    v = torch.randn(num_params(prob, "lora"), dtype=torch.float64)
    u = torch.randn(6, dtype=torch.float64)
    kw = dict(mode="lora", bias=f["bias"], lora_a=f["lora_a"], lora_b=f["lora_b"])
    torch.testing.assert_close(K.jvp(f["hidden"], f["weight"], f["targets"], v.float(), **kw).double(),
                               jvp_reference(prob, v), rtol=1e-4, atol=1e-5)
    torch.testing.assert_close(K.vjp(f["hidden"], f["weight"], f["targets"], u.float(), **kw).double(),
                               vjp_reference(prob, u), rtol=1e-4, atol=1e-5)


def test_strided_hidden_and_weight():
    T, d, V = 5, 32, 50
    h = torch.randn(T, 2 * d)[:, ::2]  # non-contiguous rows
    Wt = torch.randn(d, V) / d ** 0.5
    W = Wt.T  # (V, d) with stride (1, V): a transposed view
    y = torch.randint(0, V, (T,))
    st = K.stats(h, W, y)
    z = _dense(h, W)
    _close(st.lse, torch.logsumexp(z, 1))
    w = torch.randn(T)
    _close(K.column_reduce(h, W, st.lse, w), w.double() @ torch.softmax(z, 1))


# -- GEMVs -------------------------------------------------------------------------------------
@pytest.mark.parametrize("dtype", DTYPES)
def test_weight_matvec_rmatvec(dtype):
    V, d = 83, 40  # neither a multiple of the interpreter tile (16)
    W = torch.randn(V, d).to(dtype)
    x, q = torch.randn(2, d), torch.randn(2, V)
    _close(K.weight_matvec(W, x), x.double() @ W.double().T)
    _close(K.weight_rmatvec(W, q), q.double() @ W.double())
    with pytest.raises(ValueError, match=r"\(B, 40\)"):
        K.weight_matvec(W, torch.randn(2, 41))


# -- backend and rosa_update -----------------------------------------------------------------
def _batched_inputs(mode):
    inp = make_inputs(mode=mode, B=3, T=6, d=16, V=53)
    mask = torch.arange(6).unsqueeze(0) < torch.tensor([6, 2, 4]).unsqueeze(1)
    if mode == "lora":
        g = torch.Generator().manual_seed(1)
        inp["lora_a"] = torch.randn(3, 16, generator=g, dtype=torch.float64) / 4
        inp["lora_b"] = torch.randn(3, 53, generator=g, dtype=torch.float64) * 0.1
    return inp, mask


@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_backend_batched_ragged_matches_torch_backend(mode):
    inp, mask = _batched_inputs(mode)
    f = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inp.items()}
    prob = build_problem(f["hidden"], f["weight"], f["targets"], torch.tensor([-1.0, 1.0, 0.5]), mode=mode,
                         lora_a=f.get("lora_a"), lora_b=f.get("lora_b"), lora_scale=8.0, bias=f["bias"],
                         beta=1.0, damping=0.1, max_iter=5, tol=0.0, solver="cg", backend="triton", mask=mask)
    tr, to = TritonEngine(), TorchEngine(chunk=16)
    s1, s2 = tr.stats(prob), to.stats(prob)
    for k in ("lse", "logp") + (("ah", "pib") if mode == "lora" else ()):
        torch.testing.assert_close(getattr(s1, k), getattr(s2, k), rtol=1e-5, atol=1e-5)
    u, w = torch.randn(3, 53), torch.randn(prob.num_tokens)
    torch.testing.assert_close(tr.row_reduce(prob, s1, u), to.row_reduce(prob, s2, u), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(tr.column_reduce(prob, s1, w), to.column_reduce(prob, s2, w), rtol=1e-5, atol=1e-5)
    v = torch.randn(3, 16)
    torch.testing.assert_close(tr.weight_matvec(prob, v), to.weight_matvec(prob, v), rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("mode", ["lora", "hidden"])
@pytest.mark.parametrize("solver", ["cg", "dual"])
def test_rosa_update_triton_vs_reference(mode, solver):
    inp = make_inputs(mode=mode, T=7, d=20, V=61)
    ref = rosa_update_reference(**inp, reward=-1.0, mode=mode, damping=1e-2)
    f32 = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inp.items()}
    got = rosa_update(**f32, reward=-1.0, mode=mode, damping=1e-2, backend="triton", solver=solver,
                      max_iter=300, tol=1e-7)
    # the step reports the engine that ran: on the Triton backend every plan runs Triton kernels (the
    # one-pass plans through the probability tiles, matrix-free CG through the streaming kernels)
    assert got.backend == "triton"
    assert got.update.dtype == torch.float32
    err = (got.update.double() - ref.update).norm() / ref.update.norm()
    assert err < 1e-4, err


@pytest.mark.parametrize("dtype", [torch.float16, torch.bfloat16])
@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_rosa_update_half_models_vs_reference(dtype, mode):
    """bf16/fp16 models (lm_head inputs and weight in half precision), T = 1 and T = 5."""
    for T in (1, 5):
        inp = make_inputs(mode=mode, T=T, d=16, V=45, seed=T)
        for k in ("hidden", "weight", "bias"):
            inp[k] = inp[k].to(dtype)
        rounded = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v)
                   for k, v in inp.items()}
        ref = rosa_update_reference(**rounded, reward=1.0, mode=mode, damping=0.1)
        got = rosa_update(**inp, reward=1.0, mode=mode, damping=0.1, backend="triton", solver="cg",
                          max_iter=100, tol=1e-7)
        err = (got.update.double() - ref.update).norm() / ref.update.norm()
        assert err < 1e-4, (T, err)


@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_rosa_update_batched_masked_vs_reference(mode):
    inp, mask = _batched_inputs(mode)
    reward = torch.tensor([-1.0, 1.0, 0.5], dtype=torch.float64)
    ref = rosa_update_reference(**inp, reward=reward, mode=mode, mask=mask, damping=0.1)
    f32 = {k: (v.float() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inp.items()}
    got = rosa_update(**f32, reward=reward.float(), mode=mode, mask=mask, damping=0.1, backend="triton",
                      solver="cg", max_iter=200, tol=1e-7)
    assert got.update.shape == ref.update.shape
    err = (got.update.double() - ref.update).norm(dim=1) / ref.update.norm(dim=1)
    assert (err < 1e-4).all(), err


def test_tied_weight_is_not_modified():
    emb = torch.nn.Embedding(45, 16)
    head = torch.nn.Linear(16, 45, bias=False)
    head.weight = emb.weight  # tied embeddings
    before = emb.weight.detach().clone()
    h = torch.randn(4, 16)
    y = torch.randint(0, 45, (4,))
    step = rosa_update(h, head.weight.detach(), y, -1.0, mode="hidden", backend="triton")
    assert torch.equal(emb.weight.detach(), before) and step.update.abs().sum() > 0


# -- tensor-level jvp / vjp -------------------------------------------------------------------
@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_jvp_vjp_wrappers_vs_reference(mode):
    inp = make_inputs(mode=mode, T=5, d=12, V=37)
    prob = _prob64(inp, mode)
    v = torch.randn(num_params(prob, mode), dtype=torch.float64)
    u = torch.randn(5, dtype=torch.float64)
    f = {k: (x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x) for k, x in inp.items()}
    kw = dict(mode=mode, bias=f["bias"], lora_a=f.get("lora_a"), lora_b=f.get("lora_b"))
    h, W, y = f["hidden"], f["weight"], f["targets"]
    st = K.stats(h, W, y, bias=f["bias"], lora_a=f.get("lora_a"), lora_b=f.get("lora_b"))
    for cache in (None, st):
        torch.testing.assert_close(K.jvp(h, W, y, v.float(), st=cache, **kw).double(), jvp_reference(prob, v),
                                   rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(K.vjp(h, W, y, u.float(), st=cache, **kw).double(), vjp_reference(prob, u, mode=mode),
                                   rtol=1e-4, atol=1e-6)


@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_jvp_vjp_batched_seg_vs_reference(mode):
    inp, mask = _batched_inputs(mode)
    prob = _prob64(inp, mode, mask=mask)
    f = {k: (x.float() if isinstance(x, torch.Tensor) and x.is_floating_point() else x) for k, x in inp.items()}
    h, y = f["hidden"][mask], f["targets"][mask]
    seg = prob.seg
    kw = dict(mode=mode, bias=f["bias"], lora_a=f.get("lora_a"), lora_b=f.get("lora_b"), seg=seg)
    v = torch.randn(3, num_params(prob, mode), dtype=torch.float64)
    u = torch.randn(prob.num_tokens, dtype=torch.float64)
    jv = K.jvp(h, f["weight"], y, v.float(), **kw)
    vj = K.vjp(h, f["weight"], y, u.float(), **kw)
    assert vj.shape == (3, num_params(prob, mode))
    off = prob.offsets
    for b in range(3):
        sl = slice(off[b], off[b + 1])
        torch.testing.assert_close(jv[sl].double(), jvp_reference(prob, v[b], b, mode=mode), rtol=1e-4, atol=1e-6)
        torch.testing.assert_close(vj[b].double(), vjp_reference(prob, u[sl], b, mode=mode), rtol=1e-4, atol=1e-6)


# -- fallbacks and errors --------------------------------------------------------------------
def test_fp64_falls_back_to_torch():
    """float64 on backend="triton" runs torch (no fp64 tensor-core dot) and says so: the step reports
    the engine that ran, for matrix-free LoRA CG too."""
    for mode, solver in (("hidden", "auto"), ("lora", "cg")):
        inp = make_inputs(mode=mode, T=4)
        step = rosa_update(**inp, reward=1.0, mode=mode, backend="triton", solver=solver)
        ref = rosa_update(**inp, reward=1.0, mode=mode, backend="torch", solver=solver)
        assert step.backend == "torch" and step.update.dtype == torch.float64
        torch.testing.assert_close(step.update, ref.update, rtol=0, atol=1e-12)


def test_bad_inputs_raise_clear_errors():
    h, W, y = torch.randn(3, 8), torch.randn(10, 8), torch.zeros(3, dtype=torch.long)
    with pytest.raises(TypeError, match="share a dtype"):
        K.stats(h, W.half(), y)
    with pytest.raises(TypeError, match="fp64"):
        K.stats(h.double(), W.double(), y)
    with pytest.raises(ValueError, match=r"\(N, d\)"):
        K.stats(h, torch.randn(10, 9), y)
    with pytest.raises(ValueError, match="both lora_a and lora_b"):
        K.stats(h, W, y, lora_a=torch.randn(8))
    with pytest.raises(ValueError, match="sorted"):
        K.stats(h, W, y, seg=torch.tensor([1, 0, 1]))
    with pytest.raises(ValueError, match="mode"):
        K.jvp(h, W, y, torch.randn(8), mode="full")
    with pytest.raises(ValueError, match="fp32 precision"):
        K.set_fp32_precision("bf16")


def test_fp32_precision_setting_roundtrip():
    old = K.fp32_precision()
    assert old in ("ieee", "tf32", "tf32x3")
    try:
        K.set_fp32_precision("tf32x3")
        assert K.fp32_precision() == "tf32x3"
    finally:
        K.set_fp32_precision(old)


# -- ahead-of-time compile for Hopper (no GPU needed) ------------------------------------------
_SM90_SCRIPT = r"""
import os, sys, warnings
os.environ.pop("TRITON_INTERPRET", None)
warnings.filterwarnings("ignore")
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from rosa_ext.kernels import matvec, prob_tiles, reductions, stats_pass
P, I, F = "*fp32", "i32", "fp32"
ints = dict(N=I, D=I, V=I)
cases = []
# (tag, operand dtype, fp32 precision, (BLOCK_T, BLOCK_V, BLOCK_D, warps, stages)): bf16 on the wgmma list,
# fp32 with the default "tf32x3" on the first config of the fp32 tensor-core list
for tag, dt, prec, (bt, bv, bd, nw, ns) in [("bf16", "bf16", "ieee", (128, 128, 64, 8, 3)),
                                            ("fp32-tf32x3", "fp32", "tf32x3", (128, 128, 32, 8, 3))]:
    tile = dict(BLOCK_T=bt, BLOCK_V=bv, BLOCK_D=bd)
    flags = dict(N_BUCKET=1024, HAS_BIAS=True, HAS_LORA=True, IS_FP32=dt == "fp32", PRECISION=prec)
    model = dict(h_ptr=f"*{dt}", w_ptr=f"*{dt}", bias_ptr=f"*{dt}", lb_ptr=P, ah_ptr=P)
    opts = dict(num_warps=nw, num_stages=ns)
    cases += [
        (tag, stats_pass._stats_kernel, dict(model, seg_ptr="*i32", m_out=P, s_out=P, sb_out=P, **ints, s_hn=I, s_wv=I,
                                             s_lb=I, n_lb=I, lora_scale=F), dict(flags, SINGLE=False, **tile), opts),
        # the JVP's pass inside the compiled CG: run flag on, per-conversation u rows
        (tag, reductions._row_kernel, dict(model, seg_ptr="*i32", lse_ptr=P, u_ptr=P, out_ptr=P, **ints, s_hn=I, s_wv=I,
                                           s_lb=I, n_lb=I, s_u=I, n_u=I, lora_scale=F, flag_ptr="*fp64"),
         dict(flags, SINGLE=False, HAS_FLAG=True, **tile), opts),
        # the VJP's fused scatter - column pass, run flag on
        (tag, reductions._column_kernel, dict(model, lse_ptr=P, wt_ptr=P, y_ptr="*i64", off_ptr="*i32", out_ptr=P, **ints,
                                              s_hn=I, s_wv=I, s_lb=I, s_out=I, lora_scale=F, flag_ptr="*fp64"),
         dict(flags, SINGLE=True, SCATTER=True, HAS_FLAG=True, **tile), opts),
    ]
# the probability tiles on the first config of their own lists (every config: test_prob_tiles.py), bf16 hi/lo
# and fp32 P, the one pass (its own row statistics: the engines' default) and a given lse
for tag, dt, prec, mode, (bt, bv, bd, nw, ns) in [("bf16", "bf16", "ieee", 1, prob_tiles.POOLS[0][0]),
                                                  ("fp32-tf32x3", "fp32", "tf32x3", 0, prob_tiles.POOLS[1][0])]:
    out_t = P if mode == 0 else "*bf16"
    for fixed in (False, True):
        cases.append((tag + ("-lse" if fixed else ""), prob_tiles._prob_tile_kernel,
                      dict(h_ptr=f"*{dt}", w_ptr=f"*{dt}", bias_ptr=f"*{dt}", lb_ptr=P, ah_ptr=P, seg_ptr="*i32",
                           lse_ptr=P, y_ptr="*i64", p_ptr=out_t, lo_ptr=out_t, ref_out=P, q_out=P, pt_out=P, rb_out=P,
                           ss_out=P, zy_out=P, **ints, s_hn=I, s_wv=I, s_lb=I, n_lb=I, s_p=I, lora_scale=F,
                           headroom=F),
                      dict(N_BUCKET=1024, HAS_BIAS=True, HAS_LORA=True, SINGLE=False, IS_FP32=dt == "fp32",
                           PRECISION=prec, OUT_MODE=mode, FIXED_REF=fixed, BLOCK_T=bt, BLOCK_V=bv, BLOCK_D=bd),
                      dict(num_warps=nw, num_stages=ns)))
for tag, dt in (("bf16", "bf16"), ("fp32", "fp32")):  # the GEMVs, run-flag on (fp32: the flagged hidden-mode CG)
    cases += [
        (tag, matvec._matvec_kernel, dict(w_ptr=f"*{dt}", x_ptr=P, out_ptr=P, flag_ptr="*fp64", D=I, V=I, s_wv=I, s_x=I,
                                          s_out=I), dict(HAS_FLAG=True, BLOCK_V=64, BLOCK_D=128),
         dict(num_warps=4, num_stages=3)),
        (tag, matvec._rmatvec_kernel, dict(w_ptr=f"*{dt}", q_ptr=P, part_ptr=P, flag_ptr="*fp64", D=I, V=I, B=I, chunk=I,
                                           s_wv=I, s_q=I), dict(HAS_FLAG=True, BLOCK_V=64, BLOCK_D=128),
         dict(num_warps=4, num_stages=3)),
    ]
for tag, kern, sig, const, opts in cases:
    fn = kern.fn  # below @triton.autotune
    names = list(fn.arg_names)
    const = dict(const, **{n: 1 for n in ("s_hd", "s_wd") if n in names})  # unit strides, as at launch
    # what a launch with the Qwen head (d = 896, 16-byte aligned buffers) specialises on
    odd = ("N", "V", "B", "lora_scale", "headroom", "n_lb", "n_u")
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in sig if n not in odd}
    src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const, attrs=attrs)
    out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
    ttgir = out.asm["ttgir"]
    dots = "warp_group_dot" in ttgir
    piped = "async_copy_global_to_local" in ttgir
    print(tag, fn.__name__, "wgmma" if dots else "-", "pipelined" if piped else "-", out.metadata.shared, flush=True)
"""


def test_kernels_compile_for_hopper_without_a_gpu():
    """The interpreter skips codegen: compile every kernel family for sm_90 -- bf16 and fp32 with the
    default "tf32x3" precision, LoRA, bias, the run flag, the fused scatter, the probability tiles -- and check that the logits
    tiles use wgmma with cp.async-pipelined loads of H and W, within an H100/H200 block's 227 KiB of
    shared memory."""
    from _helpers import sm90_compile
    rows = [line.split() for line in sm90_compile(_SM90_SCRIPT, timeout=600).strip().splitlines()]
    got = {(tag, name): (dots, piped, int(shared)) for tag, name, dots, piped, shared in rows}
    for tag in ("bf16", "fp32-tf32x3"):
        for name in ("_stats_kernel", "_row_kernel", "_column_kernel", "_prob_tile_kernel"):
            assert got[(tag, name)][:2] == ("wgmma", "pipelined"), (tag, name, got[(tag, name)])
        assert got[(tag + "-lse", "_prob_tile_kernel")][:2] == ("wgmma", "pipelined"), (tag, got)
    assert {(t, k) for t in ("bf16", "fp32") for k in ("_matvec_kernel", "_rmatvec_kernel")} <= set(got)
    assert all(shared <= 227 * 1024 for _, _, shared in got.values()), got


# -- GPU (when lent) ---------------------------------------------------------------------------
def _gpu_head(dtype, T, V=151936, d=896, seed=0):
    g = torch.Generator(device="cuda").manual_seed(seed)
    h = torch.randn(T, d, device="cuda", generator=g).to(dtype)
    W = (torch.randn(V, d, device="cuda", generator=g) / d ** 0.5 * 4).to(dtype)
    y = torch.randint(0, V, (T,), device="cuda", generator=g)
    return h, W, y


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float16, torch.float32])
@pytest.mark.parametrize("T", [1, 300, 8192])
def test_gpu_stats_and_reductions_vs_float64(dtype, T):
    """Qwen2.5-0.5B head sizes; float64 truth on a 4096-column slice of the vocabulary's logits."""
    h, W, y = _gpu_head(dtype, T)
    st = K.stats(h, W, y)
    lse = torch.logsumexp(h.double() @ W.double().T, 1) if T <= 300 else None
    if lse is not None:
        torch.testing.assert_close(st.lse.double(), lse, rtol=1e-5, atol=1e-4)
    w = torch.randn(T, device="cuda")
    col = K.column_reduce(h, W, st.lse, w)
    cols = slice(0, 4096)
    pi = torch.exp(h.double() @ W[cols].double().T - st.lse.double().unsqueeze(1))
    torch.testing.assert_close(col[cols].double(), w.double() @ pi, rtol=1e-3, atol=1e-6)
    u = torch.randn(W.shape[0], device="cuda")
    r = K.row_reduce(h, W, st.lse, u)
    assert torch.isfinite(r).all() and r.shape == (T,)


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_gpu_real_head_sizes_match_torch_backend(dtype, mode):
    T, d = 300, 896
    h, W, y = _gpu_head(dtype, T)
    g = torch.Generator(device="cuda").manual_seed(1)
    a = torch.randn(d, device="cuda", generator=g) / d ** 0.5
    b = torch.randn(W.shape[0], device="cuda", generator=g) * 0.01
    kw = dict(mode=mode, lora_a=a, lora_b=b if mode == "lora" else None, solver="cg", max_iter=8, tol=0.0)
    t = rosa_update(h, W, y, -1.0, backend="triton", **kw)
    ref = rosa_update(h, W, y, -1.0, backend="torch", **kw)
    err = (t.update - ref.update).norm() / ref.update.norm()
    assert err < (1e-3 if dtype == torch.bfloat16 else 1e-4), err


@pytest.mark.parametrize("scale", [1.0, 30.0])
def test_vocab_splits_merged(scale):
    """V = 300 spans two vocabulary splits (256 columns each), the last tile partial: the
    (splits, N) partials of the stats and row passes are merged in torch. scale=30 peaks the
    softmax so most splits hold only exp(-large) mass (the rescale path of the merge)."""
    from rosa_ext.kernels._tiles import DEFAULT_SMS, split_plan
    T, d, V = 5, 16, 300
    assert split_plan(T, V, 16, DEFAULT_SMS)[0] == 2
    h, W, c, a, b, y = _case(T, d, V, torch.float32, True, True, scale=scale, seed=3)
    st = K.stats(h, W, y, bias=c, lora_a=a, lora_b=b)
    z = _dense(h, W, c, a, b)
    pi = torch.softmax(z, 1)
    tol = 2e-5 * scale
    torch.testing.assert_close(st.lse.double(), torch.logsumexp(z, 1), rtol=tol, atol=tol)
    torch.testing.assert_close(st.pib.double(), pi @ b.double(), rtol=tol, atol=tol)
    u, w = torch.randn(V), torch.randn(T)
    torch.testing.assert_close(K.row_reduce(h, W, st.lse, u, bias=c, lora_a=a, lora_b=b).double(),
                               pi @ u.double(), rtol=tol, atol=tol)
    torch.testing.assert_close(K.column_reduce(h, W, st.lse, w, bias=c, lora_a=a, lora_b=b).double(),
                               w.double() @ pi, rtol=tol, atol=tol)
