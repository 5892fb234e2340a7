"""Label-scoring prompts shared by zero-shot classification and label-word fine-tuning.

A decoder LLM classifies a text by the log-likelihood of each label's tokens after one fixed
prompt. Fine-tuning a decoder for classification trains exactly these (prompt, label) pairs,
so before/after numbers score the same thing.
"""

from __future__ import annotations

from collections.abc import Sequence

from pagellm.errors import InvalidRequest

DEFAULT_INSTRUCTION = "Classify the text. Answer with exactly one of: {labels}."


def check_labels(labels: Sequence[str]) -> list[str]:
    labels = list(labels)
    if len(labels) < 2:
        raise InvalidRequest("labels must list at least two class names", param="labels")
    if any(not isinstance(x, str) or not x.strip() for x in labels):
        raise InvalidRequest("labels must be non-empty strings", param="labels")
    if len(set(labels)) != len(labels):
        raise InvalidRequest("labels must be distinct", param="labels")
    return labels


def build_label_prompt(tokenizer, text: str, labels: Sequence[str], instruction: str | None = None) -> str:
    """The prompt text that precedes a label; uses the chat template when the tokenizer has one."""
    instruction = (instruction or DEFAULT_INSTRUCTION).format(labels=", ".join(labels))
    user = f"{instruction}\n\nText: {text}"
    if getattr(tokenizer, "chat_template", None):
        return tokenizer.apply_chat_template([{"role": "user", "content": user}], tokenize=False,
                                             add_generation_prompt=True)
    return f"{user}\nAnswer:"


def label_token_ids(tokenizer, label: str, has_chat_template: bool) -> list[int]:
    """Token ids scored for one label: the label, then end-of-turn (EOS) so that no label is a
    mere prefix of another (e.g. "neg" vs "negative")."""
    ids = tokenizer.encode(label if has_chat_template else f" {label}", add_special_tokens=False)
    if tokenizer.eos_token_id is not None:
        ids = ids + [tokenizer.eos_token_id]
    return ids


def encode_label_prompt(tokenizer, text: str, labels: Sequence[str], instruction: str | None = None) -> list[int]:
    """Token ids of build_label_prompt: a chat-template prompt already holds its special tokens (no second
    BOS); a plain prompt gets the tokenizer's usual ones."""
    has_chat_template = bool(getattr(tokenizer, "chat_template", None))
    prompt = build_label_prompt(tokenizer, text, labels, instruction)
    return tokenizer.encode(prompt, add_special_tokens=not has_chat_template)
