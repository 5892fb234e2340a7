"""AsyncLLM without HTTP: errors reach the caller, aborts free KV blocks, the engine thread survives."""

from __future__ import annotations

import asyncio
import time

import pytest

from pagellm.engine.async_llm import AsyncLLM, EngineStepError
from pagellm.errors import InvalidRequest
from pagellm.sampling_params import SamplingParams


async def _wait_for(predicate, timeout: float = 10.0) -> None:
    deadline = time.monotonic() + timeout
    while not predicate():
        assert time.monotonic() < deadline, "condition not reached"
        await asyncio.sleep(0.01)


async def _collect(engine: AsyncLLM, request_id: str, prompt, params: SamplingParams) -> list:
    return [out async for out in engine.generate(request_id, prompt, params)]


@pytest.fixture
def engine(tiny_engine_factory) -> AsyncLLM:
    return tiny_engine_factory()


def test_outputs_stream_and_finish(engine: AsyncLLM) -> None:
    async def main() -> None:
        engine.start()
        try:
            outs = await _collect(engine, "a", "Hello there", SamplingParams(max_tokens=5, n=2, ignore_eos=True))
            assert outs[-1].finished and all(not o.finished for o in outs[:-1])
            assert sorted(len(c.token_ids) for c in outs[-1].outputs) == [5, 5]
            assert engine.num_unfinished == 0
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_engine_side_invalid_request_reaches_the_caller_and_the_engine_goes_on(engine: AsyncLLM) -> None:
    async def main() -> None:
        engine.start()
        try:
            with pytest.raises(InvalidRequest):  # an empty prompt only the engine thread sees
                await _collect(engine, "bad", [], SamplingParams(max_tokens=2))
            with pytest.raises(InvalidRequest):
                await _collect(engine, "bad2", [10**9], SamplingParams(max_tokens=2))
            outs = await _collect(engine, "good", "Hi", SamplingParams(max_tokens=3))
            assert outs[-1].finished and engine.is_running
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_closing_a_stream_aborts_and_frees_kv_blocks(engine: AsyncLLM) -> None:
    async def main() -> None:
        engine.start()
        try:
            stream = engine.add_request("long", "Once", SamplingParams(max_tokens=400, ignore_eos=True))
            await stream.__anext__()
            await _wait_for(lambda: engine.stats.kv_cache_usage > 0)
            stream.close()
            await _wait_for(lambda: engine.stats.num_running == 0 and engine.stats.kv_cache_usage == 0)
            assert engine.num_unfinished == 0
            # a stream dropped before it was ever read is aborted too
            dropped = engine.add_request("dropped", "Once", SamplingParams(max_tokens=400, ignore_eos=True))
            del dropped
            await _wait_for(lambda: engine.num_unfinished == 0 and engine.stats.kv_cache_usage == 0)
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_a_failed_step_fails_only_its_requests_and_the_engine_recovers(engine: AsyncLLM,
                                                                      monkeypatch: pytest.MonkeyPatch) -> None:
    real_step = engine._engine.step
    calls = {"n": 0}

    def flaky_step():
        calls["n"] += 1
        if calls["n"] == 3:
            raise RuntimeError("injected failure")
        return real_step()

    monkeypatch.setattr(engine._engine, "step", flaky_step)

    async def main() -> None:
        engine.start()
        try:
            with pytest.raises(EngineStepError):
                await _collect(engine, "victim", "Hello", SamplingParams(max_tokens=50, ignore_eos=True))
            outs = await _collect(engine, "after", "Hello", SamplingParams(max_tokens=4, ignore_eos=True))
            assert len(outs[-1].outputs[0].token_ids) == 4 and engine.is_running
            await _wait_for(lambda: engine.stats.kv_cache_usage == 0)
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_reset_prefix_cache_runs_on_the_engine_thread(engine: AsyncLLM) -> None:
    async def main() -> None:
        engine.start()
        try:
            await _collect(engine, "a", "Some shared prefix text for the cache", SamplingParams(max_tokens=1))
            assert await engine.reset_prefix_cache() is True
        finally:
            await engine.shutdown()

    asyncio.run(main())


def test_build_loads_on_the_engine_thread_and_shutdown_works_unstarted(tiny_llama_dir: str) -> None:
    import threading

    from pagellm.entrypoints.llm import LLM
    from tests.entrypoints.server_utils import TINY_ENGINE_ARGS

    loaded_on: list[str] = []

    def factory():
        loaded_on.append(threading.current_thread().name)
        return LLM(tiny_llama_dir, **TINY_ENGINE_ARGS).llm_engine

    engine = AsyncLLM.build(factory)
    assert loaded_on == ["pagellm-engine"] and not engine.is_running
    asyncio.run(engine.shutdown(timeout=10))  # never started: the thread still exits
    assert engine._thread is None


def test_build_reraises_a_load_error() -> None:
    def factory():
        raise InvalidRequest("no such model", param="model")

    with pytest.raises(InvalidRequest, match="no such model"):
        AsyncLLM.build(factory)
