"""The small dense algebra every plan shares (MATH.md sections 4 and 6): the ridge rule, the exact
rescaling, factor-and-accept, the float64 refinement, the CG call -- each written once.

- :func:`ridge`, :func:`conversation_ridges`: lambda from ``damping`` / ``damping_mode`` and the mean
  of a conversation's Gram diagonal (the relative ridge of MATH.md section 6).
- :func:`power_of_two_scale`: the exact rescaling that keeps a conversation's J J^T inside the
  compute dtype's range (the step is invariant to it, MATH.md section 6).
- :func:`factor_solve`, :func:`dual_check`, :func:`accept`: Cholesky of ``A + lambda I``, the
  relative residual of the normal equations, and ONE host sync that decides which conversations
  are re-solved in float64 (and raises for non-finite logits or an underflowed target).
- :func:`float64_refinement`: the one loop over the rejected conversations; :func:`float64_problem`:
  a rejected conversation of a float32 problem, re-linearised in float64 from its inputs (J itself is
  then exact to float64, which a solve from the float32 J cannot be when J J^T + lambda I is
  ill-conditioned); :func:`spectral_hidden`, :func:`spectral_gram`: the solves of a float64 problem
  whose Cholesky was rejected (SVD of J, eigendecomposition of J J^T).
- :func:`run_cg`: a CG implementation on a plan's matvec (a breakdown in the right-hand side is the
  inputs' fault and named so).
- :class:`Padding`, :func:`dual_checks`: the dual's T x T algebra of every conversation at once, on a padded
  batch (B, Tm, ...) with Tm the longest conversation, so that its launches do not grow with B (a loop over
  conversations is ~25 device launches each). :class:`Padding` maps packed per-token rows to the batch (views
  when every conversation has Tm tokens, else one zero-filled copy: a padded row of J is zero, so are the
  padded entries of g, and the padded rows and columns of J J^T are decoupled from the real block);
  :meth:`Padding.fill_pad_diagonal` sets the padded diagonal to the conversation's first diagonal entry, so
  that the Cholesky factor of the padded ``A + lambda I`` is the real block's with copies of its first
  diagonal entry appended -- its min / max diagonal (the condition estimate of :func:`well_factored`) and the
  solution (zero on the padding) are the real block's; :func:`factor_solve` takes the batch as it is.
"""
from __future__ import annotations

import math
from dataclasses import replace
from typing import Callable, Iterator, List, NamedTuple, Optional, Sequence, Tuple, Union

import torch

from ..common import defaults
from ..common import validation as checks
from ..common.config import RosaConfig
from ..common.jacobian import Linearization, segment_sum
from ..common.types import CGResult, HeadProblem
from ..common.validation import RosaNonFiniteError, RosaNumericalError

WHO = "rosa_update"
#: A CG implementation: ``cg(matvec, b, *, damping, max_iter, tol) -> CGResult`` (rosa_ext.cg).
CGImpl = Callable[..., CGResult]

#: The dual's Cholesky solve is accepted for a conversation when the relative residual of its
#: normal equations is at most this (by compute dtype); a conversation over it, or one whose
#: factorisation failed or gave NaN/Inf, is re-solved in float64 (MATH.md section 4).
DUAL_RESIDUAL_LIMIT = {torch.float32: 1e-4, torch.float64: 1e-10}

Ridge = Union[float, torch.Tensor]


