"""How many device launches and host synchronisations one ``rosa_update`` call issues on the GPU path,
counted on the CPU (issue "the GPU update in one logits pass and under 60 launches", item 2).

The real call runs on the CPU with the Triton engine forced (``backend="triton"``) under the Triton
interpreter (``TRITON_INTERPRET=1``, set by this script before triton is imported), inside a
:class:`LaunchCounter`, which records

- **torch launches**: every aten op that reaches torch's dispatcher (a ``TorchDispatchMode``). On CUDA
  each is about one kernel launch (some are more: a cuBLAS GEMM, a sort or a cuSOLVER factorisation can
  launch a few; a copy between devices is a memcpy). NOT launches, listed apart as ``free``: views and
  aliases (``func.is_view``: view, reshape's view, select, slice, expand, transpose, unsqueeze, detach,
  ...), allocations without a fill (empty, empty_like, empty_strided, new_empty, resize_), host scalars
  (``scalar_tensor``: a Python number turned into a CPU 0-dim tensor, passed as a kernel argument), and
  tensors made from Python data without a device (``torch.tensor(x)``: host memory). Composite ops are
  counted as what they decompose into (``torch.isfinite`` is abs, ne, eq, mul: 4), as on CUDA.
- **Triton launches**: every ``kernel[grid](...)`` of a Triton kernel (``KernelInterface.__getitem__``
  wrapped); what the interpreter does inside a launch is not counted.
- **compiled launches**: the CUDA kernels of ``rosa_ext._C`` (the compiled CG), which the CPU cannot run:
  the CG cases run :func:`emulated_cuda_cg` (below), op for op the CUDA branch of
  ``rosa_ext.cg.compiled`` (``cg_cuda_launch`` + ``finish_cuda``), recording ``cg_cuda_init`` as 3
  launches (a memset and 2 kernels) and each ``cg_cuda_step`` as 4 (csrc/cg_cuda.cu).
- **host syncs** (device-to-host reads): ``_local_scalar_dense`` (``.item()``, ``float()``, ``int()``,
  ``bool()`` of a tensor), ``nonzero``, ``masked_select``, ``unique``, boolean-mask indexing (``index``
  / ``index_put_`` with a bool index: a ``nonzero`` inside), ``_linalg_check_errors`` (the info check of
  ``torch.linalg.cholesky`` & co.), ``equal``, ``is_nonzero``, ``repeat_interleave`` without
  ``output_size``, ``bincount``, ``.tolist()``, ``.numpy()``, ``.cpu()`` and ``torch.cuda.synchronize()``.
  On the CPU a host tensor cannot be told from a device one: a read of a tensor that lives on the host on
  CUDA too is counted as well (the sites show which).
- **h2d copies**: ``torch.tensor`` / ``torch.as_tensor`` of Python data *with* a ``device`` (the
  problem's device: CUDA on the GPU), ``Tensor.new_tensor``, and indexing with a Python list (its index
  tensor is built on the host and copied): torch's copy with ``non_blocking=False`` synchronises the stream
  after a host-to-device copy, so on CUDA each is a host sync too. Counted apart from the syncs. A
  ``Tensor.to(device, non_blocking=True)`` is not counted: from pageable memory CUDA copies the data to a
  staging buffer before returning and does not synchronise the stream.

CUDA-only branches, emulated (``emulate_cuda=True``, the default) where the CPU takes another one:

- ``rosa_ext.backends.torch_engine.lazy_rescaling`` is False on CUDA (on the CPU the torch engine reads the
  host once per chunk to rescale lazily): patched to False;
- ``rosa_ext.kernels._tiles.interpreter_safe`` widens bf16 inputs to fp32 under the interpreter only:
  its ops are not counted;
- ``rosa_ext.kernels.tile_gemms.mm_f32``: a bf16 x bf16 -> fp32 GEMM is one ``torch.mm(out_dtype=)`` on
  CUDA, two widenings and an fp32 GEMM elsewhere: counted as one launch;
- ``torch.cat`` of inputs whose dtype differs from the result's: on CUDA one copy per input (one batched
  kernel only when every input has the result's dtype): counted as that many launches;
- the compiled CG: :func:`emulated_cuda_cg` (above); the CPU's C++ loop launches nothing visible.
The split counts of the Triton kernels follow an H100's 132 SMs off CUDA (``_tiles.sm_count``); one
config per kernel under the interpreter (launch counts do not depend on it).

Every event is attributed to the innermost frame in ``rosa_ext`` that issued it (``file:line function``),
to its function, and to the statement of the plan / op that led to it (the innermost frame in
``rosa_ext/plans`` or ``rosa_ext/core``).

    python benchmarks/count_launches.py                      # T=16, d=32, V=1000, bf16, the four cases
    python benchmarks/count_launches.py --T 64 --dtype float32 --top 20 --json out.json

Not the GPU itself: launch *time* and what cuBLAS / cuSOLVER launch internally are not seen; a CUDA
graph would turn many launches into one replay.
"""
from __future__ import annotations

