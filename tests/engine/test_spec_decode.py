"""Speculative decoding (n-gram proposals): exact greedy outputs, the target's distribution when sampling,
clean KV accounting, the adaptive off-switch, and bad configs refused."""

from __future__ import annotations

import shutil

import pytest

from pagellm import LLM, InvalidRequest, SamplingParams
from pagellm.config import SpeculativeConfig
from pagellm.core.kv_cache_manager import hash_block_tokens
from pagellm.engine.spec_decode import NgramSpeculator, StepCostFit, ngram_lookup

# "fixed": every proposal is verified, so these tests exercise verification whatever the step costs here
NGRAM = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1,
         "length_policy": "fixed"}
REPETITIVE = ["a b c d a b c d a b c d a b", "one two three one two three one two three",
              "Hello there, how are you? Hello there, how", "1, 2, 3, 1, 2, 3, 1, 2, 3, 1, 2,"]
GREEDY = SamplingParams(temperature=0, max_tokens=40, ignore_eos=True)


@pytest.fixture(scope="module")
def peaked_llama_dir(tiny_llama_dir, tmp_path_factory) -> str:
    """The tiny Llama with its logits scaled up 12x: top tokens of probability ~0.5-0.9, so sampled outputs
    repeat enough for n-gram proposals, and samples still differ (the tiny model's own are near uniform)."""
    from safetensors.torch import load_file, save_file

    path = tmp_path_factory.mktemp("peaked_llama")
    shutil.copytree(tiny_llama_dir, path, dirs_exist_ok=True)
    weights = load_file(path / "model.safetensors")
    weights["lm_head.weight"] = weights["lm_head.weight"] * 12
    save_file(weights, path / "model.safetensors", metadata={"format": "pt"})
    return str(path)


@pytest.fixture(scope="module")
def loop_prompt(peaked_llama_dir) -> list[int]:
    """Token ids that end in the peaked model's own greedy cycle (period 3): a sample at temperature 1
    follows the cycle about 2 times in 3, so proposals are accepted and rejected often."""
    llm = LLM(peaked_llama_dir, dtype="float32", block_size=4)
    out = llm.generate(["1, 2, 3, 1, 2, 3"], SamplingParams(temperature=0, max_tokens=200, ignore_eos=True),
                       use_tqdm=False)[0]
    return out.prompt_token_ids + out.outputs[0].token_ids


def _engines(tiny_llama_dir, **kwargs) -> tuple[LLM, LLM]:
    kw = dict(dtype="float32", max_num_seqs=8, block_size=4, max_num_batched_tokens=64, **kwargs)
    return LLM(tiny_llama_dir, **kw), LLM(tiny_llama_dir, speculative_config=NGRAM, **kw)


def _tokens(llm: LLM, prompts, params) -> list[list[int]]:
    return [out.outputs[0].token_ids for out in llm.generate(prompts, params, use_tqdm=False)]


def _stats(llm: LLM):
    return llm.llm_engine.spec_decode_stats()


# ---- the proposer ---------------------------------------------------------------------------------

def test_ngram_lookup_takes_the_longest_suffix_match_and_what_followed_it():
    assert ngram_lookup([5, 6, 7, 8, 5, 6], 2, 4, 3) == [7, 8, 5]
    assert ngram_lookup([1, 9, 2, 3, 9, 2, 4, 7, 9, 2], 1, 3, 2) == [4, 7]  # the latest "9 2" is followed by 4
    assert ngram_lookup([1, 2, 3, 4], 2, 4, 3) == []  # no suffix occurred before
    assert ngram_lookup([3, 3], 1, 4, 5) == [3]  # only what exists after the match
    assert ngram_lookup([256, 1, 0, 0, 1], 2, 2, 2) == []  # a byte-level match across tokens is no match


@pytest.mark.parametrize(("spec", "match"), [
    ({"method": "eagle"}, "method must be one of"),
    ({"method": "draft_model", "model": "x.gguf"}, "not implemented yet"),
    ({"num_speculative_tokens": 0}, "num_speculative_tokens"),
    ({"prompt_lookup_min": 5, "prompt_lookup_max": 2}, "prompt_lookup_min"),
    ({"lookahead": 3}, "unknown fields"),
    ("{not json", "not valid JSON"),
])
def test_bad_speculative_configs_are_refused(spec, match):
    with pytest.raises(InvalidRequest, match=match):
        SpeculativeConfig.from_dict(spec)


