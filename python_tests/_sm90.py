"""What an ahead-of-time sm_90 compile uses, read from its cubin: imported by the compile scripts that
``_helpers.sm90_compile`` runs in a subprocess (this folder is on their PYTHONPATH)."""
import os
import subprocess
import tempfile
from typing import Tuple


def usage(compiled) -> Tuple[int, int]:
    """(stack bytes, registers) of a ``triton.compile`` result's cubin, from ``cuobjdump -res-usage`` (the
    largest over its functions; -1 where not reported). A stack frame means spilled registers."""
    import triton

    cuobjdump = os.path.join(os.path.dirname(triton.__file__), "backends", "nvidia", "bin", "cuobjdump")
    with tempfile.NamedTemporaryFile(suffix=".cubin", delete=False) as f:
        f.write(compiled.asm["cubin"])
    try:
        out = subprocess.run([cuobjdump, "-res-usage", f.name], capture_output=True, text=True).stdout
    finally:
        os.unlink(f.name)
    stack = [int(w.split(":")[1]) for w in out.split() if w.startswith("STACK:")]
    regs = [int(w.split(":")[1]) for w in out.split() if w.startswith("REG:")]
    return (max(stack) if stack else -1), (max(regs) if regs else -1)
