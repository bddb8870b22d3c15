"""One benchmark row: inputs, the methods compared, timing, memory, accuracy.

Used by ``benchmarks/bench_update.py`` (the CLI) and ``benchmarks/test_bench_update.py``.

A *method* is a name such as ``"torch.func+CG"``, ``"rosa default"``,
``"rosa torch/cg"``, ``"rosa triton/dual"``, ``"rosa triton/cg pyCG"`` or
``"reference"``; :func:`methods_for` lists the ones that can run on a device
(Triton only on CUDA when it imports; the ``pyCG`` variant -- the package's
CG with the plain Python loop instead of the compiled ``rosa_ext._C`` one --
only on CUDA when ``_C`` is built, since on the CPU both loops call the same
Python matvec and differ by nothing measurable).
"""
from __future__ import annotations

import statistics
import time
from typing import Any, Callable, Dict, List, Optional, Tuple

import torch
from common import sync, timed_call_s
from update_dense import dense_bytes

from rosa_ext.common import defaults

#: Head sizes (d, V) of real models, plus scaled-down CPU heads.
MODELS: Dict[str, Tuple[int, int]] = {
    "qwen2.5-0.5b": (896, 151936), "qwen3-0.6b": (1024, 151936), "qwen2.5-7b": (3584, 152064),
    "llama-3-8b": (4096, 128256), "smollm2-135m": (576, 49152), "cpu-small": (256, 32000), "cpu-sweep": (128, 8000),
    "tiny": (32, 500)}

#: Every method runs with the package defaults (rosa_ext.common.defaults) and reward -1, except the
#: damping: a fixed ridge (damping_mode="absolute", lambda = 0.1), which every peer (torch.func + CG,
#: the dense solve) implements and which keeps results comparable across commits. The default
#: relative ridge costs the dual one reduction of T numbers per conversation.
MAX_ITER, TOL, BETA, LORA_SCALE = defaults.MAX_ITER, defaults.TOL, defaults.BETA, defaults.LORA_SCALE
DAMPING, DAMPING_MODE = defaults.ABSOLUTE_DAMPING, "absolute"
REWARD = -1.0

#: The fp64 reference builds the T x P Jacobian through a vmapped torch.func pass that holds
#: about 3 T^2 V fp64 numbers (measured: 3.2 GB at T=64, V=32000) and a P x P matrix.
REFERENCE_MAX_BYTES = 4 * 2 ** 30

BASELINE = "torch.func+CG"
#: The dense solve a competent user writes (update_dense.py): T x V logits, explicit J, Gram, Cholesky.
DENSE = "dense solve"
DEFAULT = "rosa default"
REFERENCE = "reference"


# ----------------------------------------------------------------------------- environment
def compiled_cg_available() -> bool:
    """True when the compiled CG extension ``rosa_ext._C`` imports."""
    try:
        from rosa_ext.cg import compiled  # noqa: F401
    except Exception:
        return False
    return True


def triton_usable(device: str) -> bool:
    """True when ``backend="triton"`` can run on ``device`` (CUDA + triton importable)."""
    if device != "cuda":
        return False
    try:
        from rosa_ext.backends import triton_available
        return triton_available(torch.device("cuda"))
    except Exception:
        return False


def methods_for(device: str) -> List[str]:
    """Methods that can run on ``device``, in table order."""
    out = [BASELINE, DENSE, DEFAULT, "rosa torch/cg", "rosa torch/dual"]
    if triton_usable(device):
        out += ["rosa triton/cg", "rosa triton/dual"]
    if device == "cuda" and compiled_cg_available():
        out += [f"rosa {'triton' if triton_usable(device) else 'torch'}/cg pyCG"]
    return out + [REFERENCE]


def parse_method(method: str) -> Tuple[str, str, bool]:
    """``"rosa triton/cg pyCG"`` -> (backend, solver, python_cg_loop)."""
    if method == DEFAULT:
        return "auto", "auto", False
    body = method.split(" ", 1)[1]
    backend, rest = body.split("/", 1)
    solver, *flags = rest.split()
    return backend, solver, "pyCG" in flags


