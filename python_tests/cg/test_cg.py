"""The compiled CG of rosa_ext._C: against dense solves and numpy,
edge cases, errors; on CUDA (when lent) no host sync in the loop and graph capture."""
import numpy as np
import pytest
import torch
from _helpers import make_inputs

from rosa_ext import _C, rosa_update
from rosa_ext.cg import cg, cg_python
from rosa_ext.cg.compiled import cg_compiled


def _spd(n, cond=None, dtype=torch.float64, seed=0):
    g = torch.Generator().manual_seed(seed)
    q, _ = torch.linalg.qr(torch.randn(n, n, generator=g, dtype=torch.float64))
    if cond is None:
        ev = torch.rand(n, generator=g, dtype=torch.float64) + 0.1
    else:  # eigenvalues log-spaced over [1/cond, 1]
        ev = torch.logspace(-np.log10(cond), 0, n, dtype=torch.float64)
    return ((q * ev) @ q.T).to(dtype)


def test_extension_is_built():
    # the import at the top of this file already fails the module if _C is missing
    assert callable(_C.cg_cpu) and isinstance(_C.has_cuda(), bool)
    assert _C.__version__ not in ("", "unknown")
    if _C.has_cuda():
        assert callable(_C.cg_cuda_step) and _C.CG_STATE_SIZE >= 7
        assert "80" in _C.cuda_architectures and "90" in _C.cuda_architectures


@pytest.mark.parametrize("dtype,tol,atol", [(torch.float64, 1e-12, 1e-9), (torch.float32, 1e-6, 1e-4)])
@pytest.mark.parametrize("damping", [0.0, 0.3])
def test_random_spd_matches_dense_and_numpy(dtype, tol, atol, damping):
    n = 60
    A = _spd(n, dtype=dtype)
    b = torch.randn(n, dtype=dtype)
    res = cg_compiled(lambda v: A @ v, b, damping=damping, max_iter=500, tol=tol)
    dense = torch.linalg.solve(A.double() + damping * torch.eye(n, dtype=torch.float64), b.double())
    npx = np.linalg.solve(A.double().numpy() + damping * np.eye(n), b.double().numpy())
    assert res.x.dtype == dtype and res.x.shape == (n,)
    torch.testing.assert_close(res.x.double(), dense, rtol=0, atol=atol)
    np.testing.assert_allclose(res.x.double().numpy(), npx, atol=atol)
    assert res.residual <= tol * 1.01 and 0 < res.iterations <= 500


def test_same_iterates_as_python_cg():
    A, b = _spd(40), torch.randn(40, dtype=torch.float64)
    for it in (1, 3, 10):
        a = cg_compiled(lambda v: A @ v, b, damping=0.1, max_iter=it, tol=0.0)
        p = cg_python(lambda v: A @ v, b, damping=0.1, max_iter=it, tol=0.0)
        assert a.iterations == p.iterations == it
        torch.testing.assert_close(a.x, p.x, rtol=1e-10, atol=1e-12)


def test_ill_conditioned():
    n = 80
    A, b = _spd(n, cond=1e8), torch.randn(n, dtype=torch.float64)
    res = cg_compiled(lambda v: A @ v, b, damping=1e-3, max_iter=2000, tol=1e-10)
    want = torch.linalg.solve(A + 1e-3 * torch.eye(n, dtype=torch.float64), b)
    torch.testing.assert_close(res.x, want, rtol=1e-6, atol=1e-6)


def test_zero_rhs_max_iter_zero_and_one():
    A = _spd(10)
    z = cg_compiled(lambda v: A @ v, torch.zeros(10, dtype=torch.float64), max_iter=5)
    assert z.iterations == 0 and z.residual == 0.0 and torch.count_nonzero(z.x) == 0
    b = torch.randn(10, dtype=torch.float64)
    r0 = cg_compiled(lambda v: A @ v, b, max_iter=0)
    assert r0.iterations == 0 and torch.count_nonzero(r0.x) == 0 and r0.residual == pytest.approx(1.0)
    r1 = cg_compiled(lambda v: A @ v, b, max_iter=1, tol=0.0)
    alpha = (b @ b) / (b @ (A @ b))  # one step of steepest descent
    assert r1.iterations == 1
    torch.testing.assert_close(r1.x, alpha * b)


def test_tolerance_reached_early():
    A = torch.diag(torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0], dtype=torch.float64))  # 2 distinct eigenvalues
    res = cg_compiled(lambda v: A @ v, torch.ones(5, dtype=torch.float64), max_iter=50, tol=1e-10)
    assert res.iterations == 2 and res.residual < 1e-10


