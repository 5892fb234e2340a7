"""EngineReplica: one data-parallel replica, an AsyncLLM in its own process (a Ray actor's body).

This module imports no Ray: DataParallelLLM wraps the class with ``ray.remote`` when it launches replicas,
so the default install (without the `distributed` extra) can import it. Every method runs on the actor's
event loop, which is the loop the replica's AsyncLLM streams to.

Outputs leave through one stream per replica (``outputs()``): each item is a list of (request id, output
or exception) pairs, everything that was ready at once, so one Ray object carries a whole engine step's
outputs rather than one per request and token. Errors travel as values (never raised through Ray), so the
driver re-raises the engine's own exception (InvalidRequest keeps its param).
"""

from __future__ import annotations

import asyncio
import os
from collections import OrderedDict
from collections.abc import AsyncIterator, Callable
from dataclasses import replace
from typing import Any

from pagellm.engine.async_llm import AsyncLLM, EngineStats, RequestStream, ServedModelInfo
from pagellm.engine.llm_engine import LLMEngine
from pagellm.lora_request import LoRARequest
from pagellm.outputs import RequestOutput
from pagellm.sampling_params import SamplingParams

OutputItem = tuple[str, RequestOutput | BaseException]

# NOTE: an abort may overtake its add (an async actor does not order calls); remember that many ids
_MAX_EARLY_ABORTS = 4096


class EngineReplica:
    """Owns one AsyncLLM and the pumps that move its request streams into the replica's output stream."""

    def __init__(self, factory: Callable[[], LLMEngine]) -> None:
        self.llm = AsyncLLM.build(factory)  # loads the model on the thread that will step it
        self.pid = os.getpid()
        self._outbox: asyncio.Queue[OutputItem] | None = None
        self._pumps: dict[str, asyncio.Task] = {}
        self._early_aborts: OrderedDict[str, None] = OrderedDict()

    def _started(self) -> asyncio.Queue[OutputItem]:
        if self._outbox is None:  # the first call on the actor's loop starts the engine
            self.llm.start()
            self._outbox = asyncio.Queue()
        return self._outbox

    # ---- what the driver reads once -------------------------------------------------------------

    async def describe(self) -> dict[str, Any]:
        """The model, the tokenizer (the driver tokenizes and routes), the KV block size and this process id."""
        self._started()
        info: ServedModelInfo = self.llm.model_info()
        return {"info": info, "tokenizer": self.llm.tokenizer, "block_size": self.llm.block_size,
                "pid": self.pid}

    async def stats(self) -> tuple[EngineStats, int]:
        """The scheduler snapshot (num_waiting counting adds not yet stepped) and this process id."""
        self._started()
        return replace(self.llm.stats, num_waiting=self.llm.num_waiting), self.pid

    # ---- requests --------------------------------------------------------------------------------

    async def add(self, request_id: str, prompt: Any, params: SamplingParams, priority: int,
                  lora_request: LoRARequest | None) -> None:
        """Queue a request; its outputs (or its error) come out of outputs()."""
        outbox = self._started()
        if request_id in self._early_aborts:  # aborted before it arrived
            del self._early_aborts[request_id]
            return
        try:
            stream = self.llm.add_request(request_id, prompt, params, priority=priority, lora_request=lora_request)
        except Exception as exc:  # InvalidRequest, or the engine is dead
            outbox.put_nowait((request_id, exc))
            return
        self._pumps[request_id] = asyncio.create_task(self._pump(request_id, stream, outbox))

    async def _pump(self, request_id: str, stream: RequestStream, outbox: asyncio.Queue[OutputItem]) -> None:
        try:
            async for out in stream:
                # NOTE: the driver holds the prompt (it tokenized it) and puts it back: not resent every step
                out.prompt, out.prompt_token_ids = None, []
                outbox.put_nowait((request_id, out))
        except asyncio.CancelledError:
            pass  # aborted: the stream's close() below frees its KV blocks
        except Exception as exc:
            outbox.put_nowait((request_id, exc))
        finally:
            stream.close()
            self._pumps.pop(request_id, None)

    async def abort(self, request_id: str) -> None:
        task = self._pumps.pop(request_id, None)
        if task is not None:
            task.cancel()
            return
        self._early_aborts[request_id] = None
        while len(self._early_aborts) > _MAX_EARLY_ABORTS:
            self._early_aborts.popitem(last=False)

    async def outputs(self) -> AsyncIterator[list[OutputItem]]:
        """Every request's outputs, batched by what was ready together; runs until the actor stops."""
        outbox = self._started()
        while True:
            batch = [await outbox.get()]
            while not outbox.empty():
                batch.append(outbox.get_nowait())
            yield batch

    # ---- calls between steps ------------------------------------------------------------------

    async def run_method(self, name: str, *args: Any) -> tuple[bool, Any]:
        """(True, result) or (False, exception) of one of the AsyncLLM methods the driver forwards."""
        assert name in _FORWARDED, f"{name} is not forwarded to replicas"
        self._started()
        try:
            return True, await getattr(self.llm, name)(*args)
        except Exception as exc:
            return False, exc

    async def shutdown(self) -> None:
        for task in list(self._pumps.values()):
            task.cancel()
        await self.llm.shutdown(timeout=10.0)


_FORWARDED = frozenset({"encode", "add_lora", "remove_lora", "reset_prefix_cache", "prepare_structured_output"})
