"""Replay every case of the second hardening round as an outside user would, one line per case.

    python benchmarks/hardening/replay_round2.py [--only SUBSTRING] [--list]

Each case prints ``PASS`` / ``FAIL`` / ``SKIP``, its section and owner, the expected behaviour and
what happened; the script exits 1 if any case fails (SKIP: needs hardware this machine lacks).
The expectation is the round's: an accepted step is within 1e-3 of float64 (or the call raises a
clear error naming an argument of the call); errors across ranks have the same class and
``argument`` on every rank, after one collective, never a hang; one session serialises updates
from several threads.

Owners: ``helper`` -- fixed on branch wip22 (target, CG scaling, vocabulary-parallel errors,
kernels with ``prob=``); ``lead`` -- the solver / session / test fixes the lead makes (on wip22
alone these are expected to fail); ``helper+lead`` -- the message exists on wip22 but its caller
lives in the solver.

Vocabulary-parallel cases run this file in worker processes (``--worker``) on gloo groups of one
and two ranks with a file rendezvous, killed after ``DIST_TIMEOUT`` seconds (a hang is a FAIL).
Runs on the CPU in about 2-4 minutes (the correlated-dual case at d = 896, V = 8000, T = 1024 is the
longest).
"""
from __future__ import annotations

import argparse
import datetime
import json
import math
import os
import pathlib
import subprocess
import sys
import tempfile
import threading
import time
import traceback
from typing import Any, Callable, Dict, List, Tuple

if __name__ == "__main__" and "--worker" not in sys.argv:
    try:
        import torch as _t
        if not _t.cuda.is_available():  # the Triton kernels run in the interpreter on a CPU machine
            os.environ.setdefault("TRITON_INTERPRET", "1")
    except ImportError:
        pass

import torch  # noqa: E402

import rosa_ext  # noqa: E402
from rosa_ext import rosa_update  # noqa: E402
from rosa_ext.reference import rosa_update_reference  # noqa: E402

ROOT = pathlib.Path(__file__).resolve().parents[2]
DIST_TIMEOUT = 180.0
TOL = 1e-3
F64 = torch.float64

Result = Tuple[str, str]  # (status PASS/FAIL/SKIP, what happened)
CASES: List[Tuple[str, str, str, str, Callable[[], Result]]] = []


def case(name: str, section: str, owner: str, expected: str):
    def deco(fn: Callable[[], Result]) -> Callable[[], Result]:
        CASES.append((name, section, owner, expected, fn))
        return fn
    return deco


