"""The LoRA dual's fused kernels over the probability tiles (rosa_ext.kernels.tile_gram, .tile_vjp, and the
LoRA factors of the linearisation kernel) against float64 products of the same tiles, under the interpreter;
and their sm_90 ahead-of-time compiles (no GPU needed)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402

from rosa_ext.common.validation import RosaInputError  # noqa: E402
from rosa_ext.kernels import tile_gemms as TG  # noqa: E402
from rosa_ext.kernels.epilogue import linearize_tokens  # noqa: E402
from rosa_ext.kernels.prob_tiles import prob_tiles_from_tensors  # noqa: E402
from rosa_ext.kernels.tile_gram import tile_gram  # noqa: E402
from rosa_ext.kernels.tile_vjp import tile_vjp  # noqa: E402

CASES = [("bf16x2", torch.bfloat16, 1), ("bf16x2", torch.bfloat16, 3), ("fp32", torch.float32, 3),
         ("bf16", torch.bfloat16, 2)]
LENGTHS = [5, 23, 1, 17]


def _problem(prec, dtype, splits, lengths=LENGTHS, V=301, d=24, seed=0):
    g = torch.Generator().manual_seed(seed)
    N = sum(lengths)
    h = torch.randn(N, d, generator=g).to(dtype)
    W = (torch.randn(V, d, generator=g) * 0.8).to(dtype)
    W[7] += 6.0  # one confident column: tokens far from uniform
    y = torch.randint(0, V, (N,), generator=g)
    y[3], y[10], y[30] = y[1], y[12], y[12]  # repeated targets within conversations
    off = torch.tensor([0] + torch.tensor(lengths).cumsum(0).tolist(), dtype=torch.int32)
    seg = torch.repeat_interleave(torch.arange(len(lengths)), torch.tensor(lengths))
    t = prob_tiles_from_tensors(h, W, seg.to(torch.int32), None, y, precision=prec, splits=splits)
    return t, y, off, seg


def _r64(t):
    """r̂ of the tiles in float64: stored x the split scales."""
    R = t.stored().double()
    return R * t.column_scale().double() if t.split_scale is not None else R


def _rel(a, b):
    return float((a.double() - b).norm() / b.norm().clamp_min(1e-300))


@pytest.mark.parametrize("prec,dtype,splits", CASES)
def test_centred_and_raw_gram_per_conversation(prec, dtype, splits):
    t, y, off, _ = _problem(prec, dtype, splits)
    R = _r64(t)
    E = torch.zeros_like(R)
    E[torch.arange(len(y)), y] = 1
    K, none = tile_gram(t, y, LENGTHS, offsets=off, center=True)
    G, X = tile_gram(t, y, LENGTHS, offsets=off, center=False)
    assert none is None
    o = off.tolist()
    for b in range(len(LENGTHS)):
        sl = slice(o[b], o[b + 1])
        want = (E[sl] - R[sl]) @ (E[sl] - R[sl]).T
        assert torch.equal(K[b], K[b].T), b  # each entry written once: exactly symmetric
        assert _rel(K[b], want) < 1e-5, b
        assert _rel(G[b], R[sl] @ R[sl].T) < 1e-5, b
        assert _rel(X[b], R[sl][:, y[sl]] * (y[sl].unsqueeze(0) != y[sl].unsqueeze(1))) < 1e-5, b
        assert (X[b].diagonal() == 0).all()


@pytest.mark.parametrize("prec,dtype,splits", CASES[:2])
def test_gram_into_a_padded_batch(prec, dtype, splits):
    """``out``: conversation b's K in out[b, :T_b, :T_b] of a (B, Tm, Tm) batch, the padding untouched."""
    t, y, off, _ = _problem(prec, dtype, splits)
    want, _ = tile_gram(t, y, LENGTHS, offsets=off)
    Tm = max(LENGTHS) + 2
    out = torch.full((len(LENGTHS), Tm, Tm), 5.0)
    got, _ = tile_gram(t, y, LENGTHS, offsets=off, out=out)
    for b, T in enumerate(LENGTHS):
        assert got[b].data_ptr() == out[b].data_ptr() and torch.equal(out[b, :T, :T], want[b]), b
        assert (out[b, T:] == 5.0).all() and (out[b, :, T:] == 5.0).all(), b
    with pytest.raises(RosaInputError) as e:
        tile_gram(t, y, LENGTHS, offsets=off, out=torch.empty(len(LENGTHS), 20, 20))
    assert e.value.argument == "out"


