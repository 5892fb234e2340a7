"""The worker's bitmask unpack agrees with xgrammar's own kernel, and the scheduler's grammar hooks."""

from __future__ import annotations

import torch

from pagellm.config import CacheConfig, SchedulerConfig
from pagellm.core.sched_output import ScheduledRequest
from pagellm.core.scheduler import Scheduler
from pagellm.outputs import ModelRunnerOutput
from pagellm.request import Request
from pagellm.sampling_params import SamplingParams
from pagellm.worker.sampler import apply_grammar_bitmask, unpack_bitmask


def _row(req_id: str) -> ScheduledRequest:
    return ScheduledRequest(req_id=req_id, token_ids=[1], num_computed_tokens=0, block_ids=[0], sample=True,
                            sampling_params=SamplingParams(), all_token_ids=[1], num_prompt_tokens=1)


def _reference_allowed(bitmask: torch.Tensor, vocab: int) -> torch.Tensor:
    words = bitmask.tolist()
    return torch.tensor([[(row[t // 32] >> (t % 32)) & 1 == 1 for t in range(vocab)] for row in words])


def test_bitmask_masks_exactly_the_cleared_bits_of_the_constrained_rows() -> None:
    vocab = 1000  # not a multiple of 32: the last word is partly padding
    torch.manual_seed(0)
    logits = torch.randn(4, vocab)
    rows = [_row(f"r{i}") for i in range(4)]
    bitmask = torch.randint(-(2**31), 2**31 - 1, (2, -(-vocab // 32)), dtype=torch.int32)
    allowed = _reference_allowed(bitmask, vocab)
    assert torch.equal(unpack_bitmask(bitmask, vocab), allowed)  # the non-CPU path's unpack
    # rows r3 and r1 are constrained (in that order); r0 and r2 are not
    got = apply_grammar_bitmask(logits, rows, ["r3", "r1"], bitmask)
    expected = logits.clone()
    expected[3][~allowed[0]] = -torch.inf
    expected[1][~allowed[1]] = -torch.inf
    assert torch.equal(got, expected)
    assert torch.isinf(got[3]).any() and torch.equal(got[0], logits[0])
    assert apply_grammar_bitmask(logits, rows, [], None) is logits


def test_sparse_and_dense_rows_in_one_batch() -> None:
    vocab = 1000
    torch.manual_seed(1)
    logits = torch.randn(3, vocab)
    rows = [_row(f"r{i}") for i in range(3)]
    allowed = torch.zeros(3, -(-vocab // 32) * 32, dtype=torch.bool)
    allowed[0, [5, 6, 999]] = True  # sparse: 3 tokens
    allowed[1, :] = True
    allowed[1, [0, 31, 32, 500]] = False  # dense
    allowed[2, 1000:] = True  # only padding bits: nothing in the vocabulary is allowed
    import numpy as np

    bitmask = torch.from_numpy(np.packbits(allowed.numpy(), axis=1, bitorder="little").view(np.int32).copy())
    assert torch.equal(unpack_bitmask(bitmask, vocab), allowed[:, :vocab])
    got = apply_grammar_bitmask(logits, rows, ["r0", "r1", "r2"], bitmask)
    expected = logits.masked_fill(~allowed[:, :vocab], -torch.inf)
    assert torch.equal(got, expected)


class _FakeGrammar:
    """The scheduler's view of a GrammarState: it accepts tokens and terminates after `length` of them."""

    def __init__(self, length: int) -> None:
        self.length = length
        self.accepted: list[int] = []

    def is_ready(self) -> bool:
        return True

    def accept_token(self, token_id: int) -> bool:
        self.accepted.append(token_id)
        return True

    def is_terminated(self) -> bool:
        return len(self.accepted) >= self.length


def test_scheduler_feeds_the_matcher_and_stops_when_the_grammar_ends() -> None:
    sched = Scheduler(SchedulerConfig(max_num_seqs=2), CacheConfig(block_size=4, num_blocks=16))
    request = Request("a", [1, 2, 3], SamplingParams(max_tokens=10, ignore_eos=True))
    grammar = _FakeGrammar(length=2)
    request.structured_output = grammar
    sched.add_request(request)
    finish = None
    for token in (7, 8, 9):
        out = sched.update_from_output(sched.schedule(), ModelRunnerOutput(sampled_token_ids={"a": token}))
        finish = out[0].finish_reason
        if finish:
            break
    assert grammar.accepted == [7, 8] and finish == "stop"
