"""SIGTERM: stop admitting, let running requests finish within the grace period, exit 0."""

from __future__ import annotations

import json
import os
import signal
import socket
import subprocess
import sys
import threading
import time
from collections.abc import Iterator

import httpx
import pytest


def _free_port() -> int:
    with socket.socket() as s:
        s.bind(("127.0.0.1", 0))
        return s.getsockname()[1]


@pytest.fixture
def serve(tiny_llama_dir: str):
    procs: list[subprocess.Popen] = []

    def start(*flags: str) -> tuple[subprocess.Popen, str]:
        port = _free_port()
        cmd = [sys.executable, "-m", "pagellm.entrypoints.cli", "serve", tiny_llama_dir, "--port", str(port),
               "--dtype", "float32", "--max-num-seqs", "4", "--num-blocks", "1024", "--block-size", "4", *flags]
        proc = subprocess.Popen(cmd, stdout=subprocess.PIPE, stderr=subprocess.STDOUT, text=True,
                                env={**os.environ, "HF_HUB_OFFLINE": "1"})
        procs.append(proc)
        base = f"http://127.0.0.1:{port}"
        deadline = time.monotonic() + 90
        while True:
            assert proc.poll() is None, proc.stdout.read() if proc.stdout else ""
            try:
                if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                    return proc, base
            except httpx.TransportError:
                pass
            assert time.monotonic() < deadline, "server did not come up"
            time.sleep(0.2)

    yield start
    for proc in procs:  # never leave a server running
        if proc.poll() is None:
            proc.kill()
            proc.wait(10)


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
    proc, base = serve("--shutdown-grace-seconds", "0.5")
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
    assert json.loads(events[-1])["error"]["code"] == "shutting_down", events[-2:]
    assert sum(1 for e in events if '"choices"' in e) < 480
