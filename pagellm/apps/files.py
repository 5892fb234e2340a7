"""Reading the applications' input files, with errors that name the file and line."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

from pagellm.errors import InvalidRequest


def jsonl_objects(path: str | Path, param: str) -> Iterator[tuple[int, object]]:
    """(line number, parsed value) of each non-blank line; InvalidRequest(param=param) for a line that is not JSON."""
    for number, line in enumerate(Path(path).read_text(encoding="utf-8").splitlines(), 1):
        if not line.strip():
            continue
        try:
            yield number, json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"{path} line {number}: not JSON ({exc.msg})", param=param) from exc
