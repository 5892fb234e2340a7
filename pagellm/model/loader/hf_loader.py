"""HF folders: config.json and *.safetensors."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import torch

from pagellm.errors import InvalidRequest
from pagellm.model.loader.decoder_config import DecoderConfig, is_plain_decoder


def load_config(folder: Path):
    """config.json as a DecoderConfig for Llama-family decoders (no transformers import), else via transformers."""
    try:
        data = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError) as exc:
        raise InvalidRequest(f"cannot read {folder}/config.json: {exc}", param="model") from exc
    if isinstance(data, dict) and is_plain_decoder(data):
        return DecoderConfig.from_dict(data)
    return load_hf_config(folder)


def load_hf_config(folder: Path):
    """transformers' config of any model type (encoders, fine-tuning)."""
    from transformers import AutoConfig

    try:
        return AutoConfig.from_pretrained(str(folder), local_files_only=True)
    except Exception as exc:
        raise InvalidRequest(f"cannot read {folder}/config.json: {exc}", param="model") from exc


def iter_safetensors(folder: Path) -> Iterator[tuple[str, torch.Tensor]]:
    from safetensors import safe_open

    files = sorted(folder.glob("*.safetensors"))
    if not files:
        raise InvalidRequest(f"{folder} has no *.safetensors weights", param="model")
    for file in files:
        with safe_open(str(file), framework="pt") as f:
            for name in f.keys():
                yield name, f.get_tensor(name)
