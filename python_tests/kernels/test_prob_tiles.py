"""Probability tiles (rosa_ext.kernels.prob_tiles) and the GEMMs over them (rosa_ext.kernels.tile_gemms)
against float64 math on the same inputs: the tiles normalised by a given lse (P, the two-pass form) and the
one logits pass (lse=None: the target split off before any reference, per-split references, the combine,
the split scales that make the tiles r̂ -- the softmax of the other logits -- which the GEMMs apply).

On the CPU the kernel runs in the Triton interpreter (conftest sets TRITON_INTERPRET=1; tile 16 tokens
x 32 vocabulary x 16 hidden), so sizes are tiny; V is never a multiple of the tile, one target is in
the last (partial) vocabulary tile, targets repeat, and some cases force two or three vocabulary splits
(splits of 256 columns: full ones and a narrower last one, the GEMMs' batched and tail parts).
"""
import os

import pytest
import torch

pytest.importorskip("triton")

from _helpers import build_problem  # noqa: E402

import rosa_ext.kernels as K  # noqa: E402
from rosa_ext.kernels import tile_gemms as TG  # noqa: E402
from rosa_ext.kernels._tiles import INTERPRET  # noqa: E402
from rosa_ext.kernels.prob_tiles import prob_tiles_from_tensors, probability_tiles, tile_buffers  # noqa: E402
from rosa_ext.reference import jacobian_reference  # noqa: E402

pytestmark = pytest.mark.triton_interp
S = 8.0  # LoRA scale


def _case(T, V, d, *, B=1, bias=False, lora=False, seed=0, scale=1.5):
    """fp32 inputs and their float64 truth: logits z (T, V), pi, P (target entries 0), q, pt, rb, ss, and the
    off-target distribution R = r̂ = P / q with its lse_off, R . R and R . b."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, d, generator=g)
    W = torch.randn(V, d, generator=g) * scale / d ** 0.5
    c = torch.randn(V, generator=g) * 0.3 if bias else None
    counts = [T // B + (1 if k < T % B else 0) for k in range(B)]
    seg = torch.repeat_interleave(torch.arange(B), torch.tensor(counts))
    a = torch.randn(B, d, generator=g) / d ** 0.5 if lora else None
    b = torch.randn(B, V, generator=g) * 0.1 if lora else None
    y = torch.randint(0, V, (T,), generator=g)
    y[0] = V - 1  # the last, partial vocabulary tile
    y[1:4] = y[0]  # repeated targets (within the first conversation when T >= 4)
    if T > 10:
        y[7:10] = 5
    z = h.double() @ W.double().T
    if c is not None:
        z = z + c.double()
    if lora:
        z = z + S * (h.double() * a.double()[seg]).sum(1, keepdim=True) * b.double()[seg]
    pi = torch.softmax(z, 1)
    lse = torch.logsumexp(z, 1)
    rows = torch.arange(T)
    P = pi.clone()
    P[rows, y] = 0
    truth = dict(z=z, pi=pi, P=P, q=P.sum(1), pt=pi[rows, y], ss=(P * P).sum(1),
                 rb=(P * b.double()[seg]).sum(1) if lora else None)
    truth.update(_off_target_truth(z, y, b.double()[seg] if lora else None))
    model = dict(hidden=h, weight=W, bias=c, targets=y, seg=seg if B > 1 else None,
                 lora_a=(a if B > 1 else a[0]) if lora else None, lora_b=(b if B > 1 else b[0]) if lora else None)
    return model, lse, truth, seg


def _off_target_truth(z, y, bseg=None):
    """float64 r̂ (R: the softmax of the logits without the target entry, 0 there), lse_off, R . R, R . b."""
    zo = z.clone()
    zo[torch.arange(z.shape[0]), y] = float("-inf")
    R = torch.softmax(zo, 1)
    return dict(R=R, lse_off=torch.logsumexp(zo, 1), ssr=(R * R).sum(1), rbr=None if bseg is None else (R * bseg).sum(1))


def _low_level(model, lse, seg, precision="fp32", splits=None, targets=None, one_pass=False):
    """The tiles of a case: normalised by the given float64 lse (rounded to fp32), or (one_pass) by the
    kernel's own statistics."""
    h, W = model["hidden"], model["weight"]
    ah = lb = None
    if model["lora_a"] is not None:
        a = model["lora_a"].reshape(-1, h.shape[1])
        ah = (h * (a[0] if a.shape[0] == 1 else a[seg])).sum(1)
        lb = model["lora_b"].reshape(-1, W.shape[0]).float()
    y = model["targets"] if targets is None else targets
    return prob_tiles_from_tensors(h, W, seg.to(torch.int32), None if one_pass else lse.float(), y, bias=model["bias"],
                                   lora_b=lb, ah=ah, lora_scale=S, precision=precision, splits=splits)


CASES = [  # (T, V, d, B, bias, lora, forced splits)
    (1, 100, 16, 1, False, False, None),
    (1, 100, 16, 1, True, True, None),
    (37, 300, 32, 1, True, True, 2),
    (37, 200, 16, 1, False, False, None),
    (70, 200, 32, 3, False, True, None),
    (70, 300, 16, 2, True, False, 2),
]


