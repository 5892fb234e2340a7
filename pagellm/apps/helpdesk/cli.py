"""`pagellm helpdesk index|ask|serve|eval`: build or update an index from a knowledge base, answer one question,
serve the chat page and the OpenAI face, or measure recall@k on a labelled question set."""

from __future__ import annotations

import argparse
import json
import sys
from pathlib import Path
from typing import Any


def add_helpdesk_parser(sub: Any) -> None:
    p = sub.add_parser("helpdesk", help="a customer-service help desk over a knowledge base (retrieval + chat)")
    hsub = p.add_subparsers(dest="helpdesk_command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    idx = hsub.add_parser("index", help="build or update an index (only new and changed entries are embedded)",
                          formatter_class=fmt)
    idx.add_argument("--kb", required=True, help="JSONL of {id, question, answer} or a folder of .md/.txt/.html")
    idx.add_argument("--out", required=True, help="index folder")
    idx.add_argument("--encoder", default=None, help="encoder folder for embeddings (default: bundled MiniLM)")
    idx.add_argument("--fields", default="q,qa", help="what each entry embeds: q (question), qa, a; max over them")
    idx.add_argument("--store", default=None, help="postgresql://... to keep the index in PostgreSQL + pgvector")
    idx.add_argument("--calibrate", default=None, help="JSONL of {question, id|null}: refit the confidence")
    idx.set_defaults(func=cmd_index)

    ask = hsub.add_parser("ask", help="answer one question", formatter_class=fmt)
    ask.add_argument("question")
    ask.add_argument("--index", required=True)
    ask.add_argument("--json", action="store_true", help="print {answer, mode, sources, ...} as JSON")
    _add_answer_args(ask)
    ask.set_defaults(func=cmd_ask)

    serve = hsub.add_parser("serve", help="chat page at /, /v1/chat/completions (model=helpdesk), feedback",
                            formatter_class=fmt)
    serve.add_argument("--index", required=True)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    _add_answer_args(serve)
    serve.set_defaults(func=cmd_serve)

    td = hsub.add_parser("train-data", formatter_class=fmt,
                         help="chat rows for `pagellm finetune --task generate` (LoRA): each entry's question with "
                              "its retrieved passages -> the start of its answer, citing it")
    td.add_argument("--index", required=True)
    td.add_argument("--out", required=True, help="JSONL of {messages}")
    td.add_argument("--questions", default=None, help="also these {question, id} rows (e.g. paraphrases)")
    td.set_defaults(func=cmd_train_data)

    ev = hsub.add_parser("eval", help="recall@1/@5 of dense, lexical and fused retrieval on a question set",
                         formatter_class=fmt)
    ev.add_argument("--index", required=True)
    ev.add_argument("--questions", required=True, help="JSONL of {question, id}")
    ev.set_defaults(func=cmd_eval)


def _add_answer_args(p: argparse.ArgumentParser) -> None:
    p.add_argument("--model", default=None, help="decoder for generated answers (default: bundled SmolLM2)")
    p.add_argument("--lora", default=None, help="a `pagellm finetune --task generate` adapter folder")
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--template-threshold", type=float, default=None)
    p.add_argument("--handoff-threshold", type=float, default=None)
    p.add_argument("--store", default=None, help="postgresql://... (default: the index's own store)")


def index_kb(kb: str | Path, out: str | Path, encoder: str | None = None, fields: str = "q,qa",
             store_uri: str | None = None, calibrate: str | None = None, embedder: Any = None) -> dict[str, Any]:
    """Build or update the index folder `out` from `kb`; returns what changed."""
    from pagellm.apps.helpdesk.kb import load_kb
    from pagellm.apps.helpdesk.retrieval import FIELD_TEXT, Embedder, IndexMeta, Retriever, build_index
    from pagellm.apps.helpdesk.store import open_store
    from pagellm.errors import InvalidRequest

    out = Path(out)
    field_list = [f.strip() for f in fields.split(",") if f.strip()]
    unknown = [f for f in field_list if f not in FIELD_TEXT]
    if unknown or not field_list:
        raise InvalidRequest(f"--fields takes {', '.join(FIELD_TEXT)}; got {fields!r}", param="fields")
    entries = load_kb(kb)
    out.mkdir(parents=True, exist_ok=True)
    old = IndexMeta.load(out) if (out / "meta.json").exists() else None
    embedder = embedder or Embedder(encoder or (old.encoder if old else None))
    meta = IndexMeta(embedder.model, field_list, embedder.dim, store_uri or (old.store if old else None))
    if old is not None and (old.encoder, old.fields) != (meta.encoder, meta.fields):
        raise InvalidRequest(f"{out} was built with encoder {old.encoder} and fields {old.fields}; build a new "
                             "index folder for another encoder or fields", param="out")
    if old is not None:
        meta.calibration = old.calibration
    store = open_store(out, embedder.dim, meta.store)
    try:
        report = build_index(entries, store, embedder, field_list)
        if calibrate:
            meta.calibration = fit_calibration(Retriever(store, embedder), _questions(calibrate))
        meta.save(out)
        return {"entries": store.count(), "added": report.num_added, "changed": report.num_changed,
                "removed": report.num_removed, "unchanged": report.num_unchanged,
                "seconds": round(report.elapsed_s, 2)}
    finally:
        store.close()


def fit_calibration(retriever: Any, questions: list[dict[str, Any]]) -> Any:
    """Logistic regression of "the top hit is the labelled entry" on the retrieval features."""
    from sklearn.linear_model import LogisticRegression

    from pagellm.apps.helpdesk.retrieval import Calibration

    features, labels = [], []
    for q in questions:
        r = retriever.retrieve(q["question"])
        features.append(r.features)
        labels.append(int(bool(r.hits) and r.hits[0].entry.id == q.get("id")))
    lr = LogisticRegression(C=10).fit(features, labels)
    w = [float(x) for x in lr.coef_[0]]
    return Calibration(round(w[0], 3), round(w[1], 3), round(w[2], 3), round(float(lr.intercept_[0]), 3))


