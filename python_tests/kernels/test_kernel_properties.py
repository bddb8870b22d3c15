"""Property-based tests of the tensor-level kernel API, rosa_ext.kernels (hypothesis; README "Errors").

Random valid packed problems (ragged conversations, bias, LoRA): stats, row/column reductions, jvp and
vjp agree with float64 math (fp32 tolerance). Random invalid arguments -- sizes that disagree (an lse
shorter than T, seg ids beyond the rows of u/lora_b/v, a w of the wrong length, stats of another
call), negative or too large targets -- raise a rosa_ext error naming the argument before any kernel
launches, and leave every input untouched. Runs in the Triton interpreter on the CPU: tiny sizes.
"""
from __future__ import annotations

import math

import pytest
import torch
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st

pytest.importorskip("triton")

from _helpers import build_problem, num_params  # noqa: E402

import rosa_ext.kernels as K  # noqa: E402
from rosa_ext import RosaError  # noqa: E402
from rosa_ext.reference import jvp_reference, vjp_reference  # noqa: E402

SETTINGS = dict(deadline=None, derandomize=True, database=None, print_blob=True,
                suppress_health_check=[HealthCheck.too_slow, HealthCheck.data_too_large])
TOL = 3e-5


@st.composite
def packed(draw):
    """A packed fp32 problem: T tokens over B conversations (seg), optional bias and LoRA."""
    B = draw(st.integers(1, 3))
    lens = draw(st.lists(st.integers(1, 4), min_size=B, max_size=B))
    d = draw(st.integers(1, 9))
    V = draw(st.integers(2, 40))
    T = sum(lens)
    g = torch.Generator().manual_seed(draw(st.integers(0, 10 ** 6)))
    h = torch.randn(T, d, generator=g, dtype=torch.float64)
    W = torch.randn(V, d, generator=g, dtype=torch.float64) * draw(st.floats(0.2, 3.0)) / math.sqrt(d)
    out = dict(hidden=h.float(), weight=W.float(), targets=torch.randint(0, V, (T,), generator=g),
               seg=torch.repeat_interleave(torch.arange(B), torch.tensor(lens)) if (B > 1 or draw(st.booleans()))
               else None, B=B)
    out["bias"] = (torch.randn(V, generator=g) * 0.2) if draw(st.booleans()) else None
    if draw(st.booleans()):
        rows = B if out["seg"] is not None and draw(st.booleans()) else 1
        out["lora_a"] = torch.randn(rows, d, generator=g) / math.sqrt(d)
        out["lora_b"] = torch.randn(rows, V, generator=g) * 0.3
        if rows == 1 and draw(st.booleans()):
            out["lora_a"], out["lora_b"] = out["lora_a"][0], out["lora_b"][0]
    else:
        out["lora_a"] = out["lora_b"] = None
    return out


def _kw(p, *names):
    return {k: p[k] for k in names}


def _dense(p):
    """float64 logits (T, V) and per-token conversation index."""
    h, W = p["hidden"].double(), p["weight"].double()
    T = h.shape[0]
    seg = p["seg"] if p["seg"] is not None else torch.zeros(T, dtype=torch.long)
    z = h @ W.T
    if p["bias"] is not None:
        z = z + p["bias"].double()
    if p["lora_a"] is not None:
        a = p["lora_a"].double().reshape(-1, h.shape[1])
        b = p["lora_b"].double().reshape(-1, W.shape[0])
        ia = seg if a.shape[0] > 1 else torch.zeros_like(seg)
        z = z + 8.0 * (h * a[ia]).sum(1, keepdim=True) * b[ia]
    return z, seg