# ----------------------------------------------------------------------------- inputs
def make_inputs(d: int, V: int, T: int, mode: str, dtype: torch.dtype, device: str, seed: int = 0
                ) -> Dict[str, Any]:
    """Random head with peaked logits (std ~4); targets sampled from the model's own softmax.

    Returns kwargs for the methods: hidden (T, d) and weight (V, d) in ``dtype``;
    targets (T,) int64; in lora mode lora_a (d,) and lora_b (V,) (nonzero, as on a
    second update) in fp32, in hidden mode neither (the default call: no LoRA term in the
    logits); reward -1. Generated on ``device`` 256 rows of logits at a
    time, so making the inputs never holds T x V numbers. Deterministic per (seed, T).
    """
    g = torch.Generator(device=device).manual_seed(seed + T)
    h = torch.randn(T, d, generator=g, device=device)
    W = torch.randn(V, d, generator=g, device=device) * (4.0 / d ** 0.5)
    rows = 256 if device == "cuda" else 16
    y = torch.cat([torch.multinomial(torch.softmax(h[i:i + rows] @ W.T, -1), 1, generator=g).squeeze(1)
                   for i in range(0, T, rows)])
    a = torch.randn(d, generator=g, device=device) / d ** 0.5
    b = torch.randn(V, generator=g, device=device) * 0.01
    return dict(hidden=h.to(dtype), weight=W.to(dtype), targets=y, reward=REWARD, mode=mode,
                lora_a=a if mode == "lora" else None, lora_b=b if mode == "lora" else None)


def _args(inp: Dict[str, Any]) -> Tuple[tuple, dict]:
    return ((inp["hidden"], inp["weight"], inp["targets"], inp["reward"]),
            dict(mode=inp["mode"], lora_a=inp["lora_a"], lora_b=inp["lora_b"]))


def truth_update(inp: Dict[str, Any]) -> torch.Tensor:
    """Exact float64 update of the same inputs: dual solve, chunked torch backend, (P,) fp64.

    It agrees with the float64 torch.func reference (the ``reference`` rows report
    their error against it).
    """
    from rosa_ext import rosa_update
    f64 = {k: (v.double() if isinstance(v, torch.Tensor) and v.is_floating_point() else v) for k, v in inp.items()}
    args, kw = _args(f64)
    return rosa_update(*args, **kw, damping=DAMPING, damping_mode=DAMPING_MODE, beta=BETA, lora_scale=LORA_SCALE,
                       solver="dual", backend="torch").update


# ----------------------------------------------------------------------------- runners
UpdateFn = Callable[[], Tuple[torch.Tensor, int, str]]


def runner(method: str, inp: Dict[str, Any]) -> Tuple[UpdateFn, Callable[[], Optional[Callable[[], Any]]]]:
    """(update, pair_factory) for one method on one input.

    ``update()`` runs one whole update and returns (update (P,), CG iterations, what
    ran as "backend/solver"). ``pair_factory()`` builds (untimed) the method's operator
    and returns a function doing one JVP followed by one VJP, or None for methods
    without one (dual solves, the reference).
    """
    args, kw = _args(inp)
    if method == BASELINE:
        from update_baseline import TorchFuncOperator, torch_func_update

        def update():
            r = torch_func_update(*args, **kw, lora_scale=LORA_SCALE, beta=BETA, damping=DAMPING,
                                  max_iter=MAX_ITER, tol=TOL)
            return r.x, int(r.iterations), "torch.func/cg_python"

        def pair_factory():
            op = TorchFuncOperator(*args, **kw, lora_scale=LORA_SCALE, beta=BETA)
            v = torch.randn_like(op.theta0)
            return lambda: op.vjp(op.jvp(v))
        return update, pair_factory
    if method == DENSE:
        from update_dense import dense_update

        def update():
            u = dense_update(*args, **kw, lora_scale=LORA_SCALE, beta=BETA, damping=DAMPING)
            return u, 0, "dense logits+J+Gram"
        return update, lambda: None
    if method == REFERENCE:
        from rosa_ext.reference import rosa_update_reference

        def update():
            s = rosa_update_reference(*args, **kw, lora_scale=LORA_SCALE, beta=BETA, damping=DAMPING,
                                      damping_mode=DAMPING_MODE)
            return s.update, 0, "float64 torch.func Jacobian + dense solve"
        return update, lambda: None

    from rosa_ext import rosa_update
    from rosa_ext.cg import cg_python
    backend, solver, pyloop = parse_method(method)
    # pyCG: the Python loop; otherwise the package's default CG (the compiled _C one when built)
    cg_kw = dict(cg_impl=cg_python) if pyloop else {}

    def update():
        s = rosa_update(*args, **kw, lora_scale=LORA_SCALE, beta=BETA, damping=DAMPING, damping_mode=DAMPING_MODE,
                        max_iter=MAX_ITER, tol=TOL, solver=solver, backend=backend, **cg_kw)
        return s.update, s.iterations, f"{s.backend}/{s.solver}"
    if solver != "cg":
        return update, lambda: None

    def pair_factory():
        from rosa_ext.backends import engine_for
        from rosa_ext.common import jacobian as J
        from rosa_ext.core.op import pack
        prob, cfg = pack(*args, **kw, lora_scale=LORA_SCALE, beta=BETA, damping=DAMPING, damping_mode=DAMPING_MODE,
                         max_iter=MAX_ITER, tol=TOL, solver="cg", backend=backend)
        be = engine_for(cfg.backend, prob.weight.device)
        lin = J.Linearization.at(prob, be.stats(prob), cfg.mode, be)  # what matrix-free CG (plans.cg_lora) iterates on
        P = prob.hidden_size + (prob.vocab_size if cfg.mode == "lora" else 0)
        v = torch.randn(1, P, dtype=prob.compute_dtype, device=prob.weight.device)
        return lambda: J.vjp(lin, be, J.jvp(lin, be, v))
    return update, pair_factory


