"""Plan "dual", hidden mode: the exact step in ONE pass over W (MATH.md section 4).

Read in order:

1. :func:`local_hidden_pass` -- the pass over W: hidden mode's whole vocabulary work as ONE
   online-softmax pass (flash attention with K = V = W): lse, 1 - p_t and r_t W, where r_t is pi_t
   without its target entry. Two GEMMs per tile (4 N d V flops), nothing of size N x V kept.
   On the GPU (:func:`tile_hidden_pass`): the Triton stats pass, the probability tiles P, r W = P W.
2. :func:`hidden_pass` -- the same over the whole vocabulary of a vocabulary-parallel head (MATH.md
   section 7): the local pass, MAX N, one SUM of N (d + 3 + L) numbers.
3. :func:`hidden_rows` -- the Jacobian algebra: the explicit T x d rows of J in the off-target form
   ``J_t = p_t ((1 - p_t) W[y_t] - r_t W)`` (no cancellation when p_t -> 1).
4. :func:`solve` -- per conversation the smaller of the T_b x T_b dual ``J^T (J J^T + lambda I)^{-1} g``
   and the d x d primal ``(J^T J + lambda I)^{-1} J^T g`` (the same step), J rescaled by a power of
   two first; one host sync accepts them all; a rejected one is re-solved in float64 from the SVD
   (:mod:`.dense`).
5. :func:`cost`, :func:`fits` -- its cost formula and memory rule for ``solver="auto"`` (:mod:`.choose`).

Hidden-mode CG (:mod:`.cg_hidden`) shares steps 1-3.
"""
from __future__ import annotations

import math
from typing import Dict, List, Optional, Sequence

import torch

from ..common.types import HeadProblem, HiddenPass
from . import dense, tiles
from .base import Solved, combine_tokens, linearize, logits_finite, prob_tiles, target_underflowed, uses_prob_tiles

#: elements of one (chunk, rows) logits tile of the hidden pass (4 MB fp32; flat from 0.5 to 8 MB)
HIDDEN_TILE_ELEMS = 1 << 20
#: rows per block of the hidden pass (W is streamed once per block)
HIDDEN_ROW_BLOCK = 1024


# ----------------------------------------------------------------------------- 1. the pass over W
def local_hidden_pass(prob: HeadProblem, *, row_block: Optional[int] = None, chunk: Optional[int] = None) -> HiddenPass:
    """One online-softmax pass over the vocabulary -> :class:`~rosa_ext.common.types.HiddenPass`.

    Per vocabulary chunk: ``zT = W_c h^T`` (GEMM), one rank-k update (bias, LoRA term, reference),
    ``exp``, the target entries split off, row sums, ``pi W += zT^T W_c`` (GEMM), and with a LoRA
    term ``r . b`` (GEMV). 4 N d V flops; extra memory one (chunk, row block) tile besides the
    (N, d) result.
    """
    x = tiles.tile_inputs(prob)
    N, d, V = prob.num_tokens, prob.hidden_size, prob.vocab_size
    cd, dev = x.cd, x.h.device
    rb = max(1, min(N, row_block or HIDDEN_ROW_BLOCK))
    lse = torch.empty(N, dtype=cd, device=dev)
    piW = torch.empty(N, d, dtype=cd, device=dev)
    pib = torch.empty(N, dtype=cd, device=dev) if x.lq is not None else None
    q = torch.empty(N, dtype=cd, device=dev)
    thr = math.exp(tiles.TAU[cd])
    lazy = tiles.lazy_rescaling(dev)
    for r0 in range(0, N, rb):
        r1 = min(N, r0 + rb)
        n = r1 - r0
        spans = tiles.spans(prob.offsets, r0, r1)
        lg = tiles.Logits(x.h[r0:r1], prob.weight, cd, x.bias, None if x.lq is None else x.lq[r0:r1], x.lb, spans)
        lg.lazy = lazy
        c = min(V, chunk or tiles.chunk_for(n, V, HIDDEN_TILE_ELEMS, tiles.MIN_CHUNK))
        buf = torch.empty(n * c, dtype=cd, device=dev)
        ot = tiles.OffTarget(prob.targets[r0:r1], n, V, c, cd)
        s = torch.zeros(n, dtype=cd, device=dev)
        acc = piW[r0:r1].zero_()
        sb = None if pib is None else pib[r0:r1].zero_()
        for j, v0 in enumerate(range(0, V, c)):
            v1 = min(V, v0 + c)
            Wc = lg.wchunk(v0, v1)
            zT = buf[:n * (v1 - v0)].view(v1 - v0, n)
            part, cs, r = tiles.exp_tile(lg, ot, zT, Wc, v0, v1, j, thr)
            if r is not None:
                s.mul_(r)
                acc.mul_(r.unsqueeze(1))
                if sb is not None:
                    sb.mul_(r)
            ot.record(part, lg.m)
            s.add_(cs)
            acc.addmm_(zT.T, Wc)
            if sb is not None:
                for b, lo, hi in spans:
                    sb[lo:hi].addmv_(zT[:, lo:hi].T, x.lb[b, v0:v1])
        tot, qb = ot.finish(s, lg.m)
        acc.div_(tot.unsqueeze(1))
        if sb is not None:
            sb.div_(tot)
        lse[r0:r1] = lg.m + torch.log(tot)
        q[r0:r1] = qb
    logp = tiles.observed_logp_split(prob, x, lse, q)
    return HiddenPass(lse=lse, logp=logp, q=q, ah=x.ah, pib_off=pib, pi_weight=piW)


