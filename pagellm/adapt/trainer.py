"""Builds the transformers Trainer of a run: features, metrics, schedule, evaluation and early stopping."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path
from typing import TYPE_CHECKING, Any

from pagellm.adapt import features as feats
from pagellm.adapt.callbacks import AdaLoraCallback, BestAdapterCallback, DevReportCallback
from pagellm.adapt.data import ClassifyData
from pagellm.adapt.metrics import decoder_compute_metrics, encoder_compute_metrics, label_scores

if TYPE_CHECKING:
    from pagellm.adapt.finetune import FinetuneArgs, PreparedRun


@dataclass
class BuiltTrainer:
    """The Trainer and the callback that records its dev evaluations."""

    trainer: Any
    dev_report: DevReportCallback


@dataclass
class TaskFeatures:
    """Token features of both splits and how the dev split is scored."""

    train: list[feats.Feature]
    eval: list[feats.Feature] | None
    compute_metrics: Any = None  # None: the dev loss is the only metric (generate)
    preprocess_logits: Any = None


def task_features(tokenizer: Any, run: PreparedRun, args: FinetuneArgs) -> TaskFeatures:
    data, is_decoder = run.data, run.base.is_decoder
    if not isinstance(data, ClassifyData):
        return TaskFeatures(feats.generate_sft(tokenizer, data.train, args.max_length),
                            feats.generate_sft(tokenizer, data.eval, args.max_length) if data.eval else None)
    num_labels = len(data.labels)
    if not is_decoder:
        train = feats.encoder_classify(tokenizer, data.train, data.labels, args.max_length)
        if not data.eval:
            return TaskFeatures(train, None)
        return TaskFeatures(train, feats.encoder_classify(tokenizer, data.eval, data.labels, args.max_length),
                            encoder_compute_metrics(num_labels))
    prompter = feats.LabelPrompter(tokenizer, data.labels, args.instruction, args.max_length)
    train = feats.decoder_classify_train(prompter, data.train)
    if not data.eval:
        return TaskFeatures(train, None)
    gold = [data.labels.index(ex.label) for ex in data.eval]
    return TaskFeatures(train, feats.decoder_classify_eval(prompter, data.eval),
                        decoder_compute_metrics(gold, num_labels), label_scores)


def best_metric(args: FinetuneArgs, is_classify: bool) -> tuple[str, bool]:
    """(the dev metric that picks the best checkpoint, greater is better)."""
    return (args.metric, True) if is_classify else ("loss", False)


def training_arguments(args: FinetuneArgs, has_eval: bool, is_classify: bool, reload_best: bool,
                       output_dir: Path) -> Any:
    """Linear schedule with warmup ratio, weight decay, per-epoch (or per-N-step) eval and best-model reload
    (`reload_best` False: the best model is kept in memory instead, so no checkpoints are saved)."""
    import torch
    from transformers import TrainingArguments

    interval = "no" if not has_eval else ("steps" if args.eval_steps else "epoch")
    metric, greater_is_better = best_metric(args, is_classify)
    reload_best = has_eval and reload_best
    return TrainingArguments(
        output_dir=str(output_dir), num_train_epochs=args.epochs, learning_rate=args.lr,
        lr_scheduler_type="linear", warmup_steps=args.warmup,  # NOTE: a float in [0, 1) is a ratio of the steps
        weight_decay=args.weight_decay, per_device_train_batch_size=args.batch_size,
        per_device_eval_batch_size=args.batch_size, gradient_accumulation_steps=args.grad_accum,
        seed=args.seed, data_seed=args.seed, eval_strategy=interval, save_strategy=interval if reload_best else "no",
        eval_steps=args.eval_steps, save_steps=args.eval_steps, save_only_model=True,
        load_best_model_at_end=reload_best, metric_for_best_model=metric if has_eval else None,
        greater_is_better=greater_is_better if has_eval else None, save_total_limit=2 if reload_best else None,
        logging_strategy="steps", logging_steps=args.logging_steps, report_to="none",
        disable_tqdm=not args.progress, remove_unused_columns=False, label_names=["labels"],
        dataloader_pin_memory=torch.cuda.is_available(),
    )


def build_trainer(model: Any, tokenizer: Any, task: TaskFeatures, run: PreparedRun, args: FinetuneArgs,
                  output_dir: Path) -> BuiltTrainer:
    from transformers import EarlyStoppingCallback, Trainer

    is_classify, is_adalora = isinstance(run.data, ClassifyData), run.strategy.name == "adalora"
    dev_report = DevReportCallback()
    callbacks: list[Any] = [dev_report]
    if args.early_stopping is not None:
        callbacks.append(EarlyStoppingCallback(early_stopping_patience=args.early_stopping))
    if is_adalora:
        callbacks.append(AdaLoraCallback(model))
        if task.eval is not None:
            callbacks.append(BestAdapterCallback(model, *best_metric(args, is_classify)))
    trainer = Trainer(
        model=model, args=training_arguments(args, task.eval is not None, is_classify, not is_adalora, output_dir),
        train_dataset=task.train, eval_dataset=task.eval, data_collator=feats.make_collator(tokenizer,
                                                                                            run.base.is_decoder),
        processing_class=tokenizer, compute_metrics=task.compute_metrics,
        preprocess_logits_for_metrics=task.preprocess_logits, callbacks=callbacks,
    )
    return BuiltTrainer(trainer, dev_report)
