"""The checks of the integrations' entry points (sessions, many users, their states): what a session
update or a stored state must look like, checked before anything is loaded or computed. The checks
every layer shares (errors, scalars, tensors, rewards) are in :mod:`rosa_ext.common.validation`.
"""
from __future__ import annotations

import numbers
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from ..common.validation import (
    RosaNonFiniteError,
    RosaTypeError,
    _show,
    fail,
    finite,
    float_tensor,
    index_range,
    index_tensor,
    integer,
    real,
    same_device,
    tensor,
)


# -- session updates (RosaSession.update / update_from_hidden) ---------------------------------
def token_ids(who: str, input_ids: Any, vocab_size: int, device: torch.device) -> torch.Tensor:
    """One exchange's token ids, (T,) or (1, T) int64/int32 in [0, V) with T >= 2 -> (T,) int64."""
    ids = tensor(who, "input_ids", input_ids)
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            fail(who, "input_ids", f"one conversation per session: `input_ids` must be (T,) or (1, T), got "
                                   f"{tuple(ids.shape)} (for many conversations call rosa_update with a batch, "
                                   "or keep one session state per user)")
        ids = ids[0]
    if ids.dim() != 1:
        fail(who, "input_ids", f"`input_ids` must be (T,) or (1, T), got {tuple(input_ids.shape)}")
    index_tensor(who, "input_ids", ids)
    same_device(who, "input_ids", ids, device, "the model's lm_head")
    if ids.numel() < 2:
        fail(who, "input_ids", "`input_ids` need a prompt and a response (T >= 2)")
    lo, hi = (int(v) for v in torch.stack([ids.min(), ids.max()]).tolist())
    if lo < 0 or hi >= vocab_size:
        fail(who, "input_ids", f"token ids of `input_ids` must be in [0, {vocab_size}), got range [{lo}, {hi}]")
    return ids.long()


def response_positions(who: str, ids: torch.Tensor, response_start: Any, response_mask: Any) -> torch.Tensor:
    """Exactly one of ``response_start`` (int in [1, T-1]) or ``response_mask`` ((T,) / (1, T) bool,
    False at 0, not all False) -> the (N,) positions of the response tokens in ids (T,)."""
    T = ids.shape[0]
    if (response_start is None) == (response_mask is None):
        fail(who, "response_start", "give exactly one of `response_start` (index of the first response token) "
                                    "or `response_mask` ((T,) bool)")
    if response_start is not None:
        start = integer(who, "response_start", response_start, minimum=None)
        if not 1 <= start < T:
            fail(who, "response_start", f"`response_start` must be in [1, {T - 1}] (the prompt needs at least one "
                                        f"token and the response at least one), got {start}")
        return torch.arange(start, T, device=ids.device)
    m = tensor(who, "response_mask", response_mask)
    if m.dim() == 2 and m.shape[0] == 1:
        m = m[0]
    if m.shape != (T,):
        fail(who, "response_mask", f"`response_mask` must have shape ({T},) like input_ids, got "
                                   f"{tuple(response_mask.shape)}")
    if m.dtype != torch.bool:
        fail(who, "response_mask", f"`response_mask` must be bool, got {m.dtype}", RosaTypeError)
    same_device(who, "response_mask", m, ids.device, "input_ids")
    if bool(m[0]):
        fail(who, "response_mask", "`response_mask[0]` must be False (no position predicts the first token)")
    pos = torch.nonzero(m).flatten()
    if pos.numel() == 0:
        fail(who, "response_mask", "`response_mask` selects no response token")
    return pos


def attention_mask(who: str, am: Any, ids: torch.Tensor) -> None:
    """None, or a real tensor with one entry per token of ids, on its device."""
    if am is None:
        return
    am = tensor(who, "attention_mask", am)
    if am.numel() != ids.numel() or am.is_complex():
        fail(who, "attention_mask", f"`attention_mask` must be a real tensor with one entry per token "
                                    f"({ids.numel()}), got {am.dtype} {tuple(am.shape)}")
    same_device(who, "attention_mask", am, ids.device, "input_ids")


