"""Schemathesis over the live tiny-model server's /openapi.json: no 5xx, and every answer matches the schema.

Bounded: a fixed number of generated requests per operation (valid and invalid by the schema), so the
whole run takes about a minute on 2 cores.
"""

from __future__ import annotations

import time
from collections.abc import Iterator

import pytest

schemathesis = pytest.importorskip("schemathesis")

from hypothesis import HealthCheck, given, settings  # noqa: E402
from hypothesis.errors import Unsatisfiable  # noqa: E402
from schemathesis.checks import not_a_server_error  # noqa: E402
from schemathesis.generation import GenerationMode  # noqa: E402
from schemathesis.specs.openapi.checks import (  # noqa: E402
    content_type_conformance,
    negative_data_rejection,
    response_headers_conformance,
    response_schema_conformance,
    status_code_conformance,
)

from pagellm.entrypoints.openai.api_server import build_async_llm  # noqa: E402
from tests.entrypoints.server_utils import TINY_ENGINE_ARGS, RunningServer, run_server  # noqa: E402

EXAMPLES_PER_OPERATION = {GenerationMode.POSITIVE: 40, GenerationMode.NEGATIVE: 25}
CHECKS = [not_a_server_error, status_code_conformance, content_type_conformance, response_headers_conformance,
          response_schema_conformance, negative_data_rejection]


@pytest.fixture(scope="module")
def fuzz_server(tiny_llama_dir: str) -> Iterator[RunningServer]:
    """The tiny model with a small default output limit, so generated requests without one stay short."""
    with run_server(build_async_llm(model=tiny_llama_dir, **TINY_ENGINE_ARGS), default_max_tokens=8) as server:
        yield server


@pytest.mark.slow
@pytest.mark.timeout(600)
def test_fuzzed_requests_get_no_5xx_and_match_the_openapi_schema(fuzz_server: RunningServer) -> None:
    schema = schemathesis.openapi.from_url(f"{fuzz_server.base_url}/openapi.json")
    operations = [result.ok() for result in schema.get_all_operations()]
    assert len(operations) >= 12, [op.label for op in operations]
    model = fuzz_server.engine.model_name

    def served_model(case):
        """A random `model` is a 400 (no such model) that hides the rest of the request: name the served one."""
        if isinstance(case.body, dict) and isinstance(case.body.get("model"), str):
            case.body["model"] = model
        return case

    counts: dict[int, int] = {}
    failures: list[str] = []
    started = time.monotonic()
    for operation in operations:
        for mode, num_examples in EXAMPLES_PER_OPERATION.items():

            @settings(max_examples=num_examples, deadline=None, derandomize=True, database=None,
                      suppress_health_check=list(HealthCheck))
            @given(case=operation.as_strategy(generation_mode=mode).map(served_model))
            def check(case) -> None:
                response = case.call_and_validate(base_url=fuzz_server.base_url, checks=CHECKS, timeout=60)
                counts[response.status_code] = counts.get(response.status_code, 0) + 1

            try:
                check()
            except Unsatisfiable:  # no parameters, so nothing to break: no negative cases
                assert mode is GenerationMode.NEGATIVE, operation.label
            except BaseException as exc:  # schemathesis raises a BaseExceptionGroup; report all together below
                if isinstance(exc, KeyboardInterrupt | SystemExit):
                    raise
                failures.append(f"{operation.label} ({mode.value}): {exc}")
    elapsed = time.monotonic() - started
    print(f"{sum(counts.values())} fuzzed requests over {len(operations)} operations in {elapsed:.0f} s: "
          f"{dict(sorted(counts.items()))}")
    assert not failures, "\n\n".join(failures)
    assert not any(status >= 500 for status in counts), counts
    assert counts.get(200, 0) > 0 and any(400 <= status < 500 for status in counts), counts


@pytest.mark.slow
@pytest.mark.parametrize(("path", "body"), [
    ("/v1/chat/completions", {"messages": [{"role": "user", "content": "hi"}], "max_tokens": 4, "n": 2,
                              "logprobs": True, "top_logprobs": 2}),
    ("/v1/completions", {"prompt": ["hi", "there"], "max_tokens": 4, "logprobs": 2, "echo": True}),
])
@pytest.mark.parametrize("stream", [False, True])
def test_json_and_sse_answers_match_the_openapi_schema(fuzz_server: RunningServer, path: str, body: dict,
                                                       stream: bool) -> None:
    """The shapes random cases rarely reach: streams (each SSE event, the usage chunk, [DONE]) and logprobs."""
    schema = schemathesis.openapi.from_url(f"{fuzz_server.base_url}/openapi.json")
    extra = {"stream": True, "stream_options": {"include_usage": True}} if stream else {}
    case = schema[path]["POST"].Case(body={**body, **extra})
    response = case.call_and_validate(base_url=fuzz_server.base_url, checks=CHECKS, timeout=60)
    assert response.status_code == 200
    if stream:
        assert response.text.rstrip().endswith("data: [DONE]") and '"usage"' in response.text