def _f64(kw: Dict[str, Any]) -> Dict[str, Any]:
    return {k: (v.double() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}


def _relerr(got: torch.Tensor, ref: torch.Tensor) -> float:
    return float((got.double() - ref.double()).norm() / ref.double().norm())


def _err_str(e: BaseException) -> str:
    return f"{type(e).__name__}(argument={getattr(e, 'argument', None)!r}): {str(e)[:110]}"


def _within(fn: Callable[[], torch.Tensor], ref: torch.Tensor, *, allow_error: bool = True) -> Result:
    """PASS when the step is within TOL of ref, or (allow_error) when the call raises a RosaError
    naming an argument; FAIL otherwise."""
    try:
        got = fn()
    except rosa_ext.RosaError as e:
        ok = allow_error and e.argument is not None
        return ("PASS" if ok else "FAIL"), "raised " + _err_str(e)
    except Exception as e:  # noqa: BLE001 -- a replay reports whatever happened
        return "FAIL", "raised " + _err_str(e)
    err = _relerr(got, ref)
    return ("PASS" if err <= TOL else "FAIL"), f"step off float64 by {err:.2e} (|ref| {float(ref.norm()):.3g})"


# ============================================================ silent wrong results
def _correlated_lora(d=896, V=8000, T=1024, seed=0):
    """LM-like hidden states: a shared mean component 8x the per-token part; targets mostly among
    each token's top 30 (1% the top token), so p_t spans orders of magnitude and J J^T is dominated
    by a few directions."""
    g = torch.Generator().manual_seed(seed)
    mu = torch.randn(d, generator=g)
    h = mu * 8.0 + torch.randn(T, d, generator=g)
    W = torch.randn(V, d, generator=g) / math.sqrt(d)
    a = torch.randn(d, generator=g) / math.sqrt(d)
    top = (h @ W.T).topk(30, 1).indices
    y = top[torch.arange(T), torch.randint(1, 30, (T,), generator=g)]
    conf = torch.rand(T, generator=g) < 0.01
    y[conf] = top[conf, 0]
    return h, W, y, a


def _lora_b0_float64(h, W, y, a, r=-1.0, s=8.0, beta=1.0, damping=0.3) -> torch.Tensor:
    """The float64 LoRA step at b = 0 with the default relative ridge, by the dual (MATH.md 4, 6):
    J_b rows s p_t (a.h_t)(e_y - pi_t), J_a = 0; without the P x P matrices of rosa_ext.reference."""
    from rosa_ext.common.jacobian import residual_target
    h, W, a = h.double(), W.double(), a.double()
    logpi = torch.log_softmax(h @ W.T, 1)
    pi = logpi.exp()
    logp = logpi.gather(1, y[:, None])[:, 0]
    E = -pi
    E[torch.arange(len(y)), y] += 1.0
    Jb = (s * logp.exp() * (h @ a))[:, None] * E
    lam = damping * float((Jb * Jb).sum(1).mean())
    gv = residual_target(logp, torch.full_like(logp, r), beta)
    alpha = torch.linalg.solve(Jb @ Jb.T + lam * torch.eye(len(y), dtype=F64), gv)
    return torch.cat([torch.zeros_like(a), Jb.T @ alpha])


@case("dual_lora_correlated_hidden", "silent", "lead",
      "default LoRA dual on correlated hidden states (d=896, V=8000, T=1024, fp32; the report used V=32000, where this "
      "construction does not reach the fallback): within 1e-3 of float64, or a clear error")
def _() -> Result:
    h, W, y, a = _correlated_lora()
    ref = _lora_b0_float64(h, W, y, a)
    st: Dict[str, Any] = {}

    def run():
        s = rosa_update(h, W, y, -1.0, mode="lora", lora_a=a)
        st["res"] = s.residual
        return s.update
    status, what = _within(run, ref)
    return status, what + (f", step.residual {st['res']:.1e}" if "res" in st else "")


@case("dual_fallback_flag_on_cuda", "silent", "lead",
      "the dual's float64 fallback runs on CUDA tensors (its flag tensor on the problem's device)")
def _() -> Result:
    if not torch.cuda.is_available():
        return "SKIP", "no CUDA device here"
    h, W, y, a = (t.cuda() for t in _correlated_lora())
    try:
        rosa_update(h, W, y, -1.0, mode="lora", lora_a=a)
    except Exception as e:  # noqa: BLE001
        return "FAIL", "raised " + _err_str(e)
    return "PASS", "ran"


def _confident(q: float, mode: str, dtype, V: int = 4) -> Dict[str, Any]:
    """Two tokens with 1 - p = q and ~q^0.9 (W the identity: the logits are exact in any order)."""
    z = -math.log(q / ((1.0 - q) * (V - 1)))
    h = torch.zeros(2, V, dtype=F64)
    h[0, 0], h[1, 1] = z, 0.9 * z
    kw: Dict[str, Any] = dict(hidden=h.to(dtype), weight=torch.eye(V, dtype=dtype), targets=torch.tensor([0, 1]),
                              mode=mode, reward=-1.0)
    if mode == "lora":
        kw["lora_a"] = (torch.ones(V, dtype=F64) / math.sqrt(V)).to(dtype)
    return kw


@case("confident_reported_case_dual", "silent", "helper",
      "rosa_update([[25, 0]], eye(2), [0], -1, mode='hidden') (fp32): the float64 step of norm 0.93, not zeros")
def _() -> Result:
    args = dict(hidden=torch.tensor([[25.0, 0.0]]), weight=torch.eye(2), targets=torch.tensor([0]), reward=-1.0,
                mode="hidden")
    ref = rosa_update_reference(**_f64(args)).update
    return _within(lambda: rosa_update(**args, solver="dual").update, ref, allow_error=False)


@case("confident_reported_case_cg", "silent", "helper", "the same with solver='cg': the float64 step of norm 0.93")
def _() -> Result:
    args = dict(hidden=torch.tensor([[25.0, 0.0]]), weight=torch.eye(2), targets=torch.tensor([0]), reward=-1.0,
                mode="hidden")
    ref = rosa_update_reference(**_f64(args)).update
    return _within(lambda: rosa_update(**args, solver="cg").update, ref, allow_error=False)


for _mode in ("hidden", "lora"):
    for _solver in ("dual", "cg"):
        def _make(mode=_mode, solver=_solver):
            def run() -> Result:
                ref = rosa_update_reference(**_confident(8e-7, mode, F64)).update
                extra = dict(max_iter=100, tol=1e-10) if solver == "cg" else {}
                return _within(lambda: rosa_update(**_confident(8e-7, mode, torch.float32), solver=solver,
                                                   **extra).update, ref, allow_error=False)
            return run
        case(f"confident_1-p_8e-7_{_mode}_{_solver}", "silent", "lead" if (_mode, _solver) == ("lora", "cg") else "helper",
             f"1 - p ~ 8e-7, mode={_mode}, solver={_solver}, fp32: within 1e-3 of float64 (was 3% off)")(_make())


@case("lora_cg_confident_orthonormal", "silent", "lead",
      "LoRA CG, orthonormal W, h = 18 W[y] (p ~ 1 - 8e-7), max_iter 100, tol 1e-12: within 1e-3 of float64 "
      "(was norm 0.125 vs 0.328)")
def _() -> Result:
    g = torch.Generator().manual_seed(0)
    d = V = 32
    T = 8
    Q, _ = torch.linalg.qr(torch.randn(V, d, generator=g, dtype=F64))
    y = torch.randint(0, V, (T,), generator=g)
    kw = dict(hidden=18.0 * Q[y], weight=Q, targets=y, reward=-1.0, mode="lora",
              lora_a=torch.randn(d, generator=g, dtype=F64) / math.sqrt(d))
    ref = rosa_update_reference(**kw).update
    kw32 = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
    return _within(lambda: rosa_update(**kw32, solver="cg", max_iter=100, tol=1e-12).update, ref, allow_error=False)


for _mode in ("hidden", "lora"):
    def _make_ridge(mode=_mode):
        def run() -> Result:
            # every token's p ~ 1e-21: the target logit 48 below the other three
            V, T = 4, 3
            h = torch.zeros(T, V, dtype=F64)
            y = torch.tensor([0, 1, 2])
            for t in range(T):
                h[t] = 48.0
                h[t, y[t]] = 0.0
            kw: Dict[str, Any] = dict(hidden=h, weight=torch.eye(V, dtype=F64), targets=y, reward=-1.0, mode=mode)
            if mode == "lora":
                kw["lora_a"] = torch.ones(V, dtype=F64) / V
            ref = rosa_update_reference(**kw).update
            kw32 = {k: (v.float() if torch.is_tensor(v) and v.is_floating_point() else v) for k, v in kw.items()}
            return _within(lambda: rosa_update(**kw32).update, ref)
        return run
    case(f"relative_ridge_tiny_p_{_mode}", "silent", "lead",
         f"mode={_mode}, every p ~ 1e-21 (fp32): the relative ridge does not underflow to the absolute damping; "
         "within 1e-3 of float64 or a clear error")(_make_ridge())


# ============================================================ hangs and errors: vocabulary-parallel
#: (name, ranks that get the bad value ("all" / "last"), world, expected class, expected argument)
DIST_CASES = [
    ("start_str", "all", 1, "RosaTypeError", "vocab_start"), ("start_bool", "all", 1, "RosaTypeError", "vocab_start"),
    ("start_negative", "all", 1, "RosaInputError", "vocab_start"),
    ("start_2**63", "all", 1, "RosaInputError", "vocab_start"), ("start_missing", "all", 1, "RosaInputError", "vocab_start"),
    ("size_str", "all", 1, "RosaTypeError", "vocab_size"), ("size_bool", "all", 1, "RosaTypeError", "vocab_size"),
    ("size_zero", "all", 1, "RosaInputError", "vocab_size"), ("size_2**70", "all", 1, "RosaInputError", "vocab_size"),
    ("size_wrong", "all", 1, "RosaInputError", "vocab_size"),
    ("group_str", "all", 1, "RosaTypeError", "process_group"), ("target_V", "all", 1, "RosaInputError", "targets"),
    ("weight_0rows", "all", 1, "RosaInputError", "weight"), ("weight_1d", "all", 1, "RosaInputError", "weight"),
    ("dtensor_replicated", "all", 1, "RosaInputError", "weight"),
    ("dtensor_size", "all", 1, "RosaInputError", "vocab_size"),
    ("dtensor_start", "all", 1, "RosaInputError", "vocab_start"),
    ("dtensor_lora_a", "all", 1, "RosaInputError", "lora_a"),
    ("dtensor_target_V", "all", 1, "RosaInputError", "targets"),
    ("start_2**63", "last", 2, "RosaInputError", "vocab_start"), ("size_2**70", "last", 2, "RosaInputError", "vocab_size"),
    ("start_str", "last", 2, "RosaTypeError", "vocab_start"), ("hidden_nan", "last", 2, "RosaNonFiniteError", "hidden"),
]


def _worker_call(what: str, who: str, rank: int, world: int) -> Dict[str, Any]:
    """One vocabulary-parallel call with one bad argument (in a worker process)."""
    g = torch.Generator().manual_seed(0)
    B, T, d, V = 2, 5, 6, 13
    H = torch.randn(B, T, d, generator=g, dtype=F64)
    W = torch.randn(V, d, generator=g, dtype=F64) / math.sqrt(d)
    y = torch.randint(0, V, (B, T), generator=g)
    a = torch.randn(B, d, generator=g, dtype=F64) / math.sqrt(d)
    cuts = [round(V * k / world) for k in range(world + 1)]
    s, e = cuts[rank], cuts[rank + 1]
    args: Dict[str, Any] = dict(hidden=H, weight=W[s:e], targets=y, reward=torch.tensor([-1.0, 1.0], dtype=F64),
                                mode="lora", lora_a=a, vocab_start=s, vocab_size=V)
    if who == "all" or rank == world - 1:
        if what.startswith("dtensor_"):
            import torch.distributed as dist
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.tensor import Replicate, Shard, distribute_tensor
            mesh = init_device_mesh("cpu", (dist.get_world_size(),))
            args.update(weight=distribute_tensor(W, mesh, [Shard(0)]), vocab_start=None, vocab_size=None)
            if what == "dtensor_replicated":
                args["weight"] = distribute_tensor(W, mesh, [Replicate()])
            elif what == "dtensor_size":
                args["vocab_size"] = V + 5
            elif what == "dtensor_start":
                args["vocab_start"] = s + 1
            elif what == "dtensor_lora_a":
                args["lora_a"] = distribute_tensor(a.t().contiguous(), mesh, [Shard(0)])
            elif what == "dtensor_target_V":
                y = y.clone()
                y[0, 0] = V
                args["targets"] = y
        elif what == "target_V":
            y = y.clone()
            y[0, 0] = V
            args["targets"] = y
        elif what == "hidden_nan":
            H = H.clone()
            H[0, 0, 0] = float("nan")
            args["hidden"] = H
        else:
            args.update({"start_str": dict(vocab_start=str(s)), "start_bool": dict(vocab_start=True),
                         "start_negative": dict(vocab_start=-1), "start_2**63": dict(vocab_start=2 ** 63),
                         "start_missing": dict(vocab_start=None), "size_str": dict(vocab_size=str(V)),
                         "size_bool": dict(vocab_size=True), "size_zero": dict(vocab_size=0),
                         "size_2**70": dict(vocab_size=2 ** 70), "size_wrong": dict(vocab_size=V + 1),
                         "group_str": dict(process_group="x"), "weight_0rows": dict(weight=W[:0]),
                         "weight_1d": dict(weight=W[s])}[what])
    t0 = time.time()
    try:
        rosa_update(**args)
    except Exception as e:  # noqa: BLE001
        return dict(raised=type(e).__name__, argument=getattr(e, "argument", None), message=str(e)[:300],
                    seconds=time.time() - t0)
    return dict(raised=None, argument=None, message="", seconds=time.time() - t0)


def _worker(argv: List[str]) -> None:
    world, rank, store, out = int(argv[0]), int(argv[1]), argv[2], pathlib.Path(argv[3])
    import torch.distributed as dist
    torch.set_num_threads(1)
    dist.init_process_group("gloo", init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=60))
    res: Dict[str, Any] = {}
    for what, who, w, _, _ in DIST_CASES:
        if w != world:
            continue
        key = f"{what}/{who}"
        try:
            res[key] = _worker_call(what, who, rank, world)
        except Exception as e:  # noqa: BLE001
            res[key] = dict(raised="harness:" + type(e).__name__, argument=None, message=traceback.format_exc()[-300:])
        out.write_text(json.dumps(res))
    dist.destroy_process_group()


