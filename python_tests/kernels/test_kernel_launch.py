"""The GPU path's launch plumbing (rosa_ext.kernels), in the Triton interpreter on the CPU:

- ``prepare`` / ``prob=``: validate once, carry seg/offsets on the device, then no value check
  (no host sync) per call; same results as the plain calls; clear errors on misuse;
- the kernels read nothing out of bounds whatever the seg ids / offsets / targets;
- the fused ``scatter(y, w) - C(w)`` column pass (no ``index_put_``) against the two-step version;
- the run flag (early exit inside the compiled CUDA CG): zeros when it is 0, nothing changes when 1;
- vocabulary split counts from the tuned BLOCK_T and the SM count;
- autotune keys with every specialisation; the fp32 dot precision default (tf32x3).
GPU-marked tests at the end (no host sync under ``torch.cuda.set_sync_debug_mode("error")``, a
CUDA graph of the prepared passes, the early exit inside ``rosa_ext.cg.cg``, tf32x3 vs ieee).
"""
import pathlib
import re

import pytest
import torch

pytest.importorskip("triton")

from _helpers import build_problem  # noqa: E402

import rosa_ext.kernels as K  # noqa: E402
from rosa_ext import RosaError  # noqa: E402
from rosa_ext.common import device_flag  # noqa: E402
from rosa_ext.common.jacobian import WHOLE_VOCABULARY  # noqa: E402
from rosa_ext.kernels import _tiles  # noqa: E402
from rosa_ext.kernels import checks as V  # noqa: E402
from rosa_ext.kernels import matvec as MV  # noqa: E402
from rosa_ext.kernels import reductions as R  # noqa: E402
from rosa_ext.kernels import stats_pass as S  # noqa: E402
from rosa_ext.kernels.primitives import TritonPrimitives  # noqa: E402

TOL = 3e-5


def _packed(lens=(5, 1, 7), d=12, V=45, seed=0, lora_rows=3):
    g = torch.Generator().manual_seed(seed)
    T = sum(lens)
    B = len(lens)
    out = dict(hidden=torch.randn(T, d, generator=g), weight=torch.randn(V, d, generator=g) / d ** 0.5 * 2,
               targets=torch.randint(0, V, (T,), generator=g), bias=torch.randn(V, generator=g) * 0.1,
               seg=torch.repeat_interleave(torch.arange(B), torch.tensor(lens)))
    out["lora_a"] = torch.randn(lora_rows, d, generator=g) / d ** 0.5
    out["lora_b"] = torch.randn(lora_rows, V, generator=g) * 0.2
    return out


def _close(a, b, tol=TOL):
    torch.testing.assert_close(a.double(), b.double(), rtol=tol, atol=tol)


# -- prepare / prob= -------------------------------------------------------------------------------
def test_prepared_calls_match_plain_calls_and_skip_the_value_checks(monkeypatch):
    p = _packed()
    h, W, y = p["hidden"], p["weight"], p["targets"]
    kw = {k: p[k] for k in ("bias", "lora_a", "lora_b", "seg")}
    prob = K.prepare(h, W, y, lora_scale=4.0, **kw)
    assert prob.num_conversations == 3 and prob.offsets == (0, 5, 6, 13)
    assert prob.offsets32.tolist() == [0, 5, 6, 13] and prob.seg32.dtype == torch.int32
    calls = []
    real = V.kernel_ranges
    monkeypatch.setattr(V, "kernel_ranges", lambda *a, **k: calls.append(1) or real(*a, **k))
    st_plain = K.stats(h, W, y, lora_scale=4.0, **kw)
    assert len(calls) == 1  # a plain call: one value check (one host sync)
    calls.clear()
    st = K.stats(h, W, y, prob=prob)
    u, w = torch.randn(3, W.shape[0]), torch.randn(h.shape[0])
    v, uu = torch.randn(3, 12 + 45), torch.randn(h.shape[0])
    got = dict(lse=st.lse, row=K.row_reduce(h, W, st.lse, u, prob=prob),
               col=K.column_reduce(h, W, st.lse, w, prob=prob),
               jvp=K.jvp(h, W, y, v, mode="lora", st=st, prob=prob),
               vjp=K.vjp(h, W, y, uu, mode="lora", st=st, prob=prob),
               vjp_h=K.vjp(h, W, y, uu, mode="hidden", prob=prob))
    assert calls == []  # a prepared call: no value check at all
    want = dict(lse=st_plain.lse, row=K.row_reduce(h, W, st_plain.lse, u, lora_scale=4.0, **kw),
                col=K.column_reduce(h, W, st_plain.lse, w, lora_scale=4.0, **kw),
                jvp=K.jvp(h, W, y, v, mode="lora", st=st_plain, lora_scale=4.0, **kw),
                vjp=K.vjp(h, W, y, uu, mode="lora", st=st_plain, lora_scale=4.0, **kw),
                vjp_h=K.vjp(h, W, y, uu, mode="hidden", lora_scale=4.0, **kw))
    for k in want:
        _close(got[k], want[k])
    assert got["col"].shape == (3, 45) and got["vjp"].shape == (3, 57)


