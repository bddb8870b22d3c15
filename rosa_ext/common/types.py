"""Shared data types: the packed problem, the per-token cache, the CG result.

``HeadProblem`` is what the core layer builds from user inputs (``rosa_ext.core.problem``)
and what the backends and the Jacobian algebra consume; ``HeadStats`` is a backend's
per-token cache (MATH.md section 3); ``CGResult`` is what every CG implementation returns.
"""
from __future__ import annotations

from dataclasses import dataclass, field, replace
from typing import Any, Callable, List, Optional, Sequence, Union

import torch

from .defaults import DAMPING_MODE, GRAM_BUDGET_BYTES, KEEP_BUDGET_BYTES

MODES = ("lora", "hidden")
SOLVERS = ("auto", "cg", "dual")
BACKENDS = ("auto", "torch", "triton")
#: "absolute": the ridge is ``damping``; "relative": ``damping * mean_t ||J_t||^2`` of each
#: conversation (Levenberg-Marquardt scaling, MATH.md section 6).
DAMPING_MODES = ("absolute", "relative")

#: A reward: one number, or one per conversation of a batch.
RewardLike = Union[float, int, Sequence[float], torch.Tensor]

#: A CG operator: v (n,) -> A v (n,), same dtype and device as v.
Matvec = Callable[[torch.Tensor], torch.Tensor]


def compute_dtype_of(dtype: torch.dtype) -> torch.dtype:
    """The dtype ROSA computes in for a model (head weight) of ``dtype``: float64 for float64 models,
    float32 for every other (bf16/fp16 are widened). The one place this rule is written."""
    return torch.float64 if dtype == torch.float64 else torch.float32


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
    """Packed inputs of one (possibly batched) update.

    Shapes (N = packed response tokens, B = conversations, d = hidden size,
    V = vocabulary size):

    - ``hidden``  (N, d) model dtype, lm_head inputs of the response positions
    - ``weight``  (V, d) model dtype, lm_head weight (never modified)
    - ``bias``    (V,) or None
    - ``targets`` (N,) int64, observed response tokens
    - ``seg``     (N,) int64, conversation index of each row (sorted)
    - ``offsets`` list of B+1 ints, rows of conversation b are offsets[b]:offsets[b+1]
    - ``reward``  (B,) compute dtype
    - ``lora_a``  (B, d) compute dtype or None; ``lora_b`` (B, V) or None
    - ``compute_dtype`` float64 if the model is float64, else float32
    - ``damping_mode`` how ``damping`` sets the ridge (MATH.md section 6)
    - ``keep_budget_bytes``, ``gram_budget_bytes`` the memory the dual solve may hold
      (:mod:`rosa_ext.common.defaults`)
    - ``shard`` None (this process holds the whole vocabulary), or this rank's
      :class:`VocabShard` of a vocabulary-parallel head: then ``weight``, ``bias`` and ``lora_b``
      hold the local rows (V = V_local above) and ``targets`` stay global token ids
    """

    hidden: torch.Tensor
    weight: torch.Tensor
    bias: Optional[torch.Tensor]
    targets: torch.Tensor
    seg: torch.Tensor
    offsets: List[int]
    reward: torch.Tensor
    mode: str
    lora_a: Optional[torch.Tensor]
    lora_b: Optional[torch.Tensor]
    lora_scale: float
    beta: float
    damping: float
    max_iter: int
    tol: float
    solver: str
    backend: str
    batched: bool
    compute_dtype: torch.dtype
    damping_mode: str = DAMPING_MODE
    shard: Optional[VocabShard] = None
    keep_budget_bytes: int = KEEP_BUDGET_BYTES
    gram_budget_bytes: int = GRAM_BUDGET_BYTES

    @property
    def num_tokens(self) -> int:
        return int(self.targets.shape[0])

    @property
    def num_conversations(self) -> int:
        return len(self.offsets) - 1

    @property
    def hidden_size(self) -> int:
        return int(self.weight.shape[1])

    @property
    def vocab_size(self) -> int:
        return int(self.weight.shape[0])

    @property
    def global_vocab_size(self) -> int:
        """V of the whole head: ``vocab_size``, or the global V of a vocabulary-parallel head."""
        return self.vocab_size if self.shard is None else self.shard.vocab_size

    @property
    def num_params(self) -> int:
        """Parameters moved per conversation: d + V (lora) or d (hidden); V local when sharded."""
        return self.hidden_size + (self.vocab_size if self.mode == "lora" else 0)

    @property
    def device(self) -> torch.device:
        return self.weight.device

    @property
    def lengths(self) -> List[int]:
        """Tokens of each conversation (B ints)."""
        return [self.offsets[i + 1] - self.offsets[i] for i in range(self.num_conversations)]

    @property
    def max_len(self) -> int:
        return max(self.lengths)

    def conversations(self, b0: int, b1: int) -> "HeadProblem":
        """Conversations ``b0 .. b1 - 1`` as a problem of their own (views, no copy)."""
        if b0 == 0 and b1 == self.num_conversations:
            return self
        off = self.offsets
        lo, hi = off[b0], off[b1]
        return replace(self, hidden=self.hidden[lo:hi], targets=self.targets[lo:hi], seg=self.seg[lo:hi] - b0,
                       offsets=[o - lo for o in off[b0:b1 + 1]], reward=self.reward[b0:b1],
                       lora_a=None if self.lora_a is None else self.lora_a[b0:b1],
                       lora_b=None if self.lora_b is None else self.lora_b[b0:b1])


