"""Architecture name -> model class."""

from __future__ import annotations

from pagellm.errors import InvalidRequest
from pagellm.model.models.bert import BertForSequenceClassification, BertModel
from pagellm.model.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

_DECODERS = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
}

# Encoders run by the pooling engine (LLM(task="embed" | "classify")), never by the decoder engine.
_EMBEDDING_ENCODERS = {
    "BertModel": BertModel,
    "BertForSequenceClassification": BertForSequenceClassification,  # its encoder hidden states pool too
}
_CLASSIFIERS = {
    "BertForSequenceClassification": BertForSequenceClassification,
}


def get_model_class(architectures: list[str] | None):
    for arch in architectures or []:
        if arch in _DECODERS:
            return _DECODERS[arch]
    hint = " (encoders run with LLM(task='embed') or task='classify')" if any(
        a in _EMBEDDING_ENCODERS for a in architectures or []) else ""
    raise InvalidRequest(
        f"unsupported architecture {architectures}; supported: {sorted(_DECODERS)}{hint}", param="model"
    )


def get_pooling_model_class(architectures: list[str] | None, task: str):
    """The encoder class for task 'embed' or 'classify'; InvalidRequest names what is supported."""
    table = _CLASSIFIERS if task == "classify" else _EMBEDDING_ENCODERS
    for arch in architectures or []:
        if arch in table:
            return table[arch]
    if task == "embed" and any(a in _DECODERS for a in architectures or []):
        # NOTE: the API is ready for it (pooling_type="last"); the decoder forward needs a KV-cache-free path first.
        raise InvalidRequest(f"embedding with a decoder ({architectures}) is not supported yet; "
                             f"supported: {sorted(table)}", param="model")
    raise InvalidRequest(
        f"architecture {architectures} cannot run task {task!r}; supported: {sorted(table)}", param="model"
    )