_DIST: Dict[int, Tuple[Dict[int, Dict[str, Any]], bool, float]] = {}


def _dist_group(world: int) -> Tuple[Dict[int, Dict[str, Any]], bool, float]:
    """Run the worker group of ``world`` ranks once: ({rank: {case: result}}, timed out, seconds)."""
    if world in _DIST:
        return _DIST[world]
    tmp = pathlib.Path(tempfile.mkdtemp(prefix=f"rosa_replay{world}_"))
    env = dict(os.environ, OMP_NUM_THREADS="1")
    procs = [subprocess.Popen([sys.executable, __file__, "--worker", str(world), str(r), str(tmp / "store"),
                               str(tmp / f"rank{r}.json")], env=env, stdout=open(tmp / f"rank{r}.log", "w"),
                              stderr=subprocess.STDOUT) for r in range(world)]
    t0, timed_out = time.time(), False
    for p in procs:
        try:
            p.wait(timeout=max(0.1, DIST_TIMEOUT - (time.time() - t0)))
        except subprocess.TimeoutExpired:
            timed_out = True
            break
    for p in procs:
        if p.poll() is None:
            p.kill()
            p.wait()
    res = {r: (json.loads((tmp / f"rank{r}.json").read_text()) if (tmp / f"rank{r}.json").exists() else {})
           for r in range(world)}
    _DIST[world] = (res, timed_out, time.time() - t0)
    return _DIST[world]


