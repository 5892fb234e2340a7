"""Layer pruning: perplexity and batch-1 decode speed of the pruned model against the full one, same run.

The text is the committed sentiment sample (tests/data/sentiment, VADER ground truth, MIT licence), joined.
Usage: python benchmarks/prune.py [--drop-layers 22-27] [--dtype auto]
"""

from __future__ import annotations

import json
import sys
import tempfile
import time

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import (  # noqa: E402
    base_parser,
    fixed_text,
    load_average,
    make_prompts,
    resolved_dtype,
    run_child,
    write_result,
)

PROMPT_LEN, GEN_LEN = 256, 128


def measure(model: str | None, dtype: str) -> dict:
    from pagellm import LLM, SamplingParams
    from pagellm.engine.perplexity import perplexity

    llm = LLM(model, dtype=dtype, max_num_seqs=16)
    ppl = perplexity(llm, fixed_text(), window=512)
    prompt = make_prompts(1, PROMPT_LEN)[0]
    params = SamplingParams(temperature=0, max_tokens=GEN_LEN, ignore_eos=True)
    llm.generate([prompt], SamplingParams(max_tokens=8, ignore_eos=True), use_tqdm=False)  # warm-up
    best = float("inf")
    for _ in range(3):
        start = time.perf_counter()
        llm.generate([prompt], params, use_tqdm=False)
        best = min(best, time.perf_counter() - start)
    num_layers = llm.llm_engine.worker.model.config.num_hidden_layers
    return {"perplexity": ppl.perplexity, "num_tokens": ppl.num_tokens, "e2e_s": best,
            "tok_s": GEN_LEN / best, "num_layers": num_layers}


def main() -> None:
    p = base_parser(__doc__)
    p.add_argument("--drop-layers", default="22-27")
    p.add_argument("--model-path", default=None, help=__import__("argparse").SUPPRESS)
    args = p.parse_args()
    if args.child:
        print(json.dumps(measure(args.model_path, args.dtype)))
        return
    from pagellm.model.prune import prune_layers

    dtype = resolved_dtype(args.dtype)
    result = {"workload": "prune", "drop_layers": args.drop_layers, "dtype": dtype, "load_avg_before": load_average()}
    with tempfile.TemporaryDirectory() as tmp:
        pruned = prune_layers(None, args.drop_layers, f"{tmp}/pruned", "bfloat16")
        result["full"] = run_child(__file__, ["--dtype", dtype])
        result["pruned"] = run_child(__file__, ["--dtype", dtype, "--model-path", str(pruned.out_dir)])
    result["perplexity_ratio"] = result["pruned"]["perplexity"] / result["full"]["perplexity"]
    result["speedup"] = result["pruned"]["tok_s"] / result["full"]["tok_s"]
    result["load_avg_after"] = load_average()
    write_result("prune", result, args.out)


if __name__ == "__main__":
    main()
