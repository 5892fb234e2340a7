"""Trainer callbacks: the per-evaluation dev report, and AdaLoRA's rank allocation and best-adapter keeping."""

from __future__ import annotations

import copy
import logging
from typing import Any

import torch
from transformers import TrainerCallback

logger = logging.getLogger("pagellm.adapt")


class DevReportCallback(TrainerCallback):
    """Logs each dev evaluation (epoch, accuracy, macro-F1, loss) and keeps them as `history`."""

    def __init__(self) -> None:
        self.history: list[dict[str, float]] = []

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None,
                    **kwargs: Any) -> None:
        if not metrics:
            return
        entry = {"epoch": round(float(state.epoch or 0.0), 4), "step": int(state.global_step)}
        entry.update({key.removeprefix("eval_"): float(value) for key, value in metrics.items()
                      if key.startswith("eval_") and isinstance(value, int | float)
                      and not key.endswith(("_runtime", "_per_second"))})
        self.history.append(entry)
        parts = [f"{name}={entry[name]:.4f}" for name in ("accuracy", "macro_f1", "label_nll", "loss")
                 if name in entry]
        logger.info("dev report, epoch %.2f (step %d): %s", entry["epoch"], entry["step"], " ".join(parts))


class AdaLoraCallback(TrainerCallback):
    """Calls AdaLoRA's `update_and_allocate` after each optimizer step, while the gradients still exist
    (the Trainer zeroes them after this event)."""

    def __init__(self, peft_model: Any) -> None:
        self.peft_model = peft_model

    def on_optimizer_step(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        self.peft_model.base_model.update_and_allocate(state.global_step)


class BestAdapterCallback(TrainerCallback):
    """Keeps the best-scoring adapter weights in memory and restores them when training ends.

    NOTE: AdaLoRA only. Its checkpoints are saved trimmed to the rank pattern of their step, so the
    Trainer's load_best_model_at_end cannot load an earlier checkpoint into the later-pruned model;
    the weights (untrimmed, small) and the rank pattern are snapshotted here instead.
    """

    def __init__(self, peft_model: Any, metric: str, greater_is_better: bool) -> None:
        self.peft_model = peft_model
        self.metric = f"eval_{metric}"
        self.better = (lambda a, b: a > b) if greater_is_better else (lambda a, b: a < b)
        self.names = {name for name, p in peft_model.named_parameters() if p.requires_grad}
        self.best_value: float | None = None
        self.best_state: dict[str, Any] | None = None
        self.best_rank_pattern: Any = None

    def on_evaluate(self, args: Any, state: Any, control: Any, metrics: dict[str, float] | None = None,
                    **kwargs: Any) -> None:
        value = (metrics or {}).get(self.metric)
        if value is None or (self.best_value is not None and not self.better(value, self.best_value)):
            return
        self.best_value = value
        self.best_state = {name: p.detach().clone() for name, p in self.peft_model.named_parameters()
                           if name in self.names}
        self.best_rank_pattern = copy.deepcopy(self._config().rank_pattern)

    def on_train_end(self, args: Any, state: Any, control: Any, **kwargs: Any) -> None:
        if self.best_state is None:
            return
        params = dict(self.peft_model.named_parameters())
        with torch.no_grad():
            for name, value in self.best_state.items():
                params[name].copy_(value)
        self._config().rank_pattern = self.best_rank_pattern
        logger.info("restored the best adapter (%s=%.4f)", self.metric, self.best_value)

    def _config(self) -> Any:
        return self.peft_model.peft_config[self.peft_model.active_adapter]
