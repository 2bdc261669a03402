"""The `json` decoder (ingest.decoders.json): naming, leaves, ids, time, device, shapes and limits.

The golden cases (tests/decoders/cases/json) hold the published payloads; these tests pin each rule
on its own, with the mapping and captures built directly.
"""

from __future__ import annotations

import json
import time as clock
from datetime import UTC, datetime
from typing import Any
from zoneinfo import ZoneInfo

import pytest
from hypothesis import HealthCheck, given, settings
from hypothesis import strategies as st
from pydantic import ValidationError

from ingest.decoders import decode as decode_and_map
from ingest.decoders.base import DecodeContext, Decoded
from ingest.decoders.json import NOT_READING_KEYS, Options, decode, is_not_reading_key
from ingest.decoders.mapping import MetricRule, SourceMapping
from ingest.errors import DecodeError
from ingest.model import FLAG_RECEIVE_TIME

RECEIVED = datetime(2026, 11, 25, 3, 0, 5, tzinfo=UTC)
HCM = ZoneInfo("Asia/Ho_Chi_Minh")


def ctx(
    *,
    device: str | None = "dev-a",
    metric: str | None = None,
    time_field: str | None = None,
    device_field: str | None = None,
    rules: tuple[tuple[str, MetricRule], ...] = (),
    value_map: dict[str, float | bool] | None = None,
    timezone: ZoneInfo | None = None,
    options: dict[str, Any] | None = None,
    max_readings: int = 2000,
) -> DecodeContext:
    captures = {k: v for k, v in (("device", device), ("metric", metric)) if v is not None}
    mapping = SourceMapping(rules=rules, value_map=value_map, time_field=time_field, device_field=device_field)
    return DecodeContext(
        topic="t", received_at=RECEIVED, device=device, captures=captures, timezone=timezone,
        options=Options.model_validate(options or {}).model_dump(), mapping=mapping, max_readings=max_readings,
    )


def run(payload: object, context: DecodeContext | None = None) -> Decoded:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return decode(raw, context or ctx())


def named(decoded: Decoded) -> dict[str, object]:
    return {r.metric: r.value for r in decoded.readings}


def refused(payload: object, context: DecodeContext | None = None) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        run(payload, context)
    return info.value


# --- naming ------------------------------------------------------------------------------------


def test_metric_is_the_path_of_keys_verbatim() -> None:
    decoded = run({"AM2301": {"Temperature": 21.3, "Humidity": 58.2}, "Wind speed": 3})
    assert named(decoded) == {"AM2301.Temperature": 21.3, "AM2301.Humidity": 58.2, "Wind speed": 3.0}
    assert [r.metric for r in decoded.readings] == ["AM2301.Temperature", "AM2301.Humidity", "Wind speed"]


def test_list_items_add_their_index() -> None:
    assert named(run({"a": [1, 2], "s": [{"t": 1}, {"t": 2, "u": [3]}]})) == {
        "a.0": 1.0, "a.1": 2.0, "s.0.t": 1.0, "s.1.t": 2.0, "s.1.u.0": 3.0,
    }


def test_empty_objects_and_lists_add_nothing() -> None:
    decoded = run({"ble": {}, "groups": [], "x": [[], {}], "v": 1})
    assert named(decoded) == {"v": 1.0}
    assert decoded.ignored == 0


def test_metric_capture_prefixes_every_leaf() -> None:
    decoded = run({"id": 0, "tC": 19.0, "aenergy": {"by_minute": [1.5]}}, ctx(metric="switch:0"))
    assert named(decoded) == {"switch:0.tC": 19.0, "switch:0.aenergy.by_minute.0": 1.5}
    assert decoded.ignored == 1


def test_two_leaves_spelling_one_name_keep_the_first_and_report_the_second() -> None:
    decoded = run(b'{"a.b": 1, "a": {"b": 2}, "c": 3}')
    assert [(r.metric, r.value) for r in decoded.readings] == [("a.b", 1.0), ("c", 3.0)]
    assert [p.reason for p in decoded.problems] == ["schema"]
    assert "'a.b'" in decoded.problems[0].detail


