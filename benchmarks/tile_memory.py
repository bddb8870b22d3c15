"""Peak memory of the Triton engine's passes, counted on the CPU (token blocks: hidden mode keeps memory
proportional to what it needs).

:class:`PeakMemory` is a tracking allocator as a ``TorchDispatchMode``: every tensor an aten op returns
whose storage it has not seen is counted (its storage's bytes; views, in-place and ``out=`` results and ops
that alias an existing storage are not) until that storage is freed (a weakref finalizer on the storage); ``peak`` is the most bytes alive at once,
``by_op`` the bytes each op allocated.
Inputs made before the mode are not counted, nor memory outside torch (the Triton interpreter's numpy
arrays); the kernels write into torch tensors the engine allocates, which are counted. On CUDA the same
bytes would come from torch's caching allocator (``torch.cuda.max_memory_allocated`` measures it there).

    python benchmarks/tile_memory.py                     # T=128, d=32, V=2048, fp32, hidden cap 256 KiB (~1.5 min)
    python benchmarks/tile_memory.py --json results/tile_memory_cpu.json

Run it with the rosa_ext to measure (another commit's with ``PYTHONPATH``): it reports the hidden pass, the
LoRA Gram pass and the CG stats with the default budget, and with a budget that forces token blocks, plus
whether the engine has token blocks at all (``rosa_ext.backends.tile_blocks``). bf16 models on the CPU
would add the widened copies of ``mm_f32`` (CPU only: on CUDA a bf16 GEMM writes fp32 directly), so the
measurement uses an fp32 model (the tiles take the same 4 bytes per entry as bf16 hi + lo).
"""
from __future__ import annotations

import os

if __name__ == "__main__":  # before triton is imported: the CPU runs the kernels
    os.environ.setdefault("TRITON_INTERPRET", "1")

import argparse  # noqa: E402
import collections  # noqa: E402
import json  # noqa: E402
import subprocess  # noqa: E402
import weakref  # noqa: E402
from typing import Dict  # noqa: E402

import torch  # noqa: E402
from torch.utils._python_dispatch import TorchDispatchMode  # noqa: E402
from torch.utils._pytree import tree_flatten  # noqa: E402

#: ops whose outputs alias an existing storage (the Triton interpreter wraps its arguments with ``set_``)
_ALIASING = frozenset({"set_", "alias", "detach", "lift_fresh", "_reshape_alias"})


class PeakMemory(TorchDispatchMode):
    """Bytes of the tensors allocated inside the mode: ``current``, ``peak``, ``by_op`` (aten op -> bytes)."""

    def __init__(self) -> None:
        super().__init__()
        self.live: Dict[int, int] = {}
        self.current = 0
        self.peak = 0
        self.by_op: Dict[str, int] = collections.Counter()

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        out = func(*args, **(kwargs or {}))
        if func.is_view or func.overloadpacket.__name__ in _ALIASING:  # no allocation: a storage seen elsewhere
            return out
        inputs = {t.untyped_storage().data_ptr() for t in tree_flatten((args, kwargs))[0] if isinstance(t, torch.Tensor)}
        for t in tree_flatten(out)[0]:
            if not isinstance(t, torch.Tensor) or t.device.type == "meta":
                continue
            s = t.untyped_storage()
            ptr, n = s.data_ptr(), s.nbytes()
            if n == 0 or ptr in self.live or ptr in inputs:  # in place / out=: an argument's storage
                continue
            self.live[ptr] = n
            self.current += n
            self.peak = max(self.peak, self.current)
            self.by_op[str(func.overloadpacket.__name__)] += n
            weakref.finalize(s, self._free, ptr, n)
        return out

    def _free(self, ptr: int, n: int) -> None:
        if self.live.pop(ptr, None) is not None:
            self.current -= n


def _problem(T: int, d: int, V: int, mode: str, seed: int = 0):
    from rosa_ext.core.op import pack

    g = torch.Generator().manual_seed(seed)
    h = torch.randn(T, d, generator=g)
    W = torch.randn(V, d, generator=g) * 2 / d ** 0.5
    y = torch.randint(0, V, (T,), generator=g)
    kw = dict(mode=mode, lora_scale=8.0, bias=None, beta=1.0, damping=0.3, max_iter=10, tol=1e-6, solver="dual",
              backend="triton")
    if mode == "lora":
        kw.update(lora_a=torch.randn(d, generator=g) / d ** 0.5, lora_b=torch.randn(V, generator=g) * 0.1)
    return pack(h, W, y, -1.0, **kw)[0]


def measure(T: int, d: int, V: int, hidden_cap: int, budget: int) -> Dict[str, object]:
    """Peak bytes of each pass of the Triton engine at (T, d, V) fp32: ``default`` budget (1 GiB) and ``budget``."""
    import rosa_ext
    from rosa_ext.backends import engine_for

    try:
        from rosa_ext.backends import tile_blocks
    except ImportError:  # a commit before token blocks
        tile_blocks = None
    if tile_blocks is not None:
        tile_blocks.HIDDEN_TILE_BYTES = hidden_cap
    eng = engine_for("triton", torch.device("cpu"))
    out: Dict[str, object] = {"token_blocks": tile_blocks is not None, "rosa_ext": os.path.dirname(rosa_ext.__file__)}
    for mode, what in (("hidden", "hidden_pass"), ("lora", "gram_pass"), ("lora", "stats")):
        prob = _problem(T, d, V, mode)
        for label, b in (("default", 1 << 30), ("small", budget)):
            with PeakMemory() as m:
                if what == "hidden_pass":
                    res = eng.hidden_pass(prob, b)
                elif what == "gram_pass":
                    res = eng.gram_pass(prob, True, b)
                else:
                    res = eng.stats(prob, b)
                engine = res.engine
                del res
            out[f"{what}/{label}"] = {"peak_bytes": m.peak, "engine": engine, "budget": b,
                                      "top_ops": dict(collections.Counter(m.by_op).most_common(4))}
    return out


def main() -> None:
    ap = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    ap.add_argument("--T", type=int, default=128)
    ap.add_argument("--d", type=int, default=32)
    ap.add_argument("--V", type=int, default=2048)
    ap.add_argument("--hidden-cap", type=int, default=256 << 10, help="tile_blocks.HIDDEN_TILE_BYTES for the run")
    ap.add_argument("--budget", type=int, default=512 << 10, help="the small keep_budget_bytes")
    ap.add_argument("--json", default=None)
    a = ap.parse_args()
    torch.set_num_threads(1)
    res = measure(a.T, a.d, a.V, a.hidden_cap, a.budget)
    commit = subprocess.run(["git", "rev-parse", "--short", "HEAD"], capture_output=True, text=True,
                            cwd=os.path.dirname(os.path.abspath(__file__))).stdout.strip()
    res.update(T=a.T, d=a.d, V=a.V, hidden_cap=a.hidden_cap, dtype="float32", torch=torch.__version__,
               commit=commit, tiles_bytes=a.T * a.V * 4, rw_bytes=a.T * a.d * 4)
    for k, v in res.items():
        print(f"{k}: {v}")
    if a.json:
        with open(a.json, "w") as f:
            json.dump(res, f, indent=1)


if __name__ == "__main__":
    main()
