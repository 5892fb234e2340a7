"""The monitor: texts in (JSONL lines or HTTP items) -> topic and sentiment through pagellm's engine ->
store -> per-topic change detection -> alerts out. Built on the public `pagellm.LLM` surface only.

Each batch is classified, then stored together with the source offset after it and the detector state in
one transaction (store.py), so a restart resumes after the last stored batch. Texts whose id is already
stored are skipped, never classified twice.
"""

from __future__ import annotations

import json
import logging
import threading
import time
import uuid
from collections.abc import Iterable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any, Protocol

import numpy as np

from pagellm.apps.monitor.alerts import JsonlAlertWriter, MonitorMetrics, WebhookSender
from pagellm.apps.monitor.detector import ChangeDetector, DetectorConfig
from pagellm.apps.monitor.store import MonitorStore, StoredAlert, TextResult
from pagellm.errors import InvalidRequest
from pagellm.pooling_params import PoolingParams

logger = logging.getLogger("pagellm.monitor")

MAX_TEXT_CHARS = 20_000  # a longer item is refused (the classifiers read at most 256 tokens anyway)
ITEM_FIELDS = ("text", "id", "time")


@dataclass(frozen=True)
class TextItem:
    """One input text: `{"text", "id"?, "time"?}`."""

    text: str
    id: str | None = None
    time: float | None = None


def parse_item(obj: Any) -> TextItem:
    """A checked TextItem from a decoded JSON value; InvalidRequest says what is wrong."""
    if isinstance(obj, str):
        obj = {"text": obj}
    if not isinstance(obj, dict):
        raise InvalidRequest(f"an item must be a JSON object {{\"text\", \"id\"?, \"time\"?}}; got "
                             f"{type(obj).__name__}", param="text")
    unknown = sorted(set(obj) - set(ITEM_FIELDS))
    if unknown:
        raise InvalidRequest(f"unknown field(s) {', '.join(unknown)}; an item has text, id and time",
                             param=unknown[0])
    text = obj.get("text")
    if not isinstance(text, str) or not text.strip():
        raise InvalidRequest("text must be a non-empty string", param="text")
    if len(text) > MAX_TEXT_CHARS:
        raise InvalidRequest(f"text has {len(text)} characters; the limit is {MAX_TEXT_CHARS}", param="text")
    text_id = obj.get("id")
    if text_id is not None and (isinstance(text_id, bool) or not isinstance(text_id, str | int) or
                                not str(text_id)):
        raise InvalidRequest("id must be a non-empty string or an integer", param="id")
    stamp = obj.get("time")
    if stamp is not None and (isinstance(stamp, bool) or not isinstance(stamp, int | float)):
        raise InvalidRequest("time must be a number (seconds since the epoch)", param="time")
    return TextItem(text, None if text_id is None else str(text_id), None if stamp is None else float(stamp))


def parse_line(line: str) -> TextItem:
    try:
        obj = json.loads(line)
    except json.JSONDecodeError as exc:
        raise InvalidRequest(f"not JSON: {exc.msg} at column {exc.colno}", param="line") from exc
    return parse_item(obj)


class TextClassifier(Protocol):
    """Topic and sentiment of a batch: (topic, sentiment label, probability of `negative`) per text."""

    def classify(self, texts: Sequence[str]) -> list[tuple[str, str, float]]: ...


def parse_topics(spec: str) -> dict[str, str]:
    """`rates,earnings` or `rates: interest rates and central banks; earnings: company results` -> name ->
    description (a bare name describes itself)."""
    sep = ";" if ":" in spec else ","
    topics: dict[str, str] = {}
    for part in spec.split(sep):
        name, _, description = part.partition(":")
        name = name.strip()
        if name:
            topics[name] = description.strip() or name
    if len(topics) < 2:
        raise InvalidRequest("name at least two topics, e.g. --topics rates,earnings,fraud", param="topics")
    return topics


# NOTE: short sentences of several kinds, plus the topic descriptions: an encoder that differs (fine-tuned in
# full or in its top layers, or another model) gives different vectors on every one of them
PROBE_TEXTS = ("probe", "The central bank raised interest rates again.", "Shares fell sharply after the report.",
               "A quiet day with no news.")
SAME_ENCODER_ATOL = 1e-4  # the float32 noise between packed batches of one encoder is about 1e-6
LONG_PROBE = "word " * 4096  # over any encoder's limit: the length it is cut to is the model's input limit


