"""Shared test inputs: small random ROSA problems, plain and adversarial."""
from __future__ import annotations

from typing import Dict, Optional

import torch


def make_inputs(T: int = 6, d: int = 12, V: int = 37, *, dtype=torch.float64, mode: str = "lora",
                bias: bool = True, lora_b_zero: bool = False, logit_scale: float = 1.0,
                seed: int = 0, B: Optional[int] = None) -> Dict[str, object]:
    """Random (hidden, weight, targets) plus LoRA state; B adds a batch dimension.

    Targets are drawn from the model's own softmax so p_t takes realistic values.
    """
    g = torch.Generator().manual_seed(seed)
    lead = (T,) if B is None else (B, T)
    H = torch.randn(*lead, d, generator=g, dtype=torch.float64)
    W = torch.randn(V, d, generator=g, dtype=torch.float64) * logit_scale / d ** 0.5
    c = torch.randn(V, generator=g, dtype=torch.float64) * 0.1 if bias else None
    logits = H @ W.T + (0 if c is None else c)
    y = torch.multinomial(torch.softmax(logits.reshape(-1, V), -1), 1, generator=g).reshape(lead)
    a = torch.randn(d, generator=g, dtype=torch.float64) / d ** 0.5
    b = torch.zeros(V, dtype=torch.float64) if lora_b_zero else torch.randn(V, generator=g, dtype=torch.float64) * 0.05
    out = dict(hidden=H.to(dtype), weight=W.to(dtype), targets=y,
               bias=None if c is None else c.to(dtype))
    if mode == "lora":
        out.update(lora_a=a, lora_b=b)
    return out


def mean_logp_after(inputs: Dict[str, object], step, mode: str, lora_scale: float = 8.0) -> float:
    """Mean log-prob of the targets after applying ``step`` (float64, dense)."""
    H = inputs["hidden"].double()
    W = inputs["weight"].double()
    z_bias = 0 if inputs.get("bias") is None else inputs["bias"].double()
    y = inputs["targets"]
    if mode == "lora":
        a = inputs["lora_a"].double() + step.delta_a.double()
        b = inputs["lora_b"].double() + step.delta_b.double()
        z = H @ W.T + z_bias + lora_scale * (H @ a).unsqueeze(-1) * b
    else:
        z = (H + step.delta.double()) @ W.T + z_bias
    return torch.log_softmax(z, -1).gather(-1, y.unsqueeze(-1)).mean().item()


def build_problem(hidden, weight, targets, reward, **kw):
    """The packed HeadProblem of a rosa_update call with these arguments (tensors and options by name)."""
    from rosa_ext.core.op import pack
    return pack(hidden, weight, targets, reward, **kw)[0]


def num_params(prob, mode: str) -> int:
    """P of a packed problem: d + V (lora) or d (hidden)."""
    return prob.hidden_size + (prob.vocab_size if mode == "lora" else 0)


def shrink_onepass_tiles(monkeypatch, *, tile_elems: int, min_chunk: int, row_block: int, gram_block: int) -> None:
    """Make the torch engine's one-pass passes (hidden_pass / gram_pass) use tiny tiles on tiny problems:
    many vocabulary chunks (a ragged last one), row blocks and Gram blocks below T."""
    from rosa_ext.backends import torch_engine
    monkeypatch.setattr(torch_engine, "HIDDEN_TILE_ELEMS", tile_elems)
    monkeypatch.setattr(torch_engine, "LORA_TILE_ELEMS", tile_elems)
    monkeypatch.setattr(torch_engine, "MIN_CHUNK", min_chunk)
    monkeypatch.setattr(torch_engine, "LORA_MIN_CHUNK", min_chunk)
    monkeypatch.setattr(torch_engine, "HIDDEN_ROW_BLOCK", row_block)
    monkeypatch.setattr(torch_engine, "gram_block", lambda T: gram_block)


class LinearizedHead:
    """J v, J^T u, the target g and the stats of a packed problem on an engine, unscaled: what matrix-free
    CG (rosa_ext.plans.cg_lora) runs (in the linearisation's scaled units; here multiplied back), for tests
    that check the algebra itself. ``cfg``: the RosaConfig of the call (its mode and beta)."""

    def __init__(self, prob, engine, cfg) -> None:
        from rosa_ext.common.jacobian import Linearization
        self.prob, self.backend = prob, engine
        self.lin = Linearization.at(prob, engine.stats(prob), cfg.mode, engine, beta=cfg.beta)
        self.scale = torch.exp(self.lin.shift[prob.seg])  # (N,): J = scale * (the scaled J)
        self.g = self.lin.g * self.scale
        self.stats, self.p = self.lin.stats, self.lin.p

    def jvp(self, v):
        from rosa_ext.common import jacobian as J
        return J.jvp(self.lin, self.backend, v) * self.scale

    def vjp(self, u):
        from rosa_ext.common import jacobian as J
        return J.vjp(self.lin, self.backend, u * self.scale)


def sm90_compile(script: str, *args: str, timeout: int) -> str:
    """Run ``script`` (Python source that compiles Triton kernels ahead of time for sm_90 and prints one
    line per compile) in a subprocess without TRITON_INTERPRET, the repository root on PYTHONPATH ->
    its stdout. Skips where a GPU is present (the GPU tests compile and run the kernels for real) or where
    this triton's ahead-of-time compile API differs; fails on any other error."""
    import os
    import pathlib
    import subprocess
    import sys

    import pytest

    if torch.cuda.is_available():
        pytest.skip("a GPU is present: the GPU tests compile and run the kernels for real")
    env = {k: v for k, v in os.environ.items() if k != "TRITON_INTERPRET"}
    root = str(pathlib.Path(__file__).resolve().parents[1])
    env["PYTHONPATH"] = os.pathsep.join([root, str(pathlib.Path(__file__).resolve().parent), env.get("PYTHONPATH", "")])
    r = subprocess.run([sys.executable, "-c", script, *args], capture_output=True, text=True, env=env,
                       timeout=timeout)
    if r.returncode != 0 and ("ASTSource" in r.stderr or "GPUTarget" in r.stderr) and "Error" in r.stderr \
            and "rosa_ext" not in r.stderr:
        pytest.skip(f"this triton's ahead-of-time compile API differs: {r.stderr.strip().splitlines()[-1]}")
    assert r.returncode == 0, r.stderr[-3000:]
    return r.stdout
