"""The scheduler's contract with the worker: plain dataclasses of ints and lists."""

from __future__ import annotations

from dataclasses import dataclass, field

from pagellm.sampling_params import SamplingParams


@dataclass
class ScheduledRequest:
    """One request's share of a step: which new tokens to compute and where its KV lives.

    ``token_ids`` are the tokens at positions ``num_computed_tokens ..
    num_computed_tokens + len(token_ids) - 1``. The worker reads but never mutates the
    lists it is handed (``all_token_ids`` is the request's live list).
    """

    req_id: str
    token_ids: list[int]
    num_computed_tokens: int
    block_ids: list[int]  # the request's whole block table
    sample: bool  # the chunk reaches the last known token: sample the next one
    sampling_params: SamplingParams
    all_token_ids: list[int]  # prompt + output so far (penalties, prompt logprobs)
    num_prompt_tokens: int
    eos_token_id: int | None = None  # masked while fewer than min_tokens are generated
    lora_id: int = 0
    # Speculative decoding: the proposed tokens at the end of token_ids; the worker verifies them and
    # returns the tokens it accepts (ModelRunnerOutput.spec_token_ids)
    spec_token_ids: list[int] = field(default_factory=list)

    @property
    def num_scheduled_tokens(self) -> int:
        return len(self.token_ids)


@dataclass
class SchedulerOutput:
    """What one engine step computes."""

    scheduled: list[ScheduledRequest] = field(default_factory=list)
    # Requests finished, aborted or preempted since the previous step: the worker drops
    # per-request state it keeps for finished ones (e.g. seeded generators).
    finished_req_ids: list[str] = field(default_factory=list)
    preempted_req_ids: list[str] = field(default_factory=list)
    # Constrained decoding: the engine fills one int32 bitmask row (bit t of a row set = token t allowed)
    # per sampled request in grammar_req_ids, in that order (a request verifying proposals has 1 + their
    # number of consecutive rows, one per position); the worker masks those rows' logits.
    grammar_req_ids: list[str] = field(default_factory=list)
    grammar_bitmask: object | None = None  # a torch int32 tensor [len(grammar_req_ids), ceil(vocab / 32)]

    @property
    def total_num_scheduled_tokens(self) -> int:
        return sum(len(s.token_ids) for s in self.scheduled)

    @property
    def is_empty(self) -> bool:
        return not self.scheduled
