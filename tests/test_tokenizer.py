"""LiteTokenizer (tokenizers + jinja, no transformers) answers exactly as transformers' tokenizer does."""

from __future__ import annotations

import json
import shutil

import jinja2
import pytest

from pagellm.model_source import ModelSource, resolve_model
from pagellm.tokenizer import LiteTokenizer, load_tokenizer

TEXTS = [
    "Hello world",
    " leading and trailing spaces  ",
    "The capital of France is Paris.\n\nNew paragraph,\ttab.",
    "東京は日本の首都です。你好，世界！",
    "emoji 😀🌙 family 👨‍👩‍👧‍👦 flag 🇺🇸",
    "<|im_start|>user\nHi<|im_end|>\n",
    "<|endoftext|> then text <s> and </s>",
    "",
    "Ça va? é ñ ü",
    "1234567890 + 3.14159 = ?",
]
SPECIAL_ATTRS = ["bos_token", "eos_token", "unk_token", "pad_token", "sep_token", "cls_token", "mask_token",
                 "bos_token_id", "eos_token_id", "unk_token_id", "pad_token_id", "sep_token_id", "cls_token_id",
                 "mask_token_id", "all_special_tokens", "all_special_ids", "special_tokens_map", "chat_template",
                 "add_bos_token"]
CONVERSATION = [
    {"role": "system", "content": "You are terse."},
    {"role": "user", "content": "What is the capital of France? 🇫🇷"},
    {"role": "assistant", "content": "Paris."},
    {"role": "user", "content": "And of Japan (日本)?"},
]

# A template that leans on the environment: whitespace control, loop controls, namespace, dict(), tojson,
# raise_exception, a {% generation %} block, reasoning aliases, dropped None fields, tools and extra kwargs.
TINY_TEMPLATE = """{%- set ns = namespace(turns=0) -%}
{{ bos_token }}
{% for message in messages %}
    {% if message['role'] not in ['system', 'user', 'assistant'] %}
        {{ raise_exception('unknown role: ' + message['role']) }}
    {% endif %}
    {% if loop.index0 >= 6 %}{% break %}{% endif %}
    {% set ns.turns = ns.turns + 1 %}
[{{ message['role'] | upper }}]
    {%- if message.reasoning_content %} <think>{{ message.reasoning_content }}</think>{% endif %}
    {% if message['role'] == 'assistant' %}
{% generation %} {{ message['content'] | trim }}{{ eos_token }}{% endgeneration %}
    {% else %}
 {{ message['content'] }}{% if message.tool_calls is defined %} (tool calls){% endif %}
    {% endif %}

{% endfor %}
{% if tools %}TOOLS {{ tools | tojson }}
{% endif %}
{% if user_name is defined %}for {{ user_name }}
{% endif %}
{% if add_generation_prompt %}[ASSISTANT]{% endif %}
{{ dict(turns=ns.turns) | tojson }}"""
TOOL_TEMPLATE = "{{ bos_token }}tools={{ tools | tojson(indent=2) }}{% for m in messages %}|{{ m.content }}{% endfor %}"


@pytest.fixture(scope="module")
def bundled_pair(bundled_tokenizer):
    """(LiteTokenizer, transformers tokenizer) of the bundled SmolLM2 GGUF (its converted, cached tokenizer)."""
    lite = load_tokenizer(resolve_model(None))
    assert isinstance(lite, LiteTokenizer)
    return lite, bundled_tokenizer


