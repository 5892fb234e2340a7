"""Scheduler: which tokens of which requests one engine step computes, under a token budget."""

from __future__ import annotations

import heapq
import itertools
from collections import deque
from collections.abc import Iterable, Iterator

from pagellm.config import CacheConfig, SchedulerConfig
from pagellm.core.kv_cache_manager import KVCacheManager
from pagellm.core.sched_output import ScheduledRequest, SchedulerOutput
from pagellm.errors import InvalidRequest
from pagellm.outputs import EngineCoreOutput, ModelRunnerOutput, TokenLogprob
from pagellm.request import Request, RequestStatus


class WaitingQueue:
    """Requests waiting for admission: FCFS order, or lowest (priority, arrival_time) first."""

    def __init__(self, policy: str) -> None:
        self.policy = policy
        self._fifo: deque[Request] = deque()
        self._heap: list[tuple[int, float, int, Request]] = []
        self._counter = itertools.count()  # tie-break for equal (priority, arrival_time): FIFO

    def push(self, request: Request, front: bool = False) -> None:
        if self.policy == "priority":
            # NOTE: a preempted request goes back to the place its key gives it; "front" is moot.
            key = (request.priority, request.arrival_time, next(self._counter), request)
            heapq.heappush(self._heap, key)
        elif front:
            self._fifo.appendleft(request)
        else:
            self._fifo.append(request)

    def peek(self) -> Request:
        return self._heap[0][3] if self.policy == "priority" else self._fifo[0]

    def pop(self) -> Request:
        return heapq.heappop(self._heap)[3] if self.policy == "priority" else self._fifo.popleft()

    def remove(self, request: Request) -> None:
        """O(n); only aborts and stop strings take it."""
        if self.policy == "priority":
            self._heap = [entry for entry in self._heap if entry[3] is not request]
            heapq.heapify(self._heap)
        else:
            self._fifo.remove(request)

    def __len__(self) -> int:
        return len(self._heap) if self.policy == "priority" else len(self._fifo)

    def __iter__(self) -> Iterator[Request]:
        if self.policy == "priority":
            return iter([entry[3] for entry in sorted(self._heap)])
        return iter(self._fifo)


def _is_decoding(request: Request) -> bool:
    """Generating: has output tokens and only its last sampled token left to compute."""
    return request.num_output_tokens > 0 and request.num_tokens - request.num_computed_tokens == 1


class StepCostModel:
    """Running estimates, from measured step times, of a decode-only step and of the time one prompt token
    adds to a step beside decodes; they size a long prompt's chunks (SchedulerConfig.decode_stall_ratio)."""

    ALPHA = 0.25  # weight of the newest step in the moving averages
    PROBE_TOKENS = 8  # a long prompt's first chunk beside decodes, before any mixed step was measured

    def __init__(self) -> None:
        self.decode_s: float | None = None
        self.token_s: float | None = None
        self.last_prefill_tokens = 0  # of the last mixed step: a chunk at most doubles from one to the next

    def _average(self, old: float | None, new: float) -> float:
        return new if old is None else old + self.ALPHA * (new - old)

    def observe(self, num_decode_tokens: int, num_prefill_tokens: int, seconds: float) -> None:
        if num_decode_tokens and not num_prefill_tokens:
            self.decode_s = self._average(self.decode_s, seconds)
        elif num_decode_tokens and num_prefill_tokens and self.decode_s is not None:
            self.token_s = self._average(self.token_s, max(seconds - self.decode_s, 0.0) / num_prefill_tokens)
            self.last_prefill_tokens = num_prefill_tokens

    def prefill_tokens(self, ratio: float) -> int:
        """Prompt tokens a step beside decodes may take to last about `ratio` decode steps (at least 1)."""
        if self.decode_s is None or self.token_s is None:
            return self.PROBE_TOKENS
        # NOTE: one noisy step (a slow decode-only step, a fast mixed one) must not open the gate at once
        limit = max(self.PROBE_TOKENS, 2 * self.last_prefill_tokens)
        if self.token_s <= 0.0:
            return limit
        return max(1, min(limit, int((ratio - 1.0) * self.decode_s / self.token_s)))


