"""HelpdeskStore on PostgreSQL with pgvector (psycopg 3), for a help desk several servers share or whose
knowledge base outgrows one machine's disk: `pagellm helpdesk index|serve --store postgresql://...`.

Dense search is pgvector's exact inner product (`<#>`); a large base adds an HNSW index on the vector column.
Lexical search is BM25 computed in SQL over a (entry, term, count) table with the constants and idf of SQLite
FTS5's bm25(), on the same stemmed tokens, so both stores rank the same entries the same way.
"""

from __future__ import annotations

import json
import time
import uuid
from typing import Any

import numpy as np

from pagellm.apps.helpdesk.kb import Entry
from pagellm.apps.helpdesk.store import BM25_B, BM25_K1
from pagellm.apps.web import open_postgres

_SCHEMA = """
CREATE EXTENSION IF NOT EXISTS vector;
CREATE TABLE IF NOT EXISTS helpdesk_entries (id TEXT PRIMARY KEY, question TEXT NOT NULL, answer TEXT NOT NULL,
    source TEXT NOT NULL, section TEXT NOT NULL, hash TEXT NOT NULL, num_tokens INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS helpdesk_vectors (entry_id TEXT NOT NULL REFERENCES helpdesk_entries(id) ON DELETE CASCADE,
    field TEXT NOT NULL, embedding vector({dim}) NOT NULL, PRIMARY KEY (entry_id, field));
CREATE TABLE IF NOT EXISTS helpdesk_terms (entry_id TEXT NOT NULL REFERENCES helpdesk_entries(id) ON DELETE CASCADE,
    term TEXT NOT NULL, tf INTEGER NOT NULL, PRIMARY KEY (term, entry_id));
CREATE TABLE IF NOT EXISTS helpdesk_sessions (id TEXT PRIMARY KEY, created DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS helpdesk_turns (turn_id BIGSERIAL PRIMARY KEY, session_id TEXT NOT NULL,
    created DOUBLE PRECISION NOT NULL, role TEXT NOT NULL, content TEXT NOT NULL, meta TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS helpdesk_feedback (feedback_id BIGSERIAL PRIMARY KEY, created DOUBLE PRECISION NOT NULL,
    session_id TEXT, turn_id BIGINT, rating INTEGER NOT NULL, comment TEXT NOT NULL);
"""

# NOTE: FTS5's idf is ln((N - n + 0.5) / (n + 0.5)), floored at 1e-6 for terms in more than half the entries
_BM25 = f"""
WITH q AS (SELECT DISTINCT unnest(%s::text[]) AS term),
stats AS (SELECT COUNT(*)::float8 AS n, AVG(num_tokens)::float8 AS avgdl FROM helpdesk_entries),
df AS (SELECT t.term, COUNT(*)::float8 AS df FROM helpdesk_terms t JOIN q ON q.term = t.term GROUP BY t.term)
SELECT t.entry_id, SUM(GREATEST(LN((s.n - df.df + 0.5) / (df.df + 0.5)), 1e-6)
    * t.tf * {BM25_K1 + 1} / (t.tf + {BM25_K1} * (1 - {BM25_B} + {BM25_B} * e.num_tokens / s.avgdl))) AS score
FROM helpdesk_terms t JOIN df ON df.term = t.term JOIN helpdesk_entries e ON e.id = t.entry_id CROSS JOIN stats s
GROUP BY t.entry_id ORDER BY score DESC, t.entry_id LIMIT %s
"""


def _vector_literal(vector: np.ndarray) -> str:
    return "[" + ",".join(repr(float(x)) for x in np.asarray(vector, dtype=np.float32)) + "]"


