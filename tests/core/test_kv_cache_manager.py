"""KVCacheManager: block tables, out-of-room, free order, prefix hits and their limits."""

from __future__ import annotations

from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from pagellm.config import CacheConfig, SchedulerConfig
from pagellm.core.kv_cache_manager import KVCacheManager, hash_block_tokens
from pagellm.core.sched_output import SchedulerOutput
from pagellm.core.scheduler import Scheduler
from pagellm.outputs import ModelRunnerOutput
from pagellm.request import Request, RequestStatus
from pagellm.sampling_params import SamplingParams


def make_manager(num_blocks: int = 16, block_size: int = 4, caching: bool = True) -> KVCacheManager:
    config = CacheConfig(block_size=block_size, num_blocks=num_blocks, enable_prefix_caching=caching)
    return KVCacheManager(config, max_model_len=256)


def make_request(req_id: str, token_ids: list[int], **kwargs: object) -> Request:
    params = SamplingParams(prompt_logprobs=kwargs.pop("prompt_logprobs", None))  # type: ignore[arg-type]
    return Request(req_id, token_ids, params, **kwargs)  # type: ignore[arg-type]


def run_prefill(kv: KVCacheManager, request: Request) -> list[int]:
    """Admit with prefix hits, compute the whole prompt, and publish it (as the next step would)."""
    hit_ids, num_hits = kv.get_computed_blocks(request)
    new_ids = kv.allocate_slots(request, request.num_tokens - num_hits, hit_ids, num_hits)
    assert new_ids is not None
    request.num_computed_tokens = request.num_tokens
    return hit_ids + new_ids


def finish(kv: KVCacheManager, request: Request) -> None:
    request.status = RequestStatus.FINISHED_STOPPED
    kv.free(request)


def test_num_blocks_must_be_set() -> None:
    with pytest.raises(AssertionError, match="num_blocks"):
        KVCacheManager(CacheConfig(block_size=4), max_model_len=64)


def test_allocate_grows_the_table_block_by_block() -> None:
    kv = make_manager()
    req = make_request("a", list(range(10)))
    assert kv.allocate_slots(req, 10) == [0, 1, 2]
    req.num_computed_tokens = 10
    req.append_output_token(10)
    req.append_output_token(11)
    assert kv.allocate_slots(req, 2) == []  # 12 tokens still fit in 3 blocks
    req.num_computed_tokens = 12
    req.append_output_token(12)
    assert kv.allocate_slots(req, 1) == [3]
    assert kv.get_block_ids("a") == [0, 1, 2, 3]
    assert kv.usage == pytest.approx(4 / 16)


def test_out_of_room_is_none_and_changes_nothing() -> None:
    kv = make_manager(num_blocks=4)
    a, b = make_request("a", list(range(8))), make_request("b", list(range(100, 112)))
    assert kv.allocate_slots(a, 8) == [0, 1]
    assert kv.allocate_slots(b, 12) is None
    assert kv.get_block_ids("b") == [] and kv.get_num_free_blocks() == 2
    assert kv.allocate_slots(b, 8) == [2, 3]


def test_free_releases_tail_first() -> None:
    kv = make_manager(num_blocks=6, caching=False)
    req = make_request("a", list(range(12)))
    kv.allocate_slots(req, 12)
    finish(kv, req)
    assert list(kv.block_pool.free_queue) == [3, 4, 5, 2, 1, 0]
    assert kv.get_block_ids("a") == [] and kv.get_num_free_blocks() == 6


def test_second_request_hits_the_shared_prefix() -> None:
    kv = make_manager()
    a = make_request("a", list(range(10)))
    assert run_prefill(kv, a) == [0, 1, 2]
    kv.allocate_slots(a, 1)  # a's next step publishes its computed full blocks 0, 1
    b = make_request("b", list(range(8)) + [50, 51, 52])
    hit_ids, num_hits = kv.get_computed_blocks(b)
    assert (hit_ids, num_hits) == ([0, 1], 8)
    assert kv.allocate_slots(b, 3, hit_ids, num_hits) == [3]
    assert kv.get_block_ids("b") == [0, 1, 3]
    assert [kv.block_pool.blocks[i].ref_count for i in (0, 1, 2, 3)] == [2, 2, 1, 1]
    assert (kv.prefix_cache_queries, kv.prefix_cache_hits) == (10 + 11, 8)


