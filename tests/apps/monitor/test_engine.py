"""The monitor end to end through pagellm's engine: a `pagellm finetune` head (on a tiny random BERT) for
sentiment, the bundled MiniLM for topic similarity, driven by `pagellm monitor run`."""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch

from pagellm.entrypoints.cli import main as cli_main
from pagellm.errors import InvalidRequest
from tests.apps.monitor.conftest import NEWS3
from tests.tiny_models import declare_sentence_transformers_mean_pooling

TOPICS = ("rates: interest rates, central banks and inflation; earnings: company profits, revenue and quarterly "
          "results; fraud: fraud, crime, scandals and lawsuits; sport: sports, games and athletes")


@pytest.fixture(scope="module")
def tiny_encoder(tmp_path_factory) -> str:
    """A tiny random BERT as a sentence-transformers folder (mean pooling, normalized, like MiniLM)."""
    from transformers import AutoTokenizer, BertConfig, BertModel

    from pagellm.model_source import bundled_encoder_path

    base = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(str(bundled_encoder_path()), local_files_only=True)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    config.architectures = ["BertModel"]
    torch.manual_seed(0)
    BertModel(config).save_pretrained(base, safe_serialization=True)
    tokenizer.save_pretrained(base)
    declare_sentence_transformers_mean_pooling(base, 32)
    return str(base)


def _finetune(tmp_path_factory, base: str, strategy: str) -> str:
    from pagellm.adapt.finetune import FinetuneArgs, run_finetune

    out = tmp_path_factory.mktemp("sentiment") / strategy
    run_finetune(FinetuneArgs(data=str(NEWS3 / "train.jsonl"), out=str(out), model=base, strategy=strategy,
                              max_train_samples=64, epochs=2.0, lr=1e-3, batch_size=16, progress=False))
    return str(out)


@pytest.fixture(scope="module")
def sentiment_dir(tmp_path_factory, tiny_encoder) -> str:
    """A `pagellm finetune --strategy head` sentiment classifier on the tiny encoder (frozen)."""
    return _finetune(tmp_path_factory, tiny_encoder, "head")


def test_monitor_run_classifies_a_stream_through_the_engine(tmp_path, sentiment_dir, capsys):
    texts = ["The Federal Reserve raised interest rates by half a point to fight inflation.",
             "The company reported record quarterly profits and revenue above forecasts.",
             "Prosecutors charged the bank's former director with fraud and money laundering.",
             "The home team won the championship game in overtime."]
    stream = tmp_path / "stream.jsonl"
    stream.write_text("".join(json.dumps({"id": f"n{i}", "text": t}) + "\n" for i, t in enumerate(texts)) +
                      "not json\n")
    db = tmp_path / "m.sqlite"
    argv = ["monitor", "run", str(stream), "--sentiment", sentiment_dir, "--topics", TOPICS, "--db", str(db),
            "--alerts", str(tmp_path / "alerts.jsonl")]
    assert cli_main(argv) == 0
    summary = json.loads(capsys.readouterr().out.strip().splitlines()[-1])
    assert summary == {"classified": 4, "duplicates": 0, "alerts": 0, "bad_lines": 1}
    rows = sqlite3.connect(db).execute("SELECT id, topic, sentiment, negative_prob FROM texts ORDER BY seq").fetchall()
    assert [r[1] for r in rows] == ["rates", "earnings", "fraud", "sport"]  # MiniLM similarity to the descriptions
    assert all(r[2] in ("negative", "neutral", "positive") and 0.0 <= r[3] <= 1.0 for r in rows)
    assert cli_main(argv) == 0  # a rerun of the same file: everything is already stored
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["classified"] == 0


NEWS_TEXTS = [json.loads(line)["text"] for line in (NEWS3 / "test.jsonl").read_text().splitlines()[:40]]
LONG_TEXT = " ".join(NEWS_TEXTS)  # over the tiny encoder's 128 positions: cut alike on both paths


