"""Adapt a live ``transformers`` (or PEFT) model during a conversation.

``session = rosa_ext.attach(model, mode="lora" | "hidden")`` hooks the model's
``lm_head``; ``session.update(input_ids, reward, response_start=...)`` runs one
ROSA step (ROSA_SPEC.md section 1) on that exchange; later forwards and
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

import math
import threading
from concurrent.futures import Future, ThreadPoolExecutor
from typing import Any, Dict, Optional, Union

import torch

from .common.types import MODES
from .common import defaults
from .core.op import RosaStep, rosa_update

_STATE_VERSION = 1


def _find_lm_head(model: torch.nn.Module) -> torch.nn.Module:
    base = _base_model(model)
    head = getattr(base, "lm_head", None)
    if head is None and hasattr(base, "get_output_embeddings"):
        head = base.get_output_embeddings()
    if head is None:
        raise ValueError(f"attach: {type(model).__name__} has no `lm_head` (output embedding); ROSA "
                         "adapts a causal LM's vocabulary head")
    return head


def _base_model(model: torch.nn.Module) -> torch.nn.Module:
    """The transformers model under a PeftModel (or the model itself)."""
    if hasattr(model, "get_base_model") and hasattr(model, "peft_config"):
        return model.get_base_model()
    return model


def _find_body(model: torch.nn.Module) -> torch.nn.Module:
    base = _base_model(model)
    body = base.get_decoder() if hasattr(base, "get_decoder") else getattr(base, "model", None)
    if not isinstance(body, torch.nn.Module) or body is base:
        raise ValueError(f"attach: cannot find the decoder body of {type(base).__name__} "
                         "(expected `get_decoder()` or `.model`)")
    return body


def _head_weight(head: torch.nn.Module) -> torch.Tensor:
    layer = getattr(head, "base_layer", head)  # PEFT LoRA wraps the Linear in base_layer
    w = getattr(layer, "weight", None)
    if not isinstance(w, torch.Tensor) or w.dim() != 2:
        raise ValueError(f"attach: lm_head {type(head).__name__} has no 2-D `weight`")
    return w


def _peft_lora(head: torch.nn.Module):
    """(lora_A Linear, lora_B Linear, scale) of a PEFT LoRA lm_head, or None."""
    if not (hasattr(head, "lora_A") and hasattr(head, "base_layer")):
        return None
    names = getattr(head, "active_adapters", None) or list(head.lora_A.keys())
    if isinstance(names, str):
        names = [names]
    names = [n for n in names if n in head.lora_A]
    if len(names) != 1:
        raise ValueError(f"attach: the PEFT lm_head must have exactly one active LoRA adapter, got {names}")
    name = names[0]
    A, Bm = head.lora_A[name], head.lora_B[name]
    if A.weight.shape[0] != 1:
        raise ValueError(f"attach: the PEFT LoRA on lm_head must have r=1 (ROSA moves a rank-1 "
                         f"adapter), got r={A.weight.shape[0]}")
    return A, Bm, float(head.scaling[name])


class UpdateHandle:
    """A background update in flight (``session.update(..., non_blocking=True)``).

    ``wait()`` returns the :class:`RosaStep` or raises the update's error. The
    session waits automatically before its next forward, update, reset or save.
    """

    def __init__(self, future: Future, event: Optional["torch.cuda.Event"], session: "RosaSession") -> None:
        self._future = future
        self._event = event
        self._session = session

    def done(self) -> bool:
        """True when the host part finished (the GPU may still be working)."""
        return self._future.done()

    def wait(self) -> RosaStep:
        """Block until the update is applied; orders the current CUDA stream after it."""
        if self._session._pending is self:  # its error (if any) surfaces here, once
            self._session._pending = None
        step = self._future.result()
        if self._event is not None:
            torch.cuda.current_stream().wait_event(self._event)
        return step


class RosaSession:
    """One conversation's ROSA adaptation of a model. Create with :func:`attach`."""

    def __init__(self, model: torch.nn.Module, mode: str, *, beta: float, damping: float,
                 max_iter: int, tol: float, solver: str, backend: str, lora_scale: float,
                 seed: int) -> None:
        if mode not in MODES:
            raise ValueError(f"attach: mode must be one of {MODES}, got {mode!r}")
        if not isinstance(model, torch.nn.Module):
            raise TypeError(f"attach: expected a torch.nn.Module, got {type(model).__name__}")
        if getattr(model, "_rosa_session", None) is not None:
            raise RuntimeError("attach: this model already has a ROSA session; detach() it first")
        cfg = getattr(_base_model(model), "config", None)
        if cfg is not None and getattr(cfg, "final_logit_softcapping", None):
            raise NotImplementedError("attach: models with final logit soft-capping are not supported "
                                      "(the logits are not an affine function of lm_head's input)")
        self.model = model
        self.mode = mode
        self.head = _find_lm_head(model)
        self.body = _find_body(model)
        self.weight = _head_weight(self.head)
        layer = getattr(self.head, "base_layer", self.head)
        self.bias = getattr(layer, "bias", None)
        self.options = dict(beta=beta, damping=damping, max_iter=max_iter, tol=tol, solver=solver,
                            backend=backend)
        V, d = self.weight.shape
        self.vocab_size, self.hidden_size = V, d
        dev = self.weight.device
        self.state_dtype = torch.float64 if self.weight.dtype == torch.float64 else torch.float32

        self._peft = _peft_lora(self.head)
        if self._peft is not None and mode == "lora":
            A, Bm, scale = self._peft
            self.lora_scale = scale
            self._peft_init = (A.weight.detach().clone(), Bm.weight.detach().clone())
        else:
            self.lora_scale = float(lora_scale)
            self._peft_init = None
        # Own parameters (compute dtype). lora: a ~ U(-1/sqrt(d), 1/sqrt(d)) as PEFT's
        # kaiming_uniform(a=sqrt(5)) init of lora_A, b = 0; hidden: delta = 0.
        gen = torch.Generator(device="cpu").manual_seed(int(seed))
        bound = 1.0 / math.sqrt(d)
        self._a0 = ((torch.rand(d, generator=gen, dtype=torch.float64) * 2 - 1) * bound).to(
            self.state_dtype).to(dev)
        self.a = self._a0.clone()
        self.b = torch.zeros(V, dtype=self.state_dtype, device=dev)
        self.delta = torch.zeros(d, dtype=self.state_dtype, device=dev)
        self.num_updates = 0
        self.last_step: Optional[RosaStep] = None
        self._active = False  # False: hooks pass values through untouched (bitwise base outputs)
        self._cast: Dict[str, torch.Tensor] = {}
        self._pending: Optional[UpdateHandle] = None
        self._executor: Optional[ThreadPoolExecutor] = None
        self._lock = threading.Lock()
        self._handles = []
        # Every use of the head waits for a background update first (PEFT's own LoRA
        # forward included), so a pending update is never half-visible.
        self._handles.append(self.head.register_forward_pre_hook(self._wait_hook))
        if mode == "hidden":
            self._handles.append(self.head.register_forward_pre_hook(self._shift_hook))
        elif self._peft is None:
            self._handles.append(self.head.register_forward_hook(self._lora_hook))
        model._rosa_session = self

    # -- hooks ---------------------------------------------------------------------
    def _wait_hook(self, module, args):
        self._wait_pending()
        return None

    def _shift_hook(self, module, args):
        self._wait_pending()
        if not self._active:
            return None
        x = args[0]
        shift = self._cast_of("delta", self.delta, x.dtype)
        return (x + shift,) + tuple(args[1:])

    def _lora_hook(self, module, args, out):
        self._wait_pending()
        if not self._active:
            return None
        x = args[0]
        a = self._cast_of("a", self.a, x.dtype)
        b = self._cast_of("b", self.b, out.dtype)
        return out + (self.lora_scale * (x @ a)).unsqueeze(-1) * b

    def _cast_of(self, key: str, t: torch.Tensor, dtype: torch.dtype) -> torch.Tensor:
        c = self._cast.get(key)
        if c is None or c.dtype != dtype:
            c = t.to(dtype)
            self._cast[key] = c
        return c

    # -- background updates ---------------------------------------------------------
    def _wait_pending(self) -> None:
        pending = self._pending
        if pending is None:
            return
        if threading.current_thread() is getattr(self, "_worker_thread", None):
            return  # the worker's own forward
        self._pending = None
        pending.wait()

    def wait(self) -> Optional[RosaStep]:
        """Wait for a background update, if any; returns its step (raises its error)."""
        pending = self._pending
        if pending is None:
            return None
        self._pending = None
        return pending.wait()

    # -- input checks ------------------------------------------------------------------
    def _response_positions(self, input_ids: torch.Tensor, response_start: Optional[int],
                            response_mask: Optional[torch.Tensor]) -> torch.Tensor:
        """Validate and return the (N,) indices of the response tokens in input_ids (T,)."""
        T = input_ids.shape[0]
        if (response_start is None) == (response_mask is None):
            raise ValueError("update: give exactly one of `response_start` (index of the first "
                             "response token) or `response_mask` ((T,) bool)")
        if response_start is not None:
            if isinstance(response_start, bool) or int(response_start) != response_start:
                raise TypeError(f"update: `response_start` must be an int, got {response_start!r}")
            response_start = int(response_start)
            if not 1 <= response_start < T:
                raise ValueError(f"update: `response_start` must be in [1, {T - 1}] (the prompt needs "
                                 f"at least one token and the response at least one), got {response_start}")
            return torch.arange(response_start, T, device=input_ids.device)
        m = response_mask
        if not isinstance(m, torch.Tensor):
            raise TypeError("update: `response_mask` must be a torch.Tensor")
        if m.dim() == 2 and m.shape[0] == 1:
            m = m[0]
        if m.shape != (T,):
            raise ValueError(f"update: `response_mask` must have shape ({T},) like input_ids, got "
                             f"{tuple(response_mask.shape)}")
        if m.dtype != torch.bool:
            raise TypeError(f"update: `response_mask` must be bool, got {m.dtype}")
        if m.device != input_ids.device:
            raise ValueError(f"update: `response_mask` is on {m.device} but input_ids on {input_ids.device}")
        if bool(m[0]):
            raise ValueError("update: `response_mask[0]` must be False (no position predicts the first token)")
        pos = torch.nonzero(m).flatten()
        if pos.numel() == 0:
            raise ValueError("update: `response_mask` selects no response token")
        return pos

    def _check_ids(self, input_ids: torch.Tensor) -> torch.Tensor:
        if not isinstance(input_ids, torch.Tensor):
            raise TypeError(f"update: `input_ids` must be a torch.Tensor, got {type(input_ids).__name__}")
        ids = input_ids
        if ids.dim() == 2:
            if ids.shape[0] != 1:
                raise ValueError(f"update: one conversation per session: input_ids must be (T,) or (1, T), "
                                 f"got {tuple(ids.shape)} (for many conversations call rosa_update "
                                 "with a batch, or keep one session state per user)")
            ids = ids[0]
        if ids.dim() != 1:
            raise ValueError(f"update: input_ids must be (T,) or (1, T), got {tuple(input_ids.shape)}")
        if ids.dtype not in (torch.int64, torch.int32):
            raise TypeError(f"update: input_ids must be int64 token ids, got {ids.dtype}")
        if ids.device != self.weight.device:
            raise ValueError(f"update: input_ids are on {ids.device} but the model's lm_head is on "
                             f"{self.weight.device}")
        if ids.numel() < 2:
            raise ValueError("update: input_ids need a prompt and a response (T >= 2)")
        lo, hi = int(ids.min()), int(ids.max())
        if lo < 0 or hi >= self.vocab_size:
            raise ValueError(f"update: token ids must be in [0, {self.vocab_size}), got range [{lo}, {hi}]")
        return ids.long()

    @staticmethod
    def _check_reward(reward: Any) -> float:
        if isinstance(reward, torch.Tensor):
            if reward.numel() != 1:
                raise ValueError(f"update: one reward per update, got shape {tuple(reward.shape)}")
            reward = reward.item()
        if isinstance(reward, bool) or not isinstance(reward, (int, float)):
            raise TypeError(f"update: `reward` must be a float, got {type(reward).__name__}")
        if not math.isfinite(float(reward)):
            raise ValueError(f"update: `reward` must be finite, got {reward}")
        return float(reward)

    # -- the update -----------------------------------------------------------------------
    def update(self, input_ids: torch.Tensor, reward: float, *, response_start: Optional[int] = None,
               response_mask: Optional[torch.Tensor] = None, attention_mask: Optional[torch.Tensor] = None,
               non_blocking: bool = False) -> Union[RosaStep, UpdateHandle]:
        """One ROSA step on one exchange (prompt + response).

        Args:
            input_ids: (T,) or (1, T) int64, the prompt followed by the response.
            reward: the feedback r (finite float; -1/+1 rule-based, [0, 1] judge).
            response_start: index of the first response token (the rest is the response), or
            response_mask: (T,) bool, True at the response tokens that enter the target
                (e.g. only the answer span). Exactly one of the two.
            attention_mask: optional (1, T) mask passed to the body forward.
            non_blocking: run in the background (side CUDA stream / worker thread) and
                return an :class:`UpdateHandle`; the next forward waits for it.
        Returns:
            The :class:`RosaStep` (already applied to the session), or a handle.
        Runs one no-grad forward of the model body (never the T x V logits), then
        :func:`rosa_ext.rosa_update` on the response positions. Bad input raises
        before anything changes.
        """
        self._check_attached()
        ids = self._check_ids(input_ids)
        pos = self._response_positions(ids, response_start, response_mask)
        r = self._check_reward(reward)
        if attention_mask is not None and (not isinstance(attention_mask, torch.Tensor)
                                           or attention_mask.numel() != ids.numel()):
            raise ValueError("update: `attention_mask` must be a tensor with one entry per token")
        self.wait()

        def job() -> RosaStep:
            with torch.no_grad():
                am = None if attention_mask is None else attention_mask.reshape(1, -1)
                out = self.body(input_ids=ids.unsqueeze(0), attention_mask=am, use_cache=False)
                h = out.last_hidden_state if hasattr(out, "last_hidden_state") else out[0]
                hidden = h[0, pos - 1]
            return self._step(hidden, ids[pos], r, includes_shift=False)

        return self._run(job, non_blocking)

    def update_from_hidden(self, hidden: torch.Tensor, targets: torch.Tensor, reward: float, *,
                           includes_shift: bool = False, non_blocking: bool = False
                           ) -> Union[RosaStep, UpdateHandle]:
        """One ROSA step from hidden states the caller already holds (e.g. from generation).

        Args:
            hidden: (N, d) lm_head inputs at the positions that predict ``targets``.
                By default these are the base body's outputs (``includes_shift=False``)
                and the session adds its current hidden shift; pass True if they were
                captured after the shift.
            targets: (N,) int64 response tokens.
            reward: the feedback r.
        """
        self._check_attached()
        r = self._check_reward(reward)
        if not isinstance(hidden, torch.Tensor) or hidden.dim() != 2 or hidden.shape[1] != self.hidden_size:
            raise ValueError(f"update_from_hidden: `hidden` must be (N, {self.hidden_size}), got "
                             f"{tuple(getattr(hidden, 'shape', ()))}")
        if hidden.device != self.weight.device:
            raise ValueError(f"update_from_hidden: `hidden` is on {hidden.device}, lm_head on {self.weight.device}")
        self.wait()
        h = hidden.detach()
        return self._run(lambda: self._step(h, targets, r, includes_shift=includes_shift), non_blocking)

    def _step(self, hidden: torch.Tensor, targets: torch.Tensor, reward: float, *,
              includes_shift: bool) -> RosaStep:
        W = self.weight.detach()
        bias = None if self.bias is None else self.bias.detach()
        hidden = hidden.to(W.dtype)
        if self.mode == "hidden":
            if not includes_shift and self._active:
                hidden = hidden + self.delta.to(hidden.dtype)
            lora_a = lora_b = None
            scale = self.lora_scale
            if self._peft is not None:  # PEFT LoRA term is part of the logits
                A, Bm, scale = self._peft
                lora_a, lora_b = A.weight.detach().reshape(-1), Bm.weight.detach().reshape(-1)
            step = rosa_update(hidden, W, targets, reward, mode="hidden", lora_a=lora_a, lora_b=lora_b,
                               lora_scale=scale, bias=bias, **self.options)
            with self._lock:
                self.delta += step.delta.to(self.delta.dtype)
        elif self._peft is not None:
            A, Bm, scale = self._peft
            step = rosa_update(hidden, W, targets, reward, mode="lora", lora_a=A.weight.detach(),
                               lora_b=Bm.weight.detach(), lora_scale=scale, bias=bias, **self.options)
            with torch.no_grad(), self._lock:
                A.weight.add_(step.delta_a.reshape(A.weight.shape).to(A.weight.dtype))
                Bm.weight.add_(step.delta_b.reshape(Bm.weight.shape).to(Bm.weight.dtype))
        else:
            step = rosa_update(hidden, W, targets, reward, mode="lora", lora_a=self.a, lora_b=self.b,
                               lora_scale=self.lora_scale, bias=bias, **self.options)
            with self._lock:
                self.a += step.delta_a.to(self.a.dtype)
                self.b += step.delta_b.to(self.b.dtype)
        with self._lock:
            self._cast.clear()
            self._active = True
            self.num_updates += 1
            self.last_step = step
        return step

    def _run(self, job, non_blocking: bool) -> Union[RosaStep, UpdateHandle]:
        if not non_blocking:
            return job()
        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="rosa-update")
        cuda = self.weight.device.type == "cuda"
        event = torch.cuda.Event() if cuda else None
        side = torch.cuda.Stream(device=self.weight.device) if cuda else None
        if cuda:
            side.wait_stream(torch.cuda.current_stream(self.weight.device))

        def work() -> RosaStep:
            self._worker_thread = threading.current_thread()
            if not cuda:
                return job()
            with torch.cuda.stream(side):
                step = job()
                event.record(side)
            return step

        handle = UpdateHandle(self._executor.submit(work), event, self)
        self._pending = handle
        return handle

    # -- state --------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every update: the model's outputs become bitwise those of the base model."""
        self.wait()
        with torch.no_grad(), self._lock:
            self.a.copy_(self._a0)
            self.b.zero_()
            self.delta.zero_()
            if self._peft_init is not None:
                A, Bm, _ = self._peft
                A.weight.copy_(self._peft_init[0])
                Bm.weight.copy_(self._peft_init[1])
            self._cast.clear()
            self._active = False
            self.num_updates = 0
            self.last_step = None

    def state_dict(self) -> Dict[str, Any]:
        """This conversation's adaptation (d + V numbers at most), on the CPU."""
        self.wait()
        sd: Dict[str, Any] = {"version": _STATE_VERSION, "mode": self.mode, "num_updates": self.num_updates,
                              "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                              "lora_scale": self.lora_scale}
        if self.mode == "hidden":
            sd["delta"] = self.delta.detach().cpu().clone()
        elif self._peft is not None:
            A, Bm, _ = self._peft
            sd["a"] = A.weight.detach().reshape(-1).cpu().clone()
            sd["b"] = Bm.weight.detach().reshape(-1).cpu().clone()
        else:
            sd["a"] = self.a.cpu().clone()
            sd["b"] = self.b.cpu().clone()
        return sd

    def load_state_dict(self, state: Dict[str, Any]) -> None:
        """Restore an adaptation saved by :meth:`state_dict` (validated before anything changes)."""
        self._check_attached()
        if not isinstance(state, dict) or state.get("version") != _STATE_VERSION:
            raise ValueError("load_state_dict: not a rosa_ext session state (missing or unknown `version`)")
        if state.get("mode") != self.mode:
            raise ValueError(f"load_state_dict: state is for mode={state.get('mode')!r}, session is {self.mode!r}")
        if (state.get("vocab_size"), state.get("hidden_size")) != (self.vocab_size, self.hidden_size):
            raise ValueError(f"load_state_dict: state is for V={state.get('vocab_size')}, d={state.get('hidden_size')}; "
                             f"this model has V={self.vocab_size}, d={self.hidden_size}")
        keys = ("delta",) if self.mode == "hidden" else ("a", "b")
        for k in keys:
            t = state.get(k)
            want = self.hidden_size if k in ("delta", "a") else self.vocab_size
            if not isinstance(t, torch.Tensor) or t.shape != (want,) or not bool(torch.isfinite(t).all()):
                raise ValueError(f"load_state_dict: `{k}` must be a finite ({want},) tensor")
        self.wait()
        with torch.no_grad(), self._lock:
            if self.mode == "hidden":
                self.delta.copy_(state["delta"])
            elif self._peft is not None:
                A, Bm, _ = self._peft
                A.weight.copy_(state["a"].reshape(A.weight.shape))
                Bm.weight.copy_(state["b"].reshape(Bm.weight.shape))
            else:
                self.a.copy_(state["a"])
                self.b.copy_(state["b"])
            self.num_updates = int(state.get("num_updates", 0))
            self._cast.clear()
            self._active = self.num_updates > 0
            self.last_step = None

    def detach(self) -> None:
        """Remove every hook and restore PEFT weights: the model is as before :func:`attach`."""
        if self.model is None:
            return
        try:
            self.wait()
        finally:
            if self._peft_init is not None:
                A, Bm, _ = self._peft
                with torch.no_grad():
                    A.weight.copy_(self._peft_init[0])
                    Bm.weight.copy_(self._peft_init[1])
            for h in self._handles:
                h.remove()
            self._handles = []
            if self._executor is not None:
                self._executor.shutdown(wait=True)
                self._executor = None
            try:
                del self.model._rosa_session
            except AttributeError:
                pass
            self.model = None
            self._active = False

    def _check_attached(self) -> None:
        if self.model is None:
            raise RuntimeError("this ROSA session was detached")

    def __repr__(self) -> str:
        return (f"RosaSession(mode={self.mode!r}, d={self.hidden_size}, V={self.vocab_size}, "
                f"updates={self.num_updates}, peft={self._peft is not None})")


def attach(model: torch.nn.Module, mode: str = "lora", *, beta: float = defaults.BETA,
           damping: float = defaults.DAMPING, max_iter: int = defaults.MAX_ITER, tol: float = defaults.TOL,
           solver: str = defaults.SOLVER, backend: str = defaults.BACKEND, lora_scale: float = defaults.LORA_SCALE,
           seed: int = 0) -> RosaSession:
    """Attach ROSA to a causal LM with an ``lm_head``; returns the :class:`RosaSession`.

    Args:
        model: a ``transformers`` causal LM (Qwen2/Qwen3/Llama/...; tied or untied
            embeddings) or a ``PeftModel`` (an r=1 LoRA on ``lm_head`` is then the adapter
            ROSA moves in lora mode).
        mode: "lora" (rank-1 LoRA on lm_head, alpha 8 as in the paper) or "hidden"
            (one shift vector added to lm_head's input).
        beta, damping, max_iter, tol, solver, backend: passed to :func:`rosa_ext.rosa_update`.
        lora_scale: s = alpha / r of the session's own adapter (PEFT's scaling otherwise).
        seed: seed of the own adapter's ``a`` init (PEFT-like uniform, ``b = 0``).
    Raises:
        ValueError: no lm_head, unknown mode, a PEFT lm_head LoRA with r != 1.
        RuntimeError: the model already has a session.
    Nothing is modified when it raises.
    """
    return RosaSession(model, mode, beta=beta, damping=damping, max_iter=max_iter, tol=tol, solver=solver,
                       backend=backend, lora_scale=lora_scale, seed=seed)
