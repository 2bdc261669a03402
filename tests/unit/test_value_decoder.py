"""The value format (ingest/decoders/value.py): one value per topic, read in the documented order."""

from __future__ import annotations

from datetime import UTC, datetime, timedelta, timezone
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from ingest.decoders import DecodeContext, Decoded, decode
from ingest.decoders.mapping import EMPTY, MetricRule, SourceMapping
from ingest.decoders.value import Options
from ingest.decoders.value import decode as decode_value
from ingest.errors import DecodeError
from ingest.model import FLAG_RECEIVE_TIME, Reading

RECEIVED = datetime(2026, 11, 25, 3, 0, 5, tzinfo=UTC)
ESPHOME = "attic-powerwall/sensor/inverter0_power_demand/state"


def ctx(
    topic: str = ESPHOME,
    device: str | None = "attic-powerwall",
    *,
    captures: dict[str, str] | None = None,
    options: dict[str, Any] | None = None,
    mapping: SourceMapping = EMPTY,
    received_at: datetime = RECEIVED,
) -> DecodeContext:
    caps = dict(captures or {})
    if device is not None:
        caps.setdefault("device", device)
    return DecodeContext(
        topic=topic,
        received_at=received_at,
        device=device,
        captures=caps,
        options=Options.model_validate(options or {}).model_dump(),
        mapping=mapping,
    )


def one(payload: bytes, context: DecodeContext | None = None) -> Reading:
    decoded = decode_value(payload, context or ctx())
    assert len(decoded.readings) == 1, decoded
    assert decoded.problems == []
    assert decoded.ignored == 0
    return decoded.readings[0]


def value_of(payload: bytes, context: DecodeContext | None = None) -> float | bool | str:
    return one(payload, context).value


def refused(payload: bytes, context: DecodeContext | None = None) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        decode_value(payload, context or ctx())
    return info.value


def states(*patterns: str, value_map: dict[str, float | bool] | None = None) -> SourceMapping:
    rules = tuple((p, MetricRule(state=True)) for p in patterns)
    return SourceMapping(rules=rules, value_map=value_map)


# -- numbers, booleans, words ---------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"0.105", 0.105),
        (b"190", 190.0),
        (b"-59", -59.0),
        (b"+4", 4.0),
        (b".5", 0.5),
        (b"1e3", 1000.0),
        (b"-2.5E-1", -0.25),
        (b"  21.5\r\n", 21.5),
        (b"0", 0.0),
    ],
)
def test_a_decimal_number_is_a_float(payload: bytes, expected: float) -> None:
    got = value_of(payload)
    assert type(got) is float
    assert got == expected


@pytest.mark.parametrize(
    ("payload", "expected"),
    [
        (b"true", True), (b"false", False), (b"TRUE", True), (b"False", False),
        (b"ON", True), (b"OFF", False), (b"on", True), (b"off", False), (b"On", True), (b" OFF\n", False),
    ],
)
def test_true_false_and_on_off_in_any_case_are_booleans(payload: bytes, expected: bool) -> None:
    assert value_of(payload) is expected


@pytest.mark.parametrize("payload", [b"nan", b"NaN", b"-nan", b"inf", b"-Infinity", b"Infinity", b"1e999"])
def test_nan_and_infinities_are_not_finite(payload: bytes) -> None:
    error = refused(payload)
    assert error.reason == "not_finite"
    assert "not a finite number" in error.detail


def test_nan_with_options_text_is_still_not_finite() -> None:
    # ESPHome's failed measurement: kept as text it would be a state in a numeric series.
    with pytest.raises(DecodeError) as info:
        value_of(b"nan", ctx(options={"text": True}))
    assert info.value.reason == "not_finite"


@pytest.mark.parametrize("payload", [b"Normal", b"0x1A", b"1_000", b"21,5", b"null", b"online", b"yes", b"[ok]"])
def test_other_text_is_wrong_type_and_the_detail_says_how_to_fix_it(payload: bytes) -> None:
    error = refused(payload)
    assert error.reason == "wrong_type"
    detail = error.detail
    assert detail.startswith("sensor.inverter0_power_demand: ")
    assert 'states = ["sensor.inverter0_power_demand"]' in detail
    assert "value_map = {" in detail
    assert "options = { text = true }" in detail


