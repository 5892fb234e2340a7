"""Scheduler driven by hand with no model: exact chunks, block ids, preemption, stops, aborts."""

from __future__ import annotations

from collections.abc import Callable

import pytest

from pagellm.config import CacheConfig, SchedulerConfig
from pagellm.core.sched_output import SchedulerOutput
from pagellm.core.scheduler import Scheduler, StepCostModel
from pagellm.errors import InvalidRequest
from pagellm.outputs import EngineCoreOutput, ModelRunnerOutput, TokenLogprob
from pagellm.request import Request, RequestStatus
from pagellm.sampling_params import SamplingParams

Sampler = Callable[[str, list[int]], int]


def fake_model(req_id: str, token_ids: list[int]) -> int:
    """A deterministic 'model': the next token is a function of the whole sequence."""
    return 10 + (sum(i * t for i, t in enumerate(token_ids)) + len(token_ids)) % 50


def make_scheduler(
    max_num_seqs: int = 4,
    budget: int = 8,
    num_blocks: int = 16,
    caching: bool = True,
    **scheduler_kwargs: object,
) -> Scheduler:
    return Scheduler(
        SchedulerConfig(max_num_seqs=max_num_seqs, max_num_batched_tokens=budget, **scheduler_kwargs),  # type: ignore[arg-type]
        CacheConfig(block_size=4, num_blocks=num_blocks, enable_prefix_caching=caching),
    )


def make_request(
    req_id: str, num_prompt: int, start: int = 0, eos: int | None = None, **params: object
) -> Request:
    """A prompt of distinct tokens start, start+1, ... (no accidental prefix hits)."""
    arrival = params.pop("arrival_time", None)
    priority = params.pop("priority", 0)
    return Request(
        req_id,
        list(range(start, start + num_prompt)),
        SamplingParams(**params),  # type: ignore[arg-type]
        eos_token_id=eos,
        arrival_time=arrival,  # type: ignore[arg-type]
        priority=priority,  # type: ignore[arg-type]
    )


def step(sched: Scheduler, sampler: Sampler = fake_model) -> tuple[SchedulerOutput, list[EngineCoreOutput]]:
    out = sched.schedule()
    runner = ModelRunnerOutput(
        sampled_token_ids={s.req_id: sampler(s.req_id, s.all_token_ids) for s in out.scheduled if s.sample}
    )
    return out, sched.update_from_output(out, runner)


def plan(out: SchedulerOutput) -> list[tuple[str, int, int, list[int], bool]]:
    """(req_id, num_computed_tokens, num_scheduled_tokens, block_ids, sample) per scheduled request."""
    return [
        (s.req_id, s.num_computed_tokens, s.num_scheduled_tokens, s.block_ids, s.sample)
        for s in out.scheduled
    ]


def run_to_completion(sched: Scheduler, max_steps: int = 200) -> dict[str, list[int]]:
    tokens: dict[str, list[int]] = {}
    for _ in range(max_steps):
        if not sched.has_unfinished_requests():
            return tokens
        _, outputs = step(sched)
        for o in outputs:
            tokens.setdefault(o.req_id, []).extend(o.new_token_ids)
    raise AssertionError("requests did not finish")


def test_chunked_prefill_then_decode() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("a", 20, max_tokens=2))
    out, outputs = step(sched)
    assert plan(out) == [("a", 0, 8, [0, 1], False)]
    assert out.scheduled[0].token_ids == list(range(8)) and outputs == []
    assert plan(step(sched)[0]) == [("a", 8, 8, [0, 1, 2, 3], False)]
    out, outputs = step(sched)
    assert plan(out) == [("a", 16, 4, [0, 1, 2, 3, 4], True)]
    assert [o.new_token_ids for o in outputs] == [[fake_model("a", list(range(20)))]]
    out, outputs = step(sched)
    assert plan(out) == [("a", 20, 1, [0, 1, 2, 3, 4, 5], True)]
    assert outputs[0].finish_reason == "length"
    out, _ = step(sched)
    assert out.is_empty and out.finished_req_ids == ["a"]
    assert sched.kv_cache_manager.get_num_free_blocks() == 16 and not sched.has_unfinished_requests()


