"""IncrementalDetokenizer on the bundled SmolLM2 byte-level BPE tokenizer: UTF-8, special tokens, stops."""

from __future__ import annotations

import pytest

from pagellm.engine.detokenizer import IncrementalDetokenizer
from pagellm.model_source import resolve_model
from pagellm.sampling_params import SamplingParams
from pagellm.tokenizer import load_tokenizer

CJK_TEXT = "東京は日本の首都です。你好，世界！"
EMOJI_TEXT = "👨‍👩‍👧‍👦 family 🏳️‍🌈 🇺🇸😀🍣"
MIXED_TEXT = "Hello 世界 😀! Ça va? 寿司🍜 and\nnew lines\ttabs é ñ"


@pytest.fixture(scope="session")
def tokenizer():
    return load_tokenizer(resolve_model(None))


@pytest.fixture(scope="session")
def prompt_ids(tokenizer) -> list[int]:
    messages = [{"role": "user", "content": "Say something."}]
    prompt = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=False)
    return tokenizer.encode(prompt, add_special_tokens=False)


def encode(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def stream(
    tokenizer, prompt_ids: list[int], output_ids: list[int], params: SamplingParams, step: int = 1
) -> tuple[IncrementalDetokenizer, list[str], str | None]:
    """Feed output_ids `step` at a time, finishing with the last ones; return the deltas and stop string."""
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, params)
    deltas: list[str] = []
    stop = None
    for start in range(0, len(output_ids), step):
        is_last = start + step >= len(output_ids)
        stop = detok.update(output_ids[start : start + step], finished=is_last)
        deltas.append(detok.get_next_delta())
        if stop is not None:
            break
    return detok, deltas, stop


@pytest.mark.parametrize("text", [CJK_TEXT, EMOJI_TEXT, MIXED_TEXT])
def test_multibyte_text_one_token_at_a_time_never_streams_replacement_chars(tokenizer, prompt_ids, text):
    output_ids = encode(tokenizer, text)
    pieces = [tokenizer.decode([i]) for i in output_ids]
    assert any("\ufffd" in piece for piece in pieces), "the text should split characters across tokens"

    detok = IncrementalDetokenizer(tokenizer, prompt_ids, SamplingParams())
    deltas = []
    for token_id in output_ids:
        assert detok.update([token_id]) is None
        deltas.append(detok.get_next_delta())
        assert "\ufffd" not in detok.output_text
    detok.update([], finished=True)
    deltas.append(detok.get_next_delta())

    assert all("\ufffd" not in delta for delta in deltas)
    assert "".join(deltas) == detok.output_text == tokenizer.decode(output_ids) == text


@pytest.mark.parametrize("step", [1, 2, 3, 7])
@pytest.mark.parametrize("text", [MIXED_TEXT, " leading space", "  two spaces", "\nnewline first"])
def test_round_trip_equals_full_decode_for_any_update_size(tokenizer, prompt_ids, text, step):
    output_ids = encode(tokenizer, text)
    detok, deltas, stop = stream(tokenizer, prompt_ids, output_ids, SamplingParams(), step=step)
    assert stop is None and detok.is_finished
    assert "".join(deltas) == detok.output_text == tokenizer.decode(output_ids) == text


def test_first_token_with_leading_space_keeps_it(tokenizer, prompt_ids):
    output_ids = encode(tokenizer, " Hello")
    assert len(output_ids) == 1
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, SamplingParams())
    detok.update(output_ids)
    assert detok.get_next_delta() == " Hello"


def test_no_prompt_context_decodes_the_same(tokenizer):
    output_ids = encode(tokenizer, MIXED_TEXT)
    detok, deltas, _ = stream(tokenizer, [], output_ids, SamplingParams())
    assert "".join(deltas) == detok.output_text == MIXED_TEXT


def test_prompt_ending_inside_a_character_does_not_glue_output_bytes(tokenizer):
    ids = encode(tokenizer, "😀 ok")
    assert "\ufffd" in tokenizer.decode(ids[:1])
    prompt, output_ids = ids[:1], ids[1:]
    detok, deltas, _ = stream(tokenizer, prompt, output_ids, SamplingParams())
    assert "".join(deltas) == detok.output_text == tokenizer.decode(output_ids)