def test_the_cli_json_form_is_accepted():
    config = SpeculativeConfig.from_dict('{"method": "ngram", "num_speculative_tokens": 3}')
    assert config.num_speculative_tokens == 3 and config.prompt_lookup_min == 2


# ---- the cost policy: how many proposals a step verifies ----------------------------------------------

def test_the_step_cost_fit_recovers_time_per_row():
    fit = StepCostFit()
    assert fit.coefficients() == (0.75, 0.25)  # the prior, until steps of two sizes were seen
    for rows in [1, 5, 1, 3, 1, 2, 5, 1] * 4:
        fit.observe(rows, 0.010 + 0.002 * rows)
    a, b = fit.coefficients()
    assert a == pytest.approx(0.010, rel=1e-6) and b == pytest.approx(0.002, rel=1e-6)


class _Req:
    """What the speculator reads of a decoding request."""

    def __init__(self, req_id: str, proposals: list[int]) -> None:
        self.req_id, self.spec_token_ids = req_id, list(proposals)
        self.num_tokens, self.num_computed_tokens = 10, 9


def _cost_speculator(row_cost: float) -> NgramSpeculator:
    """A step of R rows taking 1 + row_cost * R (ms)."""
    spec = NgramSpeculator(SpeculativeConfig(num_speculative_tokens=4), max_model_len=100)
    for rows in (1, 2, 5, 1, 3) * 4:
        spec.observe_step(rows, 1.0 + row_cost * rows)
    return spec


def test_cheap_rows_verify_every_proposal_and_dear_rows_only_likely_ones():
    cheap, dear = _cost_speculator(0.02), _cost_speculator(1.0)
    for spec in (cheap, dear):  # request "good" has had every proposal accepted, "bad" none
        for _ in range(10):
            spec.record("good", 4, 4)
            spec.record("bad", 4, 0)
    reqs = {name: [_Req(n, [1, 2, 3, 4]) for n in ("good", "bad", "new")] for name in ("cheap", "dear")}
    cheap._keep_worthwhile(reqs["cheap"])
    dear._keep_worthwhile(reqs["dear"])
    kept = {name: [len(r.spec_token_ids) for r in rs] for name, rs in reqs.items()}
    # rows at 2% of a step: worth verifying even unlikely proposals; a row as dear as the whole step of 3
    # requests: only those at least as likely as the step's tokens per unit of time (E / (a + b R))
    assert kept["cheap"][0] == 4 and kept["cheap"][2] >= 2
    assert kept["dear"][1] == 0 and 1 <= kept["dear"][0] < 4 and kept["dear"][2] < kept["cheap"][2]
    assert kept["cheap"][1] < 4  # all rejected: not even cheap rows are worth it past the first position
    alone = _Req("good", [1, 2, 3, 4])  # alone in its step, the sure request verifies all 4 even when rows are dear
    dear._keep_worthwhile([alone])
    assert len(alone.spec_token_ids) == 4


# ---- greedy: token for token what decoding one token a step gives ------------------------------------

@pytest.mark.parametrize("policy", ["fixed", "cost"])
def test_greedy_outputs_equal_plain_decoding_at_batch_1_and_in_a_mixed_batch(tiny_llama_dir, policy):
    base = LLM(tiny_llama_dir, dtype="float32", max_num_seqs=8, block_size=4, max_num_batched_tokens=64)
    spec = LLM(tiny_llama_dir, dtype="float32", max_num_seqs=8, block_size=4, max_num_batched_tokens=64,
               speculative_config={**NGRAM, "length_policy": policy})
    for prompt in REPETITIVE:  # batch 1
        assert _tokens(spec, [prompt], GREEDY) == _tokens(base, [prompt], GREEDY)
    # a mixed batch: penalties and min_tokens (which read the tokens before each verified position) beside
    # plain requests and a long prompt
    prompts = REPETITIVE + ["The story begins " * 12, REPETITIVE[0]]
    params = [GREEDY, GREEDY, SamplingParams(temperature=0, max_tokens=40, ignore_eos=True, repetition_penalty=1.3),
              SamplingParams(temperature=0, max_tokens=40, presence_penalty=0.5, frequency_penalty=0.3),
              GREEDY, SamplingParams(temperature=0, max_tokens=40, min_tokens=30)]
    assert _tokens(spec, prompts, params) == _tokens(base, prompts, params)
    stats = _stats(spec)
    if policy == "fixed":  # "cost" verifies as many as this machine's step times make worthwhile: maybe few
        assert stats.num_draft_tokens > 50 and 0 < stats.num_accepted_tokens < stats.num_draft_tokens


