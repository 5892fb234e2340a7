"""The small routes: models, health, version, tokenizer routes, metrics, prefix-cache reset, --help."""

from __future__ import annotations

import os
import re
import subprocess
import sys

import httpx

import pagellm
from tests.entrypoints.server_utils import RunningServer

VLLM_METRICS = [
    "vllm:num_requests_running", "vllm:num_requests_waiting", "vllm:kv_cache_usage_perc",
    "vllm:num_preemptions_total", "vllm:prompt_tokens_total", "vllm:generation_tokens_total",
    "vllm:request_success_total", "vllm:prefix_cache_queries_total", "vllm:prefix_cache_hits_total",
    "vllm:time_to_first_token_seconds_bucket", "vllm:inter_token_latency_seconds_bucket",
    "vllm:e2e_request_latency_seconds_bucket",
]


def test_models_health_version(tiny_server: RunningServer) -> None:
    client = tiny_server.client(timeout=600)
    (card,) = client.models.list().data
    assert card.id == tiny_server.engine.model_name and card.object == "model"
    assert card.model_extra["max_model_len"] == tiny_server.engine.max_model_len
    assert httpx.get(f"{tiny_server.base_url}/health").status_code == 200
    assert httpx.get(f"{tiny_server.base_url}/version").json() == {"version": pagellm.__version__}


def test_tokenize_detokenize_round_trip(tiny_server: RunningServer, bundled_tokenizer) -> None:
    base = tiny_server.base_url
    text = "Hello world, how are you?"
    r = httpx.post(f"{base}/tokenize", json={"prompt": text, "return_token_strs": True}).json()
    assert r["tokens"] == bundled_tokenizer.encode(text) and r["count"] == len(r["tokens"])
    assert r["max_model_len"] == tiny_server.engine.max_model_len
    assert r["token_strs"] == bundled_tokenizer.convert_ids_to_tokens(r["tokens"])
    assert httpx.post(f"{base}/detokenize", json={"tokens": r["tokens"]}).json() == {"prompt": text}
    special = httpx.post(f"{base}/tokenize", json={"prompt": "<|im_end|>", "add_special_tokens": False}).json()
    assert special["tokens"] == [bundled_tokenizer.eos_token_id]
    assert httpx.post(f"{base}/tokenize", json={}).status_code == 400
    assert httpx.post(f"{base}/detokenize", json={"tokens": [-1]}).status_code == 400
    assert httpx.post(f"{base}/tokenize", json={"prompt": "x", "model": "nope"}).status_code == 400


def test_tokenizer_info_serves_lm_eval_remote_tokenizer(tiny_server: RunningServer, bundled_tokenizer) -> None:
    info = httpx.get(f"{tiny_server.base_url}/tokenizer_info").json()
    assert info["eos_token"] == bundled_tokenizer.eos_token
    assert info["bos_token"] == bundled_tokenizer.bos_token
    assert info["chat_template"] == bundled_tokenizer.chat_template
    assert info["model_max_length"] == tiny_server.engine.max_model_len


def test_metrics_use_vllm_names_and_count_tokens(tiny_server: RunningServer) -> None:
    before = tiny_server.metrics()
    client = tiny_server.client(timeout=600)
    out = client.completions.create(model=tiny_server.engine.model_name, prompt="Counting tokens", max_tokens=5,
                                    extra_body={"ignore_eos": True})
    text = httpx.get(f"{tiny_server.base_url}/metrics").text
    for name in VLLM_METRICS:
        assert f"\n{name}{{" in text, name
    after = tiny_server.metrics()
    assert after["vllm:generation_tokens_total"] - before.get("vllm:generation_tokens_total", 0) == 5
    assert after["vllm:prompt_tokens_total"] - before.get("vllm:prompt_tokens_total", 0) == out.usage.prompt_tokens
    assert after["vllm:e2e_request_latency_seconds_count"] > before.get("vllm:e2e_request_latency_seconds_count", 0)
    assert after["vllm:num_requests_running"] == 0 and after["vllm:kv_cache_usage_perc"] == 0


def test_prefix_cache_hits_and_reset(tiny_server: RunningServer) -> None:
    client = tiny_server.client(timeout=600)
    model = tiny_server.engine.model_name
    prompt = "A shared prefix that is long enough to fill several KV blocks of four tokens each. " * 3
    client.completions.create(model=model, prompt=prompt, max_tokens=1)
    before = tiny_server.metrics()
    second = client.completions.create(model=model, prompt=prompt, max_tokens=1)
    assert second.usage.prompt_tokens_details.cached_tokens > 0
    assert tiny_server.metrics()["vllm:prefix_cache_hits_total"] > before["vllm:prefix_cache_hits_total"]
    assert httpx.post(f"{tiny_server.base_url}/reset_prefix_cache").json() == {"reset": True}
    third = client.completions.create(model=model, prompt=prompt, max_tokens=1)
    assert third.usage.prompt_tokens_details.cached_tokens == 0


def test_serve_help_lists_every_flag_with_its_default() -> None:
    out = subprocess.run([sys.executable, "-m", "pagellm.entrypoints.cli", "serve", "--help"], capture_output=True,
                         text=True, timeout=60, env={**os.environ, "COLUMNS": "200"})
    assert out.returncode == 0, out.stderr
    # One block per option: its line and the indented help lines under it.
    blocks = re.split(r"\n(?=  -)", out.stdout.split("options:", 1)[1])
    flags = {}
    for block in blocks:
        match = re.match(r"\s+(-[-\w]+)", block)
        if match and match.group(1) not in ("-h", "--help"):
            flags[match.group(1)] = block
    for flag in ["--host", "--port", "--api-key", "--served-model-name", "--max-waiting-requests",
                 "--max-request-body-bytes", "--shutdown-grace-seconds", "--max-num-seqs", "--dtype"]:
        assert flag in flags, flag
    missing = [flag for flag, block in flags.items() if "default" not in block]
    assert not missing, f"flags without a default in --help: {missing}"
