"""OpenAI tool calling on /v1/chat/completions: request checks, prompt rendering and forced-call schemas.

Where the model's chat template renders tools itself (it mentions ``tools``), tools and tool messages go
to it unchanged. Otherwise (the bundled SmolLM2) pagellm writes the Hermes convention into the prompt:
the tool signatures inside <tools></tools> in the system message, earlier calls as
<tool_call>{"name": ..., "arguments": {...}}</tool_call> in assistant turns, and tool results inside
<tool_response></tool_response>; ``tool_parsers.parse_hermes`` reads the model's answer back.

``tool_choice`` "required" and a named function are forced with a JSON schema (a grammar): named ->
the function's parameters object; required -> an array of {"name", "arguments"} objects, each an anyOf
over the tools (one item at most when parallel_tool_calls is false).
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pagellm.entrypoints.openai.protocol import ChatMessage
from pagellm.errors import InvalidRequest

_ANY_OBJECT: dict[str, Any] = {"type": "object"}


@dataclass
class ToolSetup:
    """A request's tools after checking: mode none | auto | required | named."""

    tools: list[dict[str, Any]]  # OpenAI's [{"type": "function", "function": {...}}]
    mode: str
    named: str | None = None
    parallel: bool = True

    @property
    def functions(self) -> list[dict[str, Any]]:
        return [t["function"] for t in self.tools]

    def forced_schema(self) -> dict[str, Any] | None:
        """The JSON schema that forces the call (required, named); None for auto and none."""
        if self.mode == "named":
            function = next(f for f in self.functions if f["name"] == self.named)
            return function.get("parameters") or _ANY_OBJECT
        if self.mode != "required":
            return None
        items = [{
            "type": "object",
            "properties": {"name": {"type": "string", "enum": [f["name"]]},
                           "arguments": f.get("parameters") or _ANY_OBJECT},
            "required": ["name", "arguments"],
            "additionalProperties": False,
        } for f in self.functions]
        schema: dict[str, Any] = {"type": "array", "minItems": 1, "items": {"anyOf": items}}
        if not self.parallel:
            schema["maxItems"] = 1
        return schema


def check_tools(tools: list[dict[str, Any]] | None, tool_choice: Any, parallel_tool_calls: bool | None
                ) -> ToolSetup | None:
    """The request's ToolSetup, None without tools; 400 naming tools or tool_choice when malformed."""
    if not tools:
        if tool_choice not in (None, "none"):
            raise InvalidRequest("tool_choice needs tools", param="tool_choice")
        return None
    names = []
    for i, tool in enumerate(tools):
        function = tool.get("function") if isinstance(tool, dict) else None
        if tool.get("type", "function") != "function" or not isinstance(function, dict):
            raise InvalidRequest(f"tools[{i}] must be {{\"type\": \"function\", \"function\": {{...}}}}", param="tools")
        name = function.get("name")
        if not isinstance(name, str) or not name:
            raise InvalidRequest(f"tools[{i}].function.name must be a non-empty string", param="tools")
        parameters = function.get("parameters")
        if parameters is not None and not isinstance(parameters, dict):
            raise InvalidRequest(f"tools[{i}].function.parameters must be a JSON schema object", param="tools")
        names.append(name)
    if len(set(names)) != len(names):
        raise InvalidRequest("tools must have distinct function names", param="tools")
    parallel = True if parallel_tool_calls is None else parallel_tool_calls
    if tool_choice is None or tool_choice in ("auto", "none", "required"):
        return ToolSetup(tools, tool_choice or "auto", parallel=parallel)
    if isinstance(tool_choice, dict) and tool_choice.get("type") == "function":
        name = (tool_choice.get("function") or {}).get("name")
        if name not in names:
            raise InvalidRequest(f"tool_choice names the function {name!r}, which is not among the tools "
                                 f"({', '.join(names)})", param="tool_choice")
        return ToolSetup(tools, "named", named=name, parallel=parallel)
    raise InvalidRequest("tool_choice must be 'none', 'auto', 'required' or "
                         "{\"type\": \"function\", \"function\": {\"name\": ...}}", param="tool_choice")


def template_renders_tools(tokenizer: Any) -> bool:
    """Whether the model's chat template has its own tools section."""
    try:
        template = tokenizer.get_chat_template(None, [])
    except Exception:  # noqa: BLE001 - no template: the caller's chat path reports it
        return False
    return isinstance(template, str) and "tools" in template


def hermes_system_prompt(functions: list[dict[str, Any]]) -> str:
    signatures = "\n".join(json.dumps({"type": "function", "function": f}, ensure_ascii=False) for f in functions)
    return ("You can call functions to answer the user. Their signatures, as JSON, are inside <tools></tools>:\n"
            f"<tools>\n{signatures}\n</tools>\n"
            "To call a function, reply with a JSON object holding its name and arguments inside "
            "<tool_call></tool_call> tags, one block per call:\n"
            "<tool_call>\n{\"name\": <function name>, \"arguments\": <arguments as a JSON object>}\n</tool_call>")


def _arguments_object(arguments: Any) -> Any:
    if isinstance(arguments, str):
        try:
            return json.loads(arguments)
        except ValueError:
            return arguments
    return arguments


def render_tool_messages(messages: list[ChatMessage], setup: ToolSetup | None, native: bool) -> list[ChatMessage]:
    """Messages ready for the template: tool calls and results in Hermes text unless the template is native."""
    out = []
    for i, message in enumerate(messages):
        extra = message.model_extra or {}
        tool_calls = extra.get("tool_calls")
        if message.role == "tool" and not isinstance(extra.get("tool_call_id", ""), str):
            raise InvalidRequest(f"messages[{i}].tool_call_id must be a string", param="messages")
        if tool_calls is not None and not isinstance(tool_calls, list):
            raise InvalidRequest(f"messages[{i}].tool_calls must be a list", param="messages")
        if native:
            if tool_calls:
                calls = [{**c, "function": {**c.get("function", {}),
                                            "arguments": _arguments_object(c.get("function", {}).get("arguments"))}}
                         for c in tool_calls]
                message = message.model_copy(update={"tool_calls": calls})
            out.append(message)
            continue
        if message.role == "assistant" and tool_calls:
            blocks = []
            for c in tool_calls:
                function = c.get("function") if isinstance(c, dict) else None
                if not isinstance(function, dict) or not isinstance(function.get("name"), str):
                    raise InvalidRequest(f"messages[{i}].tool_calls entries need function.name", param="messages")
                call = {"name": function["name"], "arguments": _arguments_object(function.get("arguments", {}))}
                blocks.append(f"<tool_call>\n{json.dumps(call, ensure_ascii=False)}\n</tool_call>")
            text = _text(message)
            out.append(ChatMessage(role="assistant", content="\n".join(([text] if text else []) + blocks)))
        elif message.role == "tool":
            out.append(ChatMessage(role="tool", content=f"<tool_response>\n{_text(message)}\n</tool_response>"))
        else:
            out.append(message)
    if setup is not None and setup.mode != "none" and not native:
        prompt = hermes_system_prompt(setup.functions)
        if out and out[0].role == "system":
            out[0] = ChatMessage(role="system", content=f"{_text(out[0])}\n\n{prompt}".lstrip())
        else:
            out.insert(0, ChatMessage(role="system", content=prompt))
    return out


def _text(message: ChatMessage) -> str:
    content = message.content
    if isinstance(content, list):
        return "\n".join(p.get("text", "") for p in content if isinstance(p, dict))
    return content or ""
