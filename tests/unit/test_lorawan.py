"""The lorawan decoder (ingest/decoders/lorawan.py): envelopes, skips, times, metrics, options.

Payloads are built here from the shapes of the published examples that the golden cases in
tests/decoders/cases/lorawan/ hold verbatim; each test changes the one thing it is about.
"""

from __future__ import annotations

import copy
import json
from datetime import UTC, datetime
from typing import Any

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from ingest.decoders import OPTIONS, REGISTRY
from ingest.decoders import decode as decode_with_mapping
from ingest.decoders.base import DecodeContext, Decoded
from ingest.decoders.lorawan import SKIP_NO_DECODED_PAYLOAD, SKIP_NOT_AN_UPLINK, Options, decode
from ingest.decoders.mapping import MetricRule, SourceMapping
from ingest.errors import DecodeError
from ingest.model import FLAG_RECEIVE_TIME, Reading

RECEIVED = datetime(2026, 11, 25, 3, 0, 5, tzinfo=UTC)
WHEN = datetime(2020, 2, 12, 15, 15, 46, 14773, tzinfo=UTC)

# The Things Stack "Data Formats" uplink example, trimmed to the fields the decoder reads.
TTS: dict[str, Any] = {
    "end_device_ids": {"device_id": "dev1", "application_ids": {"application_id": "app1"},
                       "dev_eui": "0004A30B001C0530"},
    "received_at": "2020-02-12T15:15:46.014773143Z",
    "uplink_message": {
        "f_cnt": 1,
        "frm_payload": "gkHe",
        "decoded_payload": {"temperature": 1.0, "luminosity": 0.64},
        "rx_metadata": [{"gateway_ids": {"gateway_id": "gtw1"}, "rssi": -35, "channel_rssi": -35, "snr": 5}],
        "received_at": "2020-02-12T15:15:45.789585559Z",
    },
}
# ChirpStack v4 "up" example with an object.
CHIRPSTACK: dict[str, Any] = {
    "deduplicationId": "3ac7e3c4-4401-4b8d-9386-a5c902f9202d",
    "time": "2022-07-18T09:34:15.775023242+00:00",
    "deviceInfo": {"deviceName": "Test device", "devEui": "0101010101010101"},
    "fPort": 1,
    "data": "qg==",
    "object": {"temperature": 21.5},
    "rxInfo": [{"gatewayId": "0016c001f153a14c", "rssi": -36, "snr": 10.5}],
}
CS_WHEN = datetime(2022, 7, 18, 9, 34, 15, 775023, tzinfo=UTC)


def ctx(topic_device: str | None = None, mapping: SourceMapping | None = None, max_readings: int = 2000,
        max_depth: int = 32, **options: Any) -> DecodeContext:
    """A context; ``topic_device`` is the topic's {device} capture, ``options`` the format's options."""
    return DecodeContext(topic="t", received_at=RECEIVED, device=topic_device, options=options,
                         mapping=mapping or SourceMapping(), max_readings=max_readings, max_depth=max_depth)


def tts(**changes: Any) -> dict[str, Any]:
    """The TTS example with the uplink_message fields in ``changes`` replaced (None deletes)."""
    message = copy.deepcopy(TTS)
    for key, value in changes.items():
        if value is None:
            message["uplink_message"].pop(key, None)
        else:
            message["uplink_message"][key] = value
    return message


def run(message: object, context: DecodeContext | None = None) -> Decoded:
    return decode(json.dumps(message).encode(), context or ctx())


def refused(message: object, context: DecodeContext | None = None) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        run(message, context)
    return info.value


def values(decoded: Decoded) -> list[tuple[str, object]]:
    return [(r.metric, r.value) for r in decoded.readings]


# --- options -------------------------------------------------------------------------------------------------


def test_options_defaults_and_registry() -> None:
    assert OPTIONS["lorawan"] is Options
    assert Options().model_dump() == {"device": "auto", "radio": False}


@pytest.mark.parametrize("bad", [{"device": "name"}, {"radios": True}, {"radio": "sometimes"}])
def test_options_refuse_unknown_names_and_values(bad: dict[str, Any]) -> None:
    with pytest.raises(ValidationError):
        Options.model_validate(bad)