@settings(max_examples=20, **SETTINGS)
@given(p=packed())
def test_random_valid_stats_and_reductions_match_float64(p):
    common = _kw(p, "bias", "lora_a", "lora_b", "seg")
    h, W, y = p["hidden"], p["weight"], p["targets"]
    z, seg = _dense(p)
    lse, pi = torch.logsumexp(z, 1), torch.softmax(z, 1)
    st_ = K.stats(h, W, y, **common)
    torch.testing.assert_close(st_.lse.double(), lse, rtol=TOL, atol=TOL)
    torch.testing.assert_close(st_.logp.double(), z.gather(1, y[:, None])[:, 0] - lse, rtol=TOL, atol=TOL)
    B = p["B"]
    u = torch.randn(B, W.shape[0], generator=torch.Generator().manual_seed(1))
    w = torch.randn(h.shape[0], generator=torch.Generator().manual_seed(2))
    r = K.row_reduce(h, W, st_.lse, u if p["seg"] is not None else u[0], **common)
    torch.testing.assert_close(r.double(), (pi * u.double()[seg]).sum(1), rtol=TOL, atol=TOL)
    col = K.column_reduce(h, W, st_.lse, w, **common)
    want = torch.zeros(B, W.shape[0], dtype=torch.float64).index_add_(0, seg, w.double()[:, None] * pi)
    torch.testing.assert_close(col.double(), want if p["seg"] is not None else want[0], rtol=TOL, atol=TOL)


@settings(max_examples=15, **SETTINGS)
@given(p=packed(), mode=st.sampled_from(["lora", "hidden"]), cached=st.booleans())
def test_random_valid_jvp_vjp_match_the_reference(p, mode, cached):
    if mode == "lora" and p["lora_a"] is None:
        mode = "hidden"
    h, W, y = p["hidden"], p["weight"], p["targets"]
    T, d = h.shape
    Vs = W.shape[0]
    seg = p["seg"] if p["seg"] is not None else torch.zeros(T, dtype=torch.long)
    B = int(seg.max()) + 1
    lens = torch.bincount(seg, minlength=B)
    Tm = int(lens.max())
    H3 = torch.zeros(B, Tm, d, dtype=torch.float64)
    Y2 = torch.zeros(B, Tm, dtype=torch.long)
    mask = torch.arange(Tm)[None, :] < lens[:, None]
    H3[mask], Y2[mask] = h.double(), y

    def rows(x, width):
        return None if x is None else x.double().reshape(-1, width).expand(B, width)

    prob = build_problem(H3, W.double(), Y2, 0.0, mode=mode, lora_a=rows(p["lora_a"], d),
                         lora_b=rows(p["lora_b"], Vs), lora_scale=8.0,
                         bias=None if p["bias"] is None else p["bias"].double(), beta=1.0, damping=1.0, max_iter=1,
                         tol=0.0, solver="cg", backend="torch", mask=mask)
    kw = dict(mode=mode, **_kw(p, "bias", "lora_a", "lora_b", "seg"))
    if cached:
        kw["st"] = K.stats(h, W, y, **_kw(p, "bias", "lora_a", "lora_b", "seg"))
    g = torch.Generator().manual_seed(3)
    v = torch.randn(B, num_params(prob, mode), generator=g, dtype=torch.float64)
    u = torch.randn(T, generator=g, dtype=torch.float64)
    jv = K.jvp(h, W, y, v.float() if p["seg"] is not None else v[0].float(), **kw)
    vj = K.vjp(h, W, y, u.float(), **kw)
    vj = vj if p["seg"] is not None else vj.unsqueeze(0)
    for b in range(B):
        sl = slice(prob.offsets[b], prob.offsets[b + 1])
        torch.testing.assert_close(jv[sl].double(), jvp_reference(prob, v[b], b, mode=mode), rtol=1e-4, atol=1e-5)
        torch.testing.assert_close(vj[b].double(), vjp_reference(prob, u[sl], b, mode=mode), rtol=1e-4, atol=1e-5)


@settings(max_examples=10, **SETTINGS)
@given(p=packed(), mode=st.sampled_from(["lora", "hidden"]))
def test_random_prepared_calls_equal_plain_calls(p, mode):
    """prepare() once, then prob= calls (no value check, no host sync): bitwise the plain calls' results."""
    if mode == "lora" and p["lora_a"] is None:
        mode = "hidden"
    h, W, y = p["hidden"], p["weight"], p["targets"]
    kw = _kw(p, "bias", "lora_a", "lora_b", "seg")
    prob = K.prepare(h, W, y, **kw)
    assert prob.num_conversations == p["B"] and prob.offsets[-1] == h.shape[0]
    g = torch.Generator().manual_seed(5)
    B, Vs, d = p["B"], W.shape[0], h.shape[1]
    u = torch.randn(B, Vs, generator=g) if p["seg"] is not None else torch.randn(Vs, generator=g)
    w = torch.randn(h.shape[0], generator=g)
    P = d + (Vs if mode == "lora" else 0)
    v = torch.randn(B, P, generator=g) if p["seg"] is not None else torch.randn(P, generator=g)
    st_p, st_q = K.stats(h, W, y, prob=prob), K.stats(h, W, y, **kw)
    pairs = [(st_p.lse, st_q.lse), (st_p.logp, st_q.logp),
             (K.row_reduce(h, W, st_p.lse, u, prob=prob), K.row_reduce(h, W, st_q.lse, u, **kw)),
             (K.column_reduce(h, W, st_p.lse, w, prob=prob), K.column_reduce(h, W, st_q.lse, w, **kw)),
             (K.jvp(h, W, y, v, mode=mode, prob=prob), K.jvp(h, W, y, v, mode=mode, **kw)),
             (K.vjp(h, W, y, w, mode=mode, st=st_p, prob=prob), K.vjp(h, W, y, w, mode=mode, st=st_q, **kw))]
    for a, b in pairs:
        assert torch.equal(a, b)


