"""/v1/chat/completions through the real openai client on the tiny model (bundled chat template)."""

from __future__ import annotations

import asyncio
import json

import httpx
import openai
import pytest

from tests.entrypoints.server_utils import RunningServer

MESSAGES = [{"role": "user", "content": "What is the capital of France?"}]


def _template_len(tokenizer, messages: list[dict]) -> int:
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    return len(tokenizer.encode(text, add_special_tokens=False))


def test_chat_shape_and_usage(client: openai.OpenAI, model: str, bundled_tokenizer) -> None:
    out = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=6, temperature=0,
                                         extra_body={"ignore_eos": True})
    assert out.object == "chat.completion" and out.id.startswith("chatcmpl-")
    (choice,) = out.choices
    assert choice.message.role == "assistant" and choice.message.content and choice.finish_reason == "length"
    assert out.usage.prompt_tokens == _template_len(bundled_tokenizer, MESSAGES)
    assert out.usage.completion_tokens == 6
    assert out.usage.prompt_tokens_details.cached_tokens >= 0


def test_system_and_multi_turn_use_the_template(client: openai.OpenAI, model: str, bundled_tokenizer,
                                                tiny_server: RunningServer) -> None:
    messages = [
        {"role": "system", "content": "You are terse."},
        {"role": "user", "content": "Hi"},
        {"role": "assistant", "content": "Hello."},
        {"role": "user", "content": [{"type": "text", "text": "Name a color."}]},
    ]
    out = client.chat.completions.create(model=model, messages=messages, max_tokens=3, temperature=0)
    plain = [*messages[:3], {"role": "user", "content": "Name a color."}]
    assert out.usage.prompt_tokens == _template_len(bundled_tokenizer, plain)
    # /tokenize with messages counts the same template
    counted = httpx.post(f"{tiny_server.base_url}/tokenize", json={"messages": messages}).json()
    assert counted["count"] == out.usage.prompt_tokens
    # add_generation_prompt=false leaves out the assistant header
    no_gen = client.chat.completions.create(model=model, messages=messages, max_tokens=3, temperature=0,
                                            extra_body={"add_generation_prompt": False})
    assert no_gen.usage.prompt_tokens < out.usage.prompt_tokens


def test_chat_streaming_equals_non_streaming(client: openai.OpenAI, model: str) -> None:
    kwargs = dict(model=model, messages=MESSAGES, max_completion_tokens=20, temperature=0)
    full = client.chat.completions.create(**kwargs)
    chunks = list(client.chat.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    assert chunks[0].choices[0].delta.role == "assistant"
    text = "".join(c.choices[0].delta.content or "" for c in chunks if c.choices)
    assert text == full.choices[0].message.content
    assert [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason] == [
        full.choices[0].finish_reason]
    assert chunks[-1].choices == [] and chunks[-1].usage.completion_tokens == full.usage.completion_tokens


def test_max_tokens_and_max_completion_tokens(client: openai.OpenAI, model: str) -> None:
    a = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4, temperature=0,
                                       extra_body={"ignore_eos": True})
    b = client.chat.completions.create(model=model, messages=MESSAGES, max_completion_tokens=5, max_tokens=50,
                                       temperature=0, extra_body={"ignore_eos": True})
    assert a.usage.completion_tokens == 4 and b.usage.completion_tokens == 5  # max_completion_tokens wins


def test_chat_logprobs_top_logprobs(client: openai.OpenAI, model: str) -> None:
    out = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4, temperature=0,
                                         logprobs=True, top_logprobs=3)
    content = out.choices[0].logprobs.content
    assert len(content) == out.usage.completion_tokens
    assert "".join(c.token for c in content) == out.choices[0].message.content
    for entry in content:
        assert len(entry.top_logprobs) == 3
        values = [t.logprob for t in entry.top_logprobs]
        assert values == sorted(values, reverse=True)
        assert entry.logprob == pytest.approx(values[0])  # greedy picks the most likely
        assert entry.bytes == list(entry.token.encode())
    streamed = list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=4, temperature=0,
                                                   logprobs=True, top_logprobs=3, stream=True))
    tokens = [lp.token for c in streamed if c.choices and c.choices[0].logprobs
              for lp in c.choices[0].logprobs.content]
    assert tokens == [c.token for c in content]


def test_chat_n_stop_seed(client: openai.OpenAI, model: str) -> None:
    out = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5, n=3, seed=11,
                                         temperature=1.0)
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    again = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5, n=3, seed=11,
                                           temperature=1.0)
    assert [c.message.content for c in again.choices] == [c.message.content for c in out.choices]
    streamed = list(client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5, n=3, seed=11,
                                                   temperature=1.0, stream=True))
    texts = {i: "".join(ch.delta.content or "" for c in streamed for ch in c.choices if ch.index == i)
             for i in range(3)}
    assert texts == {c.index: c.message.content for c in out.choices}
    base = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16, temperature=0)
    text = base.choices[0].message.content
    stop = text[len(text) // 2: len(text) // 2 + 2]
    cut = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=16, temperature=0, stop=stop)
    assert cut.choices[0].message.content == text[: text.index(stop)]
    assert cut.choices[0].finish_reason == "stop"


def test_response_format(client: openai.OpenAI, model: str) -> None:
    ok = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2,
                                        response_format={"type": "text"})
    assert ok.choices[0].message.content is not None
    cut = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2,
                                         response_format={"type": "json_object"})
    text = cut.choices[0].message.content
    assert text.startswith("{")
    if cut.choices[0].finish_reason == "stop":
        assert isinstance(json.loads(text), dict)
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2,
                                       response_format={"type": "xml"})
    assert err.value.body["param"] == "response_format.type"


def test_async_chat_stream(tiny_server: RunningServer, model: str) -> None:
    async def main() -> None:
        async with openai.AsyncOpenAI(base_url=tiny_server.v1, api_key="unused", max_retries=0) as client:
            full = await client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8,
                                                        temperature=0)
            stream = await client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=8,
                                                          temperature=0, stream=True)
            text = "".join([c.choices[0].delta.content or "" async for c in stream if c.choices])
            assert text == full.choices[0].message.content

    asyncio.run(main())
