"""Fine-tuning strategies: which parameters train.

`head` trains only the output head (an encoder's new classifier; a decoder's LM head, which is the token
embedding when the two are tied); `top-layers:K` also the top K transformer layers and everything above
them (final norm, pooler); `full` everything; `lora`, `adalora` and `prefix` wrap the model with PEFT and
train only the adapter (plus, for an encoder classifier, its new head via `modules_to_save`).
"""

from __future__ import annotations

import re
from dataclasses import dataclass
from typing import Any

from pagellm.errors import InvalidRequest

STRATEGIES = ("head", "top-layers:K", "full", "lora", "adalora", "prefix")
PEFT_STRATEGIES = ("lora", "adalora", "prefix")
# a transformer block's index in a parameter name: bert.encoder.layer.3.*, model.layers.3.*, transformer.h.3.*
_LAYER_INDEX = re.compile(r"(?:^|\.)(?:layer|layers|h|block|blocks)\.(\d+)\.")


@dataclass(frozen=True)
class Strategy:
    """A parsed `--strategy`."""

    name: str  # head | top-layers | full | lora | adalora | prefix
    num_top_layers: int = 0  # K of top-layers:K

    @property
    def is_peft(self) -> bool:
        return self.name in PEFT_STRATEGIES

    def __str__(self) -> str:
        return f"top-layers:{self.num_top_layers}" if self.name == "top-layers" else self.name


@dataclass(frozen=True)
class PeftSettings:
    """Adapter hyper-parameters of the PEFT strategies."""

    lora_r: int = 8
    lora_alpha: int = 16
    lora_dropout: float = 0.0
    target_modules: list[str] | None = None  # None: PEFT's default for the architecture (q/v projections)
    num_virtual_tokens: int = 10  # prefix tuning
    total_steps: int = 0  # AdaLoRA's rank-allocation schedule needs the number of optimizer steps


# (learning rate, epochs) when the user sets none. A new head alone on frozen features needs a far larger step
# than full fine-tuning's 2e-5 (which left it at chance after an epoch); adapters sit in between.
FROZEN_HEAD_SCHEDULE = (1e-3, 10.0)  # encoder `head`: AdamW on cached, standardized features (frozen_head.py)
FROZEN_HEAD_BATCH_SIZE = 32  # its default batch (the others: 8)
DEFAULT_BATCH_SIZE = 8
DEFAULT_SCHEDULES: dict[str, tuple[float, float]] = {
    "head": (2e-5, 3.0),  # a decoder's LM head (the tied embedding): a pre-trained matrix, moved gently
    "top-layers": (2e-5, 3.0), "full": (2e-5, 3.0),
    "lora": (3e-4, 3.0), "adalora": (3e-4, 3.0),
    "prefix": (1e-2, 3.0),
}


def default_batch_size(strategy: Strategy, is_decoder: bool) -> int:
    return FROZEN_HEAD_BATCH_SIZE if strategy.name == "head" and not is_decoder else DEFAULT_BATCH_SIZE


def default_schedule(strategy: Strategy, is_decoder: bool) -> tuple[float, float]:
    """(lr, epochs) defaults of a strategy on an encoder or a decoder."""
    if strategy.name == "head" and not is_decoder:
        return FROZEN_HEAD_SCHEDULE
    return DEFAULT_SCHEDULES[strategy.name]


def parse_strategy(text: str) -> Strategy:
    """`head`, `top-layers:K` (K >= 1), `full`, `lora`, `adalora` or `prefix`; else InvalidRequest."""
    text = text.strip().lower()
    if text.startswith("top-layers"):
        _, _, k = text.partition(":")
        if not k.isdigit() or int(k) < 1:
            raise InvalidRequest(f"strategy {text!r}: write top-layers:K with K >= 1 (e.g. top-layers:2)",
                                 param="strategy")
        return Strategy("top-layers", int(k))
    if text not in ("head", "full", *PEFT_STRATEGIES):
        raise InvalidRequest(f"unknown strategy {text!r}; choose one of {', '.join(STRATEGIES)}", param="strategy")
    return Strategy(text)


