"""Token blocks of the Triton engine (rosa_ext.backends.tile_blocks; here under TRITON_INTERPRET=1): a problem
whose probability tiles exceed the budget runs in blocks of tokens -- each one tile-kernel launch with the
split plan of the first -- and gives the results of one launch to rounding: the hidden pass, the LoRA Gram
(whole conversations grouped, a long one assembled blockwise from pairs of sub-blocks), the VJP and CG's
reductions over recomputed tiles, and whole steps. The budget on CUDA is at most half the free memory
(a monkeypatched ``mem_get_info``), less the K-split scratch; hidden mode keeps one block of tiles at a time."""
import pathlib
import sys

import pytest
import torch

import rosa_ext
from rosa_ext.backends import engine_for
from rosa_ext.backends import tile_blocks as TB
from rosa_ext.core.op import pack
from rosa_ext.kernels import tile_gemms as TG
from rosa_ext.reference import rosa_update_reference

pytestmark = [pytest.mark.triton_interp, pytest.mark.usefixtures("one_torch_thread")]

V = 700  # three vocabulary splits of 256 at most: the split plan matters


def _rel(a, b):
    return float((a.double() - b.double()).norm() / b.double().norm().clamp_min(1e-30))


def _kw(lengths, mode, seed=0, d=16, scale=3.0):
    """rosa_update's tensors: B = len(lengths) left-padded conversations, logits of about ``scale`` std."""
    g = torch.Generator().manual_seed(seed)
    B, T = len(lengths), max(lengths)
    h = torch.randn(B, T, d, generator=g)
    W = torch.randn(V, d, generator=g) * scale / d ** 0.5
    y = torch.randint(0, V, (B, T), generator=g)
    y[0, 1] = y[0, 0]  # a repeated target
    y[-1, -1] = V - 1  # a target in the last, narrower split
    mask = torch.arange(T).unsqueeze(0) >= (T - torch.tensor(lengths)).unsqueeze(1)  # left padding, ragged
    kw = dict(hidden=h, weight=W, targets=y, mask=mask, bias=torch.randn(V, generator=g) * 0.1)
    if mode == "lora":
        kw.update(lora_a=torch.randn(B, d, generator=g) / d ** 0.5, lora_b=torch.randn(B, V, generator=g) * 0.1)
    return kw


def _prob(lengths, mode, **kw):
    k = _kw(lengths, mode, **kw)
    common = dict(mode=mode, lora_scale=8.0, beta=1.0, damping=0.3, max_iter=10, tol=1e-6, solver="dual",
                  backend="triton")
    return pack(k["hidden"], k["weight"], k["targets"], torch.ones(len(lengths)), mask=k["mask"], bias=k["bias"],
                lora_a=k.get("lora_a"), lora_b=k.get("lora_b"), **common)[0]


def _budget(rows):
    """A keep_budget_bytes whose tile share holds ``rows`` fp32 tokens of V (a quarter goes to the scratch)."""
    return rows * V * 4 * 4 // 3 + 8


class _Launches:
    """Records the ``splits=`` of every probability-tile launch and the split count it ran with."""

    def __init__(self, monkeypatch):
        self.calls = []
        real = TB.prob_tiles_from_tensors

        def spy(*a, **kw):
            t = real(*a, **kw)
            self.calls.append((kw.get("splits"), int(t.split_scale.shape[0]), int(a[0].shape[0])))
            return t

        monkeypatch.setattr(TB, "prob_tiles_from_tensors", spy)

    def one_plan(self):
        first = self.calls[0][1]
        assert self.calls[0][0] is None and first > 1, self.calls
        assert all(forced == got == first for forced, got, _ in self.calls[1:]), self.calls
        return len(self.calls)