def test_hits_never_cover_the_last_token() -> None:
    kv = make_manager()
    a = make_request("a", list(range(12)))
    run_prefill(kv, a)
    finish(kv, a)  # publishes all 3 blocks
    # Same 8 tokens: a hit of 8 would leave nothing to compute, so it stops one block short.
    assert kv.get_computed_blocks(make_request("b", list(range(8)))) == ([0], 4)
    assert kv.get_computed_blocks(make_request("c", list(range(9)))) == ([0, 1], 8)
    assert kv.get_computed_blocks(make_request("d", list(range(12)))) == ([0, 1], 8)


def test_different_lora_or_salt_never_share() -> None:
    kv = make_manager()
    a = make_request("a", list(range(9)), lora_id=1, cache_salt="x")
    run_prefill(kv, a)
    finish(kv, a)
    tokens = list(range(9))
    assert kv.get_computed_blocks(make_request("same", tokens, lora_id=1, cache_salt="x"))[1] == 8
    assert kv.get_computed_blocks(make_request("lora", tokens, lora_id=2, cache_salt="x")) == ([], 0)
    assert kv.get_computed_blocks(make_request("salt", tokens, lora_id=1, cache_salt="y")) == ([], 0)
    assert kv.get_computed_blocks(make_request("none", tokens, lora_id=1)) == ([], 0)


def test_prompt_logprobs_and_disabled_caching_skip_the_cache() -> None:
    kv = make_manager()
    a = make_request("a", list(range(9)))
    run_prefill(kv, a)
    finish(kv, a)
    assert kv.get_computed_blocks(make_request("p", list(range(9)), prompt_logprobs=1)) == ([], 0)
    off = make_manager(caching=False)
    a2 = make_request("a", list(range(9)))
    run_prefill(off, a2)
    finish(off, a2)
    assert off.get_computed_blocks(make_request("b", list(range(9)))) == ([], 0)
    assert off.block_pool.cached_blocks == {}


def test_block_hashes_are_chained_over_the_prefix() -> None:
    # The same block content after a different prefix is a different block.
    first = hash_block_tokens(None, [1, 2], (0, None))
    assert hash_block_tokens(first, [3, 4], (0, None)) != hash_block_tokens(None, [3, 4], (0, None))
    assert hash_block_tokens(None, [1, 2], (0, None)) == first
    kv = make_manager()
    a = make_request("a", [1, 2, 3, 4, 5, 6, 7, 8, 9])
    run_prefill(kv, a)
    finish(kv, a)
    assert kv.get_computed_blocks(make_request("b", [9, 9, 9, 9, 5, 6, 7, 8, 9])) == ([], 0)


def test_output_tokens_fill_blocks_that_get_cached() -> None:
    kv = make_manager()
    a = make_request("a", [1, 2, 3, 4, 5, 6])
    run_prefill(kv, a)  # blocks [0, 1]; block 1 holds 5, 6
    for token_id in (7, 8, 9):  # decode: each token is computed the step after it is sampled
        a.append_output_token(token_id)
        kv.allocate_slots(a, 1)
        a.num_computed_tokens += 1
    finish(kv, a)
    b = make_request("b", [1, 2, 3, 4, 5, 6, 7, 8, 9, 10])
    assert kv.get_computed_blocks(b) == ([0, 1], 8)


