"""The one place where rosa_ext checks its callers' arguments, and the error types it raises.

Every public entry point -- :func:`rosa_ext.rosa_update` (via ``core.problem.build_problem``),
:func:`rosa_ext.attach` and the :class:`~rosa_ext.integrations.session.RosaSession` methods,
:func:`rosa_ext.cg.cg` / ``cg_python`` / ``cg_compiled``, and the tensor-level functions of
:mod:`rosa_ext.kernels` -- validates its arguments with the functions below *before* it computes
or modifies anything, so a rejected call leaves every input tensor, the session and the model as
they were. README, "Errors", lists what is checked.

Error types (all exported from ``rosa_ext``; each carries ``argument``, the name of the argument
or state key at fault, or None):

- :class:`RosaError`: the base of every error below.
- :class:`RosaTypeError` (also a ``TypeError``): an argument of the wrong kind -- a string where a
  number is expected, an int tensor for hidden states, a complex or bool reward.
- :class:`RosaInputError` (also a ``ValueError``): the right kind with a wrong value, shape,
  device or range -- ``beta=-1``, a token id outside the vocabulary, mismatched sizes.
- :class:`RosaNonFiniteError` (a ``RosaInputError``, also a ``FloatingPointError``): an argument
  holds NaN/Inf, or the inputs are so large that the logits overflow the compute dtype.
- :class:`RosaNumericalError` (also a ``FloatingPointError``): valid-looking input on which the
  computation broke down -- NaN/Inf inside a solve, a CG operator that is not positive definite.
- :class:`RosaStateError` (also a ``RuntimeError``): a session used out of turn (detached, or a
  second session on one model).

Checks that read tensor *values* (finiteness, index ranges) synchronise with the device once per
check; they are kept apart from the shape/dtype/device checks (``kernel_ranges`` for the kernels)
so that a caller on a hot path can skip them.

Leaf layer: imports nothing from the rest of the package except :mod:`.types`.
"""
from __future__ import annotations

import math
import numbers
import os
from typing import Any, Dict, Mapping, NoReturn, Optional, Sequence, Tuple

import torch

from .types import BACKENDS, DAMPING_MODES, SOLVERS


# -- error types ------------------------------------------------------------------------------
class RosaError(Exception):
    """Base of every error rosa_ext raises on purpose. ``argument``: the argument at fault (or None)."""

    def __init__(self, message: str, argument: Optional[str] = None) -> None:
        super().__init__(message)
        self.argument = argument


class RosaTypeError(RosaError, TypeError):
    """An argument of the wrong kind (type or dtype)."""


class RosaInputError(RosaError, ValueError):
    """An argument of the right kind with a wrong value, shape, device or range."""


class RosaNonFiniteError(RosaInputError, FloatingPointError):
    """An argument holds NaN/Inf, or the inputs overflow the compute dtype."""


class RosaNumericalError(RosaError, FloatingPointError):
    """The computation broke down numerically on valid-looking input."""


class RosaStateError(RosaError, RuntimeError):
    """A session used out of turn: detached, or a second session on one model."""


def fail(who: str, argument: Optional[str], message: str, cls: type = RosaInputError) -> NoReturn:
    """Raise ``cls(f"{who}: {message}", argument)``."""
    raise cls(f"{who}: {message}", argument)


def _show(x: Any) -> str:
    """A short description of a value for an error message."""
    if isinstance(x, torch.Tensor):
        return f"a {x.dtype} tensor of shape {tuple(x.shape)} on {x.device}"
    text = repr(x)
    return text if len(text) <= 60 else text[:40] + f"... ({type(x).__name__})"


# -- scalars ----------------------------------------------------------------------------------
#: The largest int an option may take (the compiled solver's iteration count is an int64).
MAX_INT = 2 ** 62


def real(who: str, name: str, x: Any, *, minimum: Optional[float] = None, strict: bool = False,
         dtype: Optional[torch.dtype] = None) -> float:
    """A finite real number (bools, strings, None, complex refused) -> float.

    ``minimum``: lower bound, exclusive when ``strict``. ``dtype``: the value must also be
    finite once cast to this floating dtype (the compute dtype it will be used in). A one-element
    real tensor is read as its value.
    """
    x = _scalar_of(x)
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        fail(who, name, f"`{name}` must be a real number, got {_show(x)}", RosaTypeError)
    cond = "finite" if minimum is None else f"{'>' if strict else '>='} {minimum:g} and finite"
    try:
        v = float(x)
    except (OverflowError, ValueError, TypeError):
        fail(who, name, f"`{name}` must be {cond}, got {_show(x)} (too large for a float)")
    if not math.isfinite(v) or (minimum is not None and (v < minimum or (strict and v == minimum))):
        fail(who, name, f"`{name}` must be {cond}, got {_show(x)}")
    if dtype is not None and abs(v) > torch.finfo(dtype).max:
        fail(who, name, f"`{name}` = {v:g} overflows {dtype} (the compute dtype; at most "
                        f"{torch.finfo(dtype).max:.3g})")
    return v