# ----------------------------------------------------------------------------- 2. vocabulary-parallel
def tile_hidden_pass(prob: HeadProblem, backend) -> HiddenPass:
    """Step 1 on the GPU (:func:`~.base.uses_prob_tiles`): the Triton stats pass (lse), the probability
    tiles P (N x V, target entries split off, q = 1 - p_t and r . b summed), then r W = P W as one GEMM
    on the tensor cores (:func:`rosa_ext.kernels.tile_gemms.off_target_weight`)."""
    from ..kernels import tile_gemms
    st, tiles, logp = prob_tiles(prob, backend)
    return HiddenPass(lse=st.lse, logp=logp, q=tiles.q, ah=st.ah, pib_off=tiles.rb,
                      pi_weight=tile_gemms.off_target_weight(tiles, prob.weight))


def hidden_pass(prob: HeadProblem, backend) -> HiddenPass:
    """:func:`local_hidden_pass` over the whole vocabulary (:func:`tile_hidden_pass` on the GPU when P
    fits the keep budget). On a vocabulary-parallel head (``prob.shard``;
    ``backend`` the :class:`~rosa_ext.backends.distributed.DistributedBackend`) the local pass runs on
    this rank's rows (the owner of y_t splits the target off), then MAX N and one SUM of N (d + 3 + L)
    numbers combine the shards (:func:`~.base.combine_tokens`)."""
    if uses_prob_tiles(prob, backend):
        return tile_hidden_pass(prob, backend)
    if prob.shard is None:
        return local_hidden_pass(prob)
    hp = local_hidden_pass(backend.owned_targets_view(prob))
    lse, logp, q, pib_off, piW = combine_tokens(prob, backend, hp, "hidden_pass", wide=hp.pi_weight)
    return HiddenPass(lse=lse, logp=logp, q=q, ah=hp.ah, pib_off=pib_off, pi_weight=piW)


# ----------------------------------------------------------------------------- 3. the Jacobian algebra
def hidden_rows(prob: HeadProblem, backend, hp: HiddenPass, lin) -> torch.Tensor:
    """The rows of J from one :func:`hidden_pass` -> (N, d) compute dtype, in the off-target form
    (MATH.md section 4):

        J_t = p_t ((1 - p_t) W[y_t] - r_t W)  (+ s ((1 - p_t) b[y_t] - r_t . b) a_seg with a LoRA term)

    ``lin``: the linearisation at the pass (:func:`~.base.linearize`, its ``p`` and ``by``). J is
    built in the memory of W[y_t] (``backend.target_rows``: the owner's row on a sharded head).
    """
    J = backend.target_rows(prob, prob.weight).to(prob.compute_dtype)
    J.mul_(hp.q.unsqueeze(1)).sub_(hp.pi_weight)
    if prob.lora_b is not None:
        a = prob.lora_a[0].unsqueeze(0) if prob.num_conversations == 1 else prob.lora_a[prob.seg]
        J.add_((prob.lora_scale * (hp.q * lin.by - hp.pib_off)).unsqueeze(1) * a)
    return J.mul_(lin.p.unsqueeze(1))


