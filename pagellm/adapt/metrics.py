"""Dev metrics during training: accuracy and macro-F1 (scikit-learn), for encoder logits or decoder label words."""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

from pagellm.adapt.features import IGNORE_INDEX

METRICS = ("accuracy", "macro_f1")


def classification_metrics(gold: list[int], predicted: list[int], num_labels: int) -> dict[str, float]:
    """Accuracy and macro-F1 over class ids 0..num_labels-1 (a class never seen counts 0 F1, not an error)."""
    from sklearn.metrics import accuracy_score, f1_score

    return {"accuracy": float(accuracy_score(gold, predicted)),
            "macro_f1": float(f1_score(gold, predicted, labels=list(range(num_labels)), average="macro",
                                       zero_division=0))}


def encoder_compute_metrics(num_labels: int) -> Callable[[Any], dict[str, float]]:
    """Trainer `compute_metrics` for a sequence classifier: argmax of the logits."""

    def compute(eval_pred: Any) -> dict[str, float]:
        logits, gold = eval_pred.predictions, eval_pred.label_ids
        if isinstance(logits, tuple):
            logits = logits[0]
        return classification_metrics(list(gold), list(logits.argmax(-1)), num_labels)

    return compute


def label_scores(logits: Any, labels: Any) -> Any:
    """Trainer `preprocess_logits_for_metrics` for label words: each row's summed log-probability of its
    label tokens, [batch] (keeps eval from gathering [batch, seq, vocab] logits)."""
    import torch

    if isinstance(logits, tuple):
        logits = logits[0]
    logits, targets = logits[:, :-1].float(), labels[:, 1:]  # position t predicts token t+1
    mask = targets != IGNORE_INDEX
    picked = logits.gather(-1, targets.clamp(min=0).unsqueeze(-1)).squeeze(-1)  # [batch, seq-1]
    logprobs = picked - torch.logsumexp(logits, dim=-1)  # [batch, seq-1]
    return (logprobs * mask).sum(-1)


def decoder_compute_metrics(gold_ids: list[int], num_labels: int) -> Callable[[Any], dict[str, float]]:
    """Trainer `compute_metrics` over label_scores of the candidate rows (num_labels per example, in order):
    the prediction is the best-scored label; `label_nll` is the mean negative log-likelihood of the gold label."""

    def compute(eval_pred: Any) -> dict[str, float]:
        scores = eval_pred.predictions.reshape(len(gold_ids), num_labels)  # [num_examples, num_labels]
        metrics = classification_metrics(gold_ids, list(scores.argmax(-1)), num_labels)
        metrics["label_nll"] = float(-scores[range(len(gold_ids)), gold_ids].mean())
        return metrics

    return compute