def _scalar_of(x: Any) -> Any:
    """A one-element real (not bool, not complex) tensor -> its Python value; anything else as is."""
    if isinstance(x, torch.Tensor) and x.numel() == 1 and x.dtype != torch.bool and not x.is_complex():
        return x.item()
    return x


def integer(who: str, name: str, x: Any, *, minimum: Optional[int] = 0, maximum: Optional[int] = MAX_INT) -> int:
    """An int (an integral float such as 16.0 is accepted; bools are not) -> int."""
    x = _scalar_of(x)
    if isinstance(x, bool) or not isinstance(x, numbers.Real):
        fail(who, name, f"`{name}` must be an int, got {_show(x)}", RosaTypeError)
    bounds = ([] if minimum is None else [f">= {minimum}"]) + ([] if maximum is None else [f"<= {maximum}"])
    rng = (" " + " and ".join(bounds)) if bounds else ""
    if not isinstance(x, numbers.Integral):
        try:
            ok = math.isfinite(float(x)) and float(x) == int(x)
        except (OverflowError, ValueError):
            ok = False
        if not ok:
            fail(who, name, f"`{name}` must be an int{rng}, got {_show(x)}")
    v = int(x)
    if (minimum is not None and v < minimum) or (maximum is not None and v > maximum):
        fail(who, name, f"`{name}` must be an int{rng}, got {_show(x)}")
    return v


def boolean(who: str, name: str, x: Any) -> bool:
    """A bool (True/False)."""
    if not isinstance(x, bool):
        fail(who, name, f"`{name}` must be True or False, got {_show(x)}", RosaTypeError)
    return x


def choice(who: str, name: str, x: Any, options: Sequence[str]) -> str:
    """One of ``options`` (strings)."""
    if not isinstance(x, str) or x not in options:
        fail(who, name, f"unknown {name} {x!r}; `{name}` must be one of {tuple(options)}")
    return x


# -- tensors ----------------------------------------------------------------------------------
def tensor(who: str, name: str, x: Any) -> torch.Tensor:
    """A torch.Tensor."""
    if not isinstance(x, torch.Tensor):
        fail(who, name, f"`{name}` must be a torch.Tensor, got {type(x).__name__}", RosaTypeError)
    return x


def float_tensor(who: str, name: str, x: Any) -> torch.Tensor:
    """A real floating-point tensor (not integer, bool or complex)."""
    x = tensor(who, name, x)
    if not x.is_floating_point():
        fail(who, name, f"`{name}` must be a floating-point tensor, got {x.dtype}", RosaTypeError)
    return x


def index_tensor(who: str, name: str, x: Any, what: str = "token ids") -> torch.Tensor:
    """An int64 (or int32) tensor of indices."""
    x = tensor(who, name, x)
    if x.dtype not in (torch.int64, torch.int32):
        fail(who, name, f"`{name}` must be int64 {what} (int32 accepted), got {x.dtype}", RosaTypeError)
    return x


def same_device(who: str, name: str, x: torch.Tensor, device: torch.device, ref: str) -> None:
    """``x`` lives on ``device`` (the device of argument ``ref``)."""
    if x.device != device:
        fail(who, name, f"`{name}` is on {x.device} but `{ref}` is on {device}; put all inputs on one device")


def all_finite(x: torch.Tensor) -> torch.Tensor:
    """0-dim bool tensor: no NaN/Inf in the float tensor ``x`` (no host sync). One min/max reduction
    (NaN propagates through both, +-Inf shows in one): about 10x cheaper on the CPU than
    ``isfinite(x).all()``, which writes a bool tensor of x's size first."""
    if x.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=x.device)
    mn, mx = torch.aminmax(x)
    return torch.isfinite(mn) & torch.isfinite(mx)