def test_decodes_are_scheduled_before_new_prefills() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("a", 6, max_tokens=3))
    sched.add_request(make_request("b", 6, start=100, max_tokens=3))
    assert plan(step(sched)[0]) == [("a", 0, 6, [0, 1], True), ("b", 0, 2, [2], False)]
    sched.add_request(make_request("c", 8, start=200, max_tokens=3))
    # c arrived, but the running a (decode) and b (rest of its prompt) come first; c gets the rest.
    assert plan(step(sched)[0]) == [
        ("a", 6, 1, [0, 1], True),
        ("b", 2, 4, [2, 3], True),
        ("c", 0, 3, [4], False),
    ]
    out, outputs = step(sched)
    assert plan(out) == [("a", 7, 1, [0, 1], True), ("b", 6, 1, [2, 3], True), ("c", 3, 5, [4, 5], True)]
    assert [(o.req_id, o.finish_reason) for o in outputs] == [("a", "length"), ("b", None), ("c", None)]


def test_max_num_seqs_limits_running_requests() -> None:
    sched = make_scheduler(max_num_seqs=2, budget=64)
    for i, name in enumerate("abc"):
        sched.add_request(make_request(name, 3, start=10 * i, max_tokens=2))
    assert [s.req_id for s in step(sched)[0].scheduled] == ["a", "b"]
    assert (sched.num_running, sched.num_waiting) == (2, 1)
    assert [s.req_id for s in step(sched)[0].scheduled] == ["a", "b"]  # both finish here
    assert [s.req_id for s in step(sched)[0].scheduled] == ["c"]


def test_long_prefill_threshold_splits_prompts() -> None:
    sched = make_scheduler(long_prefill_token_threshold=3)
    sched.add_request(make_request("a", 7, max_tokens=4))
    sched.add_request(make_request("b", 2, start=50, max_tokens=4))
    assert plan(step(sched)[0]) == [("a", 0, 3, [0], False), ("b", 0, 2, [1], True)]
    assert plan(step(sched)[0]) == [("a", 3, 3, [0, 2], False), ("b", 2, 1, [1], True)]
    assert plan(step(sched)[0]) == [("a", 6, 1, [0, 2], True), ("b", 3, 1, [1], True)]


def _decoding_plus_long_prompt(cap: int, budget: int = 16) -> Scheduler:
    """a decodes (its 3-token prompt done, first token sampled); then the 20-token b arrives."""
    sched = make_scheduler(budget=budget, num_blocks=32, max_prefill_tokens_while_decoding=cap)
    sched.add_request(make_request("a", 3, max_tokens=30))
    assert plan(step(sched)[0]) == [("a", 0, 3, [0], True)]
    sched.add_request(make_request("b", 20, start=100, max_tokens=2))
    return sched


def test_prefill_tokens_are_bounded_while_a_request_decodes() -> None:
    sched = _decoding_plus_long_prompt(cap=4)
    # The budget (16) would give b 15 tokens; while a decodes, b gets 4 a step.
    assert plan(step(sched)[0]) == [("a", 3, 1, [0], True), ("b", 0, 4, [1], False)]
    assert plan(step(sched)[0]) == [("a", 4, 1, [0, 2], True), ("b", 4, 4, [1, 3], False)]
    assert [p[1:3] for p in plan(step(sched)[0])] == [(5, 1), (8, 4)]
    assert [p[1:3] for p in plan(step(sched)[0])] == [(6, 1), (12, 4)]
    out = step(sched)[0]
    assert [p[1:3] for p in plan(out)] == [(7, 1), (16, 4)] and out.scheduled[1].sample
    # b decodes now too: two 1-token decodes, no prompt tokens.
    assert [p[1:3] for p in plan(step(sched)[0])] == [(8, 1), (20, 1)]


def test_prefill_takes_the_whole_budget_when_nothing_decodes() -> None:
    sched = make_scheduler(budget=16, num_blocks=32, max_prefill_tokens_while_decoding=4)
    sched.add_request(make_request("b", 20, start=100, max_tokens=2))
    assert plan(step(sched)[0]) == [("b", 0, 16, [0, 1, 2, 3], False)]
    # a arrives while b is still a prefill: neither decodes, so both chunks fill the budget.
    sched.add_request(make_request("a", 3, max_tokens=30))
    assert plan(step(sched)[0]) == [("b", 16, 4, [0, 1, 2, 3, 4], True), ("a", 0, 3, [5], True)]


