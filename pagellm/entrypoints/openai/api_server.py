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
from starlette.responses import PlainTextResponse, Response, StreamingResponse

import pagellm
from pagellm.engine.async_llm import AsyncLLM
from pagellm.entrypoints.openai.errors import APIError, install_error_handlers
from pagellm.entrypoints.openai.http_protocol import PagellmH11Protocol
from pagellm.entrypoints.openai.metrics import ServerMetrics
from pagellm.entrypoints.openai.middleware import (
    APIKeyMiddleware,
    BodyLimitMiddleware,
    HeaderLimitMiddleware,
    ShutdownCancelMiddleware,
)
from pagellm.entrypoints.openai.openapi_docs import errors, install_openapi, json_ok, json_or_stream
from pagellm.entrypoints.openai.protocol import (
    ChatCompletionChunk,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ClassificationRequest,
    ClassificationResponse,
    CompletionRequest,
    CompletionResponse,
    DetokenizeRequest,
    DetokenizeResponse,
    EmbeddingRequest,
    EmbeddingResponse,
    ModelCard,
    ModelList,
    TokenizeRequest,
    TokenizeResponse,
)
from pagellm.entrypoints.openai.serving_chat import OpenAIServingChat
from pagellm.entrypoints.openai.serving_classification import OpenAIServingZeroShotClassification
from pagellm.entrypoints.openai.serving_completion import OpenAIServingCompletion
from pagellm.entrypoints.openai.serving_engine import ServerState, TokenStrings
from pagellm.entrypoints.openai.serving_lora import LoRAModels, add_lora_routes, parse_lora_modules
from pagellm.entrypoints.openai.serving_pooling import OpenAIServingPooling
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
            # NOTE: cancel() only asks; wait until the handler has unwound (its engine requests aborted),
            # else it is neither cancelled nor done below.
            await asyncio.wait({handler})
    if handler.cancelled():
        raise ClientDisconnected()
    return handler.result()


def _json(model: Any, status_code: int = 200) -> Response:
    return Response(content=model.model_dump_json(), media_type=_JSON, status_code=status_code)


def _respond(result: Any) -> Response:
    if isinstance(result, AsyncIterator):
        return StreamingResponse(result, media_type="text/event-stream", headers=_SSE_HEADERS)
    return _json(result)


def build_app(engine: AsyncLLM, served_model_names: list[str] | None = None,
              api_key: str | None = None, max_waiting_requests: int = 256, max_request_body_bytes: int = 8 << 20,
              state: ServerState | None = None, lora_modules: list[tuple[str, str]] | None = None,
              max_header_bytes: int = 64 << 10, default_max_tokens: int | None = None) -> FastAPI:
    """The FastAPI app; its lifespan starts the engine and stops it on shutdown. Serve it with server_config().

    An AsyncLLM of task generate serves generation (and zero-shot /classify); of task embed or classify,
    /v1/embeddings or /classify.
    default_max_tokens: tokens to generate when a request sets no limit (None: up to the context window).
    """
    names = list(served_model_names or [engine.model_name])
    state = state or ServerState()
    # NOTE: a pooling model has no scheduler: its stats stay zero. Data-parallel replicas report one series each.
    metrics = ServerMetrics(names[0], lambda: engine.stats, lambda: engine.num_waiting,
                            replica_stats=getattr(engine, "replica_stats", None),
                            routing_counters=getattr(engine, "routing_counters", None))
    engine.observer = metrics.observe
    generate = engine.task == "generate"

    loras = LoRAModels(engine, names) if generate else None
    if lora_modules and (loras is None or not loras.enabled):
        raise ValueError("--lora-modules needs a generate model built with LoRA enabled")

    @contextlib.asynccontextmanager
    async def lifespan(_: FastAPI) -> AsyncIterator[None]:
        engine.start()
        try:
            for name, path in lora_modules or []:
                await loras.load(name, path)  # a bad adapter fails startup, before any request
            yield
        finally:
            state.draining = True
            await engine.shutdown()

    app = FastAPI(title="pagellm", version=pagellm.__version__, lifespan=lifespan)
    app.state.server_state = state
    app.state.engine = engine
    app.state.served_model_names = names
    app.state.max_header_bytes = max_header_bytes
    install_error_handlers(app)
    install_openapi(app)

    @app.exception_handler(ClientDisconnected)
    async def _gone(_: Request, __: ClientDisconnected) -> Response:
        return Response(status_code=499)  # nobody reads it; nginx's "client closed request"

    @app.get("/health", response_class=Response,
             responses={200: {"description": "The engine is running (empty body)"},
                        503: {"description": "The engine is not running (empty body)"}})
    async def health() -> Response:
        return Response(status_code=200 if engine.is_running else 503)

    @app.get("/version", responses=errors())
    async def version() -> dict[str, str]:
        return {"version": pagellm.__version__}

    @app.get("/metrics", response_class=PlainTextResponse, responses=errors())
    async def get_metrics() -> Response:
        return Response(content=metrics.render(), media_type=metrics.content_type)

    if generate:
        _add_generate_routes(app, engine, names, max_waiting_requests, state, loras, default_max_tokens)
    else:
        _add_pooling_routes(app, engine, names, max_waiting_requests, state)

    # Outermost first: the body limit runs before auth so an oversize body is never buffered.
    if api_key:
        app.add_middleware(APIKeyMiddleware, api_key=api_key)
    app.add_middleware(BodyLimitMiddleware, max_body_bytes=max_request_body_bytes)
    app.add_middleware(HeaderLimitMiddleware, max_header_bytes=max_header_bytes)
    app.add_middleware(ShutdownCancelMiddleware, state=state)
    return app


