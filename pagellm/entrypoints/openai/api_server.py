"""The OpenAI-compatible HTTP server: FastAPI routes over one AsyncLLM, served by uvicorn.

``pagellm serve`` calls run_server(args); tests and embedders call build_app(engine, ...) and
run it with their own uvicorn.Server.
"""

from __future__ import annotations

import argparse
import asyncio
import contextlib
import logging
import signal
from collections.abc import AsyncIterator, Awaitable
from typing import Any, TypeVar

import uvicorn
from fastapi import FastAPI, Request
from starlette.responses import Response, StreamingResponse

import pagellm
from pagellm.engine.async_llm import AsyncLLM
from pagellm.entrypoints.openai.errors import install_error_handlers
from pagellm.entrypoints.openai.metrics import ServerMetrics
from pagellm.entrypoints.openai.middleware import APIKeyMiddleware, BodyLimitMiddleware, ShutdownCancelMiddleware
from pagellm.entrypoints.openai.protocol import (
    ChatCompletionRequest,
    CompletionRequest,
    DetokenizeRequest,
    ModelCard,
    ModelList,
    TokenizeRequest,
)
from pagellm.entrypoints.openai.serving_chat import OpenAIServingChat
from pagellm.entrypoints.openai.serving_completion import OpenAIServingCompletion
from pagellm.entrypoints.openai.serving_engine import ServerState, TokenStrings
from pagellm.entrypoints.openai.serving_tokenization import OpenAIServingTokenization

logger = logging.getLogger(__name__)

T = TypeVar("T")

_JSON = "application/json"
_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}


class ClientDisconnected(Exception):
    """The client closed the connection before the response was ready."""


async def _wait_for_disconnect(request: Request) -> None:
    while True:
        message = await request.receive()
        if message["type"] == "http.disconnect":
            return


