"""Features of (user history, candidate) pairs and the learned ranker over them (scikit-learn's
HistGradientBoostingClassifier), plus HR@k / NDCG@k of ranked candidate lists."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass

import numpy as np

from pagellm.apps.recommend.behaviour import RECENT_ITEMS, BehaviourModel
from pagellm.apps.recommend.semantic import bi_encoder_scores, profile_weights

# NOTE: the order is the ranker's column order; `fast` leaves the fine-tuned cross score out (p50 < 100 ms)
FEATURES = ("bi_encoder", "bi_encoder_recent", "finetuned", "popularity", "recent_popularity", "item_knn",
            "item_knn_all", "mf")
FAST_FEATURES = tuple(f for f in FEATURES if f != "finetuned")


@dataclass
class Histories:
    """A batch of users: history item indices and ratings (oldest first), extra profile vectors of history texts
    outside the catalogue (cold start), and the candidates to score (one row each, same length)."""

    items: list[list[int]]
    ratings: list[list[float]]
    candidates: list[list[int]]
    extra_vectors: list[np.ndarray | None] | None = None


def feature_matrices(batch: Histories, behaviour: BehaviourModel, item_vectors: np.ndarray,
                     cross: Callable[[Histories], np.ndarray] | None) -> dict[str, np.ndarray]:
    """name -> [users, candidates] scores; `cross` (the fine-tuned scorer) is optional (None: zeros)."""
    weights = [profile_weights(r) for r in batch.ratings]
    out = {"bi_encoder": _bi(item_vectors, batch.items, weights, batch.candidates, batch.extra_vectors)}
    recent = [h[-RECENT_ITEMS:] for h in batch.items]
    out["bi_encoder_recent"] = _bi(item_vectors, recent, [np.ones(len(h), np.float32) for h in recent],
                                   batch.candidates, batch.extra_vectors)
    out["finetuned"] = cross(batch) if cross is not None else np.zeros_like(out["bi_encoder"])
    out["popularity"] = np.log1p(behaviour.popularity_scores(batch.candidates))
    out["recent_popularity"] = np.log1p(behaviour.recent_popularity[np.asarray(batch.candidates)]).astype(np.float32)
    out["item_knn"] = behaviour.knn_scores(batch.items, batch.candidates, last=RECENT_ITEMS)
    out["item_knn_all"] = behaviour.knn_scores(batch.items, batch.candidates)
    out["mf"] = behaviour.mf_scores(batch.items, batch.candidates)
    return out


def _bi(item_vectors: np.ndarray, histories: list[list[int]], weights: list[np.ndarray],
        candidates: list[list[int]], extra: list[np.ndarray | None] | None) -> np.ndarray:
    if extra is None or all(e is None for e in extra):
        return bi_encoder_scores(item_vectors, histories, weights, candidates)
    rows = []
    for r, (h, w, c) in enumerate(zip(histories, weights, candidates)):
        vecs = [item_vectors[list(h)] * w[:, None]] if h else []
        if extra[r] is not None:
            vecs.append(extra[r])  # out-of-catalogue history texts, weight 1 each
        user = np.concatenate(vecs).sum(axis=0)
        user /= max(float(np.linalg.norm(user)), 1e-12)
        rows.append(item_vectors[list(c)] @ user)
    return np.asarray(rows, dtype=np.float32)


def stack(features: dict[str, np.ndarray], names: Sequence[str]) -> np.ndarray:
    """[users * candidates, len(names)] rows for the ranker."""
    return np.stack([features[n].reshape(-1) for n in names], axis=1)


class Ranker:
    """Gradient-boosted trees on the features; trained on validation cases (target = candidate 0)."""

    def __init__(self, names: Sequence[str] = FEATURES, seed: int = 0) -> None:
        from sklearn.ensemble import HistGradientBoostingClassifier

        self.names = tuple(names)
        self.model = HistGradientBoostingClassifier(max_iter=300, learning_rate=0.05, max_leaf_nodes=15,
                                                    l2_regularization=1.0, early_stopping=True,
                                                    validation_fraction=0.15, random_state=seed)

    def fit(self, features: dict[str, np.ndarray]) -> Ranker:
        x = stack(features, self.names)
        labels = np.zeros(features[self.names[0]].shape, dtype=np.int64)
        labels[:, 0] = 1
        self.model.fit(x, labels.reshape(-1))
        return self

    def score(self, features: dict[str, np.ndarray]) -> np.ndarray:
        shape = features[self.names[0]].shape
        return self.model.predict_proba(stack(features, self.names))[:, 1].reshape(shape)


def target_ranks(scores: np.ndarray) -> np.ndarray:
    """0-based rank of candidate 0 in each row; a tie counts half (a random tie-break's expectation)."""
    target = scores[:, :1]
    return (scores[:, 1:] > target).sum(axis=1) + 0.5 * (scores[:, 1:] == target).sum(axis=1)


def hit_ndcg(scores: np.ndarray, k: int = 10) -> dict[str, float]:
    ranks = target_ranks(scores)
    hits = ranks < k
    return {f"hr@{k}": round(float(hits.mean()), 4),
            f"ndcg@{k}": round(float(np.where(hits, 1.0 / np.log2(ranks + 2.0), 0.0).mean()), 4)}
