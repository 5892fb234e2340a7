"""HF folders: config.json and *.safetensors."""

from __future__ import annotations

from collections.abc import Iterator
from pathlib import Path

import torch

from pagellm.errors import InvalidRequest


def load_hf_config(folder: Path):
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
