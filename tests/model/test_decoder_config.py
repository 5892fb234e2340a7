"""DecoderConfig (no transformers) gives the model the values transformers' config classes give it."""

from __future__ import annotations

import json

import pytest
import torch

from pagellm.model.loader.decoder_config import DecoderConfig
from pagellm.model.loader.hf_loader import load_config, load_hf_config
from pagellm.model.loader.model_loader import GGUF_PACKED_KIND, _gguf_packed_weights
from pagellm.model.models.llama import rope_settings
from pagellm.model.models.registry import get_model_class
from pagellm.model_source import resolve_model

# every config attribute the model, the loaders and the engine read
READ_ATTRS = ["architectures", "model_type", "vocab_size", "hidden_size", "intermediate_size", "num_hidden_layers",
              "num_attention_heads", "num_key_value_heads", "head_dim", "max_position_embeddings", "rms_norm_eps",
              "tie_word_embeddings", "attention_bias", "mlp_bias", "bos_token_id", "eos_token_id", "pad_token_id"]
SMALL = dict(hidden_size=64, intermediate_size=128, num_hidden_layers=2, num_attention_heads=4, vocab_size=100)
CONFIGS = {
    "llama-defaults": dict(SMALL, model_type="llama", architectures=["LlamaForCausalLM"]),
    "llama-legacy-linear": dict(SMALL, model_type="llama", architectures=["LlamaForCausalLM"], num_key_value_heads=2,
                                rope_theta=500000.0, rope_scaling={"type": "linear", "factor": 2.0},
                                tie_word_embeddings=True, max_position_embeddings=256, rms_norm_eps=1e-5,
                                bos_token_id=0, eos_token_id=[1, 2]),
    "llama3-no-original-len": dict(SMALL, model_type="llama", architectures=["LlamaForCausalLM"],
                                   max_position_embeddings=512, rope_theta=500000.0,
                                   rope_scaling={"rope_type": "llama3", "factor": 8.0, "low_freq_factor": 1.0,
                                                 "high_freq_factor": 4.0}),
    "llama3": dict(SMALL, model_type="llama", architectures=["LlamaForCausalLM"], max_position_embeddings=512,
                   rope_scaling={"rope_type": "llama3", "factor": 4.0, "low_freq_factor": 1.0, "high_freq_factor": 2.0,
                                 "original_max_position_embeddings": 128}),
    "llama-v5-layout": dict(SMALL, model_type="llama", architectures=["LlamaForCausalLM"], head_dim=32,
                            attention_bias=True, mlp_bias=True,
                            rope_parameters={"rope_type": "default", "rope_theta": 100000.0}),
    "qwen2": dict(SMALL, model_type="qwen2", architectures=["Qwen2ForCausalLM"], num_key_value_heads=2,
                  rope_theta=1000000.0, tie_word_embeddings=True, max_position_embeddings=1024),
    "qwen2-defaults": dict(SMALL, model_type="qwen2", architectures=["Qwen2ForCausalLM"], num_attention_heads=32,
                           hidden_size=256),
    "mistral": dict(SMALL, model_type="mistral", architectures=["MistralForCausalLM"], num_attention_heads=8,
                    head_dim=None, sliding_window=4096, max_position_embeddings=2048),
}


def _write(folder, data: dict):
    folder.mkdir(parents=True, exist_ok=True)
    (folder / "config.json").write_text(json.dumps(data))
    return folder


def assert_same_model_view(ours, theirs) -> None:
    for name in READ_ATTRS:
        assert getattr(ours, name, None) == getattr(theirs, name, None), name
    assert rope_settings(ours) == rope_settings(theirs)
    cls = get_model_class(ours.architectures)
    with torch.device("meta"):
        a, b = cls(ours), cls(theirs)
    assert [(n, p.shape) for n, p in a.named_parameters()] == [(n, p.shape) for n, p in b.named_parameters()]
    assert (a.head_dim, a.num_kv_heads, a.tie_word_embeddings) == (b.head_dim, b.num_kv_heads, b.tie_word_embeddings)
    assert torch.equal(a.rotary.cos, b.rotary.cos) and torch.equal(a.rotary.sin, b.rotary.sin)


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_config_json_reads_as_transformers_reads_it(tmp_path, name):
    folder = _write(tmp_path / name, CONFIGS[name])
    ours = load_config(folder)
    assert isinstance(ours, DecoderConfig)
    assert_same_model_view(ours, load_hf_config(folder))


@pytest.mark.parametrize("name", sorted(CONFIGS))
def test_saved_config_round_trips_through_transformers(tmp_path, name):
    config = DecoderConfig.from_dict(CONFIGS[name])
    config.save_pretrained(tmp_path)
    assert_same_model_view(config, load_hf_config(tmp_path))
    assert DecoderConfig.from_folder(tmp_path).to_dict() == config.to_dict()


def test_bundled_gguf_config_reads_as_transformers_reads_it():
    source = resolve_model(None)
    config, _ = _gguf_packed_weights(source)
    assert isinstance(config, DecoderConfig)
    from pagellm.model_source import gguf_cache_dir

    assert_same_model_view(config, load_hf_config(gguf_cache_dir(source.path, GGUF_PACKED_KIND)))
    assert (config.hidden_size, config.num_key_value_heads, config.tie_word_embeddings) == (576, 3, True)


def test_other_model_types_load_through_transformers(tmp_path):
    folder = _write(tmp_path / "bert", {"model_type": "bert", "architectures": ["BertModel"], "hidden_size": 64,
                                        "num_attention_heads": 4, "num_hidden_layers": 1, "intermediate_size": 128})
    config = load_config(folder)
    assert not isinstance(config, DecoderConfig) and config.hidden_size == 64
