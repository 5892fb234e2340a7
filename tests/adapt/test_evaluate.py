"""`pagellm evaluate`: runs in the pagellm engine, reports with scikit-learn, compares before/after;
bad inputs fail before the engine loads."""

from __future__ import annotations

import inspect
import json
from dataclasses import dataclass, field
from pathlib import Path

import pytest
import torch

import pagellm
from pagellm.adapt.data import read_classify_examples, subsample
from pagellm.adapt.evaluate import EvaluateArgs, run_evaluate
from pagellm.adapt.finetune import run_finetune
from pagellm.entrypoints.cli import main as cli_main
from pagellm.errors import InvalidRequest
from pagellm.label_prompt import encode_label_prompt, label_token_ids

LABELS = ["negative", "positive"]


@pytest.fixture(scope="module")
def encoder_head_dir(tmp_path_factory, tiny_bert_dir, make_args) -> Path:
    out = tmp_path_factory.mktemp("enc_head") / "model"
    run_finetune(make_args(tiny_bert_dir, out, strategy="head", lr=0.05, max_length=32))
    return out


def _hf_labels(folder: Path, texts: list[str]) -> list[str]:
    from transformers import AutoTokenizer

    from pagellm.adapt.pooled_classifier import load_classifier

    model = load_classifier(folder).eval()
    batch = AutoTokenizer.from_pretrained(str(folder))(texts, padding=True, return_tensors="pt")
    with torch.no_grad():
        ids = model(**batch).logits.argmax(-1).tolist()
    return [model.config.id2label[i] for i in ids]


def test_encoder_evaluate_runs_in_the_engine_and_matches_transformers(encoder_head_dir, sentiment_dir, tmp_path):
    from sklearn.metrics import accuracy_score, f1_score

    data = sentiment_dir / "movies" / "test.jsonl"
    result = run_evaluate(EvaluateArgs(data=str(data), adapter=str(encoder_head_dir), out_json=str(tmp_path / "r.json"),
                                       progress=False))
    rows = [json.loads(line) for line in data.read_text().splitlines()]
    gold = [r["label"] for r in rows]
    assert result.num_samples == len(rows) == 60
    assert result.predictions == _hf_labels(encoder_head_dir, [r["text"] for r in rows])
    assert result.summary.accuracy == pytest.approx(accuracy_score(gold, result.predictions))
    assert result.summary.macro_f1 == pytest.approx(f1_score(gold, result.predictions, average="macro",
                                                             zero_division=0))
    saved = json.loads((tmp_path / "r.json").read_text())
    assert saved["labels"] == LABELS and sum(map(sum, saved["confusion_matrix"])) == 60
    assert set(saved["per_class"]) == set(LABELS) and saved["predictions"] == result.predictions
    assert "precision" in result.format() and "gold \\ predicted" in result.format()


def test_cli_evaluate_compares_to_an_earlier_run(encoder_head_dir, sentiment_dir, tmp_path, capsys):
    before = {"model": "zero-shot", "data": "x", "num_samples": 60, "accuracy": 0.25, "macro_f1": 0.2,
              "per_class": {"negative": {"f1-score": 0.1}, "positive": {"f1-score": 0.3}}}
    (tmp_path / "before.json").write_text(json.dumps(before))
    code = cli_main(["evaluate", "--adapter", str(encoder_head_dir), "--data", str(sentiment_dir / "tweets" /
                     "test.jsonl"), "--max-samples", "20", "--out-json", str(tmp_path / "after.json"),
                     "--compare-to", str(tmp_path / "before.json"), "--no-progress"])
    assert code == 0
    printed = capsys.readouterr().out
    after = json.loads((tmp_path / "after.json").read_text())
    assert after["num_samples"] == 20
    accuracy_row = next(line for line in printed.splitlines() if line.startswith("accuracy "))
    assert accuracy_row.split() == ["accuracy", "0.2500", f"{after['accuracy']:.4f}",
                                    f"{after['accuracy'] - 0.25:+.4f}"]
    f1_row = next(line for line in printed.splitlines() if line.startswith("F1 positive"))
    assert f1_row.split()[2:4] == ["0.3000", f"{after['per_class']['positive']['f1-score']:.4f}"]