@pytest.mark.parametrize("T,V,d,B,bias,lora,splits", CASES)
def test_prob_tiles_fp32_match_float64(T, V, d, B, bias, lora, splits):
    model, lse, truth, seg = _case(T, V, d, B=B, bias=bias, lora=lora)
    tiles = _low_level(model, lse, seg, splits=splits)
    assert tiles.p.shape == (T, V) and tiles.p.dtype == torch.float32 and tiles.hi is None
    err = (tiles.p.double() - truth["P"]).abs().max().item()
    assert err <= 1e-6, err
    rows = torch.arange(T)
    assert torch.all(tiles.p[rows, model["targets"]] == 0)
    torch.testing.assert_close(tiles.q.double(), truth["q"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(tiles.pt.double(), truth["pt"], rtol=1e-5, atol=1e-7)
    assert ((tiles.q + tiles.pt).double() - 1).abs().max().item() <= 1e-5  # row sums
    torch.testing.assert_close(tiles.ss.double(), truth["ss"], rtol=1e-5, atol=1e-7)
    if lora:
        torch.testing.assert_close(tiles.rb.double(), truth["rb"], rtol=1e-5, atol=1e-6)
    else:
        assert tiles.rb is None


@pytest.mark.parametrize("T,V,d,B,bias,lora,splits", [CASES[2], CASES[4]])
def test_prob_tiles_public_call_with_its_own_stats(T, V, d, B, bias, lora, splits):
    """The tensor-level call: lse from the stats kernel (prepared problem, and a plain call)."""
    model, _, truth, _ = _case(T, V, d, B=B, bias=bias, lora=lora, seed=1)
    kw = {k: model[k] for k in ("bias", "lora_a", "lora_b", "seg")}
    prob = K.prepare(model["hidden"], model["weight"], model["targets"], lora_scale=S, **kw)
    a = probability_tiles(model["hidden"], model["weight"], model["targets"], prob=prob)
    b = probability_tiles(model["hidden"], model["weight"], model["targets"], lora_scale=S, precision="bf16x2", **kw)
    for got in (a.dense(), b.dense()):
        err = (got.double() - truth["P"]).abs().max().item()
        assert err <= 2e-6, err
    assert ((a.q + a.pt).double() - 1).abs().max().item() <= 1e-5


def test_prob_tiles_keep_one_minus_p_when_p_is_near_one():
    """q = 1 - p_t summed off-target: accurate where 1 - p_t would be rounding noise in fp32."""
    model, _, _, seg = _case(16, 100, 16, seed=2)
    h, W, y = model["hidden"], model["weight"], model["targets"]
    W[y[5]] = h[5] * (18.0 / h[5].norm() ** 2)  # z[5, y_5] = 18 over |z| ~ 2 elsewhere: 1 - p ~ 1e-6
    z = h.double() @ W.double().T
    pi = torch.softmax(z, 1)
    q64 = 1 - pi[torch.arange(16), y]
    lse = torch.logsumexp(z, 1)
    tiles = _low_level(model, lse, seg)
    assert q64[5] < 1e-5
    rel = ((tiles.q.double() - q64).abs() / q64).max().item()
    assert rel <= 1e-5, rel
    naive = (1 - tiles.pt[5].double()).item()  # what 1 - p would give: off by ~ulp(1) / q
    assert abs(naive - q64[5].item()) / q64[5].item() > 10 * rel


def test_prob_tiles_targets_outside_the_vocabulary_are_not_split():
    """A vocabulary-parallel rank's rows: an id outside [0, V) splits nothing off (pt = 0, q = 1)."""
    model, lse, truth, seg = _case(20, 100, 16, seed=3)
    y = model["targets"].clone()
    y[::3] = -1
    y[1::3] = 100
    tiles = _low_level(model, lse, seg, targets=y)
    out = (y < 0) | (y >= 100)
    torch.testing.assert_close(tiles.p[out].double(), truth["pi"][out], rtol=0, atol=1e-6)
    assert torch.all(tiles.pt[out] == 0)
    assert (tiles.q[out].double() - 1).abs().max().item() <= 1e-5


@pytest.mark.parametrize("precision", ["bf16x2", "bf16"])
def test_prob_tiles_bf16_parts(precision):
    """hi = P rounded to the nearest bf16 (ties to even, as torch rounds), lo = the rest rounded:
    hi + lo = P to 2^-16 relative (bf16x2); hi alone to 2^-8 (bf16)."""
    model, lse, truth, seg = _case(37, 300, 32, bias=True, lora=True, seed=4)
    f32 = _low_level(model, lse, seg, splits=2)
    t = _low_level(model, lse, seg, precision=precision, splits=2)
    assert t.p is None and t.hi.dtype == torch.bfloat16 and (t.lo is None) == (precision == "bf16")
    if INTERPRET:  # the same arithmetic in both launches: the rounding itself is checked exactly
        assert torch.equal(t.hi, f32.p.to(torch.bfloat16))
        if t.lo is not None:
            assert torch.equal(t.lo, (f32.p - t.hi.float()).to(torch.bfloat16))
    P = truth["P"]
    rel = 2.0 ** -16 + 2e-6 if precision == "bf16x2" else 2.0 ** -8 + 2e-6
    assert torch.all((t.dense().double() - P).abs() <= rel * P + 1e-6)
    for name in ("q", "pt", "ss"):  # the row sums are of the fp32 entries whatever the storage
        torch.testing.assert_close(getattr(t, name), getattr(f32, name), rtol=1e-6, atol=1e-8)


def test_prob_tiles_write_into_given_rows_of_a_larger_buffer():
    """out=: token blocks written into row slices of one kept buffer (row stride > V)."""
    model, lse, truth, seg = _case(37, 200, 16, seed=5)
    big = torch.full((40, 256), -1.0)
    h, W, y = model["hidden"], model["weight"], model["targets"]
    for r0, r1 in ((0, 20), (20, 37)):
        prob_tiles_from_tensors(h[r0:r1], W, seg[r0:r1].to(torch.int32), lse[r0:r1].float(), y[r0:r1],
                                out=(big[r0:r1, :200], None))
    assert (big[:37, :200].double() - truth["P"]).abs().max().item() <= 1e-6
    assert torch.all(big[:, 200:] == -1) and torch.all(big[37:] == -1)


def test_prob_tiles_bad_arguments_are_named():
    model, lse, _, seg = _case(5, 100, 16)
    h, W, y = model["hidden"], model["weight"], model["targets"]
    with pytest.raises(ValueError, match="precision"):
        prob_tiles_from_tensors(h, W, seg.int(), lse.float(), y, precision="fp16")
    with pytest.raises(ValueError, match="lse"):
        prob_tiles_from_tensors(h, W, seg.int(), lse[:3].float(), y)
    with pytest.raises(ValueError, match="out"):
        prob_tiles_from_tensors(h, W, seg.int(), lse.float(), y, out=tile_buffers(5, 100, "bf16x2", h.device))
    with pytest.raises(ValueError, match="targets"):
        probability_tiles(h, W, y + 1000)


# -- one logits pass: the kernel's own row statistics ---------------------------------------------------
ONE_PASS_CASES = [  # (T, V, d, B, bias, lora, forced splits)
    (1, 100, 16, 1, False, False, None),
    (1, 300, 16, 1, True, True, 2),
    (37, 300, 32, 1, True, True, 2),
    (70, 600, 16, 3, False, True, 3),
]
#: per-entry tolerance of the stored parts, relative (module docstring of prob_tiles), plus the fp32
#: logits' and lse's error (absolute on P)
PART_REL = {"fp32": 0.0, "bf16x2": 2.0 ** -16, "bf16": 2.0 ** -8}


def _check_one_pass(tiles, truth, model, T, lora, precision, logit_err=2e-6):
    """The one pass's statistics and tiles against float64: the tiles are r̂ (off-target), their r̂ . r̂ and
    r̂ . b, lse, lse_off, the target logit, q = 1 - p and pt = p; ``logit_err``: the absolute error of fp32
    logits of this size (r̂'s relative error is about twice it)."""
    rows = torch.arange(T)
    y = model["targets"]
    assert tiles.off_target
    torch.testing.assert_close(tiles.lse.double(), torch.logsumexp(truth["z"], 1), rtol=0, atol=logit_err)
    torch.testing.assert_close(tiles.lse_off.double(), truth["lse_off"], rtol=0, atol=logit_err)
    torch.testing.assert_close(tiles.target_logit.double(), truth["z"][rows, y], rtol=0, atol=logit_err)
    R = truth["R"]
    assert torch.all((tiles.dense().double() - R).abs() <= (PART_REL[precision] + 2 * logit_err) * R + 1e-7)
    assert torch.all(tiles.stored()[rows, y] == 0)
    rel = max(1e-5, 2 * logit_err)
    torch.testing.assert_close(tiles.q.double(), truth["q"], rtol=rel, atol=1e-7)
    torch.testing.assert_close(tiles.pt.double(), truth["pt"], rtol=rel, atol=1e-7)
    torch.testing.assert_close(tiles.logp.double(), truth["pt"].log(), rtol=rel, atol=1e-7)
    torch.testing.assert_close(tiles.logq.double(), truth["q"].log(), rtol=rel, atol=1e-7)
    torch.testing.assert_close(tiles.ss.double(), truth["ssr"], rtol=rel, atol=1e-7)
    P = truth["P"]  # pi's off-target entries: (1 - p) r̂
    pi_rows = tiles.dense().double() * tiles.pi_factor().double().unsqueeze(1)
    assert torch.all((pi_rows - P).abs() <= (PART_REL[precision] + 4 * logit_err) * P + 1e-7)
    if lora:
        torch.testing.assert_close(tiles.rb.double(), truth["rbr"], rtol=rel, atol=1e-6)
    else:
        assert tiles.rb is None


@pytest.mark.parametrize("T,V,d,B,bias,lora,splits", ONE_PASS_CASES)
def test_one_pass_tiles_and_statistics_match_float64(T, V, d, B, bias, lora, splits):
    """lse=None: the kernel's own statistics -- lse, lse_off, the target logit, r̂ (the stored tiles times
    their split scales), q, pt, r̂ . r̂, r̂ . b -- equal float64 math; one scale per (split, token)."""
    model, _, truth, seg = _case(T, V, d, B=B, bias=bias, lora=lora, seed=11)
    tiles = _low_level(model, None, seg, splits=splits, one_pass=True)
    n = 1 if splits is None else splits
    assert tiles.split_scale.shape == (n, T) and tiles.split_width == (256 if n > 1 else 0)
    _check_one_pass(tiles, truth, model, T, lora, "fp32")


@pytest.mark.parametrize("precision", ["bf16x2", "bf16"])
def test_one_pass_bf16_parts(precision):
    """The bf16 parts of a one-pass launch keep their per-entry bounds relative to the stored value, so
    r̂ = (hi + lo) * scale to 2^-16 (bf16x2) / 2^-8 (bf16) of itself."""
    T, V, d, B, bias, lora, splits = ONE_PASS_CASES[3]
    model, _, truth, seg = _case(T, V, d, B=B, bias=bias, lora=lora, seed=12)
    tiles = _low_level(model, None, seg, precision=precision, splits=splits, one_pass=True)
    assert tiles.p is None and (tiles.lo is None) == (precision == "bf16")
    _check_one_pass(tiles, truth, model, T, lora, precision)


def _jump_case(T=40, V=600, d=16, jump=100.0, small=25.0, seed=13):
    """Logits that jump within a split (splits of 256 columns, tiles of 32 under the interpreter): in
    split 1, columns 352-383 (its 4th tile) rise by ``jump`` for the first 16 tokens (and fall by it for
    the others); in split 2 every token's columns 576-599 (its last tile) rise by ``small``, below the
    headroom."""
    model, _, _, seg = _case(T, V, d, bias=True, seed=seed)
    h, W, c = model["hidden"], model["weight"], model["bias"]
    h[:, 0] = -1.0
    h[:16, 0] = 1.0
    W[:, 0] = 0.0
    W[352:384, 0] = jump
    c[576:600] += small
    y = model["targets"]
    y[20] = 360  # a target inside the jump, for a token that falls
    y[3] = 370  # and one for a token that rises
    z = h.double() @ W.double().T + c.double()
    pi = torch.softmax(z, 1)
    P = pi.clone()
    P[torch.arange(T), y] = 0
    truth = dict(z=z, pi=pi, P=P, q=P.sum(1), pt=pi[torch.arange(T), y], ss=(P * P).sum(1), rb=None)
    truth.update(_off_target_truth(z, y))
    return model, truth, seg


def test_one_pass_reference_rule_when_logits_jump_within_a_split():
    """A jump of 100 inside a split (stored relative to the first tile's maximum it would be e^100, past
    fp32): the program writes that split again relative to the row maxima -- nothing overflows, every row
    equals float64. A rise of 25 (below the headroom, e^33) keeps the first tile's reference: entries up
    to ~e^25 are stored, and the products over them are still float64-exact."""
    T, V = 40, 600
    model, truth, seg = _jump_case(T, V)
    tiles = _low_level(model, None, seg, splits=3, one_pass=True)
    stored = tiles.stored()
    assert torch.isfinite(stored).all() and torch.isfinite(tiles.split_scale).all()
    _check_one_pass(tiles, truth, model, T, False, "fp32", logit_err=3e-5)  # |z| ~ 100: fp32 ulp 7.6e-6
    assert stored.max() > 1e9  # the rise of 25 in split 2 kept its first-tile reference
    z = truth["z"].clone()
    z[torch.arange(T), model["targets"]] = float("-inf")  # the references see only the other logits
    # the reference each (token, split) used, from its largest stored entry: stored = exp(z - ref) (the scale
    # exp(ref - lse_off) is subnormal where the split lies ~100 below lse_off: it cannot tell the reference exactly)
    ref = torch.empty(T, 3, dtype=torch.float64)
    for k in range(3):
        block = stored[:, k * 256:(k + 1) * 256].double()
        j = block.argmax(1, keepdim=True)
        ref[:, k] = (z[:, k * 256:(k + 1) * 256].gather(1, j) - block.gather(1, j).log())[:, 0]
    split_max = torch.stack([z[:, k * 256:(k + 1) * 256].max(1).values for k in range(3)], 1)
    if INTERPRET:  # tiles of 32 columns, 16 tokens: the rule itself
        first = torch.stack([z[:, k * 256:k * 256 + 32].max(1).values for k in range(3)], 1)
        torch.testing.assert_close(ref[:16, 1], split_max[:16, 1], rtol=0, atol=1e-4)  # rewritten: 100 > 33
        torch.testing.assert_close(ref[16:, 1], first[16:, 1], rtol=0, atol=1e-4)  # other token tiles: no jump
        torch.testing.assert_close(ref[:, [0, 2]], first[:, [0, 2]], rtol=0, atol=1e-4)  # 25 < 33: kept
        assert (split_max[:, 2] - first[:, 2]).min() > 18  # (the rise is real)
    assert torch.all(ref <= split_max + 1e-4)  # stored entries <= e^headroom: ref >= split max - 33
    assert torch.all(ref >= split_max - 33.0)
    # the GEMMs over these tiles (stored entries ~e^25 with their small scales, one split rewritten)
    W, y = model["weight"], model["targets"]
    assert _rel(TG.off_target_weight(tiles, W), truth["R"] @ W.double()) <= 3e-5
    E = torch.nn.functional.one_hot(y, V).double() - truth["pi"]
    assert _rel(TG.centered_gram(tiles, y, [0, T])[0], E @ E.T) <= 3e-5
    w = torch.randn(T, generator=torch.Generator().manual_seed(0))
    assert _rel(TG.centered_vjp(tiles, w, y)[0], w.double() @ E) <= 3e-5


def test_one_pass_targets_outside_the_vocabulary():
    """One pass, ids outside [0, V): nothing split off (pt = 0, q = 1, target logit -inf, lse_off = lse),
    r̂ = pi."""
    model, _, truth, seg = _case(20, 300, 16, seed=3)
    y = model["targets"].clone()
    y[::3] = -1
    y[1::3] = 300
    tiles = _low_level(model, None, seg, targets=y, splits=2, one_pass=True)
    out = (y < 0) | (y >= 300)
    torch.testing.assert_close(tiles.dense()[out].double(), truth["pi"][out], rtol=0, atol=1e-6)
    assert torch.all(tiles.pt[out] == 0) and torch.all(tiles.target_logit[out] == float("-inf"))
    assert torch.all(tiles.q[out] == 1) and torch.equal(tiles.lse[out], tiles.lse_off[out])
    torch.testing.assert_close(tiles.lse.double(), torch.logsumexp(truth["z"], 1), rtol=0, atol=2e-6)


@pytest.mark.parametrize("precision", ["fp32", "bf16x2"])
def test_normalize_applies_the_split_scales_in_place(precision):
    """normalize_: the stored tiles become r̂ (split_scale None), within one more rounding of the parts
    (bf16x2: 2^-15 of r̂); the row sums are unchanged. normalize_(pi=True): P = (1 - p) r̂, with
    P . P and P . b, no longer off-target."""
    T, V, d, B, bias, lora, splits = ONE_PASS_CASES[2]
    model, _, truth, seg = _case(T, V, d, B=B, bias=bias, lora=lora, seed=14)
    tiles = _low_level(model, None, seg, precision=precision, splits=splits, one_pass=True)
    before = tiles.dense().clone()
    ss, rb = tiles.ss.clone(), tiles.rb.clone()
    assert tiles.normalize_() is tiles and tiles.split_scale is None and tiles.off_target
    assert torch.equal(tiles.ss, ss) and torch.equal(tiles.rb, rb)
    R = truth["R"]
    rel = 2.0 ** -15 if precision == "bf16x2" else 2.0 ** -23
    assert torch.all((tiles.dense().double() - before.double()).abs() <= rel * before.double() + 1e-30)
    assert torch.all((tiles.dense().double() - R).abs() <= (rel + 4e-6) * R + 1e-7)
    P = truth["P"]
    assert tiles.normalize_(pi=True) is tiles and not tiles.off_target  # r̂ already unscaled -> P
    assert torch.all((tiles.dense().double() - P).abs() <= (2 * rel + 4e-6) * P + 1e-7)
    torch.testing.assert_close(tiles.ss.double(), truth["ss"], rtol=1e-5, atol=1e-7)
    pi = _low_level(model, None, seg, precision=precision, splits=splits, one_pass=True).normalize_(pi=True)
    assert pi.split_scale is None and not pi.off_target and pi.pi_factor() is None
    assert torch.all((pi.dense().double() - P).abs() <= (rel + 4e-6) * P + 1e-7)
    torch.testing.assert_close(pi.ss.double(), truth["ss"], rtol=1e-5, atol=1e-7)
    torch.testing.assert_close(pi.rb.double(), truth["rb"], rtol=1e-5, atol=1e-6)


def test_public_call_without_lse_runs_one_pass_for_fp32_tiles(monkeypatch):
    """probability_tiles(lse=None) with "fp32" tiles: one kernel launch (no stats pass), normalised to P."""
    from rosa_ext.kernels import prob_tiles as PT
    from rosa_ext.kernels import stats_pass

    model, _, truth, _ = _case(37, 300, 16, lora=True, seed=15)
    calls = []
    real = PT._prob_tile_kernel

    class Counting:
        configs = real.configs

        def __getitem__(self, grid):
            calls.append(grid)
            return real[grid]

    def no_stats(*a, **k):
        raise AssertionError("the stats pass ran")

    monkeypatch.setattr(PT, "_prob_tile_kernel", Counting())
    monkeypatch.setattr(stats_pass, "stats_partials", no_stats)
    t = probability_tiles(model["hidden"], model["weight"], model["targets"], lora_a=model["lora_a"],
                          lora_b=model["lora_b"], lora_scale=S)
    assert len(calls) == 1 and t.split_scale is None and not t.off_target
    assert (t.p.double() - truth["P"]).abs().max().item() <= 2e-6


def test_split_plan_caps_the_width_for_the_gemms():
    """The probability tiles' splits are the GEMMs' K-split: at most GEMM_K_MAX wide, whatever the token
    count (without the cap a large one gets one split); the other kernels keep the uncapped plan."""
    from rosa_ext.kernels._tiles import DEFAULT_SMS, SPLIT_ALIGN, split_plan, split_width
    from rosa_ext.kernels.prob_tiles import GEMM_K_MAX

    assert GEMM_K_MAX % SPLIT_ALIGN == 0
    V = 151936
    for N in (1, 300, 1024, 8192, 65536):
        for bt in (16, 64, 128):
            n, chunk = split_plan(N, V, bt, DEFAULT_SMS, GEMM_K_MAX)
            assert chunk <= GEMM_K_MAX and n == -(-V // chunk) and chunk == split_width(V, n)
            assert n >= -(-V // GEMM_K_MAX)
    assert split_plan(65536, V, 128, DEFAULT_SMS)[0] == 1


# -- the GEMMs over the tiles --------------------------------------------------------------------------
GEMM_TOL = {"fp32": 2e-6, "bf16x2": 2e-5, "bf16": 5e-3}  # relative, against float64


def _rel(got, want):
    return ((got.double() - want).norm() / want.norm()).item()


@pytest.mark.parametrize("precision", ["fp32", "bf16x2", "bf16"])
@pytest.mark.parametrize("T,V,d,B,bias,lora,splits", [CASES[0], CASES[3], CASES[5]])
def test_hidden_products_over_tiles(precision, T, V, d, B, bias, lora, splits):
    """pi W = P W + p_t W[y_t], and the hidden Jacobian rows against the float64 reference's J."""
    model, lse, truth, seg = _case(T, V, d, B=B, bias=bias, lora=lora, seed=6)
    tiles = _low_level(model, lse, seg, precision=precision, splits=splits)
    W, y = model["weight"], model["targets"]
    tol = GEMM_TOL[precision]
    assert _rel(TG.off_target_weight(tiles, W), truth["P"] @ W.double()) <= tol
    assert _rel(TG.pi_weight(tiles, W, y), truth["pi"] @ W.double()) <= tol
    assert _rel(TG.off_target_weight(tiles, W.to(torch.bfloat16)), truth["P"] @ W.to(torch.bfloat16).double()) <= tol
    J = TG.hidden_jacobian(tiles, W, y, tiles.pt)
    bounds = torch.cumsum(torch.bincount(seg, minlength=B), 0).tolist()
    for lo, hi in zip([0] + bounds[:-1], bounds):  # each conversation's rows: its own reference problem
        prob = build_problem(model["hidden"][lo:hi].double(), W.double(), y[lo:hi], 1.0, mode="hidden", lora_a=None,
                             lora_b=None, lora_scale=S, bias=None if model["bias"] is None else model["bias"].double(),
                             beta=1.0, damping=1.0, max_iter=1, tol=0.0, solver="cg", backend="torch", mask=None)
        assert _rel(J[lo:hi], jacobian_reference(prob, 0, mode="hidden")) <= 2 * tol



@pytest.mark.parametrize("precision", ["fp32", "bf16x2"])
def test_hidden_jacobian_with_a_lora_term_in_the_logits(precision):
    """Hidden mode on a head with a LoRA adapter (W + s b a^T): the extra p_t s (q_t b[y_t] - r_t . b) a
    term, against the float64 reference's Jacobian."""
    T, V, d = 37, 300, 16
    model, lse, _, seg = _case(T, V, d, bias=True, lora=True, seed=10)
    tiles = _low_level(model, lse, seg, precision=precision, splits=2)
    W, y, a, b = model["weight"], model["targets"], model["lora_a"], model["lora_b"]
    J = TG.hidden_jacobian(tiles, W, y, tiles.pt, lora_a=a, lora_b_y=b[y], lora_scale=S)
    prob = build_problem(model["hidden"].double(), W.double(), y, 1.0, mode="hidden", lora_a=a.double(),
                         lora_b=b.double(), lora_scale=S, bias=model["bias"].double(), beta=1.0, damping=1.0,
                         max_iter=1, tol=0.0, solver="cg", backend="torch", mask=None)
    assert _rel(J, jacobian_reference(prob, 0, mode="hidden")) <= 2 * GEMM_TOL[precision]
    with pytest.raises(ValueError, match="lora_b_y"):
        TG.hidden_jacobian(tiles, W, y, tiles.pt, lora_a=a, lora_scale=S)

@pytest.mark.parametrize("precision", ["fp32", "bf16x2", "bf16"])
@pytest.mark.parametrize("T,V,d,B,bias,lora,splits", [CASES[1], CASES[2], CASES[4]])
def test_lora_gram_and_vjp_over_tiles(precision, T, V, d, B, bias, lora, splits):
    """The centred Gram (e_y - pi)(e_y - pi)^T per conversation, its diagonal from the row sums, and
    the VJP sum_t w_t (e_{y_t} - pi_t) per conversation, against float64."""
    model, lse, truth, seg = _case(T, V, d, B=B, bias=bias, lora=lora, seed=7)
    tiles = _low_level(model, lse, seg, precision=precision, splits=splits)
    y = model["targets"]
    E = torch.nn.functional.one_hot(y, V).double() - truth["pi"]
    counts = torch.bincount(seg, minlength=B).tolist()
    offsets = [0]
    for n in counts:
        offsets.append(offsets[-1] + n)
    tol = GEMM_TOL[precision]
    Ks = TG.centered_gram(tiles, y, offsets)
    assert len(Ks) == B
    for k, Kb in enumerate(Ks):
        Eb = E[offsets[k]:offsets[k + 1]]
        assert _rel(Kb, Eb @ Eb.T) <= tol
    assert _rel(TG.centered_sqnorm(tiles), (E * E).sum(1)) <= tol
    g = torch.Generator().manual_seed(8)
    w = torch.randn(T, generator=g)
    got = TG.centered_vjp(tiles, w, y, seg, B)
    want = torch.zeros(B, V, dtype=torch.float64).index_add_(0, seg, w.double().unsqueeze(1) * E)
    assert got.shape == (B, V) and _rel(got, want) <= tol
    u = torch.randn(B, V, generator=g)  # the JVP's reduction over the tiles, one u row per conversation
    dots = TG.off_target_dot(tiles, u if B > 1 else u[0], seg if B > 1 else None)
    assert dots.shape == (T,) and _rel(dots, (truth["P"] * u.double()[seg]).sum(1)) <= tol



@pytest.mark.parametrize("precision", ["fp32", "bf16x2"])
@pytest.mark.parametrize("scratch", [None, 1])
def test_products_over_one_pass_tiles(precision, scratch, monkeypatch):
    """Every GEMM over one-pass tiles (r̂, stored relative to per-split references: the K-split with the
    scales) against float64: the engines' products -- r̂ W, r̂_t . r̂_u, the cross terms r̂_t[y_u], w^T r̂,
    the JVP's r̂ . u -- and the pi-form ones (pi W, the hidden Jacobian, the centred Gram, the VJP): three
    splits (two full, one narrower), three conversations; ``scratch`` 1 byte: the splits' partial products
    one split at a time (the grouped path)."""
    if scratch is not None:
        monkeypatch.setattr(TG, "SCRATCH_BYTES", scratch)
    T, V, d, B = 45, 600, 16, 3
    model, _, truth, seg = _case(T, V, d, B=B, bias=True, lora=True, seed=16)
    tiles = _low_level(model, None, seg, precision=precision, splits=3, one_pass=True)
    assert tiles.split_scale.shape == (3, T) and tiles.split_width == 256
    W, y = model["weight"], model["targets"]
    tol = GEMM_TOL[precision]
    R = truth["R"]
    assert _rel(TG.off_target_weight(tiles, W), R @ W.double()) <= tol
    assert _rel(TG.pi_weight(tiles, W, y), truth["pi"] @ W.double()) <= tol
    a, b = model["lora_a"], model["lora_b"]
    J = TG.hidden_jacobian(tiles, W, y, tiles.pt, lora_a=a[seg], lora_b_y=b[seg, y], lora_scale=S)
    pi = truth["pi"]
    Wl = W.double().unsqueeze(0) + S * b.double()[seg].unsqueeze(2) * a.double()[seg].unsqueeze(1)  # (T, V, d)
    J64 = truth["pt"].unsqueeze(1) * (Wl[torch.arange(T), y] - torch.einsum("tv,tvd->td", pi, Wl))
    assert _rel(J, J64) <= 2 * tol
    offsets = [0] + torch.cumsum(torch.bincount(seg, minlength=B), 0).tolist()
    E = torch.nn.functional.one_hot(y, V).double() - pi
    for k, (Kb, X) in enumerate(zip(TG.centered_gram(tiles, y, offsets), TG.cross_terms(tiles, y, offsets))):
        lo, hi = offsets[k], offsets[k + 1]
        assert _rel(Kb, E[lo:hi] @ E[lo:hi].T) <= tol
        assert _rel(X, R[lo:hi][:, y[lo:hi]]) <= tol
    for k, G in enumerate(TG.off_target_gram(tiles, offsets)):
        lo, hi = offsets[k], offsets[k + 1]
        assert _rel(G, R[lo:hi] @ R[lo:hi].T) <= tol
    g = torch.Generator().manual_seed(17)
    w = torch.randn(T, generator=g)
    want = torch.zeros(B, V, dtype=torch.float64).index_add_(0, seg, w.double().unsqueeze(1) * E)
    assert _rel(TG.centered_vjp(tiles, w, y, seg, B), want) <= tol
    assert _rel(TG.tiles_rmatmul(tiles, w.unsqueeze(0))[0], w.double() @ R) <= tol
    assert _rel(TG.centered_sqnorm(tiles), (E * E).sum(1)) <= tol
    u = torch.randn(B, V, generator=g)
    assert _rel(TG.off_target_dot(tiles, u, seg), (R * u.double()[seg]).sum(1)) <= tol

def test_first_config_tuning_keeps_one_config_per_list(monkeypatch):
    """ROSA_KERNEL_TUNING=first (first-contact GPU runs): one config per operand list, so the pruner
    leaves exactly one per launch (nothing tuned); "full" keeps every list; anything else is named."""
    from rosa_ext.kernels import _tiles
    from rosa_ext.kernels.prob_tiles import POOLS

    monkeypatch.setattr(_tiles, "INTERPRET", False)
    monkeypatch.setenv("ROSA_KERNEL_TUNING", "first")
    for pools in ((), POOLS):
        lists = pools or (_tiles._HOPPER, _tiles._HOPPER_FP32_TC, _tiles._HOPPER_FP32_IEEE)
        cfgs = _tiles.tile_configs(pools)
        assert [(c.kwargs["BLOCK_T"], c.kwargs["BLOCK_V"], c.kwargs["BLOCK_D"], c.num_warps, c.num_stages)
                for c in cfgs] == list(dict.fromkeys(lst[0] for lst in lists))
        prune = _tiles.make_prune(*lists)
        for is_fp32, prec in ((False, "ieee"), (True, "tf32x3"), (True, "ieee")):
            assert len(prune(cfgs, dict(IS_FP32=is_fp32, PRECISION=prec, N_BUCKET=1024))) == 1
    monkeypatch.setenv("ROSA_KERNEL_TUNING", "full")
    assert len(_tiles.tile_configs(POOLS)) == len(dict.fromkeys(POOLS[0] + POOLS[1] + POOLS[2]))
    monkeypatch.setenv("ROSA_KERNEL_TUNING", "fast")
    with pytest.raises(ValueError, match="ROSA_KERNEL_TUNING"):
        _tiles.tile_configs()


@pytest.mark.parametrize("mode", ["hidden", "lora"])
@pytest.mark.parametrize("precision", ["fp32", "bf16x2"])
def test_dual_step_built_from_the_tiles_matches_the_torch_backend(mode, precision):
    """The pieces suffice for the dual (MATH.md section 4): J (hidden) or J_a with the centred Gram
    (LoRA) from P, (G + lambda I) alpha = g, delta = J^T alpha (LoRA b-part: the VJP over P) -- equal
    to rosa_update(backend="torch", solver="dual") to 1e-5."""
    from rosa_ext import rosa_update

    T, V, d = 37, 300, 16
    model, _, _, seg = _case(T, V, d, bias=True, lora=mode == "lora", seed=9)
    h, W, y, c = model["hidden"], model["weight"], model["targets"], model["bias"]
    lora = dict(lora_a=model["lora_a"], lora_b=model["lora_b"]) if mode == "lora" else {}
    st = K.stats(h, W, y, bias=c, lora_scale=S, **lora)
    tiles = _low_level(model, st.lse, seg, precision=precision, splits=2)
    p = st.logp.double().exp()
    logit = st.logp.double() - torch.log1p(-p)
    g = torch.sigmoid(logit - 1.0) - p  # reward -1, beta 1 (MATH.md section 1)
    lam = 0.1
    if mode == "hidden":
        J = TG.hidden_jacobian(tiles, W, y, p.float()).double()
        G = J @ J.T
    else:
        a, b = model["lora_a"].double(), model["lora_b"].double()
        ah = h.double() @ a
        Ja = (S * p * (tiles.q.double() * b[y] - tiles.rb.double())).unsqueeze(1) * h.double()
        cc = S * p * ah
        G = Ja @ Ja.T + torch.outer(cc, cc) * TG.centered_gram(tiles, y, [0, T])[0].double()
    alpha = torch.linalg.solve(G + lam * torch.eye(T, dtype=torch.float64), g)
    step = rosa_update(h, W, y, -1.0, mode=mode, bias=c, lora_scale=S, beta=1.0, damping=lam, damping_mode="absolute",
                       solver="dual", backend="torch", **lora)
    if mode == "hidden":
        got, want = J.T @ alpha, step.delta.double()
    else:
        da = Ja.T @ alpha
        db = TG.centered_vjp(tiles, (alpha * cc).float(), y)[0].double()
        got, want = torch.cat([da, db]), torch.cat([step.delta_a.double().reshape(-1), step.delta_b.double().reshape(-1)])
    assert _rel(got, want) <= 1e-5, _rel(got, want)

# -- ahead-of-time compile for Hopper (no GPU needed) ---------------------------------------------------
#: ROSA_AOT_ALL=1: every autotune config x every specialisation (92 compiles, ~6 min on 2 cores: opt-in,
#: too slow for CI); otherwise one representative specialisation per operand type (3 compiles).
AOT_ALL = os.environ.get("ROSA_AOT_ALL") == "1"

_SM90_COMPILE = r"""
import os, sys, warnings
os.environ.pop("TRITON_INTERPRET", None)
warnings.filterwarnings("ignore")
import triton
from triton.backends.compiler import GPUTarget
from triton.compiler import ASTSource
from _sm90 import usage
from rosa_ext.kernels import prob_tiles
EVERY = sys.argv[1] == "all"
P, I, F = "*fp32", "i32", "fp32"
fn = prob_tiles._prob_tile_kernel.fn
names = list(fn.arg_names)
half, tc, ieee = prob_tiles.POOLS
# (tag, operand dtype, fp32 precision, OUT_MODEs, configs): each with LoRA b per conversation and shared, the
# one pass (FIXED_REF False: its own row statistics) and a given lse (FIXED_REF True). Not EVERY: the first
# config of each list, the engines' OUT_MODE of its operands (bf16 -> bf16x2, fp32 -> fp32 P), the one pass,
# per-conversation b rows (among the most registers: 250 on the tf32x3 tile)
for tag, dt, prec, modes, pool in (("bf16", "bf16", "ieee", (0, 1, 2), half), ("fp32-tf32x3", "fp32", "tf32x3", (0, 1), tc),
                                   ("fp32-ieee", "fp32", "ieee", (0,), ieee)):
    for cfg in (pool if EVERY else pool[:1]):
        bt, bv, bd, nw, ns = cfg[:5]
        opts = dict(num_warps=nw, num_stages=ns, **({"maxnreg": cfg[5]} if len(cfg) > 5 else {}))
        for mode in (modes if EVERY else (1 if dt == "bf16" else 0,)):
            for fixed in ((False, True) if EVERY else (False,)):
                for single in ((False, True) if EVERY else (False,)):
                    out_t = P if mode == 0 else "*bf16"
                    sig = dict(h_ptr=f"*{dt}", w_ptr=f"*{dt}", bias_ptr=f"*{dt}", lb_ptr=P, ah_ptr=P, seg_ptr="*i32",
                               lse_ptr=P, y_ptr="*i64", p_ptr=out_t, lo_ptr=out_t, ref_out=P, q_out=P, pt_out=P,
                               rb_out=P, ss_out=P, zy_out=P, N=I, D=I, V=I, s_hn=I, s_wv=I, s_lb=I, n_lb=I, s_p=I,
                               lora_scale=F, headroom=F, N_BUCKET=I)
                    const = dict(s_hd=1, s_wd=1, HAS_BIAS=True, HAS_LORA=True, SINGLE=single, IS_FP32=dt == "fp32",
                                 PRECISION=prec, OUT_MODE=mode, FIXED_REF=fixed, BLOCK_T=bt, BLOCK_V=bv, BLOCK_D=bd)
                    odd = ("N", "V", "lora_scale", "headroom", "n_lb", "N_BUCKET")  # the rest: 16-aligned (Qwen head)
                    attrs = {(names.index(n),): [["tt.divisibility", 16]] for n in sig if n not in odd}
                    src = ASTSource(fn=fn, signature={**sig, **{k: "constexpr" for k in const}}, constexprs=const,
                                    attrs=attrs)
                    out = triton.compile(src, target=GPUTarget("cuda", 90, 32), options=opts)
                    stack, regs = usage(out)
                    print(tag, f"{bt}x{bv}x{bd}x{nw}x{ns}", mode, int(fixed), int(single),
                          "wgmma" if "warp_group_dot" in out.asm["ttgir"] else "-", out.metadata.shared,
                          stack, regs, flush=True)
"""


def test_prob_tile_kernel_compiles_for_hopper():
    """The tile kernel compiled for sm_90 -- wgmma for the tiles of 64+ tokens on tensor-core operands,
    shared memory within an H100/H200 block's 227 KiB, and no register spill (no stack frame in the
    cubin). Prints each specialisation's registers (pytest -s).

    By default one representative specialisation per operand type (bf16, fp32 tf32x3, fp32 ieee: the first
    config of its list, the engines' storage of P, the one pass, per-conversation LoRA b rows; ~20 s).
    ``ROSA_AOT_ALL=1``: every autotune config, each OUT_MODE its operand dtype uses, the one pass and a
    given lse, LoRA with one and with per-conversation b rows (92 compiles, ~6 min on 2 cores: run it
    after any change to the kernel body; the table is benchmarks/results/prob_tiles_sm90_registers.txt)."""
    from _helpers import sm90_compile

    from rosa_ext.kernels.prob_tiles import POOLS

    out = sm90_compile(_SM90_COMPILE, "all" if AOT_ALL else "one", timeout=1800)
    print(out)
    rows = [line.split() for line in out.strip().splitlines()]
    want = {("bf16", 3, 4), ("fp32-tf32x3", 2, 4), ("fp32-ieee", 1, 3)}  # (tag, modes, configs)
    for tag, modes, n in want:
        assert len([x for x in rows if x[0] == tag]) == (modes * n * 2 * 2 if AOT_ALL else 1), (tag, rows)
    assert len(POOLS[0]) == 4 and len(POOLS[1]) == 4 and len(POOLS[2]) == 3
    for tag, cfg, mode, fixed, single, dots, shared, stack, regs in rows:
        bt = int(cfg.split("x")[0])
        if tag != "fp32-ieee" and bt >= 64:
            assert dots == "wgmma", (tag, cfg, mode, fixed, single)
        assert int(shared) <= 227 * 1024, (tag, cfg, shared)
        assert int(stack) == 0, (f"{tag} {cfg} OUT_MODE {mode} FIXED_REF {fixed} single {single}: {stack} bytes of "
                                 f"stack (spills), {regs} registers")


# -- GPU (when lent) -------------------------------------------------------------------------------------
@pytest.mark.gpu
@pytest.mark.parametrize("lora", [False, True])
def test_gpu_prob_tiles_on_the_qwen_head(lora):
    """Qwen2.5-0.5B head sizes, bf16: P against float64 on the first 4096 vocabulary columns (targets put
    there), row sums, and each storage precision's products against the fp32 tiles' (exact fp32 GEMMs)."""
    T, d, V = 300, 896, 151936
    g = torch.Generator(device="cuda").manual_seed(0)
    h = torch.randn(T, d, device="cuda", generator=g).to(torch.bfloat16)
    W = (torch.randn(V, d, device="cuda", generator=g) * 4 / d ** 0.5).to(torch.bfloat16)
    y = torch.randint(0, 4096, (T,), device="cuda", generator=g)
    y[:5] = y[0]
    kw = {}
    if lora:
        kw = dict(lora_a=torch.randn(d, device="cuda", generator=g) / d ** 0.5,
                  lora_b=torch.randn(V, device="cuda", generator=g) * 0.01, lora_scale=S)
    prob = K.prepare(h, W, y, **kw)
    tiles = {p: probability_tiles(h, W, y, prob=prob, precision=p) for p in ("fp32", "bf16x2", "bf16")}
    z = h.double() @ W.double().T
    if lora:
        z += S * (h.double() @ kw["lora_a"].double())[:, None] * kw["lora_b"].double()
    pi = torch.softmax(z, 1)
    del z
    P64 = pi[:, :4096].clone()
    P64[torch.arange(T, device="cuda"), y] = 0
    t32 = tiles["fp32"]
    torch.testing.assert_close(t32.p[:, :4096].double(), P64, rtol=1e-4, atol=1e-6)
    assert ((t32.q + t32.pt).double() - 1).abs().max().item() <= 1e-5
    torch.testing.assert_close(t32.pt.double(), pi[torch.arange(T, device="cuda"), y], rtol=1e-4, atol=1e-7)
    old = torch.backends.cuda.matmul.allow_tf32
    torch.backends.cuda.matmul.allow_tf32 = False
    try:
        w = torch.randn(T, device="cuda", generator=g)
        ref = (TG.off_target_weight(t32, W).double(), TG.centered_gram(t32, y, [0, T])[0].double(),
               TG.centered_vjp(t32, w, y)[0].double())
        for prec, tol in (("bf16x2", 3e-5), ("bf16", 1e-2)):
            t = tiles[prec]
            got = (TG.off_target_weight(t, W), TG.centered_gram(t, y, [0, T])[0], TG.centered_vjp(t, w, y)[0])
            for a, b in zip(got, ref):
                assert _rel(a, b) <= tol, (prec, _rel(a, b))
    finally:
        torch.backends.cuda.matmul.allow_tf32 = old


@pytest.mark.gpu
@pytest.mark.parametrize("lora", [False, True])
def test_gpu_one_pass_products_vs_float64(lora):
    """The engines' path on the Qwen2.5-0.5B head, bf16: ONE pass (its own statistics, the target split off,
    bf16x2 r̂ tiles relative to per-split references) and the K-split GEMMs applying the scales, against
    float64 on the same inputs: lse, lse_off, q, and the engines' products r̂ W, r̂ r̂^T, w^T r̂ within 3e-5
    (the issue's bound). Prints the errors, and those of the same products over one forced split (one
    accumulation chain of V: what the K-split avoids; not asserted)."""
    T, d, V = 300, 896, 151936
    g = torch.Generator(device="cuda").manual_seed(1)
    h = torch.randn(T, d, device="cuda", generator=g).to(torch.bfloat16)
    W = (torch.randn(V, d, device="cuda", generator=g) * 4 / d ** 0.5).to(torch.bfloat16)
    y = torch.randint(0, V, (T,), device="cuda", generator=g)
    y[:5] = y[0]
    seg = torch.zeros(T, dtype=torch.int32, device="cuda")
    kw, ah, b = {}, None, None
    if lora:
        a = torch.randn(d, device="cuda", generator=g) / d ** 0.5
        b = torch.randn(V, device="cuda", generator=g) * 0.01
        ah = h.float() @ a
        kw = dict(lora_b=b, ah=ah, lora_scale=S)
    z = h.double() @ W.double().T
    if lora:
        z += S * ah.double()[:, None] * b.double()
    lse64 = torch.logsumexp(z, 1)
    rows = torch.arange(T, device="cuda")
    q64 = 1 - torch.softmax(z, 1)[rows, y]
    z[rows, y] = float("-inf")
    lse_off64 = torch.logsumexp(z, 1)
    R64 = torch.softmax(z, 1)  # r̂: the softmax of the other logits
    del z
    w = torch.randn(T, device="cuda", generator=g)
    want = (R64 @ W.double(), R64 @ R64.T, w.double() @ R64)
    del R64
    report = {}
    for label, splits in (("one-pass", None), ("one chain", 1)):
        t = prob_tiles_from_tensors(h, W, seg, None, y, precision="bf16x2", splits=splits, **kw)
        got = (TG.off_target_weight(t, W), TG.off_target_gram(t, [0, T])[0], TG.tiles_rmatmul(t, w.unsqueeze(0))[0])
        report[label] = [_rel(a, b) for a, b in zip(got, want)] + [
            max(float((t.lse.double() - lse64).abs().max()), float((t.lse_off.double() - lse_off64).abs().max()))]
        if splits is None:
            assert t.split_width <= 4096 and t.off_target
            torch.testing.assert_close(t.q.double(), q64, rtol=1e-5, atol=1e-7)
        del t, got
        torch.cuda.empty_cache()
    print("rel. error vs float64 (r̂ W, r̂ r̂^T, w^T r̂, max |lse or lse_off err|):", report)
    assert report["one-pass"][3] <= 1e-4
    for err, name in zip(report["one-pass"][:3], ("r̂ W", "Gram", "VJP")):
        assert err <= 3e-5, (name, report)
