"""Server fixtures: uvicorn in a background thread on a free 127.0.0.1 port.

The tiny random Llama (fast, shares the bundled tokenizer and chat template) serves most tests;
the bundled SmolLM2 serves the slow ones.
"""

from __future__ import annotations

import os
import socket
import subprocess
import sys
import time
from collections.abc import Iterator

import httpx
import openai
import pytest

from pagellm.engine.async_llm import AsyncLLM
from pagellm.entrypoints.openai.api_server import build_async_llm
from tests.entrypoints.server_utils import TINY_ENGINE_ARGS, RunningServer, run_server


@pytest.fixture(scope="session")
def tiny_server(tiny_llama_dir: str) -> Iterator[RunningServer]:
    """The shared tiny-model server with default server settings (no key, default limits)."""
    engine = build_async_llm(model=tiny_llama_dir, **TINY_ENGINE_ARGS)
    with run_server(engine) as server:
        yield server


@pytest.fixture(scope="module")
def client(tiny_server: RunningServer) -> openai.OpenAI:
    """An openai SDK client of the shared tiny server."""
    return tiny_server.client()


@pytest.fixture(scope="module")
def model(tiny_server: RunningServer) -> str:
    return tiny_server.engine.model_name


@pytest.fixture(scope="session")
def bundled_server() -> Iterator[RunningServer]:
    """The bundled SmolLM2-135M-Instruct (about 15 s to load); only slow tests use it."""
    engine = build_async_llm(max_num_seqs=8, max_model_len=2048)
    with run_server(engine) as server:
        yield server


@pytest.fixture
def tiny_engine_factory(tiny_llama_dir: str):
    """Fresh tiny engines for servers with their own settings (API key, limits); each starts once."""

    def make(**overrides) -> AsyncLLM:
        return build_async_llm(model=tiny_llama_dir, **{**TINY_ENGINE_ARGS, **overrides})

    return make


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def serve(tiny_llama_dir: str):
    """`pagellm serve` (the real CLI, in a subprocess) on the tiny model: start(*flags) -> (process, base URL)."""
    procs: list[subprocess.Popen] = []

    def start(*flags: str) -> tuple[subprocess.Popen, str]:
        port = _free_port()
        cmd = [sys.executable, "-m", "pagellm.entrypoints.cli", "serve", tiny_llama_dir, "--port", str(port),
               "--dtype", "float32", "--max-num-seqs", "4", "--num-blocks", "1024", "--block-size", "4", *flags]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        procs.append(proc)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    return proc, base
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)

    yield start
    for proc in procs:  # never leave a server running
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)
