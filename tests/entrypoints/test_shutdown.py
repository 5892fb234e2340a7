"""SIGTERM: stop admitting, let running requests finish within the grace period, exit 0."""

from __future__ import annotations

import json
import signal
import threading
import time
from collections.abc import Iterator

import httpx
import pytest


def _stream_events(base: str, body: dict, first_event: threading.Event, out: list[str]) -> None:
    try:
        with httpx.stream("POST", f"{base}/v1/completions", json=body, timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: "):
                    out.append(line[6:])
                    first_event.set()
    except httpx.TransportError as exc:
        out.append(f"transport error: {exc!r}")
    finally:
        first_event.set()


def _events(base: str, body: dict) -> Iterator[tuple[threading.Thread, threading.Event, list[str]]]:
    first, out = threading.Event(), []
    thread = threading.Thread(target=_stream_events, args=(base, body, first, out))
    thread.start()
    return thread, first, out


def test_sigterm_finishes_running_requests_and_exits_0(serve) -> None:
    proc, base = serve("--shutdown-grace-seconds", "30")
    body = {"prompt": "Counting slowly:", "max_tokens": 120, "ignore_eos": True, "stream": True}
    thread, first, events = _events(base, body)
    assert first.wait(30)
    proc.send_signal(signal.SIGTERM)
    time.sleep(0.5)
    with pytest.raises(httpx.TransportError):  # no longer admitting: the listening socket is closed
        httpx.post(f"{base}/v1/completions", json={"prompt": "new", "max_tokens": 2}, timeout=5)
    thread.join(60)
    assert events[-1] == "[DONE]", events[-3:]
    chunks = [json.loads(e) for e in events[:-1]]
    assert chunks[-1]["choices"][0]["finish_reason"] == "length"
    assert sum(1 for c in chunks if c["choices"]) >= 100  # every token arrived, none cut
    assert proc.wait(60) == 0


@pytest.mark.slow
def test_sigterm_aborts_what_outlives_the_grace_period_and_exits_0(serve) -> None:
    # NOTE: the tiny model writes ~500-1000 tokens/s, so the grace period must be far under the
    # 480 tokens' time, or a quiet machine completes the stream before the cut (a CI run did at 0.5 s)
    proc, base = serve("--shutdown-grace-seconds", "0.05")
    body = {"prompt": "Counting slowly:", "max_tokens": 480, "ignore_eos": True, "stream": True}
    thread, first, events = _events(base, body)
    assert first.wait(30)
    t0 = time.monotonic()
    proc.send_signal(signal.SIGTERM)
    assert proc.wait(30) == 0
    assert time.monotonic() - t0 < 15
    thread.join(30)
    assert not thread.is_alive()
    # cut off, not completed: the stream ends with an in-band error event instead of a broken connection
    assert events and events[-1] != "[DONE]", f"the stream completed before the cut: {len(events)} events"
    assert json.loads(events[-1])["error"]["code"] == "shutting_down", events[-2:]
    assert sum(1 for e in events if '"choices"' in e) < 480
