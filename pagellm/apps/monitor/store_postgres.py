"""MonitorStore on PostgreSQL (psycopg 3): the same tables and one-transaction batches as SQLiteStore, for a
monitor whose results several processes read, or that outlives one machine's disk.

`pagellm monitor run|serve --db postgresql://user@host/dbname` selects it.
"""

from __future__ import annotations

import json
from dataclasses import asdict
from typing import Any

from pagellm.apps.monitor.detector import Alert, TopicState
from pagellm.apps.monitor.store import StoredAlert, TextResult
from pagellm.apps.web import open_postgres

_SCHEMA = """
CREATE TABLE IF NOT EXISTS monitor_texts (seq BIGINT PRIMARY KEY, id TEXT UNIQUE NOT NULL,
    time DOUBLE PRECISION NOT NULL, text TEXT NOT NULL, topic TEXT NOT NULL, sentiment TEXT NOT NULL,
    negative_prob DOUBLE PRECISION NOT NULL);
CREATE TABLE IF NOT EXISTS monitor_offsets (source TEXT PRIMARY KEY, "offset" BIGINT NOT NULL);
CREATE TABLE IF NOT EXISTS monitor_detector (topic TEXT PRIMARY KEY, state TEXT NOT NULL);
CREATE TABLE IF NOT EXISTS monitor_alerts (alert_id BIGSERIAL PRIMARY KEY, created DOUBLE PRECISION NOT NULL,
    delivered BOOLEAN NOT NULL DEFAULT FALSE, body TEXT NOT NULL);
"""


class PostgresStore:
    """MonitorStore in a PostgreSQL database (tables prefixed monitor_); one connection, serialized."""

    def __init__(self, uri: str) -> None:
        self._db, self._lock = open_postgres(uri, _SCHEMA)

    def _query(self, sql: str, args: tuple = ()) -> list[tuple]:
        with self._lock:
            cur = self._db.execute(sql, args)
            return cur.fetchall() if cur.description else []

    def offset(self, source: str) -> int:
        rows = self._query('SELECT "offset" FROM monitor_offsets WHERE source = %s', (source,))
        return int(rows[0][0]) if rows else 0

    def next_seq(self) -> int:
        return int(self._query("SELECT COALESCE(MAX(seq) + 1, 0) FROM monitor_texts")[0][0])

    def count(self) -> int:
        return int(self._query("SELECT COUNT(*) FROM monitor_texts")[0][0])

    def known_ids(self, ids: list[str]) -> set[str]:
        if not ids:
            return set()
        return {r[0] for r in self._query("SELECT id FROM monitor_texts WHERE id = ANY(%s)", (ids,))}

    def load_detector(self) -> dict[str, TopicState]:
        return {topic: TopicState.from_dict(json.loads(state))
                for topic, state in self._query("SELECT topic, state FROM monitor_detector")}

    def commit_batch(self, results: list[TextResult], source: str | None, offset: int | None,
                     states: dict[str, TopicState], alerts: list[tuple[float, Alert]]) -> list[StoredAlert]:
        stored = []
        with self._lock, self._db.transaction(), self._db.cursor() as cur:
            cur.executemany("INSERT INTO monitor_texts VALUES (%s, %s, %s, %s, %s, %s, %s)",
                            [(r.seq, r.id, r.time, r.text, r.topic, r.sentiment, r.negative_prob) for r in results])
            if source is not None and offset is not None:
                cur.execute('INSERT INTO monitor_offsets VALUES (%s, %s) ON CONFLICT (source) DO UPDATE SET '
                            '"offset" = excluded."offset"', (source, offset))
            cur.executemany("INSERT INTO monitor_detector VALUES (%s, %s) ON CONFLICT (topic) DO UPDATE SET "
                            "state = excluded.state", [(t, json.dumps(s.to_dict())) for t, s in states.items()])
            for created, alert in alerts:
                cur.execute("INSERT INTO monitor_alerts (created, body) VALUES (%s, %s) RETURNING alert_id",
                            (created, json.dumps(asdict(alert))))
                row = cur.fetchone()
                assert row is not None, "INSERT ... RETURNING gives the new id"
                stored.append(StoredAlert(int(row[0]), created, False, alert))
        return stored

    def alerts(self, limit: int = 100, undelivered_only: bool = False) -> list[StoredAlert]:
        where = "WHERE NOT delivered" if undelivered_only else ""
        order = "ASC" if undelivered_only else "DESC"
        rows = self._query(f"SELECT alert_id, created, delivered, body FROM monitor_alerts {where} "
                           f"ORDER BY alert_id {order} LIMIT %s", (limit,))
        return [StoredAlert(int(i), float(c), bool(d), Alert(**json.loads(b))) for i, c, d, b in rows]

    def mark_delivered(self, alert_id: int) -> None:
        self._query("UPDATE monitor_alerts SET delivered = TRUE WHERE alert_id = %s", (alert_id,))

    def texts_by_id(self, ids: list[str]) -> dict[str, str]:
        if not ids:
            return {}
        return dict(self._query("SELECT id, text FROM monitor_texts WHERE id = ANY(%s)", (ids,)))

    def series(self, bucket: int) -> list[dict[str, Any]]:
        rows = self._query("SELECT seq / %s AS b, topic, COUNT(*), AVG((sentiment = 'negative')::int), MIN(seq) "
                           "FROM monitor_texts GROUP BY b, topic ORDER BY b, topic", (max(1, bucket),))
        return [{"bucket": int(b), "start_seq": int(s), "topic": t, "count": int(n), "negative_share": float(share)}
                for b, t, n, share, s in rows]

    def close(self) -> None:
        with self._lock:
            self._db.close()
