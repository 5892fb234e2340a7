"""GET /metrics: Prometheus text with vLLM's metric names, so existing vLLM dashboards work unchanged.

Scheduler state (running, waiting, KV usage, preemptions, prefix cache) is read from the engine
thread's latest EngineStats snapshot at scrape time; per-request counters and latency histograms
are fed by AsyncLLM's output observer on the event loop.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from dataclasses import dataclass

import prometheus_client
from prometheus_client import CollectorRegistry, Counter, Histogram
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric
from prometheus_client.registry import Collector

from pagellm.engine.async_llm import EngineStats
from pagellm.outputs import RequestOutput

# NOTE: vLLM does not export the *_created series; dashboards do not expect them.
prometheus_client.disable_created_metrics()

# vLLM's buckets, so histogram_quantile panels line up.
TTFT_BUCKETS = (0.001, 0.005, 0.01, 0.02, 0.04, 0.06, 0.08, 0.1, 0.25, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0,
                20.0, 40.0, 80.0, 160.0, 640.0, 2560.0)
ITL_BUCKETS = (0.01, 0.025, 0.05, 0.075, 0.1, 0.15, 0.2, 0.3, 0.4, 0.5, 0.75, 1.0, 2.5, 5.0, 7.5, 10.0, 20.0,
               40.0, 80.0)
E2E_BUCKETS = (0.3, 0.5, 0.8, 1.0, 1.5, 2.0, 2.5, 5.0, 10.0, 15.0, 20.0, 30.0, 40.0, 50.0, 60.0, 120.0, 240.0,
               480.0, 960.0, 1920.0, 7680.0)


class _EngineStatsCollector(Collector):
    """Gauges and scheduler-owned counters, from one EngineStats snapshot per scrape.

    With data-parallel replicas (replica_stats given) every series is reported once per replica, under a
    `replica` label; Prometheus sums them (sum by (model_name)) for the whole endpoint.
    """

    def __init__(self, model_name: str, stats: Callable[[], EngineStats], num_waiting: Callable[[], int],
                 replica_stats: Callable[[], list[EngineStats]] | None = None) -> None:
        self.model_name = model_name
        self.stats = stats
        self.num_waiting = num_waiting
        self.replica_stats = replica_stats

    def _snapshots(self) -> tuple[list[str], list[tuple[list[str], EngineStats, int]]]:
        """(label names, [(label values, stats, waiting)]): one row, or one per replica."""
        if self.replica_stats is None:
            return ["model_name"], [([self.model_name], self.stats(), self.num_waiting())]
        rows = [([self.model_name, str(i)], s, s.num_waiting) for i, s in enumerate(self.replica_stats())]
        return ["model_name", "replica"], rows

    def collect(self) -> Iterator[Metric]:
        names, rows = self._snapshots()

        def family(kind: type, name: str, doc: str, value: Callable[[EngineStats, int], float]) -> Metric:
            metric = kind(name, doc, labels=names)
            for labels, s, waiting in rows:
                metric.add_metric(labels, value(s, waiting))
            return metric

        yield family(GaugeMetricFamily, "vllm:num_requests_running", "Number of requests in the running batch.",
                     lambda s, _: s.num_running)
        yield family(GaugeMetricFamily, "vllm:num_requests_waiting", "Number of requests waiting to be scheduled.",
                     lambda _, waiting: waiting)
        yield family(GaugeMetricFamily, "vllm:kv_cache_usage_perc",
                     "KV-cache usage: 1 means 100 percent of the blocks in use.", lambda s, _: s.kv_cache_usage)
        yield family(CounterMetricFamily, "vllm:num_preemptions", "Cumulative number of preemptions.",
                     lambda s, _: s.num_preemptions)
        yield family(CounterMetricFamily, "vllm:prefix_cache_queries", "Prefix cache queries, in tokens.",
                     lambda s, _: s.prefix_cache_queries)
        yield family(CounterMetricFamily, "vllm:prefix_cache_hits", "Prefix cache hits, in tokens.",
                     lambda s, _: s.prefix_cache_hits)
        s = rows[0][1]
        if self.replica_stats is None and s.spec_decode is not None:  # speculative decoding is on
            label = [self.model_name]

            def counter(name: str, doc: str, value: float) -> CounterMetricFamily:
                c = CounterMetricFamily(name, doc, labels=["model_name"])
                c.add_metric(label, value)
                return c

            spec = s.spec_decode
            yield counter("vllm:spec_decode_num_drafts", "Request-steps that verified proposed tokens.",
                          spec.num_drafts)
            yield counter("vllm:spec_decode_num_draft_tokens", "Proposed (draft) tokens verified.",
                          spec.num_draft_tokens)
            yield counter("vllm:spec_decode_num_accepted_tokens", "Proposed tokens accepted.",
                          spec.num_accepted_tokens)
            per_position = CounterMetricFamily("vllm:spec_decode_num_accepted_tokens_per_pos",
                                               "Proposed tokens accepted, by position in the proposal.",
                                               labels=["model_name", "position"])
            for position, count in enumerate(spec.accepted_per_position):
                per_position.add_metric([*label, str(position)], count)
            yield per_position


class _RoutingCollector(Collector):
    """Data-parallel routing: where requests went and why, replica restarts, retried requests."""

    def __init__(self, model_name: str, counters: Callable[[], dict]) -> None:
        self.model_name = model_name
        self.counters = counters

    def collect(self) -> Iterator[Metric]:
        c = self.counters()
        name = [self.model_name]
        routes = CounterMetricFamily("pagellm:dp_routing_decisions",
                                     "Requests routed, by decision: affinity (an owner of the prompt's prefix took "
                                     "it), fallback (its owner was too busy), miss (no replica held its prefix).",
                                     labels=["model_name", "decision"])
        for kind in sorted({"affinity", "fallback", "miss", *c["routes"]}):
            routes.add_metric([*name, kind], c["routes"].get(kind, 0))
        yield routes
        totals = [("pagellm:dp_prefix_owner_hits", "Requests with a full KV block sent to a replica that already "
                   "served their longest known prefix.", c["owner_hits"]),
                  ("pagellm:dp_requests_with_full_block",
                   "Requests with at least one full KV block (the owner hit rate's denominator).",
                   c["with_full_block"]),
                  ("pagellm:dp_requests_retried",
                   "Requests resent to another replica after theirs died before any output.", c["retried"])]
        for metric_name, doc, value in totals:
            metric = CounterMetricFamily(metric_name, doc, labels=["model_name"])
            metric.add_metric(name, value)
            yield metric
        per_replica = [("pagellm:dp_requests_routed", "Requests sent to each replica (retries included).",
                        CounterMetricFamily, c["routed"]),
                       ("pagellm:dp_replica_restarts", "Times each replica came back after its process died.",
                        CounterMetricFamily, c["restarts"]),
                       ("pagellm:dp_replica_up", "1 while the replica takes requests.", GaugeMetricFamily,
                        [float(up) for up in c["up"]])]
        for metric_name, doc, kind, values in per_replica:
            metric = kind(metric_name, doc, labels=["model_name", "replica"])
            for i, value in enumerate(values):
                metric.add_metric([*name, str(i)], value)
            yield metric


@dataclass
class _Timing:
    last_token_time: float | None = None


class ServerMetrics:
    """The server's Prometheus registry (one per app, so several servers in one process don't clash)."""

    def __init__(self, model_name: str, stats: Callable[[], EngineStats], num_waiting: Callable[[], int],
                 replica_stats: Callable[[], list[EngineStats]] | None = None,
                 routing_counters: Callable[[], dict] | None = None) -> None:
        self.registry = CollectorRegistry()
        labels = ["model_name"]
        reg = self.registry
        self.prompt_tokens = Counter("vllm:prompt_tokens", "Prefill tokens processed.", labels, registry=reg)
        self.generation_tokens = Counter("vllm:generation_tokens", "Generation tokens processed.", labels,
                                         registry=reg)
        self.request_success = Counter("vllm:request_success", "Finished requests, by finish reason.",
                                       labels + ["finished_reason"], registry=reg)
        self.ttft = Histogram("vllm:time_to_first_token_seconds", "Time to first token.", labels,
                              buckets=TTFT_BUCKETS, registry=reg)
        self.itl = Histogram("vllm:inter_token_latency_seconds", "Time between consecutive output tokens.",
                             labels, buckets=ITL_BUCKETS, registry=reg)
        self.e2e = Histogram("vllm:e2e_request_latency_seconds", "End-to-end request latency.", labels,
                             buckets=E2E_BUCKETS, registry=reg)
        reg.register(_EngineStatsCollector(model_name, stats, num_waiting, replica_stats))
        if routing_counters is not None:
            reg.register(_RoutingCollector(model_name, routing_counters))
        # Children are bound once: labels() takes a lock and a dict lookup on every call.
        self._prompt_tokens = self.prompt_tokens.labels(model_name)
        self._generation_tokens = self.generation_tokens.labels(model_name)
        self._ttft = self.ttft.labels(model_name)
        self._itl = self.itl.labels(model_name)
        self._e2e = self.e2e.labels(model_name)
        self._model_name = model_name
        self._timings: dict[str, _Timing] = {}

    def observe(self, out: RequestOutput, now: float) -> None:
        """AsyncLLM's output observer: token counters and latencies of one step's output."""
        timing = self._timings.get(out.request_id)
        if timing is None:
            timing = self._timings[out.request_id] = _Timing()
        num_new = sum(len(seq.delta_token_ids) for seq in out.outputs)
        if num_new:
            self._generation_tokens.inc(num_new)
            if timing.last_token_time is None:
                first = out.metrics.get("first_token_time", now)
                self._ttft.observe(max(0.0, first - out.metrics.get("arrival_time", first)))
                self._prompt_tokens.inc(len(out.prompt_token_ids))
            else:
                # NOTE: one observation per step; every sequence of the request advanced in the same step.
                self._itl.observe(now - timing.last_token_time)
            timing.last_token_time = now
        if out.finished:
            del self._timings[out.request_id]
            self._e2e.observe(max(0.0, now - out.metrics.get("arrival_time", now)))
            reason = out.outputs[0].finish_reason if out.outputs else "abort"
            self.request_success.labels(self._model_name, reason or "abort").inc()

    def render(self) -> bytes:
        return prometheus_client.generate_latest(self.registry)

    content_type = prometheus_client.CONTENT_TYPE_LATEST
