"""DataParallelLLM: N engine replicas in Ray actors behind the AsyncLLM surface the server uses.

The server holds one DataParallelLLM where it would hold one AsyncLLM; its handlers do not change. The
driver (the server process) tokenizes and validates each prompt itself, picks a replica with the
PrefixAffinityRouter, and sends the request to that replica's actor (EngineReplica); the replica's
outputs come back on one Ray stream per replica and are dispatched to per-request queues, read through
the same RequestStream class AsyncLLM returns. Closing a stream (a client that disconnects) sends the
abort to the replica that runs it.

Failure: when a replica's process dies its output stream raises. Its requests that had no output yet
are sent to another replica (at most _MAX_ATTEMPTS tries in all); the others end with EngineStepError
(a clean 500, or an error event in a stream). Ray restarts the actor (max_restarts) and the driver takes
the replica back once it answers, with the LoRA adapters registered before.

Ray is imported only by launch(): the default install (no `distributed` extra) can import this module.
"""

from __future__ import annotations

import asyncio
import logging
import os
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

from pagellm.engine.async_llm import (
    EngineDeadError,
    EngineStats,
    EngineStepError,
    OutputObserver,
    RequestStream,
    ServedModelInfo,
    StreamingClient,
)
from pagellm.engine.dp_replica import EngineReplica
from pagellm.engine.dp_router import PrefixAffinityRouter, RouterConfig
from pagellm.engine.input_processor import InputProcessor, PromptType
from pagellm.engine.llm_engine import LLMEngine
from pagellm.lora_request import LoRARequest
from pagellm.outputs import RequestOutput
from pagellm.sampling_params import SamplingParams
from pagellm.structured_output import StructuredOutputsParams

logger = logging.getLogger(__name__)

_MAX_ATTEMPTS = 3  # tries of a request whose replica died before it produced any output
_STATS_INTERVAL_S = 0.5
_CALL_TIMEOUT_S = 30.0
_LOAD_TIMEOUT_S = 600.0  # a replica's model load


# NOTE: on Linux Ray swaps 127.0.0.1 for the machine's routable address and listens there. With this switch off
# (Ray's single-machine mode, its default on macOS and Windows) a local instance keeps every server on the
# loopback interface. Ray reads it once, when first imported; tests/distributed/conftest.py sets it too.
LOCAL_ONLY_ENV = "RAY_ENABLE_WINDOWS_OR_OSX_CLUSTER"


def require_ray():
    """The ray module, or ImportError saying how to install it."""
    if not os.environ.get("RAY_ADDRESS"):
        os.environ.setdefault(LOCAL_ONLY_ENV, "0")
    try:
        import ray
    except ImportError as exc:
        raise ImportError("data parallelism runs on Ray, which is not installed: pip install 'pagellm[distributed]'"
                          ) from exc
    return ray


@dataclass
class _Flight:
    """One request in flight on a replica (event loop only)."""

    request_id: str
    prompt: dict[str, Any]
    token_ids: list[int]
    params: SamplingParams
    priority: int
    lora_request: LoRARequest | None
    arrival: float
    outputs: asyncio.Queue
    replica: int = -1
    attempt: int = 0  # bumped on every (re)submission; stale replies of an older attempt are ignored
    num_outputs: int = 0
    first_token_time: float | None = None


@dataclass
class _Replica:
    """The driver's view of one replica."""

    actor: Any
    up: bool = False
    pid: int = 0
    load: int = 0  # unfinished requests routed here
    stats: EngineStats = field(default_factory=EngineStats)
    num_routed: int = 0
    num_restarts: int = 0


class _AbortSink:
    """What RequestStream puts its abort into: routes it to the replica that runs the request.

    NOTE: RequestStream.__del__ may put from the garbage collector at any point; hop onto the loop.
    """

    def __init__(self, client: DataParallelLLM) -> None:
        self._client = client

    def put(self, command: Any) -> None:
        loop = self._client._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(self._client.abort, command.request_id)
        except RuntimeError:  # the loop closed meanwhile
            pass