def test_initial_guess():
    A, b = _spd(20), torch.randn(20, dtype=torch.float64)
    exact = torch.linalg.solve(A, b)
    res = cg_compiled(lambda v: A @ v, b, max_iter=50, tol=1e-12, x0=exact.clone())
    assert res.iterations == 0
    torch.testing.assert_close(res.x, exact)


def test_nan_in_operator_is_a_clear_error_not_a_hang():
    b = torch.randn(8, dtype=torch.float64)
    with pytest.raises(FloatingPointError, match="NaN/Inf"):
        cg_compiled(lambda v: v * float("nan"), b, max_iter=10_000_000)
    with pytest.raises(FloatingPointError, match="NaN/Inf"):
        cg_compiled(lambda v: v, torch.full((8,), float("inf"), dtype=torch.float64), max_iter=5)


def test_matvec_errors_propagate():
    b = torch.randn(8, dtype=torch.float64)

    def broken(v):
        raise KeyError("inside matvec")

    with pytest.raises(KeyError, match="inside matvec"):
        cg_compiled(broken, b, max_iter=3)
    with pytest.raises(ValueError, match="shape"):
        cg_compiled(lambda v: v[:-1], b, max_iter=3)
    with pytest.raises(ValueError, match="float64"):  # no silent cast of the operator's output
        cg_compiled(lambda v: v.float(), b, max_iter=3)
    with pytest.raises(ValueError, match="matvec must return a tensor"):
        cg_compiled(lambda v: v.numpy(), b, max_iter=3)


def test_callback_runs_without_holding_up_other_threads():
    """The C++ loop releases the GIL; the matvec callback re-acquires it (and may run torch ops)."""
    import threading
    A, b = _spd(50), torch.randn(50, dtype=torch.float64)
    out = {}

    def solve(k):
        out[k] = cg_compiled(lambda v: A @ v, b, damping=0.1, max_iter=200, tol=1e-12)

    threads = [threading.Thread(target=solve, args=(k,)) for k in range(4)]
    for t in threads:
        t.start()
    for t in threads:
        t.join()
    want = torch.linalg.solve(A + 0.1 * torch.eye(50, dtype=torch.float64), b)
    for k in range(4):
        torch.testing.assert_close(out[k].x, want, rtol=1e-9, atol=1e-10)


@pytest.mark.parametrize("b,exc,match", [
    (torch.randn(4, dtype=torch.float16), TypeError, "float32 or float64"),
    (torch.randn(4, 2, dtype=torch.float64), ValueError, "1-D"),
    (torch.randn(4, dtype=torch.float64).to("meta"), ValueError, "cpu or cuda"),
])
def test_bad_inputs(b, exc, match):
    with pytest.raises(exc, match=match):
        cg_compiled(lambda v: v, b)


def test_bad_x0_and_options():
    b = torch.randn(4, dtype=torch.float64)
    with pytest.raises(ValueError, match="x0"):
        cg_compiled(lambda v: v, b, x0=torch.zeros(4, dtype=torch.float32))
    with pytest.raises(ValueError, match="x0"):
        cg_compiled(lambda v: v, b, x0=torch.zeros(5, dtype=torch.float64))
    with pytest.raises(ValueError, match="tol"):
        cg_compiled(lambda v: v, b, tol=float("nan"))
    with pytest.raises(ValueError, match="damping"):
        cg_compiled(lambda v: v, b, damping=-1.0)
    with pytest.raises(ValueError, match="max_iter"):
        cg_compiled(lambda v: v, b, max_iter=-1)


def test_noncontiguous_b_and_float32_same_iterates_as_float64():
    A = _spd(30)
    b2 = torch.randn(30, 2, dtype=torch.float64)
    res = cg_compiled(lambda v: A @ v, b2[:, 1], damping=0.2, max_iter=200, tol=1e-12)
    torch.testing.assert_close(res.x, torch.linalg.solve(A + 0.2 * torch.eye(30, dtype=torch.float64), b2[:, 1]))
    r32 = cg_compiled(lambda v: A.float() @ v, b2[:, 1].float(), damping=0.2, max_iter=5, tol=0.0)
    r64 = cg_compiled(lambda v: A @ v, b2[:, 1], damping=0.2, max_iter=5, tol=0.0)
    assert r32.x.dtype == torch.float32 and r32.iterations == r64.iterations == 5
    torch.testing.assert_close(r32.x.double(), r64.x, rtol=1e-4, atol=1e-5)


