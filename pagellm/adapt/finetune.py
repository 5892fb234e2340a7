"""`pagellm finetune`: adapt a base model to a classification or generative task with transformers' Trainer.

Everything a user can get wrong (data, labels, strategy, settings) is checked before any weights load.
Use it from Python as `run_finetune(FinetuneArgs(model=..., data=..., out=...))`.
"""

from __future__ import annotations

import dataclasses
import logging
import math
import shutil
import time
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

from pagellm.adapt.base_model import (
    BaseModel,
    load_config,
    load_model,
    load_training_tokenizer,
    resolve_base_model,
)
from pagellm.adapt.data import ClassifyData, GenerateData, load_classify_data, load_generate_data
from pagellm.adapt.metrics import METRICS
from pagellm.adapt.strategy import (
    PeftSettings,
    Strategy,
    check_strategy,
    default_batch_size,
    default_schedule,
    parse_strategy,
)
from pagellm.errors import InvalidRequest

logger = logging.getLogger("pagellm.adapt")
TASKS = ("classify", "generate")
CHECKPOINTS_DIR = "checkpoints"  # Trainer's scratch folder inside `out`; removed once the best model is saved


@dataclass
class FinetuneArgs:
    """Every setting of one fine-tuning run (the CLI flags, by the same names)."""

    data: str  # train file: .jsonl or .csv
    out: str  # output folder
    model: str | None = None  # path, "smollm2" (default) or "minilm"
    task: str = "classify"  # classify | generate
    eval_data: str | None = None  # dev file: per-evaluation report, early stopping, best checkpoint
    strategy: str = "lora"  # head | top-layers:K | full | lora | adalora | prefix
    epochs: float | None = None  # None: the strategy's default (strategy.default_schedule)
    lr: float | None = None  # None: the strategy's default
    warmup: float = 0.1  # warmup ratio of the linear schedule
    weight_decay: float = 0.01
    dropout: float | None = 0.1  # the config's dropout fields and lora_dropout; None keeps the model's
    early_stopping: int | None = None  # patience, in evaluations without improvement
    metric: str = "accuracy"  # accuracy | macro_f1 (classify); generate always uses the dev loss
    eval_steps: int | None = None  # evaluate every N steps instead of every epoch
    seed: int = 0
    max_train_samples: int | None = None
    max_eval_samples: int | None = None
    batch_size: int | None = None  # None: the strategy's default (encoder head 32, else 8)
    grad_accum: int = 1
    max_length: int = 256
    labels: list[str] | None = None  # class order; default: the sorted train labels
    instruction: str | None = None  # decoder classification prompt; None: label_prompt's default
    lora_r: int = 8
    lora_alpha: int = 16
    lora_target_modules: list[str] | None = None
    prefix_tokens: int = 10
    logging_steps: int = 10
    progress: bool = True  # Trainer's tqdm bar
    overwrite: bool = False  # replace a non-empty `out` (else it is an error: stale files would mislead evaluate)


@dataclass
class FinetuneResult:
    """What a run produced: where it wrote, what trained, the dev history and the model in memory."""

    out_dir: Path
    strategy: str
    model_kind: str  # encoder | decoder
    labels: list[str] | None
    num_trainable_params: int
    num_total_params: int
    epochs_run: float
    global_steps: int
    early_stopped: bool
    history: list[dict[str, float]]  # one entry per dev evaluation
    best_metric: float | None
    wall_s: float
    merged_dir: Path | None = None  # encoder lora/adalora: the merged HF folder the pooling engine loads
    model: Any = field(default=None, repr=False)  # the trained (best) model, PEFT-wrapped for PEFT strategies


@dataclass
class PreparedRun:
    """The checked inputs of a run: base model, strategy and data, before any weights load."""

    base: BaseModel
    strategy: Strategy
    data: ClassifyData | GenerateData
    args: FinetuneArgs  # with lr and epochs filled from the strategy's defaults

    @property
    def labels(self) -> list[str] | None:
        return self.data.labels if isinstance(self.data, ClassifyData) else None

    @property
    def is_frozen_encoder_head(self) -> bool:
        """An encoder's `head`: the encoder never changes, so its features are computed once."""
        return self.strategy.name == "head" and not self.base.is_decoder


