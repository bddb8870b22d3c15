"""The launch / sync counter of ``benchmarks/count_launches.py`` counts right: a known sequence of torch ops
(launches, views, allocations, host tensors, syncs, host-to-device copies), one Triton launch (the
interpreter's own work inside not counted), the emulated compiled CUDA CG (its launches, its one sync, the
same solution as the Python CG), and one real ``rosa_update`` call end to end (tiny, under the interpreter).
"""
import pathlib
import sys

import pytest
import torch

BENCHMARKS = pathlib.Path(__file__).resolve().parents[2] / "benchmarks"
if str(BENCHMARKS) not in sys.path:
    sys.path.insert(0, str(BENCHMARKS))

import count_launches as CL  # noqa: E402

HERE = str(pathlib.Path(__file__).resolve().parent)


def _known_ops(x):
    y = x * 2                                   # torch: mul
    y.view(2, 2)                                # free: a view
    s = y.sum()                                 # torch: sum
    float(s)                                    # sync: _local_scalar_dense
    y.tolist()                                  # sync: tolist
    h = torch.tensor([1.0, 2.0])                # host tensor (no device): host lift_fresh
    hh = h * 3                                  # host: mul on host tensors
    hh.tolist()                                 # a host read: no sync
    torch.tensor([1.0, 2.0], device=x.device)   # h2d: Python data to the device
    hh.to(x.device)                             # h2d: a host tensor to the device
    y[y > 0]                                    # torch: gt, index (+ sync: a boolean mask)
    torch.empty(3, device=x.device)             # free: an allocation
    torch.zeros(3, device=x.device)             # torch: zeros (a fill)
    y[[0, 2]]                                   # torch: index (+ h2d: the list becomes an index tensor)
    torch.cuda.synchronize()                    # sync


def test_counts_a_known_sequence():
    pytest.importorskip("triton")
    from triton.runtime.jit import KernelInterface
    real_getitem, real_sync = KernelInterface.__getitem__, torch.cuda.synchronize
    x = torch.arange(4.0)
    with CL.LaunchCounter(roots=[HERE], emulate_cuda=False) as c:
        _known_ops(x)
    s = c.counts.summary()
    assert (s["torch"], s["triton"], s["compiled"], s["launches"]) == (6, 0, 0, 6), c.counts.events
    assert (s["sync"], s["h2d"], s["host"]) == (4, 3, 2), c.counts.events
    assert s["free"] >= 2  # the view and the allocation (and the aliases of lift_fresh)
    names = sorted(e.name for e in c.counts.events if e.kind == "torch")
    assert names == ["aten.gt", "aten.index", "aten.index", "aten.mul", "aten.sum", "aten.zeros"]
    assert c.counts.top("function") == [("test_count_launches.py:_known_ops", 6)]
    sync_names = sorted(e.name for e in c.counts.events if e.kind == "sync")
    assert sync_names == ["Tensor.tolist", "aten._local_scalar_dense", "aten.index (boolean mask / no output_size)",
                          "torch.cuda.synchronize"]
    # outside the counter nothing is counted, and the patches are gone
    n = len(c.counts.events)
    assert float((x * 2).sum()) == 12.0 and len(c.counts.events) == n
    from triton.runtime.jit import KernelInterface
    assert KernelInterface.__getitem__ is real_getitem and torch.cuda.synchronize is real_sync


def test_uncounted_external_and_notes():
    x = torch.ones(3)
    with CL.LaunchCounter(roots=[HERE], emulate_cuda=False) as c:
        with c.uncounted():
            float((x + 1).sum())
        c.external("compiled thing", 3)
        c.note("a branch")
        x.exp()
    s = c.counts.summary()
    assert (s["compiled"], s["torch"], s["sync"], s["launches"]) == (3, 1, 0, 4)
    assert c.counts.notes == {"a branch": 1}


def test_a_mixed_dtype_cat_counts_a_copy_per_input():
    """CUDA's cat copies inputs of another dtype than the result one by one; one batched kernel otherwise."""
    f, i = torch.ones(2), torch.arange(3)
    for emulate, mixed_launches in ((True, 2), (False, 1)):
        with CL.LaunchCounter(roots=[HERE], emulate_cuda=emulate) as c:
            torch.cat([f, i])
        assert c.counts.summary()["torch"] == mixed_launches
    with CL.LaunchCounter(roots=[HERE], emulate_cuda=True) as c:
        torch.cat([f, f, f])
    assert c.counts.summary()["torch"] == 1


@pytest.mark.triton_interp
def test_counts_one_triton_launch_not_its_inside():
    triton = pytest.importorskip("triton")
    import triton.language as tl

    from rosa_ext.kernels import _tiles
    if not _tiles.INTERPRET:
        pytest.skip("the Triton interpreter is not active (a GPU machine)")

    @triton.jit
    def _add_one(x_ptr, n, BLOCK: tl.constexpr):
        offs = tl.arange(0, BLOCK)
        m = offs < n
        tl.store(x_ptr + offs, tl.load(x_ptr + offs, mask=m) + 1.0, mask=m)

    x = torch.zeros(5)
    with CL.LaunchCounter(roots=[HERE], emulate_cuda=False) as c:
        _add_one[(1,)](x, 5, BLOCK=8)
    assert x.tolist() == [1.0] * 5
    assert [(e.kind, e.name) for e in c.counts.events] == [("triton", "triton _add_one")]


