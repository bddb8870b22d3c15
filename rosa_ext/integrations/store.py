"""The one per-user store of ROSA states: :class:`RosaUsers`, a server that swaps users through one
session (:meth:`StateStore.step`), the vLLM plugin and the PEFT export all keep users here.

A user's adaptation is a typed state (:class:`HiddenState`: a shift ``delta`` (d,); :class:`LoraState`:
``a`` (d,), ``b`` (V,) and the scale ``s``), at most d + V numbers on the CPU, convertible to and from a
session's :meth:`~rosa_ext.integrations.session.RosaSession.state_dict`. The store is safe by
construction:

- **user ids are validated strings** (:func:`check_user_id`): 1-128 characters from ``A-Z a-z 0-9 _ . @
  + -``, starting with a letter or digit, no ``..``; so an id is never a path, never an object hashed by
  identity (a tensor), and ``1`` and ``"1"`` cannot be two spellings of one user (ints are refused);
- **copies in, copies out**: every write stores a private, validated copy; what a caller gets is a copy;
  a stored tensor is never written again (a write replaces the user's entry whole: copy-on-write);
- **per-user atomic, serialised read-update-write** (:meth:`update`, :meth:`update_many`, :meth:`step`):
  a per-user lock is held from the read to the write, so two threads (or two concurrent requests inside
  a server) updating one user are serialised and neither update is lost; a batched update locks its
  users in one order (no deadlock);
- **a failed update changes nothing**: the new state is computed and validated before anything is
  written, and written in one database transaction;
- **persistence** (``StateStore(path)``): SQLite from the standard library, one row per user, every
  write committed (WAL journal, ``synchronous=FULL``: fsync) before the call returns, so a process killed
  right after an acknowledged write (``kill -9``) loses nothing; a restarted server reads the users back.
  Without ``path`` the store lives in memory.

Every write also gives the user a new ``revision`` (an int that only grows, across users and restarts):
a server that caches a user's tensors (the vLLM plugin) or exports them (:mod:`.export`) knows from it
whether its copy is current.

    store = StateStore("users.sqlite")                   # or StateStore() in memory
    store.put("alice", session.state_dict())
    step = store.step("alice", session, ids, reward, response_start=p)   # load, update, store back
    state = store.state("alice")                          # a LoraState / HiddenState (a copy)
"""
from __future__ import annotations

import contextlib
import json
import numbers
import re
import sqlite3
import threading
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Dict, Iterator, List, Mapping, Optional, Sequence, Tuple, Union

import torch

from ..common import validation as checks
from . import checks as ichecks

#: The session's state format (rosa_ext.integrations.session keeps the same number).
STATE_VERSION = 1
#: A user id: 1-128 characters, letters, digits and ``_ . @ + -``, starting with a letter or digit.
USER_ID_RE = re.compile(r"[A-Za-z0-9][A-Za-z0-9_.@+\-]{0,127}")
#: The on-disk format of a store file.
_DB_FORMAT = 1
_DTYPES = {"float32": torch.float32, "float64": torch.float64, "bfloat16": torch.bfloat16, "float16": torch.float16}


def check_user_id(who: str, user_id: Any, name: str = "user_id") -> str:
    """``user_id`` if it is a valid user id, else a RosaTypeError (not a str) or RosaInputError (a bad
    str) naming ``name``. Valid: a str of 1-128 characters from ``A-Z a-z 0-9 _ . @ + -`` that starts
    with a letter or a digit and holds no ``..`` -- safe as a file or adapter name, and compared by value.
    """
    if not isinstance(user_id, str):
        checks.fail(who, name, f"`{name}` must be a str (letters, digits, '_.@+-'), got {checks._show(user_id)}"
                    + (" -- ints are refused so that 1 and '1' cannot name two users" if isinstance(user_id, numbers.Integral)
                       and not isinstance(user_id, bool) else ""), checks.RosaTypeError)
    if not USER_ID_RE.fullmatch(user_id) or ".." in user_id:
        checks.fail(who, name, f"`{name}` must be 1-128 characters from letters, digits and '_.@+-', start with a "
                               f"letter or digit and hold no '..'; got {checks._show(user_id)}")
    return user_id