def test_a_long_text_is_cut_in_the_detail() -> None:
    error = refused(b"x" * 5000)
    assert error.reason == "wrong_type"
    assert len(error.detail) < 500


def test_options_text_makes_every_other_text_a_state() -> None:
    context = ctx("espresense/rooms/study/name", "study", options={"text": True})
    reading = one(b"Study", context)
    assert reading.value == "Study"
    assert reading.metric == "name"
    # Numbers and booleans are still read as such.
    assert value_of(b"-59", context) == -59.0
    assert value_of(b"OFF", context) is False


# -- the mapping comes first ----------------------------------------------------------------------------


def test_a_state_keeps_numbers_and_words_as_text() -> None:
    mapping = states("sensor.*")
    assert value_of(b"21.5", ctx(mapping=mapping)) == "21.5"
    assert value_of(b"ON", ctx(mapping=mapping)) == "ON"
    assert value_of(b" Normal ", ctx(mapping=mapping)) == "Normal"


def test_a_state_of_another_metric_does_not_apply() -> None:
    assert value_of(b"21.5", ctx(mapping=states("switch.*"))) == 21.5


def test_a_value_map_wins_over_numbers_booleans_and_states() -> None:
    source_wide = SourceMapping(value_map={"ON": 2.0, "1": 5.0})
    assert value_of(b"ON", ctx(mapping=source_wide)) == 2.0
    assert value_of(b"1", ctx(mapping=source_wide)) == 5.0
    assert value_of(b"off", ctx(mapping=source_wide)) is False  # value_map words are exact, case-sensitive
    own = SourceMapping(rules=(("sensor.*", MetricRule(state=True, value_map={"Normal": 1.0})),))
    assert value_of(b"Normal", ctx(mapping=own)) == 1.0
    assert value_of(b"Fault", ctx(mapping=own)) == "Fault"


def test_a_value_map_reads_the_stripped_unquoted_text() -> None:
    mapping = SourceMapping(value_map={"online": True, "offline": False})
    context = ctx("livingroom/status", "livingroom", mapping=mapping)
    assert value_of(b"online\n", context) is True
    assert value_of(b'"offline"', context) is False


def test_an_ignored_metric_is_counted_before_its_payload_is_read() -> None:
    mapping = SourceMapping(rules=(("*.$*", MetricRule(ignore=True)),))
    context = ctx("homie/super-car/engine/temperature/$unit", "super-car", mapping=mapping)
    for payload in (b"\xc2\xb0C", b'{"a": 1}', b"", b"[" * 100):
        assert decode_value(payload, context) == Decoded(readings=[], ignored=1)
    # And through the service's own entry point, mapping included.
    assert decode(decode_value, b"\xc2\xb0C", context) == Decoded(readings=[], ignored=1)
    # Other metrics of the source are still read.
    assert value_of(b"21.5", ctx("homie/super-car/engine/temperature", "super-car", mapping=mapping)) == 21.5


def test_the_mapping_sets_the_unit_and_the_name_after_decoding() -> None:
    mapping = SourceMapping(rules=(("sensor.inverter0_power_demand", MetricRule(rename="power_demand", unit="W")),))
    decoded = decode(decode_value, b"190", ctx(mapping=mapping))
    assert [(r.metric, r.value, r.unit) for r in decoded.readings] == [("power_demand", 190.0, "W")]


# -- the payload as a whole -----------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [b"", b"   ", b"\r\n", b'""', b'"  "'])
def test_an_empty_payload_is_no_reading(payload: bytes) -> None:
    assert refused(payload).reason == "empty"


@pytest.mark.parametrize(
    ("payload", "expected"),
    [(b'"21.5"', 21.5), (b'"3"', 3.0), (b' "ON" ', True), (b'"false"', False), (b'"-4"', -4.0)],
)
def test_a_json_string_is_read_as_its_content(payload: bytes, expected: float | bool) -> None:
    assert value_of(payload) == expected
    assert type(value_of(payload)) is type(expected)


def test_a_json_string_of_text_is_a_state_without_its_quotes() -> None:
    context = ctx(options={"text": True})
    assert value_of(b'"Normal"', context) == "Normal"
    assert value_of(b'"\\u00b0C"', context) == "°C"
    # Quotes that do not make one JSON string stay part of the text.
    assert value_of(b'"a" "b"', context) == '"a" "b"'
    assert value_of(b'"', context) == '"'


