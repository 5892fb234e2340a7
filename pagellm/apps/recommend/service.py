"""The recommender at serving time: a trained model folder -> ranked items for a known user or for a history of
item texts (cold start), with explanations. Built on the public `pagellm.LLM` surface only (embed, classify).

Two modes: `fast` (bi-encoder + behaviour features + the fast ranker, no cross scorer) and `full` (the ranker
with the fine-tuned cross score too). Without a candidate list, `full` reranks the `fast` top RERANK_DEPTH of
the whole catalogue, so one request costs at most RERANK_DEPTH cross-scorer pairs.
"""

from __future__ import annotations

import threading
from collections.abc import Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from pagellm.apps.recommend.data import Dataset
from pagellm.apps.recommend.pipeline import cross_fn, leave_last_out, load_dataset, read_config, store_location
from pagellm.apps.recommend.ranker import Histories, feature_matrices
from pagellm.apps.recommend.semantic import BiEncoder, CrossScorer, pair_text, profile_text, profile_weights
from pagellm.apps.recommend.store import open_store
from pagellm.errors import InvalidRequest

MAX_CANDIDATES = 1000  # per request: the full mode scores each with the cross scorer (~100 pairs/s on 2 cores)
MAX_HISTORY = 500
MAX_K = 100
RERANK_DEPTH = 100
MODES = ("fast", "full")
NUM_EXPLANATIONS = 3


class UnknownUser(InvalidRequest):
    """A user id the model has no interactions for (HTTP 404)."""


@dataclass
class Recommendation:
    item_id: str
    title: str
    score: float
    explanation: list[dict[str, Any]] = field(default_factory=list)  # {"item_id", "title", "weight"}

    def to_json(self) -> dict[str, Any]:
        return {"item_id": self.item_id, "title": self.title, "score": round(self.score, 6),
                "because": self.explanation}


