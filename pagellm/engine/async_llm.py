"""AsyncLLM: one background thread steps the synchronous LLMEngine; asyncio callers stream outputs.

Threading contract: the engine thread owns the LLMEngine exclusively (scheduler, KV cache, output
processor). The asyncio side never touches it; it sends commands through a thread-safe queue and
receives outputs through per-request asyncio.Queues fed with ``loop.call_soon_threadsafe``. torch
releases the GIL inside its kernels, so the event loop keeps serving HTTP while the model runs.
``AsyncLLM.build(factory)`` also loads the model on that thread (see build() for why it matters).
"""

from __future__ import annotations

import asyncio
import concurrent.futures
import logging
import queue
import threading
import time
import traceback
from collections.abc import AsyncGenerator, Callable, Sequence
from dataclasses import dataclass
from typing import Any, TypeVar

from pagellm.engine.input_processor import PromptType
from pagellm.engine.llm_engine import LLMEngine, ProcessedPrompt
from pagellm.engine.spec_decode import SpecDecodeStats
from pagellm.lora_request import LoRARequest
from pagellm.outputs import RequestOutput
from pagellm.sampling_params import SamplingParams
from pagellm.structured_output import StructuredOutputsParams

logger = logging.getLogger(__name__)

T = TypeVar("T")


class EngineDeadError(RuntimeError):
    """The engine thread stopped or failed; no request can be served."""


class EngineStepError(RuntimeError):
    """An engine step raised; the requests in flight were aborted (a server fault, not the client's)."""


@dataclass(frozen=True)
class EngineStats:
    """A snapshot of the scheduler, published by the engine thread after every step.

    NOTE: readers on other threads see a whole snapshot (one attribute swap), never a scheduler
    caught mid-update.
    """

    num_running: int = 0
    num_waiting: int = 0
    kv_cache_usage: float = 0.0
    num_preemptions: int = 0
    prefix_cache_queries: int = 0
    prefix_cache_hits: int = 0
    num_adds_processed: int = 0  # add commands the engine thread has taken off the queue
    spec_decode: SpecDecodeStats | None = None  # a copy; None without speculative decoding


@dataclass(frozen=True)
class ServedModelInfo:
    """What a server publishes about the model an AsyncLLM runs (GET /v1/models, /tokenize, /classify)."""

    name: str
    root: str  # the model's folder or .gguf file
    task: str  # generate | embed | classify
    max_model_len: int
    context_limit: int  # the most tokens one sequence may hold (max_model_len, or less if the KV pool is smaller)
    vocab_size: int
    hidden_size: int  # the size of an embedding
    labels: tuple[str, ...]  # a classification model's classes, in class-id order
    lora_enabled: bool
    max_num_seqs: int


@dataclass
class _Add:
    request_id: str
    prompt: ProcessedPrompt
    params: SamplingParams
    priority: int
    arrival_time: float
    lora_request: LoRARequest | None = None


@dataclass
class _Abort:
    request_id: str


@dataclass
class _Call:
    fn: Callable[[LLMEngine], Any]
    future: concurrent.futures.Future


class _Stop:
    pass


_Command = _Add | _Abort | _Call | _Stop
OutputObserver = Callable[[RequestOutput, float], None]

# NOTE: consecutive failed steps after which the engine is declared dead; one failure aborts the
# requests in flight and the engine goes on, since a bad request must not take the server down.
_MAX_CONSECUTIVE_STEP_FAILURES = 3