def test_budget_rule_on_cuda_is_half_the_free_memory(monkeypatch):
    """On CUDA: min(configured, 0.5 (free + the caching allocator's unused reserve)), less the scratch
    (at most a quarter, at most SCRATCH_BYTES); elsewhere the configured budget."""
    mib = 1 << 20
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda idx=None: (300 * mib, 80_000 * mib))
    monkeypatch.setattr(torch.cuda, "memory_reserved", lambda idx=None: 500 * mib)
    monkeypatch.setattr(torch.cuda, "memory_allocated", lambda idx=None: 400 * mib)
    cuda = torch.device("cuda", 0)
    assert TB.free_device_bytes(cuda) == 400 * mib
    assert TB.tile_budget(1 << 30, cuda) == 200 * mib  # half of 300 free + 100 cached
    assert TB.tile_budget(64 * mib, cuda) == 64 * mib  # the configured budget when smaller
    b = TB.Budget.of(1 << 30, cuda)
    assert (b.total, b.scratch, b.tiles) == (200 * mib, 50 * mib, 150 * mib)
    monkeypatch.setattr(torch.cuda, "mem_get_info", lambda idx=None: (40_000 * mib, 80_000 * mib))
    b = TB.Budget.of(1 << 30, cuda)
    assert (b.total, b.scratch, b.tiles) == (1 << 30, TG.SCRATCH_BYTES, (1 << 30) - TG.SCRATCH_BYTES)
    assert TB.free_device_bytes(torch.device("cpu")) is None
    assert TB.tile_budget(12345, torch.device("cpu")) == 12345
    assert TB.Budget.of(1 << 30, torch.device("cpu")).total == 1 << 30


def test_the_engine_takes_its_budget_from_free_memory(monkeypatch):
    """The engine's passes read the device rule: little free memory makes the same call run in blocks."""
    prob = _prob([37], "hidden")
    tri = engine_for("triton", prob.weight.device)
    spy = _Launches(monkeypatch)
    tri.hidden_pass(prob)
    assert len(spy.calls) == 1
    monkeypatch.setattr(TB, "free_device_bytes", lambda dev: 2 * _budget(9))
    got = tri.hidden_pass(prob)
    assert got.engine == "triton" and len(spy.calls) == 1 + 5  # 37 tokens, 9 per block


def test_balanced_blocks():
    assert TB.balanced_blocks(0, 10, 10) == [(0, 10)]
    assert TB.balanced_blocks(0, 10, 4) == [(0, 4), (4, 8), (8, 10)]
    assert TB.balanced_blocks(5, 205, 150) == [(5, 133), (133, 205)]  # 100 each, rounded up to 128 (<= 150)
    assert TB.balanced_blocks(0, 300, 150) == [(0, 150), (150, 300)]  # 192 (aligned) would exceed the cap
    assert TB.balanced_blocks(0, 300, 200) == [(0, 192), (192, 300)]
    assert TB.balanced_blocks(0, 1, 1) == [(0, 1)]
    assert TB.conversation_groups([5, 6, 30, 2, 3], 12) == [(0, 2), (2, 3), (3, 5)]
    with pytest.raises(ValueError, match="max_rows must be >= 1"):
        TB.balanced_blocks(0, 10, 0)
    with pytest.raises(ValueError, match="rows must be >= 1"):
        TB.conversation_groups([3], 0)


@pytest.mark.parametrize("lengths", [[37], [5, 6, 26]])
def test_blocked_hidden_pass_equals_one_launch(lengths, monkeypatch):
    prob = _prob(lengths, "hidden")
    tri = engine_for("triton", prob.weight.device)
    want = tri.hidden_pass(prob)
    spy = _Launches(monkeypatch)
    got = tri.hidden_pass(prob, _budget(8))
    assert got.engine == "triton" and spy.one_plan() == 5  # 37 tokens in blocks of <= 8
    for name in ("lse", "lse_off", "logp", "logq", "rw"):
        assert _rel(getattr(got, name), getattr(want, name)) < 1e-5, name
    assert got.rb is None and want.rb is None


def test_hidden_mode_keeps_one_block_of_tiles(monkeypatch):
    """Within the budget hidden mode still cuts its tokens at HIDDEN_TILE_BYTES of tiles: the same result."""
    prob = _prob([37], "hidden")
    tri = engine_for("triton", prob.weight.device)
    want = tri.hidden_pass(prob)
    monkeypatch.setattr(TB, "HIDDEN_TILE_BYTES", 10 * V * 4)
    monkeypatch.setattr(TB, "HIDDEN_MAX_BLOCKS", 8)
    spy = _Launches(monkeypatch)
    got = tri.hidden_pass(prob)
    assert spy.one_plan() == 4 and max(n for _, _, n in spy.calls) <= 10
    assert _rel(got.rw, want.rw) < 1e-5 and _rel(got.logq, want.logq) < 1e-5