def test_emulated_cuda_cg_launches_and_solution():
    g = torch.Generator().manual_seed(0)
    M = torch.randn(6, 6, generator=g, dtype=torch.float64)
    A = M @ M.T + torch.eye(6, dtype=torch.float64)
    b = torch.randn(6, generator=g, dtype=torch.float64)
    from rosa_ext.cg import cg_python
    with CL.LaunchCounter(roots=[HERE], emulate_cuda=False) as c:
        res = CL.emulated_cuda_cg(c)(lambda v: A @ v, b, damping=0.5, max_iter=10, tol=1e-12)
    want = torch.linalg.solve(A + 0.5 * torch.eye(6, dtype=torch.float64), b)
    torch.testing.assert_close(res.x, want, rtol=1e-9, atol=1e-9)
    torch.testing.assert_close(res.x, cg_python(lambda v: A @ v, b, damping=0.5, max_iter=10, tol=1e-12).x)
    ev = c.counts.events
    assert sum(e.name == "_C.cg_cuda_init" for e in ev) == 3
    assert sum(e.name == "_C.cg_cuda_step" for e in ev) == 4 * 10  # max_iter steps: no early exit on the host
    assert sum(e.name == "aten.mv" for e in ev) == 10  # the matvec, every iteration
    assert [e.name for e in ev if e.kind == "sync"] == ["Tensor.tolist"]  # finish_cuda's one read
    assert int(res.iterations) <= 6


@pytest.mark.triton_interp
def test_a_real_update_is_counted():
    """The default hidden-mode call on the Triton engine, tiny: its four Triton kernels (the probability
    tiles, which compute the row statistics themselves: no stats kernel; the combine of their partials;
    r̂ W over the tiles; the linearisation), under 60 launches in all, ONE host sync (the acceptance read,
    which also reads the inputs' value checks) and no blocking host-to-device copy (the rewards go
    non_blocking), attributed to rosa_ext sites."""
    from rosa_ext.kernels import _tiles
    if not _tiles.INTERPRET:
        pytest.skip("the Triton interpreter is not active (a GPU machine)")
    counts, info = CL.run_case("hidden dual", CL.make_inputs(T=4, d=8, V=64, dtype=torch.bfloat16))
    assert info["solver"] == "dual" and info["backend"] == "triton"
    s = counts.summary()
    assert s["triton"] == 4 and 0 < s["launches"] < 60 and s["syncs"] == 1 and s["h2d"] == 0, s
    syncs = [e.site for e in counts.events if e.kind == "sync"]
    assert syncs[0].startswith("rosa_ext/common/validation.py:") and syncs[0].endswith(" read_host"), syncs
    names = [e.name for e in counts.events if e.kind == "triton"]
    assert names == ["triton _prob_tile_kernel", "triton _combine_kernel", "triton _tile_weight_kernel",
                     "triton _linearize_kernel"], names
    assert all(e.site.startswith("rosa_ext/") for e in counts.events if e.kind in ("torch", "triton", "sync"))
    text = CL.report("hidden dual", counts, info)
    assert "launches by plan / op statement" in text and "sync sites" in text


@pytest.mark.triton_interp
def test_the_lora_dual_syncs_once():
    """The default LoRA-mode call (the dual) on the Triton engine: its six Triton kernels (the tiles, the
    combine, the Gram's partial sums and finish, the linearisation with the LoRA factors, the centred VJP),
    under 60 launches in all, one host sync, no blocking host-to-device copy."""
    from rosa_ext.kernels import _tiles
    if not _tiles.INTERPRET:
        pytest.skip("the Triton interpreter is not active (a GPU machine)")
    counts, info = CL.run_case("LoRA dual", CL.make_inputs(T=4, d=8, V=64, dtype=torch.bfloat16))
    assert info["solver"] == "dual" and info["backend"] == "triton"
    s = counts.summary()
    assert s["syncs"] == 1 and s["h2d"] == 0 and s["launches"] < 60, s
    names = [e.name for e in counts.events if e.kind == "triton"]
    assert names == ["triton _prob_tile_kernel", "triton _combine_kernel", "triton _gram_partial_kernel",
                     "triton _gram_finish_kernel", "triton _linearize_kernel", "triton _tile_vjp_kernel"], names


