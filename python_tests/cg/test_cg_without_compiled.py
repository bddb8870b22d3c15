"""Without the compiled extension (a failed or skipped build: benchmarks/run_gpu.sh goes on without it) the
package still works: ``rosa_ext.cg.cg`` and the "cg" solver run the Python loop, with the same result as
asking for it, silently on the CPU and with one warning for a CUDA right-hand side."""
import sys
import warnings

import pytest
import torch

import rosa_ext.cg as C
from rosa_ext import rosa_update


@pytest.fixture
def no_compiled(monkeypatch):
    """As if rosa_ext._C was never built: importing it (or the module that wraps it) raises ImportError."""
    monkeypatch.setitem(sys.modules, "rosa_ext._C", None)
    monkeypatch.setitem(sys.modules, "rosa_ext.cg.compiled", None)
    monkeypatch.setattr(C, "_warned", set())
    with pytest.raises(ImportError):
        import rosa_ext._C  # noqa: F401


def _head(T=12, d=10, V=60):
    g = torch.Generator().manual_seed(4)
    return (torch.randn(T, d, generator=g), torch.randn(V, d, generator=g) / d ** 0.5 * 2,
            torch.randint(0, V, (T,), generator=g), torch.randn(d, generator=g) / d ** 0.5)


@pytest.mark.parametrize("mode", ["hidden", "lora"])
def test_cg_update_runs_the_python_loop(mode, no_compiled, monkeypatch):
    real, calls = C.cg_python, []
    monkeypatch.setattr(C, "cg_python", lambda *a, **k: calls.append(1) or real(*a, **k))
    h, W, y, a = _head()
    kw = dict(mode=mode, solver="cg", backend="torch", lora_a=a if mode == "lora" else None)
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the CPU: no warning
        got = rosa_update(h, W, y, -1.0, **kw)
    assert calls == [1]  # rosa_ext.cg.cg fell back to the Python loop
    want = rosa_update(h, W, y, -1.0, cg_impl=real, **kw)
    assert got.solver == "cg" and got.iterations == want.iterations
    torch.testing.assert_close(got.update, want.update, rtol=0, atol=0)


class _FakeCuda(torch.Tensor):
    @property
    def device(self):
        return torch.device("cuda", 0)


def test_cuda_rhs_without_compiled_warns_once(no_compiled, monkeypatch):
    calls = []
    monkeypatch.setattr(C, "cg_python", lambda *a, **k: calls.append(1) or "python loop")
    b = torch.ones(3).as_subclass(_FakeCuda)
    with pytest.warns(RuntimeWarning, match="rosa_ext._C is not built.*Python loop"):
        assert C.cg(lambda v: v, b) == "python loop"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert C.cg(lambda v: v, b) == "python loop"
    assert len(calls) == 2
