"""Shared data types: the packed problem, the results of the engines' passes, the CG result.

``HeadProblem`` is what the core op builds from user inputs (``rosa_ext.core.op.build_problem``)
and what the engines and the plans consume; ``HeadStats``, ``HiddenPass`` and ``GramPass`` are the
results of an engine's passes (MATH.md sections 3-4; the engine protocol:
:mod:`rosa_ext.backends.protocol`); ``CGResult`` is what every CG implementation returns.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, List, Optional, Sequence, Union

import torch

# the option values and the compute-dtype rule live with the options (re-exported for their importers)
from .config import BACKENDS, DAMPING_MODES, MODES, SOLVERS, compute_dtype_of  # noqa: F401

#: A reward: one number, or one per conversation of a batch.
RewardLike = Union[float, int, Sequence[float], torch.Tensor]

#: A CG operator: v (n,) -> A v (n,), same dtype and device as v.
Matvec = Callable[[torch.Tensor], torch.Tensor]


@dataclass(frozen=True)
class VocabShard:
    """This process's rows of a vocabulary-parallel lm_head (MATH.md section 7).

    - ``start``: the first global vocabulary row held here; the rows are ``[start, start + rows)``
    - ``rows``: V_local, the number of rows held here (>= 1)
    - ``vocab_size``: V, the whole vocabulary (the shards of the group tile ``[0, V)``)
    - ``rank``, ``world_size``: this process's rank in the group and the group's size
    - ``comm``: what carries the collectives (opaque here: a
      :class:`rosa_ext.backends.distributed.VocabComm`)
    """

    start: int
    rows: int
    vocab_size: int
    rank: int
    world_size: int
    comm: Any = field(default=None, compare=False, repr=False)


@dataclass
class HeadProblem:
    """The data of one (possibly batched) update, checked and packed: tensors and their layout only
    (the options -- mode, damping, solver, ... -- are the :class:`~rosa_ext.common.config.RosaConfig`).

    Shapes (N = packed response tokens, B = conversations, d = hidden size,
    V = vocabulary size):

    - ``hidden``  (N, d) model dtype, lm_head inputs of the response positions
    - ``weight``  (V, d) model dtype, lm_head weight (never modified)
    - ``bias``    (V,) or None
    - ``targets`` (N,) int64, observed response tokens
    - ``seg``     (N,) int64, conversation index of each row (sorted)
    - ``offsets`` list of B+1 ints, rows of conversation b are offsets[b]:offsets[b+1];
      ``lengths`` the B ints offsets[b+1] - offsets[b]
    - ``reward``  (B,) compute dtype
    - ``lora_a``  (B, d) compute dtype or None; ``lora_b`` (B, V) or None; ``lora_scale`` s, the
      LoRA term ``s (a . h) b`` of the logits
    - ``batched`` whether the caller passed (B, T, ...) inputs
    - ``compute_dtype`` float64 if the model is float64, else float32
    - ``num_tokens`` N, ``num_conversations`` B, ``hidden_size`` d, ``vocab_size`` V (plain ints, set
      when the problem is packed: :func:`pack_layout`)
    - ``shard`` None (this process holds the whole vocabulary), or this rank's
      :class:`VocabShard` of a vocabulary-parallel head: then ``weight``, ``bias`` and ``lora_b``
      hold the local rows (V = V_local above) and ``targets`` stay global token ids;
      ``global_vocab_size`` is the V of the whole head either way
    - ``pending`` the input checks that read values, not read yet
      (:class:`~rosa_ext.common.validation.PendingChecks`): the plan reads them in its first host sync
      (``targets`` are then clamped into [0, V) so that nothing indexes out of range before); None when
      the inputs were checked already
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    targets: torch.Tensor
    seg: torch.Tensor
    offsets: List[int]
    lengths: List[int]
    reward: torch.Tensor
    lora_a: Optional[torch.Tensor]
    lora_b: Optional[torch.Tensor]
    lora_scale: float
    batched: bool
    compute_dtype: torch.dtype
    num_tokens: int
    num_conversations: int
    hidden_size: int
    vocab_size: int
    global_vocab_size: int
    shard: Optional[VocabShard] = None
    pending: Any = None

    def conversations(self, b0: int, b1: int) -> "HeadProblem":
        """Conversations ``b0 .. b1 - 1`` as a problem of their own (views, no copy)."""
        if b0 == 0 and b1 == self.num_conversations:
            return self
        off = self.offsets
        lo, hi = off[b0], off[b1]
        return replace(self, hidden=self.hidden[lo:hi], targets=self.targets[lo:hi], seg=self.seg[lo:hi] - b0,
                       offsets=[o - lo for o in off[b0:b1 + 1]], lengths=self.lengths[b0:b1],
                       reward=self.reward[b0:b1], lora_a=None if self.lora_a is None else self.lora_a[b0:b1],
                       lora_b=None if self.lora_b is None else self.lora_b[b0:b1], num_tokens=hi - lo,
                       num_conversations=b1 - b0)