import os

if __name__ == "__main__":  # before triton is imported: the CPU runs the kernels (an importer keeps its own)
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import collections  # noqa: E402
import contextlib  # noqa: E402
import json  # noqa: E402
import sys  # noqa: E402
from dataclasses import dataclass, field  # noqa: E402
from typing import Any, Callable, Dict, Iterator, List, Optional, Sequence, Tuple  # noqa: E402

import torch  # noqa: E402
from torch.overrides import TorchFunctionMode  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402

PKG = os.path.dirname(os.path.abspath(__import__("rosa_ext").__file__))
_THIS = os.path.abspath(__file__)

#: aten ops that launch nothing on CUDA (besides the views, ``func.is_view``).
FREE_OPS = frozenset({
    "empty", "empty_like", "empty_strided", "new_empty", "new_empty_strided", "empty_permuted", "resize_", "set_",
    "scalar_tensor", "_reshape_alias", "detach", "alias", "lift_fresh", "sym_size", "sym_stride", "sym_numel",
    "sym_storage_offset", "is_same_size", "_has_compatible_shallow_copy_type", "record_stream", "_version",
})
#: aten ops that read device values on the host (each a sync on CUDA).
SYNC_OPS = frozenset({
    "_local_scalar_dense", "nonzero", "masked_select", "_unique", "_unique2", "unique_dim", "unique_consecutive",
    "unique_dim_consecutive", "_linalg_check_errors", "is_nonzero", "equal", "bincount",
})
#: of those, the ones that launch no kernel besides the read
_SYNC_ONLY = frozenset({"_local_scalar_dense", "_linalg_check_errors", "is_nonzero", "equal"})
#: aten ops that are a sync only with some arguments (a boolean index; no output_size).
_MAYBE_SYNC = frozenset({"index", "index_put_", "_index_put_impl_", "index_put", "repeat_interleave"})
#: tensor factories: their result lives on the host unless a device is given (a string "cpu" is the host)
FACTORIES = frozenset({
    "zeros", "ones", "empty", "full", "arange", "tensor", "as_tensor", "eye", "linspace", "logspace", "rand", "randn",
    "randint", "randperm", "scalar_tensor", "empty_strided", "from_numpy", "frombuffer", "asarray",
})
#: factories of Python data: with a device, a host-to-device copy
_FROM_DATA = frozenset({"tensor", "as_tensor", "asarray"})

KINDS = ("torch", "triton", "compiled", "sync", "h2d", "host", "free")
_HOST = "_count_launches_host"


@dataclass
class Event:
    """One counted event: ``kind`` (one of :data:`KINDS`), ``name`` (aten op, kernel, method), ``site``
    (innermost frame under the roots: ``file:line function``), ``function`` (``file:function``),
    ``phase`` (the innermost frame in the plans / core: ``file:line function``), ``emulated`` (an
    event the CPU would not have, or has otherwise)."""

    kind: str
    name: str
    site: str
    function: str
    phase: str
    emulated: bool = False


@dataclass
class Counts:
    """What a :class:`LaunchCounter` saw. ``launches`` = torch + triton + compiled; ``syncs`` the
    device-to-host reads; ``h2d`` the blocking host-to-device copies (a stream sync each on CUDA);
    ``host`` the ops on host tensors (CPU work, no launch); ``free`` views and allocations."""

    events: List[Event] = field(default_factory=list)
    notes: Dict[str, int] = field(default_factory=dict)

    def n(self, *kinds: str) -> int:
        return sum(1 for e in self.events if e.kind in kinds)

    @property
    def launches(self) -> int:
        return self.n("torch", "triton", "compiled")

    @property
    def syncs(self) -> int:
        return self.n("sync")

    @property
    def h2d(self) -> int:
        return self.n("h2d")

    def summary(self) -> Dict[str, int]:
        out = {k: self.n(k) for k in KINDS}
        out.update(launches=self.launches, syncs=self.syncs, h2d=self.h2d)
        return out

    def top(self, by: str = "site", kinds: Sequence[str] = ("torch", "triton", "compiled"), n: int = 12
            ) -> List[Tuple[str, int]]:
        """The ``n`` largest groups of the events of ``kinds``, grouped by ``by`` (site, function, phase, name)."""
        c = collections.Counter(getattr(e, by) for e in self.events if e.kind in kinds)
        return c.most_common(n)

    def ops_at(self, key: str, by: str = "site", kinds: Sequence[str] = ("torch", "triton", "compiled")
               ) -> List[Tuple[str, int]]:
        """The op names of the events of ``kinds`` in the group ``key`` (of ``by``), most frequent first."""
        return collections.Counter(e.name for e in self.events if e.kind in kinds and getattr(e, by) == key).most_common()


