"""Structured output and tool calling over HTTP with the real openai client, on the tiny random model
(its free text is noise: whatever parses, the grammar made parse)."""

from __future__ import annotations

import json
import re

import openai
import pytest

MESSAGES = [{"role": "user", "content": "What is the weather in Paris?"}]
WEATHER = {
    "type": "function",
    "function": {
        "name": "get_weather",
        "description": "The weather forecast of a city",
        "parameters": {
            "type": "object",
            "properties": {"city": {"type": "string", "enum": ["Paris", "Oslo", "Lima"]},
                           "days": {"type": "integer", "minimum": 1, "maximum": 7}},
            "required": ["city", "days"],
            "additionalProperties": False,
        },
    },
}
TIME = {
    "type": "function",
    "function": {"name": "get_time", "parameters": {
        "type": "object", "properties": {"zone": {"type": "string", "enum": ["UTC", "CET"]}},
        "required": ["zone"], "additionalProperties": False}},
}
TOOLS = [WEATHER, TIME]
SMALL_SCHEMA = {"type": "object", "properties": {"ok": {"type": "boolean"}, "n": {"type": "integer", "minimum": 0,
                                                                                  "maximum": 9}},
                "required": ["ok", "n"], "additionalProperties": False}


def check_call(name: str, arguments: str) -> None:
    args = json.loads(arguments)
    if name == "get_weather":
        assert set(args) == {"city", "days"} and args["city"] in ("Paris", "Oslo", "Lima")
        assert 1 <= args["days"] <= 7 and isinstance(args["days"], int)
    else:
        assert name == "get_time" and args in ({"zone": "UTC"}, {"zone": "CET"})


def assemble(stream) -> tuple[str, dict[int, dict[str, str]], str | None]:
    """Content, tool calls by index (id, name, arguments) and finish_reason, the way the SDK's helpers join deltas."""
    content, calls, finish = "", {}, None
    for chunk in stream:
        if not chunk.choices:
            continue
        choice = chunk.choices[0]
        content += choice.delta.content or ""
        for tc in choice.delta.tool_calls or []:
            call = calls.setdefault(tc.index, {"id": "", "name": "", "arguments": ""})
            call["id"] += tc.id or ""
            if tc.function is not None:
                call["name"] += tc.function.name or ""
                call["arguments"] += tc.function.arguments or ""
        finish = choice.finish_reason or finish
    return content, calls, finish


def test_json_schema_response_format(client: openai.OpenAI, model: str) -> None:
    r = client.chat.completions.create(
        model=model, messages=MESSAGES, max_tokens=60, temperature=0,
        response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SMALL_SCHEMA, "strict": True}})
    value = json.loads(r.choices[0].message.content)
    assert set(value) == {"ok", "n"} and isinstance(value["ok"], bool) and 0 <= value["n"] <= 9
    assert r.choices[0].finish_reason == "stop"


@pytest.mark.parametrize("extra", [
    {"structured_outputs": {"regex": r"[A-Z]\d{3}-[a-z]{2}"}},
    {"guided_regex": r"[A-Z]\d{3}-[a-z]{2}"},
])
def test_completion_regex_both_spellings(client: openai.OpenAI, model: str, extra: dict) -> None:
    r = client.completions.create(model=model, prompt="Code:", max_tokens=20, temperature=0.8, seed=3, n=3,
                                  extra_body=extra)
    for choice in r.choices:
        assert re.fullmatch(r"[A-Z]\d{3}-[a-z]{2}", choice.text), choice.text
        assert choice.finish_reason == "stop"


@pytest.mark.parametrize("extra", [
    {"structured_outputs": {"choice": ["positive", "negative", "neutral"]}},
    {"guided_choice": ["positive", "negative", "neutral"]},
    {"guided_grammar": 'root ::= "positive" | "negative" | "neutral"'},
    {"guided_json": {"type": "string", "enum": ["positive", "negative", "neutral"]}},
])
def test_chat_choice_grammar_and_guided_json(client: openai.OpenAI, model: str, extra: dict) -> None:
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=10, temperature=0, extra_body=extra)
    text = r.choices[0].message.content
    if "guided_json" in extra:
        text = json.loads(text)
    assert text in ("positive", "negative", "neutral")


def test_constrained_stream_equals_non_stream(client: openai.OpenAI, model: str) -> None:
    kw = dict(model=model, messages=MESSAGES, max_tokens=60, temperature=0,
              response_format={"type": "json_schema", "json_schema": {"name": "s", "schema": SMALL_SCHEMA}})
    whole = client.chat.completions.create(**kw).choices[0].message.content
    streamed, _, finish = assemble(client.chat.completions.create(stream=True, **kw))
    assert streamed == whole and finish == "stop"


@pytest.mark.parametrize("tool_choice", ["required", {"type": "function", "function": {"name": "get_time"}}])
def test_forced_tool_calls_validate_sync_and_streamed(client: openai.OpenAI, model: str, tool_choice) -> None:
    kw = dict(model=model, messages=MESSAGES, max_tokens=80, temperature=0, tools=TOOLS, tool_choice=tool_choice)
    r = client.chat.completions.create(**kw)
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and message.tool_calls
    for call in message.tool_calls:
        assert call.type == "function" and call.id.startswith("call_")
        check_call(call.function.name, call.function.arguments)
    if isinstance(tool_choice, dict):
        assert [c.function.name for c in message.tool_calls] == ["get_time"]
    content, calls, finish = assemble(client.chat.completions.create(stream=True, **kw))
    assert finish == "tool_calls" and not content
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        (c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls]
    assert all(c["id"].startswith("call_") for c in calls.values())


