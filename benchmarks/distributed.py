"""Data parallel on Ray: W3 with 1 and 2 replicas of 1 thread each (beside one engine on 1 thread and on
all cores, without Ray), and prefix-affinity routing against random routing on W4-style traffic.

W3: 64 streamed requests, 256 random prompt tokens / 128 generated (EOS ignored), concurrency 16, the
bundled model, prefix caching off. Scaling efficiency = tok/s(2 replicas) / (2 x tok/s(1 replica)).
CPU seconds are summed over the server's whole process tree (the driver, Ray's processes, the replicas);
the driver's own CPU per output token bounds how many tokens/s one driver can route.

W4-style: 4 tenants, each with its own 1024-token system prompt, 4 questions of 64 tokens each, 16 generated,
sent in rounds (one question of every tenant at once, concurrency 4) to 2 replicas. A replica's prefix cache
keeps what fits in the KV memory it has touched (the block pool reuses freed blocks before new ones), here
about its 2 running requests' worth: with affinity each replica serves the same 2 tenants every round and
hits; with random routing a tenant often lands where it was not last served. Hit rate = the replicas'
prefix-cache hit tokens / queried tokens (vllm:prefix_cache_*), beside the router's owner-hit rate and TTFT.

    .venv/bin/python benchmarks/distributed.py                    # writes docs/results/distributed_dp.json
    .venv/bin/python benchmarks/distributed.py --num-requests 16 --gen-len 32 --configs dp1,dp2   # short
"""

from __future__ import annotations

import argparse
import asyncio
import os
import signal
import statistics
import subprocess
import sys
import time
from pathlib import Path

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import load_average, make_prompts, wait_healthy, write_result  # noqa: E402
from serve import _free_port, latency_summary, one_request, run_completions  # noqa: E402

ROOT = Path(__file__).resolve().parents[1]
OUT = ROOT / "docs" / "results" / "distributed_dp.json"

# name -> (extra `pagellm serve` flags, extra environment)
W3_CONFIGS = {
    "engine_1thread": ([], {"OMP_NUM_THREADS": "1"}),
    "engine_all_cores": ([], {}),
    "dp1": (["--data-parallel-size", "1", "--distributed-executor-backend", "ray", "--data-parallel-threads", "1"],
            {}),
    "dp2": (["--data-parallel-size", "2", "--distributed-executor-backend", "ray", "--data-parallel-threads", "1"],
            {}),
}
NUM_PREFIXES, QUESTIONS_PER_PREFIX, SHARED_LEN, QUESTION_LEN, W4_GEN_LEN = 4, 4, 1024, 64, 16


def _tree_cpu_s(root: int) -> tuple[float, float]:
    """(CPU seconds of root alone, of root and every descendant), from /proc."""
    parents: dict[int, int] = {}
    cpu: dict[int, float] = {}
    tick = os.sysconf("SC_CLK_TCK")
    for entry in os.listdir("/proc"):
        if not entry.isdigit():
            continue
        try:
            fields = open(f"/proc/{entry}/stat").read().rsplit(")", 1)[1].split()
        except OSError:
            continue
        pid = int(entry)
        parents[pid] = int(fields[1])
        cpu[pid] = (int(fields[11]) + int(fields[12])) / tick
    tree, frontier = {root}, [root]
    while frontier:
        parent = frontier.pop()
        children = [pid for pid, ppid in parents.items() if ppid == parent and pid not in tree]
        tree.update(children)
        frontier.extend(children)
    return cpu.get(root, 0.0), sum(cpu.get(pid, 0.0) for pid in tree)


def start_server(flags: list[str], env: dict[str, str]) -> tuple[subprocess.Popen, str]:
    port = _free_port()
    cmd = [sys.executable, "-m", "pagellm.entrypoints.cli", "serve", "--port", str(port), *flags]
    environ = {k: v for k, v in os.environ.items() if k != "RAY_ADDRESS"}  # a local Ray on 127.0.0.1
    proc = subprocess.Popen(cmd, stdout=subprocess.DEVNULL, stderr=subprocess.PIPE, text=True,
                            env={**environ, **env}, start_new_session=True)
    base = f"http://127.0.0.1:{port}"
    wait_healthy(proc, base, 600, stop_server)
    return proc, base


