"""Export a lora-mode ROSA state as a standard PEFT adapter directory (for PEFT and vLLM).

The session's own adapter adds ``s (a . h) b`` to the logits (MATH.md section 1, lora mode):
exactly PEFT's LoRA on ``lm_head`` with ``r = 1``, ``lora_A.weight = a`` as (1, d),
``lora_B.weight = b`` as (V, 1) and ``scaling = lora_alpha / r = s``. :func:`save_peft` writes

- ``adapter_config.json``: ``peft_type "LORA"``, ``r 1``, ``lora_alpha = lora_scale``,
  ``target_modules ["lm_head"]``, ``bias "none"`` (and ``base_model_name_or_path`` when known);
- ``adapter_model.safetensors``: ``base_model.model.lm_head.lora_A.weight`` (1, d) and
  ``base_model.model.lm_head.lora_B.weight`` (V, 1), in the state's dtype.

``peft.PeftModel.from_pretrained(base, dir)`` then gives the session's logits, and an engine with
per-request LoRA serves the directory (vLLM: ``--enable-lora --max-lora-rank 1``). Every user has ONE
adapter name, :func:`adapter_name` (``"rosa-<user>-<8 hex of sha256(user)>"``: a user id is a
validated string, so the name is a safe folder name, and the hash keeps two ids that differ only
in case apart on a case-insensitive file system); after an update the engine reloads it in place
(vLLM: ``load_inplace``). :func:`export_user` writes a stored user's adapter under that name;
:func:`save_peft` writes both files to temporary names first and renames them into place only
when both are written, so a failed write leaves the directory as it was. :class:`AdapterIds` gives a
distinct integer id per name (vLLM's ``lora_int_id``).

With vLLM, prefer the plugin (:mod:`rosa_ext.integrations.vllm_plugin`): it applies every user's
state inside vLLM's logits computation, uses no LoRA slot, and updates in the server process.

A hidden-mode state (a shift of lm_head's input) is no LoRA: serve it with the logits processor
of :mod:`rosa_ext.integrations.vllm_processor` instead. Nothing here imports ``transformers``,
``peft`` or ``vllm``; writing needs the ``safetensors`` package (a dependency of transformers).
"""
from __future__ import annotations

import hashlib
import json
import os
import threading
from pathlib import Path
from typing import Any, Dict, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..common import validation as checks
from .store import StateStore, check_user_id

#: The tensor names PEFT gives a LoRA on the top-level ``lm_head`` of a causal LM.
LORA_A_KEY = "base_model.model.lm_head.lora_A.weight"
LORA_B_KEY = "base_model.model.lm_head.lora_B.weight"
CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"


def _state_of(source: Any, who: str) -> Tuple[Mapping[str, Any], Optional[str]]:
    """(state dict, base model name or None) of a session, a state dict or a list of shard states."""
    # a RosaSession, recognised by its methods (session.py imports this module: no import back)
    if callable(getattr(source, "state_dict", None)) and callable(getattr(source, "_shard", None)):
        name = None
        if source.model is not None:
            cfg = getattr(source.model, "config", None)
            name = getattr(cfg, "_name_or_path", None) or getattr(cfg, "name_or_path", None) or None
        if source._shard() is not None:
            checks.fail(who, "state", "this session holds only its rank's rows of `b` (a vocabulary-parallel head); pass "
                                 "the list of every rank's state_dict() (e.g. from torch.distributed."
                                 "all_gather_object) and they are joined to the full vocabulary")
        return source.state_dict(), (str(name) if name else None)
    if isinstance(source, Mapping):
        return source, None
    if isinstance(source, Sequence) and not isinstance(source, (str, bytes)) and len(source) > 0 \
            and all(isinstance(s, Mapping) for s in source):
        return _gather_shards(list(source), who), None
    checks.fail(who, "state", "`state` must be a RosaSession, its state_dict(), or the list of every rank's state_dict() "
                         f"on a vocabulary-parallel head; got {checks._show(source)}", checks.RosaTypeError)


