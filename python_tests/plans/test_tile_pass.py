"""The one-pass plans on the Triton backend run the probability tiles (the GPU's default path, here
under TRITON_INTERPRET=1): their steps equal the torch plans' (backend="torch") to 1e-5 -- dual and
CG (hidden mode on J, LoRA matrix-free over the kept tiles), both modes, T in {1, 37, 70}, V not a
multiple of the tile, repeated targets, a target in the last partial tile, a LoRA term on and off,
bias, batched and ragged -- and report the engine "triton"."""
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
    """(Matrix-free LoRA CG: its split stats come from the one pass, its off-target reductions are GEMVs
    over the kept tiles.)"""
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
    """The Triton engine's passes run the tiles for float32 compute whose budget holds one token's tiles
    (two for a Gram that must be cut: in blocks beyond that) -- nothing else; the pass reports the engine
    that ran it."""
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
    # over the budget: token blocks, still the Triton engine; below one token's tiles (the budget less its
    # quarter of K-split scratch): the torch engine
    assert tri.hidden_pass(prob, budget_bytes=5 * 203 * 4 - 1).engine == "triton"
    assert tri.hidden_pass(prob, budget_bytes=203 * 4 * 4 // 3 - 1).engine == "torch"
    assert tri.gram_pass(prob, keep=False).engine == "triton"
    assert tri.gram_pass(prob, keep=True, budget_bytes=5 * 203 * 4 - 1).engine == "triton"
    assert tri.gram_pass(prob, keep=True, budget_bytes=2 * 203 * 4 * 4 // 3 - 1).engine == "torch"  # a cut needs two


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


@pytest.mark.parametrize("mode", ["hidden", "lora"])
def test_passes_with_targets_another_rank_owns_equal_the_torch_engine(mode):
    """The local passes of a vocabulary-parallel rank (targets it does not own are -1: never split off) and
    extreme tokens (logit gaps of +-100 over the others): the Triton engine's one pass gives the torch
    engine's lse, lse_off, log p, log(1 - p), r̂ . b, r̂ W / the Gram parts and the VJP -- lse = lse_off,
    log p = -inf and log(1 - p) = 0 where nothing is split off; confident and unlikely tokens resolved."""
    from dataclasses import replace

    from rosa_ext.backends import engine_for
    from rosa_ext.core.op import pack

    kw = _inputs(11, mode, lora_term=True, seed=5)
    h, W, y = kw["hidden"], kw["weight"], kw["targets"]
    z = h @ W.T + kw["bias"]
    if kw.get("lora_a") is not None:
        z = z + 8.0 * (h @ kw["lora_a"]).unsqueeze(1) * kw["lora_b"]
    for t, gap in ((1, 100.0), (4, -100.0), (6, 60.0)):  # put the target's logit `gap` above / below the others
        zo = z[t].clone()
        zo[y[t]] = float("-inf")
        W[y[t]] += h[t] * ((torch.logsumexp(zo, 0) + gap - z[t, y[t]]) / h[t].norm() ** 2)
    prob, _ = pack(h, W, y, -1.0, mode=mode, lora_scale=8.0, bias=kw["bias"], lora_a=kw.get("lora_a"),
                   lora_b=kw.get("lora_b"), beta=1.0, damping=0.3, max_iter=10, tol=1e-6, solver="dual",
                   backend="triton")
    other = prob.targets.clone()
    other[::3] = -1  # tokens another rank owns
    prob = replace(prob, targets=other)
    tri, tor = engine_for("triton", prob.weight.device), engine_for("torch", prob.weight.device)
    if mode == "hidden":
        a, b = tri.hidden_pass(prob), tor.hidden_pass(prob)
        assert a.engine == "triton"
        assert _rel(a.rw, b.rw) < 1e-5
    else:
        a, b = tri.gram_pass(prob, keep=True), tor.gram_pass(prob, keep=True)
        assert a.engine == "triton"
        for x, w in zip(a.gram + a.cross, b.gram + b.cross):
            assert _rel(x, w) < 1e-5
        w = torch.randn(prob.num_tokens, generator=torch.Generator().manual_seed(0))
        assert _rel(tri.off_target_vjp(prob, a, w), tor.off_target_vjp(prob, b, w)) < 1e-5
    out = other < 0
    for name in ("lse", "lse_off", "logq", "rb"):
        torch.testing.assert_close(getattr(a, name), getattr(b, name), rtol=1e-5, atol=1e-5)
    torch.testing.assert_close(a.logp[~out], b.logp[~out], rtol=1e-5, atol=1e-5)
    assert torch.all(a.logp[out] == float("-inf")) and torch.all(a.logq[out] == 0)
    assert torch.equal(a.lse[out], a.lse_off[out])
    # the extremes against float64 (log(1 - p) ~ -100 for token 1, log p ~ -100 for token 4)
    z64 = h.double() @ W.double().T + kw["bias"].double()
    if kw.get("lora_a") is not None:
        z64 = z64 + 8.0 * (h.double() @ kw["lora_a"].double()).unsqueeze(1) * kw["lora_b"].double()
    for t, name in ((1, "logq"), (4, "logp")):
        zo = z64[t].clone()
        zo[y[t]] = float("-inf")
        L = z64[t, y[t]] - torch.logsumexp(zo, 0)
        want = -torch.nn.functional.softplus(L if name == "logq" else -L)
        assert float(want) < -50 and abs(float(getattr(a, name)[t]) - float(want)) <= 1e-4 * abs(float(want))
