"""The C++ decoder stack (model.fused_decoder) against the eager layer loop it replaces in decode steps."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagellm import LLM, SamplingParams
from pagellm.model.layers import kernels
from pagellm.model.layers.kernels import CpuFeatures, load_kernel
from pagellm.model.loader.model_loader import load_model
from pagellm.model_source import resolve_model

pytestmark = pytest.mark.skipif(load_kernel() is None, reason="C++ kernels unavailable (no compiler)")


@pytest.mark.parametrize("dtype", [torch.float32, torch.bfloat16])
@pytest.mark.parametrize("rows", [1, 3, 8, 11])
@pytest.mark.parametrize("k", [64, 96, 100])
def test_dense_gemv_matches_linear(dtype, rows, k):
    """float32 and bfloat16 weights, K with and without a tail past the 32-wide blocks."""
    gen = torch.Generator().manual_seed(rows * k)
    x = torch.randn(rows, k, generator=gen)
    w = torch.randn(40, k, generator=gen).to(dtype)
    torch.testing.assert_close(load_kernel().dense_gemv(x, w), F.linear(x, w.float()), atol=1e-5, rtol=1e-5)


def _decode_inputs(model, lengths: list[int], block_size: int):
    """A decode step for sequences of these lengths (the new token included), blocks laid out in order."""
    tables, slots, start = [], [], 0
    max_blocks = max(-(-n // block_size) for n in lengths)
    for n in lengths:
        blocks = list(range(start, start + -(-n // block_size)))
        start += len(blocks)
        slots.append(blocks[(n - 1) // block_size] * block_size + (n - 1) % block_size)
        tables.append(blocks + [0] * (max_blocks - len(blocks)))
    ids = torch.randint(0, model.config.vocab_size, (len(lengths),), generator=torch.Generator().manual_seed(1))
    seq_lens = torch.tensor(lengths)
    return ids, seq_lens - 1, torch.tensor(slots), torch.tensor(tables), seq_lens, start


def _caches(model, num_blocks: int, block_size: int, dtype: torch.dtype, seed: int):
    gen = torch.Generator().manual_seed(seed)
    shape = (num_blocks, block_size, model.num_kv_heads, model.head_dim)
    return [(torch.randn(shape, generator=gen).to(dtype), torch.randn(shape, generator=gen).to(dtype))
            for _ in model.layers]


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
@pytest.mark.parametrize("weights", ["float32", "int8", "int4", "int4-q8", "bfloat16"])
@pytest.mark.parametrize("cache_dtype", [torch.float32, torch.bfloat16])
def test_fused_step_matches_the_eager_layers(fixture, weights, cache_dtype, request, monkeypatch):
    """Same hidden states and the same keys/values written, for sequences of different lengths."""
    if weights == "int4":  # float activations: both paths do the same float arithmetic
        monkeypatch.setenv("PAGELLM_INT4_ACT", "float")
    else:
        monkeypatch.delenv("PAGELLM_INT4_ACT", raising=False)
    loose = weights == "int4-q8"
    weights = weights.removesuffix("-q8")
    path = request.getfixturevalue(fixture)
    dtype = torch.bfloat16 if weights == "bfloat16" else torch.float32
    if weights == "bfloat16":  # bf16 weights under float32 activations: the branch of CPUs without native bf16
        monkeypatch.setattr(kernels, "cpu_features", lambda: CpuFeatures.from_flags("avx2 fma"))
    model = load_model(resolve_model(path), dtype, None if weights in ("float32", "bfloat16") else weights)
    ids, positions, slots, table, seq_lens, used = _decode_inputs(model, [1, 6, 13], block_size=4)
    eager_caches = _caches(model, used + 1, 4, cache_dtype, seed=2)
    fused_caches = [(k.clone(), v.clone()) for k, v in eager_caches]
    stack = model.fused_decoder(fused_caches)
    assert stack is not None and stack.num_layers() == len(model.layers)
    with torch.inference_mode():
        expected = model.decode_forward(ids, positions, eager_caches, slots, table, seq_lens)
        got = stack.forward(model.embed_tokens(ids), positions, slots, table, seq_lens)
    # int4-q8: the two paths round a few floats differently (e.g. rotary as an FMA), and an
    # activation at a rounding edge of its int8 step moves by one step
    tol = dict(atol=3e-2, rtol=3e-2) if loose else dict(atol=1e-4, rtol=1e-4)
    torch.testing.assert_close(got, expected, **tol)
    for (ek, ev), (fk, fv) in zip(eager_caches, fused_caches):
        torch.testing.assert_close(fk.float(), ek.float(), **tol)
        torch.testing.assert_close(fv.float(), ev.float(), **tol)


def test_fused_stack_rejects_bad_positions_and_slots(tiny_llama_dir):
    model = load_model(resolve_model(tiny_llama_dir), torch.float32)
    ids, positions, slots, table, seq_lens, used = _decode_inputs(model, [5], block_size=4)
    stack = model.fused_decoder(_caches(model, used, 4, torch.float32, seed=0))
    x = model.embed_tokens(ids)
    with torch.inference_mode():
        with pytest.raises(RuntimeError, match="outside the KV cache"):
            stack.forward(x, positions, torch.tensor([used * 4]), table, seq_lens)
        with pytest.raises(RuntimeError, match="past the rotary table"):
            stack.forward(x, torch.tensor([10**6]), slots, table, seq_lens)


@pytest.mark.parametrize("quantization", [None, "int4"])
def test_engine_greedy_and_logprobs_are_the_same_with_the_fused_stack(quantization, tiny_llama_dir, monkeypatch):
    """The runner takes the stack for decode-only steps of up to FUSED_MAX_ROWS sequences."""
    kwargs = dict(dtype="float32", quantization=quantization, num_blocks=64, block_size=4)
    prompts = ["Once upon a time", "The capital of France is", "1 2 3 4", "Hello"]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True, logprobs=2)
    monkeypatch.setenv("PAGELLM_INT4_ACT", "float")  # int8 activations would amplify float rounding
    monkeypatch.setenv("PAGELLM_FUSED_DECODE", "0")
    eager = LLM(tiny_llama_dir, **kwargs)
    assert eager.llm_engine.core.worker.runner.fused_decode is None
    a = eager.generate(prompts, params, use_tqdm=False)
    monkeypatch.delenv("PAGELLM_FUSED_DECODE")
    fused = LLM(tiny_llama_dir, **kwargs)
    assert fused.llm_engine.core.worker.runner.fused_decode is not None
    b = fused.generate(prompts, params, use_tqdm=False)
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids
        for lx, ly in zip(x.outputs[0].logprobs, y.outputs[0].logprobs):
            assert lx.keys() == ly.keys()
            assert all(abs(lx[t] - ly[t]) < 1e-3 for t in lx)


def test_no_fused_stack_with_lora_a_float16_cache_or_without_kernels(tiny_llama_dir, monkeypatch):
    from pagellm.worker.model_runner import ModelRunner

    model = load_model(resolve_model(tiny_llama_dir), torch.float32)
    model.kernel_plan = kernels.TORCH_PATHS  # no C++ kernels
    assert model.fused_decoder(_caches(model, 2, 4, torch.float32, seed=0)) is None
    llm = LLM(tiny_llama_dir, dtype="float32", enable_lora=True, num_blocks=16, block_size=4)
    runner = llm.llm_engine.core.worker.runner
    assert isinstance(runner, ModelRunner) and runner.fused_decode is None
    # a float16 KV cache has no stack kernel: the engine runs layer by layer and still generates
    llm = LLM(tiny_llama_dir, dtype="float32", kv_cache_dtype="float16", num_blocks=16, block_size=4)
    assert llm.llm_engine.core.worker.runner.fused_decode is None
    out = llm.generate(["Hello"], SamplingParams(temperature=0, max_tokens=3, ignore_eos=True), use_tqdm=False)
    assert len(out[0].outputs[0].token_ids) == 3