def test_hidden_mode_blocks_grow_to_keep_three(monkeypatch):
    """Past HIDDEN_MAX_BLOCKS blocks of HIDDEN_TILE_BYTES the blocks grow (within the budget): 37 tokens at a
    10-token cap run in 3 blocks of <= 13, each written straight into the pass's table; the same result."""
    prob = _prob([37], "hidden")
    tri = engine_for("triton", prob.weight.device)
    want = tri.hidden_pass(prob)
    monkeypatch.setattr(TB, "HIDDEN_TILE_BYTES", 10 * V * 4)
    spy = _Launches(monkeypatch)
    got = tri.hidden_pass(prob)
    assert spy.one_plan() == 3 and max(n for _, _, n in spy.calls) <= 13
    for name in ("rw", "lse", "lse_off", "logp", "logq"):
        assert _rel(getattr(got, name), getattr(want, name)) < 1e-5, name
    small = tri.hidden_pass(prob, budget_bytes=_budget(9))  # the budget still rules: 5 blocks of <= 9
    assert _rel(small.rw, want.rw) < 1e-5


@pytest.mark.parametrize("lengths", [[37], [5, 6, 30, 4]])
def test_blocked_gram_pass_and_vjp_equal_one_launch(lengths, monkeypatch):
    """Whole conversations grouped in a block; the long one (30 or 37 > 12 rows) cut in sub-blocks of <= 6, its
    Gram from the pairs; the VJP over tiles recomputed block by block."""
    prob = _prob(lengths, "lora")
    tri = engine_for("triton", prob.weight.device)
    want = tri.gram_pass(prob, keep=True)
    spy = _Launches(monkeypatch)
    got = tri.gram_pass(prob, keep=True, budget_bytes=_budget(12))
    n = spy.one_plan()
    long_sub = -(-max(lengths) // 6)
    assert n == long_sub * (long_sub + 1) // 2 + (len(lengths) > 1) * 2, spy.calls  # pairs + the other groups
    assert got.engine == "triton" and isinstance(got.kept, TB.RecomputedTiles)
    for name in ("lse", "lse_off", "logp", "logq", "rb", "ah"):
        assert _rel(getattr(got, name), getattr(want, name)) < 1e-5, name
    for k in range(len(lengths)):
        assert got.gram[k].shape == (lengths[k], lengths[k])
        assert _rel(got.gram[k], want.gram[k]) < 1e-5, k
        assert _rel(got.cross[k], want.cross[k]) < 1e-5, k
        torch.testing.assert_close(got.gram[k], got.gram[k].T, rtol=1e-6, atol=1e-7)
    w = torch.randn(prob.num_tokens, generator=torch.Generator().manual_seed(1))
    before = len(spy.calls)
    vjp = tri.off_target_vjp(prob, got, w)
    assert len(spy.calls) - before == len(TB.balanced_blocks(0, prob.num_tokens, 12))
    assert _rel(vjp, tri.off_target_vjp(prob, want, w)) < 1e-5


def test_blocked_bf16_tiles_gram(monkeypatch):
    """bf16 models: the hi + lo parts of two blocks multiplied together (hi lo^T and lo hi^T both)."""
    k = _kw([29], "lora")
    k["hidden"], k["weight"] = k["hidden"].bfloat16(), k["weight"].bfloat16()
    prob = pack(k["hidden"], k["weight"], k["targets"], torch.ones(1), mask=k["mask"], bias=k["bias"].bfloat16(),
                lora_a=k["lora_a"], lora_b=k["lora_b"], mode="lora", lora_scale=8.0, beta=1.0, damping=0.3,
                max_iter=10, tol=1e-6, solver="dual", backend="triton")[0]
    tri = engine_for("triton", prob.weight.device)
    want = tri.gram_pass(prob, keep=True)
    got = tri.gram_pass(prob, keep=True, budget_bytes=_budget(10))
    assert _rel(got.gram[0], want.gram[0]) < 1e-5 and _rel(got.cross[0], want.cross[0]) < 1e-5


@pytest.mark.parametrize("lengths", [[37], [5, 6, 26]])
def test_blocked_cg_stats_and_reductions(lengths, monkeypatch):
    """CG's split stats in blocks, its reductions over tiles recomputed per block (fp32, normalised); within
    the budget the kept tiles are normalised fp32 and every reduction one GEMV per conversation."""
    prob = _prob(lengths, "lora")
    tri, tor = engine_for("triton", prob.weight.device), engine_for("torch", prob.weight.device)
    want = tri.stats(prob)
    assert isinstance(want.kept, TB.KeptProbTiles)
    assert want.kept.tiles.p is not None and want.kept.tiles.split_scale is None  # fp32, normalised once
    got = tri.stats(prob, _budget(8))
    assert isinstance(got.kept, TB.RecomputedTiles)
    assert got.kept.norm is got.lse_off and got.kept.ss is TB.sqnorms(got.kept, got.lse_off)  # no rescaling
    ref = tor.stats(prob)
    for name in ("lse", "lse_off", "logp", "logq", "rb", "ah"):
        assert _rel(getattr(got, name), getattr(want, name)) < 1e-5, name
        assert _rel(getattr(want, name), getattr(ref, name)) < 1e-5, name
    g = torch.Generator().manual_seed(2)
    u = torch.randn(len(lengths), V, generator=g)
    w = torch.randn(prob.num_tokens, generator=g)
    for a, b, c in ((tri.off_target_row_reduce(prob, got, u), tri.off_target_row_reduce(prob, want, u),
                     tor.off_target_row_reduce(prob, ref, u)),
                    (tri.off_target_column_reduce(prob, got, w), tri.off_target_column_reduce(prob, want, w),
                     tor.off_target_column_reduce(prob, ref, w)),
                    (tri.pi_sqnorm(prob, got), tri.pi_sqnorm(prob, want), tor.pi_sqnorm(prob, ref))):
        assert _rel(a, b) < 1e-5 and _rel(b, c) < 1e-5


@pytest.mark.parametrize("mode,solver", [("hidden", "dual"), ("hidden", "cg"), ("lora", "dual"), ("lora", "cg")])
def test_steps_with_token_blocks_equal_one_launch(mode, solver):
    """Whole steps in blocks of <= 7 tokens equal one launch's and the float64 reference's (a well-conditioned
    problem -- logits of std 1, damping 1 -- so that fp32 rounding stays far below the tolerances: measured
    about 1e-7 between the two, at most 1.1e-6 against float64)."""
    kw = _kw([5, 30], mode, seed=3, scale=1.0)
    opts = dict(reward=torch.tensor([-1.0, 1.0]), mode=mode, solver=solver, damping=1.0, max_iter=100, tol=1e-9)
    want = rosa_ext.rosa_update(**kw, backend="triton", **opts)
    got = rosa_ext.rosa_update(**kw, backend="triton", keep_budget_bytes=_budget(7), **opts)
    kw64 = {k: v.double() if v.is_floating_point() else v for k, v in kw.items()}
    ref = rosa_update_reference(**kw64, **dict(opts, reward=opts["reward"].double()))
    assert got.backend == want.backend == "triton"
    assert _rel(got.update, want.update) < (1e-5 if solver == "dual" else 3e-5)
    assert _rel(got.update, ref.update) < 1e-5 and _rel(want.update, ref.update) < 1e-5


def test_hidden_pass_peak_memory_is_one_block(monkeypatch):
    """A tracking allocator (benchmarks/tile_memory.py) sees one block of tiles at a time in hidden mode:
    peak <= n_b V 4 + N d 4 + scratch + the per-token and per-split vectors, against N V 4 in one launch."""
    sys.path.insert(0, str(pathlib.Path(__file__).resolve().parents[2] / "benchmarks"))
    from tile_memory import PeakMemory

    prob = _prob([64], "hidden", d=8)
    N, d = prob.num_tokens, prob.hidden_size
    tri = engine_for("triton", prob.weight.device)
    with PeakMemory() as whole:
        tri.hidden_pass(prob)
    monkeypatch.setattr(TB, "HIDDEN_TILE_BYTES", 16 * V * 4)
    with PeakMemory() as blocked:
        hp = tri.hidden_pass(prob)
    del hp
    small = 64 * N * 4 + 3 * 16 * 64  # per-token vectors, the (6, splits, rows) partials of a launch
    scratch = 2 * 3 * 16 * d * 4  # the K-split's per-split products of one block (two buffers at most)
    assert whole.peak >= N * V * 4
    assert blocked.peak <= 16 * V * 4 + N * d * 4 + scratch + small, (blocked.peak, dict(blocked.by_op))
    assert blocked.peak < whole.peak / 2
