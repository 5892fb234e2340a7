"""The help desk's generated answers with and without a LoRA adapter, on the held-out evaluation questions.

Training (`--train`): `pagellm helpdesk train-data`'s rows (each question with the desk's own prompt -> the first
two sentences of its entry's answer, citing it) for the FAQ's own questions and the dev questions, leaving out
every entry an evaluation question is labelled with (so the adapter never saw those answers), optionally a seeded
subset (`--train-rows`); then `pagellm finetune --task generate --strategy lora` on them.

Evaluation: every question of tests/data/faq/eval_questions.jsonl gets the desk's generation prompt (its retrieved
passages, whatever its confidence) and a greedy answer from the bundled SmolLM2, once without and once with the
adapter, in one engine. Scored against the right entry's first two sentences: ROUGE-L (rouge-score, stemmed) and
content-word F1; and whether the answer cites [n] at all, whether its first citation is the right entry, and
whether the passage it draws most words from is the right entry. Reported for all questions and for the ones the
desk really answers by generation (between the thresholds).

    PYTHONPATH=. python benchmarks/helpdesk_lora.py --train --adapter /tmp/helpdesk-lora \\
        --out docs/results/helpdesk_lora.json   # 35 min at load average 8-11 on 2 shared cores
    PYTHONPATH=. python benchmarks/helpdesk_lora.py --adapter /tmp/helpdesk-lora   # evaluate an adapter again
"""

from __future__ import annotations

import argparse
import json
import random
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import load_average, write_result  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
FAQ = ROOT / "tests" / "data" / "faq"


def questions(name: str) -> list[dict]:
    return [json.loads(line) for line in (FAQ / name).read_text().splitlines() if line.strip()]


def open_retriever(index: Path):
    from pagellm.apps.helpdesk.cli import index_kb
    from pagellm.apps.helpdesk.retrieval import Retriever, open_index

    if not (index / "meta.json").exists():
        print(json.dumps(index_kb(FAQ / "python_faq.jsonl", index)), flush=True)
    meta, store, embedder = open_index(index)
    return Retriever(store, embedder, meta.calibration)


def train(retriever, adapter: Path, args: argparse.Namespace) -> dict:
    from pagellm.apps.helpdesk.cli import training_rows

    held_out = {q["id"] for q in questions("eval_questions.jsonl")}
    entries = retriever.store.entries(list(retriever.store.hashes()))
    pool = [{"question": e.question, "id": e.id} for e in entries.values() if e.id not in held_out]
    pool += [q for q in questions("dev_questions.jsonl") if q.get("id") and q["id"] not in held_out]
    rows = training_rows(retriever, sorted(pool, key=lambda q: (q["id"], q["question"])))
    random.Random(args.seed).shuffle(rows)
    rows = rows[:args.train_rows] if args.train_rows else rows
    data = adapter.with_suffix(".train.jsonl")
    adapter.parent.mkdir(parents=True, exist_ok=True)
    data.write_text("".join(json.dumps(r) + "\n" for r in rows))
    cmd = [sys.executable, "-m", "pagellm.entrypoints.cli", "finetune", "--task", "generate", "--data", str(data),
           "--strategy", "lora", "--out", str(adapter), "--epochs", str(args.epochs), "--max-length",
           str(args.max_length), "--batch-size", str(args.batch_size), "--lr", str(args.lr), "--seed", str(args.seed),
           "--no-progress", "--overwrite"]
    print(" ".join(cmd[2:]), flush=True)
    t0 = time.perf_counter()
    subprocess.run(cmd, check=True)
    report = json.loads((adapter / "train_report.json").read_text()) if (adapter / "train_report.json").exists() else {}
    size = sum(f.stat().st_size for f in adapter.rglob("*") if f.is_file())
    return {"rows": len(rows), "pool_questions": len(pool), "held_out_entries": len(held_out),
            "command": "pagellm " + " ".join(cmd[3:]), "seconds": round(time.perf_counter() - t0, 1),
            "adapter_bytes": size, "train_report": report}


