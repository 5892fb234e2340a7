"""Markdown tables for docs/adaptation.md from the files benchmarks/adaptation.sh writes.

Usage: python benchmarks/adaptation_report.py [OUT_DIR]   (default benchmarks/results/adaptation)
"""

from __future__ import annotations

import json
import sys
from pathlib import Path

RUNS = [
    ("zeroshot", "SmolLM2-135M-Instruct, zero-shot (label log-likelihood)"),
    ("minilm_head", "all-MiniLM-L6-v2, head only (frozen encoder, mean pooling, defaults)"),
    ("minilm_full", "all-MiniLM-L6-v2, full fine-tuning"),
    ("smollm2_lora", "SmolLM2-135M-Instruct, LoRA r=8 (label word)"),
    ("smollm2_prefix", "SmolLM2-135M-Instruct, prefix tuning, 20 virtual tokens (label word)"),
]


def _load(path: Path) -> dict | None:
    return json.loads(path.read_text()) if path.is_file() else None


def _cell(value: float | None, digits: int = 3) -> str:
    return "—" if value is None else f"{value:.{digits}f}"


def main(out: Path) -> None:
    print("| model and strategy | movies acc | movies macro-F1 | tweets acc | tweets macro-F1 | trainable params "
          "| train examples | train wall time | epochs (early stop) | best dev acc |")
    print("|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|")
    for name, title in RUNS:
        movies, tweets = _load(out / f"{name}.movies.json"), _load(out / f"{name}.tweets.json")
        train = _load(out / name / "train_report.json")
        params = f"{train['num_trainable_params']:,} ({100 * train['trainable_fraction']:.2f}%)" if train else "0"
        wall = f"{train['wall_s'] / 60:.1f} min" if train else "—"
        epochs = f"{train['epochs_run']:.2g}{' (stopped)' if train['early_stopped'] else ''}" if train else "—"
        examples = f"{train['num_train_examples']:,}" if train else "—"
        best = _cell(train.get("best_metric")) if train else "—"
        print(f"| {title} | {_cell(movies and movies['accuracy'])} | {_cell(movies and movies['macro_f1'])} "
              f"| {_cell(tweets and tweets['accuracy'])} | {_cell(tweets and tweets['macro_f1'])} | {params} "
              f"| {examples} | {wall} | {epochs} | {best} |")
    print()
    for name, title in RUNS:
        movies = _load(out / f"{name}.movies.json")
        if movies:
            print(f"{title}, movies/test ({movies['num_samples']} texts, evaluated in {movies['wall_s']:.0f} s):")
            print("```\n" + movies["report"].rstrip() + "\n```")


if __name__ == "__main__":
    main(Path(sys.argv[1] if len(sys.argv) > 1 else "benchmarks/results/adaptation"))
