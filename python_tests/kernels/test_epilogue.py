"""The per-token epilogue kernels (rosa_ext.kernels.epilogue) against the torch formulas they replace: the
combine of the probability-tile partials (tile_layout.combine_partials, the one pass) and the split-stats
linearisation (Linearization.at: the scale, f, p, the target g of residual_target, b[y_t], the finiteness
flags) -- on confident tokens (logit gaps up to 120), underflowing probabilities, -inf logits and NaN, under
the interpreter; the engine's fused linearisation against the torch one on a real pass; and both kernels
compiled ahead of time for sm_90 (no GPU needed)."""

import pytest
import torch

pytestmark = pytest.mark.triton_interp

triton = pytest.importorskip("triton")

from rosa_ext.common.jacobian import WHOLE_VOCABULARY, Linearization, residual_target, segment_max, split_logits  # noqa: E402
from rosa_ext.common.validation import RosaInputError  # noqa: E402
from rosa_ext.kernels.epilogue import BLOCK_TOKENS, combine_partials_fused, linearize_tokens  # noqa: E402
from rosa_ext.kernels.tile_layout import combine_partials  # noqa: E402

NAMES = ("lse", "lse_off", "split_scale", "q", "pt", "rb", "ss", "target_logit", "logp", "logq")


def _same(name, want, got, rtol=3e-6):
    """Equal within rtol (relative; a few ulps of fp32's subnormals absolute), NaN where NaN, infinities alike."""
    ok = (want == got) | ((want - got).abs() <= rtol * want.abs() + 1e-44) | (want.isnan() & got.isnan())
    assert bool(ok.all()), (name, want[~ok][:6].tolist(), got[~ok][:6].tolist())


def _partials(S, N, rows=None, seed=0):
    """Adversarial (6, rows, N) partials of S splits: references +-60, target logits at gaps -120..120 from
    them, a token with no other finite logit, one whose target is elsewhere (-inf), one with neither, NaN."""
    g = torch.Generator().manual_seed(seed)
    rows = rows or S
    part = torch.randn(6, rows, N, generator=g)
    part[0] *= 30
    part[1] = part[1].abs() * 5 + 1e-3
    part[3] *= 0.1
    part[4] = part[4].abs() * 3
    owner = torch.randint(0, S, (N,), generator=g)
    zy = torch.full((rows, N), float("-inf"))
    zy[owner, torch.arange(N)] = part[0].amax(0) + torch.linspace(-120, 120, N)
    part[5] = zy
    part[0, :, 1] = float("-inf")
    part[1, :, 1] = 0          # no other finite logit: lse_off = -inf, scale 0, log p = 0
    part[5, :, 2] = float("-inf")  # a target another rank owns
    part[0, :, 3] = float("-inf")
    part[1, :, 3] = 0
    part[5, :, 3] = float("-inf")  # nothing finite: NaN log p
    if N > 6:
        part[0, S - 1, 5] = float("nan")
        part[5, 0, 6] = float("nan")
    part[0, 0, 0] = part[0, 0, 0] + 200  # one split far above the others: the others' scales underflow
    return part


