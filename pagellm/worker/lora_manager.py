"""LoRAManager: registered adapters, which of them sit in compute slots, and each step's LoRA mask.

Prefix-tuning adapters live here too: they need no slot, only their learned keys/values written
over the KV of a request's virtual leading positions (see VirtualKV).
"""

from __future__ import annotations

from collections import OrderedDict
from dataclasses import dataclass

import torch

from pagellm.config import LoRAConfig
from pagellm.core.sched_output import ScheduledRequest
from pagellm.errors import InvalidRequest
from pagellm.model.layers.attention import AttentionMetadata
from pagellm.model.layers.lora import LoRALinear, LoRAMapping
from pagellm.model.loader.peft_loader import LORA_TARGETS, LoRAAdapter, PrefixAdapter


def _slice_sizes(model: torch.nn.Module, fused_name: str) -> list[int]:
    attn = model.layers[0].self_attn
    inter = model.layers[0].mlp.intermediate_size
    return {
        "self_attn.qkv_proj": [attn.q_size, attn.kv_size, attn.kv_size],
        "self_attn.o_proj": [model.config.hidden_size],
        "mlp.gate_up_proj": [inter, inter],
        "mlp.down_proj": [model.config.hidden_size],
    }[fused_name]


@dataclass
class VirtualKV:
    """This step's rows that are prefix-tuning positions, and the keys/values that replace theirs."""

    rows: torch.Tensor  # [num_rows] indices into the flat token batch
    keys: torch.Tensor  # [num_layers, num_rows, num_kv_heads, head_dim]
    values: torch.Tensor


class LoRAManager:
    """Owns the model's LoRALinear wrappers and max_loras slots, filled on demand and evicted LRU.

    Invariant: a step never uses more distinct adapters than slots (the scheduler admits at most
    max_loras adapters among running requests), so the adapters of one step are never evicted by it.
    """

    def __init__(self, model: torch.nn.Module, config: LoRAConfig, dtype: torch.dtype) -> None:
        self.config = config
        self.mapping = LoRAMapping(config.max_loras, config.max_lora_rank, dtype)
        self.modules: list[dict[str, LoRALinear]] = []
        for layer in model.layers:
            wrapped = {}
            for fused_name in dict.fromkeys(name for name, _ in LORA_TARGETS.values()):
                parent_name, attr = fused_name.split(".")
                parent = getattr(layer, parent_name)
                base = getattr(parent, attr)
                lora = LoRALinear(base, _slice_sizes(model, fused_name), self.mapping)
                setattr(parent, attr, lora)
                wrapped[fused_name] = lora
            self.modules.append(wrapped)
        self.adapters: dict[int, LoRAAdapter] = {}
        self.prefixes: dict[int, PrefixAdapter] = {}
        self.slots: OrderedDict[int, int] = OrderedDict()  # lora_id -> slot, least recently used first

    def add_adapter(self, lora_id: int, adapter: LoRAAdapter) -> None:
        self.remove_adapter(lora_id)
        for (layer, module), w in adapter.weights.items():
            lora = self.modules[layer][LORA_TARGETS[module][0]]
            size = lora.slice_sizes[LORA_TARGETS[module][1]]
            if w.a.shape[1] != lora.base.in_features or w.b.shape[0] != size:
                raise InvalidRequest(f"adapter {adapter.path!r}: {module} of layer {layer} has shape "
                                     f"{tuple(w.b.shape[:1]) + tuple(w.a.shape[1:])}, the model needs "
                                     f"({size}, {lora.base.in_features})", param="lora_path")
        self.adapters[lora_id] = adapter

    def add_prefix(self, lora_id: int, adapter: PrefixAdapter) -> None:
        self.remove_adapter(lora_id)
        self.prefixes[lora_id] = adapter

    def num_virtual_tokens(self, lora_id: int) -> int:
        prefix = self.prefixes.get(lora_id)
        return prefix.num_virtual_tokens if prefix is not None else 0

    def task_of(self, lora_id: int) -> dict | None:
        adapter = self.adapters.get(lora_id) or self.prefixes.get(lora_id)
        return adapter.task if adapter is not None else None

    def remove_adapter(self, lora_id: int) -> bool:
        self.slots.pop(lora_id, None)  # the slot's stale weights are overwritten on reuse
        removed_prefix = self.prefixes.pop(lora_id, None) is not None
        return self.adapters.pop(lora_id, None) is not None or removed_prefix

    def _activate(self, lora_id: int, in_use: set[int]) -> int:
        if lora_id in self.slots:
            self.slots.move_to_end(lora_id)
            return self.slots[lora_id]
        if len(self.slots) < self.config.max_loras:
            slot = min(set(range(self.config.max_loras)) - set(self.slots.values()))
        else:
            victim = next(i for i in self.slots if i not in in_use)
            slot = self.slots.pop(victim)
        adapter = self.adapters[lora_id]
        for layer_modules in self.modules:
            for lora in layer_modules.values():
                for s in range(len(lora.slice_sizes)):
                    lora.set_slot(slot, s, None)
        for (layer, module), w in adapter.weights.items():
            fused_name, slice_index = LORA_TARGETS[module]
            self.modules[layer][fused_name].set_slot(slot, slice_index, w)
        self.slots[lora_id] = slot
        return slot

    def prepare(self, requests: list[ScheduledRequest], meta: AttentionMetadata) -> None:
        """Put this step's LoRA mask (per token, from the scheduled requests in token order; lora_id 0: the
        base model) and its prefix-tuning keys/values into the step's metadata."""
        runs = [(r.lora_id, r.num_computed_tokens, len(r.token_ids)) for r in requests]
        in_use = {lora_id for lora_id, _, _ in runs if lora_id in self.adapters}
        if in_use:
            assert len(in_use) <= self.config.max_loras, "the scheduler admits at most max_loras adapters"
            slot_of = {lora_id: self._activate(lora_id, in_use) for lora_id in in_use}
            slots = torch.tensor([slot_of.get(lora_id, -1) for lora_id, _, _ in runs])
            counts = torch.tensor([n for _, _, n in runs])
            meta.lora_mask = self.mapping.mask_for(torch.repeat_interleave(slots, counts))
        virtual = self._virtual_kv(runs) if self.prefixes else None
        if virtual is not None:
            meta.virtual_rows, meta.virtual_keys, meta.virtual_values = virtual.rows, virtual.keys, virtual.values

    def _virtual_kv(self, runs: list[tuple[int, int, int]]) -> VirtualKV | None:
        rows: list[int] = []
        keys, values = [], []
        offset = 0
        for lora_id, start, num_tokens in runs:
            prefix = self.prefixes.get(lora_id)
            if prefix is not None and start < prefix.num_virtual_tokens:
                end = min(start + num_tokens, prefix.num_virtual_tokens)
                rows.extend(range(offset, offset + end - start))
                keys.append(prefix.keys[:, start:end])
                values.append(prefix.values[:, start:end])
            offset += num_tokens
        if not rows:
            return None
        return VirtualKV(torch.tensor(rows), torch.cat(keys, dim=1), torch.cat(values, dim=1))
