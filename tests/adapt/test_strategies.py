"""Each strategy trains exactly the parameters it should: weights compared right before and after training."""

from __future__ import annotations

import re

import pytest
import torch

from pagellm.adapt import strategy as strategy_module
from pagellm.adapt.finetune import FinetuneResult, run_finetune
from pagellm.adapt.strategy import parse_strategy


def _train_and_diff(monkeypatch, args) -> tuple[FinetuneResult, set[str], set[str]]:
    """Run finetune; return (result, names of the parameters that changed, names of all parameters)."""
    before: dict[str, torch.Tensor] = {}
    real_apply = strategy_module.apply_strategy

    def snapshot_apply(*a, **kw):
        model = real_apply(*a, **kw)
        before.update({name: p.detach().clone() for name, p in model.named_parameters()})
        return model

    monkeypatch.setattr(strategy_module, "apply_strategy", snapshot_apply)
    result = run_finetune(args)
    after = dict(result.model.named_parameters())
    assert set(after) == set(before)
    changed = {name for name in before if not torch.equal(before[name], after[name].detach())}
    return result, changed, set(before)


def _matching(names: set[str], pattern: str) -> set[str]:
    return {n for n in names if re.search(pattern, n)}


ENCODER_CASES = {
    "head": r"^classifier\.",
    "top-layers:1": r"^(classifier\.|bert\.pooler\.|bert\.encoder\.layer\.1\.)",
    "full": r".",
    # LoRA: the adapter matrices and the head's trainable copy; never a base weight or the head's original
    "lora": r"(\.lora_[AB]\.|^base_model\.model\.classifier\.modules_to_save\.)",
    "adalora": r"(\.lora_[ABE]\.|^base_model\.model\.classifier\.modules_to_save\.)",
}


@pytest.mark.parametrize("name", sorted(ENCODER_CASES))
def test_encoder_strategy_changes_only_its_parameters(name, tmp_path, tiny_bert_dir, make_args, monkeypatch):
    result, changed, names = _train_and_diff(monkeypatch, make_args(tiny_bert_dir, tmp_path / name, strategy=name,
                                                                    max_length=32))
    expected = _matching(names, ENCODER_CASES[name])
    assert changed and changed <= expected
    if name != "adalora":  # AdaLoRA masks (prunes) some ranks, which then stay at zero
        assert changed == expected
    assert result.num_trainable_params == sum(p.numel() for n, p in result.model.named_parameters()
                                              if n in expected)
    if name != "full":
        assert not _matching(changed, r"(embeddings|\.base_layer\.|original_module)")


DECODER_CASES = {
    "head": r"^lm_head\.",
    "top-layers:1": r"^(lm_head\.|model\.norm\.|model\.layers\.1\.)",
    "lora": r"\.lora_[AB]\.",
    "prefix": r"^prompt_encoder\.",
}


@pytest.mark.parametrize("name", sorted(DECODER_CASES))
def test_decoder_strategy_changes_only_its_parameters(name, tmp_path, tiny_llama_dir, make_args, monkeypatch):
    result, changed, names = _train_and_diff(monkeypatch, make_args(tiny_llama_dir, tmp_path / name, strategy=name))
    expected = _matching(names, DECODER_CASES[name])
    assert changed == expected
    assert result.model_kind == "decoder" and result.num_trainable_params < result.num_total_params


def test_parse_strategy():
    assert parse_strategy("top-layers:3").num_top_layers == 3
    assert str(parse_strategy(" LoRA ")) == "lora"
    assert parse_strategy("prefix").is_peft and not parse_strategy("full").is_peft
