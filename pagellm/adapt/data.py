"""Training and evaluation data: JSONL/CSV rows checked before any model is loaded.

Classification rows have `text` and `label`; generative (SFT) rows have `prompt` + `completion`, or a
chat `messages` list whose last turn is the assistant's. Every problem a user can fix in the file is an
InvalidRequest that names the file, the row and the column.
"""

from __future__ import annotations

import csv
import json
import random
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pagellm.errors import InvalidRequest
from pagellm.label_prompt import check_labels

Row = dict[str, Any]
Message = dict[str, str]


@dataclass(frozen=True)
class ClassifyExample:
    """One text and its class name."""

    text: str
    label: str


@dataclass(frozen=True)
class GenerateExample:
    """One conversation whose last assistant turn is the training target."""

    messages: list[Message]  # user/system/assistant turns before the target
    completion: str


@dataclass
class ClassifyData:
    """The train and optional eval splits of a classification task, and its ordered label set."""

    train: list[ClassifyExample]
    eval: list[ClassifyExample] | None
    labels: list[str]  # class id order: the given order, else sorted


@dataclass
class GenerateData:
    """The train and optional eval splits of a generative (SFT) task."""

    train: list[GenerateExample]
    eval: list[GenerateExample] | None


def read_rows(path: str | Path, param: str = "data") -> list[Row]:
    """All rows of a .jsonl/.json-lines or .csv/.tsv file; InvalidRequest if unreadable, malformed or empty."""
    path = Path(path)
    if not path.is_file():
        raise InvalidRequest(f"{param} file {str(path)!r} does not exist", param=param)
    try:
        content = path.read_text(encoding="utf-8")
    except (OSError, UnicodeDecodeError) as exc:
        raise InvalidRequest(f"cannot read {param} file {str(path)!r}: {exc}", param=param) from exc
    if path.suffix.lower() in (".csv", ".tsv"):
        rows = _parse_csv(content, "\t" if path.suffix.lower() == ".tsv" else ",")
    else:
        rows = _parse_jsonl(content, path, param)
    if not rows:
        raise InvalidRequest(f"{param} file {str(path)!r} has no rows", param=param)
    return rows


def _parse_csv(content: str, delimiter: str) -> list[Row]:
    return [dict(row) for row in csv.DictReader(content.splitlines(), delimiter=delimiter)]


def _parse_jsonl(content: str, path: Path, param: str) -> list[Row]:
    rows: list[Row] = []
    for num, line in enumerate(content.splitlines(), start=1):
        if not line.strip():
            continue
        try:
            row = json.loads(line)
        except json.JSONDecodeError as exc:
            raise InvalidRequest(f"{path}:{num}: not valid JSON ({exc.msg}); expected one JSON object per line",
                                 param=param) from exc
        if not isinstance(row, dict):
            raise InvalidRequest(f"{path}:{num}: expected a JSON object, got {type(row).__name__}", param=param)
        rows.append(row)
    return rows


def _field(row: Row, column: str, where: str, param: str) -> str:
    if column not in row or row[column] is None:
        raise InvalidRequest(f"{where}: missing column {column!r} (columns: {sorted(row)})", param=param)
    value = row[column]
    if isinstance(value, bool) or not isinstance(value, str | int | float):
        raise InvalidRequest(f"{where}: column {column!r} must be a string, got {type(value).__name__}", param=param)
    value = str(value)
    if not value.strip():
        raise InvalidRequest(f"{where}: column {column!r} is empty", param=param)
    return value


def read_classify_examples(path: str | Path, param: str = "data") -> list[ClassifyExample]:
    """`text`/`label` rows; labels may be strings or numbers (kept as their string form)."""
    out = []
    for i, row in enumerate(read_rows(path, param), start=1):
        where = f"{path} row {i}"
        out.append(ClassifyExample(_field(row, "text", where, param), _field(row, "label", where, param)))
    return out


