"""An encoder classifier whose head sits on the pooling the encoder was trained with, not on BERT's pooler.

A sentence-transformers encoder (all-MiniLM-L6-v2) was trained on the mean of its token states; its BERT
pooler (dense + tanh on [CLS]) never trained and is noise. So every encoder strategy puts the new linear
head on the engine's pooling of that folder (`classifier_pooling`: mean, cls or last, from modules.json /
1_Pooling, else the engine's encoder default), and `pagellm.model.models.bert` computes the same at serving.

The folder stays a `BertForSequenceClassification` (config.json + safetensors) with one extra config field,
`classifier_pooling`; transformers' own class ignores that field (it would use the pooler), so load such a
folder with `PooledBertForSequenceClassification.from_pretrained` outside pagellm.
"""

from __future__ import annotations

from pathlib import Path
from typing import Any

import torch
from torch import nn
from transformers import BertForSequenceClassification
from transformers.modeling_outputs import SequenceClassifierOutput

POOLING_FIELD = "classifier_pooling"  # config.json: the head's input pooling (absent: BERT's pooler)
POOLED_MODEL_TYPES = ("bert",)  # the encoder families pagellm's engine serves with classifier_pooling


def encoder_pooling_type(folder: Path) -> str:
    """The pooling pagellm's engine uses for this encoder's embeddings: the sentence-transformers Pooling
    module's mode when the folder has one, else the engine's encoder default (cls)."""
    from pagellm.model.pooling import read_sentence_transformers_pooler
    from pagellm.pooling_params import ENCODER_DEFAULT_POOLER

    declared = read_sentence_transformers_pooler(Path(folder))
    pooling_type = declared.pooling_type if declared is not None else ENCODER_DEFAULT_POOLER.pooling_type
    assert pooling_type is not None, "the engine's encoder default names a pooling type"
    return pooling_type


def pool_padded(hidden: torch.Tensor, attention_mask: torch.Tensor, pooling_type: str) -> torch.Tensor:
    """hidden: [batch, seq, hidden] (right padded), mask [batch, seq] -> [batch, hidden].

    The padded twin of `pagellm.model.pooling.pool`: mean over every unpadded token (special tokens
    included), or the first / last unpadded token.
    """
    mask = attention_mask.to(hidden.dtype).unsqueeze(-1)  # [batch, seq, 1]
    if pooling_type == "mean":
        return (hidden * mask).sum(1) / mask.sum(1).clamp(min=1.0)
    if pooling_type == "cls":
        return hidden[:, 0]
    if pooling_type == "last":
        last = attention_mask.sum(1).long() - 1  # [batch]
        return hidden[torch.arange(hidden.shape[0], device=hidden.device), last]
    raise AssertionError(f"unknown pooling type {pooling_type!r}")


class PooledBertForSequenceClassification(BertForSequenceClassification):
    """transformers' BertForSequenceClassification with the head on `config.classifier_pooling`."""

    def __init__(self, config: Any) -> None:
        super().__init__(config)
        self.bert.pooler = None  # NOTE: unused here, so it neither trains nor counts nor is saved

    def forward(self, input_ids: torch.Tensor | None = None, attention_mask: torch.Tensor | None = None,
                token_type_ids: torch.Tensor | None = None, labels: torch.Tensor | None = None,
                **kwargs: Any) -> SequenceClassifierOutput:
        pooling_type = getattr(self.config, POOLING_FIELD, None)
        assert pooling_type, f"{POOLING_FIELD} is not set in the config"
        if attention_mask is None:
            attention_mask = torch.ones_like(input_ids)
        kwargs.pop("return_dict", None)
        hidden = self.bert(input_ids=input_ids, attention_mask=attention_mask, token_type_ids=token_type_ids,
                           return_dict=True, **kwargs).last_hidden_state  # [batch, seq, hidden]
        logits = self.classifier(self.dropout(pool_padded(hidden, attention_mask, pooling_type)))
        loss = None
        if labels is not None:
            loss = nn.functional.cross_entropy(logits.view(-1, self.num_labels), labels.view(-1))
        return SequenceClassifierOutput(loss=loss, logits=logits)


def uses_pooled_head(config: Any) -> bool:
    return getattr(config, "model_type", None) in POOLED_MODEL_TYPES and bool(getattr(config, POOLING_FIELD, None))


def fix_saved_architecture(folder: Path) -> None:
    """save_pretrained records the Python class name; the engine's registry knows BertForSequenceClassification."""
    import json

    path = Path(folder) / "config.json"
    if not path.is_file():
        return  # a PEFT adapter folder: adapter_config.json only
    config = json.loads(path.read_text())
    if config.get("architectures") == [PooledBertForSequenceClassification.__name__]:
        config["architectures"] = ["BertForSequenceClassification"]
        path.write_text(json.dumps(config, indent=2, sort_keys=True) + "\n")


def load_classifier(folder: str | Path, **kwargs: Any) -> Any:
    """A saved encoder classifier in transformers, computing what pagellm's engine computes: the pooled class
    when config.json has `classifier_pooling`, else transformers' own (BERT pooler) class."""
    from transformers import AutoConfig, AutoModelForSequenceClassification

    pooling_type = kwargs.pop(POOLING_FIELD, None)  # NOTE: from_pretrained drops kwargs the config class lacks
    config = AutoConfig.from_pretrained(str(folder), local_files_only=True, **kwargs)
    if pooling_type is not None:
        setattr(config, POOLING_FIELD, pooling_type)
    model_cls = PooledBertForSequenceClassification if uses_pooled_head(config) else AutoModelForSequenceClassification
    return model_cls.from_pretrained(str(folder), config=config, local_files_only=True)