def dense_max_bytes(device: str, cap_gb: Optional[float] = None) -> float:
    """Memory the dense peer may use: ``cap_gb`` when given (a preset's update-memory budget), else
    60% of the GPU's memory, or of the machine's RAM on the CPU.

    Above it the ``dense solve`` row reports that it does not fit instead of running (the
    package's path runs there; that is the point of streaming over the vocabulary).
    """
    if cap_gb is not None:
        return cap_gb * 2 ** 30
    if device == "cuda":
        return 0.6 * torch.cuda.get_device_properties(torch.cuda.current_device()).total_memory
    try:
        with open("/proc/meminfo") as f:
            kb = next(int(line.split()[1]) for line in f if line.startswith("MemTotal:"))
        return 0.6 * kb * 1024.0
    except (OSError, StopIteration):
        return 8.0 * 2 ** 30


def reference_bytes(T: int, d: int, V: int, mode: str) -> float:
    """Rough peak memory of the fp64 reference (see :data:`REFERENCE_MAX_BYTES`)."""
    P = d if mode == "hidden" else d + V
    return 8.0 * (3 * T * T * V + P * P)


def useful_flops(ran: str, mode: str, T: int, d: int, V: int, iters: int) -> Optional[float]:
    """Flops of the algorithm that ran, counted as in MATH.md section 4 (None: not counted).

    CG (ours or torch.func's): stats pass 2TdV + right-hand-side VJP 2TdV + 4TdV per
    iteration. Dual: stats 2TdV + hidden: pi W 4TdV; lora: pi pi^T 2T^2 V + VJP 2TdV;
    plus the T^3/3 Cholesky.
    """
    if ran.startswith("dense"):
        extra = 2.0 * T * d * V if mode == "hidden" else 2.0 * T * T * V + 2.0 * T * V
        return 2.0 * T * d * V + extra + T ** 3 / 3.0
    if ran.endswith("cg") or ran.endswith("cg_python"):
        return (4.0 + 4.0 * iters) * T * d * V
    if ran.endswith("dual"):
        extra = 4.0 * T * d * V if mode == "hidden" else 2.0 * T * T * V + 2.0 * T * d * V
        return 2.0 * T * d * V + extra + T ** 3 / 3.0
    return None


# ----------------------------------------------------------------------------- memory
def _proc_status_kb(field: str) -> Optional[int]:
    try:
        with open("/proc/self/status") as f:
            for line in f:
                if line.startswith(field + ":"):
                    return int(line.split()[1])
    except OSError:
        pass
    return None


def rss_mark() -> Optional[int]:
    """Current RSS (kB) after resetting the kernel's peak-RSS counter (``clear_refs`` 5); None if unsupported."""
    try:
        with open("/proc/self/clear_refs", "w") as f:
            f.write("5")
    except OSError:
        return None
    return _proc_status_kb("VmRSS")