def server_config(app: FastAPI, **kwargs: Any) -> uvicorn.Config:
    """uvicorn's config for an app of build_app: its h11 protocol answers a bad or oversize request head with JSON."""
    return uvicorn.Config(app, http=PagellmH11Protocol, h11_max_incomplete_event_size=app.state.max_header_bytes,
                          **kwargs)


def _model_list(names: list[str], root: str | None, max_model_len: int,
                adapters: list[ModelCard] | None = None) -> Response:
    cards = [ModelCard(id=name, root=root, max_model_len=max_model_len) for name in names]
    return _json(ModelList(data=cards + (adapters or [])))


def _add_unsupported(app: FastAPI, paths: list[str], task: str, needs: str) -> None:
    """Routes of another task answer 400 naming the task they need (not a bare 404)."""

    async def unsupported(raw: Request) -> Response:
        raise APIError(400, f"{raw.url.path} needs a model served with --task {needs}; this server runs task "
                            f"{task!r}", param="model")

    for path in paths:
        app.add_api_route(path, unsupported, methods=["POST"], responses=errors(400))


def _add_generate_routes(app: FastAPI, engine: AsyncLLM, names: list[str], max_waiting_requests: int,
                         state: ServerState, loras: LoRAModels, default_max_tokens: int | None) -> None:
    token_strings = TokenStrings(engine.tokenizer)
    shared = dict(engine=engine, served_model_names=names, max_waiting_requests=max_waiting_requests,
                  state=state, token_strings=token_strings, loras=loras, default_max_tokens=default_max_tokens)
    completion = OpenAIServingCompletion(**shared)
    chat = OpenAIServingChat(**shared)
    tokenization = OpenAIServingTokenization(**shared)
    zero_shot = OpenAIServingZeroShotClassification(**shared)

    @app.get("/v1/models", responses=json_ok(ModelList))
    async def models() -> Response:
        info = engine.model_info()
        return _model_list(names, info.root, info.context_limit, loras.cards(info.context_limit))

    @app.post("/v1/completions", responses=json_or_stream(CompletionResponse, CompletionResponse, 400, 503))
    async def completions(req: CompletionRequest, raw: Request) -> Response:
        return _respond(await run_until_disconnect(raw, completion.create_completion(req)))

    @app.post("/v1/chat/completions",
              responses=json_or_stream(ChatCompletionResponse, ChatCompletionChunk, 400, 503))
    async def chat_completions(req: ChatCompletionRequest, raw: Request) -> Response:
        return _respond(await run_until_disconnect(raw, chat.create_chat_completion(req)))

    @app.post("/classify", responses=json_ok(ClassificationResponse, 400, 503))
    async def classify(req: ClassificationRequest, raw: Request) -> Response:
        return _json(await run_until_disconnect(raw, zero_shot.create_classification(req)))

    @app.post("/tokenize", responses=json_ok(TokenizeResponse, 400))
    async def tokenize(req: TokenizeRequest) -> Response:
        return _json(tokenization.tokenize(req))

    @app.post("/detokenize", responses=json_ok(DetokenizeResponse, 400))
    async def detokenize(req: DetokenizeRequest) -> Response:
        return _json(tokenization.detokenize(req))

    @app.get("/tokenizer_info", responses=errors())
    async def tokenizer_info() -> dict[str, Any]:
        return tokenization.tokenizer_info()

    @app.post("/reset_prefix_cache", responses=errors(503))
    async def reset_prefix_cache() -> dict[str, bool]:
        return {"reset": await engine.reset_prefix_cache()}

    add_lora_routes(app, loras)
    _add_unsupported(app, ["/v1/embeddings"], "generate", "embed")


