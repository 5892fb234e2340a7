"""/v1/embeddings (real openai SDK) and /classify over HTTP: pooling servers, zero-shot on a generate server."""

from __future__ import annotations

import base64
import struct
import threading
from collections.abc import Iterator

import httpx
import pytest
import torch

from pagellm import LLM, PoolingParams
from pagellm.entrypoints.openai.api_server import build_async_llm
from pagellm.label_prompt import encode_label_prompt, label_token_ids
from pagellm.model_source import bundled_encoder_path
from tests.entrypoints.server_utils import RunningServer, run_server
from tests.entrypoints.test_abort import _wait_idle

TEXTS = ["The cat sat on the mat.", "Paged attention keeps the KV cache in fixed-size blocks.", "ok"]


def _post(server: RunningServer, path: str, body: dict) -> httpx.Response:
    return httpx.post(f"{server.base_url}{path}", json=body, timeout=60)


def _assert_400(response: httpx.Response, match: str, param: str | None = None) -> None:
    assert response.status_code == 400, response.text
    error = response.json()["error"]
    assert error["type"] == "invalid_request_error" and match in error["message"], error
    if param is not None:
        assert error["param"] == param, error


@pytest.fixture(scope="module")
def embed_server(tiny_llama_dir: str) -> Iterator[RunningServer]:
    """The tiny Llama as an embedding model (last-token pooling, normalized)."""
    with run_server(build_async_llm(task="embed", model=tiny_llama_dir, dtype="float32")) as server:
        yield server


@pytest.fixture(scope="module")
def offline_embed(tiny_llama_dir: str) -> LLM:
    return LLM(tiny_llama_dir, task="embed", dtype="float32")


def test_embeddings_with_the_openai_sdk_base64_and_float(embed_server, offline_embed):
    client = embed_server.client(timeout=60)
    model = embed_server.engine.model_name
    want = torch.tensor([o.outputs.embedding for o in offline_embed.embed(TEXTS, use_tqdm=False)])
    by_default = client.embeddings.create(model=model, input=TEXTS)  # the SDK asks for base64 and decodes it
    as_float = client.embeddings.create(model=model, input=TEXTS, encoding_format="float")
    for response in (by_default, as_float):
        assert [d.index for d in response.data] == [0, 1, 2] and response.model == model
        got = torch.tensor([d.embedding for d in response.data])
        assert got.shape == (3, 64) and torch.allclose(got, want, atol=1e-6)
    num_tokens = sum(len(offline_embed.get_tokenizer()(t)["input_ids"]) for t in TEXTS)
    assert as_float.usage.prompt_tokens == as_float.usage.total_tokens == num_tokens
    one = client.embeddings.create(model=model, input=TEXTS[1], encoding_format="float", dimensions=64)
    assert torch.allclose(torch.tensor(one.data[0].embedding), want[1], atol=1e-6)
    assert [m.id for m in client.models.list().data] == [model]


def test_base64_is_little_endian_float32_and_token_id_inputs_work(embed_server, offline_embed):
    ids = offline_embed.get_tokenizer()(TEXTS[0])["input_ids"]
    raw = _post(embed_server, "/v1/embeddings", {"input": [ids, ids[:3]], "encoding_format": "base64"}).json()
    assert raw["object"] == "list" and raw["data"][0]["object"] == "embedding" and raw["id"].startswith("embd-")
    decoded = [struct.unpack("<64f", base64.b64decode(d["embedding"])) for d in raw["data"]]
    same_batch = _post(embed_server, "/v1/embeddings", {"input": [ids, ids[:3]]}).json()["data"]
    assert [list(d) for d in decoded] == [d["embedding"] for d in same_batch]  # base64 is exact
    floats = _post(embed_server, "/v1/embeddings", {"input": ids}).json()["data"]  # one token-id prompt
    # NOTE: the same text in a batch of two and alone: GEMM blocking depends on the row count, so the
    # float32 sums may round differently (seen at ~1e-7 on an AVX-512 CPU)
    assert len(floats) == 1 and list(decoded[0]) == pytest.approx(floats[0]["embedding"], abs=1e-6)
    want = offline_embed.embed([ids[:3]], use_tqdm=False)[0].outputs.embedding
    assert list(decoded[1]) == pytest.approx(want, abs=1e-6)
    assert raw["usage"] == {"prompt_tokens": len(ids) + 3, "total_tokens": len(ids) + 3}