# -- the two kinds of state ----------------------------------------------------------------------------
@dataclass(frozen=True)
class UserState:
    """Common part of a user's state: the model's sizes, the LoRA scale of the session format (kept in
    hidden mode too, as the session writes it) and the number of updates taken."""

    vocab_size: int
    hidden_size: int
    lora_scale: float
    num_updates: int

    mode = "none"

    def tensors(self) -> Dict[str, torch.Tensor]:  # pragma: no cover - overridden
        raise NotImplementedError

    def to_dict(self) -> Dict[str, Any]:
        """The session's ``state_dict()`` format, tensors copied."""
        sd: Dict[str, Any] = {"version": STATE_VERSION, "mode": self.mode, "num_updates": self.num_updates,
                              "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                              "lora_scale": self.lora_scale}
        sd.update({k: v.clone() for k, v in self.tensors().items()})
        return sd

    def copy(self) -> "UserState":
        """The same state with its own tensors."""
        return type(self)(**{**self.__dict__, **{k: v.clone() for k, v in self.tensors().items()}})

    @property
    def dtype(self) -> torch.dtype:
        return next(iter(self.tensors().values())).dtype


@dataclass(frozen=True)
class HiddenState(UserState):
    """Hidden mode: the lm_head input is ``h + delta``; ``delta`` (d,) on the CPU."""

    delta: torch.Tensor = field(default=None)  # type: ignore[assignment]
    mode = "hidden"

    def tensors(self) -> Dict[str, torch.Tensor]:
        return {"delta": self.delta}


@dataclass(frozen=True)
class LoraState(UserState):
    """LoRA mode: the logits get ``lora_scale * (a . h) * b``; ``a`` (d,), ``b`` (V,) on the CPU."""

    a: torch.Tensor = field(default=None)  # type: ignore[assignment]
    b: torch.Tensor = field(default=None)  # type: ignore[assignment]
    mode = "lora"

    def tensors(self) -> Dict[str, torch.Tensor]:
        return {"a": self.a, "b": self.b}


STATE_TYPES = {"hidden": HiddenState, "lora": LoraState}


def make_state(who: str, state: Any, *, mode: Optional[str] = None, vocab_size: Optional[int] = None,
               hidden_size: Optional[int] = None, lora_scale: Optional[float] = None, dtype: Optional[torch.dtype] = None,
               check_zero: bool = False, name: str = "state") -> UserState:
    """A validated private copy of ``state`` (a :class:`UserState` or a session ``state_dict()``) as a
    typed state on the CPU; RosaError naming ``state[...]`` if bad (nothing is kept of the input).

    ``mode``, ``vocab_size``, ``hidden_size``, ``lora_scale``: when given, the state must have them.
    ``dtype``: the tensors are converted to it (and must stay finite in it). ``check_zero``: a state with
    ``num_updates == 0`` must hold a zero ``delta`` / ``b`` (a fresh state).
    """
    if isinstance(state, UserState):
        state = state.to_dict()
    if not isinstance(state, Mapping):
        checks.fail(who, name, f"`{name}` must be a state dict (RosaSession.state_dict()) or a LoraState/HiddenState, "
                               f"got {checks._show(state)}", checks.RosaTypeError)
    m = state.get("mode")
    if m not in STATE_TYPES:
        checks.fail(who, f"{name}['mode']", f"`{name}['mode']` must be 'lora' or 'hidden', got {checks._show(m)}")
    if mode is not None and m != mode:
        checks.fail(who, f"{name}['mode']", f"`{name}` is a {m}-mode state; this store holds {mode}-mode states")
    sizes = {}
    for k, want in (("vocab_size", vocab_size), ("hidden_size", hidden_size)):
        v = state.get(k) if want is None else want
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or not 1 <= v <= checks.MAX_INT:
            checks.fail(who, f"{name}[{k!r}]", f"`{name}[{k!r}]` must be a positive int (at most 2**62), got "
                                               f"{checks._show(v)}")
        sizes[k] = int(v)
    s = checks.real(who, f"{name}['lora_scale']", state.get("lora_scale")) if lora_scale is None else float(lora_scale)
    if m == "lora" and s == 0:
        checks.fail(who, f"{name}['lora_scale']", "a lora-mode state needs a nonzero lora_scale")
    try:
        num, tensors = ichecks.session_state(who, state, version=STATE_VERSION, mode=m, vocab_size=sizes["vocab_size"],
                                            hidden_size=sizes["hidden_size"], lora_scale=s, check_zero=check_zero)
    except checks.RosaError as e:
        if name == "state":
            raise
        arg = e.argument.replace("state", name, 1) if e.argument else name
        raise type(e)(str(e).replace("`state", f"`{name}"), arg) from None
    out = {}
    for k, t in tensors.items():
        t = t.detach().to("cpu")
        t = t.to(dtype) if dtype is not None else t
        if not bool(torch.isfinite(t).all()):
            checks.fail(who, f"{name}[{k!r}]", f"`{name}[{k!r}]` overflows {t.dtype}", checks.RosaNonFiniteError)
        out[k] = t.clone().contiguous()
    return STATE_TYPES[m](vocab_size=sizes["vocab_size"], hidden_size=sizes["hidden_size"], lora_scale=s,
                          num_updates=num, **out)


def _blob(state: UserState) -> Tuple[str, bytes]:
    """(meta json, raw bytes of the tensors in order) for the database."""
    ts = state.tensors()
    dt = state.dtype
    name = next(k for k, v in _DTYPES.items() if v == dt)
    meta = {"mode": state.mode, "vocab_size": state.vocab_size, "hidden_size": state.hidden_size,
            "lora_scale": state.lora_scale, "num_updates": state.num_updates, "dtype": name,
            "tensors": list(ts)}
    raw = b"".join(t.contiguous().view(torch.uint8).numpy().tobytes() for t in ts.values())
    return json.dumps(meta), raw


def _unblob(meta_json: str, raw: bytes) -> UserState:
    meta = json.loads(meta_json)
    dt = _DTYPES[meta["dtype"]]
    flat = torch.frombuffer(bytearray(raw), dtype=torch.uint8).view(dt) if raw else torch.zeros(0, dtype=dt)
    d, V = meta["hidden_size"], meta["vocab_size"]
    sizes = {"delta": d, "a": d, "b": V}
    out, at = {}, 0
    for k in meta["tensors"]:
        out[k] = flat[at: at + sizes[k]].clone()
        at += sizes[k]
    if at != flat.numel():
        raise checks.RosaStateError(f"StateStore: a stored state holds {flat.numel()} values, expected {at} (corrupt file)",
                                    "path")
    return STATE_TYPES[meta["mode"]](vocab_size=V, hidden_size=d, lora_scale=float(meta["lora_scale"]),
                                     num_updates=int(meta["num_updates"]), **out)


@dataclass(frozen=True)
class _Entry:
    state: UserState
    revision: int


class StateStore:
    """user id -> typed ROSA state; thread-safe; copies in, copies out; persisted when ``path`` is given.

    Args:
        path: a SQLite file (created if missing; a restarted process reads its users back), or None
            for a store in memory.
        mode: "lora" or "hidden" to hold states of that mode only (None: either, per user).
        vocab_size, hidden_size: if given, every state must be for this V and d (one store per model;
            a file remembers the sizes of its first state and refuses others).
        lora_scale: if given, every state must have this scale.
    """

    def __init__(self, path: Union[str, Path, None] = None, *, mode: Optional[str] = None,
                 vocab_size: Optional[int] = None, hidden_size: Optional[int] = None,
                 lora_scale: Optional[float] = None) -> None:
        who = "StateStore"
        self.mode = None if mode is None else checks.choice(who, "mode", mode, tuple(STATE_TYPES))
        self.vocab_size = None if vocab_size is None else checks.integer(who, "vocab_size", vocab_size, minimum=1)
        self.hidden_size = None if hidden_size is None else checks.integer(who, "hidden_size", hidden_size, minimum=1)
        self.lora_scale = None if lora_scale is None else checks.real(who, "lora_scale", lora_scale)
        if path is not None and not isinstance(path, (str, Path)):
            checks.fail(who, "path", f"`path` must be a str or Path (a SQLite file) or None, got {checks._show(path)}",
                        checks.RosaTypeError)
        self.path = None if path is None else Path(path)
        self._lock = threading.RLock()  # the dict, the database connection, the revision counter
        self._user_locks: Dict[str, threading.RLock] = {}
        self._entries: Dict[str, _Entry] = {}
        self._revision = 0
        self._db: Optional[sqlite3.Connection] = None
        self._closed = False
        if self.path is not None:
            self._open()

    # -- persistence ---------------------------------------------------------------------------------
    def _open(self) -> None:
        who = "StateStore"
        if self.path.exists() and not self.path.is_file():
            checks.fail(who, "path", f"`path` {str(self.path)!r} exists and is not a file")
        if not self.path.parent.is_dir():
            checks.fail(who, "path", f"the folder of `path` {str(self.path.parent)!r} does not exist")
        try:
            db = sqlite3.connect(str(self.path), check_same_thread=False, isolation_level=None, timeout=30.0)
            db.execute("PRAGMA journal_mode=WAL")
            db.execute("PRAGMA synchronous=FULL")
            db.execute("CREATE TABLE IF NOT EXISTS meta (key TEXT PRIMARY KEY, value TEXT NOT NULL)")
            db.execute("CREATE TABLE IF NOT EXISTS users (user TEXT PRIMARY KEY, revision INTEGER NOT NULL, "
                       "meta TEXT NOT NULL, data BLOB NOT NULL)")
            meta = dict(db.execute("SELECT key, value FROM meta").fetchall())
        except sqlite3.DatabaseError as e:
            checks.fail(who, "path", f"`path` {str(self.path)!r} is not a usable SQLite store: {e}", checks.RosaStateError)
        fmt = meta.get("format")
        if fmt is not None and int(fmt) != _DB_FORMAT:
            checks.fail(who, "path", f"`path` holds a store of format {fmt}; this rosa-ext reads format {_DB_FORMAT}",
                        checks.RosaStateError)
        for k, mine in (("mode", self.mode), ("vocab_size", self.vocab_size), ("hidden_size", self.hidden_size)):
            have = meta.get(k)
            if have is not None and mine is not None and str(mine) != have:
                checks.fail(who, k, f"the store file {str(self.path)!r} holds states with {k}={have}, not {mine}",
                            checks.RosaStateError)
        with db:
            db.execute("INSERT OR IGNORE INTO meta VALUES ('format', ?)", (str(_DB_FORMAT),))
            for k in ("mode", "vocab_size", "hidden_size"):
                if getattr(self, k) is not None:
                    db.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (k, str(getattr(self, k))))
        if self.vocab_size is None and meta.get("vocab_size"):
            self.vocab_size = int(meta["vocab_size"])
        if self.hidden_size is None and meta.get("hidden_size"):
            self.hidden_size = int(meta["hidden_size"])
        row = db.execute("SELECT value FROM meta WHERE key = 'revision'").fetchone()
        self._revision = int(row[0]) if row else 0
        self._db = db

    def _write(self, states: Mapping[str, Optional[UserState]]) -> Dict[str, _Entry]:
        """Write every state (None: delete the user) in one transaction, then into memory; caller holds
        ``self._lock``. Returns the new entries. Raises (nothing written) if the database write fails."""
        new: Dict[str, _Entry] = {}
        rev = self._revision
        for u, st in states.items():
            if st is not None:
                rev += 1
                new[u] = _Entry(st, rev)
        if self._db is not None:
            try:
                self._db.execute("BEGIN IMMEDIATE")
                try:
                    for u, st in states.items():
                        if st is None:
                            self._db.execute("DELETE FROM users WHERE user = ?", (u,))
                            continue
                        meta, raw = _blob(st)
                        self._db.execute("INSERT INTO users VALUES (?, ?, ?, ?) ON CONFLICT(user) DO UPDATE SET "
                                         "revision = excluded.revision, meta = excluded.meta, data = excluded.data",
                                         (u, new[u].revision, meta, raw))
                    if self.vocab_size is None or self.hidden_size is None:
                        first = next((s for s in states.values() if s is not None), None)
                        if first is not None:
                            for k in ("vocab_size", "hidden_size"):
                                self._db.execute("INSERT OR IGNORE INTO meta VALUES (?, ?)", (k, str(getattr(first, k))))
                    self._db.execute("INSERT INTO meta VALUES ('revision', ?) ON CONFLICT(key) DO UPDATE SET "
                                     "value = excluded.value", (str(rev),))
                    self._db.execute("COMMIT")
                except BaseException:
                    self._db.execute("ROLLBACK")
                    raise
            except sqlite3.Error as e:
                checks.fail("StateStore", "path", f"writing the store file {str(self.path)!r} failed ({e}); nothing was "
                                                  "written", checks.RosaStateError)
        if self.vocab_size is None or self.hidden_size is None:
            first = next((s for s in states.values() if s is not None), None)
            if first is not None and self._db is not None:
                self.vocab_size, self.hidden_size = first.vocab_size, first.hidden_size
        self._revision = rev
        for u, st in states.items():
            if st is None:
                self._entries.pop(u, None)
            else:
                self._entries[u] = new[u]
        return new

    def _entry(self, uid: str) -> Optional[_Entry]:
        """The user's entry (read from the file on first use), or None; caller holds ``self._lock``."""
        if self._closed:
            checks.fail("StateStore", "self", "this store was closed", checks.RosaStateError)
        e = self._entries.get(uid)
        if e is None and self._db is not None:
            row = self._db.execute("SELECT revision, meta, data FROM users WHERE user = ?", (uid,)).fetchone()
            if row is not None:
                e = _Entry(_unblob(row[1], row[2]), int(row[0]))
                self._entries[uid] = e
        return e

    def close(self) -> None:
        """Close the file (a persisted store); the store cannot be used afterwards."""
        with self._lock:
            if self._db is not None:
                self._db.close()
                self._db = None
            self._entries.clear()
            self._closed = True

    # -- checks -------------------------------------------------------------------------------------
    def _checked(self, who: str, state: Any, *, check_zero: bool = False, name: str = "state") -> UserState:
        """A validated private copy of ``state`` for this store (RosaError naming ``state[...]`` if bad)."""
        if self._closed:
            checks.fail(who, "self", "this store was closed", checks.RosaStateError)
        return make_state(who, state, mode=self.mode, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                          lora_scale=self.lora_scale, check_zero=check_zero, name=name)

    def _user_lock(self, uid: str) -> threading.RLock:
        with self._lock:
            lk = self._user_locks.get(uid)
            if lk is None:
                lk = self._user_locks[uid] = threading.RLock()
            return lk

    @contextlib.contextmanager
    def locked(self, user_ids: Sequence[str]) -> Iterator[None]:
        """Hold the locks of these (validated) users, taken in sorted order: a read-update-write of them
        inside is atomic with respect to every other writer of those users."""
        locks = [self._user_lock(u) for u in sorted(set(user_ids))]
        with contextlib.ExitStack() as stack:
            for lk in locks:
                stack.enter_context(lk)
            yield

    # -- access ---------------------------------------------------------------------------------------
    def has(self, user_id: Any) -> bool:
        """Whether ``user_id`` has a stored state."""
        uid = check_user_id("StateStore.has", user_id)
        with self._lock:
            return self._entry(uid) is not None

    def _known(self, who: str, uid: str) -> _Entry:
        with self._lock:
            e = self._entry(uid)
        if e is None:
            checks.fail(who, "user_id", f"no state stored for user_id={uid!r} (put() it first; has() tells)")
        return e

    def get(self, user_id: Any) -> Dict[str, Any]:
        """A copy of the user's state in the session's ``state_dict()`` format (changing it changes nothing
        stored). Raises RosaInputError naming ``user_id`` for an unknown user."""
        uid = check_user_id("StateStore.get", user_id)
        return self._known("StateStore.get", uid).state.to_dict()

    def state(self, user_id: Any) -> UserState:
        """A copy of the user's typed state (:class:`LoraState` or :class:`HiddenState`)."""
        uid = check_user_id("StateStore.state", user_id)
        return self._known("StateStore.state", uid).state.copy()

    def revision(self, user_id: Any) -> int:
        """The revision of the user's current state (grows with every write, across users and restarts)."""
        uid = check_user_id("StateStore.revision", user_id)
        return self._known("StateStore.revision", uid).revision

    def peek(self, user_id: str) -> Optional[Tuple[UserState, int]]:
        """(state, revision) of a user WITHOUT a copy, or None: for readers that only read the tensors
        (a server applying the state); the store never writes a stored tensor, so it stays valid."""
        uid = check_user_id("StateStore.peek", user_id)
        with self._lock:
            e = self._entry(uid)
        return None if e is None else (e.state, e.revision)

    def put(self, user_id: Any, state: Any) -> int:
        """Store (a checked copy of) ``state`` for the user, replacing any earlier one; persisted before
        it returns. Returns the new revision."""
        who = "StateStore.put"
        uid = check_user_id(who, user_id)
        new = self._checked(who, state)
        with self._user_lock(uid), self._lock:
            return self._write({uid: new})[uid].revision

    def delete(self, user_id: Any) -> None:
        """Forget the user (RosaInputError naming ``user_id`` if unknown)."""
        who = "StateStore.delete"
        uid = check_user_id(who, user_id)
        with self._user_lock(uid), self._lock:
            if self._entry(uid) is None:
                checks.fail(who, "user_id", f"no state stored for user_id={uid!r}")
            self._write({uid: None})

    def users(self) -> List[str]:
        """The stored user ids, in the order they were first stored."""
        with self._lock:
            if self._closed:
                checks.fail("StateStore.users", "self", "this store was closed", checks.RosaStateError)
            if self._db is None:
                return list(self._entries)
            return [r[0] for r in self._db.execute("SELECT user FROM users ORDER BY rowid").fetchall()]

    def __len__(self) -> int:
        with self._lock:
            if self._closed:
                return 0
            if self._db is None:
                return len(self._entries)
            return int(self._db.execute("SELECT COUNT(*) FROM users").fetchone()[0])

    def __contains__(self, user_id: Any) -> bool:
        return self.has(user_id)

    def __repr__(self) -> str:
        where = "memory" if self.path is None else str(self.path)
        return f"StateStore({where}, mode={self.mode!r}, {'closed' if self._closed else f'users={len(self)}'})"

    # -- atomic read-update-write ---------------------------------------------------------------------
    def update(self, user_id: Any, fn: Callable[[Dict[str, Any]], Any]) -> Dict[str, Any]:
        """Replace the user's state by ``fn(copy of it)`` (a state dict in, a state dict or typed state
        out); returns a copy of the new state (dict).

        The user's lock is held from the read to the write: concurrent updates of one user run one after
        the other, each on the state the previous one wrote. ``fn`` works on a private copy; if it raises,
        or returns an invalid state, nothing is stored. A write to the same user from inside ``fn``
        (re-entrant, same thread) makes the update raise RosaStateError and store nothing.
        """
        who = "StateStore.update"
        uid = check_user_id(who, user_id)
        if not callable(fn):
            checks.fail(who, "fn", f"`fn` must be callable, got {checks._show(fn)}", checks.RosaTypeError)
        with self._user_lock(uid):
            old = self._known(who, uid)
            new = self._checked(who, fn(old.state.to_dict()))
            with self._lock:
                if self._entry(uid) is not old:
                    checks.fail(who, "user_id", f"the state of user_id={uid!r} was written during the update; nothing "
                                                "was stored (retry)", checks.RosaStateError)
                self._write({uid: new})
        return new.to_dict()

    def update_many(self, user_ids: Sequence[str], fn: Callable[[Dict[str, Optional[UserState]]], Mapping[str, Any]],
                    *, who: str = "StateStore.update_many") -> Dict[str, Tuple[UserState, int]]:
        """All-or-nothing update of several users: with their locks held, ``fn({user: copy of its typed
        state, or None if unknown})`` returns ``{user: new state}`` (users it leaves out are unchanged);
        every new state is validated, then all are written in one transaction. Returns ``{user: (copy of
        the new state, revision)}``. If ``fn`` raises or a state is invalid, nothing is written."""
        ids = [check_user_id(who, u, "users") for u in user_ids]
        if len(set(ids)) != len(ids):
            checks.fail(who, "users", "a user may appear once in one update")
        with self.locked(ids):
            with self._lock:
                old = {u: self._entry(u) for u in ids}
            out = fn({u: (None if e is None else e.state.copy()) for u, e in old.items()})
            if not isinstance(out, Mapping):
                checks.fail(who, "fn", f"the update must return a {{user: state}} mapping, got {checks._show(out)}",
                            checks.RosaTypeError)
            bad = [u for u in out if u not in old]
            if bad:
                checks.fail(who, "fn", f"the update returned states for users it was not given: {bad[:3]}")
            new = {u: self._checked(who, st, name=f"state[{u!r}]") for u, st in out.items()}
            with self._lock:
                for u in new:
                    if self._entry(u) is not old[u]:
                        checks.fail(who, "users", f"the state of {u!r} was written during the update; nothing was "
                                                  "stored (retry)", checks.RosaStateError)
                written = self._write(new)
        return {u: (e.state.copy(), e.revision) for u, e in written.items()}

    def step(self, user_id: Any, session: Any, *args: Any, create: bool = False, **kwargs: Any) -> Any:
        """One ROSA step for a user on a shared session: load the user's state, ``session.update(*args,
        **kwargs)``, store the result. Returns the step.

        The user's lock and the session's lock are held for the whole load-update-store, so two threads
        stepping users through one session cannot interleave (each step starts from its own user's
        state). ``create=True`` starts an unknown user from the base (``session.reset()``); otherwise an
        unknown user raises RosaInputError naming ``user_id``. If the update fails, the store is
        unchanged and the session is put back to the state it had before the call. Blocking only
        (``non_blocking`` is refused: the state must be stored after the step).
        """
        who = "StateStore.step"
        uid = check_user_id(who, user_id)
        checks.boolean(who, "create", create)
        if kwargs.get("non_blocking"):
            checks.fail(who, "non_blocking", "StateStore.step runs the update synchronously (its result is stored)")
        session_lock = getattr(session, "_lock", None)
        with self._user_lock(uid), (session_lock if session_lock is not None else contextlib.nullcontext()):
            with self._lock:
                old = self._entry(uid)
            if old is None and not create:
                checks.fail(who, "user_id", f"no state stored for user_id={uid!r} (put() it first, or create=True)")
            if old is not None and old.state.mode != session.mode:
                checks.fail(who, "user_id", f"user_id={uid!r} has a {old.state.mode}-mode state; the session is "
                                            f"{session.mode}-mode")
            before = session.state_dict()
            try:
                if old is None:
                    session.reset()
                else:
                    session.load_state_dict(old.state.to_dict())
                step = session.update(*args, **kwargs)
                new = self._checked(who, session.state_dict())
                with self._lock:
                    if self._entry(uid) is not old:
                        checks.fail(who, "user_id", f"user_id={uid!r} was written during the update; nothing was "
                                                    "stored", checks.RosaStateError)
                    self._write({uid: new})
            except BaseException:
                session.load_state_dict(before)
                raise
        return step