for _what, _who, _world, _cls, _arg in DIST_CASES:
    def _make_dist(what=_what, who=_who, world=_world, cls=_cls, arg=_arg):
        def run() -> Result:
            res, timed_out, secs = _dist_group(world)
            key = f"{what}/{who}"
            got = {r: res[r].get(key) for r in res}
            if any(v is None for v in got.values()):
                return "FAIL", (f"no result from rank(s) {[r for r, v in got.items() if v is None]}"
                                f"{' (the group hung and was killed after %.0f s)' % secs if timed_out else ''}")
            seen = sorted({(v["raised"], v["argument"]) for v in got.values()}, key=str)
            ok = seen == [(cls, arg)]
            return ("PASS" if ok else "FAIL"), "every rank raised " + ", ".join(f"{c}(argument={a!r})" for c, a in seen) + (
                "" if len(seen) == 1 else " (differs across ranks)")
        return run
    _where = "one process" if _world == 1 else ("the last of 2 ranks" if _who == "last" else "both of 2 ranks")
    case(f"vocab_parallel_{_what}_{_who}{_world}", "errors", "helper",
         f"`{_what}` on {_where} (gloo): {_cls}(argument={_arg!r}) on every rank, no hang")(_make_dist())


# ============================================================ hangs and errors: CG and scale
def _cg_inputs(seed=0, T=6, d=8, V=20):
    g = torch.Generator().manual_seed(seed)
    return (torch.randn(T, d, generator=g), torch.randn(V, d, generator=g) / 3, torch.randint(0, V, (T,), generator=g),
            torch.randn(d, generator=g) / 3)