class EngineClassifier:
    """Sentiment from a `pagellm finetune` classifier (LLM(task="classify")); topic by cosine similarity of
    the text's embedding to each topic description's (LLM(task="embed")), or zero-shot by a decoder
    (LLM().classify(labels=topics)).

    One encoder pass per text where it can: when the classifier's encoder is the topic encoder (a frozen-encoder
    head, `pagellm finetune --strategy head`, on the same base model), `classify` with
    `PoolingParams(return_embedding=True)` gives the sentiment and the topic embedding from one forward. That
    it is the same encoder is measured at start: the classifier's pooled vectors of PROBE_TEXTS and the topic
    descriptions must equal the embedder's within SAME_ENCODER_ATOL, and it must read at least as many tokens;
    else (`--strategy full` or `top-layers:K`, whose encoder moved; another base model) two passes run.
    `path` says which ran: "one-pass", "two-pass" or "zero-shot"; `encoder_passes` counts model passes per text.
    `one_pass`: None decides by that measurement, False always runs two passes, True raises if it cannot.
    `quantization`: "int8" runs both encoders' big linears in int8 (LLM(quantization="int8"), docs/monitor.md
    "Performance"); "auto" keeps float32.
    """

    def __init__(self, sentiment_model: str, topics: dict[str, str], topic_method: str = "embed",
                 embed_model: str | None = None, negative_label: str = "negative",
                 one_pass: bool | None = None, quantization: str = "auto") -> None:
        from pagellm import LLM

        if topic_method not in ("embed", "zero-shot"):
            raise InvalidRequest("topic_method must be embed or zero-shot", param="topic_method")
        self.sentiment = LLM(sentiment_model, task="classify", dtype="float32", quantization=quantization)
        probe = self.sentiment.classify(["probe"], use_tqdm=False)[0].outputs
        if negative_label not in probe.labels:
            raise InvalidRequest(f"the sentiment model's labels {probe.labels} have no {negative_label!r}",
                                 param="sentiment")
        self.negative_index = probe.labels.index(negative_label)
        self.labels = list(probe.labels)
        self.topic_names = list(topics)
        self.topic_method = topic_method
        self.embedder: Any = None
        self.decoder: Any = None
        self.truncate = -1  # one-pass: the topic encoder's input limit
        if topic_method == "zero-shot":
            self.decoder = LLM(embed_model) if embed_model else LLM()
            self.path, self.encoder_passes, detail = "zero-shot", 2, "topics by the decoder"
        else:
            embedder = LLM(embed_model or _bundled_encoder(), task="embed", dtype="float32",
                           quantization=quantization)
            described = embedder.embed(list(topics.values()), truncate_prompt_tokens=-1, use_tqdm=False)
            # [topics, hidden]
            self.topic_matrix = np.asarray([o.outputs.embedding for o in described], dtype=np.float32)
            same, detail = (False, "two passes asked for") if one_pass is False else \
                self._same_encoder(embedder, list(PROBE_TEXTS) + list(topics.values()))
            if one_pass and not same:
                raise InvalidRequest(f"one encoder pass needs the sentiment classifier's encoder to be the topic "
                                     f"encoder: {detail}", param="sentiment")
            if same:
                self.path, self.encoder_passes = "one-pass", 1  # NOTE: the embedder is no longer needed
            else:
                self.path, self.encoder_passes, self.embedder = "two-pass", 2, embedder
        logger.info("monitor classifier: %s, %d model pass%s per text (%s)", self.path, self.encoder_passes,
                    "" if self.encoder_passes == 1 else "es", detail)

    def _same_encoder(self, embedder: Any, texts: list[str]) -> tuple[bool, str]:
        """Whether the classifier's one-pass embedding is the embedder's for every text the monitor may see
        (same weights, pooling, normalization, and it reads at least the embedder's input limit), with a line
        saying what was measured. Sets `truncate` to the embedder's limit when it is."""
        embed_limit = len(embedder.embed([LONG_PROBE], truncate_prompt_tokens=-1,
                                         use_tqdm=False)[0].prompt_token_ids)
        classify_limit = len(self.sentiment.classify([LONG_PROBE], truncate_prompt_tokens=-1,
                                                     use_tqdm=False)[0].prompt_token_ids)
        if classify_limit < embed_limit:
            return False, (f"the sentiment classifier reads at most {classify_limit} tokens, the topic encoder "
                           f"{embed_limit}")
        ours = self.sentiment.classify(texts, truncate_prompt_tokens=embed_limit, use_tqdm=False,
                                       pooling_params=PoolingParams(return_embedding=True))
        theirs = embedder.embed(texts, truncate_prompt_tokens=-1, use_tqdm=False)
        a = np.asarray([o.outputs.embedding for o in ours], dtype=np.float64)  # [texts, hidden]
        b = np.asarray([o.outputs.embedding for o in theirs], dtype=np.float64)
        if a.shape != b.shape:
            return False, (f"the classifier's pooled vectors have {a.shape[1]} dimensions, the topic encoder's "
                           f"{b.shape[1]}")
        diff = float(np.abs(a - b).max())
        if diff > SAME_ENCODER_ATOL:
            return False, (f"the classifier's encoder is not the topic encoder: max |difference| {diff:.3g} over "
                           f"{len(texts)} probe texts; a --strategy head classifier on the same base shares it")
        self.truncate = embed_limit  # NOTE: the topic vector must be the embedder's, so texts are cut alike
        return True, (f"the classifier's encoder is the topic encoder: max |difference| {diff:.2g} over "
                      f"{len(texts)} probe texts")

    def classify(self, texts: Sequence[str]) -> list[tuple[str, str, float]]:
        texts = list(texts)
        if self.path == "one-pass":
            outs = self.sentiment.classify(texts, truncate_prompt_tokens=self.truncate, use_tqdm=False,
                                           pooling_params=PoolingParams(return_embedding=True))
            topics = self._nearest_topics([o.outputs.embedding for o in outs])
        else:
            outs = self.sentiment.classify(texts, truncate_prompt_tokens=-1, use_tqdm=False)
            topics = self._topics(texts)
        probs = np.asarray([o.outputs.probs for o in outs])  # [texts, labels]
        return [(topic, self.labels[int(k)], float(row[self.negative_index]))
                for topic, k, row in zip(topics, probs.argmax(axis=1), probs)]

    def _topics(self, texts: list[str]) -> list[str]:
        if self.decoder is not None:
            outs = self.decoder.classify(texts, labels=self.topic_names, use_tqdm=False)
            return [self.topic_names[_argmax(o.outputs.probs)] for o in outs]
        vectors = self.embedder.embed(texts, truncate_prompt_tokens=-1, use_tqdm=False)
        return self._nearest_topics([v.outputs.embedding for v in vectors])

    def _nearest_topics(self, vectors: list[list[float]]) -> list[str]:
        # NOTE: the engine's embeddings are L2-normalized (MiniLM's Normalize module): dot = cosine
        scores = np.asarray(vectors, dtype=np.float32) @ self.topic_matrix.T  # [texts, topics]
        return [self.topic_names[int(k)] for k in scores.argmax(axis=1)]