def finite(who: str, name: str, x: torch.Tensor) -> None:
    """No NaN/Inf in ``x`` (one device sync)."""
    if x.numel() and not bool(all_finite(x)):
        fail(who, name, f"`{name}` contains NaN or Inf; it must be finite (no NaN/Inf)", RosaNonFiniteError)


def index_range(who: str, name: str, x: torch.Tensor, size: int, what: str) -> None:
    """Every entry of ``x`` in [0, size) (one device sync)."""
    if x.numel() == 0:
        return
    lo, hi = (int(v) for v in torch.stack([x.min(), x.max()]).tolist())
    if lo < 0 or hi >= size:
        fail(who, name, f"`{name}` holds {what} {hi if hi >= size else lo}, outside [0, {size})")


# -- rewards ----------------------------------------------------------------------------------
def rewards(who: str, reward: Any, batch: int) -> torch.Tensor:
    """The reward(s) of ``batch`` conversations -> float64 CPU tensor (batch,).

    A real number, a sequence of real numbers, or a real (integer or floating) tensor; one
    value serves every conversation. Bools, complex numbers and non-finite values are refused.
    """
    if isinstance(reward, torch.Tensor):
        if reward.dtype == torch.bool or reward.is_complex():
            fail(who, "reward", f"`reward` must hold real numbers, got a {reward.dtype} tensor", RosaTypeError)
        r = reward.detach().to(device="cpu", dtype=torch.float64).reshape(-1)
    elif isinstance(reward, (list, tuple)):
        vals = [v.item() if isinstance(v, torch.Tensor) and v.numel() == 1 and v.dtype != torch.bool
                and not v.is_complex() else v for v in reward]
        r = torch.tensor([real(who, "reward", v) for v in vals], dtype=torch.float64)
    elif isinstance(reward, numbers.Real) and not isinstance(reward, bool):
        r = torch.tensor([real(who, "reward", reward)], dtype=torch.float64)
    else:
        fail(who, "reward", f"`reward` must be a float (or a (B,) tensor or sequence for a batch), "
                            f"got {_show(reward)}", RosaTypeError)
    if r.numel() == 1 and batch > 1:
        r = r.expand(batch)
    if r.numel() != batch:
        fail(who, "reward", f"`reward` has {r.numel()} values but there are {batch} conversations")
    if not bool(torch.isfinite(r).all()):
        fail(who, "reward", f"`reward` must be finite, got {r.tolist() if batch > 1 else float(r[0])}")
    return r


# -- the options of one update (rosa_update, attach) ------------------------------------------
def solver_options(who: str, *, beta: Any, damping: Any, max_iter: Any, tol: Any, solver: Any, backend: Any,
                   lora_scale: Any, damping_mode: Any = "absolute", dtype: Optional[torch.dtype] = None
                   ) -> Dict[str, Any]:
    """Check the scalar options of :func:`rosa_ext.rosa_update` -> normalised dict.

    ``dtype``: the compute dtype, when known; ``damping`` and ``lora_scale`` must be finite in it.
    """
    return dict(
        solver=choice(who, "solver", solver, SOLVERS),
        backend=choice(who, "backend", backend, BACKENDS),
        beta=real(who, "beta", beta, minimum=0.0, strict=True),
        damping=real(who, "damping", damping, minimum=0.0, strict=True, dtype=dtype),
        damping_mode=choice(who, "damping_mode", damping_mode, DAMPING_MODES),
        tol=real(who, "tol", tol, minimum=0.0),
        max_iter=integer(who, "max_iter", max_iter, minimum=0),
        lora_scale=real(who, "lora_scale", lora_scale, dtype=dtype),
    )


def seed(who: str, x: Any) -> int:
    """A seed for ``torch.Generator.manual_seed``: an int in [0, 2**64)."""
    return integer(who, "seed", x, minimum=0, maximum=2 ** 64 - 1)


# -- after the stats pass ---------------------------------------------------------------------
def finite_logits(who: str, dtype: torch.dtype, *values: torch.Tensor) -> None:
    """The stats pass's outputs (log-sum-exp, log p) are finite (one device sync).

    Any NaN/Inf in ``weight`` (every row enters every token's log-sum-exp), in the LoRA term, or
    logits beyond the range of the compute dtype show up here; a full ``isfinite`` over W would
    cost one more pass over it.
    """
    if not all(bool(all_finite(v)) for v in values):
        nonfinite_logits(who, dtype)


