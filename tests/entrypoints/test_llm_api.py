"""The offline LLM API on the tiny model: sampling options, outputs and errors."""

from __future__ import annotations

import math

import pytest
import torch

from pagellm import LLM, InvalidRequest, SamplingParams

PROMPT = list(range(200, 220))


def _one(llm: LLM, params: SamplingParams, prompt=PROMPT):
    return llm.generate([prompt], params, use_tqdm=False)[0]


def test_seeded_sampling_is_reproducible_whatever_the_batch(tiny_llm):
    seeded = SamplingParams(temperature=1.0, seed=1234, max_tokens=20, ignore_eos=True)
    alone = _one(tiny_llm, seeded).outputs[0].token_ids
    noise = SamplingParams(temperature=1.0, max_tokens=20, ignore_eos=True)
    batch = tiny_llm.generate([[5, 6, 7], PROMPT, list(range(300, 340))], [noise, seeded, noise], use_tqdm=False)
    assert batch[1].outputs[0].token_ids == alone
    other_seed = _one(tiny_llm, SamplingParams(temperature=1.0, seed=99, max_tokens=20, ignore_eos=True))
    assert other_seed.outputs[0].token_ids != alone


def test_top_k_1_equals_greedy(tiny_llm):
    greedy = _one(tiny_llm, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True))
    top1 = _one(tiny_llm, SamplingParams(temperature=1.5, top_k=1, max_tokens=16, ignore_eos=True))
    assert top1.outputs[0].token_ids == greedy.outputs[0].token_ids


def test_stop_string_is_cut_from_the_text(tiny_llm):
    tok = tiny_llm.get_tokenizer()
    full = _one(tiny_llm, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True)).outputs[0]
    # pick a stop string from the middle of the greedy text
    text = full.text
    stop = text[len(text) // 2 : len(text) // 2 + 3]
    assert stop.strip(), text
    out = _one(tiny_llm, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop])).outputs[0]
    assert out.finish_reason == "stop" and out.stop_reason == stop
    assert out.text == text[: text.index(stop)]
    kept = _one(tiny_llm, SamplingParams(temperature=0, max_tokens=24, ignore_eos=True, stop=[stop],
                                         include_stop_str_in_output=True)).outputs[0]
    assert kept.text == text[: text.index(stop) + len(stop)]
    assert tok.decode(full.token_ids, skip_special_tokens=True) == text


def test_stop_token_ids_and_min_tokens(tiny_llm):
    full = _one(tiny_llm, SamplingParams(temperature=0, max_tokens=16, ignore_eos=True)).outputs[0]
    stop_id = full.token_ids[3]
    first = full.token_ids.index(stop_id)
    out = _one(tiny_llm, SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[stop_id])).outputs[0]
    assert out.token_ids == full.token_ids[: first + 1]
    assert out.finish_reason == "stop" and out.stop_reason == stop_id
    # min_tokens masks the stop id, so the sequence runs past where it stopped
    longer = _one(tiny_llm, SamplingParams(temperature=0, max_tokens=16, stop_token_ids=[stop_id],
                                           min_tokens=first + 2)).outputs[0]
    assert len(longer.token_ids) >= first + 2
    assert stop_id not in longer.token_ids[: first + 2]


def test_n_gives_n_distinct_samples(tiny_llm):
    out = _one(tiny_llm, SamplingParams(n=3, temperature=1.0, seed=7, max_tokens=12, ignore_eos=True))
    assert [c.index for c in out.outputs] == [0, 1, 2]
    assert all(len(c.token_ids) == 12 and c.finish_reason == "length" for c in out.outputs)
    assert len({tuple(c.token_ids) for c in out.outputs}) == 3


def test_logprobs_match_a_plain_forward(tiny_llm, tiny_llama_dir):
    from transformers import AutoModelForCausalLM

    out = _one(tiny_llm, SamplingParams(temperature=0, max_tokens=5, logprobs=3, ignore_eos=True,
                                        prompt_logprobs=2)).outputs
    completion = out[0]
    hf = AutoModelForCausalLM.from_pretrained(tiny_llama_dir, dtype=torch.float32)
    ids = torch.tensor([PROMPT + completion.token_ids])
    with torch.inference_mode():
        ref = torch.log_softmax(hf(ids).logits[0].float(), dim=-1)
    for i, (token, lp) in enumerate(zip(completion.token_ids, completion.logprobs)):
        row = ref[len(PROMPT) - 1 + i]
        assert len(lp) == 3 + (token not in row.topk(3).indices.tolist())
        assert lp[token] == pytest.approx(row[token].item(), abs=1e-4)
        assert list(lp)[0] == token  # the chosen token comes first
    assert completion.cumulative_logprob == pytest.approx(
        sum(ref[len(PROMPT) - 1 + i, t].item() for i, t in enumerate(completion.token_ids)), abs=1e-3)
    prompt_lps = _one(tiny_llm, SamplingParams(temperature=0, max_tokens=1, prompt_logprobs=2)).prompt_logprobs
    assert prompt_lps[0] is None and len(prompt_lps) == len(PROMPT)
    for pos in range(1, len(PROMPT)):
        assert prompt_lps[pos][PROMPT[pos]] == pytest.approx(ref[pos - 1, PROMPT[pos]].item(), abs=1e-4)


def test_multibyte_utf8_text_is_never_split(tiny_llm):
    tok = tiny_llm.get_tokenizer()
    # bias the tiny model towards the byte tokens of CJK and emoji text
    ids = tok.encode("月亮🌙很美😀", add_special_tokens=False)
    bias = {t: 100.0 for t in ids}
    out = _one(tiny_llm, SamplingParams(temperature=1.0, seed=3, max_tokens=24, logit_bias=bias)).outputs[0]
    # the sampled tokens include partial UTF-8 sequences, so the check below has teeth
    assert any("\ufffd" in tok.decode([t]) for t in out.token_ids)
    assert out.text == tok.decode(out.token_ids, skip_special_tokens=True)


