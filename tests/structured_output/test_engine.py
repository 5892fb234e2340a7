"""Constrained decoding in the engine, on the tiny random Llama (its output is noise, so only the grammar
can make it match): every kind matches, the usual engine features keep working under a grammar, and
unconstrained requests are untouched."""

from __future__ import annotations

import json
import re
import threading

import pytest

from pagellm import LLM, InvalidRequest, SamplingParams
from pagellm.structured_output import StructuredOutputsParams

SCHEMA = {
    "type": "object",
    "properties": {
        "color": {"type": "string", "enum": ["red", "green", "blue"]},
        "size": {"type": "integer", "minimum": 1, "maximum": 9},
        "tags": {"type": "array", "items": {"type": "boolean"}, "maxItems": 2},
    },
    "required": ["color", "size", "tags"],
    "additionalProperties": False,
}
PROMPTS = ["The weather today is", "List three colors:", "Once upon a time", "def main():"]


def greedy(max_tokens: int = 40, **kw) -> SamplingParams:
    return SamplingParams(temperature=0.0, max_tokens=max_tokens, **kw)


def check_schema(text: str) -> None:
    value = json.loads(text)
    assert set(value) == {"color", "size", "tags"}, value
    assert value["color"] in ("red", "green", "blue") and 1 <= value["size"] <= 9
    assert isinstance(value["tags"], list) and len(value["tags"]) <= 2
    assert all(isinstance(t, bool) for t in value["tags"])


@pytest.fixture(scope="module")
def llm(tiny_llama_dir) -> LLM:
    return LLM(tiny_llama_dir, dtype="float32", max_num_seqs=8, max_num_batched_tokens=64, block_size=4,
               num_blocks=512)


def test_json_schema_matches_and_finishes_with_stop(llm: LLM) -> None:
    so = StructuredOutputsParams(json=SCHEMA, whitespace_pattern="")
    outs = llm.generate(PROMPTS, greedy(80, structured_outputs=so))
    for out in outs:
        assert out.outputs[0].finish_reason == "stop", out.outputs[0].text
        check_schema(out.outputs[0].text)


def test_regex_choice_grammar_and_json_object_match(llm: LLM) -> None:
    cases = [
        (StructuredOutputsParams(regex=r"\d{3}-\d{4}"), lambda t: re.fullmatch(r"\d{3}-\d{4}", t)),
        (StructuredOutputsParams(choice=["alpha", "beta", "gamma delta"]),
         lambda t: t in ("alpha", "beta", "gamma delta")),
        (StructuredOutputsParams(grammar='root ::= "x" [0-9] [0-9] "y"'), lambda t: re.fullmatch(r"x\d\dy", t)),
        (StructuredOutputsParams(json_object=True, whitespace_pattern=""),
         lambda t: t.startswith("{")),  # a random model may not close its object in time: checked below
    ]
    for so, matches in cases:
        for out in llm.generate(PROMPTS, greedy(30, structured_outputs=so)):
            assert matches(out.outputs[0].text), (so.kind, out.outputs[0].text)
            if so.kind != "json_object":
                assert out.outputs[0].finish_reason == "stop"
            elif out.outputs[0].finish_reason == "stop":
                assert isinstance(json.loads(out.outputs[0].text), dict)


def test_cut_off_by_max_tokens_is_length(llm: LLM) -> None:
    out = llm.generate(PROMPTS[0], greedy(3, structured_outputs=StructuredOutputsParams(json=SCHEMA)))[0]
    assert out.outputs[0].finish_reason == "length" and len(out.outputs[0].token_ids) == 3
    assert out.outputs[0].text.startswith("{")


def test_grammar_end_stops_even_with_ignore_eos(llm: LLM) -> None:
    so = StructuredOutputsParams(choice=["yes", "no"])
    out = llm.generate(PROMPTS[0], greedy(20, ignore_eos=True, structured_outputs=so))[0]
    assert out.outputs[0].finish_reason == "stop" and out.outputs[0].text in ("yes", "no")


def test_n_samples_and_seeded_sampling_stay_valid(llm: LLM) -> None:
    so = StructuredOutputsParams(json=SCHEMA, whitespace_pattern="")
    params = SamplingParams(n=6, temperature=1.0, seed=7, max_tokens=80, structured_outputs=so)
    outs = llm.generate(PROMPTS[0], params)[0].outputs
    assert len(outs) == 6
    for seq in outs:
        check_schema(seq.text)
    assert len({seq.text for seq in outs}) > 1
    again = llm.generate(PROMPTS[0], params)[0].outputs
    assert [s.text for s in again] == [s.text for s in outs]  # seeded: reproducible


def test_unconstrained_rows_get_the_same_greedy_tokens_beside_constrained(llm: LLM) -> None:
    alone = [o.outputs[0].token_ids for o in llm.generate(PROMPTS, greedy(20))]
    so = StructuredOutputsParams(json=SCHEMA)
    mixed_prompts = [p for prompt in PROMPTS for p in (prompt, prompt)]
    mixed_params = [p for _ in PROMPTS for p in (greedy(20), greedy(20, structured_outputs=so))]
    mixed = llm.generate(mixed_prompts, mixed_params)
    assert [mixed[2 * i].outputs[0].token_ids for i in range(len(PROMPTS))] == alone
    for i in range(len(PROMPTS)):
        assert mixed[2 * i + 1].outputs[0].text.startswith("{")


