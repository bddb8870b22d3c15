"""The dual solve on the one-pass primitives and hidden-mode CG on the explicit Jacobian, against
the float64 reference (1e-8 in float64; MATH.md section 4): both modes, both solvers, ragged
batches, bias, the LoRA term in hidden mode, relative damping, T > d (the d x d primal), the
probability tiles kept or streamed (a kept batch runs in groups), forced rescaling, the float64
fallback; and the cost model behind ``solver="auto"``."""
import pytest
import torch
from _helpers import make_inputs, shrink_onepass_tiles

from rosa_ext import rosa_update
from rosa_ext.backends import torch_engine
from rosa_ext.backends.torch_engine import TorchEngine
from rosa_ext.common.config import RosaConfig
from rosa_ext.core.op import pack
from rosa_ext.plans import PLANS, choose, dual_lora, solver_costs
from rosa_ext.reference import rosa_update_reference

pytestmark = pytest.mark.usefixtures("one_torch_thread")
EXACT = dict(max_iter=500, tol=1e-13)


@pytest.fixture
def small_tiles(monkeypatch):
    """Many vocabulary chunks (a ragged last one), row blocks and Gram blocks below T."""
    shrink_onepass_tiles(monkeypatch, tile_elems=9 * 12, min_chunk=8, row_block=4, gram_block=3)


