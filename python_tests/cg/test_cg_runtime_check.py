"""The runtime check of the compiled CUDA CG: a driver that cannot run the extension's CUDA runtime
makes ``cg`` fall back to the Python loop with a warning (instead of raising mid-update).

No GPU here: the probe and the device are monkeypatched; the real probe runs in the GPU test below.
"""
import warnings

import pytest
import torch

import rosa_ext.cg as cg_pkg
from rosa_ext import _C
from rosa_ext.cg import cg_python
from rosa_ext.cg import compiled as C

INSUFFICIENT = "cg (CUDA) cudaGetDevice: CUDA driver version is insufficient for CUDA runtime version"


@pytest.fixture
def fresh_cache(monkeypatch):
    monkeypatch.setattr(C, "_RUNNABLE", {})
    monkeypatch.setattr(cg_pkg, "_warned", set())


def _spd(n=6):
    g = torch.Generator().manual_seed(0)
    M = torch.randn(n, n, generator=g, dtype=torch.float64)
    return M @ M.T + n * torch.eye(n, dtype=torch.float64), torch.randn(n, generator=g, dtype=torch.float64)


def test_failed_probe_is_reported_once_per_device_and_cached(monkeypatch, fresh_cache):
    calls = []

    def probe(idx):
        calls.append(idx)
        raise RuntimeError(INSUFFICIENT)

    monkeypatch.setattr(_C, "has_cuda", lambda: True)
    monkeypatch.setattr(C, "_probe", probe)
    monkeypatch.setattr(C, "_driver_version", lambda: 12020)
    r = C.cuda_unusable_reason(torch.device("cuda", 1))
    assert r is not None and INSUFFICIENT in r and "cuda:1" in r and "12020" in r
    assert C.cuda_unusable_reason(torch.device("cuda", 1)) == r
    assert calls == [1]  # probed once
    monkeypatch.setattr(C, "_probe", lambda idx: calls.append(idx))
    assert C.cuda_unusable_reason(torch.device("cuda", 0)) is None  # another device: its own probe, passed
    assert calls == [1, 0]


def test_no_cuda_build_is_a_reason_without_probing(monkeypatch, fresh_cache):
    monkeypatch.setattr(_C, "has_cuda", lambda: False)
    monkeypatch.setattr(C, "_probe", lambda idx: pytest.fail("probed a build without CUDA"))
    assert "built without CUDA" in C.cuda_unusable_reason(torch.device("cuda", 0))


def test_nothing_is_probed_during_graph_capture(monkeypatch, fresh_cache):
    monkeypatch.setattr(_C, "has_cuda", lambda: True)
    monkeypatch.setattr(C, "_capturing", lambda: True)
    monkeypatch.setattr(C, "_probe", lambda idx: pytest.fail("probed inside a capture"))
    assert C.cuda_unusable_reason(torch.device("cuda", 0)) is None
    assert C._RUNNABLE == {}  # not cached: the next call outside a capture probes


def test_cg_falls_back_to_the_python_loop_with_a_warning(monkeypatch, fresh_cache):
    """The wiring in ``cg``: an unusable compiled solver (as a failed probe reports it) -> cg_python,
    one warning per reason; the compiled solver is never called."""
    A, b = _spd()
    reason = "the compiled CUDA CG of rosa_ext._C cannot run on cuda:0 (RuntimeError: " + INSUFFICIENT + ")"
    monkeypatch.setattr(cg_pkg, "_compiled_unusable", lambda b: reason)
    monkeypatch.setattr(C, "cg_compiled", lambda *a, **k: pytest.fail("the compiled solver was called"))
    with pytest.warns(RuntimeWarning, match="insufficient.*Python loop"):
        got = cg_pkg.cg(lambda v: A @ v, b, damping=0.1, max_iter=50, tol=1e-12)
    want = cg_python(lambda v: A @ v, b, damping=0.1, max_iter=50, tol=1e-12)
    assert torch.equal(got.x, want.x) and got.iterations == want.iterations
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the same reason again: no second warning
        cg_pkg.cg(lambda v: A @ v, b, damping=0.1, max_iter=50, tol=1e-12)


def test_cpu_tensors_never_consult_the_cuda_check(monkeypatch, fresh_cache):
    monkeypatch.setattr(C, "cuda_unusable_reason", lambda d: pytest.fail("checked CUDA for a CPU tensor"))
    assert cg_pkg._compiled_unusable(torch.ones(3, dtype=torch.float64)) is None
    A, b = _spd()
    res = cg_pkg.cg(lambda v: A @ v, b, damping=0.1, max_iter=50, tol=1e-12)
    torch.testing.assert_close(res.x, torch.linalg.solve(A + 0.1 * torch.eye(6, dtype=torch.float64), b))


def test_reason_when_the_driver_version_cannot_be_read(monkeypatch, fresh_cache):
    """The reason still names the failure and the fix when libcuda's version is not readable."""
    monkeypatch.setattr(_C, "has_cuda", lambda: True)
    monkeypatch.setattr(C, "_probe", lambda idx: (_ for _ in ()).throw(RuntimeError(INSUFFICIENT)))
    monkeypatch.setattr(C, "_driver_version", lambda: None)
    r = C.cuda_unusable_reason(torch.device("cuda", 0))
    assert "driver unknown" in r and "rebuild" in r


@pytest.mark.gpu
def test_gpu_probe_passes_where_the_cuda_tests_run(fresh_cache):
    """On a lent GPU (with a driver recent enough, as the CUDA CG tests assume) the real probe passes."""
    assert _C.has_cuda(), "rosa_ext._C was built without CUDA (nvcc not found at install time)"
    assert C.cuda_unusable_reason(torch.device("cuda", torch.cuda.current_device())) is None