def _bad(p):
    """(function, argument, keyword overrides) of one call with one bad argument."""
    h, W, y = p["hidden"], p["weight"], p["targets"]
    T, d = h.shape
    Vs = W.shape[0]
    lse = torch.zeros(T)
    far = torch.arange(T)  # sorted, and beyond the rows of any 1- or 2-row table once T > 2
    cases = [
        (K.stats, "targets", dict(targets=torch.full_like(y, -1))),
        (K.stats, "targets", dict(targets=torch.full_like(y, Vs))),
        (K.stats, "targets", dict(targets=y.float())),
        (K.stats, "targets", dict(targets=y[:-1] if T > 1 else y.repeat(2))),
        (K.stats, "hidden", dict(hidden=h.double(), weight=W.double())),
        (K.stats, "hidden", dict(hidden=h.half())),
        (K.stats, "hidden", dict(hidden=h[:, :0], weight=W[:, :0])),
        (K.stats, "hidden", dict(hidden="h")),
        (K.stats, "weight", dict(weight=W.to("meta"))),
        (K.stats, "bias", dict(bias=torch.zeros(Vs + 1))),
        (K.stats, "lora_b", dict(lora_a=torch.zeros(d), lora_b=None)),
        (K.stats, "lora_a", dict(lora_a=torch.zeros(d + 1), lora_b=torch.zeros(Vs))),
        (K.stats, "lora_b", dict(lora_a=torch.zeros(2, d), lora_b=torch.zeros(3, Vs))),
        (K.stats, "seg", dict(seg=torch.flip(far, [0]) if T > 1 else torch.tensor([-1]))),
        (K.stats, "seg", dict(seg=far.float())),
        (K.stats, "seg", dict(lora_a=torch.zeros(2, d), lora_b=torch.zeros(2, Vs), seg=None)),
        (K.stats, "lora_scale", dict(lora_scale="8")),
        (K.row_reduce, "lse", dict(lse=lse[:-1] if T > 1 else torch.zeros(2), u=torch.zeros(Vs))),
        (K.row_reduce, "u", dict(lse=lse, u=torch.zeros(Vs + 1))),
        (K.row_reduce, "u", dict(lse=lse, u=torch.zeros(Vs, dtype=torch.long))),
        (K.column_reduce, "w", dict(lse=lse, w=torch.zeros(T + 1))),
        (K.column_reduce, "lse", dict(lse=torch.zeros(T, 2), w=torch.zeros(T))),
        (K.jvp, "mode", dict(v=torch.zeros(d), mode="full")),
        (K.jvp, "v", dict(v=torch.zeros(d + 1), mode="hidden")),
        (K.jvp, "lora_a", dict(v=torch.zeros(d + Vs), mode="lora", lora_a=None, lora_b=None)),
        (K.jvp, "st", dict(v=torch.zeros(d), mode="hidden", st="stats")),
        (K.vjp, "u", dict(u=torch.zeros(T + 1), mode="hidden")),
        (K.vjp, "targets", dict(u=torch.zeros(T), mode="hidden", targets=torch.full_like(y, -2))),
        (K.row_reduce, "u", dict(lse=lse, u=torch.zeros(3, Vs), lora_a=torch.zeros(2, d), lora_b=torch.zeros(2, Vs),
                                 seg=torch.zeros(T, dtype=torch.long))),
        (K.jvp, "v", dict(v=torch.zeros(3, d), mode="hidden", lora_a=torch.zeros(2, d), lora_b=torch.zeros(2, Vs),
                          seg=torch.zeros(T, dtype=torch.long))),
        (K.weight_matvec, "x", dict(x=torch.zeros(1, d + 1))),
        (K.weight_rmatvec, "q", dict(q=torch.zeros(1, Vs + 1))),
    ]
    if T > 2:  # seg ids beyond the rows of u / lora tables / v
        cases += [(K.row_reduce, "seg", dict(lse=lse, u=torch.zeros(2, Vs), seg=far)),
                  (K.stats, "seg", dict(lora_a=torch.zeros(2, d), lora_b=torch.zeros(2, Vs), seg=far)),
                  (K.jvp, "seg", dict(v=torch.zeros(2, d), mode="hidden", seg=far))]
    if T > 1:  # stats of another call (fewer tokens)
        short = K.stats(h[:1], W, y[:1])
        cases.append((K.vjp, "st.lse", dict(u=torch.zeros(T), mode="hidden", st=short)))
    return cases