def _add_pooling_routes(app: FastAPI, engine: AsyncLLM, names: list[str], max_waiting_requests: int,
                        state: ServerState) -> None:
    pooling = OpenAIServingPooling(engine, names, max_waiting_requests, state)

    @app.get("/v1/models", responses=json_ok(ModelList))
    async def models() -> Response:
        info = engine.model_info()
        return _model_list(names, info.root, info.context_limit)

    @app.post("/v1/embeddings", responses=json_ok(EmbeddingResponse, 400, 503))
    async def embeddings(req: EmbeddingRequest, raw: Request) -> Response:
        return _json(await run_until_disconnect(raw, pooling.create_embedding(req)))

    @app.post("/classify", responses=json_ok(ClassificationResponse, 400, 503))
    async def classify(req: ClassificationRequest, raw: Request) -> Response:
        return _json(await run_until_disconnect(raw, pooling.create_classification(req)))

    _add_unsupported(app, ["/v1/completions", "/v1/chat/completions"], engine.task, "generate")


def build_async_llm(**engine_kwargs: Any) -> AsyncLLM:
    """An AsyncLLM over LLM(**engine_kwargs)'s engine (any task), loaded on the thread that will step it."""
    from pagellm.entrypoints.llm import LLM

    return AsyncLLM.build(lambda: LLM(**engine_kwargs).llm_engine)


def replica_engine(engine_kwargs: dict[str, Any], num_threads: int):
    """One data-parallel replica's engine, built in the replica's process on the thread that steps it.

    NOTE: torch's thread count is set here, on that thread: OpenMP keeps it per thread.
    """
    import torch

    from pagellm.entrypoints.llm import LLM

    torch.set_num_threads(num_threads)
    return LLM(**engine_kwargs).llm_engine


def build_data_parallel_llm(data_parallel_size: int, threads_per_replica: int = 1, max_restarts: int = 4,
                            routing: str = "affinity", **engine_kwargs: Any):
    """A DataParallelLLM: data_parallel_size replicas of LLM(**engine_kwargs), each in a Ray actor with
    threads_per_replica CPUs (and torch threads); needs the `distributed` extra (Ray)."""
    import functools

    from pagellm.engine.dp_client import DataParallelLLM

    factory = functools.partial(replica_engine, engine_kwargs, threads_per_replica)
    return DataParallelLLM.launch(factory, data_parallel_size, threads_per_replica, max_restarts, routing)


def build_engine_client(args: argparse.Namespace):
    """The engine `pagellm serve` runs: one AsyncLLM, or data-parallel replicas on Ray."""
    from pagellm.entrypoints.cli import engine_kwargs

    kwargs = dict(task=getattr(args, "task", "generate"), **engine_kwargs(args))
    size = getattr(args, "data_parallel_size", None)
    if size is None:  # NOTE: an explicit --data-parallel-size 1 runs one replica on Ray (to measure its cost)
        return build_async_llm(**kwargs)
    backend = getattr(args, "distributed_executor_backend", None)
    if backend not in (None, "ray"):
        raise SystemExit(f"--data-parallel-size {size} runs replicas on Ray: use --distributed-executor-backend ray "
                         f"(got {backend!r})")
    kwargs.pop("distributed_executor_backend", None)  # it starts the replicas; each runs its model in-process
    try:
        return build_data_parallel_llm(size, args.data_parallel_threads, args.data_parallel_max_restarts,
                                       args.data_parallel_routing, **kwargs)
    except ImportError as exc:  # no Ray: say how to install it, without a traceback
        raise SystemExit(f"error: {exc}") from exc


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
    logging.getLogger("pagellm").setLevel(logging.INFO)
    engine = build_engine_client(args)
    state = ServerState()
    app = build_app(engine, served_model_names=args.served_model_name, api_key=args.api_key,
                    max_waiting_requests=args.max_waiting_requests,
                    max_request_body_bytes=args.max_request_body_bytes, state=state,
                    lora_modules=parse_lora_modules(getattr(args, "lora_modules", None)),
                    max_header_bytes=args.max_header_bytes, default_max_tokens=args.default_max_tokens)
    config = server_config(app, host=args.host, port=args.port, log_level=args.log_level,
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