class _StepBudget:
    """One step's token budget, and the share of it that prompt (non-decode) tokens may take."""

    def __init__(self, max_tokens: int, prefill_cap: int, long_prompt_cap: int | None = None) -> None:
        self.max_tokens = max_tokens
        self.prefill_cap = prefill_cap
        # prompt tokens of a long prompt (more than prefill_cap) this step, when decodes run beside it
        self.long_prompt_cap = long_prompt_cap
        self.num_tokens = 0
        self.num_prefill_tokens = 0
        self.num_long_prompt_tokens = 0

    @property
    def tokens(self) -> int:
        return self.max_tokens - self.num_tokens

    @property
    def prefill_tokens(self) -> int:
        return min(self.prefill_cap - self.num_prefill_tokens, self.tokens)

    def is_long_prompt(self, request: Request) -> bool:
        """A prompt longer than the prefill share, which the long-prompt share bounds this step."""
        return self.long_prompt_cap is not None and request.num_prompt_tokens > self.prefill_cap

    @property
    def long_prompt_tokens(self) -> int:
        assert self.long_prompt_cap is not None
        return self.long_prompt_cap - self.num_long_prompt_tokens

    def spend(self, num_tokens: int, is_prefill: bool, is_long: bool = False) -> None:
        self.num_tokens += num_tokens
        self.num_prefill_tokens += num_tokens if is_prefill else 0
        self.num_long_prompt_tokens += num_tokens if is_prefill and is_long else 0

    def give_back(self, num_tokens: int, is_prefill: bool, is_long: bool = False) -> None:
        """The tokens of a request preempted after it was scheduled in this step."""
        self.spend(-num_tokens, is_prefill, is_long)