def hidden_rows(who: str, hidden: Any, targets: Any, *, hidden_size: int, vocab_size: int,
                device: torch.device, head_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """update_from_hidden's inputs: hidden (N, d) floating, finite also once cast to the head's dtype;
    targets (N,) int64/int32 in [0, V); N >= 1; both on the head's device."""
    hidden = float_tensor(who, "hidden", hidden)
    if hidden.dim() != 2 or hidden.shape[1] != hidden_size or hidden.shape[0] == 0:
        fail(who, "hidden", f"`hidden` must be (N, {hidden_size}) with N >= 1, got {tuple(hidden.shape)}")
    same_device(who, "hidden", hidden, device, "the model's lm_head")
    targets = index_tensor(who, "targets", targets)
    if targets.shape != hidden.shape[:1]:
        fail(who, "targets", f"`targets` must be ({hidden.shape[0]},) like the rows of `hidden`, got "
                             f"{tuple(targets.shape)}")
    same_device(who, "targets", targets, device, "the model's lm_head")
    index_range(who, "targets", targets, vocab_size, "token id")
    finite(who, "hidden", hidden)
    if hidden.dtype != head_dtype and not bool(torch.isfinite(hidden.detach().to(head_dtype)).all()):
        fail(who, "hidden", f"`hidden` overflows {head_dtype} (the lm_head dtype)", RosaNonFiniteError)
    return hidden, targets


# -- session state ----------------------------------------------------------------------------
def session_state(who: str, state: Any, *, version: int, mode: str, vocab_size: int, hidden_size: int,
                  lora_scale: float, check_zero: bool, shard: Optional[Tuple[int, int]] = None
                  ) -> Tuple[int, Dict[str, torch.Tensor]]:
    """Check a :meth:`RosaSession.state_dict` before anything is loaded -> (num_updates, tensors).

    ``tensors`` holds ``delta`` (hidden mode) or ``a`` and ``b`` (lora mode), as given. With
    ``check_zero`` a state with ``num_updates == 0`` must hold a zero ``delta`` / ``b`` (it would
    otherwise load but have no effect). ``shard`` = (vocab_start, rows) of this rank on a
    vocabulary-parallel head: the state must hold the same rows of ``b`` (keys ``vocab_start``,
    ``vocab_rows``).
    """
    if not isinstance(state, Mapping):
        fail(who, "state", f"`state` must be a dict from state_dict(), got {_show(state)}", RosaTypeError)
    tensor_keys = ("delta",) if mode == "hidden" else ("a", "b")
    want = ("version", "mode", "num_updates", "vocab_size", "hidden_size", "lora_scale") + tensor_keys
    if shard is not None:
        want += ("vocab_start", "vocab_rows")
    missing = [k for k in want if k not in state]
    extra = [k for k in state if k not in want]
    if "version" in missing or isinstance(state.get("version"), bool) or state.get("version") != version:
        fail(who, "state['version']", "not a rosa_ext session state (missing or unknown `version`; "
                                      f"expected {version})")
    if missing:
        fail(who, f"state[{missing[0]!r}]", f"the state lacks {missing}; keys of a {mode}-mode state: {list(want)}")
    if extra:
        fail(who, f"state[{extra[0]!r}]", f"unexpected key(s) {extra} in a {mode}-mode state (keys: {list(want)})")
    if state["mode"] != mode:
        fail(who, "state['mode']", f"state is for mode={state['mode']!r}, session is {mode!r}")
    for k, have in (("vocab_size", vocab_size), ("hidden_size", hidden_size)):
        v = state[k]
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or int(v) != have:
            fail(who, f"state[{k!r}]", f"state is for V={state['vocab_size']!r}, d={state['hidden_size']!r}; "
                                       f"this model has V={vocab_size}, d={hidden_size}")
    if shard is not None and (state["vocab_start"], state["vocab_rows"]) != tuple(shard):
        fail(who, "state['vocab_start']", f"the state holds rows from {state['vocab_start']!r} ({state['vocab_rows']!r} "
                                          f"rows); this rank holds rows from {shard[0]} ({shard[1]} rows)")
    s = real(who, "state['lora_scale']", state["lora_scale"])
    if s != lora_scale:
        fail(who, "state['lora_scale']", f"state was saved with lora_scale={s:g}, this session has "
                                         f"lora_scale={lora_scale:g}; attach with the same lora_scale")
    num = integer(who, "state['num_updates']", state["num_updates"], minimum=0)
    tensors: Dict[str, torch.Tensor] = {}
    for k in tensor_keys:
        name = f"state[{k!r}]"
        t = float_tensor(who, name, state[k])
        size = (vocab_size if shard is None else shard[1]) if k == "b" else hidden_size
        if tuple(t.shape) != (size,):
            fail(who, name, f"`{name}` must be a ({size},) tensor, got shape {tuple(t.shape)}")
        finite(who, name, t)
        tensors[k] = t
    zero_key = "delta" if mode == "hidden" else "b"
    if check_zero and num == 0 and bool(torch.count_nonzero(tensors[zero_key])):
        fail(who, "state['num_updates']", f"`num_updates` is 0 but `{zero_key}` is not zero: a state with no "
                                          "update holds the initial adapter (save it with state_dict())")
    return num, tensors
