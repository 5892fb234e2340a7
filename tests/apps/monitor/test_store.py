"""Both MonitorStore implementations keep the same contract: SQLite (the default) and PostgreSQL (pgserver)."""

from __future__ import annotations

import json

import pytest

from pagellm.apps.monitor.detector import Alert, TopicState
from pagellm.apps.monitor.service import MonitorService
from pagellm.apps.monitor.store import TextResult, open_store
from tests.apps.monitor.conftest import LabelLookupClassifier, replay_stream
from tests.apps.monitor.test_service import SMALL


@pytest.fixture(params=["sqlite", "postgres"])
def db(request, tmp_path) -> str:
    if request.param == "sqlite":
        return str(tmp_path / "m.sqlite")
    return request.getfixturevalue("postgres_uri")


def _alert(topic: str) -> Alert:
    return Alert(topic, "a", "b", 0, 1, 0.8, 0.3, 7.6, 10, 0.5, 10, ["a"])


def test_store_contract(db):
    store = open_store(db)
    assert store.next_seq() == 0 and store.offset("f") == 0 and store.load_detector() == {}
    rows = [TextResult(i, f"id{i}", 1.0 + i, f"text {i}", "rates" if i % 2 else "fraud",
                       "negative" if i < 3 else "neutral", 0.5) for i in range(6)]
    state = TopicState()
    state.recent.extend([1, 0, 1])
    stored = store.commit_batch(rows, "f", 6, {"rates": state}, [(123.0, _alert("rates"))])
    assert [a.alert_id for a in stored] == [1] and store.offset("f") == 6 and store.next_seq() == 6
    assert store.known_ids(["id1", "nope", "id5"]) == {"id1", "id5"} and store.count() == 6
    assert store.load_detector()["rates"].to_dict() == state.to_dict()
    assert store.texts_by_id(["id2"]) == {"id2": "text 2"}
    series = store.series(3)
    assert [(p["bucket"], p["topic"], p["count"]) for p in series] == [(0, "fraud", 2), (0, "rates", 1),
                                                                        (1, "fraud", 1), (1, "rates", 2)]
    assert series[0]["negative_share"] == 1.0
    assert [a.alert_id for a in store.alerts(10, undelivered_only=True)] == [1]
    store.mark_delivered(1)
    assert store.alerts(10, undelivered_only=True) == [] and store.alerts(10)[0].delivered
    import sqlite3

    import psycopg

    with pytest.raises((sqlite3.IntegrityError, psycopg.errors.UniqueViolation)):  # a stored id: batch refused
        store.commit_batch([TextResult(6, "id0", 0.0, "x", "rates", "neutral", 0.0)], "f", 7, {}, [])
    assert store.offset("f") == 6 and store.count() == 6
    store.close()


def test_restart_mid_stream_on_each_store(tmp_path, db):
    stream = replay_stream(600, 4)
    path = tmp_path / "s.jsonl"
    path.write_text("".join(json.dumps({"id": s["id"], "text": s["text"]}) + "\n" for s in stream))
    first = LabelLookupClassifier(stream)
    first.fail_after = 300
    service = MonitorService(first, open_store(db), SMALL, batch_size=32)
    with pytest.raises(RuntimeError):
        service.run_lines(open(path), "s")
    service.close()
    second = LabelLookupClassifier(stream)
    service = MonitorService(second, open_store(db), SMALL, batch_size=32)
    service.run_lines(open(path), "s")
    assert sorted(first.seen + second.seen) == sorted(s["text"] for s in stream)
    assert service.store.count() == 600
    service.close()
