"""The OpenAI chat-completions wire format: request validation, errors, response bodies.

Requests are validated strictly (a field of the wrong type is a 400, not a
coercion); fields this server does not know are ignored, as OpenAI-compatible
servers do, but known features it does not implement (``n > 1``, tools,
logprobs, penalties, logit bias, JSON mode) are refused with a 400 that names
the field. Every error body has OpenAI's shape:
``{"error": {"message", "type", "param", "code"}}``.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field, ValidationError

__all__ = ["APIError", "ChatRequest", "Conflict", "chunk_body", "completion_body",
           "new_messages", "normalise_messages", "parse_chat_request"]

ROLES = ("system", "developer", "user", "assistant")
MAX_STOPS = 4
MAX_STOP_CHARS = 256


class APIError(Exception):
    """An error answered with an OpenAI-style body."""

    def __init__(self, status: int, message: str, *, type: str = "invalid_request_error",
                 param: str | None = None, code: str | None = None):
        super().__init__(message)
        self.status, self.message, self.type, self.param, self.code = (status, message, type,
                                                                       param, code)

    def body(self) -> dict[str, Any]:
        return {"error": {"message": self.message, "type": self.type, "param": self.param,
                          "code": self.code}}


class Conflict(APIError):
    """The history a client sent contradicts what its session holds."""

    def __init__(self, message: str):
        super().__init__(409, message, type="invalid_request_error", param="messages",
                         code="session_history_conflict")


class _Strict(BaseModel):
    model_config = ConfigDict(strict=True, extra="ignore", allow_inf_nan=False)


class TextPart(_Strict):
    type: Literal["text"]
    text: str


class Message(_Strict):
    role: str
    content: str | list[TextPart] | None = None
    name: str | None = None


class StreamOptions(_Strict):
    include_usage: bool = False


class ChatRequest(_Strict):
    model: str
    messages: list[Message] = Field(min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    temperature: float | None = Field(None, ge=0, le=2)
    top_p: float | None = Field(None, gt=0, le=1)
    seed: int | None = Field(None, ge=-(2 ** 63), lt=2 ** 63)
    stop: str | list[str] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: int | None = Field(1, ge=1)
    frequency_penalty: float | None = None
    presence_penalty: float | None = None
    logprobs: bool | None = None
    top_logprobs: int | None = None
    logit_bias: dict[str, float] | None = None
    tools: list[Any] | None = None
    tool_choice: Any = None
    response_format: dict[str, Any] | None = None
    user: str | None = None
    ignore_eos: bool | None = None   # an extension (as in vLLM): replies of max_tokens tokens
    write_memory: bool | None = None  # an extension: False = this turn only reads the memory


def parse_chat_request(body: bytes) -> ChatRequest:
    """A validated :class:`ChatRequest` from a raw body, or an :class:`APIError` (400)."""
    try:
        data = json.loads(body)
    except (json.JSONDecodeError, UnicodeDecodeError, RecursionError) as e:
        raise APIError(400, f"the request body is not valid JSON: {e}") from None
    if not isinstance(data, dict):
        raise APIError(400, f"the request body must be a JSON object, got "
                            f"{type(data).__name__}")
    try:
        req = ChatRequest.model_validate(data)
    except ValidationError as e:
        first = e.errors()[0]
        param = ".".join(str(p) for p in first["loc"]) or None
        raise APIError(400, f"invalid field {param!r}: {first['msg']}", param=param) from None
    except RecursionError:
        raise APIError(400, "the request body is nested too deeply") from None
    _refuse_unsupported(req)
    return req


def _refuse_unsupported(req: ChatRequest) -> None:
    def no(param: str, what: str):
        raise APIError(400, f"{what} is not supported by this server", param=param,
                       code="unsupported_parameter")

    if req.n not in (None, 1):
        no("n", "n > 1 (several choices)")
    if req.logprobs or req.top_logprobs:
        no("logprobs", "logprobs")
    if req.frequency_penalty or req.presence_penalty:
        no("frequency_penalty" if req.frequency_penalty else "presence_penalty",
           "a non-zero frequency/presence penalty")
    if req.logit_bias:
        no("logit_bias", "logit_bias")
    if req.tools or (req.tool_choice not in (None, "none")):
        no("tools", "tool calling")
    if req.response_format not in (None, {"type": "text"}):
        no("response_format", "a response_format other than text")
    for i, m in enumerate(req.messages):
        if m.role not in ROLES:
            raise APIError(400, f"messages[{i}].role {m.role!r} is not supported (use one of "
                                f"{', '.join(ROLES)})", param=f"messages.{i}.role")
        if m.content is None:
            raise APIError(400, f"messages[{i}] has no content", param=f"messages.{i}.content")
        texts = [m.content] if isinstance(m.content, str) else [p.text for p in m.content]
        try:
            for t in texts:
                t.encode("utf-8")
        except UnicodeEncodeError:
            raise APIError(400, f"messages[{i}].content is not valid Unicode (a lone "
                                f"surrogate?)", param=f"messages.{i}.content") from None
    stops = stop_strings(req)
    if len(stops) > MAX_STOPS or any(not s or len(s) > MAX_STOP_CHARS for s in stops):
        raise APIError(400, f"stop takes at most {MAX_STOPS} non-empty strings of at most "
                            f"{MAX_STOP_CHARS} characters", param="stop")


def stop_strings(req: ChatRequest) -> tuple[str, ...]:
    if req.stop is None:
        return ()
    return (req.stop,) if isinstance(req.stop, str) else tuple(req.stop)


def normalise_messages(messages: list[Message]) -> list[dict[str, str]]:
    """``{"role", "content"}`` dicts: text parts joined by newlines, ``developer`` → system."""
    out = []
    for m in messages:
        content = m.content if isinstance(m.content, str) else "\n".join(p.text for p in m.content)
        out.append({"role": "system" if m.role == "developer" else m.role, "content": content})
    return out


def new_messages(held: list[dict[str, str]], sent: list[dict[str, str]],
                 mode: str) -> list[dict[str, str]]:
    """The messages of ``sent`` the session has not ingested yet.

    ``mode``: ``"full"`` — ``sent`` is the whole conversation and must begin with
    what the session holds (a :class:`Conflict` otherwise); ``"append"`` — ``sent``
    is only the new messages; ``"auto"`` — full if ``sent`` begins with the held
    history or with its first message, append otherwise.
    """
    n = len(held)
    if mode == "append" or (mode == "auto" and n and (not sent or sent[0] != held[0])):
        return list(sent)
    if sent[:n] == held:
        return list(sent[n:])
    if len(sent) < n and sent == held[:len(sent)]:
        raise Conflict(f"the session holds {n} messages; the {len(sent)} sent are only its "
                       f"beginning (send the whole history, or only the new messages with "
                       f"X-Session-Mode: append)")
    i = next(i for i in range(min(n, len(sent))) if sent[i] != held[i])
    raise Conflict(f"message {i} ({sent[i]['role']}) differs from the session's message {i} "
                   f"({held[i]['role']}); the session holds {n} messages. Send the history "
                   f"the session holds plus new messages, only new messages (X-Session-Mode: "
                   f"append), or use another session")


def completion_id() -> str:
    return f"chatcmpl-{uuid.uuid4().hex}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {"prompt_tokens": prompt_tokens, "completion_tokens": completion_tokens,
            "total_tokens": prompt_tokens + completion_tokens}


def completion_body(cid: str, model: str, text: str, finish_reason: str, prompt_tokens: int,
                    completion_tokens: int, created: int | None = None,
                    session: dict[str, Any] | None = None) -> dict[str, Any]:
    body = {"id": cid, "object": "chat.completion", "created": created or int(time.time()),
            "model": model,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": text},
                         "finish_reason": finish_reason, "logprobs": None}],
            "usage": usage(prompt_tokens, completion_tokens)}
    if session is not None:
        body["session"] = session
    return body


def chunk_body(cid: str, model: str, created: int, delta: dict[str, Any],
               finish_reason: str | None = None, *, usage_: dict[str, int] | None = None,
               choices: bool = True) -> dict[str, Any]:
    body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created,
                            "model": model, "choices": []}
    if choices:
        body["choices"] = [{"index": 0, "delta": delta, "finish_reason": finish_reason,
                            "logprobs": None}]
    if usage_ is not None:
        body["usage"] = usage_
    return body
