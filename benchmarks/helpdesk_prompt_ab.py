"""A/B of the help desk's generation prompt under the same machine load: the short prompt (pagellm/apps/helpdesk/
service.py: the best passage, the next ones only within a score margin, each cut to its first sentences) against
the earlier one (always 3 passages, 90 words each), interleaved question by question so both see the same load.

Each generated-mode question of tests/data/faq/eval_questions.jsonl is asked once with each prompt (alternating
which goes first), 1 token each: the time to the first token (retrieval included), and the prompt's token count
and cached tokens as the engine reports them. Usage: PYTHONPATH=. python benchmarks/helpdesk_prompt_ab.py
"""

from __future__ import annotations

import argparse
import asyncio
import json
import sys
import time
from pathlib import Path

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import load_average, write_result  # noqa: E402
from helpdesk import FAQ, pct, timed_answer  # noqa: E402


def earlier_messages(question: str, retrieval, num_passages: int = 3) -> list[dict[str, str]]:
    """The prompt before the short one (commit f687b00): 3 passages of 90 words, a "Passages:" header."""
    from pagellm.apps.helpdesk.service import SYSTEM_PROMPT

    passages = []
    for i, hit in enumerate(retrieval.hits[:num_passages], 1):
        words = hit.entry.answer.split()
        text = " ".join(words[:90]) + (" ..." if len(words) > 90 else "")
        passages.append(f"[{i}] {hit.entry.question}\n{text}")
    user = "Passages:\n" + "\n\n".join(passages) + f"\n\nQuestion: {question}"
    return [{"role": "system", "content": SYSTEM_PROMPT}, {"role": "user", "content": user}]


async def run(service, questions: list[str]) -> dict:
    from pagellm.apps.helpdesk import service as service_module

    short = service_module.build_messages
    prompts = {"short": short, "earlier": earlier_messages}
    service.generator.llm.start()
    rows: dict[str, list] = {"short": [], "earlier": []}
    await timed_answer(service, questions[0])  # warm-up: the system prompt enters the cache
    generated = [q for q in questions[1:] if service.plan(q, [])[2] == "generated"]
    for i, q in enumerate(generated):
        for name in (("short", "earlier") if i % 2 else ("earlier", "short")):
            service_module.build_messages = prompts[name]
            rows[name].append(await timed_answer(service, q))
    service_module.build_messages = short
    await service.generator.llm.shutdown()
    out = {}
    for name, got in rows.items():
        new = [t.num_prompt_tokens - t.num_cached_tokens for _, _, t in got]
        out[name] = {"n": len(got), "ttft_p50_s": pct([r[0] for r in got], 0.5),
                     "ttft_p99_s": pct([r[0] for r in got], 0.99),
                     "prompt_tokens_p50": pct([t.num_prompt_tokens for _, _, t in got], 0.5),
                     "cached_tokens_p50": pct([t.num_cached_tokens for _, _, t in got], 0.5),
                     "new_tokens_p50": pct(new, 0.5)}
    return out


def main() -> None:
    from pagellm.apps.helpdesk.cli import build_service, index_kb

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--index", default="/tmp/helpdesk-index", help="index folder (built when missing)")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    if not (Path(args.index) / "meta.json").exists():
        index_kb(FAQ / "python_faq.jsonl", args.index)
    questions = [json.loads(line)["question"] for line in (FAQ / "eval_questions.jsonl").read_text().splitlines()]
    result: dict = {"load_average_start": load_average()}
    service = build_service(args.index, max_tokens=1)
    t0 = time.perf_counter()
    result.update(asyncio.run(run(service, questions)))
    result["seconds"] = round(time.perf_counter() - t0, 1)
    result["load_average_end"] = load_average()
    write_result("helpdesk_prompt_ab", result, args.out)


if __name__ == "__main__":
    main()
