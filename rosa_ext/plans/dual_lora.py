"""Plan "dual", LoRA mode: the exact step in one pass over W, keeping the probability tiles or
streaming them (MATH.md section 4).

Read in order:

1. :func:`local_lora_gram_pass` -- the pass over W: lse, 1 - p_t, r_t . b and the centred Gram
   ``(e_{y_t} - pi_t) . (e_{y_u} - pi_u)`` of every conversation (one GEMM for the logits and the
   Gram ``E^T E`` on the lower block triangle only), in the off-target form ``q_t q_u 1(y_t = y_u)
   - q_t r_u[y_t] - q_u r_t[y_u] + r_t . r_u`` (r_t: pi_t without its target entry, q_t = 1 - p_t);
   optionally KEEPING the exp tiles (``keep``) so that the VJP is a GEMV over memory instead of a
   second pass.
2. :func:`lora_gram_pass`, :func:`centered_column_reduce` -- the same over the whole vocabulary of a
   vocabulary-parallel head (MATH.md section 7): MAX N, one SUM per token, one SUM of
   2 sum_b T_b^2; the VJP stays on each rank's columns.
3. :func:`lora_factors` -- the Jacobian algebra: J_t,a = ca_t h_t and J_t,b = cb_t (e_{y_t} - pi_t).
4. :func:`solve` -- per conversation J J^T assembled in place from the Gram (factors rescaled by a
   power of two first), Cholesky, one host sync to accept every conversation, a float64
   eigendecomposition for a rejected one (:mod:`.dense`), then ONE VJP for all of them (a GEMV over
   the kept tiles, or one streaming pass). A batch that keeps its tiles runs in groups
   (:func:`keep_groups`).
5. :func:`cost_keep`, :func:`cost_stream`, :func:`fits`, :func:`fits_keep` -- its cost formulas and
   memory rules for ``solver="auto"`` (:mod:`.choose`).
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Dict, List, Optional, Sequence, Tuple

import torch

from ..common.types import GramPass, HeadProblem
from . import dense, tiles
from .base import Solved, combine_tokens, linearize, logits_finite, prob_tiles, target_underflowed, uses_prob_tiles

#: elements of one (chunk, N) tile of the LoRA pass (all rows at once: the Gram needs every pair)
LORA_TILE_ELEMS = 1 << 20
#: the LoRA Gram wants a GEMM depth >= 512 (>= 1024 from 2048 rows: at T = 4096, K = 256, 512, 1024
#: gave 150, 210, 225 effective GF/s)
LORA_MIN_CHUNK = 512
#: up to this many tokens the same-token term of the LoRA Gram is one vectorised T x T update
SAME_TOKEN_VECTOR_MAX = 512
#: columns per block when the cross terms are read back from the kept tiles
CROSS_BLOCK = 128


def gram_block(T: int) -> int:
    """Rows per block of the block-triangle Gram (measured: the full product below 128 rows)."""
    if T <= 128:
        return T
    return 128 if T <= 1024 else 256


# ----------------------------------------------------------------------------- 1. the pass over W
@dataclass
class KeptTiles:
    """The exp tiles of :func:`lora_gram_pass`, kept for :func:`centered_column_reduce`.

    ``store`` holds chunk j (columns v0:v1) as a contiguous (v1 - v0, N) block exp(z - ref_j)^T with
    the target entries zeroed (r_t), ``refs[j]`` (N,) the reference of chunk j:
    r_t = store_j * exp(ref_j - lse).
    """

    store: torch.Tensor
    chunk: int
    refs: List[torch.Tensor]


def tri_gram(G: torch.Tensor, ET: torch.Tensor, blk: int) -> None:
    """G += ET^T ET (ET: (chunk, T)) on the lower block triangle (diagonal blocks in full)."""
    T = ET.shape[1]
    if T <= blk:
        G.addmm_(ET.T, ET)
        return
    for i0 in range(0, T, blk):
        i1 = min(T, i0 + blk)
        G[i0:i1, :i1].addmm_(ET[:, i0:i1].T, ET[:, :i1])


def sym_from_lower(G: torch.Tensor, blk: int) -> None:
    """Copy the lower block triangle onto the upper one, in place (no T x T temporary)."""
    T = G.shape[0]
    if T <= blk:
        return
    for i0 in range(blk, T, blk):
        i1 = min(T, i0 + blk)
        G[:i0, i0:i1].copy_(G[i0:i1, :i0].T)


def local_lora_gram_pass(prob: HeadProblem, *, keep: bool = False, raw: bool = False, chunk: Optional[int] = None,
                   gram_blk: Optional[int] = None) -> GramPass:
    """One pass: lse, 1 - p_t, r_t . b and the centred Gram of every conversation ->
    :class:`~rosa_ext.common.types.GramPass`.

    ``keep``: store the N x V exp tiles (the caller checks the memory budget) so that
    :func:`centered_column_reduce` is a GEMV; the cross terms ``r_t[y_u]`` are then read back from
    them CROSS_BLOCK columns at a time (no T x T temporary next to the tiles). Streaming gathers the
    cross terms during the pass (one T_b x T_b matrix per conversation). ``raw``: return
    ``r_t . r_u`` and the cross terms uncombined (:class:`GramPass`), for the vocabulary-parallel
    wrapper. Flops: 2 N d V for the logits and ~sum_b T_b^2 V for the block-triangle Gram.
    """
    x = tiles.tile_inputs(prob)
    N, V = prob.num_tokens, prob.vocab_size
    cd, dev = x.cd, x.h.device
    off = prob.offsets
    spans = tiles.spans(off, 0, N)
    lg = tiles.Logits(x.h, prob.weight, cd, x.bias, x.lq, x.lb, spans)
    lg.lazy = tiles.lazy_rescaling(dev)
    c = min(V, chunk or tiles.chunk_for(N, V, LORA_TILE_ELEMS, LORA_MIN_CHUNK * (2 if N >= 2048 else 1)))
    nch = -(-V // c)
    store = torch.empty(N * V if keep else N * c, dtype=cd, device=dev)
    G = [torch.zeros(hi - lo, hi - lo, dtype=cd, device=dev) for _, lo, hi in spans]
    blks = [gram_blk or gram_block(hi - lo) for _, lo, hi in spans]
    y = prob.targets
    ot = tiles.OffTarget(y, N, V, c, cd)
    gather_x = raw or not keep
    xidx = tiles.TargetIndex(y, [(lo, hi) for _, lo, hi in spans], V, c) if gather_x else None
    X = [torch.zeros(hi - lo, hi - lo, dtype=cd, device=dev) for _, lo, hi in spans] if gather_x else None
    Xchunk = [torch.zeros(hi - lo, dtype=torch.long, device=dev) for _, lo, hi in spans] if gather_x else None
    s = torch.zeros(N, dtype=cd, device=dev)
    sb = torch.zeros(N, dtype=cd, device=dev) if x.lq is not None else None
    refs: List[torch.Tensor] = []
    rescaled = False
    thr = math.exp(tiles.TAU[cd])
    for j in range(nch):
        v0 = j * c
        v1 = min(V, v0 + c)
        w = v1 - v0
        Wc = lg.wchunk(v0, v1)
        zT = (store[N * v0:N * v1] if keep else store[:N * w]).view(w, N)
        part, cs, r = tiles.exp_tile(lg, ot, zT, Wc, v0, v1, j, thr)
        if r is not None:
            rescaled = True
            s.mul_(r)
            if sb is not None:
                sb.mul_(r)
            for (_, lo, hi), Gb in zip(spans, G):
                Gb.mul_(r[lo:hi].unsqueeze(1)).mul_(r[lo:hi].unsqueeze(0))
        ot.record(part, lg.m)
        s.add_(cs)
        for k, ((b, lo, hi), Gb) in enumerate(zip(spans, G)):
            Ek = zT[:, lo:hi]  # (w, T_k)
            if sb is not None:
                sb[lo:hi].addmv_(Ek.T, x.lb[b, v0:v1])
            tri_gram(Gb, Ek, blks[k])
            if gather_x:
                us, cols = xidx.rows_in_chunk(k, j)
                if us.numel():
                    X[k][:, us - lo] = Ek[cols].T
                    Xchunk[k][us - lo] = j
        refs.append(lg.m)
    m = lg.m
    tot, q = ot.finish(s, m)
    lse = m + torch.log(tot)
    inv = 1.0 / tot
    for k, ((_, lo, hi), Gb) in enumerate(zip(spans, G)):
        sym_from_lower(Gb, blks[k])
        Gb.mul_(inv[lo:hi].unsqueeze(1)).mul_(inv[lo:hi].unsqueeze(0))
        if gather_x:
            if rescaled:  # X[t, u] is relative to the reference of the chunk holding y_u
                R = torch.stack([r_[lo:hi] for r_ in refs], 1)  # (T_b, chunks)
                X[k].mul_(torch.exp(R[:, Xchunk[k]] - m[lo:hi].unsqueeze(1)))
            X[k].mul_(inv[lo:hi].unsqueeze(1))
    pib = None if sb is None else sb.mul_(inv)
    logp = tiles.observed_logp_split(prob, x, lse, q)
    kept = KeptTiles(store, c, refs) if keep else None
    gp = GramPass(lse=lse, logp=logp, q=q, ah=x.ah, pib_off=pib, gram=G, kept=kept)
    if raw:
        gp.cross = X
        return gp
    for k, (_, lo, hi) in enumerate(spans):
        if X is not None:
            subtract_cross(G[k], X[k], q[lo:hi])
            X[k] = None
        else:
            subtract_cross_kept(G[k], gp, y, lo, hi, s_total=tot)
        same_token_pairs(G[k], y[lo:hi], q[lo:hi])
    return gp


def local_centered_column_reduce(prob: HeadProblem, gp, w: torch.Tensor, *, out: Optional[torch.Tensor] = None,
                           chunk: Optional[int] = None) -> torch.Tensor:
    """sum_{t in b} w_t (e_{y_t} - pi_t) -> (B, V), as ``scatter(y, w (1 - p)) - sum_t w_t r_t``.

    ``gp``: a :class:`GramPass` (its ``lse``, ``q`` and ``kept``; any object with those). With kept
    tiles a GEMV over them; else one streaming pass that recomputes each tile from h, W and lse.
    Targets outside [0, V) scatter nothing.
    """
    N, V, B = prob.num_tokens, prob.vocab_size, prob.num_conversations
    cd = prob.compute_dtype
    dev = w.device
    spans = tiles.spans(prob.offsets, 0, N)
    out = torch.empty(B, V, dtype=cd, device=dev) if out is None else out
    kept: Optional[KeptTiles] = gp.kept
    if kept is not None:
        c = kept.chunk
        for j, v0 in enumerate(range(0, V, c)):
            v1 = min(V, v0 + c)
            ET = kept.store[N * v0:N * v1].view(v1 - v0, N)
            coef = w * torch.exp(kept.refs[j] - gp.lse)
            for b, lo, hi in spans:
                torch.mv(ET[:, lo:hi], coef[lo:hi], out=out[b, v0:v1])
    else:
        x = tiles.tile_inputs(prob)
        lg = tiles.Logits(x.h, prob.weight, cd, x.bias, x.lq, x.lb, spans)
        lg.m = gp.lse  # tiles come out normalised: exp(z - lse) = pi
        lg.lazy = True
        c = min(V, chunk or tiles.chunk_for(N, V, LORA_TILE_ELEMS, LORA_MIN_CHUNK))
        ot = tiles.OffTarget(prob.targets, N, V, c, cd)
        buf = torch.empty(N * c, dtype=cd, device=dev)
        for j, v0 in enumerate(range(0, V, c)):
            v1 = min(V, v0 + c)
            zT = buf[:N * (v1 - v0)].view(v1 - v0, N)
            lg.fill_exp(zT, lg.wchunk(v0, v1), v0, v1)
            ot.split(zT, j)
            for b, lo, hi in spans:
                torch.mv(zT[:, lo:hi], w[lo:hi], out=out[b, v0:v1])
    out.neg_()
    y = prob.targets
    wq = (w * gp.q).masked_fill_((y < 0) | (y >= V), 0.0)  # no host sync
    out.index_put_((prob.seg, y.clamp(0, V - 1)), wq, accumulate=True)
    return out


# ----------------------------------------------------------------------------- 2. vocabulary-parallel
def tile_lora_gram_pass(prob: HeadProblem, backend) -> GramPass:
    """Step 1 on the GPU (:func:`~.base.uses_prob_tiles`): the Triton stats pass (lse), the probability
    tiles P (N x V, kept for the VJP), then per conversation the centred Gram as the GEMM P_b P_b^T with
    the target cross terms gathered (:func:`rosa_ext.kernels.tile_gemms.centered_gram`)."""
    from ..kernels import tile_gemms
    st, tiles, logp = prob_tiles(prob, backend)
    grams = tile_gemms.centered_gram(tiles, prob.targets, prob.offsets)
    return GramPass(lse=st.lse, logp=logp, q=tiles.q, ah=st.ah, pib_off=tiles.rb, gram=grams, kept=tiles)


def lora_gram_pass(prob: HeadProblem, backend, keep: bool) -> GramPass:
    """:func:`local_lora_gram_pass` over the whole vocabulary (:func:`tile_lora_gram_pass` on the GPU when
    P fits the keep budget). On a vocabulary-parallel head
    (``prob.shard``; ``backend`` the :class:`~rosa_ext.backends.distributed.DistributedBackend`): the
    local pass on this rank's rows (raw parts; the tiles, when kept, stay local), MAX N, one SUM of
    3N (4N with LoRA) per-token numbers and one SUM of 2 sum_b T_b^2 (r_t . r_u and r_t[y_u] per
    conversation); the Gram is then centred identically on every rank."""
    if uses_prob_tiles(prob, backend):
        return tile_lora_gram_pass(prob, backend)
    if prob.shard is None:
        return local_lora_gram_pass(prob, keep=keep)
    gp = local_lora_gram_pass(backend.owned_targets_view(prob), keep=keep, raw=True)
    lse, logp, q, pib_off, _ = combine_tokens(prob, backend, gp, "lora_gram_pass")
    e = torch.exp(gp.lse - lse)  # this shard's share of each token's mass: r_t = e r_t(local)
    off = prob.offsets
    parts = []
    for b, (R, X) in enumerate(zip(gp.gram, gp.cross)):
        eb = e[off[b]:off[b + 1]]
        parts += [(R * eb.unsqueeze(1) * eb.unsqueeze(0)).reshape(-1), (X * eb.unsqueeze(1)).reshape(-1)]
    flat = backend.comm.all_sum(torch.cat(parts), "lora_gram_pass: gram")
    grams, pos = [], 0
    for b in range(prob.num_conversations):
        n = off[b + 1] - off[b]
        R = flat[pos:pos + n * n].view(n, n)
        X = flat[pos + n * n:pos + 2 * n * n].view(n, n)
        pos += 2 * n * n
        subtract_cross(R, X, q[off[b]:off[b + 1]])
        same_token_pairs(R, prob.targets[off[b]:off[b + 1]], q[off[b]:off[b + 1]])
        grams.append(R)
    return GramPass(lse=lse, logp=logp, q=q, ah=gp.ah, pib_off=pib_off, gram=grams, kept=gp.kept)


def centered_column_reduce(prob: HeadProblem, backend, gp: GramPass, w: torch.Tensor,
                           out: Optional[torch.Tensor] = None) -> torch.Tensor:
    """sum_{t in b} w_t (e_{y_t} - pi_t) -> (B, V_local): :func:`local_centered_column_reduce` on this
    rank's columns (its kept tiles or one local pass with the global lse; the owner scatters), no
    communication."""
    if gp.kept is not None and not isinstance(gp.kept, KeptTiles):  # the GPU's ProbTiles: one GEMV over P
        from ..kernels import tile_gemms
        res = tile_gemms.centered_vjp(gp.kept, w, prob.targets, prob.seg, prob.num_conversations)
        return res if out is None else out.copy_(res)
    lp = prob if prob.shard is None else backend.owned_targets_view(prob)
    return local_centered_column_reduce(lp, gp, w, out=out)


# ----------------------------------------------------------------------------- 3. the Jacobian algebra
def lora_factors(lin, gp: GramPass) -> Tuple[torch.Tensor, torch.Tensor]:
    """(ca, cb), (N,) each, after one :func:`lora_gram_pass`: J_t,a = ca_t h_t with
    ca = s p (b[y_t] - pi_t . b) = s p ((1 - p) b[y_t] - r_t . b), and J_t,b = cb_t (e_{y_t} - pi_t)
    with cb = s p (a . h_t)."""
    s = lin.prob.lora_scale
    return s * lin.p * (gp.q * lin.by - gp.pib_off), s * lin.p * gp.ah


# ----------------------------------------------------------------------------- 4. the solve
def _solve_group(prob: HeadProblem, backend, keep: bool) -> Tuple[Solved, torch.Tensor, torch.Tensor]:
    """The LoRA dual of one group of conversations -> (Solved with the residual unset, sum of the
    residual numerators, sum of the denominators)."""
    gp = lora_gram_pass(prob, backend, keep)
    lin, g = linearize(prob, backend, gp, check=False)
    ca, cb = lora_factors(lin, gp)
    h, off = lin.h, prob.offsets
    B, d, Vl = prob.num_conversations, prob.hidden_size, prob.vocab_size
    cd, dev = prob.compute_dtype, prob.device
    update = torch.empty(B, d + Vl, dtype=cd, device=dev)
    wcol = torch.empty(prob.num_tokens, dtype=cd, device=dev)
    nums, dens, flags, lams, gs, Jas, cbs = [], [], [], [], [], [], []
    for b in range(B):
        lo, hi = off[b], off[b + 1]
        # J rescaled by a power of two (exact; the step is invariant): entries of the Gram are <= 2
        unit = dense.power_of_two_scale(torch.maximum(ca[lo:hi].abs().max() * h[lo:hi].abs().max(),
                                                      cb[lo:hi].abs().max()))
        cbk = cb[lo:hi] * unit
        Ja = (ca[lo:hi] * unit).unsqueeze(1) * h[lo:hi]
        gb = g[lo:hi] * unit
        M = gp.gram[b]  # (e_y - pi_t).(e_y - pi_u), made J J^T in place
        M.mul_(cbk.unsqueeze(1)).mul_(cbk.unsqueeze(0))
        M.addmm_(Ja, Ja.T)
        lam = dense.ridge(prob, M.diagonal().mean(), unit)
        alpha, info = dense.factor_solve(M, gb, lam)
        num, den, fl = dense.dual_check(M, gb, alpha, lam, info)
        torch.mv(Ja.T, alpha, out=update[b, :d])
        wcol[lo:hi] = alpha * cbk
        nums.append(num)
        dens.append(den)
        flags.append(fl)
        lams.append(lam)
        gs.append(gb)
        Jas.append(Ja)
        cbs.append(cbk)
    eps = torch.finfo(cd).eps
    for b in dense.accept(prob, nums, dens, flags, logits_finite(lin),
                              target_underflowed(prob, lin.stats.logp)):
        lo, hi = off[b], off[b + 1]
        alpha = dense.spectral_gram(gp.gram[b], gs[b], float(lams[b]), eps)
        if not bool(torch.isfinite(alpha).all()):
            raise dense.not_finite(prob)
        alpha = alpha.to(cd)
        torch.mv(Jas[b].T, alpha, out=update[b, :d])
        wcol[lo:hi] = alpha * cbs[b]
        ok = torch.zeros((), dtype=torch.int32, device=dev)
        nums[b], dens[b], _ = dense.dual_check(gp.gram[b], gs[b], alpha, lams[b], ok)
    gp.gram = []  # free the T x T matrices before the VJP
    centered_column_reduce(prob, backend, gp, wcol, out=update[:, d:])
    engine = "triton" if uses_prob_tiles(prob, backend) else "torch"
    return Solved(update, lin.stats.logp, g, 0, 0.0, engine=engine), sum(nums), sum(dens)


def solve(prob: HeadProblem, backend, keep: bool) -> Solved:
    """The exact LoRA-mode step of every conversation (module doc) -> :class:`~.base.Solved`.
    ``keep``: keep the probability tiles between the pass and the VJP (the caller checked the budget)."""
    groups = keep_groups(prob.lengths) if keep else [(0, prob.num_conversations)]
    parts = [_solve_group(prob.conversations(b0, b1), backend, keep) for b0, b1 in groups]
    if len(parts) == 1:
        s, num, den = parts[0]
        s.residual = dense.relative_residual(num, den)
        return s
    num = torch.stack([p[1] for p in parts]).sum()
    den = torch.stack([p[2] for p in parts]).sum()
    return Solved(torch.cat([p[0].update for p in parts]), torch.cat([p[0].logp for p in parts]),
                  torch.cat([p[0].target for p in parts]), 0, dense.relative_residual(num, den), engine=parts[0][0].engine)


def keep_groups(lengths: Sequence[int]) -> List[Tuple[int, int]]:
    """Consecutive conversations grouped so that no group has more rows than the longest one
    (the kept tiles of a batch never exceed those of its longest conversation)."""
    cap = max(lengths)
    groups, g0, rows = [], 0, 0
    for k, n in enumerate(lengths):
        if k > g0 and rows + n > cap:
            groups.append((g0, k))
            g0, rows = k, 0
        rows += n
    groups.append((g0, len(lengths)))
    return groups


# ----------------------------------------------------------------------------- 5. cost and memory
def _tri(T: int) -> float:
    """Share of the full T x T Gram product the block-triangle Gram computes (:func:`gram_block`)."""
    blk = gram_block(T)
    if T <= blk:
        return 1.0
    nb = -(-T // blk)
    return (nb + 1) / (2 * nb)


def _pass_and_solve(k: Dict[str, float], lengths: Sequence[int], d: int, V: int) -> Tuple[float, float]:
    """(seconds of the pass without its W reads, seconds of the T x T algebra)."""
    R, N = k["gemm"], sum(lengths)
    gram = sum(2 * T * T * V * _tri(T) for T in lengths)
    solve_s = sum(2 * T * T * d / R + T ** 3 / 3 / k["chol"] for T in lengths)
    return (2 * N * d * V + gram) / R + N * V * k["ew_lora"], solve_s


def cost_keep(k: Dict[str, float], lengths: Sequence[int], d: int, V: int, wpass: float) -> float:
    """Estimated seconds keeping the tiles: the pass per group (logits 2 N d V, block-triangle Gram
    ~sum_b T_b^2 V), the kept memory's first touch, the VJP as a GEMV over it, the T x T algebra."""
    pass_s, solve_s = _pass_and_solve(k, lengths, d, V)
    N = sum(lengths)
    return (pass_s + len(keep_groups(lengths)) * wpass + N * V * (k["keep_extra"] + k["kept_gemv"])
            + solve_s + k["call"])