@pytest.mark.triton_interp
def test_the_hidden_dual_stays_under_60_in_token_blocks(monkeypatch):
    """Hidden mode over its tile cap (the cap scaled down: 48 tokens at 8 tokens' tiles): the blocks grow to
    keep to HIDDEN_MAX_BLOCKS (3), each block three launches (tiles, combine into the pass's table, r̂ W) and
    no copies -- under 60 launches and one host sync in all."""
    from rosa_ext.backends import tile_blocks as TB
    from rosa_ext.kernels import _tiles
    if not _tiles.INTERPRET:
        pytest.skip("the Triton interpreter is not active (a GPU machine)")
    monkeypatch.setattr(TB, "HIDDEN_TILE_BYTES", 8 * 64 * 4)
    counts, _ = CL.run_case("hidden dual", CL.make_inputs(T=48, d=8, V=64, dtype=torch.bfloat16))
    s = counts.summary()
    names = [e.name for e in counts.events if e.kind == "triton"]
    assert names.count("triton _prob_tile_kernel") == 3 and names.count("triton _tile_weight_kernel") == 3, names
    assert s["syncs"] == 1 and s["h2d"] == 0 and s["launches"] < 60, s


@pytest.mark.triton_interp
@pytest.mark.parametrize("mode", ["hidden", "lora"])
def test_a_batch_of_conversations_syncs_once(mode):
    """Two conversations in one call (batched (B, T, .) inputs, a float reward): still one host sync and no
    blocking copy (the conversation ids are built on the host and sent non_blocking; a device
    ``repeat_interleave`` would read its output size back). The T x T algebra runs on a batch of the
    conversations (rosa_ext.plans.dense.Padding; equal lengths: views), so the launches are those of one
    conversation and a few more (hidden: none; LoRA: the batched checks, the shared LoRA row expanded per
    conversation, J^T alpha copied into the update: 62 at B = 2 or 4, 58 at B = 1)."""
    from rosa_ext import rosa_update
    from rosa_ext.kernels import _tiles
    if not _tiles.INTERPRET:
        pytest.skip("the Triton interpreter is not active (a GPU machine)")
    inp = CL.make_inputs(T=8, d=8, V=64, dtype=torch.bfloat16)
    kw = dict(mode=mode, backend="triton", solver="dual")
    if mode == "lora":
        kw.update(lora_a=inp["lora_a"], lora_b=inp["lora_b"])
    args = (inp["hidden"].view(2, 4, 8), inp["weight"], inp["targets"].view(2, 4), -1.0)
    counts, step = CL.count_call(lambda: rosa_update(*args, **kw))
    s = counts.summary()
    assert step.update.shape[0] == 2 and s["syncs"] == 1 and s["h2d"] == 0, s
    assert s["launches"] < (60 if mode == "hidden" else 65), s


@pytest.mark.triton_interp
@pytest.mark.parametrize("mode", ["hidden", "lora"])
def test_a_device_mask_is_read_once(mode):
    """A ragged batch given by a ``mask`` on the device: the mask decides the problem's shapes, so it is read
    once (one sync more than the acceptance read; the selected rows are then gathered by an index sent
    non_blocking, not by boolean indexing, which would read a count back per tensor)."""
    from rosa_ext import rosa_update
    from rosa_ext.kernels import _tiles
    if not _tiles.INTERPRET:
        pytest.skip("the Triton interpreter is not active (a GPU machine)")
    inp = CL.make_inputs(T=12, d=8, V=64, dtype=torch.bfloat16)
    mask = torch.tensor([[True] * 4, [True] * 3 + [False], [True, True, False, False]])
    kw = dict(mode=mode, backend="triton", solver="dual", mask=mask)
    if mode == "lora":
        kw.update(lora_a=inp["lora_a"], lora_b=inp["lora_b"])
    args = (inp["hidden"].view(3, 4, 8), inp["weight"], inp["targets"].view(3, 4), -1.0)
    counts, _ = CL.count_call(lambda: rosa_update(*args, **kw))
    s = counts.summary()
    syncs = [e.site for e in counts.events if e.kind == "sync"]
    assert s["syncs"] == 2 and s["h2d"] == 0 and "_selected" in syncs[0], syncs


@pytest.mark.triton_interp
def test_two_padded_groups_copy_nothing_blocking():
    """Groups that are not the whole batch pick their conversations' rows with an index sent non_blocking (a list
    index would be a blocking host-to-device copy): lengths 9, 1, 2, 8 in one call, both modes."""
    from rosa_ext import rosa_update
    from rosa_ext.kernels import _tiles
    if not _tiles.INTERPRET:
        pytest.skip("the Triton interpreter is not active (a GPU machine)")
    inp = CL.make_inputs(T=36, d=8, V=64, dtype=torch.bfloat16)
    mask = torch.zeros(4, 9, dtype=torch.bool)
    for b, n in enumerate([9, 1, 2, 8]):
        mask[b, :n] = True
    for mode, d in (("lora", 8), ("hidden", 4)):
        kw = dict(mode=mode, backend="triton", solver="dual", mask=mask)
        h = inp["hidden"].view(4, 9, 8)[..., :d]
        W = inp["weight"][:, :d]
        if mode == "lora":
            kw.update(lora_a=inp["lora_a"], lora_b=inp["lora_b"])
        args = (h, W, inp["targets"].view(4, 9), -1.0)
        s = CL.count_call(lambda a=args, k=kw: rosa_update(*a, **k))[0].summary()
        assert s["h2d"] == 0 and s["syncs"] == 2, (mode, s)  # the mask's read and the acceptance read
