"""What the monitor keeps: classified texts, per-source offsets, the detector's state and the alerts.

`MonitorStore` is the interface; `SQLiteStore` the embedded default. One `commit_batch` call writes a
batch's results, the source offset after it and the detector state in one transaction, so a monitor
killed at any point restarts exactly after the last committed batch: no text classified twice or skipped.
"""

from __future__ import annotations

import json
import sqlite3
import threading
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any, Protocol

from pagellm.apps.monitor.detector import Alert, TopicState


@dataclass(frozen=True)
class TextResult:
    """One classified text of the stream."""

    seq: int  # position in the monitor's stream (0, 1, ...), over all sources
    id: str
    time: float  # the text's own time (seconds since the epoch) or its arrival time
    text: str
    topic: str
    sentiment: str
    negative_prob: float


@dataclass(frozen=True)
class StoredAlert:
    """An alert as stored: the detector's Alert, its row id, creation time and webhook delivery state."""

    alert_id: int
    created: float
    delivered: bool
    alert: Alert

    def to_json(self, texts: dict[str, str] | None = None) -> dict[str, Any]:
        out = {"alert_id": self.alert_id, "created": self.created, "delivered": self.delivered, **asdict(self.alert)}
        if texts is not None:
            out["texts"] = [{"id": i, "text": texts.get(i, "")} for i in self.alert.text_ids]
        return out


class MonitorStore(Protocol):
    """Storage of one monitor (the embedded SQLite default; any other backend implements the same calls)."""

    def offset(self, source: str) -> int: ...
    def next_seq(self) -> int: ...
    def known_ids(self, ids: list[str]) -> set[str]: ...
    def load_detector(self) -> dict[str, TopicState]: ...
    def commit_batch(self, results: list[TextResult], source: str | None, offset: int | None,
                     states: dict[str, TopicState], alerts: list[tuple[float, Alert]]) -> list[StoredAlert]: ...
    def alerts(self, limit: int = 100, undelivered_only: bool = False) -> list[StoredAlert]: ...
    def mark_delivered(self, alert_id: int) -> None: ...
    def texts_by_id(self, ids: list[str]) -> dict[str, str]: ...
    def series(self, bucket: int) -> list[dict[str, Any]]: ...
    def count(self) -> int: ...
    def close(self) -> None: ...


_SCHEMA = """
CREATE TABLE IF NOT EXISTS texts (seq INTEGER PRIMARY KEY, id TEXT UNIQUE NOT NULL, time REAL NOT NULL,
    text TEXT NOT NULL, topic TEXT NOT NULL, sentiment TEXT NOT NULL, negative_prob REAL NOT NULL);
CREATE TABLE IF NOT EXISTS offsets (source TEXT PRIMARY KEY, offset INTEGER NOT NULL);
CREATE TABLE IF NOT EXISTS detector (topic TEXT PRIMARY KEY, state TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS alerts (alert_id INTEGER PRIMARY KEY AUTOINCREMENT, created REAL NOT NULL,
    delivered INTEGER NOT NULL DEFAULT 0, body TEXT NOT NULL);
"""