for _name, _desc in [("hidden_x1e15_weight_x1e-15", "hidden x 1e15 and weight x 1e-15 (the report's hidden / 1e-15)"),
                     ("hidden_x1e-15_weight_x1e15", "hidden x 1e-15 and weight x 1e15"),
                     ("lora_scale_1e18", "LoRA, lora_scale=1e18, b = 0"), ("lora_scale_1e-12", "LoRA, lora_scale=1e-12")]:
    def _make_cg(name=_name):
        def run() -> Result:
            h, W, y, a = _cg_inputs()
            kw = {"hidden_x1e15_weight_x1e-15": dict(hidden=h * 1e15, weight=W * 1e-15, mode="hidden"),
                  "hidden_x1e-15_weight_x1e15": dict(hidden=h * 1e-15, weight=W * 1e15, mode="hidden"),
                  "lora_scale_1e18": dict(hidden=h, weight=W, mode="lora", lora_a=a, lora_scale=1e18),
                  "lora_scale_1e-12": dict(hidden=h, weight=W, mode="lora", lora_a=a, lora_scale=1e-12)}[name]
            kw.update(targets=y, reward=-1.0)
            ref = rosa_update_reference(**_f64(kw)).update
            return _within(lambda: rosa_update(**kw, solver="cg").update, ref, allow_error=False)
        return run
    case(f"cg_{_name}", "errors", "helper",
         f"solver='cg' (defaults), {_desc}: within 1e-3 of float64 like the dual (was a breakdown naming `matvec`)")(
        _make_cg())