def _is_host(t) -> bool:
    return isinstance(t, torch.Tensor) and getattr(t, _HOST, False)


def _tag(out, host: bool) -> None:
    for t in (out if isinstance(out, (tuple, list)) else (out,)):
        if isinstance(t, torch.Tensor):
            setattr(t, _HOST, host)


def _tensors(x) -> Iterator[torch.Tensor]:
    if isinstance(x, torch.Tensor):
        yield x
    elif isinstance(x, (list, tuple)):
        for v in x:
            yield from _tensors(v)
    elif isinstance(x, dict):
        for v in x.values():
            yield from _tensors(v)


def _host_device(dev) -> Optional[bool]:
    """A device argument -> True (the host: the string "cpu"), False (a device: any torch.device object or
    other string, the problem's device on the GPU), None (no device given)."""
    if dev is None:
        return None
    if isinstance(dev, str):
        return dev.split(":")[0] == "cpu"
    return False if isinstance(dev, (torch.device, int)) else None


def _to_target(args, kwargs) -> Optional[bool]:
    """The device of ``Tensor.to(...)`` as :func:`_host_device` says (None: no device)."""
    if "device" in kwargs:
        return _host_device(kwargs["device"])
    for a in args[1:]:
        if isinstance(a, (str, torch.device)):
            return _host_device(a)
        if isinstance(a, torch.Tensor):  # .to(other): other's device
            return _is_host(a)
    return None


def _list_index(index) -> bool:
    """An index with a Python sequence or a host tensor of several entries (copied to the device)."""
    for i in (index if isinstance(index, tuple) else (index,)):
        if isinstance(i, list) or (_is_host(i) and i.dim() > 0):
            return True
    return False