class DataParallelLLM(StreamingClient):
    """Owns the replicas' actor handles, the router, and the per-request queues of the asyncio side."""

    def __init__(self, ray: Any, actors: list[Any], descriptions: list[dict[str, Any]], router: PrefixAffinityRouter,
                 owns_ray: bool) -> None:
        self._ray = ray
        self._owns_ray = owns_ray
        first = descriptions[0]
        info: ServedModelInfo = first["info"]
        self._info = info
        self.tokenizer = first["tokenizer"]
        self.task = info.task
        self.max_model_len = info.max_model_len
        self.model_name = info.name
        self.block_size = first["block_size"]
        self._inputs = InputProcessor(self.tokenizer, info.max_model_len, info.vocab_size, info.context_limit,
                                      pooling=info.task != "generate")
        self.router = router
        self.replicas = [_Replica(actor, up=True, pid=d["pid"]) for actor, d in zip(actors, descriptions)]
        self.observer: OutputObserver | None = None
        self.dead_error: BaseException | None = None
        self.num_retried = 0
        self._flights: dict[str, _Flight] = {}
        self._loras: dict[int, LoRARequest] = {}
        self._loop: asyncio.AbstractEventLoop | None = None
        self._tasks: list[asyncio.Task] = []
        self._started = False
        self._closing = False

    # ---- launch --------------------------------------------------------------------------------------

    @classmethod
    def launch(cls, factory: Callable[[], LLMEngine], num_replicas: int, num_cpus_per_replica: int = 1,
               max_restarts: int = 4, routing: str = "affinity", router_config: RouterConfig | None = None
               ) -> DataParallelLLM:
        """Start num_replicas actors, each building its engine with factory(), and wait until all loaded.

        Ray: RAY_ADDRESS when set (a cluster, or "auto" for one started with `ray start` here); else a
        local instance bound to 127.0.0.1 with this machine's cores.
        """
        ray = require_ray()
        if num_replicas < 1:
            raise ValueError(f"data_parallel_size must be >= 1, got {num_replicas}")
        owns_ray = _connect(ray)
        try:
            # NOTE: refused here rather than left pending: Ray would wait for the CPUs forever
            have = int(ray.available_resources().get("CPU", 0))
            need = num_replicas * num_cpus_per_replica
            if need > have:
                raise ValueError(f"{num_replicas} replicas of {num_cpus_per_replica} CPUs need {need} CPUs; the Ray "
                                 f"cluster has {have} free (lower --data-parallel-size or --data-parallel-threads, or "
                                 "add nodes)")
            remote_cls = ray.remote(EngineReplica).options(
                num_cpus=num_cpus_per_replica, max_restarts=max_restarts, max_task_retries=0,
                scheduling_strategy="SPREAD",  # on a cluster, replicas on different nodes first
            )
            actors = [remote_cls.remote(factory) for _ in range(num_replicas)]
            descriptions = ray.get([a.describe.remote() for a in actors], timeout=_LOAD_TIMEOUT_S)
        except BaseException:
            if owns_ray:
                ray.shutdown()
            raise
        config = router_config or RouterConfig(block_size=descriptions[0]["block_size"] or 16, policy=routing)
        return cls(ray, actors, descriptions, PrefixAffinityRouter(num_replicas, config), owns_ray)

    # ---- lifecycle (asyncio thread) -----------------------------------------------------------------

    def start(self) -> None:
        assert not self._started, "DataParallelLLM.start() called twice"
        self._loop = asyncio.get_running_loop()
        self._started = True
        self._tasks = [asyncio.create_task(self._listen(i)) for i in range(len(self.replicas))]
        self._tasks.append(asyncio.create_task(self._poll_stats()))

    async def shutdown(self, timeout: float = 30.0) -> None:
        if self._closing:
            return
        self._closing = True
        for task in self._tasks:
            task.cancel()
        self._fail_all(EngineDeadError("the server is shutting down"))
        calls = [replica.actor.shutdown.remote() for replica in self.replicas if replica.up]
        try:
            await asyncio.wait_for(asyncio.gather(*calls, return_exceptions=True), timeout)
        except asyncio.TimeoutError:
            logger.warning("replicas did not stop within %.0fs; killing them", timeout)
        for replica in self.replicas:
            try:
                self._ray.kill(replica.actor, no_restart=True)
            except Exception:  # already gone
                pass
        if self._owns_ray:
            self._ray.shutdown()

    @property
    def is_running(self) -> bool:
        return self._started and not self._closing and any(r.up for r in self.replicas)

    @property
    def num_unfinished(self) -> int:
        return len(self._flights)

    @property
    def num_waiting(self) -> int:
        """Requests not yet running on their replica: routed minus running, per replica."""
        return sum(max(0, r.load - r.stats.num_running) for r in self.replicas)

    @property
    def stats(self) -> EngineStats:
        """The replicas' snapshots summed (KV usage: their mean)."""
        snaps = [r.stats for r in self.replicas]
        return EngineStats(
            num_running=sum(s.num_running for s in snaps), num_waiting=self.num_waiting,
            kv_cache_usage=sum(s.kv_cache_usage for s in snaps) / len(snaps),
            num_preemptions=sum(s.num_preemptions for s in snaps),
            prefix_cache_queries=sum(s.prefix_cache_queries for s in snaps),
            prefix_cache_hits=sum(s.prefix_cache_hits for s in snaps),
            num_adds_processed=sum(s.num_adds_processed for s in snaps),
        )

    def replica_stats(self) -> list[EngineStats]:
        """Each replica's latest snapshot, by replica index (zeros while a replica is down)."""
        return [r.stats for r in self.replicas]

    def routing_counters(self) -> dict[str, Any]:
        """For /metrics: routes by kind, requests per replica, restarts, retries, which replicas are up."""
        return {"routes": dict(self.router.counts), "routed": [r.num_routed for r in self.replicas],
                "restarts": [r.num_restarts for r in self.replicas], "up": [r.up for r in self.replicas],
                "retried": self.num_retried, "owner_hits": self.router.num_owner_hits,
                "with_full_block": self.router.num_with_full_block}

    def replica_pids(self) -> list[int]:
        return [r.pid for r in self.replicas]

    # ---- the model (local: the driver holds the tokenizer) ---------------------------------------------

    def model_info(self) -> ServedModelInfo:
        return self._info

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._inputs.tokenize(text, add_special_tokens=add_special_tokens)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        return self._inputs.apply_chat_template(messages, add_generation_prompt=add_generation_prompt, **kwargs)

    def check_prompt(self, prompt_ids: list[int], params: SamplingParams) -> None:
        self._inputs.check_token_ids(prompt_ids, params)

    # ---- requests (asyncio thread) -------------------------------------------------------------------

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams, priority: int = 0,
                    arrival_time: float | None = None, lora_request: LoRARequest | None = None) -> RequestStream:
        """Validate here (InvalidRequest before any response starts), route, send; outputs arrive on the stream."""
        if not self.is_running:
            raise EngineDeadError(f"no replica is running: {self.dead_error!r}")
        assert request_id not in self._flights, f"duplicate request id {request_id!r}"
        text, token_ids = self._inputs.process(prompt, params)
        flight = _Flight(request_id, {"prompt": text, "prompt_token_ids": token_ids}, token_ids, params, priority,
                         lora_request, time.monotonic() if arrival_time is None else arrival_time, asyncio.Queue())
        self._flights[request_id] = flight
        if not self._dispatch_to_replica(flight, exclude=None):
            del self._flights[request_id]
            raise EngineDeadError("no replica is available")
        return RequestStream(request_id, flight.outputs, _AbortSink(self))  # type: ignore[arg-type]

    def abort(self, request_id: str) -> None:
        """Abort a request on its replica; unknown or finished ids are ignored."""
        flight = self._flights.pop(request_id, None)
        if flight is None or flight.replica < 0:
            return
        replica = self.replicas[flight.replica]
        replica.load -= 1
        self._background(replica.actor.abort.remote(request_id))

    def _dispatch_to_replica(self, flight: _Flight, exclude: int | None) -> bool:
        """Route and submit one request; False when no replica can take it."""
        available = [r.up and i != exclude for i, r in enumerate(self.replicas)]
        if not any(available):
            available = [r.up for r in self.replicas]  # the excluded one came back: better than failing
        lora_id = flight.lora_request.lora_int_id if flight.lora_request is not None else 0
        route = self.router.route(flight.token_ids, [r.load for r in self.replicas], available, lora_id)
        if route is None:
            return False
        replica = self.replicas[route.replica]
        flight.replica = route.replica
        flight.attempt += 1
        replica.load += 1
        replica.num_routed += 1
        ref = replica.actor.add.remote(flight.request_id, flight.prompt, flight.params, flight.priority,
                                       flight.lora_request)
        asyncio.ensure_future(self._await_add(flight, flight.attempt, ref))
        return True

    async def _await_add(self, flight: _Flight, attempt: int, ref: Any) -> None:
        try:
            await ref
        except Exception as exc:  # the replica is gone; the add never ran (or its outputs are lost)
            if self._flights.get(flight.request_id) is flight and flight.attempt == attempt:
                self._retry_or_fail(flight, exc)

    def _retry_or_fail(self, flight: _Flight, exc: BaseException) -> None:
        """A request whose replica failed: resend it if it produced nothing yet, else end it with an error."""
        failed = flight.replica
        self.replicas[failed].load -= 1
        if flight.num_outputs == 0 and flight.attempt < _MAX_ATTEMPTS and not self._closing:
            self.num_retried += 1
            if self._dispatch_to_replica(flight, exclude=failed):
                return
        self._flights.pop(flight.request_id, None)
        flight.outputs.put_nowait(EngineStepError(
            f"data-parallel replica {failed} failed while running the request: {type(exc).__name__}"))

    # ---- calls forwarded to replicas ---------------------------------------------------------------

    async def _call(self, replica: _Replica, name: str, *args: Any) -> Any:
        ok, value = await asyncio.wait_for(replica.actor.run_method.remote(name, *args), _CALL_TIMEOUT_S)
        if not ok:
            raise value
        return value

    def _least_loaded(self) -> _Replica:
        up = [r for r in self.replicas if r.up]
        if not self.is_running or not up:
            raise EngineDeadError("no replica is available")
        return min(up, key=lambda r: r.load)

    async def encode(self, prompts: Sequence[PromptType], truncate_prompt_tokens: int | None = None,
                     normalize: bool | None = None) -> tuple[list[list[int]], list[list[float]]]:
        """Pooling: the whole call on the least-loaded replica (once more elsewhere if that one dies)."""
        for attempt in range(2):
            replica = self._least_loaded()
            replica.load += 1
            try:
                return await self._call(replica, "encode", list(prompts), truncate_prompt_tokens, normalize)
            except self._ray.exceptions.RayError as exc:
                if attempt == 1:
                    raise EngineStepError(f"data-parallel replica failed: {type(exc).__name__}") from exc
            finally:
                replica.load -= 1
        raise AssertionError("unreachable")

    async def _broadcast(self, name: str, *args: Any) -> list[Any]:
        up = [r for r in self.replicas if r.up]
        if not self.is_running or not up:
            raise EngineDeadError("no replica is available")
        return list(await asyncio.gather(*(self._call(r, name, *args) for r in up)))

    async def add_lora(self, lora_request: LoRARequest) -> dict | None:
        """Register an adapter on every replica (and on any replica that restarts later)."""
        tasks = await self._broadcast("add_lora", lora_request)
        self._loras[lora_request.lora_int_id] = lora_request
        return tasks[0]

    async def remove_lora(self, lora_id: int) -> bool:
        removed = await self._broadcast("remove_lora", lora_id)
        self._loras.pop(lora_id, None)
        return any(removed)

    async def prepare_structured_output(self, params: StructuredOutputsParams) -> None:
        await self._call(self._least_loaded(), "prepare_structured_output", params)

    async def reset_prefix_cache(self) -> bool:
        return all(await self._broadcast("reset_prefix_cache"))

    # ---- the replicas' output streams ------------------------------------------------------------------

    async def _listen(self, index: int) -> None:
        """Move replica index's outputs to their requests; on its death, fail over and wait for the restart."""
        replica = self.replicas[index]
        while not self._closing:
            try:
                async for ref in replica.actor.outputs.options(num_returns="streaming").remote():
                    self._dispatch(index, await ref)
                raise EngineDeadError("the replica's output stream ended")
            except asyncio.CancelledError:
                raise
            except Exception as exc:
                if self._closing:
                    return
                self._replica_down(index, exc)
                await self._wait_until_back(index)

    def _dispatch(self, index: int, batch: list[tuple[str, Any]]) -> None:
        now = time.monotonic()
        for request_id, item in batch:
            flight = self._flights.get(request_id)
            if flight is None or flight.replica != index:
                continue  # aborted, or a stale reply of a replica the request left
            if isinstance(item, BaseException):
                self._finish(flight)
                flight.outputs.put_nowait(item)
                continue
            flight.num_outputs += 1
            item.prompt, item.prompt_token_ids = flight.prompt["prompt"], flight.token_ids  # the replica left them out
            self._restamp(flight, item, now)
            if self.observer is not None:
                try:
                    self.observer(item, now)
                except Exception:  # a metrics bug must not drop outputs
                    logger.exception("output observer failed")
            if item.finished:
                self._finish(flight)
            flight.outputs.put_nowait(item)

    def _restamp(self, flight: _Flight, out: RequestOutput, now: float) -> None:
        """Latency metrics on the driver's clock: the replica's monotonic clock is another machine's."""
        if flight.first_token_time is None and any(seq.token_ids for seq in out.outputs):
            flight.first_token_time = now
        out.metrics = {**out.metrics, "arrival_time": flight.arrival}
        if flight.first_token_time is not None:
            out.metrics["first_token_time"] = flight.first_token_time

    def _finish(self, flight: _Flight) -> None:
        if self._flights.pop(flight.request_id, None) is flight:
            self.replicas[flight.replica].load -= 1

    def _replica_down(self, index: int, exc: BaseException) -> None:
        replica = self.replicas[index]
        logger.error("data-parallel replica %d (pid %d) failed: %s", index, replica.pid, exc)
        replica.up = False
        replica.stats = EngineStats()
        self.router.forget_replica(index)  # a restarted replica's prefix cache is empty
        for flight in [f for f in self._flights.values() if f.replica == index]:
            self._retry_or_fail(flight, exc)
        if not any(r.up for r in self.replicas):
            self.dead_error = exc

    async def _wait_until_back(self, index: int) -> None:
        """Poll the restarting actor until it answers; re-register adapters; route to it again."""
        replica = self.replicas[index]
        delay = 0.2
        while not self._closing:
            try:
                description = await asyncio.wait_for(replica.actor.describe.remote(), _LOAD_TIMEOUT_S)
                for lora in list(self._loras.values()):
                    await self._call(replica, "add_lora", lora)
            except asyncio.CancelledError:
                raise
            except Exception as exc:  # still restarting (or gone for good: keep the replica down)
                logger.debug("replica %d not back yet: %r", index, exc)
                await asyncio.sleep(delay)
                delay = min(2 * delay, 2.0)
                continue
            replica.pid = description["pid"]
            replica.num_restarts += 1
            replica.load = sum(1 for f in self._flights.values() if f.replica == index)
            replica.up = True
            self.dead_error = None
            logger.warning("data-parallel replica %d is back (pid %d)", index, replica.pid)
            return

    async def _poll_stats(self) -> None:
        while True:
            await asyncio.sleep(_STATS_INTERVAL_S)
            up = [r for r in self.replicas if r.up]
            results = await asyncio.gather(
                *(asyncio.wait_for(r.actor.stats.remote(), _CALL_TIMEOUT_S) for r in up), return_exceptions=True)
            for replica, result in zip(up, results):
                if not isinstance(result, BaseException) and replica.up:
                    replica.stats = result[0]

    def _fail_all(self, exc: BaseException) -> None:
        for flight in list(self._flights.values()):
            self._finish(flight)
            flight.outputs.put_nowait(exc)

    def _background(self, ref: Any) -> None:
        """Await a fire-and-forget call so that its failure (a dead replica) is consumed, not logged by Ray."""

        async def consume() -> None:
            try:
                await ref
            except Exception:
                pass

        if self._loop is not None and not self._loop.is_closed():
            asyncio.ensure_future(consume())


def _connect(ray: Any) -> bool:
    """Connect to Ray; True when this process started it (and so stops it)."""
    if ray.is_initialized():
        return False
    address = os.environ.get("RAY_ADDRESS")
    if address:
        ray.init(address=address, logging_level=logging.WARNING)
        return True
    # NOTE: bound to the loopback interface: nothing outside this machine reaches the local instance. Its CPUs
    # are this process's cores, so launch() refuses more replicas x CPUs than the machine has.
    ray.init(address="local", _node_ip_address="127.0.0.1", num_cpus=len(os.sched_getaffinity(0)),
             include_dashboard=False, logging_level=logging.WARNING, object_store_memory=128 << 20)
    node_ip = ray.util.get_node_ip_address()
    if node_ip != "127.0.0.1":  # ray was imported before require_ray() could set LOCAL_ONLY_ENV
        logger.warning("the local Ray instance listens on %s, not only on 127.0.0.1: set %s=0 before ray is "
                       "imported", node_ip, LOCAL_ONLY_ENV)
    return True

