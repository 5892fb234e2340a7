"""RecommendStore on PostgreSQL with pgvector: the same calls as SQLiteStore, item vectors in a `vector(dim)`
column (so other services can query them with pgvector's operators, e.g. `ORDER BY vector <=> $1`).

`pagellm recommend train --store postgresql://user@host/dbname` selects it; the model folder's config.json then
names the database instead of store.sqlite.
"""

from __future__ import annotations

import json
from collections.abc import Sequence

import numpy as np

from pagellm.apps.recommend.data import Interaction, Item
from pagellm.apps.web import open_postgres

_SCHEMA = """
CREATE EXTENSION IF NOT EXISTS vector;
CREATE TABLE IF NOT EXISTS recommend_items (idx INTEGER PRIMARY KEY, item_id TEXT UNIQUE NOT NULL, title TEXT,
    year TEXT, genres TEXT, description TEXT, vector vector);
CREATE TABLE IF NOT EXISTS recommend_interactions (seq BIGSERIAL PRIMARY KEY, user_id TEXT NOT NULL,
    item_id TEXT NOT NULL, rating DOUBLE PRECISION NOT NULL, timestamp DOUBLE PRECISION NOT NULL);
"""


class PostgresStore:
    """RecommendStore in a PostgreSQL database (tables prefixed recommend_); one connection, serialized."""

    def __init__(self, uri: str) -> None:
        self._db, self._lock = open_postgres(uri, _SCHEMA)

    def save_items(self, items: Sequence[Item], vectors: np.ndarray) -> None:
        assert len(items) == vectors.shape[0], "one vector per item"
        rows = [(i, it.item_id, it.title, it.year, json.dumps(list(it.genres)), it.description,
                 "[" + ",".join(repr(float(x)) for x in vectors[i]) + "]") for i, it in enumerate(items)]
        with self._lock, self._db.transaction():
            self._db.execute("DELETE FROM recommend_items")
            with self._db.cursor() as cur:
                cur.executemany("INSERT INTO recommend_items VALUES (%s, %s, %s, %s, %s, %s, %s::vector)", rows)

    def items(self) -> list[Item]:
        with self._lock:
            rows = self._db.execute("SELECT item_id, title, year, genres, description FROM recommend_items "
                                    "ORDER BY idx").fetchall()
        return [Item(r[0], r[1], r[2], tuple(json.loads(r[3])), r[4]) for r in rows]

    def item_vectors(self) -> np.ndarray:
        with self._lock:
            rows = self._db.execute("SELECT vector::real[] FROM recommend_items ORDER BY idx").fetchall()
        if not rows:
            return np.zeros((0, 0), dtype=np.float32)
        return np.asarray([r[0] for r in rows], dtype=np.float32)

    def save_interactions(self, interactions: Sequence[Interaction]) -> None:
        with self._lock, self._db.transaction():
            self._db.execute("DELETE FROM recommend_interactions")
            with self._db.cursor() as cur:
                cur.executemany("INSERT INTO recommend_interactions (user_id, item_id, rating, timestamp) "
                                "VALUES (%s, %s, %s, %s)",
                                [(e.user_id, e.item_id, e.rating, e.timestamp) for e in interactions])

    def interactions(self) -> list[Interaction]:
        with self._lock:
            rows = self._db.execute("SELECT user_id, item_id, rating, timestamp FROM recommend_interactions "
                                    "ORDER BY seq").fetchall()
        return [Interaction(*r) for r in rows]

    def close(self) -> None:
        self._db.close()
