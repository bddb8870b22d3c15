"""Many users on one model: per-user ROSA states, batched generation in which every row carries its
user's state, and one batched ROSA step for every user who gave feedback.

``users = RosaUsers(model, mode="lora")`` hooks lm_head once (like :func:`~rosa_ext.attach`, nothing of
the model is modified):

- the store: one state per user id in a :class:`~rosa_ext.integrations.store.StateStore` (``users.store``;
  pass ``store=StateStore(path)`` to persist it): user ids are validated strings, every write is a copy,
  each user's read-update-write is atomic; :meth:`state` / :meth:`load` use the format of
  :meth:`RosaSession.state_dict <rosa_ext.integrations.session.RosaSession.state_dict>` (d + V numbers:
  ``a``, ``b``; or ``delta``), so a user's state loads into a single-user session and back;
- :meth:`generate`: ``model.generate`` on a batch whose row i carries ``users[i]``'s state (LoRA: a
  per-row rank-1 term on the logits; hidden: a per-row shift; a row whose user is None, or a user with
  no update yet, is the base model bitwise), recording each row's lm_head inputs as
  :meth:`RosaSession.generate <rosa_ext.integrations.session.RosaSession.generate>` does (each user's
  rows are its own copy; one sequence per row: beams, several return sequences and assisted decoding are
  refused before generating);
- :meth:`update`: one batched :func:`rosa_ext.rosa_update` (one pass over W for all of them) on the
  recorded answers of the users in ``feedback``; every new state is computed before any is written, so
  a failed update leaves every state as it was.

Each row equals that user's single-user session (same tokens, logits to fp32 rounding): same op, same
state, and a user's first ``a`` is drawn from the same seed as ``attach(seed=...)`` draws it.
"""
from __future__ import annotations

import threading
from typing import Any, Dict, List, Mapping, Optional, Sequence, Tuple

import torch

from ..backends import triton_available
from ..common import validation as checks
from ..common.config import RosaConfig, compute_dtype_of
from ..core.op import RosaStep, rosa_update
from . import checks as ichecks
from .head_hooks import GenerationRecorder, HeadAdapter, init_lora_a
from .model_lookup import find_lm_head, head_bias, head_weight, peft_lora
from .session import DEFAULT_MODE, session_config
from .store import HiddenState, LoraState, StateStore, UserState, check_user_id, finite_state_update, make_state

#: ``generate`` arguments that make more (or other) sequences than one per prompt row: a row would no
#: longer be its user's answer, so they are refused before generating.
_ONE_SEQUENCE_PER_ROW = ("num_return_sequences", "num_beams", "prompt_lookup_num_tokens", "assistant_model")


