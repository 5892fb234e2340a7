"""Token features for the Trainer: encoder classification, decoder label words, generative SFT.

Decoder classification trains the zero-shot scoring prompt of `pagellm.label_prompt` followed by the gold
label's tokens, with loss only on those tokens. Its dev set holds one row per (example, candidate label)
in that order, so the metric scores every label the way the engine's zero-shot classify does.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Any

from pagellm.adapt.data import ClassifyExample, GenerateExample
from pagellm.errors import InvalidRequest
from pagellm.label_prompt import encode_label_prompt, label_token_ids

IGNORE_INDEX = -100  # labels the loss skips (transformers' convention)
Feature = dict[str, Any]


@dataclass(frozen=True)
class LabelPrompter:
    """Builds label-word rows: prompt ids + label ids, fitting the text into `max_length`."""

    tokenizer: Any
    labels: list[str]
    instruction: str | None
    max_length: int

    @property
    def has_chat_template(self) -> bool:
        return bool(getattr(self.tokenizer, "chat_template", None))

    def prompt_ids(self, text: str, num_label_ids: int) -> list[int]:
        """The prompt's token ids; the text's tail is cut so that prompt + label fit max_length."""
        ids = self._encode_prompt(text)
        overflow = len(ids) + num_label_ids - self.max_length
        if overflow > 0:
            text_ids = self.tokenizer.encode(text, add_special_tokens=False)
            if overflow >= len(text_ids):
                raise InvalidRequest(f"max_length {self.max_length} is too small for the classification prompt "
                                     f"({len(ids) - len(text_ids)} tokens without the text)", param="max_length")
            ids = self._encode_prompt(self.tokenizer.decode(text_ids[: len(text_ids) - overflow]))
        return ids

    def _encode_prompt(self, text: str) -> list[int]:
        # NOTE: the engine's zero-shot scorer tokenizes with the same function, so train and eval rows match
        return encode_label_prompt(self.tokenizer, text, self.labels, self.instruction)

    def row(self, text: str, label: str) -> Feature:
        label_ids = label_token_ids(self.tokenizer, label, self.has_chat_template)
        prompt_ids = self.prompt_ids(text, len(label_ids))
        return {"input_ids": prompt_ids + label_ids, "attention_mask": [1] * (len(prompt_ids) + len(label_ids)),
                "labels": [IGNORE_INDEX] * len(prompt_ids) + label_ids}


def decoder_classify_train(prompter: LabelPrompter, examples: list[ClassifyExample]) -> list[Feature]:
    return [prompter.row(ex.text, ex.label) for ex in examples]


def decoder_classify_eval(prompter: LabelPrompter, examples: list[ClassifyExample]) -> list[Feature]:
    """len(labels) rows per example, candidates in label order (see label_scores)."""
    return [prompter.row(ex.text, label) for ex in examples for label in prompter.labels]


def encoder_classify(tokenizer: Any, examples: list[ClassifyExample], labels: list[str],
                     max_length: int) -> list[Feature]:
    label2id = {label: i for i, label in enumerate(labels)}
    out = []
    for ex in examples:
        feature = dict(tokenizer(ex.text, truncation=True, max_length=max_length))
        feature["labels"] = label2id[ex.label]
        out.append(feature)
    return out


def generate_sft(tokenizer: Any, examples: list[GenerateExample], max_length: int) -> list[Feature]:
    """Prompt (chat template with the generation prompt, or the plain user text) + completion + EOS;
    loss on the completion and EOS only. Rows longer than max_length lose the prompt's head."""
    has_template = bool(getattr(tokenizer, "chat_template", None))
    out = []
    for ex in examples:
        if has_template:
            prompt = tokenizer.apply_chat_template(ex.messages, tokenize=False, add_generation_prompt=True)
            target = ex.completion
        else:
            prompt = "\n\n".join(turn["content"] for turn in ex.messages)
            target = f" {ex.completion}"
        prompt_ids = tokenizer.encode(prompt, add_special_tokens=False)
        target_ids = tokenizer.encode(target, add_special_tokens=False)
        if tokenizer.eos_token_id is not None:
            target_ids.append(tokenizer.eos_token_id)
        target_ids = target_ids[:max_length]
        prompt_ids = prompt_ids[max(0, len(prompt_ids) + len(target_ids) - max_length):]
        out.append({"input_ids": prompt_ids + target_ids, "attention_mask": [1] * (len(prompt_ids) + len(target_ids)),
                    "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids})
    return out


def make_collator(tokenizer: Any, is_decoder: bool) -> Any:
    """Pads a batch: input ids with the pad token, decoder labels with IGNORE_INDEX."""
    from transformers import DataCollatorForSeq2Seq, DataCollatorWithPadding

    if is_decoder:
        return DataCollatorForSeq2Seq(tokenizer, padding=True, label_pad_token_id=IGNORE_INDEX)
    return DataCollatorWithPadding(tokenizer)