def stop_server(proc: subprocess.Popen) -> int:
    proc.send_signal(signal.SIGTERM)
    try:
        return proc.wait(90)
    except subprocess.TimeoutExpired:
        os.killpg(proc.pid, signal.SIGKILL)  # its own session: Ray's processes go with it
        return proc.wait()


def metric_sums(base: str) -> dict[str, float]:
    import httpx

    sums: dict[str, float] = {}
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line and not line.startswith("#"):
            series, value = line.rsplit(" ", 1)
            key = series.split("{", 1)[0]
            if key == "pagellm:dp_routing_decisions_total":
                key += "." + series.split('decision="', 1)[1].split('"', 1)[0]
            sums[key] = sums.get(key, 0.0) + float(value)
    return sums


def per_replica(base: str, name: str) -> list[float]:
    import httpx

    values = {}
    for line in httpx.get(f"{base}/metrics", timeout=10).text.splitlines():
        if line.startswith(name + "{"):
            series, value = line.rsplit(" ", 1)
            values[int(series.split('replica="', 1)[1].split('"', 1)[0])] = float(value)
    return [values[i] for i in sorted(values)]


async def drive_w3(base: str, args, server_pid: int) -> dict:
    results, elapsed, (driver0, tree0), (driver1, tree1) = await run_completions(
        base, args, make_prompts(args.num_requests, args.prompt_len), make_prompts(4, args.prompt_len, seed=99),
        4, lambda: _tree_cpu_s(server_pid))  # 4 warm-up requests: every replica warms up
    num_out = sum(r["num_tokens"] for r in results)
    return {
        **latency_summary(results, elapsed),
        "cpu_cores_used": (tree1 - tree0) / elapsed,  # all of the server's processes
        "driver_cpu_ms_per_output_token": 1000 * (driver1 - driver0) / num_out,
    }


def measure_w3(name: str, args) -> dict:
    flags, env = W3_CONFIGS[name]
    flags = [*flags, "--dtype", args.dtype, "--max-num-seqs", str(args.concurrency), "--no-enable-prefix-caching"]
    proc, base = start_server(flags, env)
    try:
        result = asyncio.run(drive_w3(base, args, proc.pid))
        if name.startswith("dp"):
            result["routed_per_replica"] = per_replica(base, "pagellm:dp_requests_routed_total")
    finally:
        result_rc = stop_server(proc)
    return {**result, "server_exit_code": result_rc, "load_avg_after": load_average()}


async def drive_w4(base: str) -> dict:
    import httpx

    shared = make_prompts(NUM_PREFIXES, SHARED_LEN, seed=11)
    questions = make_prompts(NUM_PREFIXES * QUESTIONS_PER_PREFIX, QUESTION_LEN, seed=12)
    # cyclic over the tenants: tenant t's k-th question comes after every tenant's (k-1)-th
    order = [(t, k) for k in range(QUESTIONS_PER_PREFIX) for t in range(NUM_PREFIXES)]
    url = f"{base}/v1/completions"
    common = {"max_tokens": W4_GEN_LEN, "temperature": 0, "ignore_eos": True, "stream": True,
              "stream_options": {"include_usage": True}}
    before = metric_sums(base)
    sem = asyncio.Semaphore(NUM_PREFIXES)
    async with httpx.AsyncClient(timeout=httpx.Timeout(900)) as client:
        start = time.perf_counter()
        results = []
        for i in range(0, len(order), NUM_PREFIXES):  # one question of every tenant at once, then the next round
            group = order[i:i + NUM_PREFIXES]
            results += await asyncio.gather(*(
                one_request(client, url, {"prompt": shared[t] + questions[t * QUESTIONS_PER_PREFIX + k], **common},
                            sem) for t, k in group))
        elapsed = time.perf_counter() - start
    after = metric_sums(base)
    delta = {k: after.get(k, 0.0) - before.get(k, 0.0) for k in after}
    ttfts = [r["ttft"] for r in results]
    return {
        "prefix_cache_hit_rate": delta["vllm:prefix_cache_hits_total"]
        / max(1.0, delta["vllm:prefix_cache_queries_total"]),
        "router_owner_hit_rate": delta["pagellm:dp_prefix_owner_hits_total"]
        / max(1.0, delta["pagellm:dp_requests_with_full_block_total"]),
        "ttft_mean_s": statistics.mean(ttfts), "ttft_p50_s": statistics.median(ttfts), "elapsed_s": elapsed,
        "decisions": {k.split(".", 1)[1]: v for k, v in delta.items() if k.startswith("pagellm:dp_routing_")},
    }