def test_preemption_chunked_prefill_and_prefix_cache_give_the_same_output(tiny_llama_dir, llm: LLM) -> None:
    so = StructuredOutputsParams(json=SCHEMA, whitespace_pattern="")
    long_prompts = [p + " and then some more words to make a longer prompt" * 3 for p in PROMPTS]
    expected = [o.outputs[0].text for o in llm.generate(long_prompts, greedy(60, structured_outputs=so))]
    # tiny KV pool (preemptions), 8-token chunks (chunked prefill), prefix cache shared across the repeat
    small = LLM(tiny_llama_dir, dtype="float32", max_num_seqs=4, max_num_batched_tokens=8, block_size=4,
                num_blocks=48)
    for _ in range(2):
        got = [o.outputs[0].text for o in small.generate(long_prompts, greedy(60, structured_outputs=so))]
        assert got == expected
    assert small.llm_engine.core.scheduler.num_preemptions > 0


def test_stop_strings_cut_constrained_output(llm: LLM) -> None:
    so = StructuredOutputsParams(json=SCHEMA, whitespace_pattern="")
    out = llm.generate(PROMPTS[0], greedy(80, structured_outputs=so, stop=[","]))[0].outputs[0]
    assert out.finish_reason == "stop" and "," not in out.text and out.text.startswith("{")


@pytest.mark.parametrize(("so", "param"), [
    (dict(json={"type": "nonsense"}), "structured_outputs.json"),
    (dict(json={"$ref": "#/nowhere"}), "structured_outputs.json"),
    (dict(regex="a(b"), "structured_outputs.regex"),
    (dict(grammar="root ::= undefined_rule"), "structured_outputs.grammar"),
    (dict(choice=[]), "structured_outputs.choice"),
    (dict(regex="a", choice=["a"]), "structured_outputs"),
    (dict(json=SCHEMA, whitespace_pattern=r"[ \n]*"), "structured_outputs.whitespace_pattern"),
])
def test_invalid_specs_raise_invalid_request_naming_the_field(llm: LLM, so: dict, param: str) -> None:
    with pytest.raises(InvalidRequest) as info:
        llm.generate(PROMPTS[0], greedy(5, structured_outputs=so))
    assert info.value.param == param, info.value
    # the engine goes on
    assert llm.generate(PROMPTS[0], greedy(3))[0].outputs[0].finish_reason == "length"


def test_a_compiling_grammar_does_not_stall_other_requests(tiny_llama_dir, monkeypatch) -> None:
    llm = LLM(tiny_llama_dir, dtype="float32", max_num_seqs=4, block_size=4, num_blocks=256)
    engine = llm.llm_engine
    manager = engine.structured_output
    release = threading.Event()
    compile_ = manager._compile

    def slow_compile(grammar):
        assert release.wait(30)
        return compile_(grammar)

    monkeypatch.setattr(manager, "_compile", slow_compile)
    so = StructuredOutputsParams(regex=r"[a-z]{4}")
    engine.add_request("constrained", PROMPTS[0], greedy(10, structured_outputs=so))
    engine.add_request("free", PROMPTS[1], greedy(5))
    finished: dict[str, str] = {}
    for _ in range(50):
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].text
        if "free" in finished:
            break
    assert "free" in finished and "constrained" not in finished
    assert engine.core.scheduler.num_waiting == 0 and engine.has_unfinished_requests()
    release.set()
    while engine.has_unfinished_requests():
        for out in engine.step():
            if out.finished:
                finished[out.request_id] = out.outputs[0].text
    assert re.fullmatch(r"[a-z]{4}", finished["constrained"])


def test_abort_while_the_grammar_compiles(tiny_llama_dir, monkeypatch) -> None:
    llm = LLM(tiny_llama_dir, dtype="float32", max_num_seqs=4, block_size=4, num_blocks=256)
    engine = llm.llm_engine
    release = threading.Event()
    monkeypatch.setattr(engine.structured_output, "_compile", lambda grammar: release.wait(30))
    engine.add_request("r", PROMPTS[0], greedy(5, structured_outputs=StructuredOutputsParams(regex="q+")))
    engine.step()
    outs = engine.abort_request(["r"])
    assert outs and outs[0].outputs[0].finish_reason == "abort"
    assert not engine.has_unfinished_requests()
    release.set()


def test_without_xgrammar_a_constrained_request_is_a_clear_error(tiny_llama_dir, monkeypatch):
    """An installation lacking xgrammar refuses constrained requests naming the package, and keeps serving."""
    import sys

    llm = LLM(tiny_llama_dir, dtype="float32", block_size=4, num_blocks=64)
    monkeypatch.setitem(sys.modules, "xgrammar", None)  # import xgrammar now raises ImportError
    constrained = greedy(8, structured_outputs=StructuredOutputsParams(regex=r"[0-9]{3}"))
    with pytest.raises(InvalidRequest, match="needs the xgrammar package") as info:
        llm.generate(["Number:"], constrained, use_tqdm=False)
    assert info.value.param == "structured_outputs.regex"
    assert len(llm.generate(["Number:"], greedy(4), use_tqdm=False)[0].outputs[0].token_ids) == 4
