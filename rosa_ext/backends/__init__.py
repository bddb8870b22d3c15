"""The engines: whole passes over the head weight (MATH.md sections 3-4), the only place that knows
which engine runs (:mod:`.protocol`).

- :mod:`.torch_engine` (with its tile loop :mod:`.torch_tiles`): torch, any device
- :mod:`.triton_engine`: the Triton kernels and the probability tiles (CUDA, or the interpreter)
- :mod:`.distributed`: wraps either on a vocabulary-parallel head and adds the collectives
- :mod:`.registry`: ``engine_for(name, device)``

The solve plans (:mod:`rosa_ext.plans`) call only the protocol and hold only the algebra.
"""
from .protocol import Engine
from .registry import engine_for, get_backend, triton_available

__all__ = ["Engine", "engine_for", "get_backend", "triton_available"]
