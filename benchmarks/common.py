"""Shared benchmark plumbing: fixed workloads, one subprocess per engine, JSON out."""

from __future__ import annotations

import argparse
import json
import os
import resource
import subprocess
import sys
import time
from pathlib import Path

os.environ.setdefault("HF_HUB_OFFLINE", "1")
os.environ.setdefault("TOKENIZERS_PARALLELISM", "false")

RESULTS = Path(__file__).resolve().parent / "results"


def make_prompts(num: int, length: int, seed: int = 0) -> list[list[int]]:
    """Random ordinary-token prompts (ids 100..40000 avoid SmolLM2's special tokens)."""
    import random

    rng = random.Random(seed)
    return [[rng.randrange(100, 40000) for _ in range(length)] for _ in range(num)]


TEXT_DIR = Path(__file__).resolve().parent.parent / "tests" / "data" / "sentiment"


def fixed_text() -> str:
    """The fixed English text of the perplexity measurements: the committed sentiment sample
    (tests/data/sentiment, MIT licence, see its README), joined in a fixed order."""
    lines = []
    for name in ("movies/train.jsonl", "movies/dev.jsonl", "movies/test.jsonl", "tweets/test.jsonl"):
        lines += [json.loads(line)["text"] for line in (TEXT_DIR / name).read_text().splitlines() if line.strip()]
    return "\n".join(lines)


def peak_rss_mib() -> float:
    return resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024


def load_average() -> float:
    return os.getloadavg()[0]


def run_child(script: str, args: list[str]) -> dict:
    """Run one engine's measurement in a fresh process (separate RSS, no shared caches)."""
    cmd = [sys.executable, script, "--child", *args]
    proc = subprocess.run(cmd, capture_output=True, text=True)
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-4000:])
        raise SystemExit(f"child failed: {' '.join(cmd)}")
    return json.loads(proc.stdout.strip().splitlines()[-1])


def pagellm_kwargs(engine: str) -> dict:
    """An engine name of --engines -> LLM keyword arguments: `pagellm` (unquantized), `pagellm:int4`,
    `pagellm:int8`, then flags: `+compile` (--compile), `+kvbf16` (--kv-cache-dtype bfloat16),
    e.g. `pagellm:int4+kvbf16`."""
    name, *flags = engine.split("+")
    base, _, quantization = name.partition(":")
    if base != "pagellm" or not set(flags) <= {"compile", "kvbf16"} or quantization not in ("", "int8", "int4"):
        raise SystemExit(f"unknown engine {engine!r}: pagellm[:int8|:int4][+compile][+kvbf16] or hf")
    return {"quantization": quantization or "none", "compile": "compile" in flags,
            "kv_cache_dtype": "bfloat16" if "kvbf16" in flags else "auto"}


def ratios_vs_hf(result: dict, engines: list[str], keys: dict[str, bool]) -> None:
    """result["ratios_vs_hf"][engine][key]: pagellm over HF (or HF over pagellm where keys[key] is True,
    for times: lower is better)."""
    if "hf" not in result:
        return
    hf = result["hf"]
    result["ratios_vs_hf"] = {
        engine: {key: (hf[key] / result[engine][key] if inverse else result[engine][key] / hf[key])
                 for key, inverse in keys.items()}
        for engine in engines if engine != "hf"
    }


def hf_model(dtype: str):
    """HF transformers on the same weights: the bundled GGUF, dequantized by transformers."""
    import torch
    from transformers import AutoModelForCausalLM

    from pagellm.model_source import bundled_gguf_path

    path = bundled_gguf_path()
    torch_dtype = {"float32": torch.float32, "bfloat16": torch.bfloat16}[dtype]
    return AutoModelForCausalLM.from_pretrained(str(path.parent), gguf_file=path.name, dtype=torch_dtype).eval()


def resolved_dtype(dtype: str) -> str:
    from pagellm.model.loader.model_loader import resolve_dtype

    return str(resolve_dtype(dtype)).removeprefix("torch.")


def base_parser(description: str) -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(description=description)
    p.add_argument("--dtype", default="auto", help="run dtype for both engines (auto: as pagellm picks)")
    p.add_argument("--engines", default="pagellm,pagellm:int4,hf",
                   help="comma list of hf and pagellm[:int8|:int4][+compile][+kvbf16] (default: %(default)s)")
    p.add_argument("--out", default=None, help="JSON output path (default: benchmarks/results/<name>.json)")
    p.add_argument("--child", action="store_true", help=argparse.SUPPRESS)
    p.add_argument("--engine", default=None, help=argparse.SUPPRESS)
    return p


def write_result(name: str, result: dict, out: str | None) -> None:
    path = Path(out) if out else RESULTS / f"{name}.json"
    path.parent.mkdir(parents=True, exist_ok=True)
    result["timestamp"] = time.strftime("%Y-%m-%dT%H:%M:%S")
    result["cpu"] = _cpuinfo_field("model name")
    result["cpu_flags"] = _cpuinfo_field("flags")  # what lscpu lists as Flags
    path.write_text(json.dumps(result, indent=2))
    print(json.dumps(result, indent=2))
    print(f"wrote {path}", file=sys.stderr)


# --cpu-kind: make pagellm take another CPU kind's branch (the kernels stay this machine's build), to
# measure that branch's numerics here; its speed only means something on a CPU of that kind
CPU_KINDS = {
    "avx2": "avx2 fma",
    "avx512_bf16": "avx2 fma avx512f avx512bw avx512vl avx512_vnni avx512_bf16",
    "amx": "avx2 fma avx512f avx512bw avx512vl avx512_vnni avx512_bf16 amx_tile amx_bf16 amx_int8",
}


def apply_cpu_kind(kind: str | None) -> None:
    """Patch pagellm's CPU feature detection to `kind` (None or "native": leave it)."""
    if kind in (None, "native"):
        return
    from pagellm.model.layers import kernels

    features = kernels.CpuFeatures.from_flags(CPU_KINDS[kind])
    kernels.cpu_features = lambda: features


def _cpuinfo_field(name: str) -> str:
    """The first /proc/cpuinfo line of `name` (model name, flags), or "unknown"."""
    try:
        for line in open("/proc/cpuinfo"):
            if line.startswith(name):
                return line.split(":", 1)[1].strip()
    except OSError:
        pass
    return "unknown"


def wait_healthy(proc, base: str, timeout_s: float, stop) -> None:
    """Poll `base`/health until 200; SystemExit with the server's stderr tail if it exits, or after timeout_s
    (then `stop(proc)` first)."""
    import httpx

    deadline = time.monotonic() + timeout_s
    while True:
        if proc.poll() is not None:
            raise SystemExit(f"server exited: {proc.stderr.read()[-4000:] if proc.stderr else ''}")
        try:
            if httpx.get(f"{base}/health", timeout=1).status_code == 200:
                return
        except httpx.TransportError:
            pass
        if time.monotonic() > deadline:
            stop(proc)
            raise SystemExit("server did not come up")
        time.sleep(0.5)
