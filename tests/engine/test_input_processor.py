"""The InputProcessor on its own: one context limit, generation and pooling rules, prompt forms."""

from __future__ import annotations

import pytest

from pagellm.engine.input_processor import InputProcessor
from pagellm.errors import InvalidRequest
from pagellm.sampling_params import SamplingParams


@pytest.fixture(scope="module")
def processor(bundled_tokenizer) -> InputProcessor:
    return InputProcessor(bundled_tokenizer, max_model_len=32, vocab_size=len(bundled_tokenizer),
                          max_tokens_in_pool=24)


def test_the_context_limit_is_the_smaller_of_the_window_and_the_kv_pool(bundled_tokenizer, processor):
    assert processor.context_limit == 24
    assert InputProcessor(bundled_tokenizer, 32, len(bundled_tokenizer)).context_limit == 32


def test_a_generate_prompt_must_leave_room_for_one_token(processor):
    params = SamplingParams()
    processor.check_token_ids([1] * 23, params)
    with pytest.raises(InvalidRequest, match="maximum context length is 24") as info:
        processor.check_token_ids([1] * 24, params)
    assert info.value.param == "prompt"


def test_a_pooling_prompt_may_fill_the_limit_and_truncates_on_request(bundled_tokenizer):
    processor = InputProcessor(bundled_tokenizer, 8, len(bundled_tokenizer), pooling=True)
    assert processor.process_pooling([1] * 8)[1] == [1] * 8
    with pytest.raises(InvalidRequest, match="maximum input length is 8"):
        processor.process_pooling([1] * 9)
    assert len(processor.process_pooling([1] * 9, truncate_prompt_tokens=-1)[1]) == 8
    with pytest.raises(InvalidRequest, match="truncate_prompt_tokens") as info:
        processor.process_pooling("hello", truncate_prompt_tokens=1)
    assert info.value.param == "truncate_prompt_tokens"


@pytest.mark.parametrize("prompt", ["Hello there", {"prompt": "Hello there"}])
def test_text_prompts_are_tokenized_and_token_prompts_kept(processor, prompt):
    text, ids = processor.process(prompt, SamplingParams())
    assert text == "Hello there" and ids == processor.tokenize("Hello there")
    assert processor.process({"prompt": "x", "prompt_token_ids": [5, 6]}, SamplingParams()) == ("x", [5, 6])
    assert processor.process([5, 6], SamplingParams()) == (None, [5, 6])


@pytest.mark.parametrize(("prompt", "match"), [
    ("", "empty"), ([], "empty"), ([10**9], "integers in"), ({"x": 1}, "'prompt'"), (3.5, "unsupported"),
])
def test_bad_prompts_are_invalid_requests(processor, prompt, match):
    with pytest.raises(InvalidRequest, match=match):
        processor.process(prompt, SamplingParams())


def test_a_pooling_batch_is_tokenized_as_each_text_alone(bundled_tokenizer):
    processor = InputProcessor(bundled_tokenizer, 16, len(bundled_tokenizer), pooling=True)
    texts = ["Hello there", "A longer sentence, with punctuation and numbers: 12,345.67 and ümlauts.", "x" * 90]
    prompts = [*texts, [5, 6, 7], {"prompt": "given ids", "prompt_token_ids": [8, 9]}]
    out = processor.process_pooling_batch(prompts, truncate_prompt_tokens=-1)
    expected = [bundled_tokenizer.encode(t, add_special_tokens=True, truncation=True, max_length=16) for t in texts]
    assert [ids for _, ids in out] == [*expected, [5, 6, 7], [8, 9]]
    assert [text for text, _ in out] == [*texts, None, "given ids"]
    assert out == [processor.process_pooling(p, truncate_prompt_tokens=-1) for p in prompts]
    with pytest.raises(InvalidRequest, match="the prompt is empty"):
        processor.process_pooling_batch(["fine", "  "])
