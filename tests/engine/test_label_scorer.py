"""Zero-shot classification with a decoder (LLM.classify(labels=...)): brute-force equality, one prefix per text."""

from __future__ import annotations

import pytest
import torch

from pagellm import LLM, InvalidRequest, LoRARequest, SamplingParams
from pagellm.label_prompt import encode_label_prompt, label_token_ids

TEXTS = ["I loved this movie, it was wonderful!", "Terrible service.",
         "The package arrived on Tuesday, as the tracking page had said it would."]
LABELS = ["positive", "negative", "neutral", "mixed feelings"]  # the last one is several tokens


@pytest.fixture(scope="module")
def hf_llama(tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    return AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32).eval()


def brute_force_probs(hf_model, tokenizer, text: str, labels: list[str], instruction: str | None = None) -> list[float]:
    """One full forward of prompt + label per label; the label's score is the sum of its tokens' logprobs."""
    prompt_ids = encode_label_prompt(tokenizer, text, labels, instruction)
    scores = []
    for label in labels:
        label_ids = label_token_ids(tokenizer, label, has_chat_template=True)
        with torch.no_grad():
            logits = hf_model(torch.tensor([prompt_ids + label_ids])).logits[0].float()
        logprobs = torch.log_softmax(logits, dim=-1)
        positions = range(len(prompt_ids) - 1, len(prompt_ids) + len(label_ids) - 1)  # position p scores token p+1
        scores.append(sum(logprobs[p, t].item() for p, t in zip(positions, label_ids)))
    return torch.softmax(torch.tensor(scores, dtype=torch.float64), dim=0).tolist()


def test_zero_shot_probs_equal_a_brute_force_forward_per_label(tiny_llm, hf_llama):
    tokenizer = tiny_llm.get_tokenizer()
    outs = tiny_llm.classify(TEXTS, labels=LABELS, use_tqdm=False)
    for text, out in zip(TEXTS, outs):
        want = brute_force_probs(hf_llama, tokenizer, text, LABELS)
        assert out.outputs.labels == LABELS and out.prompt == text
        assert out.prompt_token_ids == encode_label_prompt(tokenizer, text, LABELS)
        assert max(abs(a - b) for a, b in zip(out.outputs.probs, want)) < 1e-4, (out.outputs.probs, want)
    spread = torch.tensor([o.outputs.probs for o in outs])
    assert spread.std() > 1e-3  # not vacuous: the labels' probabilities differ
    custom = "Is this text {labels}? One word."
    (out,) = tiny_llm.classify(TEXTS[1], labels=["yes", "no"], instruction=custom, use_tqdm=False)
    want = brute_force_probs(hf_llama, tokenizer, TEXTS[1], ["yes", "no"], custom)
    assert max(abs(a - b) for a, b in zip(out.outputs.probs, want)) < 1e-4


def _count_computed_tokens(llm: LLM, monkeypatch) -> list[int]:
    """Spy on the model runner: the number of tokens each engine step computes."""
    runner = llm.llm_engine.core.worker.runner
    counts: list[int] = []
    execute = runner.execute

    def counting_execute(so):
        counts.append(so.total_num_scheduled_tokens)
        return execute(so)

    monkeypatch.setattr(runner, "execute", counting_execute)
    return counts


def test_the_shared_prompt_is_computed_once_per_text(tiny_llm, monkeypatch):
    engine = tiny_llm.llm_engine
    tokenizer, block_size, scheduler = engine.tokenizer, engine.cache_config.block_size, engine.core.scheduler
    label_lens = [len(label_token_ids(tokenizer, label, True)) for label in LABELS]
    counts = _count_computed_tokens(tiny_llm, monkeypatch)

    def once_bound(text: str) -> tuple[int, int]:
        """(tokens computed when the prompt is computed once, prefix-cache hit tokens that takes)."""
        num_prompt = len(encode_label_prompt(tokenizer, text, LABELS))
        hit = (num_prompt - 1) // block_size * block_size  # whole blocks before the position scoring the label
        assert num_prompt - hit <= block_size
        return num_prompt + sum(label_lens) + (len(LABELS) - 1) * (num_prompt - hit), (len(LABELS) - 1) * hit

    assert scheduler.reset_prefix_cache()
    hits_before = scheduler.prefix_cache_hits
    tiny_llm.classify(TEXTS[2], labels=LABELS, use_tqdm=False)
    num_computed, num_hits = once_bound(TEXTS[2])
    assert sum(counts) == num_computed and scheduler.prefix_cache_hits - hits_before == num_hits
    brute_force = len(LABELS) * len(encode_label_prompt(tokenizer, TEXTS[2], LABELS)) + sum(label_lens)
    assert num_computed < 0.5 * brute_force

    # Several texts at once: at most the once-per-text count (texts also share the template's head).
    assert scheduler.reset_prefix_cache()
    counts.clear()
    tiny_llm.classify(TEXTS, labels=LABELS, use_tqdm=False)
    assert sum(counts) <= sum(once_bound(text)[0] for text in TEXTS)
    assert not engine.has_unfinished_requests()


def test_prompt_logprobs_from_a_start_position_reuse_the_prefix_cache(tiny_llm):
    prompt = list(range(100, 140))
    full = tiny_llm.generate([prompt], SamplingParams(max_tokens=1, prompt_logprobs=0), use_tqdm=False)[0]
    start = 30
    params = SamplingParams(max_tokens=1, prompt_logprobs=0, prompt_logprobs_start=start)
    tail = tiny_llm.generate([prompt], params, use_tqdm=False)[0]
    assert 0 < tail.num_cached_tokens <= start - 1  # a hit, stopping before the position scoring token 30
    assert tail.prompt_logprobs[:start] == [None] * start and len(tail.prompt_logprobs) == len(prompt)
    for got, want in zip(tail.prompt_logprobs[start:], full.prompt_logprobs[start:], strict=True):
        assert list(got) == list(want) and abs(next(iter(got.values())) - next(iter(want.values()))) < 1e-5


@pytest.mark.parametrize("kwargs, match", [
    ({}, "pass labels"),
    ({"labels": ["only"]}, "at least two"),
    ({"labels": ["a", "a"]}, "distinct"),
    ({"labels": ["a", " "]}, "non-empty"),
    ({"labels": ["a", "b"], "instruction": 3}, "instruction"),
    ({"labels": ["a", "b"], "truncate_prompt_tokens": 8}, "truncate_prompt_tokens"),
    ({"labels": ["a", "b"], "lora_request": LoRARequest("x", 1, "/nowhere")}, "LoRA is not enabled"),
])
def test_bad_zero_shot_calls_raise_invalid_request_and_leave_the_engine_clean(tiny_llm, kwargs, match):
    with pytest.raises(InvalidRequest, match=match):
        tiny_llm.classify(["fine text"], use_tqdm=False, **kwargs)
    assert not tiny_llm.llm_engine.has_unfinished_requests()


def test_bad_texts_fail_before_any_request(tiny_llm):
    for texts, match in [(["fine", ""], "non-empty string"), ([], "non-empty list"),
                         (["word " * 600], "maximum context length")]:
        with pytest.raises(InvalidRequest, match=match):
            tiny_llm.classify(texts, labels=["a", "b"], use_tqdm=False)
        assert not tiny_llm.llm_engine.has_unfinished_requests()
    assert tiny_llm.classify("still works", labels=["a", "b"], use_tqdm=False)[0].outputs.num_classes == 2