@pytest.mark.parametrize(("payload", "kind"), [(b'{"POWER":"ON"}', "object"), (b"[1, 2]", "array"), (b"{}", "object")])
def test_a_json_object_or_array_is_refused_as_schema(payload: bytes, kind: str) -> None:
    error = refused(payload)
    assert error.reason == "schema"
    assert f"JSON an {kind}" in error.detail
    assert 'format = "json"' in error.detail


def test_a_json_object_is_schema_even_with_options_text() -> None:
    assert refused(b'{"POWER":"ON"}', ctx(options={"text": True})).reason == "schema"


def test_bracketed_text_that_is_not_json_is_text() -> None:
    assert value_of(b"[ok]", ctx(options={"text": True})) == "[ok]"
    assert value_of(b"{unknown", ctx(options={"text": True})) == "{unknown"


def test_too_deep_json_is_too_deep_even_without_a_device() -> None:
    for context in (ctx(), ctx(device=None)):
        error = refused(b"[" * 100_000, context)
        assert error.reason == "too_deep"
        assert "ingest.max_json_depth = 32" in error.detail


def test_invalid_utf8_is_malformed() -> None:
    error = refused(b"21.5\xff")
    assert error.reason == "malformed"
    assert "not UTF-8" in error.detail


# -- device ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize("device", [None, ""])
def test_without_a_device_the_message_is_refused(device: str | None) -> None:
    error = refused(b"21.5", ctx("homie/super-car/engine/temperature", device))
    assert error.reason == "no_device"
    assert "{device}" in error.detail


def test_the_device_is_the_capture_verbatim() -> None:
    reading = one(b"off", ctx("shellies/NAPPALITV/relay/1", "NAPPALITV"))
    assert (reading.device, reading.metric, reading.value) == ("NAPPALITV", "relay.1", False)


def test_a_fallback_device_is_used_when_the_topic_has_none() -> None:
    # `sensor-ingest decode --format value` without a config: the whole topic is the device.
    context = DecodeContext(topic="some/plain/topic", received_at=RECEIVED, fallback_device="some/plain/topic")
    reading = one(b"21.5", context)
    assert (reading.device, reading.metric) == ("some/plain/topic", "value")


# -- metric ---------------------------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "device", "metric"),
    [
        # ESPHome <node>/<component>/<name>/state: the trailing state level is dropped.
        ("attic-powerwall/sensor/inverter0_power_demand/state", "attic-powerwall", "sensor.inverter0_power_demand"),
        ("attic-powerwall/switch/attic-powerwall_restart/state", "attic-powerwall", "switch.attic-powerwall_restart"),
        # Homie v4 homie/<device>/<node>/<property>
        ("homie/super-car/engine/temperature", "super-car", "engine.temperature"),
        # Shelly Gen1 and Tasmota
        ("shellies/NAPPALITV/relay/0/power", "NAPPALITV", "relay.0.power"),
        ("stat/Sonoff03/POWER", "Sonoff03", "POWER"),
        # Only "state" as the last level, exactly, is dropped.
        ("node/state/x", "node", "state.x"),
        ("node/sensor/x/State", "node", "sensor.x.State"),
        ("node/state", "node", "value"),
        # Nothing after the device: "value".
        ("sensors/hn-aq-0001", "hn-aq-0001", "value"),
        ("hn-aq-0001", "hn-aq-0001", "value"),
        # Empty levels are not part of the name.
        ("shellies/NAPPALITV/relay/0/", "NAPPALITV", "relay.0"),
        ("a/dev//x", "dev", "x"),
        ("a/dev/", "dev", "value"),
        # Levels before the device are not part of the name.
        ("city/hoan-kiem/aq-7/pm25", "aq-7", "pm25"),
    ],
)
def test_metric_is_the_levels_after_the_device(topic: str, device: str, metric: str) -> None:
    assert one(b"1", ctx(topic, device)).metric == metric


def test_a_device_named_like_a_later_level_takes_the_first_one() -> None:
    assert one(b"true", ctx("homie/light/light/power", "light")).metric == "light.power"
    assert one(b"1", ctx("a/x/b/x/c", "x")).metric == "b.x.c"


