"""What the completion and chat handlers share: model check, admission, sampling params, prompts."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import AsyncIterator
from dataclasses import dataclass, replace
from typing import Any, Protocol

from pagellm.engine.async_llm import AsyncLLM, RequestStream
from pagellm.entrypoints.openai.errors import APIError
from pagellm.entrypoints.openai.protocol import ChatMessage, SamplingFields
from pagellm.entrypoints.openai.serving_lora import LoRAModels
from pagellm.entrypoints.openai.structured_outputs import check_structured_outputs
from pagellm.errors import InvalidRequest
from pagellm.lora_request import LoRARequest
from pagellm.outputs import RequestOutput
from pagellm.sampling_params import SamplingParams
from pagellm.structured_output import StructuredOutputsParams

# The lowest logprob written to JSON: -inf (a masked token) is not valid JSON (vLLM's choice).
MIN_LOGPROB = -9999.0


def clamp_logprob(value: float) -> float:
    return value if value >= MIN_LOGPROB else MIN_LOGPROB


@dataclass
class EnginePrompt:
    """One tokenized prompt: the text (None for token ids) and its ids."""

    text: str | None
    token_ids: list[int]

    def as_engine_prompt(self) -> dict[str, Any]:
        return {"prompt": self.text, "prompt_token_ids": self.token_ids}


class TokenStrings:
    """token id -> its text on its own, cached: logprob tables decode the same ids over and over."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self._cache: dict[int, str] = {}

    def __call__(self, token_id: int) -> str:
        text = self._cache.get(token_id)
        if text is None:
            text = self.tokenizer.decode([token_id], skip_special_tokens=False)
            if len(self._cache) < 1 << 20:
                self._cache[token_id] = text
        return text


@dataclass
class ServerState:
    """Shared by every handler: set on SIGTERM so new work is refused while running work finishes."""

    draining: bool = False


class Admission(Protocol):
    """What the admission policy reads of an engine."""

    @property
    def is_running(self) -> bool: ...

    @property
    def num_waiting(self) -> int: ...


class ServingBase:
    """Base of every handler: the served model names and the server's admission policy."""

    def __init__(self, engine: Admission, served_model_names: list[str], max_waiting_requests: int,
                 state: ServerState) -> None:
        self.engine = engine
        self.served_model_names = served_model_names
        self.model_name = served_model_names[0]
        self.max_waiting_requests = max_waiting_requests
        self.state = state

    # ---- checks ---------------------------------------------------------------------------

    def check_model(self, model: str | None) -> None:
        if model is not None and model not in self.served_model_names:
            raise APIError(400, f"the model '{model}' does not exist; this server serves "
                                f"{', '.join(repr(m) for m in self.served_model_names)}",
                           param="model", code="model_not_found")

    def check_admission(self, num_requests: int = 1) -> None:
        """503 + Retry-After when draining or when the waiting queue would pass the limit."""
        if num_requests > self.max_waiting_requests:  # could never be admitted: the client's fault, not load
            raise APIError(400, f"the request asks for {num_requests} sequences (prompts x n); this server queues "
                                f"at most {self.max_waiting_requests}", param="n")
        if self.state.draining:
            raise APIError(503, "the server is shutting down", code="shutting_down", headers={"Retry-After": "5"})
        if not self.engine.is_running:
            raise APIError(503, "the engine is not running", code="engine_unavailable", headers={"Retry-After": "5"})
        if self.engine.num_waiting + num_requests > self.max_waiting_requests:
            raise APIError(503, f"the server is overloaded: more than {self.max_waiting_requests} requests are "
                                "waiting; retry later", code="overloaded", headers={"Retry-After": "1"})