def test_prefill_bound_is_shared_by_every_prompt_of_the_step() -> None:
    sched = _decoding_plus_long_prompt(cap=6)
    sched.add_request(make_request("c", 5, start=200, max_tokens=2))
    # b (admitted first) takes the whole share; c waits for a step with share left.
    assert plan(step(sched)[0]) == [("a", 3, 1, [0], True), ("b", 0, 6, [1, 2], False)]
    assert (sched.num_running, sched.num_waiting) == (2, 1)
    assert [p[:3] for p in plan(step(sched)[0])] == [("a", 4, 1), ("b", 6, 6)]
    assert [p[:3] for p in plan(step(sched)[0])] == [("a", 5, 1), ("b", 12, 6)]
    # b needs 2 more; c is admitted with the 4 left of the share.
    assert [p[:3] for p in plan(step(sched)[0])] == [("a", 6, 1), ("b", 18, 2), ("c", 0, 4)]


def test_prefill_bound_zero_turns_it_off() -> None:
    sched = _decoding_plus_long_prompt(cap=0)
    assert plan(step(sched)[0]) == [("a", 3, 1, [0], True), ("b", 0, 15, [1, 2, 3, 4], False)]


def test_prefill_bound_lifts_when_the_decoding_request_finishes() -> None:
    sched = make_scheduler(budget=16, num_blocks=32, max_prefill_tokens_while_decoding=4)
    sched.add_request(make_request("a", 3, max_tokens=2))
    step(sched)
    sched.add_request(make_request("b", 30, start=100, max_tokens=2))
    assert [p[:3] for p in plan(step(sched)[0])] == [("a", 3, 1), ("b", 0, 4)]  # a finishes here
    assert [p[:3] for p in plan(step(sched)[0])] == [("b", 4, 16)]


def test_negative_prefill_bound_is_refused() -> None:
    with pytest.raises(ValueError, match="max_prefill_tokens_while_decoding"):
        SchedulerConfig(max_prefill_tokens_while_decoding=-1)


@pytest.mark.parametrize(
    "policy, expected",
    [("fcfs", ["low", "high", "mid", "mid_late"]), ("priority", ["high", "mid", "mid_late", "low"])],
)
def test_admission_order_by_policy(policy: str, expected: list[str]) -> None:
    sched = make_scheduler(max_num_seqs=1, policy=policy)
    for name, priority, arrival in [("low", 2, 0.0), ("high", 0, 1.0), ("mid", 1, 2.0), ("mid_late", 1, 3.0)]:
        sched.add_request(make_request(name, 3, max_tokens=1, priority=priority, arrival_time=arrival))
    order = [step(sched)[0].scheduled[0].req_id for _ in range(4)]
    assert order == expected


def test_fcfs_does_not_skip_a_blocked_head() -> None:
    sched = make_scheduler(budget=16, num_blocks=4)
    sched.add_request(make_request("a", 9, max_tokens=2))  # 3 blocks
    sched.add_request(make_request("b", 8, start=100, max_tokens=1))  # 2 blocks: does not fit yet
    sched.add_request(make_request("c", 2, start=200, max_tokens=1))  # 1 block: would fit, must wait
    assert plan(step(sched)[0]) == [("a", 0, 9, [0, 1, 2], True)]
    assert plan(step(sched)[0]) == [("a", 9, 1, [0, 1, 2], True)]
    assert [s.req_id for s in step(sched)[0].scheduled] == ["b", "c"]


