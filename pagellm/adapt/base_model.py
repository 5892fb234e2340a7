"""Base models to adapt: resolve `--model` to an encoder or a decoder, then load it for training.

The rule for `--model`: omitted or `smollm2` is the bundled SmolLM2-135M-Instruct GGUF (a decoder);
`minilm` is the bundled all-MiniLM-L6-v2 (a BERT encoder); anything else is a path. A .gguf file, or an
HF folder whose config lists a `*ForCausalLM` architecture, is a decoder; any other HF folder is an encoder.
"""

from __future__ import annotations

import json
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pagellm.errors import InvalidRequest
from pagellm.model_source import ModelSource, bundled_encoder_path, resolve_model

BUNDLED_DECODER_ALIAS = "smollm2"
BUNDLED_ENCODER_ALIAS = "minilm"
# the config fields `--dropout` sets where the architecture has them (BERT; Llama, Qwen2, Mistral)
DROPOUT_FIELDS = ("hidden_dropout_prob", "attention_probs_dropout_prob", "attention_dropout")


@dataclass(frozen=True)
class BaseModel:
    """The model to adapt: where its files are, encoder or decoder, and the name it was given by."""

    source: ModelSource
    kind: str  # "encoder" | "decoder"
    name: str  # as the user gave it (alias or path); recorded in pagellm_task.json

    @property
    def is_decoder(self) -> bool:
        return self.kind == "decoder"


@dataclass
class LoadedModel:
    """A freshly loaded model and the parameters its checkpoint lacked (a new head)."""

    model: Any  # a transformers PreTrainedModel
    new_param_names: set[str]


def read_config_json(folder: Path) -> dict[str, Any]:
    """An HF folder's config.json as a dict ({} when there is none)."""
    path = Path(folder) / "config.json"
    if not path.is_file():
        return {}
    try:
        return json.loads(path.read_text())
    except (OSError, json.JSONDecodeError) as exc:
        raise InvalidRequest(f"cannot read {path}: {exc}", param="model") from exc


def is_decoder_config(config: dict[str, Any]) -> bool:
    return any(str(arch).endswith("ForCausalLM") for arch in config.get("architectures") or [])


def resolve_base_model(model: str | None) -> BaseModel:
    """Map `--model` (None, an alias or a path) to a BaseModel; ModelNotFound when nothing is there."""
    if model is None or model.lower() == BUNDLED_DECODER_ALIAS:
        return BaseModel(resolve_model(None), "decoder", model or BUNDLED_DECODER_ALIAS)
    if model.lower() == BUNDLED_ENCODER_ALIAS:
        return BaseModel(ModelSource(bundled_encoder_path(), "hf", "all-MiniLM-L6-v2"), "encoder", model)
    source = resolve_model(model)
    if source.format == "gguf":
        return BaseModel(source, "decoder", str(source.path.resolve()))
    config = read_config_json(source.path)
    if config.get("is_encoder_decoder"):
        raise InvalidRequest(f"{source.path} is an encoder-decoder model; fine-tuning supports BERT-family "
                             "encoders and Llama-family decoders", param="model")
    kind = "decoder" if is_decoder_config(config) else "encoder"
    return BaseModel(source, kind, str(source.path.resolve()))


def _pretrained_location(source: ModelSource) -> tuple[str, dict[str, Any]]:
    """The folder and extra from_pretrained kwargs (the GGUF file name) of a source."""
    if source.format == "gguf":
        return str(source.folder), {"gguf_file": source.path.name}
    return str(source.path), {}


def load_config(base: BaseModel, labels: list[str] | None, dropout: float | None) -> Any:
    """The transformers config with the dropout fields set and, for an encoder classifier, the label maps."""
    from transformers import AutoConfig

    folder, kwargs = _pretrained_location(base.source)
    if labels is not None and not base.is_decoder:
        kwargs.update(num_labels=len(labels), id2label=dict(enumerate(labels)),
                      label2id={label: i for i, label in enumerate(labels)})
    config = AutoConfig.from_pretrained(folder, local_files_only=True, **kwargs)
    if labels is not None and not base.is_decoder:
        set_classifier_pooling(config, base)
    if dropout is not None:
        if not 0.0 <= dropout < 1.0:
            raise InvalidRequest(f"dropout must be in [0, 1); got {dropout}", param="dropout")
        for name in DROPOUT_FIELDS:
            if hasattr(config, name):
                setattr(config, name, dropout)
    return config


def set_classifier_pooling(config: Any, base: BaseModel) -> None:
    """Put the new head on the pooling the encoder was trained with (see pagellm.adapt.pooled_classifier).

    A folder that already holds a transformers classifier (a head trained on BERT's pooler) keeps that head's
    input; one that pagellm trained keeps its recorded pooling.
    """
    from pagellm.adapt.pooled_classifier import POOLED_MODEL_TYPES, POOLING_FIELD, encoder_pooling_type

    if getattr(config, "model_type", None) not in POOLED_MODEL_TYPES or getattr(config, POOLING_FIELD, None):
        return
    if any(str(arch).endswith("ForSequenceClassification") for arch in getattr(config, "architectures", None) or []):
        return
    setattr(config, POOLING_FIELD, encoder_pooling_type(base.source.path))


def load_training_tokenizer(base: BaseModel) -> Any:
    """The model's tokenizer (pagellm's, so GGUF tokenizers match the engine), set to pad on the right."""
    from pagellm.tokenizer import load_hf_tokenizer

    tokenizer = load_hf_tokenizer(base.source)
    if tokenizer.pad_token is None:
        tokenizer.pad_token = tokenizer.eos_token  # padding only; pads never get loss or attention
    tokenizer.padding_side = "right"  # NOTE: left padding would shift Llama's positions vs the engine
    return tokenizer


def load_model(base: BaseModel, config: Any, task: str) -> LoadedModel:
    """fp32 weights: a causal LM for decoders, a *ForSequenceClassification with a new head for encoders."""
    import torch
    from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

    folder, kwargs = _pretrained_location(base.source)
    if base.source.format == "gguf":
        from transformers import GgufConfig

        # NOTE: dense fp32 weights: a model left in GGUF blocks is "quantized" and the Trainer refuses it
        kwargs["quantization_config"] = GgufConfig(gguf_file=base.source.path.name, dequantize=True)
    if base.is_decoder:
        model = AutoModelForCausalLM.from_pretrained(folder, config=config, dtype=torch.float32,
                                                     local_files_only=True, **kwargs)
        new_names: set[str] = set()
    else:
        assert task == "classify", "encoders only classify; finetune checks this before loading"
        from pagellm.adapt.pooled_classifier import PooledBertForSequenceClassification, uses_pooled_head

        model_cls = PooledBertForSequenceClassification if uses_pooled_head(config) else \
            AutoModelForSequenceClassification
        # NOTE: a folder that already has a head for another label set gets a new head (ignore_mismatched_sizes)
        model, info = model_cls.from_pretrained(
            folder, config=config, dtype=torch.float32, local_files_only=True, output_loading_info=True,
            ignore_mismatched_sizes=True, **kwargs)
        new_names = set(info.get("missing_keys", ())) | {k if isinstance(k, str) else k[0]
                                                          for k in info.get("mismatched_keys", ())}
    return LoadedModel(model, new_names)
