"""No silent slow path, and every Triton launch on its tensors' device (rosa_ext.kernels, rosa_ext.backends):

- ``tile_gemms.mm_f32``: a CUDA out-of-memory error is re-raised (never taken for "out_dtype unsupported"),
  an unsupported ``out_dtype`` widens with ONE warning, an error after ``out_dtype`` worked is re-raised
  (CUDA tensors faked by a subclass whose ``device`` says cuda; ``torch.mm`` replaced);
- the Triton engine's hand-overs to the torch engine (a budget below one token's tiles, float64) warn once
  per reason, under the interpreter, with the torch engine's result;
- the device guard: every autotuned kernel's launch enters ``torch.cuda.device`` of its first tensor
  (a fake context on the CPU), a no-op for CPU tensors; the multi-GPU check itself is GPU-marked.
"""
import contextlib
import warnings

import pytest
import torch

pytest.importorskip("triton")

from triton.runtime.jit import KernelInterface  # noqa: E402

from rosa_ext import rosa_update  # noqa: E402
from rosa_ext.kernels import _tiles, epilogue, matvec, prob_tiles, reductions, stats_pass, tile_gemms  # noqa: E402


class _FakeCuda(torch.Tensor):
    """A CPU tensor that says it is on cuda:1 (the code under test only reads ``.device``)."""

    @property
    def device(self):
        return torch.device("cuda", 1)


def _bf16_pair():
    g = torch.Generator().manual_seed(0)
    a = torch.randn(5, 7, generator=g).to(torch.bfloat16)
    b = torch.randn(7, 3, generator=g).to(torch.bfloat16)
    return a.as_subclass(_FakeCuda), b.as_subclass(_FakeCuda), a.float() @ b.float()


@pytest.fixture
def fresh_state(monkeypatch):
    monkeypatch.setitem(tile_gemms._OUT_DTYPE_OK, "cuda", None)
    monkeypatch.setattr(tile_gemms, "_warned", set())


def _mm_raising(exc, calls):
    real = torch.mm

    def mm(a, b, **kw):
        if "out_dtype" in kw:
            calls.append(kw["out_dtype"])
            if exc is not None:
                raise exc
            return real(a.float().as_subclass(torch.Tensor), b.float().as_subclass(torch.Tensor))
        return real(a, b)
    return mm


def test_mm_f32_reraises_cuda_out_of_memory(monkeypatch, fresh_state):
    a, b, _ = _bf16_pair()
    calls = []
    monkeypatch.setattr(torch, "mm", _mm_raising(torch.OutOfMemoryError("CUDA out of memory. Tried to allocate"), calls))
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        with pytest.raises(torch.OutOfMemoryError):
            tile_gemms.mm_f32(a, b)
    assert calls == [torch.float32]
    assert tile_gemms._OUT_DTYPE_OK["cuda"] is None  # not marked unsupported: the next GEMM tries again
    with pytest.raises(torch.cuda.OutOfMemoryError):
        tile_gemms.mm_f32(a, b)
    assert len(calls) == 2


def test_mm_f32_unsupported_out_dtype_widens_with_one_warning(monkeypatch, fresh_state):
    a, b, want = _bf16_pair()
    calls = []
    monkeypatch.setattr(torch, "mm", _mm_raising(TypeError("mm() got an unexpected keyword argument 'out_dtype'"), calls))
    with pytest.warns(RuntimeWarning, match="out_dtype.*widen"):
        got = tile_gemms.mm_f32(a, b)
    torch.testing.assert_close(got.as_subclass(torch.Tensor), want, rtol=0, atol=0)
    assert tile_gemms._OUT_DTYPE_OK["cuda"] is False
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # once per process: no second warning, no second try
        tile_gemms.mm_f32(a, b)
    assert calls == [torch.float32]


def test_mm_f32_error_after_out_dtype_worked_is_reraised(monkeypatch, fresh_state):
    a, b, want = _bf16_pair()
    calls = []
    monkeypatch.setattr(torch, "mm", _mm_raising(None, calls))
    torch.testing.assert_close(tile_gemms.mm_f32(a, b).as_subclass(torch.Tensor), want)
    assert tile_gemms._OUT_DTYPE_OK["cuda"] is True
    monkeypatch.setattr(torch, "mm", _mm_raising(RuntimeError("CUDA error: an illegal memory access"), calls))
    with pytest.raises(RuntimeError, match="illegal memory access"):
        tile_gemms.mm_f32(a, b)
    assert tile_gemms._OUT_DTYPE_OK["cuda"] is True


def test_mm_f32_off_cuda_widens_silently(fresh_state):
    g = torch.Generator().manual_seed(1)
    a, b = torch.randn(4, 6, generator=g).bfloat16(), torch.randn(6, 2, generator=g).bfloat16()
    with warnings.catch_warnings():
        warnings.simplefilter("error")  # the CPU's only route (exact widening), not a fallback
        torch.testing.assert_close(tile_gemms.mm_f32(a, b), a.float() @ b.float(), rtol=0, atol=0)
    assert tile_gemms._OUT_DTYPE_OK["cuda"] is None


