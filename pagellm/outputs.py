"""Outputs: the worker's per-step result, the core's per-request deltas, the user's RequestOutput."""

from __future__ import annotations

from dataclasses import dataclass, field


@dataclass
class TokenLogprob:
    """Logprob of one chosen token plus the top-k alternatives at that position."""

    token_id: int
    logprob: float
    rank: int  # 1 = most likely
    top: list[tuple[int, float]] = field(default_factory=list)  # (token_id, logprob), best first


@dataclass
class ModelRunnerOutput:
    """What the worker returns for one SchedulerOutput."""

    sampled_token_ids: dict[str, int] = field(default_factory=dict)  # only for sample=True requests
    logprobs: dict[str, TokenLogprob] = field(default_factory=dict)
    # Speculative decoding: the tokens emitted after sampled_token_ids[req] in the same step (the accepted
    # proposals' successors; empty when the first proposal was rejected), and their logprobs
    spec_token_ids: dict[str, list[int]] = field(default_factory=dict)
    spec_logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)
    # Prompt logprobs of the positions computed this step (position p holds the logprob of
    # token p+1 given tokens <= p); the first prompt token has none.
    prompt_logprobs: dict[str, list[TokenLogprob]] = field(default_factory=dict)


@dataclass
class EngineCoreOutput:
    """The new tokens of one request after one step."""

    req_id: str
    new_token_ids: list[int]
    new_logprobs: list[TokenLogprob] = field(default_factory=list)
    new_prompt_logprobs: list[TokenLogprob] = field(default_factory=list)
    finish_reason: str | None = None  # stop | length | abort
    stop_reason: int | str | None = None
    num_cached_tokens: int = 0


@dataclass
class CompletionOutput:
    """One of the n generated sequences of a request (vLLM's shape)."""

    index: int
    text: str
    token_ids: list[int]
    cumulative_logprob: float | None
    logprobs: list[dict[int, float]] | None  # per generated token: {token_id: logprob}
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    # What this update added (for streaming); empty on a final-only view.
    delta_text: str = ""
    delta_token_ids: list[int] = field(default_factory=list)

    def finished(self) -> bool:
        return self.finish_reason is not None


@dataclass
class RequestOutput:
    """The result of one prompt (vLLM's shape)."""

    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    prompt_logprobs: list[dict[int, float] | None] | None
    outputs: list[CompletionOutput]
    finished: bool
    num_cached_tokens: int = 0
    metrics: dict[str, float] = field(default_factory=dict)
