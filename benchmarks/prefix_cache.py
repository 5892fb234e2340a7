"""W4 prefix cache: 32 requests share a 1024-token system prompt, each with its own 64-token
question, and generate 32 tokens. Mean/p50 TTFT with automatic prefix caching on and off,
each in its own process, in the same run.
"""

from __future__ import annotations

import json
import statistics
import sys
import time

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import base_parser, load_average, make_prompts, resolved_dtype, run_child, write_result  # noqa: E402

NUM_REQUESTS, SHARED_LEN, QUESTION_LEN, GEN_LEN = 32, 1024, 64, 32


def measure(dtype: str, caching: bool, max_num_seqs: int) -> dict:
    from pagellm import LLM, SamplingParams

    llm = LLM(dtype=dtype, max_num_seqs=max_num_seqs, enable_prefix_caching=caching, max_model_len=2048)
    shared = make_prompts(1, SHARED_LEN, seed=1)[0]
    questions = make_prompts(NUM_REQUESTS, QUESTION_LEN, seed=2)
    llm.generate([make_prompts(1, 64, seed=3)[0]], SamplingParams(max_tokens=2), use_tqdm=False)  # warm-up
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=GEN_LEN, ignore_eos=True)
    # NOTE: requests arrive one after another as in a chat service: each new request can hit
    # the shared prefix that earlier requests have computed.
    ttfts, cached = [], []
    start_all = time.perf_counter()
    for i, q in enumerate(questions):
        start = time.perf_counter()
        engine.add_request(f"w4-{i}", shared + q, params)
        first = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                if first is None and out.outputs[0].token_ids:
                    first = time.perf_counter()
                    cached.append(out.num_cached_tokens)
        ttfts.append(first - start)
    total = time.perf_counter() - start_all
    return {"ttft_mean_s": statistics.mean(ttfts), "ttft_p50_s": statistics.median(ttfts),
            "ttft_first_s": ttfts[0], "total_s": total, "mean_cached_tokens": statistics.mean(cached)}


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--max-num-seqs", type=int, default=32)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.dtype, args.engine == "on", args.max_num_seqs)))
        return
    dtype = resolved_dtype(args.dtype)
    result = {"workload": "W4", "num_requests": NUM_REQUESTS, "shared_len": SHARED_LEN,
              "question_len": QUESTION_LEN, "gen_len": GEN_LEN, "dtype": dtype, "load_avg_before": load_average()}
    for mode in ("on", "off"):
        result[f"cache_{mode}"] = run_child(__file__, ["--engine", mode, "--dtype", dtype,
                                                       "--max-num-seqs", str(args.max_num_seqs)])
    result["ttft_ratio_off_over_on"] = result["cache_off"]["ttft_mean_s"] / result["cache_on"]["ttft_mean_s"]
    result["load_avg_after"] = load_average()
    write_result("prefix_cache", result, args.out)


if __name__ == "__main__":
    main()
