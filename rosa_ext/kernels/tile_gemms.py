"""The GEMMs over the probability tiles (MATH.md section 4): torch products over P, K-split at its
vocabulary splits -- the reference formulas of the engine's fused kernels (:mod:`.tile_weight`,
:mod:`.tile_gram`, :mod:`.tile_vjp`, which the Triton engine runs instead: one or two launches where these
are ~10-40 torch ops), used by tests and benchmarks, and CG's GEMVs over kept tiles.

After :func:`rosa_ext.kernels.prob_tiles.prob_tiles_from_tensors` has written P (N x V, the
off-target probabilities r_t, target entries 0) and its row sums, every heavy product of the dual
solve (and of a CG that keeps P) is a GEMM or GEMV over it:

- hidden mode: ``r_t W = P W`` (:func:`off_target_weight`), and ``pi_t W = r_t W + p_t W[y_t]``
  (:func:`pi_weight`); J_t = p_t (q_t W[y_t] - r_t W) (MATH.md section 4);
- LoRA mode: per conversation the centred Gram
  ``K[t, u] = q_t q_u 1(y_t = y_u) - q_t r_u[y_t] - q_u r_t[y_u] + r_t . r_u`` (:func:`centered_gram`:
  the GEMM ``P_b P_b^T`` plus the cross terms ``r_t[y_u] = P[t, y_u]`` gathered, :func:`cross_terms`),
  and the VJP ``scatter(y, w q) - sum_t w_t r_t`` (:func:`centered_vjp`, a GEMV ``w^T P``);
- the relative ridge's ``||e_{y_t} - pi_t||^2 = q_t^2 + r_t . r_t`` (:func:`centered_sqnorm`, section 6);
- a CG that keeps P: the JVP's ``r_t . u`` (:func:`off_target_dot`, a GEMV) and the VJP
  (:func:`centered_vjp`), two GEMVs over P per iteration, no logits recomputed.

Which r. The plain products -- :func:`tiles_matmul`, :func:`tiles_rmatmul`, :func:`off_target_weight`,
:func:`off_target_gram`, :func:`cross_terms`, :func:`off_target_dot` -- are of the tiles as they are:
P for tiles normalised by a given lse, r̂ (the softmax of the other logits, of order one whatever p_t)
for the one pass's off-target tiles (``ProbTiles.off_target``); the engines use these on r̂. The
pi-form ones -- :func:`pi_weight`, :func:`hidden_jacobian`, :func:`centered_gram`,
:func:`centered_sqnorm`, :func:`centered_vjp` -- mean r_t = pi_t's off-target entries either way
(r_t = (1 - p_t) r̂_t: ``ProbTiles.pi_factor``), so they cancel or underflow where pi's form does.

Precision. With "fp32" tiles the products are fp32 torch GEMMs (on CUDA they follow torch's
``allow_tf32`` setting, off by default). With "bf16x2" tiles (P = hi + lo) each product is a sum
of bf16 GEMMs with fp32 output -- ``hi x + lo x`` -- and an fp32 operand x (W of an fp32 model, the
VJP weights w) is split the same way into x_hi + x_lo, the lo x lo product dropped (at most 2^-16 relative):
the tensor cores at about fp32 accuracy. "bf16" tiles drop P's lo part (2^-8 relative per entry;
opt-in). bf16 x bf16 -> fp32 runs as ``torch.mm(..., out_dtype=torch.float32)`` on CUDA; where that
is missing (the CPU, older torch) both operands are widened to fp32 first: exact products, fp32
accumulation, the same arithmetic. The error table is in :mod:`.prob_tiles`.

The K-split. Tiles of one pass are stored relative to a reference per (vocabulary split, token), with
``split_scale`` (S, N) normalising them (:mod:`.prob_tiles`), so every product contracts each split
on its own and then applies the scales: the tiles viewed as (S, rows, width) go through ONE batched
GEMM over the full splits (plus one GEMM for the last, narrower split), each split's product is
multiplied by its scales and the splits are summed in fp32 (``P W``, ``r . u``, the Gram:
G = sum_s (scale_s scale_s^T) o P_s P_s^T); in the VJP ``w^T P`` the scales fold into w. The splits
are at most ``GEMM_K_MAX`` (4096) wide (unless a launch forces fewer splits: benchmarks), so no
tensor-core accumulation chain is longer than that,
whatever V. Why it matters: a bf16 tensor-core GEMM adds each k-step to its fp32 accumulator with
truncation, so its error grows with the chain's length and does not average out. A CPU model of that
accumulation (``benchmarks/ksplit_error_model.py``: exact 16-product k-steps into an fp32 accumulator
rounded toward zero; the Qwen2.5 head's V = 151936, d = 896; results in
``benchmarks/results/ksplit_error_model.json``) gives a relative error of P W against float64 of
1.6e-4 over one chain of V, 4.9e-5 over 4 chains, 7.9e-6 at 8192 and 6.2e-6 at 4096 (round-to-nearest
accumulation: 1.1e-6 over one chain); the Gram, a sum of positive terms, 2.2e-6 over one chain and
1.4e-7 at 4096. So the K-split keeps the GPU test's 3e-5 with a margin of ~5x in the model; the real
accumulator is measured only by that test on a GPU. Cost: the (S, rows, cols) fp32 partial products
(S = V / 4096 = 38 on that head: N x d x 4 bytes each, ~140 MB for P W at N = 1024, d = 896), done in
groups of at most :data:`SCRATCH_BYTES`; the same GEMM flops. (Unmeasured on a GPU.)
"""
from __future__ import annotations

