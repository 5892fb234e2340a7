"""--kv-cache-dtype bfloat16 under float32 activations: half the cache bytes, nearly the same logits."""

from __future__ import annotations

import pytest
import torch

from pagellm import LLM, SamplingParams


def test_bf16_cache_under_float32_activations(tiny_llama_dir):
    kwargs = dict(dtype="float32", num_blocks=64, block_size=4, max_num_batched_tokens=8)  # chunked prefill
    full = LLM(tiny_llama_dir, **kwargs)
    half = LLM(tiny_llama_dir, kv_cache_dtype="bfloat16", **kwargs)
    k_cache, _ = half.llm_engine.core.worker.runner.kv_caches[0]
    assert k_cache.dtype == torch.bfloat16 and half.llm_engine.info.compute_dtype == "float32"
    prompts = ["Once upon a time there was a", "The capital of France is the city of"]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True, logprobs=1)
    a = full.generate(prompts, params, use_tqdm=False)
    b = half.generate(prompts, params, use_tqdm=False)
    for x, y in zip(a, b):
        # the first token comes from a chunked prefill that read bf16 keys/values of earlier chunks
        assert x.outputs[0].token_ids[0] == y.outputs[0].token_ids[0]
        lp_x = x.outputs[0].logprobs[0][x.outputs[0].token_ids[0]]
        lp_y = y.outputs[0].logprobs[0][y.outputs[0].token_ids[0]]
        assert abs(lp_x - lp_y) < 0.05


def test_bad_kv_cache_dtype_is_a_clear_error(tiny_llama_dir):
    with pytest.raises(ValueError, match="kv_cache_dtype must be one of"):
        LLM(tiny_llama_dir, kv_cache_dtype="int8")
