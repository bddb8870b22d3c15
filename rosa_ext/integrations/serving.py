"""ROSA inside a serving engine, free of the engine: per-request user states, recorded lm_head inputs,
and the feedback step, for the vLLM plugin (:mod:`.vllm_plugin`) or any engine that computes its logits
as ``W h`` and knows which row belongs to which request.

:class:`RosaServing` lives in the engine's process, next to the model:

- **admission** (:meth:`RosaServing.admit`): a request that names a user (``rosa_user``) gets that
  user's state as it is now (a snapshot: the answer is generated with one state; the next request sees a
  later one). A request that also asks for feedback (``rosa_record``) reserves room for its lm_head
  inputs, ``cap x d`` numbers (``cap`` = its token limit), from a server budget
  (``max_record_mb``); when the budget is spent the request is served but not recorded, and feedback on
  it is a clear error.
- **the logits** (:meth:`RosaServing.logits`): for the rows of one decoding step, hidden-mode users'
  rows become ``h + delta`` before the head (``(h + delta) W^T``); LoRA users' rows get
  ``s (a . h) b`` added after it; every other row is the engine's own result, bitwise. The base rows
  ``h`` of recording requests are copied into their buffers at their output position (a row computed
  again -- a chunked prefill, a preempted request -- overwrites the same position).
- **feedback** (:meth:`RosaServing.feedback`): a reward for a finished, recorded request runs one
  :func:`~rosa_ext.rosa_update` on its recorded rows and generated tokens (no second forward, no second
  model) from the user's current state, and writes the new state to the
  :class:`~rosa_ext.integrations.store.StateStore` (per-user atomic; persisted before the reply when the
  store has a file). A recording is used once, and freed when rated, when the user has
  ``max_pending`` newer recordings, or ``window_s`` seconds after its request started.

Every error is a RosaError naming the field of the request or of the feedback (``user``,
``request_id``, ``reward``, ``rosa_user``, ...), raised before anything changes.
"""
from __future__ import annotations

import collections
import threading
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Callable, Deque, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..common import defaults
from ..common import validation as checks
from ..common.config import MODES, RosaConfig, compute_dtype_of, resolve
from ..core.op import rosa_update
from .head_hooks import init_lora_a
from .serving_requests import (  # noqa: F401 -- re-exported: the request checks belong to serving's interface
    FEEDBACK_FIELDS,
    MAX_INDEX,
    RECORD_KEY,
    REQUEST_KEYS,
    USER_KEY,
    check_request_id,
    feedback_body,
    put_body,
    request_fields,
    reset_body,
    rpc_safe,
    state_from_json,
    state_json,
)
from .store import STATE_VERSION, HiddenState, LoraState, StateStore, UserState, check_user_id, finite_state_update, make_state


