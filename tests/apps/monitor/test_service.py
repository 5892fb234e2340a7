"""The monitor service over a replayed stream: restart without double work, webhook outage, bad input,
metrics, and the HTTP API (classification answered from the data's labels, see conftest)."""

from __future__ import annotations

import json
import socket
import threading
import time
from http.server import BaseHTTPRequestHandler, HTTPServer

import pytest

from pagellm.apps.monitor.detector import DetectorConfig
from pagellm.apps.monitor.service import MAX_TEXT_CHARS, MonitorService
from pagellm.apps.monitor.store import SQLiteStore
from tests.apps.monitor.conftest import LabelLookupClassifier, replay_stream

# a small detector so a 1,600-text stream has a baseline and a burst
SMALL = DetectorConfig(window=50, baseline_window=200, min_baseline=100, threshold=5.0, cooldown=400)


def _write_stream(path, stream: list[dict]) -> None:
    path.write_text("".join(json.dumps({"id": s["id"], "text": s["text"]}) + "\n" for s in stream))


def _service(tmp_path, classifier, **kwargs) -> MonitorService:
    return MonitorService(classifier, SQLiteStore(tmp_path / "m.sqlite"), SMALL, batch_size=32, **kwargs)


def test_restart_mid_stream_classifies_each_text_once(tmp_path):
    stream = replay_stream(1000, 1)
    path = tmp_path / "s.jsonl"
    _write_stream(path, stream)
    first = LabelLookupClassifier(stream)
    first.fail_after = 500  # the process dies inside the 16th batch
    service = _service(tmp_path, first)
    with pytest.raises(RuntimeError, match="simulated crash"):
        service.run_lines(open(path), str(path))
    service.close()
    assert len(first.seen) == 480  # 15 whole batches were classified and stored

    second = LabelLookupClassifier(stream)
    service = _service(tmp_path, second)
    report = service.run_lines(open(path), str(path))
    assert report.num_classified == 520 and report.num_duplicates == 0
    assert sorted(first.seen + second.seen) == sorted(s["text"] for s in stream)  # none twice, none skipped
    assert service.store.count() == 1000
    again = service.run_lines(open(path), str(path))  # the whole file once more: nothing left to do
    assert again.num_classified == 0 and len(second.seen) == 520
    service.close()


def test_detector_state_survives_a_restart(tmp_path):
    stream = replay_stream(1600, 2, burst_topic="fraud", burst_start=1000)
    path = tmp_path / "s.jsonl"
    _write_stream(path, stream)
    (tmp_path / "a").mkdir()
    whole = _service(tmp_path / "a", LabelLookupClassifier(stream))
    expected = [a.alert for a in whole.run_lines(open(path), "s").alerts]
    whole.close()
    assert any(a.topic == "fraud" and a.end_seq >= 1000 for a in expected)

    (tmp_path / "b").mkdir()
    split = LabelLookupClassifier(stream)
    split.fail_after = 1100
    service = _service(tmp_path / "b", split)
    with pytest.raises(RuntimeError):
        service.run_lines(open(path), "s")
    service.close()
    service = _service(tmp_path / "b", LabelLookupClassifier(stream))
    service.run_lines(open(path), "s")
    assert [a.alert for a in reversed(service.store.alerts(100))] == expected
    service.close()


def test_bad_lines_are_reported_and_the_stream_goes_on(tmp_path):
    stream = replay_stream(40, 3)
    lines = [json.dumps({"id": s["id"], "text": s["text"]}) for s in stream]
    lines[3] = "{not json"
    lines[7] = json.dumps({"id": "e", "text": "   "})
    lines[11] = json.dumps({"id": "big", "text": "x" * 1_000_000})
    lines[15] = json.dumps({"id": "u", "text": "fine", "author": "someone"})
    lines[19] = json.dumps(["a list"])
    service = _service(tmp_path, LabelLookupClassifier(stream))
    report = service.run_lines([line + "\n" for line in lines], "bad")
    assert [e["line"] for e in report.errors] == [4, 8, 12, 16, 20]
    messages = [e["message"] for e in report.errors]
    assert messages[0].startswith("not JSON") and "non-empty" in messages[1]
    assert f"limit is {MAX_TEXT_CHARS}" in messages[2] and "unknown field(s) author" in messages[3]
    assert report.num_classified == 35 and service.store.count() == 35
    assert b"pagellm_monitor_bad_inputs_total 5.0" in service.metrics.render()
    service.close()


