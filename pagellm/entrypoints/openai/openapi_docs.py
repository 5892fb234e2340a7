"""What each route answers, as /openapi.json declares it: response models, SSE streams and the error statuses.

The handlers return starlette Responses (no FastAPI response_model), so the schema would otherwise say
nothing true about the answers; tests/entrypoints/test_fuzz.py checks every answer against these.
"""

from __future__ import annotations

from typing import Any

from fastapi import FastAPI
from fastapi.openapi.utils import get_openapi
from pydantic import BaseModel

from pagellm.entrypoints.openai.protocol import ErrorResponse

_ERRORS = {
    400: "Invalid request: the message says what is wrong, `param` names the field",
    401: "Missing or wrong API key (only when the server runs with --api-key)",
    404: "No such adapter",
    413: "Request body larger than --max-request-body-bytes",
    431: "Request line and headers larger than --max-header-bytes",
    500: "A server bug (never an answer to client input)",
    503: "Overloaded (more than --max-waiting-requests waiting), shutting down, or the engine stopped; "
         "Retry-After says when to retry",
}
# Any route can answer these: the middleware runs before routing.
_ANY_ROUTE = (401, 413, 431, 500)


def errors(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """The OpenAI-shaped error responses a route gives, with the statuses every route can give."""
    return {status: {"model": ErrorResponse, "description": _ERRORS[status]}
            for status in sorted({*statuses, *_ANY_ROUTE})}


def json_ok(model: type[BaseModel], *error_statuses: int) -> dict[int | str, dict[str, Any]]:
    return {200: {"model": model}, **errors(*error_statuses)}


# Models only streams use (no route returns them whole): install_openapi adds them to the components.
_STREAM_MODELS: dict[str, type[BaseModel]] = {}


def json_or_stream(model: type[BaseModel], chunk: type[BaseModel],
                   *error_statuses: int) -> dict[int | str, dict[str, Any]]:
    """200 is one JSON body, or with stream=true Server-Sent Events: `data: <chunk JSON>` lines, then `data: [DONE]`.

    NOTE: in OpenAPI 3.1 the `schema` of text/event-stream describes one event ({"data", "event", "id"}).
    A failure after the 200 went out arrives as an event carrying an ErrorResponse.
    """
    _STREAM_MODELS[chunk.__name__] = chunk
    payload = {"anyOf": [{"$ref": f"#/components/schemas/{chunk.__name__}"},
                         {"$ref": "#/components/schemas/ErrorResponse"}]}
    data = {"type": "string", "if": {"const": "[DONE]"},
            "else": {"contentMediaType": "application/json", "contentSchema": payload}}
    event = {"type": "object", "required": ["data"], "properties": {"data": data},
             "description": f"`data: <{chunk.__name__} JSON>` events, then `data: [DONE]`"}
    return {200: {"model": model, "description": f"{model.__name__}, or with stream=true Server-Sent Events",
                  "content": {"text/event-stream": {"schema": event}}},
            **errors(*error_statuses)}


def install_openapi(app: FastAPI) -> None:
    """/openapi.json without FastAPI's 422 responses: validation errors are 400s here (see errors.py)."""

    def openapi() -> dict[str, Any]:
        if app.openapi_schema is None:
            schema = get_openapi(title=app.title, version=app.version, routes=app.routes)
            for path in schema.get("paths", {}).values():
                for operation in path.values():
                    responses = operation.get("responses", {})
                    responses.pop("422", None)
                    for status, response in responses.items():
                        # NOTE: FastAPI files error models under the route's own media type (text/plain for
                        # the LoRA routes); errors are always JSON.
                        if status[0] in "45" and response.get("content"):
                            response["content"] = {"application/json": next(iter(response["content"].values()))}
            components = schema.setdefault("components", {}).setdefault("schemas", {})
            for name in ("HTTPValidationError", "ValidationError"):
                components.pop(name, None)
            for name, model in _STREAM_MODELS.items():
                chunk = model.model_json_schema(ref_template="#/components/schemas/{model}", mode="serialization")
                for def_name, definition in chunk.pop("$defs", {}).items():
                    components.setdefault(def_name, definition)
                components.setdefault(name, chunk)
            app.openapi_schema = schema
        return app.openapi_schema

    app.openapi = openapi  # type: ignore[method-assign]