def nonfinite_logits(who: str, dtype: torch.dtype) -> NoReturn:
    """Raise the error of :func:`finite_logits` (for a caller that read the flag itself)."""
    fail(who, "weight", f"the logits are not finite: `weight` (or `bias`, `hidden`, the LoRA term) holds "
                        f"NaN/Inf, or values so large that the logits overflow {dtype}", RosaNonFiniteError)


def nonfinite_jacobian(who: str, *, mode: Optional[str] = None, lora_scale: Optional[float] = None,
                       dtype: Optional[torch.dtype] = None) -> NoReturn:
    """Raise the error of a Jacobian (or of J J^T, J^T J, J^T g built from it) with NaN/Inf although the
    logits were finite.

    Two causes: NaN/Inf in entries of ``weight`` / ``bias`` / the LoRA term that the softmax weighs
    by 0 (e.g. a -inf row: 0 * inf), or finite inputs whose Jacobian is so large that its Gram matrix
    overflows the compute dtype (|J_t|^2 ~ lora_scale^2 |a.h|^2 in LoRA mode, |W| ^2 in hidden mode;
    the float64 step is finite). Given the problem's ``mode`` (and ``lora_scale``, ``dtype``) the
    message names the likely one: in LoRA mode the Gram matrix is built from h, pi, a and b only
    (MATH.md section 4), all finite once the logits are, so there it is the overflow, named
    ``lora_scale``. Without them (older callers) both causes are listed, argument ``weight``.
    """
    dt = "the compute dtype" if dtype is None else str(dtype)
    if mode == "lora":
        s = "" if lora_scale is None else f"={lora_scale:g}"
        fail(who, "lora_scale", f"the Jacobian's Gram matrix J J^T overflows {dt} although every input and the "
                                f"logits are finite: the LoRA scale (`lora_scale`{s}) times a . h makes |J_t|^2 exceed "
                                f"the range of {dt}; use a smaller `lora_scale` (or float64 inputs)", RosaNonFiniteError)
    fail(who, "weight", f"the Jacobian is not finite although the logits are: `weight` (or `bias`, the LoRA term) "
                        f"holds NaN/Inf in entries the softmax weighs by 0 (e.g. -inf), or the Jacobian is so large "
                        f"(|W| or `lora_scale`) that J J^T overflows {dt}; with finite inputs use float64 inputs or "
                        "rescale them", RosaNonFiniteError)


def finite_result(who: str, update: torch.Tensor, damping: float) -> None:
    """The step is finite (one device sync)."""
    if not bool(all_finite(update)):
        fail(who, "damping", f"the step is not finite (NaN/Inf) with damping={damping:g}: the problem is too "
                             "ill-conditioned for the compute dtype; raise `damping` or use float64 inputs",
             RosaNumericalError)


# -- session updates (RosaSession.update / update_from_hidden) ---------------------------------
def token_ids(who: str, input_ids: Any, vocab_size: int, device: torch.device) -> torch.Tensor:
    """One exchange's token ids, (T,) or (1, T) int64/int32 in [0, V) with T >= 2 -> (T,) int64."""
    ids = tensor(who, "input_ids", input_ids)
    if ids.dim() == 2:
        if ids.shape[0] != 1:
            fail(who, "input_ids", f"one conversation per session: `input_ids` must be (T,) or (1, T), got "
                                   f"{tuple(ids.shape)} (for many conversations call rosa_update with a batch, "
                                   "or keep one session state per user)")
        ids = ids[0]
    if ids.dim() != 1:
        fail(who, "input_ids", f"`input_ids` must be (T,) or (1, T), got {tuple(input_ids.shape)}")
    index_tensor(who, "input_ids", ids)
    same_device(who, "input_ids", ids, device, "the model's lm_head")
    if ids.numel() < 2:
        fail(who, "input_ids", "`input_ids` need a prompt and a response (T >= 2)")
    lo, hi = (int(v) for v in torch.stack([ids.min(), ids.max()]).tolist())
    if lo < 0 or hi >= vocab_size:
        fail(who, "input_ids", f"token ids of `input_ids` must be in [0, {vocab_size}), got range [{lo}, {hi}]")
    return ids.long()


