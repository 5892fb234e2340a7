"""Llama-family decoders as pooling models (no KV cache, packed causal forward) against HF transformers."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

from pagellm import LLM, InvalidRequest
from pagellm.model.layers.attention import packed_causal_metadata, paged_attention

TEXTS = ["A short one.", "ok", "Packing sequences end to end wastes no compute on padding tokens, even when "
         "one of them is much longer than the others in the batch.", "Paris is the capital of France."]
LABELS = {0: "negative", 1: "neutral", 2: "positive"}


def _save_classifier(path, config, tokenizer) -> str:
    from transformers import AutoModelForSequenceClassification

    torch.manual_seed(0)
    model = AutoModelForSequenceClassification.from_config(config, dtype=torch.float32)
    with torch.no_grad():  # spread-out weights, so the probabilities differ across texts and labels
        for name, p in model.named_parameters():
            if p.dim() > 1:
                p.normal_(0.0, 1.0 if name.startswith("score") else 0.08)
            elif name.endswith("bias"):
                p.normal_(0.0, 0.05)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)


def _config(arch: str, tokenizer):
    from transformers import LlamaConfig, Qwen2Config

    common = dict(vocab_size=len(tokenizer), hidden_size=64, intermediate_size=128, num_hidden_layers=2,
                  num_attention_heads=4, max_position_embeddings=512, num_labels=3, id2label=LABELS,
                  label2id={v: k for k, v in LABELS.items()}, pad_token_id=tokenizer.pad_token_id or 0)
    if arch.startswith("Qwen2"):
        config = Qwen2Config(num_key_value_heads=1, tie_word_embeddings=True, **common)
    else:
        config = LlamaConfig(num_key_value_heads=2, rms_norm_eps=1e-5, **common)
    config.architectures = [arch]
    return config


@pytest.fixture(scope="module", params=["LlamaForSequenceClassification", "Qwen2ForSequenceClassification"])
def tiny_decoder_classifier_dir(request, tmp_path_factory, bundled_tokenizer) -> str:
    return _save_classifier(tmp_path_factory.mktemp(request.param), _config(request.param, bundled_tokenizer),
                            bundled_tokenizer)


def test_decoder_classifier_probs_match_transformers(tiny_decoder_classifier_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    llm = LLM(tiny_decoder_classifier_dir, task="classify", dtype="float32")
    outs = llm.classify(TEXTS, use_tqdm=False)  # one packed forward over mixed lengths
    hf = AutoModelForSequenceClassification.from_pretrained(tiny_decoder_classifier_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_decoder_classifier_dir)
    with torch.no_grad():  # one text at a time: HF pools at the last token, no padding involved
        ref = torch.cat([torch.softmax(hf(**tokenizer(t, return_tensors="pt")).logits, -1) for t in TEXTS])
    mine = torch.tensor([o.outputs.probs for o in outs])
    assert torch.allclose(mine, ref, atol=1e-4), (mine - ref).abs().max()
    assert ref.std() > 0.01  # not vacuous: probabilities differ across texts and labels
    assert outs[0].outputs.labels == ["negative", "neutral", "positive"]
    assert [o.prompt_token_ids for o in outs] == [tokenizer(t)["input_ids"] for t in TEXTS]


def test_decoder_embeddings_are_the_normalized_last_hidden_state(tiny_llama_dir):
    from transformers import AutoModel, AutoTokenizer

    llm = LLM(tiny_llama_dir, task="embed", dtype="float32")
    assert llm.llm_engine.pooler_config.pooling_type == "last" and llm.llm_engine.core is None
    mine = torch.tensor([o.outputs.embedding for o in llm.embed(TEXTS, use_tqdm=False)])
    hf = AutoModel.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    tokenizer = AutoTokenizer.from_pretrained(tiny_llama_dir)
    with torch.no_grad():
        ref = torch.stack([hf(**tokenizer(t, return_tensors="pt")).last_hidden_state[0, -1] for t in TEXTS])
    assert torch.allclose(mine, F.normalize(ref, dim=-1), atol=1e-5), (mine - F.normalize(ref, dim=-1)).abs().max()


def test_generate_only_architectures_cannot_classify(tiny_llama_dir):
    with pytest.raises(InvalidRequest, match="cannot run task 'classify'.*LlamaForSequenceClassification"):
        LLM(tiny_llama_dir, task="classify")


def test_cache_free_attention_is_causal_within_each_sequence_only():
    torch.manual_seed(0)
    seq_lens = [3, 1, 5]
    q, k, v = torch.randn(9, 4, 8), torch.randn(9, 2, 8), torch.randn(9, 2, 8)
    out = paged_attention(q, k, v, None, None, packed_causal_metadata(seq_lens), scale=8**-0.5)
    start = 0
    for n in seq_lens:  # reference: each sequence alone, GQA by repeating the KV heads
        qs, ks, vs = (t[start : start + n].transpose(0, 1) for t in (q, k, v))
        ref = F.scaled_dot_product_attention(qs, ks.repeat_interleave(2, 0), vs.repeat_interleave(2, 0),
                                             is_causal=True, scale=8**-0.5).transpose(0, 1)
        assert torch.allclose(out[start : start + n], ref, atol=1e-6)
        start += n
