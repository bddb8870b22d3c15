"""Adapt a live ``transformers`` (or PEFT) model during a conversation.

``session = rosa_ext.attach(model, mode="lora" | "hidden")`` hooks the model's
``lm_head``; ``session.update(input_ids, reward, response_start=...)`` runs one
ROSA step (MATH.md section 1) on that exchange; later forwards and
``model.generate`` see the adapted head. Nothing of the model is modified
unless it is a ``PeftModel`` whose r=1 LoRA on ``lm_head`` ROSA then moves in
place (its values at ``attach`` are kept and put back by ``reset``/``detach``).

- lora mode, own adapter: a forward hook on ``lm_head`` adds
  ``s (a . h) b`` to the logits (rank-1 LoRA, ``s = lora_scale``, ``a`` drawn
  like PEFT's lora_A init, ``b = 0``), so the base weights never change.
- hidden mode: a forward pre-hook on ``lm_head`` adds one shift vector to
  every position's final hidden state (paper Appendix D.5).

Either change touches only ``lm_head``, so the KV cache of ``generate`` stays
valid across updates. After ``reset()`` the hooks pass values through untouched,
so outputs are bitwise those of the base model.
"""
from __future__ import annotations

import threading
from typing import Any, Dict, Optional, Tuple, Union

import torch

from ..backends import triton_available
from ..common import validation as checks
from ..common.config import RosaConfig, compute_dtype_of, resolve
from ..core.distributed import is_dtensor
from ..core.op import RosaStep, rosa_update
from . import checks as ichecks
from .background import BackgroundRunner, UpdateHandle
from .head_hooks import GenerationRecorder, HeadAdapter, Recorded
from .lora_params import LoraParams, OwnLora, PeftLora
from .model_lookup import base_model, find_body, find_lm_head, head_bias, head_weight, peft_lora
from .sharded_head import ShardedHeadAdapter, head_adapter

_STATE_VERSION = 1


