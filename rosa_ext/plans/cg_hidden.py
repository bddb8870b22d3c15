"""Plan "cg", hidden mode: CG on the explicit T x d Jacobian (MATH.md section 4).

Read in order:

1. The pass over W and the Jacobian algebra are the hidden dual's (:func:`.dual_hidden.pass_and_rows`):
   the engine's ONE online-softmax pass gives lse, 1 - p_t and r_t W, hence the explicit rows of J (N x d).
2. :func:`solve` -- CG on ``(J^T J + lambda I) delta = J^T g`` per conversation (a batch is one block-
   diagonal system), each iteration ``J^T (J v)`` on the rows (4 N d flops, no pass over W); J
   rescaled by a power of two first (exact, the step is invariant), the ridge of every conversation
   inside the matvec (:func:`.dense.conversation_ridges`). On a vocabulary-parallel head the rows are
   identical on every rank after the pass, so CG runs locally.
3. :func:`cost` -- its cost formula for ``solver="auto"`` (:mod:`.registry`).
"""
from __future__ import annotations

from typing import Dict, Optional, Sequence

import torch

from ..cg import cg as default_cg
from ..common.config import RosaConfig
from ..common.jacobian import segment_sum
from ..common.types import HeadProblem, Solved
from . import dense, dual_hidden


def solve(prob: HeadProblem, cfg: RosaConfig, engine, cg: Optional[dense.CGImpl] = None) -> Solved:
    """Hidden-mode CG on the explicit Jacobian (module doc) -> :class:`~rosa_ext.common.types.Solved`.
    ``cg``: the CG implementation (default :func:`rosa_ext.cg.cg`)."""
    cg = default_cg if cg is None else cg
    lin, rows = dual_hidden.pass_and_rows(prob, cfg, engine)
    g = lin.g  # scaled by e^-shift per conversation, as the rows
    B, d, seg = prob.num_conversations, prob.hidden_size, prob.seg
    unit = dense.power_of_two_scale(rows.abs().max())
    rows.mul_(unit)
    rhs = segment_sum(prob, (g * unit).unsqueeze(1) * rows)
    lam = dense.conversation_ridges(prob, cfg, (rows * rows).sum(1), unit, lin.shift)
    dense.check_linearization(lin, cfg, lam)
    lam = lam.unsqueeze(1)

    def matvec(v: torch.Tensor) -> torch.Tensor:
        v2 = v.reshape(B, d)
        if B == 1:
            jtj = (rows.T @ (rows @ v2[0])).unsqueeze(0)
        else:
            jtj = segment_sum(prob, (rows * v2[seg]).sum(1, keepdim=True) * rows)
        return (jtj + lam * v2).reshape(-1)

    res = dense.run_cg(cg, matvec, rhs.reshape(-1), prob, cfg)  # the ridge is inside the matvec
    return Solved(res.x.reshape(B, d), lin.stats.logp, lin.target(), res.iterations, res.residual,
                  engine=lin.stats.engine)


def cost(k: Dict[str, float], lengths: Sequence[int], d: int, V: int, wpass: float, max_iter: int) -> float:
    """Estimated seconds: the hidden pass, then ``max_iter`` products with J and J^T (4 N d flops each)."""
    N = sum(lengths)
    return dual_hidden.pass_seconds(k, lengths, d, V, wpass) + max(1, max_iter) * 4 * N * d / k["gemm"] + k["call"]
