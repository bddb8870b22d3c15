"""What a serving request or an HTTP route body may hold, checked and converted (for
:mod:`.serving` and the vLLM routes, :mod:`.vllm_routes`): the request fields (``rosa_user``,
``rosa_record``), the bodies of ``POST /rosa/feedback``, ``PUT /rosa/users/{user}`` and
``POST /rosa/users/{user}/reset``, a state as JSON values and back, and the last check before vLLM's RPC.
Every error is a RosaError naming the field, raised before anything changes.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Dict, Mapping, Optional, Tuple

import torch

from ..common import validation as checks
from ..common.config import MODES
from .store import STATE_VERSION, UserState, check_user_id, make_state

#: The request fields (vLLM: ``vllm_xargs`` / ``SamplingParams.extra_args``) the plugin reads.
USER_KEY = "rosa_user"
RECORD_KEY = "rosa_record"
REQUEST_KEYS = (USER_KEY, RECORD_KEY)
_MAX_REQUEST_ID = 512
#: The largest prompt ``index`` a feedback may name (a completion request with more prompts is not rated).
MAX_INDEX = 10 ** 6
#: The fields of a feedback (``POST /rosa/feedback``).
FEEDBACK_FIELDS = ("user", "request_id", "reward", "index")
_INT64 = (-2 ** 63, 2 ** 63 - 1)


def request_fields(who: str, extra: Any) -> Optional[Tuple[str, bool]]:
    """``(user, record)`` of a request's extra arguments, or None when it names no user; RosaInputError
    naming the field for a bad one (an unknown ``rosa_*`` key too: a typo must not serve the base)."""
    if extra is None:
        return None
    if not isinstance(extra, Mapping):
        return None
    keys = [k for k in extra if isinstance(k, str) and k.startswith("rosa_") and k != "rosa_shift"]
    if not keys:
        return None
    unknown = [k for k in keys if k not in REQUEST_KEYS]
    if unknown:
        checks.fail(who, unknown[0], f"unknown ROSA request field {unknown[0]!r}; the fields are {list(REQUEST_KEYS)}")
    if USER_KEY not in extra:
        checks.fail(who, USER_KEY, f"`{RECORD_KEY}` needs `{USER_KEY}` (whose answer is recorded)")
    user = check_user_id(who, extra[USER_KEY], USER_KEY)
    record = extra.get(RECORD_KEY, False)
    if not isinstance(record, bool):
        if isinstance(record, str) and record.lower() in ("true", "false"):  # form-encoded clients
            record = record.lower() == "true"
        elif isinstance(record, int) and record in (0, 1):  # vLLM's vllm_xargs may turn JSON true into 1
            record = bool(record)
        else:
            checks.fail(who, RECORD_KEY, f"`{RECORD_KEY}` must be true or false, got {checks._show(record)}",
                        checks.RosaTypeError)
    return user, bool(record)


def check_request_id(who: str, request_id: Any) -> str:
    """``request_id`` if it is a plausible answer id (a non-empty str of at most 512 characters), else
    RosaTypeError naming ``request_id``."""
    if not isinstance(request_id, str) or not request_id or len(request_id) > _MAX_REQUEST_ID:
        checks.fail(who, "request_id", f"`request_id` must be the id of the answer (a non-empty str of at most "
                                       f"{_MAX_REQUEST_ID} characters), got {checks._show(request_id)}", checks.RosaTypeError)
    return request_id


def feedback_body(payload: Any, who: str = "feedback") -> Dict[str, Any]:
    """The body of ``POST /rosa/feedback`` checked and converted: ``{"user": str, "request_id": str,
    "reward": float, "index": int or None}``. RosaError naming the field (or ``body``) if bad.

    ``reward``: a finite real number; an int is converted to the nearest float (as :func:`rosa_ext.rosa_update`
    does), one too large for a float (beyond ~1.8e308) is refused. ``index``: absent or null, or an int in
    ``[0, MAX_INDEX]``. Called by the HTTP route in vLLM's front end before anything is sent to the engine
    (so every number that reaches it is an int64 or a float), and again by the engine.
    """
    if not isinstance(payload, Mapping):
        checks.fail(who, "body", "the request body must be a JSON object {user, request_id, reward, index?}, got "
                                 f"{checks._show(payload)}", checks.RosaTypeError)
    extra = sorted(str(k) for k in payload if k not in FEEDBACK_FIELDS)
    if extra:
        checks.fail(who, extra[0], f"unknown field(s) {extra}; the fields are {list(FEEDBACK_FIELDS)}")
    for k in ("user", "request_id", "reward"):
        if k not in payload:
            checks.fail(who, k, f"the field `{k}` is missing")
    user = check_user_id(who, payload["user"], "user")
    request_id = check_request_id(who, payload["request_id"])
    reward = payload["reward"]
    if isinstance(reward, (list, tuple, Mapping)):
        checks.fail(who, "reward", f"`reward` must be one number, got {checks._show(reward)}", checks.RosaTypeError)
    reward = checks.real(who, "reward", reward)
    index = payload.get("index")
    if index is not None:
        index = checks.integer(who, "index", index, minimum=0, maximum=MAX_INDEX)
    return {"user": user, "request_id": request_id, "reward": reward, "index": index}


def state_json(state: UserState) -> Dict[str, Any]:
    """A typed state as JSON values (the session's ``state_dict()`` format, tensors as lists of floats)."""
    out: Dict[str, Any] = {"version": STATE_VERSION, "mode": state.mode, "num_updates": int(state.num_updates),
                           "vocab_size": int(state.vocab_size), "hidden_size": int(state.hidden_size),
                           "lora_scale": float(state.lora_scale)}
    out.update({k: v.double().tolist() for k, v in state.tensors().items()})
    return out


def put_body(user: Any, body: Any, who: str = "put_user") -> Dict[str, Any]:
    """The body of ``PUT /rosa/users/{user}`` checked and converted: ``{"user": str, "state": state as JSON
    values}``. The body is a state (the session's ``state_dict()`` with lists); it may also hold ``user``
    (it must be the path's user) and ``revision`` (a non-negative int; ignored: a PUT replaces whatever is
    stored) -- so the output of ``GET /rosa/users/{user}?tensors=true`` goes back as is. The state's own
    sizes are checked here (the engine then checks them against its model). RosaError naming the field."""
    uid = check_user_id(who, user, "user")
    if not isinstance(body, Mapping):
        checks.fail(who, "state", f"the request body must be a state as a JSON object, got {checks._show(body)}",
                    checks.RosaTypeError)
    state = dict(body)
    if "user" in state:
        named = state.pop("user")
        if named != uid:
            checks.fail(who, "user", f"the body names user {checks._show(named)}, the path names {uid!r} (leave "
                                     "`user` out of the body to store a state under another user)")
    if "revision" in state:
        checks.integer(who, "revision", state.pop("revision"), minimum=0)  # ignored (the reply has the new one)
    st = make_state(who, state_from_json(who, state), check_zero=True)
    return {"user": uid, "state": state_json(st)}


def reset_body(user: Any, body: Any, who: str = "reset_user") -> Dict[str, Any]:
    """The body of ``POST /rosa/users/{user}/reset`` checked: absent, or ``{"mode": "hidden" | "lora"}``
    (``mode`` optional) -> ``{"user": str, "mode": str or None}``."""
    uid = check_user_id(who, user, "user")
    if body is None:
        body = {}
    if not isinstance(body, Mapping):
        checks.fail(who, "body", f"the request body must be absent or a JSON object {{mode?}}, got "
                                 f"{checks._show(body)}", checks.RosaTypeError)
    extra = sorted(str(k) for k in body if k != "mode")
    if extra:
        checks.fail(who, extra[0], f"unknown field(s) {extra}; the field is `mode` (optional)")
    mode = body.get("mode")
    return {"user": uid, "mode": None if mode is None else checks.choice(who, "mode", mode, MODES)}


def rpc_safe(who: str, obj: Any, name: str = "body") -> None:
    """Refuse (RosaInputError naming the field) a value that vLLM's RPC cannot carry: an int outside int64,
    or anything but JSON's None/bool/int/float/str/list/dict. The routes' own checks come first; this
    is the last check before the engine, so that no field reaches vLLM's packing unnamed."""
    stack = [(name, obj)]
    while stack:
        path, x = stack.pop()
        if isinstance(x, bool) or x is None or isinstance(x, (float, str)):
            continue
        if isinstance(x, int):
            if not _INT64[0] <= x <= _INT64[1]:
                checks.fail(who, path, f"`{path}` = {checks._show(x)} is outside the 64-bit integers")
        elif isinstance(x, Mapping):
            stack.extend((f"{path}[{k!r}]" if path != "body" else str(k), v) for k, v in x.items())
        elif isinstance(x, (list, tuple)):
            if all(type(v) is float for v in x):  # a state's values (fast path)
                continue
            stack.extend((path, v) for v in x)
        else:
            checks.fail(who, path, f"`{path}` holds {checks._show(x)}, not a JSON value", checks.RosaTypeError)


def state_from_json(who: str, obj: Any) -> Dict[str, Any]:
    """A state sent as JSON -> a state dict with float64 tensors (checked by the caller's
    :func:`~rosa_ext.integrations.store.make_state`); lists must hold real numbers (bools refused, an
    int too large for a float refused)."""
    if not isinstance(obj, Mapping):
        checks.fail(who, "state", f"`state` must be a JSON object (a state_dict() with lists), got {checks._show(obj)}",
                    checks.RosaTypeError)
    out: Dict[str, Any] = {}
    for k, v in obj.items():
        if k in ("delta", "a", "b"):
            name = f"state[{k!r}]"
            if not isinstance(v, (list, tuple)) or not all(isinstance(x, numbers.Real) and not isinstance(x, bool) for x in v):
                checks.fail(who, name, f"`{name}` must be a list of numbers, got {checks._show(v)}", checks.RosaTypeError)
            vals = []
            for x in v:
                try:
                    f = float(x)
                except OverflowError:
                    checks.fail(who, name, f"`{name}` holds {checks._show(x)}, too large for a float")
                if not math.isfinite(f):
                    checks.fail(who, name, f"`{name}` contains NaN or Inf", checks.RosaNonFiniteError)
                vals.append(f)
            out[k] = torch.tensor(vals, dtype=torch.float64)
        else:
            out[k] = v
    return out
