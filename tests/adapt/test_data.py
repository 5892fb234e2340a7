"""Training data: formats, and every bad-data error raised before any model or tokenizer loads."""

from __future__ import annotations

import json

import pytest

from pagellm.adapt import finetune as finetune_module
from pagellm.adapt.data import (
    ClassifyExample,
    load_classify_data,
    read_classify_examples,
    read_generate_examples,
    subsample,
)
from pagellm.adapt.finetune import run_finetune
from pagellm.entrypoints.cli import main as cli_main
from pagellm.errors import InvalidRequest


def _jsonl(path, rows) -> str:
    path.write_text("".join(json.dumps(r) + "\n" for r in rows))
    return str(path)


def test_jsonl_and_csv_read_the_same_examples(tmp_path):
    rows = [{"text": "good, fun", "label": "positive"}, {"text": 'said "bad"', "label": "negative"}]
    jsonl = _jsonl(tmp_path / "a.jsonl", rows)
    csv_path = tmp_path / "a.csv"
    csv_path.write_text('text,label\n"good, fun",positive\n"said ""bad""",negative\n')
    expected = [ClassifyExample(r["text"], r["label"]) for r in rows]
    assert read_classify_examples(jsonl) == expected
    assert read_classify_examples(csv_path) == expected


def test_labels_are_sorted_train_labels_or_the_given_order(sentiment_dir):
    train = sentiment_dir / "movies" / "train.jsonl"
    assert load_classify_data(train, None).labels == ["negative", "positive"]
    assert load_classify_data(train, None, labels=["positive", "negative"]).labels == ["positive", "negative"]
    with pytest.raises(InvalidRequest, match=r"training labels \['positive'\] are not in the given labels"):
        load_classify_data(train, None, labels=["negative", "neutral"])


def test_subsample_is_seeded_and_bounded():
    items = list(range(100))
    assert subsample(items, 10, seed=3) == subsample(items, 10, seed=3)
    assert subsample(items, 10, seed=3) != subsample(items, 10, seed=4)
    assert subsample(items, None, seed=0) == items and subsample(items, 500, seed=0) == items
    with pytest.raises(InvalidRequest):
        subsample(items, 0, seed=0)


def test_generate_rows_prompt_completion_and_messages(tmp_path):
    path = _jsonl(tmp_path / "g.jsonl", [
        {"prompt": "2+2?", "completion": "4"},
        {"messages": [{"role": "system", "content": "terse"}, {"role": "user", "content": "hi"},
                      {"role": "assistant", "content": "hello"}]},
    ])
    first, second = read_generate_examples(path)
    assert first.messages == [{"role": "user", "content": "2+2?"}] and first.completion == "4"
    assert [t["role"] for t in second.messages] == ["system", "user"] and second.completion == "hello"


BAD_FILES = {
    "missing column": ([{"text": "fine", "label": "positive"}, {"text": "no label here"}],
                       r"row 2: missing column 'label'"),
    "empty label": ([{"text": "a", "label": "positive"}, {"text": "b", "label": "  "}], r"column 'label' is empty"),
    "one class": ([{"text": "a", "label": "positive"}, {"text": "b", "label": "positive"}], r"only one label"),
    "empty file": ([], r"has no rows"),
}


@pytest.mark.parametrize("case", sorted(BAD_FILES))
def test_bad_train_files_are_invalid_requests(tmp_path, case):
    rows, match = BAD_FILES[case]
    with pytest.raises(InvalidRequest, match=match):
        load_classify_data(_jsonl(tmp_path / "train.jsonl", rows), None)


def test_unreadable_and_malformed_files(tmp_path):
    with pytest.raises(InvalidRequest, match="does not exist"):
        read_classify_examples(tmp_path / "nope.jsonl")
    (tmp_path / "binary.jsonl").write_bytes(b"\xff\xfe\x00garbage")
    with pytest.raises(InvalidRequest, match="cannot read"):
        read_classify_examples(tmp_path / "binary.jsonl")
    (tmp_path / "bad.jsonl").write_text('{"text": "a", "label": "x"}\n{"text": oops}\n')
    with pytest.raises(InvalidRequest, match=r"bad.jsonl:2: not valid JSON"):
        read_classify_examples(tmp_path / "bad.jsonl")
    (tmp_path / "list.jsonl").write_text('["text", "label"]\n')
    with pytest.raises(InvalidRequest, match="expected a JSON object"):
        read_classify_examples(tmp_path / "list.jsonl")


