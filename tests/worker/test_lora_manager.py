"""The LoRAManager on its own: slots filled on demand and evicted least recently used, and each step's
per-token LoRA mask handed to the model in the step's metadata (no state left on shared objects)."""

from __future__ import annotations

import pytest
import torch

from pagellm.config import LoRAConfig, ModelConfig
from pagellm.core.sched_output import ScheduledRequest
from pagellm.model.layers.attention import AttentionMetadata
from pagellm.model.loader.peft_loader import LoRAAdapter, LoRAWeights
from pagellm.sampling_params import SamplingParams
from pagellm.worker.lora_manager import LoRAManager
from pagellm.worker.worker import Worker


@pytest.fixture
def manager(tiny_llama_dir) -> LoRAManager:
    worker = Worker(ModelConfig(tiny_llama_dir, dtype="float32"))
    worker.load()
    return LoRAManager(worker.model, LoRAConfig(max_loras=2, max_lora_rank=4), torch.float32)


def _adapter(seed: int) -> LoRAAdapter:
    g = torch.Generator().manual_seed(seed)
    return LoRAAdapter(f"a{seed}", {(0, "q_proj"): LoRAWeights(torch.randn(2, 64, generator=g),
                                                               torch.randn(64, 2, generator=g), 0.5)})


def _req(req_id: str, num_tokens: int, lora_id: int) -> ScheduledRequest:
    ids = list(range(num_tokens))
    return ScheduledRequest(req_id, ids, 0, [0], True, SamplingParams(), ids, num_tokens, lora_id=lora_id)


def _prepare(manager: LoRAManager, requests: list[ScheduledRequest]) -> AttentionMetadata:
    meta = AttentionMetadata(slot_mapping=torch.zeros(0, dtype=torch.long))
    manager.prepare(requests, meta)
    return meta


def test_a_step_without_adapters_has_no_mask(manager):
    manager.add_adapter(1, _adapter(1))
    assert _prepare(manager, [_req("a", 3, 0)]).lora_mask is None


def test_each_token_masks_in_its_own_adapters_slot(manager):
    manager.add_adapter(1, _adapter(1))
    manager.add_adapter(2, _adapter(2))
    meta = _prepare(manager, [_req("a", 2, 1), _req("b", 1, 0), _req("c", 3, 2)])
    mask = meta.lora_mask  # [tokens, slots * rank]
    assert mask.shape == (6, 2 * 4)
    slot1, slot2 = manager.slots[1], manager.slots[2]
    expected = torch.zeros(6, 8)
    expected[0:2, slot1 * 4 : slot1 * 4 + 4] = 1
    expected[3:6, slot2 * 4 : slot2 * 4 + 4] = 1
    assert torch.equal(mask, expected)
    assert all(not hasattr(lora, "mask") for layer in manager.modules for lora in layer.values())


def test_slots_are_reused_least_recently_used_first(manager):
    for lora_id in (1, 2, 3):
        manager.add_adapter(lora_id, _adapter(lora_id))
    _prepare(manager, [_req("a", 1, 1)])
    _prepare(manager, [_req("b", 1, 2)])
    _prepare(manager, [_req("a", 1, 1)])  # 1 is now the most recent
    _prepare(manager, [_req("c", 1, 3)])  # evicts 2
    assert set(manager.slots) == {1, 3}
