"""One rank of a vocabulary-parallel test group (started by python_tests/_dist.py).

    RANK=r WORLD_SIZE=k python _dist_worker.py <suite> <rendezvous file> <out dir> <gloo|nccl>

Runs every case of ``suite`` in order and writes ``<out dir>/rank<r>.json`` after each one:
``{case: {...}}``, where a case returns numbers for the test to check, or ``{"error": ...}`` when
it raised unexpectedly. Bad-input cases return the exception every rank raised. The process
group has a 30 s timeout, so a collective that would hang fails instead.

Suites, joined by "+": ``core`` (the op against the unsharded call, bad input), ``errors`` (one
bad argument on every rank or on one: the same error class and ``argument`` everywhere), ``dtensor`` (a
DTensor weight, a process group other than its mesh's), ``session`` (``rosa_ext.attach`` on a tiny
transformers model whose lm_head is ColwiseParallel), ``gpu`` (the op on CUDA tensors: NCCL across
GPUs, or gloo with every rank on one GPU).
"""
from __future__ import annotations

import datetime
import json
import os
import pathlib
import sys
import time
import traceback
from typing import Any, Callable, Dict, List

import torch
import torch.distributed as dist

from rosa_ext import rosa_update
from rosa_ext.backends.distributed import traffic
from rosa_ext.core.distributed import traffic_bytes, vocab_rows

F64 = torch.float64
T0 = time.time()  # after the imports above (torch, rosa_ext)


