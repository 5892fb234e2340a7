"""OpenAI-shaped errors, mapped to the openai client's exception classes; never a 500 for client input."""

from __future__ import annotations

import argparse
import json
import threading

import httpx
import openai
import pytest

from tests.entrypoints.server_utils import RunningServer, run_server

PROMPT = "Once upon a time"


def _assert_error_shape(body: dict, param: str | None = None) -> None:
    assert set(body) == {"error"}, body
    assert set(body["error"]) == {"message", "type", "param", "code"}
    assert body["error"]["message"]
    if param is not None:
        assert body["error"]["param"] == param, body


@pytest.mark.parametrize(
    ("kwargs", "param"),
    [
        ({"temperature": -1}, "temperature"),
        ({"top_p": 0}, "top_p"),
        ({"n": 0}, "n"),
        ({"max_tokens": 0}, "max_tokens"),
        ({"logprobs": 50}, "logprobs"),
        ({"presence_penalty": 5}, "presence_penalty"),
        ({"stop": [""]}, "stop"),
        ({"logit_bias": {"not-an-id": 1}}, "logit_bias"),
        ({"logit_bias": {"99999999": 1}}, "logit_bias"),
        ({"suffix": "tail"}, "suffix"),
        ({"best_of": 3}, "best_of"),
        ({"stream_options": {"include_usage": True}}, "stream_options"),
        ({"extra_body": {"min_tokens": 10}, "max_tokens": 5}, "min_tokens"),
        ({"extra_body": {"top_k": -5}}, "top_k"),
        ({"extra_body": {"bogus_field": 1}}, "bogus_field"),
        ({"n": 100000}, "n"),
    ],
)
def test_invalid_completion_parameter_is_400_naming_it(client: openai.OpenAI, model: str, kwargs: dict,
                                                       param: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt=PROMPT, **kwargs)
    assert err.value.status_code == 400
    _assert_error_shape(err.value.response.json(), param)
    assert param.split(".")[0] in err.value.body["message"] or param == "logit_bias"


def test_prompt_longer_than_context_window_is_400(client: openai.OpenAI, model: str,
                                                  tiny_server: RunningServer) -> None:
    limit = tiny_server.engine.max_model_len
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt=[5] * (limit + 10), max_tokens=1)
    assert err.value.body["param"] == "prompt" and "context length" in err.value.body["message"]
    with pytest.raises(openai.BadRequestError) as err:  # prompt + max_tokens past the window
        client.completions.create(model=model, prompt=[5] * (limit - 10), max_tokens=50)
    assert err.value.body["param"] == "max_tokens"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model=model, messages=[{"role": "user", "content": "word " * 2000}])


def test_unknown_model_is_400(client: openai.OpenAI) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model="gpt-17", prompt=PROMPT)
    assert err.value.body["param"] == "model" and err.value.code == "model_not_found"
    with pytest.raises(openai.BadRequestError):
        client.chat.completions.create(model="gpt-17", messages=[{"role": "user", "content": "x"}])


def test_invalid_chat_requests_are_400(client: openai.OpenAI, model: str) -> None:
    user = [{"role": "user", "content": "hi"}]
    cases = [
        dict(messages=[]),
        dict(messages=user, top_logprobs=2),
        dict(messages=user, tools=[{"type": "function"}]),
        dict(messages=[{"role": "user", "content": [{"type": "image_url", "image_url": {"url": "x"}}]}]),
        dict(messages=user, response_format={"type": "json_schema", "json_schema": {"name": "x"}}),
        dict(messages=user, logprobs=True, top_logprobs=99),
    ]
    for case in cases:
        with pytest.raises(openai.BadRequestError) as err:
            client.chat.completions.create(model=model, max_tokens=2, **case)
        _assert_error_shape(err.value.response.json())


@pytest.mark.parametrize(
    "body",
    [
        b"{not json", b"", b"[1, 2]", b'"text"', b"null",
        json.dumps({"prompt": 3}).encode(),
        json.dumps({"prompt": []}).encode(),
        json.dumps({"prompt": [[]]}).encode(),
        json.dumps({"prompt": [1, "a"]}).encode(),
        json.dumps({"prompt": [-1]}).encode(),
        json.dumps({"prompt": [10**12]}).encode(),
        json.dumps({"prompt": ""}).encode(),
        json.dumps({"prompt": "hi", "seed": 1e30}).encode(),
        json.dumps({"prompt": "hi", "seed": 2**64 + 5}).encode(),
        b'{"prompt": "hi", "temperature": NaN}',
        b'{"prompt": "hi", "temperature": Infinity}',
        b'{"prompt": "hi", "logit_bias": {"5": -Infinity}}',
        json.dumps({"prompt": "hi", "temperature": "hot"}).encode(),
        json.dumps({"prompt": "hi", "max_tokens": -5}).encode(),
        json.dumps({"prompt": "hi", "stop_token_ids": [-3]}).encode(),
        json.dumps({"prompt": "hi", "n": "many"}).encode(),
        json.dumps({"prompt": "hi", "stream": "yes please"}).encode(),
    ],
)
def test_malformed_completion_bodies_are_400_never_500(tiny_server: RunningServer, body: bytes) -> None:
    r = httpx.post(f"{tiny_server.v1}/completions", content=body, headers={"Content-Type": "application/json"})
    assert r.status_code == 400, r.text
    _assert_error_shape(r.json())


