"""Evaluation reports: scikit-learn's classification report, the confusion matrix, and before/after tables."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any


@dataclass
class ClassificationSummary:
    """Accuracy, macro-F1, per-class precision/recall/F1/support and the confusion matrix of one run."""

    labels: list[str]
    accuracy: float
    macro_f1: float
    per_class: dict[str, dict[str, float]]  # label -> precision, recall, f1, support
    confusion_matrix: list[list[int]]  # rows: gold label, columns: predicted label, in `labels` order
    report: str  # sklearn's classification_report text


def summarize(gold: list[str], predicted: list[str], labels: list[str]) -> ClassificationSummary:
    from sklearn.metrics import accuracy_score, classification_report, confusion_matrix, f1_score

    per_class = classification_report(gold, predicted, labels=labels, output_dict=True, zero_division=0)
    return ClassificationSummary(
        labels=list(labels), accuracy=float(accuracy_score(gold, predicted)),
        macro_f1=float(f1_score(gold, predicted, labels=labels, average="macro", zero_division=0)),
        per_class={label: {k: float(v) for k, v in per_class[label].items()} for label in labels},
        confusion_matrix=confusion_matrix(gold, predicted, labels=labels).tolist(),
        report=classification_report(gold, predicted, labels=labels, digits=4, zero_division=0),
    )


def format_confusion(matrix: list[list[int]], labels: list[str]) -> str:
    """A text table: one row per gold label, one column per predicted label."""
    corner = "gold \\ predicted"
    first = max(len(corner), *(len(label) for label in labels)) + 2
    width = max(8, *(len(label) for label in labels)) + 2
    head = corner.ljust(first) + "".join(label.rjust(width) for label in labels)
    rows = [label.ljust(first) + "".join(str(n).rjust(width) for n in row) for label, row in zip(labels, matrix)]
    return "\n".join([head, *rows])


def format_comparison(before: dict[str, Any], after: dict[str, Any]) -> str:
    """Before/after side by side: accuracy, macro-F1 and per-class F1 with deltas (JSONs of evaluate)."""
    lines = [f"{'metric':<24}{'before':>10}{'after':>10}{'delta':>10}"]

    def add(name: str, old: float | None, new: float | None) -> None:
        cells = [f"{v:>10.4f}" if v is not None else f"{'-':>10}" for v in (old, new)]
        delta = f"{new - old:>+10.4f}" if old is not None and new is not None else f"{'-':>10}"
        lines.append(f"{name:<24}{cells[0]}{cells[1]}{delta}")

    add("accuracy", before.get("accuracy"), after.get("accuracy"))
    add("macro-F1", before.get("macro_f1"), after.get("macro_f1"))
    old_classes, new_classes = before.get("per_class") or {}, after.get("per_class") or {}
    for label in [*new_classes, *(c for c in old_classes if c not in new_classes)]:
        add(f"F1 {label}", old_classes.get(label, {}).get("f1-score"), new_classes.get(label, {}).get("f1-score"))
    sources = f"before: {describe(before)}\nafter:  {describe(after)}"
    return sources + "\n" + "\n".join(lines)


def describe(result: dict[str, Any]) -> str:
    """One line naming what was evaluated."""
    adapter = f" + {result['adapter']}" if result.get("adapter") else ""
    return f"{result.get('model')}{adapter} on {result.get('data')} ({result.get('num_samples')} samples)"