def torch_cpu_alloc_peak_mb(fn: Callable[[], Any]) -> Tuple[Any, float]:
    """(fn(), peak MB of torch CPU tensor memory allocated during the call over what was live before).

    From torch's allocator profiling (``torch.profiler`` with ``profile_memory=True``):
    the call's allocation/free events replayed in time order. Counts tensor bytes only
    (no allocator slack, no library pages), so it is exact and repeatable, unlike RSS.
    """
    from torch.profiler import ProfilerActivity, profile
    with profile(activities=[ProfilerActivity.CPU], profile_memory=True) as prof:
        out = fn()
    events = sorted((e.start_ns(), e.nbytes()) for e in prof.profiler.kineto_results.events()
                    if e.name() == "[memory]" and "CPU" in str(e.device_type()))
    cur = peak = 0
    for _, nbytes in events:
        cur += nbytes
        peak = max(peak, cur)
    return out, peak / 2 ** 20


# ----------------------------------------------------------------------------- timing
def spread(times: List[float]) -> Dict[str, float]:
    """median, min, max and (>= 4 samples) the interquartile range, ms."""
    out = dict(median_ms=statistics.median(times), min_ms=min(times), max_ms=max(times))
    if len(times) >= 4:
        q = statistics.quantiles(times, n=4)
        out["iqr_ms"] = q[2] - q[0]
    return out


def _warm_imports(method: str, device: str) -> None:
    """Run the method once on a tiny head so lazy imports/initialisation don't count as memory."""
    inp = make_inputs(8, 16, 4, "lora", torch.float32, device, seed=123)
    try:
        runner(method, inp)[0]()
    except Exception:
        pass


def measure_memory(method: str, inp: Dict[str, Any], device: str) -> Dict[str, Any]:
    """Extra peak memory of one update of ``method`` on ``inp`` (+ the first call's result).

    CUDA: ``max_memory_allocated`` during a second call (after warm-up and Triton
    autotuning) minus the memory allocated before it (inputs, W). CPU: the peak of
    torch's tensor allocations during a second call (:func:`torch_cpu_alloc_peak_mb`)
    and, beside it, the growth of peak RSS during the *first* call over the RSS just
    before it (Linux ``clear_refs``/VmHWM) -- meaningful in a fresh process only.
    Returns dict(extra_mem_mb, rss_extra_mb (CPU), mem_how, first_s, update, iterations, ran).
    """
    update = runner(method, inp)[0]
    _warm_imports(method, device)
    sync(device)
    rss0 = rss_mark() if device == "cpu" else None
    t0 = time.perf_counter()
    upd, iters, ran = update()
    sync(device)
    out: Dict[str, Any] = dict(first_s=time.perf_counter() - t0)
    if device == "cuda":
        torch.cuda.reset_peak_memory_stats()
        base = torch.cuda.memory_allocated()
        upd, iters, ran = update()
        sync(device)
        out.update(extra_mem_mb=round((torch.cuda.max_memory_allocated() - base) / 2 ** 20, 2),
                   mem_how="cuda max_memory_allocated - allocated before (2nd call)")
    else:
        rss = (_proc_status_kb("VmHWM") - rss0) / 1024.0 if rss0 is not None else float("nan")
        (upd, iters, ran), mb = torch_cpu_alloc_peak_mb(update)
        out.update(extra_mem_mb=round(mb, 2), rss_extra_mb=round(rss, 2),
                   mem_how="torch CPU allocations peak (profiler), 2nd call; RSS: 1st call")
    out.update(update=upd, iterations=int(iters), ran=ran)
    return out


def rel_error(upd: torch.Tensor, truth: torch.Tensor) -> float:
    """||upd - truth|| / ||truth|| in float64."""
    truth = truth.double().cpu()
    return float((upd.double().cpu() - truth).norm() / truth.norm().clamp_min(1e-300))


