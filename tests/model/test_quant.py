"""Packed int8/int4 weights: formats, kernels against float, GGUF blocks, and whole models."""

from __future__ import annotations

import numpy as np
import pytest
import torch
import torch.nn.functional as F

from pagellm.errors import InvalidRequest
from pagellm.model.layers.kernels import TORCH_PATHS, plan_kernels
from pagellm.model.layers.quant import (
    KERNEL_MAX_ROWS,
    QuantizedLinear,
    cat_rows,
    pack_int4,
    quantize,
    quantize_int4,
    quantize_int8,
    unpack_int4,
)
from pagellm.model.loader.gguf_loader import decode_blocks


def _weight(out_features=96, in_features=128, seed=0):
    g = torch.Generator().manual_seed(seed)
    return torch.randn(out_features, in_features, generator=g) * 0.05


def test_int8_roundtrip_error_is_half_a_step():
    w = _weight()
    qw = quantize_int8(w)
    assert qw.qweight.dtype == torch.int8 and qw.scales.shape == (96,)
    err = (qw.dequantize() - w).abs()
    assert (err <= qw.scales.unsqueeze(1) / 2 + 1e-7).all()


def test_int4_roundtrip_error_is_half_a_step_per_group():
    w = _weight()
    qw = quantize_int4(w, group_size=32)
    assert qw.qweight.max() <= 15 and qw.scales.shape == (96, 4) and qw.mins.shape == (96, 4)
    err = (qw.dequantize() - w).abs().view(96, 4, 32)
    assert (err <= qw.scales.unsqueeze(-1) / 2 + 1e-6).all()


def test_int4_needs_whole_groups():
    with pytest.raises(ValueError, match="divisible"):
        quantize_int4(_weight(32, 48))
    with pytest.raises(ValueError, match="int8, int4"):
        quantize(_weight(), "int3")


def test_int4_packing_is_two_codes_per_byte_and_reversible():
    q = torch.randint(0, 16, (96, 128), dtype=torch.uint8)
    packed = pack_int4(q)
    assert packed.shape == (96, 64) and packed.dtype == torch.uint8
    assert packed[0, 0] == q[0, 0] | (q[0, 16] << 4)  # GGUF's order inside a 32-wide group
    assert torch.equal(unpack_int4(packed), q)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("rows", [1, 3, 8, 11, 40, "max", "max+1"])
@pytest.mark.parametrize("kernels", ["cpp", "torch"])
def test_quantized_linear_matches_its_dequantized_weight(scheme, rows, kernels, monkeypatch):
    """The packed kernels (few rows; C++ or torch's fallback) and the dequantize path (many rows)
    all equal x @ W_deq.T + b (int4 with float activations: PAGELLM_INT4_ACT=float)."""
    monkeypatch.setenv("PAGELLM_INT4_ACT", "float")
    plan = plan_kernels() if kernels == "cpp" else TORCH_PATHS
    if plan.module is None and kernels == "cpp":
        pytest.skip("C++ kernels unavailable (no compiler)")
    w = _weight()
    qw = quantize(w, scheme)
    layer = QuantizedLinear(128, 96, bias=True, scheme=scheme)
    layer.use_kernels(plan)
    layer.set_weight(qw)
    layer.bias.copy_(torch.randn(96))
    torch.testing.assert_close(layer.dequantize(), qw.dequantize(), atol=1e-7, rtol=1e-6)  # C++: fused mul-add
    rows = {"max": KERNEL_MAX_ROWS[scheme], "max+1": KERNEL_MAX_ROWS[scheme] + 1}.get(rows, rows)
    x = torch.randn(rows, 128)
    ref = F.linear(x, qw.dequantize(), layer.bias)
    if kernels == "cpp" or scheme == "int4" or rows > KERNEL_MAX_ROWS[scheme]:  # float32 throughout
        torch.testing.assert_close(layer(x), ref, atol=1e-5, rtol=1e-5)
    else:  # torch's int8 kernel takes bf16 activations: an error of ~2^-8 relative to |x| |w|
        torch.testing.assert_close(layer(x), ref, atol=2e-2, rtol=1e-2)
    assert layer.weight_bytes() < w.numel() * 2  # smaller than bf16


def _q8_reference(x: torch.Tensor, qw) -> torch.Tensor:
    """int4 weights times activations quantized to int8 per 32-input block, in torch."""
    rows, groups = x.shape[0], x.shape[1] // 32
    blocks = x.view(rows, groups, 32)
    d = blocks.abs().amax(-1) / 127
    inv = torch.where(d > 0, 1 / d, torch.zeros_like(d))
    xq = torch.round(blocks * inv.unsqueeze(-1))
    codes = qw.qweight.view(qw.shape[0], groups, 32).float()
    dots = torch.einsum("mgk,ngk->mng", xq.double(), codes.double())  # exact integers
    scale = qw.scales.view(qw.shape[0], groups).double()
    mins = qw.mins.view(qw.shape[0], groups).double()
    out = (dots * (scale.unsqueeze(0) * d.double().unsqueeze(1))).sum(-1) + blocks.double().sum(-1) @ mins.T
    return out.float()


