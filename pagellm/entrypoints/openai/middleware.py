"""Pure ASGI middleware: API-key check, request head and body limits.

NOTE: pure ASGI rather than starlette's BaseHTTPMiddleware, which wraps streaming responses and
hides client disconnects from the handlers (disconnect must abort the request at once).
"""

from __future__ import annotations

import asyncio
import json
import logging
import secrets

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from pagellm.entrypoints.openai.errors import BodyTooLarge, error_body
from pagellm.entrypoints.openai.serving_engine import ServerState

logger = logging.getLogger(__name__)

# Routes a load balancer or orchestrator probes without credentials.
UNAUTHENTICATED_PATHS = frozenset({"/health"})


async def _send_error(send: Send, status: int, message: str, code: str | None,
                      headers: dict[str, str] | None = None) -> None:
    body = json.dumps(error_body(status, message, code=code)).encode()
    raw_headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode())]
    raw_headers += [(k.lower().encode(), v.encode()) for k, v in (headers or {}).items()]
    await send({"type": "http.response.start", "status": status, "headers": raw_headers})
    await send({"type": "http.response.body", "body": body})


class APIKeyMiddleware:
    """Every route but /health needs ``Authorization: Bearer <key>`` when a key is configured."""

    def __init__(self, app: ASGIApp, api_key: str) -> None:
        self.app = app
        self.expected = f"Bearer {api_key}".encode()

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http" or scope.get("method") == "OPTIONS" or scope["path"] in UNAUTHENTICATED_PATHS:
            await self.app(scope, receive, send)
            return
        given = dict(scope["headers"]).get(b"authorization", b"")
        # NOTE: constant-time comparison, so the key cannot be guessed byte by byte from timings.
        if not secrets.compare_digest(given, self.expected):
            message = "missing API key" if not given else "invalid API key"
            await _send_error(send, 401, f"{message}: send 'Authorization: Bearer <key>'", "invalid_api_key",
                              {"WWW-Authenticate": "Bearer"})
            return
        await self.app(scope, receive, send)


class ShutdownCancelMiddleware:
    """Ends a request cleanly when uvicorn cancels it at the end of the shutdown grace period.

    The cancellation already aborted the engine request (the stream's close ran on the way out).
    The client then gets a 503, or, mid-stream, an SSE error event and a properly ended body,
    instead of a cut connection (and uvicorn logs no "Exception in ASGI application").
    """

    def __init__(self, app: ASGIApp, state: ServerState) -> None:
        self.app = app
        self.state = state

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = ended = False

        async def tracking_send(message: Message) -> None:
            nonlocal started, ended
            if message["type"] == "http.response.start":
                started = True
            elif message["type"] == "http.response.body" and not message.get("more_body", False):
                ended = True
            await send(message)

        try:
            await self.app(scope, receive, tracking_send)
        except asyncio.CancelledError:
            if not self.state.draining:
                raise
            logger.info("%s %s aborted: the shutdown grace period ended", scope.get("method"), scope.get("path"))
            message = "the server shut down before the request finished"
            if not started:
                await _send_error(send, 503, message, "shutting_down", {"Retry-After": "5"})
            elif not ended:
                event = f"data: {json.dumps(error_body(503, message, code='shutting_down'))}\n\n".encode()
                await send({"type": "http.response.body", "body": event, "more_body": True})
                await send({"type": "http.response.body", "body": b"", "more_body": False})


class BodyLimitMiddleware:
    """413 for a body over the limit: up front from Content-Length, or while a chunked body streams in."""

    def __init__(self, app: ASGIApp, max_body_bytes: int) -> None:
        self.app = app
        self.max_body_bytes = max_body_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        length = dict(scope["headers"]).get(b"content-length")
        if length is not None:
            try:
                too_large = int(length) > self.max_body_bytes
            except ValueError:
                await _send_error(send, 400, "invalid Content-Length header", None)
                return
            if too_large:
                await _send_error(send, 413, f"request body is larger than {self.max_body_bytes} bytes",
                                  "request_too_large")
                return
            await self.app(scope, receive, send)
            return

        received = 0
        limit = self.max_body_bytes

        async def limited_receive() -> Message:
            nonlocal received
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    raise BodyTooLarge(f"request body is larger than {limit} bytes")
            return message

        await self.app(scope, limited_receive, send)


class HeaderLimitMiddleware:
    """431 for a request head (request line and headers) over the limit.

    NOTE: h11 refuses a head over the limit only while it is still arriving (PagellmH11Protocol answers
    that); one that arrived whole in one read is parsed, and refused here, so the limit holds either way.
    """

    def __init__(self, app: ASGIApp, max_header_bytes: int) -> None:
        self.app = app
        self.max_header_bytes = max_header_bytes

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http":
            size = len(scope.get("method", "")) + len(scope.get("raw_path", b"")) + len(scope.get("query_string", b""))
            size += sum(len(name) + len(value) + 4 for name, value in scope["headers"])  # "name: value\r\n"
            if size > self.max_header_bytes:
                await _send_error(send, 431, f"the request head (request line and headers) is larger than "
                                             f"{self.max_header_bytes} bytes; send fewer or shorter headers",
                                  "request_header_fields_too_large", {"Connection": "close"})
                return
        await self.app(scope, receive, send)