def response_positions(who: str, ids: torch.Tensor, response_start: Any, response_mask: Any) -> torch.Tensor:
    """Exactly one of ``response_start`` (int in [1, T-1]) or ``response_mask`` ((T,) / (1, T) bool,
    False at 0, not all False) -> the (N,) positions of the response tokens in ids (T,)."""
    T = ids.shape[0]
    if (response_start is None) == (response_mask is None):
        fail(who, "response_start", "give exactly one of `response_start` (index of the first response token) "
                                    "or `response_mask` ((T,) bool)")
    if response_start is not None:
        start = integer(who, "response_start", response_start, minimum=None)
        if not 1 <= start < T:
            fail(who, "response_start", f"`response_start` must be in [1, {T - 1}] (the prompt needs at least one "
                                        f"token and the response at least one), got {start}")
        return torch.arange(start, T, device=ids.device)
    m = tensor(who, "response_mask", response_mask)
    if m.dim() == 2 and m.shape[0] == 1:
        m = m[0]
    if m.shape != (T,):
        fail(who, "response_mask", f"`response_mask` must have shape ({T},) like input_ids, got "
                                   f"{tuple(response_mask.shape)}")
    if m.dtype != torch.bool:
        fail(who, "response_mask", f"`response_mask` must be bool, got {m.dtype}", RosaTypeError)
    same_device(who, "response_mask", m, ids.device, "input_ids")
    if bool(m[0]):
        fail(who, "response_mask", "`response_mask[0]` must be False (no position predicts the first token)")
    pos = torch.nonzero(m).flatten()
    if pos.numel() == 0:
        fail(who, "response_mask", "`response_mask` selects no response token")
    return pos


def one_reward(who: str, reward: Any, dtype: torch.dtype) -> float:
    """The reward of one update: a real number (or one-element real tensor), finite in ``dtype``."""
    if isinstance(reward, torch.Tensor) and reward.numel() != 1:
        fail(who, "reward", f"one reward per update, got shape {tuple(reward.shape)}")
    if isinstance(reward, (list, tuple)):
        fail(who, "reward", f"`reward` must be one number, got {type(reward).__name__}", RosaTypeError)
    return real(who, "reward", float(rewards(who, reward, 1)[0]), dtype=dtype)


def attention_mask(who: str, am: Any, ids: torch.Tensor) -> None:
    """None, or a real tensor with one entry per token of ids, on its device."""
    if am is None:
        return
    am = tensor(who, "attention_mask", am)
    if am.numel() != ids.numel() or am.is_complex():
        fail(who, "attention_mask", f"`attention_mask` must be a real tensor with one entry per token "
                                    f"({ids.numel()}), got {am.dtype} {tuple(am.shape)}")
    same_device(who, "attention_mask", am, ids.device, "input_ids")


def hidden_rows(who: str, hidden: Any, targets: Any, *, hidden_size: int, vocab_size: int,
                device: torch.device, head_dtype: torch.dtype) -> Tuple[torch.Tensor, torch.Tensor]:
    """update_from_hidden's inputs: hidden (N, d) floating, finite also once cast to the head's dtype;
    targets (N,) int64/int32 in [0, V); N >= 1; both on the head's device."""
    hidden = float_tensor(who, "hidden", hidden)
    if hidden.dim() != 2 or hidden.shape[1] != hidden_size or hidden.shape[0] == 0:
        fail(who, "hidden", f"`hidden` must be (N, {hidden_size}) with N >= 1, got {tuple(hidden.shape)}")
    same_device(who, "hidden", hidden, device, "the model's lm_head")
    targets = index_tensor(who, "targets", targets)
    if targets.shape != hidden.shape[:1]:
        fail(who, "targets", f"`targets` must be ({hidden.shape[0]},) like the rows of `hidden`, got "
                             f"{tuple(targets.shape)}")
    same_device(who, "targets", targets, device, "the model's lm_head")
    index_range(who, "targets", targets, vocab_size, "token id")
    finite(who, "hidden", hidden)
    if hidden.dtype != head_dtype and not bool(torch.isfinite(hidden.detach().to(head_dtype)).all()):
        fail(who, "hidden", f"`hidden` overflows {head_dtype} (the lm_head dtype)", RosaNonFiniteError)
    return hidden, targets


