"""Interactions and item text: MovieLens-100k from the installed `recbole` wheel (never downloaded) or a user's
own `interactions.csv` + `items.jsonl`; the leave-last-out protocol with sampled negatives.

Protocol (the common one for MovieLens-100k): each user's interactions are ordered by timestamp; the last is
the test target, the second-to-last the validation target (the learned ranker trains on it, so nothing it sees
touches the test); each target is ranked among `num_negatives` items the user never rated, drawn with a fixed
seed. HR@10 / NDCG@10 over the users.
"""

from __future__ import annotations

import csv
from dataclasses import dataclass, field
from importlib import resources
from pathlib import Path

import numpy as np

from pagellm.apps.files import jsonl_objects
from pagellm.errors import InvalidRequest

MOVIELENS_100K = "movielens-100k"
DATASETS = (MOVIELENS_100K,)


@dataclass(frozen=True)
class Item:
    """One item: its id, title and the text the models read."""

    item_id: str
    title: str
    year: str = ""
    genres: tuple[str, ...] = ()
    description: str = ""

    @property
    def label(self) -> str:
        """`Title (year)`: what a person types to name the item (API histories match on it)."""
        return f"{self.title} ({self.year})" if self.year else self.title

    @property
    def text(self) -> str:
        genres = f" Genres: {', '.join(self.genres)}." if self.genres else ""
        desc = f" {self.description}" if self.description else ""
        return f"{self.label}.{genres}{desc}"


@dataclass(frozen=True)
class Interaction:
    user_id: str
    item_id: str
    rating: float
    timestamp: float


@dataclass
class Dataset:
    """Items (row order = item index everywhere) and interactions, grouped per user by time."""

    items: list[Item]
    interactions: list[Interaction]
    name: str = "custom"
    item_index: dict[str, int] = field(init=False)
    by_user: dict[str, list[Interaction]] = field(init=False)

    def __post_init__(self) -> None:
        self.item_index = {item.item_id: i for i, item in enumerate(self.items)}
        self.by_user = {}
        for it in self.interactions:
            self.by_user.setdefault(it.user_id, []).append(it)
        for events in self.by_user.values():
            # NOTE: ties in time keep the file order (stable sort): the split is deterministic
            events.sort(key=lambda e: e.timestamp)

    @property
    def user_ids(self) -> list[str]:
        return sorted(self.by_user, key=_natural_key)

    def slice_users(self, num_users: int, only_rated_items: bool = False) -> Dataset:
        """The first `num_users` users (natural id order), with all items or only those they rated: the tests'
        small slice."""
        keep = set(self.user_ids[:num_users])
        inter = [i for i in self.interactions if i.user_id in keep]
        items = self.items
        if only_rated_items:
            rated = {i.item_id for i in inter}
            items = [item for item in self.items if item.item_id in rated]
        return Dataset(items, inter, self.name)


def _natural_key(user_id: str) -> tuple[int, str]:
    return (int(user_id), "") if user_id.isdigit() else (1 << 62, user_id)


def movielens_dir() -> Path:
    """The ml-100k folder inside the installed recbole wheel (`pip install --no-deps recbole==1.2.1`)."""
    try:
        root = resources.files("recbole")
    except ModuleNotFoundError as exc:
        raise InvalidRequest("MovieLens-100k ships in the recbole wheel: pip install --no-deps recbole==1.2.1",
                             param="data") from exc
    return Path(str(root)) / "dataset_example" / "ml-100k"


def load_movielens_100k() -> Dataset:
    folder = movielens_dir()
    items = []
    for row in _read_atomic(folder / "ml-100k.item"):
        genres = tuple(row["class"].split()) if row.get("class") else ()
        items.append(Item(row["item_id"], row["movie_title"].strip(), row.get("release_year", "").strip(), genres))
    inter = [Interaction(r["user_id"], r["item_id"], float(r["rating"]), float(r["timestamp"]))
             for r in _read_atomic(folder / "ml-100k.inter")]
    return Dataset(items, inter, MOVIELENS_100K)


