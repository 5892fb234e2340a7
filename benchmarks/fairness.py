"""Fairness: streams' inter-token latency while a long prompt is prefilled, per prefill bound.

4 streams decode on the bundled model; after a few steps an 8,191-token prompt (max_tokens 1) arrives.
For each setting "cap:ratio" (max_prefill_tokens_while_decoding, 0 = no bound; decode_stall_ratio, 0 = off)
this reports the streams' inter-token latency (p50/p99/max) over the long prompt's prefill, the same
streams' latency with no long prompt (measured in the same run), and the long prompt's time to first
token (TTFT).

    python benchmarks/fairness.py --settings 0:0,256:0,256:2 --out docs/results/fairness.json
"""

from __future__ import annotations

import argparse
import statistics
import time

from common import load_average, make_prompts, write_result

from pagellm import LLM, SamplingParams


def _percentile(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


def run_scenario(llm: LLM, cap: int, ratio: float, long_len: int, num_streams: int, seed: int,
                 baseline_steps: int = 60) -> dict:
    """Streams decode; a long prompt arrives (unless long_len == 0); returns gaps and the long prompt's TTFT."""
    engine = llm.llm_engine
    engine.core.scheduler.config.max_prefill_tokens_while_decoding = cap
    engine.core.scheduler.config.decode_stall_ratio = ratio
    params = SamplingParams(max_tokens=100_000, ignore_eos=True, temperature=0.0)
    ids = [f"s{seed}-{i}" for i in range(num_streams)]
    for rid, prompt in zip(ids, make_prompts(num_streams, 32, seed=seed)):
        engine.add_request(rid, {"prompt_token_ids": prompt}, params)
    last: dict[str, float] = {}
    gaps: list[float] = []
    step_times: list[float] = []
    max_prefill_while_decoding = 0  # the long prompt's largest chunk

    def step() -> list:
        t0 = time.perf_counter()
        outs = engine.step()
        step_times.append(time.perf_counter() - t0)
        now = time.perf_counter()
        for out in outs:
            if out.request_id in ids:
                if out.request_id in last:
                    gaps.append(now - last[out.request_id])
                last[out.request_id] = now
        return outs

    while len(last) < num_streams:  # every stream has its first token
        step()
    for _ in range(4):
        step()
    gaps.clear()
    step_times.clear()
    ttft = None
    num_steps = 0
    if long_len:
        long_id = f"long{seed}"
        long_prompt = make_prompts(1, long_len, seed=1000 + seed)[0]
        t_add = time.perf_counter()
        engine.add_request(long_id, {"prompt_token_ids": long_prompt}, SamplingParams(max_tokens=1))
        while ttft is None:
            req = engine.core.scheduler.get_request(long_id)
            before = req.num_computed_tokens if req is not None else 0
            outs = step()
            num_steps += 1
            req = engine.core.scheduler.get_request(long_id)
            after = req.num_computed_tokens if req is not None else long_len
            max_prefill_while_decoding = max(max_prefill_while_decoding, after - before)
            if any(o.request_id == long_id for o in outs):
                ttft = time.perf_counter() - t_add
    else:
        for _ in range(baseline_steps):
            step()
            num_steps += 1
    engine.abort_request(ids)
    return {
        "cap": cap, "decode_stall_ratio": ratio, "long_prompt_tokens": long_len, "num_steps": num_steps,
        "itl_p50_s": round(statistics.median(gaps), 4), "itl_p99_s": round(_percentile(gaps, 0.99), 4),
        "itl_max_s": round(max(gaps), 4), "step_mean_s": round(statistics.mean(step_times), 4),
        "long_ttft_s": None if ttft is None else round(ttft, 2),
        "max_long_prompt_tokens_per_step": max_prefill_while_decoding,
    }


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--settings", default="0:0,256:0,256:2",
                   help="comma list of max_prefill_tokens_while_decoding:decode_stall_ratio")
    p.add_argument("--long-len", type=int, default=8191)
    p.add_argument("--num-streams", type=int, default=4)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    p.add_argument("--baseline-steps", type=int, default=60, help="decode steps of the streams alone, per cap")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    llm = LLM(max_num_seqs=8, max_num_batched_tokens=args.max_num_batched_tokens, enable_prefix_caching=False)
    run_scenario(llm, 0, 0, 0, args.num_streams, seed=99, baseline_steps=5)  # warm-up
    result: dict = {"model": "SmolLM2-135M-Instruct (bundled)", "max_num_batched_tokens": args.max_num_batched_tokens,
                    "num_streams": args.num_streams, "load_avg_before": load_average(), "runs": []}
    for seed, setting in enumerate(args.settings.split(",")):
        cap, ratio = int(setting.split(":")[0]), float(setting.split(":")[1])
        base = run_scenario(llm, cap, ratio, 0, args.num_streams, seed=2 * seed, baseline_steps=args.baseline_steps)
        long = run_scenario(llm, cap, ratio, args.long_len, args.num_streams, seed=2 * seed + 1)
        long["baseline_itl_p99_s"] = base["itl_p99_s"]
        long["baseline_itl_p50_s"] = base["itl_p50_s"]
        long["itl_p99_ratio"] = round(long["itl_p99_s"] / base["itl_p99_s"], 2)
        result["runs"].append(long)
        result["load_avg_after"] = load_average()
        write_result("fairness", result, args.out)  # after every cap: a long run keeps what it measured


if __name__ == "__main__":
    main()
