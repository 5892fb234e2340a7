"""EngineCore: schedule -> execute (the worker) -> update, one step at a time."""

from __future__ import annotations

import concurrent.futures
import logging
import time

import torch

from pagellm.config import CacheConfig, SchedulerConfig, SpeculativeConfig
from pagellm.core.scheduler import Scheduler
from pagellm.engine.spec_decode import NgramSpeculator
from pagellm.outputs import EngineCoreOutput
from pagellm.request import Request, RequestStatus
from pagellm.worker.worker import Worker

# While only requests waiting for their grammar remain, a step waits this long for a compile to finish.
_GRAMMAR_WAIT_S = 0.02

logger = logging.getLogger(__name__)


class EngineCore:
    """Owns the scheduler and drives the worker; knows nothing of text."""

    def __init__(self, worker: Worker, scheduler_config: SchedulerConfig, cache_config: CacheConfig,
                 speculative_config: SpeculativeConfig | None = None) -> None:
        self.scheduler_config = scheduler_config
        self.cache_config = cache_config
        assert cache_config.num_blocks is not None, "size the KV cache before building the core"
        self.scheduler = Scheduler(scheduler_config, cache_config)
        self.worker = worker
        self.vocab_size = worker.info.vocab_size
        # Constrained requests whose grammar is still compiling: known to the scheduler (counted, abortable)
        # but kept out of its waiting queue, so they hold no place in line and stall nobody.
        self._grammar_waiting: list[Request] = []
        self._bitmask: torch.Tensor | None = None  # int32 [max_num_seqs, ceil(vocab / 32)], reused
        self.speculator = (NgramSpeculator(speculative_config, scheduler_config.max_model_len)
                           if speculative_config is not None else None)
        self._capacity = min(scheduler_config.max_model_len, cache_config.num_blocks * cache_config.block_size)

    def add_request(self, request: Request) -> None:
        self.scheduler.add_request(request)
        grammar = request.structured_output
        if grammar is not None and not grammar.is_ready():
            self.scheduler.waiting.remove(request)
            self._grammar_waiting.append(request)

    def abort_requests(self, req_ids: list[str]) -> None:
        self._release_grammar_waiting(set(req_ids))
        self.scheduler.abort_requests(req_ids)
        self._release_finished_if_idle()

    def _release_finished_if_idle(self) -> None:
        """Hand finished requests to the runner now when no step is coming to carry them.

        NOTE: finished ids reach the runner with the next step's SchedulerOutput; an idle engine takes no
        step, so without this the last requests' runner state (seeded generators) would outlive them.
        """
        if not self.scheduler.has_unfinished_requests():
            self.worker.release(self.scheduler.take_finished_req_ids())

    def _release_grammar_waiting(self, req_ids: set[str]) -> None:
        """Put back into the scheduler's queue those of req_ids still waiting for a grammar."""
        keep = []
        for request in self._grammar_waiting:
            if request.req_id in req_ids:
                self.scheduler.waiting.push(request)
            else:
                keep.append(request)
        self._grammar_waiting = keep

    def _admit_compiled(self) -> list[EngineCoreOutput]:
        """Requests whose grammar is ready join the waiting queue; a failed compile aborts its request."""
        ready = [r for r in self._grammar_waiting if r.structured_output.is_ready()]
        failed = [r for r in self._grammar_waiting if r.structured_output.has_failed()]
        if not ready and not failed and not self.scheduler.waiting and not self.scheduler.running:
            # NOTE: nothing else to run: wait briefly for a compile instead of spinning the engine loop
            futures = [r.structured_output.future for r in self._grammar_waiting]
            concurrent.futures.wait(futures, timeout=_GRAMMAR_WAIT_S, return_when=concurrent.futures.FIRST_COMPLETED)
            ready = [r for r in self._grammar_waiting if r.structured_output.is_ready()]
            failed = [r for r in self._grammar_waiting if r.structured_output.has_failed()]
        for request in failed:
            logger.error("grammar compile failed for %s: %r", request.req_id,
                         request.structured_output.future.exception())
        done = {r.req_id for r in ready + failed}
        self._release_grammar_waiting(done)
        if failed:
            self.scheduler.abort_requests([r.req_id for r in failed])
        return [EngineCoreOutput(req_id=r.req_id, new_token_ids=[], finish_reason="abort") for r in failed]

    def _fill_grammar_bitmask(self, sched_out) -> None:
        """One bitmask row per constrained request that samples this step, from its matcher's state."""
        rows = []  # (req_id, grammar, proposals): 1 + len(proposals) bitmask rows each
        for sched in sched_out.scheduled:
            if sched.sample:
                grammar = self.scheduler.requests[sched.req_id].structured_output
                if grammar is not None:
                    rows.append((sched.req_id, grammar, sched.spec_token_ids))
        if not rows:
            return
        num_rows = sum(1 + len(proposals) for _, _, proposals in rows)
        if self._bitmask is None or self._bitmask.shape[0] < num_rows:
            size = max(num_rows, self.scheduler_config.max_num_seqs)
            self._bitmask = torch.full((size, -(-self.vocab_size // 32)), -1, dtype=torch.int32)
        row = 0
        req_ids = []
        for req_id, grammar, proposals in rows:
            if proposals:  # speculative decoding: the mask after each proposal too
                grammar.fill_bitmasks(self._bitmask, row, proposals)
            else:
                grammar.fill_bitmask(self._bitmask, row)
            req_ids += [req_id] * (1 + len(proposals))
            row += 1 + len(proposals)
        sched_out.grammar_req_ids = req_ids
        sched_out.grammar_bitmask = self._bitmask[:num_rows]

    def finish_requests(self, req_ids: list[str]) -> None:
        """Finish requests that hit a stop string (detected after detokenization)."""
        self.scheduler.finish_requests(req_ids, RequestStatus.FINISHED_STOPPED)
        self._release_finished_if_idle()

    def has_unfinished_requests(self) -> bool:
        return self.scheduler.has_unfinished_requests()

    def step(self) -> list[EngineCoreOutput]:
        failed = self._admit_compiled() if self._grammar_waiting else []
        sched_out = self.scheduler.schedule()
        if not sched_out.is_empty:
            self._fill_grammar_bitmask(sched_out)
        started = time.perf_counter()
        runner_out = self.worker.execute(sched_out)
        if sched_out.is_empty:
            return failed
        elapsed = time.perf_counter() - started
        self.scheduler.observe_step_time(elapsed)
        outputs = failed + self.scheduler.update_from_output(sched_out, runner_out)
        if self.speculator is not None:
            self._speculate(sched_out, runner_out, elapsed)
        self._release_finished_if_idle()
        return outputs

    def _speculate(self, sched_out, runner_out, elapsed: float) -> None:
        """Count this step's verified proposals and time, then propose for the requests that decode next."""
        speculator = self.speculator
        speculator.forget(sched_out.finished_req_ids)
        if all(len(s.token_ids) == 1 + len(s.spec_token_ids) for s in sched_out.scheduled):  # decode-only
            speculator.observe_step(sum(len(s.token_ids) for s in sched_out.scheduled), elapsed)
        for sched in sched_out.scheduled:
            if sched.spec_token_ids and sched.req_id in runner_out.sampled_token_ids:
                speculator.record(sched.req_id, len(sched.spec_token_ids),
                                  len(runner_out.spec_token_ids.get(sched.req_id, ())))
        speculator.propose(self.scheduler.running, self._capacity, self.worker.max_fused_rows)