def test_options_left_out_of_the_context_take_their_defaults() -> None:
    """The property tests build contexts with options = {}: that is the defaults, not an error."""
    decoded = decode(json.dumps(TTS).encode(), DecodeContext(topic="t", received_at=RECEIVED))
    assert values(decoded) == [("temperature", 1.0), ("luminosity", 0.64)]


def test_invalid_options_in_a_context_are_a_decode_error() -> None:
    error = refused(TTS, ctx("dev1", radio="sometimes"))
    assert error.reason == "unsupported"


# --- envelopes and what is skipped ---------------------------------------------------------------------------


def test_tts_uplink_readings_device_time_and_no_units() -> None:
    decoded = run(TTS, ctx("dev1"))
    assert decoded.readings == [Reading("dev1", "temperature", WHEN, 1.0), Reading("dev1", "luminosity", WHEN, 0.64)]
    assert decoded.skipped is None


def test_chirpstack_up_readings_device_time() -> None:
    decoded = run(CHIRPSTACK, ctx("0101010101010101"))
    assert decoded.readings == [Reading("0101010101010101", "temperature", CS_WHEN, 21.5)]


@pytest.mark.parametrize("kind", ["join_accept", "downlink_ack", "downlink_nack", "downlink_sent", "downlink_failed",
                                  "downlink_queued", "service_data", "location_solved", "uplink_normalized"])
def test_tts_messages_other_than_uplinks_are_skipped(kind: str) -> None:
    message = {"end_device_ids": TTS["end_device_ids"], "received_at": TTS["received_at"], kind: {"f_port": 1}}
    assert run(message) == Decoded(readings=[], skipped=SKIP_NOT_AN_UPLINK)


@pytest.mark.parametrize("extra", [{"devAddr": "00189440"}, {"margin": 10, "batteryLevel": 88.3},
                                   {"queueItemId": "1bbc", "acknowledged": True, "fCntDown": 3},
                                   {"downlinkId": 1, "gatewayId": "0016c001f153a14c", "txInfo": {}},
                                   {"level": "ERROR", "code": "UPLINK_CODEC", "description": "x"},
                                   {"location": {"latitude": 1.0}},
                                   {"integrationName": "loracloud", "eventType": "x", "object": {"a": 1}}],
                         ids=["join", "status", "ack", "txack", "log", "location", "integration"])
def test_chirpstack_events_other_than_up_are_skipped(extra: dict[str, Any]) -> None:
    message = {"time": CHIRPSTACK["time"], "deviceInfo": CHIRPSTACK["deviceInfo"], **extra}
    assert run(message) == Decoded(readings=[], skipped=SKIP_NOT_AN_UPLINK)


@pytest.mark.parametrize("decoded_payload", [None, {}, "absent"])
def test_tts_uplink_without_decoded_payload_is_skipped(decoded_payload: object) -> None:
    message = tts(decoded_payload=None)
    if decoded_payload != "absent":
        message["uplink_message"]["decoded_payload"] = decoded_payload
    assert run(message) == Decoded(readings=[], skipped=SKIP_NO_DECODED_PAYLOAD)


def test_chirpstack_up_without_object_is_skipped() -> None:
    message = {k: v for k, v in CHIRPSTACK.items() if k != "object"}
    assert run(message) == Decoded(readings=[], skipped=SKIP_NO_DECODED_PAYLOAD)


def test_a_skipped_message_is_not_checked_for_device_or_time() -> None:
    """It stores nothing, so nothing of it can speak for another device."""
    join = {"end_device_ids": {"device_id": "dev9"}, "join_accept": {"session_key_id": "AWiZ"}}
    assert run(join, ctx("dev1")).skipped == SKIP_NOT_AN_UPLINK


