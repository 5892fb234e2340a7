"""Flags of `pagellm serve` (vLLM's names), separate from the server so --help stays fast."""

from __future__ import annotations

import argparse
import os


def add_server_args(p: argparse.ArgumentParser) -> None:
    g = p.add_argument_group("server")
    g.add_argument("--host", default="127.0.0.1", help="bind address (default: %(default)s)")
    g.add_argument("--port", type=int, default=8000, help="(default: %(default)s)")
    g.add_argument("--api-key", default=os.environ.get("PAGELLM_API_KEY"),
                   help="require this bearer key on every route but /health (default: $PAGELLM_API_KEY, unset)")
    g.add_argument("--served-model-name", default=None, help="model name in the API (default: the model's name)")
    g.add_argument("--max-waiting-requests", type=int, default=256,
                   help="answer 503 past this many queued requests (default: %(default)s)")
    g.add_argument("--max-request-body-bytes", type=int, default=8 << 20,
                   help="answer 413 past this body size (default: %(default)s)")
    g.add_argument("--shutdown-grace-seconds", type=float, default=10.0,
                   help="on SIGTERM, time running requests get to finish (default: %(default)s)")
    g.add_argument("--log-level", default="warning", help="uvicorn log level (default: %(default)s)")
