"""The rank-1 LoRA a session reads and moves: one interface, two implementations.

- :class:`OwnLora`: the session's own ``(a, b)`` on its lm_head hooks (slot 0 of a
  :class:`~rosa_ext.integrations.head_hooks.HeadAdapter`, compute dtype); the base weights never change.
- :class:`PeftLora`: the ``lora_A`` / ``lora_B`` Linear modules of an r = 1 PEFT LoRA on lm_head,
  moved in place (in their own dtype) when the session is in LoRA mode; their values at ``attach``
  are kept and put back by :meth:`restore`. In hidden mode a PEFT LoRA is only read: its term is
  part of the logits the shift is fitted through.

The session calls the same methods on either (``terms``, ``step_writes``, ``state``, ``load_pairs``,
``restore``) instead of branching on where the LoRA lives.
"""
from __future__ import annotations

from typing import Any, Dict, List, Optional, Tuple

import torch

from .head_hooks import HeadAdapter

#: (destination tensor, value): a write the session makes (``add_`` for a step, ``copy_`` for a load).
Write = Tuple[torch.Tensor, torch.Tensor]


class LoraParams:
    """What a session needs of a rank-1 LoRA on lm_head (see the module doc).

    Attributes:
        scale: s = lora_alpha / r.
        moved: whether ROSA moves this LoRA (LoRA mode) or only reads it (hidden mode).
    """

    scale: float
    moved: bool

    def vectors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        """(a (d,), b (V,)) as they are stored (views: written in place by the session)."""
        raise NotImplementedError

    def terms(self) -> Dict[str, Any]:
        """The ``lora_a``, ``lora_b``, ``lora_scale`` arguments of :func:`rosa_ext.rosa_update`."""
        a, b = self.vectors()
        return dict(lora_a=a.detach().reshape(-1), lora_b=b.detach().reshape(-1), lora_scale=self.scale)

    def step_writes(self, delta_a: torch.Tensor, delta_b: torch.Tensor) -> List[Write]:
        """The writes that add a step's (delta_a (d,), delta_b (V,)), cast to the stored dtype and shape
        before anything is written."""
        a, b = self.vectors()
        return [(a, delta_a.reshape(a.shape).to(a.dtype)), (b, delta_b.reshape(b.shape).to(b.dtype))]

    def load_pairs(self, a: torch.Tensor, b: torch.Tensor) -> List[Tuple[str, torch.Tensor, torch.Tensor]]:
        """(state key, destination, source reshaped to the destination) for a load."""
        dst_a, dst_b = self.vectors()
        return [("a", dst_a, a.reshape(dst_a.shape)), ("b", dst_b, b.reshape(dst_b.shape))]

    def state(self) -> Dict[str, torch.Tensor]:
        """{"a": (d,), "b": (V,)} copies on the CPU."""
        a, b = self.vectors()
        return {"a": a.detach().reshape(-1).cpu().clone(), "b": b.detach().reshape(-1).cpu().clone()}

    def restore(self) -> None:
        """Back to the values at ``attach`` (nothing to do for the own LoRA: its adapter resets)."""


class OwnLora(LoraParams):
    """The session's own LoRA: slot 0 of ``adapter`` (its ``a`` drawn like PEFT's lora_A init, b = 0)."""

    def __init__(self, adapter: HeadAdapter) -> None:
        self.adapter, self.scale, self.moved = adapter, adapter.scale, True

    def vectors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.adapter.a[0], self.adapter.b[0]


class PeftLora(LoraParams):
    """An r = 1 PEFT LoRA on lm_head: ``A`` (lora_A Linear, weight (1, d)), ``B`` (lora_B Linear,
    weight (V, 1)), ``scale`` (PEFT's scaling). ``moved``: keep a copy of the weights to restore."""

    def __init__(self, A: torch.nn.Module, B: torch.nn.Module, scale: float, *, moved: bool) -> None:
        self.A, self.B, self.scale, self.moved = A, B, float(scale), moved
        self._init: Optional[Tuple[torch.Tensor, torch.Tensor]] = (
            (A.weight.detach().clone(), B.weight.detach().clone()) if moved else None)

    def vectors(self) -> Tuple[torch.Tensor, torch.Tensor]:
        return self.A.weight, self.B.weight

    def restore(self) -> None:
        if self._init is not None:
            with torch.no_grad():
                self.A.weight.copy_(self._init[0])
                self.B.weight.copy_(self._init[1])
