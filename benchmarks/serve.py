"""W3 serving: the OpenAI server under 64 streamed requests (256 prompt / 128 output tokens, EOS ignored)
at concurrency 16; TTFT p50/p99, inter-token latency p50/p99, output tokens/s.

The baseline, measured in the same run: offline LLM.generate of the same 64 prompts at the same batch
size (max_num_seqs = concurrency), W2-style. The server must reach >= 85% of its output tokens/s.
Each engine runs in its own process: the offline child, then `pagellm serve` driven by this process.

    .venv/bin/python benchmarks/serve.py                       # full W3, writes benchmarks/results/serve.json
    .venv/bin/python benchmarks/serve.py --num-requests 16 --gen-len 32   # a quick smoke run
"""

from __future__ import annotations

import asyncio
import json
import os
import resource
import signal
import socket
import statistics
import subprocess
import sys
import time

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import (  # noqa: E402
    load_average,
    make_prompts,
    peak_rss_mib,
    resolved_dtype,
    run_child,
    wait_healthy,
    write_result,
)

TARGET_RATIO = 0.85


def engine_flags(args) -> list[str]:
    """The same engine settings for both sides; prefix caching off (random prompts never share one anyway)."""
    flags = ["--dtype", args.dtype, "--max-num-seqs", str(args.concurrency),
             "--max-num-batched-tokens", str(args.max_num_batched_tokens), "--no-enable-prefix-caching"]
    return flags + ([args.model] if args.model else [])  # serve takes the model as a positional


def measure_offline(args) -> dict:
    """W2-style: LLM.generate of the same prompts with max_num_seqs = the server's concurrency."""
    from pagellm import LLM, SamplingParams

    llm = LLM(args.model, dtype=args.dtype, max_num_seqs=args.concurrency,
              max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=False)
    prompts = make_prompts(args.num_requests, args.prompt_len)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    params = SamplingParams(temperature=0, max_tokens=args.gen_len, ignore_eos=True)
    cpu0, start = _self_cpu_s(), time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed, cpu = time.perf_counter() - start, _self_cpu_s() - cpu0
    num_out = sum(len(o.outputs[0].token_ids) for o in outs)
    assert num_out == args.num_requests * args.gen_len
    return {"elapsed_s": elapsed, "output_tok_s": num_out / elapsed, "cpu_share": cpu / (elapsed * _num_cores()),
            "peak_rss_mib": peak_rss_mib()}


def _self_cpu_s() -> float:
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return usage.ru_utime + usage.ru_stime


def _proc_cpu_s(pid: int) -> float:
    """user + system CPU seconds of another process (Linux /proc)."""
    fields = open(f"/proc/{pid}/stat").read().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def _num_cores() -> int:
    return len(os.sched_getaffinity(0))


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def start_server(args) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "pagellm.entrypoints.cli", "serve", "--port", str(port), *engine_flags(args)]
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(proc, base, 300, lambda p: p.kill())
    return proc, base


async def one_request(client, url: str, body: dict, sem: asyncio.Semaphore) -> dict:
    """Stream one completion; returns its TTFT, inter-chunk gaps, token count and end-to-end time."""
    async with sem:
        start = time.perf_counter()
        first: float | None = None
        last = start
        gaps: list[float] = []
        num_tokens = 0
        async with client.stream("POST", url, json=body) as r:
            r.raise_for_status()
            async for line in r.aiter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    raise RuntimeError(chunk["error"])
                if not chunk["choices"]:
                    num_tokens = chunk["usage"]["completion_tokens"]
                    continue
                now = time.perf_counter()
                if first is None:
                    first = now
                else:
                    gaps.append(now - last)
                last = now
        assert first is not None, "no token arrived"
        return {"ttft": first - start, "gaps": gaps, "num_tokens": num_tokens, "e2e": last - start}


