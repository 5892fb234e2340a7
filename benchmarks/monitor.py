"""The monitor end to end: texts/s (ingest, topic by MiniLM similarity, sentiment by a finetune head, store,
detect) and the latency of one ingest batch (an alert is raised and stored inside its batch, so the p99 batch
latency bounds ingest-to-alert). In the same run, as baselines on the same texts and batches:
`LLM(task="embed")` alone (one encoder pass, nothing else) and the sentiment classifier alone.

Each path of `--paths` runs the whole pipeline: `auto` lets the monitor choose (one encoder pass when the
sentiment classifier is a frozen-encoder head on the topic encoder, see docs/monitor.md), `two-pass` forces
the separate topic embedding. Every measurement is preceded by one untimed warm-up batch. The JSON records
the load average (1, 5, 15 min) at the start and the end: on a shared machine a load above ~3 means the
figures are the machine's, not the monitor's.

`--quantizations none,int8` measures every path in float32 and with the encoders' big linears in int8
(`LLM(quantization="int8")`, `pagellm monitor --quantization int8`), alternating (float32 first, then int8,
for each measurement) so both see the same machine state; the JSON has one entry per quantization under
`by_quantization`, and its top-level figures are the first one's.

Stream: news3 sentences (tests/data/sentiment/news3) in seeded random order, ids unique.
Usage: python benchmarks/monitor.py --sentiment clf/sentiment [--num-texts 2000] [--batch-size 64]
           [--paths auto,two-pass] [--quantizations none,int8] [--out docs/results/monitor/benchmark.json]
"""

from __future__ import annotations

import argparse
import json
import os
import random
import sys
import tempfile
import time
from pathlib import Path

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
NEWS3 = ROOT / "tests" / "data" / "sentiment" / "news3"
TOPICS = "rates,earnings,fraud,markets,regulation"
PATHS = {"auto": None, "two-pass": False, "one-pass": True}  # -> EngineClassifier(one_pass=...)


def stream_lines(num_texts: int, prefix: str = "b") -> list[str]:
    rows = [json.loads(line) for split in ("train", "dev", "test")
            for line in (NEWS3 / f"{split}.jsonl").read_text().splitlines()]
    rng = random.Random(0)
    return [json.dumps({"id": f"{prefix}{i}", "text": rng.choice(rows)["text"]}) for i in range(num_texts)]


def percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


class TimedClassifier:
    """The monitor's classifier with the time spent in it counted (the rest of a batch is store + detect)."""

    def __init__(self, inner) -> None:
        self.inner, self.seconds = inner, 0.0
        self.path, self.encoder_passes = inner.path, inner.encoder_passes

    def classify(self, texts):
        t0 = time.perf_counter()
        try:
            return self.inner.classify(texts)
        finally:
            self.seconds += time.perf_counter() - t0


def run_pipeline(sentiment: str, one_pass: bool | None, lines: list[str], batch_size: int,
                 quantization: str = "auto") -> dict:
    from pagellm.apps.monitor.detector import DetectorConfig
    from pagellm.apps.monitor.service import EngineClassifier, MonitorService, parse_item, parse_topics
    from pagellm.apps.monitor.store import SQLiteStore

    t_load = time.perf_counter()
    classifier = TimedClassifier(EngineClassifier(sentiment, parse_topics(TOPICS), one_pass=one_pass,
                                                  quantization=quantization))
    load_s = time.perf_counter() - t_load
    classifier.inner.classify([json.loads(line)["text"] for line in lines[:batch_size]])  # warm-up, untimed
    with tempfile.TemporaryDirectory() as tmp:
        service = MonitorService(classifier, SQLiteStore(Path(tmp) / "m.sqlite"), DetectorConfig(),
                                 batch_size=batch_size)
        latencies, alerts = [], 0
        t0 = time.perf_counter()
        for start in range(0, len(lines), batch_size):
            items = [parse_item(json.loads(line)) for line in lines[start:start + batch_size]]
            b0 = time.perf_counter()
            alerts += len(service.ingest(items).alerts)
            latencies.append(time.perf_counter() - b0)
        wall = time.perf_counter() - t0
        stored = service.store.count()
        service.close()
    assert stored == len(lines), f"{stored} of {len(lines)} texts stored"
    return {"path": classifier.path, "model_passes_per_text": classifier.encoder_passes,
            "texts_per_s": len(lines) / wall, "wall_s": wall,
            "batch_latency_p50_s": percentile(latencies, 0.5), "batch_latency_p99_s": percentile(latencies, 0.99),
            "classify_s": classifier.seconds, "store_detect_parse_s": wall - classifier.seconds,
            "alerts": alerts, "startup_s": load_s}