class LaunchCounter:
    """Context manager: counts the launches, syncs and h2d copies of the code run inside (module doc).

    Tensors made inside on the host (factories without a device, ``.cpu()``, ``.to("cpu")``, and what
    is computed from host tensors only) are tracked: their ops are ``host`` work (no launch), reading
    them is no sync, and ``.to(device)`` / ``copy_`` of them into a device tensor is an h2d copy. Every
    tensor passed in counts as a device tensor (on the GPU it would be one).

    Args:
        roots: path prefixes whose frames the events are attributed to (default: the rosa_ext package).
        emulate_cuda: patch the CUDA-only branches of rosa_ext (module doc) for the duration.
    Use :meth:`uncounted` around work whose ops are not part of the count, and :meth:`external` to record
    launches that torch does not see (compiled code).
    """

    def __init__(self, roots: Optional[Sequence[str]] = None, emulate_cuda: bool = True) -> None:
        self.roots = tuple(os.path.abspath(r) for r in (roots or (PKG,)))
        self.emulate_cuda = emulate_cuda
        self.counts = Counts()
        self._quiet = 0
        self._host_factory = 0
        self._stack = contextlib.ExitStack()

    # ------------------------------------------------------------------ recording
    def _where(self) -> Tuple[str, str, str]:
        f = sys._getframe(2)
        site = function = phase = None
        while f is not None:
            fn = os.path.abspath(f.f_code.co_filename)
            if fn != _THIS and fn.startswith(self.roots):
                base = os.path.dirname(PKG) if fn.startswith(PKG) else next(r for r in self.roots if fn.startswith(r))
                rel = os.path.relpath(fn, base)
                here = f"{rel}:{f.f_lineno} {f.f_code.co_name}"
                if site is None:
                    site, function = here, f"{rel}:{f.f_code.co_name}"
                if phase is None and (f"{os.sep}plans{os.sep}" in fn or f"{os.sep}core{os.sep}" in fn):
                    phase = here
            f = f.f_back
        site = site or "<outside>"
        return site, function or site, phase or site

    def record(self, kind: str, name: str, emulated: bool = False) -> None:
        """Record one event of ``kind`` (:data:`KINDS`) named ``name`` at the calling site."""
        if self._quiet:
            return
        self.counts.events.append(Event(kind, name, *self._where(), emulated=emulated))

    def external(self, name: str, launches: int) -> None:
        """Record ``launches`` launches of compiled code torch does not see (e.g. the compiled CG's kernels)."""
        for _ in range(launches):
            self.record("compiled", name, emulated=True)

    def note(self, what: str) -> None:
        """Count an emulated CUDA-only branch taken (reported under ``notes``)."""
        if not self._quiet:
            self.counts.notes[what] = self.counts.notes.get(what, 0) + 1

    @contextlib.contextmanager
    def uncounted(self) -> Iterator[None]:
        """Nothing inside is counted (emulation-only work, the interpreter's inside of a launch)."""
        self._quiet += 1
        try:
            yield
        finally:
            self._quiet -= 1

    # ------------------------------------------------------------------ classification
    def _aten(self, func, args, kwargs, out) -> None:
        """One dispatched aten op (after it ran: ``out``)."""
        name = func.overloadpacket.__name__
        ins = list(_tensors(args)) + list(_tensors(kwargs))
        if self._host_factory or (ins and all(_is_host(t) for t in ins)):
            _tag(out, True)
            self.record("host", f"aten.{name}")
            return
        if name in SYNC_OPS:
            self.record("sync", f"aten.{name}")
            if name not in _SYNC_ONLY:
                self.record("torch", f"aten.{name}")  # nonzero & co. also launch a kernel
            return
        if func.is_view or name in FREE_OPS:
            self.record("free", f"aten.{name}")
            return
        if name in _MAYBE_SYNC and _syncs(name, args, kwargs):
            self.record("sync", f"aten.{name} (boolean mask / no output_size)")
        if name == "cat" and self.emulate_cuda and isinstance(out, torch.Tensor):
            parts = [t for t in (args[0] if args else kwargs.get("tensors", ())) if t.numel()]
            if len(parts) > 1 and any(t.dtype != out.dtype for t in parts):
                # CUDA's cat (aten/src/ATen/native/cuda/Shape.cu): inputs of another dtype than the result
                # are copied one by one, one launch each; one batched kernel only when all dtypes agree
                for _ in parts:
                    self.record("torch", "aten.cat (mixed dtypes: one copy per input on CUDA)")
                return
        self.record("torch", f"aten.{name}")

    def _alias(self, t: torch.Tensor) -> torch.Tensor:
        with self.uncounted():
            return t.view_as(t)

    def _function(self, func, args, kwargs):
        """One Python-level torch call (a TorchFunctionMode): factories, host <-> device moves, reads."""
        name = getattr(func, "__name__", "")
        if self._quiet or name == "__get__":
            return func(*args, **kwargs)
        self_t = args[0] if args and isinstance(args[0], torch.Tensor) else None
        owner = getattr(func, "__qualname__", "").split(".")[0]
        if name in FACTORIES and owner != "TensorBase":
            host = _host_device(kwargs.get("device"))
            data = args[0] if args else kwargs.get("data")
            if name in _FROM_DATA and isinstance(data, torch.Tensor):  # as_tensor(t, device=...): a move at most
                if host is False and _is_host(data):
                    self.record("h2d", f"torch.{name} (host tensor to the device)")
                out = func(*args, **kwargs)
                if host is not None:
                    out = self._alias(out) if out is data else out
                    _tag(out, host)
                return out
            if host is False and name in _FROM_DATA:
                self.record("h2d", f"torch.{name} (Python data to the device)")
            self._host_factory += host is not False  # no device, or "cpu": a host tensor
            try:
                out = func(*args, **kwargs)
            finally:
                self._host_factory -= host is not False
            _tag(out, host is not False)
            return out
        if self_t is None:
            return func(*args, **kwargs)
        dev = not _is_host(self_t)
        if name in ("tolist", "numpy", "__array__"):
            if dev:
                self.record("sync", f"Tensor.{name}")
            with self.uncounted():
                return func(*args, **kwargs)
        if name == "cpu" or (name == "to" and _to_target(args, kwargs) is True):
            if dev:
                self.record("sync", f"Tensor.{name} (device to host)")
            out = func(*args, **kwargs)
            out = self._alias(out) if out is self_t else out
            _tag(out, True)
            return out
        if name == "to" and _to_target(args, kwargs) is False and not dev:
            if not kwargs.get("non_blocking", False):  # non_blocking: staged at once, no stream sync on CUDA
                self.record("h2d", "Tensor.to (host tensor to the device)")
            out = func(*args, **kwargs)
            out = self._alias(out) if out is self_t else out
            _tag(out, False)
            return out
        if name == "new_tensor" and dev:
            self.record("h2d", "Tensor.new_tensor (Python data to the device)")
            self._host_factory += 1  # the data's own ops run on the host
            try:
                out = func(*args, **kwargs)
            finally:
                self._host_factory -= 1
            _tag(out, False)
            return out
        if name == "copy_" and len(args) > 1 and isinstance(args[1], torch.Tensor) and dev != (not _is_host(args[1])):
            self.record("h2d" if dev else "sync", "Tensor.copy_ (" + ("host to device" if dev else "device to host") + ")")
        if name in ("__getitem__", "__setitem__") and dev and len(args) > 1 and _list_index(args[1]):
            self.record("h2d", f"Tensor.{name} with a Python list / host tensor index")
        return func(*args, **kwargs)

    # ------------------------------------------------------------------ patches
    def __enter__(self) -> "LaunchCounter":
        s = self._stack
        counter = self

        class _Dispatch(TorchDispatchMode):
            def __torch_dispatch__(self, func, types, args=(), kwargs=None):
                kwargs = kwargs or {}
                out = func(*args, **kwargs)
                if not counter._quiet:
                    counter._aten(func, args, kwargs, out)
                return out

        class _Functions(TorchFunctionMode):
            def __torch_function__(self, func, types, args=(), kwargs=None):
                return counter._function(func, args, kwargs or {})

        from triton.runtime.jit import KernelInterface

        real_getitem = KernelInterface.__getitem__

        def getitem(kernel, grid):
            launch = real_getitem(kernel, grid)

            def counted(*a, **k):
                counter.record("triton", _kernel_name(kernel))
                with counter.uncounted():
                    return launch(*a, **k)
            return counted

        def synchronize(*a, **k):
            counter.record("sync", "torch.cuda.synchronize")

        _set(s, KernelInterface, "__getitem__", getitem)
        _set(s, torch.cuda, "synchronize", synchronize)
        if self.emulate_cuda:
            self._emulate(s)
        s.enter_context(_Functions())
        s.enter_context(_Dispatch())
        return self

    def __exit__(self, *exc) -> None:
        self._stack.close()

    def _emulate(self, s: contextlib.ExitStack) -> None:
        from rosa_ext.backends import torch_engine
        from rosa_ext.kernels import tile_gemms
        counter = self

        def lazy_rescaling(device):  # CUDA's branch: no host read per chunk
            counter.note("torch_engine.lazy_rescaling -> False (CUDA's branch)")
            return False
        _set(s, torch_engine, "lazy_rescaling", lazy_rescaling)

        for mod in list(sys.modules.values()):
            real = getattr(mod, "interpreter_safe", None) if getattr(mod, "__name__", "").startswith("rosa_ext.kernels") else None
            if real is not None:
                def safe(*tensors, _real=real):
                    if any(t is not None and t.dtype == torch.bfloat16 for t in tensors):
                        counter.note("interpreter_safe: bf16 widening not counted (interpreter only)")
                    with counter.uncounted():
                        return _real(*tensors)
                _set(s, mod, "interpreter_safe", safe)

        real_mm = tile_gemms.mm_f32

        def mm_f32(a, b):
            if a.dtype == b.dtype == torch.bfloat16 and a.device.type != "cuda":
                counter.record("torch", "aten.mm (bf16 x bf16 -> fp32: out_dtype on CUDA)", emulated=True)
                counter.note("mm_f32: bf16 GEMM counted as one torch.mm(out_dtype=fp32)")
                with counter.uncounted():
                    return real_mm(a, b)
            return real_mm(a, b)
        _set(s, tile_gemms, "mm_f32", mm_f32)


