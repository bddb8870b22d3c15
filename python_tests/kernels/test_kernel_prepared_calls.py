"""``prob=`` calls of rosa_ext.kernels with the model arguments omitted, and targets edited in place
after ``prepare`` (hardening round 2). Small problems, Triton interpreter on the CPU.

Before: ``row_reduce(None, None, lse, u, prob=prob)`` and ``jvp(None, None, None, v, mode="hidden",
prob=prob)`` rejected a correctly shaped vector as "must be (-1,)" (its width was read off the omitted
``weight``), where ``column_reduce`` / ``vjp`` accepted the same call; and targets edited past V after
``prepare`` made ``stats(..., prob=prob)`` raise a raw IndexError from an out-of-bounds read (on CUDA a
device-side assert). Now the widths come from ``prob``, and a target outside [0, V) reads nothing:
its log p is NaN (README "Errors": a ``prob=`` call checks no values and reads nothing out of bounds).
"""
import pytest
import torch

pytest.importorskip("triton")

import rosa_ext.kernels as K  # noqa: E402
from rosa_ext import RosaError  # noqa: E402

TOL = 3e-5


def _problem(seed=0, T=5, d=6, V=11, lora=True, B=2):
    g = torch.Generator().manual_seed(seed)
    h, W = torch.randn(T, d, generator=g), torch.randn(V, d, generator=g) / d ** 0.5
    y = torch.randint(0, V, (T,), generator=g)
    seg = torch.tensor([0] * (T - 2) + [1] * 2) if B == 2 else None
    kw = dict(seg=seg)
    if lora:
        kw.update(lora_a=torch.randn(B, d, generator=g) / d ** 0.5, lora_b=torch.randn(B, V, generator=g) * 0.2)
    return h, W, y, kw


def _close(a, b):
    torch.testing.assert_close(a.double(), b.double(), rtol=TOL, atol=TOL)


@pytest.mark.parametrize("rows", [1, 2])
def test_model_arguments_may_be_omitted_in_every_function(rows):
    h, W, y, kw = _problem()
    prob = K.prepare(h, W, y, **kw)
    st = K.stats(None, None, None, prob=prob)
    _close(st.lse, K.stats(h, W, y, **kw).lse)
    V_, d = W.shape
    u = torch.randn(rows, V_) if rows == 2 else torch.randn(V_)
    _close(K.row_reduce(None, None, st.lse, u, prob=prob), K.row_reduce(h, W, st.lse, u, **kw))
    w = torch.randn(h.shape[0])
    _close(K.column_reduce(None, None, st.lse, w, prob=prob), K.column_reduce(h, W, st.lse, w, **kw))
    for mode, P in (("hidden", d), ("lora", d + V_)):
        v = torch.randn(rows, P) if rows == 2 else torch.randn(P)
        _close(K.jvp(None, None, None, v, mode=mode, prob=prob), K.jvp(h, W, y, v, mode=mode, **kw))
        _close(K.vjp(None, None, None, w, mode=mode, prob=prob), K.vjp(h, W, y, w, mode=mode, **kw))


def test_omitted_model_arguments_still_check_the_vector_width():
    h, W, y, kw = _problem()
    prob = K.prepare(h, W, y, **kw)
    st = K.stats(None, None, None, prob=prob)
    with pytest.raises(RosaError) as info:
        K.row_reduce(None, None, st.lse, torch.zeros(W.shape[0] + 1), prob=prob)
    assert info.value.argument == "u" and f"({W.shape[0]},)" in str(info.value)
    with pytest.raises(RosaError) as info:
        K.jvp(None, None, None, torch.zeros(W.shape[1] + 1), mode="hidden", prob=prob)
    assert info.value.argument == "v" and f"({W.shape[1]},)" in str(info.value)


@pytest.mark.parametrize("lora", [False, True])
@pytest.mark.parametrize("bad", [11, 10 ** 9, -1])
def test_targets_edited_out_of_range_after_prepare_read_nothing(lora, bad):
    """A target moved outside [0, V) after prepare: no IndexError, no out-of-bounds read; that token's
    log p is NaN, every other token's is unchanged; jvp/vjp run and give NaN only where it enters."""
    h, W, y, kw = _problem(lora=lora)
    prob = K.prepare(h, W, y, **kw)
    before = K.stats(None, None, None, prob=prob)
    y[1] = bad  # in place: the prepared problem holds this very tensor
    st = K.stats(h, W, y, prob=prob)
    assert torch.isnan(st.logp[1])
    keep = torch.arange(y.shape[0]) != 1
    assert torch.equal(st.logp[keep], before.logp[keep]) and torch.equal(st.lse, before.lse)
    u = K.jvp(None, None, None, torch.randn(W.shape[1]), mode="hidden", st=st, prob=prob)
    assert torch.isnan(u[1]) and torch.isfinite(u[keep]).all()
    K.vjp(None, None, None, torch.ones(y.shape[0]), mode="hidden", st=st, prob=prob)  # runs (NaN where it enters)


def test_an_engine_shared_by_two_threads_never_pairs_one_problem_with_anothers_cache():
    """Two users' problems through ONE Triton engine from two threads: the per-problem caches (the device
    index, h in the compute dtype and a . h) are one (problem, value) pair each, so a thread never gets the
    other problem's tensors, however the calls interleave."""
    import threading

    from rosa_ext.backends.triton_engine import TritonEngine
    from rosa_ext.core.op import pack
    eng = TritonEngine()
    probs = []
    for seed, T in ((0, 5), (1, 9)):
        g = torch.Generator().manual_seed(seed)
        prob, _ = pack(torch.randn(T, 6, generator=g), torch.randn(11, 6, generator=g), torch.randint(0, 11, (T,), generator=g),
                       1.0, mode="lora", lora_a=torch.randn(6, generator=g), lora_b=torch.randn(11, generator=g))
        probs.append(prob)
    bad = []

    def user(prob):
        for _ in range(2000):
            h, ah = eng.hidden_and_ah(prob)
            seg, off = eng.index(prob)
            if h.data_ptr() != prob.hidden.data_ptr() and not torch.equal(h, prob.hidden.float()):
                bad.append("h")
            if ah.shape[0] != prob.num_tokens or seg.shape[0] != prob.num_tokens or int(off[-1]) != prob.num_tokens:
                bad.append("shape")
    import sys
    interval = sys.getswitchinterval()
    sys.setswitchinterval(1e-6)  # switch threads as often as the interpreter allows
    try:
        threads = [threading.Thread(target=user, args=(p,)) for p in probs]
        for t in threads:
            t.start()
        for t in threads:
            t.join()
    finally:
        sys.setswitchinterval(interval)
    assert not bad, bad[:5]