def test_required_without_parallel_calls_makes_one_call(client: openai.OpenAI, model: str) -> None:
    r = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=80, temperature=0.9, seed=5, n=4,
                                       tools=TOOLS, tool_choice="required", parallel_tool_calls=False)
    for choice in r.choices:
        assert len(choice.message.tool_calls) == 1
        check_call(choice.message.tool_calls[0].function.name, choice.message.tool_calls[0].function.arguments)


SCRIPTED = 'Let me look. <tool_call>\n{"name": "get_weather", "arguments": {"city": "Oslo", "days": 3}}\n</tool_call>'


def test_auto_parses_a_hermes_tool_call_block(client: openai.OpenAI, model: str) -> None:
    # the tiny model's output is scripted with a one-option choice; tool_choice auto must parse it
    kw = dict(model=model, messages=MESSAGES, max_tokens=60, temperature=0, tools=TOOLS,
              extra_body={"structured_outputs": {"choice": [SCRIPTED]}})
    r = client.chat.completions.create(**kw)
    message = r.choices[0].message
    assert r.choices[0].finish_reason == "tool_calls" and message.content == "Let me look."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in message.tool_calls] == [
        ("get_weather", {"city": "Oslo", "days": 3})]
    content, calls, finish = assemble(client.chat.completions.create(stream=True, **kw))
    assert finish == "tool_calls" and content.strip() == "Let me look."
    assert [(c["name"], json.loads(c["arguments"])) for c in calls.values()] == [
        ("get_weather", {"city": "Oslo", "days": 3})]


def test_auto_without_a_call_is_plain_content(client: openai.OpenAI, model: str) -> None:
    kw = dict(model=model, messages=MESSAGES, max_tokens=8, temperature=0, tools=TOOLS)
    r = client.chat.completions.create(**kw)
    assert not r.choices[0].message.tool_calls and r.choices[0].finish_reason == "length"
    content, calls, _ = assemble(client.chat.completions.create(stream=True, **kw))
    assert content == r.choices[0].message.content and not calls


def test_two_turn_tool_exchange_renders_and_runs(tiny_server, client: openai.OpenAI, model: str) -> None:
    first = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=80, temperature=0,
                                           tools=TOOLS, tool_choice="required")
    call = first.choices[0].message.tool_calls[0]
    messages = MESSAGES + [
        {"role": "assistant", "content": None, "tool_calls": [call.model_dump()]},
        {"role": "tool", "tool_call_id": call.id, "content": '{"forecast": "sunny"}'},
    ]
    final = client.chat.completions.create(model=model, messages=messages, max_tokens=5, temperature=0, tools=TOOLS)
    assert final.choices[0].finish_reason in ("length", "stop", "tool_calls")
    # the prompt the engine saw holds the Hermes renderings of the call and its result
    from pagellm.entrypoints.openai.protocol import ChatMessage
    from pagellm.entrypoints.openai.tools import check_tools, render_tool_messages

    rendered = render_tool_messages([ChatMessage(**m) for m in messages], check_tools(TOOLS, None, None), False)
    text = tiny_server.engine.render_chat([m.model_dump(exclude_none=True) for m in rendered])
    assert "<tools>" in text and '"get_weather"' in text and "<tool_response>\n{\"forecast\": \"sunny\"}" in text
    assert f'<tool_call>\n{{"name": "{call.function.name}", "arguments": {call.function.arguments}}}' in text


@pytest.mark.parametrize(("kw", "param"), [
    (dict(response_format={"type": "json_schema", "json_schema": {"name": "x", "schema": {"type": "bogus"}}}),
     "response_format.json_schema.schema"),
    (dict(extra_body={"structured_outputs": {"regex": "(unclosed"}}), "structured_outputs.regex"),
    (dict(extra_body={"guided_regex": "[z-a]"}), "guided_regex"),
    (dict(extra_body={"guided_grammar": "root ::= nothing"}), "guided_grammar"),
    (dict(tools=TOOLS, tool_choice={"type": "function", "function": {"name": "launch"}}), "tool_choice"),
    (dict(tools=TOOLS, tool_choice="sometimes"), "tool_choice"),
    (dict(tool_choice="required"), "tool_choice"),
    (dict(tools=[{"type": "function", "function": {"name": "f", "parameters": {"type": "nope"}}}],
          tool_choice="required"), "tools"),
    (dict(response_format={"type": "json_object"}, extra_body={"guided_regex": "a"}), "guided_regex"),
    (dict(extra_body={"structured_outputs": {"json": {"type": "object"}, "whitespace_pattern": " +"}}),
     "structured_outputs.whitespace_pattern"),
])
def test_bad_constraints_are_400_naming_the_field(client: openai.OpenAI, model: str, kw: dict, param: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=5, **kw)
    assert err.value.body["param"] == param, err.value.body
    # the server keeps serving
    ok = client.chat.completions.create(model=model, messages=MESSAGES, max_tokens=2)
    assert ok.choices[0].finish_reason == "length"


def test_bad_completion_constraint_is_400(client: openai.OpenAI, model: str) -> None:
    with pytest.raises(openai.BadRequestError) as err:
        client.completions.create(model=model, prompt="x", max_tokens=5,
                                  extra_body={"structured_outputs": {"json": {"$ref": "#/missing"}}})
    assert err.value.body["param"] == "structured_outputs.json"