@dataclass
class ServingConfig:
    """The server's ROSA settings (validated by :meth:`from_mapping`).

    Attributes:
        store: the SQLite file of the user states (None: in memory, lost at exit).
        mode: the mode of a new user's state ("hidden" or "lora"); a user keeps the mode of its state.
        lora_scale, seed: the LoRA scale s and the seed of a new LoRA user's ``a`` (as ``attach``).
        options: the step's options (a :class:`~rosa_ext.common.config.RosaConfig` in this mode: beta,
            damping, damping_mode, max_iter, tol, solver, backend; each step takes its user's mode and scale).
        max_record_mb: the budget of recorded lm_head inputs, over all requests (MiB).
        max_pending: recordings kept per user awaiting feedback (the oldest is freed beyond it).
        window_s: a recording is freed this many seconds after its request started.
    """

    store: Optional[str] = None
    mode: str = "hidden"
    lora_scale: float = defaults.LORA_SCALE
    seed: int = 0
    options: RosaConfig = field(default_factory=lambda: RosaConfig(mode="hidden"))
    max_record_mb: float = 256.0
    max_pending: int = 4
    window_s: float = 900.0

    @classmethod
    def from_mapping(cls, cfg: Any, who: str = "RosaServing") -> "ServingConfig":
        if cfg is None:
            cfg = {}
        if not isinstance(cfg, Mapping):
            checks.fail(who, "config", f"the ROSA config must be a JSON object, got {checks._show(cfg)}", checks.RosaTypeError)
        known = {"store", "mode", "lora_scale", "seed", "max_record_mb", "max_pending", "window_s", "beta", "damping",
                 "damping_mode", "max_iter", "tol", "solver", "backend"}
        extra = sorted(set(cfg) - known)
        if extra:
            checks.fail(who, f"config[{extra[0]!r}]", f"unknown ROSA setting(s) {extra}; known: {sorted(known)}")
        store = cfg.get("store")
        if store is not None and not isinstance(store, str):
            checks.fail(who, "config['store']", f"`store` must be a file path (str) or null, got {checks._show(store)}",
                        checks.RosaTypeError)
        mode = checks.choice(who, "config['mode']", cfg.get("mode", "hidden"), MODES)
        s = checks.real(who, "config['lora_scale']", cfg.get("lora_scale", defaults.LORA_SCALE))
        if s == 0:
            checks.fail(who, "config['lora_scale']", "lora_scale must be nonzero")
        opts = resolve(who, None, dict({k: cfg[k] for k in ("beta", "damping", "damping_mode", "max_iter", "tol", "solver",
                                                            "backend") if k in cfg}, mode=mode, lora_scale=s))
        return cls(store=store, mode=mode, lora_scale=s, seed=checks.seed(who, cfg.get("seed", 0)), options=opts,
                   max_record_mb=checks.real(who, "config['max_record_mb']", cfg.get("max_record_mb", 256.0), minimum=0.0),
                   max_pending=checks.integer(who, "config['max_pending']", cfg.get("max_pending", 4), minimum=1),
                   window_s=checks.real(who, "config['window_s']", cfg.get("window_s", 900.0), minimum=0.0, strict=True))


@dataclass
class Recording:
    """One request of a user: its state snapshot and, if recorded, its lm_head inputs."""

    key: str
    user: str
    internal_id: str
    state: Optional[UserState]
    revision: int
    outputs: List[int]
    record: bool
    cap: int = 0
    buf: Optional[torch.Tensor] = None
    filled: Optional[torch.Tensor] = None
    reserved: int = 0
    refused: Optional[str] = None
    created: float = field(default_factory=time.monotonic)


@dataclass
class BatchPlan:
    """Which rows of one step get what: built from the batch's recordings, reused until it changes."""

    hidden_rows: torch.Tensor
    delta: torch.Tensor
    lora_rows: torch.Tensor
    a: torch.Tensor
    b: torch.Tensor
    record_rows: List[Tuple[int, Recording]]

    @property
    def empty(self) -> bool:
        return not self.hidden_rows.numel() and not self.lora_rows.numel() and not self.record_rows


