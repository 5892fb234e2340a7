"""Data parallel on Ray: SIGKILL of one replica's process under load (a local Ray on 127.0.0.1, tiny model).

Its own module: the module-scoped server of test_data_parallel.py holds the local Ray's 2 CPUs until that
module ends.
"""

from __future__ import annotations

import json
import os
import signal
import time
from concurrent.futures import ThreadPoolExecutor

import httpx
import pytest

pytest.importorskip("ray", reason="data parallelism needs Ray, the optional extra: pip install "
                                  "'pagellm[distributed]' (make setup installs it)")

from pagellm.entrypoints.openai.api_server import build_data_parallel_llm  # noqa: E402
from tests.distributed.test_data_parallel import PROMPTS, per_replica, samples  # noqa: E402
from tests.entrypoints.server_utils import TINY_ENGINE_ARGS, run_server  # noqa: E402


def _stream_one(url: str, body: dict, timeout: float) -> tuple[str, object]:
    """('ok', tokens) | ('http', status) | ('event', error) | ('hang', seconds) of one streamed completion."""
    start = time.monotonic()
    num_tokens = 0
    try:
        with httpx.stream("POST", url, json=body, timeout=timeout) as response:
            if response.status_code != 200:
                error = json.loads(response.read())["error"]  # a clean OpenAI error body
                return "http", (response.status_code, error["message"])
            for line in response.iter_lines():
                if not line.startswith("data: {"):
                    continue
                chunk = json.loads(line[6:])
                if "error" in chunk:
                    return "event", chunk["error"]["message"]
                if chunk["choices"]:
                    num_tokens += 1
    except httpx.TimeoutException:
        return "hang", time.monotonic() - start
    return "ok", num_tokens


@pytest.mark.slow
def test_killing_a_replica_mid_load_leaves_the_endpoint_serving(tiny_llama_dir: str) -> None:
    os.environ.pop("RAY_ADDRESS", None)  # a local instance on 127.0.0.1, never a cluster
    engine = build_data_parallel_llm(2, threads_per_replica=1, max_restarts=2, model=tiny_llama_dir,
                                     **{**TINY_ENGINE_ARGS, "max_num_seqs": 4})
    with run_server(engine) as server:
        pids = engine.replica_pids()
        body = {"model": engine.model_name, "max_tokens": 200, "ignore_eos": True, "temperature": 0, "stream": True}
        url = f"{server.v1}/completions"
        with ThreadPoolExecutor(16) as pool:
            futures = [pool.submit(_stream_one, url, {**body, "prompt": f"{PROMPTS[i % 4]} {i}"}, 60)
                       for i in range(16)]
            deadline = time.monotonic() + 30
            while per_replica(server, "vllm:num_requests_running")[0] < 1 or engine.num_unfinished < 12:
                assert time.monotonic() < deadline, "the load never reached replica 0"
                time.sleep(0.05)
            os.kill(pids[0], signal.SIGKILL)
            killed_at = time.monotonic()
            outcomes = [f.result(timeout=120) for f in futures]
        assert not [o for o in outcomes if o[0] == "hang"], outcomes
        assert time.monotonic() - killed_at < 60
        for kind, detail in outcomes:
            if kind == "ok":
                assert detail == 200  # a finished request is whole
            else:  # an error the client can read, naming the failed replica
                assert kind in ("event", "http") and "replica 0 failed" in str(detail), (kind, detail)
        failed = [o for o in outcomes if o[0] != "ok"]
        retried = samples(server, "pagellm:dp_requests_retried_total")[()]
        assert failed or retried, "the kill hit no request in flight"
        assert len(failed) < len(outcomes), "requests on the surviving replica finished"
        # the endpoint keeps serving while replica 0 restarts, and takes it back
        client = server.client()
        for prompt in PROMPTS:
            assert client.completions.create(model=engine.model_name, prompt=prompt, max_tokens=4).choices[0].text
        deadline = time.monotonic() + 120
        while per_replica(server, "pagellm:dp_replica_up")[0] != 1.0:
            assert time.monotonic() < deadline, "replica 0 did not come back"
            time.sleep(0.2)
        assert per_replica(server, "pagellm:dp_replica_restarts_total") == [1.0, 0.0]
        assert engine.replica_pids()[0] != pids[0]
        routed = per_replica(server, "pagellm:dp_requests_routed_total")[0]
        for word in ("Alpha", "Bravo", "Charlie", "Delta"):  # new prefixes fill an idle fleet in turn
            client.completions.create(model=engine.model_name, prompt=f"{word} is back", max_tokens=4)
        assert per_replica(server, "pagellm:dp_requests_routed_total")[0] > routed