@pytest.mark.parametrize("prec,dtype,splits", CASES[:2])
def test_gram_of_a_group_and_of_a_pair_of_blocks(prec, dtype, splits):
    """Rows of a later group (offsets absolute, ``row0`` subtracted) and an off-diagonal block of one long
    conversation from two tile sets, as the blocked pass calls them; the torch K-split products agree."""
    t, y, off, _ = _problem(prec, dtype, splits)
    R = _r64(t)
    E = torch.zeros_like(R)
    E[torch.arange(len(y)), y] = 1
    r0, r1 = 5, 29  # conversations 1 and 2
    K, _ = tile_gram(t.rows(r0, r1), y[r0:r1], LENGTHS[1:3], offsets=off[1:4], row0=r0)
    assert _rel(K[0], (E[5:28] - R[5:28]) @ (E[5:28] - R[5:28]).T) < 1e-5
    assert _rel(K[1], (E[28:29] - R[28:29]) @ (E[28:29] - R[28:29]).T) < 1e-5
    ta, tb = t.rows(5, 12), t.rows(12, 28)
    P, _ = tile_gram(ta, y[5:12], [7], tb=tb, yb=y[12:28])
    assert P[0].shape == (7, 16)
    assert _rel(P[0], (E[5:12] - R[5:12]) @ (E[12:28] - R[12:28]).T) < 1e-5
    Gp, Xp = tile_gram(ta, y[5:12], [7], tb=tb, yb=y[12:28], center=False)
    assert _rel(Gp[0], TG.off_target_gram_pair(ta, tb)) < 1e-6
    assert _rel(Xp[0], TG.cross_rows(ta, y[12:28])) < 1e-6


def test_gram_refuses_tiles_of_two_plans():
    t, y, _, _ = _problem("bf16x2", torch.bfloat16, 3)
    u, _, _, _ = _problem("fp32", torch.float32, 3)
    with pytest.raises(RosaInputError, match="one split plan") as e:
        tile_gram(t.rows(0, 5), y[:5], [5], tb=u.rows(5, 9), yb=y[5:9])
    assert e.value.argument == "tb"
    with pytest.raises(RosaInputError) as e:
        tile_gram(t, y, LENGTHS)
    assert e.value.argument == "offsets"


@pytest.mark.parametrize("prec,dtype,splits", CASES)
def test_vjp_plain_centred_and_in_blocks(prec, dtype, splits):
    t, y, off, seg = _problem(prec, dtype, splits)
    N, V = t.shape
    B = len(LENGTHS)
    R = _r64(t)
    E = torch.zeros_like(R)
    E[torch.arange(N), y] = 1
    w = torch.randn(N, generator=torch.Generator().manual_seed(1))
    Wb = torch.zeros(B, N, dtype=torch.float64)
    Wb[seg, torch.arange(N)] = w.double()
    wide = torch.full((B, V + 9), 7.0)
    got = tile_vjp(t, w, wide[:, 9:], offsets=off)  # a column slice of a wider row: the rest untouched
    assert (wide[:, :9] == 7.0).all()
    assert _rel(got, Wb @ R) < 1e-6
    want = Wb @ (E - R)
    assert _rel(tile_vjp(t, w, torch.empty(B, V), targets=y, offsets=off), want) < 1e-6
    acc = torch.full((B, V), float("nan"))  # every row written by the first block, added to by the others
    for i, (r0, r1) in enumerate([(0, 10), (10, 30), (30, N)]):
        tile_vjp(t.rows(r0, r1), w[r0:r1], acc, targets=y[r0:r1], offsets=off, rows0=r0, accumulate=i > 0)
    assert _rel(acc, want) < 1e-6
    one = tile_vjp(t.rows(5, 28), w[5:28], torch.empty(1, V), targets=y[5:28])
    assert _rel(one[0], want[1]) < 1e-6


def test_vjp_weights_the_scatter_apart():
    """``target_w``: the scatter's weights apart from the tiles' (a caller folding another normalisation into
    w only): sum_t (ws_t e_{y_t} - w_t r̂_t)."""
    t, y, off, seg = _problem("bf16x2", torch.bfloat16, 3)
    N, V = t.shape
    g = torch.Generator().manual_seed(2)
    w, ws = torch.randn(N, generator=g), torch.randn(N, generator=g)
    R = _r64(t)
    E = torch.zeros_like(R)
    E[torch.arange(N), y] = 1
    Ww, Ws = torch.zeros(4, N, dtype=torch.float64), torch.zeros(4, N, dtype=torch.float64)
    Ww[seg, torch.arange(N)] = w.double()
    Ws[seg, torch.arange(N)] = ws.double()
    got = tile_vjp(t, w, torch.empty(4, V), targets=y, target_w=ws, offsets=off)
    assert _rel(got, Ws @ E - Ww @ R) < 1e-6


