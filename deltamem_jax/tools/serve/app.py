"""The HTTP routes (FastAPI): OpenAI-compatible chat completions and session management.

=======  ================================  =========================================
method   path                              what
=======  ================================  =========================================
POST     /v1/chat/completions              a turn (``stream`` for server-sent events)
GET      /v1/models, /v1/models/{id}       the served model
GET      /v1/sessions                      this key's session ids
GET      /v1/sessions/{id}                 counts, times, state digest, snapshots
DELETE   /v1/sessions/{id}                 forget a session (and its snapshots)
POST     /v1/sessions/{id}/snapshot        ``{"name": ...}``: keep a named copy
POST     /v1/sessions/{id}/restore         ``{"snapshot": ..., "from_session": ...}``
GET      /health                           liveness (no key needed)
=======  ================================  =========================================

Every error, including unknown routes, bodies that are too large and
malformed JSON, is an OpenAI-style ``{"error": {...}}`` with a 4xx status;
unexpected failures are a 500 with the same shape and are logged.
"""

from __future__ import annotations

import json
import logging
import time
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from deltamem_jax.tools.serve.protocol import (
    APIError,
    chunk_body,
    completion_body,
    completion_id,
    parse_chat_request,
    usage,
)
from deltamem_jax.tools.serve.service import Service

__all__ = ["create_app"]

log = logging.getLogger("deltamem.serve")
SESSION_HEADER = "x-session-id"
MODE_HEADER = "x-session-mode"


class _TooLarge(Exception):
    pass


class BodyLimit:
    """Refuse request bodies over ``max_bytes`` with a 413 (declared or streamed)."""

    def __init__(self, app: ASGIApp, max_bytes: int):
        self.app, self.max_bytes = app, max_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            return await self.app(scope, receive, send)
        declared = dict(scope.get("headers") or []).get(b"content-length")
        try:
            too_big = declared is not None and int(declared) > self.max_bytes
        except ValueError:
            too_big = False
        if too_big:
            return await _error_response(send, self._error())
        seen = 0
        started = False

        async def limited() -> Message:
            nonlocal seen
            message = await receive()
            if message["type"] == "http.request":
                seen += len(message.get("body", b""))
                if seen > self.max_bytes:
                    raise _TooLarge
            return message

        async def tracking_send(message: Message) -> None:
            nonlocal started
            if message["type"] == "http.response.start":
                started = True
            await send(message)

        try:
            await self.app(scope, limited, tracking_send)
        except _TooLarge:
            if not started:
                await _error_response(send, self._error())

    def _error(self) -> APIError:
        return APIError(413, f"the request body is larger than {self.max_bytes} bytes",
                        code="request_too_large")


async def _error_response(send: Send, error: APIError) -> None:
    body = json.dumps(error.body()).encode()
    await send({"type": "http.response.start", "status": error.status,
                "headers": [(b"content-type", b"application/json"),
                            (b"content-length", str(len(body)).encode()),
                            (b"connection", b"close")]})
    await send({"type": "http.response.body", "body": body})


def _json_error(error: APIError) -> JSONResponse:
    return JSONResponse(error.body(), status_code=error.status)


def _sse(obj: Any) -> str:
    return f"data: {json.dumps(obj, ensure_ascii=False)}\n\n"