@pytest.mark.parametrize(("message", "reason", "detail"), [
    ([TTS], "schema", "an array"),
    ({"temperature": 21.5}, "schema", "found neither"),
    ({"applicationID": "123", "devEUI": "AgICAgICAgI=", "object": {"t": 1}}, "schema", "ChirpStack v3"),
    ({"app_id": "a", "dev_id": "d", "payload_fields": {"t": 1}}, "schema", "The Things Network v2"),
    ({"end_device_ids": "dev1", "uplink_message": {}}, "schema", "end_device_ids"),
    (tts() | {"uplink_message": [1]}, "schema", "uplink_message: expected an object"),
    (tts(decoded_payload=[1.0, 0.64]), "schema", "uplink_message.decoded_payload"),
    ({"deviceInfo": ["x"], "fCnt": 1}, "schema", "deviceInfo"),
    (CHIRPSTACK | {"object": "21.5"}, "schema", "object: expected an object"),
])
def test_wrong_shapes_are_refused(message: object, reason: str, detail: str) -> None:
    error = refused(message)
    assert (error.reason, detail in error.detail) == (reason, True), error.detail


def test_not_json_is_malformed() -> None:
    with pytest.raises(DecodeError) as info:
        decode(b'{"end_device_ids": {', ctx())
    assert info.value.reason == "malformed"


# --- device ---------------------------------------------------------------------------------------------------


def test_device_mismatch_names_the_field() -> None:
    error = refused(TTS, ctx("dev2"))
    assert error.reason == "device_mismatch"
    assert "end_device_ids.device_id" in error.detail


def test_chirpstack_dev_eui_is_compared_verbatim() -> None:
    """ChirpStack builds its topic from deviceInfo.devEui itself, so the two never differ in case."""
    message = copy.deepcopy(CHIRPSTACK)
    message["deviceInfo"]["devEui"] = "0016c001f000175a"
    assert refused(message, ctx("0016C001F000175A")).reason == "device_mismatch"
    assert {r.device for r in run(message, ctx("0016c001f000175a")).readings} == {"0016c001f000175a"}


def test_without_a_topic_device_the_envelope_names_it() -> None:
    assert {r.device for r in run(TTS).readings} == {"dev1"}


def test_dev_eui_option() -> None:
    assert {r.device for r in run(TTS, ctx(device="dev_eui")).readings} == {"0004A30B001C0530"}
    assert {r.device for r in run(CHIRPSTACK, ctx(device="dev_eui")).readings} == {"0101010101010101"}


def test_a_missing_device_field_is_no_device_even_with_a_topic_device() -> None:
    """No fallback to the topic's {device}: with device = dev_eui it would be another kind of id."""
    message = copy.deepcopy(TTS)
    del message["end_device_ids"]["dev_eui"]
    error = refused(message, ctx("dev1", device="dev_eui"))
    assert (error.reason, "end_device_ids.dev_eui" in error.detail) == ("no_device", True)
    cs = copy.deepcopy(CHIRPSTACK)
    cs["deviceInfo"]["devEui"] = ""
    assert refused(cs).reason == "no_device"


def test_a_device_id_that_is_not_a_string_is_schema() -> None:
    message = copy.deepcopy(TTS)
    message["end_device_ids"]["device_id"] = 7
    assert refused(message).reason == "schema"


# --- time -----------------------------------------------------------------------------------------------------


@pytest.mark.parametrize(("raw", "expected"), [
    ("2020-11-12T13:44:55.123456789Z", datetime(2020, 11, 12, 13, 44, 55, 123456, tzinfo=UTC)),
    ("2022-07-18T09:34:15.775023242+00:00", CS_WHEN),
    ("2022-07-18T11:34:15.775023999+02:00", CS_WHEN),  # truncated, never rounded into the next microsecond
    ("2020-02-12T15:15:46Z", datetime(2020, 2, 12, 15, 15, 46, tzinfo=UTC)),
    ("2020-02-12t15:15:46.5z", datetime(2020, 2, 12, 15, 15, 46, 500000, tzinfo=UTC)),
])
def test_rfc3339_times_with_up_to_nanoseconds(raw: str, expected: datetime) -> None:
    decoded = run(CHIRPSTACK | {"time": raw})
    assert [r.time for r in decoded.readings] == [expected]
    assert decoded.readings[0].time.tzinfo is UTC
    assert decoded.readings[0].flags == 0


