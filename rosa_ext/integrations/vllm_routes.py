"""The ``/rosa/...`` HTTP routes of the vLLM plugin (front-end process; imports FastAPI, which comes with
vLLM). Kept apart from :mod:`.vllm_plugin` so that FastAPI reads the handlers' real annotations."""
from typing import Any, Dict

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse


def _error(message: str, argument: Any, status: int = 400, kind: str = "RosaInputError") -> JSONResponse:
    return JSONResponse({"error": {"message": message, "type": kind, "argument": argument}}, status_code=status)


def _running(client: Any, request_id: Any, index: Any) -> bool:
    """Whether the answer ``request_id`` (or prompt ``index`` of a completion) is still being generated, from
    the front end's own table of unfinished requests (the engine's worker learns that a request finished
    only at its next step)."""
    table = getattr(getattr(client, "output_processor", None), "external_req_ids", None)
    if table is None or not isinstance(request_id, str):
        return False
    i = index if isinstance(index, int) and not isinstance(index, bool) else 0
    keys = ([request_id] if index is None else []) + [f"{request_id}-{i}"]
    return any(k in table for k in keys)  # `in` does not insert into the defaultdict


def make_router() -> APIRouter:
    router = APIRouter()

    async def call(request: Request, op: str, payload: Dict[str, Any]) -> JSONResponse:
        client = getattr(request.app.state, "rosa_engine_client", None)
        if client is None:
            return _error("the engine is not ready", None, 503, "RosaStateError")
        out = await client.collective_rpc("rosa_rpc", args=(op, payload))
        res = out[0] if isinstance(out, list) else out
        if "error" in res:
            return JSONResponse({"error": res["error"]}, status_code=int(res.get("status", 400)))
        return JSONResponse(res["ok"])

    async def body(request: Request) -> Any:
        try:
            return await request.json()
        except Exception:
            return None

    @router.post("/rosa/feedback")
    async def feedback(request: Request) -> JSONResponse:
        payload = await body(request)
        if not isinstance(payload, dict):
            return _error("the request body must be a JSON object {user, request_id, reward, index?}", "body",
                          kind="RosaTypeError")
        client = getattr(request.app.state, "rosa_engine_client", None)
        if client is not None and _running(client, payload.get("request_id"), payload.get("index")):
            return _error(f"feedback: request {payload.get('request_id')!r} is still generating; rate it once its answer "
                          "is complete", "request_id", kind="RosaStateError")
        return await call(request, "feedback", payload)

    @router.get("/rosa/users/{user}")
    async def get_user(user: str, request: Request, tensors: bool = False) -> JSONResponse:
        return await call(request, "get", {"user": user, "tensors": tensors})

    @router.put("/rosa/users/{user}")
    async def put_user(user: str, request: Request) -> JSONResponse:
        payload = await body(request)
        if not isinstance(payload, dict):
            return _error("the request body must be a state as a JSON object", "state", kind="RosaTypeError")
        return await call(request, "put", {"user": user, "state": payload})

    @router.post("/rosa/users/{user}/reset")
    async def reset_user(user: str, request: Request) -> JSONResponse:
        payload = await body(request)
        mode = payload.get("mode") if isinstance(payload, dict) else None
        return await call(request, "reset", {"user": user, "mode": mode})

    @router.delete("/rosa/users/{user}")
    async def delete_user(user: str, request: Request) -> JSONResponse:
        return await call(request, "delete", {"user": user})

    @router.get("/rosa/stats")
    async def stats(request: Request) -> JSONResponse:
        return await call(request, "stats", {})

    return router
