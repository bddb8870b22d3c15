"""rosa-ext: fast ROSA test-time policy adaptation (see README.md and rosa_ext/MATH.md).

Public API:
    rosa_update, RosaStep       the functional op
    RosaConfig                  its options, in one object
    rosa_ext.reference          float64 torch.func reference
    rosa_ext.cg                 conjugate gradient (compiled when built)
    rosa_ext.kernels            Triton kernels (stats, row/column reductions, jvp, vjp)
    attach                      plug into a transformers / PEFT model
    interact                    the multi-turn feedback loop
    RosaError and subclasses    the errors of every entry point (README, "Errors")
"""
from ._version import __version__
from .common.config import RosaConfig
from .common.validation import (
    RosaError,
    RosaInputError,
    RosaNonFiniteError,
    RosaNumericalError,
    RosaStateError,
    RosaTypeError,
)
from .core.op import RosaStep, rosa_update

__all__ = ["RosaConfig", "RosaStep", "rosa_update", "__version__", "RosaError", "RosaInputError", "RosaTypeError",
           "RosaNonFiniteError", "RosaNumericalError", "RosaStateError"]


def __getattr__(name: str):
    # Lazy: importing rosa_ext must not import transformers.
    if name in ("attach", "RosaSession"):
        from .integrations import session
        return getattr(session, name)
    if name == "interact":
        from .harness.conversation import interact
        return interact
    raise AttributeError(f"module 'rosa_ext' has no attribute {name!r}")