def test_a_dotted_key_that_repeats_nothing_is_kept() -> None:
    decoded = run(b'{"a.b": 1, "a": {"c": 2}}')
    assert named(decoded) == {"a.b": 1.0, "a.c": 2.0}
    assert decoded.problems == []


def test_a_value_under_the_empty_key_at_the_root_is_a_bad_metric_problem() -> None:
    decoded = run({"": 1, "a": {"": 2}, "v": 3})
    assert named(decoded) == {"a.": 2.0, "v": 3.0}
    assert [p.reason for p in decoded.problems] == ["bad_metric"]
    assert named(run({"": 1}, ctx(metric="m"))) == {"m.": 1.0}


# --- leaves ------------------------------------------------------------------------------------


def test_numbers_are_floats_and_booleans_stay_booleans() -> None:
    decoded = run({"n": 97, "f": 0.5, "on": True, "off": False})
    values = named(decoded)
    assert values == {"n": 97.0, "f": 0.5, "on": True, "off": False}
    assert type(values["n"]) is float
    assert type(values["on"]) is bool
    assert type(values["off"]) is bool


def test_string_encoded_numbers_are_values_and_other_strings_are_ignored() -> None:
    decoded = run({"value": "18.83", "neg": " -4", "exp": "1e3", "unit": "C", "date": "2019-01-01", "nan": "nan"})
    assert named(decoded) == {"value": 18.83, "neg": -4.0, "exp": 1000.0}
    assert decoded.ignored == 3


def test_strings_as_numbers_can_be_turned_off() -> None:
    decoded = run({"value": "18.83", "n": 2}, ctx(options={"strings_as_numbers": False}))
    assert named(decoded) == {"n": 2.0}
    assert decoded.ignored == 1


def test_nulls_are_ignored_and_counted() -> None:
    decoded = run({"identify": None, "battery": 100, "x": [None, 1]})
    assert named(decoded) == {"battery": 100.0, "x.1": 1.0}
    assert decoded.ignored == 2


def test_value_map_and_states_decide_what_a_string_is() -> None:
    context = ctx(value_map={"ON": True, "OFF": 0}, rules=(("action", MetricRule(state=True)),))
    decoded = run({"state": "ON", "state_r": "OFF", "action": "single", "mode": "auto"}, context)
    assert named(decoded) == {"state": True, "state_r": 0, "action": "single"}
    assert decoded.ignored == 1


def test_a_metric_the_mapping_ignores_is_counted_once() -> None:
    context = ctx(rules=(("ENERGY.*", MetricRule(ignore=True)),))
    decoded = decode_and_map(decode, b'{"ENERGY": {"Total": 6.2, "Today": 0.9}, "t": 1}', context)
    assert named(decoded) == {"t": 1.0}
    assert decoded.ignored == 2


def test_nan_and_infinity_literals_pass_through_for_validation() -> None:
    decoded = run(b'{"a": NaN, "b": -Infinity, "c": 1e400}')
    values = [r.value for r in decoded.readings]
    assert len(values) == 3
    assert all(isinstance(v, float) for v in values)


# --- ids, serials, versions --------------------------------------------------------------------


@pytest.mark.parametrize(
    "key",
    ["id", "Id", "ID", "uuid", "serial", "SerialNumber", "sn", "mac", "ip", "imei", "esp8266id", "version", "fw",
     "Firmware", "build", "installed_version", "software_version", "sensor_id", "Sensor_ID", "sensorId", "chipID",
     "time", "Timestamp", "ts", "unixtime"],
)
def test_id_version_and_time_keys_are_not_readings(key: str) -> None:
    assert is_not_reading_key(key)


