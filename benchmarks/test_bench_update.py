"""pytest-benchmark suite: ``python -m pytest benchmarks/`` (not part of the test suite).

Times one full update and one JVP+VJP pair per method on the CPU preset's head
(d=256, V=32000) at T=256, or on CUDA when available (Qwen2.5-0.5B head, bf16).
Accuracy is checked beside each timing (relative error vs the exact fp64 dual solve).
"""
import pytest
import torch

from rosa_ext import bench

CUDA = torch.cuda.is_available()
DEVICE = "cuda" if CUDA else "cpu"
MODEL = "qwen2.5-0.5b" if CUDA else "cpu-small"
DTYPE = "bfloat16" if CUDA else "float32"
T = 1024 if CUDA else 256


@pytest.mark.parametrize("mode", ["lora", "hidden"])
@pytest.mark.parametrize("method", ["torch.func+CG", "rosa cg", "rosa dual", "rosa auto"])
def test_update(benchmark, method, mode):
    d, V = bench.MODELS[MODEL]
    inp = bench._inputs(d, V, T, mode, getattr(torch, DTYPE), DEVICE)
    update, _ = bench._runner(method, inp)

    def run():
        upd, _ = update()
        if CUDA:
            torch.cuda.synchronize()
        return upd

    upd = benchmark.pedantic(run, rounds=3, warmup_rounds=1)
    truth = bench._truth(inp)
    err = float((upd.double().cpu() - truth.cpu()).norm() / truth.norm())
    benchmark.extra_info.update(rel_error=err, T=T, d=d, V=V, dtype=DTYPE)
    assert err < 5e-2


@pytest.mark.parametrize("mode", ["lora", "hidden"])
@pytest.mark.parametrize("method", ["torch.func+CG", "rosa cg"])
def test_jvp_vjp_pair(benchmark, method, mode):
    d, V = bench.MODELS[MODEL]
    inp = bench._inputs(d, V, T, mode, getattr(torch, DTYPE), DEVICE)
    _, pair_factory = bench._runner(method, inp)
    pair = pair_factory()

    def run():
        out = pair()
        if CUDA:
            torch.cuda.synchronize()
        return out

    benchmark.pedantic(run, rounds=5, warmup_rounds=1)
    benchmark.extra_info.update(flops=4 * T * d * V)