def measure_w4(routing: str, args) -> dict:
    flags = ["--data-parallel-size", "2", "--distributed-executor-backend", "ray", "--data-parallel-threads", "1",
             "--data-parallel-routing", routing, "--dtype", args.dtype, "--max-model-len", "2048",
             "--max-num-seqs", str(NUM_PREFIXES)]
    proc, base = start_server(flags, {})
    try:
        result = asyncio.run(drive_w4(base))
    finally:
        result_rc = stop_server(proc)
    return {**result, "server_exit_code": result_rc, "load_avg_after": load_average()}


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--dtype", default="auto")
    p.add_argument("--num-requests", type=int, default=64)
    p.add_argument("--prompt-len", type=int, default=256)
    p.add_argument("--gen-len", type=int, default=128)
    p.add_argument("--concurrency", type=int, default=16)
    p.add_argument("--configs", default=",".join(W3_CONFIGS), help="W3 configurations (default: %(default)s)")
    p.add_argument("--routings", default="affinity,random", help="W4-style routings (default: %(default)s)")
    p.add_argument("--out", default=str(OUT))
    args = p.parse_args()
    lscpu = subprocess.run(["lscpu"], capture_output=True, text=True).stdout
    result: dict = {"workload": "W3 + W4-style routing", "num_requests": args.num_requests,
                    "prompt_len": args.prompt_len, "gen_len": args.gen_len, "concurrency": args.concurrency,
                    "dtype": args.dtype, "cores": len(os.sched_getaffinity(0)), "load_avg_before": load_average(),
                    "lscpu_flags": next((line.split(":", 1)[1].strip() for line in lscpu.splitlines()
                                         if line.startswith("Flags:")), ""),
                    "w3": {}, "w4_routing": {}}
    for name in [c for c in args.configs.split(",") if c]:
        print(f"W3 {name} ...", file=sys.stderr)
        result["w3"][name] = measure_w3(name, args)
    w3 = result["w3"]
    if "dp1" in w3 and "dp2" in w3:
        result["dp2_scaling_efficiency"] = w3["dp2"]["output_tok_s"] / (2 * w3["dp1"]["output_tok_s"])
    if "dp2" in w3 and "engine_all_cores" in w3:
        result["dp2_over_engine_all_cores"] = w3["dp2"]["output_tok_s"] / w3["engine_all_cores"]["output_tok_s"]
    if "dp1" in w3 and "engine_1thread" in w3:
        result["dp1_over_engine_1thread"] = w3["dp1"]["output_tok_s"] / w3["engine_1thread"]["output_tok_s"]
    result["w4_routing"]["setup"] = {"prefixes": NUM_PREFIXES, "questions_per_prefix": QUESTIONS_PER_PREFIX,
                                     "shared_len": SHARED_LEN, "question_len": QUESTION_LEN,
                                     "gen_len": W4_GEN_LEN, "concurrency": NUM_PREFIXES}
    for routing in [r for r in args.routings.split(",") if r]:
        print(f"W4-style routing {routing} ...", file=sys.stderr)
        result["w4_routing"][routing] = measure_w4(routing, args)
    result["load_avg_after"] = load_average()
    write_result("distributed_dp", result, args.out)


if __name__ == "__main__":
    main()