def test_public_cg_uses_the_extension(monkeypatch):
    calls = []
    real = _C.cg_cpu
    monkeypatch.setattr(_C, "cg_cpu", lambda *a, **k: calls.append(1) or real(*a, **k))
    A, b = _spd(6), torch.randn(6, dtype=torch.float64)
    cg(lambda v: A @ v, b, max_iter=10)
    assert calls, "rosa_ext.cg.cg must run the compiled solver when it is built"


@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_rosa_update_cg_runs_compiled_and_matches_dual(mode, monkeypatch):
    calls = []
    real = _C.cg_cpu
    monkeypatch.setattr(_C, "cg_cpu", lambda *a, **k: calls.append(1) or real(*a, **k))
    inp = make_inputs(mode=mode, T=9)
    a = rosa_update(**inp, reward=-1.0, mode=mode, solver="cg", max_iter=500, tol=1e-13)
    d = rosa_update(**inp, reward=-1.0, mode=mode, solver="dual")
    assert calls and a.solver == "cg" and a.iterations > 0
    torch.testing.assert_close(a.update, d.update, rtol=1e-8, atol=1e-10)


# -- CUDA (run when a GPU is lent) ------------------------------------------------------------
# On a CUDA machine these fail (not skip) if _C was built without nvcc: they test the CUDA solver.


def _need_cuda_ext():
    assert _C.has_cuda(), "rosa_ext._C was built without CUDA (nvcc not found at install time)"


@pytest.mark.gpu
@pytest.mark.parametrize("dtype,tol,atol", [(torch.float64, 1e-10, 1e-8), (torch.float32, 1e-5, 1e-3)])
def test_cuda_matches_dense_and_cpu(dtype, tol, atol):
    _need_cuda_ext()
    n = 300
    A, b = _spd(n, dtype=dtype), torch.randn(n, dtype=dtype)
    Ac, bc = A.cuda(), b.cuda()
    res = cg_compiled(lambda v: Ac @ v, bc, damping=0.1, max_iter=300, tol=tol)
    assert res.x.device == bc.device and res.x.dtype == dtype
    assert isinstance(res.iterations, torch.Tensor) and res.iterations.device == bc.device
    want = torch.linalg.solve(A.double() + 0.1 * torch.eye(n, dtype=torch.float64), b.double())
    torch.testing.assert_close(res.x.double().cpu(), want, rtol=0, atol=atol)
    assert 0 < int(res.iterations) < 300 and float(res.residual) <= tol * 1.01
    # same iterates as the C++ solver (fixed iteration count, tol = 0)
    g = cg_compiled(lambda v: Ac @ v, bc, damping=0.1, max_iter=7, tol=0.0)
    c = cg_compiled(lambda v: A @ v, b, damping=0.1, max_iter=7, tol=0.0)
    assert int(g.iterations) == c.iterations == 7
    torch.testing.assert_close(g.x.cpu(), c.x, rtol=1e-4 if dtype == torch.float32 else 1e-9,
                               atol=1e-5 if dtype == torch.float32 else 1e-11)


@pytest.mark.gpu
def test_cuda_edge_cases():
    _need_cuda_ext()
    A = _spd(10).cuda()
    z = cg_compiled(lambda v: A @ v, torch.zeros(10, dtype=torch.float64, device="cuda"), max_iter=5,
                    x0=torch.ones(10, dtype=torch.float64, device="cuda"))
    assert int(z.iterations) == 0 and float(z.residual) == 0.0 and int(torch.count_nonzero(z.x)) == 0
    b = torch.randn(10, dtype=torch.float64, device="cuda")
    r0 = cg_compiled(lambda v: A @ v, b, max_iter=0)
    assert int(r0.iterations) == 0 and int(torch.count_nonzero(r0.x)) == 0
    assert float(r0.residual) == pytest.approx(1.0)
    exact = torch.linalg.solve(A, b)
    rx = cg_compiled(lambda v: A @ v, b, max_iter=20, tol=1e-10, x0=exact)
    assert int(rx.iterations) == 0
    torch.testing.assert_close(rx.x, exact)
    D = torch.tensor([1.0, 1.0, 1.0, 2.0, 2.0], dtype=torch.float64, device="cuda")
    early = cg_compiled(lambda v: D * v, torch.ones(5, dtype=torch.float64, device="cuda"), max_iter=50, tol=1e-10)
    assert int(early.iterations) == 2  # two distinct eigenvalues; later launches were frozen
    torch.testing.assert_close(early.x, 1 / D)