def pack_layout(weight: torch.Tensor, offsets: Sequence[int], shard: Optional[VocabShard] = None) -> dict:
    """The layout fields of a :class:`HeadProblem` from the head weight and the conversations' row offsets
    (``HeadProblem(..., **pack_layout(weight, offsets))``)."""
    offsets = [int(o) for o in offsets]
    V = int(weight.shape[0])
    return dict(offsets=offsets, lengths=[offsets[i + 1] - offsets[i] for i in range(len(offsets) - 1)],
                num_tokens=offsets[-1], num_conversations=len(offsets) - 1, hidden_size=int(weight.shape[1]),
                vocab_size=V, global_vocab_size=V if shard is None else shard.vocab_size, shard=shard)


@dataclass
class HeadStats:
    """Per-token results of a stats pass (MATH.md section 3), compute dtype, (N,) each.

    - ``lse`` log-sum-exp of the logits z_t; ``logp`` log p_t of the observed token
    - ``ah`` a_seg . h_t, or None without LoRA; ``pib`` pi_t . b_seg, or None without LoRA
    - split off the target (MATH.md section 4; set by the engines' passes, None from the kernels'
      stats): ``lse_off`` the log-sum-exp of the OTHER logits (z_t without its target entry), ``logq``
      log(1 - p_t) (exact: ``lse_off - lse``), ``rb`` r̂_t . b_seg with r̂_t = softmax of the other logits
      (the off-target distribution, summing to 1). Then the algebra uses the off-target forms, in which
      nothing cancels or underflows when p_t -> 1 or p_t -> 0; without them the expanded forms (which
      cancel when p_t -> 1)
    - ``kept`` an engine's handle on tiles its later reductions read (the Triton engine's probability tiles)
    - ``split`` whether the pass split the target off (``lse_off``, ``logq``, ``rb`` set)
    - ``engine`` the engine that ran the pass ("torch" or "triton")
    """

    lse: torch.Tensor
    logp: torch.Tensor
    ah: Optional[torch.Tensor]
    pib: Optional[torch.Tensor]
    lse_off: Optional[torch.Tensor] = None
    logq: Optional[torch.Tensor] = None
    rb: Optional[torch.Tensor] = None
    kept: Any = None
    engine: str = "torch"
    split: bool = False


@dataclass
class HiddenPass:
    """What an engine's one-pass hidden-mode pass returns (MATH.md section 4), compute dtype.

    Everything off-target is NORMALISED: r̂_t = softmax of the logits without the target entry (it sums
    to 1), so ``rw`` and ``rb`` stay of order one however confident (or unlikely) the token; the
    Jacobian's scale p_t (1 - p_t) is carried in log space (``logp + logq``).

    - ``lse`` (N,) log-sum-exp of the logits; ``lse_off`` (N,) of the logits without the target entry
    - ``logp`` (N,) log p_t, ``logq`` (N,) log(1 - p_t), both exact (from logit(p_t) = z_y - lse_off)
    - ``ah`` (N,) a_seg . h_t, or None without a LoRA term
    - ``rb`` (N,) r̂_t . b_seg, or None without a LoRA term
    - ``rw`` (N, d) r̂_t W
    - ``engine`` the engine that ran the pass ("torch" or "triton")
    """

    lse: torch.Tensor
    lse_off: torch.Tensor
    logp: torch.Tensor
    logq: torch.Tensor
    ah: Optional[torch.Tensor]
    rb: Optional[torch.Tensor]
    rw: torch.Tensor
    engine: str = "torch"


