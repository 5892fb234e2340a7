"""The change detector on replayed news3 streams: detection delay of an injected burst, false alarms of the
burst-free stream (issue 17 targets: delay under 150 texts, at most 1 false alarm per 10,000 texts)."""

from __future__ import annotations

import pytest

from pagellm.apps.monitor.detector import ChangeDetector, DetectorConfig, TopicState
from pagellm.errors import InvalidRequest
from tests.apps.monitor.conftest import replay_stream


def _alerts(stream: list[dict], config: DetectorConfig) -> list:
    detector = ChangeDetector(config)
    out = []
    for seq, item in enumerate(stream):
        alert = detector.update(seq, item["id"], item["topic"], item["label"] == "negative")
        if alert is not None:
            out.append(alert)
    return out


def test_burst_is_detected_within_150_texts_of_the_topic():
    """Delay in the burst topic's own texts (the target) and in stream texts (5 topics: about 5x as many)."""
    topic_delays, stream_delays = [], []
    for seed in range(20):
        stream = replay_stream(6000, seed, burst_topic="fraud", burst_start=4000)
        alerts = _alerts(stream, DetectorConfig())
        hits = [a for a in alerts if a.topic == "fraud" and a.end_seq >= 4000]
        assert hits, f"seed {seed}: the burst was missed"
        assert hits[0].share > hits[0].baseline + 0.1 and hits[0].text_ids
        stream_delays.append(hits[0].end_seq - 4000)
        topic_delays.append(sum(s["topic"] == "fraud" for s in stream[4000:hits[0].end_seq + 1]))
    topic_delays.sort()
    stream_delays.sort()
    print(f"detection delay, 20 streams: topic texts {topic_delays}, stream texts {stream_delays}")
    assert topic_delays[-1] < 150 and topic_delays[len(topic_delays) // 2] < 60


def test_false_alarms_at_most_one_per_10000_texts():
    num_texts = 0
    num_alarms = 0
    for seed in range(8):
        stream = replay_stream(20_000, 100 + seed)
        num_alarms += len(_alerts(stream, DetectorConfig()))
        num_texts += len(stream)
    rate = 10_000 * num_alarms / num_texts
    print(f"false alarms: {num_alarms} in {num_texts} burst-free texts = {rate:.2f} per 10,000")
    assert rate <= 1.0


def test_cooldown_silences_a_topic_after_an_alert():
    stream = replay_stream(8000, 3, burst_topic="rates", burst_start=4000, burst_len=700)
    loud = [a for a in _alerts(stream, DetectorConfig(cooldown=0)) if a.topic == "rates"]
    quiet = [a for a in _alerts(stream, DetectorConfig(cooldown=5000)) if a.topic == "rates"]
    assert len(loud) > 1 and len(quiet) == 1


def test_state_round_trips_through_json():
    detector = ChangeDetector(DetectorConfig())
    for seq, item in enumerate(replay_stream(1500, 0)):
        detector.update(seq, item["id"], item["topic"], item["label"] == "negative")
    copy = ChangeDetector(DetectorConfig(), {t: TopicState.from_dict(s.to_dict()) for t, s in detector.states.items()})
    assert {t: s.to_dict() for t, s in copy.states.items()} == {t: s.to_dict() for t, s in detector.states.items()}


@pytest.mark.parametrize("bad", [dict(window=0), dict(shift=1.5), dict(threshold=0), dict(min_baseline=5000)])
def test_bad_detector_settings_are_refused(bad):
    with pytest.raises(InvalidRequest):
        ChangeDetector(DetectorConfig(**bad))
