"""Data parallel on Ray: 2 replicas of the tiny model (1 thread each) behind one OpenAI endpoint.

A local Ray instance bound to 127.0.0.1 (no RAY_ADDRESS in tests). Skipped without Ray, which is the
optional `distributed` extra (`make setup` installs it, so CI runs these).
"""

from __future__ import annotations

import os
import shutil
import subprocess
import time
import uuid

import httpx
import pytest

pytest.importorskip("ray", reason="data parallelism needs Ray, the optional extra: pip install "
                                  "'pagellm[distributed]' (make setup installs it)")

from pagellm.entrypoints.openai.api_server import build_async_llm, build_data_parallel_llm  # noqa: E402
from tests.entrypoints.server_utils import TINY_ENGINE_ARGS, RunningServer, run_server  # noqa: E402

PROMPTS = ["The capital of France is", "Once upon a time there", "1, 2, 3, 4,", "def fibonacci(n):"]


@pytest.fixture(scope="module")
def dp_server(tiny_llama_dir: str):
    os.environ.pop("RAY_ADDRESS", None)  # a local instance on 127.0.0.1, never a cluster
    engine = build_data_parallel_llm(2, threads_per_replica=1, model=tiny_llama_dir, **TINY_ENGINE_ARGS)
    with run_server(engine) as server:
        yield server


def samples(server: RunningServer, name: str) -> dict[tuple[tuple[str, str], ...], float]:
    """The samples of one metric on /metrics, keyed by their labels (model_name left out)."""
    found = {}
    for line in httpx.get(f"{server.base_url}/metrics", timeout=10).text.splitlines():
        if not line.startswith(name + "{"):
            continue
        series, value = line.rsplit(" ", 1)
        labels = tuple(sorted((k, v.strip('"')) for k, v in (part.split("=", 1) for part in
                                                                series[len(name) + 1:-1].split(",")
                                                                if part) if k != "model_name"))
        found[labels] = float(value)
    return found


def per_replica(server: RunningServer, name: str) -> list[float]:
    values = samples(server, name)
    return [values.get((("replica", str(i)),), 0.0) for i in range(2)]


def answers(server: RunningServer) -> list[str]:
    client = server.client()
    model = server.engine.model_name
    texts = [client.completions.create(model=model, prompt=p, max_tokens=12, temperature=0).choices[0].text
             for p in PROMPTS]
    chat = client.chat.completions.create(model=model, messages=[{"role": "user", "content": PROMPTS[0]}],
                                          max_tokens=12, temperature=0)
    texts.append(chat.choices[0].message.content)
    streamed = client.completions.create(model=model, prompt=PROMPTS[1], max_tokens=12, temperature=0, stream=True)
    texts.append("".join(chunk.choices[0].text for chunk in streamed if chunk.choices))
    return texts


def test_the_local_ray_instance_is_on_the_loopback_interface_only(dp_server: RunningServer) -> None:
    import ray

    assert [node["NodeManagerAddress"] for node in ray.nodes()] == ["127.0.0.1"]
    if shutil.which("ss") is None:
        pytest.skip("no `ss` (iproute2) to list listening sockets")
    listening = subprocess.run(["ss", "-ltnpH"], capture_output=True, text=True).stdout.splitlines()
    ray_sockets = [line.split()[3] for line in listening if any(name in line for name in _RAY_PROCESSES)]
    hosts = {address.rsplit(":", 1)[0] for address in ray_sockets}
    assert ray_sockets and hosts <= {"127.0.0.1", "[::ffff:127.0.0.1]", "[::1]"}, ray_sockets


_RAY_PROCESSES = ('"gcs_server"', '"raylet"', '"ray::')


def test_replicas_answer_as_one_engine_does_at_temperature_0(dp_server: RunningServer, tiny_llama_dir: str) -> None:
    got = answers(dp_server)
    assert sum(per_replica(dp_server, "pagellm:dp_requests_routed_total")) >= len(got)
    assert all(per_replica(dp_server, "pagellm:dp_requests_routed_total")), "both replicas served some of them"
    reference = build_async_llm(model=tiny_llama_dir, **TINY_ENGINE_ARGS)
    with run_server(reference) as single:
        want = answers(single)
    assert got == want
    assert got[-1] == got[1]  # streamed equals non-streamed


def test_requests_sharing_a_prefix_land_on_the_same_replica(dp_server: RunningServer) -> None:
    client = dp_server.client()
    model = dp_server.engine.model_name
    shared = f"Session {uuid.uuid4().hex}: " + "the quick brown fox jumps over the lazy dog. " * 6
    routed0 = per_replica(dp_server, "pagellm:dp_requests_routed_total")
    hits0 = per_replica(dp_server, "vllm:prefix_cache_hits_total")
    decisions0 = samples(dp_server, "pagellm:dp_routing_decisions_total")
    for i in range(4):
        client.completions.create(model=model, prompt=f"{shared} Question {i}: why?", max_tokens=2, temperature=0)
    routed = [a - b for a, b in zip(per_replica(dp_server, "pagellm:dp_requests_routed_total"), routed0)]
    assert sorted(routed) == [0, 4], routed
    target = routed.index(4)
    decisions = samples(dp_server, "pagellm:dp_routing_decisions_total")
    assert decisions[(("decision", "affinity"),)] - decisions0.get((("decision", "affinity"),), 0) == 3
    assert decisions[(("decision", "miss"),)] - decisions0.get((("decision", "miss"),), 0) == 1
    # the replica's own prefix cache hit (its stats reach the driver within a poll interval)
    deadline = time.monotonic() + 10
    while per_replica(dp_server, "vllm:prefix_cache_hits_total")[target] <= hits0[target]:
        assert time.monotonic() < deadline, "the target replica reported no prefix-cache hit"
        time.sleep(0.2)
    assert per_replica(dp_server, "vllm:prefix_cache_hits_total")[1 - target] == hits0[1 - target]


def test_a_client_disconnect_aborts_the_request_on_its_replica(dp_server: RunningServer) -> None:
    body = {"model": dp_server.engine.model_name, "prompt": PROMPTS[2], "max_tokens": 400, "ignore_eos": True,
            "temperature": 0, "stream": True}
    with httpx.stream("POST", f"{dp_server.v1}/completions", json=body, timeout=30) as response:
        lines = response.iter_lines()
        assert sum(1 for line, _ in zip(lines, range(4)) if line.startswith("data: {")) >= 1
        assert dp_server.engine.num_unfinished == 1
    deadline = time.monotonic() + 10
    while dp_server.engine.num_unfinished or sum(per_replica(dp_server, "vllm:num_requests_running")):
        assert time.monotonic() < deadline, "the request kept running on its replica after the disconnect"
        time.sleep(0.1)


def test_a_bad_request_is_a_400_before_any_replica_sees_it(dp_server: RunningServer) -> None:
    routed = sum(per_replica(dp_server, "pagellm:dp_requests_routed_total"))
    body = {"model": dp_server.engine.model_name, "prompt": "word " * 600, "max_tokens": 4}
    response = httpx.post(f"{dp_server.v1}/completions", json=body, timeout=30)
    assert response.status_code == 400
    assert response.json()["error"]["param"] == "prompt"
    assert sum(per_replica(dp_server, "pagellm:dp_requests_routed_total")) == routed
