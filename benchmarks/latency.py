"""W1 latency: batch 1, 256 prompt tokens, 128 generated (EOS ignored): TTFT and decode tokens/s.

Measures pagellm and HF transformers `generate` on the same weights, each in its own process,
in the same run, and prints the ratios.
"""

from __future__ import annotations

import json
import sys
import time

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import (  # noqa: E402
    base_parser,
    hf_model,
    load_average,
    make_prompts,
    pagellm_kwargs,
    ratios_vs_hf,
    resolved_dtype,
    run_child,
    write_result,
)

PROMPT_LEN, GEN_LEN, REPEATS = 256, 128, 3


def measure_pagellm(dtype: str, engine: str) -> dict:
    from pagellm import LLM, SamplingParams

    t0 = time.perf_counter()
    llm = LLM(dtype=dtype, max_num_seqs=1, **pagellm_kwargs(engine))
    load_s = time.perf_counter() - t0
    prompts = make_prompts(REPEATS + 1, PROMPT_LEN)
    llm.generate([prompts[-1]], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)  # warm-up
    engine = llm.llm_engine
    ttfts, decode_rates, e2es = [], [], []
    for i in range(REPEATS):
        params = SamplingParams(temperature=0, max_tokens=GEN_LEN, ignore_eos=True)
        start = time.perf_counter()
        engine.add_request(f"w1-{i}", prompts[i], params)
        first = None
        while engine.has_unfinished_requests():
            for out in engine.step():
                if first is None and out.outputs[0].token_ids:
                    first = time.perf_counter()
        end = time.perf_counter()
        ttfts.append(first - start)
        decode_rates.append((GEN_LEN - 1) / (end - first))
        e2es.append(end - start)
    return {"load_s": load_s, "ttft_s": min(ttfts), "decode_tok_s": max(decode_rates), "e2e_s": min(e2es)}


def measure_hf(dtype: str, engine: str = "hf") -> dict:
    import torch

    t0 = time.perf_counter()
    model = hf_model(dtype)
    load_s = time.perf_counter() - t0
    prompts = make_prompts(REPEATS + 1, PROMPT_LEN)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        model.generate(torch.tensor([prompts[-1]]), max_new_tokens=8, min_new_tokens=8, **kw)
        ttfts, decode_rates, e2es = [], [], []
        for i in range(REPEATS):
            ids = torch.tensor([prompts[i]])
            start = time.perf_counter()
            model.generate(ids, max_new_tokens=1, min_new_tokens=1, **kw)
            ttft = time.perf_counter() - start
            start = time.perf_counter()
            out = model.generate(ids, max_new_tokens=GEN_LEN, min_new_tokens=GEN_LEN, **kw)
            e2e = time.perf_counter() - start
            assert out.shape[1] == PROMPT_LEN + GEN_LEN
            ttfts.append(ttft)
            decode_rates.append((GEN_LEN - 1) / max(e2e - ttft, 1e-9))
            e2es.append(e2e)
    return {"load_s": load_s, "ttft_s": min(ttfts), "decode_tok_s": max(decode_rates), "e2e_s": min(e2es)}


def main() -> None:
    args = base_parser(__doc__).parse_args()
    if args.child:
        fn = measure_hf if args.engine == "hf" else measure_pagellm
        print(json.dumps(fn(args.dtype, args.engine)))
        return
    dtype = resolved_dtype(args.dtype)
    result = {"workload": "W1", "prompt_len": PROMPT_LEN, "gen_len": GEN_LEN, "dtype": dtype,
              "load_avg_before": load_average()}
    engines = args.engines.split(",")
    for engine in engines:
        result[engine] = run_child(__file__, ["--engine", engine, "--dtype", dtype])
    # decode: pagellm / HF (higher is better); ttft, e2e: HF / pagellm (times: higher is better too)
    ratios_vs_hf(result, engines, {"decode_tok_s": False, "ttft_s": True, "e2e_s": True})
    result["load_avg_after"] = load_average()
    write_result("latency", result, args.out)


if __name__ == "__main__":
    main()