def test_generate_rows_must_end_with_an_assistant_turn(tmp_path):
    path = _jsonl(tmp_path / "g.jsonl", [{"messages": [{"role": "user", "content": "a"},
                                                       {"role": "user", "content": "b"}]}])
    with pytest.raises(InvalidRequest, match="last message must be a non-empty assistant turn"):
        read_generate_examples(path)
    with pytest.raises(InvalidRequest, match="needs 'prompt' and 'completion'"):
        read_generate_examples(_jsonl(tmp_path / "h.jsonl", [{"text": "a"}]))


@pytest.fixture
def no_model_loading(monkeypatch):
    """Fail the test if finetune reaches the tokenizer, the config or the weights."""

    def forbidden(*args, **kwargs):
        raise AssertionError("a model was loaded before the bad input was rejected")

    for name in ("load_training_tokenizer", "load_config", "load_model"):
        monkeypatch.setattr(finetune_module, name, forbidden)


def _bad_run_cases(tmp_path, sentiment_dir) -> dict[str, tuple[dict, str]]:
    train = str(sentiment_dir / "movies" / "train.jsonl")
    unknown = _jsonl(tmp_path / "dev.jsonl", [{"text": "meh", "label": "neutral"}, {"text": "ok", "label": "positive"}])
    missing = _jsonl(tmp_path / "nolabel.jsonl", [{"text": "meh"}])
    empty = tmp_path / "empty.jsonl"
    empty.write_text("\n")
    (tmp_path / "used" / "old").mkdir(parents=True)
    return {
        "unknown eval label": (dict(eval_data=unknown), r"labels \['neutral'\] that are not among the training labels"),
        "missing column": (dict(data=missing), r"missing column 'label'"),
        "empty eval file": (dict(eval_data=str(empty)), r"has no rows"),
        "unreadable": (dict(data=str(tmp_path / "missing.csv")), r"does not exist"),
        "early stopping without dev": (dict(early_stopping=2), r"early stopping needs a dev file"),
        "unknown strategy": (dict(strategy="bitfit"), r"unknown strategy 'bitfit'"),
        "bad top-layers": (dict(strategy="top-layers:0"), r"top-layers:K with K >= 1"),
        "prefix on an encoder": (dict(strategy="prefix"), r"prefix tuning needs a decoder"),
        "generate on an encoder": (dict(task="generate"), r"task generate needs a decoder"),
        "warmup as steps": (dict(warmup=5.0), r"warmup is a ratio"),
        "unknown metric": (dict(data=train, metric="f1"), r"metric must be one of"),
        "bad instruction": (dict(instruction="Pick {label}"), r"only the \{labels\} placeholder"),
        "non-empty out": (dict(out=str(tmp_path / "used")), r"exists and is not empty; .* --overwrite"),
    }


def test_bad_runs_fail_before_any_model_loads(tmp_path, sentiment_dir, tiny_bert_dir, make_args, no_model_loading):
    for name, (overrides, match) in _bad_run_cases(tmp_path, sentiment_dir).items():
        out = overrides.pop("out", tmp_path / "out")
        with pytest.raises(InvalidRequest, match=match):
            run_finetune(make_args(tiny_bert_dir, out, **overrides))
        assert not (tmp_path / "out").exists(), name


def test_cli_prints_the_message_and_exits_2(tmp_path, sentiment_dir, tiny_bert_dir, capsys, no_model_loading):
    dev = _jsonl(tmp_path / "dev.jsonl", [{"text": "meh", "label": "neutral"}])
    code = cli_main(["finetune", "--model", tiny_bert_dir, "--data", str(sentiment_dir / "movies" / "train.jsonl"),
                     "--eval-data", dev, "--out", str(tmp_path / "out"), "--strategy", "head"])
    assert code == 2
    assert "error: eval_data file" in capsys.readouterr().err
    code = cli_main(["evaluate", "--model", tiny_bert_dir, "--data", str(tmp_path / "missing.jsonl")])
    assert code == 2
    err = capsys.readouterr().err
    assert "error: data file" in err and "does not exist" in err


def test_too_many_top_layers_fails_before_the_weights_load(tmp_path, tiny_bert_dir, make_args, monkeypatch):
    def forbidden(*args, **kwargs):
        raise AssertionError("weights were loaded before the bad strategy was rejected")

    monkeypatch.setattr(finetune_module, "load_model", forbidden)
    with pytest.raises(InvalidRequest, match=r"top-layers:5 exceeds the model's 2 layers"):
        run_finetune(make_args(tiny_bert_dir, tmp_path / "out", strategy="top-layers:5"))