class RosaUsers:
    """Per-user ROSA states served from one model (module doc).

    Args:
        model: a ``transformers`` causal LM with an ``lm_head`` (not a PEFT LoRA one: the per-user LoRA
            is rosa-ext's own here). One ROSA owner per model: a model with a session (``attach``) or
            another ``RosaUsers`` is refused.
        mode: "lora" or "hidden" (default ``config.mode``, or "lora").
        config: the options of every update (:class:`~rosa_ext.common.config.RosaConfig`), as
            :func:`~rosa_ext.attach`; ``**options`` override it by name (``damping=0.1``, ...).
        seed: seed of every new user's ``a`` (as ``attach(seed=...)``).
        store: the :class:`~rosa_ext.integrations.store.StateStore` to keep the users in (e.g. a
            persisted one, ``StateStore(path)``); by default a new one in memory. It must hold this
            mode's states for this model's V and d.
    """

    def __init__(self, model: torch.nn.Module, mode: str = DEFAULT_MODE, *, config: Optional[RosaConfig] = None,
                 seed: int = 0, store: Optional[StateStore] = None, **options: Any) -> None:
        who = "RosaUsers"
        if not isinstance(model, torch.nn.Module):
            checks.fail(who, "model", f"`model` must be a torch.nn.Module, got {type(model).__name__}", checks.RosaTypeError)
        #: the options of every update (:class:`~rosa_ext.common.config.RosaConfig`)
        self.config = session_config(who, mode, config, options)
        self.mode = self.config.mode
        self.seed = checks.seed(who, seed)
        if getattr(model, "_rosa_session", None) is not None:
            checks.fail(who, "model", "this model already has a ROSA session or RosaUsers; detach() it first",
                        checks.RosaStateError)
        head = find_lm_head(model, who)
        if peft_lora(head, who) is not None:
            checks.fail(who, "model", "a PEFT LoRA is already on lm_head; RosaUsers keeps its own per-user LoRA "
                                      "(unload the PEFT adapter, or attach() one session to it)")
        self.model, self.head = model, head
        self.weight = head_weight(head, who)
        self.bias = head_bias(head)
        self.vocab_size, self.hidden_size = (int(n) for n in self.weight.shape)
        self.dtype = compute_dtype_of(self.weight.dtype)
        self.lora_scale = float(self.config.lora_scale)
        if self.config.backend == "triton" and not triton_available(self.weight.device):
            checks.fail(who, "backend", f"backend='triton' needs the `triton` package and a CUDA model (the lm_head is "
                                        f"on {self.weight.device}); use backend='auto' or 'torch'")
        if store is None:
            store = StateStore(mode=self.mode, vocab_size=self.vocab_size, hidden_size=self.hidden_size)
        elif not isinstance(store, StateStore):
            checks.fail(who, "store", f"`store` must be a StateStore, got {checks._show(store)}", checks.RosaTypeError)
        else:
            for k, mine in (("mode", self.mode), ("vocab_size", self.vocab_size), ("hidden_size", self.hidden_size)):
                have = getattr(store, k)
                if have is not None and have != mine:
                    checks.fail(who, "store", f"the store holds states with {k}={have!r}; this RosaUsers has {mine!r}")
        self.store = store
        self._a0 = init_lora_a(1, self.hidden_size, self.seed, self.dtype, "cpu")[0]
        self._recorded: Dict[str, Tuple[torch.Tensor, torch.Tensor]] = {}
        self._lock = threading.RLock()
        # B slots of per-row state for one batched forward (re-made when a batch is larger)
        self._adapter = HeadAdapter(head, self.mode, 1, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                                    lora_scale=self.lora_scale, seed=self.seed, dtype=self.dtype,
                                    device=self.weight.device)
        self._recorder = GenerationRecorder(head)
        self._detached = False
        model._rosa_session = self

    # -- the store ---------------------------------------------------------------------------------
    def _new_state(self) -> UserState:
        common = dict(vocab_size=self.vocab_size, hidden_size=self.hidden_size, lora_scale=self.lora_scale, num_updates=0)
        if self.mode == "hidden":
            return HiddenState(**common, delta=torch.zeros(self.hidden_size, dtype=self.dtype))
        return LoraState(**common, a=self._a0.clone(), b=torch.zeros(self.vocab_size, dtype=self.dtype))

    def _mine(self, who: str, uid: str, st: Optional[UserState]) -> Optional[UserState]:
        """``st`` if it is a state this RosaUsers can serve (mode, sizes, scale), in its dtype."""
        if st is None:
            return None
        if st.mode != self.mode or st.lora_scale != self.lora_scale or \
                (st.vocab_size, st.hidden_size) != (self.vocab_size, self.hidden_size):
            checks.fail(who, "user_id", f"the stored state of {uid!r} is a {st.mode}-mode state (V={st.vocab_size}, "
                                        f"d={st.hidden_size}, lora_scale={st.lora_scale:g}); this RosaUsers is "
                                        f"{self.mode}-mode (V={self.vocab_size}, d={self.hidden_size}, "
                                        f"lora_scale={self.lora_scale:g})", checks.RosaStateError)
        return st

    def users(self) -> List[str]:
        """The user ids with a state."""
        return self.store.users()

    def has(self, user_id: str) -> bool:
        """Whether ``user_id`` (a valid id) has a state."""
        return self.store.has(check_user_id("has", user_id))

    def _known(self, who: str, name: str, user_id: Any) -> str:
        uid = check_user_id(who, user_id, name)
        if not self.store.has(uid):
            checks.fail(who, name, f"unknown user id {uid!r}: no state in this store (add it with load() or "
                                   "generate for it first)")
        return uid

    def state(self, user_id: str) -> Dict[str, Any]:
        """A copy of ``user_id``'s state, on the CPU, in the session's ``state_dict()`` format."""
        uid = self._known("state", "user_id", user_id)
        return self.store.get(uid)

    def load(self, user_id: str, state: Mapping[str, Any]) -> None:
        """Set ``user_id``'s state from a session's ``state_dict()`` (or :meth:`state`); checked first,
        all or nothing."""
        uid = check_user_id("load", user_id)
        st = make_state("load", state, mode=self.mode, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                        lora_scale=self.lora_scale, dtype=self.dtype, check_zero=True)
        self.store.put(uid, st)

    def reset(self, user_id: str) -> None:
        """``user_id`` back to the base model (a kept state with no update)."""
        uid = self._known("reset", "user_id", user_id)
        self.store.put(uid, self._new_state())

    def remove(self, user_id: str) -> None:
        """Forget ``user_id``: its state and its recorded answer."""
        uid = self._known("remove", "user_id", user_id)
        with self._lock:
            self.store.delete(uid)
            self._recorded.pop(uid, None)

    def _create(self, uids: Sequence[str]) -> None:
        """Give every user of ``uids`` without a state a new one (the base model)."""
        if uids:
            self.store.update_many(list(uids), lambda cur: {u: self._new_state() for u, st in cur.items() if st is None})

    # -- batched generation -------------------------------------------------------------------------
    def _check_attached(self, who: str) -> None:
        if self._detached:
            checks.fail(who, "self", "this RosaUsers was detached; create a new one on the model", checks.RosaStateError)

    def _slots(self, B: int) -> HeadAdapter:
        if self._adapter.a.shape[0] < B:
            self._adapter.remove()
            self._adapter = HeadAdapter(self.head, self.mode, B, vocab_size=self.vocab_size,
                                        hidden_size=self.hidden_size, lora_scale=self.lora_scale, seed=self.seed,
                                        dtype=self.dtype, device=self.weight.device)
        return self._adapter

    def generate(self, input_ids: torch.Tensor, users: Sequence[Optional[str]], **generate_kwargs: Any
                 ) -> torch.Tensor:
        """``model.generate`` with row i adapted to ``users[i]`` (None: the base model), recording each
        user row's lm_head inputs for :meth:`update`.

        Args:
            input_ids: (B, L) prompts (left-padded, with an ``attention_mask`` in ``generate_kwargs``).
            users: B user ids (distinct, valid ids) or None; a user without a state gets a new one (the
                base model) once the generation succeeded.
            generate_kwargs: as ``model.generate``; one sequence per row (``num_return_sequences``,
                ``num_beams`` > 1, prompt-lookup and assisted decoding are refused).
        Returns:
            What ``model.generate`` returns ((B, L + n) ids, or its output object).
        """
        who = "generate"
        self._check_attached(who)
        ids = checks.tensor(who, "input_ids", input_ids)
        if ids.dim() != 2:
            checks.fail(who, "input_ids", f"`input_ids` must be (B, L) prompts, got {tuple(ids.shape)}")
        if isinstance(users, (str, bytes)) or not isinstance(users, Sequence):
            checks.fail(who, "users", f"`users` must be a list of user ids (or None), one per row, got {checks._show(users)}",
                        checks.RosaTypeError)
        users = [None if u is None else check_user_id(who, u, f"users[{i}]") for i, u in enumerate(users)]
        if len(users) != ids.shape[0]:
            checks.fail(who, "users", f"one user id (or None) per row: got {len(users)} for {ids.shape[0]} rows")
        named = [u for u in users if u is not None]
        if len(set(named)) != len(named):
            checks.fail(who, "users", "a user may appear in one row of a batch only (its answer is what it rates)")
        for k in _ONE_SEQUENCE_PER_ROW:
            v = generate_kwargs.get(k)
            if v is not None and not (isinstance(v, int) and not isinstance(v, bool) and v == 1):
                checks.fail(who, k, f"`{k}={checks._show(v)}`: RosaUsers generates one answer per row (its user's); "
                                    "give each sequence its own row instead")
        with self._lock:
            snap = {u: self._mine(who, u, (self.store.peek(u) or (None,))[0]) for u in named}
            ad = self._slots(len(users))
            ad.reset()
            active = False
            for i, u in enumerate(users):
                st = snap.get(u) if u is not None else None
                if st is None or st.num_updates == 0:
                    continue  # zeros: the base model's logits, bitwise
                dev = self.weight.device
                if self.mode == "hidden":
                    ad.delta[i] = st.delta.to(device=dev, dtype=self.dtype)
                else:
                    ad.a[i], ad.b[i] = st.a.to(device=dev, dtype=self.dtype), st.b.to(device=dev, dtype=self.dtype)
                active = True
            ad.changed()
            ad.rows = torch.arange(len(users), device=self.weight.device)
            ad.active = active
            try:
                out, rec = self._recorder.generate(self.model, ids, generate_kwargs)
            finally:
                ad.active, ad.rows = False, None
            self._create([u for u in named if snap[u] is None])
            for i, u in enumerate(users):
                if u is not None:  # each user's own copy: no view of the batch's rows
                    self._recorded[u] = (rec.hidden[i].clone(), rec.tokens[i].clone())
        return out

    def record(self, user_id: str, hidden: torch.Tensor, tokens: torch.Tensor) -> None:
        """Set the answer ``user_id`` will rate from lm_head inputs the caller already holds: ``hidden``
        (n, d) the base body's outputs that predicted ``tokens`` (n,) (e.g. a generation shared by several
        methods); copied, so the caller may reuse its buffers. A user without a state gets one."""
        who = "record"
        self._check_attached(who)
        uid = check_user_id(who, user_id)
        hidden, tokens = ichecks.hidden_rows(who, hidden, tokens, hidden_size=self.hidden_size,
                                            vocab_size=self.vocab_size, device=self.weight.device,
                                            head_dtype=self.weight.dtype)
        rec = (hidden.detach().to(self.weight.dtype).clone(), tokens.detach().clone())
        with self._lock:
            self._mine(who, uid, (self.store.peek(uid) or (None,))[0])
            self._create([uid])
            self._recorded[uid] = rec

    def answer(self, user_id: str) -> Optional[Tuple[torch.Tensor, torch.Tensor]]:
        """(hidden (n, d), tokens (n,)) of ``user_id``'s recorded answer (a copy), or None."""
        uid = check_user_id("answer", user_id)
        with self._lock:
            rec = self._recorded.get(uid)
        return None if rec is None else (rec[0].clone(), rec[1].clone())

    # -- the batched update ---------------------------------------------------------------------------
    def update(self, feedback: Mapping[str, float], *, masks: Optional[Mapping[str, torch.Tensor]] = None,
               max_norm: Optional[float] = None) -> Dict[str, RosaStep]:
        """One batched ROSA step for every user in ``feedback`` (user id -> reward), on the answer of its
        last :meth:`generate` (each recording used once).

        Args:
            feedback: {user id: reward}; every user must have a recorded answer.
            masks: optional {user id: (n,) bool}, the answer tokens that enter the target (default all).
            max_norm: clip each user's step to this norm before it is applied (None: no clip).
        Returns:
            {user id: :class:`~rosa_ext.RosaStep`} (views of one batched result; ``solver``/``backend`` shared).
        A failed update (bad input, a numerical error) raises before any state is written; the users'
        read-update-write is atomic (their store locks are held from the read to the write).
        """
        who = "update"
        self._check_attached(who)
        if not isinstance(feedback, Mapping) or not feedback:
            checks.fail(who, "feedback", "`feedback` must be a non-empty {user id: reward} mapping", checks.RosaTypeError)
        ids = [check_user_id(who, u, "feedback") for u in feedback]
        if masks is not None and not isinstance(masks, Mapping):
            checks.fail(who, "masks", f"`masks` must be a {{user id: (n,) bool tensor}} mapping, got {checks._show(masks)}",
                        checks.RosaTypeError)
        if max_norm is not None:
            max_norm = checks.real(who, "max_norm", max_norm, minimum=0.0, strict=True)
        with self._lock:
            for u in ids:
                self._known(who, "feedback", u)
                if u not in self._recorded:
                    checks.fail(who, "feedback", f"user {u!r} has no recorded answer since its last update: call "
                                                 "generate(...) for it first", checks.RosaStateError)
            rewards = [checks.one_reward(who, feedback[u], self.dtype) for u in ids]
            B, d, dev = len(ids), self.hidden_size, self.weight.device
            recs = [self._recorded[u] for u in ids]
            T = max(int(t.numel()) for _, t in recs)
            if T == 0:
                checks.fail(who, "feedback", "no user of `feedback` has a generated token to rate")
            H = torch.zeros(B, T, d, dtype=self.weight.dtype, device=dev)
            Y = torch.zeros(B, T, dtype=torch.long, device=dev)
            M = torch.zeros(B, T, dtype=torch.bool, device=dev)
            for u in (masks or {}):
                if u not in feedback:
                    checks.fail(who, "masks", f"`masks` has an entry for {checks._show(u)}, which is not in `feedback`")
            for j, (u, (h, y)) in enumerate(zip(ids, recs)):
                n = int(y.numel())
                H[j, :n], Y[j, :n], M[j, :n] = h, y, True
                if masks is not None and u in masks:
                    name = f"masks[{u!r}]"
                    m = checks.tensor(who, name, masks[u])
                    if m.dtype != torch.bool:
                        checks.fail(who, name, f"`{name}` must be a bool tensor (True: the token enters the target), "
                                               f"got {m.dtype}", checks.RosaTypeError)
                    if tuple(m.shape) != (n,):
                        checks.fail(who, name, f"`{name}` must be ({n},) like {u!r}'s answer, got {tuple(m.shape)}")
                    M[j, :n] = m.to(device=dev)
            W = self.weight.detach()
            bias = None if self.bias is None else self.bias.detach()
            r = torch.tensor(rewards, dtype=self.dtype)
            result: Dict[str, Any] = {}

            def step(cur: Dict[str, Optional[UserState]]) -> Dict[str, UserState]:
                states = [self._mine(who, u, cur[u]) for u in ids]
                if any(s is None for s in states):  # removed by another thread meanwhile
                    gone = [u for u, s in zip(ids, states) if s is None]
                    checks.fail(who, "feedback", f"user {gone[0]!r} was removed during the update", checks.RosaStateError)
                if self.mode == "hidden":
                    delta = torch.stack([s.delta for s in states]).to(device=dev, dtype=self.dtype)
                    out = rosa_update(H + delta.to(H.dtype).unsqueeze(1), W, Y, r, config=self.config, mask=M, bias=bias)
                else:
                    a = torch.stack([s.a for s in states]).to(device=dev, dtype=self.dtype)
                    b = torch.stack([s.b for s in states]).to(device=dev, dtype=self.dtype)
                    out = rosa_update(H, W, Y, r, config=self.config, lora_a=a, lora_b=b, mask=M, bias=bias)
                upd = _clip(out.update, max_norm)
                result["step"], result["upd"] = out, upd
                return {u: finite_state_update(who, s, upd[j]) for j, (u, s) in enumerate(zip(ids, states))}

            self.store.update_many(ids, step, who=who)  # every new state computed, then all written at once
            st, upd = result["step"], result["upd"]
            out: Dict[str, RosaStep] = {}
            ends = torch.cumsum(M.sum(1), 0).tolist()  # the packed tokens of user j: ends[j-1] .. ends[j]
            for j, u in enumerate(ids):
                del self._recorded[u]
                out[u] = RosaStep(update=upd[j], mode=st.mode, solver=st.solver, backend=st.backend,
                                  hidden_size=d, logp=st.logp[(ends[j - 1] if j else 0):ends[j]],
                                  target=st.target[(ends[j - 1] if j else 0):ends[j]])
            return out

    def apply(self, user_id: str, update: torch.Tensor) -> None:
        """Add a flat step (P,) (``[delta_a, delta_b]`` or ``delta``) to ``user_id``'s state, e.g. one made by
        another method (the experiment's policy-gradient baseline). A non-finite step, or one that makes the
        state overflow, is refused (RosaNonFiniteError naming ``update``) and nothing changes."""
        who = "apply"
        self._check_attached(who)
        uid = self._known(who, "user_id", user_id)
        upd = checks.float_tensor(who, "update", update)
        P = self.hidden_size + (self.vocab_size if self.mode == "lora" else 0)
        if tuple(upd.shape) != (P,):
            checks.fail(who, "update", f"`update` must be ({P},), got {tuple(upd.shape)}")
        checks.finite(who, "update", upd)

        def add(cur: Dict[str, Optional[UserState]]) -> Dict[str, UserState]:
            st = self._mine(who, uid, cur[uid])
            if st is None:
                checks.fail(who, "user_id", f"user {uid!r} was removed meanwhile", checks.RosaStateError)
            return {uid: finite_state_update(who, st, upd)}

        self.store.update_many([uid], add, who=who)

    def detach(self) -> None:
        """Remove the hooks: the model is as before. The store (and its users) stays usable."""
        if self._detached:
            return
        with self._lock:
            self._adapter.remove()
            self._recorder.remove()
            self._detached = True
            if getattr(self.model, "_rosa_session", None) is self:
                del self.model._rosa_session


def _clip(update: torch.Tensor, max_norm: Optional[float]) -> torch.Tensor:
    """(B, P) steps with every row's norm at most ``max_norm`` (unchanged when None)."""
    if max_norm is None:
        return update
    norms = torch.linalg.vector_norm(update, dim=1, keepdim=True)
    return update * (max_norm / norms.clamp_min(max_norm))
