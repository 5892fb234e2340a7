"""The monitor end to end through pagellm's engine: a `pagellm finetune` head (on a tiny random BERT) for
sentiment, the bundled MiniLM for topic similarity, driven by `pagellm monitor run`."""

from __future__ import annotations

import json
import sqlite3

import pytest
import torch

from pagellm.entrypoints.cli import main as cli_main
from tests.apps.monitor.conftest import NEWS3

TOPICS = ("rates: interest rates, central banks and inflation; earnings: company profits, revenue and quarterly "
          "results; fraud: fraud, crime, scandals and lawsuits; sport: sports, games and athletes")


@pytest.fixture(scope="module")
def sentiment_dir(tmp_path_factory) -> str:
    from transformers import AutoTokenizer, BertConfig, BertModel

    from pagellm.adapt.finetune import FinetuneArgs, run_finetune
    from pagellm.model_source import bundled_encoder_path

    base = tmp_path_factory.mktemp("tiny_bert")
    tokenizer = AutoTokenizer.from_pretrained(str(bundled_encoder_path()), local_files_only=True)
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128)
    config.architectures = ["BertModel"]
    torch.manual_seed(0)
    BertModel(config).save_pretrained(base, safe_serialization=True)
    tokenizer.save_pretrained(base)
    out = tmp_path_factory.mktemp("sentiment") / "clf"
    run_finetune(FinetuneArgs(data=str(NEWS3 / "train.jsonl"), out=str(out), model=str(base), strategy="head",
                              max_train_samples=64, epochs=2.0, progress=False))
    return str(out)


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
