"""The dashboard in a real browser: the chart draws a line per topic from the API's data, the alert list shows
the triggering texts, and the page updates live as texts arrive. Saves the screenshot docs/monitor.md shows."""

from __future__ import annotations

import os
from pathlib import Path

from pagellm.apps.monitor.api import build_monitor_app
from pagellm.apps.monitor.service import MonitorService, TextItem
from pagellm.apps.monitor.store import SQLiteStore
from tests.apps.monitor.conftest import LabelLookupClassifier, replay_stream
from tests.apps.monitor.test_service import SMALL

DOCS_IMAGE = Path(__file__).resolve().parents[3] / "docs" / "images" / "monitor_dashboard.png"


def test_dashboard_shows_topics_alerts_and_updates_live(tmp_path, serve_app, browser_page):
    stream = replay_stream(2400, 2, burst_topic="fraud", burst_start=1200)
    service = MonitorService(LabelLookupClassifier(stream), SQLiteStore(tmp_path / "m.sqlite"), SMALL)
    service.ingest([TextItem(s["text"], s["id"]) for s in stream[:2000]])
    url = serve_app(build_monitor_app(service))
    page = browser_page
    page.goto(url + "/")
    page.wait_for_selector("#alerts li.alert")
    assert page.locator("path.series").count() == 5  # one line per topic, drawn from /v1/monitor/series
    assert page.locator("line.alert-marker").count() >= 1
    first_alert = page.locator("#alerts li.alert").first
    assert "fraud" in first_alert.locator(".alert-head").inner_text()
    assert first_alert.locator(".texts li").count() >= 1  # the triggering texts
    assert page.locator("#topics tbody tr").count() == 5
    page.wait_for_function("document.getElementById('status').textContent.startsWith('2000 texts')")

    service.ingest([TextItem(s["text"], s["id"]) for s in stream[2000:]])  # texts arrive while the page is open
    page.wait_for_function("document.getElementById('status').textContent.startsWith('2400 texts')",
                           timeout=10_000)
    shot = tmp_path / "dashboard.png"
    page.screenshot(path=str(shot), full_page=True)
    assert shot.stat().st_size > 10_000
    if os.environ.get("PAGELLM_DOCS_SCREENSHOTS"):
        DOCS_IMAGE.write_bytes(shot.read_bytes())
    service.close()