@pytest.mark.parametrize(
    "key",
    ["rssi", "linkquality", "battery", "uptime", "temperature", "Humidity", "PID", "liquid", "valid", "humid",
     "identify", "idle", "conversion", "version_count", "ids", "timer", "voltage"],
)
def test_measurement_keys_are_readings(key: str) -> None:
    assert not is_not_reading_key(key)


def test_the_key_set_is_lower_case() -> None:
    assert all(k == k.lower() for k in NOT_READING_KEYS)


def test_a_numeric_id_or_version_is_ignored() -> None:
    decoded = run({"serial": 21, "update": {"installed_version": 33816598}, "Id": "0305", "rssi": -60})
    assert named(decoded) == {"rssi": -60.0}
    assert decoded.ignored == 3


def test_a_list_item_is_judged_by_the_key_of_its_list() -> None:
    decoded = run({"mac": ["aa", 1], "vals": [1]})
    assert named(decoded) == {"vals.0": 1.0}
    assert decoded.ignored == 2


def test_an_id_listed_by_its_exact_name_in_the_mapping_is_a_reading() -> None:
    rules = (("serial", MetricRule(rename="serial_no")), ("sys.cfg_id", MetricRule(unit="1")))
    decoded = decode_and_map(decode, b'{"serial": 21, "sys": {"cfg_id": 14}, "mac": 5}', ctx(rules=rules))
    assert named(decoded) == {"serial_no": 21.0, "sys.cfg_id": 14.0}
    assert decoded.ignored == 1


def test_a_glob_rule_does_not_turn_ids_into_readings() -> None:
    decoded = run({"DS18B20": {"Id": 3597946, "Temperature": 20.9}}, ctx(rules=(("DS18B20.*", MetricRule(unit="°C")),)))
    assert named(decoded) == {"DS18B20.Temperature": 20.9}
    assert decoded.ignored == 1


def test_an_id_the_mapping_ignores_is_counted_once() -> None:
    decoded = run({"id": 1, "v": 2}, ctx(rules=(("id", MetricRule(ignore=True)),)))
    assert named(decoded) == {"v": 2.0}
    assert decoded.ignored == 1


# --- time --------------------------------------------------------------------------------------


def test_without_time_field_the_receive_time_is_used_and_flagged() -> None:
    (reading,) = run({"v": 1}).readings
    assert reading.time == RECEIVED
    assert reading.flags == FLAG_RECEIVE_TIME


@pytest.mark.parametrize(
    ("raw", "expected"),
    [
        (1795575600, "2026-11-25T03:00:00+00:00"),
        (1795575600.25, "2026-11-25T03:00:00.250000+00:00"),
        (1795575600123, "2026-11-25T03:00:00.123000+00:00"),
        (1795575600123456, "2026-11-25T03:00:00.123456+00:00"),
        ("1795575600123456789", "2026-11-25T03:00:00.123456+00:00"),
        ("1795575600", "2026-11-25T03:00:00+00:00"),
        ("2026-11-25T03:00:00Z", "2026-11-25T03:00:00+00:00"),
        ("2026-11-25T10:00:00+07:00", "2026-11-25T03:00:00+00:00"),
        ("2026-11-25T10:00:00", "2026-11-25T03:00:00+00:00"),  # naive: read in Asia/Ho_Chi_Minh
        ("2026-11-25 10:00:00", "2026-11-25T03:00:00+00:00"),
    ],
)
def test_time_field_forms(raw: object, expected: str) -> None:
    decoded = run({"Time": raw, "v": 1}, ctx(time_field="Time", timezone=HCM))
    (reading,) = decoded.readings
    assert reading.time == datetime.fromisoformat(expected)
    assert reading.time.tzinfo is UTC
    assert reading.flags == 0
    assert decoded.ignored == 0  # the time leaf is consumed, not counted


