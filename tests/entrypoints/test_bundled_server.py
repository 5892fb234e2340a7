"""The server on the real bundled SmolLM2-135M-Instruct (slow: about 15 s to load)."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.entrypoints.server_utils import RunningServer

pytestmark = pytest.mark.slow


def test_bundled_chat_answers_and_streams_the_same_text(bundled_server: RunningServer, bundled_tokenizer) -> None:
    client = bundled_server.client(timeout=120)
    model = bundled_server.engine.model_name
    messages = [{"role": "system", "content": "Answer in one short sentence."},
                {"role": "user", "content": "What is the capital of France?"}]
    full = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0)
    assert "Paris" in full.choices[0].message.content
    text = bundled_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    assert full.usage.prompt_tokens == len(bundled_tokenizer.encode(text, add_special_tokens=False))
    streamed = client.chat.completions.create(model=model, messages=messages, max_tokens=24, temperature=0,
                                              stream=True)
    assert "".join(c.choices[0].delta.content or "" for c in streamed if c.choices) == full.choices[0].message.content


def test_bundled_completions_async_logprobs_and_echo(bundled_server: RunningServer, bundled_tokenizer) -> None:
    model = bundled_server.engine.model_name
    prompt = "The capital of France is"

    async def main() -> None:
        async with openai.AsyncOpenAI(base_url=bundled_server.v1, api_key="x", max_retries=0, timeout=120) as client:
            full, echo = await asyncio.gather(
                client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0, logprobs=2),
                client.completions.create(model=model, prompt=prompt, max_tokens=1, temperature=0, echo=True,
                                          logprobs=1),
            )
            assert "Paris" in full.choices[0].text
            assert full.usage.prompt_tokens == len(bundled_tokenizer.encode(prompt))
            assert "".join(full.choices[0].logprobs.tokens) == full.choices[0].text
            lp = echo.choices[0].logprobs
            assert lp.token_logprobs[0] is None and len(lp.tokens) == full.usage.prompt_tokens + 1
            stream = await client.completions.create(model=model, prompt=prompt, max_tokens=8, temperature=0,
                                                     stream=True)
            assert "".join([c.choices[0].text async for c in stream]) == full.choices[0].text

    asyncio.run(main())
