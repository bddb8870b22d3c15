"""The lm_head hooks that carry a ROSA (or policy-gradient) adaptation, one copy for every user.

:class:`HeadAdapter` holds ``n`` conversations' parameters -- a rank-1 LoRA ``(a, b)`` or a
hidden shift ``delta`` -- and hooks ``lm_head`` so that every forward (``generate`` included)
sees them:

- mode "hidden": a forward pre-hook adds ``delta`` to lm_head's input (every position);
- mode "lora": a forward hook adds ``s (a . h) b`` to the logits (the base weight never changes);
  with ``lora_hook=False`` (a PEFT LoRA already on lm_head) no LoRA hook is installed.

``rows`` picks the conversation of each batch row: None means one conversation (slot 0) for
every row; a LongTensor (B,) serves B conversations in one batched forward (the experiment).
While ``active`` is False the hooks return nothing, so outputs are bitwise the base model's.
The session, the batched experiment and the PG baseline all use this class.
"""
from __future__ import annotations

import math
from typing import Callable, Dict, List, Optional, Tuple

import torch


def init_lora_a(n: int, d: int, seed: int, dtype: torch.dtype = torch.float32,
                device: Optional[torch.device] = None) -> torch.Tensor:
    """(n, d) LoRA ``a`` rows drawn as PEFT's lora_A init: U(-1/sqrt(d), 1/sqrt(d)).

    PEFT initialises lora_A with kaiming_uniform(a=sqrt(5)), whose bound is 1/sqrt(fan_in).
    Drawn in float64 from a CPU generator seeded with ``seed`` (reproducible on every device),
    then cast.
    """
    gen = torch.Generator(device="cpu").manual_seed(int(seed))
    a = (torch.rand(n, d, generator=gen, dtype=torch.float64) * 2 - 1) / math.sqrt(d)
    return a.to(dtype).to(device)


class HeadAdapter:
    """Per-conversation rank-1 LoRA or hidden shift on ``head`` (a ``torch.nn.Module`` lm_head).

    Args:
        head: the lm_head module (a PEFT-wrapped one too).
        mode: "lora" or "hidden".
        n: number of conversations (slots).
        vocab_size, hidden_size: V and d.
        lora_scale: s of the LoRA term.
        seed: seed of the ``a`` init (:func:`init_lora_a`); ``b`` and ``delta`` start at 0.
        dtype: dtype of the held parameters (the compute dtype, fp32 or fp64).
        lora_hook: install the LoRA forward hook (False when a PEFT LoRA carries the term).
        before_forward: called before every forward of the head (e.g. wait for a background update).
    Attributes:
        a (n, d), b (n, V), delta (n, d): the parameters; ``a0`` (n, d) the initial ``a``.
        rows: None or LongTensor (B,), the slot of each batch row.
        active: False -> the hooks pass values through untouched.
    """

    def __init__(self, head: torch.nn.Module, mode: str, n: int, *, vocab_size: int, hidden_size: int,
                 lora_scale: float, seed: int = 0, dtype: torch.dtype = torch.float32,
                 device: Optional[torch.device] = None, lora_hook: bool = True,
                 before_forward: Optional[Callable[[], None]] = None) -> None:
        if mode not in ("lora", "hidden"):
            raise ValueError(f"HeadAdapter: mode must be 'lora' or 'hidden', got {mode!r}")
        self.head, self.mode, self.scale = head, mode, float(lora_scale)
        self.d, self.V = int(hidden_size), int(vocab_size)
        self.a0 = init_lora_a(n, self.d, seed, dtype, device)
        self.a = self.a0.clone()
        self.b = torch.zeros(n, self.V, dtype=dtype, device=device)
        self.delta = torch.zeros(n, self.d, dtype=dtype, device=device)
        self.rows: Optional[torch.Tensor] = None
        self.active = False
        self._before = before_forward
        self._cast: Dict[Tuple[str, torch.dtype], torch.Tensor] = {}
        self._handles: List = []
        self._install(head, lora_hook, before_forward is not None)

    def _install(self, head: torch.nn.Module, lora_hook: bool, before: bool) -> None:
        """Register the hooks on ``head`` (a subclass may place them differently)."""
        if before:
            self._handles.append(head.register_forward_pre_hook(self._before_hook))
        if self.mode == "hidden":
            self._handles.append(head.register_forward_pre_hook(self._shift_hook))
        elif lora_hook:
            self._handles.append(head.register_forward_hook(self._lora_hook))

    # -- state ---------------------------------------------------------------------------
    def changed(self) -> None:
        """Call after writing a/b/delta in place: drops the cached dtype casts."""
        self._cast.clear()

    def apply(self, slots: torch.Tensor, update: torch.Tensor) -> None:
        """Add flat updates (k, P) to the conversations ``slots`` (k,) and activate the hooks.

        P = d + V laid out ``[delta_a, delta_b]`` (lora) or d (hidden).
        """
        if self.mode == "lora":
            self.a[slots] += update[:, :self.d].to(self.a.dtype)
            self.b[slots] += update[:, self.d:].to(self.b.dtype)
        else:
            self.delta[slots] += update.to(self.delta.dtype)
        self.changed()
        self.active = True

    def reset(self) -> None:
        """Back to the initial parameters (a = a0, b = 0, delta = 0); hooks pass through."""
        self.a.copy_(self.a0)
        self.b.zero_()
        self.delta.zero_()
        self.changed()
        self.active = False

    def remove(self) -> None:
        """Remove every hook: the head is as before."""
        for h in self._handles:
            h.remove()
        self._handles = []

    # -- hooks ---------------------------------------------------------------------------
    def _of(self, name: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        key = (name, dtype)
        c = self._cast.get(key)
        if c is None:
            c = self._cast[key] = t.to(dtype)
        return c

    def _before_hook(self, module, args):
        self._before()
        return None

    def _shift_hook(self, module, args):
        if not self.active:
            return None
        x = args[0]
        delta = self._of("delta", self.delta, x.dtype)
        shift = delta[0] if self.rows is None else delta[self.rows].unsqueeze(1)
        return (x + shift,) + tuple(args[1:])

    def _lora_hook(self, module, args, out):
        if not self.active:
            return None
        x = args[0]
        a = self._of("a", self.a, x.dtype)
        b = self._of("b", self.b, out.dtype)
        if self.rows is None:
            return out + (self.scale * (x @ a[0])).unsqueeze(-1) * b[0]
        ah = torch.bmm(x, a[self.rows].unsqueeze(-1))  # (B, L, 1)
        return out + self.scale * ah * b[self.rows].unsqueeze(1)