@pytest.mark.parametrize("rows", [1, 3, 8, 11, 40])
@pytest.mark.parametrize("in_features", [128, 160])  # 160: an odd number of groups (the kernel pairs them)
def test_int4_kernel_quantizes_activations_like_q8(rows, in_features, monkeypatch):
    """The default int4 kernel: int8 activations per 32-wide block (llama.cpp's Q4 x Q8), integer
    dot products. It equals that computation done in torch, and stays within ~1% of float."""
    from pagellm.model.layers.kernels import load_kernel

    if load_kernel() is None:
        pytest.skip("C++ kernels unavailable (no compiler)")
    monkeypatch.delenv("PAGELLM_INT4_ACT", raising=False)
    qw = quantize(_weight(96, in_features), "int4")
    layer = QuantizedLinear(in_features, 96, bias=False, scheme="int4")
    layer.use_kernels(plan_kernels())
    layer.set_weight(qw)
    x = torch.randn(rows, in_features, generator=torch.Generator().manual_seed(rows))
    x[0, :32] = 0  # an all-zero block: scale 0, no division by zero
    with torch.inference_mode():  # NOTE: with autograd on, the layer runs the float dequantize path
        got = layer(x)
    torch.testing.assert_close(got, _q8_reference(x, qw), atol=1e-4, rtol=1e-4)
    exact = F.linear(x, qw.dequantize())
    assert (got - exact).abs().max() < 0.02 * exact.abs().max()
    assert not torch.equal(got, exact)


@pytest.mark.parametrize("scheme", ["int4", "int8"])
@pytest.mark.parametrize("in_features", [128, 160])
def test_a_rows_result_does_not_depend_on_the_rows_beside_it(scheme, in_features):
    """Bitwise: row i computed alone equals row i computed in a call of 2..30 rows. Greedy outputs then do
    not depend on the batch or on prefix-cache hits, and speculative verification (several rows of one
    request) reproduces decoding one token a step. (The int4 kernel once summed one row in two FMA
    chains and several rows in one, which moved the bundled model's greedy answers with the batch.)"""
    from pagellm.model.layers.kernels import load_kernel

    if load_kernel() is None:
        pytest.skip("C++ kernels unavailable (no compiler)")
    layer = QuantizedLinear(in_features, 96, bias=False, scheme=scheme)
    layer.use_kernels(plan_kernels())
    layer.set_weight(quantize(_weight(96, in_features), scheme))
    x = torch.randn(30, in_features, generator=torch.Generator().manual_seed(5))
    with torch.inference_mode():
        alone = torch.cat([layer(x[i : i + 1]) for i in range(30)])
        for rows in (2, 4, 5, 8, 11, 25, 30):  # int8: 3 rows at a time per channel, 24 rows a pass
            assert torch.equal(layer(x[:rows]), alone[:rows]), rows


def test_cat_rows_stacks_fused_projections():
    a, b = quantize_int4(_weight(64, 128, 1)), quantize_int4(_weight(32, 128, 2))
    both = cat_rows([a, b])
    torch.testing.assert_close(both.dequantize(), torch.cat([a.dequantize(), b.dequantize()]))
    mixed = cat_rows([a, quantize_int8(_weight(32, 128, 2))])  # converted to the first part's scheme
    assert mixed.scheme == "int4" and mixed.shape == (96, 128)


@pytest.mark.parametrize("kind", ["Q4_0", "Q4_1", "Q8_0"])
def test_gguf_blocks_decode_like_the_gguf_package(kind):
    import gguf

    w = _weight(64, 128).numpy()
    qtype = getattr(gguf.GGMLQuantizationType, kind)
    blocks = gguf.quants.quantize(w, qtype)
    reference = torch.from_numpy(np.asarray(gguf.quants.dequantize(blocks, qtype), dtype=np.float32))
    qw = decode_blocks(np.asarray(blocks, dtype=np.uint8).reshape(64, -1), kind)
    if kind == "Q8_0":  # requantized to one scale per row
        assert qw.scheme == "int8"
        assert (qw.dequantize() - reference).abs().max() <= qw.scales.max() / 2 + 1e-6
    else:  # exact: the same 4-bit values and fp16 scales
        assert qw.scheme == "int4" and qw.group_size == 32
        torch.testing.assert_close(qw.dequantize(), reference, atol=1e-6, rtol=0)