class PostgresStore:
    """HelpdeskStore in a PostgreSQL database (tables prefixed helpdesk_); one connection, serialized."""

    def __init__(self, uri: str, dim: int) -> None:
        self.dim = dim
        self._db, self._lock = open_postgres(uri, _SCHEMA.replace("{dim}", str(int(dim))))

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            cur = self._db.execute(sql, args)
            return cur.fetchall() if cur.description else []

    def hashes(self) -> dict[str, str]:
        return dict(self._query("SELECT id, hash FROM helpdesk_entries"))

    def count(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM helpdesk_entries")[0][0])

    def upsert(self, entries: list[Entry], vectors: np.ndarray, fields: list[str], tokens: list[list[str]]) -> None:
        assert vectors.shape == (len(entries), len(fields), self.dim), f"vectors {vectors.shape}"
        with self._lock, self._db.transaction(), self._db.cursor() as cur:
            cur.execute("DELETE FROM helpdesk_entries WHERE id = ANY(%s)", ([e.id for e in entries],))
            cur.executemany("INSERT INTO helpdesk_entries VALUES (%s, %s, %s, %s, %s, %s, %s)",
                            [(e.id, e.question, e.answer, e.source, e.section, e.content_hash(), len(words))
                             for e, words in zip(entries, tokens)])
            cur.executemany("INSERT INTO helpdesk_vectors VALUES (%s, %s, %s::vector)",
                            [(e.id, f, _vector_literal(v)) for e, ev in zip(entries, vectors)
                             for f, v in zip(fields, ev)])
            cur.executemany("INSERT INTO helpdesk_terms VALUES (%s, %s, %s)",
                            [(e.id, term, words.count(term)) for e, words in zip(entries, tokens)
                             for term in sorted(set(words))])

    def remove(self, ids: list[str]) -> None:
        if ids:
            self._query("DELETE FROM helpdesk_entries WHERE id = ANY(%s)", (ids,))

    def dense_search(self, query: np.ndarray, k: int) -> list[tuple[str, float]]:
        # NOTE: <#> is the negative inner product; max over an entry's vectors, like the embedded store
        rows = self._query("SELECT entry_id, MAX(-(embedding <#> %s::vector)) AS s FROM helpdesk_vectors "
                           "GROUP BY entry_id ORDER BY s DESC, entry_id LIMIT %s", (_vector_literal(query), k))
        return [(str(i), float(s)) for i, s in rows]

    def lexical_search(self, tokens: list[str], k: int) -> list[tuple[str, float]]:
        terms = sorted(set(tokens))
        if not terms:
            return []
        return [(str(i), float(s)) for i, s in self._query(_BM25, (terms, k))]

    def entries(self, ids: list[str]) -> dict[str, Entry]:
        if not ids:
            return {}
        rows = self._query("SELECT id, question, answer, source, section FROM helpdesk_entries WHERE id = ANY(%s)",
                           (ids,))
        return {r[0]: Entry(*r) for r in rows}

    def create_session(self) -> str:
        session_id = uuid.uuid4().hex
        self._query("INSERT INTO helpdesk_sessions VALUES (%s, %s)", (session_id, time.time()))
        return session_id

    def has_session(self, session_id: str) -> bool:
        return bool(self._query("SELECT 1 FROM helpdesk_sessions WHERE id = %s", (session_id,)))

    def add_turn(self, session_id: str, role: str, content: str, meta: dict[str, Any] | None = None) -> int:
        return int(self._query("INSERT INTO helpdesk_turns (session_id, created, role, content, meta) VALUES "
                               "(%s, %s, %s, %s, %s) RETURNING turn_id",
                               (session_id, time.time(), role, content, json.dumps(meta or {})))[0][0])

    def turns(self, session_id: str, limit: int = 20) -> list[dict[str, Any]]:
        rows = self._query("SELECT turn_id, role, content, meta FROM helpdesk_turns WHERE session_id = %s "
                           "ORDER BY turn_id DESC LIMIT %s", (session_id, limit))
        return [{"turn_id": int(t), "role": r, "content": c, "meta": json.loads(m)} for t, r, c, m in reversed(rows)]

    def add_feedback(self, session_id: str | None, turn_id: int | None, rating: int, comment: str) -> int:
        return int(self._query("INSERT INTO helpdesk_feedback (created, session_id, turn_id, rating, comment) "
                               "VALUES (%s, %s, %s, %s, %s) RETURNING feedback_id",
                               (time.time(), session_id, turn_id, rating, comment))[0][0])

    def feedback(self, limit: int = 100) -> list[dict[str, Any]]:
        rows = self._query("SELECT feedback_id, session_id, turn_id, rating, comment FROM helpdesk_feedback "
                           "ORDER BY feedback_id DESC LIMIT %s", (limit,))
        return [{"feedback_id": int(f), "session_id": s, "turn_id": t, "rating": r, "comment": c}
                for f, s, t, r, c in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