@settings(max_examples=60, **SETTINGS)
@given(p=packed(), pick=st.integers(0, 10 ** 6))
def test_random_invalid_arguments_raise_before_any_launch(p, pick):
    cases = _bad(p)
    fn, name, over = cases[pick % len(cases)]
    base = dict(hidden=p["hidden"], weight=p["weight"], targets=p["targets"], bias=None, lora_a=None, lora_b=None,
                seg=None)
    base.update(over)
    snap = {k: v.clone() for k, v in base.items() if isinstance(v, torch.Tensor) and v.device.type != "meta"}
    if fn in (K.weight_matvec, K.weight_rmatvec):
        call = lambda: fn(base["weight"], base.get("x", base.get("q")))  # noqa: E731
    else:
        args = [base["hidden"], base["weight"]]
        if fn in (K.row_reduce, K.column_reduce):
            args += [base.pop("lse"), base.pop("u") if fn is K.row_reduce else base.pop("w")]
            base.pop("targets")
        else:
            args.append(base.pop("targets"))
            if fn is K.jvp:
                args.append(base.pop("v"))
            elif fn is K.vjp:
                args.append(base.pop("u"))
        kw = {k: v for k, v in base.items() if k not in ("hidden", "weight")}
        call = lambda: fn(*args, **kw)  # noqa: E731
    with pytest.raises(RosaError) as info:
        call()
    assert info.value.argument == name, (fn.__name__, name, str(info.value))
    for k, v in snap.items():
        after = over.get(k, p.get(k))
        if isinstance(after, torch.Tensor):
            torch.testing.assert_close(after, v, rtol=0, atol=0, equal_nan=True)


def test_low_level_column_reduce_clamps_offsets():
    """reductions.column_reduce takes device offsets unchecked (no sync); out-of-range ones are
    clamped to [0, N], so nothing is read out of bounds."""
    from rosa_ext.kernels.reductions import column_reduce
    g = torch.Generator().manual_seed(0)
    h, W = torch.randn(5, 4, generator=g), torch.randn(7, 4, generator=g)
    lse = torch.logsumexp(h @ W.T, 1)
    w = torch.ones(5)
    full = column_reduce(h, W, torch.tensor([0, 5], dtype=torch.int32), lse, w)
    wild = column_reduce(h, W, torch.tensor([-3, 100], dtype=torch.int32), lse, w)
    torch.testing.assert_close(wild, full)
    with pytest.raises(RosaError, match="lse"):
        from rosa_ext.kernels.reductions import row_reduce
        row_reduce(h, W, torch.zeros(5, dtype=torch.int32), lse[:2], torch.zeros(1, 7))


def test_cpu_tensors_without_the_interpreter_are_named(monkeypatch):
    monkeypatch.delenv("TRITON_INTERPRET", raising=False)
    h, W, y = torch.randn(3, 4), torch.randn(5, 4), torch.zeros(3, dtype=torch.long)
    if torch.cuda.is_available():
        pytest.skip("CUDA machine")
    for call in (lambda: K.stats(h, W, y), lambda: K.weight_matvec(W, torch.randn(1, 4))):
        with pytest.raises(RosaError, match="CUDA") as info:
            call()
        assert info.value.argument in ("hidden", "weight")
