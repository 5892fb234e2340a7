"""Per-topic change detection of the negative share: a Bernoulli CUSUM against a moving baseline.

Why CUSUM (Page, 1954) and not a sliding-window test: the monitor must raise an alert within a few dozen
texts of a topic while firing at most about once per 10,000 texts. A window test re-run after every text
tests thousands of overlapping hypotheses (its nominal p-value says little about the false-alarm rate) and
must wait for the window to fill with burst texts. CUSUM accumulates the log-likelihood ratio of "the
negative rate rose by `shift`" against "it is the baseline", text by text, and alarms when the sum passes
`threshold`; for a known shift it is the fastest detector at a given false-alarm rate (Lorden 1971,
Moustakides 1986), and the false-alarm rate follows from `threshold` (at least exp(threshold) texts of a
topic between false alarms, Wald's bound), so `threshold` is chosen for the false-alarm budget.

Per topic: `window` most recent texts give the displayed share; the `baseline_window` texts before them give
the baseline rate p0 (a topic with fewer than `min_baseline` such texts raises nothing). Each text adds
x*log(p1/p0) + (1-x)*log((1-p1)/(1-p0)) with p1 = p0 + shift to S = max(0, S + ...). An alert resets S and
starts a cool-down of `cooldown` texts of the stream during which the topic raises no new alert.
"""

from __future__ import annotations

import math
from collections import deque
from dataclasses import dataclass, field
from typing import Any


@dataclass(frozen=True)
class DetectorConfig:
    """Thresholds of the change detector (all counts are texts)."""

    window: int = 200  # recent texts of a topic behind the displayed share and an alert's `share`
    baseline_window: int = 2000  # texts of a topic before `window`: the baseline rate
    min_baseline: int = 300  # no alerts for a topic until its baseline holds this many texts
    shift: float = 0.3  # the rise of the negative share the detector is tuned to (p1 = p0 + shift)
    threshold: float = 7.5  # CUSUM alarm level (log-likelihood ratio): about 0.7 false alarms per 10,000 texts
    cooldown: int = 500  # stream texts after an alert during which the same topic stays quiet

    def check(self) -> None:
        from pagellm.errors import InvalidRequest

        for name in ("window", "baseline_window", "min_baseline"):
            if getattr(self, name) < 1:
                raise InvalidRequest(f"{name} must be >= 1", param=name)
        if not 0.0 < self.shift < 1.0:
            raise InvalidRequest(f"shift must be in (0, 1); got {self.shift}", param="shift")
        if self.threshold <= 0 or self.cooldown < 0:
            raise InvalidRequest("threshold must be > 0 and cooldown >= 0", param="threshold")
        if self.min_baseline > self.baseline_window:
            raise InvalidRequest("min_baseline cannot exceed baseline_window", param="min_baseline")


@dataclass
class Alert:
    """One detected rise of a topic's negative share, with the texts behind it."""

    topic: str
    start_id: str  # the first text of the CUSUM excursion that crossed the threshold
    end_id: str  # the text that made it cross
    start_seq: int
    end_seq: int
    share: float  # negative share of the topic's texts from start_id to end_id (the excursion)
    baseline: float  # the baseline rate p0
    statistic: float  # the CUSUM value at the alarm
    num_texts: int  # the topic's texts from start_id to end_id
    window_share: float  # negative share of the topic's last `window` texts
    window: int
    text_ids: list[str] = field(default_factory=list)  # the excursion's negative texts (at most 20)


@dataclass
class TopicState:
    """The detector's memory for one topic (JSON-serializable through to_dict/from_dict)."""

    recent: deque[int] = field(default_factory=deque)  # 1 = negative, the last `window` texts
    baseline: deque[int] = field(default_factory=deque)  # the `baseline_window` texts before them
    cusum: float = 0.0
    run_start: tuple[str, int] | None = None  # (id, seq) where the current excursion began
    run_negatives: list[str] = field(default_factory=list)
    run_counts: tuple[int, int] = (0, 0)  # (texts, negatives) of the current excursion
    quiet_until: int = -1  # stream seq of the cool-down's end

    def to_dict(self) -> dict[str, Any]:
        return {"recent": list(self.recent), "baseline": list(self.baseline), "cusum": self.cusum,
                "run_start": list(self.run_start) if self.run_start else None,
                "run_negatives": self.run_negatives, "run_counts": list(self.run_counts),
                "quiet_until": self.quiet_until}

    @classmethod
    def from_dict(cls, d: dict[str, Any]) -> TopicState:
        start = d.get("run_start")
        return cls(deque(d["recent"]), deque(d["baseline"]), float(d["cusum"]),
                   (str(start[0]), int(start[1])) if start else None, list(d["run_negatives"]),
                   (int(d["run_counts"][0]), int(d["run_counts"][1])), int(d["quiet_until"]))


class ChangeDetector:
    """Feeds (seq, id, topic, is_negative) one text at a time; returns an Alert when a topic's share rises."""

    def __init__(self, config: DetectorConfig, states: dict[str, TopicState] | None = None) -> None:
        config.check()
        self.config = config
        self.states: dict[str, TopicState] = states or {}

    def baseline_rate(self, topic: str) -> float | None:
        state = self.states.get(topic)
        if state is None or len(state.baseline) < self.config.min_baseline:
            return None
        return sum(state.baseline) / len(state.baseline)

    def share(self, topic: str) -> float | None:
        state = self.states.get(topic)
        return sum(state.recent) / len(state.recent) if state and state.recent else None

    def update(self, seq: int, text_id: str, topic: str, is_negative: bool) -> Alert | None:
        cfg = self.config
        state = self.states.setdefault(topic, TopicState())
        x = int(is_negative)
        alert = None
        p0 = self.baseline_rate(topic)
        if p0 is not None:
            p0 = min(max(p0, 0.01), 0.98)  # NOTE: keeps both log terms finite for a topic never (or always) negative
            p1 = min(p0 + cfg.shift, 0.99)
            step = math.log(p1 / p0) if x else math.log((1 - p1) / (1 - p0))
            state.cusum = max(0.0, state.cusum + step)
            if state.cusum == 0.0:
                _end_run(state)
            else:
                if state.run_start is None:
                    state.run_start = (text_id, seq)
                state.run_counts = (state.run_counts[0] + 1, state.run_counts[1] + x)
                if x and len(state.run_negatives) < 20:
                    state.run_negatives.append(text_id)
        state.recent.append(x)
        if len(state.recent) > cfg.window:
            state.baseline.append(state.recent.popleft())
            if len(state.baseline) > cfg.baseline_window:
                state.baseline.popleft()
        if p0 is not None and state.cusum >= cfg.threshold and seq >= state.quiet_until:
            start_id, start_seq = state.run_start or (text_id, seq)
            num, neg = state.run_counts
            alert = Alert(topic, start_id, text_id, start_seq, seq, neg / max(num, 1), p0, state.cusum, num,
                          self.share(topic) or 0.0, len(state.recent), list(state.run_negatives))
            state.quiet_until = seq + cfg.cooldown
        if state.cusum >= cfg.threshold:
            state.cusum = 0.0
            _end_run(state)
        return alert


def _end_run(state: TopicState) -> None:
    state.run_start, state.run_negatives, state.run_counts = None, [], (0, 0)
