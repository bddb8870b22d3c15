"""Record the lm_head inputs of a generation, so that an update needs no second forward of the body.

While ``model.generate`` runs, every forward of lm_head sees the final hidden state of the last
position of each row: the prefill's last position predicts the first generated token, each decode
step's position the next one. :class:`GenerationRecorder` keeps exactly those rows (B x d numbers per
generated token, on the head's device, in the head's dtype) with a forward pre-hook placed in front of
every other hook of lm_head, so it records the base body's outputs (before a hidden-mode shift is
added). :meth:`GenerationRecorder.take` turns them, with the generated ids, into per-sequence
``(hidden (n_i, d), tokens (n_i,))``: the tokens up to and including the first end-of-sequence token,
the padding after it dropped.
"""
from __future__ import annotations

from dataclasses import dataclass
from typing import Any, List, Optional, Sequence, Tuple

import torch

from ..core.distributed import is_dtensor


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
    :meth:`recording` is on; installed once per session, idle otherwise."""

    def __init__(self, head: torch.nn.Module) -> None:
        self.on = False
        self.steps: List[torch.Tensor] = []
        self._handle = head.register_forward_pre_hook(self._hook, prepend=True)

    def _hook(self, module, args) -> None:
        if not self.on:
            return None
        x = args[0]
        if is_dtensor(x):
            x = x.to_local()
        self.steps.append(x[:, -1, :].detach().clone())  # (B, d): one row per sequence
        return None

    def start(self) -> None:
        self.steps = []
        self.on = True

    def stop(self) -> None:
        self.on = False

    def take(self, generated: torch.Tensor, eos_token_ids: Sequence[int]) -> Recorded:
        """Per-sequence recordings of one ``generate``: ``generated`` (B, n) the new tokens (the
        output without the prompt). A sequence ends at its first token in ``eos_token_ids`` (kept).
        Raises ValueError when the recorded forwards do not match the generated tokens (a generation
        that did not run through this head, e.g. speculative decoding)."""
        steps, self.steps = self.steps, []
        B, n = generated.shape
        if len(steps) < n or any(s.shape[0] != B for s in steps[:n]):
            raise ValueError(f"recorded {len(steps)} lm_head forwards for {n} generated tokens of {B} sequences: "
                             "this generation did not run one lm_head forward per token")
        H = torch.stack(steps[:n], 1)  # (B, n, d)
        eos = torch.tensor(list(eos_token_ids), dtype=generated.dtype, device=generated.device)
        hidden, tokens = [], []
        for i in range(B):
            row = generated[i]
            hit = torch.nonzero(torch.isin(row, eos)).flatten() if eos.numel() else row.new_zeros(0)
            k = int(hit[0]) + 1 if hit.numel() else n
            hidden.append(H[i, :k])
            tokens.append(row[:k].to(H.device))
        return Recorded(hidden, tokens)

    def generate(self, model: torch.nn.Module, input_ids: torch.Tensor, generate_kwargs: dict) -> Tuple[Any, Recorded]:
        """``model.generate(input_ids, **generate_kwargs)`` under no_grad while recording -> (what generate
        returns, the per-sequence :class:`Recorded`). ``return_dict_in_generate=True`` works too."""
        self.start()
        try:
            with torch.no_grad():
                out = model.generate(input_ids, **generate_kwargs)
        finally:
            self.stop()
        seqs = getattr(out, "sequences", out)
        return out, self.take(seqs[:, input_ids.shape[1]:], eos_ids(model, generate_kwargs))

    def remove(self) -> None:
        self._handle.remove()


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