def test_tts_time_is_the_envelope_received_at_not_the_network_servers() -> None:
    message = tts(received_at="0001-01-01T00:00:00Z")  # as in simulated uplinks
    assert {r.time for r in run(message).readings} == {WHEN}


@pytest.mark.parametrize(("message", "detail"), [
    (TTS | {"received_at": 1581520546}, "received_at: expected an RFC 3339 time"),
    (TTS | {"received_at": "yesterday"}, "received_at"),
    (TTS | {"received_at": "2020-02-12T15:15:46"}, "received_at"),
    (TTS | {"received_at": "0001-01-01T00:00:00Z"}, "unset"),
])
def test_a_missing_or_unreadable_time_refuses_the_message(message: dict[str, Any], detail: str) -> None:
    error = refused(message)
    assert (error.reason, detail in error.detail) == ("bad_time", True), error.detail


# --- metrics --------------------------------------------------------------------------------------------------


def test_nested_objects_and_lists_name_metrics_by_path_in_document_order() -> None:
    payload = {"a": {"b": 1, "c": [2, {"d": True}]}, "e": [[3]], "f": 4}
    assert values(run(tts(decoded_payload=payload))) == [
        ("a.b", 1.0), ("a.c.0", 2.0), ("a.c.1.d", True), ("e.0.0", 3.0), ("f", 4.0)]


def test_keys_are_verbatim() -> None:
    payload = {"Battery Status": 1, "temp °C": 2, "1": 3, "a/b": 4}
    assert [m for m, _ in values(run(tts(decoded_payload=payload)))] == ["Battery Status", "temp °C", "1", "a/b"]


def test_nulls_and_empty_containers_are_ignored_and_counted() -> None:
    decoded = run(tts(decoded_payload={"a": None, "b": {}, "c": [], "d": 1}))
    assert (values(decoded), decoded.ignored) == ([("d", 1.0)], 3)


def test_only_ignored_leaves_is_not_a_skip_of_this_decoder() -> None:
    """The pipeline turns it into the only_ignored skip; the decoder just counts."""
    decoded = run(tts(decoded_payload={"a": None}))
    assert (decoded.readings, decoded.ignored, decoded.skipped) == ([], 1, None)


def test_string_leaves_go_through_the_mapping() -> None:
    payload = {"level": "18.83", "type": "parking status", "door": "OPEN", "mode": "eco"}
    decoded = run(tts(decoded_payload=payload))
    assert (values(decoded), decoded.ignored) == ([("level", 18.83)], 3)
    mapping = SourceMapping(rules=(("type", MetricRule(state=True)), ("door", MetricRule(value_map={"OPEN": True}))),
                            value_map={"eco": 1.0})
    decoded = run(tts(decoded_payload=payload), ctx(mapping=mapping))
    assert (values(decoded), decoded.ignored) == (
        [("level", 18.83), ("type", "parking status"), ("door", True), ("mode", 1.0)], 0)


def test_mapping_ignore_is_applied_while_walking() -> None:
    mapping = SourceMapping(rules=(("gps.*", MetricRule(ignore=True)),))
    decoded = run(tts(decoded_payload={"gps": {"lat": 1, "lon": 2}, "t": 3}), ctx(mapping=mapping))
    assert (values(decoded), decoded.ignored) == ([("t", 3.0)], 2)


def test_the_source_mapping_renames_after_decoding() -> None:
    mapping = SourceMapping(rules=(("luminosity", MetricRule(rename="light", unit="%")),))
    decoded = decode_with_mapping(REGISTRY["lorawan"], json.dumps(TTS).encode(), ctx(mapping=mapping))
    assert [(r.metric, r.unit) for r in decoded.readings] == [("temperature", None), ("light", "%")]


def test_an_empty_key_is_a_bad_metric_problem_and_the_rest_is_kept() -> None:
    decoded = run(tts(decoded_payload={"": 1, "a": {"": 2}, "b": 3}))
    assert values(decoded) == [("a.", 2.0), ("b", 3.0)]
    assert [p.reason for p in decoded.problems] == ["bad_metric"]
    assert decoded.problems[0].device == "dev1"


