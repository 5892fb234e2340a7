"""OpenAI-shaped errors: {"error": {"message", "type", "param", "code"}} with the right HTTP status.

Anything a client sent maps to a 4xx here; a 500 only ever means a server bug.
"""

from __future__ import annotations

import json
import logging

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.responses import JSONResponse

from pagellm.engine.async_llm import EngineDeadError, EngineStepError
from pagellm.errors import InvalidRequest

logger = logging.getLogger(__name__)

_TYPES = {
    400: "invalid_request_error",
    401: "authentication_error",
    403: "permission_error",
    404: "not_found_error",
    405: "invalid_request_error",
    413: "invalid_request_error",
    415: "invalid_request_error",
    431: "invalid_request_error",
    500: "internal_error",
    503: "service_unavailable",
}


class APIError(Exception):
    """An error to return as an OpenAI-shaped body."""

    def __init__(self, status: int, message: str, param: str | None = None, code: str | None = None,
                 headers: dict[str, str] | None = None) -> None:
        super().__init__(message)
        self.status = status
        self.message = message
        self.param = param
        self.code = code
        self.headers = headers or {}


def error_body(status: int, message: str, param: str | None = None, code: str | None = None) -> dict:
    return {"error": {"message": message, "type": _TYPES.get(status, "invalid_request_error"),
                      "param": param, "code": code}}


def error_json(status: int, message: str, param: str | None = None, code: str | None = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse(error_body(status, message, param, code), status_code=status, headers=headers)


def to_api_error(exc: BaseException) -> APIError:
    """Map an exception from validation or the engine to its HTTP error."""
    if isinstance(exc, APIError):
        return exc
    if isinstance(exc, InvalidRequest):
        return APIError(400, exc.message, exc.param)
    if isinstance(exc, EngineDeadError):
        return APIError(503, str(exc), code="engine_unavailable")
    if isinstance(exc, EngineStepError):
        return APIError(500, str(exc), code="engine_step_failed")
    logger.error("unexpected error", exc_info=exc)
    return APIError(500, f"internal error: {type(exc).__name__}: {exc}")


def stream_error_event(exc: BaseException) -> str:
    """An SSE event carrying an error after the stream started (the status is already 200)."""
    err = to_api_error(exc)
    return f"data: {json.dumps(error_body(err.status, err.message, err.param, err.code))}\n\n"


def _validation_message(exc: RequestValidationError) -> tuple[str, str | None]:
    """One readable line naming the offending field(s) of a pydantic error."""
    parts = []
    param = None
    for err in exc.errors():
        field = _field_path(err.get("loc", ()))
        if param is None and field:
            param = field
        if err.get("type") == "extra_forbidden":
            parts.append(f"unsupported field '{field}'")
        elif err.get("type") == "json_invalid":
            parts.append(f"invalid JSON: {err.get('ctx', {}).get('error', err.get('msg'))}")
        else:
            parts.append(f"{field or 'body'}: {err.get('msg')}")
    unique = list(dict.fromkeys(parts))
    return "; ".join(unique[:5]) or "invalid request body", param


def _decode_error_message(exc: UnicodeDecodeError) -> str:
    """What FastAPI reports as "There was an error parsing the body" when the JSON's bytes do not decode."""
    # NOTE: json.loads guesses UTF-16/32 from the first bytes' NULs; say so when it guessed anything but UTF-8.
    encoding = "" if exc.encoding.replace("-", "").lower().startswith("utf8") else f" (read as {exc.encoding})"
    return (f"request body is not valid UTF-8 JSON{encoding}: {exc.reason} at byte {exc.start} "
            f"({exc.object[exc.start:exc.start + 4]!r})")


def _field_path(loc: tuple) -> str:
    """pydantic's error location as the client wrote the field: ("body", "messages", 1, "role") -> messages[1].role."""
    path = ""
    for part in loc:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part != "body" and not _is_union_member(part):
            path += f".{part}" if path else part
    return path


def _is_union_member(part: str) -> bool:
    """NOTE: union members repeat the same field with their type name appended ("str", "list[int]"); skip those."""
    return part in _TYPE_NAMES or "[" in part or part.startswith(("function-", "constrained-", "tagged-union"))


_TYPE_NAMES = frozenset({"str", "int", "float", "bool", "none", "any", "dict", "list"})


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(APIError)
    async def _api_error(_: Request, exc: APIError) -> JSONResponse:
        return error_json(exc.status, exc.message, exc.param, exc.code, exc.headers)

    @app.exception_handler(InvalidRequest)
    async def _invalid(_: Request, exc: InvalidRequest) -> JSONResponse:
        return error_json(400, exc.message, exc.param)

    @app.exception_handler(RequestValidationError)
    async def _validation(_: Request, exc: RequestValidationError) -> JSONResponse:
        message, param = _validation_message(exc)
        return error_json(400, message, param)

    @app.exception_handler(StarletteHTTPException)
    async def _http(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        if exc.status_code == 400 and isinstance(exc.__cause__, BodyTooLarge):
            return error_json(413, str(exc.__cause__), code="request_too_large")
        if exc.status_code == 400 and isinstance(exc.__cause__, UnicodeDecodeError):
            return error_json(400, _decode_error_message(exc.__cause__))
        return error_json(exc.status_code, str(exc.detail), headers=getattr(exc, "headers", None))

    @app.exception_handler(Exception)
    async def _unexpected(_: Request, exc: Exception) -> JSONResponse:
        err = to_api_error(exc)
        return error_json(err.status, err.message, err.param, err.code, err.headers)


class BodyTooLarge(Exception):
    """A request body (chunked, so unchecked up front) grew past --max-request-body-bytes."""
