"""Tiny random models against HF transformers: fp32 logits and greedy continuations."""

from __future__ import annotations

import pytest
import torch

from pagellm import LLM, SamplingParams
from pagellm.core.sched_output import ScheduledRequest, SchedulerOutput
from pagellm.model.loader.model_loader import load_model
from pagellm.model_source import resolve_model
from pagellm.worker.input_batch import build_inputs
from pagellm.worker.model_runner import ModelRunner


def _hf(path):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()


def _pagellm_prefill_logits(path: str, ids: list[int]) -> torch.Tensor:
    model = load_model(resolve_model(path), torch.float32)
    block_size = 4
    runner = ModelRunner(model, num_blocks=64, block_size=block_size, dtype=torch.float32)
    req = ScheduledRequest("r", ids, 0, list(range(1, 1 + (len(ids) + 3) // 4)), True, SamplingParams(),
                           ids, len(ids))
    inputs = build_inputs(SchedulerOutput([req]), block_size)
    with torch.inference_mode():
        hidden = model(inputs.input_ids, inputs.positions, runner.kv_caches, inputs.attn_meta)
        return model.compute_logits(hidden)


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_prefill_logits_match_transformers(fixture, request):
    path = request.getfixturevalue(fixture)
    ids = list(range(100, 137))
    ours = _pagellm_prefill_logits(path, ids)
    with torch.inference_mode():
        ref = _hf(path)(torch.tensor([ids])).logits[0]
    assert ours.shape == ref.shape
    assert (ours - ref).abs().max().item() < 1e-4


@pytest.mark.parametrize("fixture", ["tiny_llama_dir", "tiny_qwen2_dir"])
def test_greedy_32_tokens_match_transformers(fixture, request):
    path = request.getfixturevalue(fixture)
    prompts = [[5, 17, 300, 2000, 42], list(range(1000, 1019)), [7]]
    llm = LLM(path, dtype="float32", block_size=4, num_blocks=128, max_num_batched_tokens=16)
    outs = llm.generate(prompts, SamplingParams(temperature=0, max_tokens=32, ignore_eos=True), use_tqdm=False)
    hf = _hf(path)
    for prompt, out in zip(prompts, outs):
        ref = hf.generate(torch.tensor([prompt]), max_new_tokens=32, min_new_tokens=32, do_sample=False)
        assert out.outputs[0].token_ids == ref[0, len(prompt):].tolist()
        assert out.outputs[0].finish_reason == "length"


@pytest.mark.parametrize("rope_scaling", [
    {"rope_type": "linear", "factor": 4.0},
    {"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0, "high_freq_factor": 4.0,
     "original_max_position_embeddings": 64},
])
def test_rope_scaling_matches_transformers(rope_scaling, tmp_path, bundled_tokenizer):
    from transformers import LlamaConfig

    from tests.conftest import _save_tiny

    config = LlamaConfig(vocab_size=len(bundled_tokenizer), hidden_size=64, intermediate_size=128,
                         num_hidden_layers=2, num_attention_heads=4, num_key_value_heads=2,
                         max_position_embeddings=512, rope_theta=500000.0, rope_scaling=rope_scaling)
    config.architectures = ["LlamaForCausalLM"]
    path = _save_tiny(tmp_path / "scaled", config, bundled_tokenizer)
    ids = list(range(50, 250))  # long enough that the scaled low frequencies matter
    ours = _pagellm_prefill_logits(path, ids)
    with torch.inference_mode():
        ref = _hf(path)(torch.tensor([ids])).logits[0]
    assert (ours - ref).abs().max().item() < 1e-4