def measure_case(methods: List[str], model: str, T: int, mode: str, dtype: str, device: str, reps: int,
                 truth: Optional[torch.Tensor] = None, row_budget_s: float = 20.0,
                 memory: Optional[Dict[str, Dict[str, Any]]] = None,
                 on_error: Optional[Callable[[str, Exception], None]] = None, verbose: bool = False,
                 dense_cap_gb: Optional[float] = None) -> List[Dict[str, Any]]:
    """Rows of one case: every method on the SAME input tensors, timed round-robin.

    Each method runs once untimed (warm-up, accuracy, and -- unless ``memory`` already
    has its entry, e.g. from a fresh subprocess -- its memory), then rounds of one timed
    call per method until ``reps`` rounds, a method leaving the rotation once it has 3
    samples and has spent ``row_budget_s``. Interleaving makes the load of a shared
    machine hit all methods alike, so the ratios (speedups) are fair even when absolute
    times drift. Then the same for the JVP+VJP pairs. A method that raises is reported
    through ``on_error`` and dropped.
    """
    d, V = MODELS[model]
    inp = make_inputs(d, V, T, mode, getattr(torch, dtype), device)
    if truth is None:
        truth = truth_update(inp)
    memory = dict(memory or {})
    rows: Dict[str, Dict[str, Any]] = {}
    fns: Dict[str, Any] = {}
    for m in methods:
        try:
            if m == REFERENCE and reference_bytes(T, d, V, mode) > REFERENCE_MAX_BYTES:
                raise MemoryError(f"reference would need ~{reference_bytes(T, d, V, mode) / 2 ** 30:.0f} GB")
            cap = dense_max_bytes(device, dense_cap_gb)
            if m == DENSE and dense_bytes(T, d, V, mode) > cap:
                raise MemoryError(f"does not fit: the dense solve needs ~{dense_bytes(T, d, V, mode) / 2 ** 30:.1f} GB "
                                  f"of T x V buffers, over the {cap / 2 ** 30:.1f} GB allowed")
            if m in memory:
                fns[m] = runner(m, inp)
                upd, iters, ran = fns[m][0]()
                sync(device)
                mem = memory[m]
            else:
                mem = measure_memory(m, inp, device)
                fns[m] = runner(m, inp)
                upd, iters, ran = mem.pop("update"), mem.pop("iterations"), mem.pop("ran")
            mem = {k: v for k, v in mem.items() if k not in ("update", "iterations", "ran", "first_s")}
            rows[m] = dict(method=m, ran=ran, model=model, d=d, V=V, T=T, mode=mode, dtype=dtype, device=device,
                           iterations=int(iters), rel_error=rel_error(upd, truth), **mem)
            if verbose:
                print(f"    warm-up {m:<22} ran={ran} it={int(iters)} err={rows[m]['rel_error']:.1e}", flush=True)
        except Exception as e:  # noqa: BLE001 -- reported, the other methods go on
            if on_error is None:
                raise
            on_error(m, e)
            if device == "cuda":
                torch.cuda.empty_cache()
    if verbose:
        print(f"    timing {len(rows)} methods round-robin (up to {reps} rounds)...", flush=True)
    times = _round_robin({m: fns[m][0] for m in rows}, reps, device, row_budget_s)
    for m, ts in times.items():
        r = rows[m]
        r.update(**spread(ts), reps=len(ts), times_ms=[round(t, 3) for t in ts])
        flops = useful_flops(r["ran"], mode, T, d, V, r["iterations"])
        if flops is not None:
            r["update_gflops"] = flops / (r["median_ms"] * 1e-3) / 1e9
    pairs = {}
    for m in rows:
        pf = fns[m][1]()
        if pf is not None:
            pf()
            pairs[m] = pf
    for m, ts in _round_robin(pairs, reps, device, row_budget_s / 2).items():
        pt = spread(ts)
        rows[m].update(pair_ms=pt["median_ms"], pair_min_ms=pt["min_ms"], pair_max_ms=pt["max_ms"],
                       pair_gflops=4.0 * T * d * V / (pt["median_ms"] * 1e-3) / 1e9)
    return [rows[m] for m in methods if m in rows]


def _round_robin(fns: Dict[str, Callable[[], Any]], reps: int, device: str, budget_s: float,
                 min_reps: int = 3) -> Dict[str, List[float]]:
    """Wall times (ms) per name: rounds of one call each, a name leaving after ``reps``
    samples, or after ``min_reps`` once it has spent ``budget_s`` seconds."""
    times: Dict[str, List[float]] = {m: [] for m in fns}
    spent = {m: 0.0 for m in fns}
    active = list(fns)
    while active:
        for m in list(active):
            dt = timed_call_s(fns[m], device)
            times[m].append(1000.0 * dt)
            spent[m] += dt
            n = len(times[m])
            if n >= reps or (n >= min_reps and spent[m] >= budget_s):
                active.remove(m)
    return times


def measure(method: str, model: str, T: int, mode: str, dtype: str, device: str, reps: int,
            truth: Optional[torch.Tensor] = None, row_budget_s: float = 20.0) -> Dict[str, Any]:
    """One row on its own (see :func:`measure_case`; ``benchmarks/README.md`` for the columns)."""
    return measure_case([method], model, T, mode, dtype, device, reps, truth, row_budget_s)[0]
