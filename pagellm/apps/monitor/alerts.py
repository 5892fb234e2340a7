"""Where alerts go: an alerts JSONL file, a webhook (retried with back-off on its own thread) and Prometheus.

The webhook never blocks ingestion: the ingest path only stores the alert and wakes the sender thread,
which POSTs every undelivered alert in the store, oldest first, and marks it delivered on a 2xx. While the
receiver is down it retries with exponential back-off; undelivered alerts survive a restart in the store.
"""

from __future__ import annotations

import json
import logging
import threading
import urllib.error
import urllib.request
from pathlib import Path

from prometheus_client import CollectorRegistry, Counter, Gauge, generate_latest

from pagellm.apps.monitor.store import MonitorStore, StoredAlert

logger = logging.getLogger("pagellm.monitor")


class MonitorMetrics:
    """The monitor's Prometheus metrics, in their own registry (served on /metrics)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.texts = Counter("pagellm_monitor_texts", "texts classified and stored", registry=r)
        self.bad_inputs = Counter("pagellm_monitor_bad_inputs", "input lines or items refused", registry=r)
        self.texts_per_second = Gauge("pagellm_monitor_texts_per_second", "throughput of the last batch",
                                      registry=r)
        self.negative_share = Gauge("pagellm_monitor_negative_share", "negative share of the topic's recent "
                                    "window", ["topic"], registry=r)
        self.baseline = Gauge("pagellm_monitor_baseline_share", "the topic's baseline negative share", ["topic"],
                              registry=r)
        self.alerts = Counter("pagellm_monitor_alerts", "alerts raised", ["topic"], registry=r)
        self.webhook_failures = Counter("pagellm_monitor_webhook_failures", "failed webhook POSTs", registry=r)
        self.webhook_pending = Gauge("pagellm_monitor_webhook_pending", "alerts not yet delivered", registry=r)
        self.model_passes = Gauge("pagellm_monitor_model_passes_per_text", "model forward passes per text "
                                  "(1: topic embedding and sentiment from one encoder pass)", ["path"], registry=r)

    def render(self) -> bytes:
        return generate_latest(self.registry)


class JsonlAlertWriter:
    """Appends one JSON line per alert (flushed at once)."""

    def __init__(self, path: str | Path) -> None:
        self.path = Path(path)
        self.path.parent.mkdir(parents=True, exist_ok=True)

    def write(self, alerts: list[StoredAlert], texts: dict[str, str]) -> None:
        with self.path.open("a") as f:
            for alert in alerts:
                f.write(json.dumps(alert.to_json(texts)) + "\n")


class WebhookSender:
    """POSTs undelivered alerts to `url` from a daemon thread; exponential back-off while it fails."""

    def __init__(self, url: str, store: MonitorStore, metrics: MonitorMetrics, timeout_s: float = 5.0,
                 backoff_s: float = 0.5, max_backoff_s: float = 30.0) -> None:
        self.url, self.store, self.metrics = url, store, metrics
        self.timeout_s, self.backoff_s, self.max_backoff_s = timeout_s, backoff_s, max_backoff_s
        self._wake = threading.Event()
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._loop, name="pagellm-monitor-webhook", daemon=True)
        self.num_delivered = 0

    def start(self) -> None:
        self._thread.start()

    def notify(self) -> None:
        self._wake.set()

    def stop(self, timeout_s: float = 5.0) -> None:
        self._stop.set()
        self._wake.set()
        self._thread.join(timeout_s)

    def _loop(self) -> None:
        failures = 0
        while not self._stop.is_set():
            pending = self.store.alerts(limit=50, undelivered_only=True)
            self.metrics.webhook_pending.set(len(pending))
            if not pending:
                self._wake.wait(timeout=5.0)
                self._wake.clear()
                continue
            for alert in pending:
                if self._stop.is_set() or not self._post(alert):
                    break
            else:
                failures = 0
                continue
            failures += 1
            self.metrics.webhook_failures.inc()
            delay = min(self.backoff_s * 2 ** (failures - 1), self.max_backoff_s)
            self._stop.wait(delay)

    def _post(self, alert: StoredAlert) -> bool:
        texts = self.store.texts_by_id(alert.alert.text_ids)
        body = json.dumps(alert.to_json(texts)).encode()
        request = urllib.request.Request(self.url, data=body, headers={"Content-Type": "application/json"})
        try:
            with urllib.request.urlopen(request, timeout=self.timeout_s) as response:
                ok = 200 <= response.status < 300
        except (urllib.error.URLError, OSError, ValueError) as exc:
            logger.warning("webhook %s: alert %d not delivered (%s); retrying", self.url, alert.alert_id, exc)
            return False
        if ok:
            self.store.mark_delivered(alert.alert_id)
            self.num_delivered += 1
        return ok
