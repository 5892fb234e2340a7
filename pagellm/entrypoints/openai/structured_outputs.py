"""Request fields that constrain the output -> StructuredOutputsParams, with 400s naming the field sent.

Three spellings reach the same params: OpenAI's ``response_format`` (chat only), vLLM's
``structured_outputs`` object, and vLLM's older ``guided_json`` / ``guided_regex`` / ``guided_choice`` /
``guided_grammar`` (+ ``guided_whitespace_pattern``) fields. At most one may be used per request.
"""

from __future__ import annotations

from typing import Any

from pagellm.engine.async_llm import AsyncLLM
from pagellm.entrypoints.openai.protocol import ResponseFormat, SamplingFields
from pagellm.errors import InvalidRequest
from pagellm.structured_output import StructuredOutputsParams

_GUIDED = {"guided_json": "json", "guided_regex": "regex", "guided_choice": "choice", "guided_grammar": "grammar"}


def structured_outputs_of(req: SamplingFields, response_format: ResponseFormat | None = None
                          ) -> tuple[StructuredOutputsParams | None, str | None]:
    """The request's constraint and the name of the field that carried it (for error messages)."""
    found: list[tuple[str, dict[str, Any]]] = []
    if response_format is not None and response_format.type != "text":
        if response_format.type == "json_object":
            found.append(("response_format", {"json_object": True}))
        else:
            spec = response_format.json_schema
            if spec is None or spec.json_schema is None:
                raise InvalidRequest("response_format of type json_schema needs json_schema.schema",
                                     param="response_format.json_schema")
            found.append(("response_format.json_schema.schema", {"json": spec.json_schema}))
    if req.structured_outputs is not None:
        found.append(("structured_outputs", dict(req.structured_outputs)))
    guided = {kind: getattr(req, name) for name, kind in _GUIDED.items() if getattr(req, name) is not None}
    if guided:
        if req.guided_whitespace_pattern is not None:
            guided["whitespace_pattern"] = req.guided_whitespace_pattern
        found.append((next(name for name in _GUIDED if getattr(req, name) is not None), guided))
    if not found:
        return None, None
    if len(found) > 1:
        raise InvalidRequest(f"use only one of {', '.join(name for name, _ in found)} to constrain the output",
                             param=found[1][0])
    field, spec = found[0]
    try:
        return StructuredOutputsParams.from_value(spec), field
    except InvalidRequest as exc:
        raise _renamed(exc, field) from exc


async def check_structured_outputs(engine: AsyncLLM, params: StructuredOutputsParams, field: str) -> None:
    """Validate the spec and start its compile (400 naming the field as the client sent it)."""
    try:
        await engine.prepare_structured_output(params)
    except InvalidRequest as exc:
        raise _renamed(exc, field) from exc


def _renamed(exc: InvalidRequest, field: str) -> InvalidRequest:
    """The error with its param named as the client sent it (structured_outputs.json -> response_format...)."""
    param = exc.param or field
    if field != "structured_outputs" and param.startswith("structured_outputs"):
        param = field if not param.endswith("whitespace_pattern") else "guided_whitespace_pattern"
    message = exc.message if param == exc.param else exc.message.replace(exc.param or "", param, 1)
    return InvalidRequest(message, param=param)
