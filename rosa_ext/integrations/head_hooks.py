"""Everything hooked on lm_head: the hooks that carry a ROSA (or policy-gradient) adaptation, one copy for
every user, and the recorder of its inputs during a generation.

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

Recording (:class:`GenerationRecorder`): while ``model.generate`` runs, every forward of lm_head sees the
final hidden state of the last position of each row: the prefill's last position predicts the first
generated token, each decode step's position the next one. The recorder keeps exactly those rows (B x d
numbers per generated token, on the head's device, in the head's dtype) with a forward pre-hook placed in
front of every other hook of lm_head, so it records the base body's outputs (before a hidden-mode shift is
added). :meth:`GenerationRecorder.take` turns them, with the generated ids, into per-sequence
``(hidden (n_i, d), tokens (n_i,))``: the tokens up to and including the first end-of-sequence token,
the padding after it dropped. An update then needs no second forward of the body.
"""
from __future__ import annotations

import math
from dataclasses import dataclass
from typing import Any, Callable, Dict, List, Optional, Sequence, Tuple

import torch

from ..common import validation as checks
from ..common.validation import RosaStateError


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


# ----------------------------------------------------------------------------- recording a generation
@dataclass
class Recorded:
    """The last generation of a session: per sequence i, ``hidden[i]`` (n_i, d) the base lm_head inputs
    that predicted ``tokens[i]`` (n_i,) (head dtype and device)."""

    hidden: List[torch.Tensor]
    tokens: List[torch.Tensor]

    @property
    def num_sequences(self) -> int:
        return len(self.tokens)


class GenerationRecorder:
    """A forward pre-hook on ``head`` that records the last position's input of every forward while
    recording (:meth:`generate`); installed once per session, idle otherwise. The rows go into one
    preallocated (B, max_new_tokens, d) buffer when the generation's length is known (no allocation per
    token), else into a list."""

    def __init__(self, head: torch.nn.Module) -> None:
        self.on = False
        self.steps: List[torch.Tensor] = []
        self.buffer: Optional[torch.Tensor] = None
        self.count = 0
        self.capacity = 0
        self._handle = head.register_forward_pre_hook(self._hook, prepend=True)

    def _hook(self, module, args) -> None:
        if not self.on:
            return None
        x = args[0]
        to_local = getattr(x, "to_local", None)  # a DTensor input (a vocabulary-parallel body): this rank's
        if to_local is not None:
            x = to_local()
        row = x[:, -1, :].detach()  # (B, d): one row per sequence
        if self.buffer is None and self.capacity and not self.steps:
            self.buffer = torch.empty(row.shape[0], self.capacity, row.shape[1], dtype=row.dtype, device=row.device)
        if self.buffer is not None and self.count < self.capacity and row.shape[0] == self.buffer.shape[0]:
            self.buffer[:, self.count] = row
        else:  # beyond the expected length (or another batch size): the safety net of take() decides
            if self.buffer is not None:
                self.steps = list(self.buffer[:, :self.count].unbind(1))
                self.buffer = None
            self.steps.append(row.clone())
        self.count += 1
        return None

    def start(self, capacity: int = 0) -> None:
        """Start recording; ``capacity``: the number of forwards expected (0: unknown)."""
        self.steps, self.buffer, self.count, self.capacity = [], None, 0, int(capacity)
        self.on = True

    def stop(self) -> None:
        self.on = False

    def take(self, generated: torch.Tensor, eos_token_ids: Sequence[int], pad_token_id: Optional[int] = None
             ) -> Recorded:
        """Per-sequence recordings of one ``generate``: ``generated`` (B, n) the new tokens (the output
        without the prompt). A sequence ends at its first token in ``eos_token_ids`` (kept), or where a
        stopping criterion ended it: ``generate`` fills a finished row with ``pad_token_id``, so a trailing
        run of it (when it is not an eos id) is dropped. Each sequence's rows are copied out, so a recording
        holds only its own rows. Raises RosaStateError when the recorded forwards do not match the generated
        tokens (a generation that did not run one lm_head forward per token)."""
        B, n = generated.shape
        if self.buffer is not None and not self.steps:
            H = self.buffer[:, :self.count]
        else:
            H = torch.stack(self.steps, 1) if self.steps else None
        self.steps, self.buffer = [], None
        if H is None or H.shape[1] < n or H.shape[0] != B:
            raise RosaStateError(f"generate: recorded {0 if H is None else H.shape[1]} lm_head forwards of "
                                 f"{0 if H is None else H.shape[0]} rows for {n} generated tokens of {B} sequences: "
                                 "this generation did not run one lm_head forward per token", "generate_kwargs")
        eos = torch.tensor(list(eos_token_ids), dtype=generated.dtype, device=generated.device)
        pad = None if pad_token_id is None or int(pad_token_id) in eos.tolist() else int(pad_token_id)
        hidden, tokens = [], []
        for i in range(B):
            row = generated[i]
            hit = torch.nonzero(torch.isin(row, eos)).flatten() if eos.numel() else row.new_zeros(0)
            k = int(hit[0]) + 1 if hit.numel() else n
            if pad is not None and not hit.numel():
                not_pad = torch.nonzero(row != pad).flatten()
                k = int(not_pad[-1]) + 1 if not_pad.numel() else 0
            hidden.append(H[i, :k].clone())
            tokens.append(row[:k].to(H.device).clone())
        return Recorded(hidden, tokens)

    def generate(self, model: torch.nn.Module, input_ids: torch.Tensor, generate_kwargs: dict) -> Tuple[Any, Recorded]:
        """``model.generate(input_ids, **generate_kwargs)`` under no_grad while recording -> (what generate
        returns, the per-sequence :class:`Recorded`). ``return_dict_in_generate=True`` works too. Decoding
        modes whose lm_head forwards are not one row per returned sequence and token (beam search,
        assisted / prompt-lookup decoding, contrastive search, DoLa) are refused before anything runs
        (:func:`check_decoding`)."""
        settings = check_decoding(model, generate_kwargs)
        capacity = settings["max_new_tokens"] or 0
        self.start(capacity)
        try:
            with torch.no_grad():
                out = model.generate(input_ids, **generate_kwargs)
        finally:
            self.stop()
        seqs = getattr(out, "sequences", out)
        return out, self.take(seqs[:, input_ids.shape[1]:], eos_ids(model, generate_kwargs), settings["pad_token_id"])

    def remove(self) -> None:
        self._handle.remove()