@pytest.mark.parametrize("caching", [True, False])
def test_preemption_recomputes_and_matches_the_plain_run(caching: bool) -> None:
    def requests() -> list[Request]:
        return [make_request("a", 6, max_tokens=6), make_request("b", 6, start=50, max_tokens=6)]

    plain = make_scheduler(budget=16, caching=caching)
    for r in requests():
        plain.add_request(r)
    expected = run_to_completion(plain)
    assert plain.num_preemptions == 0

    sched = make_scheduler(budget=16, num_blocks=4, caching=caching)
    a, b = requests()
    sched.add_request(a)
    sched.add_request(b)
    assert plan(step(sched)[0]) == [("a", 0, 6, [0, 1], True), ("b", 0, 6, [2, 3], True)]
    step(sched)
    step(sched)
    # a needs a third block for position 8 and none is free: b, the last admitted, is preempted.
    out, _ = step(sched)
    assert out.preempted_req_ids == ["b"]
    # Cached, b's blocks are evicted LRU (its tail block 3 was freed first); uncached, the most
    # recently freed block (2) is reused first.
    assert plan(out) == [("a", 8, 1, [0, 1, 3 if caching else 2], True)]
    assert (b.status, b.num_computed_tokens, b.num_preemptions) == (RequestStatus.PREEMPTED, 0, 1)
    assert sched.num_waiting == 1 and sched.num_preemptions == 1
    assert sched.kv_cache_manager.get_block_ids("b") == []
    b_tokens_at_preemption = list(b.all_token_ids)  # prompt + 3 outputs
    assert len(b_tokens_at_preemption) == 9

    tokens = {"a": list(a.output_token_ids), "b": list(b.output_token_ids)}
    resumed_chunks = []
    while sched.has_unfinished_requests():
        out, outputs = step(sched)
        resumed_chunks += [s for s in out.scheduled if s.req_id == "b" and s.num_computed_tokens < 9]
        for o in outputs:
            tokens[o.req_id].extend(o.new_token_ids)
    # b recomputed its prompt and outputs (minus any prefix hit) and then sampled the next token.
    first = resumed_chunks[0]
    assert first.token_ids == b_tokens_at_preemption[first.num_computed_tokens :]
    assert first.sample and first.num_computed_tokens == (4 if caching else 0)
    assert tokens == expected
    assert b.status == RequestStatus.FINISHED_LENGTH and b.num_output_tokens == 6
    assert sched.kv_cache_manager.get_num_free_blocks() == 4


def test_priority_preemption_takes_back_a_victim_scheduled_earlier_in_the_step() -> None:
    sched = make_scheduler(budget=16, num_blocks=4, policy="priority")
    a = make_request("a", 5, max_tokens=5, priority=5, arrival_time=0.0)
    sched.add_request(a)
    assert plan(step(sched)[0]) == [("a", 0, 5, [0, 1], True)]
    sched.add_request(make_request("b", 8, start=50, max_tokens=3, priority=0, arrival_time=1.0))
    assert plan(step(sched)[0]) == [("a", 5, 1, [0, 1], True), ("b", 0, 8, [2, 3], True)]
    # a (scheduled first, it runs first) fits; b needs a third block; the victim is the worst
    # priority, a, which gives back both its blocks and its token of this step.
    out, _ = step(sched)
    assert out.preempted_req_ids == ["a"]
    assert plan(out) == [("b", 8, 1, [2, 3, 1], True)]
    assert a.status == RequestStatus.PREEMPTED and a.num_computed_tokens == 0
    run_to_completion(sched)
    assert a.status == RequestStatus.FINISHED_LENGTH and a.num_output_tokens == 5


def test_prefix_hit_on_admission() -> None:
    sched = make_scheduler(budget=16)
    sched.add_request(make_request("a", 10, max_tokens=3))
    assert plan(step(sched)[0]) == [("a", 0, 10, [0, 1, 2], True)]
    b = Request("b", list(range(8)) + [77, 78], SamplingParams(max_tokens=1))
    sched.add_request(b)
    out, outputs = step(sched)
    # a's next step publishes its computed blocks 0, 1; b then hits them and computes 2 tokens.
    assert plan(out) == [("a", 10, 1, [0, 1, 2], True), ("b", 8, 2, [0, 1, 3], True)]
    assert b.num_cached_tokens == 8 and outputs[1].num_cached_tokens == 8
    assert (sched.prefix_cache_queries, sched.prefix_cache_hits) == (20, 8)


def test_abort_frees_every_block_and_is_reported_once() -> None:
    sched = make_scheduler(max_num_seqs=1, budget=16)
    sched.add_request(make_request("a", 10, max_tokens=5))
    sched.add_request(make_request("b", 3, start=50, max_tokens=5))
    step(sched)
    assert sched.kv_cache_usage > 0
    sched.abort_requests(["a", "b", "unknown"])
    sched.abort_requests(["a"])  # already finished: ignored
    assert sched.kv_cache_manager.get_num_free_blocks() == 16 and sched.kv_cache_usage == 0.0
    assert not sched.has_unfinished_requests() and sched.get_request("a") is None
    out = sched.schedule()
    assert out.is_empty and out.finished_req_ids == ["a", "b"]
    assert sched.schedule().finished_req_ids == []


def test_abort_between_schedule_and_update_drops_the_result() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("a", 3, max_tokens=5))
    out = sched.schedule()
    sched.abort_requests(["a"])
    assert sched.update_from_output(out, ModelRunnerOutput(sampled_token_ids={"a": 7})) == []
    assert sched.schedule().is_empty


