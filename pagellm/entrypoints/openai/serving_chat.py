"""POST /v1/chat/completions: messages through the model's chat template, OpenAI's chat shape out."""

from __future__ import annotations

import json
import time
from collections.abc import AsyncIterator

from pagellm.engine.async_llm import RequestStream
from pagellm.entrypoints.openai.errors import APIError, stream_error_event
from pagellm.entrypoints.openai.protocol import (
    ChatChoice,
    ChatCompletionRequest,
    ChatCompletionResponse,
    ChatLogProb,
    ChatLogProbContent,
    ChatLogProbs,
    ChatResponseMessage,
    ChatStreamChoice,
    DeltaMessage,
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
from pagellm.entrypoints.openai.tool_parsers import ToolCallStreamer, parse_forced, parse_hermes
from pagellm.entrypoints.openai.tools import ToolSetup, check_tools, render_tool_messages, template_renders_tools
from pagellm.errors import InvalidRequest
from pagellm.outputs import RequestOutput
from pagellm.structured_output import StructuredOutputsParams

_UNSUPPORTED = ("functions", "function_call")  # the legacy spelling of tools


class OpenAIServingChat(OpenAIServing):
    """Turns a ChatCompletionRequest into one engine request and formats its outputs."""

    async def create_chat_completion(self, req: ChatCompletionRequest) -> ChatCompletionResponse | AsyncIterator[str]:
        """A ChatCompletionResponse, or an iterator of SSE events when req.stream."""
        lora = self.resolve_model(req.model)
        for name in _UNSUPPORTED:
            if getattr(req, name) not in (None, "none"):
                raise APIError(400, f"{name} is not supported; use tools and tool_choice", param=name)
        tools = check_tools(req.tools, req.tool_choice, req.parallel_tool_calls)
        constraint, field = structured_outputs_of(req, req.response_format)
        forced = tools.forced_schema() if tools is not None else None
        if forced is not None:
            if constraint is not None:
                raise InvalidRequest(f"tool_choice {tools.mode!r} cannot be combined with {field}", param="tool_choice")
            # compact JSON: a call's text is arguments, not layout
            constraint, field = StructuredOutputsParams(json=forced, whitespace_pattern=""), "tools"
        if not req.messages:
            raise InvalidRequest("messages must be a non-empty list", param="messages")
        if req.top_logprobs is not None and not req.logprobs:
            raise InvalidRequest("top_logprobs needs logprobs=true", param="top_logprobs")
        top_k = (req.top_logprobs or 0) if req.logprobs else None
        max_tokens = req.max_completion_tokens if req.max_completion_tokens is not None else req.max_tokens
        params = await self.constrain(self.sampling_params(req, max_tokens, top_k), constraint, field)
        messages, template_kwargs = req.messages, req.chat_template_kwargs
        if tools is not None or any(m.role == "tool" or (m.model_extra or {}).get("tool_calls") for m in messages):
            native = template_renders_tools(self.tokenizer)
            messages = render_tool_messages(messages, tools, native)
            if native and tools is not None and tools.mode != "none":
                template_kwargs = {**(template_kwargs or {}), "tools": tools.tools}
        prompt = self.chat_prompt(messages, req.add_generation_prompt, req.continue_final_message, template_kwargs)
        self.check_fits(prompt, params)
        self.check_admission(params.n)

        request_id = new_request_id("chatcmpl")
        stream = self.add_request(request_id, prompt, params, req.priority, time.monotonic(), lora)
        tool_mode = tools if tools is not None and tools.mode != "none" else None
        if req.stream:
            return self._stream(req, request_id, prompt, params.n, stream, tool_mode)
        final: RequestOutput | None = None
        async for _, out in merge_streams([stream]):
            final = out
        assert final is not None and final.finished, "a request stream ended before its final output"
        return self._response(req, request_id, prompt, final, tool_mode)

    # ---- non-streaming --------------------------------------------------------------------

    def _response(self, req: ChatCompletionRequest, request_id: str, prompt: EnginePrompt,
                  final: RequestOutput, tools: ToolSetup | None = None) -> ChatCompletionResponse:
        choices = []
        num_completion_tokens = 0
        for out in sorted(final.outputs, key=lambda o: o.index):
            num_completion_tokens += len(out.token_ids)
            logprobs = None
            if req.logprobs:
                logprobs = self.logprobs(out.token_ids, out.logprobs or [], req.top_logprobs or 0)
            message, finish_reason = _message(out.text, out.finish_reason, tools)
            choices.append(ChatChoice(index=out.index, message=message, logprobs=logprobs,
                                      finish_reason=finish_reason, stop_reason=out.stop_reason))
        return ChatCompletionResponse(id=request_id, model=self.model_name, choices=choices,
                                      usage=self.usage(prompt, final, num_completion_tokens))

    def usage(self, prompt: EnginePrompt, final: RequestOutput | None, num_completion_tokens: int) -> UsageInfo:
        num_prompt_tokens = len(prompt.token_ids)
        cached = final.num_cached_tokens if final is not None else 0
        return UsageInfo(prompt_tokens=num_prompt_tokens, completion_tokens=num_completion_tokens,
                         total_tokens=num_prompt_tokens + num_completion_tokens,
                         prompt_tokens_details=PromptTokensDetails(cached_tokens=cached))

    def logprobs(self, token_ids: list[int], steps: list[dict[int, float]], num_top: int) -> ChatLogProbs:
        """OpenAI's chat logprobs: per token its string, logprob, UTF-8 bytes and the num_top most likely."""
        content = []
        for token_id, step in zip(token_ids, steps):
            token = self.token_str(token_id)
            top = sorted(step.items(), key=lambda kv: kv[1], reverse=True)[:num_top]
            content.append(ChatLogProbContent(
                token=token, logprob=clamp_logprob(step.get(token_id, float("-inf"))),
                bytes=list(token.encode("utf-8")),
                top_logprobs=[
                    ChatLogProb(token=(s := self.token_str(t)), logprob=clamp_logprob(v), bytes=list(s.encode("utf-8")))
                    for t, v in top
                ],
            ))
        return ChatLogProbs(content=content)

    # ---- streaming ------------------------------------------------------------------------

    async def _stream(self, req: ChatCompletionRequest, request_id: str, prompt: EnginePrompt, n: int,
                      stream: RequestStream, tools: ToolSetup | None = None) -> AsyncIterator[str]:
        """SSE events: a role chunk per choice, content chunks, an optional usage chunk, then [DONE]."""
        head = (f'{{"id":"{request_id}","object":"chat.completion.chunk","created":{now_s()},'
                f'"model":{json.dumps(self.model_name)}')
        num_tokens_sent = [0] * n
        done = [False] * n
        final: RequestOutput | None = None
        num_completion_tokens = 0
        streamers = [ToolCallStreamer(tools.mode, tools.named) for _ in range(n)] if tools is not None else None
        called = [False] * n
        try:
            # NOTE: the role chunks go out before the first token, as OpenAI and vLLM do.
            roles = ",".join(ChatStreamChoice(index=i, delta=DeltaMessage(role="assistant", content=""))
                             .model_dump_json(exclude_none=True) for i in range(n))
            yield f'data: {head},"choices":[{roles}]}}\n\n'
            async for _, out in merge_streams([stream]):
                final = out
                choices = []
                for seq in out.outputs:
                    i = seq.index
                    if done[i] or not (seq.delta_token_ids or seq.delta_text or seq.finished()):
                        continue
                    sent = num_tokens_sent[i]
                    new_ids = seq.token_ids[sent:sent + len(seq.delta_token_ids)]
                    num_tokens_sent[i] = sent + len(new_ids)
                    num_completion_tokens += len(new_ids)
                    logprobs = None
                    if req.logprobs and seq.logprobs is not None:
                        logprobs = self.logprobs(new_ids, seq.logprobs[sent:sent + len(new_ids)],
                                                 req.top_logprobs or 0)
                    done[i] = seq.finished()
                    finish_reason = seq.finish_reason
                    if streamers is None:
                        delta = DeltaMessage(content=seq.delta_text if seq.delta_text or not done[i] else None)
                    else:
                        tool_delta, has_calls = streamers[i].step(seq.delta_text, done[i])
                        called[i] = called[i] or has_calls
                        if tool_delta is None and not done[i] and logprobs is None:
                            continue  # held back: a tool call may be starting
                        delta = tool_delta or DeltaMessage()
                        if called[i] and finish_reason == "stop":
                            finish_reason = "tool_calls"
                    choices.append(ChatStreamChoice(
                        index=i, delta=delta, logprobs=logprobs, finish_reason=finish_reason,
                        stop_reason=seq.stop_reason,
                    ).model_dump_json(exclude_none=True))
                if choices:
                    yield f'data: {head},"choices":[{",".join(choices)}]}}\n\n'
            if req.stream_options is not None and req.stream_options.include_usage:
                usage = self.usage(prompt, final, num_completion_tokens).model_dump_json()
                yield f'data: {head},"choices":[],"usage":{usage}}}\n\n'
        except Exception as exc:  # the status line is sent: report in-band, like vLLM and OpenAI
            yield stream_error_event(exc)
        finally:
            stream.close()  # a closed or cancelled response aborts the request if it still runs
        yield "data: [DONE]\n\n"


def _message(text: str, finish_reason: str | None, tools: ToolSetup | None) -> tuple[ChatResponseMessage, str | None]:
    """The assistant message of one choice: tool calls parsed out of the text where tools are in play."""
    if tools is None:
        return ChatResponseMessage(content=text), finish_reason
    if tools.mode == "auto":
        content, calls = parse_hermes(text)
    else:
        try:
            content, calls = None, parse_forced(text, tools.named)
        except (ValueError, KeyError, TypeError):  # cut off by max_tokens: no complete call
            content, calls = text, []
    if calls and finish_reason == "stop":
        finish_reason = "tool_calls"
    return ChatResponseMessage(content=content, tool_calls=calls), finish_reason