@pytest.fixture(scope="module")
def tiny_folder(tmp_path_factory) -> str:
    """A Metaspace BPE with a BOS-adding post-processor, saved by transformers (the way HF folders hold one)."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers, processors, trainers
    from transformers import PreTrainedTokenizerFast

    corpus = ["the quick brown fox jumps over the lazy dog", "hello world, hello tokenizer",
              "numbers 123 456 and symbols !?", "Paris is the capital of France"] * 20
    tok = Tokenizer(models.BPE(unk_token="<unk>"))
    tok.pre_tokenizer = pre_tokenizers.Metaspace()
    tok.decoder = decoders.Metaspace()
    tok.train_from_iterator(corpus, trainers.BpeTrainer(vocab_size=200,
                                                        special_tokens=["<unk>", "<s>", "</s>", "<pad>", "<tool>"]))
    tok.post_processor = processors.TemplateProcessing(single="<s> $A", pair="<s> $A <s> $B",
                                                       special_tokens=[("<s>", 1)])
    hf = PreTrainedTokenizerFast(tokenizer_object=tok, bos_token="<s>", eos_token="</s>", unk_token="<unk>",
                                 pad_token="<pad>", extra_special_tokens=["<tool>"], chat_template=TINY_TEMPLATE)
    path = tmp_path_factory.mktemp("tiny_tokenizer")
    hf.save_pretrained(str(path))
    return str(path)


@pytest.fixture(scope="module")
def tiny_pair(tiny_folder):
    from transformers import AutoTokenizer

    lite = LiteTokenizer.from_folder(tiny_folder)
    assert lite is not None
    return lite, AutoTokenizer.from_pretrained(tiny_folder, local_files_only=True)


def assert_same_tokens(lite, hf) -> None:
    assert len(lite) == len(hf)
    for name in SPECIAL_ATTRS:
        assert getattr(lite, name) == getattr(hf, name), name
    for text in TEXTS:
        for add_special in (True, False):
            ids = hf.encode(text, add_special_tokens=add_special)
            assert lite.encode(text, add_special_tokens=add_special) == ids, (text, add_special)
            for skip in (True, False):
                assert lite.decode(ids, skip_special_tokens=skip) == hf.decode(ids, skip_special_tokens=skip)
                assert (lite.convert_ids_to_tokens(ids, skip_special_tokens=skip)
                        == hf.convert_ids_to_tokens(ids, skip_special_tokens=skip))
        assert lite.convert_tokens_to_ids(hf.convert_ids_to_tokens(ids)) == hf.convert_tokens_to_ids(
            hf.convert_ids_to_tokens(ids))
    assert lite.decode(hf.eos_token_id) == hf.decode(hf.eos_token_id)
    assert lite.convert_ids_to_tokens(hf.eos_token_id) == hf.convert_ids_to_tokens(hf.eos_token_id)
    # called like an HF tokenizer: one text or a batch, attribute or key access
    assert lite(TEXTS[0]).input_ids == hf(TEXTS[0]).input_ids
    assert lite(TEXTS[:3])["input_ids"] == hf(TEXTS[:3])["input_ids"]
    assert lite(TEXTS[:3]).attention_mask == hf(TEXTS[:3]).attention_mask
    assert lite(TEXTS[0], add_special_tokens=False).input_ids == hf(TEXTS[0], add_special_tokens=False).input_ids


def assert_same_chats(lite, hf, conversations: list[list[dict]], **kwargs) -> None:
    for conversation in conversations:
        for add_generation_prompt in (True, False):
            want = hf.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt,
                                          **kwargs)
            got = lite.apply_chat_template(conversation, tokenize=False, add_generation_prompt=add_generation_prompt,
                                           **kwargs)
            assert got == want, (conversation, add_generation_prompt, kwargs)


def test_bundled_tokenizer_encodes_and_decodes_like_transformers(bundled_pair):
    assert_same_tokens(*bundled_pair)


def test_bundled_chat_template_renders_like_transformers(bundled_pair):
    lite, hf = bundled_pair
    conversations = [CONVERSATION, CONVERSATION[1:], CONVERSATION[:3], CONVERSATION[1:2]]
    assert_same_chats(lite, hf, conversations)
    assert_same_chats(lite, hf, conversations, bos_token="[BOS]")  # a caller's value overrides the tokenizer's
    for conversation in (CONVERSATION[:3], [*CONVERSATION[1:2], {"role": "assistant", "content": "The capital is "}]):
        assert (lite.apply_chat_template(conversation, tokenize=False, continue_final_message=True)
                == hf.apply_chat_template(conversation, tokenize=False, continue_final_message=True))


def test_tiny_tokenizer_encodes_and_decodes_like_transformers(tiny_pair):
    lite, hf = tiny_pair
    assert hf.encode("hello world")[0] == hf.bos_token_id  # its post-processor adds BOS
    assert_same_tokens(lite, hf)


def test_tiny_chat_template_renders_like_transformers(tiny_pair):
    lite, hf = tiny_pair
    reasoning = [{"role": "user", "content": "Hi"},
                 {"role": "assistant", "content": "  Hello!  ", "thinking": "greet back", "tool_calls": None},
                 {"role": "user", "content": "Bye", "tool_calls": []}]
    long = [{"role": "user" if i % 2 == 0 else "assistant", "content": f"turn {i}"} for i in range(9)]
    conversations = [CONVERSATION, CONVERSATION[1:], reasoning, long]
    assert_same_chats(lite, hf, conversations)
    tools = [{"type": "function", "function": {"name": "météo", "parameters": {"city": "Zürich <&>"}}}]
    assert_same_chats(lite, hf, conversations, tools=tools, user_name="Zoë")
    assert_same_chats(lite, hf, conversations, chat_template=TOOL_TEMPLATE, tools=tools)


def test_template_errors_match(tiny_pair):
    lite, hf = tiny_pair
    bad = [{"role": "tool", "content": "x"}]
    for tok in (lite, hf):
        with pytest.raises(jinja2.exceptions.TemplateError, match="unknown role: tool"):
            tok.apply_chat_template(bad, tokenize=False)
        with pytest.raises(ValueError, match="empty conversation"):
            tok.apply_chat_template([], tokenize=False)
        with pytest.raises(ValueError, match="not compatible"):
            tok.apply_chat_template(CONVERSATION, tokenize=False, add_generation_prompt=True,
                                    continue_final_message=True)
        with pytest.raises(jinja2.exceptions.SecurityError):
            tok.apply_chat_template(CONVERSATION, tokenize=False,
                                    chat_template="{% set ns = namespace() %}{% set ns._x = 1 %}")


def test_named_chat_templates_are_chosen_like_transformers(tiny_folder, tmp_path):
    from transformers import AutoTokenizer

    folder = tmp_path / "named"
    shutil.copytree(tiny_folder, folder)
    (folder / "additional_chat_templates").mkdir()
    (folder / "additional_chat_templates" / "tool_use.jinja").write_text(TOOL_TEMPLATE)
    lite, hf = LiteTokenizer.from_folder(folder), AutoTokenizer.from_pretrained(str(folder), local_files_only=True)
    assert isinstance(lite.chat_template, dict) and lite.chat_template == hf.chat_template
    tools = [{"name": "f"}]
    assert_same_chats(lite, hf, [CONVERSATION])
    assert_same_chats(lite, hf, [CONVERSATION], tools=tools)  # picks "tool_use"
    assert_same_chats(lite, hf, [CONVERSATION], chat_template="tool_use", tools=tools)


@pytest.mark.parametrize("edit", [
    {"tokenizer_class": "LlamaTokenizer"},  # a model-specific class rebuilds the tokenizer
    {"sep_token": "<sep>"},  # not an added token yet: transformers would add it
    {"image_token": "<tool>"},  # a model-specific special token
    {"split_special_tokens": True},
])
def test_folders_transformers_would_change_load_through_transformers(tiny_folder, tmp_path, edit):
    folder = tmp_path / "edited"
    shutil.copytree(tiny_folder, folder)
    config = json.loads((folder / "tokenizer_config.json").read_text())
    (folder / "tokenizer_config.json").write_text(json.dumps({**config, **edit}))
    assert LiteTokenizer.from_folder(folder) is None
    tok = load_tokenizer(ModelSource(folder, "hf", "edited"))
    assert not isinstance(tok, LiteTokenizer) and tok.eos_token == "</s>"


def test_lite_tokenizer_renders_text_only(tiny_pair):
    lite, _ = tiny_pair
    with pytest.raises(NotImplementedError, match="tokenize=False"):
        lite.apply_chat_template(CONVERSATION)
