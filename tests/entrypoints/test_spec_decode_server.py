"""`pagellm serve --speculative-config`: parsed like vLLM's flag, same answers, counters on /metrics."""

from __future__ import annotations

import json
import re

import httpx

from pagellm.entrypoints.cli import build_parser, engine_kwargs
from pagellm.entrypoints.openai.api_server import build_async_llm
from tests.entrypoints.server_utils import run_server

SPEC = {"method": "ngram", "num_speculative_tokens": 4, "prompt_lookup_max": 4, "prompt_lookup_min": 1}


def _metric(text: str, name: str) -> float:
    match = re.search(rf"^{re.escape(name)}\{{[^}}]*\}} ([0-9.e+]+)$", text, re.MULTILINE)
    assert match, f"{name} not on /metrics"
    return float(match.group(1))


def test_the_flag_reaches_the_engine_and_the_counters_reach_metrics(tiny_llama_dir):
    args = build_parser().parse_args(["serve", tiny_llama_dir, "--speculative-config", json.dumps(SPEC)])
    kwargs = {**engine_kwargs(args), "dtype": "float32", "block_size": 4, "num_blocks": 256}
    body = {"prompt": "a b c d a b c d a b c d a b", "max_tokens": 30, "temperature": 0, "ignore_eos": True}
    with run_server(build_async_llm(**{**kwargs, "speculative_config": None})) as plain:
        expected = httpx.post(f"{plain.base_url}/v1/completions", json=body, timeout=60).json()
    with run_server(build_async_llm(**kwargs)) as server:
        got = httpx.post(f"{server.base_url}/v1/completions", json=body, timeout=60).json()
        streamed = []
        with httpx.stream("POST", f"{server.base_url}/v1/completions", json={**body, "stream": True},
                          timeout=60) as r:
            for line in r.iter_lines():
                if line.startswith("data: ") and line != "data: [DONE]":
                    streamed.append(json.loads(line[6:])["choices"][0]["text"])
        metrics = httpx.get(f"{server.base_url}/metrics", timeout=10).text
    assert got["choices"][0]["text"] == expected["choices"][0]["text"] == "".join(streamed)
    drafts = _metric(metrics, "vllm:spec_decode_num_draft_tokens_total")
    accepted = _metric(metrics, "vllm:spec_decode_num_accepted_tokens_total")
    assert drafts > 0 and 0 < accepted <= drafts
    assert _metric(metrics, "vllm:generation_tokens_total") == 60  # two requests of 30, however many a step
