"""PEFT adapter folders -> per-layer LoRA weights keyed by pagellm's module names."""

from __future__ import annotations

import json
import math
import re
from dataclasses import dataclass, field
from pathlib import Path

import torch
from safetensors.torch import load_file

from pagellm.errors import InvalidRequest, ModelNotFound

# PEFT target module -> (pagellm fused module, slice index within it)
LORA_TARGETS: dict[str, tuple[str, int]] = {
    "q_proj": ("self_attn.qkv_proj", 0),
    "k_proj": ("self_attn.qkv_proj", 1),
    "v_proj": ("self_attn.qkv_proj", 2),
    "o_proj": ("self_attn.o_proj", 0),
    "gate_proj": ("mlp.gate_up_proj", 0),
    "up_proj": ("mlp.gate_up_proj", 1),
    "down_proj": ("mlp.down_proj", 0),
}
_KEY = re.compile(r"layers\.(\d+)\.(?:self_attn|mlp)\.(\w+)\.lora_([ABE])(?:\.weight)?$")


@dataclass
class LoRAWeights:
    """One adapted projection: delta(x) = scaling * (x @ a.T) @ b.T."""

    a: torch.Tensor  # [rank, in_features]
    b: torch.Tensor  # [out_features, rank]
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]


@dataclass
class LoRAAdapter:
    """A loaded PEFT LoRA/AdaLoRA adapter: weights by (layer index, PEFT module name)."""

    path: str
    weights: dict[tuple[int, str], LoRAWeights] = field(default_factory=dict)
    task: dict | None = None  # pagellm_task.json, e.g. the label set of a classification adapter


@dataclass
class PrefixAdapter:
    """A PEFT prefix-tuning adapter: learned keys/values of `num_virtual_tokens` positions per layer.

    NOTE: the keys are used as stored (no RoPE), exactly as PEFT hands them to the model as a
    past-key-value cache; the real tokens then sit at positions num_virtual_tokens, ...
    """

    path: str
    num_virtual_tokens: int
    keys: torch.Tensor  # [num_layers, num_virtual_tokens, num_kv_heads, head_dim]
    values: torch.Tensor  # [num_layers, num_virtual_tokens, num_kv_heads, head_dim]
    task: dict | None = None


def read_adapter_config(path: str) -> dict:
    """adapter_config.json of a PEFT folder; ModelNotFound when there is none."""
    folder = Path(path)
    if not folder.is_dir():
        raise ModelNotFound(f"adapter folder {path!r} does not exist")
    cfg_path = folder / "adapter_config.json"
    if not cfg_path.is_file():
        raise ModelNotFound(f"no adapter_config.json in {str(folder)!r}: not a PEFT adapter folder")
    return json.loads(cfg_path.read_text())


def _read_task(folder: Path) -> dict | None:
    task_file = folder / "pagellm_task.json"
    return json.loads(task_file.read_text()) if task_file.is_file() else None


def load_prefix_adapter(path: str, num_layers: int, num_kv_heads: int, head_dim: int,
                        dtype: torch.dtype) -> PrefixAdapter:
    """Read a PEFT PREFIX_TUNING adapter for a Llama-family model."""
    folder = Path(path)
    cfg = read_adapter_config(path)
    weights_file = folder / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise ModelNotFound(f"no adapter_model.safetensors in {path!r}")
    tensors = load_file(str(weights_file))
    if "prompt_embeddings" not in tensors:
        raise InvalidRequest(f"adapter {folder.name!r}: no prompt_embeddings tensor", param="lora_path")
    emb = tensors["prompt_embeddings"].float()  # [num_virtual_tokens, num_layers * 2 * kv_heads * head_dim]
    n = int(cfg.get("num_virtual_tokens", emb.shape[0]))
    if emb.shape != (n, num_layers * 2 * num_kv_heads * head_dim):
        raise InvalidRequest(f"adapter {folder.name!r}: prompt_embeddings {tuple(emb.shape)} do not match this "
                             f"model ({n}, {num_layers * 2 * num_kv_heads * head_dim})", param="lora_path")
    # PEFT's layout: [tokens, layers * 2 (key, value), kv_heads, head_dim]
    kv = emb.view(n, num_layers, 2, num_kv_heads, head_dim).permute(2, 1, 0, 3, 4).to(dtype).contiguous()
    return PrefixAdapter(str(folder), n, kv[0], kv[1], _read_task(folder))


