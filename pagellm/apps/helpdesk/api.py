"""The help desk's HTTP surface: the chat page at /, its streaming chat endpoint, hand-off and feedback, and the
desk as an OpenAI chat model (`model="helpdesk"` on /v1/chat/completions, streaming or not).

Extra field (documented in docs/helpdesk.md): every chat.completion and the first and last chunk of a stream
carry `"helpdesk": {"mode", "sources", "confidence", "query", "session_id", "turn_id"}`.
"""

from __future__ import annotations

import json
import time
import uuid
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any, Literal

from fastapi import APIRouter, FastAPI
from fastapi.responses import StreamingResponse
from pydantic import BaseModel, ConfigDict, Field

from pagellm.apps.helpdesk.service import HelpdeskService, SessionNotFound, Turn, check_question
from pagellm.apps.web import mount_page
from pagellm.entrypoints.openai.errors import APIError, install_error_handlers, stream_error_event
from pagellm.errors import InvalidRequest

STATIC_DIR = Path(__file__).parent / "static"
MODEL_NAME = "helpdesk"


class ChatRequest(BaseModel):
    """POST /v1/helpdesk/chat: one question of a session (a new session when session_id is absent)."""

    model_config = ConfigDict(extra="forbid")
    question: str
    session_id: str | None = None
    stream: bool = True
    max_tokens: int | None = Field(None, ge=1, le=1024)


class FeedbackRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    rating: Literal[1, -1]
    session_id: str | None = None
    turn_id: int | None = None
    comment: str = Field("", max_length=2000)


class HandoffRequest(BaseModel):
    model_config = ConfigDict(extra="forbid")
    session_id: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")
    role: str
    content: str | list[dict[str, Any]] | None = None


class CompletionRequest(BaseModel):
    """The OpenAI chat request; sampling fields a client sends are accepted and ignored (answers are greedy)."""

    model_config = ConfigDict(extra="allow")
    model: str
    messages: list[Message]
    stream: bool = False
    max_tokens: int | None = Field(None, ge=1, le=1024)
    max_completion_tokens: int | None = Field(None, ge=1, le=1024)
    session_id: str | None = None  # extra: continue a stored session


def _text(content: str | list[dict[str, Any]] | None) -> str:
    if isinstance(content, list):
        return "".join(p.get("text", "") for p in content if isinstance(p, dict) and p.get("type") == "text")
    return content or ""


def _api_error(exc: InvalidRequest) -> APIError:
    if isinstance(exc, SessionNotFound):
        return APIError(404, exc.message, exc.param, code="session_not_found")
    return APIError(400, exc.message, exc.param)


