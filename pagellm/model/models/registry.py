"""Architecture name -> model class."""

from __future__ import annotations

from pagellm.errors import InvalidRequest
from pagellm.model.models.llama import LlamaForCausalLM, MistralForCausalLM, Qwen2ForCausalLM

_DECODERS = {
    "LlamaForCausalLM": LlamaForCausalLM,
    "Qwen2ForCausalLM": Qwen2ForCausalLM,
    "MistralForCausalLM": MistralForCausalLM,
}


def get_model_class(architectures: list[str] | None):
    for arch in architectures or []:
        if arch in _DECODERS:
            return _DECODERS[arch]
    raise InvalidRequest(
        f"unsupported architecture {architectures}; supported: {sorted(_DECODERS)}", param="model"
    )