def evaluate(retriever, adapter: Path | None, max_tokens: int) -> dict:
    from pagellm import LLM, LoRARequest, SamplingParams
    from pagellm.apps.helpdesk.quality import cited, drawn_from, reference_answer, rouge_l, token_f1
    from pagellm.apps.helpdesk.service import Thresholds, build_messages, prompt_passages

    evals = questions("eval_questions.jsonl")
    plans = []
    for q in evals:
        retrieval = retriever.retrieve(q["question"])
        plans.append((q, retrieval, prompt_passages(retrieval), Thresholds().mode(retrieval.confidence)))
    llm = LLM(enable_lora=adapter is not None)
    params = SamplingParams(temperature=0.0, max_tokens=max_tokens, repetition_penalty=1.1)
    conversations = [build_messages(q["question"], r) for q, r, _, _ in plans]
    variants = {"base": None}
    if adapter is not None:
        variants["lora"] = LoRARequest("helpdesk", 1, str(adapter))
    answers = {}
    for name, lora in variants.items():
        t0 = time.perf_counter()
        outs = llm.chat(conversations, params, use_tqdm=False, lora_request=lora)
        answers[name] = [o.outputs[0].text.strip() for o in outs]
        print(f"{name}: {len(outs)} answers in {time.perf_counter() - t0:.1f} s", flush=True)
    rows = []
    for i, (q, _, passages, mode) in enumerate(plans):
        ids = [hit.entry.id for hit, _ in passages]
        right = ids.index(q["id"]) + 1 if q["id"] in ids else None
        entry = retriever.store.entries([q["id"]])[q["id"]]
        reference = reference_answer(entry.answer)
        row = {"question": q["question"], "id": q["id"], "mode": mode, "passages": ids, "right_passage": right,
               "reference": reference}
        for name in variants:
            answer = answers[name][i]
            numbers = cited(answer, len(ids))
            row[name] = {"answer": answer, "rouge_l": round(rouge_l(answer, reference), 4),
                         "token_f1": round(token_f1(answer, reference), 4), "cites": bool(numbers),
                         "cites_right": bool(numbers) and numbers[0] == right,
                         "draws_on_right": drawn_from(answer, [t for _, t in passages]) == right}
        rows.append(row)
    return {"variants": list(variants), "rows": rows,
            "summary": {subset: summarize(rows, variants, subset) for subset in ("all", "generated")}}


def summarize(rows: list[dict], variants: dict, subset: str) -> dict:
    rows = [r for r in rows if subset == "all" or r["mode"] == subset]
    out: dict = {"n": len(rows), "right_entry_in_prompt": sum(r["right_passage"] is not None for r in rows)}
    for name in variants:
        scored = [r[name] for r in rows]
        out[name] = {"rouge_l": round(sum(s["rouge_l"] for s in scored) / len(rows), 4),
                     "token_f1": round(sum(s["token_f1"] for s in scored) / len(rows), 4),
                     **{k: sum(s[k] for s in scored) for k in ("cites", "cites_right", "draws_on_right")}}
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--index", default="/tmp/helpdesk-index", help="index folder (built when missing)")
    p.add_argument("--adapter", default=None, help="adapter folder (written with --train); none: base only")
    p.add_argument("--train", action="store_true", help="train the adapter first")
    p.add_argument("--train-rows", type=int, default=64, help="seeded subset of the training rows (0: all)")
    p.add_argument("--epochs", type=float, default=1)
    p.add_argument("--batch-size", type=int, default=4)
    p.add_argument("--max-length", type=int, default=384)
    p.add_argument("--lr", type=float, default=1e-3)
    p.add_argument("--seed", type=int, default=0)
    p.add_argument("--max-tokens", type=int, default=48)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    result: dict = {"load_average_start": load_average(), "max_tokens": args.max_tokens}
    retriever = open_retriever(Path(args.index))
    adapter = Path(args.adapter) if args.adapter else None
    if args.train:
        if adapter is None:
            p.error("--train needs --adapter (the folder to write)")
        result["training"] = train(retriever, adapter, args)
        result["load_average_after_training"] = load_average()
    t0 = time.perf_counter()
    result.update(evaluate(retriever, adapter, args.max_tokens))
    result["evaluation_s"] = round(time.perf_counter() - t0, 1)
    result["load_average_end"] = load_average()
    print(json.dumps(result["summary"], indent=1))
    write_result("helpdesk_lora", result, args.out)


if __name__ == "__main__":
    main()