def test_time_field_is_a_dotted_path() -> None:
    decoded = run({"params": {"ts": 1795575600, "x": {"v": 1}}}, ctx(time_field="params.ts"))
    assert named(decoded) == {"params.x.v": 1.0}
    assert decoded.readings[0].time == datetime(2026, 11, 25, 3, 0, tzinfo=UTC)


def test_time_field_inside_a_list() -> None:
    decoded = run({"d": [{"ts": 1795575600}], "v": 1}, ctx(time_field="d.0.ts"))
    assert named(decoded) == {"v": 1.0}
    assert decoded.readings[0].flags == 0


def test_missing_time_field_refuses_a_single_object_naming_the_path_and_the_fix() -> None:
    error = refused({"temperature": 27.34}, ctx(time_field="Time"))
    assert error.reason == "bad_time"
    assert "'Time'" in error.detail
    assert "remove it" in error.detail


@pytest.mark.parametrize("raw", ["yesterday", "2019-01-01", True, None, {"s": 1}, [1], "", float("nan")])
def test_unreadable_time_refuses_a_single_object(raw: object) -> None:
    payload = json.dumps({"Time": raw, "v": 1}).encode()  # NaN is written as the NaN literal
    error = refused(payload, ctx(time_field="Time", timezone=HCM))
    assert error.reason == "bad_time"
    assert "'Time'" in error.detail


def test_naive_time_without_timezone_says_to_set_it() -> None:
    error = refused({"Time": "2019-01-01T00:00:00", "v": 1}, ctx(time_field="Time"))
    assert error.reason == "bad_time"
    assert "timezone" in error.detail


def test_in_an_array_a_record_without_a_readable_time_is_a_problem_and_the_others_are_kept() -> None:
    payload = [{"ts": 1795575600, "v": 1}, {"v": 2}, {"ts": "soon", "v": 3}, {"ts": 1795575660, "v": 4}]
    decoded = run(payload, ctx(time_field="ts"))
    assert [r.value for r in decoded.readings] == [1.0, 4.0]
    assert [p.reason for p in decoded.problems] == ["bad_time", "bad_time"]
    assert "record [1]" in decoded.problems[0].detail
    assert "record [2]" in decoded.problems[1].detail
    assert all(p.device == "dev-a" for p in decoded.problems)


# --- device ------------------------------------------------------------------------------------


def test_without_device_field_the_topic_device_is_used() -> None:
    assert run({"v": 1}).readings[0].device == "dev-a"


def test_no_device_anywhere_is_refused() -> None:
    assert refused({"v": 1}, ctx(device=None)).reason == "no_device"


def test_device_field_missing_from_the_payload_falls_back_to_the_topic() -> None:
    decoded = run({"v": 1}, ctx(device_field="esp8266id"))
    assert decoded.readings[0].device == "dev-a"


def test_device_field_missing_and_no_topic_device_names_the_field() -> None:
    error = refused({"v": 1}, ctx(device=None, device_field="esp8266id"))
    assert error.reason == "no_device"
    assert "'esp8266id'" in error.detail


@pytest.mark.parametrize(("raw", "device"), [("0011223344", "0011223344"), (13463000, "13463000"),
                                              (-5, "-5"), (2**53, str(2**53))])
def test_device_field_string_or_integer(raw: object, device: str) -> None:
    decoded = run({"esp8266id": raw, "v": 1}, ctx(device=None, device_field="esp8266id"))
    assert [(r.device, r.metric) for r in decoded.readings] == [(device, "v")]
    assert decoded.ignored == 0  # the device leaf is consumed


@pytest.mark.parametrize("raw", [1.5, True, None, {"a": 1}, [1], "", 2**60, 1e300])
def test_device_field_of_another_kind_is_a_schema_error(raw: object) -> None:
    error = refused({"id": raw, "v": 1}, ctx(device=None, device_field="id"))
    assert error.reason == "schema"
    assert "'id'" in error.detail


def test_device_field_naming_another_device_than_the_topic_is_refused() -> None:
    error = refused({"src": "dev-b", "v": 1}, ctx(device_field="src"))
    assert error.reason == "device_mismatch"
    assert "dev-b" in error.detail


