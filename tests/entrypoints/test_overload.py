"""Overload: 200 concurrent requests against --max-num-seqs 8 either complete or get a clean 503."""

from __future__ import annotations

import asyncio
import json
import time

import httpx
import pytest

from tests.entrypoints.server_utils import run_server


@pytest.mark.slow
def test_200_concurrent_requests_complete_or_get_503(tiny_engine_factory) -> None:
    with run_server(tiny_engine_factory(max_num_seqs=8), max_waiting_requests=64) as server:
        model = server.engine.model_name

        async def one(client: httpx.AsyncClient, i: int) -> str:
            body = {"model": model, "prompt": f"Request number {i} says", "max_tokens": 16, "ignore_eos": True,
                    "stream": i % 2 == 0}
            if i % 2:
                r = await client.post(f"{server.v1}/completions", json=body)
                if r.status_code == 200:
                    assert r.json()["usage"]["completion_tokens"] == 16
                    return "ok"
            else:
                async with client.stream("POST", f"{server.v1}/completions", json=body) as r:
                    if r.status_code == 200:
                        events = [line async for line in r.aiter_lines() if line.startswith("data: ")]
                        assert events[-1] == "data: [DONE]"
                        text_chunks = [json.loads(e[6:]) for e in events[:-1]]
                        assert all("error" not in c for c in text_chunks)
                        assert text_chunks[-1]["choices"][0]["finish_reason"] == "length"
                        return "ok"
                    await r.aread()
            assert r.status_code == 503, r.text
            assert int(r.headers["Retry-After"]) >= 1
            assert r.json()["error"]["code"] == "overloaded"
            return "503"

        async def main() -> list[str]:
            limits = httpx.Limits(max_connections=200, max_keepalive_connections=200)
            async with httpx.AsyncClient(timeout=httpx.Timeout(120, connect=30), limits=limits) as client:
                return await asyncio.wait_for(asyncio.gather(*(one(client, i) for i in range(200))), timeout=240)

        t0 = time.monotonic()
        results = asyncio.run(main())
        elapsed = time.monotonic() - t0
        assert len(results) == 200
        assert results.count("ok") >= 8 + 64 - 8, (results.count("ok"), elapsed)  # running + waiting admitted
        assert set(results) <= {"ok", "503"}
        assert httpx.get(f"{server.base_url}/health").status_code == 200
        deadline = time.monotonic() + 10
        while (m := server.metrics())["vllm:num_requests_running"] and time.monotonic() < deadline:
            time.sleep(0.05)
        assert m["vllm:num_requests_running"] == 0 and m["vllm:num_requests_waiting"] == 0
        assert m["vllm:kv_cache_usage_perc"] == 0
        r = httpx.post(f"{server.v1}/completions", json={"model": model, "prompt": "after", "max_tokens": 2})
        assert r.status_code == 200