class _Receiver(BaseHTTPRequestHandler):
    received: list[dict] = []

    def do_POST(self) -> None:  # noqa: N802
        body = self.rfile.read(int(self.headers["Content-Length"]))
        type(self).received.append(json.loads(body))
        self.send_response(200)
        self.end_headers()

    def log_message(self, *args) -> None:
        pass


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


def test_webhook_down_then_up_delivers_without_blocking_ingestion(tmp_path):
    stream = replay_stream(1600, 2, burst_topic="fraud", burst_start=1000)
    port = _free_port()
    alerts_path = tmp_path / "alerts.jsonl"
    service = _service(tmp_path, LabelLookupClassifier(stream), alerts_path=str(alerts_path),
                       webhook_url=f"http://127.0.0.1:{port}/alerts", webhook_backoff_s=0.05)
    service.webhook.max_backoff_s = 0.2
    lines = [json.dumps({"id": s["id"], "text": s["text"]}) for s in stream]
    t0 = time.perf_counter()
    report = service.run_lines(lines, "s")  # nobody listens on the port yet
    ingest_s = time.perf_counter() - t0
    assert report.alerts and report.num_classified == 1600
    assert ingest_s < 20  # the sender retries on its own thread; ingestion never waited on it
    time.sleep(0.5)
    assert service.webhook.num_delivered == 0 and b"pagellm_monitor_webhook_failures_total" in service.metrics.render()
    assert len(alerts_path.read_text().splitlines()) == len(report.alerts)  # the JSONL copy is written at once

    _Receiver.received = []
    server = HTTPServer(("127.0.0.1", port), _Receiver)
    threading.Thread(target=server.serve_forever, daemon=True).start()
    try:
        deadline = time.time() + 15
        while service.webhook.num_delivered < len(report.alerts) and time.time() < deadline:
            time.sleep(0.05)
    finally:
        server.shutdown()
    assert [a["alert_id"] for a in _Receiver.received] == [a.alert_id for a in report.alerts]
    first = _Receiver.received[0]
    assert {"topic", "start_id", "end_id", "share", "baseline", "texts"} <= set(first)
    assert all(t["text"] for t in first["texts"])
    assert not service.store.alerts(10, undelivered_only=True)
    service.close()


def test_http_ingest_topics_alerts_metrics_and_errors(tmp_path):
    from fastapi.testclient import TestClient

    from pagellm.apps.monitor.api import build_monitor_app

    stream = replay_stream(1600, 2, burst_topic="fraud", burst_start=1000)
    service = _service(tmp_path, LabelLookupClassifier(stream))
    client = TestClient(build_monitor_app(service))
    for start in range(0, 1600, 400):
        chunk = [{"id": s["id"], "text": s["text"]} for s in stream[start:start + 400]]
        r = client.post("/v1/monitor/ingest", json={"texts": chunk})
        assert r.status_code == 200, r.text
    r = client.post("/v1/monitor/ingest", json={"texts": [{"id": "t0", "text": stream[0]["text"]}]})
    assert r.json() == {"classified": 0, "duplicates": 1, "alerts": []}
    bad = [(b"{oops", "invalid JSON"), (json.dumps({"texts": [{"text": ""}]}).encode(), "non-empty"),
           (json.dumps({"texts": [{"text": "x" * 1_000_000}]}).encode(), "limit"),
           (json.dumps({"texts": [{"text": "a", "lang": "en"}]}).encode(), "unknown field"),
           (json.dumps({"texts": ["a"], "extra": 1}).encode(), "unsupported field")]
    for body, message in bad:
        r = client.post("/v1/monitor/ingest", content=body, headers={"Content-Type": "application/json"})
        assert r.status_code == 400 and message in r.json()["error"]["message"], r.text
        assert set(r.json()["error"]) == {"message", "type", "param", "code"}
    r = client.post("/v1/monitor/ingest", json={"texts": ["still working after bad requests"]})
    assert r.status_code == 200 and r.json()["classified"] == 1
    topics = client.get("/v1/monitor/topics").json()
    assert {t["topic"] for t in topics["topics"]} == {"rates", "earnings", "fraud", "markets", "regulation"}
    alerts = client.get("/v1/monitor/alerts").json()["alerts"]
    assert any(a["topic"] == "fraud" for a in alerts) and alerts[0]["texts"]
    points = client.get("/v1/monitor/series?bucket=100").json()["points"]
    assert sum(p["count"] for p in points) == service.store.count()
    metrics = client.get("/metrics").text
    assert 'pagellm_monitor_negative_share{topic="fraud"}' in metrics and "pagellm_monitor_texts_total" in metrics
    assert client.get("/").status_code == 200 and "app.js" in client.get("/").text
    service.close()