def _argmax(values: Sequence[float]) -> int:
    return max(range(len(values)), key=values.__getitem__)


def _bundled_encoder() -> str:
    from pagellm.adapt.base_model import resolve_base_model

    return str(resolve_base_model("minilm").source.path)


@dataclass
class IngestReport:
    """What one ingest call did."""

    num_classified: int = 0
    num_duplicates: int = 0
    alerts: list[StoredAlert] = field(default_factory=list)
    errors: list[dict[str, Any]] = field(default_factory=list)  # {"line"/"index", "message", "param"}


class MonitorService:
    """Owns the classifier, the store, the detector and the alert outputs of one monitor."""

    def __init__(self, classifier: TextClassifier, store: MonitorStore, detector_config: DetectorConfig,
                 alerts_path: str | None = None, webhook_url: str | None = None, batch_size: int = 64,
                 webhook_backoff_s: float = 0.5) -> None:
        self.classifier, self.store, self.batch_size = classifier, store, batch_size
        self.detector = ChangeDetector(detector_config, store.load_detector())
        self.metrics = MonitorMetrics()
        path = getattr(classifier, "path", None)  # EngineClassifier's: one-pass, two-pass or zero-shot
        if path is not None:
            self.metrics.model_passes.labels(path).set(getattr(classifier, "encoder_passes", 0))
        self.jsonl = JsonlAlertWriter(alerts_path) if alerts_path else None
        self.webhook = WebhookSender(webhook_url, store, self.metrics, backoff_s=webhook_backoff_s) \
            if webhook_url else None
        if self.webhook:
            self.webhook.start()
        self._lock = threading.Lock()  # one batch at a time: seq numbers and detector updates stay ordered
        self._started = time.time()

    def close(self) -> None:
        if self.webhook:
            self.webhook.stop()
        self.store.close()

    # ---- ingestion -------------------------------------------------------------------------
    def ingest(self, items: Sequence[TextItem], source: str | None = None, offset: int | None = None,
               default_ids: Sequence[str] | None = None) -> IngestReport:
        """Classify, store and run detection on one batch; `offset` (with `source`) is stored with it."""
        report = IngestReport()
        with self._lock:
            t0 = time.perf_counter()
            # NOTE: an item without an id (and no line to name it) gets a random one: it cannot be deduplicated
            ids = [item.id or (default_ids[i] if default_ids else f"auto:{uuid.uuid4().hex}")
                   for i, item in enumerate(items)]
            seq = self.store.next_seq()
            known = self.store.known_ids(ids)
            fresh, seen = [], set()
            for item, text_id in zip(items, ids):
                if text_id in known or text_id in seen:
                    report.num_duplicates += 1
                    continue
                seen.add(text_id)
                fresh.append((item, text_id))
            labels = self.classifier.classify([item.text for item, _ in fresh]) if fresh else []
            now = time.time()
            results, raised = [], []
            for i, ((item, text_id), (topic, sentiment, negative_prob)) in enumerate(zip(fresh, labels)):
                result = TextResult(seq + i, text_id, item.time or now, item.text, topic, sentiment, negative_prob)
                results.append(result)
                alert = self.detector.update(result.seq, text_id, topic, sentiment == "negative")
                if alert is not None:
                    raised.append((now, alert))
            stored = self.store.commit_batch(results, source, offset, self.detector.states, raised)
            report.num_classified, report.alerts = len(results), stored
            self._after_commit(results, stored, time.perf_counter() - t0)
        return report

    def _after_commit(self, results: list[TextResult], alerts: list[StoredAlert], elapsed_s: float) -> None:
        self.metrics.texts.inc(len(results))
        if results:
            self.metrics.texts_per_second.set(len(results) / max(elapsed_s, 1e-9))
        for topic in {r.topic for r in results}:
            share, baseline = self.detector.share(topic), self.detector.baseline_rate(topic)
            if share is not None:
                self.metrics.negative_share.labels(topic).set(share)
            if baseline is not None:
                self.metrics.baseline.labels(topic).set(baseline)
        for alert in alerts:
            self.metrics.alerts.labels(alert.alert.topic).inc()
            logger.warning("alert %d: topic %s negative share %.2f (baseline %.2f), texts %s..%s", alert.alert_id,
                           alert.alert.topic, alert.alert.share, alert.alert.baseline, alert.alert.start_id,
                           alert.alert.end_id)
        if alerts and self.jsonl:
            self.jsonl.write(alerts, self.store.texts_by_id([i for a in alerts for i in a.alert.text_ids]))
        if alerts and self.webhook:
            self.webhook.notify()

    def run_lines(self, lines: Iterable[str | None], source: str) -> IngestReport:
        """A JSONL stream (file or stdin), resumed after the stored offset of `source`; bad lines are
        reported and skipped, the stream goes on."""
        total = IngestReport()
        start = self.store.offset(source)
        for batch, errors, end in _batches(lines, start, self.batch_size):
            for error in errors:
                self.metrics.bad_inputs.inc()
                logger.warning("%s line %d: %s", source, error["line"], error["message"])
            total.errors += errors
            items = [item for _, item in batch]
            report = self.ingest(items, source, end, [f"{source}:{line}" for line, _ in batch])
            total.num_classified += report.num_classified
            total.num_duplicates += report.num_duplicates
            total.alerts += report.alerts
        return total

    # ---- views for the API and the dashboard ---------------------------------------------------
    def topics_view(self) -> list[dict[str, Any]]:
        out = []
        for topic, state in sorted(self.detector.states.items()):
            out.append({"topic": topic, "share": self.detector.share(topic), "window": len(state.recent),
                        "baseline": self.detector.baseline_rate(topic), "cusum": round(state.cusum, 4)})
        return out

    def alerts_view(self, limit: int = 50) -> list[dict[str, Any]]:
        alerts = self.store.alerts(limit)
        texts = self.store.texts_by_id([i for a in alerts for i in a.alert.text_ids])
        return [a.to_json(texts) for a in alerts]


