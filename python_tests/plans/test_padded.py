"""The dual's batched T x T algebra (rosa_ext.plans.dense: Padding, dual_checks): the padded layout, the batched Cholesky and
checks against the per-conversation ones, and whole LoRA updates of ragged batches against each
conversation solved alone (torch and Triton engines)."""
import os

os.environ.setdefault("TRITON_INTERPRET", "1")

import pytest  # noqa: E402
import torch  # noqa: E402
from _helpers import make_inputs  # noqa: E402

from rosa_ext import rosa_update  # noqa: E402
from rosa_ext.core.op import pack  # noqa: E402
from rosa_ext.plans import dense  # noqa: E402

pytestmark = pytest.mark.usefixtures("one_torch_thread")


def _layout(lengths):
    g = torch.Generator().manual_seed(0)
    B, T = len(lengths), max(lengths)
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate(lengths):
        mask[b, :n] = True
    prob, _ = pack(torch.randn(B, T, 4, generator=g, dtype=torch.float64), torch.randn(7, 4, dtype=torch.float64),
                   torch.randint(0, 7, (B, T), generator=g), 1.0, mode="hidden", mask=mask)
    return prob, dense.Padding(prob)


def _each_alone(h, W, y, reward, mask, kw, **lora):
    """One call over the masked batch equals one call per conversation (its own tokens, reward and LoRA rows)."""
    step = rosa_update(h, W, y, reward, mask=mask, **lora, **kw)
    for b in range(h.shape[0]):
        n = int(mask[b].sum())
        own = {k: v[b] for k, v in lora.items()}
        one = rosa_update(h[b, :n], W, y[b, :n], float(reward[b]), **own, **kw)
        torch.testing.assert_close(step.update[b], one.update.reshape(-1), rtol=2e-4, atol=1e-6)


@pytest.mark.parametrize("lengths", [[3], [4, 4], [2, 5, 1]])
def test_pad_unpad_and_token_means(lengths):
    prob, lay = _layout(lengths)
    x = torch.arange(prob.num_tokens * 2, dtype=torch.float64).view(-1, 2)
    p = lay.pad(x)
    assert p.shape == (len(lengths), max(lengths), 2) and torch.equal(lay.unpad(p), x)
    for b, (lo, hi) in enumerate(zip(prob.offsets[:-1], prob.offsets[1:])):
        assert torch.equal(p[b, :hi - lo], x[lo:hi]) and (p[b, hi - lo:] == 0).all()
    assert lay.equal == (len(set(lengths)) == 1)
    m = lay.token_mean(p[..., 0])
    want = torch.stack([x[lo:hi, 0].mean() for lo, hi in zip(prob.offsets[:-1], prob.offsets[1:])])
    torch.testing.assert_close(m, want, rtol=1e-15, atol=0)


def test_batched_factor_and_checks_equal_each_conversation():
    """Padded systems (decoupled padding, its diagonal the first entry): the solution, the factor's min / max
    diagonal and the residual facts of each conversation are those of its own unpadded system."""
    lengths = [2, 5, 1]
    prob, lay = _layout(lengths)
    g = torch.Generator().manual_seed(1)
    mats, rhs = [], []
    for n in lengths:
        J = torch.randn(n, 8, generator=g, dtype=torch.float64)  # full row rank: no cancellation in the factor
        mats.append(J @ J.T)
        rhs.append(torch.randn(n, generator=g, dtype=torch.float64))
    lam = torch.tensor([0.1, 1e-3, 2.0], dtype=torch.float64)
    A = lay.pad_matrices(mats)
    gb = lay.pad(torch.cat(rhs))
    lay.fill_pad_diagonal(A)
    x, fac = dense.factor_solve(A, gb, lam)
    facts = dense.dual_checks(A, gb, x, lam, fac)
    for b, n in enumerate(lengths):
        want, wf = dense.factor_solve(mats[b].clone(), rhs[b], lam[b])
        torch.testing.assert_close(x[b, :n], want, rtol=1e-12, atol=1e-14)
        assert (x[b, n:] == 0).all()
        for got, w in zip((fac.info[b], fac.diag_min[b], fac.diag_max[b]), wf):
            torch.testing.assert_close(got, w, rtol=1e-14, atol=0)
        one = dense.dual_check(mats[b], rhs[b], want, lam[b], wf)
        torch.testing.assert_close(facts[b].den, one.den, rtol=1e-12, atol=0)
        assert float(facts[b].num) <= 1e-24 * float(one.den) and float(one.num) <= 1e-24 * float(one.den)  # rounding
        assert float(facts[b].system[1]) == float(one.system[1])


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_ragged_lora_batch_equals_each_conversation_alone(backend):
    """One call over three conversations of 2, 7 and 4 tokens equals three calls of one conversation each."""
    B, T, d, V = 3, 7, 8, 40
    inp = make_inputs(T=T, d=d, V=V, mode="lora", B=B, seed=4)
    g = torch.Generator().manual_seed(5)
    a = torch.randn(B, d, generator=g) / d ** 0.5
    bvec = torch.randn(B, V, generator=g) * 0.3
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 2:] = False
    mask[2, 4:] = False
    h, W, y = inp["hidden"].float(), inp["weight"].float(), inp["targets"]
    reward = torch.tensor([-1.0, 1.0, 0.5])
    kw = dict(mode="lora", backend=backend, solver="dual", lora_scale=2.0)
    _each_alone(h, W, y, reward, mask, kw, lora_a=a, lora_b=bvec)


