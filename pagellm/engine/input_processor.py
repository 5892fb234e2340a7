"""InputProcessor: prompts and chat messages -> validated token ids, for generation and for pooling."""

from __future__ import annotations

from typing import Any

from pagellm.errors import InvalidRequest
from pagellm.sampling_params import SamplingParams

PromptType = str | list[int] | dict[str, Any]


class InputProcessor:
    """Tokenizes, applies the chat template and checks lengths against the one context limit.

    `context_limit` is the most tokens one sequence may hold: max_model_len, or less when the KV pool is
    smaller. A generate prompt must leave room for one more token; a pooling prompt may fill it.
    """

    def __init__(self, tokenizer, max_model_len: int, vocab_size: int, max_tokens_in_pool: int | None = None,
                 pooling: bool = False) -> None:
        self.tokenizer = tokenizer
        self.max_model_len = max_model_len
        self.vocab_size = vocab_size
        self.pooling = pooling
        self.context_limit = min(max_model_len, max_tokens_in_pool or max_model_len)

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

    @staticmethod
    def split_prompt(prompt: PromptType) -> tuple[str | None, list[int] | None]:
        """(text or None, token ids or None: to tokenize from the text) of any accepted prompt form."""
        if isinstance(prompt, str):
            return prompt, None
        if isinstance(prompt, dict):
            if "prompt_token_ids" in prompt:
                return prompt.get("prompt"), list(prompt["prompt_token_ids"])
            if "prompt" in prompt:
                return prompt["prompt"], None
            raise InvalidRequest("a prompt dict needs 'prompt' or 'prompt_token_ids'", param="prompt")
        if isinstance(prompt, list | tuple):
            return None, list(prompt)
        raise InvalidRequest(f"unsupported prompt type {type(prompt).__name__}", param="prompt")

    # ---- generation ---------------------------------------------------------------------------
    def process(self, prompt: PromptType, params: SamplingParams) -> tuple[str | None, list[int]]:
        """Return (prompt text or None, token ids), validated for generation."""
        text, ids = self.split_prompt(prompt)
        if ids is None:
            ids = self.tokenize(text)
        self.check_token_ids(ids, params)
        return text, ids

    def check_token_ids(self, ids: list[int], params: SamplingParams) -> None:
        self._check_vocabulary(ids)
        limit = self.context_limit
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

    def _check_vocabulary(self, ids: list[int]) -> None:
        if not ids:
            raise InvalidRequest("the prompt is empty", param="prompt")
        if any(not isinstance(t, int) or isinstance(t, bool) or not 0 <= t < self.vocab_size for t in ids):
            raise InvalidRequest(f"prompt token ids must be integers in [0, {self.vocab_size})", param="prompt")

    # ---- pooling ------------------------------------------------------------------------------
    def process_pooling(self, prompt: PromptType, truncate_prompt_tokens: int | None = None
                        ) -> tuple[str | None, list[int]]:
        """Return (text or None, token ids) of a prompt to embed or classify, truncated if asked, validated."""
        return self.process_pooling_batch([prompt], truncate_prompt_tokens)[0]

    def process_pooling_batch(self, prompts: list[PromptType], truncate_prompt_tokens: int | None = None
                              ) -> list[tuple[str | None, list[int]]]:
        """`process_pooling` of each prompt, the texts tokenized in one tokenizer call (a fast tokenizer
        encodes a batch in Rust: one Python round trip instead of one per text)."""
        keep = self._truncation_length(truncate_prompt_tokens)
        split = [self.split_prompt(p) for p in prompts]
        texts = [text for text, ids in split if ids is None]
        for text in texts:
            if not isinstance(text, str) or not text.strip():
                raise InvalidRequest("the prompt is empty", param="prompt")
        kwargs = {} if keep is None else {"truncation": True, "max_length": keep}
        encoded = iter(self.tokenizer(texts, add_special_tokens=True, **kwargs)["input_ids"] if texts else [])
        out = []
        for text, ids in split:
            if ids is None:
                ids = list(next(encoded))
            elif keep is not None and len(ids) > keep:
                ids = ids[-keep:] if self.tokenizer.truncation_side == "left" else ids[:keep]
            self._check_vocabulary(ids)
            if len(ids) > self.context_limit:
                raise InvalidRequest(
                    f"this model's maximum input length is {self.context_limit} tokens; the prompt has {len(ids)} "
                    "tokens (pass truncate_prompt_tokens to truncate it)", param="prompt",
                )
            out.append((text, ids))
        return out

    def _truncation_length(self, truncate_prompt_tokens: int | None) -> int | None:
        if truncate_prompt_tokens is None:
            return None
        if truncate_prompt_tokens == -1:
            return self.context_limit
        if not isinstance(truncate_prompt_tokens, int) or not 2 <= truncate_prompt_tokens <= self.context_limit:
            raise InvalidRequest(f"truncate_prompt_tokens must be -1 or in [2, {self.context_limit}]; "
                                 f"got {truncate_prompt_tokens!r}", param="truncate_prompt_tokens")
        return truncate_prompt_tokens