class RecommendService:
    """Owns the model folder's data, vectors, behaviour model, rankers and the engine's embed/classify models."""

    def __init__(self, model_dir: str | Path, load_cross: bool = True) -> None:
        import joblib

        model_dir = Path(model_dir)
        self.config = read_config(model_dir)
        settings = self.config["settings"]
        data = load_dataset(model_dir)
        split = leave_last_out(data, settings["num_negatives"], settings["num_valid_negatives"], settings["seed"])
        # NOTE: the model serves what it was fit on (all but each user's held-out last item), so `evaluate` and
        # `serve` describe the same model
        self.data = Dataset(data.items, split.train, data.name)
        store = open_store(store_location(model_dir))
        self.vectors = store.item_vectors()
        store.close()
        self.behaviour = joblib.load(model_dir / "behaviour.joblib")
        self.rankers = {"fast": joblib.load(model_dir / "ranker_fast.joblib"),
                        "full": joblib.load(model_dir / "ranker.joblib")}
        self.encoder = BiEncoder(settings.get("encoder"))
        self.cross = CrossScorer(model_dir / "finetuned") if load_cross else None
        self._lock = threading.Lock()  # one request at a time through the engine objects
        self._by_label: dict[str, int] = {}
        for i, item in enumerate(self.data.items):
            self._by_label.setdefault(item.label.lower(), i)
            self._by_label.setdefault(item.title.lower(), i)
            self._by_label.setdefault(item.item_id.lower(), i)

    @property
    def num_users(self) -> int:
        return len(self.data.by_user)

    def lookup(self, name: str) -> int | None:
        """An item index by id, `Title (year)` or title (case-insensitive)."""
        return self._by_label.get(name.strip().lower())

    # ---- one request ---------------------------------------------------------------------------
    def recommend(self, user_id: str | None = None, history: Sequence[str] | None = None,
                  candidates: Sequence[str] | None = None, exclude_seen: bool = True, k: int = 10,
                  mode: str = "fast") -> dict[str, Any]:
        self._check(user_id, history, candidates, k, mode)
        if mode == "full" and self.cross is None:
            raise InvalidRequest("this server was started without the fine-tuned scorer; use mode fast",
                                 param="mode")
        items, ratings, extra_texts = self._history(user_id, history)
        seen = set(items)
        if candidates is not None:
            cand = self._candidates(candidates)
            cand = [c for c in cand if not (exclude_seen and c in seen)]
        else:
            cand = [i for i in range(len(self.data.items)) if not (exclude_seen and i in seen)]
        if not cand:
            return {"user_id": user_id, "mode": mode, "data": []}
        with self._lock:
            extra = self.encoder.embed(extra_texts) if extra_texts else None
            scores = self._score(items, ratings, extra, extra_texts, cand, "fast")
            if mode == "full":
                top = np.argsort(-scores, kind="stable")[:RERANK_DEPTH]
                cand = [cand[i] for i in top]
                scores = self._score(items, ratings, extra, extra_texts, cand, "full")
        order = np.argsort(-scores, kind="stable")[:k]
        recs = [Recommendation(self.data.items[cand[i]].item_id, self.data.items[cand[i]].label, float(scores[i]),
                               self._explain(items, ratings, extra, extra_texts, cand[i])) for i in order]
        return {"user_id": user_id, "mode": mode, "data": [r.to_json() for r in recs]}

    def _check(self, user_id: str | None, history: Sequence[str] | None, candidates: Sequence[str] | None,
               k: int, mode: str) -> None:
        if (user_id is None) == (history is None):
            raise InvalidRequest("give either user_id (a known user) or history (item titles), not both",
                                 param="user_id")
        if history is not None and not [h for h in history if h.strip()]:
            raise InvalidRequest("history is empty; name at least one item the user liked", param="history")
        if history is not None and len(history) > MAX_HISTORY:
            raise InvalidRequest(f"history has {len(history)} items; the limit is {MAX_HISTORY}", param="history")
        if not 1 <= k <= MAX_K:
            raise InvalidRequest(f"k must be between 1 and {MAX_K}; got {k}", param="k")
        if mode not in MODES:
            raise InvalidRequest(f"mode must be one of {', '.join(MODES)}; got {mode!r}", param="mode")
        if candidates is not None and not candidates:
            raise InvalidRequest("candidates is empty; leave it out to rank the whole catalogue", param="candidates")
        if candidates is not None and len(candidates) > MAX_CANDIDATES:
            raise InvalidRequest(f"{len(candidates)} candidates; the limit is {MAX_CANDIDATES} per request",
                                 param="candidates")

    def _history(self, user_id: str | None, history: Sequence[str] | None) -> tuple[list[int], list[float], list[str]]:
        if user_id is not None:
            events = self.data.by_user.get(str(user_id))
            if not events:
                raise UnknownUser(f"unknown user {user_id!r}; send a history of item titles instead", param="user_id")
            return [self.data.item_index[e.item_id] for e in events], [e.rating for e in events], []
        items, extra = [], []
        for text in history or ():
            if not text.strip():
                continue
            index = self.lookup(text)
            if index is None:
                extra.append(text.strip())  # NOTE: outside the catalogue: only the text scorers see it
            else:
                items.append(index)
        return items, [5.0] * len(items), extra

    def _candidates(self, names: Sequence[str]) -> list[int]:
        out = []
        for i, name in enumerate(names):
            index = self.lookup(str(name))
            if index is None:
                raise InvalidRequest(f"candidates[{i}]: no item {name!r} (use an item id or `Title (year)`)",
                                     param=f"candidates[{i}]")
            out.append(index)
        return list(dict.fromkeys(out))

    def _score(self, items: list[int], ratings: list[float], extra: np.ndarray | None, extra_texts: list[str],
               cand: list[int], mode: str) -> np.ndarray:
        batch = Histories([items], [ratings], [cand], [extra])
        cross = None
        if mode == "full":
            data = self.data
            if extra_texts:
                def cross(b: Histories) -> np.ndarray:  # a profile text naming out-of-catalogue items as given
                    profile = profile_text([data.items[i] for i in items], ratings, extra_titles=extra_texts)
                    return self.cross.score([pair_text(profile, data.items[c]) for c in cand])[None, :]
            else:
                cross = cross_fn(data, self.cross)
        features = feature_matrices(batch, self.behaviour, self.vectors, cross)
        return self.rankers[mode].score(features)[0]

    def _explain(self, items: list[int], ratings: list[float], extra: np.ndarray | None, extra_texts: list[str],
                 item: int) -> list[dict[str, Any]]:
        """The history items whose (weighted) similarity to the recommended item is largest."""
        sources: list[tuple[str | None, str, float]] = []
        if items:
            weights = profile_weights(ratings)
            sims = self.vectors[items] @ self.vectors[item]
            for h, w, s in zip(items, weights, sims):
                sources.append((self.data.items[h].item_id, self.data.items[h].label, float(w * s)))
        if extra is not None:
            for text, s in zip(extra_texts, extra @ self.vectors[item]):
                sources.append((None, text, float(s)))
        best: dict[str, tuple[str | None, float]] = {}
        for item_id, title, weight in sources:  # an item seen twice counts once, at its strongest
            if title not in best or weight > best[title][1]:
                best[title] = (item_id, weight)
        top = sorted(best.items(), key=lambda kv: -kv[1][1])[:NUM_EXPLANATIONS]
        return [{"item_id": item_id, "title": title, "weight": round(weight, 4)} for title, (item_id, weight) in top]

