"""The `head` strategy of an encoder: the encoder is frozen, so its features are computed once and only a
linear head trains on them (seconds, not the minutes of a Trainer re-running the encoder every epoch).

The features come from pagellm's own engine (`LLM(task="embed")` with the classifier's pooling and no
normalization), so the head trains on exactly the vectors `LLM(task="classify")` feeds it at serving time.
Training: AdamW on standardized features, linear decay with warmup, the dev metric per epoch (or every
`eval_steps`), early stopping and the best head kept; the standardization is folded into the saved weights.
"""

from __future__ import annotations

import logging
import math
from dataclasses import dataclass, field
from typing import TYPE_CHECKING, Any

import torch

from pagellm.adapt.data import ClassifyData
from pagellm.adapt.metrics import classification_metrics

if TYPE_CHECKING:
    from pagellm.adapt.finetune import FinetuneArgs

logger = logging.getLogger("pagellm.adapt")


@dataclass
class HeadFit:
    """A trained linear head over raw pooled features, and how training went."""

    weight: torch.Tensor  # [num_labels, hidden]
    bias: torch.Tensor  # [num_labels]
    history: list[dict[str, float]] = field(default_factory=list)
    best_metric: float | None = None
    epochs_run: float = 0.0
    global_steps: int = 0
    max_steps: int = 0


def embed_features(model_path: str, pooling_type: str, texts_per_split: list[list[str]],
                   max_length: int) -> list[torch.Tensor]:
    """[num_texts, hidden] float32 features per split, computed by pagellm's pooling engine."""
    from pagellm import LLM
    from pagellm.pooling_params import PoolerConfig

    llm = LLM(model_path, task="embed", dtype="float32",
              pooler_config=PoolerConfig(pooling_type=pooling_type, normalize=False))  # type: ignore[arg-type]
    keep = min(max_length, llm.llm_engine.max_model_len)
    out = []
    for texts in texts_per_split:
        vectors = llm.embed(texts, truncate_prompt_tokens=max(keep, 2), use_tqdm=False)
        out.append(torch.tensor([v.outputs.embedding for v in vectors], dtype=torch.float32))
    return out


def fit_linear_head(x_train: torch.Tensor, y_train: torch.Tensor, x_eval: torch.Tensor | None,
                    y_eval: torch.Tensor | None, num_labels: int, args: FinetuneArgs) -> HeadFit:
    """Train `Linear(hidden, num_labels)` with cross-entropy; returns the best (dev) or last head."""
    num_threads = torch.get_num_threads()
    torch.set_num_threads(1)  # NOTE: [batch, hidden] x [hidden, labels] steps: threads only add overhead
    try:
        return _fit(x_train, y_train, x_eval, y_eval, num_labels, args)
    finally:
        torch.set_num_threads(num_threads)


def _fit(x_train: torch.Tensor, y_train: torch.Tensor, x_eval: torch.Tensor | None, y_eval: torch.Tensor | None,
         num_labels: int, args: FinetuneArgs) -> HeadFit:
    torch.manual_seed(args.seed)
    mean, std = x_train.mean(0), x_train.std(0).clamp(min=1e-6)  # [hidden] each
    standardize = lambda x: (x - mean) / std  # noqa: E731
    head = torch.nn.Linear(x_train.shape[1], num_labels)
    optimizer = torch.optim.AdamW(head.parameters(), lr=args.lr, weight_decay=args.weight_decay)
    steps_per_epoch = math.ceil(len(x_train) / args.batch_size)
    max_steps = math.ceil(args.epochs * steps_per_epoch)
    warmup = int(args.warmup * max_steps)

    def lr_factor(s: int) -> float:  # linear warmup, then linear decay to 0 (the Trainer's "linear")
        return (s + 1) / warmup if s < warmup else max(0.0, (max_steps - s) / (max_steps - warmup))

    schedule = torch.optim.lr_scheduler.LambdaLR(optimizer, lr_factor)
    fit = HeadFit(head.weight.detach().clone(), head.bias.detach().clone(), max_steps=max_steps)
    xs_train = standardize(x_train)
    best_state: tuple[torch.Tensor, torch.Tensor] | None = None
    num_bad = step = 0
    while step < max_steps:
        order = torch.randperm(len(x_train))
        for start in range(0, len(x_train), args.batch_size):
            idx = order[start:start + args.batch_size]
            loss = torch.nn.functional.cross_entropy(head(xs_train[idx]), y_train[idx])
            optimizer.zero_grad()
            loss.backward()
            optimizer.step()
            schedule.step()
            step += 1
            at_epoch_end = start + args.batch_size >= len(x_train)
            due = step % args.eval_steps == 0 if args.eval_steps else at_epoch_end
            if x_eval is not None and y_eval is not None and (due or step == max_steps):
                entry = _evaluate(head, standardize(x_eval), y_eval, num_labels, step / steps_per_epoch, step)
                fit.history.append(entry)
                score = entry[args.metric]
                if fit.best_metric is None or score > fit.best_metric:
                    fit.best_metric, num_bad = score, 0
                    best_state = (head.weight.detach().clone(), head.bias.detach().clone())
                else:
                    num_bad += 1
            if step >= max_steps or (args.early_stopping is not None and num_bad >= args.early_stopping):
                break
        if args.early_stopping is not None and num_bad >= args.early_stopping:
            break
    fit.global_steps, fit.epochs_run = step, round(step / steps_per_epoch, 4)
    weight, bias = best_state or (head.weight.detach().clone(), head.bias.detach().clone())
    # fold the standardization in: W (x - m) / s + b = (W / s) x + (b - (W / s) m)
    fit.weight = weight / std
    fit.bias = bias - fit.weight @ mean
    return fit


def _evaluate(head: torch.nn.Linear, x: torch.Tensor, y: torch.Tensor, num_labels: int, epoch: float,
              step: int) -> dict[str, float]:
    with torch.no_grad():
        logits = head(x)
    entry = {"epoch": round(epoch, 4), "step": step,
             "loss": float(torch.nn.functional.cross_entropy(logits, y)),
             **classification_metrics(y.tolist(), logits.argmax(-1).tolist(), num_labels)}
    logger.info("dev report, epoch %.2f (step %d): accuracy=%.4f macro_f1=%.4f loss=%.4f", entry["epoch"], step,
                entry["accuracy"], entry["macro_f1"], entry["loss"])
    return entry


def train_frozen_head(model_path: str, pooling_type: str, data: ClassifyData, args: FinetuneArgs) -> HeadFit:
    """Features once through the engine, then the head."""
    splits = [[ex.text for ex in data.train]] + ([[ex.text for ex in data.eval]] if data.eval else [])
    features = embed_features(model_path, pooling_type, splits, args.max_length)
    label_ids = {label: i for i, label in enumerate(data.labels)}
    y_train = torch.tensor([label_ids[ex.label] for ex in data.train])
    y_eval = torch.tensor([label_ids[ex.label] for ex in data.eval]) if data.eval else None
    return fit_linear_head(features[0], y_train, features[1] if data.eval else None, y_eval, len(data.labels), args)


def install_head(model: Any, fit: HeadFit) -> None:
    """Copy the fitted head into the classifier of a loaded *ForSequenceClassification."""
    with torch.no_grad():
        model.classifier.weight.copy_(fit.weight)
        model.classifier.bias.copy_(fit.bias)
