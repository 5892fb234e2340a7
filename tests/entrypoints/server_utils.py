"""Run the OpenAI server in a background thread on a free 127.0.0.1 port, for tests."""

from __future__ import annotations

import contextlib
import socket
import threading
import time
from collections.abc import Iterator
from typing import Any

import httpx
import openai

from pagellm.engine.async_llm import AsyncLLM
from pagellm.entrypoints.openai.api_server import GracefulServer, build_app, server_config
from pagellm.entrypoints.openai.serving_engine import ServerState

TINY_ENGINE_ARGS: dict[str, Any] = dict(dtype="float32", max_num_seqs=8, max_num_batched_tokens=256,
                                        block_size=4, num_blocks=1024)


class RunningServer:
    """A live server: its base URL, app state and engine."""

    def __init__(self, base_url: str, engine: AsyncLLM, state: ServerState, server: GracefulServer) -> None:
        self.base_url = base_url
        self.engine = engine
        self.state = state
        self.server = server

    @property
    def v1(self) -> str:
        return f"{self.base_url}/v1"

    def client(self, api_key: str = "unused", timeout: float = 60) -> openai.OpenAI:
        """An openai SDK client of this server (no retries, so errors surface at once)."""
        return openai.OpenAI(base_url=self.v1, api_key=api_key, max_retries=0, timeout=timeout)

    def metrics(self, headers: dict[str, str] | None = None) -> dict[str, float]:
        """Every sample on /metrics by name, summed over its label sets (so counters add up over reasons)."""
        text = httpx.get(f"{self.base_url}/metrics", headers=headers, timeout=10).text
        values: dict[str, float] = {}
        for line in text.splitlines():
            if line and not line.startswith("#"):
                series, value = line.rsplit(" ", 1)
                name = series.split("{", 1)[0]
                values[name] = values.get(name, 0.0) + float(value)
        return values


@contextlib.contextmanager
def run_server(engine: AsyncLLM, **app_kwargs: Any) -> Iterator[RunningServer]:
    """Serve build_app(engine, **app_kwargs) until the block exits; the engine thread stops with it."""
    state = ServerState()
    app = build_app(engine, state=state, **app_kwargs)
    sock = socket.socket(socket.AF_INET, socket.SOCK_STREAM)
    sock.setsockopt(socket.SOL_SOCKET, socket.SO_REUSEADDR, 1)
    sock.bind(("127.0.0.1", 0))
    port = sock.getsockname()[1]
    config = server_config(app, log_level="warning", timeout_graceful_shutdown=5, timeout_keep_alive=5)
    server = GracefulServer(config, state)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    base_url = f"http://127.0.0.1:{port}"
    deadline = time.monotonic() + 60
    while not server.started:
        assert thread.is_alive() and time.monotonic() < deadline, "the server did not start"
        time.sleep(0.02)
    try:
        yield RunningServer(base_url, engine, state, server)
    finally:
        server.should_exit = True
        thread.join(timeout=30)
        sock.close()
        assert not thread.is_alive(), "the server did not stop"
