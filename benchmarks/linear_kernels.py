"""Matmul kernels on SmolLM2's shapes, 2 threads: what QuantizedLinear and Linear pick from.

Per row count, the summed time of one decoder layer's four matmuls (qkv 576->960, o 576->576,
gate_up 576->3072, down 1536->576) and of the LM head (576->49152), for: float32 (MKL), float32
through a oneDNN weight packed once, bf16, torch's weight-only int8 and int4 kernels (bf16
activations, as they need), and pagellm's C++ int8/int4 kernels (float32 activations). The
baseline is float32 in the same run. Note: each weight is reused across calls, so it sits in cache;
in a model the 30 layers' weights stream from memory.
Usage: python benchmarks/linear_kernels.py [--rows 1,4,16,64] [--out FILE]
"""

from __future__ import annotations

import argparse
import json
import time

import torch
import torch.nn.functional as F

LAYER = [(576, 960), (576, 576), (576, 3072), (1536, 576)]
HEAD = [(576, 49152)]


def bench(fn, reps: int) -> float:
    for _ in range(3):
        fn()
    start = time.perf_counter()
    for _ in range(reps):
        fn()
    return (time.perf_counter() - start) / reps * 1e3


def kernels(k: int, n: int, rows: int):
    from pagellm.model.layers.kernels import load_kernel
    from pagellm.model.layers.quant import pack_int4, quantize_int4, quantize_int8

    w = torch.randn(n, k) * 0.05
    x = torch.randn(rows, k)
    xb, wb = x.bfloat16(), w.bfloat16()
    q8 = quantize_int8(w)
    q4 = quantize_int4(w)
    packed = torch.ops.mkldnn._reorder_linear_weight(w, rows)
    torch_q4 = torch.ops.aten._convert_weight_to_int4pack_for_cpu(q4.qweight.to(torch.int32), 1)
    scale_zero = torch.stack([q4.scales, q4.mins + 8 * q4.scales], -1).transpose(0, 1).contiguous().bfloat16()
    out = {
        "float32": lambda: F.linear(x, w),
        "float32_onednn_packed": lambda: torch.ops.mkldnn._linear_pointwise(x, packed, None, "none", [], ""),
        "bf16": lambda: F.linear(xb, wb),
        "torch_int8_bf16": lambda: torch.ops.aten._weight_int8pack_mm(xb, q8.qweight, q8.scales.bfloat16()),
        "torch_int4_bf16": lambda: torch.ops.aten._weight_int4pack_mm_for_cpu(xb, torch_q4, 32, scale_zero),
    }
    module = load_kernel()
    if module is not None:
        q4_packed, s4, m4 = pack_int4(q4.qweight), q4.scales.half().contiguous(), q4.mins.half().contiguous()
        out["pagellm_int8"] = lambda: module.int8_gemv(x, q8.qweight, q8.scales)
        out["pagellm_int4"] = lambda: module.int4_gemv(x, q4_packed, s4, m4, True)
    return out


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--rows", default="1,4,16,64")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    torch.set_num_threads(2)
    result = {"threads": 2, "unit": "ms per call (summed over the shapes)"}
    with torch.inference_mode():
        for rows in map(int, args.rows.split(",")):
            for part, shapes in (("layer", LAYER), ("lm_head", HEAD)):
                totals: dict[str, float] = {}
                for k, n in shapes:
                    for name, fn in kernels(k, n, rows).items():
                        totals[name] = totals.get(name, 0.0) + bench(fn, 20 if part == "layer" else 5)
                base = totals["float32"]
                result[f"{part}_rows{rows}"] = {name: {"ms": t, "speedup_vs_float32": base / t}
                                                for name, t in totals.items()}
                print(rows, part, {name: round(t, 3) for name, t in totals.items()}, flush=True)
    if args.out:
        with open(args.out, "w") as f:
            json.dump(result, f, indent=2)


if __name__ == "__main__":
    main()