def _gather_shards(shards: Sequence[Mapping[str, Any]], who: str) -> Dict[str, Any]:
    """Join the state dicts of a vocabulary-parallel head (one per rank) into one full-V state."""
    for i, s in enumerate(shards):
        if "vocab_start" not in s or "vocab_rows" not in s:
            checks.fail(who, f"state[{i}]", f"`state[{i}]` is not a shard state (no 'vocab_start'/'vocab_rows'); pass "
                                       "one full state dict, or every rank's state_dict() of a sharded session")
    first = shards[0]
    for i, s in enumerate(shards):
        for k in ("mode", "vocab_size", "hidden_size", "lora_scale", "num_updates", "version"):
            if s.get(k) != first.get(k):
                checks.fail(who, f"state[{i}]", f"the shards disagree on {k!r}: {first.get(k)!r} vs {s.get(k)!r}")
    if first.get("mode") != "lora":
        return dict(first)  # refused with the mode message by the caller
    order = sorted(range(len(shards)), key=lambda i: int(shards[i]["vocab_start"]))
    at, parts = 0, []
    for i in order:
        s = shards[i]
        start, rows = int(s["vocab_start"]), int(s["vocab_rows"])
        if start != at:
            checks.fail(who, f"state[{i}]", f"the shards do not tile the vocabulary: a shard starts at row {start}, "
                                       f"expected {at} (every rank's state_dict() is needed)")
        b = checks.float_tensor(who, f"state[{i}]['b']", s.get("b"))
        if tuple(b.shape) != (rows,):
            checks.fail(who, f"state[{i}]['b']", f"`state[{i}]['b']` must be a ({rows},) tensor, got {tuple(b.shape)}")
        parts.append(b)
        at += rows
    if at != first.get("vocab_size"):
        checks.fail(who, "state", f"the shards cover {at} vocabulary rows, the state has vocab_size={first.get('vocab_size')!r}")
    for i, s in enumerate(shards):
        if not torch.equal(torch.as_tensor(s.get("a")), torch.as_tensor(first.get("a"))):
            checks.fail(who, f"state[{i}]['a']", "the shards hold different `a` (it is replicated on every rank)")
    full = {k: v for k, v in first.items() if k not in ("vocab_start", "vocab_rows", "b")}
    full["b"] = torch.cat([p.detach().cpu() for p in parts])
    return full


def lora_tensors(state: Any, *, who: str = "save_peft") -> Tuple[torch.Tensor, torch.Tensor, float, Optional[str]]:
    """``(a (d,), b (V,), lora_scale, base model name or None)`` of a lora-mode state, on the CPU.

    ``state``: a :class:`~rosa_ext.integrations.session.RosaSession`, its ``state_dict()``, or the
    list of every rank's ``state_dict()`` of a vocabulary-parallel session (joined to full V).
    Raises a RosaError naming ``state`` for a hidden-mode state, a sharded state alone, missing
    keys, wrong shapes or non-finite values.
    """
    sd, name = _state_of(state, who)
    if "vocab_start" in sd or "vocab_rows" in sd:
        checks.fail(who, "state", "`state` holds only one rank's rows of `b` (vocabulary-parallel head); pass the list of "
                             "every rank's state_dict() so that `b` is joined to the full vocabulary")
    mode = sd.get("mode")
    if mode == "hidden":
        checks.fail(who, "state", "`state` is a hidden-mode state (a shift of lm_head's input, not a LoRA): it has no PEFT "
                             "form; serve it with rosa_ext.integrations.vllm_processor (the shift in "
                             "SamplingParams.extra_args) or attach with mode='lora'")
    if mode != "lora":
        checks.fail(who, "state['mode']", f"`state` is not a rosa_ext session state (mode {mode!r})")
    for k in ("a", "b", "lora_scale", "vocab_size", "hidden_size"):
        if k not in sd:
            checks.fail(who, f"state[{k!r}]", f"the state lacks {k!r} (expected a RosaSession.state_dict())")
    d, Vs = sd["hidden_size"], sd["vocab_size"]
    a = checks.float_tensor(who, "state['a']", sd["a"]).detach().reshape(-1).cpu()
    b = checks.float_tensor(who, "state['b']", sd["b"]).detach().reshape(-1).cpu()
    if a.numel() != d or b.numel() != Vs:
        checks.fail(who, "state['b']" if a.numel() == d else "state['a']",
               f"`a` has {a.numel()} values and `b` {b.numel()}; the state says d={d!r}, V={Vs!r}")
    checks.finite(who, "state['a']", a)
    checks.finite(who, "state['b']", b)
    scale = checks.real(who, "state['lora_scale']", sd["lora_scale"])
    if scale == 0:
        checks.fail(who, "state['lora_scale']", "lora_scale is 0: the adapter would have no effect")
    return a, b, float(scale), name


