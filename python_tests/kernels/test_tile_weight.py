"""The one-launch product r̂ W over the probability tiles (rosa_ext.kernels.tile_weight) against float64 math on
the same stored tiles and against the torch K-split GEMMs it replaces (tile_gemms.off_target_weight): every
storage precision x every weight dtype, one and three vocabulary splits (V = 520 is no multiple of 3: splits
of 256, 256 and 8 columns, the last narrower than a chunk), N and d no multiple of the blocks, splits of a
width no multiple of BLOCK_K, tiles without split scales, strided tile rows and ``out`` a slice of a larger
tensor; the argument errors; and the kernel compiled ahead of time for sm_90 (no GPU needed).

On the CPU the kernel runs in the Triton interpreter (blocks 16 tokens x 32 columns of W x 32 vocabulary
entries), so sizes are tiny. The comparisons are relative Frobenius errors with tolerances, never bitwise:
the accumulation order of a GEMM is not the kernel's.
"""
import pytest
import torch

pytest.importorskip("triton")

from rosa_ext.common.validation import RosaError  # noqa: E402
from rosa_ext.kernels import tile_gemms as TG  # noqa: E402
from rosa_ext.kernels import tile_weight as TW  # noqa: E402
from rosa_ext.kernels.prob_tiles import ProbTiles, prob_tiles_from_tensors, tile_buffers  # noqa: E402
from rosa_ext.kernels.tile_weight import tile_weight  # noqa: E402

pytestmark = pytest.mark.triton_interp
N, V, D = 37, 520, 40
DTYPES = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
#: relative Frobenius error against float64 on the stored tiles, and against the torch K-split GEMMs
TOL_F64 = {"fp32": 3e-5, "bf16x2": 3e-5, "bf16": 2e-3}
TOL_TORCH = 1e-5