def test_a_head_on_the_topic_encoder_classifies_in_one_encoder_pass(tmp_path, tiny_encoder, sentiment_dir):
    """Issue 17: a frozen-encoder head on the topic encoder gives topic and sentiment from one forward, the
    same answers as the two-pass path, and says so in /metrics."""
    from pagellm.apps.monitor.detector import DetectorConfig
    from pagellm.apps.monitor.service import EngineClassifier, MonitorService, parse_topics
    from pagellm.apps.monitor.store import SQLiteStore

    topics = parse_topics(TOPICS)
    one = EngineClassifier(sentiment_dir, topics, embed_model=tiny_encoder)
    two = EngineClassifier(sentiment_dir, topics, embed_model=tiny_encoder, one_pass=False)
    assert (one.path, one.encoder_passes, two.path, two.encoder_passes) == ("one-pass", 1, "two-pass", 2)
    assert one.embedder is None and one.truncate == 128  # the topic encoder is not kept, nor run
    texts = NEWS_TEXTS + [LONG_TEXT]
    a, b = one.classify(texts), two.classify(texts)
    assert [r[:2] for r in a] == [r[:2] for r in b]
    assert max(abs(x[2] - y[2]) for x, y in zip(a, b)) < 1e-5
    assert len({r[0] for r in a}) > 1  # the tiny random encoder still spreads texts over topics
    service = MonitorService(one, SQLiteStore(tmp_path / "m.sqlite"), DetectorConfig())
    assert 'pagellm_monitor_model_passes_per_text{path="one-pass"} 1.0' in service.metrics.render().decode()
    service.close()


def test_a_classifier_whose_encoder_moved_keeps_two_passes(tmp_path_factory, tiny_encoder, sentiment_dir):
    """`--strategy full` changes the encoder: its pooled vectors are not the topic encoder's, so topics get their
    own pass; a head on another encoder (the bundled MiniLM for topics) likewise; one_pass=True says why not."""
    from pagellm.apps.monitor.service import EngineClassifier, parse_topics

    topics = parse_topics(TOPICS)
    full = _finetune(tmp_path_factory, tiny_encoder, "full")
    moved = EngineClassifier(full, topics, embed_model=tiny_encoder)
    assert (moved.path, moved.encoder_passes) == ("two-pass", 2) and moved.embedder is not None
    with pytest.raises(InvalidRequest, match="is not the topic encoder: max \\|difference\\|"):
        EngineClassifier(full, topics, embed_model=tiny_encoder, one_pass=True)
    other = EngineClassifier(sentiment_dir, topics)  # topics by MiniLM: 384 dimensions, 256 tokens
    assert other.path == "two-pass"
    with pytest.raises(InvalidRequest, match="reads at most 128 tokens, the topic encoder 256"):
        EngineClassifier(sentiment_dir, topics, one_pass=True)


def test_int8_encoders_give_the_same_topics_and_keep_one_pass(tmp_path, tiny_encoder, sentiment_dir, capsys):
    """`--quantization int8` (docs/monitor.md "Performance"): MiniLM in int8 still puts the four news sentences
    in their topics, and a head on the topic encoder still runs one pass (both encoders quantize alike)."""
    from pagellm.apps.monitor.service import EngineClassifier, parse_topics

    texts = ["The Federal Reserve raised interest rates by half a point to fight inflation.",
             "The company reported record quarterly profits and revenue above forecasts.",
             "Prosecutors charged the bank's former director with fraud and money laundering.",
             "The home team won the championship game in overtime."]
    stream = tmp_path / "stream.jsonl"
    stream.write_text("".join(json.dumps({"id": f"q{i}", "text": t}) + "\n" for i, t in enumerate(texts)))
    db = tmp_path / "m.sqlite"
    assert cli_main(["monitor", "run", str(stream), "--sentiment", sentiment_dir, "--topics", TOPICS, "--db",
                     str(db), "--quantization", "int8"]) == 0
    assert json.loads(capsys.readouterr().out.strip().splitlines()[-1])["classified"] == 4
    rows = sqlite3.connect(db).execute("SELECT topic FROM texts ORDER BY seq").fetchall()
    assert [r[0] for r in rows] == ["rates", "earnings", "fraud", "sport"]
    one = EngineClassifier(sentiment_dir, parse_topics(TOPICS), embed_model=tiny_encoder, quantization="int8")
    assert (one.path, one.encoder_passes) == ("one-pass", 1)
