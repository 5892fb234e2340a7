"""Text scorers through pagellm's engine: a bi-encoder (MiniLM embeddings of item text; a user is the rating- and
recency-weighted mean of their items' vectors) and a cross scorer fine-tuned on behaviour with `pagellm finetune`
(MiniLM classifier on "user profile [SEP] candidate" -> watched next yes/no), scored through LLM.classify."""

from __future__ import annotations

import json
import logging
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from pagellm.apps.recommend.data import Dataset, Interaction, Item

logger = logging.getLogger("pagellm.recommend")

HALF_LIFE = 10.0  # interactions: an item 10 steps back counts half as much in a profile
PROFILE_ITEMS = 5  # items named in the cross scorer's profile text
POSITIVE, NEGATIVE = "yes", "no"


def bundled_encoder() -> str:
    from pagellm.adapt.base_model import resolve_base_model

    return str(resolve_base_model("minilm").source.path)


def profile_weights(ratings: Sequence[float], half_life: float = HALF_LIFE) -> np.ndarray:
    """Weight of each history item (oldest first): rating / 5, halved every `half_life` steps back in time."""
    n = len(ratings)
    age = np.arange(n - 1, -1, -1, dtype=np.float32)
    return np.asarray(ratings, dtype=np.float32) / 5.0 * np.power(0.5, age / half_life)


def profile_text(items: Sequence[Item], ratings: Sequence[float], num_items: int = PROFILE_ITEMS) -> str:
    """The `num_items` most recent items the user liked (rating >= 4), topped up with the most recent others;
    newest first."""
    order = list(range(len(items)))[::-1]
    liked = [i for i in order if ratings[i] >= 4][:num_items]
    picked = sorted(liked + [i for i in order if i not in liked][:num_items - len(liked)], reverse=True)
    return "Recently watched: " + "; ".join(items[i].label for i in picked) + "."


def pair_text(profile: str, item: Item) -> str:
    return f"{profile} [SEP] {item.text}"


class BiEncoder:
    """Item vectors from LLM(task="embed"), computed once; users are weighted means of them."""

    def __init__(self, model: str | None = None) -> None:
        from pagellm import LLM

        self.model = model or bundled_encoder()
        self.llm = LLM(self.model, task="embed", dtype="float32")

    def embed(self, texts: Sequence[str]) -> np.ndarray:
        outs = self.llm.embed(list(texts), truncate_prompt_tokens=-1, use_tqdm=False)
        # NOTE: the engine's MiniLM vectors are L2-normalized (its Normalize module): dot = cosine
        return np.asarray([o.outputs.embedding for o in outs], dtype=np.float32)


def user_vector(item_vectors: np.ndarray, history: Sequence[int], weights: np.ndarray) -> np.ndarray:
    vec = (item_vectors[list(history)] * weights[:, None]).sum(axis=0)
    norm = float(np.linalg.norm(vec))
    return vec / norm if norm > 0 else vec


def bi_encoder_scores(item_vectors: np.ndarray, histories: Sequence[Sequence[int]],
                      weights: Sequence[np.ndarray], candidates: Sequence[Sequence[int]]) -> np.ndarray:
    users = np.stack([user_vector(item_vectors, h, w) for h, w in zip(histories, weights)])
    return np.einsum("uf,ucf->uc", users, item_vectors[np.asarray(candidates)]).astype(np.float32)


@dataclass
class CrossScorerSettings:
    """What the behaviour-trained cross scorer trains on, and how."""

    pairs_per_user: int = 1  # positives per user (each with one sampled negative)
    strategy: str = "top-layers:2"
    epochs: float = 1.0
    lr: float = 3e-4  # NOTE: 1e-4 left the loss at 0.68 after one epoch of 3.8k pairs (a new head)
    batch_size: int = 32
    max_length: int = 128
    seed: int = 0


def cross_training_rows(data: Dataset, fit: Sequence[Interaction], settings: CrossScorerSettings,
                        min_history: int = 3) -> list[dict[str, str]]:
    """From each user's fit interactions: (profile before step t, item t) -> yes, and (same profile, an item the
    user never rated) -> no, for `pairs_per_user` random steps t. Only fit interactions (no validation or test
    target) are read."""
    rng = np.random.default_rng(settings.seed)
    by_user: dict[str, list[Interaction]] = {}
    for e in fit:
        by_user.setdefault(e.user_id, []).append(e)
    rows = []
    num_items = len(data.items)
    for user_id in sorted(by_user):
        events = sorted(by_user[user_id], key=lambda e: e.timestamp)
        if len(events) <= min_history:
            continue
        rated = {data.item_index[e.item_id] for e in data.by_user[user_id]}
        steps = rng.choice(np.arange(min_history, len(events)), size=min(settings.pairs_per_user,
                                                                            len(events) - min_history), replace=False)
        for t in sorted(int(s) for s in steps):
            past = events[:t]
            profile = profile_text([data.items[data.item_index[e.item_id]] for e in past], [e.rating for e in past])
            rows.append({"text": pair_text(profile, data.items[data.item_index[events[t].item_id]]), "label": POSITIVE})
            negative = int(rng.integers(num_items))
            while negative in rated:
                negative = int(rng.integers(num_items))
            rows.append({"text": pair_text(profile, data.items[negative]), "label": NEGATIVE})
    return rows


def train_cross_scorer(rows: list[dict[str, str]], out_dir: Path, settings: CrossScorerSettings,
                       model: str | None = None) -> dict[str, float]:
    """`pagellm finetune` (its Python API) on the rows; returns timing and counts for the report."""
    from pagellm.adapt.finetune import FinetuneArgs, run_finetune

    out_dir.mkdir(parents=True, exist_ok=True)
    data_path = out_dir / "cross_train.jsonl"
    data_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    t0 = time.perf_counter()
    result = run_finetune(FinetuneArgs(
        data=str(data_path), out=str(out_dir / "finetuned"), model=model or "minilm", task="classify",
        strategy=settings.strategy, epochs=settings.epochs, lr=settings.lr, batch_size=settings.batch_size,
        max_length=settings.max_length, seed=settings.seed, labels=[NEGATIVE, POSITIVE], progress=False,
        overwrite=True))
    return {"pairs": len(rows), "wall_s": time.perf_counter() - t0, "steps": result.global_steps}


class CrossScorer:
    """The fine-tuned classifier folder in the engine: P(yes) for each (profile, candidate) pair."""

    def __init__(self, model_dir: str | Path) -> None:
        from pagellm import LLM

        self.llm = LLM(str(model_dir), task="classify", dtype="float32")
        probe = self.llm.classify(["probe"], use_tqdm=False)[0].outputs
        self.positive_index = probe.labels.index(POSITIVE)

    def score(self, texts: Sequence[str]) -> np.ndarray:
        if not texts:
            return np.zeros(0, dtype=np.float32)
        outs = self.llm.classify(list(texts), truncate_prompt_tokens=-1, use_tqdm=False)
        return np.asarray([o.outputs.probs[self.positive_index] for o in outs], dtype=np.float32)