def test_prepare_one_conversation_and_without_targets():
    g = torch.Generator().manual_seed(1)
    h, W = torch.randn(6, 8, generator=g), torch.randn(30, 8, generator=g)
    y = torch.randint(0, 30, (6,), generator=g)
    prob = K.prepare(h, W)
    assert prob.num_conversations == 1 and prob.offsets == (0, 6) and prob.offsets32.tolist() == [0, 6]
    st = K.stats(h, W, y)
    w = torch.randn(6)
    _close(K.column_reduce(h, W, st.lse, w, prob=prob), K.column_reduce(h, W, st.lse, w))
    with pytest.raises(RosaError) as info:
        K.stats(h, W, y, prob=prob)  # prepared without targets
    assert info.value.argument == "targets"
    # conversations without tokens at the end of a batch
    seg = torch.zeros(6, dtype=torch.long)
    p2 = K.prepare(h, W, y, seg=seg, num_conversations=3)
    assert p2.num_conversations == 3 and p2.offsets == (0, 6, 6, 6)
    assert K.column_reduce(h, W, st.lse, w, prob=p2)[1:].abs().max() == 0
    with pytest.raises(RosaError) as info:
        K.prepare(h, W, y, seg=torch.tensor([0, 0, 1, 1, 2, 3]), num_conversations=3)
    assert info.value.argument == "seg"


@pytest.mark.parametrize("case", ["hidden", "weight", "targets", "bias", "u_rows", "scale", "type", "mode", "w"])
def test_prepared_call_errors_name_the_argument(case):
    p = _packed()
    h, W, y = p["hidden"], p["weight"], p["targets"]
    prob = K.prepare(h, W, y, bias=p["bias"], seg=p["seg"])
    lse = torch.zeros(h.shape[0])
    calls = {
        "hidden": lambda: K.row_reduce(h.clone(), W, lse, torch.zeros(45), prob=prob),
        "weight": lambda: K.row_reduce(h, W.clone(), lse, torch.zeros(45), prob=prob),
        "targets": lambda: K.stats(h, W, y.clone(), prob=prob),
        "bias": lambda: K.stats(h, W, y, bias=p["bias"].clone(), prob=prob),
        "u_rows": lambda: K.row_reduce(h, W, lse, torch.zeros(2, 45), prob=prob),
        "scale": lambda: K.stats(h, W, y, lora_scale=2.0, prob=prob),
        "type": lambda: K.stats(h, W, y, prob="prob"),
        "mode": lambda: K.jvp(h, W, y, torch.zeros(12 + 45), mode="lora", prob=prob),
        "w": lambda: K.column_reduce(h, W, lse, torch.zeros(3), prob=prob),
    }
    names = {"u_rows": "u", "scale": "lora_scale", "type": "prob", "mode": "lora_a"}
    with pytest.raises(RosaError) as info:
        calls[case]()
    assert info.value.argument == names.get(case, case)


# -- no read out of bounds without the checks ---------------------------------------------------------
def test_low_level_kernels_ignore_out_of_range_seg_ids():
    """seg ids outside [0, rows) of u / lora_b read 0 (masked loads), never out of bounds."""
    g = torch.Generator().manual_seed(2)
    h, W = torch.randn(6, 8, generator=g), torch.randn(40, 8, generator=g) / 3
    u = torch.randn(2, 40, generator=g)
    lb = torch.randn(2, 40, generator=g) * 0.3
    ah = torch.randn(6, generator=g)
    bad = torch.tensor([0, 1, -1, 2, 7, 1], dtype=torch.int32)  # -1, 2, 7: no such row
    ok = (bad >= 0) & (bad < 2)
    lse, pib = S.lse_and_pib(h, W, bad, lora_b=lb, ah=ah, lora_scale=2.0)
    z = h.double() @ W.double().T + 2.0 * ah.double()[:, None] * torch.where(ok[:, None], lb.double()[bad.clamp(0, 1).long()], 0.0)
    _close(lse, torch.logsumexp(z, 1))
    r = R.row_reduce(h, W, bad, lse, u, lora_b=lb, ah=ah, lora_scale=2.0)
    want = (torch.softmax(z, 1) * torch.where(ok[:, None], u.double()[bad.clamp(0, 1).long()], 0.0)).sum(1)
    _close(r, want)


