"""The one-pass plans on the Triton backend run the probability tiles (the GPU's default path, here
under TRITON_INTERPRET=1): their steps equal the torch plans' (backend="torch") to 1e-5 -- dual and
hidden CG, both modes, T in {1, 37, 70}, V not a multiple of the tile, repeated targets, a target in the
last partial tile, a LoRA term on and off, bias, batched and ragged -- and report the engine "triton"."""
import pytest
import torch

import rosa_ext

pytestmark = [pytest.mark.triton_interp, pytest.mark.usefixtures("one_torch_thread")]


def _inputs(T, mode, lora_term, B=None, V=203, d=24, seed=0):
    g = torch.Generator().manual_seed(seed + T)
    lead = (T,) if B is None else (B, T)
    h = torch.randn(*lead, d, generator=g)
    W = torch.randn(V, d, generator=g) * 2 / d ** 0.5
    y = torch.randint(0, V, lead, generator=g)
    y.view(-1)[0] = V - 1  # a target in the last (partial) tile
    if y.numel() > 3:
        y.view(-1)[2] = y.view(-1)[1]  # a repeated target
    kw = dict(hidden=h, weight=W, targets=y, bias=torch.randn(V, generator=g) * 0.1)
    if mode == "lora" or lora_term:
        kw.update(lora_a=torch.randn(*lead[:-1], d, generator=g) / d ** 0.5,
                  lora_b=torch.randn(*lead[:-1], V, generator=g) * 0.1)
    if B is not None:
        mask = torch.ones(B, T, dtype=torch.bool)
        mask[0, : T // 3] = False  # ragged
        kw["mask"] = mask
    return kw


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


@pytest.mark.parametrize("T", [1, 37, 70])
@pytest.mark.parametrize("mode,lora_term", [("hidden", False), ("hidden", True), ("lora", True)])
@pytest.mark.parametrize("solver", ["dual", "cg"])
def test_tile_pass_equals_the_torch_plans(T, mode, lora_term, solver):
    if solver == "cg" and mode == "lora":
        pytest.skip("matrix-free LoRA CG does not use the one pass")
    kw = _inputs(T, mode, lora_term)
    opts = dict(mode=mode, solver=solver, max_iter=200, tol=1e-9)
    want = rosa_ext.rosa_update(**kw, reward=-1.0, backend="torch", **opts)
    got = rosa_ext.rosa_update(**kw, reward=-1.0, backend="triton", **opts)
    assert got.backend == "triton" and want.backend == "torch"
    # the dual is exact: 1e-5; CG iterates in fp32 on two Jacobians equal to rounding, and its iterates
    # amplify that rounding by the system's condition (T = 70 > d = 24: J is rank-deficient): 3e-5
    assert _rel(got.update, want.update) < (1e-5 if solver == "dual" else 3e-5)


@pytest.mark.parametrize("mode", ["hidden", "lora"])
def test_tile_pass_batched_and_ragged(mode):
    kw = _inputs(9, mode, lora_term=False, B=3)
    r = torch.tensor([-1.0, 1.0, -0.5])
    want = rosa_ext.rosa_update(**kw, reward=r, mode=mode, backend="torch", solver="dual")
    got = rosa_ext.rosa_update(**kw, reward=r, mode=mode, backend="triton", solver="dual")
    assert got.backend == "triton"
    assert _rel(got.update, want.update) < 1e-5


def test_over_the_keep_budget_falls_back_to_the_torch_tiles():
    kw = _inputs(37, "lora", True)
    got = rosa_ext.rosa_update(**kw, reward=-1.0, mode="lora", backend="triton", solver="dual", keep_budget_bytes=0)
    assert got.backend == "torch"


def test_the_rule_of_the_tile_pass():
    """The Triton engine's passes run the tiles for float32 compute with P within the budget (hidden) or
    kept (LoRA) -- nothing else; the pass reports the engine that ran it."""
    from rosa_ext.backends import engine_for
    from rosa_ext.core.op import pack
    kw = _inputs(5, "hidden", False)
    common = dict(mode="hidden", lora_scale=8.0, bias=kw["bias"], beta=1.0, damping=0.3, max_iter=10, tol=1e-6,
                  solver="dual", backend="triton")
    prob, _ = pack(kw["hidden"], kw["weight"], kw["targets"], -1.0, **common)
    tri, tor = engine_for("triton", prob.weight.device), engine_for("torch", prob.weight.device)
    assert tri.hidden_pass(prob).engine == "triton" and tor.hidden_pass(prob).engine == "torch"
    p64, _ = pack(kw["hidden"].double(), kw["weight"].double(), kw["targets"], -1.0,
                  **dict(common, bias=kw["bias"].double()))
    assert tri.hidden_pass(p64).engine == "torch"
    assert tri.hidden_pass(prob, budget_bytes=5 * 203 * 4 - 1).engine == "torch"
    assert tri.gram_pass(prob, keep=False).engine == "triton"
    assert tri.gram_pass(prob, keep=True, budget_bytes=5 * 203 * 4 - 1).engine == "torch"


@pytest.mark.parametrize("mode", ["hidden", "lora"])
def test_the_triton_dual_runs_one_logits_pass(mode, monkeypatch):
    """The default GPU path (here under the interpreter): the dual on the Triton engine launches the
    probability-tile kernel ONCE -- it computes the row statistics itself -- and no stats kernel, no
    streaming reduction over W (the LoRA VJP reads the kept tiles)."""
    from rosa_ext.kernels import prob_tiles, reductions, stats_pass

    launches = []
    real = prob_tiles._prob_tile_kernel

    class Counting:
        configs = real.configs

        def __getitem__(self, grid):
            launches.append(grid)
            return real[grid]

    class Refused:
        def __init__(self, name, kernel):
            self.name, self.configs = name, kernel.configs

        def __getitem__(self, grid):
            raise AssertionError(f"{self.name} was launched")

    monkeypatch.setattr(prob_tiles, "_prob_tile_kernel", Counting())
    for mod, name in ((stats_pass, "_stats_kernel"), (reductions, "_row_kernel"), (reductions, "_column_kernel")):
        monkeypatch.setattr(mod, name, Refused(name, getattr(mod, name)))
    kw = _inputs(37, mode, lora_term=mode == "lora")
    got = rosa_ext.rosa_update(**kw, reward=-1.0, mode=mode, backend="triton", solver="dual")
    assert got.backend == "triton" and len(launches) == 1
    monkeypatch.undo()
    want = rosa_ext.rosa_update(**kw, reward=-1.0, mode=mode, backend="torch", solver="dual")
    assert _rel(got.update, want.update) < 1e-5