def test_vjp_names_its_bad_arguments():
    t, y, off, _ = _problem("fp32", torch.float32, 1)
    N, V = t.shape
    for kw, arg in ((dict(w=torch.zeros(N + 1), out=torch.empty(1, V)), "w"),
                    (dict(w=torch.zeros(N), out=torch.empty(1, V + 1)), "out"),
                    (dict(w=torch.zeros(N), out=torch.empty(2, V)), "offsets"),
                    (dict(w=torch.zeros(N), out=torch.empty(1, V), targets=y[:3]), "targets"),
                    (dict(w=torch.zeros(N), out=torch.empty(1, V), targets=y, target_w=torch.zeros(3)), "target_w")):
        with pytest.raises(RosaInputError) as e:
            tile_vjp(t, **kw)
        assert e.value.argument == arg


def test_linearisation_kernel_forms_the_lora_factors():
    """ca = s f (b[y] - r̂ . b), cb = s f (a . h) and per conversation max(max|ca| max|h|, max|cb|), as the
    dual's torch formulas; NaN in a conversation's h makes its max-norm NaN (and only its own)."""
    g = torch.Generator().manual_seed(3)
    lengths, V, d = [4, 300, 9], 50, 40
    N = sum(lengths)
    off = torch.tensor([0, 4, 304, N], dtype=torch.int32)
    lse_off = torch.randn(N, generator=g)
    zy = lse_off + torch.randn(N, generator=g) * 4
    from rosa_ext.common.jacobian import split_logits
    lse, logp, logq = split_logits(zy, lse_off)
    y = torch.randint(0, V, (N,), generator=g)
    b = torch.randn(3, V, generator=g)
    rb, ah = torch.randn(N, generator=g), torch.randn(N, generator=g)
    h = torch.randn(N, d, generator=g).to(torch.bfloat16)
    h[310, 3] = float("nan")
    s = 0.37
    out = linearize_tokens(logp, logq, lse, off, torch.tensor([1.0, -1.0, 0.5]), 1.0, b, y, rb=rb, ah=ah,
                           hidden=h, lora_scale=s)
    torch.testing.assert_close(out.ca, s * out.f * (out.by - rb), rtol=1e-6, atol=0)
    torch.testing.assert_close(out.cb, s * out.f * ah, rtol=1e-6, atol=0)
    for k, (lo, hi) in enumerate(zip(off[:-1].tolist(), off[1:].tolist())):
        want = torch.maximum(out.ca[lo:hi].abs().max() * h[lo:hi].float().abs().max(), out.cb[lo:hi].abs().max())
        if k == 2:
            assert out.jmax[k].isnan()
        else:
            assert float(out.jmax[k]) == float(want), k
    plain = linearize_tokens(logp, logq, lse, off, torch.tensor([1.0, -1.0, 0.5]), 1.0, b, y)
    assert plain.ca is None and plain.jmax is None
    torch.testing.assert_close(plain.f, out.f, rtol=0, atol=0)


_SM90 = r"""
import os, warnings
os.environ.pop("TRITON_INTERPRET", None)
warnings.filterwarnings("ignore")
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from _sm90 import usage
from rosa_ext.kernels import tile_gram as TK, tile_vjp as TV
P, I = "*fp32", "i32"

def compile(kern, sig, const, nw, ns, tag, aligned=True):
    # pointers, strides, V and the split width 16-divisible, as on the Qwen2.5 head (V = 151936; what Triton
    # specialises at run time: vectorised, pipelined loads); not ``aligned``: only the pointers (V = 50257)
    names = list(kern.arg_names)
    odd = ("na", "nb", "row0", "pad", "S", "KS", "per_chunk", "n_rows", "rows0")
    if not aligned:
        odd = tuple(n for n in sig if not sig[n].startswith("*"))
    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in sig if n not in odd}
    src = ASTSource(fn=kern, signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const, attrs=attrs)
    out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=nw, num_stages=ns))
    stack, regs = usage(out)
    print(tag, "wgmma" if "warp_group_dot" in out.asm["ttgir"] else "-", out.metadata.shared, stack, regs, flush=True)

for mode, t in ((1, "*bf16"), (2, "*bf16"), (0, P)):
    bt, bk, nw, ns = TK.GPU_CONFIG_FP32 if mode == 0 else TK.GPU_CONFIG
    for one in (False, True):
        sig = dict(a_ptr=t, a_lo_ptr=t, a_sc_ptr=P, b_ptr=t, b_lo_ptr=t, b_sc_ptr=P, off_ptr="*i32", part_ptr=P,
                   s_a=I, s_b=I, s_asc=I, s_bsc=I, s_part=I, na=I, nb=I, row0=I, pad=I, V=I, width=I, S=I, KS=I,
                   per_chunk=I)
        const = dict(ONE=one, SYM=not one, HAS_SCALE=True, MODE=mode, PRECISION="tf32x3", BLOCK_T=bt, BLOCK_K=bk)
        compile(TK._gram_partial_kernel, sig, const, nw, ns, f"partial-{mode}-{int(one)}")
        if mode == 1 and not one:
            compile(TK._gram_partial_kernel, sig, const, nw, ns, "partial-1-0-unaligned", aligned=False)
        sig = dict(part_ptr=P, a_ptr=t, a_lo_ptr=t, a_sc_ptr=P, ya_ptr="*i64", b_ptr=t, b_lo_ptr=t, b_sc_ptr=P,
                   yb_ptr="*i64", off_ptr="*i32", out_ptr=P, x_ptr=P, s_a=I, s_b=I, s_asc=I, s_bsc=I, s_part=I,
                   na=I, nb=I, row0=I, pad=I, V=I, width=I, KS=I)
        for center in (True, False):
            const = dict(ONE=one, SYM=not one, HAS_SCALE=True, MODE=mode, CENTER=center, BLOCK_T=TK.FINISH_CONFIG[0])
            compile(TK._gram_finish_kernel, sig, const, TK.FINISH_CONFIG[1], 1, f"finish-{mode}-{int(one)}-{int(center)}")
    bt_, bv, nw_ = TV.GPU_CONFIG
    sig = dict(t_ptr=t, t_lo_ptr=t, sc_ptr=P, w_ptr=P, ws_ptr=P, y_ptr="*i64", off_ptr="*i32", out_ptr=P, s_t=I, s_sc=I,
               s_out=I, n_rows=I, rows0=I, V=I, width=I)
    for centered in (True, False):
        const = dict(ONE=False, HAS_SCALE=True, MODE=mode, CENTERED=centered, ACCUMULATE=True, BLOCK_T=bt_,
                     BLOCK_V=bv)
        compile(TV._tile_vjp_kernel, sig, const, nw_, 1, f"vjp-{mode}-{int(centered)}")
"""


