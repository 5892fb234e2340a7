"""Fixtures of the monitor tests: a replayed stream built from the committed news3 data, and a classifier
that answers from the data's own labels (and counts what it was asked), so the stream logic runs fast."""

from __future__ import annotations

import json
import random
from collections.abc import Sequence
from pathlib import Path

import pytest

NEWS3 = Path(__file__).resolve().parents[2] / "data" / "sentiment" / "news3"
TOPICS = ["rates", "earnings", "fraud", "markets", "regulation"]


def news3_rows() -> list[dict]:
    return [json.loads(line) for split in ("train", "dev", "test")
            for line in (NEWS3 / f"{split}.jsonl").read_text().splitlines()]


def replay_stream(num_texts: int, seed: int, burst_topic: str | None = None, burst_start: int = 0,
                  burst_len: int = 300, burst_rise: float = 0.3) -> list[dict]:
    """`num_texts` stream items {"id", "text", "topic", "label"}: news3 texts drawn in random order, each given
    a random topic; from stream position `burst_start` on, the next `burst_len` texts of the burst topic are
    negative `burst_rise` more often."""
    rng = random.Random(seed)
    rows = news3_rows()
    negatives = [r for r in rows if r["label"] == "negative"]
    others = [r for r in rows if r["label"] != "negative"]
    base_rate = len(negatives) / len(rows)
    stream = []
    num_burst = 0
    for i in range(num_texts):
        topic = rng.choice(TOPICS)
        in_burst = topic == burst_topic and i >= burst_start and num_burst < burst_len
        num_burst += in_burst
        rate = base_rate + burst_rise if in_burst else base_rate
        row = rng.choice(negatives if rng.random() < rate else others)
        stream.append({"id": f"t{i}", "text": f"{row['text']} [{i}]", "topic": topic, "label": row["label"]})
    return stream


class LabelLookupClassifier:
    """A TextClassifier that answers from the stream's own topic and label, recording every text it sees."""

    def __init__(self, stream: list[dict]) -> None:
        self.answers = {s["text"]: (s["topic"], s["label"]) for s in stream}
        self.seen: list[str] = []
        self.fail_after: int | None = None  # raise once this many texts were classified (a crash mid-stream)

    def classify(self, texts: Sequence[str]) -> list[tuple[str, str, float]]:
        if self.fail_after is not None and len(self.seen) + len(texts) > self.fail_after:
            raise RuntimeError("simulated crash")
        self.seen += texts
        answers = [self.answers.get(t, ("markets", "neutral")) for t in texts]  # a text from outside the stream
        return [(topic, label, 1.0 if label == "negative" else 0.0) for topic, label in answers]


@pytest.fixture
def make_stream():
    return replay_stream
