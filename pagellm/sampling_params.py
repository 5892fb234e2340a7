"""SamplingParams: per-request decoding settings, validated on construction."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from pagellm.errors import InvalidRequest
from pagellm.structured_output.params import StructuredOutputsParams

_GREEDY_EPS = 1e-5
MAX_LOGPROBS = 20


@dataclass
class SamplingParams:
    """Decoding settings of one request (vLLM's field names and defaults).

    Invalid values raise ``InvalidRequest`` (a ``ValueError``) naming the field and its range.
    """

    n: int = 1
    temperature: float = 1.0
    top_p: float = 1.0
    top_k: int = 0  # 0 or -1: disabled
    min_p: float = 0.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    repetition_penalty: float = 1.0
    seed: int | None = None
    stop: str | list[str] | None = None
    stop_token_ids: list[int] | None = None
    include_stop_str_in_output: bool = False
    ignore_eos: bool = False
    max_tokens: int | None = 16  # None: up to the context window
    min_tokens: int = 0
    logprobs: int | None = None  # top-k logprobs per generated token (the sampled one is always included)
    prompt_logprobs: int | None = None
    # Internal (not an API field): prompt logprobs only for prompt positions >= this one. Prefix-cache
    # hits then stop before position start - 1, whose logits score token `start`, so a request that
    # scores only a suffix (a label after a shared prompt) still reuses the cached prefix.
    prompt_logprobs_start: int | None = None
    logit_bias: dict[int, float] | None = None
    skip_special_tokens: bool = True
    detokenize: bool = True
    # Internal, vLLM's RequestOutputKind: True means a request reports only its final output (LLM.generate
    # waits for it), which saves building a cumulative RequestOutput at every step.
    final_output_only: bool = False
    # Constrained decoding (JSON schema, regex, choice, EBNF grammar); a dict of the same fields is accepted.
    structured_outputs: StructuredOutputsParams | None = None
    stop_list: list[str] = field(init=False, repr=False)

    def __post_init__(self) -> None:
        if isinstance(self.stop, str):
            self.stop_list = [self.stop]
        else:
            self.stop_list = list(self.stop or [])
        self.stop_token_ids = list(self.stop_token_ids or [])
        self.structured_outputs = StructuredOutputsParams.from_value(self.structured_outputs)
        if self.logit_bias:
            self.logit_bias = {int(k): float(v) for k, v in self.logit_bias.items()}
        self._validate()

    def _validate(self) -> None:
        def bad(param: str, msg: str) -> InvalidRequest:
            value = getattr(self, param)
            return InvalidRequest(f"{param} {msg}, got {value!r}", param=param)

        for name in ("temperature", "top_p", "min_p", "presence_penalty", "frequency_penalty", "repetition_penalty"):
            if not math.isfinite(getattr(self, name)):
                raise bad(name, "must be a finite number")
        if not isinstance(self.n, int) or self.n < 1:
            raise bad("n", "must be an integer >= 1")
        if self.temperature < 0.0:
            raise bad("temperature", "must be >= 0")
        if not 0.0 < self.top_p <= 1.0:
            raise bad("top_p", "must be in (0, 1]")
        if not isinstance(self.top_k, int) or self.top_k < -1:
            raise bad("top_k", "must be -1 or 0 (disabled) or an integer >= 1")
        if not 0.0 <= self.min_p <= 1.0:
            raise bad("min_p", "must be in [0, 1]")
        for name in ("presence_penalty", "frequency_penalty"):
            if not -2.0 <= getattr(self, name) <= 2.0:
                raise bad(name, "must be in [-2, 2]")
        if not self.repetition_penalty > 0.0:
            raise bad("repetition_penalty", "must be > 0")
        if self.max_tokens is not None and (not isinstance(self.max_tokens, int) or self.max_tokens < 1):
            raise bad("max_tokens", "must be an integer >= 1")
        if not isinstance(self.min_tokens, int) or self.min_tokens < 0:
            raise bad("min_tokens", "must be an integer >= 0")
        if self.max_tokens is not None and self.min_tokens > self.max_tokens:
            raise bad("min_tokens", f"must be <= max_tokens ({self.max_tokens})")
        for name in ("logprobs", "prompt_logprobs"):
            value = getattr(self, name)
            if value is not None and (not isinstance(value, int) or not 0 <= value <= MAX_LOGPROBS):
                raise bad(name, f"must be an integer in [0, {MAX_LOGPROBS}]")
        if self.prompt_logprobs_start is not None:
            if self.prompt_logprobs is None:
                raise bad("prompt_logprobs_start", "needs prompt_logprobs to be set")
            start = self.prompt_logprobs_start
            if not isinstance(start, int) or isinstance(start, bool) or start < 1:
                raise bad("prompt_logprobs_start", "must be an integer >= 1 (position 0 has no logprob)")
        if self.seed is not None and (not isinstance(self.seed, int) or not -(2**63) <= self.seed < 2**63):
            raise bad("seed", "must be an integer in [-2**63, 2**63)")
        if any(not s for s in self.stop_list):
            raise bad("stop", "must not contain empty strings")
        if any((not isinstance(t, int)) or t < 0 for t in self.stop_token_ids):
            raise bad("stop_token_ids", "must be non-negative integers")
        for token_id, bias in (self.logit_bias or {}).items():
            if token_id < 0:
                raise bad("logit_bias", "keys must be non-negative token ids")
            if not -100.0 <= bias <= 100.0:
                raise bad("logit_bias", "values must be in [-100, 100]")

    @property
    def is_greedy(self) -> bool:
        return self.temperature < _GREEDY_EPS

    @property
    def has_penalties(self) -> bool:
        return self.presence_penalty != 0.0 or self.frequency_penalty != 0.0 or self.repetition_penalty != 1.0

    @property
    def first_prompt_logprob_position(self) -> int:
        """The first position whose logits are needed for prompt logprobs (position p scores token p + 1)."""
        return 0 if self.prompt_logprobs_start is None else self.prompt_logprobs_start - 1

    def clone_for_child(self, index: int) -> SamplingParams:
        """The params of the index-th of n parallel samples: n=1 and a distinct seed."""
        from dataclasses import replace

        seed = None if self.seed is None else self.seed + index
        return replace(self, n=1, seed=seed)
