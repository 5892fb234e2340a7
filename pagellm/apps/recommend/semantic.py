"""Text scorers through pagellm's engine: a bi-encoder (MiniLM embeddings of item text; a user is the rating- and
recency-weighted mean of their items' vectors) and a cross scorer fine-tuned on behaviour with `pagellm finetune`
(a classifier on the bottom 3 MiniLM layers reading "candidate [SEP] user profile" -> watched next yes/no, trained
on steps of the users' earlier histories against uniform and popularity-sampled negatives), scored through one
batched LLM.classify call per request."""

from __future__ import annotations

import json
import logging
import re
import shutil
import tempfile
import time
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import numpy as np

from pagellm.apps.recommend.data import Dataset, Interaction, Item
from pagellm.errors import InvalidRequest

logger = logging.getLogger("pagellm.recommend")

HALF_LIFE = 10.0  # interactions: an item 10 steps back counts half as much in a profile
PROFILE_ITEMS = 3  # items named in the cross scorer's profile text
PROFILE_GENRE_ITEMS, PROFILE_GENRES = 10, 3  # the profile's top 3 genres over the last 10 items
# NOTE: a pair is ~27 tokens (p95 36) on MovieLens; longer texts (a description) are cut from the end, which
# is the oldest profile title, since the candidate comes first
MAX_PAIR_TOKENS = 48
POSITIVE, NEGATIVE = "yes", "no"


def bundled_encoder() -> str:
    from pagellm.adapt.base_model import resolve_base_model

    return str(resolve_base_model("minilm").source.path)


def profile_weights(ratings: Sequence[float], half_life: float = HALF_LIFE) -> np.ndarray:
    """Weight of each history item (oldest first): rating / 5, halved every `half_life` steps back in time."""
    n = len(ratings)
    age = np.arange(n - 1, -1, -1, dtype=np.float32)
    return np.asarray(ratings, dtype=np.float32) / 5.0 * np.power(0.5, age / half_life)


def profile_text(items: Sequence[Item], ratings: Sequence[float], num_items: int = PROFILE_ITEMS,
                 genre_items: int = PROFILE_GENRE_ITEMS, extra_titles: Sequence[str] = ()) -> str:
    """The user's top genres over their last `genre_items` items (each counted by its rating), then the titles of
    the `num_items` most recent items they liked (rating >= 4), topped up with the most recent others, newest
    first (so a truncated pair loses the oldest title). Titles without year or genres: every token here is paid
    once per candidate. `extra_titles` (texts outside the catalogue, a cold-start request's) come first."""
    order = list(range(len(items)))[::-1]
    liked = [i for i in order if ratings[i] >= 4][:num_items]
    picked = sorted(liked + [i for i in order if i not in liked][:num_items - len(liked)], reverse=True)
    counts: dict[str, float] = {}
    for i in order[:genre_items]:
        for genre in items[i].genres:
            counts[genre] = counts.get(genre, 0.0) + float(ratings[i])
    top = sorted(counts, key=lambda g: -counts[g])[:PROFILE_GENRES]
    genres = f"{', '.join(top)}. " if top else ""
    titles = [*extra_titles, *(items[i].title for i in picked)][:num_items]
    return genres + "; ".join(titles)


def candidate_text(item: Item) -> str:
    """`Title (year). Genre, Genre` (and a description when the data has one)."""
    genres = f". {', '.join(item.genres)}" if item.genres else ""
    desc = f". {item.description}" if item.description else ""
    return f"{item.label}{genres}{desc}"


