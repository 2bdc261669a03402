"""ingest/process.py: one message -> readings and at most one rejection, never nothing."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from ingest.model import FLAG_RECEIVE_TIME, RawMessage
from ingest.process import Processor
from ingest.settings import IngestSettings, Settings, SourceSettings

NOW = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)


def processor(**ingest: object) -> Processor:
    settings = Settings(
        ingest=IngestSettings(**ingest),  # type: ignore[arg-type]
        sources=[
            SourceSettings(name="aq", topic="city/{district}/{device}/up", format="native", device_prefix="hn-"),
            SourceSettings(name="senml", topic="senml/{device}", format="senml"),
        ],
    )
    return Processor.from_settings(settings)


def msg(topic: str, payload: object) -> RawMessage:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return RawMessage(topic, raw, NOW)


def test_readings_get_the_source_prefix_and_the_capture_device() -> None:
    out = processor().process(msg("city/hk/aq-1/up", {"time": "2026-11-25T09:00:00+07:00", "readings": {"pm25": 7}}))
    assert out.source == "aq"
    assert out.rejection is None
    assert [(r.device, r.metric, r.value, r.time) for r in out.readings] == [
        ("hn-aq-1", "pm25", 7.0, datetime(2026, 11, 25, 2, 0, tzinfo=UTC))
    ]


def test_a_payload_without_time_gets_the_receive_time_and_its_flag() -> None:
    out = processor().process(msg("city/hk/aq-1/up", {"readings": {"pm25": 7}}))
    assert out.readings[0].time == NOW
    assert out.readings[0].flags & FLAG_RECEIVE_TIME


def test_too_large_payloads_are_rejected_with_their_first_bytes_kept() -> None:
    p = processor(max_message_bytes=100)
    out = p.process(msg("city/hk/aq-1/up", b"x" * 1000))
    assert out.readings == []
    assert out.rejection is not None
    assert out.rejection.reason == "too_large"
    assert "1000 bytes" in out.rejection.detail
    assert out.message.payload == b"x" * 100


def test_a_topic_no_source_matches_is_a_rejection_not_a_drop() -> None:
    out = processor().process(msg("elsewhere/x", {"readings": {"a": 1}}))
    assert out.rejection is not None
    assert out.rejection.reason == "no_source"


def test_decode_errors_carry_the_prefixed_topic_device() -> None:
    out = processor().process(msg("city/hk/aq-1/up", b"{not json"))
    assert out.rejection is not None
    assert (out.rejection.reason, out.rejection.device) == ("malformed", "hn-aq-1")


def test_bad_readings_are_summarised_in_one_rejection_and_good_ones_kept() -> None:
    payload = {
        "time": "1970-01-01T00:00:00Z",
        "readings": [
            {"metric": "pm25", "value": 5, "time": "2026-11-25T02:00:00Z"},
            {"metric": "pm10", "value": 9},
            {"metric": "no2", "value": "high"},
        ],
    }
    out = processor().process(msg("city/hk/aq-1/up", payload))
    assert [r.metric for r in out.readings] == ["pm25"]
    assert out.rejection is not None
    assert "2 readings skipped" in out.rejection.detail
    assert {p.reason for p in out.problems} == {"bad_time", "wrong_type"}


def test_nan_from_a_payload_is_rejected_as_not_finite() -> None:
    out = processor().process(msg("senml/rain-1", b'[{"n": "rain", "v": NaN, "t": 1795000000}]'))
    assert out.readings == []
    assert out.rejection is not None
    assert out.rejection.reason == "not_finite"


def test_a_decoder_bug_becomes_a_rejection_not_a_crash() -> None:
    from ingest.decoders.base import DecodeContext, Decoded
    from ingest.process import SourceRuntime
    from ingest.routing import compile_template

    def broken(payload: bytes, ctx: DecodeContext) -> Decoded:
        raise KeyError("surprise")

    base = processor()
    src = SourceSettings(name="broken", topic="b/{device}", format="native")
    p = Processor([SourceRuntime(src, compile_template(src.topic, src.name), broken, None)], base.limits, 1000)
    out = p.process(msg("b/dev-1", {"readings": {"a": 1}}))
    assert out.readings == []
    assert out.rejection is not None
    assert out.rejection.reason == "decoder_error"
    assert "KeyError" in out.rejection.detail
    assert out.rejection.device == "dev-1"