def check_args(args: FinetuneArgs) -> None:
    """InvalidRequest for settings out of range."""
    if args.task not in TASKS:
        raise InvalidRequest(f"task must be one of {', '.join(TASKS)}; got {args.task!r}", param="task")
    if not args.out:
        raise InvalidRequest("an output folder (--out) is required", param="out")
    out = Path(args.out)
    if out.exists() and (not out.is_dir() or (any(out.iterdir()) and not args.overwrite)):
        raise InvalidRequest(f"output folder {args.out!r} exists and is not empty; choose a new one or pass "
                             "--overwrite", param="out")
    if args.metric not in METRICS:
        raise InvalidRequest(f"metric must be one of {', '.join(METRICS)}; got {args.metric!r}", param="metric")
    positive = {"epochs": args.epochs, "lr": args.lr, "batch_size": args.batch_size, "grad_accum": args.grad_accum,
                "max_length": args.max_length, "lora_r": args.lora_r, "prefix_tokens": args.prefix_tokens,
                "logging_steps": args.logging_steps}
    if args.lr == 0:
        positive.pop("lr")  # NOTE: lr 0 is a valid (if useless) run; tests use it to check early stopping
    for name, value in positive.items():
        if value is not None and not value > 0:  # None: the strategy's default
            raise InvalidRequest(f"{name} must be > 0; got {value}", param=name)
    if not 0.0 <= args.warmup < 1.0:
        raise InvalidRequest(f"warmup is a ratio of the steps, in [0, 1); got {args.warmup}", param="warmup")
    if args.weight_decay < 0:
        raise InvalidRequest(f"weight_decay must be >= 0; got {args.weight_decay}", param="weight_decay")
    if args.eval_steps is not None and args.eval_steps < 1:
        raise InvalidRequest(f"eval_steps must be >= 1; got {args.eval_steps}", param="eval_steps")
    if args.instruction is not None:
        try:
            args.instruction.format(labels="a, b")
        except (KeyError, IndexError, ValueError) as exc:
            raise InvalidRequest(f"instruction may use only the {{labels}} placeholder: {exc!r}",
                                 param="instruction") from exc
    if args.early_stopping is not None:
        if args.early_stopping < 1:
            raise InvalidRequest("early_stopping is a patience >= 1", param="early_stopping")
        if args.eval_data is None:
            raise InvalidRequest("early stopping needs a dev file (--eval-data)", param="early_stopping")


def prepare(args: FinetuneArgs) -> PreparedRun:
    """Check the settings, fill in the strategy's lr and epochs, resolve the model, read the data; no weights."""
    check_args(args)
    strategy = parse_strategy(args.strategy)
    base = resolve_base_model(args.model)
    if args.task == "generate" and not base.is_decoder:
        raise InvalidRequest("task generate needs a decoder model; encoders only classify", param="task")
    check_strategy(strategy, base.is_decoder, None)
    if args.task == "classify":
        data: ClassifyData | GenerateData = load_classify_data(
            args.data, args.eval_data, args.labels, args.max_train_samples, args.max_eval_samples, args.seed)
    else:
        data = load_generate_data(args.data, args.eval_data, args.max_train_samples, args.max_eval_samples, args.seed)
    lr, epochs = default_schedule(strategy, base.is_decoder)
    args = dataclasses.replace(args, lr=lr if args.lr is None else args.lr,
                               epochs=epochs if args.epochs is None else args.epochs,
                               batch_size=args.batch_size or default_batch_size(strategy, base.is_decoder))
    return PreparedRun(base, strategy, data, args)