def helpdesk_router(service: HelpdeskService) -> APIRouter:
    router = APIRouter()

    def precheck(question: Any, session_id: str | None) -> list[dict[str, Any]]:
        """Validate before a stream starts, so bad input gets its 4xx status, not an error event."""
        try:
            check_question(question)
            return service.history(session_id)
        except InvalidRequest as exc:
            raise _api_error(exc) from exc

    @router.post("/v1/helpdesk/chat")
    async def chat(request: ChatRequest) -> Any:
        precheck(request.question, request.session_id)
        events = service.stream(request.question, request.session_id, request.max_tokens)
        if not request.stream:
            turn = None
            async for event in events:
                turn = event.turn if event.kind == "done" else turn
            assert turn is not None
            return turn.to_json()

        async def sse() -> AsyncIterator[str]:
            try:
                async for event in events:
                    if event.kind == "delta":
                        body: dict[str, Any] = {"type": "delta", "text": event.text}
                    else:
                        assert event.turn is not None
                        body = {"type": event.kind, **event.turn.to_json()}
                    yield f"data: {json.dumps(body)}\n\n"
            except Exception as exc:  # noqa: BLE001 - the status is sent already: report in the stream
                yield stream_error_event(exc)

        return StreamingResponse(sse(), media_type="text/event-stream")

    @router.get("/v1/helpdesk/sessions/{session_id}")
    async def session(session_id: str) -> dict[str, Any]:
        return {"session_id": session_id, "turns": precheck("x", session_id)}

    @router.post("/v1/helpdesk/handoff")
    async def handoff(request: HandoffRequest) -> dict[str, Any]:
        precheck("x", request.session_id)
        return {"session_id": request.session_id, "state": "handoff", "turn_id": service.handoff(request.session_id)}

    @router.post("/v1/helpdesk/feedback")
    async def feedback(request: FeedbackRequest) -> dict[str, Any]:
        try:
            feedback_id = service.feedback(request.session_id, request.turn_id, request.rating, request.comment)
        except InvalidRequest as exc:
            raise _api_error(exc) from exc
        return {"feedback_id": feedback_id}

    @router.get("/v1/models")
    async def models() -> dict[str, Any]:
        return {"object": "list", "data": [{"id": MODEL_NAME, "object": "model", "created": 0,
                                            "owned_by": "pagellm"}]}

    @router.post("/v1/chat/completions")
    async def completions(request: CompletionRequest) -> Any:
        if request.model != MODEL_NAME:
            raise APIError(404, f"model {request.model!r} does not exist; this server serves {MODEL_NAME!r}",
                           "model", code="model_not_found")
        users = [i for i, m in enumerate(request.messages) if m.role == "user"]
        if not users:
            raise APIError(400, "messages has no user message", "messages")
        question = _text(request.messages[users[-1]].content)
        session_id = request.session_id
        precheck(question, session_id)
        if session_id is None and len(users) > 1:
            # NOTE: an OpenAI client sends the whole conversation: its earlier user turns drive the follow-up
            # rewrite, as a stored session's would
            session_id = service.store.create_session()
            for i in users[:-1]:
                service.store.add_turn(session_id, "user", _text(request.messages[i].content), {})
        max_tokens = request.max_completion_tokens or request.max_tokens
        events = service.stream(question, session_id, max_tokens)
        cid, created = f"chatcmpl-{uuid.uuid4().hex}", int(time.time())
        if not request.stream:
            turn = None
            async for event in events:
                turn = event.turn if event.kind == "done" else turn
            assert turn is not None
            return _completion(cid, created, turn)

        async def sse() -> AsyncIterator[str]:
            try:
                async for event in events:
                    if event.kind == "plan":
                        assert event.turn is not None
                        yield _chunk(cid, created, {"role": "assistant", "content": ""}, None, event.turn)
                    elif event.kind == "delta":
                        yield _chunk(cid, created, {"content": event.text}, None)
                    else:
                        assert event.turn is not None
                        yield _chunk(cid, created, {}, _finish(event.turn), event.turn)
                yield "data: [DONE]\n\n"
            except Exception as exc:  # noqa: BLE001 - the status is sent already: report in the stream
                yield stream_error_event(exc)

        return StreamingResponse(sse(), media_type="text/event-stream")

    return router


def _finish(turn: Turn) -> str:
    return turn.finish_reason


def _extra(turn: Turn) -> dict[str, Any]:
    out = turn.to_json()
    return {k: out[k] for k in ("mode", "sources", "confidence", "query", "session_id", "turn_id")}


def _completion(cid: str, created: int, turn: Turn) -> dict[str, Any]:
    return {"id": cid, "object": "chat.completion", "created": created, "model": MODEL_NAME,
            "choices": [{"index": 0, "message": {"role": "assistant", "content": turn.answer},
                         "finish_reason": _finish(turn), "logprobs": None}],
            "usage": {"prompt_tokens": turn.num_prompt_tokens, "completion_tokens": turn.num_completion_tokens,
                      "total_tokens": turn.num_prompt_tokens + turn.num_completion_tokens,
                      "prompt_tokens_details": {"cached_tokens": turn.num_cached_tokens}},
            "helpdesk": _extra(turn)}


def _chunk(cid: str, created: int, delta: dict[str, Any], finish: str | None, turn: Turn | None = None) -> str:
    body: dict[str, Any] = {"id": cid, "object": "chat.completion.chunk", "created": created, "model": MODEL_NAME,
                            "choices": [{"index": 0, "delta": delta, "finish_reason": finish, "logprobs": None}]}
    if turn is not None:
        body["helpdesk"] = _extra(turn)
    return f"data: {json.dumps(body)}\n\n"


def build_helpdesk_app(service: HelpdeskService) -> FastAPI:
    """The standalone app of `pagellm helpdesk serve`: router + the chat page; starts and stops the engine."""

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        if service.generator is not None:
            service.generator.llm.start()
        yield
        if service.generator is not None:
            await service.generator.llm.shutdown()

    app = FastAPI(title="pagellm help desk", lifespan=lifespan)
    install_error_handlers(app)
    app.include_router(helpdesk_router(service))
    mount_page(app, STATIC_DIR)
    return app
