"""Many users on one model: per-user ROSA states, batched generation in which every row carries its
user's state, and one batched ROSA step for every user who gave feedback.

``users = RosaUsers(model, mode="lora")`` hooks lm_head once (like :func:`~rosa_ext.attach`, nothing of
the model is modified):

- the store: one state per user id, in the format of :meth:`RosaSession.state_dict
  <rosa_ext.integrations.session.RosaSession.state_dict>` (d + V numbers: ``a``, ``b``; or ``delta``),
  so a user's state loads into a single-user session and back (:meth:`state`, :meth:`load`);
- :meth:`generate`: ``model.generate`` on a batch whose row i carries ``users[i]``'s state (LoRA: a
  per-row rank-1 term on the logits; hidden: a per-row shift; a row whose user is None, or a user with
  no update yet, is the base model bitwise), recording each row's lm_head inputs as
  :meth:`RosaSession.generate <rosa_ext.integrations.session.RosaSession.generate>` does;
- :meth:`update`: one batched :func:`rosa_ext.rosa_update` (one pass over W for all of them) on the
  recorded answers of the users in ``feedback``; every new state is computed before any is written, so
  a failed update leaves every state as it was.

Each row equals that user's single-user session (same tokens, logits to fp32 rounding): same op, same
state, and a user's first ``a`` is drawn from the same seed as ``attach(seed=...)`` draws it.
"""
from __future__ import annotations

import threading
from typing import Any, Dict, Hashable, List, Mapping, Optional, Sequence

import torch

from ..backends import triton_available
from ..common import validation as checks
from ..common.config import RosaConfig, compute_dtype_of
from ..core.op import RosaStep, rosa_update
from . import checks as ichecks
from .head_hooks import GenerationRecorder, HeadAdapter, init_lora_a
from .model_lookup import find_lm_head, head_bias, head_weight, peft_lora
from .session import DEFAULT_MODE, session_config

_STATE_VERSION = 1  # the session's state format (rosa_ext.integrations.session)