def test_device_field_naming_the_topic_device_is_accepted() -> None:
    assert run({"src": "dev-a", "v": 1}, ctx(device_field="src")).readings[0].device == "dev-a"


def test_in_an_array_one_record_naming_another_device_refuses_the_whole_message() -> None:
    error = refused([{"src": "dev-a", "v": 1}, {"src": "dev-b", "v": 2}], ctx(device_field="src"))
    assert error.reason == "device_mismatch"
    assert "record [1]" in error.detail


def test_array_records_name_their_own_devices_and_times() -> None:
    payload = [{"sensor": {"id": 7373}, "t": 1795575600, "p": "27.7"},
               {"sensor": {"id": 7374}, "t": 1795575660, "p": 3}]
    decoded = run(payload, ctx(device=None, device_field="sensor.id", time_field="t"))
    assert [(r.device, r.metric, r.value, r.time.minute) for r in decoded.readings] == [
        ("7373", "p", 27.7, 0), ("7374", "p", 3.0, 1),
    ]


# --- shapes ------------------------------------------------------------------------------------


def test_array_of_records_names_paths_inside_each_record() -> None:
    assert [r.metric for r in run([{"a": {"b": 1}}, {"a": {"b": 2}}]).readings] == ["a.b", "a.b"]


@pytest.mark.parametrize("payload", [[1, 2], [{"a": 1}, 2], [{"a": 1}, [{"b": 2}]], [None]])
def test_array_of_scalars_or_mixed_is_a_schema_error(payload: object) -> None:
    error = refused(payload)
    assert error.reason == "schema"
    assert "[" in error.detail


@pytest.mark.parametrize("payload", [{}, []])
def test_nothing_in_is_nothing_out(payload: object) -> None:
    assert run(payload) == Decoded(readings=[])


@pytest.mark.parametrize("payload", [b"21.5", b"true", b'"18.83"', b'"on"', b"null"])
def test_bare_scalar_without_metric_capture_points_to_the_value_format(payload: bytes) -> None:
    error = refused(payload)
    assert error.reason == "schema"
    assert '"value"' in error.detail


@pytest.mark.parametrize(("payload", "value"), [(b"59.03", 59.03), (b"true", True), (b'"18.83"', 18.83), (b"7", 7.0)])
def test_bare_scalar_with_metric_capture_is_that_metric(payload: bytes, value: object) -> None:
    (reading,) = run(payload, ctx(metric="temperature")).readings
    assert (reading.device, reading.metric, reading.value, reading.flags) == ("dev-a", "temperature", value,
                                                                            FLAG_RECEIVE_TIME)
    assert type(reading.value) is type(value)


@pytest.mark.parametrize("payload", [b'"on"', b"null"])
def test_bare_non_reading_with_metric_capture_is_ignored(payload: bytes) -> None:
    assert run(payload, ctx(metric="relay/0")) == Decoded(readings=[], ignored=1)


def test_bare_scalar_with_metric_capture_follows_the_mapping() -> None:
    assert named(run(b'"on"', ctx(metric="relay", value_map={"on": True}))) == {"relay": True}
    ignoring = ctx(metric="relay", rules=(("relay", MetricRule(ignore=True)),))
    assert run(b"1", ignoring) == Decoded(readings=[], ignored=1)
    assert run(b"3", ctx(metric="version")) == Decoded(readings=[], ignored=1)


def test_bare_scalar_on_a_source_with_time_field_is_bad_time() -> None:
    error = refused(b"21.5", ctx(metric="temperature", time_field="ts"))
    assert error.reason == "bad_time"
    assert "'ts'" in error.detail


def test_bare_scalar_needs_a_device() -> None:
    assert refused(b"21.5", ctx(device=None, metric="temperature")).reason == "no_device"


