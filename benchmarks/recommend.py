"""The recommender (pagellm recommend) on MovieLens-100k: training time of each stage (from the model folder's
train run), scoring latency of one user x 100 candidates (p50, p99) with the bi-encoder + ranker (`fast`) and
with the fine-tuned cross scorer (`full`), users/s at batch, and optionally the full leave-last-out evaluation.

Usage:
  pagellm recommend train --data movielens-100k --out rec/ --seed 0
  python benchmarks/recommend.py --model rec/ [--evaluate --finetuned-users 100 --cold-users 100]
"""

from __future__ import annotations

import argparse
import sys
import time

import numpy as np

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import load_average, write_result  # noqa: E402


def percentiles(samples: list[float]) -> dict[str, float]:
    ms = np.asarray(samples) * 1000.0
    return {"p50_ms": round(float(np.percentile(ms, 50)), 2), "p99_ms": round(float(np.percentile(ms, 99)), 2),
            "n": len(samples)}


def old_pair_text(data, hist: list[int], ratings: list[float], cand: int) -> str:
    """The cross scorer's pair text before this change (5 labels with years, then the candidate with "Genres:"),
    rebuilt here only to measure what it cost."""
    order = list(range(len(hist)))[::-1]
    liked = [i for i in order if ratings[i] >= 4][:5]
    picked = sorted(liked + [i for i in order if i not in liked][:5 - len(liked)], reverse=True)
    profile = "Recently watched: " + "; ".join(data.items[hist[i]].label for i in picked) + "."
    return f"{profile} [SEP] {data.items[cand].text}"


def scorer_breakdown(service, cases, reps: int) -> dict:
    """Where the fine-tuned scorer's time goes, on 100 pairs of one user: tokens per pair, the one batched
    LLM.classify call of the served scorer (its `cross_layers` bottom MiniLM layers), and the old text through all
    6 MiniLM layers (LLM.embed of the bundled MiniLM: the old 6-layer classifier's encoder compute) to compare."""
    from pagellm.apps.recommend.pipeline import cases_to_histories
    from pagellm.apps.recommend.semantic import MAX_PAIR_TOKENS, pair_text, profile_text

    batch = cases_to_histories(service.data, cases)
    new_texts, old_texts = [], []
    for hist, ratings, cands in zip(batch.items, batch.ratings, batch.candidates):
        profile = profile_text([service.data.items[i] for i in hist], ratings)
        new_texts.append([pair_text(profile, service.data.items[c]) for c in cands])
        old_texts.append([old_pair_text(service.data, hist, ratings, c) for c in cands])
    tokenizer = service.cross.llm.get_tokenizer()
    new_tokens = [min(len(tokenizer(t)["input_ids"]), MAX_PAIR_TOKENS) for texts in new_texts for t in texts]
    old_tokens = [len(tokenizer(t)["input_ids"]) for texts in old_texts for t in texts]

    def timed(fn, groups) -> dict:
        fn(groups[0][:4])
        samples = []
        for r in range(reps):
            t0 = time.perf_counter()
            fn(groups[r % len(groups)])
            samples.append(time.perf_counter() - t0)
        return percentiles(samples)

    embed = service.encoder.llm
    return {"pairs_per_call": len(new_texts[0]), "cross_layers": service.config["settings"]["cross"]["layers"],
            "tokens_per_pair": {"now": round(float(np.mean(new_tokens)), 1),
                                "before": round(float(np.mean(old_tokens)), 1)},
            "now_classify": timed(service.cross.score, new_texts),
            "before_text_6_layers_embed": timed(lambda t: embed.embed(t, truncate_prompt_tokens=-1, use_tqdm=False),
                                                old_texts),
            "now_text_6_layers_embed": timed(lambda t: embed.embed(t, truncate_prompt_tokens=-1, use_tqdm=False),
                                             new_texts)}


def main() -> None:
    from pagellm.apps.recommend.pipeline import cases_to_histories, cross_fn, evaluate, leave_last_out
    from pagellm.apps.recommend.ranker import feature_matrices
    from pagellm.apps.recommend.service import RecommendService

    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", required=True, help="a folder from `pagellm recommend train`")
    p.add_argument("--fast-reps", type=int, default=50)
    p.add_argument("--full-reps", type=int, default=10)
    p.add_argument("--batch-users", type=int, default=256, help="users per batch for the fast users/s")
    p.add_argument("--full-batch-users", type=int, default=8, help="users per batch for the full users/s")
    p.add_argument("--breakdown-users", type=int, default=5, help="users whose 100 pairs the breakdown scores")
    p.add_argument("--evaluate", action="store_true", help="also run the leave-last-out evaluation")
    p.add_argument("--finetuned-users", type=int, default=None)
    p.add_argument("--cold-users", type=int, default=300)
    p.add_argument("--out", default=None)
    args = p.parse_args()

    result: dict = {"load_average_start": load_average()}
    service = RecommendService(args.model)
    result["train_timings_s"] = service.config["timings"]
    result["train_settings"] = service.config["settings"]
    settings = service.config["settings"]
    split = leave_last_out(service.data, settings["num_negatives"], settings["num_valid_negatives"],
                           settings["seed"])
    # NOTE: service.data is the train split, so its "test" cases are each user's validation item: the
    # candidates are just 100 items to score, nothing is measured against them here
    cases = split.test
    ids = [[service.data.items[c].item_id for c in case.candidates] for case in cases]

    latency = {}
    for mode, reps in (("fast", args.fast_reps), ("full", args.full_reps)):
        service.recommend(user_id=cases[0].user_id, candidates=ids[0], k=10, mode=mode)  # warm-up
        samples = []
        for r in range(reps):
            case = cases[r % len(cases)]
            t0 = time.perf_counter()
            service.recommend(user_id=case.user_id, candidates=ids[r % len(cases)], k=10, mode=mode)
            samples.append(time.perf_counter() - t0)
        latency[mode] = percentiles(samples)
        print(mode, latency[mode], file=sys.stderr)
    result["latency_1_user_100_candidates"] = latency
    result["cross_scorer_breakdown"] = scorer_breakdown(service, cases[:args.breakdown_users], args.full_reps)
    print("breakdown", result["cross_scorer_breakdown"], file=sys.stderr)

    throughput = {}
    for mode, num in (("fast", args.batch_users), ("full", args.full_batch_users)):
        batch = cases_to_histories(service.data, cases[:num])
        cross = cross_fn(service.data, service.cross) if mode == "full" else None
        t0 = time.perf_counter()
        features = feature_matrices(batch, service.behaviour, service.vectors, cross)
        service.rankers[mode].score(features)
        elapsed = time.perf_counter() - t0
        throughput[mode] = {"users": num, "candidates_per_user": len(cases[0].candidates),
                            "seconds": round(elapsed, 3), "users_per_s": round(num / elapsed, 2)}
        print(mode, throughput[mode], file=sys.stderr)
    result["users_per_s_at_batch"] = throughput

    if args.evaluate:
        t0 = time.perf_counter()
        result["evaluation"] = evaluate(args.model, None, args.cold_users, args.finetuned_users)
        result["evaluation_s"] = round(time.perf_counter() - t0, 1)
    result["load_average_end"] = load_average()
    write_result("recommend", result, args.out)


if __name__ == "__main__":
    main()
