"""StructuredOutputsParams: what a request's output must match (vLLM's field names); no grammar library here."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from pagellm.errors import InvalidRequest

KINDS = ("json", "regex", "choice", "grammar", "json_object")


@dataclass(frozen=True)
class StructuredOutputsParams:
    """Exactly one of json (a JSON schema), regex, choice, grammar (EBNF) or json_object=True.

    ``whitespace_pattern`` shapes the whitespace of JSON output: unset allows any whitespace between
    JSON tokens (at most 8 characters at a time); a pattern that matches only the empty string asks
    for compact JSON. Shapes are checked here; whether a schema, regex or grammar compiles is checked by the backend
    (``pagellm.structured_output.manager``), which raises ``InvalidRequest`` naming the field too.
    """

    json: dict[str, Any] | str | None = None
    regex: str | None = None
    choice: list[str] | None = None
    grammar: str | None = None
    json_object: bool | None = None
    whitespace_pattern: str | None = None

    def __post_init__(self) -> None:
        set_kinds = [k for k in KINDS if getattr(self, k) not in (None, False)]
        if len(set_kinds) != 1:
            raise InvalidRequest(
                "structured_outputs needs exactly one of json, regex, choice, grammar or json_object, "
                f"got {set_kinds or 'none'}", param="structured_outputs")
        if self.json is not None:
            if isinstance(self.json, str):
                try:
                    schema = json.loads(self.json)
                except ValueError as exc:
                    raise InvalidRequest(f"structured_outputs.json is not valid JSON: {exc}",
                                         param="structured_outputs.json") from exc
                object.__setattr__(self, "json", schema)
            if not isinstance(self.json, dict):
                raise InvalidRequest("structured_outputs.json must be a JSON schema object",
                                     param="structured_outputs.json")
        for name in ("regex", "grammar", "whitespace_pattern"):
            value = getattr(self, name)
            if value is not None and not isinstance(value, str):
                raise InvalidRequest(f"structured_outputs.{name} must be a string", param=f"structured_outputs.{name}")
        if self.regex == "" or self.grammar == "":
            raise InvalidRequest("structured_outputs: an empty regex or grammar matches nothing useful",
                                 param="structured_outputs")
        if self.choice is not None:
            if (not isinstance(self.choice, list | tuple) or not self.choice
                    or not all(isinstance(c, str) and c for c in self.choice)):
                raise InvalidRequest("structured_outputs.choice must be a non-empty list of non-empty strings",
                                     param="structured_outputs.choice")
            object.__setattr__(self, "choice", list(self.choice))
        if self.json_object not in (None, True, False):
            raise InvalidRequest("structured_outputs.json_object must be a boolean",
                                 param="structured_outputs.json_object")

    @property
    def kind(self) -> str:
        return next(k for k in KINDS if getattr(self, k) not in (None, False))

    @property
    def cache_key(self) -> tuple[str, str]:
        """(kind, canonical spec): equal keys compile to the same grammar."""
        kind = self.kind
        if kind == "json":
            spec = json.dumps(self.json, sort_keys=True, separators=(",", ":"))
        elif kind == "choice":
            spec = json.dumps(self.choice)
        elif kind == "json_object":
            spec = ""
        else:
            spec = getattr(self, kind)
        if kind in ("json", "json_object"):
            spec = f"{spec}\x00ws={self.whitespace_pattern!r}"
        return kind, spec

    @classmethod
    def from_value(cls, value: StructuredOutputsParams | dict[str, Any] | None) -> StructuredOutputsParams | None:
        """A params object from itself or a plain dict (the HTTP body's shape)."""
        if value is None or isinstance(value, cls):
            return value
        if not isinstance(value, dict):
            raise InvalidRequest("structured_outputs must be an object", param="structured_outputs")
        unknown = set(value) - {*KINDS, "whitespace_pattern"}
        if unknown:
            raise InvalidRequest(f"structured_outputs has unknown fields {sorted(unknown)}", param="structured_outputs")
        return cls(**value)
