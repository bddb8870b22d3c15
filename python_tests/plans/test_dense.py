"""The shared dense algebra of the plans (rosa_ext/plans/dense.py) and the pending input checks
(rosa_ext/common/validation.py): the exact rescaling, the factorisation's host-side verdict, the one
host read, and the order in which deferred input errors are raised."""
import math

import pytest
import torch

import rosa_ext
from rosa_ext.common import validation as checks
from rosa_ext.plans import dense


@pytest.mark.parametrize("dtype", [torch.float32, torch.float64])
def test_power_of_two_scale_is_exact_and_in_range(dtype):
    fi = torch.finfo(dtype)
    values = [1.0, 3.0, 0.75, 1e-30, 1e30, fi.max, fi.tiny, fi.tiny / 8, fi.smallest_normal * fi.eps,
              0.0, math.inf, math.nan]
    for v in values:
        x = torch.tensor(v, dtype=dtype)
        unit = dense.power_of_two_scale(x)
        assert unit.dtype == dtype and unit.dim() == 0
        u = float(unit)
        assert math.isfinite(u) and u > 0
        assert math.frexp(u)[0] == 0.5, (v, u)  # a power of two: multiplying by it is exact
        if v == 0 or not math.isfinite(v):
            assert u == 1.0
        elif v >= fi.tiny:  # normal: the scaled value lands in [1/2, 1)
            assert 0.5 <= float(x * unit) < 1.0, (v, u)
        else:  # subnormal: the largest power of two the dtype holds, scaled value below 1/2 but normal
            assert float(x * unit) >= fi.tiny


def test_factor_solve_and_its_host_verdict():
    g = torch.Generator().manual_seed(0)
    J = torch.randn(6, 10, generator=g, dtype=torch.float64)
    A = J @ J.T
    rhs = torch.randn(6, generator=g, dtype=torch.float64)
    lam = torch.tensor(0.5, dtype=torch.float64)
    A_before = A.clone()
    x, fac = dense.factor_solve(A, rhs, lam)
    want = torch.linalg.solve(A_before + 0.5 * torch.eye(6, dtype=torch.float64), rhs)
    torch.testing.assert_close(x, want, rtol=1e-12, atol=1e-12)
    torch.testing.assert_close(A, A_before, rtol=0, atol=1e-15)  # restored
    assert dense.well_factored(float(fac.info), float(fac.diag_min), float(fac.diag_max), torch.float64)
    # not positive definite: cholesky_ex reports it, the verdict refuses it
    B = -torch.eye(3, dtype=torch.float64)
    _, fac = dense.factor_solve(B, torch.ones(3, dtype=torch.float64), torch.tensor(0.0, dtype=torch.float64))
    assert int(fac.info) != 0
    assert not dense.well_factored(float(fac.info), float(fac.diag_min), float(fac.diag_max), torch.float64)
    # factored but too ill-conditioned for float32: rank-1 Gram with a tiny ridge
    v = torch.ones(4, 1)
    _, fac = dense.factor_solve(v @ v.T, torch.ones(4), torch.tensor(1e-6))
    assert int(fac.info) == 0
    assert not dense.well_factored(float(fac.info), float(fac.diag_min), float(fac.diag_max), torch.float32)
    # NaN anywhere fails
    assert not dense.well_factored(0.0, math.nan, 1.0, torch.float32)
    assert not dense.well_factored(0.0, 0.0, 1.0, torch.float32)


def test_read_host_is_exact_across_dtypes():
    ids = torch.tensor([2 ** 40 + 1, -3])  # int64 beyond float32's exact range
    vals = checks.read_host([torch.tensor(True), torch.tensor(1.5, dtype=torch.bfloat16), ids,
                             torch.tensor(0.1, dtype=torch.float64)])
    assert vals == [1.0, 1.5, float(2 ** 40 + 1), -3.0, 0.1]


