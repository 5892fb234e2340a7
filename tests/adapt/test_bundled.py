"""The bundled models: `--model` aliases, and (slow) real fine-tuning runs on them."""

from __future__ import annotations

import json

import pytest

from pagellm.adapt.base_model import resolve_base_model
from pagellm.adapt.evaluate import EvaluateArgs, run_evaluate
from pagellm.adapt.finetune import run_finetune
from pagellm.model_source import bundled_encoder_path, bundled_gguf_path


def test_model_aliases_and_paths(tiny_bert_dir, tiny_llama_dir):
    default, smollm2, minilm = resolve_base_model(None), resolve_base_model("SmolLM2"), resolve_base_model("minilm")
    assert default.is_decoder and default.source.path == bundled_gguf_path() and default.source.format == "gguf"
    assert smollm2.source == default.source
    assert not minilm.is_decoder and minilm.source.path == bundled_encoder_path()
    assert resolve_base_model(tiny_llama_dir).kind == "decoder" and resolve_base_model(tiny_bert_dir).kind == "encoder"
    assert resolve_base_model(str(bundled_gguf_path())).is_decoder


@pytest.mark.slow
def test_minilm_head_finetune_and_engine_evaluate(tmp_path, make_args, sentiment_dir):
    result = run_finetune(make_args("minilm", tmp_path / "m", strategy="head", lr=1e-2, epochs=2.0,
                                    max_train_samples=64, max_length=64))
    assert result.model_kind == "encoder" and result.num_trainable_params == 384 * 2 + 2
    evaluation = run_evaluate(EvaluateArgs(data=str(sentiment_dir / "movies" / "test.jsonl"),
                                           adapter=str(result.out_dir), progress=False))
    assert evaluation.num_samples == 60 and 0.0 <= evaluation.summary.accuracy <= 1.0


@pytest.mark.slow
def test_smollm2_gguf_lora_finetune_then_engine_evaluate(tmp_path, make_args, sentiment_dir):
    """About a minute: the GGUF loads dequantized to fp32 for training; the engine then serves the adapter."""
    result = run_finetune(make_args(None, tmp_path / "s", strategy="lora", lr=2e-4, max_train_samples=8,
                                    max_length=128, batch_size=4))
    task = json.loads((result.out_dir / "pagellm_task.json").read_text())
    assert task["base_model"] == "smollm2" and task["model_kind"] == "decoder"
    assert json.loads((result.out_dir / "adapter_config.json").read_text())["peft_type"] == "LORA"
    evaluation = run_evaluate(EvaluateArgs(data=str(sentiment_dir / "movies" / "test.jsonl"),
                                           adapter=str(result.out_dir), max_samples=8, progress=False))
    assert evaluation.summary.labels == ["negative", "positive"] and evaluation.num_samples == 8