def _case(mode, *, B=3, T=9, d=12, V=61, lora_term=False, bias=True, seed=0, logit_scale=2.0):
    inp = make_inputs(T=T, d=d, V=V, mode="lora", B=B, bias=bias, seed=seed, logit_scale=logit_scale)
    g = torch.Generator().manual_seed(seed + 3)
    inp["lora_a"] = torch.randn(B, d, generator=g, dtype=torch.float64) / d ** 0.5
    inp["lora_b"] = torch.randn(B, V, generator=g, dtype=torch.float64) * 0.3
    if mode == "hidden" and not lora_term:
        inp.pop("lora_a")
        inp.pop("lora_b")
    mask = torch.ones(B, T, dtype=torch.bool)
    if B > 1:
        mask[1, :T // 2] = False  # ragged
    reward = torch.tensor([-1.0, 1.0, 0.5, -0.3][:B], dtype=torch.float64)
    return inp, mask, reward


def _solve(inp, mask, reward, mode, *, solver, keep=False, damping_mode="absolute", damping=0.1,
           dtype=torch.float64):
    args = {k: (v.to(dtype) if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inp.items()}
    prob, cfg = pack(args["hidden"], args["weight"], args["targets"], reward, mode=mode,
                     lora_a=args.get("lora_a"), lora_b=args.get("lora_b"), lora_scale=3.0, bias=args.get("bias"),
                     beta=1.0, damping=damping, solver=solver, backend="torch", mask=mask,
                     damping_mode=damping_mode, **EXACT)
    name = solver if mode == "hidden" else ("cg" if solver == "cg" else ("dual-keep" if keep else "dual-stream"))
    spec = next(p for p in PLANS if (p.mode, p.name) == (mode, name))
    return spec.run(prob, cfg, TorchEngine(), None)


def _choose(mode, lengths, d, V, *, max_iter, keep_budget_bytes, gram_budget_bytes):
    cfg = RosaConfig(mode=mode, max_iter=max_iter, keep_budget_bytes=keep_budget_bytes,
                     gram_budget_bytes=gram_budget_bytes)
    return choose(cfg, tuple(lengths), d, V)


def _ref(inp, mask, reward, mode, damping_mode="absolute", damping=0.1):
    return rosa_update_reference(**inp, reward=reward, mode=mode, mask=mask, lora_scale=3.0, damping=damping,
                                 damping_mode=damping_mode).update


def _rel(a, b):
    return float((a.double() - b).norm() / b.norm())


@pytest.mark.parametrize("mode", ["lora", "hidden"])
@pytest.mark.parametrize("solver,keep", [("dual", False), ("dual", True), ("cg", False)])
@pytest.mark.parametrize("damping_mode", ["absolute", "relative"])
def test_matches_reference(small_tiles, mode, solver, keep, damping_mode):
    if mode == "hidden" and keep:
        pytest.skip("hidden mode keeps nothing")
    inp, mask, reward = _case(mode)
    got = _solve(inp, mask, reward, mode, solver=solver, keep=keep, damping_mode=damping_mode)
    assert _rel(got.update, _ref(inp, mask, reward, mode, damping_mode)) < 1e-8
    if solver == "dual":
        assert float(got.residual) < 1e-10


@pytest.mark.parametrize("solver", ["dual", "cg"])
@pytest.mark.parametrize("bias", [False, True])
def test_hidden_with_lora_term(small_tiles, solver, bias):
    inp, mask, reward = _case("hidden", lora_term=True, bias=bias)
    got = _solve(inp, mask, reward, "hidden", solver=solver)
    assert _rel(got.update, _ref(inp, mask, reward, "hidden")) < 1e-8


@pytest.mark.parametrize("solver", ["dual", "cg"])
@pytest.mark.parametrize("damping_mode", ["absolute", "relative"])
def test_hidden_T_above_d_takes_the_primal(small_tiles, solver, damping_mode):
    """One conversation below d, one above: the d x d primal system gives the same step."""
    inp, mask, reward = _case("hidden", B=2, T=20, d=6)
    mask[0, :15] = False  # 5 tokens < d = 6 < 20
    got = _solve(inp, mask, reward, "hidden", solver=solver, damping_mode=damping_mode)
    assert _rel(got.update, _ref(inp, mask, reward, "hidden", damping_mode)) < 1e-8


def test_primal_fallback_tiny_damping():
    """T > d, a rank-deficient J (repeated tokens) and damping 1e-300: the primal's residual alone
    would accept a step with a null-space component; the error bound sends it to the SVD."""
    inp, mask, reward = _case("hidden", B=1, T=12, d=4, V=9)
    inp["targets"][0, :8] = 3
    inp["hidden"][0, :8] = inp["hidden"][0, 0]  # eight identical rows
    got = _solve(inp, None, reward, "hidden", solver="dual", damping=1e-300)
    assert _rel(got.update, _ref(inp, None, reward, "hidden", damping=1e-300)) < 1e-8


@pytest.mark.parametrize("keep", [False, True])
def test_lora_repeated_tokens_long_run(small_tiles, monkeypatch, keep):
    monkeypatch.setattr(dual_lora, "SAME_TOKEN_VECTOR_MAX", 0)  # the sorted path for the same-token pairs
    inp, mask, reward = _case("lora", B=1, T=30)
    inp["targets"][0, :20] = inp["targets"][0, 0]
    inp["targets"][0, 24:27] = inp["targets"][0, 28]
    got = _solve(inp, None, reward, "lora", solver="dual", keep=keep)
    assert _rel(got.update, _ref(inp, None, reward, "lora")) < 1e-8


@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_forced_rescale_every_chunk(small_tiles, monkeypatch, mode):
    monkeypatch.setattr(torch_engine, "TAU", {torch.float32: 0.5, torch.float64: 0.5})
    inp, mask, reward = _case(mode)
    for keep in ((False, True) if mode == "lora" else (False,)):
        got = _solve(inp, mask, reward, mode, solver="dual", keep=keep)
        assert _rel(got.update, _ref(inp, mask, reward, mode)) < 1e-8


@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_eager_rescale_the_gpu_path(small_tiles, monkeypatch, mode):
    """The sync-free online softmax the torch backend takes off the CPU."""
    monkeypatch.setattr(torch_engine, "lazy_rescaling", lambda device: False)
    inp, mask, reward = _case(mode)
    for keep in ((False, True) if mode == "lora" else (False,)):
        got = _solve(inp, mask, reward, mode, solver="dual", keep=keep)
        assert _rel(got.update, _ref(inp, mask, reward, mode)) < 1e-8


@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_float32_close_to_reference(mode):
    inp, mask, reward = _case(mode, logit_scale=4.0)
    want = _ref(inp, mask, reward, mode)
    for solver, keep in (("dual", False), ("dual", True), ("cg", False)):
        got = _solve(inp, mask, reward, mode, solver=solver, keep=keep, dtype=torch.float32)
        assert got.update.dtype == torch.float32
        assert _rel(got.update, want) < 1e-5, (solver, keep)


def test_zero_reward_is_zero():
    inp, mask, _ = _case("lora")
    for keep in (False, True):
        got = _solve(inp, mask, torch.zeros(3, dtype=torch.float64), "lora", solver="dual", keep=keep)
        assert float(got.update.abs().max()) == 0.0 and float(got.residual) == 0.0


def test_budget_arguments():
    """``keep_budget_bytes`` / ``gram_budget_bytes`` of rosa_update: checked, and they steer ``auto``."""
    inp, mask, reward = _case("lora", B=1)
    args = dict(inp, reward=-1.0, mode="lora", lora_a=inp["lora_a"][0], lora_b=inp["lora_b"][0], mask=None,
                hidden=inp["hidden"][0], targets=inp["targets"][0])
    ref = rosa_update(**args)
    assert ref.solver == "dual"
    assert rosa_update(**args, gram_budget_bytes=0).solver == "cg"
    torch.testing.assert_close(rosa_update(**args, keep_budget_bytes=0).update, ref.update, rtol=0, atol=1e-12)
    with pytest.raises(ValueError, match="keep_budget_bytes"):
        rosa_update(**args, keep_budget_bytes=-1)
    with pytest.raises(TypeError, match="gram_budget_bytes"):
        rosa_update(**args, gram_budget_bytes="1GB")


def test_cost_model_rules():
    MB = 1 << 20
    kw = dict(max_iter=16, keep_budget_bytes=256 * MB, gram_budget_bytes=512 * MB)
    # the real heads on the CPU: the dual, keeping the tiles while T x V fits 256 MB
    for d, V in ((256, 32000), (576, 49152), (896, 151936)):
        for T in (64, 256, 1024, 4096):
            for mode in ("lora", "hidden"):
                plan = _choose(mode, [T], d, V, **kw)
                assert plan.solver == "dual", (mode, d, V, T, plan.estimates)
                if mode == "lora":
                    assert plan.keep == (4 * T * V <= 256 * MB), (d, V, T)
    # memory first: a conversation whose Gram matrices exceed the budget takes CG
    assert _choose("lora", [20000], 896, 151936, **kw).solver == "cg"
    assert _choose("hidden", [20000], 896, 151936, **kw).solver == "dual"  # d x d primal
    assert _choose("hidden", [20000], 896, 151936, **dict(kw, gram_budget_bytes=0)).solver == "cg"
    # a kept batch is run in groups of at most the longest conversation's rows
    assert dual_lora.keep_groups([5, 3, 2, 5, 1]) == [(0, 1), (1, 3), (3, 4), (4, 5)]
    est = solver_costs("lora", [256], 256, 32000, 16)
    assert est["dual"] == est["dual-keep"] < est["dual-stream"] < est["cg"]


def test_every_engine_implements_the_protocol():
    """The torch, Triton and vocabulary-parallel engines all implement the whole engine protocol (the plans
    call nothing else)."""
    from rosa_ext.backends.distributed import DistributedEngine
    from rosa_ext.backends.protocol import Engine
    from rosa_ext.backends.triton_engine import TritonEngine
    from rosa_ext.common.types import VocabShard
    methods = [m for m in dir(Engine) if not m.startswith("_")]
    assert {"hidden_pass", "gram_pass", "off_target_vjp", "stats", "throughput", "centered_row_reduce",
            "scatter_minus_column"} <= set(methods)
    for engine in (TorchEngine(), TritonEngine(), DistributedEngine(TorchEngine(), VocabShard(0, 1, 2, 0, 2))):
        missing = [m for m in methods if not callable(getattr(engine, m, None))]
        assert not missing, (type(engine).__name__, missing)
        assert isinstance(engine, Engine) and engine.name in ("torch", "triton")