def _read_config(folder: Path) -> dict:
    cfg = read_adapter_config(str(folder))
    peft_type = cfg.get("peft_type")
    if peft_type not in ("LORA", "ADALORA"):
        raise InvalidRequest(f"adapter {folder.name!r} is {peft_type}; only LORA, ADALORA and PREFIX_TUNING "
                             "adapters can be served", param="lora_path")
    for flag in ("use_dora", "fan_in_fan_out"):
        if cfg.get(flag):
            raise InvalidRequest(f"adapter {folder.name!r} uses {flag}, which pagellm does not serve",
                                 param="lora_path")
    if cfg.get("bias", "none") != "none" or cfg.get("modules_to_save"):
        raise InvalidRequest(f"adapter {folder.name!r} trains biases or full modules (modules_to_save); "
                             "pagellm serves LoRA matrices only", param="lora_path")
    return cfg


def _scaling(cfg: dict, module: str, rank: int) -> float:
    alpha = cfg.get("alpha_pattern", {}).get(module, cfg.get("lora_alpha", rank))
    if cfg["peft_type"] == "ADALORA":
        # NOTE: AdaLoRA scales by alpha / (ranknum + 1e-5) with ranknum = its initial rank
        return (alpha if alpha > 0 else rank) / (cfg.get("init_r", cfg.get("r", rank)) + 1e-5)
    return alpha / math.sqrt(rank) if cfg.get("use_rslora") else alpha / rank


def load_lora_adapter(path: str, num_layers: int, max_rank: int, dtype: torch.dtype) -> LoRAAdapter:
    """Read and check a PEFT adapter for a Llama-family model with `num_layers` layers."""
    folder = Path(path)
    cfg = _read_config(folder)
    weights_file = folder / "adapter_model.safetensors"
    if not weights_file.is_file():
        raise ModelNotFound(f"no adapter_model.safetensors in {path!r}")
    parts: dict[tuple[int, str], dict[str, torch.Tensor]] = {}
    for key, tensor in load_file(str(weights_file)).items():
        m = _KEY.search(key)
        if m is None:
            raise InvalidRequest(f"adapter {folder.name!r}: unsupported tensor {key!r} (pagellm serves LoRA on "
                                 f"{', '.join(LORA_TARGETS)})", param="lora_path")
        layer, module, kind = int(m.group(1)), m.group(2), m.group(3)
        if module not in LORA_TARGETS or layer >= num_layers:
            raise InvalidRequest(f"adapter {folder.name!r}: {key!r} does not match this model", param="lora_path")
        parts.setdefault((layer, module), {})[kind] = tensor
    adapter = LoRAAdapter(path=str(folder))
    for (layer, module), t in parts.items():
        if "A" not in t or "B" not in t:
            raise InvalidRequest(f"adapter {folder.name!r}: layer {layer} {module} lacks lora_A or lora_B",
                                 param="lora_path")
        a = t["A"].float() * t["E"].float() if "E" in t else t["A"].float()  # AdaLoRA: A * E
        rank = a.shape[0]
        if rank > max_rank:
            raise InvalidRequest(f"adapter {folder.name!r} has rank {rank} > max_lora_rank {max_rank}",
                                 param="lora_path")
        if rank == 0:
            continue
        adapter.weights[(layer, module)] = LoRAWeights(a.to(dtype), t["B"].to(dtype), _scaling(cfg, module, rank))
    if not adapter.weights:
        raise InvalidRequest(f"adapter {folder.name!r} holds no LoRA weights", param="lora_path")
    adapter.task = _read_task(folder)
    return adapter
