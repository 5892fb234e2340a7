"""PEFT adapters trained for a few steps on a tiny model (B is zero at init, so an untrained LoRA is a no-op)."""

from __future__ import annotations

import torch

ALL_TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "up_proj", "down_proj"]


def train_lora_adapter(base_dir: str, out_dir, rank: int, seed: int, targets: list[str]) -> str:
    """A few optimizer steps of PEFT LoRA on random tokens, so that B (zero at init) is non-zero."""
    from peft import LoraConfig, get_peft_model
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_pretrained(base_dir, dtype=torch.float32)
    model = get_peft_model(model, LoraConfig(r=rank, lora_alpha=2 * rank, target_modules=targets,
                                             lora_dropout=0.0, task_type="CAUSAL_LM"))
    opt = torch.optim.Adam([p for p in model.parameters() if p.requires_grad], lr=2e-2)
    data = torch.randint(10, 3000, (4, 12))
    for _ in range(8):
        loss = model(input_ids=data, labels=data).loss
        loss.backward()
        opt.step()
        opt.zero_grad()
    model.save_pretrained(str(out_dir))
    return str(out_dir)
