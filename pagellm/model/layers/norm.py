"""RMSNorm (float32 rows go through the C++ kernel when the plan gives it: torch's op costs 25-60 us a call)."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from pagellm.model.layers.kernels import KernelPlan


class RMSNorm(nn.Module):
    """Root-mean-square norm, computed in float32 like the HF reference, then cast back."""

    def __init__(self, hidden_size: int, eps: float) -> None:
        super().__init__()
        self.weight = nn.Parameter(torch.ones(hidden_size), requires_grad=False)
        self.eps = eps
        self.cpp = None  # the C++ kernels (KernelPlan.module); None: torch's op

    def use_kernels(self, plan: KernelPlan) -> None:
        self.cpp = plan.module

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        if (self.cpp is not None and x.dtype == torch.float32 and x.dim() == 2 and x.is_cpu
                and not torch.is_grad_enabled() and not torch.compiler.is_compiling()):  # C++ reads CPU memory only
            return self.cpp.rms_norm(x.contiguous(), self.weight, self.eps)
        if x.dtype == torch.float32:
            return F.rms_norm(x, (x.shape[-1],), self.weight, self.eps)
        normed = F.rms_norm(x.float(), (x.shape[-1],), None, self.eps)
        return self.weight * normed.to(x.dtype)
