"""--compile: the torch.compile'd decode step gives the eager engine's greedy tokens."""

from __future__ import annotations

import pytest

from pagellm import LLM, SamplingParams
from pagellm.errors import InvalidRequest
from pagellm.model.layers.kernels import load_kernel

pytestmark = pytest.mark.skipif(load_kernel() is None, reason="--compile needs the C++ kernels")


@pytest.mark.parametrize("quantization", ["int4", pytest.param("none", marks=pytest.mark.slow)])
def test_compiled_decode_equals_eager(tiny_llama_dir, quantization, monkeypatch):
    # int8 activations (the int4 default) turn float rounding differences between the fused eager
    # step and inductor's code into different tokens; with float activations both must agree
    monkeypatch.setenv("PAGELLM_INT4_ACT", "float")
    prompts = ["Once upon a time", "The capital of France is", "1 2 3 4", "A"]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    kwargs = dict(dtype="float32", quantization=quantization, num_blocks=128, block_size=4, max_num_seqs=4)
    eager = LLM(tiny_llama_dir, **kwargs)
    compiled = LLM(tiny_llama_dir, compile=True, **kwargs)
    runner = compiled.llm_engine.core.worker.runner
    assert runner.compiled_decode is not None
    calls = []
    graph = runner.compiled_decode
    runner.compiled_decode = lambda *a: calls.append(a[0].shape[0]) or graph(*a)
    expected = [o.outputs[0].token_ids for o in eager.generate(prompts, params, use_tqdm=False)]
    got = [o.outputs[0].token_ids for o in compiled.generate(prompts, params, use_tqdm=False)]
    assert got == expected
    assert calls and max(calls) == 4  # decode-only steps went through the compiled graph, batched
    # one request alone (batch 1, its own specialized graph)
    alone = compiled.generate(prompts[:1], params, use_tqdm=False)[0].outputs[0].token_ids
    assert alone == expected[0] and 1 in calls


def test_compile_with_lora_is_a_clear_error(tiny_llama_dir):
    with pytest.raises(InvalidRequest, match="--compile cannot be combined with LoRA"):
        LLM(tiny_llama_dir, dtype="float32", compile=True, enable_lora=True, num_blocks=32)
