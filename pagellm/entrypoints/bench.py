"""`pagellm bench latency|throughput|serve`: the W1-W3 workloads of DESIGN.md, in-process, with the engine flags.

Each writes `<out-dir>/<mode>.json` and a PNG plot next to it. These measure pagellm alone; the
side-by-side baselines (HF transformers in the same run) are in benchmarks/.
NOTE: the CLI imports this module for its parser on every command, so heavy imports live in the functions.
"""

from __future__ import annotations

import argparse
import json
import random
import statistics
import threading
import time
from pathlib import Path
from typing import Any

PROMPT_LEN, GEN_LEN = 256, 128


def add_bench_parser(sub, add_engine_args) -> None:
    p = sub.add_parser("bench", help="benchmark W1 latency, W2 throughput or W3 serving; JSON + PNG plot",
                       formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    p.add_argument("mode", choices=["latency", "throughput", "serve"])
    p.add_argument("--input-len", type=int, default=PROMPT_LEN, help="prompt tokens per request")
    p.add_argument("--output-len", type=int, default=GEN_LEN, help="generated tokens per request (EOS ignored)")
    p.add_argument("--num-prompts", type=int, default=64, help="requests per point (throughput, serve)")
    p.add_argument("--batch-sizes", default="1,8,32,64", help="throughput: batch sizes to sweep")
    p.add_argument("--concurrency", default="1,4,16", help="serve: client concurrency levels to sweep")
    p.add_argument("--repeats", type=int, default=3, help="latency: measured runs (after one warm-up)")
    p.add_argument("--out-dir", default="bench-results", help="where the JSON and PNG go")
    add_engine_args(p)
    p.set_defaults(func=cmd_bench)


def _prompts(num: int, length: int, seed: int = 0) -> list[list[int]]:
    rng = random.Random(seed)  # ordinary token ids: no special tokens
    return [[rng.randrange(100, 20000) for _ in range(length)] for _ in range(num)]


def _percentiles(values: list[float]) -> dict[str, float]:
    if len(values) < 2:
        return {"p50": values[0], "p90": values[0], "p99": values[0]} if values else {}
    q = statistics.quantiles(values, n=100, method="inclusive")
    return {"p50": statistics.median(values), "p90": q[89], "p99": q[98]}


def bench_latency(args: argparse.Namespace, engine_kw: dict[str, Any]) -> dict[str, Any]:
    """W1: one request at a time; TTFT, inter-token latency percentiles, decode tokens/s."""
    from tqdm.auto import tqdm

    from pagellm import LLM, SamplingParams

    llm = LLM(**{**engine_kw, "max_num_seqs": 1})
    engine = llm.llm_engine
    prompts = _prompts(args.repeats + 1, args.input_len)
    llm.generate([prompts[-1]], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)
    runs = []
    for i in tqdm(range(args.repeats), desc="latency runs"):
        engine.add_request(f"bench-{i}", prompts[i], SamplingParams(temperature=0, max_tokens=args.output_len,
                                                                     ignore_eos=True))
        start, stamps, counts = time.perf_counter(), [], []
        while engine.has_unfinished_requests():
            outs = engine.step()
            if outs:  # NOTE: with speculative decoding one step may emit several tokens
                stamps.append(time.perf_counter())
                counts.append(len(outs[0].outputs[0].token_ids))
        itl = [b - a for a, b in zip(stamps, stamps[1:])]
        runs.append({"ttft_s": stamps[0] - start, "e2e_s": stamps[-1] - start,
                     "decode_tok_s": (counts[-1] - counts[0]) / (stamps[-1] - stamps[0]), "itl_s": _percentiles(itl)})
    best = min(runs, key=lambda r: r["e2e_s"])
    result = {"runs": runs, "ttft_s": best["ttft_s"], "decode_tok_s": best["decode_tok_s"], "e2e_s": best["e2e_s"],
              "itl_s": best["itl_s"]}
    spec = engine.spec_decode_stats()
    if spec is not None:
        result["spec_decode"] = {"acceptance_rate": spec.acceptance_rate, "mean_accepted_length":
                                 spec.mean_accepted_length, "num_draft_tokens": spec.num_draft_tokens,
                                 "accepted_per_position": spec.accepted_per_position}
    return result


def bench_throughput(args: argparse.Namespace, engine_kw: dict[str, Any]) -> dict[str, Any]:
    """W2: offline batches; output tokens/s per batch size."""
    from tqdm.auto import tqdm

    from pagellm import LLM, SamplingParams

    sizes = [int(x) for x in args.batch_sizes.split(",")]
    llm = LLM(**{**engine_kw, "max_num_seqs": max(sizes)})
    params = SamplingParams(temperature=0, max_tokens=args.output_len, ignore_eos=True)
    llm.generate(_prompts(2, args.input_len, seed=1), SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)
    points = []
    for size in tqdm(sizes, desc="batch sizes"):
        prompts = _prompts(size, args.input_len, seed=size)
        start = time.perf_counter()
        llm.generate(prompts, params, use_tqdm=False)
        elapsed = time.perf_counter() - start
        points.append({"batch_size": size, "elapsed_s": elapsed, "output_tok_s": size * args.output_len / elapsed,
                       "total_tok_s": size * (args.input_len + args.output_len) / elapsed})
    return {"points": points}


async def _serve_point(url: str, model: str, prompts: list[list[int]], concurrency: int, output_len: int) -> dict:
    import asyncio

    import httpx

    window = asyncio.Semaphore(concurrency)
    ttfts: list[float] = []

    async def one(client: httpx.AsyncClient, prompt: list[int]) -> None:
        async with window:
            body = {"model": model, "prompt": prompt, "max_tokens": output_len, "temperature": 0,
                    "ignore_eos": True, "stream": True}
            start = time.perf_counter()
            first = None
            async with client.stream("POST", f"{url}/v1/completions", json=body) as response:
                response.raise_for_status()
                async for line in response.aiter_lines():
                    if first is None and line.startswith("data: ") and line != "data: [DONE]":
                        first = time.perf_counter() - start
            ttfts.append(first)

    start = time.perf_counter()
    async with httpx.AsyncClient(timeout=600) as client:
        await asyncio.gather(*(one(client, p) for p in prompts))
    elapsed = time.perf_counter() - start
    return {"concurrency": concurrency, "elapsed_s": elapsed, "output_tok_s": len(prompts) * output_len / elapsed,
            "ttft_s": _percentiles(ttfts)}


def bench_serve(args: argparse.Namespace, engine_kw: dict[str, Any]) -> dict[str, Any]:
    """W3: the OpenAI server in this process, streaming clients at each concurrency level."""
    import asyncio
    import socket

    from tqdm.auto import tqdm

    from pagellm.entrypoints.openai.api_server import GracefulServer, build_app, build_async_llm, server_config
    from pagellm.entrypoints.openai.serving_engine import ServerState

    engine = build_async_llm(**engine_kw)
    state = ServerState()
    app = build_app(engine, state=state)
    sock = socket.socket()
    sock.bind(("127.0.0.1", 0))
    server = GracefulServer(server_config(app, log_level="warning"), state)
    thread = threading.Thread(target=server.run, kwargs={"sockets": [sock]}, daemon=True)
    thread.start()
    while not server.started:
        time.sleep(0.05)
    url = f"http://127.0.0.1:{sock.getsockname()[1]}"
    try:
        points = [asyncio.run(_serve_point(url, engine.model_name, _prompts(args.num_prompts, args.input_len, c),
                                           c, args.output_len))
                  for c in tqdm([int(x) for x in args.concurrency.split(",")], desc="concurrency levels")]
    finally:
        server.should_exit = True
        thread.join(timeout=60)
    return {"points": points}


def _plot(mode: str, result: dict[str, Any], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, ax = plt.subplots(figsize=(6, 4))
    if mode == "latency":
        itl = result["itl_s"]
        ax.bar(list(itl), [v * 1000 for v in itl.values()])
        ax.set_ylabel("inter-token latency (ms)")
        ax.set_title(f"W1 latency: TTFT {result['ttft_s'] * 1000:.0f} ms, {result['decode_tok_s']:.1f} tok/s")
    else:
        key = "batch_size" if mode == "throughput" else "concurrency"
        xs = [p[key] for p in result["points"]]
        ax.plot(xs, [p["output_tok_s"] for p in result["points"]], marker="o")
        ax.set_xlabel(key.replace("_", " "))
        ax.set_ylabel("output tokens/s")
        ax.set_title(f"{'W2 offline throughput' if mode == 'throughput' else 'W3 serving throughput'}")
        ax.set_xscale("log", base=2)
    ax.grid(alpha=0.3)
    fig.tight_layout()
    fig.savefig(path, dpi=100)
    plt.close(fig)


def cmd_bench(args: argparse.Namespace) -> int:
    from pagellm.entrypoints.cli import engine_kwargs

    engine_kw = engine_kwargs(args)
    run = {"latency": bench_latency, "throughput": bench_throughput, "serve": bench_serve}[args.mode]
    result = {"mode": args.mode, "input_len": args.input_len, "output_len": args.output_len,
              "engine": {k: v for k, v in engine_kw.items() if v is not None}, **run(args, engine_kw)}
    out = Path(args.out_dir)
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{args.mode}.json").write_text(json.dumps(result, indent=2) + "\n")
    _plot(args.mode, result, out / f"{args.mode}.png")
    print(json.dumps({k: v for k, v in result.items() if k != "runs"}, indent=2))
    print(f"wrote {out / (args.mode + '.json')} and {out / (args.mode + '.png')}")
    return 0