def test_fused_column_ignores_out_of_range_targets_and_offsets():
    g = torch.Generator().manual_seed(3)
    h, W = torch.randn(5, 8, generator=g), torch.randn(30, 8, generator=g)
    lse = torch.logsumexp(h @ W.T, 1)
    w = torch.randn(5, generator=g)
    y = torch.tensor([3, -4, 29, 30, 3])  # -4 and 30 are no token: they scatter nothing
    off = torch.tensor([-2, 9], dtype=torch.int32)  # clamped to [0, 5]
    got = R.column_reduce(h, W, off, lse, w, targets=y)[0]
    want = -(w.double() @ torch.softmax(h.double() @ W.double().T, 1))
    want[3] += w[0] + w[4]
    want[29] += w[2]
    _close(got, want)


# -- the fused scatter - column --------------------------------------------------------------------------
@pytest.mark.parametrize("lora", [False, True])
def test_fused_scatter_minus_column_matches_the_two_step_version(lora):
    p = _packed(lora_rows=3 if lora else 1)
    p["targets"][1] = p["targets"][0]  # a repeated token inside a conversation
    prob = build_problem(p["hidden"].reshape(1, -1, 12).expand(3, -1, -1).clone(), p["weight"],
                         p["targets"].reshape(1, -1).expand(3, -1).clone(), 0.0, mode="lora" if lora else "hidden",
                         lora_a=p["lora_a"] if lora else None, lora_b=p["lora_b"] if lora else None, lora_scale=8.0,
                         bias=p["bias"], beta=1.0, damping=0.1, max_iter=1, tol=0.0, solver="cg", backend="triton",
                         mask=torch.arange(13)[None, :] < torch.tensor([13, 4, 9])[:, None])
    prims = TritonPrimitives()
    st = prims.stats(prob)
    w = torch.randn(prob.num_tokens)
    fused = prims.scatter_minus_column(prob, st, w)
    two_step = WHOLE_VOCABULARY.scatter_targets(prob, -prims.column_reduce(prob, st, w), w)
    assert fused.shape == (3, 45)
    _close(fused, two_step)


# -- the run flag ----------------------------------------------------------------------------------------------
def test_run_flag_zero_skips_the_passes_one_changes_nothing():
    p = _packed()
    h, W, y = p["hidden"], p["weight"], p["targets"]
    prob = K.prepare(h, W, y, bias=p["bias"], lora_a=p["lora_a"], lora_b=p["lora_b"], seg=p["seg"])
    st = K.stats(h, W, y, prob=prob)
    u, w, x, q = torch.randn(3, 45), torch.randn(13), torch.randn(3, 12), torch.randn(3, 45)

    def passes():
        return [K.row_reduce(h, W, st.lse, u, prob=prob), K.column_reduce(h, W, st.lse, w, prob=prob),
                MV.weight_matvec(W, x, flag=device_flag.current()), MV.weight_rmatvec(W, q, flag=device_flag.current())]

    base = passes()
    with device_flag.publish(torch.ones(1, dtype=torch.float64)):
        for a, b in zip(passes(), base):
            assert torch.equal(a, b)
    for flag in (torch.zeros(1, dtype=torch.float64), torch.zeros(1, dtype=torch.int32)):
        with device_flag.publish(flag):
            for a in passes():
                assert a.abs().max() == 0
    with device_flag.publish(torch.zeros(1)):
        old = device_flag.set_enabled(False)
        try:
            for a, b in zip(passes(), base):
                assert torch.equal(a, b)
        finally:
            device_flag.set_enabled(old)
    assert device_flag.current() is None


