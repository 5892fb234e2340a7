"""InputProcessor: prompts and chat messages -> validated token ids."""

from __future__ import annotations

from typing import Any

from pagellm.errors import InvalidRequest
from pagellm.sampling_params import SamplingParams

PromptType = str | list[int] | dict[str, Any]


class InputProcessor:
    """Tokenizes, applies the chat template and checks lengths against the context window."""

    def __init__(self, tokenizer, max_model_len: int, vocab_size: int, max_tokens_in_pool: int) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.max_tokens_in_pool = max_tokens_in_pool

    def tokenize(self, text: str, add_special_tokens: bool = True) -> list[int]:
        return self.tokenizer.encode(text, add_special_tokens=add_special_tokens)

    def apply_chat_template(self, messages: list[dict[str, Any]], add_generation_prompt: bool = True,
                            chat_template: str | None = None, **kwargs: Any) -> str:
        if not isinstance(messages, list) or not messages:
            raise InvalidRequest("messages must be a non-empty list", param="messages")
        for i, m in enumerate(messages):
            if not isinstance(m, dict) or "role" not in m:
                raise InvalidRequest(f"messages[{i}] must be an object with a 'role'", param="messages")
        if chat_template is None and getattr(self.tokenizer, "chat_template", None) is None:
            raise InvalidRequest("this model has no chat template; use a plain completion", param="messages")
        try:
            return self.tokenizer.apply_chat_template(
                messages, tokenize=False, add_generation_prompt=add_generation_prompt,
                chat_template=chat_template, **kwargs,
            )
        except Exception as exc:  # jinja errors on malformed conversations
            raise InvalidRequest(f"chat template failed: {exc}", param="messages") from exc

    def process(self, prompt: PromptType, params: SamplingParams) -> tuple[str | None, list[int]]:
        """Return (prompt text or None, token ids), validated."""
        text: str | None
        if isinstance(prompt, str):
            text, ids = prompt, self.tokenize(prompt)
        elif isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                text, ids = prompt.get("prompt"), list(prompt["prompt_token_ids"])
            elif "prompt" in prompt:
                text, ids = prompt["prompt"], self.tokenize(prompt["prompt"])
            else:
                raise InvalidRequest("a prompt dict needs 'prompt' or 'prompt_token_ids'", param="prompt")
        elif isinstance(prompt, list | tuple):
            text, ids = None, list(prompt)
        else:
            raise InvalidRequest(f"unsupported prompt type {type(prompt).__name__}", param="prompt")
        self.check_token_ids(ids, params)
        return text, ids

    def check_token_ids(self, ids: list[int], params: SamplingParams) -> None:
        if not ids:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size for t in ids):
            raise InvalidRequest(f"prompt token ids must be integers in [0, {self.vocab_size})", param="prompt")
        limit = min(self.max_model_len, self.max_tokens_in_pool)
        if len(ids) >= limit:
            raise InvalidRequest(
                f"this model's maximum context length is {limit} tokens; the prompt has {len(ids)} tokens "
                "and at least one more is needed to generate",
                param="prompt",
            )
        if params.max_tokens is not None and params.min_tokens > limit - len(ids):
            raise InvalidRequest(f"min_tokens {params.min_tokens} does not fit in the context window", "min_tokens")
        bad = [t for t in params.logit_bias or {} if t >= self.vocab_size]
        if bad:
            raise InvalidRequest(f"logit_bias has token ids outside the vocabulary: {bad[:5]}", param="logit_bias")