@pytest.mark.parametrize("body, match, param", [
    ({"input": ""}, "empty", "prompt"),
    ({"input": []}, "empty", "input"),
    ({"input": ["fine", "  "]}, "empty", "prompt"),
    ({"input": [[]]}, "empty", "prompt"),
    ({"input": "word " * 600}, "maximum input length is 512 tokens", "prompt"),
    ({"input": [[1, 10**9]]}, "token ids must be integers", "prompt"),
    ({"input": 5}, "input", "input"),
    ({"input": ["a", 1]}, "input", "input"),
    ({"input": "a", "dimensions": 32}, "dimensions 32 is not supported", "dimensions"),
    ({"input": "a", "encoding_format": "int8"}, "encoding_format", "encoding_format"),
    ({"input": "a", "model": "other"}, "does not exist", "model"),
    ({"input": "a", "temperature": 1.0}, "unsupported field 'temperature'", "temperature"),
])
def test_bad_embedding_requests_are_400_and_the_server_keeps_serving(embed_server, body, match, param):
    _assert_400(_post(embed_server, "/v1/embeddings", body), match, param)
    assert _post(embed_server, "/v1/embeddings", {"input": "still fine"}).status_code == 200


def test_routes_of_other_tasks_name_the_task_they_need(embed_server, tiny_server):
    _assert_400(_post(embed_server, "/v1/completions", {"prompt": "hi"}), "--task generate")
    _assert_400(_post(embed_server, "/classify", {"input": "hi"}), "--task classify")
    _assert_400(_post(tiny_server, "/v1/embeddings", {"input": "hi"}), "--task embed")


def test_pooling_runs_off_the_event_loop(embed_server, monkeypatch):
    """A forward in progress does not stop the server from answering other requests."""
    engine = embed_server.engine._engine
    started, release = threading.Event(), threading.Event()
    embed = engine.embed

    def slow_embed(*args, **kwargs):
        started.set()
        assert release.wait(30)
        return embed(*args, **kwargs)

    monkeypatch.setattr(engine, "embed", slow_embed)
    result: list[httpx.Response] = []
    thread = threading.Thread(target=lambda: result.append(_post(embed_server, "/v1/embeddings", {"input": "x"})))
    thread.start()
    assert started.wait(30)
    assert httpx.get(f"{embed_server.base_url}/health", timeout=5).status_code == 200  # while the forward waits
    release.set()
    thread.join(30)
    assert result[0].status_code == 200


# ---- /classify ----------------------------------------------------------------------------


@pytest.fixture(scope="module")
def tiny_bert_classifier_dir(tmp_path_factory) -> str:
    """A 2-layer random BertForSequenceClassification with MiniLM's tokenizer and named labels."""
    from transformers import AutoTokenizer, BertConfig, BertForSequenceClassification

    tokenizer = AutoTokenizer.from_pretrained(str(bundled_encoder_path()))
    config = BertConfig(vocab_size=len(tokenizer), hidden_size=32, num_hidden_layers=2, num_attention_heads=4,
                        intermediate_size=64, max_position_embeddings=128, num_labels=3,
                        id2label={0: "negative", 1: "neutral", 2: "positive"})
    config.architectures = ["BertForSequenceClassification"]
    torch.manual_seed(0)
    model = BertForSequenceClassification(config).eval()
    with torch.no_grad():
        model.classifier.weight.normal_(0.0, 1.0)  # probabilities that differ across texts
    path = tmp_path_factory.mktemp("tiny_bert_cls")
    model.save_pretrained(path, safe_serialization=True)
    tokenizer.save_pretrained(path)
    return str(path)


def test_classify_server_matches_the_offline_api(tiny_bert_classifier_dir):
    offline = LLM(tiny_bert_classifier_dir, task="classify", dtype="float32").classify(TEXTS, use_tqdm=False)
    with run_server(build_async_llm(task="classify", model=tiny_bert_classifier_dir, dtype="float32")) as server:
        body = _post(server, "/classify", {"model": server.engine.model_name, "input": TEXTS}).json()
        assert body["id"].startswith("classify-") and body["object"] == "list" and body["created"] > 0
        for item, want in zip(body["data"], offline, strict=True):
            assert item["probs"] == pytest.approx(want.outputs.probs, abs=1e-6)
            assert item["label"] == want.outputs.label and item["num_classes"] == 3
        assert [d["index"] for d in body["data"]] == [0, 1, 2]
        num_tokens = sum(len(o.prompt_token_ids) for o in offline)
        assert body["usage"] == {"prompt_tokens": num_tokens, "total_tokens": num_tokens}
        by_ids = _post(server, "/classify", {"input": offline[0].prompt_token_ids}).json()["data"]
        assert by_ids[0]["probs"] == pytest.approx(offline[0].outputs.probs, abs=1e-6)
        assert all(item["embedding"] is None for item in body["data"])  # only when asked
        # return_embedding (pagellm extension): the pooled vector from the same forward, as the offline API gives
        both = LLM(tiny_bert_classifier_dir, task="classify", dtype="float32").classify(
            TEXTS, pooling_params=PoolingParams(return_embedding=True), use_tqdm=False)
        with_vectors = _post(server, "/classify", {"input": TEXTS, "return_embedding": True}).json()["data"]
        for item, want in zip(with_vectors, both, strict=True):
            assert len(item["embedding"]) == 32 and item["embedding"] == pytest.approx(want.outputs.embedding, abs=1e-5)
            assert item["probs"] == pytest.approx(want.outputs.probs, abs=1e-6)
        _assert_400(_post(server, "/classify", {"input": "x", "return_embedding": "maybe"}), "", "return_embedding")
        _assert_400(_post(server, "/classify", {"input": "x", "labels": ["a", "b"]}), "own labels", "labels")
        _assert_400(_post(server, "/classify", {"input": ""}), "empty")
        _assert_400(_post(server, "/v1/embeddings", {"input": "x"}), "--task embed")
        assert _post(server, "/classify", {"input": "still fine"}).status_code == 200