def test_run_flag_reaches_the_fp32_gemvs_of_the_backend():
    """fp32 W v / q W use torch's GEMV, which cannot read the flag; under a flag the Triton GEMV runs."""
    p = _packed()
    prob = build_problem(p["hidden"], p["weight"], p["targets"], -1.0, mode="hidden", lora_a=None, lora_b=None,
                         lora_scale=8.0, bias=None, beta=1.0, damping=0.1, max_iter=1, tol=0.0, solver="cg",
                         backend="triton", mask=None)
    prims, v, q = TritonPrimitives(), torch.randn(1, 12), torch.randn(1, 45)
    _close(prims.weight_matvec(prob, v), v @ p["weight"].T)
    with device_flag.publish(torch.ones(1, dtype=torch.float64)):
        _close(prims.weight_matvec(prob, v), v @ p["weight"].T)
        _close(prims.weight_rmatvec(prob, q), q @ p["weight"])
    with device_flag.publish(torch.zeros(1, dtype=torch.float64)):
        assert prims.weight_matvec(prob, v).abs().max() == 0 and prims.weight_rmatvec(prob, q).abs().max() == 0


def test_cg_state_index_of_the_run_flag_matches_the_cuda_header():
    header = (pathlib.Path(__file__).resolve().parents[2] / "csrc" / "cg_cuda.h").read_text()
    idx = {m.group(1): int(m.group(2)) for m in re.finditer(r"(k\w+) = (\d+),", header)}
    pytest.importorskip("rosa_ext._C")
    from rosa_ext.cg import compiled
    assert (compiled.STATE_ACTIVE, compiled.STATE_RR, compiled.STATE_BB, compiled.STATE_ITERS, compiled.STATE_BAD) == (
        idx["kActive"], idx["kRR"], idx["kBB"], idx["kIters"], idx["kBad"])