@pytest.mark.parametrize(
    "kwargs, field",
    [({"temperature": -1}, "temperature"), ({"top_p": 0}, "top_p"), ({"top_k": -5}, "top_k"),
     ({"min_p": 2}, "min_p"), ({"n": 0}, "n"), ({"max_tokens": 0}, "max_tokens"),
     ({"presence_penalty": 3}, "presence_penalty"), ({"repetition_penalty": 0}, "repetition_penalty"),
     ({"logprobs": 100}, "logprobs"), ({"min_tokens": 9, "max_tokens": 3}, "min_tokens"),
     ({"logit_bias": {1: 500}}, "logit_bias")],
)
def test_bad_sampling_params_name_the_field(kwargs, field):
    with pytest.raises(ValueError, match=field) as info:
        SamplingParams(**kwargs)
    assert isinstance(info.value, InvalidRequest) and info.value.param == field


def test_bad_prompts_raise_and_leave_the_engine_usable(tiny_llm):
    params = SamplingParams(temperature=0, max_tokens=4)
    with pytest.raises(InvalidRequest, match="context length"):
        tiny_llm.generate([[1] * 600], params, use_tqdm=False)
    with pytest.raises(InvalidRequest, match="token ids"):
        tiny_llm.generate([PROMPT, [10**9]], params, use_tqdm=False)
    with pytest.raises(InvalidRequest, match="empty"):
        tiny_llm.generate([[]], params, use_tqdm=False)
    engine = tiny_llm.llm_engine
    assert not engine.has_unfinished_requests()
    assert engine.core.scheduler.kv_cache_usage == 0.0
    assert len(_one(tiny_llm, params).outputs[0].token_ids) >= 1


def test_abort_frees_every_block(tiny_llm):
    engine = tiny_llm.llm_engine
    for i in range(5):
        engine.add_request(f"abort-{i}", list(range(50, 90)), SamplingParams(max_tokens=50, ignore_eos=True))
    for _ in range(3):
        engine.step()
    assert engine.core.scheduler.kv_cache_usage > 0
    outs = engine.abort_request([f"abort-{i}" for i in range(5)])
    assert [o.outputs[0].finish_reason for o in outs] == ["abort"] * 5
    assert engine.core.scheduler.kv_cache_usage == 0.0 and not engine.has_unfinished_requests()


def test_max_tokens_none_runs_to_the_context_window(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, dtype="float32", max_model_len=40, block_size=4, num_blocks=64)
    out = llm.generate([list(range(30))], SamplingParams(max_tokens=None, ignore_eos=True), use_tqdm=False)[0]
    assert len(out.outputs[0].token_ids) == 10 and out.outputs[0].finish_reason == "length"


def test_chat_applies_the_template(tiny_llm):
    tok = tiny_llm.get_tokenizer()
    msgs = [{"role": "system", "content": "Be brief."}, {"role": "user", "content": "Hi"}]
    out = tiny_llm.chat(msgs, SamplingParams(temperature=0, max_tokens=4), use_tqdm=False)[0]
    expected = tok.apply_chat_template(msgs, tokenize=False, add_generation_prompt=True)
    assert out.prompt == expected
    assert out.prompt_token_ids == tok.encode(expected, add_special_tokens=False)


def test_priority_policy_runs_urgent_requests_first(tiny_llama_dir):
    llm = LLM(tiny_llama_dir, dtype="float32", max_num_seqs=1, block_size=4, num_blocks=64,
              scheduling_policy="priority")
    engine = llm.llm_engine
    params = SamplingParams(temperature=0, max_tokens=3, ignore_eos=True)
    engine.add_request("low", [1, 2, 3], params, priority=5)
    engine.add_request("high", [4, 5, 6], params, priority=-5)
    order = []
    while engine.has_unfinished_requests():
        order += [o.request_id for o in engine.step() if o.finished]
    assert order == ["high", "low"]


def test_greedy_logprob_is_the_max(tiny_llm):
    out = _one(tiny_llm, SamplingParams(temperature=0, max_tokens=3, logprobs=0, ignore_eos=True)).outputs[0]
    for token, lp in zip(out.token_ids, out.logprobs):
        assert list(lp) == [token] and lp[token] <= 0.0 and not math.isnan(lp[token])


@pytest.mark.parametrize("kwargs, field", [({"temperature": float("nan")}, "temperature"),
                                           ({"repetition_penalty": float("inf")}, "repetition_penalty"),
                                           ({"seed": 2**64}, "seed")])
def test_non_finite_and_oversized_values_are_rejected(kwargs, field):
    with pytest.raises(InvalidRequest, match=field):
        SamplingParams(**kwargs)


def test_final_output_only_reports_once_and_matches_cumulative(tiny_llm):
    """LLM.generate's requests skip the per-step cumulative outputs; the final one is unchanged."""
    engine = tiny_llm.llm_engine
    reports = {}
    for final_only in (False, True):
        params = SamplingParams(temperature=0, max_tokens=6, ignore_eos=True, logprobs=1,
                                final_output_only=final_only)
        rid = engine.next_request_id()
        engine.add_request(rid, [5, 6, 7], params)
        outs = []
        while engine.has_unfinished_requests():
            outs.extend(engine.step())
        reports[final_only] = outs
    assert len(reports[False]) == 6 and len(reports[True]) == 1 and reports[True][0].finished
    last, only = reports[False][-1].outputs[0], reports[True][0].outputs[0]
    assert (only.token_ids, only.text, only.logprobs) == (last.token_ids, last.text, last.logprobs)
