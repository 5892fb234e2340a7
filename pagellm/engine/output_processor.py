"""OutputProcessor: core deltas -> detokenized, stop-string-checked RequestOutputs."""

from __future__ import annotations

import time
from dataclasses import dataclass, field

from pagellm.engine.detokenizer import IncrementalDetokenizer
from pagellm.outputs import CompletionOutput, EngineCoreOutput, RequestOutput, TokenLogprob
from pagellm.sampling_params import SamplingParams


def logprob_dict(lp: TokenLogprob) -> dict[int, float]:
    """{token_id: logprob} with the chosen token first, then the top-k alternatives."""
    d = {lp.token_id: lp.logprob}
    for token_id, value in lp.top:
        d.setdefault(token_id, value)
    return d


@dataclass
class _SeqState:
    """One generated sequence (a child when n > 1)."""

    index: int
    detok: IncrementalDetokenizer
    params: SamplingParams
    token_ids: list[int] = field(default_factory=list)
    logprobs: list[dict[int, float]] | None = None
    cumulative_logprob: float = 0.0
    finish_reason: str | None = None
    stop_reason: int | str | None = None
    delta_token_ids: list[int] = field(default_factory=list)


@dataclass
class _RequestState:
    request_id: str
    prompt: str | None
    prompt_token_ids: list[int]
    seqs: dict[str, _SeqState]  # child req_id -> state
    prompt_logprobs: list[dict[int, float] | None] | None
    arrival_time: float
    first_token_time: float | None = None
    num_cached_tokens: int = 0
    final_output_only: bool = False


class OutputProcessor:
    """Tracks every live request; turns EngineCoreOutputs into RequestOutputs."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.requests: dict[str, _RequestState] = {}
        self.child_to_parent: dict[str, str] = {}

    def add_request(self, request_id: str, prompt: str | None, prompt_token_ids: list[int],
                    child_params: dict[str, SamplingParams], arrival_time: float | None = None) -> None:
        seqs = {}
        for i, (child_id, params) in enumerate(child_params.items()):
            seqs[child_id] = _SeqState(i, IncrementalDetokenizer(self.tokenizer, prompt_token_ids, params), params,
                                       logprobs=[] if params.logprobs is not None else None)
            self.child_to_parent[child_id] = request_id
        first = next(iter(child_params.values()))
        self.requests[request_id] = _RequestState(
            request_id, prompt, prompt_token_ids, seqs,
            # None for position 0 and, with prompt_logprobs_start, every position before it
            prompt_logprobs=[None] * (first.prompt_logprobs_start or 1) if first.prompt_logprobs is not None else None,
            arrival_time=time.monotonic() if arrival_time is None else arrival_time,
            final_output_only=first.final_output_only,
        )

    def has_request(self, request_id: str) -> bool:
        return request_id in self.requests

    def child_ids(self, request_id: str) -> list[str]:
        state = self.requests.get(request_id)
        return list(state.seqs) if state else []

    def process(self, outputs: list[EngineCoreOutput]) -> tuple[list[RequestOutput], list[str]]:
        """Returns the updated RequestOutputs and the child ids a stop string finished."""
        touched: dict[str, _RequestState] = {}
        stopped: list[str] = []
        for out in outputs:
            parent_id = self.child_to_parent.get(out.req_id)
            if parent_id is None:
                continue  # aborted earlier
            state = self.requests[parent_id]
            seq = state.seqs[out.req_id]
            if seq.finish_reason is not None:
                continue
            if self._apply(state, seq, out):
                stopped.append(out.req_id)
            touched[parent_id] = state
        results = []
        for state in touched.values():
            finished = all(s.finish_reason is not None for s in state.seqs.values())
            if finished or not state.final_output_only:
                results.append(self._make_output(state))
            if finished:
                self._forget(state)
        return results, stopped

    def _apply(self, state: _RequestState, seq: _SeqState, out: EngineCoreOutput) -> bool:
        if out.new_prompt_logprobs and state.prompt_logprobs is not None:
            state.prompt_logprobs.extend(logprob_dict(lp) for lp in out.new_prompt_logprobs)
        if out.new_token_ids and state.first_token_time is None:
            state.first_token_time = time.monotonic()
            state.num_cached_tokens = out.num_cached_tokens
        finished = out.finish_reason is not None
        token_ids, logprobs = out.new_token_ids, out.new_logprobs
        stop_str = None
        if len(token_ids) > 1 and seq.detok.has_stop_strings:
            # NOTE: several tokens in one step (accepted speculative proposals): a stop string in an early one
            # must end the output there, as it would one token a step, so they are detokenized one by one
            for i in range(len(token_ids)):
                stop_str = seq.detok.update(token_ids[i : i + 1], finished=finished and i == len(token_ids) - 1)
                if stop_str is not None:
                    token_ids, logprobs = token_ids[: i + 1], logprobs[: i + 1]
                    break
        else:
            stop_str = seq.detok.update(token_ids, finished=finished)
        seq.token_ids.extend(token_ids)
        seq.delta_token_ids = list(token_ids)
        for lp in logprobs:
            seq.cumulative_logprob += lp.logprob
            if seq.logprobs is not None:
                seq.logprobs.append(logprob_dict(lp))
        if stop_str is not None and not finished:
            seq.finish_reason, seq.stop_reason = "stop", stop_str
            return True
        if stop_str is not None:
            seq.finish_reason, seq.stop_reason = "stop", stop_str
        elif finished:
            seq.finish_reason, seq.stop_reason = out.finish_reason, out.stop_reason
        return False

    def abort(self, request_id: str) -> RequestOutput | None:
        """Mark a request aborted; returns its final output (finish_reason 'abort')."""
        state = self.requests.get(request_id)
        if state is None:
            return None
        for seq in state.seqs.values():
            if seq.finish_reason is None:
                seq.finish_reason = "abort"
                seq.detok.update([], finished=True)
                seq.delta_token_ids = []
        out = self._make_output(state)
        self._forget(state)
        return out

    def _forget(self, state: _RequestState) -> None:
        self.requests.pop(state.request_id, None)
        for child_id in state.seqs:
            self.child_to_parent.pop(child_id, None)

    def _make_output(self, state: _RequestState) -> RequestOutput:
        outs = []
        for seq in state.seqs.values():
            outs.append(CompletionOutput(
                index=seq.index,
                text=seq.detok.output_text,
                token_ids=list(seq.token_ids),
                cumulative_logprob=seq.cumulative_logprob if seq.logprobs is not None else None,
                logprobs=list(seq.logprobs) if seq.logprobs is not None else None,
                finish_reason=seq.finish_reason,
                stop_reason=seq.stop_reason,
                delta_text=seq.detok.get_next_delta(),
                delta_token_ids=seq.delta_token_ids,
            ))
            seq.delta_token_ids = []
        finished = all(s.finish_reason is not None for s in state.seqs.values())
        metrics = {"arrival_time": state.arrival_time}
        if state.first_token_time is not None:
            metrics["first_token_time"] = state.first_token_time
        return RequestOutput(
            request_id=state.request_id,
            prompt=state.prompt,
            prompt_token_ids=state.prompt_token_ids,
            prompt_logprobs=list(state.prompt_logprobs) if state.prompt_logprobs is not None else None,
            outputs=outs,
            finished=finished,
            num_cached_tokens=state.num_cached_tokens,
            metrics=metrics,
        )
