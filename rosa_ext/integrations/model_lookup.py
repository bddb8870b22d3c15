"""Find the parts of a causal LM that ROSA touches: lm_head, its weight and bias, the body,
and a PEFT LoRA on lm_head. Works on plain ``transformers`` models and on ``PeftModel``s."""
from __future__ import annotations

from typing import Optional, Tuple

import torch

from ..common.validation import RosaInputError


def base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PeftModel (or the model itself)."""
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        return model.get_base_model()
    return model


def find_lm_head(model: torch.nn.Module, who: str = "attach") -> torch.nn.Module:
    """The output-embedding module (``lm_head``); ValueError naming the model when there is none."""
    base = base_model(model)
    head = getattr(base, "lm_head", None)
    if head is None and hasattr(base, "get_output_embeddings"):
        head = base.get_output_embeddings()
    if head is None:
        raise RosaInputError(f"{who}: {type(model).__name__} has no `lm_head` (output embedding); ROSA "
                             "adapts a causal LM's vocabulary head", "model")
    return head


def find_body(model: torch.nn.Module, who: str = "attach") -> torch.nn.Module:
    """The decoder body whose last hidden state feeds lm_head (``get_decoder()`` or ``.model``)."""
    base = base_model(model)
    body = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", None)
    if not isinstance(body, torch.nn.Module) or body is base:
        raise RosaInputError(f"{who}: cannot find the decoder body of {type(base).__name__} "
                             "(expected `get_decoder()` or `.model`)", "model")
    return body


def head_weight(head: torch.nn.Module, who: str = "attach") -> torch.Tensor:
    """lm_head's (V, d) weight (under PEFT's ``base_layer`` when wrapped)."""
    layer = getattr(head, "base_layer", head)
    w = getattr(layer, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise RosaInputError(f"{who}: lm_head {type(head).__name__} has no 2-D `weight`", "model")
    return w


def head_bias(head: torch.nn.Module) -> Optional[torch.Tensor]:
    """lm_head's (V,) bias, or None."""
    return getattr(getattr(head, "base_layer", head), "bias", None)


def peft_lora(head: torch.nn.Module, who: str = "attach"
              ) -> Optional[Tuple[torch.nn.Module, torch.nn.Module, float]]:
    """(lora_A Linear, lora_B Linear, scale) of a PEFT LoRA lm_head, or None without one.

    Raises ValueError unless exactly one adapter is active and its rank is 1.
    """
    if not (hasattr(head, "lora_A") and hasattr(head, "base_layer")):
        return None
    names = getattr(head, "active_adapters", None) or list(head.lora_A.keys())
    if isinstance(names, str):
        names = [names]
    names = [n for n in names if n in head.lora_A]
    if len(names) != 1:
        raise RosaInputError(f"{who}: the PEFT lm_head must have exactly one active LoRA adapter, got {names}",
                             "model")
    name = names[0]
    A, Bm = head.lora_A[name], head.lora_B[name]
    if A.weight.shape[0] != 1:
        raise RosaInputError(f"{who}: the PEFT LoRA on lm_head must have r=1 (ROSA moves a rank-1 "
                             f"adapter), got r={A.weight.shape[0]}", "model")
    return A, Bm, float(head.scaling[name])
