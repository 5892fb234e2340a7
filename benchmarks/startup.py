"""Startup: wall time from launching `pagellm generate --max-tokens 1` to its exit (the first token).

Runs the CLI in fresh processes: once with pagellm's cache (~/.cache/pagellm: converted tokenizer and
GGUF weights) in a new empty folder (a first launch), then --repeats times with it warm; also reports
the time to import torch alone (the floor: generate needs it) and torch with transformers (what a start
that imports transformers pays before any work).
Usage: python benchmarks/startup.py [--repeats 3] [--args "--quantization none"]
"""

from __future__ import annotations

import argparse
import os
import shlex
import subprocess
import sys
import tempfile
import time

sys.path.insert(0, __file__.rsplit("/", 1)[0])
from common import load_average, write_result  # noqa: E402


def timed(cmd: list[str], env: dict) -> float:
    start = time.perf_counter()
    proc = subprocess.run(cmd, env=env, capture_output=True, text=True)
    elapsed = time.perf_counter() - start
    if proc.returncode != 0:
        sys.stderr.write(proc.stderr[-3000:])
        raise SystemExit(f"failed: {' '.join(cmd)}")
    return elapsed


def main() -> None:
    p = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    p.add_argument("--repeats", type=int, default=3)
    p.add_argument("--args", default="", help="extra engine flags for `pagellm generate`")
    p.add_argument("--out", default=None)
    args = p.parse_args()
    cli = [sys.executable, "-m", "pagellm.entrypoints.cli", "generate", "--max-tokens", "1", "--temperature", "0",
           *shlex.split(args.args), "What is the capital of France?"]
    env = {**os.environ, "HF_HUB_OFFLINE": "1"}
    result = {"workload": "startup", "command": " ".join(cli[1:]), "load_avg_before": load_average()}
    result["import_torch_s"] = min(timed([sys.executable, "-c", "import torch"], env) for _ in range(args.repeats))
    result["import_torch_transformers_s"] = min(
        timed([sys.executable, "-c", "import torch, transformers"], env) for _ in range(args.repeats))
    with tempfile.TemporaryDirectory() as cache:
        result["first_launch_s"] = timed(cli, {**env, "PAGELLM_CACHE": cache})
    result["warm_launch_s"] = [timed(cli, env) for _ in range(args.repeats)]
    result["warm_launch_best_s"] = min(result["warm_launch_s"])
    result["load_avg_after"] = load_average()
    write_result("startup", result, args.out)


if __name__ == "__main__":
    main()