def test_two_leaves_with_one_name_keep_the_first_and_report_the_second() -> None:
    decoded = run(tts(decoded_payload={"a.b": 1, "a": {"b": 2}}))
    assert values(decoded) == [("a.b", 1.0)]
    assert [p.reason for p in decoded.problems] == ["schema"]
    assert "'a.b'" in decoded.problems[0].detail


def test_numbers_are_floats_and_nan_passes_to_validation() -> None:
    decoded = decode(b'{"end_device_ids": {"device_id": "d"}, "received_at": "2020-02-12T15:15:46Z", '
                     b'"uplink_message": {"decoded_payload": {"n": 3, "x": NaN}}}', ctx())
    assert [type(r.value) for r in decoded.readings] == [float, float]


def test_too_many_leaves_are_refused_before_any_reading_is_built() -> None:
    payload = {f"m{i}": i for i in range(11)}
    assert refused(tts(decoded_payload=payload), ctx(max_readings=10)).reason == "too_many_readings"
    assert len(run(tts(decoded_payload=payload), ctx(max_readings=11)).readings) == 11
    # The two radio metrics count too.
    assert refused(tts(decoded_payload=payload), ctx(max_readings=12, radio=True)).reason == "too_many_readings"


def test_the_walk_does_not_recurse() -> None:
    """A decoded payload nested as deep as the configured limit allows is walked without RecursionError."""
    depth = 900
    nested: Any = 1
    for _ in range(depth):
        nested = {"k": nested}
    decoded = run(tts(decoded_payload=nested), ctx(max_depth=depth + 5))
    assert values(decoded) == [(".".join(["k"] * depth), 1.0)]


# --- radio ----------------------------------------------------------------------------------------------------


def radio(decoded: Decoded) -> list[tuple[str, object, str | None]]:
    return [(r.metric, r.value, r.unit) for r in decoded.readings if r.metric in ("rssi", "snr")]


def test_radio_is_off_by_default() -> None:
    assert radio(run(TTS)) == []


def test_radio_takes_the_best_gateway_and_its_own_snr() -> None:
    gateways = [{"rssi": -110, "snr": 9.0}, {"rssi": -70, "snr": -2.5}, {"rssi": -90, "snr": 12.0}]
    assert radio(run(CHIRPSTACK | {"rxInfo": gateways}, ctx(radio=True))) == [
        ("rssi", -70.0, "dBm"), ("snr", -2.5, "dB")]


def test_radio_ties_go_to_the_first_gateway() -> None:
    gateways = [{"rssi": -70, "snr": 1.0}, {"rssi": -70, "snr": 5.0}]
    assert radio(run(CHIRPSTACK | {"rxInfo": gateways}, ctx(radio=True))) == [("rssi", -70.0, "dBm"),
                                                                             ("snr", 1.0, "dB")]


def test_radio_tts_falls_back_to_channel_rssi() -> None:
    message = tts(rx_metadata=[{"channel_rssi": -80, "snr": 7.25}, {"snr": 20.0}])
    assert radio(run(message, ctx(radio=True))) == [("rssi", -80.0, "dBm"), ("snr", 7.25, "dB")]


def test_radio_without_snr_stores_rssi_only() -> None:
    """The Things Stack leaves out zero values, an SNR of 0 dB included: it is not guessed back."""
    assert radio(run(tts(rx_metadata=[{"rssi": -100}]), ctx(radio=True))) == [("rssi", -100.0, "dBm")]


@pytest.mark.parametrize("gateways", [None, [], [{"gateway_ids": {}}]])
def test_radio_without_rx_metadata_adds_nothing(gateways: object) -> None:
    decoded = run(tts(rx_metadata=gateways), ctx(radio=True))
    assert (radio(decoded), decoded.problems) == ([], [])