@pytest.mark.gpu
def test_cuda_loop_has_no_host_sync():
    _need_cuda_ext()
    from rosa_ext.cg.compiled import cg_cuda_launch, finish_cuda
    A = _spd(500).cuda()
    b = torch.randn(500, dtype=torch.float64, device="cuda")
    cg_cuda_launch(lambda v: A @ v, b, damping=0.1, max_iter=2, tol=1e-10)  # load the kernels first
    torch.cuda.synchronize()
    torch.cuda.set_sync_debug_mode("error")
    try:
        x, state = cg_cuda_launch(lambda v: A @ v, b, damping=0.1, max_iter=40, tol=1e-10)
        res = finish_cuda(x, state, check_finite=False)
    finally:
        torch.cuda.set_sync_debug_mode(0)
    want = torch.linalg.solve(A + 0.1 * torch.eye(500, dtype=torch.float64, device="cuda"), b)
    torch.testing.assert_close(res.x, want, rtol=1e-6, atol=1e-6)
    assert 0 < int(res.iterations) < 40


@pytest.mark.gpu
def test_cuda_nan_flag_and_errors():
    _need_cuda_ext()
    b = torch.randn(64, dtype=torch.float64, device="cuda")
    with pytest.raises(FloatingPointError, match="NaN/Inf"):
        cg_compiled(lambda v: v * float("nan"), b, max_iter=5)
    with pytest.raises(FloatingPointError, match="NaN/Inf"):
        cg_compiled(lambda v: v, torch.full((8,), float("inf"), dtype=torch.float64, device="cuda"), max_iter=5)
    with pytest.raises(ValueError, match="matvec must return"):
        cg_compiled(lambda v: v.cpu(), b, max_iter=2)
    with pytest.raises(ValueError, match="x0"):
        cg_compiled(lambda v: v, b, x0=torch.zeros(64, dtype=torch.float64))


@pytest.mark.gpu
def test_cuda_graph_capture_and_replay():
    _need_cuda_ext()
    from rosa_ext.cg.compiled import STATE_ITERS, cg_cuda_launch
    n = 256
    A = _spd(n).cuda()
    b = torch.randn(n, dtype=torch.float64, device="cuda")
    x = torch.empty_like(b)
    state = torch.empty(_C.CG_STATE_SIZE, dtype=torch.float64, device="cuda")
    s = torch.cuda.Stream()
    s.wait_stream(torch.cuda.current_stream())
    with torch.cuda.stream(s):  # warm-up outside the capture
        cg_cuda_launch(lambda v: A @ v, b, damping=0.1, max_iter=60, tol=1e-12, out=x, state=state)
    torch.cuda.current_stream().wait_stream(s)
    graph = torch.cuda.CUDAGraph()
    with torch.cuda.graph(graph):
        cg_cuda_launch(lambda v: A @ v, b, damping=0.1, max_iter=60, tol=1e-12, out=x, state=state)
    eye = torch.eye(n, dtype=torch.float64, device="cuda")
    for k in range(3):  # replay with new right-hand sides in the same buffer (the last: b = 0)
        b.copy_(torch.randn(n, dtype=torch.float64, device="cuda") if k < 2 else torch.zeros_like(b))
        graph.replay()
        torch.testing.assert_close(x, torch.linalg.solve(A + 0.1 * eye, b), rtol=1e-6, atol=1e-6)
        iters = int(state[STATE_ITERS])
        assert (0 < iters < 60) if k < 2 else iters == 0  # stopped early on the device


@pytest.mark.gpu
@pytest.mark.parametrize("backend", ["torch", "triton"])
@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_cuda_rosa_update_cg_runs_compiled_and_matches_dual(mode, backend, monkeypatch):
    _need_cuda_ext()
    if backend == "triton":
        pytest.importorskip("triton")
    calls = []
    real = _C.cg_cuda_step
    monkeypatch.setattr(_C, "cg_cuda_step", lambda *a, **k: calls.append(1) or real(*a, **k))
    inp = {k: (v.cuda() if isinstance(v, torch.Tensor) else v)
           for k, v in make_inputs(mode=mode, T=9, dtype=torch.float32).items()}
    a = rosa_update(**inp, reward=-1.0, mode=mode, solver="cg", backend=backend, max_iter=60, tol=1e-6)
    d = rosa_update(**inp, reward=-1.0, mode=mode, solver="dual", backend=backend)
    assert calls and a.solver == "cg" and 0 < a.iterations < 60
    torch.testing.assert_close(a.update, d.update, rtol=1e-3, atol=1e-4)