def _batches(lines: Iterable[str | None], start: int, batch_size: int
             ) -> Iterator[tuple[list[tuple[int, TextItem]], list[dict[str, Any]], int]]:
    """(items with their 1-based line numbers, errors, the offset after the batch), skipping `start` lines;
    a None in `lines` (the follower found no new line) flushes a partial batch."""
    batch: list[tuple[int, TextItem]] = []
    errors: list[dict[str, Any]] = []
    number = 0
    for line in lines:
        if line is None:
            if batch or errors:
                yield batch, errors, max(number, start)
                batch, errors = [], []
            continue
        number += 1
        if number <= start or not line.strip():
            continue
        try:
            batch.append((number, parse_line(line)))
        except InvalidRequest as exc:
            errors.append({"line": number, "message": exc.message, "param": exc.param})
        if len(batch) >= batch_size:
            yield batch, errors, number
            batch, errors = [], []
    if batch or errors:
        yield batch, errors, max(number, start)


def follow_lines(path: str, poll_s: float = 0.5, stop: threading.Event | None = None) -> Iterator[str | None]:
    """The lines of a growing file (`tail -f`) until `stop` is set; None each time it waits for more."""
    with open(path) as f:
        pending = ""
        while stop is None or not stop.is_set():
            chunk = f.readline()
            if not chunk:
                yield None
                time.sleep(poll_s)
                continue
            pending += chunk
            if pending.endswith("\n"):
                yield pending
                pending = ""
