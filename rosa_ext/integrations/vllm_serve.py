"""Start vLLM's OpenAI-compatible server with ROSA inside it: ``python -m rosa_ext.integrations.vllm_serve``.

    python -m rosa_ext.integrations.vllm_serve --model smollm2-hf --rosa-store ~/rosa/users.sqlite \\
        --rosa-mode hidden --dtype float32 --max-model-len 1024 --port 8011

The ``--rosa-*`` options (below) configure the plugin (:mod:`rosa_ext.integrations.vllm_plugin`); every
other option goes to vLLM's server unchanged. The launcher

- binds to 127.0.0.1 unless ``--host`` is given (vLLM's default is every interface);
- puts the configuration in ``$ROSA_VLLM_CONFIG`` (read by the plugin in every vLLM process) and adds
  ``rosa`` to ``$VLLM_PLUGINS`` (vLLM loads endpoint plugins only when named there);
- adds ``--logits-processors rosa_ext.integrations.vllm_plugin:RosaRequests``;
- then runs vLLM's own server entry point in this process (one server: the API front end and vLLM's
  engine processes; no sidecar).

The plugin's entry points (``vllm.general_plugins`` / ``vllm.endpoint_plugins``: ``rosa``) come with the
installed ``rosa-ext`` distribution (pyproject.toml).
"""
from __future__ import annotations

import argparse
import json
import os
import sys
from typing import List, NoReturn, Optional, Sequence

from ..common import defaults
from ..common import validation as checks
from .serving import ServingConfig
from .vllm_plugin import CONFIG_ENV, PLUGIN_NAME, REQUESTS_FQCN

_OPTIONS = (
    # (flag, config key, type, help)
    ("--rosa-store", "store", str, "SQLite file of the users' states (persists across restarts; default: in memory, "
                                   "lost at exit)"),
    ("--rosa-mode", "mode", str, "mode of a new user's state: hidden (default) or lora"),
    ("--rosa-lora-scale", "lora_scale", float, f"LoRA scale s (default {defaults.LORA_SCALE:g})"),
    ("--rosa-seed", "seed", int, "seed of a new LoRA user's a (default 0)"),
    ("--rosa-beta", "beta", float, f"the step's beta (default {defaults.BETA:g})"),
    ("--rosa-damping", "damping", float, f"the step's damping (default {defaults.DAMPING:g})"),
    ("--rosa-damping-mode", "damping_mode", str, f"relative or absolute (default {defaults.DAMPING_MODE})"),
    ("--rosa-max-iter", "max_iter", int, f"CG iteration cap (default {defaults.MAX_ITER})"),
    ("--rosa-tol", "tol", float, f"CG tolerance (default {defaults.TOL:g})"),
    ("--rosa-solver", "solver", str, f"auto, cg, dual, ... (default {defaults.SOLVER})"),
    ("--rosa-backend", "backend", str, f"auto, torch, triton (default {defaults.BACKEND})"),
    ("--rosa-max-record-mb", "max_record_mb", float, "budget of recorded lm_head inputs awaiting feedback, MiB "
                                                     "(default 256)"),
    ("--rosa-max-pending", "max_pending", int, "recorded answers kept per user awaiting feedback (default 4)"),
    ("--rosa-window-s", "window_s", float, "seconds a recorded answer can be rated after its request started "
                                           "(default 900)"),
)


PROG = "python -m rosa_ext.integrations.vllm_serve"


class _Parser(argparse.ArgumentParser):
    def error(self, message: str) -> "NoReturn":  # one line (no usage of every --rosa-* option), exit 2
        self.exit(2, f"{self.prog}: error: {message} (--rosa-help lists the --rosa-* options)\n")


def _parser() -> argparse.ArgumentParser:
    ap = _Parser(prog=PROG, add_help=False,
                 description="vLLM's OpenAI server with ROSA inside (other options: vLLM's)")
    for flag, key, typ, text in _OPTIONS:
        ap.add_argument(flag, dest=key, type=typ, default=None, help=text)
    ap.add_argument("--rosa-help", action="help", help="show the --rosa-* options and exit")
    return ap


def prepare(argv: Sequence[str]) -> List[str]:
    """Split ``argv`` into the ROSA configuration (put in the environment) and vLLM's arguments, which
    are returned with ``--host 127.0.0.1`` (unless a host is given) and the request tracker added."""
    ap = _parser()
    known, rest = ap.parse_known_args(list(argv))
    cfg = {k: v for k, v in vars(known).items() if v is not None}
    if "store" in cfg:
        cfg["store"] = os.path.abspath(os.path.expanduser(cfg["store"]))
        if os.path.isdir(cfg["store"]) or not os.path.isdir(os.path.dirname(cfg["store"])):
            ap.error(f"argument --rosa-store: {cfg['store']!r} must be a file in an existing folder (the SQLite "
                     "store of the users' states)")
    try:
        ServingConfig.from_mapping(cfg, "vllm_serve")  # a bad option fails here, before vLLM starts
    except checks.RosaError as e:
        flag, message = _as_flag(e)
        ap.error(f"argument {flag}: {message}" if flag else message)
    os.environ[CONFIG_ENV] = json.dumps(cfg)
    plugins = [p for p in os.environ.get("VLLM_PLUGINS", "").split(",") if p.strip()]
    if PLUGIN_NAME not in plugins:
        plugins.append(PLUGIN_NAME)
    os.environ["VLLM_PLUGINS"] = ",".join(plugins)
    rest = list(rest)
    if not any(a == "--host" or a.startswith("--host=") for a in rest):
        rest += ["--host", "127.0.0.1"]
    if "--logits-processors" in rest:
        rest.insert(rest.index("--logits-processors") + 1, REQUESTS_FQCN)
    else:
        rest += ["--logits-processors", REQUESTS_FQCN]
    return rest


def _as_flag(e: checks.RosaError) -> "tuple[Optional[str], str]":
    """(the --rosa-* flag an error of ServingConfig names, the message in the flags' words)."""
    message = str(e)
    if message.startswith("vllm_serve: "):
        message = message[len("vllm_serve: "):]
    for flag, key, _, _ in _OPTIONS:
        if e.argument in (key, f"config[{key!r}]"):
            message = message.replace(f"config[{key!r}]", flag).replace(f"`{key}`", f"`{flag}`")
            if message.startswith(key + " "):
                message = flag + message[len(key):]
            return flag, message
    return None, message


def main(argv: Optional[Sequence[str]] = None) -> None:
    rest = prepare(sys.argv[1:] if argv is None else argv)
    from vllm.entrypoints.launchers.api_server.entry import main as vllm_main

    sys.argv = ["vllm-serve (rosa)"] + rest
    vllm_main()


if __name__ == "__main__":
    main()