def test_hit_on_free_blocks_counts_against_free_room() -> None:
    kv = make_manager(num_blocks=4)
    a = make_request("a", list(range(13)))
    run_prefill(kv, a)  # blocks 0..3
    finish(kv, a)  # all 4 free, queue 3, 2, 1, 0; full blocks 0, 1, 2 cached
    b = make_request("b", list(range(8)) + list(range(100, 108)))  # 16 tokens: 2 hits + 2 new
    hit_ids, num_hits = kv.get_computed_blocks(b)
    assert (hit_ids, num_hits) == ([0, 1], 8)
    assert kv.allocate_slots(b, 8, hit_ids, num_hits) == [3, 2]  # 3 was partial; 2 gets evicted
    assert kv.get_num_free_blocks() == 0
    assert kv.block_pool.blocks[2].block_hash is None
    c = make_request("c", list(range(8)) + [7, 7, 7, 7, 7])  # 2 hits (in use) + 1 new: no room
    hit_ids, num_hits = kv.get_computed_blocks(c)
    assert kv.allocate_slots(c, 5, hit_ids, num_hits) is None
    assert [kv.block_pool.blocks[i].ref_count for i in (0, 1)] == [1, 1]
    assert kv.prefix_cache_queries == 13 + 16  # c's failed admission is not counted


def test_free_hit_blocks_are_not_evicted_by_the_same_allocation() -> None:
    kv = make_manager(num_blocks=3)
    a = make_request("a", list(range(9)))
    run_prefill(kv, a)
    finish(kv, a)  # free queue: 2, 1, 0 -- the hits 0, 1 sit at the tail
    b = make_request("b", list(range(8)) + [42])
    hit_ids, num_hits = kv.get_computed_blocks(b)
    assert kv.allocate_slots(b, 1, hit_ids, num_hits) == [2]
    assert kv.get_block_ids("b") == [0, 1, 2]
    c = make_request("c", list(range(8)) + [43, 44, 45, 46, 47])  # needs 1 more block than exists
    hit_ids, num_hits = kv.get_computed_blocks(c)
    assert kv.allocate_slots(c, 5, hit_ids, num_hits) is None


def test_preempted_request_keeps_its_hashes_and_hits_its_own_blocks() -> None:
    kv = make_manager()
    a = make_request("a", list(range(13)))
    run_prefill(kv, a)
    a.status = RequestStatus.PREEMPTED
    kv.free(a)
    a.num_computed_tokens = 0
    assert "a" in kv.req_to_block_hashes
    assert kv.get_computed_blocks(a) == ([0, 1, 2], 12)
    finish(kv, a)
    assert "a" not in kv.req_to_block_hashes


def test_reset_prefix_cache() -> None:
    kv = make_manager()
    a = make_request("a", list(range(9)))
    run_prefill(kv, a)
    assert kv.reset_prefix_cache() is False
    finish(kv, a)
    assert kv.reset_prefix_cache() is True
    assert kv.get_computed_blocks(make_request("b", list(range(9)))) == ([], 0)


# ---- property: random add / step / abort / finish never leak, double free or serve wrong KV ----

PREFIXES = [(), (1, 2, 3, 1, 2, 3, 1, 2), (1, 2, 3, 1, 2, 3, 1, 2, 5, 5, 5, 5, 0), (0, 0, 0, 0, 0, 0)]
request_st = st.fixed_dictionaries(
    {
        "prefix": st.sampled_from(PREFIXES),
        "suffix": st.lists(st.integers(0, 5), min_size=1, max_size=8),
        "max_tokens": st.one_of(st.none(), st.integers(1, 16)),
        "min_tokens": st.integers(0, 2),
        "stop_token_ids": st.sampled_from([None, [3]]),
        "ignore_eos": st.booleans(),
        "lora_id": st.sampled_from([0, 0, 1]),
        "priority": st.integers(0, 2),
        "prompt_logprobs": st.sampled_from([None, None, None, 1]),
    }
)
step_st = st.tuples(st.just("step"), st.lists(st.integers(0, 9), min_size=1, max_size=4))
op_st = st.one_of(  # adds and steps listed twice: twice as likely, so the pool fills up
    st.tuples(st.just("add"), request_st),
    st.tuples(st.just("add"), request_st),
    step_st,
    step_st,
    st.tuples(st.just("abort"), st.integers(0, 30)),
    st.tuples(st.just("finish"), st.integers(0, 30)),
    st.tuples(st.just("reset"), st.none()),
)