# -- session state ----------------------------------------------------------------------------
def session_state(who: str, state: Any, *, version: int, mode: str, vocab_size: int, hidden_size: int,
                  lora_scale: float, check_zero: bool, shard: Optional[Tuple[int, int]] = None
                  ) -> Tuple[int, Dict[str, torch.Tensor]]:
    """Check a :meth:`RosaSession.state_dict` before anything is loaded -> (num_updates, tensors).

    ``tensors`` holds ``delta`` (hidden mode) or ``a`` and ``b`` (lora mode), as given. With
    ``check_zero`` a state with ``num_updates == 0`` must hold a zero ``delta`` / ``b`` (it would
    otherwise load but have no effect). ``shard`` = (vocab_start, rows) of this rank on a
    vocabulary-parallel head: the state must hold the same rows of ``b`` (keys ``vocab_start``,
    ``vocab_rows``).
    """
    if not isinstance(state, Mapping):
        fail(who, "state", f"`state` must be a dict from state_dict(), got {_show(state)}", RosaTypeError)
    tensor_keys = ("delta",) if mode == "hidden" else ("a", "b")
    want = ("version", "mode", "num_updates", "vocab_size", "hidden_size", "lora_scale") + tensor_keys
    if shard is not None:
        want += ("vocab_start", "vocab_rows")
    missing = [k for k in want if k not in state]
    extra = [k for k in state if k not in want]
    if "version" in missing or isinstance(state.get("version"), bool) or state.get("version") != version:
        fail(who, "state['version']", "not a rosa_ext session state (missing or unknown `version`; "
                                      f"expected {version})")
    if missing:
        fail(who, f"state[{missing[0]!r}]", f"the state lacks {missing}; keys of a {mode}-mode state: {list(want)}")
    if extra:
        fail(who, f"state[{extra[0]!r}]", f"unexpected key(s) {extra} in a {mode}-mode state (keys: {list(want)})")
    if state["mode"] != mode:
        fail(who, "state['mode']", f"state is for mode={state['mode']!r}, session is {mode!r}")
    for k, have in (("vocab_size", vocab_size), ("hidden_size", hidden_size)):
        v = state[k]
        if isinstance(v, bool) or not isinstance(v, numbers.Integral) or int(v) != have:
            fail(who, f"state[{k!r}]", f"state is for V={state['vocab_size']!r}, d={state['hidden_size']!r}; "
                                       f"this model has V={vocab_size}, d={hidden_size}")
    if shard is not None and (state["vocab_start"], state["vocab_rows"]) != tuple(shard):
        fail(who, "state['vocab_start']", f"the state holds rows from {state['vocab_start']!r} ({state['vocab_rows']!r} "
                                          f"rows); this rank holds rows from {shard[0]} ({shard[1]} rows)")
    s = real(who, "state['lora_scale']", state["lora_scale"])
    if s != lora_scale:
        fail(who, "state['lora_scale']", f"state was saved with lora_scale={s:g}, this session has "
                                         f"lora_scale={lora_scale:g}; attach with the same lora_scale")
    num = integer(who, "state['num_updates']", state["num_updates"], minimum=0)
    tensors: Dict[str, torch.Tensor] = {}
    for k in tensor_keys:
        name = f"state[{k!r}]"
        t = float_tensor(who, name, state[k])
        size = (vocab_size if shard is None else shard[1]) if k == "b" else hidden_size
        if tuple(t.shape) != (size,):
            fail(who, name, f"`{name}` must be a ({size},) tensor, got shape {tuple(t.shape)}")
        finite(who, name, t)
        tensors[k] = t
    zero_key = "delta" if mode == "hidden" else "b"
    if check_zero and num == 0 and bool(torch.count_nonzero(tensors[zero_key])):
        fail(who, "state['num_updates']", f"`num_updates` is 0 but `{zero_key}` is not zero: a state with no "
                                          "update holds the initial adapter (save it with state_dict())")
    return num, tensors


# -- conjugate gradient -----------------------------------------------------------------------
def cg_args(who: str, b: Any, damping: Any, max_iter: Any, tol: Any, x0: Any = None, *,
            values: bool = True, matvec: Any = None) -> Tuple[float, int, float]:
    """Check the arguments of a CG solve -> (damping, max_iter, tol).

    matvec: callable (when given); b: 1-D float32/float64 tensor; x0: None or a tensor like b. With
    ``values`` also that b and x0 are finite (one sync; the compiled CUDA solver checks that on the
    device instead).
    """
    if matvec is not None and not callable(matvec):
        fail(who, "matvec", f"`matvec` must be a callable v -> A v, got {_show(matvec)}", RosaTypeError)
    if not isinstance(b, torch.Tensor) or b.dim() != 1:
        fail(who, "b", f"`b` must be a 1-D tensor, got {_show(b)}")
    if b.dtype not in (torch.float32, torch.float64):
        fail(who, "b", f"`b` must be float32 or float64, got {b.dtype}", RosaTypeError)
    damping = real(who, "damping", damping, minimum=0.0)
    max_iter = integer(who, "max_iter", max_iter, minimum=0)
    tol = real(who, "tol", tol, minimum=0.0)
    if x0 is not None:
        like(who, "x0", x0, b)
    if values:
        finite(who, "b", b)
        if x0 is not None:
            finite(who, "x0", x0)
    return damping, max_iter, tol


