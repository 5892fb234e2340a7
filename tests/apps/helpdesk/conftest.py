"""Fixtures of the help desk tests: the committed Python FAQ indexed once per session (bundled MiniLM), its
question sets, and a help desk service with the bundled SmolLM2 on an AsyncLLM."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

FAQ = Path(__file__).resolve().parents[2] / "data" / "faq"


def load_questions(name: str) -> list[dict]:
    return [json.loads(line) for line in (FAQ / name).read_text().splitlines() if line.strip()]


@pytest.fixture(scope="session")
def faq_entries():
    from pagellm.apps.helpdesk.kb import load_kb

    return load_kb(FAQ / "python_faq.jsonl")


class CachingEmbedder:
    """The real Embedder, remembering each text's vector: the session's indexes and retrievers embed a text once."""

    def __init__(self) -> None:
        from pagellm.apps.helpdesk.retrieval import Embedder

        self.inner = Embedder()
        self.model, self.dim, self.llm = self.inner.model, self.inner.dim, self.inner.llm
        self.cache: dict[str, np.ndarray] = {}

    def embed(self, texts):
        missing = [t for t in dict.fromkeys(texts) if t not in self.cache]
        if missing:
            self.cache.update(zip(missing, self.inner.embed(missing)))
        return np.stack([self.cache[t] for t in texts])


@pytest.fixture(scope="session")
def embedder():
    return CachingEmbedder()


@pytest.fixture(scope="session")
def faq_index(tmp_path_factory, faq_entries, embedder) -> Path:
    """An index folder of the whole FAQ (built by the same code as `pagellm helpdesk index`)."""
    from pagellm.apps.helpdesk.cli import index_kb

    folder = tmp_path_factory.mktemp("faq_index")
    index_kb(FAQ / "python_faq.jsonl", folder, embedder=embedder)
    return folder


@pytest.fixture(scope="session")
def retriever(faq_index, embedder):
    from pagellm.apps.helpdesk.retrieval import Retriever, open_index

    meta, store, _ = open_index(faq_index, embedder)
    return Retriever(store, embedder, meta.calibration)


@pytest.fixture(scope="session")
def helpdesk_url(faq_index, embedder):
    """`pagellm helpdesk serve` on a free loopback port for the session: the real engine (bundled SmolLM2)."""
    import threading
    import time

    import uvicorn

    from pagellm.apps.helpdesk.api import build_helpdesk_app
    from pagellm.apps.helpdesk.cli import build_service
    from tests.apps.conftest import _free_port

    service = build_service(faq_index, max_tokens=24, embedder=embedder)
    port = _free_port()
    server = uvicorn.Server(uvicorn.Config(build_helpdesk_app(service), host="127.0.0.1", port=port,
                                           log_level="warning"))
    thread = threading.Thread(target=server.run, daemon=True)
    thread.start()
    deadline = time.time() + 120
    while not server.started and time.time() < deadline:
        time.sleep(0.05)
    assert server.started, "uvicorn did not start"
    yield f"http://127.0.0.1:{port}", service
    server.should_exit = True
    thread.join(30)
    service.store.close()
