"""Hermes tool-call parsing, the streaming hold-back, and the forced-call schemas (no model)."""

from __future__ import annotations

import json

import pytest

from pagellm.entrypoints.openai.tool_parsers import ToolCallStreamer, parse_forced, parse_hermes
from pagellm.entrypoints.openai.tools import check_tools
from pagellm.errors import InvalidRequest

TOOLS = [{"type": "function", "function": {"name": "a", "parameters": {"type": "object"}}},
         {"type": "function", "function": {"name": "b"}}]


def test_parse_hermes_blocks_and_content() -> None:
    text = ('Sure.\n<tool_call>\n{"name": "a", "arguments": {"x": 1}}\n</tool_call>\n'
            '<tool_call>{"name": "b"}</tool_call>')
    content, calls = parse_hermes(text)
    assert content == "Sure."
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("a", {"x": 1}), ("b", {})]
    assert len({c.id for c in calls}) == 2
    assert parse_hermes("no calls here") == ("no calls here", [])
    broken = '<tool_call>{"name": "a", "arguments": {</tool_call>'
    assert parse_hermes(broken) == (broken, [])  # unparsable: left as content
    unclosed = '<tool_call>{"name": "a", "arguments": {"x": 2}}'  # cut before the end tag
    assert [c.function.name for c in parse_hermes(unclosed)[1]] == ["a"]


def test_parse_forced() -> None:
    assert parse_forced('{"x": 1}', "a")[0].function.arguments == '{"x": 1}'
    calls = parse_forced('[{"name": "a", "arguments": {"x": 1}}, {"name": "b", "arguments": {}}]', None)
    assert [(c.function.name, c.function.arguments) for c in calls] == [("a", '{"x": 1}'), ("b", "{}")]
    with pytest.raises(ValueError):
        parse_forced('{"x": ', "a")


def test_streamer_holds_back_a_possible_tag_and_sends_calls_at_the_end() -> None:
    streamer = ToolCallStreamer("auto")
    pieces = ["Hello", " <tool", "_call>", '{"name": "a", "arguments": {"k": "v"}}', "</tool_call>"]
    sent, calls = "", []
    for i, piece in enumerate(pieces):
        delta, _ = streamer.step(piece, i == len(pieces) - 1)
        if delta is not None:
            sent += delta.content or ""
            calls += delta.tool_calls or []
    assert sent == "Hello "
    assert [(c.function.name, json.loads(c.function.arguments)) for c in calls] == [("a", {"k": "v"})]
    plain = ToolCallStreamer("auto")
    assert plain.step("a <", False)[0].content == "a "  # "<" may start a tag: held
    assert plain.step("b", True)[0].content == "<b"


def test_forced_schemas() -> None:
    required = check_tools(TOOLS, "required", False).forced_schema()
    assert required["type"] == "array" and required["maxItems"] == 1 and len(required["items"]["anyOf"]) == 2
    assert required["items"]["anyOf"][0]["properties"]["name"] == {"type": "string", "enum": ["a"]}
    named = check_tools(TOOLS, {"type": "function", "function": {"name": "b"}}, None)
    assert named.mode == "named" and named.forced_schema() == {"type": "object"}
    assert check_tools(TOOLS, None, None).forced_schema() is None


@pytest.mark.parametrize(("tools", "choice"), [
    (TOOLS, {"type": "function", "function": {"name": "c"}}),
    (TOOLS, "always"),
    (None, "required"),
    ([{"type": "function", "function": {"name": "a"}}, {"type": "function", "function": {"name": "a"}}], "auto"),
    ([{"type": "retrieval"}], "auto"),
])
def test_bad_tool_requests(tools, choice) -> None:
    with pytest.raises(InvalidRequest):
        check_tools(tools, choice, None)