def _set(stack: contextlib.ExitStack, obj, name: str, value) -> None:
    """setattr for the life of ``stack`` (restored on exit, also a class attribute)."""
    had = name in vars(obj) if isinstance(obj, type) else hasattr(obj, name)
    old = vars(obj)[name] if isinstance(obj, type) and had else getattr(obj, name, None)
    setattr(obj, name, value)
    stack.callback(lambda: setattr(obj, name, old) if had else delattr(obj, name))


def _kernel_name(kernel) -> str:
    fn = getattr(kernel, "base_fn", None) or getattr(kernel, "fn", None)
    while fn is not None and not hasattr(fn, "__name__"):
        fn = getattr(fn, "fn", None)
    return f"triton {getattr(fn, '__name__', type(kernel).__name__)}"


def _syncs(name: str, args, kwargs) -> bool:
    if name == "repeat_interleave":
        return kwargs.get("output_size") is None and len(args) < 4 and isinstance(args[0], torch.Tensor) and (
            len(args) < 2 or isinstance(args[1], torch.Tensor) or args[0].dim() == 1)
    idx = args[1] if len(args) > 1 else kwargs.get("indices", ())
    return any(isinstance(i, torch.Tensor) and i.dtype in (torch.bool, torch.uint8) for i in (idx or ()))


