"""`pagellm recommend train|evaluate|serve`: fit the recommender on MovieLens-100k (from the installed recbole
wheel) or on your own interactions and items, measure it against baselines, serve POST /v1/recommend."""

from __future__ import annotations

import argparse
import json
from typing import Any


def add_recommend_parser(sub: Any) -> None:
    p = sub.add_parser("recommend", help="recommendations from item text and behaviour (MovieLens-100k or yours)")
    rsub = p.add_subparsers(dest="recommend_command", required=True)
    fmt = argparse.ArgumentDefaultsHelpFormatter
    tr = rsub.add_parser("train", help="fit every stage into a model folder", formatter_class=fmt)
    tr.add_argument("--data", default=None, choices=["movielens-100k"], help="a bundled dataset")
    tr.add_argument("--interactions", default=None, help="CSV: user_id,item_id[,rating][,timestamp]")
    tr.add_argument("--items", default=None, help="JSONL: {item_id, title, year?, genres?, description?}")
    tr.add_argument("--out", required=True, help="model folder to write")
    tr.add_argument("--seed", type=int, default=0, help="negative sampling, cross-scorer pairs, ranker")
    tr.add_argument("--num-negatives", type=int, default=99, help="sampled never-rated items per test target")
    tr.add_argument("--num-valid-negatives", type=int, default=19, help="the same for the ranker's validation cases")
    tr.add_argument("--max-users", type=int, default=None, help="train on the first N users only (a quick run)")
    tr.add_argument("--pairs-per-user", type=int, default=4,
                    help="cross-scorer steps per user (each: a positive, a uniform and a popularity-sampled negative)")
    tr.add_argument("--cross-strategy", default="head", help="cross-scorer `pagellm finetune` strategy")
    tr.add_argument("--cross-epochs", type=float, default=10.0, help="cross-scorer fine-tuning epochs")
    tr.add_argument("--cross-lr", type=float, default=1e-3, help="cross-scorer learning rate")
    tr.add_argument("--cross-layers", type=int, default=3, help="the cross scorer keeps MiniLM's bottom N layers")
    tr.add_argument("--cross-valid-users", type=int, default=400,
                    help="validation users whose pairs the cross scorer scores to train the full ranker")
    tr.add_argument("--store", default=None,
                    help="a postgresql:// URI (PostgreSQL with pgvector) instead of store.sqlite in --out")
    tr.add_argument("--encoder", default=None, help="embedding / cross-scorer base model (default: bundled MiniLM)")
    tr.set_defaults(func=cmd_train)
    ev = rsub.add_parser("evaluate", help="HR@10 and NDCG@10 of every method on held-out last items",
                         formatter_class=fmt)
    ev.add_argument("--model", required=True, help="a folder from `pagellm recommend train`")
    ev.add_argument("--max-users", type=int, default=None, help="evaluate the first N test users only")
    ev.add_argument("--cold-users", type=int, default=300, help="users in the 3-item cold-start test (0: skip)")
    ev.add_argument("--finetuned-users", type=int, default=None,
                    help="score the cross scorer (and combined) on the first N test users only (default: all)")
    ev.add_argument("--no-finetuned", action="store_true", help="skip the cross scorer (and `combined`)")
    ev.add_argument("--json", action="store_true", help="print the report as JSON")
    ev.set_defaults(func=cmd_evaluate)
    sv = rsub.add_parser("serve", help="POST /v1/recommend", formatter_class=fmt)
    sv.add_argument("--model", required=True)
    sv.add_argument("--host", default="127.0.0.1")
    sv.add_argument("--port", type=int, default=8000)
    sv.add_argument("--fast-only", action="store_true", help="do not load the cross scorer (mode fast only)")
    sv.set_defaults(func=cmd_serve)


def load_data(args: argparse.Namespace) -> Any:
    from pagellm.apps.recommend.data import load_custom, load_movielens_100k
    from pagellm.errors import InvalidRequest

    if args.data and (args.interactions or args.items):
        raise InvalidRequest("give --data or --interactions with --items, not both", param="data")
    if args.data:
        return load_movielens_100k()
    if not (args.interactions and args.items):
        raise InvalidRequest("give --data movielens-100k, or --interactions x.csv with --items y.jsonl", param="data")
    return load_custom(args.interactions, args.items)


def cmd_train(args: argparse.Namespace) -> int:
    from pagellm.apps.recommend.pipeline import TrainSettings, train
    from pagellm.apps.recommend.semantic import CrossScorerSettings

    settings = TrainSettings(seed=args.seed, num_negatives=args.num_negatives,
                             num_valid_negatives=args.num_valid_negatives, max_users=args.max_users,
                             encoder=args.encoder,
                             cross_valid_users=args.cross_valid_users, store=args.store,
                             cross=CrossScorerSettings(pairs_per_user=args.pairs_per_user, strategy=args.cross_strategy,
                                                       epochs=args.cross_epochs,
                                                       lr=args.cross_lr, layers=args.cross_layers, seed=args.seed))
    report = train(load_data(args), args.out, settings)
    print(json.dumps({"out": args.out, "users": report["num_users"], "items": report["num_items"],
                      "timings": report["timings"]}))
    return 0


def format_report(report: dict[str, Any]) -> str:
    lines = [f"{report['num_users']} users, target among {report['num_candidates']} candidates (seed "
             f"{report['seed']})", f"{'method':<16}{'HR@10':>8}{'NDCG@10':>9}"]
    lines += [f"{name:<16}{m['hr@10']:>8.4f}{m['ndcg@10']:>9.4f}" for name, m in report["methods"].items()]
    subset = report.get("finetuned_subset")
    if subset:
        lines += ["", f"the first {subset['num_users']} users, with the fine-tuned scorer"]
        lines += [f"{name:<16}{m['hr@10']:>8.4f}{m['ndcg@10']:>9.4f}" for name, m in subset["methods"].items()]
    cold = report.get("cold_start")
    if cold:
        lines += ["", f"cold start: {cold['num_users']} users, {cold['history_items']} known items each"]
        lines += [f"{name:<16}{m['hr@10']:>8.4f}{m['ndcg@10']:>9.4f}" for name, m in cold["methods"].items()]
        if cold.get("finetuned_subset"):
            lines += [f"cold start, the first {cold['finetuned_subset']['num_users']} users, with the fine-tuned "
                      "scorer"]
            lines += [f"{name:<16}{m['hr@10']:>8.4f}{m['ndcg@10']:>9.4f}"
                      for name, m in cold["finetuned_subset"]["methods"].items()]
    return "\n".join(lines)


def cmd_evaluate(args: argparse.Namespace) -> int:
    from pagellm.apps.recommend.pipeline import evaluate

    report = evaluate(args.model, args.max_users, args.cold_users, args.finetuned_users, not args.no_finetuned)
    print(json.dumps(report, indent=2) if args.json else format_report(report))
    return 0


def cmd_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from pagellm.apps.recommend.api import build_recommend_app
    from pagellm.apps.recommend.service import RecommendService

    service = RecommendService(args.model, load_cross=not args.fast_only)
    uvicorn.run(build_recommend_app(service), host=args.host, port=args.port, log_level="info")
    return 0