class RosaSession:
    """One conversation's ROSA adaptation of a model. Create with :func:`attach`."""

    def __init__(self, model: torch.nn.Module, config: RosaConfig, *, seed: int, warmup: bool = True) -> None:
        # every argument is checked before anything is installed (README, "Errors"); the options were
        # checked by the RosaConfig
        if not isinstance(model, torch.nn.Module):
            checks.fail("attach", "model", f"`model` must be a torch.nn.Module, got {type(model).__name__}",
                   checks.RosaTypeError)
        mode = config.mode
        seed = checks.seed("attach", seed)
        checks.boolean("attach", "warmup", warmup)
        if getattr(model, "_rosa_session", None) is not None:
            checks.fail("attach", "model", "this model already has a ROSA session (or a RosaUsers); detach() it first",
                        checks.RosaStateError)
        cfg = getattr(base_model(model), "config", None)
        if cfg is not None and getattr(cfg, "final_logit_softcapping", None):
            raise NotImplementedError("attach: models with final logit soft-capping are not supported "
                                      "(the logits are not an affine function of lm_head's input)")
        head = find_lm_head(model)
        weight = head_weight(head)
        if weight.shape[0] == 0 or weight.shape[1] == 0:
            checks.fail("attach", "model", f"the lm_head weight is empty, shape {tuple(weight.shape)}")
        state_dtype = compute_dtype_of(weight.dtype)
        checks.real("attach", "damping", config.damping, dtype=state_dtype)
        checks.real("attach", "lora_scale", config.lora_scale, dtype=state_dtype)
        if config.backend == "triton" and not triton_available(weight.device):
            checks.fail("attach", "backend", f"backend='triton' needs the `triton` package and a CUDA model (the "
                                        f"lm_head is on {weight.device}); use backend='auto' or 'torch'")
        peft = peft_lora(head)
        own_scale = config.lora_scale
        scale = peft[2] if peft is not None else own_scale
        if mode == "lora" and scale == 0:
            checks.fail("attach", "lora_scale", "the LoRA scale must be nonzero in mode='lora' (with s = 0 the "
                                           "adapter has no effect and the Jacobian is zero)")
        self.mode = mode
        self.head = head
        self.body = find_body(model)
        self.weight = weight
        self.bias = head_bias(self.head)
        Vs, d = self.weight.shape
        self.vocab_size, self.hidden_size = Vs, d
        dev = self.weight.device
        self.state_dtype = state_dtype

        # vocabulary-parallel head (MATH.md section 7): a tensor-parallel body issues collectives of
        # its own, which a background update's would interleave with (refused in _run)
        self._parallel_body = is_dtensor(self.weight) and any(is_dtensor(p) for p in self.body.parameters())
        if peft is not None and is_dtensor(self.weight):
            raise NotImplementedError("attach: a PEFT LoRA on a vocabulary-parallel (ColwiseParallel) lm_head is not "
                                      "supported; attach to the model without the PEFT adapter (ROSA then keeps its "
                                      "own rank-1 LoRA, b sharded like the head)")
        self.lora_scale = peft[2] if (peft is not None and mode == "lora") else own_scale
        #: the options of every update (:class:`~rosa_ext.common.config.RosaConfig`; a PEFT adapter's scale)
        self.config = config if scale == config.lora_scale else config.replace(lora_scale=scale)
        self.model = model
        self.num_updates = 0
        self.last_step: Optional[RosaStep] = None
        # One update at a time: a step reads the state, solves and writes it under this lock, so two
        # threads updating one session are serialised and neither update is lost.
        self._lock = threading.RLock()
        if warmup:  # before any hook is installed: a failure here leaves the model untouched
            self._warmup(peft)
        self._runner = BackgroundRunner(dev)
        # Own parameters (compute dtype) on hooks of lm_head: a ~ PEFT's lora_A init, b = 0;
        # delta = 0. Every use of the head waits for a background update first (PEFT's own
        # LoRA forward included), so a pending update is never half-visible.
        # (head_adapter: this rank's rows of b on a vocabulary-parallel head, MATH.md section 7)
        self.adapter: HeadAdapter = head_adapter(self.head, self.weight, mode, 1, vocab_size=Vs, hidden_size=d,
                                                 lora_scale=self.lora_scale, seed=seed, dtype=self.state_dtype,
                                                 device=dev, lora_hook=peft is None,
                                                 before_forward=self._runner.wait)
        # The LoRA the session reads (and in LoRA mode moves): PEFT's modules or its own, one interface
        # (rosa_ext.integrations.lora_params); None in hidden mode without a PEFT LoRA.
        self.lora: Optional[LoraParams] = None
        if peft is not None:
            self.lora = PeftLora(*peft, moved=mode == "lora")
        elif mode == "lora":
            self.lora = OwnLora(self.adapter)
        # Records lm_head's inputs during session.generate (integrations/recording): an update from
        # the generation then needs no second forward of the body.
        self._recorder = GenerationRecorder(self.head)
        self._recorded: Optional[Recorded] = None
        # One generate at a time: the recorder keeps the rows of the forwards it sees, so two threads'
        # generations must not interleave (each recording is its own generation's).
        self._generate_lock = threading.Lock()
        model._rosa_session = self

    # -- warm-up (attach(..., warmup=True)) ---------------------------------------------------------
    #: Token counts of the warm-up updates: one per autotune bucket of the Triton kernels
    #: (rosa_ext.kernels._tiles.N_BUCKETS) up to the dual solve's limit.
    WARMUP_TOKENS = (16, 64, 256, 1024, 4096)

    def _warmup(self, peft) -> None:
        """Compile and autotune the Triton kernels of this session's updates (CUDA only).

        Runs :func:`rosa_update` -- exactly the calls :meth:`update` makes, with the session's options
        and the solvers ``auto`` may pick -- on dummy problems of the session's head, one per token
        bucket of the kernels' autotune key, so the first real update pays neither compilation nor
        autotuning. A no-op on the CPU, on the torch backend and on a vocabulary-parallel head (the
        warm-up would issue collectives). Nothing of the session or the model changes. Triton caches
        compiled kernels and (Triton >= 3.2) the tuning on disk, so a later process is fast."""
        W = self.weight.detach()
        if W.device.type != "cuda" or self.config.backend == "torch" or is_dtensor(W) \
                or not triton_available(W.device):
            return
        Vs, d = W.shape
        g = torch.Generator(device=W.device).manual_seed(0)
        solvers = ("cg", "dual") if self.config.solver == "auto" else (self.config.solver,)
        bias = None if self.bias is None else self.bias.detach()
        if self.mode == "hidden":
            lora = {} if peft is None else PeftLora(*peft, moved=False).terms()
        else:
            a = torch.randn(d, generator=g, device=W.device, dtype=self.state_dtype) / d ** 0.5
            lora = dict(lora_a=a, lora_b=torch.zeros(Vs, device=W.device, dtype=self.state_dtype))
        with torch.no_grad():
            for T in self.WARMUP_TOKENS:
                hidden = torch.randn(T, d, generator=g, device=W.device).to(W.dtype)
                y = torch.randint(0, Vs, (T,), generator=g, device=W.device)
                for solver in solvers:
                    rosa_update(hidden, W, y, -1.0, config=self.config, bias=bias, solver=solver, **lora)
        torch.cuda.synchronize(W.device)

    @property
    def a(self) -> torch.Tensor:
        """(d,) the own LoRA's ``a`` (lora_A), compute dtype (a view)."""
        return self.adapter.a[0]

    @property
    def b(self) -> torch.Tensor:
        """(V,) the own LoRA's ``b`` (lora_B), compute dtype (a view)."""
        return self.adapter.b[0]

    @property
    def delta(self) -> torch.Tensor:
        """(d,) the hidden shift, compute dtype (a view)."""
        return self.adapter.delta[0]

    # -- background updates ---------------------------------------------------------
    def wait(self) -> Optional[RosaStep]:
        """Wait for a background update, if any; returns its step (raises its error)."""
        return self._runner.wait()

    # -- generation that records what the update needs ------------------------------------------
    def generate(self, input_ids: torch.Tensor, **generate_kwargs: Any) -> torch.Tensor:
        """``model.generate`` on the adapted model, recording the lm_head inputs that predict every
        generated token (no extra forward: the rows the generation computes anyway, B x d per token).

        Args:
            input_ids: (B, L) or (L,) prompt ids (left-padded with an ``attention_mask`` for B > 1).
            generate_kwargs: passed to ``model.generate`` (``max_new_tokens``, ``do_sample``,
                ``attention_mask``, ...).
        Returns:
            What ``model.generate`` returns: (B, L + n) ids (or its output object).
        Then :meth:`update_from_generation` (or :meth:`update` without ``input_ids``) takes the step on
        the recorded rows of one sequence: the same step as ``update(ids, reward, response_start=L)``
        on that text, without the second forward of the body.
        """
        self._check_attached()
        ids = checks.prompt_ids("generate", input_ids, self.vocab_size, self.weight.device)
        self.wait()
        with self._generate_lock:
            self._recorded = None
            out, self._recorded = self._recorder.generate(self.model, ids, generate_kwargs)
        return out

    def update_from_generation(self, reward: float, *, row: Optional[int] = None,
                               non_blocking: bool = False) -> Union[RosaStep, UpdateHandle]:
        """One ROSA step on the answer of the last :meth:`generate` (its recorded lm_head inputs; no
        body forward). The recording is used once: a second call needs a new generation.

        Args:
            reward: the feedback r on that answer.
            row: which sequence of a batched generation the feedback is for (required when it
                generated more than one).
            non_blocking: as in :meth:`update`.
        """
        who = "update_from_generation"
        self._check_attached()
        rec = self._recorded
        if rec is None:
            checks.fail(who, "input_ids", "no generation recorded since the last update: call session.generate(...) "
                                          "first, or pass the exchange as update(input_ids, reward, response_start=...)",
                        checks.RosaStateError)
        r = checks.one_reward(who, reward, self.state_dtype)
        if row is None:
            if rec.num_sequences != 1:
                checks.fail(who, "row", f"the last generation has {rec.num_sequences} sequences: pass `row` (0 .. "
                                        f"{rec.num_sequences - 1}) to say which answer the feedback is for")
            row = 0
        row = checks.integer(who, "row", row, minimum=0)
        if row >= rec.num_sequences:
            checks.fail(who, "row", f"`row` must be in [0, {rec.num_sequences - 1}], got {row}")
        checks.boolean(who, "non_blocking", non_blocking)
        hidden, targets = rec.hidden[row], rec.tokens[row]
        if targets.numel() == 0:
            checks.fail(who, "row", f"sequence {row} of the last generation has no generated token")
        self.wait()

        def job() -> RosaStep:
            step = self._step(hidden, targets, r, includes_shift=False)
            if self._recorded is rec:  # used once, and only by a step that succeeded (a failed one can be retried)
                self._recorded = None
            return step

        return self._run(job, non_blocking, borrowed=(hidden, targets))

    # -- the update -----------------------------------------------------------------------
    def update(self, input_ids: Optional[torch.Tensor] = None, reward: Optional[float] = None, *,
               response_start: Optional[int] = None, response_mask: Optional[torch.Tensor] = None,
               attention_mask: Optional[torch.Tensor] = None, non_blocking: bool = False,
               row: Optional[int] = None) -> Union[RosaStep, UpdateHandle]:
        """One ROSA step on one exchange (prompt + response).

        Without ``input_ids`` (``session.update(reward=r)``) the step is taken on the answer of the last
        :meth:`generate` from its recorded lm_head inputs, with no body forward
        (:meth:`update_from_generation`; ``row`` picks the sequence of a batched generation).

        Args:
            input_ids: (T,) or (1, T) int64, the prompt followed by the response.
            reward: the feedback r (finite float; -1/+1 rule-based, [0, 1] judge).
            response_start: index of the first response token (the rest is the response), or
            response_mask: (T,) bool, True at the response tokens that enter the target
                (e.g. only the answer span). Exactly one of the two.
            attention_mask: optional (1, T) mask passed to the body forward.
            non_blocking: run in the background (side CUDA stream / worker thread) and
                return an :class:`UpdateHandle`; the next forward waits for it. Refused when the
                model's body is tensor-parallel (its collectives would interleave with the update's).
        Returns:
            The :class:`RosaStep` (already applied to the session), or a handle.
        Runs one no-grad forward of the model body (never the T x V logits), then
        :func:`rosa_ext.rosa_update` on the response positions. Bad input raises
        before anything changes (README, "Errors").
        """
        if input_ids is None:
            if reward is None:
                checks.fail("update", "reward", "`reward` is required: update(input_ids, reward, ...) or, after "
                                                "session.generate(...), update(reward=r)", checks.RosaTypeError)
            if response_start is not None or response_mask is not None or attention_mask is not None:
                checks.fail("update", "input_ids", "`response_start` / `response_mask` / `attention_mask` describe "
                                                   "`input_ids`; without them the step uses the last generation")
            return self.update_from_generation(reward, row=row, non_blocking=non_blocking)
        if row is not None:
            checks.fail("update", "row", "`row` picks a sequence of the last generation; it needs input_ids=None")
        self._check_attached()  # every argument, before the step runs or is queued:
        ids = ichecks.token_ids("update", input_ids, self.vocab_size, self.weight.device)
        pos = ichecks.response_positions("update", ids, response_start, response_mask)
        r = checks.one_reward("update", reward, self.state_dtype)
        ichecks.attention_mask("update", attention_mask, ids)
        checks.boolean("update", "non_blocking", non_blocking)
        self.wait()

        def job() -> RosaStep:
            with torch.no_grad():
                am = None if attention_mask is None else attention_mask.reshape(1, -1)
                out = self.body(input_ids=ids.unsqueeze(0), attention_mask=am, use_cache=False)
                h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
                hidden = h[0, pos - 1]
            return self._step(hidden, ids[pos], r, includes_shift=False)

        return self._run(job, non_blocking, borrowed=(ids, pos, attention_mask))

    def update_from_hidden(self, hidden: torch.Tensor, targets: torch.Tensor, reward: float, *,
                           includes_shift: bool = False, non_blocking: bool = False
                           ) -> Union[RosaStep, UpdateHandle]:
        """One ROSA step from hidden states the caller already holds (e.g. from generation).

        Args:
            hidden: (N, d) floating-point lm_head inputs at the positions that predict ``targets``
                (cast to the head's dtype). By default these are the base body's outputs
                (``includes_shift=False``) and the session adds its current hidden shift; pass
                True if they were captured after the shift.
            targets: (N,) int64 response tokens.
            reward: the feedback r.
        Every argument is checked here, before the step is run or queued.
        """
        who = "update_from_hidden"
        self._check_attached()
        r = checks.one_reward(who, reward, self.state_dtype)
        hidden, targets = ichecks.hidden_rows(who, hidden, targets, hidden_size=self.hidden_size, vocab_size=self.vocab_size,
                                        device=self.weight.device, head_dtype=self.weight.dtype)
        checks.boolean(who, "includes_shift", includes_shift)
        checks.boolean(who, "non_blocking", non_blocking)
        self.wait()
        h = hidden.detach()
        return self._run(lambda: self._step(h, targets, r, includes_shift=includes_shift), non_blocking,
                         borrowed=(h, targets))

    def _step(self, hidden: torch.Tensor, targets: torch.Tensor, reward: float, *,
              includes_shift: bool) -> RosaStep:
        """Run the op, then apply its step: every cast is made before the first write. The whole read,
        solve and write happens under the session's lock (updates from several threads serialise)."""
        W = self.weight.detach()
        bias = None if self.bias is None else self.bias.detach()
        hidden = hidden.to(W.dtype)
        with self._lock:
            lora = {} if self.lora is None else self.lora.terms()
            if self.mode == "hidden":
                if not includes_shift and self.adapter.active:
                    hidden = hidden + self.delta.to(hidden.dtype)
                step = rosa_update(hidden, W, targets, reward, config=self.config, bias=bias, **lora)
                writes = [(self.delta, step.delta.to(self.delta.dtype))]
            else:
                step = rosa_update(hidden, W, targets, reward, config=self.config, bias=bias, **lora)
                writes = self.lora.step_writes(step.delta_a, step.delta_b)
            with torch.no_grad():
                for target, d in writes:
                    target.add_(d)
                self.adapter.changed()
                self.adapter.active = True
                self.num_updates += 1
                self.last_step = step
        return step

    def _run(self, job, non_blocking: bool, borrowed=()) -> Union[RosaStep, UpdateHandle]:
        if not non_blocking:
            return job()
        if self._parallel_body:
            checks.fail("update", "non_blocking", "non_blocking=True is not supported when the model's body is "
                   "tensor-parallel: the background update's collectives (and its body forward's) would interleave "
                   "with the model's own across threads; update synchronously")
        return self._runner.submit(job, borrowed)

    # -- state --------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every update: the model's outputs become bitwise those of the base model.

        A pending background update is waited for first. If it failed, the session is still
        reset, and then its error is raised (once): after ``reset()`` returns *or raises*, the
        session is at the base model.
        """
        error: Optional[BaseException] = None
        try:
            self.wait()
        except Exception as e:  # raised below, after the reset
            error = e
        with torch.no_grad(), self._lock:
            self.adapter.reset()
            if self.lora is not None and self.lora.moved:
                self.lora.restore()
            self.num_updates = 0
            self.last_step = None
        if error is not None:
            raise error

    def state_dict(self) -> Dict[str, Any]:
        """This conversation's adaptation (d + V numbers at most), on the CPU."""
        self.wait()
        sd: Dict[str, Any] = {"version": _STATE_VERSION, "mode": self.mode, "num_updates": self.num_updates,
                              "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                              "lora_scale": self.lora_scale}
        if isinstance(self.adapter, ShardedHeadAdapter):  # this rank's rows of b (MATH.md section 7)
            sd["vocab_start"], sd["vocab_rows"] = self.adapter.vocab_start, self.adapter.rows_held
        with self._lock:
            if self.mode == "hidden":
                sd["delta"] = self.delta.detach().cpu().clone()
            else:
                sd.update(self.lora.state())
        return sd

    def save_peft(self, directory: Any, **kwargs: Any) -> Any:
        """Write this lora-mode state as a PEFT adapter directory; see
        :func:`rosa_ext.integrations.export.save_peft` (returns the directory's Path)."""
        from .export import save_peft
        return save_peft(self, directory, **kwargs)

    def _shard(self) -> Optional[Tuple[int, int]]:
        """(vocab_start, rows) of this rank's rows of ``b`` on a vocabulary-parallel head, else None."""
        if isinstance(self.adapter, ShardedHeadAdapter):
            return self.adapter.vocab_start, self.adapter.rows_held
        return None

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore an adaptation saved by :meth:`state_dict`; atomic: all of it or nothing.

        Every key is checked first (the version, mode, sizes and ``lora_scale`` must match this
        session; ``num_updates`` an int >= 0, and 0 only with a zero ``delta`` / ``b``; the
        tensors finite with the right shape) and converted to the session's dtype and device;
        only then is anything written (PEFT's ``lora_A``/``lora_B`` included). A failed pending
        background update raises here, before the load.
        """
        who = "load_state_dict"
        self._check_attached()
        num, tensors = ichecks.session_state(who, state, version=_STATE_VERSION, mode=self.mode,
                                       vocab_size=self.vocab_size, hidden_size=self.hidden_size,
                                       lora_scale=self.lora_scale, check_zero=not isinstance(self.lora, PeftLora) or
                                       self.mode == "hidden", shard=self._shard())
        if self.mode == "hidden":
            pairs = [("delta", self.delta, tensors["delta"])]
        else:
            pairs = self.lora.load_pairs(tensors["a"], tensors["b"])
        staged = []
        for key, dst, src in pairs:
            src = src.detach().to(device=dst.device, dtype=dst.dtype)
            if not bool(torch.isfinite(src).all()):  # e.g. a float32 state into a float16 PEFT adapter
                checks.fail(who, f"state[{key!r}]", f"`state[{key!r}]` overflows {dst.dtype}, the dtype it is loaded "
                                               "into", checks.RosaNonFiniteError)
            staged.append((dst, src))
        self.wait()
        with torch.no_grad(), self._lock:
            for dst, src in staged:
                dst.copy_(src)
            self.num_updates = num
            self.adapter.changed()
            self.adapter.active = num > 0
            self.last_step = None

    def detach(self) -> None:
        """Remove every hook and restore PEFT weights: the model is as before :func:`attach`."""
        if self.model is None:
            return
        try:
            self.wait()
        finally:
            if self.lora is not None and self.lora.moved:
                self.lora.restore()
            self.adapter.remove()
            self._recorder.remove()
            self._recorded = None
            self._runner.shutdown()
            try:
                del self.model._rosa_session
            except AttributeError:
                pass
            self.model = None
            self.adapter.active = False

    def _check_attached(self) -> None:
        if self.model is None:
            raise checks.RosaStateError("this ROSA session was detached; attach() the model again")

    def __repr__(self) -> str:
        return (f"RosaSession(mode={self.mode!r}, d={self.hidden_size}, V={self.vocab_size}, "
                f"updates={self.num_updates}, peft={isinstance(self.lora, PeftLora)})")


#: ``mode`` not given: the config's, else "lora" (a sentinel, so that ``mode=None`` is refused as an error)
DEFAULT_MODE: Any = type("DefaultMode", (), {"__repr__": lambda self: "<config.mode, else 'lora'>"})()


def attach(model: torch.nn.Module, mode: str = DEFAULT_MODE, *, config: Optional[RosaConfig] = None,
           seed: int = 0, warmup: bool = True, **options: Any) -> RosaSession:
    """Attach ROSA to a causal LM with an ``lm_head``; returns the :class:`RosaSession`.

    Args:
        model: a ``transformers`` causal LM (Qwen2/Qwen3/Llama/...; tied or untied
            embeddings) or a ``PeftModel`` (an r=1 LoRA on ``lm_head`` is then the adapter
            ROSA moves in lora mode).
        mode: "lora" (rank-1 LoRA on lm_head, alpha 8 as in the paper) or "hidden"
            (one shift vector added to lm_head's input); default ``config.mode``, or "lora".
        config: the options of every update (:class:`~rosa_ext.common.config.RosaConfig`: beta,
            damping, damping_mode, max_iter, tol, solver, backend, lora_scale, ...); ``lora_scale`` is
            s = alpha / r of the session's own adapter (PEFT's scaling otherwise).
        **options: any RosaConfig option by name, overriding ``config`` (``damping=0.1``, ...).
        seed: seed of the own adapter's ``a`` init (PEFT-like uniform, ``b = 0``).
        warmup: on CUDA with the Triton backend, compile and autotune its kernels now, on dummy
            updates of this head (one per autotune token bucket, 16..4096 tokens), so that the first
            real update pays neither (the first attach on a machine takes a minute or more: every
            tile config is compiled; Triton caches both on disk). A no-op on the CPU.
    Raises (README, "Errors"):
        RosaTypeError / RosaInputError (TypeError / ValueError): a bad option (each is checked
            here, not at the first update: mode, beta, damping, damping_mode, max_iter, tol, solver, backend,
            lora_scale, seed), no lm_head, a PEFT lm_head LoRA with r != 1.
        RosaStateError (RuntimeError): the model already has a session.
    Nothing is modified (no hook installed) when it raises.
    """
    return RosaSession(model, session_config("attach", mode, config, options), seed=seed, warmup=warmup)


def session_config(who: str, mode: Any, config: Optional[RosaConfig], options: Dict[str, Any]) -> RosaConfig:
    """The RosaConfig of a session or a many-user store: ``config`` (default: the defaults in mode "lora")
    with ``mode`` (unless :data:`DEFAULT_MODE`) and ``options`` applied; errors name the option and ``who``."""
    if mode is not DEFAULT_MODE:
        options = dict(options, mode=mode)
    elif config is None:
        options = dict(options, mode="lora")
    return resolve(who, config, options)