def adapter_config(lora_scale: float, base_model_name_or_path: Optional[str] = None) -> Dict[str, Any]:
    """The ``adapter_config.json`` of a rank-1 LoRA on ``lm_head`` with scaling ``lora_scale``."""
    return {
        "peft_type": "LORA",
        "task_type": "CAUSAL_LM",
        "base_model_name_or_path": base_model_name_or_path,
        "r": 1,
        "lora_alpha": float(lora_scale),  # PEFT's scaling = lora_alpha / r (use_rslora False)
        "target_modules": ["lm_head"],
        "lora_dropout": 0.0,
        "bias": "none",
        "fan_in_fan_out": False,
        "use_rslora": False,
        "use_dora": False,
        "modules_to_save": None,
        "init_lora_weights": True,
        "inference_mode": True,
    }


def save_peft(state: Any, directory: Union[str, Path], *, base_model_name_or_path: Optional[str] = None) -> Path:
    """Write a lora-mode state as a PEFT adapter directory; returns its path.

    Args:
        state: a lora-mode :class:`~rosa_ext.integrations.session.RosaSession`, its
            ``state_dict()``, or the list of every rank's ``state_dict()`` of a
            vocabulary-parallel session (its rows of ``b`` are joined to the full V first).
        directory: created if needed; ``adapter_config.json`` and ``adapter_model.safetensors``
            in it are overwritten.
        base_model_name_or_path: recorded in the config; by default the session model's
            ``config._name_or_path`` when known, else null.
    Writes ``lora_A.weight = a`` as (1, d) and ``lora_B.weight = b`` as (V, 1) in the state's
    dtype. Raises a RosaError naming ``state`` (hidden mode, one shard alone, a bad state) or
    ``directory`` before anything is written.
    """
    who = "save_peft"
    a, b, scale, name = lora_tensors(state, who=who)
    if not isinstance(directory, (str, Path)):
        checks.fail(who, "directory", f"`directory` must be a str or Path, got {checks._show(directory)}", checks.RosaTypeError)
    if base_model_name_or_path is not None and not isinstance(base_model_name_or_path, str):
        checks.fail(who, "base_model_name_or_path", "`base_model_name_or_path` must be a str or None, got "
                                               f"{checks._show(base_model_name_or_path)}", checks.RosaTypeError)
    path = Path(directory)
    if path.exists() and not path.is_dir():
        checks.fail(who, "directory", f"`directory` {str(path)!r} exists and is not a directory")
    try:
        from safetensors.torch import save as save_bytes
    except ImportError as e:  # pragma: no cover - safetensors comes with transformers
        raise ImportError("save_peft needs the `safetensors` package (pip install safetensors)") from e
    cfg = adapter_config(scale, base_model_name_or_path if base_model_name_or_path is not None else name)
    files = {WEIGHTS_NAME: save_bytes({LORA_A_KEY: a.reshape(1, -1).contiguous(), LORA_B_KEY: b.reshape(-1, 1).contiguous()},
                                      metadata={"format": "pt"}),
             CONFIG_NAME: (json.dumps(cfg, indent=2) + "\n").encode()}
    _write_all(who, path, files)
    return path


