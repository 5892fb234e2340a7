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
