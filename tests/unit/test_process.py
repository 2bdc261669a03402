"""ingest/process.py: one message -> readings and at most one rejection, never nothing."""

from __future__ import annotations

import json
from datetime import UTC, datetime

from ingest.decoders.base import DecodeContext, Decoded
from ingest.model import FLAG_RECEIVE_TIME, RawMessage
from ingest.process import Processor, SourceRuntime
from ingest.routing import compile_template
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


def test_a_message_with_more_readings_than_allowed_is_rejected_whole() -> None:
    p = processor(max_readings_per_message=3)
    ok = p.process(msg("city/hk/aq-1/up", {"readings": {f"m{i}": i for i in range(3)}}))
    assert len(ok.readings) == 3
    out = p.process(msg("city/hk/aq-1/up", {"readings": {f"m{i}": i for i in range(4)}}))
    assert out.readings == []
    assert out.rejection is not None
    assert out.rejection.reason == "too_many_readings"
    assert "ingest.max_readings_per_message = 3" in out.rejection.detail
    assert out.rejection.device == "hn-aq-1"


def test_json_nested_deeper_than_allowed_is_rejected_before_parsing() -> None:
    p = processor(max_json_depth=8, max_message_bytes=1 << 20)
    out = p.process(msg("senml/aq-1", b"[" * 50_000 + b"]" * 50_000))
    assert out.rejection is not None
    assert (out.rejection.reason, out.readings) == ("too_deep", [])
    assert "50000 levels" in out.rejection.detail
    shallow = p.process(msg("senml/aq-1", [{"n": "t", "v": 1, "x": [[[[1]]]]}]))
    assert shallow.rejection is None
    # Brackets inside strings are text, not nesting.
    text = p.process(msg("senml/aq-1", [{"n": "t", "vs": "[" * 100}]))
    assert text.rejection is None
    assert text.readings[0].value == "[" * 100


def test_a_gateway_source_writes_only_the_devices_it_is_allowed() -> None:
    settings = Settings(sources=[SourceSettings(name="gw", topic="gw/{gateway}", format="native",
                                                allow_devices=["hn-aq-*", "hn-flood-?"])])
    p = Processor.from_settings(settings)
    payload = [
        {"device": "hn-aq-7", "readings": {"pm25": 1}},
        {"device": "hn-flood-1", "readings": {"level": 2}},
        {"device": "city-hall-main-meter", "readings": {"kwh": 3, "w": 4}},
        {"device": "\udc80x", "readings": {"pm25": 5}},
    ]
    out = p.process(RawMessage("gw/g1", json.dumps(payload).encode(), NOW))
    assert [r.device for r in out.readings] == ["hn-aq-7", "hn-flood-1"]
    assert [(q.reason, q.device) for q in out.problems] == [("bad_device", "city-hall-main-meter"),
                                                            ("bad_device", "\\udc80x")]
    assert "2 reading(s)" in out.problems[0].detail
    assert "allow_devices" in out.problems[0].detail


def test_unstorable_names_from_a_payload_are_rejected_with_a_reason() -> None:
    p = processor()
    cases = {
        b'{"device": "aq-1", "readings": {"\\udc80": 1}}': "bad_metric",
        b'{"device": "aq-1", "readings": {"pm\\u000025": 1}}': "bad_metric",
        b'{"device": "aq-1", "readings": {"status": {"text": "\\ud800"}}}': "bad_text",
        b'{"device": "aq-1", "readings": {"t": {"value": 1, "unit": "\\udfff"}}}': "bad_text",
        b'{"device": "aq-1", "readings": {"t": 1e400}}': "not_finite",
    }
    for payload, reason in cases.items():
        out = p.process(msg("city/hk/aq-1/up", payload))
        assert out.readings == [], payload
        assert out.rejection is not None
        assert out.rejection.reason == reason, (payload, out.rejection.detail)
        out.rejection.detail.encode("utf-8")  # the detail itself is storable


def test_captures_other_than_device_and_metric_are_attributes_of_the_message() -> None:
    out = processor().process(msg("city/hoan-kiem/aq-1/up", {"readings": {"pm25": 7}}))
    assert out.attributes == {"district": "hoan-kiem"}