def run_baseline(llm, texts: list[str], batch_size: int, method: str) -> float:
    """texts/s of `llm.embed` or `llm.classify` alone, in the monitor's batches (after one warm-up batch)."""
    call = getattr(llm, method)
    call(texts[:batch_size], truncate_prompt_tokens=-1, use_tqdm=False)
    t0 = time.perf_counter()
    for start in range(0, len(texts), batch_size):
        call(texts[start:start + batch_size], truncate_prompt_tokens=-1, use_tqdm=False)
    return len(texts) / (time.perf_counter() - t0)


def main() -> None:
    import torch

    from pagellm import LLM

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sentiment", required=True, help="a `pagellm finetune` classifier folder")
    p.add_argument("--num-texts", type=int, default=2000)
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--paths", default="auto,two-pass", help=f"comma-separated, of {', '.join(PATHS)}")
    p.add_argument("--quantizations", default="none", help="comma-separated, of none, int8")
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "monitor" / "benchmark.json"))
    args = p.parse_args()
    paths = [name.strip() for name in args.paths.split(",") if name.strip()]
    if not paths or any(name not in PATHS for name in paths):
        raise SystemExit(f"--paths takes a comma-separated list of {', '.join(PATHS)}")
    quantizations = [q.strip() for q in args.quantizations.split(",") if q.strip()]
    if not quantizations or any(q not in ("none", "int8") for q in quantizations):
        raise SystemExit("--quantizations takes a comma-separated list of none, int8")
    load_start = os.getloadavg()
    lines = stream_lines(args.num_texts)
    texts = [json.loads(line)["text"] for line in lines]
    result: dict = {"num_texts": len(lines), "batch_size": args.batch_size, "sentiment": args.sentiment,
                    "torch_threads": torch.get_num_threads(), "load_average_start": list(load_start)}
    runs: dict = {q: {} for q in quantizations}
    for q in quantizations:
        embedder = LLM(_minilm(), task="embed", dtype="float32", quantization=q)
        runs[q]["embed_only_texts_per_s"] = run_baseline(embedder, texts, args.batch_size, "embed")
        del embedder
    for q in quantizations:
        classifier = LLM(args.sentiment, task="classify", dtype="float32", quantization=q)
        runs[q]["classify_only_texts_per_s"] = run_baseline(classifier, texts, args.batch_size, "classify")
        del classifier
    for name in paths:
        for q in quantizations:
            runs[q].setdefault("pipelines", {})[name] = run_pipeline(args.sentiment, PATHS[name], lines,
                                                                     args.batch_size, q)
    first = runs[quantizations[0]]
    result.update(embed_only_texts_per_s=first["embed_only_texts_per_s"],
                  classify_only_texts_per_s=first["classify_only_texts_per_s"], pipelines=first["pipelines"])
    top = first["pipelines"][paths[0]]
    result.update(path=top["path"], texts_per_s=top["texts_per_s"],
                  batch_latency_p50_s=top["batch_latency_p50_s"], batch_latency_p99_s=top["batch_latency_p99_s"])
    result["by_quantization"] = runs
    result["load_average_end"] = list(os.getloadavg())
    result["load_note"] = ("quiet enough" if max(load_start[0], result["load_average_end"][0]) <= 3 else
                           "load average above 3: a shared machine's figures, rerun on an idle one")
    write_result("monitor", result, args.out)


def _minilm() -> str:
    from pagellm.adapt.base_model import resolve_base_model

    return str(resolve_base_model("minilm").source.path)


if __name__ == "__main__":
    main()