@dataclass
class HeadStats:
    """Per-token cache of one stats pass (MATH.md section 3), compute dtype.

    - ``lse``  (N,) log-sum-exp of the logits z_t
    - ``logp`` (N,) log p_t = z_t[y_t] - lse_t
    - ``ah``   (N,) a_seg . h_t, or None without LoRA
    - ``pib``  (N,) pi_t . b_seg, or None without LoRA
    - ``q``    (N,) 1 - p_t summed over the off-target entries, or None when the pass did not split
      the target off (then the algebra uses the expanded forms, which cancel when p_t -> 1)
    - ``pib_off`` (N,) r_t . b_seg (pi_t . b without the target entry), with ``q`` and a LoRA term
    """

    lse: torch.Tensor
    logp: torch.Tensor
    ah: Optional[torch.Tensor]
    pib: Optional[torch.Tensor]
    q: Optional[torch.Tensor] = None
    pib_off: Optional[torch.Tensor] = None


@dataclass
class HiddenPass:
    """What a backend's one-pass hidden-mode primitive returns (MATH.md section 4), compute dtype.

    ``r_t`` is pi_t without its target entry (the off-target distribution): working with it keeps
    ``1 - p_t`` and J free of the cancellation of ``W[y_t] - pi_t W`` when p_t is near 1.

    - ``lse`` (N,) log-sum-exp of the logits; ``logp`` (N,) log p_t
    - ``q`` (N,) 1 - p_t = sum_{v != y_t} pi_t[v], summed directly (no cancellation)
    - ``ah`` (N,) a_seg . h_t, or None without a LoRA term
    - ``pib_off`` (N,) r_t . b_seg, or None without a LoRA term (pi_t . b = pib_off + p_t b[y_t])
    - ``pi_weight`` (N, d) r_t W = sum_{v != y_t} pi_t[v] W_v (pi_t W = pi_weight + p_t W[y_t])
    """

    lse: torch.Tensor
    logp: torch.Tensor
    q: torch.Tensor
    ah: Optional[torch.Tensor]
    pib_off: Optional[torch.Tensor]
    pi_weight: torch.Tensor


@dataclass
class GramPass:
    """What a backend's one-pass LoRA Gram primitive returns (MATH.md section 4), compute dtype.

    - ``lse``, ``logp``, ``q``, ``ah``, ``pib_off``: as :class:`HiddenPass`
    - ``gram``: one (T_b, T_b) matrix per conversation, ``(e_{y_t} - pi_t) . (e_{y_u} - pi_u)`` for
      tokens t, u of conversation b (the b-block of J J^T before the factors s p_t (a . h_t)),
      evaluated in the off-target form ``q_t q_u 1(y_t = y_u) - q_t r_u[y_t] - q_u r_t[y_u] +
      r_t . r_u``; the solver owns these matrices and may overwrite them
    - ``kept``: the backend's handle on the probability tiles kept for the VJP (its
      ``centered_column_reduce`` reads them), or None when they were streamed
    - ``cross``: only from a backend asked for the raw parts (``raw=True``, the vocabulary-parallel
      wrapper): then ``gram`` holds ``r_t . r_u`` and ``cross`` ``r_t[y_u]`` per conversation,
      both normalised by this backend's own sums
    """

    lse: torch.Tensor
    logp: torch.Tensor
    q: torch.Tensor
    ah: Optional[torch.Tensor]
    pib_off: Optional[torch.Tensor]
    gram: List[torch.Tensor]
    kept: Any = None
    cross: Optional[List[torch.Tensor]] = None


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