class SQLiteStore:
    """MonitorStore in one SQLite file (WAL mode); safe to call from several threads."""

    def __init__(self, path: str | Path) -> None:
        self.path = str(path)
        self._lock = threading.Lock()
        self._db = sqlite3.connect(self.path, check_same_thread=False, isolation_level=None)
        self._db.execute("PRAGMA journal_mode=WAL")
        self._db.execute("PRAGMA synchronous=NORMAL")
        self._db.executescript(_SCHEMA)

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            return self._db.execute(sql, args).fetchall()

    def offset(self, source: str) -> int:
        rows = self._query("SELECT offset FROM offsets WHERE source = ?", (source,))
        return int(rows[0][0]) if rows else 0

    def next_seq(self) -> int:
        return int(self._query("SELECT COALESCE(MAX(seq) + 1, 0) FROM texts")[0][0])

    def count(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM texts")[0][0])

    def known_ids(self, ids: list[str]) -> set[str]:
        known: set[str] = set()
        for start in range(0, len(ids), 500):
            chunk = ids[start:start + 500]
            marks = ",".join("?" * len(chunk))
            known |= {r[0] for r in self._query(f"SELECT id FROM texts WHERE id IN ({marks})", tuple(chunk))}
        return known

    def load_detector(self) -> dict[str, TopicState]:
        return {topic: TopicState.from_dict(json.loads(state))
                for topic, state in self._query("SELECT topic, state FROM detector")}

    def commit_batch(self, results: list[TextResult], source: str | None, offset: int | None,
                     states: dict[str, TopicState], alerts: list[tuple[float, Alert]]) -> list[StoredAlert]:
        stored = []
        with self._lock:
            cur = self._db.cursor()
            cur.execute("BEGIN IMMEDIATE")
            try:
                cur.executemany("INSERT INTO texts VALUES (?, ?, ?, ?, ?, ?, ?)",
                                [(r.seq, r.id, r.time, r.text, r.topic, r.sentiment, r.negative_prob)
                                 for r in results])
                if source is not None and offset is not None:
                    cur.execute("INSERT INTO offsets VALUES (?, ?) ON CONFLICT(source) DO UPDATE SET offset = "
                                "excluded.offset", (source, offset))
                cur.executemany("INSERT INTO detector VALUES (?, ?) ON CONFLICT(topic) DO UPDATE SET state = "
                                "excluded.state", [(t, json.dumps(s.to_dict())) for t, s in states.items()])
                for created, alert in alerts:
                    cur.execute("INSERT INTO alerts (created, body) VALUES (?, ?)",
                                (created, json.dumps(asdict(alert))))
                    stored.append(StoredAlert(int(cur.lastrowid or 0), created, False, alert))
                cur.execute("COMMIT")
            except BaseException:
                cur.execute("ROLLBACK")
                raise
        return stored

    def alerts(self, limit: int = 100, undelivered_only: bool = False) -> list[StoredAlert]:
        where = "WHERE delivered = 0" if undelivered_only else ""
        order = "ASC" if undelivered_only else "DESC"  # deliveries oldest first; listings newest first
        rows = self._query(f"SELECT alert_id, created, delivered, body FROM alerts {where} "
                           f"ORDER BY alert_id {order} LIMIT ?", (limit,))
        return [StoredAlert(int(i), float(c), bool(d), Alert(**json.loads(b))) for i, c, d, b in rows]

    def mark_delivered(self, alert_id: int) -> None:
        self._query("UPDATE alerts SET delivered = 1 WHERE alert_id = ?", (alert_id,))

    def texts_by_id(self, ids: list[str]) -> dict[str, str]:
        if not ids:
            return {}
        marks = ",".join("?" * len(ids))
        return dict(self._query(f"SELECT id, text FROM texts WHERE id IN ({marks})", tuple(ids)))

    def series(self, bucket: int) -> list[dict[str, Any]]:
        """Per topic and per `bucket` consecutive stream texts: the count and negative share."""
        rows = self._query("SELECT seq / ? AS b, topic, COUNT(*), AVG(sentiment = 'negative'), MIN(seq) "
                           "FROM texts GROUP BY b, topic ORDER BY b", (max(1, bucket),))
        return [{"bucket": int(b), "start_seq": int(s), "topic": t, "count": int(n), "negative_share": float(share)}
                for b, t, n, share, s in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()


def open_store(db: str) -> MonitorStore:
    """A postgresql:// URI opens PostgresStore (psycopg), anything else is a SQLite file path."""
    if db.startswith(("postgresql://", "postgres://")):
        from pagellm.apps.monitor.store_postgres import PostgresStore

        return PostgresStore(db)
    return SQLiteStore(db)
