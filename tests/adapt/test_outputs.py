"""What finetune writes loads in PEFT, transformers and pagellm; the dev report, early stopping, best model, seed."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pagellm.adapt.data import load_classify_data
from pagellm.adapt.finetune import run_finetune
from pagellm.adapt.metrics import classification_metrics

TEXTS = ["A moving, beautifully acted film.", "Dull, long and pointless.", "I laughed a lot."]
LABELS = ["negative", "positive"]


def _dev(sentiment_dir: Path) -> str:
    return str(sentiment_dir / "movies" / "dev.jsonl")


def _encoder_logits(model, folder, texts: list[str]) -> torch.Tensor:
    from transformers import AutoTokenizer

    batch = AutoTokenizer.from_pretrained(str(folder))(texts, padding=True, return_tensors="pt")
    model.eval()
    with torch.no_grad():
        return model(**batch).logits


@pytest.fixture(scope="module")
def encoder_lora_run(tmp_path_factory, tiny_bert_dir, make_args, sentiment_dir):
    out = tmp_path_factory.mktemp("enc_lora") / "adapter"
    return run_finetune(make_args(tiny_bert_dir, out, strategy="lora", epochs=2.0, max_length=32, dropout=0.2,
                                  lr=5e-3, eval_data=_dev(sentiment_dir), max_eval_samples=16))


def test_encoder_lora_adapter_and_merged_folder_load_everywhere(encoder_lora_run, tiny_bert_dir):
    from peft import PeftModel

    from pagellm import LLM
    from pagellm.adapt.pooled_classifier import load_classifier

    out = encoder_lora_run.out_dir
    adapter_config = json.loads((out / "adapter_config.json").read_text())
    assert adapter_config["peft_type"] == "LORA" and adapter_config["task_type"] == "SEQ_CLS"
    assert adapter_config["lora_dropout"] == 0.2 and "classifier" in adapter_config["modules_to_save"]
    assert (out / "adapter_model.safetensors").is_file()
    trained = _encoder_logits(encoder_lora_run.model, out, TEXTS)

    base = load_classifier(tiny_bert_dir, num_labels=2, classifier_pooling="cls")
    reloaded = _encoder_logits(PeftModel.from_pretrained(base, str(out)), out, TEXTS)
    torch.testing.assert_close(reloaded, trained, atol=1e-5, rtol=1e-5)

    merged_dir = encoder_lora_run.merged_dir
    assert merged_dir == out / "merged"
    merged = load_classifier(str(merged_dir))
    assert merged.config.id2label == dict(enumerate(LABELS)) and merged.config.hidden_dropout_prob == 0.2
    torch.testing.assert_close(_encoder_logits(merged, merged_dir, TEXTS), trained, atol=1e-5, rtol=1e-5)

    outs = LLM(str(merged_dir), task="classify", dtype="float32").classify(TEXTS, use_tqdm=False)
    assert [o.outputs.labels for o in outs] == [LABELS] * len(TEXTS)
    torch.testing.assert_close(torch.tensor([o.outputs.probs for o in outs]), trained.softmax(-1), atol=1e-4,
                               rtol=1e-4)


def test_train_report_has_the_per_epoch_dev_metrics(encoder_lora_run):
    report = json.loads((encoder_lora_run.out_dir / "train_report.json").read_text())
    assert report["strategy"] == "lora" and report["model_kind"] == "encoder" and report["labels"] == LABELS
    assert [round(h["epoch"]) for h in report["history"]] == [1, 2]
    assert all({"accuracy", "macro_f1", "loss"} <= set(h) for h in report["history"])
    assert report["best_metric"] == max(h["accuracy"] for h in report["history"]) == encoder_lora_run.best_metric
    assert 0 < report["num_trainable_params"] < report["num_total_params"]
    assert report["wall_s"] > 0 and report["num_train_examples"] == 16 and report["num_eval_examples"] == 16
    assert not (encoder_lora_run.out_dir / "checkpoints").exists()
    task = json.loads((encoder_lora_run.out_dir / "pagellm_task.json").read_text())
    assert task == {"task": "classify", "labels": LABELS, "instruction": None,
                    "base_model": str(Path(task["base_model"])), "model_kind": "encoder", "strategy": "lora"}


def test_dev_report_is_logged_per_epoch(tmp_path, tiny_bert_dir, make_args, sentiment_dir, caplog):
    with caplog.at_level("INFO", logger="pagellm.adapt"):
        run_finetune(make_args(tiny_bert_dir, tmp_path / "o", strategy="head", epochs=2.0, max_length=32,
                               eval_data=_dev(sentiment_dir), max_eval_samples=8))
    lines = [r.getMessage() for r in caplog.records if r.getMessage().startswith("dev report")]
    assert len(lines) == 2 and "epoch 1.00" in lines[0] and "epoch 2.00" in lines[1]
    assert all("accuracy=" in line and "macro_f1=" in line for line in lines)


def test_early_stopping_stops_after_patience(tmp_path, tiny_bert_dir, make_args, sentiment_dir):
    # lr 0: the dev metric cannot improve after the first evaluation
    result = run_finetune(make_args(tiny_bert_dir, tmp_path / "o", strategy="head", lr=0.0, epochs=5.0,
                                    early_stopping=1, eval_data=_dev(sentiment_dir), max_eval_samples=8,
                                    max_length=32))
    assert result.early_stopped and result.epochs_run == 2.0 < 5
    assert len(result.history) == 2 and result.global_steps == 4  # 16 rows / batch 8 = 2 steps per epoch


def test_eval_steps_evaluates_every_n_steps(tmp_path, tiny_bert_dir, make_args, sentiment_dir):
    result = run_finetune(make_args(tiny_bert_dir, tmp_path / "o", strategy="head", eval_steps=1, max_length=32,
                                    eval_data=_dev(sentiment_dir), max_eval_samples=8))
    assert [h["step"] for h in result.history] == [1, 2]


def test_best_dev_checkpoint_is_the_saved_model(tmp_path, tiny_bert_dir, make_args, sentiment_dir):
    from pagellm.adapt.pooled_classifier import load_classifier

    # a learning rate this high makes the dev score jump around, so the last epoch is not the best one
    args = make_args(tiny_bert_dir, tmp_path / "o", strategy="full", epochs=4.0, lr=5e-2, metric="macro_f1",
                     max_train_samples=32, eval_data=_dev(sentiment_dir), max_eval_samples=24, max_length=32)
    result = run_finetune(args)
    scores = [h["macro_f1"] for h in result.history]
    assert len(scores) == 4 and result.best_metric == max(scores)
    assert scores[-1] < max(scores), f"the last epoch is the best ({scores}); the check below would prove nothing"
    dev = load_classify_data(args.data, args.eval_data, None, args.max_train_samples, args.max_eval_samples,
                             args.seed).eval
    saved = load_classifier(str(result.out_dir))
    predicted = _encoder_logits(saved, result.out_dir, [ex.text for ex in dev]).argmax(-1).tolist()
    recomputed = classification_metrics([LABELS.index(ex.label) for ex in dev], predicted, 2)["macro_f1"]
    assert recomputed == pytest.approx(result.best_metric, abs=1e-9)


def test_same_seed_same_weights(tmp_path, tiny_bert_dir, make_args):
    def head_weight(seed: int, name: str) -> torch.Tensor:
        result = run_finetune(make_args(tiny_bert_dir, tmp_path / name, strategy="head", seed=seed, max_length=32))
        return result.model.classifier.weight.detach().clone()

    first, again, other = head_weight(0, "a"), head_weight(0, "b"), head_weight(1, "c")
    assert torch.equal(first, again) and not torch.equal(first, other)


def test_overwrite_replaces_a_used_output_folder(tmp_path, tiny_bert_dir, make_args):
    out = tmp_path / "o"
    out.mkdir()
    (out / "adapter_config.json").write_text("{}")  # stale: would make evaluate read this folder as an adapter
    run_finetune(make_args(tiny_bert_dir, out, strategy="head", max_length=32, overwrite=True))
    assert not (out / "adapter_config.json").exists() and (out / "config.json").is_file()


def test_adalora_with_a_dev_set_keeps_the_best_adapter(tmp_path, tiny_bert_dir, make_args, sentiment_dir):
    """Regression: the Trainer cannot reload an AdaLoRA checkpoint saved before a later rank pruning (size
    mismatch), so the best adapter is kept in memory; the saved adapter must reload to the same model."""
    from peft import PeftModel

    from pagellm.adapt.pooled_classifier import load_classifier

    result = run_finetune(make_args(tiny_bert_dir, tmp_path / "ada", strategy="adalora", epochs=3.0, lr=5e-2,
                                    max_length=32, eval_data=_dev(sentiment_dir), max_eval_samples=16))
    assert len(result.history) == 3 and result.best_metric == max(h["accuracy"] for h in result.history)
    base = load_classifier(tiny_bert_dir, num_labels=2, classifier_pooling="cls")
    reloaded = PeftModel.from_pretrained(base, str(result.out_dir))
    torch.testing.assert_close(_encoder_logits(reloaded, result.out_dir, TEXTS),
                               _encoder_logits(result.model, result.out_dir, TEXTS), atol=1e-5, rtol=1e-5)
    merged = load_classifier(str(result.merged_dir))
    torch.testing.assert_close(_encoder_logits(merged, result.merged_dir, TEXTS),
                               _encoder_logits(result.model, result.out_dir, TEXTS), atol=1e-5, rtol=1e-5)


def test_cli_finetune_maps_every_flag(tmp_path, tiny_bert_dir, sentiment_dir, capsys):
    from pagellm.entrypoints.cli import main as cli_main

    out = tmp_path / "cli"
    code = cli_main(["finetune", "--model", tiny_bert_dir, "--task", "classify", "--data",
                     str(sentiment_dir / "movies" / "train.jsonl"), "--eval-data", _dev(sentiment_dir),
                     "--strategy", "top-layers:1", "--epochs", "2", "--lr", "1e-3", "--warmup", "0.2",
                     "--weight-decay", "0.05", "--dropout", "0.3", "--early-stopping", "3", "--metric", "macro_f1",
                     "--seed", "7", "--max-train-samples", "16", "--max-eval-samples", "8", "--batch-size", "4",
                     "--max-length", "24", "--labels", "positive,negative", "--no-progress", "--out", str(out)])
    assert code == 0
    assert "saved top-layers:1 (" in capsys.readouterr().out
    report = json.loads((out / "train_report.json").read_text())
    assert report["args"] | {"out": None} == {
        "data": str(sentiment_dir / "movies" / "train.jsonl"), "out": None, "model": tiny_bert_dir,
        "task": "classify", "eval_data": _dev(sentiment_dir), "strategy": "top-layers:1", "epochs": 2.0, "lr": 1e-3,
        "warmup": 0.2, "weight_decay": 0.05, "dropout": 0.3, "early_stopping": 3, "metric": "macro_f1",
        "eval_steps": None, "seed": 7, "max_train_samples": 16, "max_eval_samples": 8, "batch_size": 4,
        "grad_accum": 1, "max_length": 24, "labels": ["positive", "negative"], "instruction": None, "lora_r": 8,
        "lora_alpha": 16, "lora_target_modules": None, "prefix_tokens": 10, "logging_steps": 10, "progress": False,
        "overwrite": False}
    assert report["labels"] == ["positive", "negative"] and report["global_steps"] == 8
    config = json.loads((out / "config.json").read_text())
    assert config["id2label"] == {"0": "positive", "1": "negative"} and config["hidden_dropout_prob"] == 0.3


def test_training_arguments_carry_the_schedule_and_selection(tmp_path, make_args):
    from pagellm.adapt.trainer import training_arguments

    args = make_args("unused", tmp_path, warmup=0.25, weight_decay=0.03, lr=1e-4, metric="macro_f1", seed=5)
    epoch = training_arguments(args, has_eval=True, is_classify=True, reload_best=True, output_dir=tmp_path)
    assert epoch.get_warmup_steps(40) == 10 and epoch.lr_scheduler_type == "linear"
    assert (epoch.weight_decay, epoch.learning_rate, epoch.seed) == (0.03, 1e-4, 5)
    assert epoch.eval_strategy == "epoch" == epoch.save_strategy and epoch.load_best_model_at_end
    assert epoch.metric_for_best_model == "macro_f1" and epoch.greater_is_better
    args.eval_steps = 3
    steps = training_arguments(args, has_eval=True, is_classify=False, reload_best=True, output_dir=tmp_path)
    assert steps.eval_strategy == "steps" and steps.eval_steps == 3 == steps.save_steps
    assert steps.metric_for_best_model == "loss" and not steps.greater_is_better
    none = training_arguments(args, has_eval=False, is_classify=True, reload_best=True, output_dir=tmp_path)
    assert none.eval_strategy == "no" and not none.load_best_model_at_end
