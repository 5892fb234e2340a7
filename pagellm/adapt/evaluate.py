"""`pagellm evaluate`: classify a labelled file through the pagellm engine and report the metrics.

What runs is decided from the files alone, before any weights load (EvalTarget):
- an encoder `*ForSequenceClassification` folder (or an encoder PEFT adapter's `merged/` folder) runs in
  `LLM(task="classify")`; the labels are the model's id2label;
- a decoder (the base, a fine-tuned HF folder, or base + a LoRA/AdaLoRA/prefix-tuning adapter) runs label scoring,
  `LLM(...).classify(texts, labels=..., lora_request=...)`, with the labels (and instruction) from
  `--labels`, else the folder's pagellm_task.json, else the data.
"""

from __future__ import annotations

import json
import time
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

from pagellm.adapt.base_model import is_decoder_config, read_config_json, resolve_base_model
from pagellm.adapt.data import check_known_labels, read_classify_examples, subsample
from pagellm.adapt.outputs import MERGED_DIR, read_task_file
from pagellm.adapt.report import ClassificationSummary, format_comparison, format_confusion, summarize
from pagellm.errors import InvalidRequest
from pagellm.label_prompt import check_labels

ADAPTER_CONFIG = "adapter_config.json"
ENGINE_ADAPTERS = ("LORA", "ADALORA", "PREFIX_TUNING")  # PEFT types pagellm's decoder engine serves


@dataclass
class EvaluateArgs:
    """Every setting of one evaluation (the CLI flags, by the same names)."""

    data: str  # labelled .jsonl/.csv (`text`, `label`)
    model: str | None = None  # path, "smollm2" (default) or "minilm"; the base of a LoRA adapter
    adapter: str | None = None  # a finetune output folder (PEFT adapter or HF model)
    task: str = "classify"
    labels: list[str] | None = None  # decoder label set (and prompt order)
    instruction: str | None = None  # decoder prompt instruction
    max_samples: int | None = None
    seed: int = 0  # which max_samples subset
    dtype: str = "float32"
    out_json: str | None = None
    compare_to: str | None = None  # an earlier --out-json to put side by side
    progress: bool = True


@dataclass
class EvalTarget:
    """What the engine loads and how it classifies: an encoder classifier, or a decoder scoring label words."""

    kind: str  # encoder | decoder
    model: str  # LLM(model=...)
    labels: list[str]
    lora_path: str | None = None
    max_lora_rank: int | None = None
    instruction: str | None = None


@dataclass
class EvaluateResult:
    """One evaluation: what ran, on what, and its metrics; `to_json()` is what --compare-to reads back."""

    model: str
    adapter: str | None
    data: str
    num_samples: int
    summary: ClassificationSummary
    wall_s: float
    predictions: list[str] = field(default_factory=list)
    probabilities: list[list[float]] = field(default_factory=list)  # per sample, in summary.labels order
    comparison: str | None = None  # the before/after table when compare_to was given

    def to_json(self) -> dict[str, Any]:
        out = {"model": self.model, "adapter": self.adapter, "data": self.data, "num_samples": self.num_samples,
               "wall_s": round(self.wall_s, 3), **asdict(self.summary), "predictions": self.predictions,
               "probabilities": self.probabilities}
        return out

    def format(self) -> str:
        """The printed report: classification report, confusion matrix, comparison."""
        parts = [f"{self.model}{' + ' + self.adapter if self.adapter else ''} on {self.data} "
                 f"({self.num_samples} samples, {self.wall_s:.1f}s)", self.summary.report,
                 format_confusion(self.summary.confusion_matrix, self.summary.labels)]
        if self.comparison:
            parts.append(self.comparison)
        return "\n\n".join(parts)


def encoder_target(folder: Path, labels: list[str] | None) -> EvalTarget:
    config = read_config_json(folder)
    if not any(str(a).endswith("ForSequenceClassification") for a in config.get("architectures") or []):
        raise InvalidRequest(f"{folder} is an encoder without a classification head; fine-tune it first "
                             "(pagellm finetune --strategy head|lora|...) and evaluate the output", param="model")
    id2label = config.get("id2label") or {}
    model_labels = [str(id2label.get(str(i), f"LABEL_{i}")) for i in range(len(id2label))]
    if labels is not None and sorted(labels) != sorted(model_labels):
        raise InvalidRequest(f"--labels {labels} differ from the classifier's labels {model_labels}", param="labels")
    return EvalTarget("encoder", str(folder), model_labels)


def folder_target(folder: Path, args: EvaluateArgs, data_labels: list[str]) -> EvalTarget:
    """An HF model folder: an encoder classifier, or a decoder scoring label words."""
    if not is_decoder_config(read_config_json(folder)):
        return encoder_target(folder, args.labels)
    task = read_task_file(folder) or {}
    return EvalTarget("decoder", str(folder), decoder_labels(args, task, data_labels),
                      instruction=args.instruction or task.get("instruction"))


def decoder_labels(args: EvaluateArgs, task: dict[str, Any], data_labels: list[str]) -> list[str]:
    return check_labels(args.labels or task.get("labels") or data_labels)


