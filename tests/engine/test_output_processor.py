"""The OutputProcessor on its own: EngineCoreOutputs in, RequestOutputs out (text, stops, n children, aborts)."""

from __future__ import annotations

import pytest

from pagellm.engine.output_processor import OutputProcessor
from pagellm.outputs import EngineCoreOutput
from pagellm.sampling_params import SamplingParams


@pytest.fixture
def processor(bundled_tokenizer) -> OutputProcessor:
    return OutputProcessor(bundled_tokenizer)


def _ids(tokenizer, text: str) -> list[int]:
    return tokenizer.encode(text, add_special_tokens=False)


def test_tokens_become_text_and_the_final_output_carries_the_finish_reason(processor, bundled_tokenizer):
    ids = _ids(bundled_tokenizer, " Paris is the capital.")
    processor.add_request("r", "Q:", [1, 2], {"r": SamplingParams()})
    for token_id in ids[:-1]:
        outs, stopped = processor.process([EngineCoreOutput("r", [token_id])])
        assert not stopped and not outs[0].finished
    outs, _ = processor.process([EngineCoreOutput("r", [ids[-1]], finish_reason="length")])
    final = outs[0].outputs[0]
    assert outs[0].finished and final.text == " Paris is the capital." and final.token_ids == ids
    assert final.finish_reason == "length" and not processor.has_request("r")


@pytest.mark.parametrize("per_step", [1, 4])
def test_a_stop_string_ends_the_output_at_the_same_token_however_many_arrive_a_step(processor, bundled_tokenizer,
                                                                                     per_step):
    ids = _ids(bundled_tokenizer, " one two three four five six")
    processor.add_request("r", None, [1], {"r": SamplingParams(stop=[" three"])})
    stopped = []
    for i in range(0, len(ids), per_step):
        outs, stopped = processor.process([EngineCoreOutput("r", ids[i : i + per_step])])
        if stopped:
            break
    final = outs[0].outputs[0]
    assert stopped == ["r"] and final.text == " one two" and final.finish_reason == "stop"
    assert final.stop_reason == " three" and final.token_ids == _ids(bundled_tokenizer, " one two three")


def test_n_children_report_together_and_an_abort_finishes_the_rest(processor):
    children = {"r-0": SamplingParams(n=2), "r-1": SamplingParams(n=2)}
    processor.add_request("r", "x", [1], children)
    assert processor.child_ids("r") == ["r-0", "r-1"]
    outs, _ = processor.process([EngineCoreOutput("r-0", [5], finish_reason="stop"), EngineCoreOutput("r-1", [6])])
    assert len(outs) == 1 and [c.token_ids for c in outs[0].outputs] == [[5], [6]] and not outs[0].finished
    final = processor.abort("r")
    assert final.finished and [c.finish_reason for c in final.outputs] == ["stop", "abort"]
    assert processor.process([EngineCoreOutput("r-1", [7])]) == ([], [])  # late outputs of an aborted request