def test_pending_checks_raise_in_order_and_read_once():
    seen = []
    p = checks.PendingChecks()
    p.add([torch.tensor(1.0)], lambda v: seen.append(("first", v)))
    p.finite("rosa_update", "hidden", torch.tensor([1.0, math.nan]))
    p.add([torch.tensor(2.0)], lambda v: seen.append(("after", v)))
    p.zero_jacobian.append((lambda: (torch.tensor(-1),), lambda v: seen.append(("zero", v))))
    with pytest.raises(checks.RosaNonFiniteError) as e:
        p.run()
    assert e.value.argument == "hidden" and seen == [("first", [1.0])]
    # the values a plan read: the queued ones first, then (if asked) the zero-Jacobian ones
    q = checks.PendingChecks()
    q.add([torch.tensor(1.0), torch.tensor(2.0)], lambda v: seen.append(("pair", v)))
    q.zero_jacobian.append((lambda: (torch.tensor(5.0),), lambda v: seen.append(("zero", v))))
    ts = q.tensors(with_zero_jacobian=True)
    assert len(ts) == 3 and q.verdict(checks.read_host(ts + [torch.tensor(9.0)])) == 3
    assert seen[-2:] == [("pair", [1.0, 2.0]), ("zero", [5.0])]
    q.check_zero_jacobian()
    assert seen[-1] == ("zero", [5.0])


@pytest.mark.parametrize("mode", ["hidden", "lora"])
@pytest.mark.parametrize("solver", ["dual", "cg"])
def test_deferred_input_errors_name_their_argument(mode, solver):
    """The one-process call reads its value checks inside the plan: an out-of-range target is reported
    (not an index error) before NaN in another input, and NaN in each input names it."""
    g = torch.Generator().manual_seed(1)
    V, d, T = 40, 6, 5
    W = torch.randn(V, d, generator=g)
    h = torch.randn(T, d, generator=g)
    y = torch.randint(0, V, (T,), generator=g)
    lora = dict(lora_a=torch.randn(d, generator=g), lora_b=torch.zeros(V)) if mode == "lora" else {}
    kw = dict(mode=mode, solver=solver, **lora)
    bad_y = y.clone()
    bad_y[2] = V + 7
    nan_h = h.clone()
    nan_h[1, 3] = math.nan
    with pytest.raises(checks.RosaInputError, match=f"token id {V + 7}") as e:
        rosa_ext.rosa_update(nan_h, W, bad_y, 1.0, **kw)
    assert e.value.argument == "targets"
    neg_y = y.clone()
    neg_y[0] = -2
    with pytest.raises(checks.RosaInputError, match="token id -2"):
        rosa_ext.rosa_update(h, W, neg_y, 1.0, **kw)
    with pytest.raises(checks.RosaNonFiniteError) as e:
        rosa_ext.rosa_update(nan_h, W, y, 1.0, **kw)
    assert e.value.argument == "hidden"
    if mode == "lora":
        nan_a = lora["lora_a"].clone()
        nan_a[0] = math.inf
        with pytest.raises(checks.RosaNonFiniteError) as e:
            rosa_ext.rosa_update(h, W, y, 1.0, **dict(kw, lora_a=nan_a))
        assert e.value.argument == "lora_a"
        with pytest.raises(checks.RosaInputError, match="all zeros") as e:  # a dead LoRA: J exactly zero
            rosa_ext.rosa_update(h, W, y, 1.0, **dict(kw, lora_a=torch.zeros(d)))
        assert e.value.argument == "lora_a"
    step = rosa_ext.rosa_update(h, W, y, 1.0, **kw)  # and the good call still works
    assert torch.isfinite(step.update).all()


@pytest.mark.parametrize("solver", ["dual", "cg"])
def test_a_dead_lora_in_a_batch_names_the_first_dead_conversation(solver):
    """Batched LoRA with conversations 1 and 2 dead (a = 0, b = 0): the dual finds their Gram exactly zero and
    runs the dead-LoRA check once; CG reads it with the other checks. Either way the error names lora_a and
    conversation 1."""
    g = torch.Generator().manual_seed(2)
    B, V, d, T = 3, 30, 5, 4
    W = torch.randn(V, d, generator=g)
    h = torch.randn(B, T, d, generator=g)
    y = torch.randint(0, V, (B, T), generator=g)
    a = torch.randn(B, d, generator=g)
    a[1:] = 0
    with pytest.raises(checks.RosaInputError, match=r"all zeros.*\(conversation 1\)") as e:
        rosa_ext.rosa_update(h, W, y, [1.0, -1.0, 1.0], mode="lora", solver=solver, lora_a=a, lora_b=torch.zeros(B, V))
    assert e.value.argument == "lora_a"
    a[1:] = 1.0  # alive again: the same call runs
    step = rosa_ext.rosa_update(h, W, y, [1.0, -1.0, 1.0], mode="lora", solver=solver, lora_a=a, lora_b=torch.zeros(B, V))
    assert torch.isfinite(step.update).all()