# ---------------------------------------------------------------------------------------------- the CG
def emulated_cuda_cg(counter: LaunchCounter) -> Callable:
    """A CG with the arguments and result of :func:`rosa_ext.cg.cg` that issues, op for op, what its CUDA
    branch issues (``rosa_ext.cg.compiled.cg_compiled`` on a CUDA ``b``: ``cg_cuda_launch`` then
    ``finish_cuda``, called here for real), with the kernels of ``rosa_ext._C`` recorded through
    ``counter.external`` and their arithmetic (csrc/cg_cuda.cu: the state vector, the freeze once
    converged) done uncounted in torch. The run flag is published around the matvecs as on CUDA."""
    from rosa_ext.cg import compiled
    from rosa_ext.cg.args import check_cg_args, matvec_output, rhs_scale_tensor
    from rosa_ext.common import device_flag
    RR, BB, ACTIVE, ITERS, BAD = (compiled.STATE_RR, compiled.STATE_BB, compiled.STATE_ACTIVE, compiled.STATE_ITERS,
                                  compiled.STATE_BAD)

    def cg(matvec, b, *, damping=0.0, max_iter=50, tol=1e-6, x0=None):
        damping, max_iter, tol = check_cg_args(b, damping, max_iter, tol, x0, values=False, matvec=matvec)
        with torch.no_grad():
            scale = rhs_scale_tensor(b)
            b = (b.detach() / scale).contiguous()
            x = torch.empty_like(b)
            if x0 is not None:
                x.copy_(x0 / scale)
            r, p, ap = torch.empty_like(b), torch.empty_like(b), torch.empty_like(b)
            state = torch.empty(10, dtype=torch.float64)
            if x0 is not None:
                ap.copy_(matvec_output("cg", matvec(x), x))
            counter.external("_C.cg_cuda_init", 3)
            with counter.uncounted():
                b64 = b.double()
                r64 = b64 - ap.double() - damping * x.double() if x0 is not None else b64.clone()
                if x0 is None:
                    x.zero_()
                r.copy_(r64)
                p.copy_(r64)
                rr, bb = float(r64 @ r64), float(b64 @ b64)
                finite = all(map(lambda v: v == v and abs(v) != float("inf"), (rr, bb)))
                st = dict(rr=rr, bb=bb, stop=tol * tol * bb, bad=0.0 if finite else 1.0, iters=0.0,
                          active=1.0 if finite and bb > 0 and rr > tol * tol * bb else 0.0)
                _store(state, st, RR, BB, ACTIVE, ITERS, BAD)
            with device_flag.publish(state[ACTIVE:ACTIVE + 1]):
                for _ in range(int(max_iter)):
                    av = matvec_output("cg", matvec(p), p)
                    if not av.is_contiguous():
                        ap.copy_(av)
                        av = ap
                    counter.external("_C.cg_cuda_step", 4)
                    with counter.uncounted():
                        _step(st, x, r, p, av, damping)
                        _store(state, st, RR, BB, ACTIVE, ITERS, BAD)
            x.copy_(torch.where(state[BB] > 0, x * scale, torch.zeros_like(x)))
        return compiled.finish_cuda(x, state, check_finite=True, max_iter=max_iter, tol=tol)
    return cg


def _store(state, st, RR, BB, ACTIVE, ITERS, BAD) -> None:
    state.zero_()
    for i, k in ((RR, "rr"), (BB, "bb"), (ACTIVE, "active"), (ITERS, "iters"), (BAD, "bad")):
        state[i] = st[k]