def adapter_target(adapter: Path, args: EvaluateArgs, data_labels: list[str]) -> EvalTarget:
    """A finetune output folder: an HF model, a PEFT adapter on a decoder, or an encoder adapter's merged copy."""
    if not adapter.is_dir():
        raise InvalidRequest(f"adapter folder {str(adapter)!r} does not exist", param="adapter")
    if not (adapter / ADAPTER_CONFIG).is_file():
        if (adapter / "config.json").is_file():
            return folder_target(adapter, args, data_labels)
        raise InvalidRequest(f"{adapter} has neither adapter_config.json (PEFT) nor config.json (HF model)",
                             param="adapter")
    peft_config = json.loads((adapter / ADAPTER_CONFIG).read_text())
    peft_type, task = peft_config.get("peft_type"), read_task_file(adapter) or {}
    is_decoder = task.get("model_kind") == "decoder" or peft_config.get("task_type") == "CAUSAL_LM"
    if is_decoder and peft_type in ENGINE_ADAPTERS:
        base = args.model or task.get("base_model") or peft_config.get("base_model_name_or_path")
        return EvalTarget("decoder", str(resolve_base_model(base).source.path), decoder_labels(args, task, data_labels),
                          lora_path=str(adapter), max_lora_rank=max_rank(peft_config),
                          instruction=args.instruction or task.get("instruction"))
    if not is_decoder and (adapter / MERGED_DIR / "config.json").is_file():
        return folder_target(adapter / MERGED_DIR, args, data_labels)
    raise InvalidRequest(f"{adapter} is a {peft_type} adapter on an {'decoder' if is_decoder else 'encoder'}, "
                         f"which the pagellm engine cannot run (it serves {', '.join(ENGINE_ADAPTERS)} adapters on "
                         "decoders, and encoders as merged HF folders)", param="adapter")


def max_rank(peft_config: dict[str, Any]) -> int | None:
    """The engine's max_lora_rank for an adapter: its (initial) rank; None for prefix tuning (no rank)."""
    if peft_config.get("peft_type") == "PREFIX_TUNING":
        return None
    if peft_config.get("peft_type") == "ADALORA":  # ranks are pruned from init_r; rank_pattern holds masks
        return int(peft_config.get("init_r") or peft_config.get("r") or 8)
    pattern = [int(r) for r in (peft_config.get("rank_pattern") or {}).values()]
    return max([int(peft_config.get("r") or 8), *pattern])


def resolve_target(args: EvaluateArgs, data_labels: list[str]) -> EvalTarget:
    if args.adapter is not None:
        return adapter_target(Path(args.adapter), args, data_labels)
    base = resolve_base_model(args.model)
    if not base.is_decoder:
        return encoder_target(base.source.path, args.labels)
    task = (read_task_file(base.source.path) if base.source.format == "hf" else None) or {}
    return EvalTarget("decoder", str(base.source.path), decoder_labels(args, task, data_labels),
                      instruction=args.instruction or task.get("instruction"))


def predict(target: EvalTarget, texts: list[str], args: EvaluateArgs) -> tuple[list[str], list[list[float]]]:
    """The engine's predicted label and label probabilities (in target.labels order) per text."""
    from pagellm import LLM, LoRARequest

    if target.kind == "encoder":
        llm = LLM(target.model, task="classify", dtype=args.dtype)
        outs = llm.classify(texts, truncate_prompt_tokens=-1, use_tqdm=args.progress)
        return _labels_and_probs(outs, target.labels)
    engine_kwargs: dict[str, Any] = {}
    call_kwargs: dict[str, Any] = {"labels": target.labels, "use_tqdm": args.progress}
    if target.lora_path is not None:
        engine_kwargs["enable_lora"] = True
        if target.max_lora_rank is not None:
            engine_kwargs["max_lora_rank"] = target.max_lora_rank
        call_kwargs["lora_request"] = LoRARequest(Path(target.lora_path).name or "adapter", 1, target.lora_path)
    if target.instruction is not None:
        call_kwargs["instruction"] = target.instruction
    llm = LLM(target.model, dtype=args.dtype, **engine_kwargs)
    return _labels_and_probs(llm.classify(texts, **call_kwargs), target.labels)


def _labels_and_probs(outs: list[Any], labels: list[str]) -> tuple[list[str], list[list[float]]]:
    probs = [[out.outputs.label_probs[label] for label in labels] for out in outs]
    return [out.outputs.label for out in outs], probs


def read_compare_file(path: str) -> dict[str, Any]:
    try:
        before = json.loads(Path(path).read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"cannot read --compare-to {path!r}: {exc}", param="compare_to") from exc
    if not isinstance(before, dict) or "accuracy" not in before:
        raise InvalidRequest(f"{path} is not a pagellm evaluate JSON (--out-json)", param="compare_to")
    return before


def run_evaluate(args: EvaluateArgs) -> EvaluateResult:
    """Check everything from the files, run the engine, summarize; writes --out-json when given."""
    if args.task != "classify":
        raise InvalidRequest(f"evaluate supports task classify; got {args.task!r}", param="task")
    examples = subsample(read_classify_examples(args.data, "data"), args.max_samples, args.seed)
    before = read_compare_file(args.compare_to) if args.compare_to else None
    target = resolve_target(args, sorted({ex.label for ex in examples}))
    check_known_labels(examples, target.labels, args.data, "data", known_as="the model's labels")
    t0 = time.perf_counter()
    predicted, probs = predict(target, [ex.text for ex in examples], args)
    result = EvaluateResult(model=target.model, adapter=args.adapter, data=str(args.data), num_samples=len(examples),
                            summary=summarize([ex.label for ex in examples], predicted, target.labels),
                            wall_s=time.perf_counter() - t0, predictions=predicted, probabilities=probs)
    if before is not None:
        result.comparison = format_comparison(before, result.to_json())
    if args.out_json:
        Path(args.out_json).parent.mkdir(parents=True, exist_ok=True)
        Path(args.out_json).write_text(json.dumps(result.to_json(), indent=2) + "\n")
    return result
