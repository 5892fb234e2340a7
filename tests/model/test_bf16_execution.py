"""bfloat16 models: bf16 weight values whatever kernels this CPU runs them with."""

from __future__ import annotations

import torch

from pagellm import LLM, SamplingParams
from pagellm.model.loader.model_loader import compute_dtype_for, load_model
from pagellm.model_source import resolve_model


def _hf_bf16_weights_in_fp32(path):
    from transformers import AutoModelForCausalLM

    model = AutoModelForCausalLM.from_pretrained(path, dtype=torch.float32).eval()
    with torch.no_grad():
        for p in model.parameters():
            p.copy_(p.to(torch.bfloat16).to(torch.float32))
    return model


def test_bf16_model_holds_bf16_values(tiny_llama_dir):
    model = load_model(resolve_model(tiny_llama_dir), torch.bfloat16)
    assert model.weight_dtype == torch.bfloat16
    for name, p in model.named_parameters():
        assert torch.equal(p, p.to(torch.bfloat16).to(p.dtype)), name
    assert model.embed_tokens.weight.dtype == compute_dtype_for(torch.bfloat16)


def test_bf16_logprobs_follow_the_bf16_reference(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, dtype="bfloat16", block_size=4, num_blocks=64)
    prompt = list(range(300, 330))
    out = llm.generate([prompt], SamplingParams(temperature=0, max_tokens=8, logprobs=0, prompt_logprobs=0,
                                                ignore_eos=True), use_tqdm=False)[0]
    ref_model = _hf_bf16_weights_in_fp32(tiny_llama_dir)
    ids = torch.tensor([prompt + out.outputs[0].token_ids])
    with torch.inference_mode():
        ref = torch.log_softmax(ref_model(ids).logits[0].float(), dim=-1)
    # prompt positions run the many-row kernels: float32 math on the same bf16 values
    tol = 1e-3 if compute_dtype_for(torch.bfloat16) == torch.float32 else 5e-2
    for pos in range(1, len(prompt)):
        assert abs(out.prompt_logprobs[pos][prompt[pos]] - ref[pos - 1, prompt[pos]].item()) < tol
    # decode steps may read bf16 activations: close, and greedy picks the reference's argmax
    for i, (token, lp) in enumerate(zip(out.outputs[0].token_ids, out.outputs[0].logprobs)):
        row = ref[len(prompt) - 1 + i]
        assert abs(lp[token] - row[token].item()) < 5e-2
        assert row[token].item() >= row.max().item() - 5e-2
