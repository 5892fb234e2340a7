"""`pagellm recommend train|evaluate`: fit every stage into a model folder, then the leave-last-out evaluation of
all methods on the same candidates.

Training never reads a test target: behaviour models for the validation features fit on all but each user's
last two interactions, the cross scorer trains on steps inside those, and the ranker learns from the validation
targets (second-to-last). Test-time behaviour models refit on all but the last (the validation target included).

Model folder: config.json, store.sqlite (items, item vectors, interactions), behaviour.joblib, ranker.joblib,
ranker_fast.joblib, finetuned/ (the `pagellm finetune` classifier), cross_train.jsonl, train_report.json.
"""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pagellm.apps.recommend.behaviour import BehaviourModel
from pagellm.apps.recommend.data import Case, Dataset, leave_last_out
from pagellm.apps.recommend.ranker import FAST_FEATURES, FEATURES, Histories, Ranker, feature_matrices, hit_ndcg
from pagellm.apps.recommend.semantic import (
    BiEncoder,
    CrossScorer,
    CrossScorerSettings,
    cross_dev_rows,
    cross_training_rows,
    pair_text,
    profile_text,
    train_cross_scorer,
)
from pagellm.apps.recommend.store import open_store
from pagellm.errors import InvalidRequest

logger = logging.getLogger("pagellm.recommend")
CONFIG_FILE = "config.json"
STORE_FILE = "store.sqlite"
COLD_START_ITEMS = 3


@dataclass
class TrainSettings:
    """Everything `train` decides; saved in config.json so evaluate rebuilds the same split."""

    seed: int = 0
    num_negatives: int = 99
    num_valid_negatives: int = 19
    max_users: int | None = None  # the first N users only (tests' slice)
    encoder: str | None = None  # None: the bundled MiniLM
    # NOTE: the cross scorer runs ~50-130 pairs/s on 2 cores, so the full ranker learns from the validation cases
    # of the first N users only (N x (1 + num_valid_negatives) pairs); the fast ranker from all of them
    cross_valid_users: int | None = 400
    store: str | None = None  # None: store.sqlite in the model folder; or a postgresql:// URI (pgvector)
    cross: CrossScorerSettings = field(default_factory=CrossScorerSettings)


def cases_to_histories(data: Dataset, cases: list[Case], keep_last: int | None = None) -> Histories:
    items, ratings = [], []
    for case in cases:
        events = case.history[-keep_last:] if keep_last else case.history
        items.append([data.item_index[e.item_id] for e in events])
        ratings.append([e.rating for e in events])
    return Histories(items, ratings, [c.candidates for c in cases])


def cross_fn(data: Dataset, scorer: CrossScorer) -> Callable[[Histories], np.ndarray]:
    def score(batch: Histories) -> np.ndarray:
        texts = []
        for hist, ratings, cands in zip(batch.items, batch.ratings, batch.candidates):
            profile = profile_text([data.items[i] for i in hist], ratings)
            texts += [pair_text(profile, data.items[c]) for c in cands]
        return scorer.score(texts).reshape(len(batch.items), -1)
    return score


def train(data: Dataset, out: str | Path, settings: TrainSettings) -> dict[str, Any]:
    """Fit all stages into `out`; returns the training report (seconds per stage)."""
    import joblib

    out = Path(out)
    out.mkdir(parents=True, exist_ok=True)
    if settings.max_users:
        data = data.slice_users(settings.max_users)
    timings: dict[str, float] = {}
    t = time.perf_counter()
    split = leave_last_out(data, settings.num_negatives, settings.num_valid_negatives, settings.seed)
    if not split.test:
        raise InvalidRequest("no user has enough interactions (5) to hold out a validation and a test item",
                             param="interactions")
    timings["split_s"] = time.perf_counter() - t

    t = time.perf_counter()
    encoder = BiEncoder(settings.encoder)
    vectors = encoder.embed([item.text for item in data.items])
    store = open_store(settings.store or out / STORE_FILE)
    store.save_items(data.items, vectors)
    store.save_interactions(data.interactions)
    store.close()
    timings["item_embeddings_s"] = time.perf_counter() - t

    t = time.perf_counter()
    fit_model = BehaviourModel.fit(split.fit, data.item_index, len(data.items), seed=settings.seed)
    train_model = BehaviourModel.fit(split.train, data.item_index, len(data.items), seed=settings.seed)
    joblib.dump(train_model, out / "behaviour.joblib")
    timings["behaviour_models_s"] = time.perf_counter() - t

    t = time.perf_counter()
    rows = cross_training_rows(data, split.fit, settings.cross)
    # NOTE: the dev users come after the full ranker's (cross_valid_users), so picking the best checkpoint on
    # their validation items does not flatter the cross scores the ranker learns from
    first_dev = settings.cross_valid_users or len(split.valid)
    dev_rows = cross_dev_rows(data, split.valid[first_dev:first_dev + settings.cross.dev_users], split.fit,
                              settings.seed)
    cross_report = train_cross_scorer(rows, out, settings.cross, settings.encoder, dev_rows)
    timings["finetune_s"] = time.perf_counter() - t

    t = time.perf_counter()
    features = feature_matrices(cases_to_histories(data, split.valid), fit_model, vectors, None)
    cross_cases = split.valid[:settings.cross_valid_users] if settings.cross_valid_users else split.valid
    cross_features = feature_matrices(cases_to_histories(data, cross_cases), fit_model, vectors,
                                      cross_fn(data, CrossScorer(out / "finetuned")))
    timings["valid_features_s"] = time.perf_counter() - t
    t = time.perf_counter()
    joblib.dump(Ranker(FEATURES, settings.seed).fit(cross_features), out / "ranker.joblib")
    joblib.dump(Ranker(FAST_FEATURES, settings.seed).fit(features), out / "ranker_fast.joblib")
    timings["ranker_s"] = time.perf_counter() - t
    features["finetuned"] = cross_features["finetuned"]

    config = {"dataset": data.name, "num_users": len(data.by_user), "num_items": len(data.items),
              "num_interactions": len(data.interactions), "settings": asdict(settings),
              "cross_scorer": cross_report, "timings": {k: round(v, 2) for k, v in timings.items()},
              "validation": {name: hit_ndcg(f) for name, f in features.items() if name != "finetuned"},
              "validation_cross_users": {"num_users": len(cross_cases),
                                         "methods": {n: hit_ndcg(f) for n, f in cross_features.items()}}}
    (out / CONFIG_FILE).write_text(json.dumps(config, indent=2))
    return config


