"""Fixtures for task adaptation: a tiny random BERT encoder and the committed sentiment subset."""

from __future__ import annotations

from pathlib import Path

import pytest
import torch

SENTIMENT = Path(__file__).resolve().parents[1] / "data" / "sentiment"


@pytest.fixture(scope="session")
def sentiment_dir() -> Path:
    """tests/data/sentiment: 200/60/60 movie lines and 60 tweets (see its README for the attribution)."""
    return SENTIMENT


@pytest.fixture(scope="session")
def tiny_bert_dir(tmp_path_factory) -> str:
    """A 2-layer random BertModel (like all-MiniLM-L6-v2's folder, no head) with MiniLM's tokenizer."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from pagellm.model_source import bundled_encoder_path

    tokenizer = AutoTokenizer.from_pretrained(str(bundled_encoder_path()), local_files_only=True)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, type_vocab_size=2)
    config.architectures = ["BertModel"]
    torch.manual_seed(0)
    model = BertModel(config)
    path = tmp_path_factory.mktemp("tiny_bert")
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)


@pytest.fixture(scope="session")
def make_args(sentiment_dir):
    """FinetuneArgs for a fast run on the movies subset: 16 train rows, 1 epoch, no progress bar."""
    from pagellm.adapt.finetune import FinetuneArgs

    def make(model: str, out: Path, **overrides) -> FinetuneArgs:
        settings = dict(model=model, out=str(out), data=str(sentiment_dir / "movies" / "train.jsonl"), epochs=1.0,
                        lr=1e-2, warmup=0.0, batch_size=8, max_length=96, max_train_samples=16, progress=False,
                        logging_steps=100)
        settings.update(overrides)
        return FinetuneArgs(**settings)

    return make


@pytest.fixture(scope="session")
def decoder_lora_run(tmp_path_factory, tiny_llama_dir, make_args, sentiment_dir):
    """A LoRA label-word adapter on the tiny Llama (16 train rows, 8 dev rows, 1 epoch)."""
    from pagellm.adapt.finetune import run_finetune

    out = tmp_path_factory.mktemp("dec_lora") / "adapter"
    return run_finetune(make_args(tiny_llama_dir, out, strategy="lora", eval_data=str(sentiment_dir / "movies" /
                                                                                       "dev.jsonl"),
                                  max_eval_samples=8, dropout=0.05))
