"""Every SSE chunk and JSON body the server sends is exactly what its protocol.py model describes.

The models are what /openapi.json publishes; a field sent but missing from its model (dropped on parse)
or of another type would make that schema untrue. Parsing each event with its model and dumping it again
must give back the event.
"""

from __future__ import annotations

import json

import httpx
import pytest
from pydantic import BaseModel

from pagellm.entrypoints.openai.protocol import ChatCompletionChunk, ChatCompletionResponse, CompletionResponse


def _round_trips(model: type[BaseModel], payload: dict) -> None:
    parsed = model.model_validate(payload)
    assert parsed.model_dump(mode="json", exclude_none=True) == _without_none(payload), payload


def _without_none(value):
    if isinstance(value, dict):
        return {k: _without_none(v) for k, v in value.items() if v is not None}
    if isinstance(value, list):
        return [_without_none(v) for v in value]
    return value


def _events(base: str, path: str, body: dict) -> list[dict]:
    with httpx.stream("POST", f"{base}{path}", json=body, timeout=60) as r:
        assert r.status_code == 200, r.read()
        data = [line[6:] for line in r.iter_lines() if line.startswith("data: ")]
    assert data[-1] == "[DONE]"
    return [json.loads(d) for d in data[:-1]]


@pytest.mark.parametrize("extra", [{}, {"logprobs": True, "top_logprobs": 2, "n": 2}])
def test_chat_chunks_and_bodies_match_their_models(tiny_server, extra):
    base = tiny_server.base_url
    body = {"model": tiny_server.engine.model_name, "messages": [{"role": "user", "content": "Hi"}],
            "max_tokens": 4, "stream": True, "stream_options": {"include_usage": True}, **extra}
    events = _events(base, "/v1/chat/completions", body)
    assert len(events) >= 3 and events[-1]["usage"] is not None
    for event in events:
        _round_trips(ChatCompletionChunk, event)
    plain = httpx.post(f"{base}/v1/chat/completions", json={**body, "stream": False, "stream_options": None},
                       timeout=60).json()
    _round_trips(ChatCompletionResponse, plain)


@pytest.mark.parametrize("extra", [{}, {"logprobs": 2, "echo": True, "n": 2}])
def test_completion_chunks_and_bodies_match_their_model(tiny_server, extra):
    base = tiny_server.base_url
    body = {"model": tiny_server.engine.model_name, "prompt": ["Once upon", "A time"], "max_tokens": 3,
            "stream": True, "stream_options": {"include_usage": True}, **extra}
    events = _events(base, "/v1/completions", body)
    assert len(events) >= 3
    for event in events:
        _round_trips(CompletionResponse, event)  # a completion chunk has the response's shape
    plain = httpx.post(f"{base}/v1/completions", json={**body, "stream": False, "stream_options": None},
                       timeout=60).json()
    _round_trips(CompletionResponse, plain)