#: generate arguments whose decoding runs lm_head on rows other than one per returned sequence and token
_UNRECORDABLE = {
    "num_beams": "beam search keeps num_beams hypotheses per sequence and reorders them every step",
    "prompt_lookup_num_tokens": "prompt-lookup decoding checks several draft tokens per forward",
    "assistant_model": "assisted decoding checks several draft tokens per forward",
    "penalty_alpha": "contrastive search runs lm_head on top_k candidates per token",
    "dola_layers": "DoLa decoding runs lm_head on early layers too",
}


def check_decoding(model: torch.nn.Module, kwargs: dict) -> dict:
    """The settings of a ``generate`` call a recording depends on, from its arguments, else its
    ``generation_config`` argument, else the model's: refuses (RosaInputError naming the argument, before
    anything runs) beam search (num_beams > 1), assisted / prompt-lookup decoding, contrastive search and
    DoLa; returns {"max_new_tokens": int or None, "pad_token_id": int or None}."""
    configs = [kwargs, getattr(kwargs.get("generation_config"), "__dict__", {}),
               getattr(getattr(model, "generation_config", None), "__dict__", {})]

    def setting(name: str) -> Any:
        for c in configs:
            if c.get(name) is not None:
                return c[name]
        return None

    for name, why in _UNRECORDABLE.items():
        v = setting(name)
        if v is None or (name == "num_beams" and int(v) <= 1) or (name == "penalty_alpha" and not float(v) > 0):
            continue
        checks.fail("generate", name, f"`{name}`={v!r}: {why}, so the recorded lm_head inputs would not be those of "
                                      "the returned answer; generate without it (or update from the text: "
                                      "update(ids, reward, response_start=...))")
    return {"max_new_tokens": setting("max_new_tokens"), "pad_token_id": setting("pad_token_id")}


def eos_ids(model: torch.nn.Module, kwargs: dict) -> List[int]:
    """The end-of-sequence ids a ``generate`` call stops at: its ``eos_token_id`` argument, else the
    model's generation config (an int or a list)."""
    eos: Optional[object] = kwargs.get("eos_token_id")
    if eos is None:
        cfg = getattr(model, "generation_config", None)
        eos = getattr(cfg, "eos_token_id", None) if cfg is not None else None
    if eos is None:
        return []
    return [int(e) for e in (eos if isinstance(eos, (list, tuple)) else [eos])]