class RosaUsers:
    """Per-user ROSA states served from one model (module doc).

    Args:
        model: a ``transformers`` causal LM with an ``lm_head`` (not a PEFT LoRA one: the per-user LoRA
            is rosa-ext's own here).
        mode: "lora" or "hidden" (default ``config.mode``, or "lora").
        config: the options of every update (:class:`~rosa_ext.common.config.RosaConfig`), as
            :func:`~rosa_ext.attach`; ``**options`` override it by name (``damping=0.1``, ...).
        seed: seed of every new user's ``a`` (as ``attach(seed=...)``).
    """

    def __init__(self, model: torch.nn.Module, mode: str = DEFAULT_MODE, *, config: Optional[RosaConfig] = None,
                 seed: int = 0, **options: Any) -> None:
        who = "RosaUsers"
        if not isinstance(model, torch.nn.Module):
            checks.fail(who, "model", f"`model` must be a torch.nn.Module, got {type(model).__name__}", checks.RosaTypeError)
        #: the options of every update (:class:`~rosa_ext.common.config.RosaConfig`)
        self.config = session_config(who, mode, config, options)
        self.mode = self.config.mode
        self.seed = checks.seed(who, seed)
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
        self._a0 = init_lora_a(1, self.hidden_size, self.seed, self.dtype, self.weight.device)[0]
        self._states: Dict[Hashable, Dict[str, Any]] = {}
        self._recorded: Dict[Hashable, tuple] = {}
        self._lock = threading.RLock()
        # B slots of per-row state for one batched forward (re-made when a batch is larger)
        self._adapter = HeadAdapter(head, self.mode, 1, vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                                    lora_scale=self.lora_scale, seed=self.seed, dtype=self.dtype,
                                    device=self.weight.device)
        self._recorder = GenerationRecorder(head)

    # -- the store ---------------------------------------------------------------------------------
    def _new_state(self) -> Dict[str, Any]:
        sd: Dict[str, Any] = {"version": _STATE_VERSION, "mode": self.mode, "num_updates": 0,
                              "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                              "lora_scale": self.lora_scale}
        if self.mode == "hidden":
            sd["delta"] = torch.zeros(self.hidden_size, dtype=self.dtype, device=self.weight.device)
        else:
            sd["a"] = self._a0.clone()
            sd["b"] = torch.zeros(self.vocab_size, dtype=self.dtype, device=self.weight.device)
        return sd

    def users(self) -> List[Hashable]:
        """The user ids with a state."""
        return list(self._states)

    def has(self, user_id: Hashable) -> bool:
        return user_id in self._states

    def _known(self, who: str, name: str, user_id: Any) -> Dict[str, Any]:
        try:
            return self._states[user_id]
        except (KeyError, TypeError):
            checks.fail(who, name, f"unknown user id {user_id!r}: no state in this store (add it with load() or "
                                   "generate for it first)")

    def state(self, user_id: Hashable) -> Dict[str, Any]:
        """A copy of ``user_id``'s state, on the CPU, in the session's ``state_dict()`` format."""
        sd = self._known("state", "user_id", user_id)
        return {k: (v.detach().cpu().clone() if isinstance(v, torch.Tensor) else v) for k, v in sd.items()}

    def load(self, user_id: Hashable, state: Mapping[str, Any]) -> None:
        """Set ``user_id``'s state from a session's ``state_dict()`` (or :meth:`state`); checked first,
        all or nothing."""
        try:
            hash(user_id)
        except TypeError:
            checks.fail("load", "user_id", f"`user_id` must be hashable, got {type(user_id).__name__}", checks.RosaTypeError)
        num, tensors = ichecks.session_state("load", state, version=_STATE_VERSION, mode=self.mode,
                                            vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                                            lora_scale=self.lora_scale, check_zero=True, shard=None)
        sd = self._new_state()
        for k, v in tensors.items():
            sd[k] = v.detach().to(device=self.weight.device, dtype=self.dtype).clone()
        sd["num_updates"] = num
        with self._lock:
            self._states[user_id] = sd

    def reset(self, user_id: Hashable) -> None:
        """``user_id`` back to the base model (a kept state with no update)."""
        self._known("reset", "user_id", user_id)
        with self._lock:
            self._states[user_id] = self._new_state()

    def remove(self, user_id: Hashable) -> None:
        self._known("remove", "user_id", user_id)
        with self._lock:
            self._states.pop(user_id)
            self._recorded.pop(user_id, None)

    # -- batched generation -------------------------------------------------------------------------
    def _slots(self, B: int) -> HeadAdapter:
        if self._adapter.a.shape[0] < B:
            self._adapter.remove()
            self._adapter = HeadAdapter(self.head, self.mode, B, vocab_size=self.vocab_size,
                                        hidden_size=self.hidden_size, lora_scale=self.lora_scale, seed=self.seed,
                                        dtype=self.dtype, device=self.weight.device)
        return self._adapter

    def generate(self, input_ids: torch.Tensor, users: Sequence[Optional[Hashable]], **generate_kwargs: Any
                 ) -> torch.Tensor:
        """``model.generate`` with row i adapted to ``users[i]`` (None: the base model), recording each
        user row's lm_head inputs for :meth:`update`.

        Args:
            input_ids: (B, L) prompts (left-padded, with an ``attention_mask`` in ``generate_kwargs``).
            users: B user ids (distinct) or None; a user without a state gets a new one (the base model).
        Returns:
            What ``model.generate`` returns ((B, L + n) ids, or its output object).
        """
        who = "generate"
        ids = checks.tensor(who, "input_ids", input_ids)
        if ids.dim() != 2:
            checks.fail(who, "input_ids", f"`input_ids` must be (B, L) prompts, got {tuple(ids.shape)}")
        users = list(users) if not isinstance(users, (str, bytes)) else [users]
        if len(users) != ids.shape[0]:
            checks.fail(who, "users", f"one user id (or None) per row: got {len(users)} for {ids.shape[0]} rows")
        named = [u for u in users if u is not None]
        if len(set(named)) != len(named):
            checks.fail(who, "users", "a user may appear in one row of a batch only (its answer is what it rates)")
        with self._lock:
            for u in named:
                if u not in self._states:
                    self._states[u] = self._new_state()
            ad = self._slots(len(users))
            ad.reset()
            active = False
            for i, u in enumerate(users):
                if u is None or self._states[u]["num_updates"] == 0:
                    continue  # zeros: the base model's logits, bitwise
                sd = self._states[u]
                if self.mode == "hidden":
                    ad.delta[i] = sd["delta"]
                else:
                    ad.a[i], ad.b[i] = sd["a"], sd["b"]
                active = True
            ad.changed()
            ad.rows = torch.arange(len(users), device=self.weight.device)
            ad.active = active
            try:
                out, rec = self._recorder.generate(self.model, ids, generate_kwargs)
            finally:
                ad.active, ad.rows = False, None
            for i, u in enumerate(users):
                if u is not None:
                    self._recorded[u] = (rec.hidden[i], rec.tokens[i])
        return out

    def record(self, user_id: Hashable, hidden: torch.Tensor, tokens: torch.Tensor) -> None:
        """Set the answer ``user_id`` will rate from lm_head inputs the caller already holds: ``hidden``
        (n, d) the base body's outputs that predicted ``tokens`` (n,) (e.g. a generation shared by several
        methods); a user without a state gets one."""
        hidden, tokens = ichecks.hidden_rows("record", hidden, tokens, hidden_size=self.hidden_size,
                                            vocab_size=self.vocab_size, device=self.weight.device,
                                            head_dtype=self.weight.dtype)
        with self._lock:
            if user_id not in self._states:
                self._states[user_id] = self._new_state()
            self._recorded[user_id] = (hidden.detach().to(self.weight.dtype), tokens)

    def answer(self, user_id: Hashable) -> Optional[tuple]:
        """(hidden (n, d), tokens (n,)) of ``user_id``'s recorded answer, or None."""
        return self._recorded.get(user_id)

    # -- the batched update ---------------------------------------------------------------------------
    def update(self, feedback: Mapping[Hashable, float], *, masks: Optional[Mapping[Hashable, torch.Tensor]] = None,
               max_norm: Optional[float] = None) -> Dict[Hashable, RosaStep]:
        """One batched ROSA step for every user in ``feedback`` (user id -> reward), on the answer of its
        last :meth:`generate` (each recording used once).

        Args:
            feedback: {user id: reward}; every user must have a recorded answer.
            masks: optional {user id: (n,) bool}, the answer tokens that enter the target (default all).
            max_norm: clip each user's step to this norm before it is applied (None: no clip).
        Returns:
            {user id: :class:`~rosa_ext.RosaStep`} (views of one batched result; ``solver``/``backend`` shared).
        A failed update (bad input, a numerical error) raises before any state is written.
        """
        who = "update"
        if not isinstance(feedback, Mapping) or not feedback:
            checks.fail(who, "feedback", "`feedback` must be a non-empty {user id: reward} mapping", checks.RosaTypeError)
        with self._lock:
            ids = list(feedback)
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
            for j, (u, (h, y)) in enumerate(zip(ids, recs)):
                n = int(y.numel())
                H[j, :n], Y[j, :n], M[j, :n] = h, y, True
                if masks is not None and u in masks:
                    m = checks.tensor(who, "masks", masks[u]).to(device=dev)
                    if m.dtype != torch.bool or m.shape != (n,):
                        checks.fail(who, "masks", f"masks[{u!r}] must be a ({n},) bool tensor like its answer, got "
                                                  f"{m.dtype} {tuple(m.shape)}")
                    M[j, :n] = m
            if max_norm is not None:
                max_norm = checks.real(who, "max_norm", max_norm, minimum=0.0, strict=True)
            states = [self._states[u] for u in ids]
            W = self.weight.detach()
            bias = None if self.bias is None else self.bias.detach()
            r = torch.tensor(rewards, dtype=self.dtype)
            if self.mode == "hidden":
                delta = torch.stack([s["delta"] for s in states])
                step = rosa_update(H + delta.to(H.dtype).unsqueeze(1), W, Y, r, config=self.config, mask=M, bias=bias)
                upd = _clip(step.update, max_norm)
                new = [{"delta": s["delta"] + upd[j].to(self.dtype)} for j, s in enumerate(states)]
            else:
                a = torch.stack([s["a"] for s in states])
                b = torch.stack([s["b"] for s in states])
                step = rosa_update(H, W, Y, r, config=self.config, lora_a=a, lora_b=b, mask=M, bias=bias)
                upd = _clip(step.update, max_norm)
                new = [{"a": s["a"] + upd[j, :d].to(self.dtype), "b": s["b"] + upd[j, d:].to(self.dtype)}
                       for j, s in enumerate(states)]
            out: Dict[Hashable, RosaStep] = {}
            ends = torch.cumsum(M.sum(1), 0).tolist()  # the packed tokens of user j: ends[j-1] .. ends[j]
            for j, u in enumerate(ids):  # every new state exists: now write them all
                self._states[u].update(new[j])
                self._states[u]["num_updates"] += 1
                del self._recorded[u]
                out[u] = RosaStep(update=upd[j], mode=step.mode, solver=step.solver, backend=step.backend,
                                  hidden_size=d, logp=step.logp[(ends[j - 1] if j else 0):ends[j]],
                                  target=step.target[(ends[j - 1] if j else 0):ends[j]])
            return out

    def apply(self, user_id: Hashable, update: torch.Tensor) -> None:
        """Add a flat step (P,) (``[delta_a, delta_b]`` or ``delta``) to ``user_id``'s state, e.g. one made by
        another method (the experiment's policy-gradient baseline)."""
        sd = self._known("apply", "user_id", user_id)
        P = self.hidden_size + (self.vocab_size if self.mode == "lora" else 0)
        upd = checks.float_tensor("apply", "update", update)
        if upd.shape != (P,):
            checks.fail("apply", "update", f"`update` must be ({P},), got {tuple(upd.shape)}")
        upd = upd.to(device=self.weight.device, dtype=self.dtype)
        with self._lock:
            if self.mode == "hidden":
                sd["delta"] = sd["delta"] + upd
            else:
                sd["a"], sd["b"] = sd["a"] + upd[:self.hidden_size], sd["b"] + upd[self.hidden_size:]
            sd["num_updates"] += 1

    def detach(self) -> None:
        """Remove the hooks: the model is as before."""
        self._adapter.remove()
        self._recorder.remove()


def _clip(update: torch.Tensor, max_norm: Optional[float]) -> torch.Tensor:
    """(B, P) steps with every row's norm at most ``max_norm`` (unchanged when None)."""
    if max_norm is None:
        return update
    norms = torch.linalg.vector_norm(update, dim=1, keepdim=True)
    return update * (max_norm / norms.clamp_min(max_norm))