for _solver in ("dual", "cg"):
    def _make_overflow(solver=_solver):
        def run() -> Result:
            h, W, y, a = _cg_inputs()
            kw = dict(hidden=h, weight=W, targets=y, reward=-1.0, mode="lora", lora_a=a, lora_scale=1e25)
            ref = rosa_update_reference(**_f64(kw)).update
            return _within(lambda: rosa_update(**kw, solver=solver, max_iter=200, tol=1e-10).update, ref,
                           allow_error=False)
        return run
    case(f"lora_scale_1e25_{_solver}", "errors", "lead",
         f"lora_scale=1e25, finite inputs, solver={_solver}: the float64 step is finite, so the fp32 step within 1e-3 of "
         "it (J rescaled by a power of two before J J^T) -- not NaN/Inf blamed on `weight` / `matvec`")(_make_overflow())


# ============================================================ hangs and errors: kernels with prob=
def _kernel_problem():
    import rosa_ext.kernels as K
    g = torch.Generator().manual_seed(0)
    h, W = torch.randn(5, 6, generator=g), torch.randn(11, 6, generator=g) / 6 ** 0.5
    y = torch.randint(0, 11, (5,), generator=g)
    return K, h, W, y, K.prepare(h, W, y)


@case("kernels_row_reduce_prob", "errors", "helper",
      "kernels.row_reduce(None, None, lse, u, prob=prob) with u (V,): accepted, equal to the plain call")