def _reference_on_dequantized(path: str, model):
    """transformers' model from `path` with every weight replaced by `model`'s dequantized one."""
    from transformers import AutoModelForCausalLM

    ref = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32)
    ref.config.tie_word_embeddings = False
    ref.lm_head.weight = torch.nn.Parameter(model.lm_head.dequantize().clone())
    attn = model.layers[0].self_attn
    with torch.no_grad():
        for layer, hf in zip(model.layers, ref.model.layers):
            q, k, v = layer.self_attn.qkv_proj.dequantize().split([attn.q_size, attn.kv_size, attn.kv_size])
            hf.self_attn.q_proj.weight.copy_(q)
            hf.self_attn.k_proj.weight.copy_(k)
            hf.self_attn.v_proj.weight.copy_(v)
            hf.self_attn.o_proj.weight.copy_(layer.self_attn.o_proj.dequantize())
            gate, up = layer.mlp.gate_up_proj.dequantize().chunk(2)
            hf.mlp.gate_proj.weight.copy_(gate)
            hf.mlp.up_proj.weight.copy_(up)
            hf.mlp.down_proj.weight.copy_(layer.mlp.down_proj.dequantize())
    return ref


@pytest.mark.parametrize("scheme", ["int8", "int4"])
@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_quantized_model_matches_transformers_on_its_dequantized_weights(scheme, fixture, request, monkeypatch):
    """Prefill logits of a quantized tiny model equal transformers run on the same dequantized weights."""
    from pagellm.model.layers.attention import packed_causal_metadata
    from pagellm.model.loader.model_loader import load_model
    from pagellm.model_source import resolve_model

    monkeypatch.setenv("PAGELLM_INT4_ACT", "float")  # the same weights, not the int8 activations
    path = request.getfixturevalue(fixture)
    model = load_model(resolve_model(path), torch.float32, scheme)
    assert model.quantization == scheme
    qlinears = {n: m for n, m in model.named_modules() if isinstance(m, QuantizedLinear)}
    assert qlinears["lm_head"].scheme == "int8"
    assert len(qlinears) == 4 * len(model.layers) + 1
    assert all(m.scheme == scheme for n, m in qlinears.items() if n != "lm_head")
    ref = _reference_on_dequantized(path, model)
    ids = torch.randint(0, 1000, (1, 24), generator=torch.Generator().manual_seed(0))
    with torch.inference_mode():
        hidden = model(ids[0], torch.arange(24), None, packed_causal_metadata([24]))
        theirs = ref(ids).logits[0]
        # 24 rows and 1 row: the packed kernel (float activations here). Both float32 throughout.
        torch.testing.assert_close(model.compute_logits(hidden), theirs, atol=2e-4, rtol=1e-4)
        torch.testing.assert_close(model.compute_logits(hidden[-1:]), theirs[-1:], atol=2e-4, rtol=1e-4)


@pytest.mark.parametrize("scheme", ["int8", "int4"])
def test_quantized_engine_greedy_equals_transformers_on_dequantized_weights(scheme, tiny_llama_dir, monkeypatch):
    """Batched paged decoding through the packed kernels gives transformers' greedy tokens."""
    from pagellm import LLM, SamplingParams

    monkeypatch.setenv("PAGELLM_INT4_ACT", "float")  # the same weights, not the int8 activations

    llm = LLM(tiny_llama_dir, dtype="float32", quantization=scheme, num_blocks=64, block_size=4)
    model = llm.llm_engine.worker.model
    assert model.quantization == scheme
    ref = _reference_on_dequantized(tiny_llama_dir, model)
    tok = llm.get_tokenizer()
    prompts = ["Once upon a time", "The capital of France is", "1 2 3 4"]
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True), use_tqdm=False)
    for prompt, out in zip(prompts, outs):
        ids = torch.tensor([tok.encode(prompt)])
        expected = ref.generate(ids, max_new_tokens=16, do_sample=False, min_new_tokens=16)[0, ids.shape[1]:]
        assert out.outputs[0].token_ids == expected.tolist(), prompt


def test_bad_quantization_is_a_clear_error(tiny_llama_dir):
    from pagellm import LLM

    with pytest.raises(InvalidRequest, match="quantization must be one of"):
        LLM(tiny_llama_dir, quantization="fp4")


def test_cpp_rms_norm_matches_torch():
    from pagellm.model.layers.kernels import load_kernel
    from pagellm.model.layers.norm import RMSNorm

    if load_kernel() is None:
        pytest.skip("C++ kernels unavailable (no compiler)")
    norm = RMSNorm(576, 1e-5)
    norm.use_kernels(plan_kernels())
    norm.weight.data.normal_()
    x = torch.randn(5, 576) * 3
    with torch.inference_mode():
        got = norm(x)
    torch.testing.assert_close(got, F.rms_norm(x, (576,), norm.weight, 1e-5), atol=1e-5, rtol=1e-5)