class Ctx:
    def __init__(self, rank: int, world: int, device: torch.device) -> None:
        self.rank, self.world, self.device = rank, world, device
        self._mesh = None

    @property
    def mesh(self):
        if self._mesh is None:
            from torch.distributed.device_mesh import init_device_mesh
            self._mesh = init_device_mesh(self.device.type, (self.world,))
        return self._mesh

    def cuts(self, V: int) -> List[int]:
        """Uneven shards: rank 0 holds a single row, the others split the rest."""
        if self.world == 1:
            return [0, V]
        rest = [1 + (V - 1) * (k + 1) // (self.world - 1) for k in range(self.world - 1)]
        return [0, 1] + rest

    def rows(self, V: int):
        c = self.cuts(V)
        return c[self.rank], c[self.rank + 1]


def make_inputs(ctx: Ctx, *, dtype=F64, B: int = 3, T: int = 6, d: int = 8, V: int = 23, seed: int = 0):
    g = torch.Generator().manual_seed(seed)
    x = dict(
        hidden=torch.randn(B, T, d, generator=g, dtype=F64),
        weight=torch.randn(V, d, generator=g, dtype=F64) * 2 / d ** 0.5,
        bias=torch.randn(V, generator=g, dtype=F64) * 0.1,
        targets=torch.randint(0, V, (B, T), generator=g),
        lora_a=torch.randn(B, d, generator=g, dtype=F64) / d ** 0.5,
        lora_b=torch.randn(B, V, generator=g, dtype=F64) * 0.05,
        mask=torch.arange(T) < torch.tensor([T, max(1, T // 2), max(1, T - 2)][:B]).unsqueeze(1),
        reward=torch.tensor([-1.0, 1.0, 0.5][:B], dtype=F64),
    )
    out = {}
    for k, v in x.items():
        v = v.to(ctx.device)
        out[k] = v.to(dtype) if v.is_floating_point() and k in ("hidden", "weight", "bias") else v
    return out


def _gather_equal(t: torch.Tensor) -> bool:
    """True when ``t`` is bitwise the same on every rank."""
    t = t.detach().contiguous()
    if dist.get_backend() == "gloo":  # gloo's all_gather takes CPU tensors only
        t = t.cpu()
    parts = [torch.empty_like(t) for _ in range(dist.get_world_size())]
    dist.all_gather(parts, t)
    return all(torch.equal(parts[0], p) for p in parts)


def _maxerr(a: torch.Tensor, b: torch.Tensor) -> float:
    return float((a.double() - b.double()).abs().max()) if a.numel() else 0.0


def match(ctx: Ctx, mode: str, solver: str, *, batched: bool = True, lora_term: bool = False, dtype=F64,
          bias: bool = True, peft_shapes: bool = False, max_iter: int = 5, dtensor: bool = False,
          backend: str = "auto", damping_mode: str = "absolute") -> Dict[str, Any]:
    """The sharded call against the unsharded one on the same inputs."""
    x = make_inputs(ctx, dtype=dtype)
    H, W, c, y, a, b, mask, r = (x[k] for k in ("hidden", "weight", "bias", "targets", "lora_a", "lora_b", "mask", "reward"))
    V, d = W.shape
    if not bias:
        c = None
    if not batched:
        H, y, a, b, mask, r = H[0], y[0], a[:1], b[:1], None, -1.0
        if peft_shapes:  # PEFT's lora_A (1, d) and lora_B (V, 1)
            b = b.reshape(V, 1)
        else:
            a, b = a[0], b[0]
    use_lora = mode == "lora" or lora_term
    kw = dict(mode=mode, solver=solver, max_iter=max_iter, mask=mask, backend=backend, damping_mode=damping_mode)
    ref = rosa_update(H, W, y, r, bias=c, **kw, **(dict(lora_a=a, lora_b=b) if use_lora else {}))
    if dtensor:
        from torch.distributed.tensor import Shard, distribute_tensor
        Wd = distribute_tensor(W, ctx.mesh, [Shard(0)])
        s, rows = vocab_rows(Wd)
        e = s + rows
        cd = None if c is None else distribute_tensor(c, ctx.mesh, [Shard(0)])
        bd = distribute_tensor(b, ctx.mesh, [Shard(b.dim() - 1 if b.shape[-1] == V else 0)])
        shard_kw = dict(bias=cd, **(dict(lora_a=a, lora_b=bd) if use_lora else {}))
        traffic.reset()
        st = rosa_update(H, Wd, y, r, **kw, **shard_kw)
    else:
        s, e = ctx.rows(V)
        b_loc = b[s:e] if b.dim() == 2 and b.shape[1] == 1 else b[..., s:e]
        shard_kw = dict(bias=None if c is None else c[s:e], **(dict(lora_a=a, lora_b=b_loc) if use_lora else {}))
        traffic.reset()
        st = rosa_update(H, W[s:e], y, r, vocab_start=s, vocab_size=V, **kw, **shard_kw)
    measured = traffic.snapshot()
    rep_ref, rep = ref.update[..., :d], st.update[..., :d]
    out = dict(err_replicated=_maxerr(rep, rep_ref), scale=float(ref.update.abs().max()),
               err_logp=_maxerr(st.logp, ref.logp), err_target=_maxerr(st.target, ref.target),
               same_on_all_ranks=_gather_equal(rep) and _gather_equal(st.logp),
               iterations=[st.iterations, ref.iterations], solver=[st.solver, ref.solver],
               residual=[st.residual, ref.residual], rows=[s, e])
    if mode == "lora":
        out["err_rows"] = _maxerr(st.delta_b, ref.delta_b[..., s:e])
        out["shape_rows"] = list(st.delta_b.shape)
    lengths = [int(n) for n in (mask.sum(1).tolist() if mask is not None else [y.shape[-1]] * (y.shape[0] if y.dim() == 2 else 1))]
    if not batched:
        lengths = [int(y.shape[0])]
    out["bytes"] = measured["bytes"]
    out["by_label"] = measured["by_label"]
    out["bytes_formula"] = traffic_bytes(mode, st.solver, lengths, d, elem_bytes=8 if dtype == F64 else 4,
                                         iterations=st.iterations, lora_term=lora_term, damping_mode=damping_mode)
    return out


def gap_case(ctx: Ctx, mode: str, solver: str, gap: float) -> Dict[str, Any]:
    """fp32 shards of a head whose observed tokens lead the other logits by ``gap`` (a fresh adapter, b = 0)
    against the float64 reference on the same inputs (W = I: logits exact in any order)."""
    from rosa_ext.reference import rosa_update_reference
    g = torch.Generator().manual_seed(7)
    T, d = 6, 24
    h = torch.randn(T, d, generator=g, dtype=F64)
    y = torch.randint(0, d, (T,), generator=g)
    others = h.clone()
    others[torch.arange(T), y] = float("-inf")
    h[torch.arange(T), y] = torch.logsumexp(others, 1) + gap
    W = torch.eye(d, dtype=F64)
    kw = dict(lora_a=torch.randn(d, generator=g, dtype=F64) / d ** 0.5, lora_b=torch.zeros(d, dtype=F64)) if mode == "lora" else {}
    ref = rosa_update_reference(h, W, y, -1.0, mode=mode, **kw)
    s, e = ctx.rows(d)
    loc = {k: (v[s:e] if k == "lora_b" else v).float().to(ctx.device) for k, v in kw.items()}
    st = rosa_update(h.float().to(ctx.device), W[s:e].float().to(ctx.device), y.to(ctx.device), -1.0, mode=mode,
                     solver=solver, max_iter=300, tol=1e-10, vocab_start=s, vocab_size=d, **loc)
    want = torch.cat([ref.update[:d], ref.update[d:][s:e]]) if mode == "lora" else ref.update
    return dict(rel=float((st.update.double().cpu() - want).norm() / want.norm()), rows=[s, e])


def expect_error(fn: Callable[[], Any]) -> Dict[str, Any]:
    try:
        fn()
    except Exception as e:  # what every rank raised
        return dict(raised=type(e).__name__, message=str(e), argument=getattr(e, "argument", "<no attribute>"))
    return dict(raised=None, message="", argument=None)


#: suite ``errors``: (case, which ranks get the bad value: "all" or "last"). Each case changes one
#: argument of a valid LoRA call; every rank must raise the same class with the same ``argument``.
ERROR_CASES = [
    ("start_str", "all"), ("start_bool", "all"), ("start_float", "all"), ("start_negative", "all"),
    ("start_2**63", "all"), ("size_str", "all"), ("size_bool", "all"), ("size_zero", "all"), ("size_2**70", "all"),
    ("size_wrong", "all"), ("start_missing", "all"), ("group_str", "all"), ("target_V", "all"),
    ("weight_0rows", "all"), ("weight_1d", "all"), ("weight_list", "all"), ("hidden_nan", "all"),
    ("dtensor_replicated", "all"), ("dtensor_size", "all"), ("dtensor_start", "all"), ("dtensor_lora_a", "all"),
    ("start_2**63", "last"), ("size_2**70", "last"), ("start_str", "last"), ("hidden_nan", "last"),
    ("weight_1d", "last"), ("size_wrong", "last"), ("mode", "last"), ("damping", "last"),
]


def error_case(ctx: Ctx, what: str, who: str) -> Dict[str, Any]:
    """One bad argument (on every rank, or on the last rank only) of a valid call."""
    x = make_inputs(ctx)
    H, W, c, y, a, b, mask, r = (x[k] for k in ("hidden", "weight", "bias", "targets", "lora_a", "lora_b", "mask", "reward"))
    V = W.shape[0]
    s, e = ctx.rows(V)
    args: Dict[str, Any] = dict(hidden=H, weight=W[s:e], targets=y, reward=r, bias=c[s:e], lora_b=b[:, s:e],
                                vocab_start=s, vocab_size=V, mode="lora", solver="dual", mask=mask, lora_a=a)
    if who == "all" or ctx.rank == ctx.world - 1:
        if what.startswith("dtensor_"):
            from torch.distributed.tensor import Replicate, Shard, distribute_tensor
            args.update(weight=distribute_tensor(W, ctx.mesh, [Shard(0)]), bias=None, lora_b=None, vocab_start=None,
                        vocab_size=None)
            if what == "dtensor_replicated":
                args["weight"] = distribute_tensor(W, ctx.mesh, [Replicate()])
            elif what == "dtensor_size":
                args["vocab_size"] = V + 5
            elif what == "dtensor_start":
                args["vocab_start"] = s + 1
            elif what == "dtensor_lora_a":
                args["lora_a"] = distribute_tensor(a.t().contiguous(), ctx.mesh, [Shard(0)])
        else:
            change = {"start_str": dict(vocab_start=str(s)), "start_bool": dict(vocab_start=True),
                      "start_float": dict(vocab_start=s + 0.5), "start_negative": dict(vocab_start=-1),
                      "start_2**63": dict(vocab_start=2 ** 63), "size_str": dict(vocab_size="23"),
                      "size_bool": dict(vocab_size=True), "size_zero": dict(vocab_size=0),
                      "size_2**70": dict(vocab_size=2 ** 70), "size_wrong": dict(vocab_size=V + 1),
                      "start_missing": dict(vocab_start=None), "group_str": dict(process_group="x"),
                      "weight_0rows": dict(weight=W[:0]), "weight_1d": dict(weight=W[s]),
                      "weight_list": dict(weight=W[s:e].tolist()), "mode": dict(mode="hidden"),
                      "damping": dict(damping=0.5)}
            if what == "target_V":
                y = y.clone()
                y[0, 0] = V
                args["targets"] = y
            elif what == "hidden_nan":
                H = H.clone()
                H[0, 0, 0] = float("nan")
                args["hidden"] = H
            else:
                args.update(change[what])
    return expect_error(lambda: rosa_update(**args))


def bad(ctx: Ctx, what: str) -> Dict[str, Any]:
    """Bad input on some or all ranks: every rank must raise."""
    x = make_inputs(ctx)
    H, W, c, y, a, b, mask, r = (x[k] for k in ("hidden", "weight", "bias", "targets", "lora_a", "lora_b", "mask", "reward"))
    V = W.shape[0]
    s, e = ctx.rows(V)
    last = ctx.rank == ctx.world - 1
    kw: Dict[str, Any] = dict(mode="lora", solver="dual", mask=mask, lora_a=a)
    vocab_size = None
    group = None
    if what == "gap" and last:  # the last rank starts one row late: row s is held by nobody
        s = s + 1
    elif what == "overlap" and last:  # the last rank starts one row early: row s - 1 is held twice
        s = s - 1
    elif what == "target":
        y = y.clone()
        y[1, 0] = V  # a selected position (conversation 1 has >= 1 token)
    elif what == "vocab_size":
        vocab_size = V + 1
    elif what == "not_replicated" and ctx.rank == 1:
        H = H + 1e-3
    if what == "one_rank" and ctx.rank == 1:
        bias = c[s:e + 2] if e + 2 <= V else c[s - 2:e]  # the wrong length on rank 1 only
    else:
        bias = c[s:e]
    if what == "small_group":  # ranks 0, 1 of a 3-way split form the group; the vocabulary has V rows
        group = dist.new_group([0, 1])
        vocab_size = V
    if what == "cg_impl":  # the caller's CG cannot run on the sharded [a, b] (lora mode)
        from rosa_ext.cg import cg_python
        kw.update(solver="cg", cg_impl=cg_python)
    if what == "dtensor_group":  # a DTensor over every rank, but a process group of rank 0 only
        from torch.distributed.tensor import Shard, distribute_tensor
        group = dist.new_group([0])
        Wd = distribute_tensor(W, ctx.mesh, [Shard(0)])
        return expect_error(lambda: rosa_update(H, Wd, y, r, mode="hidden", process_group=group))
    return expect_error(lambda: rosa_update(H, W[s:e], y, r, bias=bias, lora_b=b[:, s:e], vocab_start=s,
                                            vocab_size=vocab_size, process_group=group, **kw))


def after_bad(ctx: Ctx) -> Dict[str, Any]:
    """A good call after the bad ones: the group is still in step."""
    return match(ctx, "lora", "cg")


def session(ctx: Ctx, mode: str, output: str = "replicate") -> Dict[str, Any]:
    """attach() on a tiny model whose lm_head is ColwiseParallel, against an unsharded copy."""
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        return dict(skip=f"transformers is not installed ({e})")
    from torch.distributed.tensor import Replicate, Shard
    from torch.distributed.tensor.parallel import ColwiseParallel, parallelize_module

    import rosa_ext
    from rosa_ext.integrations.models import tiny_causal_lm
    V = 61
    from rosa_ext.common import defaults
    from rosa_ext.reference import rosa_update_reference
    # untied heads (lm_head.weight is not the embedding matrix), the embeddings made clearly different
    ref = tiny_causal_lm("qwen2", tied=False, vocab_size=V, hidden_size=16, num_layers=1, dtype=F64)
    tp = tiny_causal_lm("qwen2", tied=False, vocab_size=V, hidden_size=16, num_layers=1, dtype=F64)
    with torch.no_grad():
        for m in (ref, tp):
            m.get_input_embeddings().weight.mul_(-3.0)
    emb0, head0 = ref.get_input_embeddings().weight.clone(), ref.lm_head.weight.clone()
    layout = Replicate() if output == "replicate" else Shard(-1)
    parallelize_module(tp, ctx.mesh, {"lm_head": ColwiseParallel(output_layouts=layout)})
    ids = torch.randint(0, V, (1, 14), generator=torch.Generator().manual_seed(3))
    base = tp(ids).logits
    s_ref, s_tp = rosa_ext.attach(ref, mode=mode), rosa_ext.attach(tp, mode=mode)
    with torch.no_grad():  # the first step, by the float64 reference on lm_head's weight and on the embeddings
        h = ref.model(ids).last_hidden_state[0, 5:-1]
    kw = dict(mode=mode, beta=defaults.BETA, damping=defaults.DAMPING, damping_mode=defaults.DAMPING_MODE)
    if mode == "lora":
        kw.update(lora_a=s_ref.a.clone(), lora_b=s_ref.b.clone(), lora_scale=s_ref.lora_scale)
    want = rosa_update_reference(h, head0, ids[0, 6:], -1.0, **kw).update
    wrong = rosa_update_reference(h, emb0, ids[0, 6:], -1.0, **kw).update
    s_ref.update(ids, reward=-1.0, response_start=6)
    s_tp.update(ids, reward=-1.0, response_start=6)
    lo = s_tp.state_dict()["vocab_start"]
    if mode == "lora":  # this rank's rows of b, and a, against the reference step
        d, n = s_tp.a.numel(), s_tp.b.numel()
        got, exp = torch.cat([s_tp.a - kw["lora_a"], s_tp.b]), torch.cat([want[:d], want[d + lo: d + lo + n]])
    else:
        got, exp = s_tp.delta, want
    first = dict(err_first_step_vs_lm_head=_maxerr(got, exp), first_step_gap_to_embedding=_maxerr(wrong, want),
                 first_step_scale=float(want.abs().max()))
    s_ref.update(ids, reward=1.0, response_start=6)
    handle = s_tp.update(ids, reward=1.0, response_start=6, non_blocking=True)  # the collectives run in the worker thread
    l_ref = ref(ids).logits
    l_tp = tp(ids).logits  # waits for the background update
    handle.wait()
    sd = s_tp.state_dict()
    start, rows = sd["vocab_start"], sd["vocab_rows"]
    cols = slice(None) if output == "replicate" else slice(start, start + rows)
    out = dict(err_logits=_maxerr(l_tp, l_ref[..., cols]), logits_width=int(l_tp.shape[-1]), rows=[start, rows],
               vocab_size=sd["vocab_size"], num_updates=s_tp.num_updates, **first,
               embeddings_unchanged=bool(torch.equal(tp.get_input_embeddings().weight, emb0)),
               head_rows_unchanged=bool(torch.equal(tp.lm_head.weight.to_local(), head0[start:start + rows])))
    if mode == "lora":
        out["err_a"] = _maxerr(s_tp.a, s_ref.a)
        out["err_b"] = _maxerr(s_tp.b, s_ref.b[start:start + rows])
        out["state_b"] = list(sd["b"].shape)
        out["a_same_on_all_ranks"] = _gather_equal(s_tp.a)
    else:
        out["err_delta"] = _maxerr(s_tp.delta, s_ref.delta)
        out["delta_same_on_all_ranks"] = _gather_equal(s_tp.delta)
    if output == "replicate":
        g_ref = ref.generate(ids[:, :6], max_new_tokens=4, do_sample=False)
        g_tp = tp.generate(ids[:, :6], max_new_tokens=4, do_sample=False)
        out["generate_equal"] = bool(torch.equal(g_ref, g_tp))
    s_tp.reset()
    out["reset_bitwise"] = bool(torch.equal(tp(ids).logits, base))
    s_tp.load_state_dict(sd)
    out["reload_err"] = _maxerr(tp(ids).logits, l_tp)
    s_tp.detach()
    out["detach_bitwise"] = bool(torch.equal(tp(ids).logits, base))
    return out


def parallel_body(ctx: Ctx) -> Dict[str, Any]:
    """A model whose body is tensor-parallel too: synchronous updates work, background ones are
    refused (the body's collectives and the update's would interleave across threads)."""
    try:
        import transformers  # noqa: F401
    except ImportError as e:
        return dict(skip=f"transformers is not installed ({e})")
    from torch.distributed.tensor import Replicate
    from torch.distributed.tensor.parallel import ColwiseParallel, RowwiseParallel, parallelize_module

    import rosa_ext
    from rosa_ext.integrations.models import tiny_causal_lm
    V = 61
    ref = tiny_causal_lm("qwen2", vocab_size=V, hidden_size=16, num_layers=1, dtype=F64)
    tp = tiny_causal_lm("qwen2", vocab_size=V, hidden_size=16, num_layers=1, dtype=F64)
    parallelize_module(tp, ctx.mesh, {"lm_head": ColwiseParallel(output_layouts=Replicate()),
                                      "model.layers.0.mlp.up_proj": ColwiseParallel(),
                                      "model.layers.0.mlp.gate_proj": ColwiseParallel(),
                                      "model.layers.0.mlp.down_proj": RowwiseParallel()})
    ids = torch.randint(0, V, (1, 14), generator=torch.Generator().manual_seed(4))
    s_ref, s_tp = rosa_ext.attach(ref, mode="lora"), rosa_ext.attach(tp, mode="lora")
    s_ref.update(ids, reward=-1.0, response_start=6)
    s_tp.update(ids, reward=-1.0, response_start=6)
    out = dict(err_logits=_maxerr(tp(ids).logits, ref(ids).logits))
    out.update(expect_error(lambda: s_tp.update(ids, reward=1.0, response_start=6, non_blocking=True)))
    out["num_updates"] = s_tp.num_updates
    s_tp.detach()
    return out


def suite(name: str, ctx: Ctx) -> Dict[str, Callable[[], Dict[str, Any]]]:
    """The cases of ``name``: parts joined by "+" (``core``, ``dtensor``, ``session``, ``gpu``)."""
    parts = set(name.split("+"))
    cases: Dict[str, Callable[[], Dict[str, Any]]] = {}
    if parts & {"core", "gpu"}:
        dtypes = [F64] if "gpu" not in parts else [F64, torch.float32]
        for dt in dtypes:
            tag = "" if dt == F64 else "/fp32"
            for mode in ("lora", "hidden"):
                for solver in ("dual", "cg"):
                    cases[f"match/{mode}/{solver}/batched{tag}"] = (
                        lambda m=mode, s=solver, dt=dt: match(ctx, m, s, dtype=dt))
    if "core" in parts:
        cases["match/lora/cg/single-peft-shapes"] = lambda: match(ctx, "lora", "cg", batched=False, peft_shapes=True,
                                                                  bias=False, max_iter=16)
        cases["match/hidden/dual/lora-term"] = lambda: match(ctx, "hidden", "dual", lora_term=True)
        cases["match/hidden/cg/lora-term"] = lambda: match(ctx, "hidden", "cg", lora_term=True, batched=False)
        cases["match/lora/auto"] = lambda: match(ctx, "lora", "auto")
        cases["match/hidden/cg/fp32"] = lambda: match(ctx, "hidden", "cg", dtype=torch.float32)
        for mode in ("lora", "hidden"):  # relative damping (MATH.md section 6): the ridge from the whole J
            for solver in ("dual", "cg"):
                cases[f"match/{mode}/{solver}/relative"] = (
                    lambda m=mode, s=solver: match(ctx, m, s, damping_mode="relative"))
        for mode in ("lora", "hidden"):  # confident tokens (hardening round 3): fp32 against the float64 reference
            for solver in ("dual", "cg"):
                for gp in (60.0, 100.0):
                    cases[f"confident/{mode}/{solver}/{gp:g}"] = (
                        lambda m=mode, s=solver, gp=gp: gap_case(ctx, m, s, gp))
        for w in ["gap", "overlap", "target", "vocab_size", "not_replicated", "one_rank", "cg_impl", "small_group"]:
            if w != "small_group" or ctx.world == 3:
                cases[f"bad/{w}"] = lambda w=w: bad(ctx, w)
    if "dtensor" in parts:
        cases["dtensor/lora/dual"] = lambda: match(ctx, "lora", "dual", dtensor=True)
        cases["dtensor/hidden/cg"] = lambda: match(ctx, "hidden", "cg", dtensor=True)
        cases["bad/dtensor_group"] = lambda: bad(ctx, "dtensor_group")
    if "core" in parts or "dtensor" in parts:
        cases["after_bad"] = lambda: after_bad(ctx)
    if "errors" in parts:
        for what, who in ERROR_CASES:
            if who == "all" or ctx.world > 1:
                cases[f"error/{what}/{who}"] = lambda w=what, k=who: error_case(ctx, w, k)
        cases["after_errors"] = lambda: after_bad(ctx)
    if "session" in parts:
        cases["session/lora"] = lambda: session(ctx, "lora")
        cases["session/hidden"] = lambda: session(ctx, "hidden")
        cases["session/lora/sharded-logits"] = lambda: session(ctx, "lora", output="shard")
        cases["session/parallel-body"] = lambda: parallel_body(ctx)
    return cases


def main() -> None:
    name, store, out_dir, backend = sys.argv[1:5]
    rank, world = int(os.environ["RANK"]), int(os.environ["WORLD_SIZE"])
    torch.set_num_threads(1)
    if backend == "nccl" or name == "gpu":
        device = torch.device("cuda", rank % torch.cuda.device_count())
        torch.cuda.set_device(device)
    else:
        device = torch.device("cpu")
    dist.init_process_group(backend, init_method=f"file://{store}", rank=rank, world_size=world,
                            timeout=datetime.timedelta(seconds=30))
    ctx = Ctx(rank, world, device)
    path = pathlib.Path(out_dir) / f"rank{rank}.json"
    results: Dict[str, Any] = {}
    results["_startup_s"] = time.time() - T0  # process start to the first case
    for case, fn in suite(name, ctx).items():
        t = time.time()
        try:
            results[case] = fn()
        except Exception as e:
            results[case] = dict(error=f"{type(e).__name__}: {e}", traceback=traceback.format_exc()[-2000:])
        results[case]["seconds"] = time.time() - t
        path.write_text(json.dumps(results))
    dist.destroy_process_group()


if __name__ == "__main__":
    main()