def test_the_mapping_applies_to_every_format_after_decoding() -> None:
    settings = Settings(sources=[SourceSettings(
        name="aq", topic="city/{device}/up", format="native", rename={"pm25": "pm2_5"},
        metrics={"t_dC": {"scale": 0.1, "unit": "degC", "rename": "temperature"}}, ignore=["debug.*"])])
    out = Processor.from_settings(settings).process(
        msg("city/aq-1/up", {"readings": {"pm25": 7, "t_dC": 215, "debug.heap": 3}}))
    assert [(r.metric, r.value, r.unit) for r in out.readings] == [
        ("pm2_5", 7.0, "ug/m3"), ("temperature", 21.5, "degC")]  # bound: the quantity's unit
    assert out.ignored == 1
    assert out.rejection is None


def test_a_message_whose_leaves_are_all_ignored_is_skipped_not_rejected() -> None:
    settings = Settings(sources=[SourceSettings(name="aq", topic="city/{device}/up", format="native",
                                                ignore=["*"])])
    out = Processor.from_settings(settings).process(msg("city/aq-1/up", {"readings": {"a": 1, "b": 2}}))
    assert (out.readings, out.rejection, out.skipped, out.ignored) == ([], None, "only_ignored", 2)


def test_a_decoder_that_skips_by_design_leaves_no_rejection() -> None:
    src = SourceSettings(name="x", topic="x/{device}", format="native")

    def join_event(payload: bytes, ctx: DecodeContext) -> Decoded:
        return Decoded(readings=[], skipped="lorawan_join")

    base = processor()
    p = Processor([SourceRuntime(src, compile_template(src.topic, src.name), join_event, None)], base.limits, 1000)
    out = p.process(msg("x/d", b"{}"))
    assert (out.rejection, out.skipped) == (None, "lorawan_join")


def test_decode_without_config_takes_the_whole_topic_as_device_only_when_the_payload_names_none() -> None:
    p = Processor.from_settings(Settings(), override_format="native")
    named = p.process(msg("a/b/c", {"device": "dev-9", "readings": {"x": 1}}))
    unnamed = p.process(msg("a/b/c", {"readings": {"x": 1}}))
    assert [r.device for r in named.readings] == ["dev-9"]
    assert [r.device for r in unnamed.readings] == ["a/b/c"]
    given = Processor.from_settings(Settings(), override_format="native", template="a/{device}/c")
    assert [r.device for r in given.process(msg("a/b/c", {"readings": {"x": 1}})).readings] == ["b"]


def test_the_value_format_names_the_metric_from_the_levels_after_the_captured_device() -> None:
    # A literal level before the device that spells it is not the device: the template says which is.
    settings = Settings(sources=[SourceSettings(name="shelly", topic="shellies/{device}/#", format="value")])
    out = Processor.from_settings(settings).process(msg("shellies/shellies/relay/0/power", b"12.5"))
    assert [(r.device, r.metric, r.value) for r in out.readings] == [("shellies", "relay.0.power", 12.5)]


def test_a_string_where_the_mapping_declares_a_number_is_wrong_type_in_every_format() -> None:
    metrics = {"temp": {"unit": "degC"}, "m.temp": {"unit": "degC"}}
    settings = Settings(sources=[
        SourceSettings(name="json", topic="j/{device}", format="json", metrics=metrics),
        SourceSettings(name="line", topic="l/{device}", format="line", metrics=metrics),
        SourceSettings(name="ttn", topic="v3/{app}/devices/{device}/up", format="lorawan", metrics=metrics),
    ])
    p = Processor.from_settings(settings)
    uplink = {"end_device_ids": {"device_id": "d1"}, "received_at": "2026-11-25T02:59:00Z",
              "uplink_message": {"decoded_payload": {"temp": "err", "hum": 50}}}
    outcomes = [p.process(msg("j/d1", {"temp": "err", "hum": 50, "note": "text"})),
                p.process(msg("l/d1", b'm temp="err",hum=50')),
                p.process(msg("v3/a/devices/d1/up", uplink))]
    for out in outcomes:
        assert out.rejection is not None, out
        assert out.rejection.reason == "wrong_type", out
        assert "'err' is not a number" in out.rejection.detail
    # json and lorawan keep the other leaves; in line protocol the line is the unit of rejection.
    assert [[r.metric for r in o.readings] for o in outcomes] == [["hum"], [], ["hum"]]
    assert outcomes[0].ignored == 1  # "note": undeclared text is still not a reading