def _() -> Result:
    K, h, W, y, prob = _kernel_problem()
    st = K.stats(h, W, y, prob=prob)
    u = torch.randn(W.shape[0])
    try:
        got = K.row_reduce(None, None, st.lse, u, prob=prob)
    except Exception as e:  # noqa: BLE001
        return "FAIL", "raised " + _err_str(e)
    err = float((got - K.row_reduce(h, W, st.lse, u)).abs().max())
    return ("PASS" if err <= 1e-5 else "FAIL"), f"ran; max diff to the plain call {err:.1e}"


@case("kernels_jvp_prob", "errors", "helper",
      "kernels.jvp(None, None, None, v, mode='hidden', prob=prob) with v (d,): accepted, equal to the plain call")
def _() -> Result:
    K, h, W, y, prob = _kernel_problem()
    v = torch.randn(W.shape[1])
    try:
        got = K.jvp(None, None, None, v, mode="hidden", prob=prob)
    except Exception as e:  # noqa: BLE001
        return "FAIL", "raised " + _err_str(e)
    err = float((got - K.jvp(h, W, y, v, mode="hidden")).abs().max())
    return ("PASS" if err <= 1e-5 else "FAIL"), f"ran; max diff to the plain call {err:.1e}"


@case("kernels_stats_targets_past_V_after_prepare", "errors", "helper",
      "targets edited in place past V after prepare: kernels.stats(..., prob=prob) reads nothing out of bounds "
      "(README) -- no IndexError; that token's log p is NaN")
def _() -> Result:
    K, h, W, y, prob = _kernel_problem()
    y[2] = W.shape[0] + 7
    try:
        st = K.stats(h, W, y, prob=prob)
    except Exception as e:  # noqa: BLE001
        return "FAIL", "raised " + _err_str(e)
    ok = bool(torch.isnan(st.logp[2])) and bool(torch.isfinite(st.logp[[0, 1, 3, 4]]).all())
    return ("PASS" if ok else "FAIL"), f"ran; log p = {[round(float(v), 3) for v in st.logp]}"


# ============================================================ state
@case("session_two_threads_update", "state", "lead",
      "two threads call update() on one session at once (5 trials): both steps applied in turn (num_updates 2, the "
      "state of two sequential updates), none lost")
def _() -> Result:
    from rosa_ext.integrations.models import tiny_causal_lm
    g = torch.Generator().manual_seed(1)
    ids = torch.randint(3, 512, (1, 24), generator=g)
    seq_model = tiny_causal_lm("qwen2")
    s = rosa_ext.attach(seq_model, mode="lora")
    s.update(ids, reward=-1.0, response_start=12)
    s.update(ids, reward=-1.0, response_start=12)
    want = s.state_dict()
    s.detach()
    bad = []
    for trial in range(5):
        model = tiny_causal_lm("qwen2")
        sess = rosa_ext.attach(model, mode="lora")
        barrier = threading.Barrier(2)
        errors: List[BaseException] = []

        def work():
            try:
                barrier.wait()
                sess.update(ids, reward=-1.0, response_start=12)
            except BaseException as e:  # noqa: BLE001
                errors.append(e)
        th = [threading.Thread(target=work) for _ in range(2)]
        for t in th:
            t.start()
        for t in th:
            t.join()
        got = sess.state_dict()
        sess.detach()
        if errors:
            bad.append(f"trial {trial}: raised {_err_str(errors[0])}")
            continue
        diff = max(float((got[k] - want[k]).abs().max()) for k in ("a", "b"))
        if got["num_updates"] != 2 or diff > 1e-4 * max(1.0, float(want["b"].abs().max())):
            bad.append(f"trial {trial}: num_updates {got['num_updates']}, state off the sequential one by {diff:.2e}")
    return ("PASS" if not bad else "FAIL"), ("5 of 5 trials serialised" if not bad else "; ".join(bad[:2]))


