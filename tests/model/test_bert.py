"""BERT encoders against HF transformers: the bundled MiniLM's embeddings, tiny random models, packing."""

from __future__ import annotations

import random

import pytest
import torch
import torch.nn.functional as F

from pagellm import LLM
from pagellm.errors import InvalidRequest
from pagellm.model.models.bert import BertForSequenceClassification, BertModel
from pagellm.model_source import bundled_encoder_path

WORDS = ("the a cat dog sat on mat quickly running river mountain blue green seven eleven algorithm "
         "compute tensor paris london music quiet loud happy sad bright dark coffee tea morning night "
         "engine paged cache token sequence encoder packing, well! why? 42 3.14 naïve café résumé").split()


def make_texts(num: int, max_words: int = 120, seed: int = 0) -> list[str]:
    """Synthetic sentences of 1..max_words words, shuffled lengths."""
    rng = random.Random(seed)
    return [" ".join(rng.choice(WORDS) for _ in range(rng.randint(1, max_words))) for _ in range(num)]


def hf_mean_pooled(model, tokenizer, texts: list[str], normalize: bool = True) -> torch.Tensor:
    """sentence-transformers' recipe: masked mean of the last hidden state, then L2 normalize."""
    batch = tokenizer(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        hidden = model(**batch).last_hidden_state  # [B, L, hidden]
    mask = batch["attention_mask"][..., None].float()
    pooled = (hidden * mask).sum(1) / mask.sum(1)
    return F.normalize(pooled, dim=-1) if normalize else pooled


@pytest.fixture(scope="module")
def minilm_llm() -> LLM:
    return LLM(task="embed", dtype="float32")


@pytest.fixture(scope="module")
def hf_minilm():
    from transformers import AutoModel, AutoTokenizer

    path = str(bundled_encoder_path())
    return AutoModel.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)


def test_minilm_embeddings_match_transformers_on_100_mixed_length_texts(minilm_llm, hf_minilm):
    texts = make_texts(100)
    outs = minilm_llm.embed(texts, use_tqdm=False)  # one call: packed, no padding
    mine = torch.tensor([o.outputs.embedding for o in outs])
    model, tokenizer = hf_minilm
    order = sorted(range(100), key=lambda i: len(texts[i]))  # similar lengths per HF batch: little padding
    ref = torch.empty(100, 384)
    for i in range(0, 100, 20):
        ref[order[i : i + 20]] = hf_mean_pooled(model, tokenizer, [texts[j] for j in order[i : i + 20]])
    cos = F.cosine_similarity(mine, ref, dim=-1)
    assert cos.min() >= 0.9999, cos.min()
    assert mine.shape == (100, 384) and torch.allclose(mine.norm(dim=-1), torch.ones(100), atol=1e-5)
    assert [len(o.prompt_token_ids) for o in outs] == [len(tokenizer(t)["input_ids"]) for t in texts]
    assert outs[7].prompt == texts[7] and outs[7].finished


def test_packed_batch_equals_one_at_a_time(minilm_llm):
    texts = make_texts(8, max_words=60, seed=1)
    batched = [o.outputs.embedding for o in minilm_llm.embed(texts, use_tqdm=False)]
    alone = [minilm_llm.embed(t, use_tqdm=False)[0].outputs.embedding for t in texts]
    assert torch.allclose(torch.tensor(batched), torch.tensor(alone), atol=1e-5)


def test_token_id_prompts_equal_text_prompts(minilm_llm):
    texts = make_texts(3, seed=2)
    ids = [minilm_llm.get_tokenizer()(t)["input_ids"] for t in texts]
    by_text = torch.tensor([o.outputs.embedding for o in minilm_llm.embed(texts, use_tqdm=False)])
    by_ids = torch.tensor([o.outputs.embedding for o in minilm_llm.embed(ids, use_tqdm=False)])
    assert torch.allclose(by_text, by_ids, atol=1e-6)


def _tiny_bert_config(tokenizer, **overrides):
    from transformers import BertConfig

    config = dict(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                  intermediate_size=64, max_position_embeddings=128, type_vocab_size=2)
    return BertConfig(**{**config, **overrides})


def _randomize(model: torch.nn.Module) -> None:
    torch.manual_seed(0)
    with torch.no_grad():  # spread-out weights: differences show, probabilities are not all 1/num_labels
        for name, p in model.named_parameters():
            if "LayerNorm.weight" in name:
                p.normal_(1.0, 0.1)
            else:
                p.normal_(0.0, 1.0 if name.startswith("classifier") else 0.15 if p.dim() > 1 else 0.05)


