"""Decoder adaptation: label-word rows, their dev scoring, and the adapter/model folders a decoder run writes."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch

from pagellm.adapt.data import GenerateExample, load_classify_data
from pagellm.adapt.features import IGNORE_INDEX, LabelPrompter, generate_sft
from pagellm.adapt.finetune import run_finetune
from pagellm.adapt.metrics import classification_metrics, label_scores
from pagellm.errors import InvalidRequest
from pagellm.label_prompt import encode_label_prompt, label_token_ids

LABELS = ["negative", "positive"]


def test_label_word_rows_put_the_loss_on_the_label_tokens_only(bundled_tokenizer):
    tok = bundled_tokenizer
    row = LabelPrompter(tok, LABELS, None, max_length=256).row("Great film.", "positive")
    prompt, label = encode_label_prompt(tok, "Great film.", LABELS), label_token_ids(tok, "positive", True)
    assert row["input_ids"] == prompt + label
    assert row["labels"] == [IGNORE_INDEX] * len(prompt) + label
    long_row = LabelPrompter(tok, LABELS, None, max_length=90).row("so very long " * 100, "negative")
    negative = label_token_ids(tok, "negative", True)
    assert len(long_row["input_ids"]) <= 90 and long_row["input_ids"][-len(negative):] == negative
    with pytest.raises(InvalidRequest, match="too small for the classification prompt"):
        LabelPrompter(tok, LABELS, None, max_length=20).row("text", "negative")


def test_sft_rows_mask_the_prompt(bundled_tokenizer):
    tok = bundled_tokenizer
    (row,) = generate_sft(tok, [GenerateExample([{"role": "user", "content": "2+2?"}], "4")], max_length=128)
    prompt = tok.apply_chat_template([{"role": "user", "content": "2+2?"}], tokenize=False, add_generation_prompt=True)
    num_prompt = len(tok.encode(prompt, add_special_tokens=False))
    assert row["labels"][:num_prompt] == [IGNORE_INDEX] * num_prompt
    assert row["labels"][num_prompt:] == tok.encode("4", add_special_tokens=False) + [tok.eos_token_id]


def test_label_scores_sum_the_label_token_logprobs():
    torch.manual_seed(0)
    logits = torch.randn(2, 5, 7)
    labels = torch.tensor([[IGNORE_INDEX, IGNORE_INDEX, IGNORE_INDEX, 3, 1], [IGNORE_INDEX, IGNORE_INDEX, 6, 2, 0]])
    logprobs = logits.log_softmax(-1)
    expected = torch.stack([logprobs[0, 2, 3] + logprobs[0, 3, 1],
                            logprobs[1, 1, 6] + logprobs[1, 2, 2] + logprobs[1, 3, 0]])
    torch.testing.assert_close(label_scores(logits, labels), expected)


def _label_logprobs(model, tokenizer, text: str) -> list[float]:
    """Each label's summed token logprob after the shared prompt, computed directly with the HF model."""
    prompt = encode_label_prompt(tokenizer, text, LABELS)
    scores = []
    for label in LABELS:
        label_ids = label_token_ids(tokenizer, label, True)
        ids = torch.tensor([prompt + label_ids])
        with torch.no_grad():
            logprobs = model(input_ids=ids).logits[0].log_softmax(-1)
        scores.append(sum(float(logprobs[len(prompt) - 1 + i, t]) for i, t in enumerate(label_ids)))
    return scores


