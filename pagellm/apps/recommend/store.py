"""What a trained recommender keeps: items with their text vectors and the interactions, in one interface.

`RecommendStore` is the Protocol; `SQLiteStore` the embedded default (vectors as float32 blobs, loaded into one
numpy matrix for scoring: 1,682 x 384 floats is 2.6 MB, so exact cosine over all of them is cheaper than an index).
"""

from __future__ import annotations

import json
import sqlite3
from collections.abc import Sequence
from pathlib import Path
from typing import Protocol

import numpy as np

from pagellm.apps.recommend.data import Interaction, Item


class RecommendStore(Protocol):
    """Storage of one recommender (the embedded SQLite default; another backend implements the same calls)."""

    def save_items(self, items: Sequence[Item], vectors: np.ndarray) -> None: ...
    def items(self) -> list[Item]: ...
    def item_vectors(self) -> np.ndarray: ...
    def save_interactions(self, interactions: Sequence[Interaction]) -> None: ...
    def interactions(self) -> list[Interaction]: ...
    def close(self) -> None: ...


class SQLiteStore:
    """One SQLite file: items (row order = item index), their vectors, interactions."""

    def __init__(self, path: str | Path) -> None:
        self.conn = sqlite3.connect(str(path), check_same_thread=False)
        self.conn.executescript("""
            CREATE TABLE IF NOT EXISTS items (idx INTEGER PRIMARY KEY, item_id TEXT UNIQUE NOT NULL, title TEXT,
                year TEXT, genres TEXT, description TEXT, dim INTEGER, vector BLOB);
            CREATE TABLE IF NOT EXISTS interactions (user_id TEXT, item_id TEXT, rating REAL, timestamp REAL);
        """)

    def save_items(self, items: Sequence[Item], vectors: np.ndarray) -> None:
        assert len(items) == vectors.shape[0], "one vector per item"
        vectors = np.ascontiguousarray(vectors, dtype=np.float32)
        with self.conn:
            self.conn.execute("DELETE FROM items")
            self.conn.executemany("INSERT INTO items VALUES (?, ?, ?, ?, ?, ?, ?, ?)", [
                (i, it.item_id, it.title, it.year, json.dumps(list(it.genres)), it.description, vectors.shape[1],
                 vectors[i].tobytes()) for i, it in enumerate(items)])

    def items(self) -> list[Item]:
        rows = self.conn.execute("SELECT item_id, title, year, genres, description FROM items ORDER BY idx")
        return [Item(r[0], r[1], r[2], tuple(json.loads(r[3])), r[4]) for r in rows]

    def item_vectors(self) -> np.ndarray:
        rows = self.conn.execute("SELECT dim, vector FROM items ORDER BY idx").fetchall()
        if not rows:
            return np.zeros((0, 0), dtype=np.float32)
        return np.stack([np.frombuffer(blob, dtype=np.float32, count=dim) for dim, blob in rows])

    def save_interactions(self, interactions: Sequence[Interaction]) -> None:
        with self.conn:
            self.conn.execute("DELETE FROM interactions")
            self.conn.executemany("INSERT INTO interactions VALUES (?, ?, ?, ?)",
                                  [(e.user_id, e.item_id, e.rating, e.timestamp) for e in interactions])

    def interactions(self) -> list[Interaction]:
        rows = self.conn.execute("SELECT user_id, item_id, rating, timestamp FROM interactions ORDER BY rowid")
        return [Interaction(*r) for r in rows]

    def close(self) -> None:
        self.conn.close()


def open_store(location: str | Path) -> RecommendStore:
    """A SQLite file path, or a postgresql:// URI (PostgreSQL with pgvector)."""
    if str(location).startswith(("postgresql://", "postgres://")):
        from pagellm.apps.recommend.store_postgres import PostgresStore

        return PostgresStore(str(location))
    return SQLiteStore(location)