def cost_stream(k: Dict[str, float], lengths: Sequence[int], d: int, V: int, wpass: float) -> float:
    """Estimated seconds streaming: the same pass, then one streaming VJP pass (2 N d V)."""
    pass_s, solve_s = _pass_and_solve(k, lengths, d, V)
    N = sum(lengths)
    return pass_s + wpass + 2 * N * d * V / k["gemm"] + N * V * k["ew_lora"] + wpass + solve_s + k["call"]


def fits(lengths: Sequence[int], esz: int, gram_budget_bytes: int) -> bool:
    """Memory rule: every conversation's Gram matrix plus one factor, esz (sum_b T_b^2 + max_b T_b^2)."""
    return esz * (sum(T * T for T in lengths) + max(lengths) ** 2) <= gram_budget_bytes


def fits_keep(lengths: Sequence[int], V: int, esz: int, keep_budget_bytes: int) -> bool:
    """Memory rule of keeping: the longest conversation's T x V tiles within ``keep_budget_bytes``."""
    return esz * max(lengths) * V <= keep_budget_bytes


# ----------------------------------------------------------------------------- helpers of step 1
def subtract_cross(M: torch.Tensor, X: torch.Tensor, q: torch.Tensor) -> None:
    """M -= Y + Y^T with Y[t, u] = r_t[y_u] (1 - p_u) = X[t, u] q_u, in place (X is overwritten)."""
    X.mul_(q.unsqueeze(0))
    M.sub_(X).sub_(X.T)


