"""Per-user ROSA states for serving many users from one model.

A user's adaptation is a session ``state_dict()`` (d + V numbers at most, on the CPU).
:class:`StateStore` keeps one per user id and hands out copies: what a caller does with a
state it got never reaches the store, and every write replaces a user's entry whole
(copy-on-write), so a failed update leaves the stored state as it was and no two users ever
share a tensor.

    store = StateStore()
    store.put("alice", session.state_dict())
    step = store.step("alice", session, ids, reward, response_start=p)  # load, update, store back
    save_peft(store.get("alice"), out_dir)                                # serve it (lora mode)
"""
from __future__ import annotations

import numbers
import threading
from typing import Any, Callable, Dict, Hashable, List, Mapping, Optional

import torch

from ..common import validation as checks
from . import checks as ichecks
from .session import _STATE_VERSION


def _copy(state: Mapping[str, Any]) -> Dict[str, Any]:
    """A deep copy: tensors cloned on the CPU, other values as they are (ints, floats, strs)."""
    return {k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v) for k, v in state.items()}


def _check_user(who: str, user_id: Any) -> Hashable:
    if isinstance(user_id, bool) or not isinstance(user_id, (str, numbers.Integral)) or user_id == "":
        checks.fail(who, "user_id", f"`user_id` must be a non-empty str or an int, got {checks._show(user_id)}", checks.RosaTypeError)
    return user_id


