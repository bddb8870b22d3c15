"""The layout of the probability tiles in memory, and the combine of a launch's partials (MATH.md section 4).

:func:`rosa_ext.kernels.prob_tiles.prob_tiles_from_tensors` writes the tiles of N tokens and V vocabulary
entries in one storage precision (:data:`PRECISIONS`) and, per vocabulary split and token, six partial sums;
this module holds what reads that output without Triton: :class:`ProbTiles` (the tiles, their per-token
statistics and the per-split scales of a one-pass launch), the views that cut a (N, V) or (V, k) operand at
the vocabulary splits (the K-split of :mod:`.tile_gemms`), the output buffers of a launch, and
:func:`combine_partials`, the online-softmax combine of the per-split partials into per-token statistics.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Optional, Tuple

import torch

from ..common.jacobian import split_logits
from ..common.validation import RosaInputError

#: Storage precisions of P (module docstring); "bf16x2" is the hi/lo split.
PRECISIONS = ("fp32", "bf16x2", "bf16")
_OUT_MODE = {"fp32": 0, "bf16x2": 1, "bf16": 2}


@dataclass
class ProbTiles:
    """The off-target probabilities of a packed problem and their row sums (module docstring).

    *The tiles* are the stored tiles times ``split_scale`` (when set), one of two normalisations:

    - ``off_target`` False (a given lse, the FIXED_REF launch): P, pi_t's off-target entries
      ``exp(z - lse)`` (target entries 0; each row sums to 1 - p_t);
    - ``off_target`` True (the one pass): r̂_t, the softmax of the OTHER logits ``exp(z - lse_off)``
      (target entries 0; each row sums to 1), of order one however confident or unlikely the token
      (MATH.md section 4). pi_t's off-target entries are ``(1 - p_t) r̂_t`` (:meth:`pi_factor`).

    Fields:

    - ``precision``: "fp32", "bf16x2" or "bf16" (:data:`PRECISIONS`)
    - ``p``: (N, V) fp32 stored tiles ("fp32"), else None
    - ``hi``, ``lo``: (N, V) bf16 parts ("bf16x2": both, stored ~= hi + lo; "bf16": ``hi`` only), else None
    - ``q`` (N,) fp32: 1 - p_t (P's row sum; for off-target tiles exp(log(1 - p_t)) from logit(p_t) =
      z_y - lse_off: exact, though it underflows fp32 where 1 - p_t does -- use ``lse_off`` then)
    - ``pt`` (N,) fp32: the target probability p_t (0 for a target outside [0, V))
    - ``rb`` (N,) fp32: (tile row) . b_seg -- P_t . b, or r̂_t . b for off-target tiles -- or None
      without a LoRA term
    - ``ss`` (N,) fp32: (tile row) . (tile row) -- P_t . P_t, or r̂_t . r̂_t
    - ``split_scale`` (S, N) fp32 or None: the stored tiles of a one-pass launch are relative to a
      reference per (vocabulary split, token): ``tiles[t, v] = stored[t, v] * split_scale[v // split_width, t]``.
      None: the stored tiles are the tiles themselves
    - ``split_width``: the width of the vocabulary splits (the last may be narrower; 0: one split of
      all V columns): the K-split of every GEMM over the tiles (:mod:`.tile_gemms`)
    - ``lse`` (N,) fp32: the log-sum-exp of the logits (given, or computed by the pass), or None
    - ``target_logit`` (N,) fp32: z_t[y_t] from the one pass (-inf for a target outside [0, V): nothing
      split off), or None (a given lse)
    - ``off_target``: the normalisation above
    - ``lse_off`` (N,) fp32: the log-sum-exp of the other logits (z_t without its target entry), the
      one pass's; None for a given lse
    - ``logp``, ``logq`` (N,) fp32: log p_t and log(1 - p_t) from logit(p_t) = z_y - lse_off, exact however
      large |z_y - lse_off| (the one pass's; None for a given lse)

    Rows may be strided views of a larger buffer (``out=`` of :func:`prob_tiles_from_tensors`).
    """

    precision: str
    p: Optional[torch.Tensor]
    hi: Optional[torch.Tensor]
    lo: Optional[torch.Tensor]
    q: torch.Tensor
    pt: torch.Tensor
    rb: Optional[torch.Tensor]
    ss: torch.Tensor
    split_scale: Optional[torch.Tensor] = None
    split_width: int = 0
    lse: Optional[torch.Tensor] = None
    target_logit: Optional[torch.Tensor] = None
    off_target: bool = False
    lse_off: Optional[torch.Tensor] = None
    logp: Optional[torch.Tensor] = None
    logq: Optional[torch.Tensor] = None

    @property
    def shape(self) -> torch.Size:
        return (self.p if self.p is not None else self.hi).shape

    def width(self) -> int:
        """The split width (``split_width``, or V for one split)."""
        return self.split_width or int(self.shape[1])

    def pi_factor(self) -> Optional[torch.Tensor]:
        """(N,) fp32 c_t with pi_t's off-target entries = c_t x (tile row t): ``q`` (= 1 - p_t) for
        off-target tiles, None (c = 1) for P. The pi-form products of :mod:`.tile_gemms` apply it."""
        return self.q if self.off_target else None

    def stored(self) -> torch.Tensor:
        """The stored tiles as one (N, V) fp32 tensor (``p``; hi + lo, or hi, widened), before ``split_scale``."""
        if self.p is not None:
            return self.p
        return self.hi.float() if self.lo is None else self.hi.float() + self.lo.float()

    def column_scale(self) -> Optional[torch.Tensor]:
        """(N, V) fp32: ``split_scale`` of each entry's split, or None (allocates N V numbers: tests, small N)."""
        if self.split_scale is None:
            return None
        return self.split_scale.T.repeat_interleave(self.width(), 1)[:, : self.shape[1]]

    def dense(self) -> torch.Tensor:
        """The tiles (P, or r̂ for off-target tiles) as one (N, V) fp32 tensor (the stored one for unscaled
        "fp32" tiles; widened and scaled otherwise)."""
        x = self.stored()
        return x if self.split_scale is None else x * self.column_scale()

    def rows(self, r0: int, r1: int) -> "ProbTiles":
        """The tiles of tokens [r0, r1) (views, no copy)."""
        def cut(x):
            return None if x is None else x[r0:r1]
        sc = None if self.split_scale is None else self.split_scale[:, r0:r1]
        return ProbTiles(self.precision, cut(self.p), cut(self.hi), cut(self.lo), cut(self.q), cut(self.pt),
                         cut(self.rb), cut(self.ss), sc, self.split_width, cut(self.lse), cut(self.target_logit),
                         self.off_target, cut(self.lse_off), cut(self.logp), cut(self.logq))

    def normalize_(self, pi: bool = False) -> "ProbTiles":
        """Apply ``split_scale`` to the stored tiles in place (then None) -> self: one elementwise pass over
        the tiles (bf16 parts: hi + lo widened, scaled and split again, so hi + lo is within 2^-15 of the
        tiles instead of 2^-16). ``pi``: off-target tiles become P as well (times 1 - p_t, :meth:`pi_factor`;
        ``rb`` and ``ss`` follow, ``off_target`` False) -- entries of a token whose 1 - p_t is below fp32's
        range then underflow, as P's do. For callers that read the tiles themselves; the GEMMs of
        :mod:`.tile_gemms` apply the scales instead."""
        c = self.pi_factor() if pi else None
        sc = self.split_scale
        if c is not None:
            sc = (torch.ones(1, c.shape[0], dtype=torch.float32, device=c.device) if sc is None else sc) * c
        if sc is None:
            return self
        parts = [self.p] if self.p is not None else [self.hi] + ([self.lo] if self.lo is not None else [])
        width = self.width() if self.split_scale is not None else int(self.shape[1])
        views = [split_views(x, width) for x in parts]
        for k in range(2):  # the full splits (one batched op), then the last, narrower one
            blocks = [v[k] for v in views]
            if blocks[0] is None:
                continue
            s = sc[: blocks[0].shape[0]].unsqueeze(2) if k == 0 else sc[-1].unsqueeze(1)
            if self.p is not None:
                blocks[0].mul_(s)
                continue
            x = blocks[0].float() if len(blocks) == 1 else blocks[0].float() + blocks[1].float()
            x.mul_(s)
            hi = x.to(torch.bfloat16)
            blocks[0].copy_(hi)
            if len(blocks) == 2:
                blocks[1].copy_((x - hi.float()).to(torch.bfloat16))
        self.split_scale = None
        if c is not None:
            self.rb = None if self.rb is None else self.rb * c
            self.ss = self.ss * c * c
            self.off_target = False
        return self


def split_views(x: torch.Tensor, width: int) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """A (R, V) tensor with unit column stride cut at the vocabulary splits -> (full, tail): ``full``
    (nf, R, width) the nf = V // width full splits (a view; None if nf = 0), ``tail`` (R, V - nf width)
    the last, narrower split (a view; None if empty)."""
    R, V = x.shape
    nf = V // width
    full = x.as_strided((nf, R, width), (width, x.stride(0), 1), x.storage_offset()) if nf else None
    tail = x[:, nf * width:] if nf * width < V else None
    return full, tail


def split_row_views(x: torch.Tensor, width: int) -> Tuple[Optional[torch.Tensor], Optional[torch.Tensor]]:
    """A (V, k) operand cut at the vocabulary splits -> (full (nf, width, k) view or None, tail view or None)."""
    V, k = x.shape
    nf = V // width
    full = x.as_strided((nf, width, k), (width * x.stride(0), x.stride(0), x.stride(1)), x.storage_offset()) \
        if nf else None
    tail = x[nf * width:] if nf * width < V else None
    return full, tail


def check_precision(who: str, precision: str) -> int:
    """The kernel's OUT_MODE of a storage precision; a named error for an unknown one."""
    if precision not in _OUT_MODE:
        raise RosaInputError(f"{who}: precision must be one of {PRECISIONS}, got {precision!r}", "precision")
    return _OUT_MODE[precision]


def tile_buffers(N: int, V: int, precision: str, device: torch.device):
    """(p, lo) output buffers of :func:`prob_tiles_from_tensors` for N tokens: (N, V) fp32 and None,
    or (N, V) bf16 hi and lo (lo None for "bf16"). Allocate once and pass as ``out=`` to reuse."""
    mode = check_precision("rosa_ext.kernels.prob_tiles", precision)
    if mode == 0:
        return torch.empty(N, V, dtype=torch.float32, device=device), None
    hi = torch.empty(N, V, dtype=torch.bfloat16, device=device)
    return hi, (torch.empty_like(hi) if mode == 1 else None)


def combine_partials(part: torch.Tensor, lse: Optional[torch.Tensor]):
    """The per-(split, token) partials (6, S, N) of a launch -> (lse, lse_off, split_scale, q, pt, rb, ss,
    target_logit, log p, log(1 - p)), the per-token ones (N,) fp32 over the whole vocabulary (lse_off,
    split_scale, target_logit, log p and log(1 - p) None for a given lse).

    With ``lse`` given (a FIXED_REF launch) the tiles are P already: the partials are summed. Otherwise
    (the one pass, whose sums are of the off-target entries only), with ``ref_s`` the references,
    M = max_s ref_s and w_s = exp(ref_s - M) <= 1: lse_off = M + log sum_s w_s q_s, ``split_scale`` =
    exp(ref_s - lse_off) (the tiles become r̂), r̂ . b and r̂ . r̂ as sum_s scale_s x_s (ss: sum_s scale_s
    (scale_s ss_s), whose intermediate cannot underflow first), the target logit z_y the maximum over the
    splits (only the owner's is finite), and lse, log p, log(1 - p) from logit(p) = z_y - lse_off
    (:func:`rosa_ext.common.jacobian.split_logits`); q = 1 - p and pt = p their exponentials. (The one pass
    of :func:`~rosa_ext.kernels.prob_tiles.prob_tiles_from_tensors` runs these formulas as one Triton launch,
    :func:`rosa_ext.kernels.epilogue.combine_partials_fused`; this is their torch form.)"""
    ref, zy = part[0], part[5]
    if lse is not None:
        vals = part[1:5]  # q, pt, rb, ss
        q, pt, rb, ss = (vals[:, 0] if vals.shape[1] == 1 else vals.sum(1)).unbind(0)
        return lse, None, None, q, pt, rb, ss, None, None, None
    big = torch.finfo(torch.float32).max
    M = ref.amax(0).clamp_(-big, big)  # no other finite logit: w = 0 and lse_off = -inf; NaN stays NaN
    w = torch.exp(ref - M)
    lse_off = M + torch.log((w * part[1]).sum(0))
    # a token with no other finite logit: nothing stored (zeros), scale 0 (not exp(-inf + inf))
    scale = torch.where(lse_off == float("-inf"), torch.zeros((), device=ref.device), torch.exp(ref - lse_off))
    vals = part[3:5] * scale  # rb, ss (a slice: a list index would be a host-to-device copy)
    vals[1].mul_(scale)
    rb, ss = vals.sum(1).unbind(0)
    z_y = zy.amax(0)
    lse_, logp, logq = split_logits(z_y, lse_off)
    return lse_, lse_off, scale, torch.exp(logq), torch.exp(logp), rb, ss, z_y, logp, logq