@pytest.mark.parametrize(
    "body",
    [
        {"messages": [{"content": "no role"}]},
        {"messages": "hello"},
        {"messages": [{"role": "user", "content": "x"}], "chat_template_kwargs": "nope"},
        {"messages": [{"role": "user", "content": "x"}], "continue_final_message": True},
        {"messages": [{"role": "user", "content": 5}]},
    ],
)
def test_malformed_chat_bodies_are_400_never_500(tiny_server: RunningServer, body: dict) -> None:
    r = httpx.post(f"{tiny_server.v1}/chat/completions", json=body)
    assert r.status_code == 400, r.text
    _assert_error_shape(r.json())


def test_tiny_top_p_keeps_the_best_token_not_a_server_error(tiny_server: RunningServer) -> None:
    body = {"model": tiny_server.engine.model_name, "prompt": "hi", "max_tokens": 2, "top_p": 1e-300}
    r = httpx.post(f"{tiny_server.v1}/completions", json=body)
    assert r.status_code == 200, r.text


def test_unknown_route_and_method_are_openai_shaped(tiny_server: RunningServer) -> None:
    r = httpx.get(f"{tiny_server.v1}/engines")
    assert r.status_code == 404
    _assert_error_shape(r.json())
    r = httpx.get(f"{tiny_server.v1}/completions")
    assert r.status_code == 405
    _assert_error_shape(r.json())


def test_api_key_required_on_every_route_but_health(tiny_engine_factory) -> None:
    with run_server(tiny_engine_factory(), api_key="s3cret") as server:
        model = server.engine.model_name
        for key in (None, "wrong"):
            headers = {"Authorization": f"Bearer {key}"} if key else {}
            for method, path in [("GET", "/v1/models"), ("POST", "/v1/completions"), ("GET", "/metrics"),
                                 ("POST", "/tokenize"), ("GET", "/tokenizer_info"), ("GET", "/version"),
                                 ("POST", "/reset_prefix_cache")]:
                r = httpx.request(method, server.base_url + path, headers=headers, json={})
                assert r.status_code == 401, (path, r.text)
                _assert_error_shape(r.json())
        assert httpx.get(f"{server.base_url}/health").status_code == 200
        bad = server.client(api_key="wrong", timeout=600)
        with pytest.raises(openai.AuthenticationError):
            bad.completions.create(model=model, prompt=PROMPT, max_tokens=2)
        good = server.client(api_key="s3cret", timeout=600)
        assert good.completions.create(model=model, prompt=PROMPT, max_tokens=2).choices[0].text is not None
        assert httpx.get(f"{server.base_url}/metrics", headers={"Authorization": "Bearer s3cret"}).status_code == 200


def test_api_key_flag_defaults_to_env(monkeypatch: pytest.MonkeyPatch) -> None:
    from pagellm.entrypoints.openai.server_args import add_server_args

    monkeypatch.setenv("PAGELLM_API_KEY", "from-env")
    parser = argparse.ArgumentParser()
    add_server_args(parser)
    assert parser.parse_args([]).api_key == "from-env"
    assert parser.parse_args(["--api-key", "flag"]).api_key == "flag"


def test_oversize_body_is_413(tiny_engine_factory) -> None:
    with run_server(tiny_engine_factory(), max_request_body_bytes=4096) as server:
        model = server.engine.model_name
        client = server.client(timeout=600)
        with pytest.raises(openai.APIStatusError) as err:
            client.completions.create(model=model, prompt="word " * 2000, max_tokens=1)
        assert err.value.status_code == 413
        _assert_error_shape(err.value.response.json())

        def chunks():  # no Content-Length: the limit is enforced while the body streams in
            for _ in range(10):
                yield b" " * 1000

        r = httpx.post(f"{server.v1}/completions", content=chunks(), headers={"Content-Type": "application/json"})
        assert r.status_code in (400, 413), r.text
        _assert_error_shape(r.json())
        assert client.completions.create(model=model, prompt=PROMPT, max_tokens=1).choices


def test_waiting_queue_over_limit_is_503_with_retry_after(tiny_engine_factory) -> None:
    engine = tiny_engine_factory(max_num_seqs=1)
    with run_server(engine, max_waiting_requests=1) as server:
        model = server.engine.model_name
        body = {"model": model, "prompt": PROMPT, "max_tokens": 300, "stream": True, "ignore_eos": True}
        started, release = threading.Event(), threading.Event()

        def long_stream() -> None:  # holds the only running slot until released
            with httpx.stream("POST", f"{server.v1}/completions", json=body, timeout=120) as r:
                for line in r.iter_lines():
                    if line.startswith("data: {"):
                        started.set()
                        release.wait(60)
                        return

        runner = threading.Thread(target=long_stream)
        runner.start()
        assert started.wait(60)
        try:
            with httpx.stream("POST", f"{server.v1}/completions", json=body, timeout=120) as waiting:
                assert waiting.status_code == 200  # the one waiting request is admitted...
                client = server.client(timeout=600)
                with pytest.raises(openai.InternalServerError) as err:  # ...the next is not
                    client.completions.create(model=model, prompt=PROMPT, max_tokens=2)
                assert err.value.status_code == 503
                assert err.value.response.headers["Retry-After"]
                _assert_error_shape(err.value.response.json())
        finally:
            release.set()
            runner.join(timeout=60)