def read_generate_examples(path: str | Path, param: str = "data") -> list[GenerateExample]:
    """`prompt`/`completion` rows, or chat `messages` rows ending with an assistant turn."""
    out: list[GenerateExample] = []
    for i, row in enumerate(read_rows(path, param), start=1):
        where = f"{path} row {i}"
        if "messages" in row:
            out.append(_messages_example(row["messages"], where, param))
        elif "prompt" in row or "completion" in row:
            out.append(GenerateExample([{"role": "user", "content": _field(row, "prompt", where, param)}],
                                       _field(row, "completion", where, param)))
        else:
            raise InvalidRequest(f"{where}: needs 'prompt' and 'completion' columns or a 'messages' list "
                                 f"(columns: {sorted(row)})", param=param)
    return out


def _messages_example(messages: Any, where: str, param: str) -> GenerateExample:
    if not isinstance(messages, list) or len(messages) < 2:
        raise InvalidRequest(f"{where}: 'messages' must be a list of at least two chat turns", param=param)
    for turn in messages:
        if (not isinstance(turn, dict) or turn.get("role") not in ("system", "user", "assistant")
                or not isinstance(turn.get("content"), str)):
            raise InvalidRequest(f"{where}: each message needs a role (system|user|assistant) and string content",
                                 param=param)
    if messages[-1]["role"] != "assistant" or not messages[-1]["content"].strip():
        raise InvalidRequest(f"{where}: the last message must be a non-empty assistant turn (the target)",
                             param=param)
    return GenerateExample([dict(t) for t in messages[:-1]], messages[-1]["content"])


def resolve_labels(train: list[ClassifyExample], labels: list[str] | None) -> list[str]:
    """The class list: `labels` as given (each train label must be in it), else the sorted train labels."""
    seen = sorted({ex.label for ex in train})
    if labels is None:
        if len(seen) < 2:
            raise InvalidRequest(f"the training data has only one label ({seen}); classification needs two or more",
                                 param="data")
        return seen
    labels = check_labels(labels)
    unknown = [x for x in seen if x not in labels]
    if unknown:
        raise InvalidRequest(f"training labels {unknown} are not in the given labels {labels}", param="labels")
    return labels


def check_known_labels(examples: list[ClassifyExample], labels: list[str], path: str | Path, param: str,
                       known_as: str = "the training labels") -> None:
    """InvalidRequest when `examples` (an eval or test file) use a label outside `labels`."""
    unknown = sorted({ex.label for ex in examples} - set(labels))
    if unknown:
        raise InvalidRequest(f"{param} file {str(path)!r} has labels {unknown} that are not among "
                             f"{known_as} {labels}", param=param)


def subsample(examples: list, max_samples: int | None, seed: int) -> list:
    """A seeded random subset of at most `max_samples` examples, in a seeded order (all when None)."""
    if max_samples is not None and max_samples < 1:
        raise InvalidRequest(f"max samples must be >= 1; got {max_samples}", param="max_samples")
    if max_samples is None or max_samples >= len(examples):
        return list(examples)
    return random.Random(seed).sample(examples, max_samples)


def load_classify_data(train_path: str | Path, eval_path: str | Path | None, labels: list[str] | None = None,
                       max_train_samples: int | None = None, max_eval_samples: int | None = None,
                       seed: int = 0) -> ClassifyData:
    """Read and check both splits; the label set comes from the whole train file, before subsampling."""
    train = read_classify_examples(train_path, "data")
    label_list = resolve_labels(train, labels)
    eval_examples = None
    if eval_path is not None:
        eval_examples = read_classify_examples(eval_path, "eval_data")
        check_known_labels(eval_examples, label_list, eval_path, "eval_data")
        eval_examples = subsample(eval_examples, max_eval_samples, seed)
    return ClassifyData(subsample(train, max_train_samples, seed), eval_examples, label_list)


def load_generate_data(train_path: str | Path, eval_path: str | Path | None, max_train_samples: int | None = None,
                       max_eval_samples: int | None = None, seed: int = 0) -> GenerateData:
    train = read_generate_examples(train_path, "data")
    eval_examples = None
    if eval_path is not None:
        eval_examples = subsample(read_generate_examples(eval_path, "eval_data"), max_eval_samples, seed)
    return GenerateData(subsample(train, max_train_samples, seed), eval_examples)