def _step(st, x, r, p, ap, damping) -> None:
    """One ``cg_cuda_step`` (k_dot_pap, k_update_xr, k_step_scalar, k_update_p), float64 dots."""
    if st["active"] == 0.0:
        return
    p64, ap64 = p.double(), ap.double() + damping * p.double()
    pap = float(p64 @ ap64)
    if pap != pap or abs(pap) == float("inf"):
        st.update(bad=1.0, active=0.0)
        return
    if pap <= 0.0:
        st["active"] = 0.0
        return
    alpha = st["rr"] / pap
    x.copy_(x.double() + alpha * p64)
    r64 = r.double() - alpha * ap64
    r.copy_(r64)
    rr_new = float(r64 @ r64)
    if rr_new != rr_new or abs(rr_new) == float("inf"):
        st.update(bad=1.0, active=0.0)
        return
    beta = rr_new / st["rr"]
    st.update(rr=rr_new, iters=st["iters"] + 1)
    st["active"] = 1.0 if rr_new > st["stop"] else 0.0
    if st["active"]:
        p.copy_(r64 + beta * p.double())


# ---------------------------------------------------------------------------------------------- the cases
CASES = ("hidden dual", "LoRA dual", "hidden CG", "LoRA CG")


def make_inputs(T: int = 16, d: int = 32, V: int = 1000, dtype: torch.dtype = torch.bfloat16, seed: int = 0):
    """A random head as the benchmarks make it (benchmarks/README.md): W ~ N(0, 16/d), h ~ N(0, 1), targets
    from the model's softmax, LoRA a ~ N(0, 1/d), b ~ N(0, 1e-4) (non-zero: a second update)."""
    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, d, generator=g)
    W = torch.randn(V, d, generator=g) * (4 / d ** 0.5)
    y = torch.multinomial(torch.softmax(h @ W.T, 1), 1, generator=g)[:, 0]
    a = torch.randn(d, generator=g) / d ** 0.5
    b = torch.randn(V, generator=g) * 1e-2
    return dict(hidden=h.to(dtype), weight=W.to(dtype), targets=y, lora_a=a.to(dtype), lora_b=b.to(dtype))


def run_case(case: str, inputs: Dict[str, torch.Tensor], *, emulate_cuda: bool = True, warmup: bool = True,
             torch_chunk: Optional[int] = None, **options) -> Tuple[Counts, Dict[str, object]]:
    """Count one ``rosa_update`` call of ``case`` (:data:`CASES`) with the Triton engine forced: the default
    call but for the solver (forced to the case's) and, for CG, :func:`emulated_cuda_cg` in place of the
    compiled CG (``emulate_cuda``). ``torch_chunk``: the vocabulary chunk of the torch-engine passes the
    Triton engine hands work to (default: the torch engine's own, from N and V; set it to see their
    per-chunk costs at a small V). Returns (counts, what ran: solver, backend, auto's solver, iterations)."""
    from rosa_ext import rosa_update
    from rosa_ext.backends import engine_for
    inner = engine_for("triton", inputs["hidden"].device).torch
    old_chunk, inner.chunk = inner.chunk, torch_chunk
    try:
        return _run_case(case, inputs, emulate_cuda, warmup, rosa_update, options)
    finally:
        inner.chunk = old_chunk


def count_call(call: Callable[[], Any], counter: Optional[LaunchCounter] = None, warmup: bool = True
               ) -> Tuple[Counts, Any]:
    """(what ``call()`` dispatches, its result), counted by ``counter`` (default: a new one emulating CUDA's
    branches); with ``warmup`` the call runs once uncounted first (imports, caches, the interpreter's
    rewrites: not part of a call)."""
    counter = LaunchCounter() if counter is None else counter
    if warmup:
        with counter:
            with counter.uncounted():
                call()
        counter.counts = Counts()
    with counter:
        out = call()
    return counter.counts, out


def _run_case(case, inputs, emulate_cuda, warmup, rosa_update, options):
    mode = "hidden" if case.startswith("hidden") else "lora"
    solver = "cg" if case.endswith("CG") else "dual"
    kw = dict(mode=mode, backend="triton", **options)
    if mode == "lora":
        kw.update(lora_a=inputs["lora_a"], lora_b=inputs["lora_b"])
    args = (inputs["hidden"], inputs["weight"], inputs["targets"], -1.0)
    counter = LaunchCounter(emulate_cuda=emulate_cuda)
    call = dict(kw, solver=solver)
    if solver == "cg" and emulate_cuda:
        call["cg_impl"] = emulated_cuda_cg(counter)
    counts, step = count_call(lambda: rosa_update(*args, **call), counter, warmup)
    auto = rosa_update(*args, **kw).solver
    info = dict(case=case, solver=step.solver, backend=step.backend, auto_solver=auto, iterations=step.iterations)
    return counts, info


