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
so that a caller on a hot path can skip them. :func:`rosa_ext.rosa_update` queues its value checks
(:class:`PendingChecks`) for the solve plan to read in its own one host sync (MATH.md section 4).

Leaf layer: imports nothing from the rest of the package except :mod:`.types`.
"""
from __future__ import annotations

import math
import numbers
from typing import Any, Callable, List, NoReturn, Optional, Sequence, Tuple

import torch


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
    """0-dim bool tensor: no NaN/Inf in the float tensor ``x`` (no host sync), as ``sum(x * 0) == 0``
    (0 * finite is 0, 0 * +-Inf and NaN are NaN; no overflow can fake an Inf): three kernels on a GPU
    where ``isfinite(x).all()`` decomposes into five. A large ``x`` goes through one min/max reduction
    first (NaN propagates through both, +-Inf shows in one), so that no x-sized temporary is written."""
    if x.numel() == 0:
        return torch.ones((), dtype=torch.bool, device=x.device)
    if x.numel() > 1 << 16:
        x = torch.stack(torch.aminmax(x))
    return x.mul(0).sum().eq(0)


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


def one_reward(who: str, reward: Any, dtype: torch.dtype) -> float:
    """The reward of one update: a real number (or one-element real tensor), finite in ``dtype``."""
    if isinstance(reward, torch.Tensor) and reward.numel() != 1:
        fail(who, "reward", f"one reward per update, got shape {tuple(reward.shape)}")
    if isinstance(reward, (list, tuple)):
        fail(who, "reward", f"`reward` must be one number, got {type(reward).__name__}", RosaTypeError)
    return real(who, "reward", float(rewards(who, reward, 1)[0]), dtype=dtype)



def prompt_ids(who: str, input_ids: Any, vocab_size: int, device: torch.device) -> torch.Tensor:
    """The prompt of a recorded generation: (L,) or (B, L) int64/int32 token ids in [0, V) with L >= 1, on
    the model's device -> (B, L) (one host read for the range)."""
    ids = index_tensor(who, "input_ids", input_ids)
    if ids.dim() == 1:
        ids = ids.unsqueeze(0)
    if ids.dim() != 2 or ids.shape[1] == 0 or ids.shape[0] == 0:
        fail(who, "input_ids", f"`input_ids` must be (B, L) or (L,) prompt ids with B, L >= 1, got {tuple(ids.shape)}")
    same_device(who, "input_ids", ids, device, "the model's lm_head")
    index_range(who, "input_ids", ids, vocab_size, "token id")
    return ids


# -- the options of a session -----------------------------------------------------------------
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


# -- value checks read in a solve's one host sync ----------------------------------------------
def read_host(values: Sequence[torch.Tensor]) -> List[float]:
    """The entries of ``values`` (0-dim or 1-D tensors of any dtype on one device) as Python floats, in
    order, with ONE host synchronisation. The parts are concatenated per dtype first (one batched kernel
    each on CUDA, none for a lone part), then those few into float64 (exact for every float dtype and for
    token ids; CUDA copies inputs of another dtype one by one, so this keeps the copies to one per dtype)."""
    parts = [v.reshape(-1) for v in values]
    by_dtype: dict = {}
    for i, p in enumerate(parts):
        by_dtype.setdefault(p.dtype, []).append(i)
    groups = list(by_dtype.values())
    cats = [parts[ix[0]] if len(ix) == 1 else torch.cat([parts[i] for i in ix]) for ix in groups]
    out = torch.empty(sum(p.numel() for p in parts), dtype=torch.float64, device=parts[0].device)
    flat = (cats[0] if len(cats) == 1 and cats[0].dtype == torch.float64 else torch.cat(cats, out=out)).tolist()
    pieces: List[List[float]] = [[] for _ in parts]
    k = 0
    for ix in groups:
        for i in ix:
            n = parts[i].numel()
            pieces[i] = flat[k:k + n]
            k += n
    return [x for piece in pieces for x in piece]


def minmax_finite(mn: float, mx: float) -> bool:
    """Whether a tensor whose ``torch.aminmax`` read (mn, mx) is finite: NaN propagates through both,
    +-Inf shows in one."""
    return math.isfinite(mn) and math.isfinite(mx)