def test_decoder_lora_adapter_loads_in_peft_and_names_its_labels(decoder_lora_run, tiny_llama_dir):
    from peft import PeftModel
    from transformers import AutoModelForCausalLM

    out = decoder_lora_run.out_dir
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["peft_type"] == "LORA" and config["task_type"] == "CAUSAL_LM" and config["lora_dropout"] == 0.05
    assert sorted(config["target_modules"]) == ["q_proj", "v_proj"]
    task = json.loads((out / "pagellm_task.json").read_text())
    assert task["task"] == "classify" and task["labels"] == LABELS and task["instruction"] is None
    assert task["base_model"] == str(Path(tiny_llama_dir).resolve()) and task["model_kind"] == "decoder"
    assert decoder_lora_run.merged_dir is None  # the engine serves plain LoRA adapters itself

    trained = decoder_lora_run.model.eval()
    reloaded = PeftModel.from_pretrained(AutoModelForCausalLM.from_pretrained(tiny_llama_dir), str(out)).eval()
    ids = torch.tensor([[1, 200, 300, 400, 500]])
    with torch.no_grad():
        torch.testing.assert_close(reloaded(input_ids=ids).logits, trained(input_ids=ids).logits)


def test_decoder_dev_metric_scores_every_label_like_zero_shot(decoder_lora_run, bundled_tokenizer, sentiment_dir,
                                                              make_args, tiny_llama_dir):
    args = make_args(tiny_llama_dir, "unused", eval_data=str(sentiment_dir / "movies" / "dev.jsonl"),
                     max_eval_samples=8)
    dev = load_classify_data(args.data, args.eval_data, None, args.max_train_samples, args.max_eval_samples,
                             args.seed).eval
    model = decoder_lora_run.model.eval()
    scores = [_label_logprobs(model, bundled_tokenizer, ex.text) for ex in dev]
    gold = [LABELS.index(ex.label) for ex in dev]
    predicted = [max(range(len(LABELS)), key=row.__getitem__) for row in scores]
    (entry,) = decoder_lora_run.history
    assert entry["accuracy"] == pytest.approx(classification_metrics(gold, predicted, 2)["accuracy"])
    assert entry["label_nll"] == pytest.approx(-sum(row[g] for row, g in zip(scores, gold)) / len(dev), rel=1e-4)


def test_decoder_head_writes_an_hf_folder_that_pagellm_runs(tmp_path, tiny_llama_dir, make_args):
    from transformers import AutoModelForCausalLM

    from pagellm import LLM, SamplingParams

    result = run_finetune(make_args(tiny_llama_dir, tmp_path / "head", strategy="head", dropout=0.15))
    saved = AutoModelForCausalLM.from_pretrained(str(result.out_dir)).eval()
    assert saved.config.attention_dropout == 0.15
    torch.testing.assert_close(saved.lm_head.weight, result.model.lm_head.weight.detach())
    prompt = [1, 200, 300, 400, 500]
    with torch.no_grad():
        hf_ids = saved.generate(torch.tensor([prompt]), max_new_tokens=4, do_sample=False)[0, len(prompt):].tolist()
    llm = LLM(str(result.out_dir), dtype="float32", num_blocks=64, block_size=16)
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=4, ignore_eos=True), use_tqdm=False)
    assert out[0].outputs[0].token_ids == hf_ids


def test_generate_task_trains_on_completions_with_the_dev_loss(tmp_path, tiny_llama_dir, make_args):
    rows = [{"prompt": f"Say the number {i}.", "completion": str(i)} for i in range(12)]
    (tmp_path / "train.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows))
    (tmp_path / "dev.jsonl").write_text("".join(json.dumps(r) + "\n" for r in rows[:4]))
    result = run_finetune(make_args(tiny_llama_dir, tmp_path / "sft", task="generate", strategy="lora", epochs=2.0,
                                    data=str(tmp_path / "train.jsonl"), eval_data=str(tmp_path / "dev.jsonl")))
    losses = [h["loss"] for h in result.history]
    assert len(losses) == 2 and "accuracy" not in result.history[0]
    assert result.best_metric == min(losses) and result.labels is None
    report = json.loads((result.out_dir / "train_report.json").read_text())
    assert report["metric"] == "loss" and report["task"] == "generate"
    assert json.loads((result.out_dir / "pagellm_task.json").read_text())["labels"] is None
