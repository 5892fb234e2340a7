"""Request: the engine's mutable record of one sequence being generated."""

from __future__ import annotations

import enum
import time

from pagellm.sampling_params import SamplingParams


class RequestStatus(enum.IntEnum):
    WAITING = 0
    RUNNING = 1
    PREEMPTED = 2
    FINISHED_STOPPED = 3
    FINISHED_LENGTH = 4
    FINISHED_ABORTED = 5

    @property
    def is_finished(self) -> bool:
        return self >= RequestStatus.FINISHED_STOPPED

    @property
    def finish_reason(self) -> str | None:
        return {
            RequestStatus.FINISHED_STOPPED: "stop",
            RequestStatus.FINISHED_LENGTH: "length",
            RequestStatus.FINISHED_ABORTED: "abort",
        }.get(self)


class Request:
    """Owns one sequence: its tokens, how many are in the KV cache, and its status.

    Only the scheduler mutates it. ``num_computed_tokens`` catches up with ``num_tokens``;
    prefill, chunked prefill, prefix hits, resumed preemptions and decode are the same loop.
    """

    def __init__(
        self,
        req_id: str,
        prompt_token_ids: list[int],
        sampling_params: SamplingParams,
        eos_token_id: int | None = None,
        arrival_time: float | None = None,
        priority: int = 0,
        lora_id: int = 0,
        cache_salt: str | None = None,
    ) -> None:
        assert prompt_token_ids, "a request needs at least one prompt token"
        self.req_id = req_id
        self.prompt_token_ids = list(prompt_token_ids)
        self.sampling_params = sampling_params
        self.eos_token_id = eos_token_id
        self.arrival_time = time.monotonic() if arrival_time is None else arrival_time
        self.priority = priority
        self.lora_id = lora_id
        self.cache_salt = cache_salt
        self.output_token_ids: list[int] = []
        self.all_token_ids: list[int] = list(self.prompt_token_ids)
        self.num_computed_tokens = 0
        self.num_cached_tokens = -1  # prefix-cache hit length at first admission; -1 until scheduled
        self.num_preemptions = 0
        self.status = RequestStatus.WAITING
        self.stop_reason: int | str | None = None
        # Maximum tokens this request may generate; the scheduler clamps it to the context window.
        self.max_tokens = sampling_params.max_tokens
        # The grammar of a constrained request (pagellm.structured_output.manager.GrammarState), set by the
        # engine; core only calls is_ready / accept_token / is_terminated on it and never imports xgrammar.
        self.structured_output = None
        # Speculative decoding: the tokens proposed for this step (verified by the target model, never part of
        # all_token_ids until accepted), and the acceptance of this request's recent proposals.
        self.spec_token_ids: list[int] = []

    @property
    def num_prompt_tokens(self) -> int:
        return len(self.prompt_token_ids)

    @property
    def num_tokens(self) -> int:
        return len(self.all_token_ids)

    @property
    def num_output_tokens(self) -> int:
        return len(self.output_token_ids)

    @property
    def is_finished(self) -> bool:
        return self.status.is_finished

    def append_output_token(self, token_id: int) -> None:
        self.output_token_ids.append(token_id)
        self.all_token_ids.append(token_id)

    def __repr__(self) -> str:
        return (
            f"Request({self.req_id!r}, status={self.status.name}, prompt={self.num_prompt_tokens}, "
            f"out={self.num_output_tokens}, computed={self.num_computed_tokens})"
        )