def test_greedy_outputs_survive_preemption(tiny_llama_dir):
    base, spec = _engines(tiny_llama_dir, num_blocks=40)  # 160 token slots for 8 growing sequences
    prompts = [f"{p} {i}" for i in range(2) for p in REPETITIVE]
    params = SamplingParams(temperature=0, max_tokens=30, ignore_eos=True)
    assert _tokens(spec, prompts, params) == _tokens(base, prompts, params)
    assert spec.llm_engine.core.scheduler.num_preemptions > 0 and _stats(spec).num_accepted_tokens > 0


def test_stop_strings_and_logprobs_match_plain_decoding(tiny_llama_dir):
    base, spec = _engines(tiny_llama_dir)
    reference = base.generate(REPETITIVE[:2], GREEDY, use_tqdm=False)
    # a stop string that first appears in the middle of the plain output
    stops = [base.get_tokenizer().decode(out.outputs[0].token_ids[12:15]) for out in reference]
    params = [SamplingParams(temperature=0, max_tokens=40, stop=[s], logprobs=2) for s in stops]
    a = base.generate(REPETITIVE[:2], params, use_tqdm=False)
    b = spec.generate(REPETITIVE[:2], params, use_tqdm=False)
    for x, y in zip(a, b):
        assert x.outputs[0].token_ids == y.outputs[0].token_ids and x.outputs[0].text == y.outputs[0].text
        assert x.outputs[0].finish_reason == y.outputs[0].finish_reason == "stop"
        for lx, ly in zip(x.outputs[0].logprobs, y.outputs[0].logprobs, strict=True):
            assert lx.keys() == ly.keys()
            assert all(abs(lx[t] - ly[t]) < 1e-4 for t in lx)
    assert _stats(spec).num_accepted_tokens > 0


# ---- KV accounting --------------------------------------------------------------------------------