def num_optimizer_steps(num_examples: int, args: FinetuneArgs) -> int:
    """The Trainer's step count for the whole run (AdaLoRA's schedule needs it up front)."""
    batches = math.ceil(num_examples / args.batch_size)
    per_epoch = max(batches // args.grad_accum + int(batches % args.grad_accum > 0), 1)
    return math.ceil(args.epochs * per_epoch)


def run_finetune(args: FinetuneArgs) -> FinetuneResult:
    """Check, load, train (best dev checkpoint kept), save, report."""
    from transformers import set_seed

    from pagellm.adapt.outputs import save_outputs, write_train_report
    from pagellm.adapt.strategy import apply_strategy, count_parameters

    t0 = time.perf_counter()
    run = prepare(args)
    args = run.args
    if args.overwrite:
        shutil.rmtree(args.out, ignore_errors=True)
    tokenizer = load_training_tokenizer(run.base)
    if run.is_frozen_encoder_head:
        return _run_frozen_head(run, tokenizer, t0)
    from pagellm.adapt.trainer import build_trainer, task_features

    task = task_features(tokenizer, run, args)  # NOTE: before the weights: a too-small max_length fails fast
    config = load_config(run.base, run.labels, args.dropout)
    check_strategy(run.strategy, run.base.is_decoder, getattr(config, "num_hidden_layers", None))
    set_seed(args.seed)  # NOTE: right before loading, so a new head's random init is reproducible
    loaded = load_model(run.base, config, args.task)
    peft = PeftSettings(lora_r=args.lora_r, lora_alpha=args.lora_alpha, lora_dropout=args.dropout or 0.0,
                        target_modules=args.lora_target_modules, num_virtual_tokens=args.prefix_tokens,
                        total_steps=num_optimizer_steps(len(run.data.train), args))
    model = apply_strategy(loaded.model, run.strategy, run.base.is_decoder, loaded.new_param_names, peft)
    num_trainable, num_total = count_parameters(model)
    logger.info("strategy %s: %d of %d parameters train (%.2f%%)", run.strategy, num_trainable, num_total,
                100.0 * num_trainable / max(num_total, 1))
    out_dir = Path(args.out)
    built = build_trainer(model, tokenizer, task, run, args, out_dir / CHECKPOINTS_DIR)
    built.trainer.train()
    state = built.trainer.state
    model = built.trainer.model
    merged_dir = save_outputs(model, tokenizer, run, args, out_dir)
    shutil.rmtree(out_dir / CHECKPOINTS_DIR, ignore_errors=True)
    result = FinetuneResult(
        out_dir=out_dir, strategy=str(run.strategy), model_kind=run.base.kind, labels=run.labels,
        num_trainable_params=num_trainable, num_total_params=num_total, epochs_run=float(state.epoch or 0.0),
        global_steps=int(state.global_step), early_stopped=state.global_step < state.max_steps,
        history=built.dev_report.history, best_metric=state.best_metric, wall_s=time.perf_counter() - t0,
        merged_dir=merged_dir, model=model)
    write_train_report(result, run, args)
    return result


def _run_frozen_head(run: PreparedRun, tokenizer: Any, t0: float) -> FinetuneResult:
    """Encoder `head`: features once through the engine, a linear head on them, saved into the HF folder."""
    from transformers import set_seed

    from pagellm.adapt.frozen_head import install_head, train_frozen_head
    from pagellm.adapt.outputs import save_outputs, write_train_report
    from pagellm.adapt.strategy import apply_strategy, count_parameters

    args = run.args
    assert isinstance(run.data, ClassifyData), "encoders only classify; prepare checks this"
    config = load_config(run.base, run.labels, args.dropout)
    fit = train_frozen_head(str(run.base.source.path), config.classifier_pooling, run.data, args)
    set_seed(args.seed)
    loaded = load_model(run.base, config, args.task)
    model = apply_strategy(loaded.model, run.strategy, False, loaded.new_param_names, PeftSettings())
    install_head(model, fit)
    num_trainable, num_total = count_parameters(model)
    out_dir = Path(args.out)
    save_outputs(model, tokenizer, run, args, out_dir)
    result = FinetuneResult(
        out_dir=out_dir, strategy=str(run.strategy), model_kind=run.base.kind, labels=run.labels,
        num_trainable_params=num_trainable, num_total_params=num_total, epochs_run=fit.epochs_run,
        global_steps=fit.global_steps, early_stopped=fit.global_steps < fit.max_steps, history=fit.history,
        best_metric=fit.best_metric, wall_s=time.perf_counter() - t0, model=model)
    write_train_report(result, run, args)
    return result