# ============================================================ a test that fails on another CPU
@case("overflow_test_on_this_cpu", "fresh-clone", "lead",
      "python_tests/core/test_properties.py::test_overflowing_logits_and_nan_weight_raise_instead_of_a_zero_step "
      "passes on this CPU")
def _() -> Result:
    test = "python_tests/core/test_properties.py::test_overflowing_logits_and_nan_weight_raise_instead_of_a_zero_step"
    p = subprocess.run([sys.executable, "-m", "pytest", "-q", "-x", "-p", "no:cacheprovider", test], cwd=ROOT,
                       capture_output=True, text=True, timeout=600)
    tail = [ln for ln in p.stdout.strip().splitlines() if ln.strip()][-1:] or ["(no output)"]
    return ("PASS" if p.returncode == 0 else "FAIL"), f"pytest exit {p.returncode}: {tail[0][:120]}"


@case("overflow_under_any_order", "fresh-clone", "helper",
      "fp32 logits that overflow whatever the GEMM's accumulation order (every product 3e38 of the same sign): "
      "RosaNonFiniteError naming `weight`, both solvers")
def _() -> Result:
    T, d, V = 3, 4, 5
    h = torch.full((T, d), 1e19)
    W = torch.full((V, d), 3e19)
    W[0] = 0.0  # row 0 gives finite logits; every other row 4 x 3e38 -> inf in any order
    y = torch.tensor([0, 1, 2])
    out = []
    for solver in ("dual", "cg"):
        try:
            rosa_update(h, W, y, 1.0, mode="hidden", solver=solver)
            out.append((False, f"{solver}: returned a step"))
        except rosa_ext.RosaNonFiniteError as e:
            out.append((e.argument == "weight", f"{solver}: {_err_str(e)[:70]}"))
        except Exception as e:  # noqa: BLE001
            out.append((False, f"{solver}: {_err_str(e)[:70]}"))
    return ("PASS" if all(ok for ok, _ in out) else "FAIL"), "; ".join(w for _, w in out)


# ============================================================ main
def main() -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--only", default=None, help="run the cases whose name contains this")
    ap.add_argument("--list", action="store_true", help="list the cases and exit")
    args = ap.parse_args()
    torch.set_num_threads(min(2, torch.get_num_threads()))
    todo = [c for c in CASES if args.only is None or args.only in c[0]]
    if args.list:
        for name, section, owner, expected, _ in todo:
            print(f"{section:11s} {name:48s} [{owner}] {expected}")
        return 0
    counts = {"PASS": 0, "FAIL": 0, "SKIP": 0}
    failed_by_owner: Dict[str, int] = {}
    for name, section, owner, expected, fn in todo:
        t0 = time.time()
        try:
            status, what = fn()
        except Exception as e:  # noqa: BLE001 -- a broken case is a failed case
            status, what = "FAIL", "replay error: " + _err_str(e)
        counts[status] += 1
        if status == "FAIL":
            failed_by_owner[owner] = failed_by_owner.get(owner, 0) + 1
        print(f"{status} {section}/{name} [{owner}, {time.time() - t0:.1f} s] expected: {expected} || happened: {what}",
              flush=True)
    print(f"\n{len(todo)} cases: {counts['PASS']} PASS, {counts['FAIL']} FAIL, {counts['SKIP']} SKIP; "
          f"failures by owner: {failed_by_owner or 'none'}")
    return 1 if counts["FAIL"] else 0


if __name__ == "__main__":
    if len(sys.argv) > 1 and sys.argv[1] == "--worker":
        _worker(sys.argv[2:])
    else:
        sys.exit(main())