class RosaServing:
    """The server-side ROSA of one engine process (module doc).

    Args:
        config: a :class:`ServingConfig` (or a mapping for :meth:`ServingConfig.from_mapping`).
    :meth:`configure` (the model's V, d, dtype; opens the store) comes when the engine starts,
    :meth:`attach_head` (the lm_head weight the steps use) at the first logits computation.
    """

    def __init__(self, config: Any) -> None:
        self.config = config if isinstance(config, ServingConfig) else ServingConfig.from_mapping(config)
        self.lock = threading.RLock()
        self.weight: Optional[torch.Tensor] = None
        self.bias: Optional[torch.Tensor] = None
        self.store: Optional[StateStore] = None
        self.vocab_size = self.hidden_size = 0
        self.recordings: Dict[str, Recording] = {}
        self.closed: "collections.OrderedDict[str, str]" = collections.OrderedDict()
        self.per_user: Dict[str, Deque[str]] = {}
        #: recorded completion requests -> how many of their prompts were recorded ("<id>-<i>": i < count)
        self.prompts: "collections.OrderedDict[str, int]" = collections.OrderedDict()
        self.reserved = 0
        #: recent requests by engine id: a request seen again (resumed after preemption) keeps its snapshot
        self.active: "collections.OrderedDict[str, Recording]" = collections.OrderedDict()
        self._dev_cache: "collections.OrderedDict[Tuple[str, int], Dict[str, torch.Tensor]]" = collections.OrderedDict()
        self._a0: Optional[torch.Tensor] = None

    # -- the model --------------------------------------------------------------------------------
    def configure(self, vocab_size: int, hidden_size: int, dtype: torch.dtype) -> None:
        """The model's V, d and dtype (known when the engine starts); opens the store (its file must hold
        states of this V and d)."""
        with self.lock:
            if self.store is not None:
                if (vocab_size, hidden_size) != (self.vocab_size, self.hidden_size):
                    raise checks.RosaStateError(f"RosaServing: configured again with V={vocab_size}, d={hidden_size}; "
                                                f"it serves V={self.vocab_size}, d={self.hidden_size}", "model")
                return
            self.vocab_size, self.hidden_size = int(vocab_size), int(hidden_size)
            self.dtype = compute_dtype_of(dtype)
            self._a0 = init_lora_a(1, self.hidden_size, self.config.seed, self.dtype, "cpu")[0]
            path = None if self.config.store is None else Path(self.config.store)
            self.store = StateStore(path, vocab_size=self.vocab_size, hidden_size=self.hidden_size)

    def attach_head(self, weight: torch.Tensor, bias: Optional[torch.Tensor] = None) -> None:
        """The lm_head weight (V, d) (and bias) the feedback steps use (the model's own tensor, not a
        copy); configures the sizes if :meth:`configure` was not called."""
        with self.lock:
            if self.store is None:
                self.configure(int(weight.shape[0]), int(weight.shape[1]), weight.dtype)
            if tuple(weight.shape) != (self.vocab_size, self.hidden_size):
                raise checks.RosaStateError(f"RosaServing: the lm_head is {tuple(weight.shape)}, the model was "
                                            f"configured with V={self.vocab_size}, d={self.hidden_size}", "model")
            self.weight, self.bias = weight, bias

    @property
    def ready(self) -> bool:
        return self.weight is not None

    def _need_store(self, who: str) -> None:
        if self.store is None:
            checks.fail(who, "model", "the engine has not started yet; retry once the server is up", checks.RosaStateError)

    def _need_head(self, who: str) -> None:
        self._need_store(who)
        if self.weight is None:
            checks.fail(who, "model", "the model has not computed logits yet; retry once it has", checks.RosaStateError)

    def new_state(self, mode: Optional[str] = None) -> UserState:
        """A new user's state (the base model): delta = 0, or a = the seeded init and b = 0."""
        mode = mode or self.config.mode
        common = dict(vocab_size=self.vocab_size, hidden_size=self.hidden_size, lora_scale=self.config.lora_scale,
                      num_updates=0)
        if mode == "hidden":
            return HiddenState(**common, delta=torch.zeros(self.hidden_size, dtype=self.dtype))
        return LoraState(**common, a=self._a0.clone(), b=torch.zeros(self.vocab_size, dtype=self.dtype))

    # -- admission --------------------------------------------------------------------------------
    def admit(self, key: str, internal_id: str, extra: Any, outputs: List[int], max_tokens: Optional[int]
              ) -> Optional[Recording]:
        """A request entering the engine: None if it names no user, else its :class:`Recording` (the
        user's state snapshot, and a reserved buffer if it asked to be recorded). A request seen again
        (resumed after preemption) keeps its recording."""
        who = "RosaServing.admit"
        fields = request_fields(who, extra)
        if fields is None:
            return None
        user, record = fields
        with self.lock:
            self._need_store(who)
            rec = self.active.get(internal_id)
            if rec is not None:
                rec.outputs = outputs  # resumed: same request, same state and recording (the engine's current list)
                self.active.move_to_end(internal_id)
                return rec
            self._sweep()
            snap = self.store.peek(user)
            st, rev = (None, 0) if snap is None else snap
            rec = Recording(key=key, user=user, internal_id=internal_id, state=st, revision=rev, outputs=outputs,
                            record=record)
            self.active[internal_id] = rec
            while len(self.active) > 4096:
                self.active.popitem(last=False)
            if not record:
                return rec
            if key in self.recordings or key in self.closed:  # the same id twice: rate neither
                old = self.recordings.pop(key, None)
                if old is not None:
                    self._free(old)
                self._close(key, f"two requests used the id {key!r}; neither can be rated (give each request its own id)")
                rec.record = False
                return rec
            self._count_prompt(key)
            cap = max_tokens if isinstance(max_tokens, int) and max_tokens > 0 else 0
            need = cap * self.hidden_size * 4  # rows kept in the head's dtype: at most 4 bytes a number
            budget = int(self.config.max_record_mb * 2 ** 20)
            if cap == 0:
                rec.refused = "it has no token limit (max_tokens) to size its recording"
            elif self.reserved + need > budget:
                rec.refused = (f"the server's recording budget was spent when it started ({self.config.max_record_mb:g} MiB "
                               f"over all requests awaiting feedback: rate or let answers expire, or raise max_record_mb)")
            if rec.refused is not None:
                rec.record = False
                self.recordings[key] = rec  # kept so that feedback on it explains why
                self._queue(rec)
                return rec
            rec.cap, rec.reserved = cap, need
            self.reserved += need
            self.recordings[key] = rec
            self._queue(rec)
            return rec

    def _count_prompt(self, key: str) -> None:
        """Remember that prompt i of the completion request ``<id>`` was recorded (key ``<id>-<i>``), so that
        a feedback naming an index past its prompts can say which indices exist."""
        base, sep, tail = key.rpartition("-")
        if sep and base and tail.isdigit() and len(tail) <= 7:
            self.prompts[base] = max(self.prompts.get(base, 0), int(tail) + 1)
            self.prompts.move_to_end(base)
            while len(self.prompts) > 100_000:
                self.prompts.popitem(last=False)

    def _queue(self, rec: Recording) -> None:
        q = self.per_user.setdefault(rec.user, collections.deque())
        q.append(rec.key)
        while len(q) > self.config.max_pending:
            old = self.recordings.pop(q.popleft(), None)
            if old is not None:
                self._free(old)
                self._close(old.key, f"the feedback window of {old.key!r} closed: its user has {self.config.max_pending} "
                                     "newer answers awaiting feedback (max_pending)")

    def _free(self, rec: Recording) -> None:
        self.reserved -= rec.reserved
        rec.reserved, rec.buf, rec.filled, rec.record = 0, None, None, False
        q = self.per_user.get(rec.user)
        if q is not None:
            try:
                q.remove(rec.key)
            except ValueError:
                pass
            if not q:
                del self.per_user[rec.user]

    def _close(self, key: str, why: str) -> None:
        self.closed[key] = why
        self.closed.move_to_end(key)
        while len(self.closed) > 100_000:
            self.closed.popitem(last=False)

    def _sweep(self) -> None:
        limit = time.monotonic() - self.config.window_s
        for key in [k for k, r in self.recordings.items() if r.created < limit]:
            rec = self.recordings.pop(key)
            self._free(rec)
            self._close(key, f"the feedback window of {key!r} closed ({self.config.window_s:g} s after it started)")

    # -- one decoding step ------------------------------------------------------------------------
    def _tensors(self, rec: Recording, device: torch.device) -> Optional[Dict[str, torch.Tensor]]:
        st = rec.state
        if st is None or st.num_updates == 0:
            return None  # the base model, bitwise
        k = (rec.user, rec.revision)
        t = self._dev_cache.get(k)
        if t is None:
            t = {n: v.to(device=device, dtype=torch.float32) for n, v in st.tensors().items()}
            self._dev_cache[k] = t
            while len(self._dev_cache) > 64:  # the states of the batches in flight (d + V numbers each)
                self._dev_cache.popitem(last=False)
        else:
            self._dev_cache.move_to_end(k)
        return t

    def plan(self, rows: Sequence[Optional[Recording]], device: torch.device) -> BatchPlan:
        """The :class:`BatchPlan` of a batch whose row i is ``rows[i]`` (None: no user)."""
        h_idx, deltas, l_idx, As, Bs, rec_rows = [], [], [], [], [], []
        with self.lock:
            for i, rec in enumerate(rows):
                if rec is None:
                    continue
                t = self._tensors(rec, device)
                if t is not None:
                    if "delta" in t:
                        h_idx.append(i)
                        deltas.append(t["delta"])
                    else:
                        l_idx.append(i)
                        As.append(t["a"])
                        Bs.append(t["b"])
                if rec.record:
                    rec_rows.append((i, rec))
        d, V = self.hidden_size, self.vocab_size
        z = torch.zeros(0, dtype=torch.long, device=device)
        return BatchPlan(hidden_rows=torch.tensor(h_idx, dtype=torch.long, device=device) if h_idx else z,
                         delta=torch.stack(deltas) if deltas else torch.zeros(0, d, device=device),
                         lora_rows=torch.tensor(l_idx, dtype=torch.long, device=device) if l_idx else z,
                         a=torch.stack(As) if As else torch.zeros(0, d, device=device),
                         b=torch.stack(Bs) if Bs else torch.zeros(0, V, device=device), record_rows=rec_rows)

    def logits(self, hidden: torch.Tensor, plan: BatchPlan, head: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """The logits of one step's rows ``hidden`` (n, d): ``head(h)`` with each user's state applied
        (module doc); records the base rows of recording requests."""
        h = hidden
        if plan.hidden_rows.numel():
            h = hidden.clone()
            h[plan.hidden_rows] = (hidden[plan.hidden_rows].float() + plan.delta).to(hidden.dtype)
        out = head(h)
        if plan.lora_rows.numel():
            V = self.vocab_size
            coef = self.config.lora_scale * (hidden[plan.lora_rows].float() * plan.a).sum(-1, keepdim=True)
            out[plan.lora_rows, :V] = (out[plan.lora_rows, :V].float() + coef * plan.b).to(out.dtype)
        if plan.record_rows:
            with self.lock:
                for i, rec in plan.record_rows:
                    if not rec.record:  # freed meanwhile (evicted)
                        continue
                    pos = len(rec.outputs)
                    if pos >= rec.cap:
                        rec.refused = f"it produced more than its {rec.cap} recorded tokens"
                        self.recordings.pop(rec.key, None)
                        self._free(rec)
                        self._close(rec.key, f"request {rec.key!r} was not recorded: {rec.refused}")
                        continue
                    if rec.buf is None:
                        rec.buf = torch.empty(rec.cap, self.hidden_size, dtype=hidden.dtype, device=hidden.device)
                        rec.filled = torch.zeros(rec.cap, dtype=torch.bool)
                    rec.buf[pos] = hidden[i]
                    rec.filled[pos] = True
        return out

    # -- feedback ---------------------------------------------------------------------------------
    def _find(self, who: str, user: str, request_id: Any, index: Any) -> Recording:
        request_id = check_request_id(who, request_id)
        if index is not None:
            index = checks.integer(who, "index", index, minimum=0, maximum=MAX_INDEX)
        keys = [request_id] if index is None else []
        keys.append(f"{request_id}-{0 if index is None else index}")  # a completion's prompt i: "<id>-<i>"
        for k in keys:
            rec = self.recordings.get(k)
            if rec is not None and rec.user == user:
                return rec
        for k in keys:
            if k in self.closed:
                checks.fail(who, "request_id", self.closed[k], checks.RosaStateError)
        if index is not None:
            n = self.prompts.get(request_id)
            if n is not None and index >= n:
                checks.fail(who, "index", f"`index` must be in [0, {n - 1}]: request {request_id!r} has {n} recorded "
                                          f"prompt(s), got index={index}")
            if request_id in self.recordings or request_id in self.closed:
                checks.fail(who, "index", f"answer {request_id!r} is a single answer (a chat completion, or a "
                                          "prompt's own id): leave `index` out")
        checks.fail(who, "request_id", f"no recorded answer {request_id!r} of user {user!r} awaits feedback (was it "
                                       f"sent with {USER_KEY}={user!r} and {RECORD_KEY}=true?)")

    def feedback(self, user: Any, request_id: Any, reward: Any, index: Any = None, *,
                 running: Optional[Callable[[str], bool]] = None) -> Dict[str, Any]:
        """One ROSA step for ``user`` on its recorded answer ``request_id`` with ``reward``; returns a
        summary (``num_updates``, ``tokens``, ``revision``, ``step_ms``). ``running(internal_id)`` says
        whether the request is still generating (then refused). All checks come first; a failed step
        (bad reward, a numerical error) changes nothing and keeps the recording for a retry."""
        who = "feedback"
        uid = check_user_id(who, user, "user")
        check_request_id(who, request_id)
        with self.lock:
            self._need_head(who)
            r = checks.one_reward(who, reward, self.dtype)
            self._sweep()
            rec = self._find(who, uid, request_id, index)
            if rec.refused is not None:
                checks.fail(who, "request_id", f"request {rec.key!r} was not recorded: {rec.refused}", checks.RosaStateError)
            if running is not None and running(rec.internal_id):
                checks.fail(who, "request_id", f"request {rec.key!r} is still generating; rate it once its answer is "
                                               "complete", checks.RosaStateError)
            T = len(rec.outputs)
            if T == 0 or rec.buf is None:
                checks.fail(who, "request_id", f"request {rec.key!r} generated no token to rate", checks.RosaStateError)
            tokens = list(rec.outputs[:T])
            if any((not isinstance(t, int)) or t < 0 or t >= self.vocab_size for t in tokens) or not bool(rec.filled[:T].all()):
                checks.fail(who, "request_id", f"request {rec.key!r}: its recorded rows do not cover its {T} tokens "
                                               "(the engine's output is not final)", checks.RosaStateError)
            H = rec.buf[:T]
            Y = torch.tensor(tokens, dtype=torch.long, device=H.device)
            W = self.weight.detach()
            bias = None if self.bias is None else self.bias.detach()
            info: Dict[str, Any] = {}

            def step(cur: Dict[str, Optional[UserState]]) -> Dict[str, UserState]:
                st = cur[uid] if cur[uid] is not None else self.new_state(rec.state.mode if rec.state else None)
                t0 = time.perf_counter()
                cfg = self.config.options.replace(mode=st.mode, lora_scale=st.lora_scale)  # the user's mode and scale
                if st.mode == "hidden":
                    delta = st.delta.to(device=H.device, dtype=self.dtype)
                    out = rosa_update(H + delta.to(H.dtype), W, Y, r, config=cfg, bias=bias)
                else:
                    out = rosa_update(H, W, Y, r, config=cfg, lora_a=st.a.to(device=H.device, dtype=self.dtype),
                                      lora_b=st.b.to(device=H.device, dtype=self.dtype), bias=bias)
                info["step_ms"] = 1000.0 * (time.perf_counter() - t0)
                info["solver"], info["backend"] = out.solver, out.backend
                return {uid: finite_state_update(who, st, out.update.reshape(-1), name="reward")}

            written = self.store.update_many([uid], step, who=who)
            new, rev = written[uid]
            self.recordings.pop(rec.key, None)
            self._free(rec)
            self._close(rec.key, f"answer {rec.key!r} was already rated (each answer takes one feedback)")
            return {"user": uid, "request_id": rec.key, "reward": r, "tokens": T, "mode": new.mode,
                    "num_updates": new.num_updates, "revision": rev, **info}

    # -- the users' states ------------------------------------------------------------------------
    def get_user(self, user: Any, *, tensors: bool = False) -> Dict[str, Any]:
        """``{user, mode, num_updates, revision}`` (and the state's values with ``tensors``)."""
        who = "get_user"
        uid = check_user_id(who, user, "user")
        with self.lock:
            self._need_store(who)
            snap = self.store.peek(uid)
        if snap is None:
            checks.fail(who, "user", f"no state stored for user {uid!r}")
        st, rev = snap
        out: Dict[str, Any] = {"user": uid, "mode": st.mode, "num_updates": st.num_updates, "revision": rev,
                               "vocab_size": st.vocab_size, "hidden_size": st.hidden_size, "lora_scale": st.lora_scale}
        if tensors:
            out["version"] = STATE_VERSION
            out.update({k: v.double().tolist() for k, v in st.tensors().items()})
        return out

    def put_user(self, user: Any, state: Any) -> Dict[str, Any]:
        """Store a state sent as JSON (the session's ``state_dict()`` format, tensors as lists of numbers)."""
        who = "put_user"
        uid = check_user_id(who, user, "user")
        with self.lock:
            self._need_store(who)
            st = make_state(who, state_from_json(who, state), vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                            dtype=self.dtype, check_zero=True)
            rev = self.store.put(uid, st)
        return {"user": uid, "mode": st.mode, "num_updates": st.num_updates, "revision": rev}

    def reset_user(self, user: Any, mode: Any = None) -> Dict[str, Any]:
        """The user back to the base model (its current mode, or ``mode``; a new user: the server's)."""
        who = "reset_user"
        uid = check_user_id(who, user, "user")
        if mode is not None:
            mode = checks.choice(who, "mode", mode, MODES)
        with self.lock:
            self._need_store(who)
            snap = self.store.peek(uid)
            st = self.new_state(mode or (snap[0].mode if snap else None))
            rev = self.store.put(uid, st)
        return {"user": uid, "mode": st.mode, "num_updates": 0, "revision": rev}

    def delete_user(self, user: Any) -> Dict[str, Any]:
        """Forget ``user``: its stored state and its recorded answers awaiting feedback (rating one of them
        afterwards is an error naming ``request_id``; it does not bring the user back). A request still
        generating keeps the state it started with, but is no longer recorded. RosaInputError naming
        ``user`` (HTTP 404) if the user has neither a state nor a recorded answer."""
        who = "delete_user"
        uid = check_user_id(who, user, "user")
        with self.lock:
            self._need_store(who)
            keys = list(self.per_user.get(uid, ()))
            stored = self.store.peek(uid) is not None
            if not stored and not keys:
                checks.fail(who, "user", f"no state stored for user {uid!r} (and no recorded answer of it awaits "
                                         "feedback)")
            if stored:
                self.store.delete(uid)  # first: if the store fails, nothing changed
            for k in keys:
                rec = self.recordings.pop(k, None)
                if rec is not None:
                    self._free(rec)
                self._close(k, f"answer {k!r} can no longer be rated: its user {uid!r} was deleted")
        return {"user": uid, "deleted": True, "state_deleted": stored, "recordings_dropped": len(keys)}

    def stats(self) -> Dict[str, Any]:
        with self.lock:
            return {"recordings": len(self.recordings), "reserved_mb": self.reserved / 2 ** 20,
                    "budget_mb": self.config.max_record_mb, "users": 0 if self.store is None else len(self.store)}