def pair_text(profile: str, item: Item) -> str:
    """The cross scorer's input: the candidate first, then the profile (so truncation cuts the oldest title)."""
    return f"{candidate_text(item)} [SEP] {profile}"


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

    pairs_per_user: int = 4  # steps per user; each gives a positive and `negatives` negatives
    window: int = 30  # the steps are drawn from each user's last `window` fit interactions
    dev_users: int = 150  # dev pairs from the validation items of users after the full ranker's (see pipeline)
    layers: int = 3  # the bottom N layers of MiniLM (half the cost of all 6 per pair, at training and scoring)
    # NOTE: measured on the loaded 2 cores (docs/recommend.md): `top-layers:2` at lr 2e-4 and 5e-4 left the dev
    # loss near the 1:2 prior's 0.637 (0.630-0.633) after up to an epoch of 3,000 pairs (7 minutes); `head`
    # (features once through the engine, a linear head on standardized features) reached 0.603 on 11,316 pairs
    # in 4 minutes, so it is the default
    strategy: str = "head"
    epochs: float = 10.0
    lr: float = 1e-3
    batch_size: int = 32
    max_length: int = MAX_PAIR_TOKENS
    eval_steps: int | None = None  # None: the dev set is scored after every epoch
    metric: str = "accuracy"  # picks the kept checkpoint (macro-F1 picked an early, worse-loss one)
    seed: int = 0


def popularity_sampler(data: Dataset, interactions: Sequence[Interaction]) -> np.ndarray:
    """Sampling probability of each item, proportional to its interaction count (+1) in `interactions`."""
    counts = np.ones(len(data.items))
    for e in interactions:
        counts[data.item_index[e.item_id]] += 1
    return counts / counts.sum()


def sample_negatives(rng: np.random.Generator, rated: set[int], popularity: np.ndarray) -> tuple[int, int]:
    """(an item drawn uniformly, an item drawn by popularity), both never rated by the user. The uniform one
    is what the evaluation protocol's negatives look like; the popular one makes "is it well known" useless,
    so the model has to learn what this user likes."""
    picks = []
    for probs in (None, popularity):
        item = int(rng.choice(len(popularity), p=probs))
        while item in rated:
            item = int(rng.choice(len(popularity), p=probs))
        picks.append(item)
    return picks[0], picks[1]


def cross_training_rows(data: Dataset, fit: Sequence[Interaction], settings: CrossScorerSettings,
                        min_history: int = 3) -> list[dict[str, str]]:
    """From each user's fit interactions: for `pairs_per_user` random steps t among their last `window`,
    (profile before t, item t) -> yes, and (same profile, a uniform and a popularity-sampled item the user never
    rated) -> no. Only fit interactions (no validation or test target) are read."""
    rng = np.random.default_rng(settings.seed)
    popularity = popularity_sampler(data, fit)
    by_user: dict[str, list[Interaction]] = {}
    for e in fit:
        by_user.setdefault(e.user_id, []).append(e)
    rows = []
    for user_id in sorted(by_user):
        events = sorted(by_user[user_id], key=lambda e: e.timestamp)
        if len(events) <= min_history:
            continue
        rated = {data.item_index[e.item_id] for e in data.by_user[user_id]}
        first = max(min_history, len(events) - settings.window)
        steps = rng.choice(np.arange(first, len(events)), size=min(settings.pairs_per_user, len(events) - first),
                           replace=False)
        for t in sorted(int(s) for s in steps):
            past = events[:t]
            profile = profile_text([data.items[data.item_index[e.item_id]] for e in past], [e.rating for e in past])
            rows.append({"text": pair_text(profile, data.items[data.item_index[events[t].item_id]]), "label": POSITIVE})
            for negative in sample_negatives(rng, rated, popularity):
                rows.append({"text": pair_text(profile, data.items[negative]), "label": NEGATIVE})
    return rows


def cross_dev_rows(data: Dataset, cases: Sequence[Any], fit: Sequence[Interaction], seed: int
                   ) -> list[dict[str, str]]:
    """The dev set `pagellm finetune` evaluates during training: each case's validation target -> yes, and a
    uniform and a popularity-sampled never-rated item -> no, after the case's history."""
    rng = np.random.default_rng(seed + 1)
    popularity = popularity_sampler(data, fit)
    rows = []
    for case in cases:
        items = [data.items[data.item_index[e.item_id]] for e in case.history]
        profile = profile_text(items, [e.rating for e in case.history])
        rated = {data.item_index[e.item_id] for e in data.by_user[case.user_id]}
        rows.append({"text": pair_text(profile, data.items[case.candidates[0]]), "label": POSITIVE})
        for negative in sample_negatives(rng, rated, popularity):
            rows.append({"text": pair_text(profile, data.items[negative]), "label": NEGATIVE})
    return rows