# -- split counts, autotune keys, precision ---------------------------------------------------------------
def _cdiv(a, b):
    return -(-a // b)


@pytest.mark.parametrize("sms", [132, 78, 16])
def test_split_plan_is_wave_quantised_and_matches_the_kernel(sms):
    align = _tiles.SPLIT_ALIGN
    for vocab in (300, 49152, 151936):
        for N in (1, 64, 300, 1024, 4096, 16384):
            for bt in (16, 32, 64, 128):
                splits, chunk = _tiles.split_plan(N, vocab, bt, sms)
                tiles = _cdiv(N, bt)
                # aligned, no empty split, and the width the kernel derives from the grid (split_range)
                assert chunk % align == 0 and (splits - 1) * chunk < vocab <= splits * chunk
                assert _cdiv(_cdiv(vocab, splits), align) * align == chunk
                # the best modelled count up to MAX_WAVES waves, never slower (modelled) than the
                # earlier fixed plan (64-token tiles assumed, 264 programs)
                top = min(_cdiv(vocab, align), _cdiv(_tiles.MAX_WAVES * sms, tiles) + 1)
                assert splits <= top

                def cost(s, vocab=vocab, tiles=tiles):
                    c = _cdiv(_cdiv(vocab, s), align) * align
                    return _cdiv(tiles * _cdiv(vocab, c), sms) * c

                assert cost(splits) == min(cost(s) for s in range(1, top + 1))
                if sms == 132:  # the SM count the earlier plan assumed
                    assert cost(splits) <= cost(_tiles.forced_splits(_cdiv(264, _cdiv(N, 64)), vocab))
                configs = [type("C", (), {"kwargs": {"BLOCK_T": b}}) for b in (16, 32, 64, 128)]
                assert splits <= _tiles.max_splits(N, vocab, configs, sms)


def test_forced_split_counts_give_the_same_result():
    g = torch.Generator().manual_seed(4)
    h, W = torch.randn(7, 8, generator=g), torch.randn(1000, 8, generator=g) / 3
    seg = torch.zeros(7, dtype=torch.int32)
    lse, _ = S.lse_and_pib(h, W, seg)
    u = torch.randn(1, 1000, generator=g)
    base = R.row_reduce(h, W, seg, lse, u)
    for splits in (1, 2, 3, 4, 100):  # 3 -> 2 splits of 512 (no empty split), 100 -> 4
        _close(R.row_reduce(h, W, seg, lse, u, splits=splits), base)


def test_autotune_keys_hold_every_specialisation_and_tuning_happens_unflagged_first(monkeypatch):
    for kern in (S._stats_kernel, R._row_kernel, R._column_kernel):
        assert {"N_BUCKET", "D", "V", "PRECISION", "IS_FP32", "HAS_BIAS", "HAS_LORA", "SINGLE"} <= set(kern.keys)
        assert "HAS_FLAG" not in kern.keys  # flagged launches reuse the unflagged tuning (see _tiles.launch)
    assert "SCATTER" in R._column_kernel.keys
    assert [_tiles.n_bucket(n) for n in (1, 16, 17, 64, 65, 1000, 5000, 10 ** 6)] == [16, 16, 64, 64, 256, 1024,
                                                                                      16384, 16384]

    class Fake:  # records what _tiles.launch asks of an autotuned kernel
        arg_names = ["x_ptr", "flag_ptr", "D", "HAS_FLAG"]
        keys = ["D"]
        calls = []

        def __getitem__(self, grid):
            return lambda *a, **k: Fake.calls.append(k["HAS_FLAG"])

    monkeypatch.setattr(_tiles, "INTERPRET", False)
    x, flag = torch.zeros(4), torch.ones(1, dtype=torch.float64)
    fake = Fake()
    _tiles.launch(fake, (1,), (x,), dict(D=4), flag)  # never tuned: one unflagged launch first
    _tiles.launch(fake, (1,), (x,), dict(D=4), flag)
    _tiles.launch(fake, (1,), (x,), dict(D=8), None)
    _tiles.launch(fake, (1,), (x,), dict(D=8), flag)  # tuned unflagged already
    assert Fake.calls == [False, True, True, False, True]


def test_fp32_precision_defaults_to_tf32x3_and_ieee_stays_selectable():
    assert _tiles.DEFAULT_FP32_PRECISION == "tf32x3"
    old = K.fp32_precision()
    try:
        K.set_fp32_precision("ieee")
        assert K.fp32_precision() == "ieee"
        cfgs = [_tiles._config(*c) for c in _tiles._HOPPER + _tiles._HOPPER_FP32_IEEE + _tiles._HOPPER_FP32_TC]
        ieee = _tiles.prune_configs(cfgs, dict(IS_FP32=True, PRECISION="ieee", N_BUCKET=4096))
        assert {tuple(c.kwargs.values()) for c in ieee} <= {c[:3] for c in _tiles._HOPPER_FP32_IEEE}
        tc = _tiles.prune_configs(cfgs, dict(IS_FP32=True, PRECISION="tf32x3", N_BUCKET=4096))
        assert {tuple(c.kwargs.values()) for c in tc} <= {c[:3] for c in _tiles._HOPPER_FP32_TC}
        half = _tiles.prune_configs(cfgs, dict(IS_FP32=False, PRECISION="ieee", N_BUCKET=16))
        assert half and all(c.kwargs["BLOCK_T"] <= 32 for c in half)
    finally:
        K.set_fp32_precision(old)


def test_tile_configs_fit_hopper_shared_memory():
    """Operand tiles x pipeline stages stay within the 227 KiB an H100/H200 block may use."""
    limit = 227 * 1024
    for pool, nbytes in ((_tiles._HOPPER, 2), (_tiles._HOPPER_FP32_TC, 4), (_tiles._HOPPER_FP32_IEEE, 4)):
        for bt, bv, bd, _, stages in pool:
            assert (bt * bd + bd * bv) * nbytes * stages <= limit, (bt, bv, bd, stages, nbytes)


# -- GPU (when lent) -------------------------------------------------------------------------------------------
def _gpu_problem(dtype, T=300, V=151936, d=896, lora=True):
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(T, d, device="cuda", generator=g).to(dtype)
    W = (torch.randn(V, d, device="cuda", generator=g) / d ** 0.5 * 4).to(dtype)
    y = torch.randint(0, V, (T,), device="cuda", generator=g)
    kw = {}
    if lora:
        kw = dict(lora_a=torch.randn(d, device="cuda", generator=g) / d ** 0.5,
                  lora_b=torch.randn(V, device="cuda", generator=g) * 0.01)
    return h, W, y, kw


@pytest.mark.gpu
@pytest.mark.parametrize("dtype", [torch.bfloat16, torch.float32])
def test_gpu_prepared_calls_never_sync(dtype):
    h, W, y, kw = _gpu_problem(dtype)
    prob = K.prepare(h, W, y, **kw)
    st = K.stats(h, W, y, prob=prob)  # warm-up: compiles and autotunes (syncs) outside the check
    v, u = torch.randn(W.shape[1] + W.shape[0], device="cuda"), torch.randn(h.shape[0], device="cuda")
    for mode in ("lora", "hidden"):
        K.vjp(h, W, y, K.jvp(h, W, y, v if mode == "lora" else v[:W.shape[1]], mode=mode, st=st, prob=prob),
              mode=mode, st=st, prob=prob)
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        st = K.stats(h, W, y, prob=prob)
        for mode in ("lora", "hidden"):
            jv = K.jvp(h, W, y, v if mode == "lora" else v[:W.shape[1]], mode=mode, st=st, prob=prob)
            K.vjp(h, W, y, jv, mode=mode, st=st, prob=prob)
        K.row_reduce(h, W, st.lse, torch.randn(W.shape[0], device="cuda"), prob=prob)
        K.column_reduce(h, W, st.lse, u, prob=prob)
    finally:
        torch.cuda.set_sync_debug_mode("default")


@pytest.mark.gpu
def test_gpu_prepared_pair_captures_in_a_cuda_graph():
    h, W, y, kw = _gpu_problem(torch.bfloat16)
    prob = K.prepare(h, W, y, **kw)
    st = K.stats(h, W, y, prob=prob)
    v = torch.randn(W.shape[1] + W.shape[0], device="cuda")
    eager = K.vjp(h, W, y, K.jvp(h, W, y, v, mode="lora", st=st, prob=prob), mode="lora", st=st, prob=prob)
    torch.cuda.synchronize()
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        out = K.vjp(h, W, y, K.jvp(h, W, y, v, mode="lora", st=st, prob=prob), mode="lora", st=st, prob=prob)
    graph.replay()
    torch.cuda.synchronize()
    torch.testing.assert_close(out, eager, rtol=0, atol=0)  # deterministic: no atomics


@pytest.mark.gpu
def test_gpu_cg_early_exit_skips_the_passes_after_convergence():
    """Inside rosa_ext.cg.cg (compiled CUDA CG) the Triton passes of the matvec return zeros once the
    solve has converged, and the solution is the one of a solve stopped there."""
    from rosa_ext.cg import cg
    h, W, y, kw = _gpu_problem(torch.bfloat16, T=64)
    prob = K.prepare(h, W, y, **kw)
    st = K.stats(h, W, y, prob=prob)
    norms = []

    def matvec(x):
        u = K.jvp(h, W, y, x, mode="lora", st=st, prob=prob)
        norms.append(K.column_reduce(h, W, st.lse, u, prob=prob).norm())  # a Triton pass alone; read after
        return K.vjp(h, W, y, u, mode="lora", st=st, prob=prob)

    b = K.vjp(h, W, y, torch.randn(64, device="cuda"), mode="lora", st=st, prob=prob)
    res = cg(matvec, b, damping=1.0, max_iter=40, tol=1e-3)
    it = int(res.iterations)
    assert 0 < it < 40
    got = torch.stack(norms).tolist()
    assert all(n > 0 for n in got[:it]) and all(n == 0 for n in got[it:])
    short = cg(matvec, b, damping=1.0, max_iter=it, tol=1e-3)
    torch.testing.assert_close(res.x, short.x, rtol=1e-5, atol=1e-7)  # (CG's dots: float64 atomics)


@pytest.mark.gpu
def test_gpu_tf32x3_matches_ieee_at_fp32_level():
    h, W, y, kw = _gpu_problem(torch.float32)
    old = K.fp32_precision()
    out = {}
    try:
        for prec in ("ieee", "tf32x3"):
            K.set_fp32_precision(prec)
            st = K.stats(h, W, y, **kw)
            w = torch.ones(h.shape[0], device="cuda")
            out[prec] = (st.lse, st.pib, K.column_reduce(h, W, st.lse, w, **kw))
    finally:
        K.set_fp32_precision(old)
    lse64 = torch.logsumexp(h.double() @ W.double().T + 8.0 * (h.double() @ kw["lora_a"].double())[:, None]
                            * kw["lora_b"].double(), 1)
    for prec in out:
        torch.testing.assert_close(out[prec][0].double(), lse64, rtol=1e-6, atol=2e-5)
    torch.testing.assert_close(out["tf32x3"][2], out["ieee"][2], rtol=1e-4, atol=1e-6)
