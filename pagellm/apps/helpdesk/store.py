"""What the help desk keeps: entries with their content hashes, their vectors (dense search), their stemmed
words (BM25 lexical search), conversation sessions and feedback.

`HelpdeskStore` is the interface. `EmbeddedStore` is the default: faiss (an exact inner-product index, ids
mapped to SQLite rows) in `vectors.faiss` plus one SQLite file with the texts, an FTS5 table for BM25, sessions
and feedback. `store_postgres.PostgresStore` keeps the same in PostgreSQL with pgvector.

Each entry has one vector per embedded field (e.g. its question alone and question + answer); an entry's dense
score is the max over its vectors.
"""

from __future__ import annotations

import json
import sqlite3
import threading
import time
import uuid
from pathlib import Path
from typing import Any, Protocol

import numpy as np

from pagellm.apps.helpdesk.kb import Entry

# BM25 constants, those of SQLite FTS5's bm25() (PostgresStore computes the same formula in SQL)
BM25_K1, BM25_B = 1.2, 0.75


class HelpdeskStore(Protocol):
    """Storage of one help desk index (embedded default; PostgresStore implements the same calls)."""

    def hashes(self) -> dict[str, str]: ...
    def upsert(self, entries: list[Entry], vectors: np.ndarray, fields: list[str], tokens: list[list[str]]) -> None:
        """Insert or replace `entries`; vectors is [num_entries, num_fields, dim] float32, L2-normalized."""
    def remove(self, ids: list[str]) -> None: ...
    def dense_search(self, query: np.ndarray, k: int) -> list[tuple[str, float]]: ...
    def lexical_search(self, tokens: list[str], k: int) -> list[tuple[str, float]]: ...
    def entries(self, ids: list[str]) -> dict[str, Entry]: ...
    def count(self) -> int: ...
    def create_session(self) -> str: ...
    def has_session(self, session_id: str) -> bool: ...
    def add_turn(self, session_id: str, role: str, content: str, meta: dict[str, Any] | None = None) -> int: ...
    def turns(self, session_id: str, limit: int = 20) -> list[dict[str, Any]]: ...
    def add_feedback(self, session_id: str | None, turn_id: int | None, rating: int, comment: str) -> int: ...
    def feedback(self, limit: int = 100) -> list[dict[str, Any]]: ...
    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS entries (id TEXT PRIMARY KEY, question TEXT NOT NULL, answer TEXT NOT NULL,
    source TEXT NOT NULL, section TEXT NOT NULL, hash TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS vectors (vid INTEGER PRIMARY KEY AUTOINCREMENT, entry_id TEXT NOT NULL, field TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS vectors_entry ON vectors(entry_id);
CREATE VIRTUAL TABLE IF NOT EXISTS lexical USING fts5(entry_id UNINDEXED, body, tokenize='unicode61');
CREATE TABLE IF NOT EXISTS sessions (id TEXT PRIMARY KEY, created REAL NOT NULL);
CREATE TABLE IF NOT EXISTS turns (turn_id INTEGER PRIMARY KEY AUTOINCREMENT, session_id TEXT NOT NULL,
    created REAL NOT NULL, role TEXT NOT NULL, content TEXT NOT NULL, meta TEXT NOT NULL);
CREATE INDEX IF NOT EXISTS turns_session ON turns(session_id, turn_id);
CREATE TABLE IF NOT EXISTS feedback (feedback_id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL,
    session_id TEXT, turn_id INTEGER, rating INTEGER NOT NULL, comment TEXT NOT NULL);
"""


class EmbeddedStore:
    """HelpdeskStore in a folder: `helpdesk.sqlite` (WAL) + `vectors.faiss`; safe to call from several threads."""

    def __init__(self, folder: str | Path, dim: int) -> None:
        import faiss

        self.folder = Path(folder)
        self.folder.mkdir(parents=True, exist_ok=True)
        self.dim = dim
        self._lock = threading.Lock()
        self._db = sqlite3.connect(str(self.folder / "helpdesk.sqlite"), check_same_thread=False,
                                   isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)
        self._faiss_path = self.folder / "vectors.faiss"
        if self._faiss_path.exists():
            self._index = faiss.read_index(str(self._faiss_path))
            assert self._index.d == dim, f"{self._faiss_path} holds {self._index.d}-d vectors, the encoder gives {dim}"
        else:
            self._index = faiss.IndexIDMap2(faiss.IndexFlatIP(dim))  # exact: a FAQ is thousands, not millions
        self._vid_entry = dict(self._db.execute("SELECT vid, entry_id FROM vectors").fetchall())

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    # ---- the index -------------------------------------------------------------------------
    def hashes(self) -> dict[str, str]:
        return dict(self._query("SELECT id, hash FROM entries"))

    def count(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM entries")[0][0])

    def upsert(self, entries: list[Entry], vectors: np.ndarray, fields: list[str], tokens: list[list[str]]) -> None:
        assert vectors.shape == (len(entries), len(fields), self.dim), f"vectors {vectors.shape}"
        self.remove([e.id for e in entries])
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                vids, rows = [], []
                for entry, entry_vectors, words in zip(entries, vectors, tokens):
                    cur.execute("INSERT INTO entries VALUES (?, ?, ?, ?, ?, ?)", (entry.id, entry.question,
                                entry.answer, entry.source, entry.section, entry.content_hash()))
                    cur.execute("INSERT INTO lexical (entry_id, body) VALUES (?, ?)", (entry.id, " ".join(words)))
                    for field, vector in zip(fields, entry_vectors):
                        cur.execute("INSERT INTO vectors (entry_id, field) VALUES (?, ?)", (entry.id, field))
                        vids.append(int(cur.lastrowid or 0))
                        rows.append(vector)
                        self._vid_entry[vids[-1]] = entry.id
                if rows:
                    self._index.add_with_ids(np.asarray(rows, dtype=np.float32), np.asarray(vids, dtype=np.int64))
                self._save_faiss()
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise

    def remove(self, ids: list[str]) -> None:
        if not ids:
            return
        with self._lock:
            marks = ",".join("?" * len(ids))
            vids = [r[0] for r in self._db.execute(f"SELECT vid FROM vectors WHERE entry_id IN ({marks})", ids)]
            self._db.execute("BEGIN IMMEDIATE")
            for table, column in (("entries", "id"), ("vectors", "entry_id"), ("lexical", "entry_id")):
                self._db.execute(f"DELETE FROM {table} WHERE {column} IN ({marks})", ids)
            if vids:
                self._index.remove_ids(np.asarray(vids, dtype=np.int64))
                for vid in vids:
                    self._vid_entry.pop(vid, None)
                self._save_faiss()
            self._db.execute("COMMIT")

    def _save_faiss(self) -> None:
        import faiss

        tmp = self._faiss_path.with_suffix(".tmp")
        faiss.write_index(self._index, str(tmp))
        tmp.replace(self._faiss_path)  # NOTE: atomic: a reader never sees half an index

    def dense_search(self, query: np.ndarray, k: int) -> list[tuple[str, float]]:
        if self._index.ntotal == 0:
            return []
        q = np.asarray(query, dtype=np.float32).reshape(1, -1)
        # every vector of an entry may rank before its best one: ask for enough to fill k entries
        scores, vids = self._index.search(q, min(self._index.ntotal, k * 4 + 8))
        best: dict[str, float] = {}
        for score, vid in zip(scores[0], vids[0]):
            entry_id = self._vid_entry.get(int(vid))
            if entry_id is not None and entry_id not in best:
                best[entry_id] = float(score)
        return sorted(best.items(), key=lambda kv: (-kv[1], kv[0]))[:k]

    def lexical_search(self, tokens: list[str], k: int) -> list[tuple[str, float]]:
        terms = sorted(set(tokens))
        if not terms:
            return []
        match = " OR ".join(f'"{t}"' for t in terms)
        # NOTE: FTS5's bm25() is negative (lower is better); the store returns it positive like PostgresStore
        rows = self._query("SELECT entry_id, -bm25(lexical) AS s FROM lexical WHERE lexical MATCH ? "
                           "ORDER BY s DESC, entry_id LIMIT ?", (match, k))
        return [(str(i), float(s)) for i, s in rows]

    def entries(self, ids: list[str]) -> dict[str, Entry]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        rows = self._query(f"SELECT id, question, answer, source, section FROM entries WHERE id IN ({marks})",
                           tuple(ids))
        return {r[0]: Entry(*r) for r in rows}

    # ---- sessions and feedback --------------------------------------------------------------
    def create_session(self) -> str:
        session_id = uuid.uuid4().hex
        self._query("INSERT INTO sessions VALUES (?, ?)", (session_id, time.time()))
        return session_id

    def has_session(self, session_id: str) -> bool:
        return bool(self._query("SELECT 1 FROM sessions WHERE id = ?", (session_id,)))

    def add_turn(self, session_id: str, role: str, content: str, meta: dict[str, Any] | None = None) -> int:
        with self._lock:
            cur = self._db.execute("INSERT INTO turns (session_id, created, role, content, meta) "
                                   "VALUES (?, ?, ?, ?, ?)",
                                   (session_id, time.time(), role, content, json.dumps(meta or {})))
            return int(cur.lastrowid or 0)

    def turns(self, session_id: str, limit: int = 20) -> list[dict[str, Any]]:
        rows = self._query("SELECT turn_id, role, content, meta FROM turns WHERE session_id = ? "
                           "ORDER BY turn_id DESC LIMIT ?", (session_id, limit))
        return [{"turn_id": t, "role": r, "content": c, "meta": json.loads(m)} for t, r, c, m in reversed(rows)]

    def add_feedback(self, session_id: str | None, turn_id: int | None, rating: int, comment: str) -> int:
        with self._lock:
            cur = self._db.execute("INSERT INTO feedback (created, session_id, turn_id, rating, comment) "
                                   "VALUES (?, ?, ?, ?, ?)", (time.time(), session_id, turn_id, rating, comment))
            return int(cur.lastrowid or 0)

    def feedback(self, limit: int = 100) -> list[dict[str, Any]]:
        rows = self._query("SELECT feedback_id, session_id, turn_id, rating, comment FROM feedback "
                           "ORDER BY feedback_id DESC LIMIT ?", (limit,))
        return [{"feedback_id": f, "session_id": s, "turn_id": t, "rating": r, "comment": c} for f, s, t, r, c in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_store(folder: str | Path, dim: int, uri: str | None = None) -> HelpdeskStore:
    """A postgresql:// `uri` opens PostgresStore (psycopg + pgvector); otherwise the embedded store in `folder`."""
    if uri and uri.startswith(("postgresql://", "postgres://")):
        from pagellm.apps.helpdesk.store_postgres import PostgresStore

        return PostgresStore(uri, dim)
    return EmbeddedStore(folder, dim)