def subtract_cross_kept(M: torch.Tensor, gp: GramPass, y: torch.Tensor, lo: int, hi: int,
                         s_total: torch.Tensor) -> None:
    """:func:`subtract_cross` for rows lo:hi, reading r_t[y_u] from the kept tiles CROSS_BLOCK columns
    at a time (temporaries T x CROSS_BLOCK)."""
    kept: KeptTiles = gp.kept
    N = gp.lse.shape[0]
    V = kept.store.numel() // N
    c = kept.chunk
    T = hi - lo
    m = kept.refs[-1]
    qk = gp.q[lo:hi]
    idx = tiles.TargetIndex(y[lo:hi], [(0, T)], V, c)
    scale = 1.0 / s_total[lo:hi]
    for j, v0 in enumerate(range(0, V, c)):
        us_all, cols_all = idx.rows_in_chunk(0, j)
        if not us_all.numel():
            continue
        v1 = min(V, v0 + c)
        Ek = kept.store[N * v0:N * v1].view(v1 - v0, N)[:, lo:hi]  # (w, T)
        ref = kept.refs[j]
        f = scale if ref is m else scale * torch.exp(ref[lo:hi] - m[lo:hi])
        for i0 in range(0, us_all.numel(), CROSS_BLOCK):
            us, cols = us_all[i0:i0 + CROSS_BLOCK], cols_all[i0:i0 + CROSS_BLOCK]
            Xb = Ek.index_select(0, cols).T  # (T, bs): E_j[t, y_u]
            Xb.mul_(f.unsqueeze(1)).mul_(qk[us].unsqueeze(0)).neg_()  # -Y[:, us]
            M.index_add_(1, us, Xb)
            M.index_add_(0, us, Xb.T)