async def run_completions(base: str, args, prompts: list[str], warm_prompts: list[str], warm_concurrency: int,
                          snapshot) -> tuple[list[dict], float, object, object]:
    """Warm the server up with warm_prompts (4 tokens each), then stream every prompt as a completion of
    args.gen_len tokens at args.concurrency; (results, elapsed s, snapshot() before, snapshot() after)."""
    import httpx

    url = f"{base}/v1/completions"
    common = {"max_tokens": args.gen_len, "temperature": 0, "ignore_eos": True, "stream": True,
              "stream_options": {"include_usage": True}}
    limits = httpx.Limits(max_connections=args.concurrency, max_keepalive_connections=args.concurrency)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900), limits=limits) as client:
        warm = asyncio.Semaphore(warm_concurrency)
        await asyncio.gather(*(one_request(client, url, {"prompt": p, **common, "max_tokens": 4}, warm)
                               for p in warm_prompts))
        sem = asyncio.Semaphore(args.concurrency)
        before, start = snapshot(), time.perf_counter()
        results = await asyncio.gather(*(one_request(client, url, {"prompt": p, **common}, sem) for p in prompts))
        elapsed = time.perf_counter() - start
        after = snapshot()
    num_out = sum(r["num_tokens"] for r in results)
    assert num_out == len(prompts) * args.gen_len, num_out
    return results, elapsed, before, after


def latency_summary(results: list[dict], elapsed: float) -> dict:
    """Output tokens/s and TTFT / inter-token latency percentiles of run_completions' results."""
    ttfts = [r["ttft"] for r in results]
    gaps = [g for r in results for g in r["gaps"]]
    return {
        "elapsed_s": elapsed,
        "output_tok_s": sum(r["num_tokens"] for r in results) / elapsed,
        "ttft_p50_s": percentile(ttfts, 50), "ttft_p99_s": percentile(ttfts, 99),
        "itl_p50_s": percentile(gaps, 50), "itl_p99_s": percentile(gaps, 99),
    }


async def drive(base: str, args, server_pid: int) -> dict:
    prompts = make_prompts(args.num_requests, args.prompt_len)
    results, elapsed, (server0, client0), (server1, client1) = await run_completions(
        base, args, prompts, prompts[:2], 2, lambda: (_proc_cpu_s(server_pid), _self_cpu_s()))
    return {
        **latency_summary(results, elapsed),
        "e2e_p50_s": percentile([r["e2e"] for r in results], 50),
        # Shares of the machine's cores: near 1.0 for the engine means nothing else competed for the CPU.
        "cpu_share": (server1 - server0) / (elapsed * _num_cores()),
        "client_cpu_share": (client1 - client0) / (elapsed * _num_cores()),
    }


def percentile(values: list[float], q: float) -> float:
    if len(values) == 1:
        return values[0]
    return statistics.quantiles(values, n=100, method="inclusive")[int(q) - 1] if q < 100 else max(values)


def measure_server(args) -> dict:
    proc, base = start_server(args)
    try:
        result = asyncio.run(drive(base, args, proc.pid))
    finally:
        proc.send_signal(signal.SIGTERM)
        try:
            result_rc = proc.wait(60)
        except subprocess.TimeoutExpired:
            proc.kill()
            result_rc = proc.wait()
    result["server_exit_code"] = result_rc
    return result


def main() -> None:
    import argparse

    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--model", default=None, help="HF folder or .gguf (default: the bundled SmolLM2-135M-Instruct)")
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--out", default=None, help="JSON path (default: benchmarks/results/serve.json)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure_offline(args)))
        return
    result = {"workload": "W3", "num_requests": args.num_requests, "prompt_len": args.prompt_len,
              "gen_len": args.gen_len, "concurrency": args.concurrency, "dtype": args.dtype,
              "resolved_dtype": resolved_dtype(args.dtype),
              "model": args.model or "bundled SmolLM2-135M-Instruct", "load_avg_before": load_average(),
              "cores": _num_cores()}
    child_args = ["--dtype", args.dtype, "--num-requests", str(args.num_requests), "--prompt-len",
                  str(args.prompt_len), "--gen-len", str(args.gen_len), "--concurrency", str(args.concurrency),
                  "--max-num-batched-tokens", str(args.max_num_batched_tokens)]
    if args.model:
        child_args += ["--model", args.model]
    result["offline"] = run_child(__file__, child_args)
    result["server"] = measure_server(args)
    result["ratio_server_vs_offline"] = result["server"]["output_tok_s"] / result["offline"]["output_tok_s"]
    result["meets_target"] = result["ratio_server_vs_offline"] >= TARGET_RATIO
    result["load_avg_after"] = load_average()
    write_result("serve", result, args.out)


if __name__ == "__main__":
    main()