def test_a_device_named_like_a_literal_level_before_it_is_misread_as_documented() -> None:
    # The context holds the captures, not their levels: the first level that spells the device wins.
    # shellies/{device}/relay/0 with a device called "shellies" names its metric from level 0.
    assert one(b"on", ctx("shellies/shellies/relay/0", "shellies")).metric == "shellies.relay.0"


def test_a_device_that_is_not_a_level_of_the_topic_gives_value() -> None:
    assert one(b"1", ctx("t", "dev-a")).metric == "value"


def test_the_metric_capture_wins_verbatim() -> None:
    context = ctx("shellies/NAPPALITV/relay/0/power", "NAPPALITV", captures={"channel": "0", "metric": "power"})
    assert one(b"0.0", context).metric == "power"
    # Verbatim: not even a "state" capture is dropped.
    context = ctx("dev/state", "dev", captures={"metric": "state"})
    assert one(b"1", context).metric == "state"


# -- time, unit, flags ----------------------------------------------------------------------------------


def test_the_reading_has_the_receive_time_no_unit_and_the_receive_time_flag() -> None:
    reading = one(b"190")
    assert reading == Reading("attic-powerwall", "sensor.inverter0_power_demand", RECEIVED, 190.0, None,
                              FLAG_RECEIVE_TIME)
    assert reading.time.tzinfo is UTC


def test_a_receive_time_in_another_zone_becomes_utc() -> None:
    hanoi = datetime(2026, 11, 25, 10, 0, 5, tzinfo=timezone(timedelta(hours=7)))
    reading = one(b"190", ctx(received_at=hanoi))
    assert reading.time == RECEIVED
    assert reading.time.tzinfo is UTC


# -- options --------------------------------------------------------------------------------------------


def test_options_default_and_are_strict() -> None:
    assert Options.model_validate({}).model_dump() == {"state_level": True, "allow_empty": False, "text": False}
    assert Options.model_validate({"text": True}).text is True
    with pytest.raises(ValidationError):
        Options.model_validate({"txt": True})
    with pytest.raises(ValidationError):
        Options.model_validate({}).text = True  # type: ignore[misc]


def test_a_context_without_options_reads_like_the_defaults() -> None:
    context = DecodeContext(topic=ESPHOME, received_at=RECEIVED, device="attic-powerwall")
    assert refused(b"Normal", context).reason == "wrong_type"


# -- never anything but DecodeError ---------------------------------------------------------------------

levels = st.sampled_from(["dev", "state", "sensor", "", "x.y", "$state", "light"])
topics = st.lists(levels, min_size=1, max_size=6).map("/".join)
contexts = st.builds(
    ctx,
    topic=topics,
    device=st.sampled_from([None, "", "dev", "light", "state", "dev/x"]),
    captures=st.one_of(st.none(), st.just({"metric": "m"})),
    options=st.sampled_from([{}, {"text": True}]),
    mapping=st.sampled_from([EMPTY, states("*"), SourceMapping(value_map={"ON": 1.0}),
                             SourceMapping(rules=(("sensor*", MetricRule(ignore=True)),))]),
)
texts = st.one_of(
    st.text(max_size=40),
    st.sampled_from(["nan", "inf", '"', '""', '"x', "[", "{", "[]", "{}", '"21.5"', "ON", "1e999", "-0"]),
    st.floats().map(repr),
)


@settings(max_examples=400, deadline=None, database=None)
@given(payload=st.one_of(st.binary(max_size=60), texts.map(lambda t: t.encode("utf-8", "surrogatepass"))),
       context=contexts)
def test_any_payload_gives_one_reading_or_a_decode_error(payload: bytes, context: DecodeContext) -> None:
    error: DecodeError | None = None
    try:
        decoded = decode_value(payload, context)
    except DecodeError as exc:
        error = exc
    if error is not None:
        assert error.reason in {"empty", "malformed", "schema", "too_deep", "wrong_type", "not_finite", "no_device"}
        assert error.detail
        return
    if decoded.ignored:
        assert decoded == Decoded(readings=[], ignored=1)
        return
    (reading,) = decoded.readings
    assert reading.metric
    assert reading.device
    assert isinstance(reading.value, float | bool | str)
    assert reading.time.tzinfo is UTC
    if isinstance(reading.value, float):
        assert reading.value == reading.value  # never NaN
        assert abs(reading.value) != float("inf")