class OpenAIServing(ServingBase):
    """Base of the generate handlers: the AsyncLLM, its tokenizer and context window."""

    engine: AsyncLLM

    def __init__(self, engine: AsyncLLM, served_model_names: list[str], max_waiting_requests: int,
                 state: ServerState, token_strings: TokenStrings | None = None,
                 loras: LoRAModels | None = None, default_max_tokens: int | None = None) -> None:
        super().__init__(engine, served_model_names, max_waiting_requests, state)
        if default_max_tokens is not None and default_max_tokens < 1:
            raise ValueError(f"default_max_tokens must be >= 1, got {default_max_tokens}")
        self.loras = loras
        self.default_max_tokens = default_max_tokens
        self.tokenizer = engine.tokenizer
        self.token_str = token_strings or TokenStrings(engine.tokenizer)
        # The KV pool may hold fewer tokens than max_model_len; the smaller is the real window.
        self.context_limit = engine.model_info().context_limit

    def check_fits(self, prompt: EnginePrompt, params: SamplingParams) -> None:
        """max_tokens must fit the context window beside the prompt (OpenAI and vLLM reject, not clamp; the
        engine validates the prompt itself when the request is added)."""
        num_prompt = len(prompt.token_ids)
        if params.max_tokens is not None and num_prompt < self.context_limit < num_prompt + params.max_tokens:
            raise InvalidRequest(
                f"this model's maximum context length is {self.context_limit} tokens; the request asks for "
                f"{len(prompt.token_ids) + params.max_tokens} ({len(prompt.token_ids)} in the prompt, "
                f"{params.max_tokens} to generate); lower max_tokens or shorten the prompt",
                param="max_tokens",
            )

    # ---- building -------------------------------------------------------------------------

    def sampling_params(self, req: SamplingFields, max_tokens: int | None, logprobs: int | None,
                        prompt_logprobs: int | None = None) -> SamplingParams:
        """Request fields -> SamplingParams; its validation raises InvalidRequest naming the field."""
        if req.stream_options is not None and not req.stream:
            raise InvalidRequest("stream_options is only allowed with stream=true", param="stream_options")
        logit_bias = None
        if req.logit_bias:
            try:
                logit_bias = {int(k): float(v) for k, v in req.logit_bias.items()}
            except ValueError as exc:
                raise InvalidRequest("logit_bias keys must be token ids (integers as strings)", "logit_bias") from exc
        try:
            return SamplingParams(
                n=req.n,
                temperature=1.0 if req.temperature is None else req.temperature,
                top_p=1.0 if req.top_p is None else req.top_p,
                top_k=0 if req.top_k is None else req.top_k,
                min_p=0.0 if req.min_p is None else req.min_p,
                presence_penalty=req.presence_penalty or 0.0,
                frequency_penalty=req.frequency_penalty or 0.0,
                repetition_penalty=1.0 if req.repetition_penalty is None else req.repetition_penalty,
                seed=req.seed,
                stop=req.stop,
                stop_token_ids=req.stop_token_ids,
                include_stop_str_in_output=req.include_stop_str_in_output,
                ignore_eos=req.ignore_eos,
                max_tokens=max_tokens,
                min_tokens=req.min_tokens,
                logprobs=logprobs,
                prompt_logprobs=prompt_logprobs,
                logit_bias=logit_bias,
                skip_special_tokens=req.skip_special_tokens,
            )
        except InvalidRequest:
            raise
        except (TypeError, ValueError) as exc:  # a config-level check deeper down
            raise InvalidRequest(str(exc)) from exc

    def tokenize_text(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.engine.tokenize(text, add_special_tokens=add_special_tokens)

    def chat_prompt(self, messages: list[ChatMessage], add_generation_prompt: bool = True,
                    continue_final_message: bool = False,
                    chat_template_kwargs: dict[str, Any] | None = None) -> EnginePrompt:
        """Render the chat template; the rendered text already holds its special tokens.

        chat_template_kwargs become template variables; its add_generation_prompt and continue_final_message
        override the top-level fields (vLLM's order); names the renderer itself takes are refused.
        """
        kwargs = dict(chat_template_kwargs or {})
        for name in _RENDERER_FLAGS:
            if name in kwargs:
                value = kwargs.pop(name)
                if not isinstance(value, bool):
                    raise InvalidRequest(f"chat_template_kwargs[{name!r}] must be true or false, got {value!r}",
                                         param="chat_template_kwargs")
                add_generation_prompt = value if name == "add_generation_prompt" else add_generation_prompt
                continue_final_message = value if name == "continue_final_message" else continue_final_message
        reserved = sorted(_RESERVED_TEMPLATE_KWARGS.intersection(kwargs))
        if reserved:
            raise InvalidRequest(f"chat_template_kwargs may not set {', '.join(map(repr, reserved))}: the server "
                                 "passes these to the chat template itself", param="chat_template_kwargs")
        if continue_final_message and add_generation_prompt:
            raise InvalidRequest("continue_final_message and add_generation_prompt cannot both be true",
                                 param="continue_final_message")
        conversation = [_message_dict(i, m) for i, m in enumerate(messages)]
        if continue_final_message:
            kwargs["continue_final_message"] = True
        text = self.engine.render_chat(conversation, add_generation_prompt=add_generation_prompt, **kwargs)
        return EnginePrompt(text, self.tokenize_text(text, add_special_tokens=False))

    def with_default_max_tokens(self, prompt: EnginePrompt, params: SamplingParams) -> SamplingParams:
        """The server's --default-max-tokens for a request that set no limit, where it fits the window.

        NOTE: where the default would pass the window the limit stays None (generate up to the window, which is
        the same output), so a default never fails a request that would run without it.
        """
        if params.max_tokens is not None or self.default_max_tokens is None:
            return params
        max_tokens = max(self.default_max_tokens, params.min_tokens)
        if len(prompt.token_ids) + max_tokens > self.context_limit:
            return params
        return replace(params, max_tokens=max_tokens)

    async def constrain(self, params: SamplingParams, structured_outputs: StructuredOutputsParams | None,
                        field: str | None) -> SamplingParams:
        """params with the request's output constraint, validated (400 naming `field`) and compiling."""
        if structured_outputs is None:
            return params
        await check_structured_outputs(self.engine, structured_outputs, field or "")
        return replace(params, structured_outputs=structured_outputs)

    # ---- running --------------------------------------------------------------------------

    def resolve_model(self, model: str | None) -> LoRARequest | None:
        """The LoRA adapter a request's `model` names, or None for the base model; 400 when unknown."""
        if self.loras is not None and model in self.loras.by_name:
            return self.loras.by_name[model]
        self.check_model(model)
        return None

    def add_request(self, request_id: str, prompt: EnginePrompt, params: SamplingParams,
                    priority: int, arrival_time: float, lora_request: LoRARequest | None = None) -> RequestStream:
        params = self.with_default_max_tokens(prompt, params)
        return self.engine.add_request(request_id, prompt.as_engine_prompt(), params, priority=priority,
                                       arrival_time=arrival_time, lora_request=lora_request)


# chat_template_kwargs keys that are the renderer's own boolean arguments: honoured.
_RENDERER_FLAGS = ("add_generation_prompt", "continue_final_message")
# Names the call chain down to jinja's render() takes itself (InputProcessor, transformers' or LiteTokenizer's
# apply_chat_template, render_chat, Template.render): as template variables they would collide (a TypeError).
_RESERVED_TEMPLATE_KWARGS = frozenset({
    "self", "messages", "conversation", "conversations", "template", "chat_template", "tokenize", "tools",
    "documents", "padding", "truncation", "max_length", "return_tensors", "return_dict",
    "return_assistant_tokens_mask", "tokenizer_kwargs",
})


def new_request_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex}"


