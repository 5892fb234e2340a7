"""What a fine-tuning run writes: the model or adapter folder, pagellm_task.json and train_report.json.

head / top-layers / full: a plain HF model folder (weights, config, tokenizer).
lora / adalora / prefix: a PEFT adapter folder (adapter_config.json, adapter_model.safetensors, tokenizer);
encoder lora/adalora also get `merged/`: the adapter (and its head) merged into a plain HF folder, because
pagellm's pooling engine loads plain folders. Decoder adapters need no copy: the engine serves them as they are.
"""

from __future__ import annotations

import copy
import json
from dataclasses import asdict
from pathlib import Path
from typing import TYPE_CHECKING, Any

if TYPE_CHECKING:
    from pagellm.adapt.finetune import FinetuneArgs, FinetuneResult, PreparedRun

TASK_FILE = "pagellm_task.json"
REPORT_FILE = "train_report.json"
MERGED_DIR = "merged"


def task_metadata(run: PreparedRun, args: FinetuneArgs) -> dict[str, Any]:
    """pagellm_task.json: what evaluation and serving need to know to run the adapted model."""
    return {"task": args.task, "labels": run.labels, "instruction": args.instruction, "base_model": run.base.name,
            "model_kind": run.base.kind, "strategy": str(run.strategy)}


def read_task_file(folder: str | Path) -> dict[str, Any] | None:
    path = Path(folder) / TASK_FILE
    return json.loads(path.read_text()) if path.is_file() else None


def needs_merged_copy(run: PreparedRun) -> bool:
    return not run.base.is_decoder and run.strategy.name in ("lora", "adalora")


def save_outputs(model: Any, tokenizer: Any, run: PreparedRun, args: FinetuneArgs, out_dir: Path) -> Path | None:
    """Save the trained model (or adapter) and its tokenizer; returns the merged folder when one is written."""
    out_dir.mkdir(parents=True, exist_ok=True)
    from pagellm.adapt.pooled_classifier import fix_saved_architecture

    model.save_pretrained(str(out_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(out_dir))
    fix_saved_architecture(out_dir)
    metadata = task_metadata(run, args)
    _write_json(out_dir / TASK_FILE, metadata)
    if not needs_merged_copy(run):
        return None
    merged_dir = out_dir / MERGED_DIR
    # NOTE: merge a copy, so the returned PeftModel keeps its base weights untouched
    merged = copy.deepcopy(model).merge_and_unload()
    merged.save_pretrained(str(merged_dir), safe_serialization=True)
    tokenizer.save_pretrained(str(merged_dir))
    fix_saved_architecture(merged_dir)
    _write_json(merged_dir / TASK_FILE, {**metadata, "strategy": f"{metadata['strategy']} (merged)"})
    return merged_dir


def write_train_report(result: FinetuneResult, run: PreparedRun, args: FinetuneArgs) -> Path:
    """train_report.json: wall time, parameter counts, per-evaluation dev metrics, best metric, settings."""
    report = {
        "strategy": result.strategy, "task": args.task, "model_kind": result.model_kind,
        "base_model": run.base.name, "labels": result.labels,
        "num_train_examples": len(run.data.train), "num_eval_examples": len(run.data.eval or []),
        "num_trainable_params": result.num_trainable_params, "num_total_params": result.num_total_params,
        "trainable_fraction": result.num_trainable_params / max(result.num_total_params, 1),
        "wall_s": round(result.wall_s, 3), "epochs_run": result.epochs_run, "global_steps": result.global_steps,
        "early_stopped": result.early_stopped,
        "metric": (args.metric if args.task == "classify" else "loss") if run.data.eval else None,
        "best_metric": result.best_metric, "history": result.history,
        "merged_dir": str(result.merged_dir) if result.merged_dir else None, "args": asdict(args),
    }
    path = result.out_dir / REPORT_FILE
    _write_json(path, report)
    return path


def _write_json(path: Path, obj: Any) -> None:
    path.write_text(json.dumps(obj, indent=2) + "\n")
