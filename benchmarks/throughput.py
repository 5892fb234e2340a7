"""W2 offline throughput: 64 prompts x 256 tokens, 128 generated each (EOS ignored).

Output tokens/s, total tokens/s and peak RSS for pagellm and HF transformers `generate`
(one batch of 64) on the same weights, each in its own process, in the same run.
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
    peak_rss_mib,
    ratios_vs_hf,
    resolved_dtype,
    run_child,
    write_result,
)

NUM_PROMPTS, PROMPT_LEN, GEN_LEN = 64, 256, 128


def measure_pagellm(engine: str, dtype: str, max_num_seqs: int, max_num_batched_tokens: int) -> dict:
    from pagellm import LLM, SamplingParams

    llm = LLM(dtype=dtype, max_num_seqs=max_num_seqs, max_num_batched_tokens=max_num_batched_tokens,
              enable_prefix_caching=False, **pagellm_kwargs(engine))
    prompts = make_prompts(NUM_PROMPTS, PROMPT_LEN)
    llm.generate(prompts[:2], SamplingParams(max_tokens=4, ignore_eos=True), use_tqdm=False)  # warm-up
    params = SamplingParams(temperature=0, max_tokens=GEN_LEN, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    assert all(len(o.outputs[0].token_ids) == GEN_LEN for o in outs)
    return _rates(elapsed)


def measure_hf(engine: str, dtype: str, *_: int) -> dict:
    import torch

    model = hf_model(dtype)
    prompts = make_prompts(NUM_PROMPTS, PROMPT_LEN)
    kw = dict(do_sample=False, eos_token_id=None, pad_token_id=0)
    with torch.inference_mode():
        model.generate(torch.tensor(prompts[:2]), max_new_tokens=4, min_new_tokens=4, **kw)
        start = time.perf_counter()
        out = model.generate(torch.tensor(prompts), max_new_tokens=GEN_LEN, min_new_tokens=GEN_LEN, **kw)
        elapsed = time.perf_counter() - start
    assert out.shape == (NUM_PROMPTS, PROMPT_LEN + GEN_LEN)
    return _rates(elapsed)


def _rates(elapsed: float) -> dict:
    return {
        "elapsed_s": elapsed,
        "output_tok_s": NUM_PROMPTS * GEN_LEN / elapsed,
        "total_tok_s": NUM_PROMPTS * (PROMPT_LEN + GEN_LEN) / elapsed,
        "peak_rss_mib": peak_rss_mib(),
    }


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--max-num-seqs", type=int, default=64)
    p.add_argument("--max-num-batched-tokens", type=int, default=2048)
    args = p.parse_args()
    if args.child:
        fn = measure_hf if args.engine == "hf" else measure_pagellm
        print(json.dumps(fn(args.engine, args.dtype, args.max_num_seqs, args.max_num_batched_tokens)))
        return
    dtype = resolved_dtype(args.dtype)
    result = {"workload": "W2", "num_prompts": NUM_PROMPTS, "prompt_len": PROMPT_LEN, "gen_len": GEN_LEN,
              "dtype": dtype, "max_num_seqs": args.max_num_seqs,
              "max_num_batched_tokens": args.max_num_batched_tokens, "load_avg_before": load_average()}
    engines = args.engines.split(",")
    for engine in engines:
        result[engine] = run_child(__file__, ["--engine", engine, "--dtype", dtype, "--max-num-seqs",
                                              str(args.max_num_seqs), "--max-num-batched-tokens",
                                              str(args.max_num_batched_tokens)])
    ratios_vs_hf(result, engines, {"output_tok_s": False, "peak_rss_mib": False})
    result["load_avg_after"] = load_average()
    write_result("throughput", result, args.out)


if __name__ == "__main__":
    main()