class RequestStream:
    """The outputs of one request, in order. Closing it (or losing it) before the end aborts the request."""

    def __init__(self, request_id: str, outputs: asyncio.Queue[RequestOutput | BaseException],
                 commands: queue.SimpleQueue[_Command]) -> None:
        self.request_id = request_id
        self.finished = False
        self._outputs = outputs
        self._commands = commands

    def __aiter__(self) -> RequestStream:
        return self

    async def __anext__(self) -> RequestOutput:
        if self.finished:
            raise StopAsyncIteration
        try:
            item = await self._outputs.get()
        except BaseException:  # cancelled: the client is gone, free the KV blocks now
            self.close()
            raise
        if isinstance(item, BaseException):
            self.finished = True  # the engine already dropped the request
            raise item
        self.finished = item.finished
        return item

    def close(self) -> None:
        """Abort the request unless it finished."""
        if not self.finished:
            self.finished = True
            self._commands.put(_Abort(self.request_id))

    async def aclose(self) -> None:
        self.close()

    def __del__(self) -> None:
        # NOTE: a stream dropped unread (a response never started) must not leave its request
        # running; SimpleQueue.put is safe to call from __del__.
        if not self.finished:
            self._commands.put(_Abort(self.request_id))


class StreamingClient:
    """`generate` on top of a client's `add_request(...) -> RequestStream` (AsyncLLM, DataParallelLLM)."""

    async def generate(self, request_id: str, prompt: PromptType, params: SamplingParams, priority: int = 0,
                       arrival_time: float | None = None,
                       lora_request: LoRARequest | None = None) -> AsyncGenerator[RequestOutput, None]:
        """Add a request and yield its RequestOutputs until it finishes; an early exit aborts it."""
        stream = self.add_request(request_id, prompt, params, priority, arrival_time, lora_request)
        try:
            async for out in stream:
                yield out
        finally:
            stream.close()


