"""Batched updates: B conversations in one call equal B separate calls."""
import pytest
import torch
from _helpers import make_inputs

from rosa_ext import rosa_update
from rosa_ext.reference import rosa_update_reference

EXACT = dict(max_iter=500, tol=1e-13)


def _batch(mode, B=3, T=7):
    inp = make_inputs(mode=mode, B=B, T=T)
    g = torch.Generator().manual_seed(5)
    lens = torch.tensor([7, 3, 5][:B])
    mask = torch.arange(T).unsqueeze(0) < lens.unsqueeze(1)
    reward = torch.tensor([-1.0, 1.0, 0.5][:B], dtype=torch.float64)
    d, V = inp["weight"].shape[1], inp["weight"].shape[0]
    if mode == "lora":  # per-conversation adapter states
        inp["lora_a"] = torch.randn(B, d, generator=g, dtype=torch.float64) / d ** 0.5
        inp["lora_b"] = torch.randn(B, V, generator=g, dtype=torch.float64) * 0.05
    return inp, mask, reward


def _single(inp, mask, b):
    one = dict(inp, hidden=inp["hidden"][b][mask[b]], targets=inp["targets"][b][mask[b]])
    if "lora_a" in inp:
        one.update(lora_a=inp["lora_a"][b], lora_b=inp["lora_b"][b])
    return one


@pytest.mark.parametrize("mode", ["lora", "hidden"])
@pytest.mark.parametrize("solver", ["dual", "cg"])
def test_batch_equals_separate_calls(mode, solver):
    inp, mask, reward = _batch(mode)
    got = rosa_update(**inp, reward=reward, mode=mode, mask=mask, solver=solver, **EXACT)
    assert got.update.shape[0] == 3
    for b in range(3):
        one = rosa_update(**_single(inp, mask, b), reward=float(reward[b]), mode=mode, solver=solver, **EXACT)
        torch.testing.assert_close(got.update[b], one.update, rtol=0, atol=1e-9)


@pytest.mark.parametrize("mode", ["lora", "hidden"])
def test_batch_matches_reference(mode):
    inp, mask, reward = _batch(mode)
    ref = rosa_update_reference(**inp, reward=reward, mode=mode, mask=mask)
    got = rosa_update(**inp, reward=reward, mode=mode, mask=mask)
    torch.testing.assert_close(got.update, ref.update, rtol=0, atol=1e-9)
    if mode == "lora":
        assert got.delta_a.shape == (3, inp["weight"].shape[1])


def test_shared_lora_state_broadcasts():
    inp = make_inputs(mode="lora", B=2, T=4)
    got = rosa_update(**inp, reward=[1.0, -1.0], mode="lora", solver="dual")
    for b, r in enumerate([1.0, -1.0]):
        one = rosa_update(**dict(inp, hidden=inp["hidden"][b], targets=inp["targets"][b]), reward=r,
                          mode="lora", solver="dual")
        torch.testing.assert_close(got.update[b], one.update, rtol=0, atol=1e-12)