#: A check run on the host: given the read values of its tensors, raise (naming the argument) or return.
HostCheck = Callable[[List[float]], None]


def _run_checks(pairs: Sequence[Tuple[int, HostCheck]], values: Sequence[float]) -> int:
    """Each (count, check) in order on the next ``count`` of ``values`` -> how many values they took."""
    k = 0
    for n, check in pairs:
        check(list(values[k:k + n]))
        k += n
    return k


class PendingChecks:
    """The checks of a call's inputs that read tensor values, queued as 0-dim device tensors instead of
    read at once, so that a solve reads them in its own one host sync (``rosa_ext.plans.dense.accept``,
    ``check_linearization``) -- or :meth:`run` reads them alone. They are raised in the order queued,
    each naming its argument, before any error the solve's numbers would give; nothing has been
    modified by then (the op only returns a step).

    ``zero_jacobian`` checks (a dead LoRA: a = 0 and b = 0 make J exactly zero) are not queued: a dual
    solve sees a zero J in numbers it reads anyway (its Gram matrix is exactly 0), and runs them only
    then (:meth:`check_zero_jacobian`, one more sync on that path); :meth:`run` and the CG plans run
    them with the rest."""

    def __init__(self) -> None:
        self.items: List[Tuple[List[torch.Tensor], HostCheck]] = []  # (0-dim tensors, their check)
        self.zero_jacobian: List[Tuple[Callable[[], Sequence[torch.Tensor]], HostCheck]] = []  # (make, check)
        self._made: List[List[torch.Tensor]] = []  # the zero-Jacobian tensors of the last tensors(True)

    def add(self, values: Sequence[torch.Tensor], check: HostCheck) -> None:
        """Queue ``check(list of floats)`` on the entries of the 0-dim tensors ``values``."""
        self.items.append((list(values), check))

    def finite(self, who: str, name: str, x: torch.Tensor) -> None:
        """Queue "no NaN/Inf in ``x``": one reduction, max |x| (NaN and Inf propagate), in float32 (float64 for a
        float64 ``x``: the widening is exact), so that it joins the solve's other float32 numbers in one read."""
        if x.numel() == 0:
            return

        def check(v: List[float]) -> None:
            if not math.isfinite(v[0]):
                fail(who, name, f"`{name}` contains NaN or Inf; it must be finite (no NaN/Inf)", RosaNonFiniteError)
        acc = torch.float64 if x.dtype == torch.float64 else torch.float32
        self.add([torch.linalg.vector_norm(x, ord=float("inf"), dtype=acc)], check)

    def tensors(self, with_zero_jacobian: bool = False) -> List[torch.Tensor]:
        """The queued tensors, in order, then (if asked) the zero-Jacobian checks' own, made now."""
        out = [v for vals, _ in self.items for v in vals]
        self._made = [list(make()) for make, _ in self.zero_jacobian] if with_zero_jacobian else []
        return out + [v for vals in self._made for v in vals]

    def verdict(self, values: Sequence[float]) -> int:
        """Run the checks on ``values`` (the entries of the last :meth:`tensors`, read) in order, raising the
        first failure -> how many values they took."""
        pairs = [(len(vals), check) for vals, check in self.items]
        pairs += [(len(vals), check) for vals, (_, check) in zip(self._made, self.zero_jacobian)]
        return _run_checks(pairs, values)

    def check_zero_jacobian(self) -> None:
        """Run the zero-Jacobian checks alone (one host sync): for a solve that found J exactly zero."""
        if self.zero_jacobian:
            made = [list(make()) for make, _ in self.zero_jacobian]
            pairs = [(len(m), check) for m, (_, check) in zip(made, self.zero_jacobian)]
            _run_checks(pairs, read_host([v for m in made for v in m]))

    def run(self) -> None:
        """Read every check (the zero-Jacobian ones included) with one host sync; raise the first failure."""
        vals = self.tensors(with_zero_jacobian=True)
        if vals:
            self.verdict(read_host(vals))