def test_incomplete_bytes_at_finish_are_released(tokenizer, prompt_ids):
    output_ids = encode(tokenizer, "ab😀")[:-1]  # ends one byte short of the emoji
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, SamplingParams())
    detok.update(output_ids)
    assert detok.get_next_delta() == "ab"
    detok.update([], finished=True)
    final = tokenizer.decode(output_ids)
    assert final.endswith("\ufffd")
    assert "ab" + detok.get_next_delta() == detok.output_text == final


@pytest.mark.parametrize("skip", [True, False])
def test_skip_special_tokens(tokenizer, prompt_ids, skip):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    output_ids = encode(tokenizer, "Hi 你好") + [im_end] + encode(tokenizer, " more") + [im_end]
    params = SamplingParams(skip_special_tokens=skip)
    detok, deltas, _ = stream(tokenizer, prompt_ids, output_ids, params)
    expected = "Hi 你好 more" if skip else "Hi 你好<|im_end|> more<|im_end|>"
    assert "".join(deltas) == detok.output_text == expected
    assert detok.output_text == tokenizer.decode(output_ids, skip_special_tokens=skip)


def test_special_token_as_stop_string_when_not_skipped(tokenizer, prompt_ids):
    im_end = tokenizer.convert_tokens_to_ids("<|im_end|>")
    output_ids = encode(tokenizer, "Done.") + [im_end] + encode(tokenizer, " extra")
    params = SamplingParams(stop="<|im_end|>", skip_special_tokens=False)
    detok, deltas, stop = stream(tokenizer, prompt_ids, output_ids, params)
    assert stop == "<|im_end|>"
    assert "".join(deltas) == detok.output_text == "Done."


def test_detokenize_false_does_nothing(tokenizer, prompt_ids):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, SamplingParams(detokenize=False, stop="Hello"))
    assert detok.update(encode(tokenizer, "Hello world"), finished=True) is None
    assert detok.output_text == "" and detok.get_next_delta() == ""


# --- stop strings ------------------------------------------------------------------------------------

TEXT = "Hello world, how are you today?"  # Hello| world|,| how| are| you| today|?


@pytest.mark.parametrize(
    ("stop", "include", "expected"),
    [
        ("orl", False, "Hello w"),  # inside the single token " world"
        ("orl", True, "Hello worl"),  # the rest of that token is dropped too
        ("lo wo", False, "Hel"),  # across "Hello" and " world"
        ("lo wo", True, "Hello wo"),
        (", how are", False, "Hello world"),  # across four tokens
        ("Hello", False, ""),  # at the very start
        ("Hello", True, "Hello"),
        ("?", False, "Hello world, how are you today"),  # the very last char
    ],
)
@pytest.mark.parametrize("step", [1, 3, 100])
def test_stop_string(tokenizer, prompt_ids, stop, include, expected, step):
    params = SamplingParams(stop=stop, include_stop_str_in_output=include)
    detok, deltas, matched = stream(tokenizer, prompt_ids, encode(tokenizer, TEXT), params, step=step)
    assert matched == stop == detok.stop_str
    assert detok.is_finished
    assert "".join(deltas) == detok.output_text == expected


def test_orl_stop_case_lies_inside_one_token(tokenizer):
    pieces = [tokenizer.decode([i]) for i in encode(tokenizer, TEXT)]
    assert " world" in pieces  # so "orl" above matched inside one token


@pytest.mark.parametrize("step", [1, 2, 100])
def test_earliest_stop_string_wins(tokenizer, prompt_ids, step):
    params = SamplingParams(stop=["four", "three", "two"])
    detok, deltas, stop = stream(tokenizer, prompt_ids, encode(tokenizer, "one two three four"), params, step)
    assert stop == "two"
    assert "".join(deltas) == detok.output_text == "one "


@pytest.mark.parametrize("step", [1, 100])
def test_overlapping_stop_strings_first_completed_wins_whatever_the_update_size(tokenizer, prompt_ids, step):
    # "lo w" completes before "Hello world" does; of the two ending at "o", the earlier start wins.
    params = SamplingParams(stop=["Hello world", "lo w", "lo"], include_stop_str_in_output=True)
    detok, _, stop = stream(tokenizer, prompt_ids, encode(tokenizer, TEXT), params, step)
    assert stop == "lo" and detok.output_text == "Hello"
    params = SamplingParams(stop=["lo w", "o w"], include_stop_str_in_output=True)
    detok, _, stop = stream(tokenizer, prompt_ids, encode(tokenizer, TEXT), params, step)
    assert stop == "lo w" and detok.output_text == "Hello w"


