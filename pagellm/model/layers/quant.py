"""Weight-only quantized linear layers that keep their weights packed: int8 per channel, int4 per group.

Kernels, chosen by measurement (benchmarks/linear_kernels.py, 2 AVX2 cores, SmolLM2 shapes): calls
with up to ~50-100 rows (decode, small prefill chunks) run pagellm's C++ kernels
(csrc/quant_gemv.cpp) on the packed codes with float32 activations. torch's `_weight_int8pack_mm`
and `_weight_int4pack_mm_for_cpu` were measured too: they need bf16 activations (float32 is 10x
slower), they were no faster on the layers and 1.3-2.4x slower on the LM head. Calls with more rows (prefill)
dequantize the layer for that call and run a float32 matmul; the copy is dropped afterwards, so
memory stays packed. Without a C++ compiler, int8 falls back to torch's kernel and int4 to
dequantizing.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch
import torch.nn.functional as F
from torch import nn

from pagellm.model.layers.kernels import KernelPlan

SCHEMES = ("int8", "int4")
INT4_GROUP_SIZE = 32  # GGUF Q4_0/Q4_1 blocks are 32 wide: their weights load as they are
# Calls with at most this many rows take the packed kernel; above, dequantize + float32 matmul.
# Measured crossovers (benchmarks/linear_kernels.py): int8 ~100 rows; int4 (int8 activations, integer
# dot products, 16-channel tiles read once for all rows) ~100-150 rows.
KERNEL_MAX_ROWS = {"int8": 96, "int4": 96}


@dataclass
class QuantizedWeight:
    """A quantized [out, in] weight, codes unpacked (one per element).

    int8: qweight int8 [out, in], scales [out]; w = qweight * scale.
    int4: qweight uint8 [out, in] holding 0..15, scales and mins [out, in // group_size];
          w = qweight * scale + min (GGUF Q4_1's form; Q4_0 is min = -8 * scale). QuantizedLinear keeps
          int4 scales and mins in float16, as GGUF does.
    """

    scheme: str
    qweight: torch.Tensor
    scales: torch.Tensor
    mins: torch.Tensor | None = None
    group_size: int = 0

    @property
    def shape(self) -> torch.Size:
        return self.qweight.shape

    def dequantize(self, dtype: torch.dtype = torch.float32) -> torch.Tensor:
        if self.scheme == "int8":
            return (self.qweight.to(dtype) * self.scales.to(dtype).unsqueeze(1)).contiguous()
        out_features, in_features = self.qweight.shape
        groups = self.qweight.view(out_features, -1, self.group_size).to(dtype)
        w = groups * self.scales.to(dtype).unsqueeze(-1) + self.mins.to(dtype).unsqueeze(-1)
        return w.view(out_features, in_features)

    def to_scheme(self, scheme: str) -> QuantizedWeight:
        """The same weight in `scheme` (int4 in groups of INT4_GROUP_SIZE), through float if it is not."""
        same = scheme == self.scheme and (scheme == "int8" or self.group_size == INT4_GROUP_SIZE)
        return self if same else quantize(self.dequantize(), scheme)


def cat_rows(parts: list[QuantizedWeight]) -> QuantizedWeight:
    """Stack quantized weights along the output axis (fused q/k/v or gate/up projections)."""
    parts = [p.to_scheme(parts[0].scheme) for p in parts]
    first = parts[0]
    mins = None if first.mins is None else torch.cat([p.mins for p in parts])
    return QuantizedWeight(first.scheme, torch.cat([p.qweight for p in parts]),
                           torch.cat([p.scales for p in parts]), mins, first.group_size)


def quantize_int8(weight: torch.Tensor) -> QuantizedWeight:
    """Symmetric per-output-channel int8."""
    w = weight.float()
    scales = (w.abs().amax(dim=1) / 127.0).clamp(min=1e-10)
    q = torch.round(w / scales.unsqueeze(1)).clamp(-127, 127).to(torch.int8)
    return QuantizedWeight("int8", q, scales)


def quantize_int4(weight: torch.Tensor, group_size: int = INT4_GROUP_SIZE) -> QuantizedWeight:
    """Asymmetric int4 over groups of `group_size` input columns (min/max per group).

    The scales and mins are rounded to float16 (the form QuantizedLinear keeps them in) before the
    codes are chosen, so the packed layer computes with exactly this weight.
    """
    out_features, in_features = weight.shape
    if in_features % group_size:
        raise ValueError(f"int4 needs in_features ({in_features}) divisible by the group size {group_size}")
    g = weight.float().view(out_features, -1, group_size)
    lo, hi = g.amin(dim=-1), g.amax(dim=-1)
    if max(-float(lo.min()), float(hi.max())) > _FP16_MAX:
        raise ValueError(f"int4 keeps scales and mins in float16: weights beyond +-{_FP16_MAX:g} cannot be quantized")
    lo = lo.half().float()
    scales = ((hi - lo) / 15.0).half().float().clamp(min=_FP16_TINY)
    q = torch.round((g - lo.unsqueeze(-1)) / scales.unsqueeze(-1)).clamp(0, 15).to(torch.uint8)
    return QuantizedWeight("int4", q.view(out_features, in_features), scales, lo, group_size)


_FP16_MAX = float(torch.finfo(torch.float16).max)
_FP16_TINY = 2.0**-24  # the smallest float16 above zero


def quantize(weight: torch.Tensor, scheme: str) -> QuantizedWeight:
    if scheme == "int8":
        return quantize_int8(weight)
    if scheme == "int4":
        return quantize_int4(weight)
    raise ValueError(f"quantization must be one of {', '.join(SCHEMES)}; got {scheme!r}")


def pack_int4(codes: torch.Tensor) -> torch.Tensor:
    """[out, in] codes 0..15 -> [out, in / 2] bytes: per 32-wide group, byte j = code j | code (j + 16) << 4."""
    out_features, in_features = codes.shape
    c = codes.to(torch.uint8).view(out_features, -1, 2, INT4_GROUP_SIZE // 2)
    return (c[:, :, 0] | (c[:, :, 1] << 4)).view(out_features, in_features // 2).contiguous()


def unpack_int4(packed: torch.Tensor) -> torch.Tensor:
    """The inverse of pack_int4."""
    out_features = packed.shape[0]
    b = packed.view(out_features, -1, INT4_GROUP_SIZE // 2)
    return torch.cat([b & 0x0F, b >> 4], dim=-1).view(out_features, -1)


class QuantizedLinear(nn.Module):
    """A Linear whose weight stays packed (int8 or int4); activations and bias in `out_dtype`."""

    def __init__(self, in_features: int, out_features: int, bias: bool, scheme: str,
                 out_dtype: torch.dtype = torch.float32) -> None:
        super().__init__()
        if scheme not in SCHEMES:
            raise ValueError(f"quantization must be one of {', '.join(SCHEMES)}; got {scheme!r}")
        self.in_features, self.out_features, self.scheme = in_features, out_features, scheme
        self.out_dtype = out_dtype
        self.group_size = INT4_GROUP_SIZE if scheme == "int4" else 0
        self.bias = nn.Parameter(torch.zeros(out_features, dtype=out_dtype), requires_grad=False) if bias else None
        self.register_buffer("qweight", torch.empty(0, dtype=torch.uint8))  # int8 [out, in] | int4 [out, in / 2]
        self.register_buffer("scales", torch.empty(0))  # int8: float32 [out]; int4: float16 [out, groups]
        self.register_buffer("mins", torch.empty(0))  # int4: float16 [out, groups]
        self._bf16_scales: torch.Tensor | None = None  # int8 without the C++ kernel: torch's kernel wants bf16
        self.cpp = None  # the C++ kernels (KernelPlan.module); None: torch ops
        self.q8_activations = True  # int4: activations quantized to int8 per 32-wide block (KernelPlan)

    def use_kernels(self, plan: KernelPlan) -> None:
        self.cpp, self.q8_activations = plan.module, plan.int4_q8_activations

    def keep_precision_of(self, parts: list[QuantizedWeight | torch.Tensor]) -> None:
        """Become int8 when a packed part arrives as int8 (a 5-8 bit GGUF matrix in a 4-bit file, as
        Q4_K_M's Q6_K ones): its extra bits are kept instead of rounded to int4 groups."""
        if self.scheme == "int4" and any(isinstance(p, QuantizedWeight) and p.scheme == "int8" for p in parts):
            self.scheme, self.group_size = "int8", 0

    def set_weight(self, qw: QuantizedWeight) -> None:
        if tuple(qw.shape) != (self.out_features, self.in_features):
            raise ValueError(f"quantized weight {tuple(qw.shape)} != ({self.out_features}, {self.in_features})")
        qw = qw.to_scheme(self.scheme)
        if self.scheme == "int8":
            self.qweight = qw.qweight.contiguous()
            self.scales = qw.scales.float().contiguous()
        else:  # NOTE: float16 scales and mins: exact for GGUF Q4_0/Q4_1, ~17% fewer bytes a step than float32
            self.qweight = pack_int4(qw.qweight)
            self.scales = qw.scales.half().contiguous()
            self.mins = qw.mins.half().contiguous()
        self._bf16_scales = None

    def weight_bytes(self) -> int:
        return sum(t.numel() * t.element_size() for t in (self.qweight, self.scales, self.mins))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The float weight [out, in] (for calls with many rows, and for tests)."""
        dtype = dtype or self.out_dtype
        if self.scheme == "int4":
            if self.cpp is not None and dtype == torch.float32 and not torch.compiler.is_compiling():
                return self.cpp.int4_dequantize(self.qweight, self.scales, self.mins)  # ~10x the torch ops
        codes = self.qweight if self.scheme == "int8" else unpack_int4(self.qweight)
        return QuantizedWeight(self.scheme, codes, self.scales, self.mins, self.group_size).dequantize(dtype)

    def _packed_matmul(self, x: torch.Tensor) -> torch.Tensor | None:
        """x [rows, in] through a packed kernel, without bias; None where none applies."""
        kernel = torch.ops.pagellm if torch.compiler.is_compiling() else self.cpp  # custom ops when traced
        if kernel is not None:
            # NOTE: the kernels take float32 rows; other activations (a caller computing in bf16) are
            # widened here, a few KB, rather than dequantizing the whole matrix for the call
            x32 = x.to(torch.float32).contiguous()
            if self.scheme == "int8":
                out = kernel.int8_gemv(x32, self.qweight, self.scales)
            else:
                out = kernel.int4_gemv(x32, self.qweight, self.scales, self.mins, self.q8_activations)
            return out if x.dtype == torch.float32 else out.to(x.dtype)
        if self.scheme == "int8":  # no C++ kernels: torch's, on bf16 activations
            if self._bf16_scales is None:
                self._bf16_scales = self.scales.to(torch.bfloat16)
            return torch.ops.aten._weight_int8pack_mm(x.to(torch.bfloat16), self.qweight, self._bf16_scales).to(x.dtype)
        return None

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # NOTE: ~120 calls a decode step: the common case (2-D input) adds no reshape
        x2 = x if x.dim() == 2 else x.reshape(-1, self.in_features)
        out = None
        if x2.shape[0] <= KERNEL_MAX_ROWS[self.scheme] and not torch.is_grad_enabled():
            out = self._packed_matmul(x2)
        if out is None:
            return F.linear(x, self.dequantize(x.dtype), self.bias)
        if self.bias is not None:
            out = out + self.bias
        return out if x.dim() == 2 else out.view(*x.shape[:-1], self.out_features)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, scheme={self.scheme}"


LM_HEAD_SCHEME = "int8"  # the vocabulary projection stays at 8 bits whatever the layers use (like llama.cpp)


def replace_linears(model: nn.Module, scheme: str, out_dtype: torch.dtype) -> None:
    """Swap the decoder layers' Linears and the LM head for empty QuantizedLinears (call on "meta").

    A tied LM head gets its own int8 copy of the embedding at load; the embedding stays float.
    """
    from pagellm.model.layers.linear import Linear

    if not hasattr(model, "layers") or not isinstance(getattr(model, "lm_head", None), Linear):
        raise ValueError(f"quantization is supported for decoder language models, not {type(model).__name__}")
    targets = [(m, n, c, scheme) for layer in model.layers for m in layer.modules()
               for n, c in m.named_children() if isinstance(c, Linear)]
    targets.append((model, "lm_head", model.lm_head, LM_HEAD_SCHEME))
    for parent, name, child, child_scheme in targets:
        setattr(parent, name, QuantizedLinear(child.in_features, child.out_features, child.bias is not None,
                                              child_scheme, out_dtype))
