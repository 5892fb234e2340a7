"""Batched multi-LoRA on top of a (fused) Linear: every token picks its adapter by slot index.

Each LoRALinear keeps the A and B matrices of every resident adapter stacked in fixed slots of
`max_rank` rows. One step computes x @ A_all.T for all slots at once, zeroes the columns of the
slots a token does not use (a per-token mask of the step, shared by all layers and passed in with the
step's metadata), and expands with B_all: two dense matmuls per slice, no Python loop over requests or adapters.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagellm.model.loader.peft_loader import LoRAWeights


class LoRAMapping:
    """The slot geometry every LoRALinear of one model shares, and the per-token mask of a step's slots."""

    def __init__(self, num_slots: int, max_rank: int, dtype: torch.dtype) -> None:
        self.num_slots, self.max_rank, self.dtype = num_slots, max_rank, dtype
        self._col_slot = torch.arange(num_slots * max_rank) // max_rank  # [slots * rank]

    def mask_for(self, token_slots: torch.Tensor) -> torch.Tensor:
        """[num_tokens, slots * rank] mask of token_slots ([num_tokens] slot per token, -1: the base model)."""
        return (token_slots.unsqueeze(1) == self._col_slot.unsqueeze(0)).to(self.dtype)


class LoRALinear(nn.Module):
    """A base Linear whose output column slices each get a per-token LoRA delta."""

    def __init__(self, base: nn.Module, slice_sizes: list[int], mapping: LoRAMapping) -> None:
        super().__init__()
        self.base = base
        self.mapping = mapping
        self.slice_sizes = slice_sizes
        self.offsets = [sum(slice_sizes[:i]) for i in range(len(slice_sizes))]
        width = mapping.num_slots * mapping.max_rank
        dtype = base.weight.dtype if isinstance(base, nn.Linear) else base.out_dtype  # QuantizedLinear
        # rows grouped [slice][slot][rank]; B is pre-scaled and transposed: [slots * rank, out_slice]
        self.register_buffer("lora_a", torch.zeros(len(slice_sizes) * width, base.in_features, dtype=dtype),
                             persistent=False)
        self.lora_b = [torch.zeros(width, size, dtype=dtype) for size in slice_sizes]

    def set_slot(self, slot: int, slice_index: int, weights: LoRAWeights | None) -> None:
        """Write one adapter's matrices for one slice into a slot (zeros when it has none there)."""
        rank, width = self.mapping.max_rank, self.mapping.num_slots * self.mapping.max_rank
        a_rows = self.lora_a[slice_index * width + slot * rank : slice_index * width + (slot + 1) * rank]
        b_rows = self.lora_b[slice_index][slot * rank : (slot + 1) * rank]
        a_rows.zero_()
        b_rows.zero_()
        if weights is not None:
            assert weights.a.shape[1] == a_rows.shape[1] and weights.b.shape[0] == b_rows.shape[1], \
                "adapter shapes were checked against the model at load"
            a_rows[: weights.rank] = weights.a
            b_rows[: weights.rank] = (weights.b * weights.scaling).t()

    def forward(self, x: torch.Tensor, lora_mask: torch.Tensor | None = None) -> torch.Tensor:
        """lora_mask: the step's [num_tokens, slots * rank] mask (AttentionMetadata.lora_mask); None: base only."""
        out = self.base(x)
        mask = lora_mask
        if mask is None:
            return out
        num_tokens = x.shape[0]
        shrink = F.linear(x, self.lora_a).view(num_tokens, len(self.slice_sizes), -1) * mask.unsqueeze(1)
        for i, (offset, size) in enumerate(zip(self.offsets, self.slice_sizes)):
            out[:, offset : offset + size] += shrink[:, i] @ self.lora_b[i]
        return out