def now_s() -> int:
    return int(time.time())


def _message_dict(index: int, message: ChatMessage) -> dict[str, Any]:
    """A message as the template expects it: content parts of type text are joined into one string."""
    data = message.model_dump(exclude_none=True)
    content = message.content
    if isinstance(content, list):
        texts = []
        for part in content:
            if not isinstance(part, dict) or part.get("type") != "text" or not isinstance(part.get("text"), str):
                kind = part.get("type") if isinstance(part, dict) else type(part).__name__
                raise InvalidRequest(f"messages[{index}].content: only text parts are supported, got {kind!r}",
                                     param="messages")
            texts.append(part["text"])
        data["content"] = "\n".join(texts)
    elif content is None:
        data["content"] = ""
    return data


async def merge_streams(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """Interleave several request streams as (stream index, output), in arrival order.

    Cancelling or closing the merged iterator cancels every producer, which aborts their requests.
    """
    if len(streams) == 1:  # the common case, without a task and a queue per request
        try:
            async for out in streams[0]:
                yield 0, out
        finally:
            streams[0].close()  # an early exit aborts the request now, not at garbage collection
        return
    queue: asyncio.Queue[tuple[int, RequestOutput] | tuple[int, BaseException] | None] = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        try:
            async for out in stream:
                queue.put_nowait((index, out))
        except Exception as exc:
            queue.put_nowait((index, exc))
        finally:
            queue.put_nowait(None)

    tasks = [asyncio.create_task(pump(i, s)) for i, s in enumerate(streams)]
    try:
        remaining = len(tasks)
        while remaining:
            item = await queue.get()
            if item is None:
                remaining -= 1
                continue
            if isinstance(item[1], BaseException):
                raise item[1]
            yield item  # type: ignore[misc]
    finally:
        for task in tasks:
            task.cancel()
        for stream in streams:
            stream.close()
