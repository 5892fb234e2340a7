"""The help desk end to end on the committed Python FAQ: index build time, retrieval latency, answer latency
(time to the first streamed text and to the last) of the template and generated paths, and 16 concurrent chat
sessions over HTTP (answers/s, TTFT p50/p99).

Questions: tests/data/faq/eval_questions.jsonl (the template path takes those the desk answers from the FAQ
entry, the generated path those between the thresholds). Generated answers: bundled SmolLM2, greedy,
`--max-tokens` each (EOS may end them earlier); their first asking (`generated_first`: only the system prompt
cached) is reported apart from repeats (`generated_repeat`: the whole prompt cached), with prompt, cached and
newly prefilled token counts. Usage (a few minutes on 2 cores):

    PYTHONPATH=. python benchmarks/helpdesk.py [--max-tokens 64] [--out docs/results/helpdesk_X.json]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import tempfile
import threading
import time
from pathlib import Path

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import load_average, write_result  # noqa: E402

FAQ = Path(__file__).resolve().parents[1] / "tests" / "data" / "faq"


def pct(values: list[float], q: float) -> float:
    values = sorted(values)
    return values[min(len(values) - 1, int(q * len(values)))]


async def timed_answer(service, question: str, session_id: str | None = None) -> tuple[float, float, object]:
    """(time to the first streamed text, to the last, the finished Turn)."""
    t0 = time.perf_counter()
    first = None
    turn = None
    async for event in service.stream(question, session_id, create_session=False):
        if event.kind == "delta" and first is None:
            first = time.perf_counter() - t0
        elif event.kind == "done":
            turn = event.turn
    return first or 0.0, time.perf_counter() - t0, turn


def latency_summary(rows: list[tuple[float, float, object]]) -> dict:
    out = {"n": len(rows), "ttft_p50_s": pct([r[0] for r in rows], 0.5), "ttft_p99_s": pct([r[0] for r in rows], 0.99),
           "total_p50_s": pct([r[1] for r in rows], 0.5), "total_p99_s": pct([r[1] for r in rows], 0.99)}
    prompts = [r[2].num_prompt_tokens for r in rows]
    if any(prompts):  # generated answers: how much of the prompt the prefix cache held, and the prefill rate
        new = [r[2].num_prompt_tokens - r[2].num_cached_tokens for r in rows]
        out.update(prompt_tokens_p50=pct(prompts, 0.5), prompt_tokens_max=max(prompts),
                   cached_tokens_p50=pct([r[2].num_cached_tokens for r in rows], 0.5), new_tokens_p50=pct(new, 0.5),
                   new_tokens_per_ttft_s_p50=pct([n / r[0] for n, r in zip(new, rows) if r[0] > 0], 0.5))
    return out


async def in_process(service, questions: list[str], repeats: int) -> dict:
    """Each question asked `repeats` times in turn. The first pass ("first") is what a new question costs: only
    the system prompt (and a best passage another question already brought) is in the prefix cache. Later passes
    ("repeat") find the whole prompt cached: they show the cache, not prefill, and are reported apart."""
    service.generator.llm.start()
    # warm-up on a dev question that is answered by generation: the system prompt's KV blocks enter the cache
    dev = [json.loads(line)["question"] for line in (FAQ / "dev_questions.jsonl").read_text().splitlines()]
    await timed_answer(service, next(q for q in dev if service.plan(q, [])[2] == "generated"))
    by_mode: dict[str, list] = {}
    for rep in range(repeats):
        for q in questions:
            row = await timed_answer(service, q)
            by_mode.setdefault(row[2].mode, []).append(row)
            by_mode.setdefault(f"{row[2].mode}_{'repeat' if rep else 'first'}", []).append(row)
    await service.generator.llm.shutdown()
    return {mode: latency_summary(rows) for mode, rows in sorted(by_mode.items())}


def concurrent_sessions(service, questions: list[str], num_sessions: int, per_session: int,
                        max_tokens: int) -> dict:
    import httpx
    import uvicorn

    from pagellm.apps.helpdesk.api import build_helpdesk_app

    port = free_port()
    server = uvicorn.Server(uvicorn.Config(build_helpdesk_app(service), host="127.0.0.1", port=port,
                                           log_level="warning"))
    threading.Thread(target=server.run, daemon=True).start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{port}/v1/helpdesk/chat"
    ttfts: list[float] = []
    modes: list[str] = []

    async def session(client: httpx.AsyncClient, s: int) -> None:
        session_id = None
        for i in range(per_session):
            question = questions[(s * per_session + i) % len(questions)]
            t0 = time.perf_counter()
            first = None
            body = {"question": question, "session_id": session_id, "max_tokens": max_tokens}
            async with client.stream("POST", url, json=body) as r:
                async for line in r.aiter_lines():
                    if not line.startswith("data: "):
                        continue
                    event = json.loads(line[6:])
                    if event.get("type") == "plan":
                        session_id = event["session_id"]
                        modes.append(event["mode"])
                    elif event.get("type") == "delta" and first is None:
                        first = time.perf_counter() - t0
            ttfts.append(first or 0.0)

    async def run() -> float:
        async with httpx.AsyncClient(timeout=600) as client:
            t0 = time.perf_counter()
            await asyncio.gather(*(session(client, s) for s in range(num_sessions)))
            return time.perf_counter() - t0

    wall = asyncio.run(run())
    server.should_exit = True
    return {"sessions": num_sessions, "answers": len(ttfts), "answers_per_s": len(ttfts) / wall,
            "ttft_p50_s": pct(ttfts, 0.5), "ttft_p99_s": pct(ttfts, 0.99),
            "modes": {m: modes.count(m) for m in sorted(set(modes))}}


def free_port() -> int:
    import socket

    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return sock.getsockname()[1]


def main() -> None:
    from pagellm.apps.helpdesk.cli import build_service, index_kb
    from pagellm.apps.helpdesk.retrieval import Embedder, Retriever, open_index

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-tokens", type=int, default=64)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--sessions", type=int, default=16)
    p.add_argument("--per-session", type=int, default=4)
    p.add_argument("--out", default=None)
    args = p.parse_args()
    questions = [json.loads(line)["question"] for line in (FAQ / "eval_questions.jsonl").read_text().splitlines()]
    result: dict = {"load_average_start": load_average(), "max_tokens": args.max_tokens}
    t0 = time.perf_counter()
    embedder = Embedder()
    result["encoder_load_s"] = time.perf_counter() - t0
    with tempfile.TemporaryDirectory() as tmp:
        built = index_kb(FAQ / "python_faq.jsonl", tmp, embedder=embedder)
        result["index_build_s"] = built["seconds"]
        result["index_entries"] = built["entries"]
        t0 = time.perf_counter()
        again = index_kb(FAQ / "python_faq.jsonl", tmp, embedder=embedder)
        result["reindex_unchanged_s"] = time.perf_counter() - t0
        assert again["unchanged"] == built["entries"]
        meta, store, _ = open_index(tmp, embedder)
        retriever = Retriever(store, embedder, meta.calibration)
        latencies = []
        for _ in range(4):
            for q in questions:
                t = time.perf_counter()
                retriever.retrieve(q)
                latencies.append(time.perf_counter() - t)
        result["retrieval"] = {"n": len(latencies), "p50_s": pct(latencies, 0.5), "p99_s": pct(latencies, 0.99)}
        store.close()
        service = build_service(tmp, max_tokens=args.max_tokens, embedder=embedder)
        result["answers"] = asyncio.run(in_process(service, questions, args.repeats))
        service = build_service(tmp, max_tokens=args.max_tokens, embedder=embedder)
        result["concurrent"] = concurrent_sessions(service, questions, args.sessions, args.per_session,
                                                   args.max_tokens)
    result["load_average_end"] = load_average()
    write_result("helpdesk", result, args.out)


if __name__ == "__main__":
    main()
