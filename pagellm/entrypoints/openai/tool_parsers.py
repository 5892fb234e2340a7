"""Tool-call parsing: the Hermes format (<tool_call>{"name": ..., "arguments": {...}}</tool_call>) and the
JSON that forced tool choices produce; whole-text and streaming.

A stream sends content as it comes until a ``<tool_call>`` tag may be starting, then holds the rest back;
the calls go out when the sequence ends, one delta per call with its id, name and whole arguments, which
is how the OpenAI SDK assembles them (it concatenates ``function.arguments`` pieces by ``index``).
"""

from __future__ import annotations

import json
import re
import uuid
from dataclasses import dataclass

from pagellm.entrypoints.openai.protocol import (
    DeltaFunctionCall,
    DeltaMessage,
    DeltaToolCall,
    FunctionCall,
    ToolCall,
)

TOOL_CALL_START = "<tool_call>"
TOOL_CALL_END = "</tool_call>"
_TOOL_CALL_BLOCK = re.compile(r"<tool_call>\s*(.*?)\s*(?:</tool_call>|$)", re.DOTALL)


def new_tool_call_id() -> str:
    return f"call_{uuid.uuid4().hex[:24]}"


def make_tool_call(name: str, arguments: object) -> ToolCall:
    text = arguments if isinstance(arguments, str) else json.dumps(arguments, ensure_ascii=False)
    return ToolCall(id=new_tool_call_id(), function=FunctionCall(name=name, arguments=text))


def parse_hermes(text: str) -> tuple[str | None, list[ToolCall]]:
    """(content before the first call or the whole text, calls); a block that does not parse stays content."""
    start = text.find(TOOL_CALL_START)
    if start < 0:
        return text, []
    calls = []
    for block in _TOOL_CALL_BLOCK.findall(text[start:]):
        try:
            value = json.loads(block)
        except ValueError:
            return text, []
        if not isinstance(value, dict) or not isinstance(value.get("name"), str):
            return text, []
        arguments = value.get("arguments", value.get("parameters", {}))
        calls.append(make_tool_call(value["name"], arguments if arguments is not None else {}))
    content = text[:start].strip()
    return (content or None), calls


def parse_forced(text: str, named: str | None) -> list[ToolCall]:
    """Calls from a grammar-forced output: the arguments object (named) or [{"name", "arguments"}] (required)."""
    if named is not None:
        json.loads(text)  # the grammar made it an object; a cut-off one raises ValueError
        return [make_tool_call(named, text)]
    return [make_tool_call(call["name"], call["arguments"]) for call in json.loads(text)]


def _held_back(text: str) -> int:
    """How many trailing characters could be the start of a <tool_call> tag."""
    for n in range(min(len(TOOL_CALL_START) - 1, len(text)), 0, -1):
        if TOOL_CALL_START.startswith(text[-n:]):
            return n
    return 0


@dataclass
class ToolCallStreamer:
    """One choice's streaming state: mode auto (Hermes), named or required."""

    mode: str
    named: str | None = None
    text: str = ""
    num_content_sent: int = 0  # characters of `text` sent as content
    named_id: str | None = None

    def step(self, delta_text: str, finished: bool) -> tuple[DeltaMessage | None, bool]:
        """This step's delta (None: nothing to send) and whether it carried any tool call."""
        self.text += delta_text
        if self.mode == "named":
            return self._step_named(delta_text)
        if self.mode == "required":
            if not finished:
                return None, False
            try:
                return self._finish_calls(parse_forced(self.text, None))
            except (ValueError, KeyError, TypeError):  # cut off by max_tokens: the text as content
                return self._content(len(self.text)), False
        # auto
        start = self.text.find(TOOL_CALL_START)
        if finished:
            content, calls = parse_hermes(self.text)
            if calls:
                delta, _ = self._finish_calls(calls)
                unsent = (content or "")[self.num_content_sent:] if content else ""
                if unsent.strip():
                    delta.content = unsent
                return delta, True
            return self._content(len(self.text)), False
        end = start if start >= 0 else len(self.text) - _held_back(self.text)
        return self._content(end), False

    def _content(self, end: int) -> DeltaMessage | None:
        if end <= self.num_content_sent:
            return None
        piece = self.text[self.num_content_sent:end]
        self.num_content_sent = end
        return DeltaMessage(content=piece)

    def _step_named(self, delta_text: str) -> tuple[DeltaMessage | None, bool]:
        if self.named_id is None:
            if not delta_text:
                return None, False
            self.named_id = new_tool_call_id()
            call = DeltaToolCall(index=0, id=self.named_id, type="function",
                                 function=DeltaFunctionCall(name=self.named, arguments=delta_text))
        elif delta_text:
            call = DeltaToolCall(index=0, function=DeltaFunctionCall(arguments=delta_text))
        else:
            return None, True
        return DeltaMessage(tool_calls=[call]), True

    @staticmethod
    def _finish_calls(calls: list[ToolCall]) -> tuple[DeltaMessage, bool]:
        deltas = [DeltaToolCall(index=i, id=c.id, type="function",
                                function=DeltaFunctionCall(name=c.function.name, arguments=c.function.arguments))
                  for i, c in enumerate(calls)]
        return DeltaMessage(tool_calls=deltas), True
