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

import math
import threading
from typing import Any, Dict, Optional, Union

import torch

from ..common import defaults
from ..common.types import MODES
from ..core.distributed import is_dtensor
from ..core.op import RosaStep, rosa_update
from .background import BackgroundRunner, UpdateHandle
from .head_hooks import HeadAdapter
from .model_lookup import base_model, find_body, find_lm_head, head_bias, head_weight, peft_lora
from .sharded_head import ShardedHeadAdapter, head_adapter

_STATE_VERSION = 1


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
        cfg = getattr(base_model(model), "config", None)
        if cfg is not None and getattr(cfg, "final_logit_softcapping", None):
            raise NotImplementedError("attach: models with final logit soft-capping are not supported "
                                      "(the logits are not an affine function of lm_head's input)")
        self.mode = mode
        self.head = find_lm_head(model)
        self.body = find_body(model)
        self.weight = head_weight(self.head)
        self.bias = head_bias(self.head)
        self.options = dict(beta=beta, damping=damping, max_iter=max_iter, tol=tol, solver=solver,
                            backend=backend)
        V, d = self.weight.shape
        self.vocab_size, self.hidden_size = V, d
        dev = self.weight.device
        self.state_dtype = torch.float64 if self.weight.dtype == torch.float64 else torch.float32

        self._peft = peft_lora(self.head)
        # vocabulary-parallel head (MATH.md section 7): a tensor-parallel body issues collectives of
        # its own, which a background update's would interleave with (refused in _run)
        self._parallel_body = is_dtensor(self.weight) and any(is_dtensor(p) for p in self.body.parameters())
        if self._peft is not None and is_dtensor(self.weight):
            raise NotImplementedError("attach: a PEFT LoRA on a vocabulary-parallel (ColwiseParallel) lm_head is not "
                                      "supported; attach to the model without the PEFT adapter (ROSA then keeps its "
                                      "own rank-1 LoRA, b sharded like the head)")
        if self._peft is not None and mode == "lora":
            A, Bm, scale = self._peft
            self.lora_scale = scale
            self._peft_init = (A.weight.detach().clone(), Bm.weight.detach().clone())
        else:
            self.lora_scale = float(lora_scale)
            self._peft_init = None
        self.model = model
        self.num_updates = 0
        self.last_step: Optional[RosaStep] = None
        self._lock = threading.Lock()
        self._runner = BackgroundRunner(dev)
        # Own parameters (compute dtype) on hooks of lm_head: a ~ PEFT's lora_A init, b = 0;
        # delta = 0. Every use of the head waits for a background update first (PEFT's own
        # LoRA forward included), so a pending update is never half-visible.
        # (head_adapter: this rank's rows of b on a vocabulary-parallel head, MATH.md section 7)
        self.adapter: HeadAdapter = head_adapter(self.head, self.weight, mode, 1, vocab_size=V, hidden_size=d,
                                                 lora_scale=self.lora_scale, seed=seed, dtype=self.state_dtype,
                                                 device=dev, lora_hook=self._peft is None,
                                                 before_forward=self._runner.wait)
        model._rosa_session = self

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
                return an :class:`UpdateHandle`; the next forward waits for it. Refused when the
                model's body is tensor-parallel (its collectives would interleave with the update's).
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

        return self._run(job, non_blocking, borrowed=(ids, pos, attention_mask))

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
        return self._run(lambda: self._step(h, targets, r, includes_shift=includes_shift), non_blocking,
                         borrowed=(h, targets))

    def _step(self, hidden: torch.Tensor, targets: torch.Tensor, reward: float, *,
              includes_shift: bool) -> RosaStep:
        W = self.weight.detach()
        bias = None if self.bias is None else self.bias.detach()
        hidden = hidden.to(W.dtype)
        if self.mode == "hidden":
            if not includes_shift and self.adapter.active:
                hidden = hidden + self.delta.to(hidden.dtype)
            lora_a = lora_b = None
            scale = self.lora_scale
            if self._peft is not None:  # PEFT LoRA term is part of the logits
                A, Bm, scale = self._peft
                lora_a, lora_b = A.weight.detach().reshape(-1), Bm.weight.detach().reshape(-1)
            step = rosa_update(hidden, W, targets, reward, mode="hidden", lora_a=lora_a, lora_b=lora_b,
                               lora_scale=scale, bias=bias, **self.options)
            with self._lock:
                self.delta.add_(step.delta.to(self.delta.dtype))
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
                self.a.add_(step.delta_a.to(self.a.dtype))
                self.b.add_(step.delta_b.to(self.b.dtype))
        with self._lock:
            self.adapter.changed()
            self.adapter.active = True
            self.num_updates += 1
            self.last_step = step
        return step

    def _run(self, job, non_blocking: bool, borrowed=()) -> Union[RosaStep, UpdateHandle]:
        if not non_blocking:
            return job()
        if self._parallel_body:
            raise ValueError("update: non_blocking=True is not supported when the model's body is tensor-parallel: "
                             "the background update's collectives (and its body forward's) would interleave with "
                             "the model's own across threads; update synchronously")
        return self._runner.submit(job, borrowed)

    # -- state --------------------------------------------------------------------------
    def reset(self) -> None:
        """Forget every update: the model's outputs become bitwise those of the base model."""
        self.wait()
        with torch.no_grad(), self._lock:
            self.adapter.reset()
            if self._peft_init is not None:
                A, Bm, _ = self._peft
                A.weight.copy_(self._peft_init[0])
                Bm.weight.copy_(self._peft_init[1])
            self.num_updates = 0
            self.last_step = None

    def state_dict(self) -> Dict[str, Any]:
        """This conversation's adaptation (d + V numbers at most), on the CPU."""
        self.wait()
        sd: Dict[str, Any] = {"version": _STATE_VERSION, "mode": self.mode, "num_updates": self.num_updates,
                              "vocab_size": self.vocab_size, "hidden_size": self.hidden_size,
                              "lora_scale": self.lora_scale}
        if isinstance(self.adapter, ShardedHeadAdapter):  # this rank's rows of b (MATH.md section 7)
            sd["vocab_start"], sd["vocab_rows"] = self.adapter.vocab_start, self.adapter.rows_held
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
        if isinstance(self.adapter, ShardedHeadAdapter) and (state.get("vocab_start"), state.get("vocab_rows")) != (
                self.adapter.vocab_start, self.adapter.rows_held):
            raise ValueError(f"load_state_dict: state holds rows from {state.get('vocab_start')} ({state.get('vocab_rows')} "
                             f"rows); this rank holds rows from {self.adapter.vocab_start} ({self.adapter.rows_held} rows)")
        keys = ("delta",) if self.mode == "hidden" else ("a", "b")
        for k in keys:
            t = state.get(k)
            want = self.hidden_size if k in ("delta", "a") else self.adapter.V  # V, or this rank's rows
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
            self.adapter.changed()
            self.adapter.active = self.num_updates > 0
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
            self.adapter.remove()
            self._runner.shutdown()
            try:
                del self.model._rosa_session
            except AttributeError:
                pass
            self.model = None
            self.adapter.active = False

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