@pytest.fixture
def no_engine(monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("the engine was loaded before the bad input was rejected")

    monkeypatch.setattr(pagellm, "LLM", forbidden, raising=False)


def _write(path: Path, obj) -> str:
    path.parent.mkdir(parents=True, exist_ok=True)
    path.write_text(json.dumps(obj) if not isinstance(obj, list) else "".join(json.dumps(r) + "\n" for r in obj))
    return str(path)


def test_bad_evaluations_fail_before_the_engine_loads(encoder_head_dir, tiny_bert_dir, tmp_path, sentiment_dir,
                                                      no_engine):
    test = str(sentiment_dir / "movies" / "test.jsonl")
    neutral = _write(tmp_path / "n.jsonl", [{"text": "ok", "label": "neutral"}, {"text": "good", "label": "positive"}])
    with pytest.raises(InvalidRequest, match=r"labels \['neutral'\] that are not among the model's labels"):
        run_evaluate(EvaluateArgs(data=neutral, adapter=str(encoder_head_dir)))
    with pytest.raises(InvalidRequest, match="without a classification head"):
        run_evaluate(EvaluateArgs(data=test, model=tiny_bert_dir))
    prefix = tmp_path / "prefix"
    _write(prefix / "adapter_config.json", {"peft_type": "PREFIX_TUNING", "task_type": "SEQ_CLS"})
    with pytest.raises(InvalidRequest, match="PREFIX_TUNING adapter on an encoder, which the pagellm engine cannot"):
        run_evaluate(EvaluateArgs(data=test, adapter=str(prefix)))
    _write(tmp_path / "bad.json", {"no": "metrics"})
    with pytest.raises(InvalidRequest, match="not a pagellm evaluate JSON"):
        run_evaluate(EvaluateArgs(data=test, adapter=str(encoder_head_dir), compare_to=str(tmp_path / "bad.json")))


@dataclass
class FakeOutput:
    label: str
    label_probs: dict[str, float]


@dataclass
class FakeRequestOutput:
    outputs: FakeOutput


@dataclass
class FakeLLM:
    """Records how evaluate drives a decoder LLM; answers the first label for every text."""

    model: str
    kwargs: dict = field(default_factory=dict)
    calls: list = field(default_factory=list)
    instances = []

    def __init__(self, model, **kwargs):
        self.model, self.kwargs, self.calls = model, kwargs, []
        FakeLLM.instances.append(self)

    def classify(self, texts, **kwargs):
        self.calls.append((list(texts), kwargs))
        first, *rest = kwargs["labels"]
        return [FakeRequestOutput(FakeOutput(first, {first: 0.75, **{r: 0.25 / len(rest) for r in rest}}))
                for _ in texts]


def test_decoder_evaluate_drives_the_engine_with_labels_and_lora(tmp_path, tiny_llama_dir, sentiment_dir,
                                                                 monkeypatch):
    monkeypatch.setattr(pagellm, "LLM", FakeLLM, raising=False)
    FakeLLM.instances = []
    adapter = tmp_path / "adapter"
    _write(adapter / "adapter_config.json", {"peft_type": "LORA", "task_type": "CAUSAL_LM", "r": 4,
                                             "rank_pattern": {}, "base_model_name_or_path": "elsewhere"})
    _write(adapter / "pagellm_task.json", {"task": "classify", "labels": ["positive", "negative"],
                                           "instruction": "Mood? {labels}", "base_model": tiny_llama_dir,
                                           "model_kind": "decoder"})
    data = str(sentiment_dir / "movies" / "test.jsonl")
    result = run_evaluate(EvaluateArgs(data=data, adapter=str(adapter), max_samples=10))
    (llm,) = FakeLLM.instances
    assert Path(llm.model) == Path(tiny_llama_dir) and llm.kwargs == {"enable_lora": True, "max_lora_rank": 4,
                                                                      "dtype": "float32"}
    ((texts, kwargs),) = llm.calls
    assert len(texts) == 10 and kwargs["labels"] == ["positive", "negative"]
    assert kwargs["instruction"] == "Mood? {labels}" and kwargs["use_tqdm"] is True
    assert kwargs["lora_request"].lora_path == str(adapter) and kwargs["lora_request"].lora_int_id == 1
    assert result.predictions == ["positive"] * 10 and result.summary.labels == ["positive", "negative"]
    assert result.probabilities == [[0.75, 0.25]] * 10

    FakeLLM.instances = []
    FakeLLM.instances = []
    folder = tmp_path / "full"  # a decoder fine-tuned with head/top-layers/full: an HF folder, no LoRA
    _write(folder / "config.json", {"architectures": ["LlamaForCausalLM"], "model_type": "llama"})
    _write(folder / "pagellm_task.json", {"task": "classify", "labels": ["positive", "negative"],
                                          "instruction": None, "base_model": "smollm2", "model_kind": "decoder"})
    run_evaluate(EvaluateArgs(data=data, adapter=str(folder), max_samples=4))
    (llm,) = FakeLLM.instances
    assert llm.model == str(folder) and llm.kwargs == {"dtype": "float32"}
    assert llm.calls[0][1] == {"labels": ["positive", "negative"], "use_tqdm": True}

    FakeLLM.instances = []
    # zero-shot: the labels come from the data
    run_evaluate(EvaluateArgs(data=data, model=tiny_llama_dir, max_samples=4, progress=False))
    (llm,) = FakeLLM.instances
    assert llm.kwargs == {"dtype": "float32"} and llm.calls[0][1] == {"labels": LABELS, "use_tqdm": False}


def _engine_has_lora() -> bool:
    from pagellm.entrypoints.llm import LLM

    return "enable_lora" in inspect.signature(LLM.__init__).parameters and \
        "lora_request" in inspect.signature(LLM.classify).parameters


@pytest.fixture(scope="module")
def decoder_adapters(decoder_lora_run, tmp_path_factory, tiny_llama_dir, make_args) -> dict:
    """Label-word adapters of each PEFT strategy on the tiny Llama: name -> FinetuneResult."""
    runs = {"lora": decoder_lora_run}
    for name in ("adalora", "prefix"):
        runs[name] = run_finetune(make_args(tiny_llama_dir, tmp_path_factory.mktemp(name) / "adapter", strategy=name,
                                            lr=3e-2))
    return runs


@pytest.mark.skipif(not _engine_has_lora(), reason="the engine has no LoRA / zero-shot classify yet")
@pytest.mark.parametrize("strategy", ["lora", "adalora", "prefix"])
def test_engine_scores_a_label_word_adapter_like_its_training(strategy, decoder_adapters, bundled_tokenizer,
                                                              sentiment_dir):
    """Through the engine with the adapter, each label's probability is the softmax of the label-word
    log-likelihoods the trained PEFT model gives (what training optimized)."""
    run = decoder_adapters[strategy]
    assert run.merged_dir is None  # the engine serves decoder adapters as they are
    data = sentiment_dir / "movies" / "test.jsonl"
    result = run_evaluate(EvaluateArgs(data=str(data), adapter=str(run.out_dir), max_samples=6, progress=False))
    assert result.summary.labels == LABELS
    texts = [ex.text for ex in subsample(read_classify_examples(data), 6, 0)]
    expected = _label_probs(run.model.eval(), bundled_tokenizer, texts)
    torch.testing.assert_close(torch.tensor(result.probabilities), expected, atol=1e-4, rtol=1e-4)
    with run.model.disable_adapter():  # the adapter matters: without it the scores differ
        assert (_label_probs(run.model, bundled_tokenizer, texts) - expected).abs().max() > 1e-3


def _label_probs(model, tokenizer, texts: list[str]) -> torch.Tensor:
    """[num_texts, num_labels]: softmax over each label's summed token log-probability after the prompt."""
    rows = []
    for text in texts:
        prompt = encode_label_prompt(tokenizer, text, LABELS)
        scores = []
        for label in LABELS:
            label_ids = label_token_ids(tokenizer, label, True)
            with torch.no_grad():
                logprobs = model(input_ids=torch.tensor([prompt + label_ids])).logits[0].log_softmax(-1)
            scores.append(sum(float(logprobs[len(prompt) - 1 + i, t]) for i, t in enumerate(label_ids)))
        rows.append(torch.tensor(scores).softmax(-1))
    return torch.stack(rows)
