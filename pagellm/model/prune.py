"""Layer pruning: a Llama-family checkpoint minus whole decoder layers, written as a loadable HF folder."""

from __future__ import annotations

import re
from dataclasses import dataclass
from pathlib import Path

import torch
from safetensors.torch import save_file

from pagellm.errors import InvalidRequest
from pagellm.model.loader.model_loader import checkpoint_weights
from pagellm.model_source import resolve_model
from pagellm.tokenizer import load_hf_tokenizer

_LAYER = re.compile(r"^(model\.layers\.)(\d+)(\..*)$")


@dataclass
class PruneResult:
    """What prune_layers wrote."""

    out_dir: Path
    kept_layers: list[int]  # original indices, in order
    num_params: int


def parse_layers(text: str, num_layers: int) -> list[int]:
    """`10,11` or `8-11` (or both, comma-separated) -> sorted distinct layer indices, checked."""
    layers: set[int] = set()
    for part in filter(None, (p.strip() for p in text.split(","))):
        lo, _, hi = part.partition("-")
        if not lo.isdigit() or (hi and not hi.isdigit()):
            raise InvalidRequest(f"--drop-layers takes indices like 10,11 or 8-11; got {part!r}", param="drop_layers")
        layers.update(range(int(lo), int(hi or lo) + 1))
    if not layers:
        raise InvalidRequest("--drop-layers names no layer", param="drop_layers")
    if max(layers) >= num_layers:
        raise InvalidRequest(f"layer {max(layers)} does not exist: the model has layers 0-{num_layers - 1}",
                             param="drop_layers")
    if len(layers) >= num_layers:
        raise InvalidRequest("cannot drop every layer", param="drop_layers")
    return sorted(layers)


def prune_layers(model: str | None, drop_layers: str, out: str, dtype: str = "bfloat16") -> PruneResult:
    """Write `out`: config.json (fewer layers), model.safetensors (renumbered layers) and the tokenizer."""
    source = resolve_model(model)
    config, weights = checkpoint_weights(source)
    num_layers = config.num_hidden_layers
    drop = set(parse_layers(drop_layers, num_layers))
    kept = [i for i in range(num_layers) if i not in drop]
    new_index = {old: new for new, old in enumerate(kept)}
    torch_dtype = {"bfloat16": torch.bfloat16, "float32": torch.float32, "float16": torch.float16}[dtype]
    tensors: dict[str, torch.Tensor] = {}
    for name, tensor in weights:
        m = _LAYER.match(name)
        if m is not None:
            layer = int(m.group(2))
            if layer in drop:
                continue
            name = f"{m.group(1)}{new_index[layer]}{m.group(3)}"
        tensors[name] = tensor.to(torch_dtype).contiguous()
    out_dir = Path(out)
    if out_dir.exists() and any(out_dir.iterdir()):
        raise InvalidRequest(f"--out {out!r} is not empty", param="out")
    out_dir.mkdir(parents=True, exist_ok=True)
    config.num_hidden_layers = len(kept)
    if getattr(config, "layer_types", None):
        config.layer_types = [config.layer_types[i] for i in kept]
    config.torch_dtype = dtype
    config.save_pretrained(str(out_dir))
    save_file(tensors, str(out_dir / "model.safetensors"))
    load_hf_tokenizer(source).save_pretrained(str(out_dir))
    return PruneResult(out_dir, kept, sum(t.numel() for t in tensors.values()))
