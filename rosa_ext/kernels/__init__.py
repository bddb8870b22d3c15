"""Triton kernels of the ROSA update, usable on their own (MATH.md section 3).

Tensor-level API (:mod:`rosa_ext.kernels.ops`; shapes and dtypes there): T tokens packed
over B >= 1 conversations (``seg``), hidden size d, vocabulary V; fp32/bf16/fp16
``hidden``/``weight`` of one dtype, any strides; every result fp32.

- :func:`stats` -> ``HeadStats(lse, logp, ah, pib)``, each (T,): one pass over W
- :func:`row_reduce`: ``pi_t . u_seg`` for u (V,) / (B, V) -> (T,)   (the JVP's pass)
- :func:`column_reduce`: ``sum_t w_t pi_t`` for w (T,) -> (V,) / (B, V)   (the VJP's pass)
- :func:`jvp`: ``J v`` -> (T,); :func:`vjp`: ``J^T u`` -> (P,) / (B, P): the Jacobian of
  ``p_t = softmax(z_t)[y_t]`` w.r.t. the rank-1 LoRA ``[a, b]`` (P = d + V) or a hidden
  shift (P = d), so another framework can run its own solver on them.
- :func:`weight_matvec` (W x) / :func:`weight_rmatvec` (q W): fp32-accumulating GEMVs that
  read a bf16/fp16 W once.
- :func:`probability_tiles` -> :class:`ProbTiles`: the normalised off-target probabilities P (T, V) written to
  memory (fp32, or bf16 hi/lo parts for the tensor cores) with their row sums, normalised by a given
  lse or by the kernel's own row statistics (one pass over W:
  :func:`.prob_tiles.prob_tiles_from_tensors` with ``lse=None`` splits the target off before any
  reference and keeps the tiles relative to per-split references with the scales that make them
  r̂, the softmax of the other logits, plus lse_off and the target logit); :mod:`.tile_gemms` has the
  GEMMs over them (hidden ``r W`` / ``pi W``, the LoRA Gram, the VJP; K-split at the vocabulary splits;
  MATH.md section 4).
- :func:`prepare` -> :class:`KernelProblem`: check a problem once (one host sync) and pass it
  as ``prob=`` to the functions above, which then never synchronise with the host (a solver
  loop built on them is CUDA-graph capturable).

Kernel families: :mod:`.stats_pass` (online softmax), :mod:`.reductions` (row / column
reductions), :mod:`.matvec` (GEMVs), :mod:`.prob_tiles` (probability tiles; their layout and the
combine of a launch's partials: :mod:`.tile_layout`; that combine and the linearisation as two small launches:
:mod:`.epilogue`), :mod:`._tiles` (the shared logits tile, tile configs,
fp32 dot precision: :func:`set_fp32_precision`, "tf32x3" by default). Runs on CUDA, or on the CPU
under ``TRITON_INTERPRET=1`` (tests). fp64 models: use the torch backend (refused here). Inside
the compiled CUDA CG the reductions and GEMVs skip their work once it has converged
(:mod:`rosa_ext.common.device_flag`).
"""
from __future__ import annotations

from . import matvec, prob_tiles, reductions, stats_pass, tile_gemms
from ._tiles import fp32_precision, set_fp32_precision
from .matvec import weight_matvec, weight_rmatvec
from .ops import KernelProblem, column_reduce, jvp, prepare, row_reduce, stats, vjp
from .prob_tiles import ProbTiles, probability_tiles

__all__ = ["stats", "row_reduce", "column_reduce", "jvp", "vjp", "weight_matvec", "weight_rmatvec", "prepare",
           "KernelProblem", "set_fp32_precision", "fp32_precision", "reductions", "matvec", "stats_pass",
           "probability_tiles", "ProbTiles", "prob_tiles", "tile_gemms"]