def same_token_pairs(M: torch.Tensor, y: torch.Tensor, q: torch.Tensor) -> None:
    """M[t, u] += q_t q_u where y_t == y_u (the diagonal included), in place."""
    if y.numel() <= SAME_TOKEN_VECTOR_MAX:  # one vectorised update (temporaries: T^2 numbers and bools)
        M.add_(torch.outer(q, q).mul_(y.unsqueeze(0) == y.unsqueeze(1)))
        return
    M.diagonal().add_(q * q)
    ys, order = torch.sort(y)
    _, counts = torch.unique_consecutive(ys, return_counts=True)
    if int(counts.max()) < 2:
        return
    starts = torch.cumsum(counts, 0) - counts
    rep = counts > 1
    for st, cn in zip(starts[rep].tolist(), counts[rep].tolist()):
        idx = order[st:st + cn]
        for r0 in range(0, cn, 1024):  # bounded temporaries even for one long run
            ri = idx[r0:r0 + 1024]
            blk = q[ri].unsqueeze(1) * q[idx].unsqueeze(0)
            ar = torch.arange(ri.numel(), device=M.device)
            blk[ar, ar + r0] = 0  # the diagonal is done
            M.index_put_((ri.unsqueeze(1).expand_as(blk), idx.unsqueeze(0).expand_as(blk)), blk, accumulate=True)