def finite_state_update(who: str, state: UserState, update: torch.Tensor, name: str = "update") -> UserState:
    """``state`` plus a flat step ``update`` (d,) (hidden) or (d + V,) (``[delta_a, delta_b]``), one more
    update counted; RosaNonFiniteError naming ``name`` if the step or the result is not finite."""
    d, V = state.hidden_size, state.vocab_size
    P = d if state.mode == "hidden" else d + V
    upd = checks.float_tensor(who, name, update)
    if tuple(upd.shape) != (P,):
        checks.fail(who, name, f"`{name}` must be ({P},), got {tuple(upd.shape)}")
    checks.finite(who, name, upd)
    upd = upd.detach().to(device="cpu", dtype=state.dtype)
    if isinstance(state, HiddenState):
        new: UserState = HiddenState(vocab_size=V, hidden_size=d, lora_scale=state.lora_scale,
                                     num_updates=state.num_updates + 1, delta=state.delta + upd)
    else:
        new = LoraState(vocab_size=V, hidden_size=d, lora_scale=state.lora_scale, num_updates=state.num_updates + 1,
                        a=state.a + upd[:d], b=state.b + upd[d:])
    for k, t in new.tensors().items():
        if not bool(torch.isfinite(t).all()):
            checks.fail(who, name, f"`{name}` makes the state's {k!r} overflow {t.dtype}", checks.RosaNonFiniteError)
    return new
