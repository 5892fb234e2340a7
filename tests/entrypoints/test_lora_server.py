"""Multi-LoRA over HTTP: --lora-modules, model=<adapter>, /v1/models, run-time load and unload."""

from __future__ import annotations

import json
from collections.abc import Iterator

import httpx
import openai
import pytest

from pagellm import LLM, LoRARequest, SamplingParams
from pagellm.entrypoints.openai.api_server import build_async_llm
from pagellm.entrypoints.openai.serving_lora import parse_lora_modules
from tests.entrypoints.server_utils import TINY_ENGINE_ARGS, RunningServer, run_server
from tests.lora.peft_utils import ALL_TARGETS, train_lora_adapter

LORA_ARGS = dict(enable_lora=True, max_loras=2, max_lora_rank=8)
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def adapter_dirs(tiny_llama_dir, tmp_path_factory) -> dict[str, str]:
    root = tmp_path_factory.mktemp("server_loras")
    dirs = {"a": train_lora_adapter(tiny_llama_dir, root / "a", 8, 1, ALL_TARGETS),
            "b": train_lora_adapter(tiny_llama_dir, root / "b", 4, 2, ["q_proj", "v_proj"])}
    # a classification adapter names its labels (pagellm finetune writes this file)
    (root / "a" / "pagellm_task.json").write_text(json.dumps({"task": "classify", "labels": ["up", "down"]}))
    return dirs


@pytest.fixture(scope="module")
def lora_server(tiny_llama_dir, adapter_dirs) -> Iterator[RunningServer]:
    engine = build_async_llm(model=tiny_llama_dir, **TINY_ENGINE_ARGS, **LORA_ARGS)
    with run_server(engine, lora_modules=[("a", adapter_dirs["a"])]) as server:
        yield server


@pytest.fixture(scope="module")
def offline(tiny_llama_dir) -> LLM:
    return LLM(tiny_llama_dir, **TINY_ENGINE_ARGS, **LORA_ARGS)


def _complete(client: openai.OpenAI, model: str) -> list[str]:
    out = client.completions.create(model=model, prompt=PROMPT, max_tokens=12, temperature=0,
                                    extra_body={"ignore_eos": True})
    return out.choices[0].text


def test_adapter_by_model_name_matches_offline(lora_server, adapter_dirs, offline):
    client = lora_server.client()
    ids = [m.id for m in client.models.list().data]
    base = lora_server.engine.model_name
    assert ids == [base, "a"]
    params = SamplingParams(temperature=0, max_tokens=12, ignore_eos=True)
    want_a = offline.generate(PROMPT, params, lora_request=LoRARequest("a", 1, adapter_dirs["a"]), use_tqdm=False)
    want_base = offline.generate(PROMPT, params, use_tqdm=False)
    assert _complete(client, "a") == want_a[0].outputs[0].text
    assert _complete(client, base) == want_base[0].outputs[0].text
    assert want_a[0].outputs[0].text != want_base[0].outputs[0].text
    chat = client.chat.completions.create(model="a", messages=[{"role": "user", "content": "hi"}], max_tokens=4,
                                          temperature=0, extra_body={"ignore_eos": True})
    want_chat = offline.chat([{"role": "user", "content": "hi"}], SamplingParams(temperature=0, max_tokens=4,
                             ignore_eos=True), lora_request=LoRARequest("a", 1, adapter_dirs["a"]), use_tqdm=False)
    assert chat.choices[0].message.content == want_chat[0].outputs[0].text and chat.usage.completion_tokens == 4


def test_load_and_unload_at_run_time(lora_server, adapter_dirs, offline):
    url = lora_server.base_url
    client = lora_server.client()
    with pytest.raises(openai.BadRequestError):
        _complete(client, "b")
    r = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": adapter_dirs["b"]})
    assert r.status_code == 200, r.text
    assert "b" in [m.id for m in client.models.list().data]
    want = offline.generate(PROMPT, SamplingParams(temperature=0, max_tokens=12, ignore_eos=True),
                            lora_request=LoRARequest("b", 2, adapter_dirs["b"]), use_tqdm=False)
    assert _complete(client, "b") == want[0].outputs[0].text
    again = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "b", "lora_path": adapter_dirs["b"]})
    assert again.status_code == 400 and "already been loaded" in again.json()["error"]["message"]
    assert httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "b"}).status_code == 200
    assert "b" not in [m.id for m in client.models.list().data]
    with pytest.raises(openai.BadRequestError):
        _complete(client, "b")
    gone = httpx.post(f"{url}/v1/unload_lora_adapter", json={"lora_name": "b"})
    assert gone.status_code == 404 and gone.json()["error"]["param"] == "lora_name"


def test_bad_adapter_loads_are_400_and_the_server_goes_on(lora_server, tmp_path):
    url = lora_server.base_url
    missing = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "x", "lora_path": str(tmp_path / "no")})
    assert missing.status_code == 400 and "does not exist" in missing.json()["error"]["message"]
    not_peft = httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "y", "lora_path": str(tmp_path)})
    assert not_peft.status_code == 400 and "adapter_config.json" in not_peft.json()["error"]["message"]
    assert httpx.post(f"{url}/v1/load_lora_adapter", json={"lora_name": "z"}).status_code == 400
    client = lora_server.client()
    assert [m.id for m in client.models.list().data] == [lora_server.engine.model_name, "a"]
    assert _complete(client, "a")


def test_zero_shot_classify_with_a_classification_adapter(lora_server, adapter_dirs, offline):
    """model=<adapter> on /classify scores the labels the adapter was trained on, through the adapter."""
    texts = ["a fine day", "rain again"]
    r = httpx.post(f"{lora_server.base_url}/classify", json={"model": "a", "input": texts}, timeout=60)
    assert r.status_code == 200, r.text
    want = offline.classify(texts, labels=["up", "down"], lora_request=LoRARequest("a", 1, adapter_dirs["a"]),
                            use_tqdm=False)
    base = offline.classify(texts, labels=["up", "down"], use_tqdm=False)
    for got, w, b in zip(r.json()["data"], want, base):
        assert got["label"] in ("up", "down") and got["num_classes"] == 2
        assert got["probs"] == pytest.approx(w.outputs.probs, abs=1e-5)
        assert got["probs"] != pytest.approx(b.outputs.probs, abs=1e-5)


def test_lora_requests_on_a_server_without_lora_are_refused(tiny_server):
    r = httpx.post(f"{tiny_server.base_url}/v1/load_lora_adapter", json={"lora_name": "a", "lora_path": "/x"})
    assert r.status_code == 400 and "--enable-lora" in r.json()["error"]["message"]


def test_parse_lora_modules():
    assert parse_lora_modules(["a=/x", '{"name": "b", "path": "/y"}']) == [("a", "/x"), ("b", "/y")]
    with pytest.raises(ValueError, match="name=path"):
        parse_lora_modules(["nopath"])
