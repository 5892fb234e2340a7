"""Llama-family configs (config.json or GGUF metadata) as plain attributes, without importing transformers.

Each attribute a missing key leaves unset gets transformers' default for that model type, and RoPE
settings are folded into `rope_parameters` as transformers 5 does, so the model reads the same values
from a DecoderConfig as from transformers' LlamaConfig / Qwen2Config / MistralConfig.
"""

from __future__ import annotations

import copy
import json
from pathlib import Path
from typing import Any

# transformers' defaults per model type (the values a config.json may leave out)
_COMMON = dict(hidden_size=4096, num_hidden_layers=32, num_attention_heads=32, hidden_act="silu", rms_norm_eps=1e-6,
               tie_word_embeddings=False, pad_token_id=None, attention_dropout=0.0)
_DEFAULTS: dict[str, dict[str, Any]] = {
    "llama": dict(_COMMON, vocab_size=32000, intermediate_size=11008, num_key_value_heads=None, head_dim=None,
                  max_position_embeddings=2048, attention_bias=False, mlp_bias=False, bos_token_id=1,
                  eos_token_id=2),
    "qwen2": dict(_COMMON, vocab_size=151936, intermediate_size=22016, num_key_value_heads=32,
                  max_position_embeddings=32768, use_sliding_window=False, sliding_window=4096,
                  max_window_layers=28, bos_token_id=None, eos_token_id=None),
    "mistral": dict(_COMMON, vocab_size=32000, intermediate_size=14336, num_key_value_heads=8, head_dim=None,
                    max_position_embeddings=4096 * 32, sliding_window=4096, bos_token_id=1, eos_token_id=2),
}
DECODER_MODEL_TYPES = frozenset(_DEFAULTS)
DEFAULT_ROPE_THETA = 10000.0
# RoPE types whose parameters carry the pretraining context length
_LONG_CONTEXT_ROPE = ("llama3", "yarn", "longrope")


class DecoderConfig:
    """A decoder's hyperparameters as attributes (hidden_size, num_key_value_heads, rope_parameters, ...)."""

    def __init__(self, **values: Any) -> None:
        self.__dict__.update(values)

    @classmethod
    def from_dict(cls, data: dict[str, Any]) -> DecoderConfig:
        """config.json's dict (model_type llama, qwen2 or mistral) with transformers' defaults filled in."""
        model_type = data.get("model_type")
        if model_type not in _DEFAULTS:
            raise ValueError(f"model_type must be one of {sorted(_DEFAULTS)}; got {model_type!r}")
        values = {**_DEFAULTS[model_type], **copy.deepcopy(data)}
        if values["num_key_value_heads"] is None:
            values["num_key_value_heads"] = values["num_attention_heads"]
        if "head_dim" in values and values["head_dim"] is None:  # llama, mistral (qwen2 has none)
            values["head_dim"] = values["hidden_size"] // values["num_attention_heads"]
        if model_type == "qwen2" and not values["use_sliding_window"]:
            values["sliding_window"] = None
        values["rope_parameters"] = _rope_parameters(values)
        values.pop("rope_scaling", None)
        values.pop("rope_theta", None)
        return cls(**values)

    @classmethod
    def from_folder(cls, folder: str | Path) -> DecoderConfig:
        return cls.from_dict(json.loads((Path(folder) / "config.json").read_text(encoding="utf-8")))

    @property
    def rope_scaling(self) -> dict[str, Any]:
        """transformers 5's alias of rope_parameters."""
        return self.rope_parameters

    def to_dict(self) -> dict[str, Any]:
        return copy.deepcopy(self.__dict__)

    def save_pretrained(self, folder: str | Path) -> None:
        """Write config.json (loadable by transformers too)."""
        folder = Path(folder)
        folder.mkdir(parents=True, exist_ok=True)
        (folder / "config.json").write_text(json.dumps(self.to_dict(), indent=2, sort_keys=True) + "\n",
                                            encoding="utf-8")

    def __repr__(self) -> str:
        return f"DecoderConfig({json.dumps(self.to_dict(), sort_keys=True)})"


def is_plain_decoder(data: dict[str, Any]) -> bool:
    """True when DecoderConfig reads this config.json dict as transformers would."""
    rope = data.get("rope_scaling") or data.get("rope_parameters") or {}
    # NOTE: per-layer-type RoPE parameters (nested dicts) are left to transformers
    return data.get("model_type") in _DEFAULTS and not any(isinstance(v, dict) for v in rope.values())


def _rope_parameters(values: dict[str, Any]) -> dict[str, Any]:
    """rope_scaling (legacy) or rope_parameters, with rope_theta, rope_type and, for the long-context types,
    original_max_position_embeddings filled in (transformers' standardize_rope_params)."""
    params = dict(values.get("rope_scaling") or values.get("rope_parameters") or {})
    params.setdefault("rope_theta", values.get("rope_theta", DEFAULT_ROPE_THETA))
    if values.get("partial_rotary_factor") is not None:
        params.setdefault("partial_rotary_factor", values["partial_rotary_factor"])
    params.setdefault("rope_type", params.get("type", "default"))
    if params["rope_type"] in _LONG_CONTEXT_ROPE:
        if "original_max_position_embeddings" in values:  # a top-level value wins, as in transformers
            params["original_max_position_embeddings"] = values["original_max_position_embeddings"]
        else:
            params.setdefault("original_max_position_embeddings", values["max_position_embeddings"])
    return params
