"""Architecture name -> model class."""

from __future__ import annotations

from pagellm.errors import InvalidRequest
from pagellm.model.models.bert import BertForSequenceClassification, BertModel
from pagellm.model.models.llama import (
    LlamaEmbeddingModel,
    LlamaForCausalLM,
    LlamaForSequenceClassification,
    MistralForCausalLM,
    MistralForSequenceClassification,
    Qwen2EmbeddingModel,
    Qwen2ForCausalLM,
    Qwen2ForSequenceClassification,
)

_DECODERS = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
}

# Run by the pooling engine (LLM(task="embed" | "classify")), never by the decoder engine: encoders, and
# decoders without a KV cache (a causal forward over whole packed sequences, pooled at the last token).
_CLASSIFIERS = {
    "BertForSequenceClassification": BertForSequenceClassification,
    "LlamaForSequenceClassification": LlamaForSequenceClassification,
    "Qwen2ForSequenceClassification": Qwen2ForSequenceClassification,
    "MistralForSequenceClassification": MistralForSequenceClassification,
}
_EMBEDDING_MODELS = {
    "BertModel": BertModel,
    "LlamaForCausalLM": LlamaEmbeddingModel,
    "Qwen2ForCausalLM": Qwen2EmbeddingModel,
    "MistralForCausalLM": LlamaEmbeddingModel,
    **_CLASSIFIERS,  # a classifier's hidden states pool too
}


def get_model_class(architectures: list[str] | None):
    for arch in architectures or []:
        if arch in _DECODERS:
            return _DECODERS[arch]
    hint = " (encoders and classifiers run with LLM(task='embed') or task='classify')" if any(
        a in _EMBEDDING_MODELS for a in architectures or []) else ""
    raise InvalidRequest(
        f"unsupported architecture {architectures}; supported: {sorted(_DECODERS)}{hint}", param="model"
    )


def get_pooling_model_class(architectures: list[str] | None, task: str):
    """The pooling model class for task 'embed' or 'classify'; InvalidRequest names what is supported."""
    table = _CLASSIFIERS if task == "classify" else _EMBEDDING_MODELS
    for arch in architectures or []:
        if arch in table:
            return table[arch]
    raise InvalidRequest(
        f"architecture {architectures} cannot run task {task!r}; supported: {sorted(table)}", param="model"
    )
