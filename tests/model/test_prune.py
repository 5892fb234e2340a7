"""pagellm prune: the pruned folder loads in pagellm and transformers and equals the model minus those layers."""

from __future__ import annotations

import pytest
import torch

from pagellm import LLM, InvalidRequest, SamplingParams
from pagellm.engine.perplexity import perplexity
from pagellm.entrypoints.cli import main
from pagellm.model.prune import parse_layers

TEXT = " ".join(["The quick brown fox jumps over the lazy dog while the cat sleeps in the warm sun."] * 12)


def test_prune_matches_transformers_with_the_layer_removed(tiny_llama_dir, tmp_path):
    from transformers import AutoModelForCausalLM

    out = tmp_path / "pruned"
    assert main([ "prune", tiny_llama_dir, "--drop-layers", "0", "--out", str(out), "--dtype", "float32"]) == 0
    ref = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    del ref.model.layers[0]
    ref.config.num_hidden_layers = 1
    pruned_hf = AutoModelForCausalLM.from_pretrained(str(out), dtype=torch.float32).eval()
    ids = torch.tensor([[5, 17, 300, 2000, 42, 7]])
    with torch.inference_mode():
        assert torch.allclose(pruned_hf(ids).logits, ref(ids, use_cache=False).logits, atol=1e-5)
    llm = LLM(str(out), dtype="float32", num_blocks=64, block_size=4)
    got = llm.generate([ids[0].tolist()], SamplingParams(temperature=0, max_tokens=8, ignore_eos=True),
                       use_tqdm=False)[0].outputs[0].token_ids
    want = pruned_hf.generate(ids, max_new_tokens=8, min_new_tokens=8, do_sample=False)[0, 6:].tolist()
    assert got == want


def test_perplexity_equals_transformers(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    llm = LLM(tiny_llama_dir, dtype="float32", num_blocks=512, block_size=4)
    result = perplexity(llm, TEXT, window=64)
    ids = llm.get_tokenizer().encode(TEXT, add_special_tokens=False)
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()
    nll, count = 0.0, 0
    with torch.inference_mode():
        for i in range(0, len(ids), 64):
            piece = torch.tensor([ids[i : i + 64]])
            if piece.shape[1] < 2:
                continue
            logprobs = hf(piece).logits[0, :-1].log_softmax(-1)
            nll -= logprobs.gather(1, piece[0, 1:, None]).sum().item()
            count += piece.shape[1] - 1
    assert result.num_tokens == count
    assert result.perplexity == pytest.approx(torch.tensor(nll / count).exp().item(), rel=1e-4)


def test_bad_layer_lists_are_clear_errors(tiny_llama_dir, tmp_path):
    assert parse_layers("0, 2-3", 4) == [0, 2, 3]
    for text, match in [("4", "does not exist"), ("0-3", "every layer"), ("x", "indices like"), ("", "no layer")]:
        with pytest.raises(InvalidRequest, match=match):
            parse_layers(text, 4)
    assert main(["prune", tiny_llama_dir, "--drop-layers", "9", "--out", str(tmp_path / "x")]) == 2