class StateStore:
    """user id -> session ``state_dict()``; thread-safe; copies in, copies out.

    Args:
        vocab_size, hidden_size: if given, every stored state must be for this V and d
            (one store per model); otherwise each state is checked against its own sizes.
    """

    def __init__(self, *, vocab_size: Optional[int] = None, hidden_size: Optional[int] = None) -> None:
        self.vocab_size = None if vocab_size is None else checks.integer("StateStore", "vocab_size", vocab_size, minimum=1)
        self.hidden_size = None if hidden_size is None else checks.integer("StateStore", "hidden_size", hidden_size, minimum=1)
        self._states: Dict[Hashable, Dict[str, Any]] = {}
        self._lock = threading.Lock()

    # -- checks ------------------------------------------------------------------------------
    def _checked(self, who: str, state: Any) -> Dict[str, Any]:
        """A validated private copy of ``state`` (RosaError naming ``state[...]`` if bad)."""
        if not isinstance(state, Mapping):
            checks.fail(who, "state", f"`state` must be a dict from RosaSession.state_dict(), got {checks._show(state)}",
                   checks.RosaTypeError)
        mode = state.get("mode")
        if mode not in ("lora", "hidden"):
            checks.fail(who, "state['mode']", f"`state['mode']` must be 'lora' or 'hidden', got {mode!r}")
        Vs = self.vocab_size if self.vocab_size is not None else state.get("vocab_size")
        d = self.hidden_size if self.hidden_size is not None else state.get("hidden_size")
        for k, v in (("vocab_size", Vs), ("hidden_size", d)):
            if isinstance(v, bool) or not isinstance(v, numbers.Integral) or v < 1:
                checks.fail(who, f"state[{k!r}]", f"`state[{k!r}]` must be a positive int, got {checks._show(v)}")
        shard = (state.get("vocab_start"), state.get("vocab_rows")) if "vocab_start" in state else None
        ichecks.session_state(who, state, version=_STATE_VERSION, mode=mode, vocab_size=int(Vs), hidden_size=int(d),
                        lora_scale=checks.real(who, "state['lora_scale']", state.get("lora_scale")),
                        check_zero=False, shard=shard)
        return _copy(state)

    # -- access ------------------------------------------------------------------------------
    def has(self, user_id: Any) -> bool:
        """Whether ``user_id`` has a stored state."""
        uid = _check_user("StateStore.has", user_id)
        with self._lock:
            return uid in self._states

    def get(self, user_id: Any) -> Dict[str, Any]:
        """A copy of the user's state (changing it changes nothing stored).
        Raises RosaInputError naming ``user_id`` for an unknown user."""
        uid = _check_user("StateStore.get", user_id)
        with self._lock:
            state = self._states.get(uid)
        if state is None:
            checks.fail("StateStore.get", "user_id", f"no state stored for user_id={uid!r} (put() it first; has() tells)")
        return _copy(state)

    def put(self, user_id: Any, state: Mapping[str, Any]) -> None:
        """Store (a checked copy of) ``state`` for the user, replacing any earlier one."""
        uid = _check_user("StateStore.put", user_id)
        new = self._checked("StateStore.put", state)
        with self._lock:
            self._states[uid] = new

    def delete(self, user_id: Any) -> None:
        """Forget the user (RosaInputError naming ``user_id`` if unknown)."""
        uid = _check_user("StateStore.delete", user_id)
        with self._lock:
            if self._states.pop(uid, None) is None:
                checks.fail("StateStore.delete", "user_id", f"no state stored for user_id={uid!r}")

    def users(self) -> List[Hashable]:
        """The stored user ids, in insertion order."""
        with self._lock:
            return list(self._states)

    def __len__(self) -> int:
        with self._lock:
            return len(self._states)

    def __contains__(self, user_id: Any) -> bool:
        return self.has(user_id)

    # -- copy-on-write updates ---------------------------------------------------------------
    def update(self, user_id: Any, fn: Callable[[Dict[str, Any]], Mapping[str, Any]]) -> Dict[str, Any]:
        """Replace the user's state by ``fn(copy of it)``; returns a copy of the new state.

        ``fn`` works on a private copy; if it raises, or returns an invalid state, the stored
        state is left as it was. The swap is atomic; if the entry changed meanwhile (another
        writer), the update raises RosaStateError and changes nothing.
        """
        who = "StateStore.update"
        uid = _check_user(who, user_id)
        if not callable(fn):
            checks.fail(who, "fn", f"`fn` must be callable, got {checks._show(fn)}", checks.RosaTypeError)
        with self._lock:
            old = self._states.get(uid)
        if old is None:
            checks.fail(who, "user_id", f"no state stored for user_id={uid!r} (put() it first)")
        new = self._checked(who, fn(_copy(old)))
        with self._lock:
            if self._states.get(uid) is not old:
                checks.fail(who, "user_id", f"the state of user_id={uid!r} changed during the update; nothing was "
                                       "stored (retry)", checks.RosaStateError)
            self._states[uid] = new
        return _copy(new)

    def step(self, user_id: Any, session: Any, *args: Any, create: bool = False, **kwargs: Any) -> Any:
        """One ROSA step for a user on a shared session: load the user's state, ``session.update(*args,
        **kwargs)``, store the result. Returns the step.

        ``create=True`` starts an unknown user from the base (``session.reset()``); otherwise an
        unknown user raises RosaInputError naming ``user_id``. If the update fails, the store is
        unchanged and the session is put back to the state it had before the call. Blocking only
        (``non_blocking`` is refused: the state must be stored after the step).
        """
        who = "StateStore.step"
        uid = _check_user(who, user_id)
        checks.boolean(who, "create", create)
        if kwargs.get("non_blocking"):
            checks.fail(who, "non_blocking", "StateStore.step runs the update synchronously (its result is stored)")
        if not self.has(uid) and not create:
            checks.fail(who, "user_id", f"no state stored for user_id={uid!r} (put() it first, or create=True)")
        before = session.state_dict()

        def run(state: Dict[str, Any]) -> Dict[str, Any]:
            if state is None:
                session.reset()
            else:
                session.load_state_dict(state)
            run.step = session.update(*args, **kwargs)
            return session.state_dict()

        try:
            if self.has(uid):
                self.update(uid, run)
            else:
                new = self._checked(who, run(None))
                with self._lock:
                    if uid in self._states:
                        checks.fail(who, "user_id", f"user_id={uid!r} was stored during the update; nothing was stored",
                               checks.RosaStateError)
                    self._states[uid] = new
        except BaseException:
            session.load_state_dict(before)
            raise
        return run.step