def pass_and_rows(prob: HeadProblem, backend, check: bool):
    """Steps 1-3: (linearisation, target g (N,), rows of J (N, d))."""
    hp = hidden_pass(prob, backend)
    lin, g = linearize(prob, backend, hp, check=check)
    return lin, g, hidden_rows(prob, backend, hp, lin)


# ----------------------------------------------------------------------------- 4. the solve
def solve(prob: HeadProblem, backend) -> Solved:
    """The exact hidden-mode step of every conversation (module doc) -> :class:`~.base.Solved`."""
    lin, g, rows = pass_and_rows(prob, backend, check=False)
    off, d, cd = prob.offsets, prob.hidden_size, prob.compute_dtype
    B = prob.num_conversations
    update = torch.empty(B, d, dtype=cd, device=prob.device)
    nums: List[torch.Tensor] = []
    dens: List[torch.Tensor] = []
    flags: List[torch.Tensor] = []
    lams: List[torch.Tensor] = []
    gs: List[torch.Tensor] = []
    for b in range(B):
        Jb = rows[off[b]:off[b + 1]]
        unit = dense.power_of_two_scale(Jb.abs().max())  # exact; the step is invariant to it
        Jb.mul_(unit)
        gb = g[off[b]:off[b + 1]] * unit
        lam = dense.ridge(prob, Jb.square().sum() / Jb.shape[0], unit)
        if Jb.shape[0] <= d:  # the dual: J^T (J J^T + lam I)^{-1} g, T_b x T_b
            G0 = Jb @ Jb.T
            alpha, info = dense.factor_solve(G0, gb, lam)
            num, den, fl = dense.dual_check(G0, gb, alpha, lam, info)
            torch.mv(Jb.T, alpha, out=update[b])
        else:  # the same step, primal: (J^T J + lam I)^{-1} J^T g, d x d
            A0 = Jb.T @ Jb
            rhs = Jb.T @ gb
            delta, info = dense.factor_solve(A0, rhs, lam)
            num, den, fl = dense.primal_check(A0, rhs, delta, lam, info, cd)
            update[b] = delta
        nums.append(num)
        dens.append(den)
        flags.append(fl)
        lams.append(lam)
        gs.append(gb)
    eps = torch.finfo(cd).eps
    for b in dense.accept(prob, nums, dens, flags, logits_finite(lin),
                              target_underflowed(prob, lin.stats.logp)):
        delta, nb, db = dense.spectral_hidden(rows[off[b]:off[b + 1]], gs[b], float(lams[b]), eps)
        if not bool(torch.isfinite(delta).all()):
            raise dense.not_finite(prob)
        update[b] = delta.to(update.dtype)
        nums[b] = torch.tensor(nb, dtype=update.dtype, device=update.device)
        dens[b] = torch.tensor(db, dtype=update.dtype, device=update.device)
    res = dense.relative_residual(sum(nums), sum(dens))
    return Solved(update, lin.stats.logp, g, 0, res, engine="triton" if uses_prob_tiles(prob, backend) else "torch")


# ----------------------------------------------------------------------------- 5. cost and memory
def pass_seconds(k: Dict[str, float], lengths: Sequence[int], d: int, V: int, wpass: float) -> float:
    """Seconds of :func:`hidden_pass`: 4 N d V flops, N V tile elements, W read once per row block."""
    N = sum(lengths)
    blocks = max(1, -(-N // HIDDEN_ROW_BLOCK))
    return 4 * N * d * V / k["gemm"] + N * V * k["ew_hidden"] + blocks * wpass


def cost(k: Dict[str, float], lengths: Sequence[int], d: int, V: int, wpass: float) -> float:
    """Estimated seconds of this plan: the pass, then per conversation the cheaper of the T x T dual
    (2 T^2 d + T^3 / 3) and the d x d primal (2 T d^2 + d^3 / 3)."""
    R, chol = k["gemm"], k["chol"]
    algebra = sum(min(2 * T * T * d / R + T ** 3 / 3 / chol, 2 * T * d * d / R + d ** 3 / 3 / chol) for T in lengths)
    return pass_seconds(k, lengths, d, V, wpass) + algebra + k["call"]


def fits(lengths: Sequence[int], d: int, esz: int, gram_budget_bytes: int) -> bool:
    """Memory rule: the system and its factor, 2 min(T, d)^2 numbers of the longest conversation."""
    m = max(min(T, d) for T in lengths)
    return 2 * esz * m * m <= gram_budget_bytes