@dataclass
class GramPass:
    """What an engine's one-pass LoRA pass returns (MATH.md section 4), compute dtype: the raw parts of
    the centred Gram of the normalised off-target distributions r̂_t, which the plan centres
    (:func:`rosa_ext.plans.dual_lora.center_gram`).

    - ``lse``, ``lse_off``, ``logp``, ``logq``, ``ah``, ``rb``, ``engine``: as :class:`HiddenPass`
    - ``gram``: one (T_b, T_b) matrix per conversation, ``r̂_t . r̂_u`` for tokens t, u of conversation b
    - ``cross``: one (T_b, T_b) matrix per conversation, ``X[t, u] = r̂_t[y_u]`` (0 where y_u = y_t: r̂_t
      has no target entry). The centred Gram ``(e_{y_t} - r̂_t) . (e_{y_u} - r̂_u) = 1(y_t = y_u) -
      X[u, t] - X[t, u] + r̂_t . r̂_u`` is assembled from them in place (e_y - pi_t = (1 - p_t)(e_y - r̂_t):
      the factors 1 - p_t are carried in log space by the plan); the plan owns these matrices
    - ``kept``: the engine's handle on the probability tiles kept for the VJP
      (:meth:`~rosa_ext.backends.protocol.Engine.off_target_vjp` reads them), or None when they
      were streamed
    - ``centered``: True when the engine centred the Gram itself (asked with ``center=True``; the Triton
      engine's kernels do it as they form it): ``gram`` is then the centred Gram and ``cross`` is empty
    - ``padded``: (B, Tm, Tm) or None: the batch the engine wrote the matrices of ``gram`` into (each a view
      ``padded[b, :T_b, :T_b]``, zeros around it), for the plan's batched algebra (:class:`rosa_ext.plans.dense.Padding`)
    """

    lse: torch.Tensor
    lse_off: torch.Tensor
    logp: torch.Tensor
    logq: torch.Tensor
    ah: Optional[torch.Tensor]
    rb: Optional[torch.Tensor]
    gram: List[torch.Tensor]
    cross: List[torch.Tensor]
    kept: Any = None
    engine: str = "torch"
    centered: bool = False
    padded: Optional[torch.Tensor] = None


@dataclass
class CGResult:
    """Result of one CG solve.

    ``x`` has the shape and dtype of ``b``. ``iterations`` and ``residual``
    (the final ||b - (A + damping I) x|| / ||b||, 0 when b = 0) may be 0-dim
    tensors on the solve's device so that reading them is the caller's choice
    (it synchronises a CUDA stream); use int()/float() to read.
    """

    x: torch.Tensor
    iterations: Union[int, torch.Tensor]
    residual: Union[float, torch.Tensor]


@dataclass
class Solved:
    """What a solve plan returns (:mod:`rosa_ext.plans`): ``update`` (B, P), per token ``logp`` and
    ``target`` (N,), CG ``iterations`` (0 for the dual), the relative ``residual`` of the normal equations
    and the ``engine`` that ran the vocabulary work ("torch" or "triton", from the pass results);
    ``finite_checked``: the plan already checked that the update is finite (within its one host sync)."""

    update: torch.Tensor
    logp: torch.Tensor
    target: torch.Tensor
    iterations: Union[int, torch.Tensor]
    residual: Union[float, torch.Tensor]
    engine: str = "torch"
    finite_checked: bool = False
