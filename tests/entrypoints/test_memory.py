"""No per-request state outlives its request: after many dropped, abandoned and finished requests the engine's
and server's per-request tables are empty and no request object survives (issue 15, item 4)."""

from __future__ import annotations

import asyncio
import gc
import random
import time

import httpx

from pagellm.engine.async_llm import RequestStream
from pagellm.engine.detokenizer import IncrementalDetokenizer
from pagellm.engine.output_processor import _RequestState, _SeqState
from pagellm.request import Request
from tests.entrypoints.server_utils import RunningServer, run_server

PER_REQUEST_TYPES = (Request, RequestStream, IncrementalDetokenizer, _RequestState, _SeqState)


def _per_request_tables(server: RunningServer) -> dict[str, int]:
    """Sizes of every table keyed by request id, on both threads' sides."""
    engine = server.engine
    core = engine._engine.core
    kv = core.scheduler.kv_cache_manager
    metrics = engine.observer.__self__  # the ServerMetrics whose observe() is the engine's observer
    return {
        "async_queues": len(engine._queues),
        "output_processor": len(engine._engine.output_processor.requests),
        "child_to_parent": len(engine._engine.output_processor.child_to_parent),
        "scheduler": len(core.scheduler.requests),
        "prompt_logprobs_sent": len(core.scheduler._num_prompt_logprobs_sent),
        "req_to_blocks": len(kv.req_to_blocks),
        "req_to_block_hashes": len(kv.req_to_block_hashes),
        "num_cached_blocks": len(kv.num_cached_blocks),
        "pending_lookups": len(kv._pending_lookups),
        "seeded_generators": len(core.worker.runner.sampler._generators),
        "metrics_timings": len(metrics._timings),
    }


def _live_objects() -> dict[str, int]:
    gc.collect()
    names = {t: t.__name__ for t in PER_REQUEST_TYPES}
    counts = dict.fromkeys(names.values(), 0)
    for obj in gc.get_objects():
        name = names.get(type(obj))
        if name is not None:
            counts[name] += 1
    return counts


def _num_tasks(server: RunningServer) -> int:
    loop = server.engine._loop
    return asyncio.run_coroutine_threadsafe(_count_tasks(), loop).result(timeout=10)


async def _count_tasks() -> int:
    return len(asyncio.all_tasks()) - 1  # less this one


async def _mixed_round(base: str, model: str, num: int, seed: int) -> None:
    """num requests, 8 at a time: dropped streams, abandoned non-streaming ones, finished ones (some seeded,
    some with logprobs and stop strings)."""
    rng = random.Random(seed)
    sem = asyncio.Semaphore(8)
    async with httpx.AsyncClient(timeout=60) as client:
        async def one(i: int) -> None:
            async with sem:
                body = {"model": model, "prompt": "w " * rng.randrange(2, 60), "max_tokens": 40, "ignore_eos": True,
                        "seed": i if i % 3 == 0 else None, "logprobs": 2 if i % 4 == 0 else None}
                kind = i % 4
                if kind in (0, 1):  # dropped mid-stream
                    async with client.stream("POST", f"{base}/v1/completions", json=body | {"stream": True}) as r:
                        assert r.status_code == 200
                        n = 0
                        async for line in r.aiter_lines():
                            n += line.startswith("data: ")
                            if n >= rng.randrange(1, 6):
                                break
                elif kind == 2:  # abandoned before the answer
                    try:
                        await asyncio.wait_for(client.post(f"{base}/v1/completions", json=body | {"max_tokens": 400}),
                                               timeout=rng.uniform(0.05, 0.3))
                    except asyncio.TimeoutError:
                        pass
                else:  # finished: by length, or by a stop string
                    r = await client.post(f"{base}/v1/chat/completions", json={
                        "model": model, "messages": [{"role": "user", "content": "hi " * rng.randrange(1, 20)}],
                        "max_tokens": 12, "stop": ["a", "e"] if i % 8 == 3 else None, "n": 2 if i % 8 == 7 else 1})
                    assert r.status_code == 200, r.text

        await asyncio.gather(*[one(i) for i in range(num)])


def _wait_idle(server: RunningServer, timeout: float = 30) -> None:
    deadline = time.monotonic() + timeout
    while time.monotonic() < deadline:
        if not any(_per_request_tables(server).values()) and server.engine.stats.num_running == 0:
            return
        time.sleep(0.05)


def test_no_per_request_state_survives_dropped_and_finished_requests(tiny_engine_factory) -> None:
    with run_server(tiny_engine_factory(num_blocks=4096)) as server:
        base, model = server.base_url, server.engine.model_name
        pool = server.engine._engine.core.scheduler.kv_cache_manager.block_pool
        asyncio.run(_mixed_round(base, model, 16, seed=0))  # warm: first-use caches and imports
        _wait_idle(server)
        tasks_before = _num_tasks(server)
        for round_ in range(2):
            asyncio.run(_mixed_round(base, model, 32, seed=round_ + 1))
            _wait_idle(server)
            assert _per_request_tables(server) == dict.fromkeys(_per_request_tables(server), 0)
            assert _live_objects() == dict.fromkeys(_live_objects(), 0)
            assert _num_tasks(server) == tasks_before
            assert server.engine.stats.kv_cache_usage == 0.0
        # KV memory follows the peak load, not the traffic: the rounds cycled through the blocks they freed
        # instead of walking the pool (before the fix every new block was a never-used one, and the lazily
        # backed KV cache became resident in full over time: issue 15's RSS growth).
        # (8 requests at a time need a few hundred blocks at most; the rounds' traffic was thousands.)
        assert pool.num_used_ever < pool.num_blocks // 8, pool.num_used_ever
