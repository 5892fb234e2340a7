"""The monitor's encoder (bundled all-MiniLM-L6-v2) on the monitor benchmark's texts: where the time goes,
float32 vs `quantization="int8"`, and what int8 costs in accuracy.

Speed, in alternating rounds on the same batches of 64 (a shared machine drifts; the best round of each is
kept, and the process CPU seconds per text beside it): HF transformers `AutoModel` (float32, padded batches,
mean pooling + L2 normalize: sentence-transformers' recipe), pagellm float32 and pagellm int8
(`Worker.pool`, the engine's own forward, without tokenization or scheduling). Also tokens per text and the
float32 FLOPs per text against the CPU's measured float32 matmul rate.

Accuracy: cosine of int8 to float32 embeddings over every news3 sentence; topic agreement (nearest of the
benchmark's five topics, as the monitor assigns them); with --sentiment, the head's macro-F1 on news3/test
in float32 and int8.

Usage: python benchmarks/encoder_int8.py [--sentiment clf/sentiment] [--num-texts 640] [--rounds 3]
           [--out docs/results/monitor/encoder_int8.json]
"""

from __future__ import annotations

import argparse
import json
import os
import sys
import time
from pathlib import Path

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import write_result  # noqa: E402
from monitor import NEWS3, TOPICS, _minilm, stream_lines  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
BATCH = 64


def matmul_gflops(torch, threads: int) -> float:
    """Best float32 rate of MiniLM's 384 -> 1536 projection on 1,600 rows (a batch of 64 texts)."""
    torch.set_num_threads(threads)
    a, w = torch.randn(1600, 384), torch.randn(1536, 384)
    best = 1e9
    for _ in range(20):
        t0 = time.perf_counter()
        torch.nn.functional.linear(a, w)
        best = min(best, time.perf_counter() - t0)
    return 2 * 1600 * 384 * 1536 / best / 1e9


def flops_per_token(config, mean_len: float) -> float:
    """Matmul FLOPs per token of one forward (projections + attention scores and mixing)."""
    h, i = config.hidden_size, config.intermediate_size
    per_layer = 2 * h * (3 * h + h + 2 * i) + 4 * mean_len * h
    return config.num_hidden_layers * per_layer