def test_rejected_proposals_free_their_blocks_and_never_reach_the_prefix_cache(peaked_llama_dir):
    _, spec = _engines(peaked_llama_dir, num_blocks=256)
    outs = spec.generate(REPETITIVE, SamplingParams(temperature=1.0, seed=3, max_tokens=40, ignore_eos=True),
                         use_tqdm=False)
    stats = _stats(spec)
    assert stats.num_draft_tokens - stats.num_accepted_tokens > 20  # many rejections
    core = spec.llm_engine.core
    pool = core.scheduler.kv_cache_manager.block_pool
    assert pool.get_num_free_blocks() == pool.num_blocks  # every block is back
    expected = set()  # the hashes of the full blocks of the sequences as they were accepted
    for out in outs:
        tokens = out.prompt_token_ids + out.outputs[0].token_ids
        parent = None
        for i in range(len(tokens) // 4):
            parent = hash_block_tokens(parent, tokens[i * 4 : (i + 1) * 4], (0, None))
            expected.add(parent)
    assert pool.cached_blocks and set(pool.cached_blocks) <= expected


def test_a_prefix_cached_by_a_speculating_run_gives_the_same_continuation(tiny_llama_dir):
    base, spec = _engines(tiny_llama_dir)
    first = spec.generate(REPETITIVE, GREEDY, use_tqdm=False)
    # the accepted sequences as new prompts: their blocks are prefix-cache hits in spec, computed fresh in base
    again = [out.prompt_token_ids + out.outputs[0].token_ids for out in first]
    params = SamplingParams(temperature=0, max_tokens=8, ignore_eos=True)
    hits_before = spec.llm_engine.core.scheduler.prefix_cache_hits
    assert _tokens(spec, again, params) == _tokens(base, again, params)
    assert spec.llm_engine.core.scheduler.prefix_cache_hits > hits_before


# ---- sampling: the target's distribution ----------------------------------------------------------

def test_sampled_tokens_follow_the_target_distribution(peaked_llama_dir, loop_prompt):
    """Chi-square, per position, of the first 3 tokens (the 2nd is a verified proposal or a residual draw,
    the 3rd often the bonus token) over seeded samples with and without speculation; fixed seeds, so no
    flakiness."""
    scipy_stats = pytest.importorskip("scipy.stats")
    base, spec = _engines(peaked_llama_dir)
    params = [SamplingParams(temperature=1.0, seed=i, max_tokens=3, ignore_eos=True) for i in range(600)]
    a = _tokens(base, [loop_prompt] * len(params), params)
    b = _tokens(spec, [loop_prompt] * len(params), params)
    stats = _stats(spec)
    assert stats.num_accepted_tokens > 100 and stats.num_draft_tokens - stats.num_accepted_tokens > 100
    for position in (0, 1, 2):
        counts: dict[int, list[int]] = {}
        for tokens, side in ((a, 0), (b, 1)):
            for seq in tokens:
                counts.setdefault(seq[position], [0, 0])[side] += 1
        common = sorted(counts, key=lambda t: -sum(counts[t]))[:8]
        table = [counts[t] for t in common]
        rest = [sum(counts[t][side] for t in counts if t not in common) for side in (0, 1)]
        if sum(rest) >= 10:
            table.append(rest)
        _, p_value, _, _ = scipy_stats.chi2_contingency(table)
        assert p_value > 0.01, (position, table)
    assert a != b  # speculation draws differently, with the same distribution


# ---- the off-switch ------------------------------------------------------------------------------

def test_a_request_whose_proposals_keep_failing_stops_proposing(peaked_llama_dir):
    # NOTE: from "x y x y ..." the peaked model's samples wander, and an n-gram proposal is rarely right
    prompt, params = "x y x y x y x y x y", SamplingParams(temperature=1.0, seed=1, max_tokens=120, ignore_eos=True)
    kw = dict(dtype="float32", block_size=4)
    never_off = LLM(peaked_llama_dir, speculative_config={**NGRAM, "min_acceptance_rate": 0.0}, **kw)
    adaptive = LLM(peaked_llama_dir, speculative_config={**NGRAM, "min_acceptance_rate": 0.5,
                                                         "acceptance_window": 8}, **kw)
    never_off.generate([prompt], params, use_tqdm=False)
    adaptive.generate([prompt], params, use_tqdm=False)
    always, switched = _stats(never_off), _stats(adaptive)
    assert always.num_draft_tokens > 50 and always.acceptance_rate < 0.5  # samples rarely follow the n-gram
    assert switched.num_draft_tokens < always.num_draft_tokens / 4
    assert switched.num_draft_tokens >= 8  # it tried a window's worth first


@pytest.mark.slow
def test_bundled_model_greedy_outputs_equal_plain_decoding():
    """The default engine (int4 GGUF): batch 1 and a mixed batch, an extractive prompt and free chat."""
    kw = dict(enable_prefix_caching=False, max_num_seqs=4)
    base, spec = LLM(**kw), LLM(speculative_config=NGRAM, **kw)
    code = "def add(a, b):\n    return a + b\n\ndef sub(a, b):\n    return a - b\n"
    prompts = [f"Repeat this code exactly:\n{code}\nHere it is again:\n", "The capital of France is",
               "Write a short poem about the sea."]
    params = SamplingParams(temperature=0, max_tokens=48, ignore_eos=True)
    assert _tokens(spec, prompts[:1], params) == _tokens(base, prompts[:1], params)
    assert _tokens(spec, prompts, params) == _tokens(base, prompts, params)
    assert _stats(spec).num_accepted_tokens > 20


def test_constrained_requests_speculate_within_their_grammar(tiny_llama_dir):
    """The grammar masks every verified position: the same JSON token for token, and proposals are used."""
    from pagellm.structured_output import StructuredOutputsParams

    base, spec = _engines(tiny_llama_dir)
    schema = {"type": "object", "properties": {"items": {"type": "array", "minItems": 6, "maxItems": 6,
                                                          "items": {"type": "object", "properties": {
                                                              "id": {"type": "integer", "minimum": 0,
                                                                     "maximum": 9}}, "required": ["id"]}}},
              "required": ["items"]}
    constrained = SamplingParams(temperature=0, max_tokens=80,
                                 structured_outputs=StructuredOutputsParams(json=schema))
    prompts = ['Items: {"items": [{"id": 1}, {"id": 2}]} and again:', "List:"]
    expected = base.generate(prompts, constrained, use_tqdm=False)
    got = spec.generate(prompts, constrained, use_tqdm=False)
    for a, b in zip(expected, got):
        assert a.outputs[0].token_ids == b.outputs[0].token_ids
        assert a.outputs[0].finish_reason == b.outputs[0].finish_reason
    assert _stats(spec).num_accepted_tokens > 5  # the repeated '{"id": ' structure is proposed and accepted
