"""pagellm bench latency|throughput|serve on the tiny model: JSON with sane numbers and a PNG plot."""

from __future__ import annotations

import json

import pytest

from pagellm.entrypoints.cli import main

SMALL = ["--dtype", "float32", "--input-len", "8", "--output-len", "5", "--num-blocks", "256", "--block-size", "4"]


@pytest.mark.parametrize("mode,extra", [
    ("latency", ["--repeats", "2"]),
    ("throughput", ["--batch-sizes", "1,3"]),
    ("serve", ["--concurrency", "1,2", "--num-prompts", "3"]),
])
def test_bench_writes_json_and_png(mode, extra, tiny_llama_dir, tmp_path):
    assert main(["bench", mode, "--model", tiny_llama_dir, *SMALL, *extra, "--out-dir", str(tmp_path)]) == 0
    result = json.loads((tmp_path / f"{mode}.json").read_text())
    png = (tmp_path / f"{mode}.png").read_bytes()
    assert png[:8] == b"\x89PNG\r\n\x1a\n" and len(png) > 1000
    if mode == "latency":
        assert len(result["runs"]) == 2 and 0 < result["ttft_s"] < result["e2e_s"]
        assert result["decode_tok_s"] > 0 and result["itl_s"]["p50"] <= result["itl_s"]["p99"]
    else:
        key = "batch_size" if mode == "throughput" else "concurrency"
        assert [p[key] for p in result["points"]] == ([1, 3] if mode == "throughput" else [1, 2])
        assert all(p["output_tok_s"] > 0 for p in result["points"])
    if mode == "serve":
        assert all(0 < p["ttft_s"]["p50"] <= p["elapsed_s"] for p in result["points"])
