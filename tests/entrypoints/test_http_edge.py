"""Bad input at the HTTP edge: each case is a clear 4xx with an OpenAI-shaped body, never a 500 or a reset."""

from __future__ import annotations

import argparse
import json
import socket

import httpx
import pytest

from pagellm.entrypoints.openai.server_args import add_server_args
from tests.entrypoints.server_utils import RunningServer, run_server

USER = [{"role": "user", "content": "hi"}]


def _assert_error(r: httpx.Response, status: int, param: str | None = None) -> dict:
    assert r.status_code == status, r.text
    body = r.json()
    assert set(body) == {"error"} and set(body["error"]) == {"message", "type", "param", "code"}, body
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body
    return body["error"]


def _tokenize(server: RunningServer, **body) -> httpx.Response:
    return httpx.post(f"{server.base_url}/tokenize", json={"messages": USER, **body}, timeout=60)


# ---- chat_template_kwargs ----------------------------------------------------------------------


def test_chat_template_kwargs_add_generation_prompt_is_honoured(tiny_server: RunningServer) -> None:
    without = _tokenize(tiny_server, add_generation_prompt=False)
    with_prompt = _tokenize(tiny_server)
    assert without.status_code == with_prompt.status_code == 200
    assert len(with_prompt.json()["tokens"]) > len(without.json()["tokens"])
    # chat_template_kwargs wins over the top-level field (vLLM's order), both ways
    r = _tokenize(tiny_server, chat_template_kwargs={"add_generation_prompt": False})
    assert r.status_code == 200, r.text
    assert r.json()["tokens"] == without.json()["tokens"]
    r = _tokenize(tiny_server, add_generation_prompt=False, chat_template_kwargs={"add_generation_prompt": True})
    assert r.json()["tokens"] == with_prompt.json()["tokens"]

    body = {"messages": USER, "max_tokens": 2, "chat_template_kwargs": {"add_generation_prompt": False}}
    r = httpx.post(f"{tiny_server.v1}/chat/completions", json=body, timeout=60)
    assert r.status_code == 200, r.text
    assert r.json()["usage"]["prompt_tokens"] == len(without.json()["tokens"])


@pytest.mark.parametrize("key", ["messages", "conversation", "tokenize", "chat_template", "tools", "documents",
                                 "self", "template"])
def test_chat_template_kwargs_colliding_with_renderer_arguments_is_400(tiny_server: RunningServer,
                                                                      key: str) -> None:
    for url, extra in ((f"{tiny_server.base_url}/tokenize", {}), (f"{tiny_server.v1}/chat/completions",
                                                                 {"max_tokens": 2})):
        r = httpx.post(url, json={"messages": USER, "chat_template_kwargs": {key: 5}, **extra}, timeout=60)
        error = _assert_error(r, 400, "chat_template_kwargs")
        assert repr(key) in error["message"]


def test_chat_template_kwargs_non_boolean_flag_is_400(tiny_server: RunningServer) -> None:
    r = _tokenize(tiny_server, chat_template_kwargs={"add_generation_prompt": "yes"})
    _assert_error(r, 400, "chat_template_kwargs")
    r = _tokenize(tiny_server, add_generation_prompt=False, chat_template_kwargs={"continue_final_message": []})
    _assert_error(r, 400, "chat_template_kwargs")


def test_chat_template_kwargs_template_variables_still_pass_through(tiny_server: RunningServer) -> None:
    r = _tokenize(tiny_server, chat_template_kwargs={"enable_thinking": False, "custom_flag": [1, 2]})
    assert r.status_code == 200, r.text
    # continue_final_message via chat_template_kwargs also works (it needs add_generation_prompt off)
    body = {"messages": [*USER, {"role": "assistant", "content": "Hel"}], "add_generation_prompt": False,
            "chat_template_kwargs": {"continue_final_message": True}}
    r = httpx.post(f"{tiny_server.base_url}/tokenize", json=body, timeout=60)
    assert r.status_code == 200, r.text


# ---- roles ----------------------------------------------------------------------------------------


@pytest.mark.parametrize("message", [{"role": "wizard", "content": "hi"}, {"role": ""},
                                     {"role": "USER", "content": "x"}])