def test_zero_shot_classify_on_a_generate_server(tiny_server, tiny_llm, bundled_tokenizer):
    labels = ["positive", "negative", "neutral"]
    hits_before = tiny_server.metrics()["vllm:prefix_cache_hits_total"]
    response = _post(tiny_server, "/classify", {"input": TEXTS, "labels": labels})
    assert response.status_code == 200, response.text
    body = response.json()
    offline = tiny_llm.classify(TEXTS, labels=labels, use_tqdm=False)  # the same tiny Llama, fp32
    for item, want in zip(body["data"], offline, strict=True):
        assert item["probs"] == pytest.approx(want.outputs.probs, abs=1e-5)
        assert item["label"] == want.outputs.label and item["num_classes"] == 3
    label_tokens = sum(len(label_token_ids(bundled_tokenizer, label, True)) for label in labels)
    prompt_lens = [len(encode_label_prompt(bundled_tokenizer, text, labels)) for text in TEXTS]
    assert body["usage"]["prompt_tokens"] == sum(prompt_lens) + len(TEXTS) * label_tokens
    # every label after the first reuses its text's prompt up to the last whole block before the label
    block_size = tiny_server.engine._engine.cache_config.block_size
    hits = tiny_server.metrics()["vllm:prefix_cache_hits_total"] - hits_before
    assert hits >= sum((len(labels) - 1) * ((n - 1) // block_size * block_size) for n in prompt_lens)


@pytest.mark.parametrize("body, match, param", [
    ({"input": "text"}, "needs 'labels'", "labels"),
    ({"input": "text", "labels": ["a", "b"], "return_embedding": True}, "pools nothing", "return_embedding"),
    ({"input": "text", "labels": ["only"]}, "at least two", "labels"),
    ({"input": [[1, 2, 3]], "labels": ["a", "b"]}, "not token ids", "input"),
    ({"input": "word " * 600, "labels": ["a", "b"]}, "maximum context length", "prompt"),
    ({"input": ["ok", ""], "labels": ["a", "b"]}, "non-empty string", "input"),
    ({"input": "text", "labels": ["a", "b"], "truncate_prompt_tokens": 5}, "not supported", "truncate_prompt_tokens"),
])
def test_bad_zero_shot_requests_are_400_and_the_engine_keeps_serving(tiny_server, body, match, param):
    _assert_400(_post(tiny_server, "/classify", body), match, param)
    assert tiny_server.engine.num_unfinished == 0
    ok = _post(tiny_server, "/v1/completions", {"prompt": "Hello", "max_tokens": 2})
    assert ok.status_code == 200, ok.text


@pytest.mark.slow
def test_bundled_minilm_embeddings_over_http():
    offline = LLM(task="embed", dtype="float32")
    with run_server(build_async_llm(task="embed", dtype="float32")) as server:
        client = server.client(timeout=120)
        response = client.embeddings.create(model="all-MiniLM-L6-v2", input=TEXTS)
    got = torch.tensor([d.embedding for d in response.data])
    want = torch.tensor([o.outputs.embedding for o in offline.embed(TEXTS, use_tqdm=False)])
    assert got.shape == (3, 384) and torch.allclose(got, want, atol=1e-6)
    assert torch.allclose(got.norm(dim=-1), torch.ones(3), atol=1e-5)


def test_a_zero_shot_client_that_disconnects_leaves_nothing_running(tiny_server):
    texts = [f"Review number {i}: the product was fine, I guess, but the delivery took a while." for i in range(400)]
    before = tiny_server.metrics()
    with pytest.raises(httpx.ReadTimeout):
        httpx.post(f"{tiny_server.base_url}/classify", json={"input": texts, "labels": ["good", "bad", "unsure"]},
                   timeout=httpx.Timeout(60, read=0.5))
    m = _wait_idle(tiny_server)
    assert m["vllm:num_requests_running"] == 0 and m["vllm:kv_cache_usage_perc"] == 0
    assert tiny_server.engine.num_unfinished == 0
    finished = m.get("vllm:request_success_total", 0) - before.get("vllm:request_success_total", 0)
    assert 0 < finished < 400 * 3, finished  # it was running, and the rest never ran
    assert _post(tiny_server, "/classify", {"input": "still alive?", "labels": ["yes", "no"]}).status_code == 200
