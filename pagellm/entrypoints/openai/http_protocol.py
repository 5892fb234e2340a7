"""uvicorn's h11 protocol, with a readable answer to a request head it cannot parse.

uvicorn answers a malformed or oversize request head with a plain-text 400 and closes the socket at
once. When the client is still sending (a 200 KB header arrives in several reads), closing with unread
bytes makes the kernel send a reset, and the client sees "connection reset" instead of the answer.
Here the answer is an OpenAI-shaped JSON error (431 for a head over the limit, 400 otherwise), then a
lingering close: the rest of the request is read and dropped for a while, so the client reads the answer.
"""

from __future__ import annotations

import asyncio
import http
import json
import logging
from typing import Any

import h11
from uvicorn.protocols.http.h11_impl import H11Protocol

from pagellm.entrypoints.openai.errors import error_body

logger = logging.getLogger(__name__)

# After an error answer, bytes still read and dropped, and for how long, before the socket closes anyway.
LINGER_MAX_BYTES = 16 << 20
LINGER_SECONDS = 5.0


class _ErrorKeepingConnection(h11.Connection):
    """h11.Connection that keeps the protocol error it raised (its status hint says 431 or 400)."""

    last_error: h11.RemoteProtocolError | None = None

    def next_event(self) -> Any:
        try:
            return super().next_event()
        except h11.RemoteProtocolError as exc:
            self.last_error = exc
            raise


class PagellmH11Protocol(H11Protocol):
    """H11Protocol whose answer to a bad request head is JSON with the right status, then a lingering close."""

    def __init__(self, *args: Any, **kwargs: Any) -> None:
        super().__init__(*args, **kwargs)
        self.max_head_bytes = self.config.h11_max_incomplete_event_size
        assert self.max_head_bytes is not None, "build the uvicorn.Config with server_config()"
        self.conn = _ErrorKeepingConnection(h11.SERVER, self.max_head_bytes)
        self.linger_bytes_left: int | None = None  # set once the error answer is sent
        self.linger_timer: asyncio.TimerHandle | None = None

    def data_received(self, data: bytes) -> None:
        if self.linger_bytes_left is None:
            super().data_received(data)
            return
        self.linger_bytes_left -= len(data)  # the rest of a request already answered: drop it
        if self.linger_bytes_left <= 0:
            self.transport.close()

    def connection_lost(self, exc: Exception | None) -> None:
        if self.linger_timer is not None:
            self.linger_timer.cancel()
        super().connection_lost(exc)

    def send_400_response(self, msg: str) -> None:
        if self.cycle is not None and not self.cycle.response_complete:
            # NOTE: the head parsed and the app runs, so the error is in the body (bad chunked framing): to the
            # app the request is gone (its send is dropped, its receive says disconnect).
            self.cycle.disconnected = True
            self.cycle.message_event.set()
            if self.cycle.response_started:  # the status line is out: nothing to answer with but a close
                self.transport.close()
                return
        error = self.conn.last_error
        status = error.error_status_hint if error is not None else 400
        if status == 431:
            message = (f"the request head (request line and headers) is larger than {self.max_head_bytes} bytes; "
                       "send fewer or shorter headers")
            code = "request_header_fields_too_large"
        else:
            status = 400
            message = f"invalid HTTP request: {error or msg}"
            code = "invalid_http_request"
        logger.info("%s: answered %d", message, status)  # uvicorn has logged a warning already
        body = json.dumps(error_body(status, message, code=code)).encode()
        headers = [(b"content-type", b"application/json"), (b"content-length", str(len(body)).encode()),
                   (b"connection", b"close")]
        for event in (h11.Response(status_code=status, headers=headers, reason=http.HTTPStatus(status).phrase),
                      h11.Data(data=body), h11.EndOfMessage()):
            self.transport.write(self.conn.send(event))
        # NOTE: half-close, so the client sees the answer end; keep reading until it closes its side.
        if self.transport.can_write_eof():
            self.transport.write_eof()
        self.linger_bytes_left = LINGER_MAX_BYTES
        self.linger_timer = self.loop.call_later(LINGER_SECONDS, self.transport.close)
