"""Flags of `pagellm serve` (vLLM's names), separate from the server so --help stays fast."""

from __future__ import annotations

import argparse
import os


def _positive_int(text: str) -> int:
    value = int(text)
    if value < 1:
        raise argparse.ArgumentTypeError(f"must be >= 1, got {value}")
    return value


def add_server_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--task", default="generate", choices=["generate", "embed", "classify"],
                   help="generate: completions, chat and zero-shot /classify (with labels); embed: /v1/embeddings; "
                        "classify: /classify with a *ForSequenceClassification model (default: %(default)s)")
    g.add_argument("--enable-lora", action="store_true",
                   help="serve PEFT LoRA / prefix-tuning adapters (implied by --lora-modules; default: off)")
    g.add_argument("--lora-modules", nargs="+", default=None, metavar="NAME=PATH",
                   help="adapters to serve, each picked by a request's model=NAME; also vLLM's JSON form "
                        "'{\"name\": ..., \"path\": ...}' (default: none)")
    g.add_argument("--max-loras", type=int, default=4,
                   help="adapters resident at once (one step mixes at most this many); LRU eviction "
                        "(default: %(default)s)")
    g.add_argument("--max-lora-rank", type=int, default=16, help="largest LoRA rank accepted (default: %(default)s)")
    g.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    g.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    g.add_argument("--api-key", default=os.environ.get("PAGELLM_API_KEY"),
                   help="require 'Authorization: Bearer <key>' on every route but /health "
                        "(default: $PAGELLM_API_KEY, else unset: no key needed)")
    g.add_argument("--served-model-name", nargs="+", default=None,
                   help="model name(s) the API accepts; the first is reported in responses "
                        "(default: the model's file or folder name)")
    g.add_argument("--max-waiting-requests", type=int, default=256,
                   help="answer 503 with Retry-After once this many requests wait for the engine "
                        "(default: %(default)s)")
    g.add_argument("--max-request-body-bytes", type=int, default=8 << 20,
                   help="answer 413 past this request body size (default: %(default)s)")
    g.add_argument("--max-header-bytes", type=_positive_int, default=64 << 10,
                   help="answer 431 past this size of a request's line and headers (default: %(default)s)")
    g.add_argument("--default-max-tokens", type=_positive_int, default=None, metavar="N",
                   help="tokens to generate for a request that sets no limit (chat without max_tokens or "
                        "max_completion_tokens, completions with max_tokens null); an explicit max_tokens "
                        "still wins (default: unset, generate up to the context window)")
    g.add_argument("--shutdown-grace-seconds", type=float, default=10.0,
                   help="on SIGTERM, time running requests get to finish before they are aborted "
                        "(default: %(default)s)")
    g.add_argument("--timeout-keep-alive", type=int, default=5,
                   help="seconds an idle keep-alive connection stays open (default: %(default)s)")
    g.add_argument("--log-level", default="warning",
                   choices=["critical", "error", "warning", "info", "debug", "trace"],
                   help="uvicorn log level (default: %(default)s)")
    add_data_parallel_args(p)


def add_data_parallel_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("data parallel (Ray; pip install 'pagellm[distributed]', see docs/distributed.md)")
    g.add_argument("--data-parallel-size", "-dp", type=_positive_int, default=None, metavar="N",
                   help="engine replicas behind this one endpoint, each in its own Ray actor (process); a request "
                        "goes to the replica that served its prefix, else the least loaded (default: unset, one "
                        "engine in this process, no Ray)")
    # NOTE: --distributed-executor-backend is an engine flag (pagellm/entrypoints/cli.py): ray for these replicas
    g.add_argument("--data-parallel-threads", type=_positive_int, default=1,
                   help="CPUs Ray reserves for each replica, and its torch threads (default: %(default)s)")
    g.add_argument("--data-parallel-max-restarts", type=int, default=4,
                   help="times Ray restarts a replica whose process died; -1: always (default: %(default)s)")
    g.add_argument("--data-parallel-routing", default="affinity", choices=["affinity", "least_load", "random"],
                   help="affinity: prefix affinity with least-load fallback; least_load and random are baselines "
                        "(default: %(default)s)")
