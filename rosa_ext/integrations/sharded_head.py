"""The lm_head hooks on a vocabulary-parallel head (``ColwiseParallel``; MATH.md section 7).

``torch.distributed.tensor.parallel.ColwiseParallel`` on ``lm_head`` makes its weight (and bias)
a ``DTensor`` sharded on dim 0 and hooks the module: a pre-hook wraps the input as a replicated
``DTensor``, a forward hook redistributes the logits (sharded on the last dim) to the requested
output layout (all-gathered for ``output_layouts=Replicate()``, the "colwise_rep" plan of
transformers) and unwraps them. :class:`ShardedHeadAdapter` holds ``b`` as this rank's rows only
and puts its hooks in front of ColwiseParallel's (``prepend``):

- hidden mode: the shift is added to the plain, replicated input, before it is wrapped;
- lora mode: ``s (a . h) b_local`` is added to this rank's logits while they are still sharded,
  before the redistribution, so ``b`` is never gathered.

:func:`head_adapter` picks it for a head whose weight is such a DTensor, else the plain
:class:`~rosa_ext.integrations.head_hooks.HeadAdapter`.
"""
from __future__ import annotations

from typing import Any, Optional

import torch

from ..core.distributed import is_dtensor, vocab_rows
from .head_hooks import HeadAdapter


def _rewrap(local: torch.Tensor, like: Any) -> Any:
    """``local`` as a DTensor with ``like``'s mesh, placements, shape and stride."""
    return type(like).from_local(local, like.device_mesh, like.placements, run_check=False,
                                 shape=like.shape, stride=like.stride())


class ShardedHeadAdapter(HeadAdapter):
    """A :class:`HeadAdapter` on this rank's rows ``[vocab_start, vocab_start + rows)`` of a
    vocabulary-parallel head: ``a`` and ``delta`` replicated (n, d), ``b`` (n, rows).

    Same arguments as :class:`HeadAdapter`, with ``vocab_size`` replaced by ``vocab_start`` and
    ``rows``. ``a`` is drawn from the same seeded CPU generator on every rank, so it starts
    replicated.
    """

    def __init__(self, head: torch.nn.Module, mode: str, n: int, *, vocab_start: int, rows: int,
                 hidden_size: int, **kwargs: Any) -> None:
        self.vocab_start, self.rows_held = int(vocab_start), int(rows)
        super().__init__(head, mode, n, vocab_size=rows, hidden_size=hidden_size, **kwargs)

    def _install(self, head: torch.nn.Module, lora_hook: bool, before: bool) -> None:
        if self.mode == "hidden":
            self._handles.append(head.register_forward_pre_hook(self._shift_hook, prepend=True))
        elif lora_hook:
            self._handles.append(head.register_forward_hook(self._lora_hook, prepend=True))
        if before:  # registered last, in front: runs before every other hook
            self._handles.append(head.register_forward_pre_hook(self._before_hook, prepend=True))

    def _shift_hook(self, module, args):
        x = args[0]
        if not is_dtensor(x):
            return super()._shift_hook(module, args)
        out = super()._shift_hook(module, (x.to_local(),) + tuple(args[1:]))
        return None if out is None else (_rewrap(out[0], x),) + tuple(args[1:])

    def _lora_hook(self, module, args, out):
        if not self.active:
            return None
        x = args[0].to_local() if is_dtensor(args[0]) else args[0]
        local = out.to_local() if is_dtensor(out) else out
        if local.shape[-1] != self.V:
            raise RuntimeError(f"rosa_ext: lm_head returned logits of width {local.shape[-1]}, but this rank holds "
                               f"{self.V} vocabulary rows; apply ColwiseParallel to lm_head before rosa_ext.attach")
        new = super()._lora_hook(module, (x,) + tuple(args[1:]), local)
        return _rewrap(new, out) if is_dtensor(out) else new


def head_adapter(head: torch.nn.Module, weight: torch.Tensor, mode: str, n: int, *, vocab_size: int,
                 **kwargs: Any) -> HeadAdapter:
    """The adapter for ``head``: sharded when ``weight`` is a DTensor split by vocabulary rows."""
    rows: Optional[tuple] = vocab_rows(weight)
    if rows is None:
        return HeadAdapter(head, mode, n, vocab_size=vocab_size, **kwargs)
    return ShardedHeadAdapter(head, mode, n, vocab_start=rows[0], rows=rows[1], **kwargs)