def ridge(cfg: RosaConfig, diag_mean: torch.Tensor, unit: Optional[torch.Tensor] = None,
          shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """lambda of each conversation (MATH.md section 6), the shape and dtype of ``diag_mean`` (no host
    sync): the ONE place the ridge rule is written.

    ``diag_mean``: the mean over a conversation's tokens of ||J_t||^2 (the diagonal of J J^T), of a J the
    plan scaled: by the linearisation's e^-shift (``shift``, the log of the conversation's scale, see
    :class:`~rosa_ext.common.jacobian.Linearization`) and by ``unit`` (a power of two from
    :func:`power_of_two_scale`); None for none. "absolute": ``damping unit^2 e^(-2 shift)`` (the same
    ridge in the scaled units; formed in float64 and clamped to the dtype's range -- a ridge beyond it is
    reported by :func:`ridge_in_range`); "relative": ``damping`` times the mean (scale invariant), or
    ``damping`` where J is exactly zero (its step is zero anyway).
    """
    if cfg.damping_mode == "absolute":
        lam = torch.full_like(diag_mean, cfg.damping, dtype=torch.float64)
        if unit is not None:
            lam = lam * (unit.double() * unit.double())
        if shift is not None:
            lam = lam * torch.exp(-2.0 * shift.double())
        return lam.clamp_max(torch.finfo(diag_mean.dtype).max).to(diag_mean.dtype)
    return torch.where(diag_mean > 0, cfg.damping * diag_mean, cfg.damping)


def ridge_in_range(lam: torch.Tensor) -> torch.Tensor:
    """Whether every ridge (in a plan's scaled units, where J is of order one) leaves the step
    representable -> 0-dim bool, no host sync: the step is then about J^T g / lambda, so a lambda above
    ~1 / (100 tiny) of the dtype (an absolute ``damping`` on a conversation whose every token is so
    confident or so unlikely that J ~ p (1 - p) is below ~1e-18 in float32) gives a step below the
    dtype's normal range: refused (:func:`raise_step_underflow`) rather than returned as zeros."""
    return (lam <= 0.01 / torch.finfo(lam.dtype).tiny).all()


def conversation_ridges(prob: HeadProblem, cfg: RosaConfig, diag: torch.Tensor,
                        unit: Optional[torch.Tensor] = None, shift: Optional[torch.Tensor] = None) -> torch.Tensor:
    """:func:`ridge` of every conversation -> (B,), from the per-token ``diag`` (N,) = ||J_t||^2."""
    counts = torch.tensor(prob.lengths, dtype=diag.dtype).to(diag.device, non_blocking=True)  # no stream sync
    mean = segment_sum(prob, diag.unsqueeze(1))[:, 0] / counts
    return ridge(cfg, mean, unit, shift)


def power_of_two_scale(absmax: torch.Tensor) -> torch.Tensor:
    """A power of two ``unit`` (0-dim, absmax's dtype) with ``unit * absmax`` in [1/2, 1): multiplying J by
    it is exact, and keeps J J^T of rows that are tiny (every p_t below ~1e-19: the products underflow
    float32) or huge (``lora_scale`` 1e25: they overflow) inside the range. 1 for a zero or non-finite
    ``absmax`` (no host sync; three small ops: it runs per conversation)."""
    # absmax = m 2^e with m in [1/2, 1): m / absmax = 2^-e exactly; 0/0, inf/inf and NaN give NaN -> 1, and a
    # subnormal absmax (p ~ 1e-43 in float32), whose 2^-e is beyond the range, the dtype's largest power of two
    top = math.ldexp(0.5, math.frexp(torch.finfo(absmax.dtype).max)[1])  # the dtype's largest power of two
    m, _ = torch.frexp(absmax)
    return torch.nan_to_num(m / absmax, nan=1.0, posinf=top)


class Factored(NamedTuple):
    """How a Cholesky factorisation went, as 0-dim tensors (read in :func:`accept`'s one host sync):
    ``info`` of ``torch.linalg.cholesky_ex`` (0: it succeeded) and the min and max of the factor's diagonal."""

    info: torch.Tensor
    diag_min: torch.Tensor
    diag_max: torch.Tensor


def factor_solve(A: torch.Tensor, rhs: torch.Tensor, lam: Ridge) -> Tuple[torch.Tensor, Factored]:
    """(A + lam I)^{-1} rhs by Cholesky for symmetric A (restored up to rounding afterwards). One
    allocation of A's size (the factor). Returns (x, how the factorisation went): :func:`well_factored`
    tells, on the host, whether it succeeded and ``A + lam I`` is well enough conditioned for the compute
    dtype (:data:`CONDITION_LIMIT`). Batched too: A (B, n, n), rhs (B, n), lam (B,) -> x (B, n) and
    Factored of (B,) tensors (:class:`Padding`)."""
    lam_d = lam.unsqueeze(-1) if isinstance(lam, torch.Tensor) else lam  # over each matrix's diagonal
    A.diagonal(dim1=-2, dim2=-1).add_(lam_d)
    L, info = torch.linalg.cholesky_ex(A)
    A.diagonal(dim1=-2, dim2=-1).sub_(lam_d)
    x = torch.cholesky_solve(rhs.unsqueeze(-1), L)
    dmin, dmax = torch.aminmax(L.diagonal(dim1=-2, dim2=-1), dim=-1)
    return x.squeeze(-1), Factored(info, dmin, dmax)


def well_factored(info: float, dmin: float, dmax: float, dtype: torch.dtype) -> bool:
    """Host side of :class:`Factored`: the factorisation succeeded and eps * cond(A + lam I) is at most
    :data:`CONDITION_LIMIT`, cond estimated from below by (max / min of the factor's diagonal)^2 (NaN fails)."""
    return info == 0 and dmin > 0 and (dmax / dmin) ** 2 * torch.finfo(dtype).eps <= CONDITION_LIMIT


#: A Cholesky solve is trusted only while eps times the (estimated) condition number of ``A + lambda I``
#: is at most this: the system was formed in the compute dtype (A = J J^T or J^T J), whose rounding
#: (~eps ||J||^2) a tiny ridge cannot dominate -- there the solution of the formed system can be far
#: from the step (e.g. damping 1e-10 on a rank-deficient J: 58-77% off in float32 with a small residual),
#: so the conversation is re-linearised and solved in float64 (:func:`float64_problem`; in a float64
#: problem, :func:`spectral_hidden` / :func:`spectral_gram`).
CONDITION_LIMIT = 1e-3


class SolveFacts(NamedTuple):
    """One conversation's solve as 0-dim tensors, read on the host by :func:`accept` (one sync for all):
    ``num``, ``den`` of the relative residual, how the factorisation went, ``system`` (min, max) of the
    formed J J^T (or J^T J: finite, and exactly 0 when J is), the ridge ``lam`` and, for a primal solve,
    ``step_sq`` = ||delta||^2 (else None)."""

    num: torch.Tensor
    den: torch.Tensor
    factored: Factored
    system: Tuple[torch.Tensor, torch.Tensor]
    lam: torch.Tensor
    step_sq: Optional[torch.Tensor] = None


def dual_check(G0: torch.Tensor, g: torch.Tensor, alpha: torch.Tensor, lam: Ridge, factored: Factored) -> SolveFacts:
    """The facts of a dual solve: the residual of the normal equations from the Gram matrix (MATH.md
    section 4), num = ||J^T e||^2 = e^T G0 e with e = g - (G0 + lam I) alpha, den = ||J^T g||^2. A NaN/Inf
    alpha makes the residual NaN, which fails the acceptance test."""
    e = torch.addmv(g, G0, alpha, alpha=-1).sub_(lam * alpha)
    num = e @ (G0 @ e)
    den = g @ (G0 @ g)
    return SolveFacts(num, den, factored, torch.aminmax(G0), torch.as_tensor(lam))


def primal_check(A0: torch.Tensor, rhs: torch.Tensor, delta: torch.Tensor, lam: Ridge, factored: Factored
                 ) -> SolveFacts:
    """The facts of a primal solve (A0 + lam I) delta = rhs, A0 = J^T J: num = ||res||^2, den = ||rhs||^2
    and ||delta||^2, with which :func:`accept` bounds the error itself: ||delta - delta*|| <= ||res|| / lam
    (A0 is PSD). The residual alone would miss a component in the null space of J (rank-deficient J,
    tiny damping), which the dual form cannot produce (its step is J^T alpha)."""
    res = torch.addmv(rhs, A0, delta, alpha=-1).sub_(lam * delta)
    return SolveFacts(res @ res, rhs @ rhs, factored, torch.aminmax(A0), torch.as_tensor(lam), delta @ delta)


class Accepted(NamedTuple):
    """What :func:`accept` read: the conversations to redo in float64, and every conversation's residual
    numerator and denominator (host floats; a redo overwrites its own)."""

    rejected: List[int]
    nums: List[float]
    dens: List[float]


def accept(lin: Linearization, cfg: RosaConfig, facts: List[SolveFacts], results: Sequence[torch.Tensor]) -> Accepted:
    """Which conversations must be redone in float64, from ONE host sync for all of them (MATH.md
    section 4, "One host sync"), which also reads the inputs' pending checks (``prob.pending``, raised
    first), whether the pass's logits were finite, every ridge in range (:func:`ridge_in_range`'s rule)
    and the 0-dim ``results`` (min/max reductions of the step so far: finite; a rejected conversation's
    float64 redo is checked on its own). Raises for bad inputs, non-finite logits or Jacobian, a step
    below the dtype's range, or a non-finite step of an accepted solve."""
    prob = lin.prob
    cd = prob.compute_dtype
    limit = DUAL_RESIDUAL_LIMIT[cd]
    pending = prob.pending.tensors() if prob.pending is not None else []
    per = [[f.num, f.den, *f.factored, *f.system, f.lam] + ([] if f.step_sq is None else [f.step_sq]) for f in facts]
    flags = lin.finite_flags()
    v = checks.read_host(pending + [x for p in per for x in p] + list(results) + [flags])  # the one sync
    k = prob.pending.verdict(v) if prob.pending is not None else 0
    rows = []
    for p in per:
        rows.append(v[k:k + len(p)])
        k += len(p)
    res_vals, flag_vals = v[k:k + len(results)], v[k + len(results):]
    if not all(flag_vals):
        checks.nonfinite_logits(WHO, cd)
    nums, dens, good, system_finite = [], [], [], []
    zero_checked = False  # the zero-Jacobian checks cover every conversation: run them once at most
    for f, r in zip(facts, rows):
        num, den, info, dmin, dmax, smin, smax, lam = r[:8]
        if lam > 0.01 / torch.finfo(cd).tiny:  # ridge_in_range's rule
            raise_step_underflow(prob, cfg)
        num, den = max(num, 0.0), max(den, 0.0)  # NaN stays NaN: max(nan, 0) is nan
        ok = well_factored(info, dmin, dmax, cd) and num <= limit * limit * den
        if f.step_sq is not None:
            ok = ok and num <= (limit * limit) * (lam * lam) * r[8]
        nums.append(num)
        dens.append(den)
        good.append(ok)
        system_finite.append(checks.minmax_finite(smin, smax))
        if smin == 0 and smax == 0 and prob.pending is not None and not zero_checked:
            prob.pending.check_zero_jacobian()  # J exactly zero: a dead LoRA is the inputs' fault (checks all)
            zero_checked = True
    if not all(math.isfinite(x) for x in res_vals) and all(good):
        checks.finite_result(WHO, torch.full((1,), float("nan")), cfg.damping)
    if not all(system_finite):
        checks.nonfinite_jacobian(WHO, mode=cfg.mode, lora_scale=prob.lora_scale, dtype=cd)
    return Accepted([b for b, ok in enumerate(good) if not ok], nums, dens)


def raise_step_underflow(prob: HeadProblem, cfg: RosaConfig) -> None:
    """The error of :func:`ridge_in_range`."""
    checks.fail(WHO, "targets", f"every response token of a conversation is so confident (or so unlikely) that its "
                                f"row of J ~ p (1 - p) is far below the absolute damping={cfg.damping:g}: the step "
                                f"~ J^T g / damping is below {prob.compute_dtype}'s range; pass float64 inputs, or use "
                                "damping_mode='relative' (scale free)", checks.RosaNumericalError)


def check_linearization(lin: Linearization, cfg: RosaConfig, lam: torch.Tensor) -> None:
    """For the CG plans (the dual folds these into :func:`accept`'s one sync): raise for bad inputs (the
    pending checks, ``prob.pending``), logits that overflowed or a ridge out of range (one host read)."""
    pending = lin.prob.pending
    vals = checks.read_host((pending.tensors(with_zero_jacobian=True) if pending is not None else [])
                            + [lin.logits_finite(), ridge_in_range(lam)])
    k = pending.verdict(vals) if pending is not None else 0
    finite, in_range = vals[k:]
    if not finite:
        checks.nonfinite_logits(WHO, lin.prob.compute_dtype)
    if not in_range:
        raise_step_underflow(lin.prob, cfg)


def float64_refinement(cfg: RosaConfig, rejected: List[int], solve64: Callable[[int], torch.Tensor]
                       ) -> Iterator[Tuple[int, torch.Tensor]]:
    """The one float64 refinement loop of the exact plans: (b, x) for every conversation b that
    :func:`accept` rejected, x = ``solve64(b)`` (its float64 solve), checked finite."""
    for b in rejected:
        x = solve64(b)
        if not bool(torch.isfinite(x).all()):
            raise not_finite(cfg)
        yield b, x


def float64_problem(prob: HeadProblem, b: int) -> HeadProblem:
    """Conversation ``b`` of ``prob`` as a float64 problem of its own (MATH.md section 4): the same
    inputs (views of hidden and weight, which the engines cast tile by tile), the compute dtype float64.
    Rejected conversations of a float32 solve are redone from it: a rejection means eps_32 cond(J J^T +
    lambda I) > :data:`CONDITION_LIMIT` (or a residual over its limit), and then the float32 rounding
    of J itself -- not only of J J^T -- moves the step by up to that much (damping 1e-10: 0.3-98% off
    when solved in float64 from the float32 J)."""
    sub = prob.conversations(b, b + 1)
    f64 = torch.float64

    def up(x: Optional[torch.Tensor]) -> Optional[torch.Tensor]:
        return None if x is None else x.to(f64)

    return replace(sub, compute_dtype=f64, reward=up(sub.reward), lora_a=up(sub.lora_a), lora_b=up(sub.lora_b),
                   pending=None)  # the inputs passed their checks


def not_finite(cfg: RosaConfig) -> RosaNumericalError:
    """The error of a fallback that still gave NaN/Inf."""
    return RosaNumericalError(f"rosa_update: the dual solve gave NaN/Inf even in float64 (damping="
                              f"{cfg.damping:g}); check the scale of the inputs", "damping")


def run_cg(cg: CGImpl, matvec, rhs: torch.Tensor, prob: HeadProblem, cfg: RosaConfig) -> CGResult:
    """``cg`` on A x = rhs (each conversation's ridge inside the matvec); NaN/Inf in the right-hand side
    J^T g is the inputs' fault."""
    named = dict(mode=cfg.mode, lora_scale=prob.lora_scale, dtype=prob.compute_dtype)
    try:
        return cg(matvec, rhs, damping=0.0, max_iter=cfg.max_iter, tol=cfg.tol)
    except RosaNonFiniteError as e:
        if e.argument != "b":
            raise
        checks.nonfinite_jacobian(WHO, **named)  # the right-hand side J^T g: the inputs, not the solve
    except RosaNumericalError as e:
        if e.argument != "matvec" or "breakdown" in str(e):
            raise
        checks.nonfinite_jacobian(WHO, **named)  # NaN/Inf from J^T J v: the Jacobian's scale, not CG


def _kept(mu: torch.Tensor, noise: float, lam: float) -> torch.Tensor:
    """Which eigenvalues ``mu`` (of J J^T, float64) a fallback keeps: those above ``noise`` (the compute
    dtype's rounding of mu, in mu's units), and every one when the ridge is at least that noise level --
    then 1 / (mu + lambda) is bounded and dropping a direction would drop its part of g."""
    if lam >= noise:
        return torch.ones_like(mu, dtype=torch.bool)
    return mu > noise


def spectral_hidden(Jb: torch.Tensor, gb: torch.Tensor, lam: float, eps: float) -> Tuple[torch.Tensor, float, float]:
    """Hidden mode's float64 fallback (MATH.md section 4): from the SVD J = U diag(s) V^T,
    alpha = U diag(1 / (s^2 + lambda)) U^T g and delta = J^T alpha (directions below the compute
    dtype's noise dropped unless the ridge dominates them, :func:`_kept`). J's rounding moves a singular
    value by at most ||dJ||_2 <= n eps s_max (n = the larger side), so the noise in s^2 is
    (n eps s_max)^2 -- far below the Gram's n eps s_max^2: a small but real direction of a nearly
    rank-deficient J is kept (damping 1e-10, s from 1.2e-3 to 3.2: within 2e-6 of float64, where the
    Gram's noise level dropped it and the step was 97% off).
    Returns (delta float64, ||J^T e||^2, ||J^T g||^2)."""
    J64, g64 = Jb.to(torch.float64), gb.to(torch.float64)
    U, S, _ = torch.linalg.svd(J64, full_matrices=False)
    mu = S ** 2
    keep = _kept(mu, (max(J64.shape) * eps * float(S.max())) ** 2, lam)
    U, mu = U[:, keep], mu[keep]
    alpha = U @ ((U.T @ g64) / (mu + lam))
    e = g64 - J64 @ (J64.T @ alpha) - lam * alpha
    return J64.T @ alpha, float((J64.T @ e).square().sum()), float((J64.T @ g64).square().sum())


def spectral_gram(G0: torch.Tensor, gb: torch.Tensor, lam: float, eps: float) -> torch.Tensor:
    """LoRA mode's float64 fallback: from the eigendecomposition of J J^T (negative rounding noise
    clamped to 0; directions below the compute dtype's noise dropped unless the ridge dominates them,
    :func:`_kept`), alpha = U diag(1 / (mu + lambda)) U^T g -> alpha (float64)."""
    mu, U = torch.linalg.eigh(G0.to(torch.float64))
    mu = mu.clamp_min(0)
    keep = _kept(mu, G0.shape[0] * eps * float(mu.max()), lam)  # G0 was formed in the compute dtype
    U, mu = U[:, keep], mu[keep]
    return U @ ((U.T @ gb.to(torch.float64)) / (mu + lam))


def relative_residual(nums: Sequence[float], dens: Sequence[float]) -> float:
    """sqrt(sum nums / sum dens), 0 where the denominator is 0 (host floats, as :func:`accept` read them)."""
    num, den = sum(nums), sum(dens)
    return math.sqrt(num / den) if den > 0 else 0.0


# ----------------------------------------------------------------------------- a padded batch of conversations
def padded_groups(lengths: Sequence[int], convs: Optional[Sequence[int]] = None) -> List[List[int]]:
    """The conversations ``convs`` (default: all) of the given ``lengths`` in groups for :class:`Padding`: by
    length, longest first, each group as large as ``defaults.PAD_WASTE`` allows (B_g Tm_g^2 <= PAD_WASTE sum_g T_b^2),
    so that padding never more than doubles the memory of the T x T algebra, and at most
    ``defaults.PAD_MAX_NUMBERS`` numbers unless it is one conversation (long conversations alone, as a loop would
    solve them). One group when the lengths are equal (or close) and short; within a group the conversations keep
    their order (:func:`rosa_ext.common.defaults.one_padded_batch` is the one-group rule)."""
    convs = list(range(len(lengths))) if convs is None else list(convs)
    groups: List[List[int]] = []
    own = 0  # sum of T_b^2 over the open group
    for b in sorted(convs, key=lambda c: -int(lengths[c])):
        sq = int(lengths[b]) ** 2
        if groups:
            g = groups[-1]
            size = (len(g) + 1) * int(lengths[g[0]]) ** 2
            if size <= defaults.PAD_WASTE * (own + sq) and size <= defaults.PAD_MAX_NUMBERS:
                g.append(b)
                own += sq
                continue
        groups.append([b])
        own = sq
    return [sorted(g) for g in groups]


def padded_sizes(lengths: Sequence[int], convs: Optional[Sequence[int]] = None, cap: Optional[int] = None) -> List[int]:
    """Numbers of each group's padded (B_g, Tm_g, Tm_g) batch (:func:`padded_groups`; Tm_g capped at ``cap``)."""
    out = []
    for g in padded_groups(lengths, convs):
        tm = max(int(lengths[b]) for b in g)
        tm = tm if cap is None else min(tm, cap)
        out.append(len(g) * tm * tm)
    return out


class Padding:
    """The layout of conversations ``convs`` of ``prob`` (default: all) as a padded batch: ``B`` of them, ``Tm``
    (the longest), ``lengths``; ``view`` when they are all of ``prob``'s conversations, each of Tm tokens (the
    batch is then a view of the packed rows)."""

    def __init__(self, prob: HeadProblem, convs: Optional[Sequence[int]] = None) -> None:
        self.prob = prob
        self.convs = list(range(prob.num_conversations)) if convs is None else [int(b) for b in convs]
        self.B = len(self.convs)
        self.lengths = [int(prob.lengths[b]) for b in self.convs]
        self.Tm = max(self.lengths)
        self.whole = self.convs == list(range(prob.num_conversations))  # every conversation, in order
        self.view = self.whole and all(n == self.Tm for n in self.lengths)
        self.equal = all(n == self.Tm for n in self.lengths)
        self._index: Optional[torch.Tensor] = None
        self._convs: Optional[torch.Tensor] = None

    def _rows(self, device: torch.device) -> torch.Tensor:
        """(3, n) int64 (host-built, sent non_blocking): each token's row in the packed problem, its index in
        the batch and its position in its conversation, for the tokens of ``convs`` in order."""
        if self._index is None:
            off = self.prob.offsets
            cols = [torch.stack([torch.arange(off[b], off[b + 1]), torch.full((n,), k), torch.arange(n)])
                    for k, (b, n) in enumerate(zip(self.convs, self.lengths))]
            self._index = torch.cat(cols, 1).to(device, non_blocking=True)
        return self._index

    def token_rows(self, device: torch.device) -> torch.Tensor:
        """(n,) int64: the packed rows of the tokens of ``convs``, in the order of :meth:`unpad`."""
        return self._rows(device)[0]

    def pad(self, x: torch.Tensor) -> torch.Tensor:
        """(N, ...) packed rows of the whole problem -> (B, Tm, ...) of ``convs``, zeros on the padding."""
        if self.view:
            return x.reshape(self.B, self.Tm, *x.shape[1:])
        rows, k, pos = self._rows(x.device)
        out = x.new_zeros(self.B, self.Tm, *x.shape[1:])
        out[k, pos] = x if self.whole else x[rows]
        return out

    def unpad(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Tm, ...) -> (n, ...) packed rows of the tokens of ``convs``."""
        if self.view:
            return x.reshape(self.B * self.Tm, *x.shape[2:])
        _, k, pos = self._rows(x.device)
        return x[k, pos]

    def conv_index(self, device: torch.device) -> torch.Tensor:
        """(B,) int64 ``convs`` on the device (host-built, sent non_blocking: a list index would copy blocking)."""
        if self._convs is None:
            self._convs = torch.tensor(self.convs).to(device, non_blocking=True)
        return self._convs

    def select(self, x: torch.Tensor) -> torch.Tensor:
        """(prob.num_conversations, ...) -> (B, ...): the rows of ``convs``."""
        return x if self.whole else x.index_select(0, self.conv_index(x.device))

    def scatter(self, out: torch.Tensor, x: torch.Tensor) -> None:
        """out[convs] = x for ``out`` (prob.num_conversations, ...) and x (B, ...), in place."""
        if self.whole:
            out.copy_(x)
        else:
            out.index_copy_(0, self.conv_index(x.device), x)

    def pad_matrices(self, mats: Sequence[torch.Tensor], padded: Optional[torch.Tensor] = None) -> torch.Tensor:
        """The (T_b, T_b) matrices as one (B, Tm, Tm) batch: ``padded`` itself when given (an engine wrote them
        into it), else a copy (zeros on the padding)."""
        if padded is not None:
            return padded
        if len(mats) == 1:
            return mats[0].unsqueeze(0)
        if self.equal:
            return torch.stack(list(mats))
        out = mats[0].new_zeros(self.B, self.Tm, self.Tm)
        for b, m in enumerate(mats):
            out[b, :m.shape[0], :m.shape[1]] = m
        return out

    def token_mean(self, x: torch.Tensor) -> torch.Tensor:
        """(B, Tm) with zeros on the padding -> (B,), each conversation's mean over its own tokens."""
        if self.equal:
            return x.mean(1)
        counts = torch.tensor(self.lengths, dtype=x.dtype).to(x.device, non_blocking=True)
        return x.sum(1) / counts

    def fill_pad_diagonal(self, A: torch.Tensor) -> None:
        """The padded diagonal of ``A`` (B, Tm, Tm) := its first diagonal entry, per conversation, in place
        (module doc); nothing to do without padding."""
        if self.equal:
            return
        diag = A.diagonal(dim1=1, dim2=2)
        real = (torch.arange(self.Tm) < torch.tensor(self.lengths).unsqueeze(1)).to(A.device, non_blocking=True)
        diag.copy_(torch.where(real, diag, diag[:, :1]))


def primal_checks(A0: torch.Tensor, rhs: torch.Tensor, delta: torch.Tensor, lam: torch.Tensor,
                  factored: Factored) -> List[SolveFacts]:
    """:func:`primal_check` of each conversation of a batch (A0 (B, d, d), rhs and delta (B, d), lam (B,)) ->
    one SolveFacts of 0-dim views per conversation; one conversation: the unbatched check itself."""
    B = A0.shape[0]
    if B == 1:
        return [primal_check(A0[0], rhs[0], delta[0], lam[0], Factored(*(x[0] for x in factored)))]
    res = torch.baddbmm(rhs.unsqueeze(2), A0, delta.unsqueeze(2), alpha=-1).squeeze(2).sub_(lam.unsqueeze(1) * delta)
    v = torch.stack([res, rhs, delta], 1)  # (B, 3, d)
    sq = (v * v).sum(2)  # ||res||^2, ||rhs||^2, ||delta||^2
    smin, smax = torch.aminmax(A0.flatten(1), dim=1)
    info, dmin, dmax = factored
    return [SolveFacts(sq[b, 0], sq[b, 1], Factored(info[b], dmin[b], dmax[b]), (smin[b], smax[b]), lam[b], sq[b, 2])
            for b in range(B)]


def dual_checks(G0: torch.Tensor, g: torch.Tensor, alpha: torch.Tensor, lam: torch.Tensor,
                factored: Factored) -> List[SolveFacts]:
    """:func:`dual_check` of each conversation of a padded batch (G0 (B, Tm, Tm), g and
    alpha (B, Tm), lam (B,), ``factored`` of (B,) tensors) -> one SolveFacts of 0-dim views per conversation.
    The padding adds nothing: its rows of G0 are zero off the diagonal and alpha, g are zero there."""
    B = G0.shape[0]
    if B == 1:
        return [dual_check(G0[0], g[0], alpha[0], lam[0], Factored(*(x[0] for x in factored)))]
    e = torch.baddbmm(g.unsqueeze(2), G0, alpha.unsqueeze(2), alpha=-1).squeeze(2).sub_(lam.unsqueeze(1) * alpha)
    eg = torch.stack([e, g], 2)  # (B, Tm, 2)
    nd = (eg * torch.bmm(G0, eg)).sum(1)  # (B, 2): e^T G0 e, g^T G0 g
    smin, smax = torch.aminmax(G0.flatten(1), dim=1)
    info, dmin, dmax = factored
    return [SolveFacts(nd[b, 0], nd[b, 1], Factored(info[b], dmin[b], dmax[b]), (smin[b], smax[b]), lam[b])
            for b in range(B)]