import warnings
from typing import Iterator, List, Optional, Sequence, Tuple

import torch

from ..common.validation import RosaInputError
from .prob_tiles import ProbTiles, split_row_views, split_views

#: Whether ``torch.mm(..., out_dtype=torch.float32)`` runs bf16 x bf16 on CUDA: None (not tried yet),
#: True (it ran once), False (unsupported: the GEMMs widen to fp32, with a one-time warning).
_OUT_DTYPE_OK = {"cuda": None}
#: CUDA out-of-memory errors: never taken for "unsupported" (they are re-raised).
_OOM = tuple({e for e in (getattr(torch, "OutOfMemoryError", None), getattr(torch.cuda, "OutOfMemoryError", None))
              if isinstance(e, type)})
_warned: set = set()


def fallback_warning(reason: str, message: str) -> None:
    """Warn (RuntimeWarning) once per process and ``reason`` that a slower path runs instead of the fast
    one: no fallback of the GPU path is silent (``message`` says which and why)."""
    if reason not in _warned:
        _warned.add(reason)
        warnings.warn(f"rosa_ext: {message}", RuntimeWarning, stacklevel=3)

#: The most memory the per-split partial products of one GEMM over the tiles may take at once
#: (the K-split's (splits, rows, cols) fp32 intermediate); more splits are done in groups.
SCRATCH_BYTES = 256 * 2 ** 20


