"""Server fixtures: uvicorn in a background thread on a free 127.0.0.1 port.

The tiny random Llama (fast, shares the bundled tokenizer and chat template) serves most tests;
the bundled SmolLM2 serves the slow ones.
"""

from __future__ import annotations

from collections.abc import Iterator

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