def matvec_output(who: str, out: Any, v: torch.Tensor) -> torch.Tensor:
    """What a CG operator returned for v: a tensor of v's shape, dtype and device (no sync)."""
    if (not isinstance(out, torch.Tensor) or out.shape != v.shape or out.dtype != v.dtype
            or out.device != v.device):
        fail(who, "matvec", f"matvec must return a tensor of shape {tuple(v.shape)}, {v.dtype} on {v.device} "
                            f"(like its input); got {_show(out)}")
    return out


def like(who: str, name: str, t: Any, b: torch.Tensor) -> None:
    """``t`` is a tensor of b's shape, dtype and device."""
    if not isinstance(t, torch.Tensor) or t.shape != b.shape or t.dtype != b.dtype or t.device != b.device:
        fail(who, name, f"`{name}` must match b: shape {tuple(b.shape)}, {b.dtype}, {b.device}; got {_show(t)}")


# -- the tensor-level kernel API (rosa_ext.kernels) ----------------------------------------------
KERNEL_DTYPES = (torch.float32, torch.bfloat16, torch.float16)


def kernel_model(who: str, hidden: Any, weight: Any, bias: Any = None) -> Tuple[int, int, int]:
    """hidden (T, d) and weight (V, d) of one dtype in fp32/bf16/fp16, one device; bias (V,) -> (T, d, V)."""
    hidden = tensor(who, "hidden", hidden)
    weight = tensor(who, "weight", weight)
    if hidden.dtype != weight.dtype or hidden.dtype not in KERNEL_DTYPES:
        fail(who, "hidden", f"hidden/weight must share a dtype in fp32/bf16/fp16, got {hidden.dtype}/"
                            f"{weight.dtype} (fp64 runs on the torch backend)", RosaTypeError)
    if hidden.dim() != 2 or weight.dim() != 2 or hidden.shape[1] != weight.shape[1]:
        fail(who, "hidden", f"`hidden` must be (N, d) and `weight` (V, d), got {tuple(hidden.shape)} and "
                            f"{tuple(weight.shape)}")
    T, d = hidden.shape
    V = weight.shape[0]
    if T == 0 or d == 0 or V == 0:
        fail(who, "hidden", f"need at least one token, one hidden unit and one vocabulary entry, got hidden "
                            f"{tuple(hidden.shape)} and weight {tuple(weight.shape)}")
    same_device(who, "weight", weight, hidden.device, "hidden")
    kernel_device(who, "hidden", hidden)
    if bias is not None:
        float_tensor(who, "bias", bias)
        same_device(who, "bias", bias, hidden.device, "hidden")
        if tuple(bias.shape) != (V,):
            fail(who, "bias", f"`bias` must be ({V},), got {tuple(bias.shape)}")
    return int(T), int(d), int(V)


def kernel_device(who: str, name: str, x: torch.Tensor) -> None:
    """The Triton kernels run on CUDA tensors, or anywhere under TRITON_INTERPRET=1 (the CPU tests)."""
    if x.device.type != "cuda" and os.environ.get("TRITON_INTERPRET") != "1":
        fail(who, name, f"the Triton kernels need CUDA tensors (or TRITON_INTERPRET=1 set before triton is "
                        f"imported), got `{name}` on {x.device}; on the CPU use rosa_update(backend='torch')")


def kernel_vector(who: str, name: str, x: Any, size: int, device: torch.device) -> torch.Tensor:
    """A float tensor of shape (size,) on ``device``."""
    x = float_tensor(who, name, x)
    if tuple(x.shape) != (size,):
        fail(who, name, f"`{name}` must be ({size},), got {tuple(x.shape)}")
    same_device(who, name, x, device, "hidden")
    return x


def kernel_rows(who: str, name: str, x: Any, width: int, device: torch.device) -> int:
    """A float tensor (width,) or (B, width) on ``device`` -> its number of rows (1 for a vector)."""
    x = float_tensor(who, name, x)
    if not ((x.dim() == 1 and x.shape[0] == width) or (x.dim() == 2 and x.shape[1] == width and x.shape[0] >= 1)):
        fail(who, name, f"`{name}` must be ({width},) or (B, {width}), got {tuple(x.shape)}")
    same_device(who, name, x, device, "hidden")
    return 1 if x.dim() == 1 else int(x.shape[0])