@pytest.mark.parametrize("S,N,rows", [(1, 5, None), (3, 40, None), (4, BLOCK_TOKENS + 37, 7)])
@pytest.mark.parametrize("lora", [True, False])
def test_combine_matches_the_torch_combine(S, N, rows, lora):
    part = _partials(S, N, rows)[:, :S]
    want = combine_partials(part, None)
    got = combine_partials_fused(part, lora)
    for name, w, x in zip(NAMES, want, got):
        if name == "rb" and not lora:
            assert x is None
            continue
        _same(name, w, x)
    # the confident and unlikely tokens keep their logs exactly (no 1 - p formed)
    if N >= 40:  # gap +120: log(1 - p) < -100; gap ~-96: log p < -50 (neither p nor 1 - p is formed)
        assert float(got[9][-1]) < -100 and float(got[8][N // 10]) < -50


def _torch_linearization(logp, logq, lse, offs, reward, beta, lora_b, y):
    B = len(offs) - 1
    seg = torch.repeat_interleave(torch.arange(B), torch.tensor([offs[i + 1] - offs[i] for i in range(B)]))

    class P:
        num_conversations = B
    P.seg = seg
    logf = logp + logq
    shift = segment_max(P, logf)
    shift = torch.where(torch.isfinite(shift), shift, torch.zeros_like(shift))
    g = residual_target(logp, reward[seg], beta, logq=logq, shift=shift[seg])
    ok = (y >= 0) & (y < lora_b.shape[1])
    by = torch.where(ok, lora_b[seg, y.clamp(0, lora_b.shape[1] - 1)], torch.zeros(()))
    fin = torch.stack([torch.isfinite(lse[seg == b]).all() & torch.isfinite(logp[seg == b]).all() for b in range(B)])
    return dict(p=torch.exp(logp), f=torch.exp(logf - shift[seg]), g=g, target=g * torch.exp(shift[seg]), by=by,
                shift=shift, finite=fin)


@pytest.mark.parametrize("beta", [1.0, 0.3])
def test_linearize_matches_the_torch_formulas(beta):
    """Logit gaps -120..120 (p and 1 - p far below fp32's range), L = +-inf, NaN, a zero and a tiny reward,
    conversations of 1 token and of more than a block, b[y] with targets outside [0, V)."""
    g = torch.Generator().manual_seed(1)
    N = 2 * BLOCK_TOKENS + 90
    L = torch.cat([torch.linspace(-120, 120, 300), torch.randn(N - 300, generator=g) * 4])
    L[10], L[11], L[12] = float("nan"), float("inf"), float("-inf")
    lse_off = torch.randn(N, generator=g) * 5
    lse, logp, logq = split_logits(lse_off + L, lse_off)
    offs = [0, 9, 250, 251, 300, N]  # conversation 1 holds the NaN, L = +-inf
    reward = torch.tensor([-1.0, 0.5, 0.0, 1e-7, 3.0])
    V = 50
    lora_b = torch.randn(len(offs) - 1, V, generator=g)
    y = torch.randint(0, V, (N,), generator=g)
    y[3], y[4] = V + 2, -1
    want = _torch_linearization(logp, logq, lse, offs, reward, beta, lora_b, y)
    got = linearize_tokens(logp, logq, lse, torch.tensor(offs, dtype=torch.int32), reward, beta, lora_b, y)
    for name in ("p", "f", "g", "target", "by", "shift"):
        _same(name, want[name], getattr(got, name))
    assert got.finite.tolist() == want["finite"].tolist() == [True, False, True, True, True]
    assert float(got.g[250]) == 0.0 and bool((got.g[251:300] != 0).all())  # zero reward: 0; 1e-7: not 0
    # confident tokens keep their target: g ~ 1 - p relative to p(1 - p) (MATH.md section 1)
    assert bool((got.g[300 - 20:300].abs() > 0).all())
    none = linearize_tokens(logp, logq, lse, torch.tensor(offs, dtype=torch.int32), reward, beta)
    assert none.by is None
    torch.testing.assert_close(none.g, got.g, rtol=0, atol=0, equal_nan=True)


def _problem(mode, dtype):
    from rosa_ext.core.op import pack
    g = torch.Generator().manual_seed(2)
    T, d, V = 12, 16, 300
    h = torch.randn(2, T, d, generator=g)
    W = torch.randn(V, d, generator=g) * 2
    y = torch.randint(0, V, (2, T), generator=g)
    h[0, :4] = W[y[0, :4]] * 3.0  # logit gaps of ~100: 1 - p far below fp32's range
    kw = dict(mode=mode, backend="triton", beta=0.5)
    if mode == "lora":
        kw.update(lora_a=torch.randn(2, d, generator=g) / 4, lora_b=torch.randn(2, V, generator=g) * 1e-2)
    return pack(h.to(dtype), W.to(dtype), y, [1.0, -2.0], **kw)


@pytest.mark.parametrize("mode", ["hidden", "lora"])
def test_engine_linearization_matches_torch(mode):
    """TritonEngine.linearize (one kernel) against the torch linearisation of the same pass."""
    from rosa_ext.backends.triton_engine import TritonEngine
    prob, cfg = _problem(mode, torch.float32)
    eng = TritonEngine()
    ps = eng.hidden_pass(prob) if mode == "hidden" else eng.gram_pass(prob, keep=True)
    assert ps.engine == "triton"
    got = eng.linearize(prob, ps, mode, cfg.beta)
    want = Linearization.of_pass(prob, ps, mode, WHOLE_VOCABULARY, cfg.beta)
    assert float(torch.exp(ps.logq).min()) < 1e-30  # the confident tokens are there
    for name in ("p", "f", "shift", "g"):
        _same(name, getattr(want, name), getattr(got, name))
    _same("target", want.target(), got.target())
    if mode == "lora":
        _same("by", want.by, got.by)
    assert got.finite.tolist() == [True, True] and bool(got.logits_finite())
    torch.testing.assert_close(got.h, want.h, rtol=0, atol=0)


_SM90 = r"""
import os, warnings
os.environ.pop("TRITON_INTERPRET", None)
warnings.filterwarnings("ignore")
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from _sm90 import usage
from rosa_ext.kernels import epilogue as E
P = "*fp32"
combine = dict(part_ptr=P, S="i32", N="i32", s_k="i32", lse_ptr=P, lse_off_ptr=P, scale_ptr=P, q_ptr=P, pt_ptr=P,
               rb_ptr=P, ss_ptr=P, zy_ptr=P, logp_ptr=P, logq_ptr=P, big="fp32")
lin = dict(logp_ptr=P, logq_ptr=P, lse_ptr=P, off_ptr="*i32", reward_ptr=P, beta="fp32", lb_ptr=P, y_ptr="*i64",
           s_lb="i32", V="i32", p_ptr=P, f_ptr=P, g_ptr=P, tgt_ptr=P, by_ptr=P, shift_ptr=P, finite_ptr="*i8",
           rb_ptr=P, ah_ptr=P, h_ptr="*bf16", D="i32", s_hn="i32", s_hd="i32", lora_scale="fp32", ca_ptr=P, cb_ptr=P,
           jmax_ptr=P)
for name, kern, sig in (("combine", E._combine_kernel, combine), ("linearize", E._linearize_kernel, lin)):
    for lora in (False, True):
        const = dict(HAS_LORA=lora, BLOCK=E.BLOCK_TOKENS)
        if name == "linearize":
            const.update(FACTORS=lora, BLOCK_D=E.BLOCK_D)
        src = ASTSource(fn=kern, signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const)
        out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=dict(num_warps=4))
        stack, _ = usage(out)
        print(name, int(lora), len(out.asm["cubin"]), out.metadata.shared, stack, flush=True)
"""


def test_epilogue_kernels_compile_for_hopper():
    """Both kernels compiled for sm_90 ahead of time, with and without a LoRA term (the linearisation with
    the LoRA dual's factors and a bf16 h), no register spill (no stack frame in the cubin); no GPU needed."""
    from _helpers import sm90_compile
    rows = [line.split() for line in sm90_compile(_SM90, timeout=900).strip().splitlines()]
    assert sorted((x[0], x[1]) for x in rows) == [("combine", "0"), ("combine", "1"), ("linearize", "0"),
                                                  ("linearize", "1")], rows
    assert all(int(x[2]) > 0 for x in rows)
    assert all(int(x[4]) == 0 for x in rows), rows


def test_one_shared_row_of_b_is_read_by_every_conversation():
    """A (1, V) lora_b is the one row every conversation reads (as the tile kernel's tables take it), not
    row 0 for the first conversation and memory past it for the others."""
    g = torch.Generator().manual_seed(5)
    N, V = 30, 40
    lse_off = torch.randn(N, generator=g)
    lse, logp, logq = split_logits(lse_off + torch.randn(N, generator=g) * 3, lse_off)
    offs = torch.tensor([0, 10, 20, N], dtype=torch.int32)
    y = torch.randint(0, V, (N,), generator=g)
    b = torch.randn(1, V, generator=g)
    got = linearize_tokens(logp, logq, lse, offs, torch.tensor([-1.0, 1.0, 0.5]), 1.0, b, y)
    torch.testing.assert_close(got.by, b[0, y], rtol=0, atol=0)
    wide = linearize_tokens(logp, logq, lse, offs, torch.tensor([-1.0, 1.0, 0.5]), 1.0, b.expand(3, V), y)
    torch.testing.assert_close(wide.by, got.by, rtol=0, atol=0)


# -- GPU (when lent): the compiled kernels against the torch formulas -----------------------------------
# On the GPU tl.exp is ex2.approx(x log2 e), relatively off by ~|x| 4e-8 (~8e-6 at exponents near -200):
# the tolerance is 3e-5 relative, not the interpreter's 3e-6.
@pytest.mark.gpu
@pytest.mark.parametrize("S,N,rows", [(3, 40, None), (4, BLOCK_TOKENS + 37, 7)])
def test_gpu_combine_matches_the_torch_combine(S, N, rows):
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    part = _partials(S, N, rows)[:, :S]
    want = combine_partials(part.double(), None)
    got = combine_partials_fused(part.cuda(), True)
    for name, w, x in zip(NAMES, want, got):
        _same(name, w.float(), x.cpu(), rtol=3e-5)


@pytest.mark.gpu
def test_gpu_linearize_matches_the_torch_formulas():
    if not torch.cuda.is_available():
        pytest.skip("needs a CUDA device")
    g = torch.Generator().manual_seed(1)
    N = 2 * BLOCK_TOKENS + 90
    L = torch.cat([torch.linspace(-120, 120, 300), torch.randn(N - 300, generator=g) * 4])
    lse_off = torch.randn(N, generator=g) * 5
    lse, logp, logq = split_logits(lse_off + L, lse_off)
    offs = [0, 9, 250, 251, 300, N]
    reward = torch.tensor([-1.0, 0.5, 0.0, 1e-7, 3.0])
    lora_b = torch.randn(len(offs) - 1, 50, generator=g)
    y = torch.randint(0, 50, (N,), generator=g)
    want = _torch_linearization(logp.double(), logq.double(), lse.double(), offs, reward.double(), 1.0,
                                lora_b.double(), y)
    c = [t.cuda() for t in (logp, logq, lse, torch.tensor(offs, dtype=torch.int32), reward, lora_b, y)]
    got = linearize_tokens(*c[:5], 1.0, c[5], c[6])
    for name in ("p", "f", "g", "target", "by", "shift"):
        _same(name, want[name].float(), getattr(got, name).cpu(), rtol=3e-5)
    assert got.finite.tolist() == want["finite"].tolist()


def test_combine_writes_into_a_table_and_names_a_bad_out():
    """``out=`` columns of a wider (9, M) table: the results are views of it, the other columns untouched;
    a wrong shape or dtype is refused naming ``out``."""
    part = _partials(3, 20, None)[:, :3]
    want = combine_partials_fused(part, True)
    table = torch.full((9, 50), -7.0)
    got = combine_partials_fused(part, True, out=table[:, 10:30])
    for name, w, x in zip(NAMES, want, got):
        torch.testing.assert_close(x, w, rtol=0, atol=0, equal_nan=True, msg=name)
    assert (table[:, :10] == -7.0).all() and (table[:, 30:] == -7.0).all()
    assert got[0].data_ptr() == table[0, 10:].data_ptr()
    torch.testing.assert_close(table[8, 10:30], want[-1], rtol=0, atol=0, equal_nan=True)  # COMBINE_ROWS order
    for bad in (torch.empty(9, 21), torch.empty(9, 20, dtype=torch.float64), torch.empty(20, 9).T):
        with pytest.raises(RosaInputError) as e:
            combine_partials_fused(part, True, out=bad)
        assert e.value.argument == "out"
