"""Client disconnects abort at once and free their KV blocks; the server keeps answering."""

from __future__ import annotations

import asyncio
import time

import httpx

from tests.entrypoints.server_utils import RunningServer


def _wait_idle(server: RunningServer, timeout: float = 30.0) -> dict[str, float]:
    """Poll /metrics until nothing runs, waits or holds KV blocks (aborts are asynchronous)."""
    deadline = time.monotonic() + timeout
    while True:
        m = server.metrics()
        idle = (m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0
                and m["vllm:kv_cache_usage_perc"] == 0)
        if idle or time.monotonic() > deadline:
            return m
        time.sleep(0.05)


def test_50_streams_cut_mid_stream_are_aborted(tiny_server: RunningServer) -> None:
    body = {"model": tiny_server.engine.model_name, "prompt": "Tell me a long story about", "max_tokens": 400,
            "ignore_eos": True, "stream": True}
    before = tiny_server.metrics()

    async def cut_after_two_chunks(client: httpx.AsyncClient) -> int:
        async with client.stream("POST", f"{tiny_server.v1}/completions", json=body) as r:
            assert r.status_code == 200
            seen = 0
            async for line in r.aiter_lines():
                if line.startswith("data: {"):
                    seen += 1
                    if seen == 2:
                        break  # leaving the block closes the connection mid-stream
            return seen

    async def main() -> list[int]:
        limits = httpx.Limits(max_connections=50, max_keepalive_connections=0)
        async with httpx.AsyncClient(timeout=120, limits=limits) as client:
            return await asyncio.gather(*(cut_after_two_chunks(client) for _ in range(50)))

    t0 = time.monotonic()
    assert asyncio.run(main()) == [2] * 50
    elapsed = time.monotonic() - t0
    m = _wait_idle(tiny_server)
    assert m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0
    assert m["vllm:kv_cache_usage_perc"] == 0
    aborted = m.get("vllm:request_success_total", 0) - before.get("vllm:request_success_total", 0)
    assert aborted >= 50
    # 50 x 400 tokens would take far longer than the cut-off streams did
    generated = m["vllm:generation_tokens_total"] - before.get("vllm:generation_tokens_total", 0)
    assert generated < 50 * 400 / 4, (generated, elapsed)
    client = tiny_server.client(timeout=600)
    assert client.completions.create(model=tiny_server.engine.model_name, prompt="still alive?",
                                     max_tokens=3).choices[0].text is not None


def test_non_streaming_disconnect_aborts(tiny_server: RunningServer) -> None:
    body = {"model": tiny_server.engine.model_name, "prompt": "A very long answer:", "max_tokens": 450,
            "ignore_eos": True}
    before = tiny_server.metrics()
    try:
        httpx.post(f"{tiny_server.v1}/completions", json=body, timeout=0.5)
    except httpx.ReadTimeout:
        pass  # the client gave up and closed the connection
    m = _wait_idle(tiny_server, timeout=5.0)
    assert m["vllm:num_requests_running"] == 0 and m["vllm:kv_cache_usage_perc"] == 0
    generated = m["vllm:generation_tokens_total"] - before.get("vllm:generation_tokens_total", 0)
    assert generated < 450


def test_queued_stream_disconnect_aborts_before_its_first_token(tiny_engine_factory) -> None:
    from tests.entrypoints.server_utils import run_server

    with run_server(tiny_engine_factory(max_num_seqs=1)) as server:
        model = server.engine.model_name
        long_body = {"model": model, "prompt": "hold the slot", "max_tokens": 200, "ignore_eos": True,
                     "stream": True}

        async def main() -> None:
            async with httpx.AsyncClient(timeout=60) as client:
                async with client.stream("POST", f"{server.v1}/completions", json=long_body) as running:
                    lines = running.aiter_lines()
                    while not (await lines.__anext__()).startswith("data: {"):
                        pass
                    # a second stream waits behind the first; its client leaves before any token
                    async with client.stream("POST", f"{server.v1}/completions", json=long_body) as queued:
                        assert queued.status_code == 200
                        await asyncio.sleep(0.2)
                        assert server.engine.num_waiting == 1
                    deadline = time.monotonic() + 5
                    while server.engine.num_waiting and time.monotonic() < deadline:
                        await asyncio.sleep(0.05)
                    assert server.engine.num_waiting == 0

        asyncio.run(main())
        m = _wait_idle(server, timeout=10)
        assert m["vllm:kv_cache_usage_perc"] == 0 and m["vllm:num_requests_running"] == 0
