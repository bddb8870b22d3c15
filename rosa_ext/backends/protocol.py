"""The engine protocol: the only place that knows which engine runs the vocabulary work.

An update's heavy work is a few whole passes over the head weight W (V x d) -- the logits tiles of
MATH.md sections 3-4, never stored whole. An :class:`Engine` runs them; the solve plans
(:mod:`rosa_ext.plans`) call only these methods and hold only the algebra. Engines:

- :class:`~rosa_ext.backends.torch_engine.TorchEngine` (``name = "torch"``): torch tiles, any device;
- :class:`~rosa_ext.backends.triton_engine.TritonEngine` (``"triton"``): the Triton kernels and the
  probability tiles with tensor-core GEMMs over them (CUDA, or the interpreter in tests);
- :class:`~rosa_ext.backends.distributed.DistributedEngine`: wraps either one on this rank's rows of
  a vocabulary-parallel head and adds the collectives (MATH.md section 7); the plans run unchanged.

Every pass result (:class:`~rosa_ext.common.types.HeadStats`, ``HiddenPass``, ``GramPass``) carries
``engine``: the engine that ran it (an engine may hand a case it does not serve to another, e.g. the
Triton engine's float64 problems to the torch engine), which the step reports as ``RosaStep.backend``.

All per-token results are (N,) in the problem's compute dtype (N packed tokens over B conversations,
``prob.seg`` the conversation of each); parameter-sized ones (B, .) one row per conversation.
"""
from __future__ import annotations

from typing import Dict, Optional, Protocol, runtime_checkable

import torch

from ..common.jacobian import HeadPrimitives
from ..common.types import GramPass, HeadProblem, HeadStats, HiddenPass


@runtime_checkable
class Engine(HeadPrimitives, Protocol):
    """What every engine implements.

    One-pass plans (the exact dual, hidden-mode CG), each ONE pass over W:

    - ``hidden_pass(prob, budget_bytes)`` -> HiddenPass: lse, log p, q = 1 - p_t, and r_t W (N, d)
      (``budget_bytes``: the memory the pass may hold besides its result)
    - ``gram_pass(prob, keep, budget_bytes, center=False)`` -> GramPass: lse, log p, q, r_t . b and per
      conversation the raw parts of the centred Gram (``r_t . r_u``, ``r_t[y_u]``); ``keep``: keep the
      probability tiles for :meth:`off_target_vjp` (the plan checked its memory budget); ``center``: the
      caller takes the centred Gram as well (``GramPass.centered`` says which it got: the Triton engine
      centres in its kernels, the others return the raw parts)
    - ``off_target_vjp(prob, gp, w)`` -> (B, V): ``sum_{t in b} w_t r_t`` with r_t normalised by
      ``gp.lse`` (a GEMV over the kept tiles, or one streaming pass); ``centered_vjp(prob, gp, w)`` ->
      (B, V): ``sum_{t in b} w_t (e_{y_t} - r_t)`` (the plan's VJP: one kernel on the Triton engine)
    - ``linearize(prob, ps, mode, beta)`` -> :class:`~rosa_ext.common.jacobian.Linearization` of a pass result
      (or split HeadStats): each conversation's scale, the rows' scalar f_t, the target g, b[y_t] and the
      finiteness flags (torch formulas; the Triton engine's own passes in one kernel)

    Matrix-free CG: ``stats(prob, budget_bytes)`` (HeadStats that split the target off) and the streaming
    reductions and products of :class:`~rosa_ext.common.jacobian.HeadPrimitives` (the JVP / VJP of MATH.md
    section 3).

    The cost model: ``throughput(device_type, compute_dtype)``, the measured constants that the plans'
    cost formulas read (:mod:`rosa_ext.plans.registry`).
    """

    name: str

    def hidden_pass(self, prob: HeadProblem, budget_bytes: Optional[int] = None) -> HiddenPass: ...

    def gram_pass(self, prob: HeadProblem, keep: bool, budget_bytes: Optional[int] = None,
                  center: bool = False) -> GramPass: ...

    def stats(self, prob: HeadProblem, budget_bytes: Optional[int] = None) -> HeadStats: ...

    def off_target_vjp(self, prob: HeadProblem, gp: GramPass, w: torch.Tensor,
                       out: Optional[torch.Tensor] = None) -> torch.Tensor: ...

    def centered_vjp(self, prob: HeadProblem, gp: GramPass, w: torch.Tensor,
                     out: Optional[torch.Tensor] = None) -> torch.Tensor: ...

    def throughput(self, device_type: str, dtype: torch.dtype) -> Dict[str, float]: ...
