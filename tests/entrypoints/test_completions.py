"""/v1/completions through the real openai client (sync and async) on the tiny model."""

from __future__ import annotations

import asyncio

import openai
import pytest

from tests.entrypoints.server_utils import RunningServer

PROMPT = "The quick brown fox jumps over the"


def test_completion_basic_shape_and_usage(client: openai.OpenAI, model: str, bundled_tokenizer) -> None:
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=7, temperature=0,
                                    extra_body={"ignore_eos": True})
    assert out.object == "text_completion" and out.model == model and out.id.startswith("cmpl-")
    (choice,) = out.choices
    assert choice.index == 0 and choice.finish_reason == "length" and choice.text
    # usage is the tokenizer's count of the prompt and the number of generated tokens
    assert out.usage.prompt_tokens == len(bundled_tokenizer.encode(PROMPT))
    assert out.usage.completion_tokens == 7
    assert out.usage.total_tokens == out.usage.prompt_tokens + 7
    # the same prompt again hits the prefix cache: whole blocks (of 4), stopping before the last token
    again = client.completions.create(model=model, prompt=PROMPT, max_tokens=1, temperature=0)
    num_prompt = out.usage.prompt_tokens
    assert again.usage.prompt_tokens_details.cached_tokens == (num_prompt - 1) // 4 * 4 > 0


def test_streaming_equals_non_streaming_at_temperature_0(client: openai.OpenAI, model: str) -> None:
    kwargs = dict(model=model, prompt=PROMPT, max_tokens=24, temperature=0)
    full = client.completions.create(**kwargs)
    chunks = list(client.completions.create(**kwargs, stream=True, stream_options={"include_usage": True}))
    text = "".join(c.choices[0].text for c in chunks if c.choices)
    assert text == full.choices[0].text
    finishes = [c.choices[0].finish_reason for c in chunks if c.choices and c.choices[0].finish_reason]
    assert finishes == [full.choices[0].finish_reason]
    # include_usage: one final chunk with empty choices and the usage
    assert chunks[-1].choices == [] and chunks[-1].usage is not None
    assert chunks[-1].usage.completion_tokens == full.usage.completion_tokens
    assert chunks[-1].usage.prompt_tokens == full.usage.prompt_tokens
    assert all(c.usage is None for c in chunks[:-1])


def test_n_3_gives_three_indexed_choices(client: openai.OpenAI, model: str) -> None:
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=6, n=3, temperature=1.0, seed=7,
                                    extra_body={"ignore_eos": True})
    assert sorted(c.index for c in out.choices) == [0, 1, 2]
    assert out.usage.completion_tokens == 18
    assert len({c.text for c in out.choices}) > 1  # distinct seeds per child
    chunks = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=6, n=3, seed=7,
                                            stream=True, extra_body={"ignore_eos": True}))
    texts = {i: "".join(ch.text for c in chunks for ch in c.choices if ch.index == i) for i in range(3)}
    assert texts == {c.index: c.text for c in out.choices}  # same seeds: same samples, streamed or not


def test_multiple_prompts_and_token_id_prompts(client: openai.OpenAI, model: str, bundled_tokenizer) -> None:
    ids = bundled_tokenizer.encode(PROMPT)
    by_text = client.completions.create(model=model, prompt=[PROMPT, "Hello"], max_tokens=5, temperature=0, n=2)
    assert [c.index for c in sorted(by_text.choices, key=lambda c: c.index)] == [0, 1, 2, 3]
    by_ids = client.completions.create(model=model, prompt=ids, max_tokens=5, temperature=0)
    batch_ids = client.completions.create(model=model, prompt=[ids, bundled_tokenizer.encode("Hello")],
                                          max_tokens=5, temperature=0)
    first = {c.index: c.text for c in by_text.choices}
    assert by_ids.choices[0].text == first[0]
    assert sorted(c.text for c in batch_ids.choices) == sorted([first[0], first[2]])
    assert by_ids.usage.prompt_tokens == len(ids)