def test_finish_requests_for_stop_strings() -> None:
    sched = make_scheduler()
    a = make_request("a", 3, max_tokens=5)
    sched.add_request(a)
    step(sched)
    sched.finish_requests(["a"], RequestStatus.FINISHED_STOPPED)
    assert a.status == RequestStatus.FINISHED_STOPPED and sched.num_running == 0
    assert sched.schedule().finished_req_ids == ["a"]
    assert sched.kv_cache_manager.get_num_free_blocks() == 16


def scripted(tokens: list[int]) -> Sampler:
    it = iter(tokens)
    return lambda req_id, token_ids: next(it)


@pytest.mark.parametrize(
    "params, script, num_out, reason, stop_reason",
    [
        ({}, [5, 2, 7], 2, "stop", None),  # eos
        ({"ignore_eos": True, "max_tokens": 3}, [2, 2, 2], 3, "length", None),
        ({"min_tokens": 3}, [2, 2, 2, 2], 3, "stop", None),  # eos masked until 3 tokens
        ({"stop_token_ids": [9]}, [5, 9, 7], 2, "stop", 9),
        ({"stop_token_ids": [9], "min_tokens": 2}, [9, 9], 2, "stop", 9),
        ({"max_tokens": 4}, [5, 5, 5, 5, 5], 4, "length", None),
    ],
)
def test_stop_conditions(
    params: dict[str, object], script: list[int], num_out: int, reason: str, stop_reason: int | None
) -> None:
    sched = make_scheduler()
    request = make_request("a", 3, start=20, eos=2, **{"max_tokens": 10, **params})
    sched.add_request(request)
    outputs = []
    sampler = scripted(script)
    while sched.has_unfinished_requests():
        outputs += step(sched, sampler)[1]
    assert request.num_output_tokens == num_out
    assert (outputs[-1].finish_reason, outputs[-1].stop_reason) == (reason, stop_reason)
    assert all(o.finish_reason is None for o in outputs[:-1])


def test_max_model_len_finishes_with_length() -> None:
    sched = make_scheduler(max_model_len=12, budget=16)
    request = make_request("a", 10, max_tokens=None)
    sched.add_request(request)
    assert request.max_tokens == 2  # clamped to the context window
    run_to_completion(sched)
    assert request.num_tokens == 12 and request.status == RequestStatus.FINISHED_LENGTH


def test_context_window_is_also_bounded_by_the_pool() -> None:
    sched = make_scheduler(num_blocks=2, budget=16)  # 8 slots
    request = make_request("a", 5, max_tokens=None)
    sched.add_request(request)
    assert request.max_tokens == 3
    with pytest.raises(InvalidRequest, match="prompt has 9 tokens"):
        sched.add_request(make_request("b", 9))
    with pytest.raises(InvalidRequest, match="max_model_len 4"):
        make_scheduler(max_model_len=4).add_request(make_request("c", 5))


def test_prompt_logprobs_pass_through_and_are_not_repeated_after_preemption() -> None:
    sched = make_scheduler(budget=4)
    request = make_request("a", 8, max_tokens=1, prompt_logprobs=0)
    sched.add_request(request)

    def lp(n: int) -> list[TokenLogprob]:
        return [TokenLogprob(token_id=i, logprob=-1.0, rank=1) for i in range(n)]

    out = sched.schedule()  # positions 0..3
    outputs = sched.update_from_output(out, ModelRunnerOutput(prompt_logprobs={"a": lp(4)}))
    assert [len(o.new_prompt_logprobs) for o in outputs] == [4] and outputs[0].new_token_ids == []
    sched._preempt(request)  # white box: the simplest way to force a mid-prompt preemption
    out = sched.schedule()  # recomputes positions 0..3 (prompt logprobs never take prefix hits)
    assert plan(out) == [("a", 0, 4, [0], False)]  # block 0 (freed, no cached KV) is reused first
    assert sched.update_from_output(out, ModelRunnerOutput(prompt_logprobs={"a": lp(4)})) == []
    out = sched.schedule()  # positions 4..7: logprobs of tokens 5..7, then the sample
    runner = ModelRunnerOutput(sampled_token_ids={"a": 3}, prompt_logprobs={"a": lp(3)})
    (output,) = sched.update_from_output(out, runner)
    assert len(output.new_prompt_logprobs) == 3 and output.finish_reason == "length"