def test_stop_string_in_prompt_is_ignored(tokenizer):
    prompt = encode(tokenizer, "say Hello")
    detok, deltas, stop = stream(tokenizer, prompt, encode(tokenizer, " there"), SamplingParams(stop="Hello"))
    assert stop is None and "".join(deltas) == " there"


def test_stop_string_with_multibyte_chars(tokenizer, prompt_ids):
    params = SamplingParams(stop="世界")
    detok, deltas, stop = stream(tokenizer, prompt_ids, encode(tokenizer, MIXED_TEXT), params)
    assert stop == "世界"
    assert "".join(deltas) == detok.output_text == "Hello "


def test_updates_after_a_stop_are_ignored(tokenizer, prompt_ids):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, SamplingParams(stop=" world"))
    assert detok.update(encode(tokenizer, TEXT)) == " world"
    assert detok.update(encode(tokenizer, " more world")) is None
    assert detok.output_text == detok.get_next_delta() == "Hello"


@pytest.mark.parametrize("include", [False, True])
@pytest.mark.parametrize(
    "stops", [["today?"], ["you today"], [", how", "xyz"], ["o"], ["are you!"], ["Hello world, how are you?"]]
)
def test_streamed_deltas_are_never_cut_later(tokenizer, prompt_ids, stops, include):
    params = SamplingParams(stop=stops, include_stop_str_in_output=include)
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, params)
    output_ids = encode(tokenizer, TEXT)
    streamed = ""
    for i, token_id in enumerate(output_ids):
        stop = detok.update([token_id], finished=i == len(output_ids) - 1)
        streamed += detok.get_next_delta()
        assert detok.output_text.startswith(streamed), "streamed text was cut by a stop string"
        if stop is not None:
            break
    assert streamed == detok.output_text
    expected = TEXT
    hits = [(TEXT.find(s) + len(s), TEXT.find(s), s) for s in stops if s in TEXT]
    if hits:
        end, start, _ = min(hits)
        expected = TEXT[: end if include else start]
    assert detok.output_text == expected


def test_only_a_possible_stop_prefix_is_held_back(tokenizer, prompt_ids):
    detok = IncrementalDetokenizer(tokenizer, prompt_ids, SamplingParams(stop=["worlds", "you!"]))
    detok.update(encode(tokenizer, "Hello wor"))
    assert detok.get_next_delta() == "Hello "  # "wor" may become "worlds"
    detok.update(encode(tokenizer, "ld and you"))
    assert detok.get_next_delta() == "world and "  # "you" may become "you!"
    assert detok.update(encode(tokenizer, " too"), finished=True) is None
    assert detok.get_next_delta() == "you too"
    assert detok.output_text == "Hello world and you too"


# --- cost ---------------------------------------------------------------------------------------------


class CountingTokenizer:
    """Wraps a tokenizer and records how many ids each decode call saw."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.window_sizes: list[int] = []

    def decode(self, token_ids, **kwargs) -> str:
        self.window_sizes.append(len(token_ids))
        return self.tokenizer.decode(token_ids, **kwargs)


def test_each_token_decodes_a_small_window_not_the_whole_output(tokenizer, prompt_ids):
    output_ids = encode(tokenizer, (MIXED_TEXT + " " + CJK_TEXT + EMOJI_TEXT) * 20)
    assert len(output_ids) > 500
    counting = CountingTokenizer(tokenizer)
    detok = IncrementalDetokenizer(counting, prompt_ids, SamplingParams(stop="never appears"))
    counting.window_sizes.clear()
    for i, token_id in enumerate(output_ids):
        detok.update([token_id], finished=i == len(output_ids) - 1)
    assert detok.output_text == tokenizer.decode(output_ids)
    assert len(counting.window_sizes) <= 2 * len(output_ids)
    assert max(counting.window_sizes) <= 8  # a few tokens: one multi-byte char plus one token of context
