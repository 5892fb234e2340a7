"""`pagellm monitor run|serve`: the monitor as a batch over a JSONL file or stdin, or as a server with the
HTTP ingest endpoint, /metrics and the dashboard."""

from __future__ import annotations

import argparse
import json
import sys
import threading
from typing import Any

from pagellm.apps.monitor.detector import DetectorConfig


def add_monitor_parser(sub: Any) -> None:
    p = sub.add_parser("monitor", help="topic and sentiment monitoring of a text stream, with alerts")
    msub = p.add_subparsers(dest="monitor_command", required=True)
    run = msub.add_parser("run", help="classify a JSONL file (or stdin) and write alerts",
                          formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    run.add_argument("input", nargs="?", default="-", help="JSONL file of {text, id?, time?} lines; - for stdin")
    run.add_argument("--follow", action="store_true", help="keep reading the file as it grows (tail -f)")
    _add_common(run)
    run.set_defaults(func=cmd_monitor_run)
    serve = msub.add_parser("serve", help="HTTP ingest, /metrics and the dashboard",
                            formatter_class=argparse.ArgumentDefaultsHelpFormatter)
    serve.add_argument("--host", default="127.0.0.1")
    serve.add_argument("--port", type=int, default=8000)
    serve.add_argument("--input", default=None, help="also follow this JSONL file")
    _add_common(serve)
    serve.set_defaults(func=cmd_monitor_serve)


def _add_common(p: argparse.ArgumentParser) -> None:
    d = DetectorConfig()
    p.add_argument("--sentiment", required=True, help="a `pagellm finetune` classifier folder (labels include "
                                                       "negative)")
    p.add_argument("--topics", required=True, help="a,b,c or 'a: description; b: description'")
    p.add_argument("--topic-method", default="embed", choices=["embed", "zero-shot"],
                   help="embedding similarity to the topic descriptions, or zero-shot by the decoder")
    p.add_argument("--embed-model", default=None, help="encoder for topic embeddings (default: bundled MiniLM); "
                                                       "with zero-shot, the decoder (default: bundled SmolLM2)")
    p.add_argument("--db", default="monitor.sqlite",
                   help="SQLite file (or a postgresql:// URI): results, offsets, detector state, alerts")
    p.add_argument("--alerts", default=None, help="append alerts to this JSONL file")
    p.add_argument("--webhook", default=None, help="POST each alert here (retried with back-off)")
    p.add_argument("--batch-size", type=int, default=64)
    p.add_argument("--quantization", default="auto", choices=["auto", "none", "int8"],
                   help="int8: the encoders' big linear layers in int8 (faster on CPUs; docs/monitor.md "
                        "'Performance'); auto/none: float32")
    g = p.add_argument_group("detection")
    g.add_argument("--window", type=int, default=d.window, help="recent texts per topic behind the shown share")
    g.add_argument("--baseline-window", type=int, default=d.baseline_window)
    g.add_argument("--min-baseline", type=int, default=d.min_baseline)
    g.add_argument("--shift", type=float, default=d.shift, help="rise of the negative share to detect")
    g.add_argument("--threshold", type=float, default=d.threshold, help="CUSUM alarm level")
    g.add_argument("--cooldown", type=int, default=d.cooldown, help="stream texts without a repeat alert")


def build_service(args: argparse.Namespace) -> Any:
    from pagellm.apps.monitor.service import EngineClassifier, MonitorService, parse_topics
    from pagellm.apps.monitor.store import open_store

    config = DetectorConfig(args.window, args.baseline_window, args.min_baseline, args.shift, args.threshold,
                            args.cooldown)
    config.check()
    classifier = EngineClassifier(args.sentiment, parse_topics(args.topics), args.topic_method, args.embed_model,
                                  quantization=args.quantization)
    return MonitorService(classifier, open_store(args.db), config, args.alerts, args.webhook, args.batch_size)


def cmd_monitor_run(args: argparse.Namespace) -> int:
    from pagellm.apps.monitor.service import follow_lines

    service = build_service(args)
    try:
        if args.input == "-":
            report = service.run_lines(sys.stdin, "stdin")
        else:
            lines = follow_lines(args.input) if args.follow else open(args.input)  # noqa: SIM115
            report = service.run_lines(lines, args.input)
        if service.webhook is not None:
            service.webhook.notify()
        print(json.dumps({"classified": report.num_classified, "duplicates": report.num_duplicates,
                          "alerts": len(report.alerts), "bad_lines": len(report.errors)}))
    finally:
        service.close()
    return 0


def cmd_monitor_serve(args: argparse.Namespace) -> int:
    import uvicorn

    from pagellm.apps.monitor.api import build_monitor_app
    from pagellm.apps.monitor.service import follow_lines

    service = build_service(args)
    stop = threading.Event()
    if args.input:
        threading.Thread(target=service.run_lines, args=(follow_lines(args.input, stop=stop), args.input),
                         daemon=True, name="pagellm-monitor-follow").start()
    try:
        uvicorn.run(build_monitor_app(service), host=args.host, port=args.port, log_level="info")
    finally:
        stop.set()
        service.close()
    return 0