# -- the Triton engine's hand-overs ------------------------------------------------------------------
def _head(T=6, d=8, V=40, dtype=torch.float32):
    g = torch.Generator().manual_seed(3)
    h = torch.randn(T, d, generator=g, dtype=dtype)
    W = (torch.randn(V, d, generator=g) / d ** 0.5 * 2).to(dtype)
    y = torch.randint(0, V, (T,), generator=g)
    a = torch.randn(d, generator=g, dtype=dtype) / d ** 0.5
    return h, W, y, a


@pytest.mark.triton_interp
@pytest.mark.parametrize("mode", ["hidden", "lora"])
def test_triton_engine_over_budget_warns_once_and_matches_torch(mode, fresh_state):
    h, W, y, a = _head()
    kw = dict(mode=mode, solver="dual", lora_a=a if mode == "lora" else None, damping=0.1, damping_mode="absolute")
    with pytest.warns(RuntimeWarning, match="token\\(s\\)' probability tiles .* fit the budget") as rec:
        step = rosa_update(h, W, y, -1.0, backend="triton", keep_budget_bytes=64, **kw)
    assert len([w for w in rec if "budget" in str(w.message)]) == 1
    assert step.backend == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        again = rosa_update(h, W, y, -1.0, backend="triton", keep_budget_bytes=64, **kw)
        within = rosa_update(h, W, y, -1.0, backend="triton", **kw)  # the tile path: no warning
    assert within.backend == "triton"
    ref = rosa_update(h, W, y, -1.0, backend="torch", **kw)
    torch.testing.assert_close(again.update, ref.update, rtol=0, atol=0)
    torch.testing.assert_close(within.update, ref.update, rtol=3e-5, atol=3e-5)


@pytest.mark.triton_interp
def test_triton_engine_float64_warns_once(fresh_state):
    h, W, y, _ = _head(dtype=torch.float64)
    with pytest.warns(RuntimeWarning, match="float64"):
        step = rosa_update(h, W, y, -1.0, mode="hidden", backend="triton")
    assert step.backend == "torch"
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        rosa_update(h, W, y, -1.0, mode="hidden", backend="triton")


# -- the device guard -------------------------------------------------------------------------------
class _Recorder:
    """Stands in for ``torch.cuda.device``: records the devices entered and what ran inside."""

    def __init__(self):
        self.events = []

    def __call__(self, dev):
        rec = self

        @contextlib.contextmanager
        def ctx():
            rec.events.append(("enter", torch.device(dev)))
            yield
            rec.events.append(("exit", torch.device(dev)))
        return ctx()


class _FakeKernel(KernelInterface):
    def __init__(self, events):
        self.events = events

    def run(self, *args, grid, warmup, **kwargs):
        self.events.append(("run", grid))
        return "ran"


def test_guarded_launch_enters_the_first_tensors_device(monkeypatch):
    rec = _Recorder()
    monkeypatch.setattr(torch.cuda, "device", rec)
    k = _tiles.guard_launches(_FakeKernel(rec.events))
    x = torch.zeros(3).as_subclass(_FakeCuda)
    assert k[(1,)](7, x, torch.zeros(2), N=3) == "ran"
    assert rec.events == [("enter", torch.device("cuda", 1)), ("run", (1,)), ("exit", torch.device("cuda", 1))]
    assert _tiles.guard_launches(k) is k and k.run.device_guarded  # idempotent
    rec.events.clear()
    assert k[(2,)](torch.zeros(3), out=torch.zeros(1)) == "ran"  # CPU tensors (the interpreter): no guard
    assert rec.events == [("run", (2,))]
    rec.events.clear()
    k[(3,)](out=x)  # a tensor passed by keyword only
    assert rec.events[0] == ("enter", torch.device("cuda", 1))


def test_every_launched_kernel_is_guarded():
    """Every kernel the package launches (module-level ``*_kernel`` of rosa_ext.kernels) carries the guard:
    they are all made by ``_tiles.autotuned``."""
    kernels = {f"{m.__name__}.{n}": obj for m in (stats_pass, prob_tiles, reductions, matvec, epilogue)
               for n, obj in vars(m).items() if n.endswith("_kernel") and isinstance(obj, KernelInterface)}
    assert len(kernels) >= 7, kernels
    unguarded = [n for n, k in kernels.items() if not getattr(k.run, "device_guarded", False)]
    assert not unguarded


@pytest.mark.gpu
def test_a_head_on_the_second_gpu_launches_there():
    """A head on cuda:1 while cuda:0 is current (``device_map="auto"``): the Triton update runs there and
    matches the same update with cuda:1 current."""
    if torch.cuda.device_count() < 2:
        pytest.skip("needs two CUDA devices")
    h, W, y, a = _head(T=64, d=64, V=3000)
    dev = torch.device("cuda", 1)
    args = (h.to(dev).bfloat16(), W.to(dev).bfloat16(), y.to(dev), -1.0)
    for mode, kw in (("hidden", {}), ("lora", dict(lora_a=a.to(dev).bfloat16()))):
        torch.cuda.set_device(0)
        got = rosa_update(*args, mode=mode, backend="triton", **kw)
        torch.cuda.synchronize(dev)
        with torch.cuda.device(dev):
            want = rosa_update(*args, mode=mode, backend="triton", **kw)
        assert got.update.device == dev and got.backend == "triton"
        torch.testing.assert_close(got.update, want.update, rtol=1e-6, atol=1e-6)
