"""Speculative decoding (n-gram): decode tok/s with and without it, same run, bundled model, batch 1 and 8.

    python benchmarks/speculative.py [--max-tokens 128] [--repeats 2] [--policies cost,fixed]

Workloads: "extractive" asks the model to repeat a code listing or answer by quoting a FAQ entry given in
the prompt (where proposals from the prompt are right); "open" is free chat (where they rarely are, so the
off-switch must keep the cost small). Greedy, EOS ignored, prefix caching off; the two engines alternate.
Each side reports output tokens/s over the whole generate call; the speculating side also its acceptance
rate and mean tokens per verifying step. One speculating engine per length policy ("cost": the default,
verifying only proposals worth their rows at the step costs it measures; "fixed": every proposal).
"""

from __future__ import annotations

import argparse
import sys
import time

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import load_average, write_result  # noqa: E402

CODE = '''def mean(values):
    total = 0
    for v in values:
        total += v
    return total / len(values)


def variance(values):
    m = mean(values)
    return sum((v - m) ** 2 for v in values) / len(values)
'''
FAQ = ("Q: Why are default values shared between objects?\nA: Default values are created exactly once, when "
       "the function is defined. If that object is changed, like a dictionary in this example, subsequent calls "
       "to the function will refer to this changed object. By definition, immutable objects such as numbers, "
       "strings, tuples, and None, are safe from change.")
EXTRACTIVE = [
    f"Repeat this code exactly, then stop.\n\n{CODE}\nHere is the code again:\n",
    f"Answer the customer by quoting the FAQ entry.\n\n{FAQ}\n\nCustomer: why do default values get shared?\n"
    "Agent: According to our FAQ, ",
    f"Rename the function `mean` to `average` and keep everything else the same.\n\n{CODE}\nResult:\n",
    f"Copy the answer below word for word.\n\n{FAQ}\n\nCopy:\nQ: Why",
]
OPEN = ["Write a short story about a lighthouse keeper.", "What are three good habits for a healthy life?",
        "Describe the ocean to someone who has never seen it.", "Give me ideas for a weekend trip."]
SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 2}


def chat_prompts(llm, texts: list[str]) -> list[str]:
    tokenizer = llm.get_tokenizer()
    return [tokenizer.apply_chat_template([{"role": "user", "content": t}], tokenize=False,
                                          add_generation_prompt=True) for t in texts]


def measure(llm, prompts: list[str], max_tokens: int) -> dict:
    from pagellm import SamplingParams

    params = SamplingParams(temperature=0, max_tokens=max_tokens, ignore_eos=True)
    start = time.perf_counter()
    outs = llm.generate(prompts, params, use_tqdm=False)
    elapsed = time.perf_counter() - start
    num_tokens = sum(len(o.outputs[0].token_ids) for o in outs)
    return {"output_tok_s": num_tokens / elapsed, "elapsed_s": elapsed,
            "token_ids": [o.outputs[0].token_ids for o in outs]}


def main() -> None:
    from pagellm import LLM

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--max-tokens", type=int, default=128)
    p.add_argument("--repeats", type=int, default=2)
    p.add_argument("--policies", default="cost,fixed", help="length policies to run, comma-separated")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    kw = dict(enable_prefix_caching=False, max_num_seqs=8)
    policies = args.policies.split(",")
    engines = {"plain": LLM(**kw)}
    for policy in policies:
        engines[policy] = LLM(speculative_config={**SPEC, "length_policy": policy}, **kw)
    result: dict = {"spec_config": SPEC, "policies": policies, "max_tokens": args.max_tokens,
                    "load_average": [load_average()], "workloads": {}}
    for workload, texts in (("extractive", EXTRACTIVE), ("open", OPEN)):
        prompts = chat_prompts(engines["plain"], texts)
        for batch in (1, 8):
            batch_prompts = (prompts * 2)[:batch]
            best = {name: None for name in engines}
            before = {p: engines[p].llm_engine.spec_decode_stats() for p in policies}
            before = {p: (s.num_draft_tokens, s.num_accepted_tokens, s.num_drafts) for p, s in before.items()}
            for _ in range(args.repeats):
                for name, llm in engines.items():
                    run = measure(llm, batch_prompts, args.max_tokens)
                    if best[name] is None or run["output_tok_s"] > best[name]["output_tok_s"]:
                        best[name] = run
            entry: dict = {"plain_tok_s": best["plain"]["output_tok_s"]}
            for policy in policies:
                after = engines[policy].llm_engine.spec_decode_stats()
                drafts, accepted, steps = (after.num_draft_tokens - before[policy][0],
                                           after.num_accepted_tokens - before[policy][1],
                                           after.num_drafts - before[policy][2])
                entry[policy] = {
                    "tok_s": best[policy]["output_tok_s"],
                    "speedup": best[policy]["output_tok_s"] / best["plain"]["output_tok_s"],
                    "acceptance_rate": accepted / drafts if drafts else 0.0,
                    "mean_tokens_per_verifying_step": 1 + accepted / steps if steps else 0.0,
                    "num_draft_tokens": drafts,
                    "same_tokens": best["plain"]["token_ids"] == best[policy]["token_ids"],
                }
            result["workloads"][f"{workload}_b{batch}"] = entry
            print(workload, batch, entry, file=sys.stderr)
        result["load_average"].append(load_average())
    write_result("speculative", result, args.out)


if __name__ == "__main__":
    main()