@pytest.fixture(scope="module")
def tiny_bert_classifier_dir(tmp_path_factory, hf_minilm) -> str:
    """A 2-layer random BertForSequenceClassification with MiniLM's tokenizer and named labels."""
    _, tokenizer = hf_minilm
    return save_tiny_bert_classifier(tmp_path_factory.mktemp("tiny_bert_cls"), tokenizer, num_labels=3,
                                     id2label={0: "negative", 1: "neutral", 2: "positive"},
                                     label2id={"negative": 0, "neutral": 1, "positive": 2})


def save_tiny_bert_classifier(path, tokenizer, **config_overrides) -> str:
    """A 2-layer random BertForSequenceClassification (weights from _randomize) and `tokenizer`, saved at path."""
    from transformers import BertForSequenceClassification as HFBertForSequenceClassification

    config = _tiny_bert_config(tokenizer, **config_overrides)
    config.architectures = ["BertForSequenceClassification"]
    model = HFBertForSequenceClassification(config).eval()
    _randomize(model)
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)


def test_tiny_classifier_probs_match_transformers(tiny_bert_classifier_dir):
    from transformers import AutoModelForSequenceClassification, AutoTokenizer

    texts = make_texts(20, max_words=40, seed=3)
    llm = LLM(tiny_bert_classifier_dir, task="classify", dtype="float32")
    outs = llm.classify(texts, use_tqdm=False)
    hf = AutoModelForSequenceClassification.from_pretrained(tiny_bert_classifier_dir, dtype=torch.float32).eval()
    batch = AutoTokenizer.from_pretrained(tiny_bert_classifier_dir)(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ref = torch.softmax(hf(**batch).logits, dim=-1)
    mine = torch.tensor([o.outputs.probs for o in outs])
    assert torch.allclose(mine, ref, atol=1e-5), (mine - ref).abs().max()
    assert ref.std() > 0.01  # the check is not vacuous: probabilities differ across texts and labels
    first = outs[0].outputs
    assert first.labels == ["negative", "neutral", "positive"] and first.num_classes == 3
    assert first.label_probs == dict(zip(first.labels, first.probs))
    assert first.label == first.labels[int(torch.tensor(first.probs).argmax())]
    assert abs(sum(first.probs) - 1.0) < 1e-5


@pytest.mark.parametrize("hidden_act", ["gelu", "gelu_new"])
def test_bert_model_with_token_types_matches_transformers(hf_minilm, hidden_act):
    from transformers import BertModel as HFBertModel

    config = _tiny_bert_config(hf_minilm[1], hidden_act=hidden_act)
    hf = HFBertModel(config).eval()
    _randomize(hf)
    mine = BertModel(config)
    mine.load_weights(hf.state_dict().items())
    seq_lens = [5, 11, 2]
    ids = [torch.randint(1000, 2000, (n,)) for n in seq_lens]
    types = [(torch.arange(n) >= n // 2).long() for n in seq_lens]  # a second segment in each
    with torch.no_grad():
        got = mine(torch.cat(ids), torch.cat([torch.arange(n) for n in seq_lens]), seq_lens, torch.cat(types))
        want = torch.cat([hf(input_ids=i[None], token_type_ids=t[None]).last_hidden_state[0]
                          for i, t in zip(ids, types)])
    assert torch.allclose(got, want, atol=1e-5), (got - want).abs().max()


def test_weight_loading_is_checked(hf_minilm):
    from transformers import BertForSequenceClassification as HFBertForSequenceClassification

    config = _tiny_bert_config(hf_minilm[1], num_labels=2)
    weights = dict(HFBertForSequenceClassification(config).state_dict())
    BertForSequenceClassification(config).load_weights(weights.items())  # complete: loads
    missing = {k: v for k, v in weights.items() if "layer.1.attention.self.key" not in k}
    with pytest.raises(ValueError, match=r"missing.*layers\.1\.attn\.qkv_proj"):
        BertForSequenceClassification(config).load_weights(missing.items())
    with pytest.raises(ValueError, match="shape"):
        BertForSequenceClassification(config).load_weights({**weights, "classifier.bias": torch.zeros(5)}.items())
    with pytest.raises(ValueError, match="unexpected weight"):
        BertForSequenceClassification(config).load_weights({**weights, "bert.encoder.extra.w": torch.zeros(1)}.items())


def test_unsupported_bert_variants_are_refused(hf_minilm):
    with pytest.raises(InvalidRequest, match="position_embedding_type"):
        BertModel(_tiny_bert_config(hf_minilm[1], position_embedding_type="relative_key"))
    with pytest.raises(InvalidRequest, match="hidden_act"):
        BertModel(_tiny_bert_config(hf_minilm[1], hidden_act="mish"))