def macro_f1(gold: list[str], pred: list[str]) -> float:
    scores = []
    for label in sorted(set(gold)):
        tp = sum(g == p == label for g, p in zip(gold, pred))
        fp = sum(p == label != g for g, p in zip(gold, pred))
        fn = sum(g == label != p for g, p in zip(gold, pred))
        scores.append(0.0 if tp == 0 else 2 * tp / (2 * tp + fp + fn))
    return sum(scores) / len(scores)


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--sentiment", default=None, help="a `pagellm finetune` head for the macro-F1 check")
    p.add_argument("--num-texts", type=int, default=640)
    p.add_argument("--rounds", type=int, default=3)
    p.add_argument("--threads", type=int, default=2)
    p.add_argument("--out", default=str(ROOT / "docs" / "results" / "monitor" / "encoder_int8.json"))
    args = p.parse_args()

    import numpy as np
    import torch
    from transformers import AutoModel, AutoTokenizer

    from pagellm import LLM
    from pagellm.apps.monitor.service import parse_topics
    from pagellm.config import ModelConfig
    from pagellm.worker.worker import PoolingBatch, Worker

    torch.set_num_threads(args.threads)
    load_start = os.getloadavg()
    path = _minilm()
    texts = [json.loads(line)["text"] for line in stream_lines(args.num_texts)]
    tokenizer = AutoTokenizer.from_pretrained(path)
    ids = tokenizer(texts, truncation=True, max_length=256)["input_ids"]
    lens = sorted(len(x) for x in ids)
    hf = AutoModel.from_pretrained(path, dtype=torch.float32).eval()
    mean_len = sum(lens) / len(lens)
    flops_text = flops_per_token(hf.config, sum(x * x for x in lens) / sum(lens)) * mean_len
    gflops_2 = matmul_gflops(torch, args.threads)
    torch.set_num_threads(args.threads)
    result: dict = {
        "num_texts": len(texts), "batch_size": BATCH, "torch_threads": args.threads,
        "load_average_start": list(load_start),
        "tokens_per_text": {"mean": mean_len, "median": lens[len(lens) // 2], "p90": lens[int(0.9 * len(lens))],
                            "max": lens[-1]},
        "gflop_per_text_fp32": flops_text / 1e9,
        "matmul_gflops_fp32_384x1536": gflops_2,
        "texts_per_s_bound_fp32_matmul": gflops_2 * 1e9 / flops_text,
    }

    workers = {}
    for name, quantization in (("pagellm_float32", "auto"), ("pagellm_int8", "int8")):
        worker = Worker(ModelConfig(model=path, dtype="float32", quantization=quantization), task="embed")
        worker.load()
        workers[name] = worker
    batches = [ids[s:s + BATCH] for s in range(0, len(ids), BATCH)]

    def run_hf(batch_texts: list[str]) -> None:
        enc = tokenizer(batch_texts, padding=True, truncation=True, max_length=256, return_tensors="pt")
        with torch.inference_mode():
            out = hf(**enc).last_hidden_state  # [B, L, hidden]
        mask = enc["attention_mask"].unsqueeze(-1).float()
        torch.nn.functional.normalize((out * mask).sum(1) / mask.sum(1), dim=-1)

    runs = {"hf_transformers_float32": lambda: [run_hf(texts[s:s + BATCH]) for s in range(0, len(texts), BATCH)]}
    for name, worker in workers.items():
        runs[name] = lambda w=worker: [w.pool(PoolingBatch(b, "embed", "mean", True)) for b in batches]
    for fn in runs.values():
        fn()  # warm-up
    speed = {name: {"best_texts_per_s": 0.0, "texts_per_cpu_s": 0.0, "rounds_texts_per_s": []} for name in runs}
    for _ in range(args.rounds):
        for name, fn in runs.items():
            t0, c0 = time.perf_counter(), time.process_time()
            fn()
            wall, cpu = time.perf_counter() - t0, time.process_time() - c0
            s = speed[name]
            s["rounds_texts_per_s"].append(len(texts) / wall)
            s["best_texts_per_s"] = max(s["best_texts_per_s"], len(texts) / wall)
            s["texts_per_cpu_s"] = max(s["texts_per_cpu_s"], len(texts) / cpu)
    result["speed"] = speed
    result["int8_speedup_best"] = speed["pagellm_int8"]["best_texts_per_s"] / speed["pagellm_float32"][
        "best_texts_per_s"]
    result["load_average_after_speed"] = list(os.getloadavg())

    # accuracy: every news3 sentence, float32 vs int8
    rows = [json.loads(line) for split in ("train", "dev", "test")
            for line in (NEWS3 / f"{split}.jsonl").read_text().splitlines()]
    all_ids = tokenizer([r["text"] for r in rows], truncation=True, max_length=256)["input_ids"]
    vecs = {}
    for name, worker in workers.items():
        vecs[name] = np.asarray([v for s in range(0, len(all_ids), BATCH)
                                 for v in worker.pool(PoolingBatch(all_ids[s:s + BATCH], "embed", "mean",
                                                                   True)).rows])
    cos = (vecs["pagellm_float32"] * vecs["pagellm_int8"]).sum(1)
    topic_ids = tokenizer(list(parse_topics(TOPICS).values()), truncation=True, max_length=256)["input_ids"]
    topics = {name: np.asarray(w.pool(PoolingBatch(topic_ids, "embed", "mean", True)).rows)
              for name, w in workers.items()}
    nearest = {name: (vecs[name] @ topics[name].T).argmax(1) for name in workers}
    result["accuracy"] = {
        "texts": len(rows),
        "cosine_int8_vs_float32": {"mean": float(cos.mean()), "min": float(cos.min()),
                                   "p1": float(np.percentile(cos, 1)), "share_below_0.99": float((cos < 0.99).mean())},
        "topic_agreement_int8_vs_float32": float((nearest["pagellm_float32"] == nearest["pagellm_int8"]).mean()),
    }
    if args.sentiment:
        test = [json.loads(line) for line in (NEWS3 / "test.jsonl").read_text().splitlines()]
        for quantization in ("auto", "int8"):
            clf = LLM(args.sentiment, task="classify", dtype="float32", quantization=quantization)
            outs = clf.classify([r["text"] for r in test], truncate_prompt_tokens=-1, use_tqdm=False)
            pred = [o.outputs.labels[int(np.argmax(o.outputs.probs))] for o in outs]
            key = "float32" if quantization == "auto" else "int8"
            result["accuracy"][f"sentiment_macro_f1_{key}"] = macro_f1([r["label"] for r in test], pred)
            del clf
    result["load_average_end"] = list(os.getloadavg())
    write_result("monitor", result, args.out)


if __name__ == "__main__":
    main()