def test_sampled_logprobs_pass_through() -> None:
    sched = make_scheduler()
    sched.add_request(make_request("a", 3, max_tokens=1, logprobs=1))
    out = sched.schedule()
    lp = TokenLogprob(token_id=7, logprob=-0.5, rank=1, top=[(7, -0.5)])
    (output,) = sched.update_from_output(
        out, ModelRunnerOutput(sampled_token_ids={"a": 7}, logprobs={"a": lp})
    )
    assert output.new_token_ids == [7] and output.new_logprobs == [lp]


def test_reset_prefix_cache_through_the_scheduler() -> None:
    sched = make_scheduler(budget=16)
    sched.add_request(make_request("a", 9, max_tokens=2))
    step(sched)
    assert sched.reset_prefix_cache() is False
    run_to_completion(sched)
    assert sched.kv_cache_manager.block_pool.cached_blocks
    assert sched.reset_prefix_cache() is True
    assert not sched.kv_cache_manager.block_pool.cached_blocks


def test_step_cost_model_sizes_chunks_from_measured_step_times() -> None:
    model = StepCostModel()
    assert model.prefill_tokens(2.0) == StepCostModel.PROBE_TOKENS  # nothing measured yet
    model.observe(4, 8, 0.050)  # a mixed step before any decode-only one: nothing to subtract, ignored
    assert model.token_s is None
    model.observe(4, 0, 0.010)  # decode-only: 10 ms
    model.observe(4, 8, 0.026)  # 8 prompt tokens added 16 ms: 2 ms each
    assert model.prefill_tokens(2.0) == 5  # (2 - 1) * 10 ms / 2 ms
    assert model.prefill_tokens(3.0) == 10
    model.observe(0, 64, 1.0)  # a prefill-only step says nothing about either estimate
    assert (model.decode_s, model.token_s) == (0.010, 0.002)
    model.observe(4, 0, 0.020)  # moving averages: a quarter of the way to the newest step
    assert abs(model.decode_s - 0.0125) < 1e-12
    model.observe(4, 100, 0.0125)  # prompt tokens that cost nothing measurable: no bound from them
    assert model.prefill_tokens(2.0) >= 5


def test_long_prompt_chunks_follow_the_decode_stall_ratio() -> None:
    """A prompt over the token bound, beside a decoding request, gets chunks sized so a step lasts about
    decode_stall_ratio decode steps; a short prompt is not held to that share."""
    sched = make_scheduler(budget=64, num_blocks=64, max_prefill_tokens_while_decoding=16, decode_stall_ratio=2.0)
    sched.add_request(make_request("a", 3, max_tokens=60))
    step(sched)  # a's prompt (no decode: not measured)
    sched.observe_step_time(0.5)
    step(sched)  # a decodes alone
    sched.observe_step_time(0.010)
    sched.add_request(make_request("b", 40, start=100, max_tokens=2))
    out = step(sched)[0]  # first chunk beside the decode: the probe
    assert [p[:3] for p in plan(out)] == [("a", 4, 1), ("b", 0, StepCostModel.PROBE_TOKENS)]
    sched.observe_step_time(0.010 + 0.002 * StepCostModel.PROBE_TOKENS)  # 2 ms a prompt token
    sched.add_request(make_request("c", 6, start=300, max_tokens=2))  # short: under the token bound
    out = step(sched)[0]
    assert [p[:3] for p in plan(out)] == [("a", 5, 1), ("b", 8, 5), ("c", 0, 6)]


def test_decode_stall_ratio_zero_leaves_only_the_token_bound() -> None:
    sched = make_scheduler(budget=64, num_blocks=64, max_prefill_tokens_while_decoding=16, decode_stall_ratio=0)
    sched.add_request(make_request("a", 3, max_tokens=60))
    step(sched)
    step(sched)
    sched.add_request(make_request("b", 40, start=100, max_tokens=2))
    assert [p[:3] for p in plan(step(sched)[0])] == [("a", 4, 1), ("b", 0, 16)]


@pytest.mark.parametrize("ratio", [0.5, 1.0, -2.0])
def test_decode_stall_ratio_must_exceed_one(ratio: float) -> None:
    with pytest.raises(ValueError, match="decode_stall_ratio"):
        SchedulerConfig(decode_stall_ratio=ratio)
