"""POST /v1/completions: prompts in, text (JSON or SSE) out, in OpenAI's completions shape."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from pagellm.engine.async_llm import RequestStream
from pagellm.entrypoints.openai.errors import APIError, stream_error_event
from pagellm.entrypoints.openai.protocol import (
    CompletionChoice,
    CompletionLogProbs,
    CompletionRequest,
    CompletionResponse,
    PromptTokensDetails,
    UsageInfo,
)
from pagellm.entrypoints.openai.serving_engine import (
    EnginePrompt,
    OpenAIServing,
    clamp_logprob,
    merge_streams,
    new_request_id,
    now_s,
)
from pagellm.entrypoints.openai.structured_outputs import structured_outputs_of
from pagellm.errors import InvalidRequest
from pagellm.outputs import CompletionOutput, RequestOutput
from pagellm.sampling_params import SamplingParams

LogprobSteps = list[dict[int, float] | None]


class OpenAIServingCompletion(OpenAIServing):
    """Turns a CompletionRequest into engine requests (one per prompt) and formats their outputs."""

    async def create_completion(self, req: CompletionRequest) -> CompletionResponse | AsyncIterator[str]:
        """A CompletionResponse, or an iterator of SSE events when req.stream."""
        lora = self.resolve_model(req.model)
        if req.suffix is not None:
            raise APIError(400, "suffix is not supported", param="suffix")
        if req.best_of is not None and req.best_of != req.n:
            raise APIError(400, "best_of is not supported (only best_of == n)", param="best_of")
        prompt_logprobs = req.logprobs if req.echo and req.logprobs is not None else None
        params = self.sampling_params(req, req.max_tokens, req.logprobs, prompt_logprobs)
        params = await self.constrain(params, *structured_outputs_of(req))
        prompts = self._prompts(req)
        for prompt in prompts:
            self.check_fits(prompt, params)
        self.check_admission(len(prompts) * params.n)

        request_id = new_request_id("cmpl")
        arrival = time.monotonic()
        streams: list[RequestStream] = []
        try:  # all or nothing: a prompt the engine refuses (InvalidRequest) aborts those added before it
            for i, prompt in enumerate(prompts):
                streams.append(self.add_request(f"{request_id}-{i}", prompt, params, req.priority, arrival, lora))
        except BaseException:
            for stream in streams:
                stream.close()
            raise
        if req.stream:
            return self._stream(req, request_id, prompts, params, streams)
        finals: list[RequestOutput | None] = [None] * len(prompts)
        async for index, out in merge_streams(streams):
            if out.finished:
                finals[index] = out
        assert all(f is not None for f in finals), "a request stream ended before its final output"
        return self._response(req, request_id, prompts, params, finals)  # type: ignore[arg-type]

    def _prompts(self, req: CompletionRequest) -> list[EnginePrompt]:
        """str | list[str] | list[int] | list[list[int]] -> one EnginePrompt per prompt."""
        prompt = req.prompt
        if isinstance(prompt, str):
            return [EnginePrompt(prompt, self.tokenize_text(prompt))]
        if not prompt:
            raise InvalidRequest("prompt must not be empty", param="prompt")
        if all(isinstance(p, str) for p in prompt):
            return [EnginePrompt(p, self.tokenize_text(p)) for p in prompt]  # type: ignore[arg-type]
        if all(isinstance(p, int) for p in prompt):
            return [EnginePrompt(None, list(prompt))]  # type: ignore[arg-type]
        return [EnginePrompt(None, list(p)) for p in prompt]  # type: ignore[union-attr]

    def _prompt_text(self, prompt: EnginePrompt) -> str:
        if prompt.text is None:
            prompt.text = self.tokenizer.decode(prompt.token_ids)
        return prompt.text

    # ---- non-streaming --------------------------------------------------------------------

    def _response(self, req: CompletionRequest, request_id: str, prompts: list[EnginePrompt],
                  params: SamplingParams, finals: list[RequestOutput]) -> CompletionResponse:
        choices = []
        num_completion_tokens = 0
        for p_index, (prompt, final) in enumerate(zip(prompts, finals)):
            for out in sorted(final.outputs, key=lambda o: o.index):
                num_completion_tokens += len(out.token_ids)
                text, token_ids, steps = out.text, out.token_ids, out.logprobs
                if req.echo:
                    text = self._prompt_text(prompt) + text
                    token_ids = prompt.token_ids + token_ids
                    steps = (final.prompt_logprobs or [None] * len(prompt.token_ids)) + (steps or [])
                logprobs = None
                if req.logprobs is not None:
                    logprobs = self.logprobs(token_ids, steps or [], offset=0)
                choices.append(CompletionChoice(
                    index=p_index * params.n + out.index, text=text, logprobs=logprobs,
                    finish_reason=out.finish_reason, stop_reason=out.stop_reason,
                ))
        return CompletionResponse(id=request_id, model=self.model_name, choices=choices,
                                  usage=self.usage(prompts, finals, num_completion_tokens))

    def usage(self, prompts: list[EnginePrompt], finals: list[RequestOutput | None],
              num_completion_tokens: int) -> UsageInfo:
        num_prompt_tokens = sum(len(p.token_ids) for p in prompts)
        cached = sum(f.num_cached_tokens for f in finals if f is not None)
        return UsageInfo(prompt_tokens=num_prompt_tokens, completion_tokens=num_completion_tokens,
                         total_tokens=num_prompt_tokens + num_completion_tokens,
                         prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))

    def logprobs(self, token_ids: list[int], steps: LogprobSteps, offset: int) -> CompletionLogProbs:
        """OpenAI's completions logprobs; text_offset counts chars from ``offset`` over the token strings.

        Each step is {token_id: logprob} with the chosen token first, then the top-k alternatives;
        None (the first prompt token) becomes null.
        """
        result = CompletionLogProbs()
        for i, token_id in enumerate(token_ids):
            token = self.token_str(token_id)
            step = steps[i] if i < len(steps) else None
            result.tokens.append(token)
            result.text_offset.append(offset)
            offset += len(token)
            if step is None:
                result.token_logprobs.append(None)
                result.top_logprobs.append(None)
                continue
            result.token_logprobs.append(clamp_logprob(step.get(token_id, float("-inf"))))
            top: dict[str, float] = {}
            for top_id, value in step.items():
                top.setdefault(self.token_str(top_id), clamp_logprob(value))
            result.top_logprobs.append(top)
        return result

    # ---- streaming ------------------------------------------------------------------------

    async def _stream(self, req: CompletionRequest, request_id: str, prompts: list[EnginePrompt],
                      params: SamplingParams, streams: list[RequestStream]) -> AsyncIterator[str]:
        """SSE events: one chunk per choice update, an optional usage chunk, then [DONE].

        The engine request is aborted when this generator is closed or cancelled (client gone).
        """
        n = params.n
        num_choices = len(prompts) * n
        num_tokens_sent = [0] * num_choices
        text_offsets = [0] * num_choices
        started = [False] * num_choices
        done = [False] * num_choices
        finals: list[RequestOutput | None] = [None] * len(prompts)
        created = now_s()
        # NOTE: the envelope is formatted once; only the choices are serialized per chunk.
        head = (f'{{"id":"{request_id}","object":"text_completion","created":{created},'
                f'"model":{json.dumps(self.model_name)}')
        num_completion_tokens = 0
        try:
            async for p_index, out in merge_streams(streams):
                if out.finished:
                    finals[p_index] = out
                choices = []
                for seq in out.outputs:
                    i = p_index * n + seq.index
                    if done[i] or not (seq.delta_token_ids or seq.delta_text or seq.finished()):
                        continue
                    choice = self._chunk_choice(req, prompts[p_index], out, seq, i, started, num_tokens_sent,
                                                text_offsets)
                    num_completion_tokens += len(seq.delta_token_ids)
                    done[i] = seq.finished()
                    choices.append(choice)
                if choices:
                    body = ",".join(c.model_dump_json() for c in choices)
                    yield f'data: {head},"choices":[{body}]}}\n\n'
            if req.stream_options is not None and req.stream_options.include_usage:
                usage = self.usage(prompts, finals, num_completion_tokens).model_dump_json()
                yield f'data: {head},"choices":[],"usage":{usage}}}\n\n'
        except Exception as exc:  # the status line is sent: report in-band, like vLLM and OpenAI
            yield stream_error_event(exc)
        finally:
            for stream in streams:
                stream.close()  # a closed or cancelled response aborts what is still running
        yield "data: [DONE]\n\n"

    def _chunk_choice(self, req: CompletionRequest, prompt: EnginePrompt, out: RequestOutput, seq: CompletionOutput,
                      i: int, started: list[bool], num_tokens_sent: list[int],
                      text_offsets: list[int]) -> CompletionChoice:
        text = seq.delta_text
        sent = num_tokens_sent[i]
        # NOTE: delta_token_ids are exactly the tokens after the ones already sent, so the slice is the delta.
        token_ids = list(seq.token_ids[sent:sent + len(seq.delta_token_ids)])
        steps: LogprobSteps = list(seq.logprobs[sent:sent + len(token_ids)]) if seq.logprobs is not None else []
        num_tokens_sent[i] = sent + len(token_ids)
        if req.echo and not started[i]:
            text = self._prompt_text(prompt) + text
            token_ids = prompt.token_ids + token_ids
            steps = (out.prompt_logprobs or [None] * len(prompt.token_ids)) + steps
        started[i] = True
        logprobs = None
        if req.logprobs is not None:
            logprobs = self.logprobs(token_ids, steps, text_offsets[i])
            text_offsets[i] += sum(len(t) for t in logprobs.tokens)
        return CompletionChoice(index=i, text=text, logprobs=logprobs,
                                finish_reason=seq.finish_reason, stop_reason=seq.stop_reason)