def truncated_encoder(source: str | Path, layers: int, out_dir: Path) -> Path:
    """An HF folder holding the bottom `layers` layers of a BERT-family encoder (config, weights, tokenizer and
    its sentence-transformers pooling files): the cross scorer's base model."""
    from safetensors.torch import load_file, save_file

    source = Path(source)
    config = json.loads((source / "config.json").read_text())
    if not 1 <= layers <= int(config.get("num_hidden_layers", 0)):
        raise InvalidRequest(f"the encoder has {config.get('num_hidden_layers')} layers; cannot keep {layers}",
                             param="layers")
    if out_dir.exists():
        shutil.rmtree(out_dir)
    def skip(folder: str, names: list[str]) -> set[str]:  # the weights, and the top config (rewritten below)
        return {n for n in names if n.endswith((".safetensors", ".bin")) or
                (Path(folder) == source and n == "config.json")}

    shutil.copytree(source, out_dir, ignore=skip)
    config["num_hidden_layers"] = layers
    (out_dir / "config.json").write_text(json.dumps(config, indent=2))
    weights = {}
    for path in sorted(source.glob("*.safetensors")):
        for name, tensor in load_file(str(path)).items():
            match = _LAYER.search(name)
            if match is None or int(match.group(1)) < layers:
                weights[name] = tensor
    save_file(weights, str(out_dir / "model.safetensors"), metadata={"format": "pt"})
    return out_dir


_LAYER = re.compile(r"(?:^|\.)layer\.(\d+)\.")


def train_cross_scorer(rows: list[dict[str, str]], out_dir: Path, settings: CrossScorerSettings,
                       model: str | None = None, dev_rows: list[dict[str, str]] | None = None) -> dict[str, Any]:
    """`pagellm finetune` (its Python API) on the rows, evaluated on `dev_rows` every `eval_steps` (the best
    dev checkpoint is kept); returns timing, counts and the dev history for the report."""
    from pagellm.adapt.finetune import FinetuneArgs, run_finetune

    out_dir.mkdir(parents=True, exist_ok=True)
    data_path = out_dir / "cross_train.jsonl"
    data_path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    dev_path = None
    if dev_rows:
        dev_path = out_dir / "cross_dev.jsonl"
        dev_path.write_text("".join(json.dumps(r) + "\n" for r in dev_rows))
    t0 = time.perf_counter()
    with tempfile.TemporaryDirectory(prefix="cross_base_") as tmp:
        base = truncated_encoder(model or bundled_encoder(), settings.layers, Path(tmp) / "encoder")
        result = run_finetune(FinetuneArgs(
            data=str(data_path), eval_data=str(dev_path) if dev_path else None, out=str(out_dir / "finetuned"),
            model=str(base), task="classify", strategy=settings.strategy, epochs=settings.epochs, lr=settings.lr,
            batch_size=settings.batch_size, max_length=settings.max_length, seed=settings.seed,
            labels=[NEGATIVE, POSITIVE], eval_steps=settings.eval_steps if dev_path else None, metric=settings.metric,
            progress=False, overwrite=True))
    return {"pairs": len(rows), "dev_pairs": len(dev_rows or ()), "wall_s": round(time.perf_counter() - t0, 1),
            "steps": result.global_steps, "strategy": settings.strategy,
            f"best_dev_{settings.metric}": result.best_metric, "dev_history": result.history}


class CrossScorer:
    """The fine-tuned classifier folder in the engine: P(yes) for each (profile, candidate) pair."""

    def __init__(self, model_dir: str | Path) -> None:
        from pagellm import LLM

        self.llm = LLM(str(model_dir), task="classify", dtype="float32")
        probe = self.llm.classify(["probe"], use_tqdm=False)[0].outputs
        self.positive_index = probe.labels.index(POSITIVE)

    def score(self, texts: Sequence[str]) -> np.ndarray:
        """One classify call for all the texts (the engine packs them into as few forwards as fit)."""
        if not texts:
            return np.zeros(0, dtype=np.float32)
        outs = self.llm.classify(list(texts), truncate_prompt_tokens=MAX_PAIR_TOKENS, use_tqdm=False)
        return np.asarray([o.outputs.probs[self.positive_index] for o in outs], dtype=np.float32)