def test_lora_dual_kernels_compile_for_hopper():
    """The Gram kernels (each storage precision, one conversation or packed, centred or raw) and the VJP kernel
    compiled for sm_90: no register spill (no stack frame), shared memory within 227 KiB, and the partial Gram
    on wgmma for the bf16 parts (64-row blocks)."""
    from _helpers import sm90_compile
    rows = [line.split() for line in sm90_compile(_SM90, timeout=1200).strip().splitlines()]
    print("\n".join(" ".join(r) for r in rows))
    assert len(rows) == 3 * (2 * 3 + 2) + 1, rows
    for tag, dots, shared, stack, regs in rows:
        assert int(stack) == 0, (tag, stack, regs)
        assert int(shared) <= 227 * 1024, (tag, shared)
        if tag.startswith("partial-1") or tag.startswith("partial-2"):
            assert dots == "wgmma", tag


# -- GPU (when lent) -------------------------------------------------------------------------------------
@pytest.mark.gpu
def test_gpu_lora_kernels_on_the_qwen_head():
    """Qwen2.5-0.5B head sizes, bf16, three conversations: the Gram (centred and raw) and the centred VJP from
    the compiled kernels (wgmma, truncating tensor-core accumulation, K-split at the vocabulary splits) against
    float64 products of the same tiles, within the GPU test's 3e-5."""
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    lengths, d, V = [200, 37, 63], 896, 151936
    N = sum(lengths)
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(N, d, device="cuda", generator=g).to(torch.bfloat16)
    W = (torch.randn(V, d, device="cuda", generator=g) * 4 / d ** 0.5).to(torch.bfloat16)
    y = torch.randint(0, V, (N,), device="cuda", generator=g)
    y[5:9] = y[0]
    off = torch.tensor([0, 200, 237, N], dtype=torch.int32, device="cuda")
    seg = torch.repeat_interleave(torch.arange(3, device="cuda"), torch.tensor(lengths, device="cuda"))
    t = prob_tiles_from_tensors(h, W, seg.to(torch.int32), None, y, precision="bf16x2")
    K, _ = tile_gram(t, y, lengths, offsets=off)
    G, X = tile_gram(t, y, lengths, offsets=off, center=False)
    w = torch.randn(N, device="cuda", generator=g)
    vjp = tile_vjp(t, w, torch.empty(3, V, device="cuda"), targets=y, offsets=off)
    torch.cuda.synchronize()
    o = off.tolist()
    for b in range(3):
        sl = slice(o[b], o[b + 1])
        R = t.stored()[sl].double() * t.column_scale()[sl].double()
        E = torch.zeros_like(R)
        E[torch.arange(lengths[b], device="cuda"), y[sl]] = 1
        assert _rel(K[b], (E - R) @ (E - R).T) < 3e-5, b
        assert _rel(G[b], R @ R.T) < 3e-5, b
        assert _rel(X[b], R[:, y[sl]] * (y[sl].unsqueeze(0) != y[sl].unsqueeze(1))) < 3e-5, b
        assert _rel(vjp[b], w[sl].double() @ (E - R)) < 3e-5, b
        del R, E