def kv_content(request: Request, position: int) -> tuple[object, ...]:
    """What a KV slot holds: a function of the adapter and of every token up to its position."""
    return (request.lora_id, request.cache_salt, tuple(request.all_token_ids[: position + 1]))


class Harness:
    """Drives a Scheduler with fake model steps and checks its invariants after every operation."""

    def __init__(self, sched: Scheduler) -> None:
        self.sched = sched
        self.kv = sched.kv_cache_manager
        self.pool = self.kv.block_pool
        self.bs = self.kv.block_size
        self.slots: dict[tuple[int, int], tuple[object, ...]] = {}  # (block_id, offset) -> content
        self.req_ids: list[str] = []
        self.gone: set[str] = set()  # finished or aborted: must never be scheduled again
        self.newly_gone: set[str] = set()  # since the previous schedule()

    def add(self, spec: dict) -> None:
        req_id = f"r{len(self.req_ids)}"
        max_tokens = spec["max_tokens"]
        min_tokens = spec["min_tokens"] if max_tokens is None else min(spec["min_tokens"], max_tokens)
        params = SamplingParams(
            max_tokens=max_tokens,
            min_tokens=min_tokens,
            stop_token_ids=spec["stop_token_ids"],
            ignore_eos=spec["ignore_eos"],
            prompt_logprobs=spec["prompt_logprobs"],
        )
        tokens = list(spec["prefix"]) + spec["suffix"]
        request = Request(
            req_id, tokens, params, eos_token_id=4, arrival_time=float(len(self.req_ids)),
            priority=spec["priority"], lora_id=spec["lora_id"],
        )  # fmt: skip
        self.sched.add_request(request)
        self.req_ids.append(req_id)

    def step(self, sampled: list[int]) -> None:
        decoding = {r.req_id for r in self.sched.running
                    if r.num_output_tokens and r.num_computed_tokens == r.num_tokens - 1}
        out = self.sched.schedule()
        self.check_output(out)
        cap = self.sched.config.max_prefill_tokens_while_decoding
        if decoding and cap:  # while any request decodes, prompt tokens stay within the bound
            assert sum(s.num_scheduled_tokens for s in out.scheduled if s.req_id not in decoding) <= cap
        for s in out.scheduled:  # the fake forward pass writes this step's KV
            request = self.sched.requests[s.req_id]
            for pos in range(s.num_computed_tokens, s.num_computed_tokens + s.num_scheduled_tokens):
                self.slots[(s.block_ids[pos // self.bs], pos % self.bs)] = kv_content(request, pos)
        sampled_ids = {s.req_id: sampled[i % len(sampled)] for i, s in enumerate(out.scheduled) if s.sample}
        runner = ModelRunnerOutput(sampled_token_ids=sampled_ids)
        for o in self.sched.update_from_output(out, runner):
            if o.finish_reason is not None:
                self.gone.add(o.req_id)
                self.newly_gone.add(o.req_id)

    def finish(self, index: int, status: RequestStatus) -> None:
        req_id = self.req_ids[index % len(self.req_ids)] if self.req_ids else "none"
        if self.sched.get_request(req_id) is not None:
            self.newly_gone.add(req_id)
        self.gone.add(req_id)
        self.sched.finish_requests([req_id], status)

    def check_output(self, out: SchedulerOutput) -> None:
        config = self.sched.config
        assert set(out.finished_req_ids) == self.newly_gone
        self.newly_gone = set()
        assert out.total_num_scheduled_tokens <= config.max_num_batched_tokens
        assert len({s.req_id for s in out.scheduled}) == len(out.scheduled) <= config.max_num_seqs
        for s in out.scheduled:
            assert s.req_id not in self.gone
            request = self.sched.requests[s.req_id]
            start, end = s.num_computed_tokens, s.num_computed_tokens + s.num_scheduled_tokens
            assert s.token_ids == request.all_token_ids[start:end] and s.num_scheduled_tokens > 0
            assert s.sample == (end == request.num_tokens)
            assert len(s.block_ids) * self.bs >= end
            # Every computed position read by this step holds this request's own KV...
            for pos in range(start):
                slot = (s.block_ids[pos // self.bs], pos % self.bs)
                assert self.slots.get(slot) == kv_content(request, pos), (s.req_id, pos)
            # ...and the blocks it writes belong to it alone and are not published.
            for block_id in s.block_ids[start // self.bs : (end - 1) // self.bs + 1]:
                block = self.pool.blocks[block_id]
                assert block.ref_count == 1 and block.block_hash is None, block

    def check_invariants(self) -> None:
        refs = Counter(b.block_id for blocks in self.kv.req_to_blocks.values() for b in blocks)
        for block in self.pool.blocks:
            assert block.ref_count == refs[block.block_id], block
            assert (block.block_id in self.pool.free_queue) == (block.ref_count == 0), block
        num_used = sum(1 for b in self.pool.blocks if b.ref_count > 0)
        assert self.pool.get_num_free_blocks() + num_used == self.pool.num_blocks
        for block_hash, block in self.pool.cached_blocks.items():
            assert block.block_hash == block_hash
        if not self.kv.enable_caching:
            assert not self.pool.cached_blocks
        for req_id, blocks in self.kv.req_to_blocks.items():
            assert len({b.block_id for b in blocks}) == len(blocks), f"{req_id} holds a block twice"
        running = {r.req_id for r in self.sched.running}
        assert set(self.kv.req_to_blocks) == running, "exactly the running requests hold blocks"
        assert len(running) <= self.sched.config.max_num_seqs
        for request in self.sched.running:
            assert request.status == RequestStatus.RUNNING
            assert request.num_computed_tokens < request.num_tokens <= self.sched.max_model_len
        waiting = list(self.sched.waiting)
        assert all(r.status in (RequestStatus.WAITING, RequestStatus.PREEMPTED) for r in waiting)
        assert all(r.num_computed_tokens == 0 for r in waiting)
        assert set(self.sched.requests) == running | {r.req_id for r in waiting}
        assert self.sched.prefix_cache_hits <= self.sched.prefix_cache_queries


@pytest.mark.parametrize("caching", [True, False])
@settings(max_examples=60, deadline=None)
@given(
    ops=st.lists(op_st, max_size=40),
    policy=st.sampled_from(["fcfs", "priority"]),
    threshold=st.sampled_from([0, 3]),
    prefill_cap=st.sampled_from([0, 2]),
)
def test_random_schedules_never_leak_or_double_free(
    caching: bool, ops: list[tuple[str, object]], policy: str, threshold: int, prefill_cap: int
) -> None:
    sched = Scheduler(
        SchedulerConfig(
            max_num_seqs=4, max_num_batched_tokens=10, max_model_len=40, policy=policy,  # type: ignore[arg-type]
            long_prefill_token_threshold=threshold, max_prefill_tokens_while_decoding=prefill_cap,
        ),
        CacheConfig(block_size=4, num_blocks=16, enable_prefix_caching=caching),
    )  # fmt: skip
    harness = Harness(sched)
    for op, arg in ops:
        if op == "add":
            harness.add(arg)  # type: ignore[arg-type]
        elif op == "step":
            harness.step(arg)  # type: ignore[arg-type]
        elif op == "abort":
            harness.finish(arg, RequestStatus.FINISHED_ABORTED)  # type: ignore[arg-type]
        elif op == "finish":
            harness.finish(arg, RequestStatus.FINISHED_STOPPED)  # type: ignore[arg-type]
        elif op == "reset" and sched.reset_prefix_cache():
            assert not harness.pool.cached_blocks
        harness.check_invariants()
    # Liveness: whatever is left finishes (no request is stuck behind the pool or the budget).
    for _ in range(500):
        if not sched.has_unfinished_requests():
            break
        harness.step([0, 1, 5, 7, 8])
        harness.check_invariants()
    assert not sched.has_unfinished_requests()
    assert harness.pool.get_num_free_blocks() == harness.pool.num_blocks
    assert all(b.ref_count == 0 for b in harness.pool.blocks)
    assert not harness.kv.req_to_blocks and not harness.kv.req_to_block_hashes
    assert sched.reset_prefix_cache()
