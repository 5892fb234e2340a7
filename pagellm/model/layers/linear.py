"""Linear layers with a CPU kernel chosen by measurement."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagellm.model.layers.kernels import KernelPlan


def _onednn_fp32_available() -> bool:
    return torch.backends.mkldnn.is_available() and hasattr(torch.ops.mkldnn, "_reorder_linear_weight")


# Calls with at most this many rows (batch-1..4 decode) take the bf16 matrix-vector path.
GEMV_MAX_ROWS = 4


class Linear(nn.Linear):
    """nn.Linear that can run float32 CPU matmuls through a pre-packed oneDNN weight.

    NOTE: torch sends float32 CPU matmuls to MKL's sgemm, which on AMD/AVX2 CPUs runs the
    small-M shapes of decoding 2-4x slower than oneDNN with a weight reordered once at load
    (measured in benchmarks/linear_kernels.py). The plain weight stays for training, LoRA
    and the tied embedding; the packed copy is an extra, inference-only buffer.
    """

    packed: torch.Tensor | None = None
    gemv_weight: torch.Tensor | None = None
    cpp = None  # the C++ kernels (KernelPlan.module) for few-row calls on the bf16 copy; None: torch's op

    def use_kernels(self, plan: KernelPlan) -> None:
        self.cpp = plan.module

    def pack(self, bf16_gemv: bool = False) -> None:
        """Make the inference copies; bf16_gemv adds a bfloat16 weight for few-row calls."""
        weight = self.weight.detach()
        if weight.dtype == torch.float32 and weight.device.type == "cpu" and _onednn_fp32_available():
            self.packed = torch.ops.mkldnn._reorder_linear_weight(weight, 64)
        if bf16_gemv:
            # NOTE: a matrix-vector product is bound by weight bytes; bf16 halves them. Only
            # exact when the float32 weight holds bf16 values (a bf16 model run in float32).
            self.gemv_weight = weight.to(torch.bfloat16)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if x.dim() != 2 or torch.is_grad_enabled():
            return F.linear(x, self.weight, self.bias)
        if self.gemv_weight is not None and x.shape[0] <= GEMV_MAX_ROWS:
            kernel = self.cpp if x.dtype == torch.float32 and not torch.compiler.is_compiling() else None
            if kernel is not None:  # float32 rows times the bf16 weight: 1.3-4x faster than torch's bf16 op
                out = kernel.dense_gemv(x.contiguous(), self.gemv_weight)
            else:
                out = F.linear(x.to(torch.bfloat16), self.gemv_weight).to(x.dtype)
            return out if self.bias is None else out + self.bias
        if self.packed is not None and not torch.compiler.is_compiling():  # inductor can't lower it
            return torch.ops.mkldnn._linear_pointwise(x, self.packed, self.bias, "none", [], "")
        return F.linear(x, self.weight, self.bias)


def pack_linears(model: nn.Module, bf16_gemv: bool = False) -> int:
    """Pack every Linear of a loaded model; returns how many were packed."""
    count = 0
    for module in model.modules():
        if isinstance(module, Linear):
            module.pack(bf16_gemv)
            count += module.packed is not None
    return count
