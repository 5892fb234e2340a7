"""Shared fixtures: tiny random models built locally (never downloaded) and the bundled model."""

from __future__ import annotations

import os

os.environ["HF_HUB_OFFLINE"] = "1"
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

import pytest  # noqa: E402
import torch  # noqa: E402

from pagellm.model_source import resolve_model  # noqa: E402
from pagellm.tokenizer import load_hf_tokenizer  # noqa: E402


def pytest_collection_modifyitems(config, items) -> None:
    """Tests marked `gpu` (selected with `-m gpu`) are skipped where torch sees no CUDA device."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs a CUDA GPU")
    for item in items:
        if "gpu" in item.keywords:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def bundled_tokenizer():
    return load_hf_tokenizer(resolve_model(None))


def _save_tiny(path, config, tokenizer) -> str:
    from transformers import AutoModelForCausalLM

    torch.manual_seed(0)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    # Larger-than-default weights make logits spread out, so greedy ties are rare.
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, 0.08)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def tiny_llama_dir(tmp_path_factory, bundled_tokenizer) -> str:
    """A 2-layer GQA Llama with the bundled tokenizer (so text prompts work)."""
    from transformers import LlamaConfig

    config = LlamaConfig(
        vocab_size=len(bundled_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
        tie_word_embeddings=False, bos_token_id=bundled_tokenizer.bos_token_id,
        eos_token_id=bundled_tokenizer.eos_token_id,
    )
    config.architectures = ["LlamaForCausalLM"]
    return _save_tiny(tmp_path_factory.mktemp("tiny_llama"), config, bundled_tokenizer)


@pytest.fixture(scope="session")
def tiny_qwen2_dir(tmp_path_factory, bundled_tokenizer) -> str:
    """A 2-layer Qwen2 (q/k/v biases, tied embeddings, llama3-free default rope)."""
    from transformers import Qwen2Config

    config = Qwen2Config(
        vocab_size=len(bundled_tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
        num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512, tie_word_embeddings=True,
        bos_token_id=bundled_tokenizer.bos_token_id, eos_token_id=bundled_tokenizer.eos_token_id,
    )
    config.architectures = ["Qwen2ForCausalLM"]
    return _save_tiny(tmp_path_factory.mktemp("tiny_qwen2"), config, bundled_tokenizer)


@pytest.fixture(scope="session")
def tiny_llm(tiny_llama_dir):
    """An fp32 engine over the tiny Llama, shared by tests that don't change engine settings."""
    from pagellm import LLM

    return LLM(tiny_llama_dir, dtype="float32", max_num_seqs=8, max_num_batched_tokens=64, block_size=4,
               num_blocks=512)