def _read_atomic(path: Path) -> list[dict[str, str]]:
    """RecBole's atomic files: tab-separated, a header of `name:type` columns."""
    with open(path, encoding="utf-8") as f:
        header = [h.split(":")[0] for h in f.readline().rstrip("\n").split("\t")]
        return [dict(zip(header, line.rstrip("\n").split("\t"))) for line in f if line.strip()]


def load_custom(interactions_csv: str, items_jsonl: str) -> Dataset:
    """`interactions.csv` with user_id,item_id[,rating][,timestamp] and `items.jsonl` lines {"item_id", "title",
    "year"?, "genres"?, "description"?}; every problem names the file and row."""
    items, seen = [], set()
    for n, obj in jsonl_objects(items_jsonl, "items"):
        if not isinstance(obj, dict) or not str(obj.get("item_id", "")).strip() or \
                not str(obj.get("title", "")).strip():
            raise InvalidRequest(f"{items_jsonl} line {n}: an item needs item_id and title", param="items")
        genres = obj.get("genres") or ()
        items.append(Item(str(obj["item_id"]), str(obj["title"]), str(obj.get("year") or ""),
                          tuple(genres.split("|") if isinstance(genres, str) else genres),
                          str(obj.get("description") or "")))
        seen.add(str(obj["item_id"]))
    inter = []
    with open(interactions_csv, encoding="utf-8", newline="") as f:
        reader = csv.DictReader(f)
        if not reader.fieldnames or not {"user_id", "item_id"} <= set(reader.fieldnames):
            raise InvalidRequest(f"{interactions_csv}: the header needs user_id and item_id", param="interactions")
        for n, row in enumerate(reader, 2):
            if row["item_id"] not in seen:
                raise InvalidRequest(f"{interactions_csv} row {n}: item {row['item_id']!r} is not in {items_jsonl}",
                                     param="interactions")
            try:
                inter.append(Interaction(row["user_id"], row["item_id"], float(row.get("rating") or 1.0),
                                         float(row.get("timestamp") or n)))
            except ValueError as exc:
                raise InvalidRequest(f"{interactions_csv} row {n}: {exc}", param="interactions") from exc
    if not inter:
        raise InvalidRequest(f"{interactions_csv} has no interactions", param="interactions")
    return Dataset(items, inter)


@dataclass(frozen=True)
class Case:
    """One ranking case: a user's history before the target, and the candidates (target first)."""

    user_id: str
    history: list[Interaction]  # time order, oldest first
    candidates: list[int]  # item indices; candidates[0] is the held-out target


@dataclass
class Split:
    """Per-user test and validation cases, and the interactions each stage may fit on."""

    test: list[Case]
    valid: list[Case]
    train: list[Interaction]  # all but each user's last: what test-time models fit on
    fit: list[Interaction]  # all but each user's last two: what validation-time models fit on


def leave_last_out(data: Dataset, num_negatives: int = 99, num_valid_negatives: int = 19, seed: int = 0,
                   min_history: int = 3) -> Split:
    """The leave-last-out split; users with fewer than `min_history` + 2 interactions keep them all for
    training and are not evaluated (none in MovieLens-100k: every user there rated at least 20 movies)."""
    rng = np.random.default_rng(seed)
    num_items = len(data.items)
    test, valid, train, fit = [], [], [], []
    for user_id in data.user_ids:
        events = data.by_user[user_id]
        if len(events) < min_history + 2:
            train += events
            fit += events
            continue
        rated = {data.item_index[e.item_id] for e in events}
        train += events[:-1]
        fit += events[:-2]
        test.append(Case(user_id, events[:-1], [data.item_index[events[-1].item_id]] +
                         _sample_unrated(rng, num_items, rated, num_negatives)))
        valid.append(Case(user_id, events[:-2], [data.item_index[events[-2].item_id]] +
                          _sample_unrated(rng, num_items, rated, num_valid_negatives)))
    return Split(test, valid, train, fit)


def _sample_unrated(rng: np.random.Generator, num_items: int, rated: set[int], num: int) -> list[int]:
    pool = np.array(sorted(set(range(num_items)) - rated))
    if len(pool) < num:
        raise InvalidRequest(f"a user rated all but {len(pool)} items; {num} negatives are needed",
                             param="num_negatives")
    return [int(i) for i in rng.choice(pool, size=num, replace=False)]