def check_strategy(strategy: Strategy, is_decoder: bool, num_layers: int | None) -> None:
    """Reject combinations that cannot work, before the weights load."""
    if strategy.name == "prefix" and not is_decoder:
        raise InvalidRequest("prefix tuning needs a decoder: transformers' BERT-family encoders take no "
                             "past_key_values; use lora or adalora for encoders", param="strategy")
    if strategy.name == "top-layers" and num_layers is not None and strategy.num_top_layers > num_layers:
        raise InvalidRequest(f"top-layers:{strategy.num_top_layers} exceeds the model's {num_layers} layers",
                             param="strategy")


def head_module(model: Any, is_decoder: bool) -> Any:
    """The output head: the LM head of a decoder, `classifier` (or `score`) of a sequence classifier."""
    if is_decoder:
        return model.get_output_embeddings()
    for name in ("classifier", "score"):
        if hasattr(model, name):
            return getattr(model, name)
    raise InvalidRequest(f"{type(model).__name__} has no classifier/score head", param="model")


def trainable_names(model: Any, strategy: Strategy, is_decoder: bool, new_param_names: set[str]) -> set[str]:
    """Names of the parameters a non-PEFT strategy trains."""
    names = [name for name, _ in model.named_parameters()]
    if strategy.name == "full":
        return set(names)
    head_ids = {id(p) for p in head_module(model, is_decoder).parameters()}
    chosen = {name for name, p in model.named_parameters() if id(p) in head_ids} | (set(names) & new_param_names)
    if strategy.name == "top-layers":
        indices = [(i, _layer_index(name)) for i, name in enumerate(names)]
        layer_positions = [i for i, idx in indices if idx is not None]
        if not layer_positions:
            raise InvalidRequest(f"cannot find the transformer layers of {type(model).__name__}", param="strategy")
        num_layers = 1 + max(idx for _, idx in indices if idx is not None)
        first_top = num_layers - strategy.num_top_layers
        # NOTE: parameters registered after the last block (final norm, pooler, head) sit above the top layers
        chosen |= {names[i] for i, idx in indices
                   if (idx is not None and idx >= first_top) or i > layer_positions[-1]}
    return chosen


def _layer_index(name: str) -> int | None:
    match = _LAYER_INDEX.search(name)
    return int(match.group(1)) if match else None


def apply_strategy(model: Any, strategy: Strategy, is_decoder: bool, new_param_names: set[str],
                   peft: PeftSettings) -> Any:
    """Freeze what the strategy keeps fixed; PEFT strategies return the wrapped PeftModel."""
    if strategy.is_peft:
        from peft import get_peft_model

        return get_peft_model(model, peft_config(strategy, is_decoder, peft, head_name(model, is_decoder)))
    keep = trainable_names(model, strategy, is_decoder, new_param_names)
    for name, param in model.named_parameters():
        param.requires_grad_(name in keep)
    return model


def head_name(model: Any, is_decoder: bool) -> str | None:
    if is_decoder:
        return None
    return next(name for name in ("classifier", "score") if hasattr(model, name))


def peft_config(strategy: Strategy, is_decoder: bool, peft: PeftSettings, head: str | None) -> Any:
    """The PEFT config: CAUSAL_LM for decoders (label-word training), SEQ_CLS with the head saved for encoders."""
    from peft import AdaLoraConfig, LoraConfig, PrefixTuningConfig, TaskType

    task_type = TaskType.CAUSAL_LM if is_decoder else TaskType.SEQ_CLS
    modules_to_save = [head] if head else None
    if strategy.name == "prefix":
        return PrefixTuningConfig(task_type=task_type, num_virtual_tokens=peft.num_virtual_tokens)
    common = dict(task_type=task_type, lora_alpha=peft.lora_alpha, lora_dropout=peft.lora_dropout,
                  target_modules=peft.target_modules, modules_to_save=modules_to_save)
    if strategy.name == "lora":
        return LoraConfig(r=peft.lora_r, **common)
    assert peft.total_steps > 0, "AdaLoRA needs the number of optimizer steps"
    # rank budget: start at 2r, prune to r between the first 10% and the last 20% of the steps
    total = peft.total_steps
    return AdaLoraConfig(init_r=2 * peft.lora_r, target_r=peft.lora_r, total_step=total, tinit=total // 10,
                         tfinal=total // 5, deltaT=max(1, total // 20), **common)


def count_parameters(model: Any) -> tuple[int, int]:
    """(trainable, total) parameter counts; a tied weight counts once."""
    params = list(model.parameters())
    return sum(p.numel() for p in params if p.requires_grad), sum(p.numel() for p in params)
