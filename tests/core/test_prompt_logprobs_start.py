"""SamplingParams.prompt_logprobs_start: validation, capped prefix hits, and only positions >= start reported."""

from __future__ import annotations

import pytest

from pagellm.config import CacheConfig, SchedulerConfig
from pagellm.core.kv_cache_manager import KVCacheManager
from pagellm.core.scheduler import Scheduler
from pagellm.errors import InvalidRequest
from pagellm.outputs import ModelRunnerOutput, TokenLogprob
from pagellm.request import Request, RequestStatus
from pagellm.sampling_params import SamplingParams


def test_prompt_logprobs_start_is_validated() -> None:
    assert SamplingParams(prompt_logprobs=0, prompt_logprobs_start=5).first_prompt_logprob_position == 4
    assert SamplingParams(prompt_logprobs=0).first_prompt_logprob_position == 0
    with pytest.raises(InvalidRequest, match="needs prompt_logprobs") as info:
        SamplingParams(prompt_logprobs_start=3)
    assert info.value.param == "prompt_logprobs_start"
    for bad in (0, -1, 2.0, True):
        with pytest.raises(InvalidRequest, match="integer >= 1"):
            SamplingParams(prompt_logprobs=0, prompt_logprobs_start=bad)  # type: ignore[arg-type]


def _cached_manager(tokens: list[int]) -> KVCacheManager:
    """A block-size-4 manager whose prefix cache holds `tokens` (computed by a finished request)."""
    kv = KVCacheManager(CacheConfig(block_size=4, num_blocks=16), max_model_len=256)
    first = Request("first", tokens, SamplingParams())
    hit_ids, num_hits = kv.get_computed_blocks(first)
    assert kv.allocate_slots(first, first.num_tokens - num_hits, hit_ids, num_hits) is not None
    first.num_computed_tokens = first.num_tokens
    first.status = RequestStatus.FINISHED_STOPPED
    kv.free(first)
    return kv


@pytest.mark.parametrize("start, num_hits", [(None, 0), (1, 0), (4, 0), (5, 4), (8, 4), (9, 8), (13, 12), (17, 16)])
def test_prefix_hits_stop_before_the_position_that_scores_token_start(start: int | None, num_hits: int) -> None:
    tokens = list(range(100, 117))  # 17 tokens: 4 full blocks cached
    kv = _cached_manager(tokens)
    request = Request("r", tokens, SamplingParams(prompt_logprobs=0, prompt_logprobs_start=start))
    hit_ids, hits = kv.get_computed_blocks(request)
    assert hits == num_hits and len(hit_ids) == num_hits // 4
    # position start - 1 (whose logits score token `start`) is always left to compute
    assert start is None or hits <= start - 1


def test_scheduler_reports_only_positions_from_start_even_after_a_preemption() -> None:
    sched = Scheduler(SchedulerConfig(max_num_seqs=4, max_num_batched_tokens=4),
                      CacheConfig(block_size=4, num_blocks=16))
    request = Request("a", list(range(10)), SamplingParams(max_tokens=1, prompt_logprobs=0, prompt_logprobs_start=7))
    sched.add_request(request)

    def lp(first_target: int, n: int) -> list[TokenLogprob]:
        return [TokenLogprob(token_id=first_target + i, logprob=-1.0, rank=1) for i in range(n)]

    out = sched.schedule()  # positions 0..3: nothing to report yet (the worker computes no rows)
    assert sched.update_from_output(out, ModelRunnerOutput()) == []
    out = sched.schedule()  # positions 4..7: rows of positions 6, 7 score tokens 7, 8
    (output,) = sched.update_from_output(out, ModelRunnerOutput(prompt_logprobs={"a": lp(7, 2)}))
    assert [e.token_id for e in output.new_prompt_logprobs] == [7, 8]
    sched._preempt(request)  # white box: force a mid-prompt preemption
    out = sched.schedule()  # resumes from its own cached block 0 (hits stop before position 6)
    assert out.scheduled[0].num_computed_tokens == 4
    assert sched.update_from_output(out, ModelRunnerOutput(prompt_logprobs={"a": lp(7, 2)})) == []  # not twice
    out = sched.schedule()  # positions 8, 9: the row of position 8 scores token 9, then the sample
    runner = ModelRunnerOutput(sampled_token_ids={"a": 1}, prompt_logprobs={"a": lp(9, 1)})
    (output,) = sched.update_from_output(out, runner)
    assert [e.token_id for e in output.new_prompt_logprobs] == [9] and output.finish_reason == "length"