def test_a_subset_of_conversations():
    """``convs``: the padded batch of some conversations only, their rows in order; ``select`` their rows of a
    per-conversation tensor."""
    prob, _ = _layout([2, 5, 1, 3])
    lay = dense.Padding(prob, [1, 3])
    x = torch.arange(prob.num_tokens, dtype=torch.float64)
    p = lay.pad(x)
    assert p.tolist() == [[2, 3, 4, 5, 6], [8, 9, 10, 0, 0]] and not lay.view
    assert lay.unpad(p).tolist() == [2, 3, 4, 5, 6, 8, 9, 10]
    assert lay.select(torch.tensor([10, 11, 12, 13])).tolist() == [11, 13]


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_hidden_batch_of_short_and_long_conversations_equals_each_alone(backend):
    """Hidden mode, d = 4: conversations of 2 and 3 tokens (the dual batch) and of 6 and 7 (the primal batch)
    in one call equal four calls of one conversation each."""
    B, T, d, V = 4, 7, 4, 30
    inp = make_inputs(T=T, d=d, V=V, mode="hidden", B=B, seed=6)
    mask = torch.ones(B, T, dtype=torch.bool)
    mask[0, 2:] = False
    mask[1, 6:] = False
    mask[3, 3:] = False
    h, W, y = inp["hidden"].float(), inp["weight"].float(), inp["targets"]
    reward = torch.tensor([-1.0, 1.0, 0.5, -0.2])
    kw = dict(mode="hidden", backend=backend, solver="dual", damping=0.05)
    _each_alone(h, W, y, reward, mask, kw)


def test_padded_groups_bound_the_waste():
    """Conversations grouped longest first so that no padded batch holds more than PAD_WASTE times its
    conversations' own numbers; equal or close lengths make one group; every conversation in exactly one."""
    from rosa_ext.common import defaults
    assert dense.padded_groups([5, 5, 5]) == [[0, 1, 2]] and defaults.one_padded_batch([5, 5, 5])
    assert dense.padded_groups([100, 3, 4, 90]) == [[0, 2, 3], [1]] and not defaults.one_padded_batch([100, 3, 4, 90])
    for lengths in ([1], [7, 1, 1, 1, 1], [3, 9, 4, 9, 2, 8], list(range(1, 30))):
        groups = dense.padded_groups(lengths)
        assert sorted(b for g in groups for b in g) == list(range(len(lengths)))
        for g in groups:
            tm = max(lengths[b] for b in g)
            assert len(g) * tm * tm <= defaults.PAD_WASTE * sum(lengths[b] ** 2 for b in g), (lengths, g)
        assert (len(groups) == 1) == defaults.one_padded_batch(lengths), lengths


@pytest.mark.parametrize("backend", ["torch", "triton"])
def test_a_lora_batch_in_two_padded_groups_equals_each_alone(backend):
    """Lengths 9, 1, 2, 8: two padded groups ([0, 3] and [1, 2]); the same steps as each conversation alone."""
    B, T, d, V = 4, 9, 6, 30
    inp = make_inputs(T=T, d=d, V=V, mode="lora", B=B, seed=8)
    g = torch.Generator().manual_seed(9)
    a, bvec = torch.randn(B, d, generator=g) / d ** 0.5, torch.randn(B, V, generator=g) * 0.3
    mask = torch.zeros(B, T, dtype=torch.bool)
    for b, n in enumerate([9, 1, 2, 8]):
        mask[b, :n] = True
    assert len(dense.padded_groups([9, 1, 2, 8])) == 2
    h, W, y = inp["hidden"].float(), inp["weight"].float(), inp["targets"]
    reward = torch.tensor([-1.0, 1.0, 0.5, 0.3])
    kw = dict(mode="lora", backend=backend, solver="dual", lora_scale=2.0)
    _each_alone(h, W, y, reward, mask, kw, lora_a=a, lora_b=bvec)


def test_long_conversations_are_batched_one_at_a_time():
    """Past PAD_MAX_NUMBERS a batch holds one conversation: the memory rules of long conversations are those of
    a loop over them (each one's system and factor), while short ones share a batch."""
    from rosa_ext.common import defaults
    from rosa_ext.common.config import RosaConfig
    from rosa_ext.plans import dual_hidden, dual_lora
    assert dense.padded_groups([2048] * 4) == [[0], [1], [2], [3]] and not defaults.one_padded_batch([2048] * 4)
    assert dense.padded_groups([64] * 100) == [list(range(100))]
    cfg = RosaConfig(mode="hidden", gram_budget_bytes=512 << 20)
    assert dual_hidden.fits([2048] * 32, 4096, 151936, 4, cfg)  # 2 x 2048^2 x 4 bytes, one at a time
    assert dual_lora.fits([4096] * 6, 896, 151936, 4, RosaConfig(mode="lora", gram_budget_bytes=512 << 20))