def test_unknown_or_empty_role_is_400_naming_the_field(tiny_server: RunningServer, message: dict) -> None:
    messages = [{"role": "system", "content": "be brief"}, message]
    r = httpx.post(f"{tiny_server.v1}/chat/completions", json={"messages": messages, "max_tokens": 2}, timeout=60)
    error = _assert_error(r, 400, "messages[1].role")
    assert "system" in error["message"] and "assistant" in error["message"]
    _assert_error(httpx.post(f"{tiny_server.base_url}/tokenize", json={"messages": messages}, timeout=60), 400,
                  "messages[1].role")


@pytest.mark.parametrize("role", ["system", "developer", "user", "assistant", "tool", "function"])
def test_every_openai_role_is_accepted(tiny_server: RunningServer, role: str) -> None:
    messages = [{"role": role, "content": "x", **({"name": "f"} if role == "function" else {})}]
    r = httpx.post(f"{tiny_server.base_url}/tokenize", json={"messages": messages}, timeout=60)
    assert r.status_code == 200, r.text


# ---- huge headers -----------------------------------------------------------------------------------


def _raw_request(server: RunningServer, header_bytes: int) -> bytes:
    """Send a request with one header of header_bytes, return every byte the server answered."""
    host, port = server.base_url.removeprefix("http://").split(":")
    body = b'{"prompt": "hi", "max_tokens": 1}'
    head = (f"POST /v1/completions HTTP/1.1\r\nHost: {host}\r\nContent-Type: application/json\r\n"
            f"Content-Length: {len(body)}\r\nX-Big: ").encode() + b"a" * header_bytes + b"\r\n\r\n"
    answer = b""
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(head + body)
        while chunk := sock.recv(65536):
            answer += chunk
    return answer


@pytest.mark.parametrize("size", [200 << 10, 2 << 20])
def test_huge_header_is_431_with_a_body_not_a_reset(tiny_server: RunningServer, size: int) -> None:
    answer = _raw_request(tiny_server, size)  # a reset raises ConnectionResetError here
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 431"), answer[:300]
    assert b"connection: close" in head.lower()
    assert b"header" in body.lower() and b'"error"' in body
    r = httpx.post(f"{tiny_server.v1}/completions", json={"prompt": "hi", "max_tokens": 1},
                   headers={"X-Big": "a" * size}, timeout=30)
    error = _assert_error(r, 431)
    assert error["code"] == "request_header_fields_too_large"
    # the server goes on serving
    assert httpx.post(f"{tiny_server.v1}/completions", json={"prompt": "hi", "max_tokens": 1}).status_code == 200


def test_unparsable_request_head_is_a_json_400(tiny_server: RunningServer) -> None:
    host, port = tiny_server.base_url.removeprefix("http://").split(":")
    answer = b""
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"NOT AN HTTP REQUEST\r\n\r\n")
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), answer[:300]
    assert json.loads(body)["error"]["code"] == "invalid_http_request"


def test_broken_chunked_body_is_a_json_400_and_the_server_goes_on(tiny_server: RunningServer) -> None:
    host, port = tiny_server.base_url.removeprefix("http://").split(":")
    answer = b""
    with socket.create_connection((host, int(port)), timeout=30) as sock:
        sock.sendall(b"POST /v1/completions HTTP/1.1\r\nHost: x\r\nContent-Type: application/json\r\n"
                     b"Transfer-Encoding: chunked\r\n\r\n5\r\n{\"pro\r\nzz-not-a-size\r\n\r\n")
        while chunk := sock.recv(65536):
            answer += chunk
    head, _, body = answer.partition(b"\r\n\r\n")
    assert head.startswith(b"HTTP/1.1 400"), answer[:300]
    assert json.loads(body)["error"]["code"] == "invalid_http_request"
    assert httpx.post(f"{tiny_server.v1}/completions", json={"prompt": "hi", "max_tokens": 1}).status_code == 200


def test_headers_under_the_limit_are_served(tiny_server: RunningServer) -> None:
    r = httpx.post(f"{tiny_server.v1}/completions", json={"prompt": "hi", "max_tokens": 1},
                   headers={"X-Big": "a" * (40 << 10)}, timeout=30)
    assert r.status_code == 200, r.text


# ---- invalid UTF-8 -------------------------------------------------------------------------------------


