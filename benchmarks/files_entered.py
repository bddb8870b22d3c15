"""How many rosa_ext source files a call enters (issue "give the engine a home"): the reading cost of
following one feature.

Counts, at run time, every ``rosa_ext`` source file in which a Python frame starts during the call
(package faces -- ``__init__.py`` -- not counted; imports done before the call not counted: every case
is run once to warm up, then measured). Cases: the default hidden-mode step, the default LoRA-mode
step (``rosa_update`` on the CPU, fp32), ``session.generate`` + ``session.update(reward=)`` on an
attached session, and ``RosaUsers.update`` after a ``RosaUsers.generate``, on tiny random models.

    python benchmarks/files_entered.py            # table
    python benchmarks/files_entered.py --files    # and the files of each case
"""
from __future__ import annotations

import argparse
import os
import sys
from typing import Callable, Dict, List, Set

import torch

PKG = os.path.dirname(os.path.abspath(__import__("rosa_ext").__file__))


def files_entered(fn: Callable[[], object]) -> List[str]:
    """The rosa_ext source files (relative to the package, ``__init__.py`` excluded) in which a frame
    starts while ``fn()`` runs."""
    seen: Set[str] = set()

    def prof(frame, event, arg):
        if event == "call":
            f = frame.f_code.co_filename
            if f.startswith(PKG) and not f.endswith("__init__.py"):
                seen.add(os.path.relpath(f, PKG))
    sys.setprofile(prof)
    try:
        fn()
    finally:
        sys.setprofile(None)
    return sorted(seen)


def cases() -> Dict[str, Callable[[], object]]:
    from rosa_ext import rosa_update
    g = torch.Generator().manual_seed(0)
    T, d, V = 16, 32, 500
    h = torch.randn(T, d, generator=g)
    W = torch.randn(V, d, generator=g) / d ** 0.5
    y = torch.randint(0, V, (T,), generator=g)
    a = torch.randn(d, generator=g) / d ** 0.5

    def hidden_step():
        return rosa_update(h, W, y, -1.0, mode="hidden")

    def lora_step():
        return rosa_update(h, W, y, -1.0, mode="lora", lora_a=a)

    import rosa_ext
    from rosa_ext.integrations.models import tiny_causal_lm
    from rosa_ext.integrations.users import RosaUsers
    model = tiny_causal_lm("qwen2")
    prompt = torch.randint(3, model.config.vocab_size, (1, 8), generator=g)
    session = rosa_ext.attach(model, mode="hidden")

    def generate_update():
        session.generate(prompt, max_new_tokens=4, do_sample=False)
        session.update(reward=-1.0)

    model2 = tiny_causal_lm("llama")
    prompts = torch.randint(3, model2.config.vocab_size, (2, 8), generator=g)
    users = RosaUsers(model2, mode="lora")

    def users_update():
        users.generate(prompts, ["ann", "bob"], max_new_tokens=4, do_sample=False)
        return lambda: users.update({"ann": -1.0, "bob": 1.0})

    return {"hidden step": hidden_step, "LoRA step": lora_step, "generate + update": generate_update,
            "many-user update": users_update}


#: The issue's targets (at most this many files per case).
TARGETS = {"hidden step": 7, "LoRA step": 8, "generate + update": 10, "many-user update": 10}


def main(argv=None) -> int:
    ap = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    ap.add_argument("--files", action="store_true", help="list the files of each case")
    args = ap.parse_args(argv)
    torch.set_num_threads(1)
    rows = []
    for name, fn in cases().items():
        if name == "many-user update":  # the update after a generate (the generate is not measured)
            fn()()  # warm up
            files = files_entered(fn())
        else:
            fn()  # warm up: imports, caches
            files = files_entered(fn)
        rows.append((name, files))
        print(f"{name:20s} {len(files):3d} files (target <= {TARGETS[name]})", flush=True)
        if args.files:
            for f in files:
                print(f"    {f}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