def create_app(service: Service) -> FastAPI:
    """The ASGI app serving ``service``."""
    app = FastAPI(title="deltamem-serve", docs_url=None, redoc_url=None, openapi_url=None)
    app.add_middleware(BodyLimit, max_bytes=service.config.max_body_bytes)
    model = service.config.model_name

    @app.exception_handler(APIError)
    async def api_error(request: Request, e: APIError):
        return _json_error(e)

    @app.exception_handler(StarletteHTTPException)
    async def http_error(request: Request, e: StarletteHTTPException):
        code = {404: "not_found", 405: "method_not_allowed"}.get(e.status_code)
        return _json_error(APIError(e.status_code, str(e.detail), code=code))

    @app.exception_handler(RequestValidationError)
    async def validation_error(request: Request, e: RequestValidationError):
        first = (e.errors() or [{}])[0]
        param = ".".join(str(p) for p in first.get("loc", ())) or None
        return _json_error(APIError(400, f"invalid request: {first.get('msg', e)}", param=param))

    @app.exception_handler(Exception)
    async def server_error(request: Request, e: Exception):
        log.exception("unexpected error serving %s %s", request.method, request.url.path)
        return _json_error(APIError(500, "internal server error", type="server_error"))

    def namespace(request: Request) -> str:
        return service.namespace(request.headers.get("authorization"))

    async def json_body(request: Request) -> dict[str, Any]:
        raw = await request.body()
        if not raw.strip():
            return {}
        try:
            data = json.loads(raw)
        except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
            raise APIError(400, f"the request body is not valid JSON: {e}") from None
        if not isinstance(data, dict):
            raise APIError(400, "the request body must be a JSON object")
        return data

    def string_field(data: dict, name: str, required: bool = False) -> str | None:
        value = data.get(name)
        if value is None and not required:
            return None
        if not isinstance(value, str):
            raise APIError(400, f"field {name!r} must be a string", param=name)
        return value

    @app.get("/health")
    async def health():
        return {"status": "ok", "live_turns": service.scheduler.live,
                "busy_sessions": service.busy_sessions,
                "session_cache": service.store.cache.stats(),
                "scheduler": dict(service.scheduler.stats, slots=service.config.slots,
                                  prefill_rows=service.scheduler.prefill_rows),
                "uptime_s": round(time.time() - service.started, 1)}

    def model_card() -> dict[str, Any]:
        return {"id": model, "object": "model", "created": int(service.started),
                "owned_by": "deltamem-jax"}

    @app.get("/v1/models")
    async def models(request: Request):
        namespace(request)
        return {"object": "list", "data": [model_card()]}

    @app.get("/v1/models/{model_id:path}")
    async def model_info(model_id: str, request: Request):
        namespace(request)
        if model_id != model:
            raise APIError(404, f"the model {model_id!r} does not exist", param="model",
                           code="model_not_found")
        return model_card()

    @app.post("/v1/chat/completions")
    async def chat(request: Request):
        ns = namespace(request)
        req = parse_chat_request(await request.body())
        if req.model != model:
            raise APIError(404, f"the model {req.model!r} does not exist (this server serves "
                                f"{model!r})", param="model", code="model_not_found")
        sid = request.headers.get(SESSION_HEADER)
        mode = (request.headers.get(MODE_HEADER) or "auto").lower()
        if mode not in ("auto", "full", "append"):
            raise APIError(400, f"X-Session-Mode must be auto, full or append, got {mode!r}",
                           param="X-Session-Mode")
        job = await service.start_turn(ns, sid, req, mode)
        headers = {"X-Session-Id": sid} if sid is not None else {}
        cid, created = completion_id(), int(time.time())
        if not req.stream:
            done, info = await service.run_turn(job)
            return JSONResponse(completion_body(
                cid, model, done.text, done.finish_reason, done.prompt_tokens,
                done.completion_tokens, created, session=_session_view(info)), headers=headers)
        include_usage = bool(req.stream_options and req.stream_options.include_usage)

        async def events():
            yield _sse(chunk_body(cid, model, created, {"role": "assistant", "content": ""}))
            try:
                async for item in service.stream_turn(job):
                    if isinstance(item, tuple):
                        done, info = item
                        body = chunk_body(cid, model, created, {}, done.finish_reason)
                        if info is not None:
                            body["session"] = _session_view(info)
                        yield _sse(body)
                        if include_usage:
                            yield _sse(chunk_body(cid, model, created, {}, choices=False,
                                                  usage_=usage(done.prompt_tokens,
                                                               done.completion_tokens)))
                        yield "data: [DONE]\n\n"
                    else:
                        yield _sse(chunk_body(cid, model, created, {"content": item.text}))
            except APIError as e:                # after the 200: an error event, no [DONE]
                yield _sse(e.body())

        return StreamingResponse(events(), media_type="text/event-stream",
                                 headers=dict(headers, **{"Cache-Control": "no-cache"}))

    @app.get("/v1/sessions")
    async def list_sessions(request: Request):
        ids = await service.sessions(namespace(request))
        return {"object": "list", "data": [{"id": i, "object": "session"} for i in ids]}

    @app.get("/v1/sessions/{sid}")
    async def get_session(sid: str, request: Request):
        return await service.session_info(namespace(request), sid)

    @app.delete("/v1/sessions/{sid}")
    async def delete_session(sid: str, request: Request):
        return await service.delete(namespace(request), sid)

    @app.post("/v1/sessions/{sid}/snapshot")
    async def snapshot(sid: str, request: Request):
        ns = namespace(request)
        data = await json_body(request)
        return await service.snapshot(ns, sid, string_field(data, "name"))

    @app.post("/v1/sessions/{sid}/restore")
    async def restore(sid: str, request: Request):
        ns = namespace(request)
        data = await json_body(request)
        return await service.restore(ns, sid, string_field(data, "snapshot", required=True),
                                     string_field(data, "from_session"))

    return app


def _session_view(info: dict[str, Any] | None) -> dict[str, Any] | None:
    if info is None:
        return None
    keys = ("id", "turns", "tokens_written", "window_tokens", "version", "state_sha256",
            "content_sha256")
    return {k: info[k] for k in keys if k in info}