def _model(n: int, v: int, d: int, dtype: torch.dtype, seed: int = 0):
    """hidden (n, d), weight (v, d) of ``dtype``, seg (n,) int32, targets (n,) (one in the last column)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(n, d, generator=g).to(dtype)
    W = (torch.randn(v, d, generator=g) * 3 / d ** 0.5).to(dtype)
    y = torch.randint(0, v, (n,), generator=g)
    y[0] = v - 1
    return h, W, torch.zeros(n, dtype=torch.int32), y


def _truth(t: ProbTiles, W: torch.Tensor) -> torch.Tensor:
    """float64 (stored tiles x their split's scale) @ W."""
    x = t.stored().double()
    if t.split_scale is not None:
        x = x * t.column_scale().double()
    return x @ W.double()


def _rel(got: torch.Tensor, want: torch.Tensor) -> float:
    return float((got.double() - want.double()).norm() / want.double().norm())


@pytest.mark.parametrize("wdtype", ["fp32", "bf16", "fp16"])
@pytest.mark.parametrize("precision", ["fp32", "bf16x2", "bf16"])
def test_matches_float64_and_the_torch_gemms(precision, wdtype):
    """One launch = off_target_weight, one split and three (V = 520 in 256 + 256 + 8 columns)."""
    h, W, seg, y = _model(N, V, D, DTYPES[wdtype])
    for splits, widths in ((1, [V]), (3, [256, 256, 8])):
        t = prob_tiles_from_tensors(h, W, seg, None, y, precision=precision, splits=splits)
        assert t.split_scale.shape[0] == len(widths) and t.width() == widths[0], (splits, t.width())
        got = tile_weight(t, W)
        assert got.shape == (N, D) and got.dtype == torch.float32
        e64, et = _rel(got, _truth(t, W)), _rel(got, TG.off_target_weight(t, W))
        assert e64 <= TOL_F64[precision], (precision, wdtype, splits, e64)
        assert et <= TOL_TORCH, (precision, wdtype, splits, et)


@pytest.mark.parametrize("precision", ["fp32", "bf16x2"])
def test_out_is_rows_of_a_larger_tensor_and_tiles_are_strided_rows(precision):
    """Tiles written into rows of a wider buffer (row stride V + 7), read through ``rows`` (views of them and of
    the scales), the result written into a row slice of a larger tensor and into a column window of a wider
    one: the rows and columns outside untouched."""
    h, W, seg, y = _model(N, V, D, torch.bfloat16, seed=1)
    p, lo = tile_buffers(N, V + 7, precision, h.device)
    out = (p[:, :V], None if lo is None else lo[:, :V])
    t = prob_tiles_from_tensors(h, W, seg, None, y, precision=precision, splits=3, out=out)
    assert t.shape == (N, V) and (t.p if t.p is not None else t.hi).stride(0) == V + 7
    want = TG.off_target_weight(t, W)
    big = torch.full((N + 9, D), 7.0)
    res = tile_weight(t, W, big[4:4 + N])
    assert res.data_ptr() == big[4].data_ptr()
    assert bool((big[:4] == 7).all()) and bool((big[4 + N:] == 7).all())
    assert _rel(big[4:4 + N], want) <= TOL_TORCH
    wide = torch.full((N, D + 11), 7.0)
    tile_weight(t, W, wide[:, 5:5 + D])
    assert bool((wide[:, :5] == 7).all()) and bool((wide[:, 5 + D:] == 7).all())
    assert _rel(wide[:, 5:5 + D], want) <= TOL_TORCH
    r0, r1 = 5, 30
    sub = t.rows(r0, r1)
    assert _rel(tile_weight(sub, W.float()), TG.off_target_weight(sub, W.float())) <= TOL_TORCH
    assert _rel(tile_weight(sub, W), want[r0:r1]) <= TOL_TORCH


def test_no_split_scales_and_normalized_tiles():
    """Tiles normalised by a given lse (``split_scale`` None, still K-split at 256 columns), and the one
    pass's tiles normalised in place (``normalize_``): no scales applied."""
    h, W, seg, y = _model(N, V, D, torch.float32, seed=2)
    lse = torch.logsumexp(h.double() @ W.double().T, 1).float()
    for precision in ("fp32", "bf16x2"):
        fixed = prob_tiles_from_tensors(h, W, seg, lse, y, precision=precision, splits=3)
        assert fixed.split_scale is None and fixed.width() == 256
        norm = prob_tiles_from_tensors(h, W, seg, None, y, precision=precision, splits=3).normalize_()
        for t in (fixed, norm):
            got = tile_weight(t, W)
            assert _rel(got, _truth(t, W)) <= TOL_F64[precision]
            assert _rel(got, TG.off_target_weight(t, W)) <= TOL_TORCH


@pytest.mark.parametrize("precision", ["fp32", "bf16x2", "bf16"])
def test_split_width_no_multiple_of_the_chunk(precision):
    """Hand-made tiles whose splits are 45 columns wide (chunks of 32: every split ends in a partial chunk),
    with scales spanning 1e-30..1e3 and zeros (a token with nothing stored)."""
    g = torch.Generator().manual_seed(3)
    n, v, d, width = 21, 200, 19, 45
    x = torch.rand(n, v, generator=g)
    S = -(-v // width)
    sc = torch.exp(torch.empty(S, n).uniform_(-69, 7, generator=g))
    sc[:, 4] = 0
    hi = x.to(torch.bfloat16)
    lo = (x - hi.float()).to(torch.bfloat16) if precision == "bf16x2" else None
    parts = dict(p=x, hi=None, lo=None) if precision == "fp32" else dict(p=None, hi=hi, lo=lo)
    z = torch.zeros(n)
    t = ProbTiles(precision, q=z, pt=z, rb=None, ss=z, split_scale=sc, split_width=width, **parts)
    W = torch.randn(v, d, generator=g)
    for w in (W, W.to(torch.bfloat16)):
        got = tile_weight(t, w)
        assert bool((got[4] == 0).all())
        assert _rel(got, _truth(t, w)) <= 3e-5
        assert _rel(got, TG.off_target_weight(t, w)) <= TOL_TORCH


def test_argument_errors_name_the_argument():
    h, W, seg, y = _model(5, 300, 16, torch.float32)
    t = prob_tiles_from_tensors(h, W, seg, None, y, precision="bf16x2")
    bad = [
        (lambda: tile_weight(t, W[:-1]), "weight"),
        (lambda: tile_weight(t, W[:, 0]), "weight"),
        (lambda: tile_weight(t, W.double()), "weight"),
        (lambda: tile_weight(t, W.to(torch.int32)), "weight"),
        (lambda: tile_weight(t, W, torch.empty(5, 17)), "out"),
        (lambda: tile_weight(t, W, torch.empty(5, 16, dtype=torch.float64)), "out"),
        (lambda: tile_weight(t, W, torch.empty(16, 5).T), "out"),
        (lambda: tile_weight(W, W), "tiles"),
    ]
    for call, arg in bad:
        with pytest.raises(RosaError) as e:
            call()
        assert e.value.argument == arg, (arg, str(e.value))


def test_gpu_config_follows_alignment(monkeypatch):
    """The 128-wide tile where V, d and the split width are multiples of 16 (pipelined), the 64-wide one
    otherwise (no spill there); the interpreter's small blocks under it."""
    assert TW.tile_config(151936, 896, 4096) == (TW.INTERPRET_CONFIG if TW.INTERPRET else TW.GPU_CONFIG)
    monkeypatch.setattr(TW, "INTERPRET", False)
    assert TW.tile_config(151936, 896, 4096) == TW.GPU_CONFIG
    assert TW.tile_config(50257, 768, 50257) == TW.GPU_CONFIG_UNALIGNED
    assert TW.tile_config(151936, 900, 4096) == TW.GPU_CONFIG_UNALIGNED


# -- ahead-of-time compile for Hopper (no GPU needed) ---------------------------------------------------
_SM90 = r"""
import os, warnings
os.environ.pop("TRITON_INTERPRET", None)
warnings.filterwarnings("ignore")
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from _sm90 import usage
from rosa_ext.kernels import tile_weight as TW
fn = TW._tile_weight_kernel
names = list(fn.arg_names)
P, I = "*fp32", "i32"
# the engines' specialisations: bf16x2 tiles of a bf16 / fp32 / fp16 model, fp32 tiles of an fp32 model (tf32x3);
# the one pass's split scales; aligned (V, d, the split width multiples of 16: GPU_CONFIG) and not
for tag, tiles, wt, prec in (("bf16x2-bf16", 1, "bf16", "ieee"), ("bf16x2-fp32", 1, "fp32", "ieee"),
                             ("bf16x2-fp16", 1, "fp16", "ieee"), ("fp32-fp32", 0, "fp32", "tf32x3")):
    for aligned, cfg in ((1, TW.GPU_CONFIG), (0, TW.GPU_CONFIG_UNALIGNED)):
        bt, bd, bk, nw, ns = cfg
        pt = P if tiles == 0 else "*bf16"
        sig = dict(p_ptr=pt, lo_ptr=pt, w_ptr=f"*{wt}", scale_ptr=P, out_ptr=P, N=I, V=I, D=I, S=I, width=I,
                   s_p=I, s_lo=I, s_wv=I, s_sc=I, s_out=I)
        const = dict(s_wd=1, s_st=1, TILES=tiles, W_BF16=wt == "bf16", HAS_SCALE=True, PRECISION=prec, WIDEN=False,
                     BLOCK_T=bt, BLOCK_D=bd, BLOCK_K=bk)
        odd = ("N", "S") if aligned else ("N", "S", "V", "D", "width", "s_p", "s_lo", "s_wv", "s_out")
        attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in sig if n not in odd}
        src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const, attrs=attrs)
        out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=nw, num_stages=ns))
        stack, regs = usage(out)
        ir = out.asm["ttgir"]
        print(tag, aligned, "x".join(map(str, cfg)), "wgmma" if "warp_group_dot" in ir else "-",
              "async" if "async_copy_global_to_local" in ir else "-", out.metadata.shared,
              stack, regs, flush=True)
"""


def test_tile_weight_kernel_compiles_for_hopper():
    """The kernel compiled for sm_90 in each specialisation the engines use, with the GPU configs (not the
    interpreter's): wgmma (64-row tiles), no register spill (no stack frame in the cubin), shared memory within
    an H100/H200 block's 227 KiB, and the aligned config's loads pipelined (asynchronous copies). Prints each
    specialisation's registers (pytest -s)."""
    from _helpers import sm90_compile

    out = sm90_compile(_SM90, timeout=900)
    print(out)
    rows = [line.split() for line in out.strip().splitlines()]
    assert len(rows) == 8, rows
    for tag, aligned, cfg, dots, copies, shared, stack, regs in rows:
        assert int(cfg.split("x")[0]) < 64 or dots == "wgmma", (tag, aligned, cfg)
        assert aligned == "0" or copies == "async", (tag, cfg, "not pipelined")
        assert int(shared) <= 227 * 1024, (tag, cfg, shared)
        assert int(stack) == 0, f"{tag} aligned {aligned} {cfg}: {stack} bytes of stack (spills), {regs} registers"


# -- GPU (when lent) -------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("wdtype", ["bf16", "fp32"])
def test_gpu_tile_weight_on_the_qwen_head(wdtype):
    """Qwen2.5-0.5B head sizes (V = 151936 in 38 splits of 4096, d = 896): bf16x2 tiles' r̂ W against float64
    on the stored tiles (3e-5: the K-split's bound) and against the torch K-split GEMMs; fp32 tiles likewise."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    n, v, d = 300, 151936, 896
    h, W, seg, y = (x.cuda() for x in _model(n, v, d, DTYPES[wdtype]))
    for precision in ("bf16x2",) + (("fp32",) if wdtype == "fp32" else ()):
        t = prob_tiles_from_tensors(h, W, seg, None, y, precision=precision)
        got = tile_weight(t, W)
        assert _rel(got, _truth(t, W)) <= 3e-5, precision
        assert _rel(got, TG.off_target_weight(t, W)) <= 3e-5, precision