class Scheduler:
    """Owns the waiting queue and the running list; decides each step's tokens and finishes requests.

    There are no prefill/decode phases: every request's num_computed_tokens catches up with its
    num_tokens under the step's token budget. Running requests go first (in admission order),
    then waiting ones. Invariants: ``running`` is in admission order and holds at most
    max_num_seqs requests, each with a block table; waiting requests hold no blocks;
    ``requests`` holds exactly the unfinished requests.
    """

    def __init__(self, scheduler_config: SchedulerConfig, cache_config: CacheConfig) -> None:
        self.config = scheduler_config
        self.max_model_len = scheduler_config.max_model_len
        self.block_size = cache_config.block_size
        self.kv_cache_manager = KVCacheManager(cache_config, scheduler_config.max_model_len)
        self.requests: dict[str, Request] = {}
        self.waiting = WaitingQueue(scheduler_config.policy)
        self.running: list[Request] = []
        self._finished_req_ids: list[str] = []  # since the previous schedule()
        self._num_preemptions = 0
        self.step_cost = StepCostModel()
        self._last_step_tokens = (0, 0)  # (decode, prompt) tokens of the last schedule()
        # Prompt positions whose logprobs were already emitted: a request preempted mid-prompt
        # recomputes them, and the user must not see them twice.
        self._num_prompt_logprobs_sent: dict[str, int] = {}

    # ---- requests in and out -------------------------------------------------------------

    def add_request(self, request: Request) -> None:
        assert request.req_id not in self.requests, f"duplicate req_id {request.req_id!r}"
        # NOTE: a request must fit in the pool on its own, or it would preempt itself forever;
        # so the context window is the smaller of max_model_len and the pool's capacity.
        capacity = min(self.max_model_len, self.kv_cache_manager.num_blocks * self.block_size)
        if request.num_prompt_tokens > capacity:
            raise InvalidRequest(
                f"prompt has {request.num_prompt_tokens} tokens, more than the {capacity} "
                f"this engine can hold (max_model_len {self.max_model_len}, KV cache "
                f"{self.kv_cache_manager.num_blocks} blocks of {self.block_size})",
                param="prompt",
            )
        # The last sampled token needs no KV slot, so a prompt filling the window still gets one.
        room = max(1, capacity - request.num_prompt_tokens)
        request.max_tokens = room if request.max_tokens is None else min(request.max_tokens, room)
        request.status = RequestStatus.WAITING
        self.requests[request.req_id] = request
        self.waiting.push(request)

    def abort_requests(self, req_ids: Iterable[str]) -> None:
        self.finish_requests(req_ids, RequestStatus.FINISHED_ABORTED)

    def finish_requests(self, req_ids: Iterable[str], status: RequestStatus) -> None:
        """Finish waiting or running requests from outside (abort, stop string); unknown ids are ignored."""
        assert status.is_finished, f"finish_requests needs a finished status, got {status.name}"
        for req_id in req_ids:
            request = self.requests.get(req_id)
            if request is None:
                continue
            if request.status == RequestStatus.RUNNING:
                self.running.remove(request)
            else:
                self.waiting.remove(request)
            request.status = status
            self._free_finished(request)

    def _free_finished(self, request: Request) -> None:
        assert request.is_finished
        self.kv_cache_manager.free(request)
        del self.requests[request.req_id]
        self._num_prompt_logprobs_sent.pop(request.req_id, None)
        self._finished_req_ids.append(request.req_id)

    def get_request(self, req_id: str) -> Request | None:
        """An unfinished request by id; None once it finished or if unknown."""
        return self.requests.get(req_id)

    def has_unfinished_requests(self) -> bool:
        return bool(self.requests)

    # ---- schedule ------------------------------------------------------------------------

    def schedule(self) -> SchedulerOutput:
        """Choose this step's tokens; advances num_computed_tokens of every scheduled request."""
        num_scheduled: dict[str, int] = {}  # req_id -> tokens this step, in scheduling order
        preempted_req_ids: list[str] = []
        decoding = any(_is_decoding(r) for r in self.running)
        # NOTE: long prompts are those over the token bound, so turning the bound off (0) turns this off too
        ratio, bounded = self.config.decode_stall_ratio, self.config.max_prefill_tokens_while_decoding > 0
        budget = _StepBudget(self.config.max_num_batched_tokens, self._prefill_cap(decoding),
                             self.step_cost.prefill_tokens(ratio) if decoding and bounded and ratio > 0 else None)
        self._schedule_running(num_scheduled, preempted_req_ids, budget)
        # NOTE: no admissions in a step that preempted: the pool is full, and re-admitting the
        # victim right away would only thrash.
        if not preempted_req_ids:
            self._schedule_waiting(num_scheduled, budget)

        scheduled = []
        for req_id, num_tokens in num_scheduled.items():
            request = self.requests[req_id]
            start = request.num_computed_tokens
            num_spec = max(0, start + num_tokens - request.num_tokens)
            request.spec_token_ids = request.spec_token_ids[:num_spec]
            token_ids = request.all_token_ids[start : start + num_tokens - num_spec] + request.spec_token_ids
            scheduled.append(
                ScheduledRequest(
                    req_id=req_id,
                    token_ids=token_ids,
                    num_computed_tokens=start,
                    block_ids=self.kv_cache_manager.get_block_ids(req_id),
                    sample=start + num_tokens >= request.num_tokens,
                    sampling_params=request.sampling_params,
                    all_token_ids=request.all_token_ids,
                    num_prompt_tokens=request.num_prompt_tokens,
                    eos_token_id=request.eos_token_id,
                    lora_id=request.lora_id,
                    spec_token_ids=request.spec_token_ids,
                )
            )
            # NOTE: advanced only now, after every preemption decision of this step, so that
            # num_computed_tokens never counts tokens a preempted victim did not compute.
            request.num_computed_tokens = start + num_tokens
        self._last_step_tokens = (budget.num_tokens - budget.num_prefill_tokens, budget.num_prefill_tokens)
        return SchedulerOutput(
            scheduled=scheduled, finished_req_ids=self.take_finished_req_ids(), preempted_req_ids=preempted_req_ids
        )

    def observe_step_time(self, seconds: float) -> None:
        """How long the model took for the last schedule()'s step (feeds decode_stall_ratio)."""
        self.step_cost.observe(*self._last_step_tokens, seconds)

    def take_finished_req_ids(self) -> list[str]:
        """The requests finished since the last call (or schedule()), whose worker-side state can go."""
        finished_req_ids, self._finished_req_ids = self._finished_req_ids, []
        return finished_req_ids

    def _prefill_cap(self, decoding: bool) -> int:
        """Prompt tokens this step may take: bounded while a running request is decoding."""
        cap = self.config.max_prefill_tokens_while_decoding
        if cap > 0 and decoding:
            return cap
        return self.config.max_num_batched_tokens

    def _num_new_tokens(self, request: Request, num_computed_tokens: int, budget: _StepBudget) -> int:
        """Tokens to schedule for request this step; 0 when this step's prefill share is spent.

        A decoding request with proposed tokens (speculative decoding) asks for them too; the budget may
        trim the proposals, never the token it must compute."""
        num_new = min(request.num_tokens - num_computed_tokens + len(request.spec_token_ids), budget.tokens)
        if not _is_decoding(request):
            num_new = min(num_new, budget.prefill_tokens)
            if budget.is_long_prompt(request):
                num_new = min(num_new, budget.long_prompt_tokens)
        if self.config.long_prefill_token_threshold > 0:
            num_new = min(num_new, self.config.long_prefill_token_threshold)
        return num_new

    def _schedule_running(
        self, num_scheduled: dict[str, int], preempted_req_ids: list[str], budget: _StepBudget
    ) -> None:
        """Schedule running requests in order, preempting on lack of blocks; spends budget."""
        i = 0
        while i < len(self.running) and budget.tokens > 0:
            request = self.running[i]
            num_new = self._num_new_tokens(request, request.num_computed_tokens, budget)
            if num_new == 0:
                i += 1  # a prefill waiting for the next step's prefill share
                continue
            while self.kv_cache_manager.allocate_slots(request, num_new) is None:
                victim = self._pick_victim()
                victim_index = self.running.index(victim)
                # A victim scheduled earlier in this step (priority policy) gives its tokens back.
                budget.give_back(num_scheduled.pop(victim.req_id, 0), not _is_decoding(victim),
                                 budget.is_long_prompt(victim))
                self._preempt(victim)
                preempted_req_ids.append(victim.req_id)
                if victim_index < i:
                    i -= 1
                if victim is request:
                    break
            else:
                num_scheduled[request.req_id] = num_new
                budget.spend(num_new, not _is_decoding(request), budget.is_long_prompt(request))
                i += 1

    def _pick_victim(self) -> Request:
        """The running request to preempt: the last admitted, or (priority) the worst key."""
        if self.config.policy == "priority":
            # max over the reversed list: among equal keys, the later-admitted one.
            return max(reversed(self.running), key=lambda r: (r.priority, r.arrival_time))
        return self.running[-1]

    def _preempt(self, request: Request) -> None:
        """Recompute preemption: drop the KV, keep the tokens, requeue at the front."""
        self.running.remove(request)
        request.status = RequestStatus.PREEMPTED
        self.kv_cache_manager.free(request)  # publishes its computed blocks before freeing
        request.num_computed_tokens = 0
        request.spec_token_ids = []
        request.num_preemptions += 1
        self._num_preemptions += 1
        self.waiting.push(request, front=True)

    def _schedule_waiting(self, num_scheduled: dict[str, int], budget: _StepBudget) -> None:
        """Admit waiting requests in queue order until the budget, max_num_seqs or the pool runs out."""
        kv = self.kv_cache_manager
        while len(self.waiting) and budget.prefill_tokens > 0 and len(self.running) < self.config.max_num_seqs:
            request = self.waiting.peek()
            if not self._has_lora_room(request):
                break  # NOTE: waits for a running adapter to finish; one step mixes at most max_loras
            hit_block_ids, num_hit_tokens = kv.get_computed_blocks(request)
            num_new = self._num_new_tokens(request, num_hit_tokens, budget)
            if num_new <= 0:
                break  # this step's long-prompt share is spent
            if kv.allocate_slots(request, num_new, hit_block_ids, num_hit_tokens) is None:
                break  # NOTE: no skipping ahead: a later, smaller request must not starve this one
            self.waiting.pop()
            if request.num_cached_tokens < 0:
                request.num_cached_tokens = num_hit_tokens
            request.num_computed_tokens = num_hit_tokens
            request.status = RequestStatus.RUNNING
            self.running.append(request)
            num_scheduled[request.req_id] = num_new
            budget.spend(num_new, True, budget.is_long_prompt(request))

    def _has_lora_room(self, request: Request) -> bool:
        if not request.lora_id or not self.config.max_loras:
            return True
        active = {r.lora_id for r in self.running if r.lora_id}
        return request.lora_id in active or len(active) < self.config.max_loras

    # ---- update --------------------------------------------------------------------------

    def update_from_output(
        self, scheduler_output: SchedulerOutput, runner_output: ModelRunnerOutput
    ) -> list[EngineCoreOutput]:
        """Append sampled tokens, apply stop conditions, free finished requests; one output per change."""
        outputs = []
        for sched in scheduler_output.scheduled:
            request = self.requests.get(sched.req_id)
            if request is None or request.status != RequestStatus.RUNNING:
                continue  # finished or aborted after this step was scheduled
            new_prompt_logprobs = self._new_prompt_logprobs(sched, runner_output)
            new_token_ids: list[int] = []
            new_logprobs: list[TokenLogprob] = []
            token_id = runner_output.sampled_token_ids.get(sched.req_id)
            # NOTE: a sampling step without a token would leave the request with nothing to compute.
            assert (token_id is not None) == sched.sample, (
                f"{sched.req_id}: sample={sched.sample} but token={token_id}"
            )
            if token_id is not None:
                token_ids = [token_id, *runner_output.spec_token_ids.get(sched.req_id, ())]
                logprobs = [runner_output.logprobs.get(sched.req_id),
                            *runner_output.spec_logprobs.get(sched.req_id, ())]
                for i, new_token_id in enumerate(token_ids):  # more than one: accepted proposals
                    request.append_output_token(new_token_id)
                    if request.structured_output is not None:
                        request.structured_output.accept_token(new_token_id)
                    new_token_ids.append(new_token_id)
                    if i < len(logprobs) and logprobs[i] is not None:
                        new_logprobs.append(logprobs[i])
                    self._check_stop(request)
                    if request.is_finished:
                        break
            if sched.spec_token_ids:
                self._roll_back_proposals(request)
            if request.is_finished:
                self.running.remove(request)
                self._free_finished(request)
            if new_token_ids or new_prompt_logprobs or request.is_finished:
                outputs.append(
                    EngineCoreOutput(
                        req_id=request.req_id,
                        new_token_ids=new_token_ids,
                        new_logprobs=new_logprobs,
                        new_prompt_logprobs=new_prompt_logprobs,
                        finish_reason=request.status.finish_reason,
                        stop_reason=request.stop_reason,
                        num_cached_tokens=max(request.num_cached_tokens, 0),
                    )
                )
        return outputs

    def _roll_back_proposals(self, request: Request) -> None:
        """After a verifying step: the KV of rejected proposals is not the sequence's, so num_computed_tokens
        goes back to the accepted tokens (all but the last sampled one) and blocks past them are freed.

        NOTE: done before a finished request is freed, so only accepted tokens' blocks reach the prefix cache.
        """
        request.num_computed_tokens = min(request.num_computed_tokens, request.num_tokens - 1)
        request.spec_token_ids = []
        self.kv_cache_manager.trim(request)

    def _new_prompt_logprobs(
        self, sched: ScheduledRequest, runner_output: ModelRunnerOutput
    ) -> list[TokenLogprob]:
        """This step's prompt logprobs, minus positions already sent before a preemption."""
        prompt_logprobs = runner_output.prompt_logprobs.get(sched.req_id, [])
        num_sent = self._num_prompt_logprobs_sent.get(sched.req_id, 0)
        # The list holds positions first, first + 1, ... (before prompt_logprobs_start none are computed)
        first = max(sched.num_computed_tokens, sched.sampling_params.first_prompt_logprob_position)
        skip = max(0, num_sent - first)
        if prompt_logprobs:
            end = first + len(prompt_logprobs)
            self._num_prompt_logprobs_sent[sched.req_id] = max(num_sent, end)
        return prompt_logprobs[skip:]

    def _check_stop(self, request: Request) -> None:
        """Stop conditions after one appended token, in order: eos, stop_token_ids, length."""
        params = request.sampling_params
        last_token_id = request.output_token_ids[-1]
        if request.structured_output is not None and request.structured_output.is_terminated():
            request.status = RequestStatus.FINISHED_STOPPED  # the grammar is complete (its stop token came)
            return
        if request.num_output_tokens >= params.min_tokens:
            if not params.ignore_eos and last_token_id == request.eos_token_id:
                request.status = RequestStatus.FINISHED_STOPPED
                return
            if last_token_id in (params.stop_token_ids or []):
                request.status = RequestStatus.FINISHED_STOPPED
                request.stop_reason = last_token_id
                return
        if (
            request.max_tokens is not None and request.num_output_tokens >= request.max_tokens
        ) or request.num_tokens >= self.max_model_len:
            request.status = RequestStatus.FINISHED_LENGTH

    # ---- stats ---------------------------------------------------------------------------

    @property
    def num_running(self) -> int:
        return len(self.running)

    @property
    def num_waiting(self) -> int:
        return len(self.waiting)

    @property
    def num_preemptions(self) -> int:
        return self._num_preemptions

    @property
    def kv_cache_usage(self) -> float:
        return self.kv_cache_manager.usage

    @property
    def prefix_cache_queries(self) -> int:
        return self.kv_cache_manager.prefix_cache_queries

    @property
    def prefix_cache_hits(self) -> int:
        return self.kv_cache_manager.prefix_cache_hits

    def reset_prefix_cache(self) -> bool:
        return self.kv_cache_manager.reset_prefix_cache()