def report(case: str, counts: Counts, info: Dict[str, object], top: int = 12) -> str:
    s = counts.summary()
    lines = [f"== {case}: ran {info['solver']} on {info['backend']} (auto picks {info['auto_solver']}; "
             f"CG iterations {info['iterations']})",
             f"   launches {s['launches']} (torch ops {s['torch']}, Triton {s['triton']}, compiled CG {s['compiled']}); "
             f"host syncs {s['syncs']}; blocking h2d copies {s['h2d']}; host ops {s['host']}; free ops (views, allocations) "
             f"{s['free']}"]
    if counts.notes:
        lines.append("   emulated CUDA branches: " + "; ".join(f"{k} (x{v})" for k, v in counts.notes.items()))
    for by, title in (("phase", "by plan / op statement"), ("function", "by function"), ("site", "by site")):
        lines.append(f"   launches {title}:")
        for key, n in counts.top(by, n=top):
            ops = ", ".join(f"{o.replace('aten.', '')} {c}" for o, c in counts.ops_at(key, by)[:6])
            lines.append(f"     {n:5d}  {key}   [{ops}]")
    for kind in ("sync", "h2d"):
        if counts.n(kind):
            lines.append(f"   {kind} sites:")
            for key, n in counts.top("site", kinds=(kind,), n=top):
                names = ", ".join(o for o, _ in counts.ops_at(key, "site", kinds=(kind,)))
                lines.append(f"     {n:5d}  {key}   [{names}]")
    return "\n".join(lines)


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--T", type=int, default=16)
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--V", type=int, default=1000)
    ap.add_argument("--dtype", choices=["bfloat16", "float32", "float16"], default="bfloat16")
    ap.add_argument("--cases", default=",".join(CASES), help="comma-separated, of: " + ", ".join(CASES))
    ap.add_argument("--top", type=int, default=12, help="groups listed per table")
    ap.add_argument("--no-emulate", action="store_true", help="count the CPU's own branches (not CUDA's)")
    ap.add_argument("--torch-chunk", type=int, default=None,
                    help="vocabulary chunk of the torch-engine passes (LoRA CG's relative ridge): their per-chunk "
                         "launches and syncs at a small V; at T=1024, V=151936 that pass takes ~150 chunks of 1024")
    ap.add_argument("--json", type=str, default=None, help="write the counts and groups here")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    import warnings
    warnings.simplefilter("ignore")
    inputs = make_inputs(args.T, args.d, args.V, getattr(torch, args.dtype))
    print(f"T={args.T}, d={args.d}, V={args.V}, {args.dtype}; Triton engine under the interpreter; "
          f"{'CUDA branches emulated' if not args.no_emulate else 'CPU branches'}"
          f"{f'; torch-engine chunk {args.torch_chunk}' if args.torch_chunk else ''}", flush=True)
    out = {}
    for case in [c.strip() for c in args.cases.split(",") if c.strip()]:
        if case not in CASES:
            ap.error(f"unknown case {case!r}")
        counts, info = run_case(case, inputs, emulate_cuda=not args.no_emulate, torch_chunk=args.torch_chunk)
        print(report(case, counts, info, args.top), flush=True)
        out[case] = dict(info, **counts.summary(), notes=counts.notes,
                         by_phase=counts.top("phase", n=args.top), by_function=counts.top("function", n=args.top),
                         by_site=counts.top("site", n=args.top), sync_sites=counts.top("site", kinds=("sync",)),
                         h2d_sites=counts.top("site", kinds=("h2d",)))
    if args.json:
        import common  # benchmarks/common.py: commit, date, versions
        env = common.versions()
        with open(args.json, "w") as f:
            json.dump(dict(benchmark="count_launches", commit=common.commit(), date=common.utc_now(),
                           torch=env["torch"], triton=env["triton"], T=args.T, d=args.d, V=args.V, dtype=args.dtype,
                           emulate_cuda=not args.no_emulate, torch_chunk=args.torch_chunk, cases=out), f, indent=1)
    return 0


if __name__ == "__main__":
    sys.exit(main())
