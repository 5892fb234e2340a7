"""Linear layers with a CPU kernel chosen by measurement."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn


def _onednn_fp32_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


class Linear(nn.Linear):
    """nn.Linear that can run float32 CPU matmuls through a pre-packed oneDNN weight.

    NOTE: torch sends float32 CPU matmuls to MKL's sgemm, which on AMD/AVX2 CPUs runs the
    small-M shapes of decoding 2-4x slower than oneDNN with a weight reordered once at load
    (measured in benchmarks/linear_kernels.py). The plain weight stays for training, LoRA
    and the tied embedding; the packed copy is an extra, inference-only buffer.
    """

    packed: torch.Tensor | None = None

    def pack(self) -> None:
        if self.weight.dtype == torch.float32 and self.weight.device.type == "cpu" and _onednn_fp32_available():
            with torch.no_grad():
                self.packed = torch.ops.mkldnn._reorder_linear_weight(self.weight.detach(), 64)

    def unpack(self) -> None:
        self.packed = None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if self.packed is not None and x.dim() == 2 and not torch.is_grad_enabled():
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def pack_linears(model: nn.Module) -> int:
    """Pack every Linear of a loaded model; returns how many were packed."""
    count = 0
    for module in model.modules():
        if isinstance(module, Linear):
            module.pack()
            count += module.packed is not None
    return count