class AsyncLLM(StreamingClient):
    """Owns the engine thread and the per-request output streams of the asyncio side."""

    def __init__(self, engine: LLMEngine, observer: OutputObserver | None = None) -> None:
        self._engine = engine  # NOTE: the engine thread's alone once started; the methods below are the door
        self.tokenizer = engine.tokenizer
        self.task = engine.task
        self.max_model_len = engine.max_model_len
        self.model_name = engine.model_name
        # the prefix cache's block size (a data-parallel router hashes prompts the same way); 0: no KV cache
        self.block_size = engine.cache_config.block_size if engine.cache_config is not None else 0
        self._info = ServedModelInfo(
            name=engine.model_name, root=str(engine.source.path), task=engine.task,
            max_model_len=engine.max_model_len, context_limit=engine.context_limit,
            vocab_size=engine.info.vocab_size, hidden_size=engine.hidden_size,
            labels=tuple(getattr(engine, "labels", ())), lora_enabled=engine.lora_config is not None,
            max_num_seqs=engine.scheduler_config.max_num_seqs,
        )
        self._num_calls = 0  # encode calls queued or running (asyncio thread only)
        self.observer = observer
        self.stats = EngineStats()
        self.dead_error: BaseException | None = None
        self._commands: queue.SimpleQueue[_Command] = queue.SimpleQueue()
        # request id -> its output queue, until the final output or an error (asyncio thread only)
        self._queues: dict[str, asyncio.Queue[RequestOutput | BaseException]] = {}
        self._num_adds_sent = 0  # asyncio thread only
        self._loop: asyncio.AbstractEventLoop | None = None
        self._thread: threading.Thread | None = None
        self._go: threading.Event | None = None  # set: a thread made by build() may start stepping
        self._started = False

    @classmethod
    def build(cls, factory: Callable[[], LLMEngine]) -> AsyncLLM:
        """Build the engine with factory() on the engine thread itself, then wait for start().

        NOTE: the thread that loads the model is the one that steps it. GNU OpenMP gives every
        thread that runs a parallel region its own worker team, and once more threads are managed
        than there are cores it stops spin-waiting between regions: a model loaded on the main
        thread and stepped on another made decode steps ~15% slower (CPU share 0.8 instead of 1.0).
        """
        built: concurrent.futures.Future[LLMEngine] = concurrent.futures.Future()
        go = threading.Event()
        owner: list[AsyncLLM] = []

        def thread_main() -> None:
            try:
                built.set_result(factory())
            except BaseException as exc:  # noqa: BLE001 - re-raised by build() on the caller's thread
                built.set_exception(exc)
                return
            go.wait()
            owner[0]._run()

        thread = threading.Thread(target=thread_main, name="pagellm-engine", daemon=True)
        thread.start()
        async_llm = cls(built.result())  # a load error surfaces here
        owner.append(async_llm)
        async_llm._thread, async_llm._go = thread, go
        return async_llm

    # ---- lifecycle (asyncio thread) --------------------------------------------------------

    def start(self) -> None:
        """Start stepping; call from the event loop that will consume the outputs."""
        assert not self._started, "AsyncLLM.start() called twice"
        self._loop = asyncio.get_running_loop()
        self._started = True
        if self._go is not None:
            self._go.set()  # the thread that built the engine runs it
        else:
            self._thread = threading.Thread(target=self._run, name="pagellm-engine", daemon=True)
            self._thread.start()

    async def shutdown(self, timeout: float = 30.0) -> None:
        """Abort whatever is left and stop the engine thread."""
        if self._thread is None:
            return
        self._commands.put(_Stop())
        if self._go is not None:
            self._go.set()  # never started: let the thread run into the stop command and exit
        await asyncio.to_thread(self._thread.join, timeout)
        self._fail_all(EngineDeadError("the server is shutting down"))
        self._thread = None

    @property
    def is_running(self) -> bool:
        return self._started and self._thread is not None and self._thread.is_alive() and self.dead_error is None

    @property
    def num_unfinished(self) -> int:
        return len(self._queues)

    @property
    def num_waiting(self) -> int:
        """Waiting requests, counting adds still in the command queue (the scheduler has not seen them)."""
        stats = self.stats
        return stats.num_waiting + max(0, self._num_adds_sent - stats.num_adds_processed) + self._num_calls

    # ---- the model ----------------------------------------------------------------------------

    def model_info(self) -> ServedModelInfo:
        return self._info

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self._engine.input_processor.tokenize(text, add_special_tokens=add_special_tokens)

    def render_chat(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True, **kwargs: Any) -> str:
        """The chat template applied to messages (InvalidRequest for a malformed conversation)."""
        return self._engine.input_processor.apply_chat_template(messages, add_generation_prompt=add_generation_prompt,
                                                                **kwargs)

    def check_prompt(self, prompt_ids: list[int], params: SamplingParams) -> None:
        """InvalidRequest unless the prompt and params fit (what add_request checks, without adding)."""
        self._engine.input_processor.check_token_ids(prompt_ids, params)

    # ---- requests (asyncio thread) --------------------------------------------------------

    def add_request(self, request_id: str, prompt: PromptType, params: SamplingParams, priority: int = 0,
                    arrival_time: float | None = None, lora_request: LoRARequest | None = None) -> RequestStream:
        """Queue a request for the engine thread now; its outputs arrive on the returned stream.

        NOTE: the add is eager (not on first iteration) so that admission control counts it at once.
        """
        if not self.is_running:
            raise EngineDeadError(f"the engine is not running: {self.dead_error!r}")
        assert request_id not in self._queues, f"duplicate request id {request_id!r}"
        # NOTE: validated here, once, so a bad request raises InvalidRequest to its caller before any
        # response starts; the engine thread takes the processed prompt as it is
        processed = self._engine.process_inputs(prompt, params, lora_request)
        outputs: asyncio.Queue[RequestOutput | BaseException] = asyncio.Queue()
        self._queues[request_id] = outputs
        self._num_adds_sent += 1
        arrival = time.monotonic() if arrival_time is None else arrival_time
        self._commands.put(_Add(request_id, processed, params, priority, arrival, lora_request))
        return RequestStream(request_id, outputs, self._commands)

    def abort(self, request_id: str) -> None:
        """Abort a request; unknown or finished ids are ignored."""
        self._commands.put(_Abort(request_id))

    async def _on_engine_thread(self, fn: Callable[[LLMEngine], T]) -> T:
        """fn(engine) on the engine thread between two steps; the typed methods below are built on it."""
        if not self.is_running:
            raise EngineDeadError(f"the engine is not running: {self.dead_error!r}")
        future: concurrent.futures.Future = concurrent.futures.Future()
        self._commands.put(_Call(fn, future))
        return await asyncio.wrap_future(future)

    async def add_lora(self, lora_request: LoRARequest) -> dict | None:
        """Load and register an adapter; returns its task file (a classification adapter's labels)."""
        adapter = await self._on_engine_thread(lambda engine: engine.add_lora(lora_request))
        return adapter.task

    async def remove_lora(self, lora_id: int) -> bool:
        """Unregister an adapter (InvalidRequest while unfinished requests use it)."""
        return await self._on_engine_thread(lambda engine: engine.remove_lora(lora_id))

    async def encode(self, prompts: Sequence[PromptType], truncate_prompt_tokens: int | None = None,
                     normalize: bool | None = None) -> tuple[list[list[int]], list[list[float]]]:
        """(token ids, rows) per prompt of a pooling model: embeddings (task embed) or class probabilities
        (task classify). Every prompt is validated before any is computed."""

        def work(engine: LLMEngine) -> tuple[list[list[int]], list[list[float]]]:
            _, ids = engine.process_pooling_prompts(prompts, truncate_prompt_tokens)
            rows = engine.classify(ids) if engine.task == "classify" else engine.embed(ids, normalize=normalize)
            return ids, rows

        return await self._pooling_call(work)

    async def classify_and_embed(self, prompts: Sequence[PromptType], truncate_prompt_tokens: int | None = None,
                                 normalize: bool | None = None,
                                 ) -> tuple[list[list[int]], list[list[float]], list[list[float]]]:
        """(token ids, class probabilities, pooled embedding) per prompt of a classification model, from one
        forward each (LLMEngine.classify_and_embed)."""

        def work(engine: LLMEngine) -> tuple[list[list[int]], list[list[float]], list[list[float]]]:
            _, ids = engine.process_pooling_prompts(prompts, truncate_prompt_tokens)
            probs, vectors = engine.classify_and_embed(ids, normalize=normalize)
            return ids, probs, vectors

        return await self._pooling_call(work)

    async def _pooling_call(self, work):
        self._num_calls += 1
        try:
            return await self._on_engine_thread(work)
        finally:
            self._num_calls -= 1

    async def prepare_structured_output(self, params: StructuredOutputsParams) -> None:
        """Validate a constraint (InvalidRequest) and start compiling its grammar, off the event loop
        (the first call loads xgrammar)."""
        await asyncio.to_thread(self._engine.structured_output.prepare, params)

    async def reset_prefix_cache(self) -> bool:
        return await self._on_engine_thread(lambda engine: engine.reset_prefix_cache())

    def _dispatch(self, outputs: list[RequestOutput]) -> None:
        """Runs on the event loop: route each output to its queue; a final output retires the queue."""
        now = time.monotonic()
        for out in outputs:
            if self.observer is not None:
                try:
                    self.observer(out, now)
                except Exception:  # a metrics bug must not drop outputs
                    logger.exception("output observer failed")
            queue_ = self._queues.pop(out.request_id, None) if out.finished else self._queues.get(out.request_id)
            if queue_ is not None:
                queue_.put_nowait(out)

    def _fail_all(self, exc: BaseException) -> None:
        self._fail_requests(list(self._queues), exc)

    def _fail_requests(self, request_ids: list[str], exc: BaseException) -> None:
        for request_id in request_ids:
            queue_ = self._queues.pop(request_id, None)
            if queue_ is not None:
                queue_.put_nowait(exc)

    # ---- the engine thread ----------------------------------------------------------------

    def _run(self) -> None:
        engine = self._engine
        num_adds = 0
        num_failures = 0
        try:
            while True:
                # Block only when idle; otherwise take whatever arrived and step again, so new
                # requests join the running batch at the next step.
                commands = self._take_commands(block=not engine.has_unfinished_requests())
                stop = False
                for cmd in commands:
                    if isinstance(cmd, _Stop):
                        stop = True
                    elif isinstance(cmd, _Add):
                        num_adds += 1
                        self._add(cmd)
                    elif isinstance(cmd, _Abort):
                        self._post(self._dispatch, engine.abort_request([cmd.request_id]))
                    else:
                        self._call(cmd)
                if stop:
                    break
                outputs: list[RequestOutput] = []
                if engine.has_unfinished_requests():
                    try:
                        outputs = engine.step()
                        num_failures = 0
                    except Exception as exc:
                        num_failures += 1
                        self._recover_from_step_failure(exc, num_failures)
                self.stats = self._snapshot(num_adds)
                if outputs:
                    self._post(self._dispatch, outputs)
        except BaseException as exc:  # noqa: BLE001 - report any death to the waiting clients
            logger.exception("the engine thread died")
            self.dead_error = exc
            self._post(self._fail_all, EngineDeadError(f"the engine thread died: {exc!r}"))
            return
        self._abort_all()
        self.stats = self._snapshot(num_adds)

    def _take_commands(self, block: bool) -> list[_Command]:
        commands: list[_Command] = []
        if block:
            commands.append(self._commands.get())
        while True:
            try:
                commands.append(self._commands.get_nowait())
            except queue.Empty:
                return commands

    def _add(self, cmd: _Add) -> None:
        try:
            self._engine.add_request(cmd.request_id, cmd.prompt, cmd.params, priority=cmd.priority,
                                    arrival_time=cmd.arrival_time, lora_request=cmd.lora_request)
        except Exception as exc:  # InvalidRequest reaches the handler as a 400; the engine goes on
            self._post(self._fail_requests, [cmd.request_id], exc)

    def _call(self, cmd: _Call) -> None:
        if not cmd.future.set_running_or_notify_cancel():
            return
        try:
            cmd.future.set_result(cmd.fn(self._engine))
        except Exception as exc:
            cmd.future.set_exception(exc)

    def _recover_from_step_failure(self, exc: Exception, num_failures: int) -> None:
        """Abort every request in flight (their state may be half-updated) and tell their clients."""
        logger.error("engine step failed (%d in a row): %s", num_failures, "".join(traceback.format_exception(exc)))
        # NOTE: only the requests the engine held fail; adds still queued run normally afterwards.
        aborted = self._abort_all()
        self._post(self._fail_requests, aborted, EngineStepError(f"engine step failed: {exc!r}"))
        if num_failures >= _MAX_CONSECUTIVE_STEP_FAILURES:
            raise EngineDeadError(f"{num_failures} engine steps failed in a row") from exc

    def _abort_all(self) -> list[str]:
        """Abort every request the engine holds; returns their ids."""
        return self._engine.abort_all()

    def _snapshot(self, num_adds: int) -> EngineStats:
        if self._engine.core is None:  # a pooling model: no scheduler
            return EngineStats(num_adds_processed=num_adds)
        scheduler = self._engine.core.scheduler
        return EngineStats(
            num_running=scheduler.num_running,
            num_waiting=scheduler.num_waiting,
            kv_cache_usage=scheduler.kv_cache_usage,
            num_preemptions=scheduler.num_preemptions,
            prefix_cache_queries=scheduler.prefix_cache_queries,
            prefix_cache_hits=scheduler.prefix_cache_hits,
            num_adds_processed=num_adds,
            spec_decode=self._engine.spec_decode_stats(),
        )

    def _post(self, fn: Callable[..., None], *args: Any) -> None:
        loop = self._loop
        if loop is None or loop.is_closed():
            return
        try:
            loop.call_soon_threadsafe(fn, *args)
        except RuntimeError:  # the loop closed between the check and the call
            pass