def mm_f32(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """a (m, k) @ b (k, n) -> (m, n) fp32 with fp32 accumulation, for fp32 or bf16 operands of one dtype;
    (g, m, k) @ (g, k, n) -> (g, m, n) batched the same way.

    bf16 on CUDA: one tensor-core GEMM with fp32 output (``out_dtype``, torch >= 2.8; ``torch.bmm`` for the
    batched form); elsewhere the operands are widened (exact) and multiplied in fp32. Where CUDA's
    ``out_dtype`` is unsupported (its first try raises TypeError / RuntimeError / NotImplementedError)
    every later bf16 GEMM widens, with a one-time warning (:func:`fallback_warning`). A CUDA
    out-of-memory error is re-raised, never taken for "unsupported"; so is any error once ``out_dtype``
    has worked in this process."""
    if a.dtype == torch.float32 and b.dtype == torch.float32:
        return a @ b
    if a.device.type == "cuda" and a.dtype == b.dtype == torch.bfloat16 and _OUT_DTYPE_OK["cuda"] is not False:
        try:
            c = (torch.mm if a.dim() == 2 else torch.bmm)(a, b, out_dtype=torch.float32)
        except _OOM:
            raise
        except (TypeError, RuntimeError, NotImplementedError) as e:
            if _OUT_DTYPE_OK["cuda"]:  # it ran before: a real error, not a missing feature
                raise
            _OUT_DTYPE_OK["cuda"] = False
            fallback_warning("mm_out_dtype", f"torch.mm(bf16, bf16, out_dtype=torch.float32) is not supported here "
                             f"(torch {torch.__version__}: {type(e).__name__}: {str(e).splitlines()[0] if str(e) else ''}); "
                             f"the bf16 GEMMs over the probability tiles widen both operands to fp32 from now on "
                             f"(fp32 GEMMs: several times slower, twice the bytes)")
        else:
            _OUT_DTYPE_OK["cuda"] = True
            return c
    return a.float() @ b.float()


def split_bf16(x: torch.Tensor) -> Tuple[torch.Tensor, torch.Tensor]:
    """fp32 x -> (hi, lo) bf16 with hi = bf16(x), lo = bf16(x - hi) (round to nearest even):
    hi + lo = x to 2^-16 relative."""
    x = x.float()
    hi = x.to(torch.bfloat16)
    return hi, (x - hi.float()).to(torch.bfloat16)


def _parts(x: torch.Tensor) -> List[torch.Tensor]:
    """bf16 parts of an operand that multiplies bf16 tiles: itself (bf16), or its hi/lo split."""
    return [x] if x.dtype == torch.bfloat16 else list(split_bf16(x))


def _stored(tiles: ProbTiles) -> List[torch.Tensor]:
    """The stored parts of the tiles: [p] (fp32), [hi, lo] (bf16x2) or [hi] (bf16)."""
    if tiles.p is not None:
        return [tiles.p]
    return [tiles.hi] if tiles.lo is None else [tiles.hi, tiles.lo]


def _groups(nf: int, per_split_bytes: int, scratch_bytes: Optional[int] = None) -> Iterator[Tuple[int, int]]:
    """[g0, g1) groups of the nf full splits whose partial products fit ``scratch_bytes`` (default
    :data:`SCRATCH_BYTES`; at least one split per group, whatever the cap)."""
    cap = SCRATCH_BYTES if scratch_bytes is None else scratch_bytes
    step = max(1, cap // max(1, per_split_bytes))
    for g0 in range(0, nf, step):
        yield g0, min(nf, g0 + step)


def tiles_matmul(tiles: ProbTiles, x: torch.Tensor, scratch_bytes: Optional[int] = None) -> torch.Tensor:
    """P @ x for x (V, k) -> (N, k) fp32, in the tiles' precision (module docstring).

    K-split at the vocabulary splits: one batched GEMM over the full splits (each accumulation chain
    at most ``split_width`` long), one GEMM for the last narrower split, then each split's product
    times its ``split_scale`` summed over the splits in fp32. The per-split products take at most
    ``scratch_bytes`` at once (default :data:`SCRATCH_BYTES`; at least one split's: N k 4 bytes, twice
    that for bf16 parts)."""
    N, V = tiles.shape
    k = x.shape[1]
    width = tiles.width()
    sc = tiles.split_scale
    ps = _stored(tiles)
    xs = [x.float()] if tiles.p is not None else _parts(x)
    pairs = [(p, xx) for i, p in enumerate(ps) for j, xx in enumerate(xs) if i + j <= 1]  # lo x lo: dropped
    pv = [split_views(p, width) for p, _ in pairs]
    xv = [split_row_views(xx, width) for _, xx in pairs]
    nf = V // width
    out = None
    for g0, g1 in _groups(nf, N * k * 4 * (2 if len(pairs) > 1 else 1), scratch_bytes):
        Y = None
        for (pf, _), (xf, _) in zip(pv, xv):
            c = mm_f32(pf[g0:g1], xf[g0:g1])
            Y = c if Y is None else Y.add_(c)
        if sc is not None:
            Y.mul_(sc[g0:g1].unsqueeze(2))
        part = Y[0] if g1 - g0 == 1 else Y.sum(0)
        out = part if out is None else out.add_(part)
    if nf * width < V:  # the last, narrower split
        Y = None
        for (_, pt), (_, xt) in zip(pv, xv):
            c = mm_f32(pt, xt)
            Y = c if Y is None else Y.add_(c)
        if sc is not None:
            Y.mul_(sc[nf].unsqueeze(1))
        out = Y if out is None else out.add_(Y)
    return out


def tiles_rmatmul(tiles: ProbTiles, w: torch.Tensor, scratch_bytes: Optional[int] = None) -> torch.Tensor:
    """w @ P for w (m, N) -> (m, V) fp32 (a GEMV for m = 1), in the tiles' precision; w fp32 is
    split into hi/lo for bf16 tiles (its accuracy is kept: it carries the solver's alpha).

    Per vocabulary split, ``split_scale`` folds into w (w_t scale_t), so each split's columns are one
    product (a batched GEMM over the full splits, one for the last); each accumulation chain runs over
    the N tokens."""
    N, V = tiles.shape
    m = w.shape[0]
    width = tiles.width()
    sc = tiles.split_scale
    w = w.float()
    views = [split_views(p, width) for p in _stored(tiles)]
    nf = V // width
    out = torch.empty(m, V, dtype=torch.float32, device=w.device)

    def block(left: torch.Tensor, ps: List[torch.Tensor]) -> torch.Tensor:
        """left (.., m, N) fp32 @ the stored parts ps (.., N, cols) -> (.., m, cols) fp32."""
        if tiles.p is not None:
            return left @ ps[0]
        wh, wl = split_bf16(left)
        both = mm_f32(torch.cat([wh, wl], -2), ps[0])  # reads hi once
        res = both[..., :m, :].add_(both[..., m:, :])
        if len(ps) > 1:
            res.add_(mm_f32(wh, ps[1]))
        return res

    for g0, g1 in _groups(nf, m * width * 4 * 3, scratch_bytes):
        left = w.unsqueeze(0).expand(g1 - g0, m, N) if sc is None else w.unsqueeze(0) * sc[g0:g1].unsqueeze(1)
        Y = block(left, [v[0][g0:g1] for v in views])  # (g, m, width)
        out[:, g0 * width:g1 * width].view(m, g1 - g0, width).copy_(Y.transpose(0, 1))
    if nf * width < V:
        left = w if sc is None else w * sc[nf].unsqueeze(0)
        out[:, nf * width:] = block(left, [v[1] for v in views])
    return out


def off_target_dot(tiles: ProbTiles, u: torch.Tensor, seg: Optional[torch.Tensor] = None) -> torch.Tensor:
    """r_t . u_seg -> (N,) fp32 (r_t the tile rows) for u (V,) or (B, V) one row per conversation (``seg`` (N,) int ids;
    None with one row): the JVP's reduction over the kept tiles (MATH.md section 3, ``R(u)_t = pi_t . u``
    = this + p_t u[y_t]), a GEMV ``P u`` (one column per conversation) instead of a pass over W."""
    N, V = tiles.shape
    U = u.reshape(-1, V)
    if U.shape[0] > 1 and seg is None:
        raise RosaInputError(f"rosa_ext.kernels.off_target_dot: u has {U.shape[0]} rows but no seg was given", "seg")
    out = tiles_matmul(tiles, U.T)  # (N, B)
    if U.shape[0] == 1:
        return out[:, 0]
    return out.gather(1, seg.long().reshape(N, 1))[:, 0]


def _plain(who: str, tiles: ProbTiles) -> torch.Tensor:
    """The (N, V) fp32 tiles of normalised fp32 tiles (``split_scale`` None); a named error otherwise."""
    if tiles.p is None or tiles.split_scale is not None:
        raise RosaInputError(f"rosa_ext.kernels.{who}: needs fp32 tiles normalised in place (ProbTiles.normalize_), "
                             f"got precision {tiles.precision!r} with split scales {tiles.split_scale is not None}", "tiles")
    return tiles.p


def gemv_rows(tiles: ProbTiles, u: torch.Tensor, spans: Sequence[Tuple[int, int, int]],
              out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """r_t . u_b for the tile rows t of each span -> (N,) fp32, over fp32 tiles normalised once
    (:meth:`ProbTiles.normalize_`): ONE fp32 GEMV per span, no K-split and no split scales -- a CG that keeps
    its tiles (the Triton engine's ``stats``) does two such GEMVs per iteration. ``u`` (B, V) (or (V,): one row
    for every span); ``spans``: (row b of u, lo, hi) tile rows [lo, hi) of conversation b (rows outside every
    span are left as they are); ``out`` (N,) to write into.

    Why no K-split here: the K-split bounds the truncating accumulation of bf16 tensor-core GEMMs (module
    docstring). A GEMV is bandwidth-bound: it reads each fp32 entry once (the bytes of the hi + lo parts),
    gains nothing from tensor cores and runs as an fp32 GEMV with fused multiply-adds rounded to nearest
    (``torch.mv``: cuBLAS gemv, which torch's ``allow_tf32`` does not touch). Its error on a chain of V terms
    is at most ``gamma_V sum_v |r_v u_v|`` (``gamma_V = V u / (1 - V u)``, u = 2^-24) in the worst case and,
    rounding to nearest being unbiased, ~``sqrt(V) u`` typically; the CPU model of
    ``benchmarks/ksplit_error_model.py`` puts round-to-nearest accumulation of ``P W`` over one chain of the
    Qwen2.5 head's V = 151936 at 1.1e-6 against float64 (truncation: 1.6e-4), within the 3e-5 the K-split
    keeps for the GEMMs. The entries themselves are the kernel's fp32 r̂ times one fp32 scale (2^-24 each),
    more accurate than the bf16 hi + lo parts (2^-16)."""
    P = _plain("gemv_rows", tiles)
    N, V = P.shape
    U = u.reshape(-1, V).float()
    out = torch.empty(N, dtype=torch.float32, device=P.device) if out is None else out
    for b, lo, hi in spans:
        torch.mv(P[lo:hi], U[0 if U.shape[0] == 1 else b], out=out[lo:hi])
    return out


def gemv_columns(tiles: ProbTiles, w: torch.Tensor, spans: Sequence[Tuple[int, int, int]], out: torch.Tensor,
                 accumulate: bool = False) -> torch.Tensor:
    """sum_{t in span} w_t r_t into row b of ``out`` (B, V) fp32 for each span (b, lo, hi) of tile rows, over
    normalised fp32 tiles: ONE fp32 GEMV ``P[lo:hi]^T w[lo:hi]`` per span (as :func:`gemv_rows`; each
    accumulation chain runs over the span's tokens); ``w`` (n,) by tile row. Written over the rows of ``out``
    (each conversation one span), or added to them with ``accumulate`` (the blocks of a problem in turn);
    rows of no span are left as they are. Returns ``out``."""
    P = _plain("gemv_columns", tiles)
    for b, lo, hi in spans:
        if accumulate:
            out[b].addmv_(P[lo:hi].T, w[lo:hi].float())
        else:
            torch.mv(P[lo:hi].T, w[lo:hi].float(), out=out[b])
    return out


def _target_ok(targets: torch.Tensor, V: int) -> torch.Tensor:
    return (targets >= 0) & (targets < V)


def off_target_weight(tiles: ProbTiles, weight: torch.Tensor, scratch_bytes: Optional[int] = None) -> torch.Tensor:
    """r_t W = P W -> (N, d) fp32 (the tile rows; MATH.md section 4, hidden mode); weight (V, d) any float dtype
    (bf16 W is used as is with bf16 tiles; an fp32 / fp16 W is widened or split); ``scratch_bytes`` as
    :func:`tiles_matmul`."""
    V = tiles.shape[1]
    if weight.dim() != 2 or weight.shape[0] != V:
        raise RosaInputError(f"rosa_ext.kernels.off_target_weight: weight must be ({V}, d), got "
                             f"{tuple(weight.shape)}", "weight")
    w = weight if weight.dtype in (torch.float32, torch.bfloat16) else weight.float()
    return tiles_matmul(tiles, w, scratch_bytes)


def pi_weight(tiles: ProbTiles, weight: torch.Tensor, targets: torch.Tensor,
              p: Optional[torch.Tensor] = None) -> torch.Tensor:
    """pi_t W = r_t W + p_t W[y_t] -> (N, d) fp32 (the gather adds nothing for a target outside
    [0, V)); ``p`` (N,) the target probabilities (default ``tiles.pt``); r_t = (1 - p_t) r̂_t for
    off-target tiles."""
    V = tiles.shape[1]
    out = off_target_weight(tiles, weight)
    c = tiles.pi_factor()
    if c is not None:
        out.mul_(c.unsqueeze(1))
    ok = _target_ok(targets, V)
    pt = (tiles.pt if p is None else p.float()) * ok
    return out.add_(pt.unsqueeze(1) * weight[targets.clamp(0, V - 1)].float())


def hidden_jacobian(tiles: ProbTiles, weight: torch.Tensor, targets: torch.Tensor, p: torch.Tensor,
                    rW: Optional[torch.Tensor] = None, *, lora_a: Optional[torch.Tensor] = None,
                    lora_b_y: Optional[torch.Tensor] = None, lora_scale: float = 0.0) -> torch.Tensor:
    """The hidden-mode Jacobian rows -> (N, d) fp32 (MATH.md section 4):

        J_t = p_t (q_t W[y_t] - r_t W)   (+ p_t s (q_t b[y_t] - r_t . b) a   with a LoRA term in the logits)

    ``p`` (N,) p_t (from log p_t of the stats), ``rW`` the :func:`off_target_weight` if already formed;
    with a LoRA term (W + s b a^T, section 2): ``lora_a`` (N, d) a_seg per token or (d,), ``lora_b_y``
    (N,) b_seg[y_t], ``lora_scale`` s, and the tiles must carry ``rb`` (made with lora_b). Off-target
    tiles (r̂, ``rW`` = r̂ W when given): r_t = (1 - p_t) r̂_t (:meth:`ProbTiles.pi_factor`)."""
    V = tiles.shape[1]
    rW = off_target_weight(tiles, weight) if rW is None else rW
    c = tiles.pi_factor()
    ok = _target_ok(targets, V)
    wy = weight[targets.clamp(0, V - 1)].float() * ok.unsqueeze(1)
    J = tiles.q.unsqueeze(1) * wy - (rW if c is None else rW * c.unsqueeze(1))
    if lora_a is not None:
        if tiles.rb is None or lora_b_y is None:
            raise RosaInputError("rosa_ext.kernels.hidden_jacobian: a LoRA term needs lora_b_y and tiles made with "
                                 "lora_b (their rb)", "lora_b_y")
        rb = tiles.rb if c is None else tiles.rb * c
        coef = lora_scale * (tiles.q * lora_b_y.float() * ok - rb)
        J.add_(coef.unsqueeze(1) * lora_a.float())
    return J.mul_(p.float().unsqueeze(1))


def _spans(offsets: Sequence[int], N: int) -> List[Tuple[int, int]]:
    off = [int(o) for o in offsets]
    if len(off) < 2 or off[0] != 0 or off[-1] != N or any(b < a for a, b in zip(off, off[1:])):
        raise RosaInputError(f"rosa_ext.kernels.tile_gemms: offsets must rise from 0 to {N}, got {off}", "offsets")
    return list(zip(off[:-1], off[1:]))


def _gram_block(ta: ProbTiles, tb: Optional[ProbTiles], scratch_bytes: Optional[int]) -> torch.Tensor:
    """R_a R_b^T of the tile rows of ``ta`` and ``tb`` (``tb`` None: ``ta`` itself) -> (n_a, n_b) fp32, K-split
    at the vocabulary splits as :func:`tiles_matmul`: G = sum_s (scale_a,s scale_b,s^T) o R_a,s R_b,s^T. bf16x2:
    hi_a hi_b^T + lo_a hi_b^T + hi_a lo_b^T (lo lo^T dropped; with ``tb`` None hi hi^T + X + X^T, X = lo hi^T)."""
    sym = tb is None
    tb = ta if sym else tb
    width, V = ta.width(), int(ta.shape[1])
    if (tb.width() != width or tb.precision != ta.precision or int(tb.shape[1]) != V
            or (ta.split_scale is None) != (tb.split_scale is None)):
        raise RosaInputError("rosa_ext.kernels.tile_gemms: the two tiles of a Gram block must come from one split "
                             "plan and precision (the blocks of one problem)", "tiles")
    nf = V // width
    va = [split_views(p, width) for p in _stored(ta)]
    vb = va if sym else [split_views(p, width) for p in _stored(tb)]
    sa, sb = ta.split_scale, tb.split_scale

    def prod(pa: List[torch.Tensor], pb: List[torch.Tensor]) -> torch.Tensor:
        """the stored parts of a block of columns, (.., n_a, cols) and (.., n_b, cols) -> (.., n_a, n_b) fp32."""
        if ta.p is not None:
            return pa[0] @ pb[0].transpose(-1, -2)
        G = mm_f32(pa[0], pb[0].transpose(-1, -2))
        if len(pa) > 1:
            X = mm_f32(pa[1], pb[0].transpose(-1, -2))
            G.add_(X).add_(X.transpose(-1, -2) if sym else mm_f32(pa[0], pb[1].transpose(-1, -2)))
        return G

    G = None
    per_split = int(ta.shape[0]) * int(tb.shape[0]) * 4 * (2 if len(va) > 1 else 1)
    for g0, g1 in _groups(nf, per_split, scratch_bytes):
        Gs = prod([v[0][g0:g1] for v in va], [v[0][g0:g1] for v in vb])
        if sa is not None:
            Gs.mul_(sa[g0:g1].unsqueeze(2)).mul_(sb[g0:g1].unsqueeze(1))
        part = Gs[0] if g1 - g0 == 1 else Gs.sum(0)
        G = part if G is None else G.add_(part)
    if nf * width < V:
        Gt = prod([v[1] for v in va], [v[1] for v in vb])
        if sa is not None:
            Gt.mul_(sa[nf].unsqueeze(1)).mul_(sb[nf].unsqueeze(0))
        G = Gt if G is None else G.add_(Gt)
    return G


def off_target_gram(tiles: ProbTiles, offsets: Sequence[int], scratch_bytes: Optional[int] = None) -> List[torch.Tensor]:
    """r_t . r_u (the tile rows) for the tokens of each conversation -> one (T_b, T_b) fp32 matrix per conversation
    (``offsets``: B + 1 host ints). bf16x2: hi hi^T + X + X^T with X = lo hi^T (lo lo^T dropped).
    K-split at the vocabulary splits as :func:`tiles_matmul`: G = sum_s (scale_s scale_s^T) o G_s
    (``scratch_bytes`` as there)."""
    N = tiles.shape[0]
    return [_gram_block(tiles.rows(lo, hi), None, scratch_bytes) for lo, hi in _spans(offsets, N)]


def off_target_gram_pair(ta: ProbTiles, tb: ProbTiles, scratch_bytes: Optional[int] = None) -> torch.Tensor:
    """r_t . r_u for the rows t of ``ta`` and u of ``tb`` -> (n_a, n_b) fp32: one off-diagonal block of a
    conversation's Gram when its tokens are in blocks (the tiles of two blocks of one launch plan:
    same split plan and precision). Products as :func:`off_target_gram`'s, hi_a lo_b^T computed as well."""
    return _gram_block(ta, tb, scratch_bytes)


def _columns_at(t: ProbTiles, y: torch.Tensor, ok: torch.Tensor) -> torch.Tensor:
    """t's tile rows at the columns ``y`` (clamped ids) -> (n, len(y)) fp32 (split scales applied; 0 where not ``ok``)."""
    X = t.p[:, y] if t.p is not None else (t.hi[:, y].float() if t.lo is None else t.hi[:, y].float() + t.lo[:, y].float())
    if t.split_scale is not None:  # scale[split of y_u, t]
        X.mul_(t.split_scale.T[:, torch.div(y, t.width(), rounding_mode="floor")])
    return X * ok.unsqueeze(0)


def cross_terms(tiles: ProbTiles, targets: torch.Tensor, offsets: Sequence[int]) -> List[torch.Tensor]:
    """X[t, u] = r_t[y_u] = P[t, y_u] (the tile rows) for the tokens of each conversation -> (T_b, T_b) fp32 each
    (0 where y_u is outside [0, V), and where y_u = y_t: r_t has no target entry)."""
    N, V = tiles.shape
    ok = _target_ok(targets, V)
    y = targets.clamp(0, V - 1)
    return [_columns_at(tiles.rows(lo, hi), y[lo:hi], ok[lo:hi]) for lo, hi in _spans(offsets, N)]


def cross_rows(tiles: ProbTiles, targets: torch.Tensor) -> torch.Tensor:
    """X[t, u] = r_t[y_u] for the tile rows t and the tokens u of ``targets`` (any count: e.g. a whole
    conversation of which the tiles hold one block) -> (n, len(targets)) fp32, as :func:`cross_terms`."""
    V = tiles.shape[1]
    return _columns_at(tiles, targets.clamp(0, V - 1), _target_ok(targets, V))


def centered_gram(tiles: ProbTiles, targets: torch.Tensor, offsets: Sequence[int]) -> List[torch.Tensor]:
    """The centred Gram K[t, u] = (e_{y_t} - pi_t) . (e_{y_u} - pi_u) of each conversation, in the
    off-target form ``q_t q_u 1(y_t = y_u) - q_t r_u[y_t] - q_u r_t[y_u] + r_t . r_u`` (MATH.md
    section 4: no cancellation when p_t -> 1) -> (T_b, T_b) fp32 each (the b-block of J J^T before
    the factors s p_t (a . h_t)). Targets outside [0, V) contribute no target terms. Off-target tiles:
    r_t = q_t r̂_t (:meth:`ProbTiles.pi_factor`)."""
    N, V = tiles.shape
    ok = _target_ok(targets, V)
    c = tiles.pi_factor()
    out = []
    for (lo, hi), G, X in zip(_spans(offsets, N), off_target_gram(tiles, offsets), cross_terms(tiles, targets, offsets)):
        q = tiles.q[lo:hi]
        if c is not None:
            G.mul_(q.unsqueeze(1)).mul_(q.unsqueeze(0))
            X.mul_(q.unsqueeze(1))
        Y = X.mul_(q.unsqueeze(0))  # Y[t, u] = r_t[y_u] q_u
        G.sub_(Y).sub_(Y.T)
        yb, okb = targets[lo:hi], ok[lo:hi]
        same = (yb.unsqueeze(0) == yb.unsqueeze(1)) & okb.unsqueeze(0) & okb.unsqueeze(1)
        G.add_(torch.outer(q, q) * same)
        out.append(G)
    return out


def centered_sqnorm(tiles: ProbTiles) -> torch.Tensor:
    """||e_{y_t} - pi_t||^2 = q_t^2 + r_t . r_t -> (N,) fp32 (MATH.md section 6, the relative ridge);
    q_t^2 (1 + r̂_t . r̂_t) for off-target tiles."""
    if tiles.off_target:
        return tiles.q * tiles.q * (1 + tiles.ss)
    return tiles.q * tiles.q + tiles.ss


def centered_vjp(tiles: ProbTiles, w: torch.Tensor, targets: torch.Tensor, seg: Optional[torch.Tensor] = None,
                 num_conversations: int = 1) -> torch.Tensor:
    """sum_{t in b} w_t (e_{y_t} - pi_t) = scatter(y, w q) - sum_t w_t r_t -> (B, V) fp32 (MATH.md
    section 4: the LoRA b-part of the VJP, w = alpha c). w (N,), seg (N,) int conversation ids
    (None: one conversation); one GEMM (B, N) @ P (off-target tiles: w_t q_t with r̂). Targets outside
    [0, V) scatter nothing."""
    N, V = tiles.shape
    B = int(num_conversations)
    w = w.float()
    if w.shape != (N,):
        raise RosaInputError(f"rosa_ext.kernels.centered_vjp: w must be ({N},), got {tuple(w.shape)}", "w")
    sg = torch.zeros(N, dtype=torch.long, device=w.device) if seg is None else seg.long()
    Wb = torch.zeros(B, N, dtype=torch.float32, device=w.device)
    c = tiles.pi_factor()
    Wb[sg, torch.arange(N, device=w.device)] = w if c is None else w * c  # block-diagonal rows: one per conversation
    out = tiles_rmatmul(tiles, Wb).neg_()
    wq = (w * tiles.q).masked_fill_(~_target_ok(targets, V), 0.0)
    out.index_put_((sg, targets.clamp(0, V - 1).long()), wq, accumulate=True)
    return out
