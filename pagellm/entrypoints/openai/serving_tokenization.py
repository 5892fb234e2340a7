"""POST /tokenize, POST /detokenize, GET /tokenizer_info (vLLM's shapes).

lm-evaluation-harness's "remote" tokenizer backend uses exactly these three routes, so an eval
client needs no local copy of the model's tokenizer.
"""

from __future__ import annotations

from typing import Any

from pagellm.entrypoints.openai.protocol import (
    DetokenizeRequest,
    DetokenizeResponse,
    TokenizeRequest,
    TokenizeResponse,
)
from pagellm.entrypoints.openai.serving_engine import OpenAIServing
from pagellm.errors import InvalidRequest


class OpenAIServingTokenization(OpenAIServing):
    """Exposes the served model's tokenizer and chat template."""

    def tokenize(self, req: TokenizeRequest) -> TokenizeResponse:
        self.check_model(req.model)
        if (req.prompt is None) == (req.messages is None):
            raise InvalidRequest("give exactly one of 'prompt' or 'messages'", param="prompt")
        if req.messages is not None:
            if not req.messages:
                raise InvalidRequest("messages must be a non-empty list", param="messages")
            prompt = self.chat_prompt(req.messages, req.add_generation_prompt, req.continue_final_message,
                                      req.chat_template_kwargs)
            token_ids = prompt.token_ids
            if req.add_special_tokens:
                token_ids = self.tokenize_text(prompt.text or "", add_special_tokens=True)
        else:
            add_special = True if req.add_special_tokens is None else req.add_special_tokens
            token_ids = self.tokenize_text(req.prompt or "", add_special_tokens=add_special)
        token_strs = None
        if req.return_token_strs:
            token_strs = self.tokenizer.convert_ids_to_tokens(token_ids)
        return TokenizeResponse(count=len(token_ids), max_model_len=self.context_limit, tokens=token_ids,
                                token_strs=token_strs)

    def detokenize(self, req: DetokenizeRequest) -> DetokenizeResponse:
        self.check_model(req.model)
        vocab_size = self.engine.model_info().vocab_size
        bad = [t for t in req.tokens if not 0 <= t < vocab_size]
        if bad:
            raise InvalidRequest(f"token ids must be in [0, {vocab_size}), got {bad[:5]}", param="tokens")
        return DetokenizeResponse(prompt=self.tokenizer.decode(req.tokens))

    def tokenizer_info(self) -> dict[str, Any]:
        """The tokenizer's class, special tokens and chat template, as vLLM's /tokenizer_info returns them."""
        tok = self.tokenizer
        # NOTE: a LiteTokenizer names the class transformers would load (tokenizer_config.json's)
        info: dict[str, Any] = {"tokenizer_class": getattr(tok, "tokenizer_class", None) or type(tok).__name__}
        for name in ("bos_token", "eos_token", "pad_token", "unk_token"):
            value = getattr(tok, name, None)
            info[name] = None if value is None else str(value)
        info["chat_template"] = getattr(tok, "chat_template", None)
        info["model_max_length"] = self.context_limit
        info["vocab_size"] = len(tok)
        info["add_bos_token"] = bool(getattr(tok, "add_bos_token", False))
        return info
