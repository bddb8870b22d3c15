"""The ``/rosa/...`` HTTP routes of the vLLM plugin (front-end process; imports FastAPI, which comes with
vLLM). Kept apart from :mod:`.vllm_plugin` so that FastAPI reads the handlers' real annotations.

Every field of a request is checked and converted here, in the front end, before anything is sent to the
engine (:func:`~rosa_ext.integrations.serving_requests.feedback_body`, ``put_body``, ``reset_body``, then
``rpc_safe``): a bad one is a 400 ``{"error": {"message", "type", "argument"}}`` naming it, never an error of
vLLM's RPC packing (which cannot carry an int beyond 64 bits)."""
import json
from typing import Any, Dict, List

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from ..common import validation as checks
from .serving_requests import check_user_id, feedback_body, put_body, reset_body, rpc_safe


def _error(message: str, argument: Any, status: int = 400, kind: str = "RosaInputError") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "argument": argument}}, status_code=status)


def _refusal(e: checks.RosaError) -> JSONResponse:
    return _error(str(e), e.argument, 400, type(e).__name__)


def _keys(request_id: str, index: Any) -> List[str]:
    """The ids an answer may have in vLLM's tables: a completion's prompt i is ``"<id>-<i>"``; without
    ``index``, ``request_id`` itself (a chat completion) or its prompt 0."""
    return ([request_id] if index is None else []) + [f"{request_id}-{0 if index is None else index}"]


def _running(client: Any, request_id: str, index: Any) -> bool:
    """Whether the answer ``request_id`` (or prompt ``index`` of a completion) is still being generated, from
    the front end's own table of unfinished requests (the engine's worker learns that a request finished
    only at its next step)."""
    table = getattr(getattr(client, "output_processor", None), "external_req_ids", None)
    if table is None:
        return False
    return any(k in table for k in _keys(request_id, index))  # `in` does not insert into the defaultdict


def make_router() -> APIRouter:
    router = APIRouter()

    async def call(request: Request, op: str, payload: Dict[str, Any]) -> JSONResponse:
        client = getattr(request.app.state, "rosa_engine_client", None)
        if client is None:
            return _error("the engine is not ready", None, 503, "RosaStateError")
        try:
            rpc_safe(op, payload)
        except checks.RosaError as e:
            return _refusal(e)
        out = await client.collective_rpc("rosa_rpc", args=(op, payload))
        res = out[0] if isinstance(out, list) else out
        if "error" in res:
            return JSONResponse({"error": res["error"]}, status_code=int(res.get("status", 400)))
        return JSONResponse(res["ok"])

    async def body(request: Request) -> Any:
        """The JSON body (None when empty); RosaInputError naming ``body`` when it is not JSON."""
        raw = await request.body()
        if not raw.strip():
            return None
        try:
            return json.loads(raw)
        except (ValueError, RecursionError) as e:  # (a JSONDecodeError, an int of more than 4300 digits)
            checks.fail("rosa", "body", f"the request body is not JSON: {e}")

    @router.post("/rosa/feedback")
    async def feedback(request: Request) -> JSONResponse:
        try:
            fb = feedback_body(await body(request))
        except checks.RosaError as e:
            return _refusal(e)
        client = getattr(request.app.state, "rosa_engine_client", None)
        rid, index = fb["request_id"], fb["index"]
        if client is not None and _running(client, rid, index):
            return _error(f"feedback: request {rid!r} is still generating; rate it once its answer is complete",
                          "request_id", kind="RosaStateError")
        aborted = getattr(request.app.state, "rosa_aborted", None) or {}
        hit = next((k for k in _keys(rid, index) if k in aborted), None)
        if hit is not None:
            return _error(f"feedback: request {hit!r} was aborted before it finished (finish_reason 'abort': the "
                          "client disconnected or cancelled it); only a complete answer can be rated",
                          "request_id", kind="RosaStateError")
        return await call(request, "feedback", fb)

    @router.get("/rosa/users/{user}")
    async def get_user(user: str, request: Request, tensors: bool = False) -> JSONResponse:
        try:
            uid = check_user_id("get_user", user, "user")
        except checks.RosaError as e:
            return _refusal(e)
        return await call(request, "get", {"user": uid, "tensors": tensors})

    @router.put("/rosa/users/{user}")
    async def put_user(user: str, request: Request) -> JSONResponse:
        try:
            payload = put_body(user, await body(request))
        except checks.RosaError as e:
            return _refusal(e)
        return await call(request, "put", payload)

    @router.post("/rosa/users/{user}/reset")
    async def reset_user(user: str, request: Request) -> JSONResponse:
        try:
            payload = reset_body(user, await body(request))
        except checks.RosaError as e:
            return _refusal(e)
        return await call(request, "reset", payload)

    @router.delete("/rosa/users/{user}")
    async def delete_user(user: str, request: Request) -> JSONResponse:
        try:
            uid = check_user_id("delete_user", user, "user")
        except checks.RosaError as e:
            return _refusal(e)
        return await call(request, "delete", {"user": uid})

    @router.get("/rosa/stats")
    async def stats(request: Request) -> JSONResponse:
        return await call(request, "stats", {})

    return router