def test_invalid_utf8_body_is_400_saying_where(tiny_server: RunningServer) -> None:
    body = b'{"prompt": "caf\xe9", "max_tokens": 1}'
    r = httpx.post(f"{tiny_server.v1}/completions", content=body, headers={"Content-Type": "application/json"})
    error = _assert_error(r, 400)
    assert "UTF-8" in error["message"] and "byte 15" in error["message"], error
    r = httpx.post(f"{tiny_server.v1}/chat/completions", content=b'{"messages": [\xff]}',
                   headers={"Content-Type": "application/json"})
    assert "UTF-8" in _assert_error(r, 400)["message"]


# ---- --default-max-tokens ------------------------------------------------------------------------------


def test_default_max_tokens_flag_is_unset_by_default() -> None:
    parser = argparse.ArgumentParser()
    add_server_args(parser)
    assert parser.parse_args([]).default_max_tokens is None
    assert parser.parse_args(["--default-max-tokens", "64"]).default_max_tokens == 64
    assert "--default-max-tokens" in parser.format_help()
    with pytest.raises(SystemExit):
        parser.parse_args(["--default-max-tokens", "0"])


def test_serve_flags_reach_the_server(serve) -> None:
    _, base = serve("--default-max-tokens", "2", "--max-header-bytes", "2048")
    r = httpx.post(f"{base}/v1/chat/completions", json={"messages": USER, "ignore_eos": True}, timeout=60)
    assert r.status_code == 200 and r.json()["usage"]["completion_tokens"] == 2, r.text
    r = httpx.get(f"{base}/v1/models", headers={"X-Big": "a" * 4096}, timeout=30)
    assert _assert_error(r, 431)["code"] == "request_header_fields_too_large"
    assert "2048 bytes" in r.json()["error"]["message"]


def test_default_max_tokens_caps_requests_that_set_none(tiny_engine_factory) -> None:
    with run_server(tiny_engine_factory(), default_max_tokens=3) as server:
        chat = {"messages": USER, "ignore_eos": True}
        r = httpx.post(f"{server.v1}/chat/completions", json=chat, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 3 and r.json()["choices"][0]["finish_reason"] == "length"
        # an explicit value is the client's choice, above or below the default
        for field in ("max_tokens", "max_completion_tokens"):
            r = httpx.post(f"{server.v1}/chat/completions", json={**chat, field: 5}, timeout=60)
            assert r.json()["usage"]["completion_tokens"] == 5
        # completions: OpenAI's omitted default stays 16; an explicit null takes the server's default
        prompt = {"prompt": "hi", "ignore_eos": True}
        r = httpx.post(f"{server.v1}/completions", json={**prompt, "max_tokens": None}, timeout=60)
        assert r.json()["usage"]["completion_tokens"] == 3
        assert httpx.post(f"{server.v1}/completions", json=prompt, timeout=60).json()["usage"][
            "completion_tokens"] == 16
        # near the end of the window the default shrinks to what is left instead of failing the request
        limit = server.engine.max_model_len
        r = httpx.post(f"{server.v1}/completions", json={"prompt": [5] * (limit - 2), "max_tokens": None,
                                                         "ignore_eos": True}, timeout=60)
        assert r.status_code == 200, r.text
        assert r.json()["usage"]["completion_tokens"] == 2


# ---- /openapi.json -------------------------------------------------------------------------------------


def test_openapi_declares_what_the_routes_really_answer(tiny_server: RunningServer) -> None:
    paths = httpx.get(f"{tiny_server.base_url}/openapi.json").json()["paths"]
    chat = paths["/v1/chat/completions"]["post"]["responses"]
    assert "422" not in chat  # validation errors are 400s
    assert {"200", "400", "413", "431", "503"} <= set(chat)
    assert set(chat["200"]["content"]) == {"application/json", "text/event-stream"}
    assert chat["400"]["content"]["application/json"]["schema"]["$ref"].endswith("/ErrorResponse")
    assert paths["/health"]["get"]["responses"]["200"].get("content") is None  # empty body
    lora_errors = paths["/v1/unload_lora_adapter"]["post"]["responses"]["404"]["content"]
    assert set(lora_errors) == {"application/json"}  # errors are JSON even where success is plain text
    assert all("422" not in op["responses"] for path in paths.values() for op in path.values())