def kernel_index(who: str, name: str, x: Any, T: int, device: torch.device, what: str) -> torch.Tensor:
    """An integer tensor of shape (T,) on ``device``."""
    x = index_tensor(who, name, x, what)
    if tuple(x.shape) != (T,):
        fail(who, name, f"`{name}` must be ({T},), got {tuple(x.shape)}")
    same_device(who, name, x, device, "hidden")
    return x


def kernel_ranges(who: str, V: int, targets: Optional[torch.Tensor] = None, seg: Optional[torch.Tensor] = None,
                  rows: Optional[Dict[str, int]] = None) -> Optional[torch.Tensor]:
    """The value checks of the kernel API, with one device sync for all of them: targets in [0, V);
    seg >= 0, sorted, and below the rows of every (B, .) table in ``rows`` (name -> rows; 1
    broadcasts). Returns ``seg`` as an int64 CPU tensor (the same transfer; the caller derives the
    conversations' offsets from it), or None without ``seg``."""
    parts = []
    if targets is not None and targets.numel():
        parts.append(torch.stack([targets.min(), targets.max()]).to(torch.int64))
    if seg is not None:
        parts.append(seg.reshape(-1).to(torch.int64))
    if not parts:
        return None
    host = torch.cat(parts).cpu()  # the one sync
    if targets is not None and targets.numel():
        lo, hi = int(host[0]), int(host[1])
        if lo < 0 or hi >= V:
            fail(who, "targets", f"`targets` holds token id {hi if hi >= V else lo}, outside [0, {V})")
        host = host[2:]
    if seg is None:
        return None
    if host.numel():
        if int(host.min()) < 0 or (host.numel() > 1 and not bool((host[1:] >= host[:-1]).all())):
            fail(who, "seg", "`seg` must be >= 0 and sorted (each conversation's tokens contiguous)")
        hi = int(host.max())
        for name, n in (rows or {}).items():
            if n != 1 and hi >= n:
                fail(who, "seg", f"`seg` holds conversation {hi} but `{name}` has only {n} rows")
    return host


def kernel_lora(who: str, lora_a: Any, lora_b: Any, d: int, V: int, device: torch.device) -> Dict[str, int]:
    """Both or neither of lora_a ((d,) / (B, d)) and lora_b ((V,) / (B, V)) -> {name: rows}."""
    if (lora_a is None) != (lora_b is None):
        fail(who, "lora_a" if lora_a is None else "lora_b", "give both lora_a and lora_b, or neither")
    if lora_a is None:
        return {}
    rows = {"lora_a": kernel_rows(who, "lora_a", lora_a, d, device),
            "lora_b": kernel_rows(who, "lora_b", lora_b, V, device)}
    if 1 not in rows.values() and rows["lora_a"] != rows["lora_b"]:
        fail(who, "lora_b", f"`lora_a` has {rows['lora_a']} rows but `lora_b` {rows['lora_b']}")
    return rows


def kernel_tables_agree(who: str, rows: Dict[str, int]) -> None:
    """Per-conversation tables ({name: rows}) have one row (shared) or the same number B of rows."""
    multi = {name: n for name, n in rows.items() if n != 1}
    if len(set(multi.values())) > 1:
        names = sorted(multi, key=lambda k: multi[k])
        fail(who, names[-1], f"per-conversation inputs disagree on the number of conversations: "
                             f"{multi} rows (each must have 1 row or the same B rows)")


def kernel_stats(who: str, st: Any, T: int, device: torch.device, lora: bool) -> None:
    """A HeadStats of this call's T tokens: lse and logp (T,), and ah, pib (T,) with a LoRA term."""
    if not all(hasattr(st, k) for k in ("lse", "logp", "ah", "pib")):
        fail(who, "st", f"`st` must be the HeadStats returned by rosa_ext.kernels.stats, got {_show(st)}",
             RosaTypeError)
    for k in ("lse", "logp") + (("ah", "pib") if lora else ()):
        v = getattr(st, k)
        if v is None:
            fail(who, "st", f"`st.{k}` is None: pass the stats of a call with the same lora_a/lora_b")
        kernel_vector(who, f"st.{k}", v, T, device)
