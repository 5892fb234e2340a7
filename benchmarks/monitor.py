"""The monitor end to end: texts/s (ingest, topic by MiniLM similarity, sentiment by a finetune head, store,
detect) and the latency of one ingest batch (an alert is raised and stored inside its batch, so the p99 batch
latency bounds ingest-to-alert). Also times `LLM(task="embed")` alone on the same texts as the baseline.

Stream: news3 sentences (tests/data/sentiment/news3) in seeded random order, ids unique.
Usage: python benchmarks/monitor.py --sentiment clf/sentiment [--num-texts 2000] [--batch-size 64]
"""

from __future__ import annotations

import argparse
import json
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import load_average, write_result  # noqa: E402

NEWS3 = Path(__file__).resolve().parents[1] / "tests" / "data" / "sentiment" / "news3"
TOPICS = "rates,earnings,fraud,markets,regulation"


def stream_lines(num_texts: int) -> list[str]:
    rows = [json.loads(line) for split in ("train", "dev", "test")
            for line in (NEWS3 / f"{split}.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    return [json.dumps({"id": f"b{i}", "text": rng.choice(rows)["text"]}) for i in range(num_texts)]


def main() -> None:
    from pagellm import LLM
    from pagellm.apps.monitor.detector import DetectorConfig
    from pagellm.apps.monitor.service import EngineClassifier, MonitorService, parse_item, parse_topics
    from pagellm.apps.monitor.store import SQLiteStore

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sentiment", required=True)
    p.add_argument("--num-texts", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    lines = stream_lines(args.num_texts)
    classifier = EngineClassifier(args.sentiment, parse_topics(TOPICS))
    with tempfile.TemporaryDirectory() as tmp:
        service = MonitorService(classifier, SQLiteStore(Path(tmp) / "m.sqlite"), DetectorConfig(),
                                 batch_size=args.batch_size)
        latencies = []
        t0 = time.perf_counter()
        for start in range(0, len(lines), args.batch_size):
            items = [parse_item(json.loads(line)) for line in lines[start:start + args.batch_size]]
            b0 = time.perf_counter()
            service.ingest(items)
            latencies.append(time.perf_counter() - b0)
        wall = time.perf_counter() - t0
        service.close()
    texts = [json.loads(line)["text"] for line in lines]
    embedder = LLM(_minilm(), task="embed")
    e0 = time.perf_counter()
    embedder.embed(texts, truncate_prompt_tokens=-1, use_tqdm=False)
    embed_wall = time.perf_counter() - e0
    latencies.sort()
    result = {"num_texts": len(lines), "batch_size": args.batch_size, "texts_per_s": len(lines) / wall,
              "batch_latency_p50_s": latencies[len(latencies) // 2],
              "batch_latency_p99_s": latencies[min(len(latencies) - 1, int(0.99 * len(latencies)))],
              "baseline_embed_only_texts_per_s": len(lines) / embed_wall, "load_average": load_average()}
    write_result("monitor", result, args.out)


def _minilm() -> str:
    from pagellm.adapt.base_model import resolve_base_model

    return str(resolve_base_model("minilm").source.path)


if __name__ == "__main__":
    main()