@pytest.mark.parametrize(("payload", "reason"), [(b'{"a": 1', "malformed"), (b"\xff", "malformed"),
                                                 (b'{"a": 1, "a": 2}', "malformed"), (b"", "malformed"),
                                                 (b"[" * 40 + b"]" * 40, "too_deep")])
def test_unreadable_payloads(payload: bytes, reason: str) -> None:
    assert refused(payload).reason == reason


# --- limits ------------------------------------------------------------------------------------


def test_a_20000_key_object_is_refused_before_any_reading_is_built() -> None:
    payload = json.dumps({f"k{i}": i for i in range(20_000)}).encode()
    started = clock.perf_counter()
    error = refused(payload)
    elapsed = clock.perf_counter() - started
    assert error.reason == "too_many_readings"
    assert "20000 leaves" in error.detail
    assert elapsed < 1.0  # generous: the parse and one walk, no Reading built


def test_leaves_are_counted_across_records_ignored_ones_included() -> None:
    assert refused([{"a": 1, "b": None}, {"a": 2}], ctx(max_readings=2)).reason == "too_many_readings"
    assert len(run([{"a": 1}, {"a": 2}], ctx(max_readings=2)).readings) == 2


# --- options -----------------------------------------------------------------------------------


def test_options_default_and_refuse_unknown_keys() -> None:
    assert Options.model_validate({}).model_dump() == {
        "strings_as_numbers": True, "root": None, "only_if": None, "time_required": True, "naive_time": "reject",
        "skip_scalars": False, "allow_empty": False, "unit_fields": {}, "pairs": None}
    with pytest.raises(ValidationError):
        Options.model_validate({"strings_as_number": False})


# --- only DecodeError, whatever the payload and mapping ---------------------------------------

_scalars = st.one_of(
    st.none(), st.booleans(), st.floats(), st.integers(-(10**20), 10**20), st.text(max_size=8),
    st.sampled_from(["2026-11-25T03:00:00Z", "2026-11-25T10:00:00", "18.83", "1795575600", "id"]),
)
_keys = st.sampled_from(["a", "b", "id", "ts", "Time", "src", "a.b", "", "0", "serial", "x_version"])
_values = st.recursive(
    _scalars, lambda inner: st.one_of(st.lists(inner, max_size=4), st.dictionaries(_keys, inner, max_size=4)),
    max_leaves=24,
)
_paths = st.sampled_from([None, "a", "ts", "Time", "a.b", "src", "0.a", "b.0", "a.b.c"])
_contexts = st.builds(
    ctx,
    device=st.sampled_from([None, "dev-a", "13463000"]),
    metric=st.sampled_from([None, "temperature", "switch:0"]),
    time_field=_paths,
    device_field=_paths,
    rules=st.sampled_from([(), (("a", MetricRule(ignore=True)),), (("id", MetricRule(rename="x")),),
                           (("*", MetricRule(state=True)),)]),
    value_map=st.sampled_from([None, {"ON": 1.0, "OFF": False}]),
    timezone=st.sampled_from([None, HCM]),
    options=st.sampled_from([None, {"strings_as_numbers": False}]),
    max_readings=st.sampled_from([3, 2000]),
)


@settings(max_examples=400, deadline=None, database=None, suppress_health_check=[HealthCheck.too_slow])
@given(value=st.one_of(_values, st.lists(st.dictionaries(_keys, _values, max_size=4), max_size=3)), context=_contexts)
def test_any_json_with_any_mapping_decodes_or_raises_decode_error(value: object, context: DecodeContext) -> None:
    try:
        decoded = decode(json.dumps(value).encode(), context)
    except DecodeError as exc:
        error = exc
    else:
        error = None
    if error is not None:
        assert error.reason
        assert error.detail
        return
    for r in decoded.readings:
        assert r.time.tzinfo is UTC
        assert isinstance(r.value, float | bool | str)
        assert r.metric
        assert r.device
    assert decoded.ignored >= 0