def test_stop_string_ends_the_text(client: openai.OpenAI, model: str) -> None:
    base = client.completions.create(model=model, prompt=PROMPT, max_tokens=20, temperature=0)
    text = base.choices[0].text
    stop = text[len(text) // 2: len(text) // 2 + 2]
    assert stop.strip(), f"no usable stop string in {text!r}"
    cut = client.completions.create(model=model, prompt=PROMPT, max_tokens=20, temperature=0, stop=[stop])
    assert cut.choices[0].finish_reason == "stop"
    assert cut.choices[0].text == text[: text.index(stop)]
    assert cut.choices[0].model_extra["stop_reason"] == stop
    streamed = "".join(c.choices[0].text for c in client.completions.create(
        model=model, prompt=PROMPT, max_tokens=20, temperature=0, stop=stop, stream=True))
    assert streamed == cut.choices[0].text


def test_logprobs_shape(client: openai.OpenAI, model: str) -> None:
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=5, temperature=0, logprobs=3)
    lp = out.choices[0].logprobs
    assert len(lp.tokens) == len(lp.token_logprobs) == len(lp.top_logprobs) == len(lp.text_offset) == 5
    assert "".join(lp.tokens) == out.choices[0].text
    for token, value, top in zip(lp.tokens, lp.token_logprobs, lp.top_logprobs):
        assert value <= 0 and token in top and 1 <= len(top) <= 4
        assert top[token] == value
        assert value == pytest.approx(max(top.values()))  # greedy: the chosen token is the most likely
    offsets = [0]
    for token in lp.tokens[:-1]:
        offsets.append(offsets[-1] + len(token))
    assert lp.text_offset == offsets


def test_echo_with_logprobs_has_null_first_prompt_token(client: openai.OpenAI, model: str,
                                                        bundled_tokenizer) -> None:
    ids = bundled_tokenizer.encode(PROMPT)
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0, echo=True, logprobs=1)
    choice = out.choices[0]
    assert choice.text.startswith(PROMPT)
    lp = choice.logprobs
    assert len(lp.tokens) == len(ids) + 3
    assert lp.token_logprobs[0] is None and lp.top_logprobs[0] is None
    assert all(v is not None and v <= 0 for v in lp.token_logprobs[1:])
    # the lm-eval loglikelihood request: token ids, echo, logprobs=1, max_tokens=1
    ll = client.completions.create(model=model, prompt=ids, max_tokens=1, temperature=0, echo=True, logprobs=1)
    ll_lp = ll.choices[0].logprobs
    assert ll_lp.token_logprobs[1:len(ids)] == pytest.approx(lp.token_logprobs[1:len(ids)], abs=1e-4)
    assert ll.choices[0].text.startswith(bundled_tokenizer.decode(ids))
    for value, top in zip(ll_lp.token_logprobs[1:], ll_lp.top_logprobs[1:]):
        assert value in top.values()
    streamed = list(client.completions.create(model=model, prompt=PROMPT, max_tokens=3, temperature=0, echo=True,
                                              logprobs=1, stream=True))
    assert "".join(c.choices[0].text for c in streamed) == choice.text
    assert streamed[0].choices[0].logprobs.token_logprobs[0] is None


def test_vllm_extras_are_accepted(client: openai.OpenAI, model: str, bundled_tokenizer) -> None:
    greedy = client.completions.create(model=model, prompt=PROMPT, max_tokens=8, temperature=0)
    first_id = bundled_tokenizer.encode(greedy.choices[0].text, add_special_tokens=False)[0]
    out = client.completions.create(
        model=model, prompt=PROMPT, max_tokens=8, temperature=0.8, top_p=0.9, seed=3, presence_penalty=0.5,
        frequency_penalty=0.5, logit_bias={str(first_id): -100}, user="someone",
        extra_body={"top_k": 20, "min_p": 0.01, "repetition_penalty": 1.1, "ignore_eos": True, "min_tokens": 4,
                    "stop_token_ids": [0], "priority": 1},
    )
    assert out.choices[0].finish_reason in ("length", "stop")
    assert out.usage.completion_tokens >= 4


def test_async_client_concurrent_requests(tiny_server: RunningServer, model: str) -> None:
    async def main() -> list[str]:
        async with openai.AsyncOpenAI(base_url=tiny_server.v1, api_key="unused", max_retries=0) as client:
            outs = await asyncio.gather(*(
                client.completions.create(model=model, prompt=f"{PROMPT} {i}", max_tokens=6, temperature=0)
                for i in range(6)))
            stream = await client.completions.create(model=model, prompt=f"{PROMPT} 0", max_tokens=6,
                                                     temperature=0, stream=True)
            streamed = "".join([c.choices[0].text async for c in stream])
            assert streamed == outs[0].choices[0].text
            return [o.choices[0].text for o in outs]

    texts = asyncio.run(main())
    assert len(texts) == 6 and all(isinstance(t, str) for t in texts)