async def run_until_disconnect(request: Request, work: Awaitable[T]) -> T:
    """Await work, cancelling it as soon as the client disconnects (which aborts its engine requests).

    NOTE: FastAPI has read the body already, so the next ASGI message can only be the disconnect.
    """
    handler = asyncio.ensure_future(work)
    listener = asyncio.ensure_future(_wait_for_disconnect(request))
    try:
        await asyncio.wait({handler, listener}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        listener.cancel()
        if not handler.done():
            handler.cancel()
    if handler.cancelled():
        raise ClientDisconnected()
    return handler.result()


def _json(model: Any, status_code: int = 200) -> Response:
    return Response(content=model.model_dump_json(), media_type=_JSON, status_code=status_code)


def _respond(result: Any) -> Response:
    if isinstance(result, AsyncIterator):
        return StreamingResponse(result, media_type="text/event-stream", headers=_SSE_HEADERS)
    return _json(result)


def build_app(engine: AsyncLLM, served_model_names: list[str] | None = None, api_key: str | None = None,
              max_waiting_requests: int = 256, max_request_body_bytes: int = 8 << 20,
              state: ServerState | None = None) -> FastAPI:
    """The FastAPI app; its lifespan starts the engine thread and stops it on shutdown."""
    names = list(served_model_names or [engine.model_name])
    state = state or ServerState()
    token_strings = TokenStrings(engine.tokenizer)
    shared = dict(engine=engine, served_model_names=names, max_waiting_requests=max_waiting_requests,
                  state=state, token_strings=token_strings)
    completion = OpenAIServingCompletion(**shared)
    chat = OpenAIServingChat(**shared)
    tokenization = OpenAIServingTokenization(**shared)
    metrics = ServerMetrics(names[0], lambda: engine.stats, lambda: engine.num_waiting)
    engine.observer = metrics.observe

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            yield
        finally:
            state.draining = True
            await engine.shutdown()

    app = FastAPI(title="pagellm", version=pagellm.__version__, lifespan=lifespan)
    app.state.server_state = state
    app.state.engine = engine
    app.state.served_model_names = names
    install_error_handlers(app)

    @app.exception_handler(ClientDisconnected)
    async def _gone(_: Request, __: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"

    @app.get("/health")
    async def health() -> Response:
        return Response(status_code=200 if engine.is_running else 503)

    @app.get("/version")
    async def version() -> dict[str, str]:
        return {"version": pagellm.__version__}

    @app.get("/v1/models")
    async def models() -> Response:
        root = str(engine.engine.source.path) if hasattr(engine.engine, "source") else None
        cards = [ModelCard(id=name, root=root, max_model_len=completion.context_limit) for name in names]
        return _json(ModelList(data=cards))

    @app.post("/v1/completions")
    async def completions(req: CompletionRequest, raw: Request) -> Response:
        return _respond(await run_until_disconnect(raw, completion.create_completion(req)))

    @app.post("/v1/chat/completions")
    async def chat_completions(req: ChatCompletionRequest, raw: Request) -> Response:
        return _respond(await run_until_disconnect(raw, chat.create_chat_completion(req)))

    @app.post("/tokenize")
    async def tokenize(req: TokenizeRequest) -> Response:
        return _json(tokenization.tokenize(req))

    @app.post("/detokenize")
    async def detokenize(req: DetokenizeRequest) -> Response:
        return _json(tokenization.detokenize(req))

    @app.get("/tokenizer_info")
    async def tokenizer_info() -> dict[str, Any]:
        return tokenization.tokenizer_info()

    @app.get("/metrics")
    async def get_metrics() -> Response:
        return Response(content=metrics.render(), media_type=metrics.content_type)

    @app.post("/reset_prefix_cache")
    async def reset_prefix_cache() -> dict[str, bool]:
        return {"reset": await engine.reset_prefix_cache()}

    # Outermost first: the body limit runs before auth so an oversize body is never buffered.
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=max_request_body_bytes)
    app.add_middleware(ShutdownCancelMiddleware, state=state)
    return app


def build_async_llm(**engine_kwargs: Any) -> AsyncLLM:
    """An AsyncLLM over LLM(**engine_kwargs)'s engine, loaded on the thread that will step it."""
    from pagellm.entrypoints.llm import LLM

    return AsyncLLM.build(lambda: LLM(**engine_kwargs).llm_engine)


class GracefulServer(uvicorn.Server):
    """uvicorn.Server that marks the app as draining on SIGTERM/SIGINT before uvicorn's own shutdown.

    uvicorn then stops accepting, lets in-flight responses finish for timeout_graceful_shutdown
    seconds, cancels the rest (which aborts their engine requests), and runs the lifespan shutdown.
    """

    def __init__(self, config: uvicorn.Config, state: ServerState) -> None:
        super().__init__(config)
        self.app_state = state

    def handle_exit(self, sig: int, frame: Any) -> None:
        self.app_state.draining = True
        super().handle_exit(sig, frame)


def run_server(args: argparse.Namespace) -> int:
    """`pagellm serve`: load the model, serve until SIGTERM/SIGINT, exit 0 after a clean shutdown."""
    from pagellm.entrypoints.cli import engine_kwargs

    logging.getLogger("pagellm").setLevel(logging.INFO)
    engine = build_async_llm(**engine_kwargs(args))
    state = ServerState()
    app = build_app(engine, served_model_names=args.served_model_name, api_key=args.api_key,
                    max_waiting_requests=args.max_waiting_requests,
                    max_request_body_bytes=args.max_request_body_bytes, state=state)
    config = uvicorn.Config(app, host=args.host, port=args.port, log_level=args.log_level,
                            timeout_graceful_shutdown=args.shutdown_grace_seconds,
                            timeout_keep_alive=args.timeout_keep_alive)
    server = GracefulServer(config, state)
    # NOTE: uvicorn re-raises the captured signal after a graceful shutdown, through the handler that
    # was installed before it started; ignoring it there turns a SIGTERM shutdown into exit code 0.
    for sig in (signal.SIGTERM, signal.SIGINT):
        signal.signal(sig, lambda *_: None)
    logger.info("serving %s on http://%s:%d", ", ".join(app.state.served_model_names), args.host, args.port)
    server.run()
    return 0