def _questions(path: str | Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in Path(path).read_text().splitlines() if line.strip()]


def build_service(index: str | Path, model: str | None = None, lora: str | None = None, max_tokens: int = 128,
                  template_threshold: float | None = None, handoff_threshold: float | None = None,
                  store_uri: str | None = None, embedder: Any = None, generate: bool = True) -> Any:
    """A HelpdeskService over an index folder; its generator's AsyncLLM still needs start() on the loop."""
    from pagellm.apps.helpdesk.retrieval import Retriever, open_index
    from pagellm.apps.helpdesk.service import EngineGenerator, HelpdeskService, Thresholds

    meta, store, embedder = open_index(index, embedder, store_uri)
    thresholds = Thresholds()
    if template_threshold is not None:
        thresholds.template = template_threshold
    if handoff_threshold is not None:
        thresholds.handoff = handoff_threshold
    generator = None
    if generate:
        from pagellm.entrypoints.openai.api_server import build_async_llm

        kwargs: dict[str, Any] = {"model": model, "max_num_seqs": 16}
        lora_request = None
        if lora:
            from pagellm import LoRARequest

            kwargs.update(enable_lora=True)
            lora_request = LoRARequest("helpdesk", 1, lora)
        generator = EngineGenerator(build_async_llm(**kwargs), lora_request)
    return HelpdeskService(Retriever(store, embedder, meta.calibration), store, generator, thresholds, max_tokens)


def cmd_index(args: argparse.Namespace) -> int:
    print(json.dumps(index_kb(args.kb, args.out, args.encoder, args.fields, args.store, args.calibrate)))
    return 0


def cmd_ask(args: argparse.Namespace) -> int:
    import asyncio

    service = build_service(args.index, args.model, args.lora, args.max_tokens, args.template_threshold,
                            args.handoff_threshold, args.store)

    async def run() -> Any:
        if service.generator is not None:
            service.generator.llm.start()
        try:
            if args.json:
                return await service.answer(args.question, create_session=False)
            turn = None
            async for event in service.stream(args.question, create_session=False):
                if event.kind == "delta":
                    sys.stdout.write(event.text)
                    sys.stdout.flush()
                elif event.kind == "done":
                    turn = event.turn
            return turn
        finally:
            if service.generator is not None:
                await service.generator.llm.shutdown()

    turn = asyncio.run(run())
    if args.json:
        out = turn.to_json()
        print(json.dumps({k: out[k] for k in ("answer", "mode", "sources", "confidence", "query")}))
    else:
        print(f"\n\n[{turn.mode}, confidence {turn.confidence:.2f}]")
        for s in turn.sources:
            print(f"  {s['id']}: {s['question']} ({s['score']:.3f})")
    service.store.close()
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from pagellm.apps.helpdesk.api import build_helpdesk_app

    service = build_service(args.index, args.model, args.lora, args.max_tokens, args.template_threshold,
                            args.handoff_threshold, args.store)
    try:
        uvicorn.run(build_helpdesk_app(service), host=args.host, port=args.port, log_level="info")
    finally:
        service.store.close()
    return 0


def training_rows(retriever: Any, questions: list[dict[str, Any]], max_sentences: int = 2) -> list[dict[str, Any]]:
    """One {messages} row per question: the generation prompt the desk builds (same system prompt and passages)
    and, as the assistant turn, the labelled entry's first sentences with its citation number."""
    import re

    from pagellm.apps.helpdesk.service import build_messages, prompt_hits

    rows = []
    for q in questions:
        retrieval = retriever.retrieve(q["question"])
        hits = prompt_hits(retrieval)
        ids = [h.entry.id for h in hits]
        if q["id"] not in ids:
            continue  # the answer is not among the passages: nothing to ground a target on
        entry = hits[ids.index(q["id"])].entry
        sentences = re.split(r"(?<=[.!?])\s+", " ".join(entry.answer.split()))
        target = " ".join(sentences[:max_sentences]).rstrip()
        messages = build_messages(q["question"], retrieval)
        rows.append({"messages": messages + [{"role": "assistant", "content": f"{target} [{ids.index(q['id']) + 1}]"}]})
    return rows


def cmd_train_data(args: argparse.Namespace) -> int:
    from pagellm.apps.helpdesk.retrieval import Retriever, open_index

    meta, store, embedder = open_index(args.index)
    retriever = Retriever(store, embedder, meta.calibration)
    entries = store.entries(list(store.hashes()))
    questions = [{"question": e.question, "id": e.id} for e in entries.values()]
    if args.questions:
        questions += [q for q in _questions(args.questions) if q.get("id")]
    rows = training_rows(retriever, questions)
    Path(args.out).write_text("".join(json.dumps(r) + "\n" for r in rows))
    print(json.dumps({"rows": len(rows), "questions": len(questions)}))
    store.close()
    return 0


def cmd_eval(args: argparse.Namespace) -> int:
    from pagellm.apps.helpdesk.retrieval import Retriever, open_index, recall_at

    meta, store, embedder = open_index(args.index)
    questions = [q for q in _questions(args.questions) if q.get("id")]  # out-of-scope rows have no entry
    rows = {}
    for name, kwargs in (("dense", {"use_lexical": False}), ("lexical", {"use_dense": False}), ("fused", {})):
        rows[name] = recall_at(Retriever(store, embedder, meta.calibration, **kwargs), questions)
    print(json.dumps({name: {f"recall@{k}": v for k, v in r.items()} for name, r in rows.items()}))
    store.close()
    return 0
