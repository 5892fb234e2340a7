"""int8 encoder linears: int8 weights (per output channel) times int8 activations (per row), int32 sums.

For an encoder's many-row matmuls (a packed batch is ~1,000-3,000 token rows), where pagellm's weight-only
int8 kernels (layers/quant.py) dequantize and run float32. Here the matmul itself is integer: torch's fbgemm
`quantized::linear_dynamic` on a weight prepacked once at load. Measured on this 2-core AVX2 CPU, one
thread, 1,600 rows (thread CPU time): MiniLM's 384->1152/1536 and 1536->384 layers 1.3-1.7x faster than
float32 sgemm (which runs at ~90 GFLOP/s a core, near this CPU's peak); the square 384->384 layer is not
faster, so callers keep it in float32.

NOTE: `linear_dynamic` quantizes its input with one scale for the whole tensor, computed from the batch;
a row's result would then depend on the other texts of its batch. Each row is scaled to max |x| = 1 first,
and one guard row holding +1 and -1 is appended, so the tensor's range is always exactly [-1, 1]: the
quantization is the same for every call, i.e. per row. A text's MiniLM embedding then moves by ~1e-4 with
its batch (float32 rounding elsewhere, which differs with the batch's shape, now and then tips an int8
rounding), against 3e-2 with one scale per call (tests/model/test_encoder_int8.py). The row scale is
applied again to the integer result, then the bias.
Weights use 7 bits (|q| <= 63) and activations 8 (0..255, reduce_range=False): AVX2 without VNNI sums
pairs of u8 x s8 products in int16, so 8-bit weights can saturate (a random layer's worst row: cosine 0.95
to float32), and fbgemm's alternative, 7-bit activations, rounds BERT's outlier channels too coarsely
(MiniLM embeddings' worst cosine 0.95 on news3). 255 * 63 * 2 < 32767: no saturation.

NOTE: torch 2.13 marks its quantized tensor types deprecated (the weight is prepacked from one, once at load);
torchao's int8 path runs `torch._int_mm`, which has no fast CPU kernel here (~25x slower than float32 sgemm,
measured). `int8_available()` says whether the ops exist.
"""

from __future__ import annotations

import warnings

import torch
from torch import nn

WEIGHT_MAX = 63  # 7-bit weights: no int16 saturation with 8-bit activations (see above)


def int8_available() -> bool:
    """True when torch has the fbgemm dynamic int8 linear (x86 CPUs)."""
    return "fbgemm" in torch.backends.quantized.supported_engines and hasattr(torch.ops.quantized, "linear_dynamic")


class Int8DynamicLinear(nn.Module):
    """A frozen nn.Linear as an fbgemm-packed int8 weight and a float32 bias (inference only, CPU)."""

    def __init__(self, linear: nn.Linear) -> None:
        super().__init__()
        weight = linear.weight.detach().float()  # [out, in]
        self.in_features, self.out_features = linear.in_features, linear.out_features
        scales = (weight.abs().amax(dim=1) / WEIGHT_MAX).clamp(min=1e-12)  # [out], symmetric per channel
        with warnings.catch_warnings():
            warnings.simplefilter("ignore", UserWarning)  # torch's deprecation note on quantized tensors
            qweight = torch.quantize_per_channel(weight, scales.double(), torch.zeros_like(scales, dtype=torch.long),
                                                 0, torch.qint8)
            self._packed = torch.ops.quantized.linear_prepack(qweight, None)
        self.bias = None if linear.bias is None else nn.Parameter(linear.bias.detach().float(), requires_grad=False)
        self._guard = torch.zeros(self.in_features)
        self._guard[0], self._guard[-1] = 1.0, -1.0  # pins every call's range to [-1, 1]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        """x: float32 [rows, in] -> float32 [rows, out]."""
        rows = x.shape[0]
        row_max = x.abs().amax(dim=1, keepdim=True).clamp_(min=1e-12)  # [rows, 1]
        scaled = torch.empty(rows + 1, self.in_features, dtype=torch.float32, device=x.device)
        torch.div(x, row_max, out=scaled[:rows])  # every row's max |x| is 1
        scaled[rows] = self._guard
        out = torch.ops.quantized.linear_dynamic(scaled, self._packed, False)[:rows]  # [rows, out]
        return out.mul_(row_max) if self.bias is None else torch.addcmul(self.bias, out, row_max)

    def extra_repr(self) -> str:
        return f"in_features={self.in_features}, out_features={self.out_features}, int8 x int8 (per row)"


def quantize_linears(model: nn.Module, names: tuple[str, ...]) -> int:
    """Swap every nn.Linear of `model` whose name ends with one of `names` for an Int8DynamicLinear; returns
    how many were swapped."""
    targets = [(name, module) for name, module in model.named_modules()
               if isinstance(module, nn.Linear) and name.endswith(names)]
    for name, linear in targets:
        parent_name, _, child = name.rpartition(".")
        setattr(model.get_submodule(parent_name) if parent_name else model, child, Int8DynamicLinear(linear))
    return len(targets)
