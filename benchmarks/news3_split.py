"""Split ../shared/data/sentiment/news3/all.jsonl into the committed tests/data/sentiment/news3/{train,dev,test}.jsonl.

Stratified by label, seed 0, 80/10/10; each line is copied unchanged. Re-running writes the same files.
Usage: python benchmarks/news3_split.py [ALL_JSONL] [OUT_DIR]
"""

from __future__ import annotations

import json
import random
import sys
from collections import defaultdict
from pathlib import Path

SEED = 0
FRACTIONS = {"train": 0.8, "dev": 0.1}  # test: the rest


def split(lines: list[str], seed: int = SEED) -> dict[str, list[str]]:
    by_label: dict[str, list[str]] = defaultdict(list)
    for line in lines:
        by_label[json.loads(line)["label"]].append(line)
    rng = random.Random(seed)
    out: dict[str, list[str]] = {"train": [], "dev": [], "test": []}
    for label in sorted(by_label):
        rows = by_label[label]
        rng.shuffle(rows)
        num_train, num_dev = round(FRACTIONS["train"] * len(rows)), round(FRACTIONS["dev"] * len(rows))
        out["train"] += rows[:num_train]
        out["dev"] += rows[num_train:num_train + num_dev]
        out["test"] += rows[num_train + num_dev:]
    for rows in out.values():
        rng.shuffle(rows)  # no label blocks
    return out


def main() -> None:
    root = Path(__file__).resolve().parents[1]
    default_src = root / ".." / "shared" / "data" / "sentiment" / "news3" / "all.jsonl"  # as the docs name it
    src = Path(sys.argv[1]) if len(sys.argv) > 1 else default_src
    dst = Path(sys.argv[2]) if len(sys.argv) > 2 else root / "tests" / "data" / "sentiment" / "news3"
    dst.mkdir(parents=True, exist_ok=True)
    lines = [line for line in src.read_text().splitlines() if line.strip()]
    for name, rows in split(lines).items():
        (dst / f"{name}.jsonl").write_text("".join(row + "\n" for row in rows))
        print(name, len(rows))


if __name__ == "__main__":
    main()