def read_config(model_dir: str | Path) -> dict[str, Any]:
    path = Path(model_dir) / CONFIG_FILE
    if not path.is_file():
        raise InvalidRequest(f"{model_dir} is not a trained recommender (no {CONFIG_FILE}); run "
                             "`pagellm recommend train` first", param="model")
    return json.loads(path.read_text())


def store_location(model_dir: str | Path) -> str | Path:
    return read_config(model_dir)["settings"].get("store") or Path(model_dir) / STORE_FILE


def load_dataset(model_dir: str | Path) -> Dataset:
    store = open_store(store_location(model_dir))
    try:
        return Dataset(store.items(), store.interactions(), read_config(model_dir)["dataset"])
    finally:
        store.close()


def evaluate(model_dir: str | Path, max_users: int | None = None, cold_users: int | None = 300,
             finetuned_users: int | None = None, include_finetuned: bool = True) -> dict[str, Any]:
    """HR@10 / NDCG@10 of every method on the same test candidates, and cold start on each user's last 3 items.

    The cross scorer (and so `combined`) scores the first `finetuned_users` users (None: all); when that is fewer
    than all, "methods" holds the cheap methods over all users and "finetuned_subset" every method over those
    (the same for "cold_start")."""
    import joblib

    model_dir = Path(model_dir)
    config = read_config(model_dir)
    settings = config["settings"]
    data = load_dataset(model_dir)
    split = leave_last_out(data, settings["num_negatives"], settings["num_valid_negatives"], settings["seed"])
    cases = split.test[:max_users] if max_users else split.test
    store = open_store(store_location(model_dir))
    vectors = store.item_vectors()
    store.close()
    behaviour = joblib.load(model_dir / "behaviour.joblib")
    rankers = {"combined": joblib.load(model_dir / "ranker.joblib"),
               "combined_fast": joblib.load(model_dir / "ranker_fast.joblib")}
    cross = cross_fn(data, CrossScorer(model_dir / "finetuned")) if include_finetuned else None
    timings = {}
    t = time.perf_counter()
    features = feature_matrices(cases_to_histories(data, cases), behaviour, vectors, None)
    timings["test_features_s"] = round(time.perf_counter() - t, 2)
    report: dict[str, Any] = {"num_users": len(cases), "num_candidates": 1 + settings["num_negatives"],
                              "seed": settings["seed"]}
    sub = cases[:finetuned_users] if finetuned_users else cases
    if cross is not None:
        t = time.perf_counter()
        sub_features = feature_matrices(cases_to_histories(data, sub), behaviour, vectors, cross)
        timings["finetuned_features_s"] = round(time.perf_counter() - t, 2)
        timings["finetuned_pairs"] = sub_features["finetuned"].size
    if cross is not None and len(sub) == len(cases):
        report["methods"] = _methods(sub_features, rankers, True)
    else:
        report["methods"] = _methods(features, rankers, False)
        if cross is not None:
            report["finetuned_subset"] = {"num_users": len(sub), "methods": _methods(sub_features, rankers, True)}
    if cold_users:
        cold_cases = cases[:cold_users]
        t = time.perf_counter()
        cold = feature_matrices(cases_to_histories(data, cold_cases, keep_last=COLD_START_ITEMS), behaviour,
                                vectors, None)
        report["cold_start"] = {"num_users": len(cold_cases), "history_items": COLD_START_ITEMS}
        cold_sub = cold_cases[:finetuned_users] if finetuned_users else cold_cases
        if cross is not None:
            cold_cross = feature_matrices(cases_to_histories(data, cold_sub, keep_last=COLD_START_ITEMS), behaviour,
                                          vectors, cross)
        if cross is not None and len(cold_sub) == len(cold_cases):
            report["cold_start"]["methods"] = _methods(cold_cross, rankers, True)
        else:
            report["cold_start"]["methods"] = _methods(cold, rankers, False)
            if cross is not None:
                report["cold_start"]["finetuned_subset"] = {"num_users": len(cold_sub),
                                                            "methods": _methods(cold_cross, rankers, True)}
        timings["cold_features_s"] = round(time.perf_counter() - t, 2)
    report["timings"] = timings
    return report


def _methods(features: dict[str, np.ndarray], rankers: dict[str, Ranker], include_finetuned: bool
             ) -> dict[str, dict[str, float]]:
    methods = {"popularity": hit_ndcg(features["popularity"]), "item_knn": hit_ndcg(features["item_knn"]),
               "mf": hit_ndcg(features["mf"]), "bi_encoder": hit_ndcg(features["bi_encoder"])}
    if include_finetuned:
        methods["finetuned"] = hit_ndcg(features["finetuned"])
        methods["combined"] = hit_ndcg(rankers["combined"].score(features))
    methods["combined_fast"] = hit_ndcg(rankers["combined_fast"].score(features))
    return methods