def _write_all(who: str, path: Path, files: Mapping[str, bytes]) -> None:
    """Write ``files`` into folder ``path``: each to a temporary name (written, fsynced), then every one
    renamed into place; an error before the renames removes the temporaries and leaves ``path`` as it
    was (RosaStateError naming ``directory``)."""
    tmp: Dict[str, Path] = {}
    try:
        path.mkdir(parents=True, exist_ok=True)
        for fname, data in files.items():
            t = path / f".{fname}.tmp-{os.getpid()}-{threading.get_ident()}"
            tmp[fname] = t
            with open(t, "wb") as fh:
                fh.write(data)
                fh.flush()
                os.fsync(fh.fileno())
        for fname, t in tmp.items():
            os.replace(t, path / fname)
        tmp = {}
        if hasattr(os, "O_DIRECTORY"):
            fd = os.open(str(path), os.O_RDONLY | os.O_DIRECTORY)
            try:
                os.fsync(fd)
            finally:
                os.close(fd)
    except OSError as e:
        checks.fail(who, "directory", f"writing the adapter to {str(path)!r} failed ({e.strerror or e}); the "
                                      "files already there were left as they were", checks.RosaStateError)
    finally:
        for t in tmp.values():
            try:
                t.unlink()
            except OSError:
                pass


def adapter_name(user_id: str, state: Any = None) -> str:
    """The one adapter name of a user: ``"rosa-<user_id>-<first 8 hex digits of sha256(user_id)>"``.

    ``user_id`` must be a valid user id (:func:`~rosa_ext.integrations.store.check_user_id`: a str of
    letters, digits and ``_.@+-``, no ``..``), so the name is a safe folder and adapter name that cannot
    escape a directory; the hash keeps ids that differ only in case apart on a case-insensitive file
    system. The name no longer changes with the state: reload the adapter in place after an update
    (vLLM: ``load_inplace: true``). ``state`` (a session, a state dict or ``num_updates``) is accepted
    for older callers and only checked.
    """
    who = "adapter_name"
    uid = check_user_id(who, user_id)
    if state is not None:
        if isinstance(state, Mapping):
            num = state.get("num_updates")
        elif isinstance(state, int) and not isinstance(state, bool):
            num = state
        else:
            num = getattr(state, "num_updates", None)
        checks.integer(who, "state", num, minimum=0)
    return f"rosa-{uid}-{hashlib.sha256(uid.encode()).hexdigest()[:8]}"


def export_user(store: StateStore, user_id: str, root: Union[str, Path], *,
                base_model_name_or_path: Optional[str] = None) -> Tuple[str, Path]:
    """Write the stored lora-mode state of ``user_id`` as a PEFT adapter folder ``root/adapter_name(user_id)``
    (replacing the previous export of that user atomically, file by file); returns ``(name, folder)``.
    RosaError naming ``user_id`` (unknown, invalid) or ``state`` (a hidden-mode user) before anything is
    written."""
    who = "export_user"
    if not isinstance(store, StateStore):
        checks.fail(who, "store", f"`store` must be a StateStore, got {checks._show(store)}", checks.RosaTypeError)
    name = adapter_name(user_id)
    if not isinstance(root, (str, Path)):
        checks.fail(who, "root", f"`root` must be a str or Path, got {checks._show(root)}", checks.RosaTypeError)
    return name, save_peft(store.get(user_id), Path(root) / name, base_model_name_or_path=base_model_name_or_path)


class AdapterIds:
    """A distinct positive integer per adapter name (vLLM's ``LoRARequest.lora_int_id``).

    vLLM identifies a loaded adapter by its int id: two names must never share one (a hash could
    collide and silently serve another user's adapter), so ids are handed out in order, 1, 2, ...
    Thread-safe. ``ids(name)`` returns the same id for the same name.
    """

    def __init__(self) -> None:
        self._ids: Dict[str, int] = {}
        self._lock = threading.Lock()

    def __call__(self, name: str) -> int:
        if not isinstance(name, str) or not name:
            checks.fail("AdapterIds", "name", f"`name` must be a non-empty str, got {checks._show(name)}", checks.RosaTypeError)
        with self._lock:
            if name not in self._ids:
                self._ids[name] = len(self._ids) + 1
            return self._ids[name]

    def __len__(self) -> int:
        return len(self._ids)