def test_radio_metadata_of_the_wrong_shape_is_a_problem_not_a_rejection() -> None:
    decoded = run(tts(rx_metadata={"rssi": -1}), ctx(radio=True))
    assert (values(decoded), [p.reason for p in decoded.problems]) == (
        [("temperature", 1.0), ("luminosity", 0.64)], ["schema"])
    decoded = run(tts(rx_metadata=["gw", {"rssi": "strong"}, {"rssi": -90, "snr": "x"}]), ctx(radio=True))
    assert radio(decoded) == [("rssi", -90.0, "dBm")]
    assert [p.reason for p in decoded.problems] == ["schema", "schema", "schema"]


def test_radio_does_not_overwrite_a_decoded_rssi() -> None:
    decoded = run(tts(decoded_payload={"rssi": -1, "t": 2}), ctx(radio=True))
    assert radio(decoded) == [("rssi", -1.0, None), ("snr", 5.0, "dB")]
    assert [p.reason for p in decoded.problems] == ["schema"]
    # A decoded "rssi" that is not a reading (a string without mapping) leaves the name to the radio's.
    decoded = run(tts(decoded_payload={"rssi": "good", "t": 2}), ctx(radio=True))
    assert (radio(decoded), decoded.problems, decoded.ignored) == ([("rssi", -35.0, "dBm"), ("snr", 5.0, "dB")], [], 1)


# --- never anything but DecodeError ---------------------------------------------------------------------------

leaf = st.one_of(st.none(), st.booleans(), st.floats(), st.integers(-(2**70), 2**70), st.text(max_size=8))
tree = st.recursive(leaf, lambda inner: st.one_of(st.lists(inner, max_size=3),
                                                  st.dictionaries(st.text(max_size=4), inner, max_size=3)),
                    max_leaves=12)
times = st.one_of(st.just("2020-02-12T15:15:46.014773143Z"), st.just("0001-01-01T00:00:00Z"), tree)
gateway = st.one_of(tree, st.fixed_dictionaries({}, optional={"rssi": tree, "channel_rssi": tree, "snr": tree}))
ids = st.one_of(st.just({"device_id": "dev1", "dev_eui": "AB"}), tree)
tts_like = st.fixed_dictionaries(
    {"end_device_ids": ids},
    optional={"received_at": times,
              "uplink_message": st.one_of(tree, st.fixed_dictionaries(
                  {}, optional={"decoded_payload": tree, "rx_metadata": st.one_of(tree, st.lists(gateway))}))})
chirpstack_like = st.fixed_dictionaries(
    {"deviceInfo": st.one_of(st.just({"devEui": "0101"}), tree)},
    optional={"time": times, "object": tree, "fCnt": tree, "rxInfo": st.one_of(tree, st.lists(gateway)),
              "integrationName": tree})


@settings(max_examples=300, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(message=st.one_of(tts_like, chirpstack_like), device=st.sampled_from([None, "dev1", "0101"]),
       options=st.fixed_dictionaries({}, optional={"radio": st.booleans(),
                                                   "device": st.sampled_from(["auto", "dev_eui"])}))
def test_lorawan_shaped_json_gives_decoded_or_decode_error(message: Any, device: str | None,
                                                            options: dict[str, Any]) -> None:
    try:
        decoded = decode(json.dumps(message).encode(), ctx(device, **options))
    except DecodeError as exc:
        error: DecodeError | None = exc
    else:
        error = None
    if error is not None:
        assert error.reason
        assert error.detail
        return
    assert decoded.skipped is None or decoded.readings == []
    for reading in decoded.readings:
        assert reading.metric
        assert isinstance(reading.device, str)
        assert reading.time.tzinfo is UTC
        assert isinstance(reading.value, float | bool | str)


@pytest.mark.parametrize("message", [
    {k: v for k, v in TTS.items() if k != "received_at"},
    {k: v for k, v in CHIRPSTACK.items() if k != "time"},
    CHIRPSTACK | {"time": None},
], ids=["tts", "chirpstack", "chirpstack-null"])
def test_an_uplink_without_a_time_gets_the_receive_time_flagged(message: dict[str, Any]) -> None:
    readings = run(message).readings
    assert readings
    assert {(r.time, r.flags) for r in readings} == {(RECEIVED, FLAG_RECEIVE_TIME)}
