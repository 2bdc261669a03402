"""The `json` format's options of issue #12 (ingest/decoders/json.py): root, only_if, time_required,
naive_time, skip_scalars, allow_empty, unit_fields and pairs; each one's effect, its default, and the
config errors of bad values."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any
from zoneinfo import ZoneInfo

import pytest

from ingest.decoders.base import DecodeContext, Decoded
from ingest.decoders.json import Options, Pairs, decode
from ingest.decoders.mapping import SourceMapping
from ingest.errors import ConfigError, ConfigProblem, DecodeError
from ingest.model import FLAG_RECEIVE_TIME
from ingest.settings import load_settings

RECEIVED = datetime(2026, 11, 25, 3, 0, 5, tzinfo=UTC)
HCM = ZoneInfo("Asia/Ho_Chi_Minh")
KNOWN = "options of json: strings_as_numbers, root, only_if, time_required, naive_time, skip_scalars, " \
        "allow_empty, unit_fields, pairs"


def ctx(options: dict[str, Any] | None = None, *, time_field: str | None = None, device_field: str | None = None,
        device: str | None = "dev-a", metric: str | None = None, timezone: ZoneInfo | None = None) -> DecodeContext:
    captures = {k: v for k, v in (("device", device), ("metric", metric)) if v is not None}
    return DecodeContext(
        topic="t", received_at=RECEIVED, device=device, captures=captures, timezone=timezone,
        options=Options.model_validate(options or {}).model_dump(),
        mapping=SourceMapping(time_field=time_field, device_field=device_field),
    )


def run(payload: object, context: DecodeContext | None = None) -> Decoded:
    raw = payload if isinstance(payload, bytes) else json.dumps(payload).encode()
    return decode(raw, context or ctx())


def refused(payload: object, context: DecodeContext | None = None) -> DecodeError:
    with pytest.raises(DecodeError) as info:
        run(payload, context)
    return info.value


def rows(decoded: Decoded) -> list[tuple[str, str, object, str | None, datetime, int]]:
    return [(r.device, r.metric, r.value, r.unit, r.time, r.flags) for r in decoded.readings]


def named(decoded: Decoded) -> dict[str, object]:
    return {r.metric: r.value for r in decoded.readings}


# --- defaults ------------------------------------------------------------------------------------


def test_the_defaults_of_every_option() -> None:
    assert Options().model_dump() == {
        "strings_as_numbers": True, "root": None, "only_if": None, "time_required": True, "naive_time": "reject",
        "skip_scalars": False, "allow_empty": False, "unit_fields": {}, "pairs": None,
    }


def test_the_defaults_of_pairs() -> None:
    assert Pairs(key="list").model_dump() == {"key": "list", "name": "name", "value": "value"}


# --- root ----------------------------------------------------------------------------------------


SHELLY_STATUS = {"src": "shellyplus1-abc", "method": "NotifyStatus",
                 "params": {"ts": 1795000000.5, "switch:0": {"id": 0, "apower": 5.5}}}


def test_root_reads_the_readings_and_the_time_field_inside_it() -> None:
    decoded = run(SHELLY_STATUS, ctx({"root": "params"}, time_field="ts"))

    assert rows(decoded) == [("dev-a", "switch:0.apower", 5.5, None, datetime(2026, 11, 18, 11, 6, 40, 500000, UTC), 0)]
    assert decoded.ignored == 1  # switch:0.id
    assert decoded.skipped is None


def test_without_root_the_whole_payload_is_the_record() -> None:
    decoded = run(SHELLY_STATUS)

    # "src" and "method" are strings without a mapping: not readings; ts and id are id / time keys.
    assert named(decoded) == {"params.switch:0.apower": 5.5}
    assert decoded.ignored == 4


def test_root_is_a_dotted_path() -> None:
    decoded = run({"a": {"b": {"x": 1}}, "y": 2}, ctx({"root": "a.b"}))

    assert named(decoded) == {"x": 1.0}


def test_root_holding_an_array_of_objects_is_a_batch() -> None:
    decoded = run({"data": [{"x": 1, "t": "2026-11-25T03:00:00Z"}, {"x": 2, "t": "2026-11-25T03:00:01Z"}]},
                  ctx({"root": "data"}, time_field="t"))

    assert [(r.metric, r.value, r.time) for r in decoded.readings] == [
        ("x", 1.0, datetime(2026, 11, 25, 3, 0, tzinfo=UTC)), ("x", 2.0, datetime(2026, 11, 25, 3, 0, 1, tzinfo=UTC))]


def test_a_missing_root_is_a_schema_error_naming_the_option() -> None:
    error = refused({"method": "NotifyEvent"}, ctx({"root": "params"}))

    assert error.reason == "schema"
    assert error.detail == "the payload has no 'params' (the source's options.root)"


def test_a_root_holding_a_scalar_is_a_schema_error() -> None:
    error = refused({"params": 5}, ctx({"root": "params"}))

    assert error.reason == "schema"
    assert "expected a JSON object or an array of objects, got a number" in error.detail


# --- only_if -------------------------------------------------------------------------------------


def test_only_if_lets_a_listed_value_through() -> None:
    options = {"root": "params", "only_if": {"method": ["NotifyStatus", "NotifyFullStatus"]}}

    assert named(run(SHELLY_STATUS, ctx(options))) == {"switch:0.apower": 5.5}
    assert named(run({**SHELLY_STATUS, "method": "NotifyFullStatus"}, ctx(options))) == {"switch:0.apower": 5.5}


@pytest.mark.parametrize(
    "payload",
    [
        {"method": "NotifyEvent", "params": {"events": [{"event": "single_push"}]}},
        {"params": {"x": 1}},  # the path is missing
        {"method": {"name": "NotifyStatus"}, "params": {"x": 1}},  # an object is never a listed value
        {"method": ["NotifyStatus"], "params": {"x": 1}},  # nor an array
        {"method": "notifystatus", "params": {"x": 1}},  # values compare exactly
    ],
)
def test_only_if_skips_any_other_message_as_not_selected(payload: dict[str, Any]) -> None:
    decoded = run(payload, ctx({"root": "params", "only_if": {"method": ["NotifyStatus"]}}))

    assert decoded == Decoded(readings=[], skipped="not_selected")


def test_only_if_is_read_on_the_payload_before_root() -> None:
    # Had root applied first, "method" would be missing and nothing would be selected.
    decoded = run(SHELLY_STATUS, ctx({"root": "params", "only_if": {"method": ["NotifyStatus"]}}))

    assert decoded.skipped is None
    assert decoded.readings


def test_only_if_before_root_skips_rather_than_refusing_a_missing_root() -> None:
    decoded = run({"method": "NotifyEvent"}, ctx({"root": "params", "only_if": {"method": ["NotifyStatus"]}}))

    assert decoded.skipped == "not_selected"


def test_only_if_requires_every_path() -> None:
    options = {"only_if": {"kind": ["status"], "v": [2]}}

    assert run({"kind": "status", "v": 2, "x": 1}, ctx(options)).skipped is None
    assert run({"kind": "status", "v": 3, "x": 1}, ctx(options)).skipped == "not_selected"
    assert run({"kind": "event", "v": 2, "x": 1}, ctx(options)).skipped == "not_selected"


def test_only_if_numbers_match_json_numbers_and_not_their_text() -> None:
    options = {"only_if": {"v": [2]}}

    assert run({"v": 2.0, "x": 1}, ctx(options)).skipped is None
    assert run({"v": "2", "x": 1}, ctx(options)).skipped == "not_selected"


def test_only_if_dotted_paths_reach_into_objects() -> None:
    options = {"only_if": {"meta.kind": ["status"]}}

    assert named(run({"meta": {"kind": "status"}, "x": 1}, ctx(options))) == {"x": 1.0}
    assert run({"meta": {"kind": "event"}, "x": 1}, ctx(options)).skipped == "not_selected"


def test_only_if_true_does_not_select_the_number_one() -> None:
    assert run({"online": 1, "x": 1}, ctx({"only_if": {"online": [True]}})).skipped == "not_selected"


def test_without_only_if_every_message_is_decoded() -> None:
    assert run({"method": "NotifyEvent", "x": 1}).skipped is None


# --- time_required -------------------------------------------------------------------------------


def test_by_default_a_record_without_its_time_field_is_refused() -> None:
    error = refused({"x": 1}, ctx(time_field="last_seen"))

    assert error.reason == "bad_time"
    assert error.detail.startswith("payload has no time_field 'last_seen'")


def test_time_required_false_gives_the_receive_time_to_a_record_without_it() -> None:
    decoded = run({"x": 1}, ctx({"time_required": False}, time_field="last_seen"))

    assert rows(decoded) == [("dev-a", "x", 1.0, None, RECEIVED, FLAG_RECEIVE_TIME)]


def test_time_required_false_still_reads_a_time_that_is_there() -> None:
    decoded = run({"x": 1, "last_seen": "2026-11-25T02:59:00Z"}, ctx({"time_required": False}, time_field="last_seen"))

    assert rows(decoded) == [("dev-a", "x", 1.0, None, datetime(2026, 11, 25, 2, 59, tzinfo=UTC), 0)]


def test_time_required_false_still_refuses_a_bad_time() -> None:
    error = refused({"x": 1, "last_seen": "yesterday"}, ctx({"time_required": False}, time_field="last_seen"))

    assert error.reason == "bad_time"
    assert "time_field 'last_seen'" in error.detail


def test_time_required_false_applies_per_record_of_a_batch() -> None:
    payload = [{"x": 1, "t": "2026-11-25T03:00:00Z"}, {"x": 2}]

    decoded = run(payload, ctx({"time_required": False}, time_field="t"))
    assert [(r.value, r.time, r.flags) for r in decoded.readings] == [
        (1.0, datetime(2026, 11, 25, 3, 0, tzinfo=UTC), 0), (2.0, RECEIVED, FLAG_RECEIVE_TIME)]
    assert decoded.problems == []

    strict = run(payload, ctx(time_field="t"))
    assert [r.value for r in strict.readings] == [1.0]
    assert [(p.reason, p.detail.startswith("record [1] has no time_field 't'")) for p in strict.problems] == [
        ("bad_time", True)]


# --- naive_time ----------------------------------------------------------------------------------


def test_by_default_a_naive_time_without_a_zone_is_refused() -> None:
    error = refused({"x": 1, "Time": "2026-11-25T10:00:00"}, ctx(time_field="Time"))

    assert error.reason == "bad_time"
    assert "'2026-11-25T10:00:00' has no UTC offset" in error.detail


def test_naive_time_receive_takes_the_receive_time_flagged() -> None:
    decoded = run({"x": 1, "Time": "2026-11-25T10:00:00"}, ctx({"naive_time": "receive"}, time_field="Time"))

    assert rows(decoded) == [("dev-a", "x", 1.0, None, RECEIVED, FLAG_RECEIVE_TIME)]


def test_naive_time_receive_keeps_a_time_with_an_offset() -> None:
    decoded = run({"x": 1, "Time": "2026-11-25T10:00:00+07:00"}, ctx({"naive_time": "receive"}, time_field="Time"))

    assert rows(decoded) == [("dev-a", "x", 1.0, None, datetime(2026, 11, 25, 3, 0, tzinfo=UTC), 0)]


def test_naive_time_receive_reads_a_naive_time_in_the_sources_zone() -> None:
    decoded = run({"x": 1, "Time": "2026-11-25T10:00:00"},
                  ctx({"naive_time": "receive"}, time_field="Time", timezone=HCM))

    assert rows(decoded) == [("dev-a", "x", 1.0, None, datetime(2026, 11, 25, 3, 0, tzinfo=UTC), 0)]


def test_naive_time_receive_still_refuses_a_time_that_is_no_time() -> None:
    error = refused({"x": 1, "Time": "soon T"}, ctx({"naive_time": "receive"}, time_field="Time"))

    assert error.reason == "bad_time"
    assert "is not a date and time" in error.detail


# --- skip_scalars --------------------------------------------------------------------------------


def test_by_default_a_bare_value_without_metric_is_a_schema_error() -> None:
    error = refused(21.5)

    assert error.reason == "schema"
    assert error.detail.startswith("expected a JSON object or an array of objects, got a number")


@pytest.mark.parametrize("payload", [21.5, "ON", True, None])
def test_skip_scalars_skips_a_bare_value_as_scalar(payload: object) -> None:
    assert run(payload, ctx({"skip_scalars": True})) == Decoded(readings=[], skipped="scalar")


def test_skip_scalars_leaves_a_bare_value_on_a_metric_topic_its_reading() -> None:
    decoded = run(21.5, ctx({"skip_scalars": True}, metric="temperature"))

    assert rows(decoded) == [("dev-a", "temperature", 21.5, None, RECEIVED, FLAG_RECEIVE_TIME)]


def test_skip_scalars_does_not_touch_objects() -> None:
    assert named(run({"x": 1}, ctx({"skip_scalars": True}))) == {"x": 1.0}


# --- allow_empty ---------------------------------------------------------------------------------


@pytest.mark.parametrize("payload", [{}, []])
def test_by_default_an_empty_object_or_array_gives_nothing_and_no_skip(payload: object) -> None:
    # The service then records the message as "empty".
    assert run(payload) == Decoded(readings=[])


@pytest.mark.parametrize("payload", [{}, []])
def test_allow_empty_skips_an_empty_object_or_array(payload: object) -> None:
    assert run(payload, ctx({"allow_empty": True})) == Decoded(readings=[], skipped="empty_object")


def test_allow_empty_looks_at_the_root() -> None:
    assert run({"params": {}}, ctx({"allow_empty": True, "root": "params"})).skipped == "empty_object"
    assert run({"params": {}}, ctx({"root": "params"})) == Decoded(readings=[])


def test_allow_empty_does_not_skip_an_object_holding_only_empty_members() -> None:
    assert run({"a": {}}, ctx({"allow_empty": True})) == Decoded(readings=[])


# --- unit_fields ---------------------------------------------------------------------------------


TASMOTA_UNITS = {"TempUnit": ["*Temperature", "*Temperature[0-9]*", "*DewPoint"], "PressureUnit": ["*Pressure"]}


def test_unit_fields_give_the_metrics_their_globs_match_that_unit() -> None:
    payload = {"AM2301": {"Temperature": 21.5, "Humidity": 58, "DewPoint": 12.9}, "DS18B20": {"Temperature2": 3},
               "BMP280": {"Pressure": 1013.2}, "TempUnit": "C", "PressureUnit": "hPa"}

    decoded = run(payload, ctx({"unit_fields": TASMOTA_UNITS}))

    assert [(r.metric, r.value, r.unit) for r in decoded.readings] == [
        ("AM2301.Temperature", 21.5, "C"), ("AM2301.Humidity", 58.0, None), ("AM2301.DewPoint", 12.9, "C"),
        ("DS18B20.Temperature2", 3.0, "C"), ("BMP280.Pressure", 1013.2, "hPa")]
    assert decoded.ignored == 0  # the unit keys are consumed, neither readings nor ignored


def test_without_unit_fields_the_unit_key_is_just_an_ignored_string() -> None:
    decoded = run({"A": {"Temperature": 21.5}, "TempUnit": "C"})

    assert [(r.metric, r.unit) for r in decoded.readings] == [("A.Temperature", None)]
    assert decoded.ignored == 1


def test_a_unit_field_globs_match_the_whole_name_case_sensitively() -> None:
    decoded = run({"A": {"temperature": 1, "TemperatureX": 2, "Temperature": 3}, "TempUnit": "F"},
                  ctx({"unit_fields": {"TempUnit": ["*Temperature"]}}))

    assert [(r.metric, r.unit) for r in decoded.readings] == [
        ("A.temperature", None), ("A.TemperatureX", None), ("A.Temperature", "F")]


@pytest.mark.parametrize("unit", ["", "   ", 5, None])
def test_a_unit_field_that_is_no_text_gives_no_unit(unit: object) -> None:
    decoded = run({"A": {"Temperature": 21.5}, "TempUnit": unit}, ctx({"unit_fields": {"TempUnit": ["*Temperature"]}}))

    assert [(r.metric, r.unit) for r in decoded.readings] == [("A.Temperature", None)]


def test_a_unit_field_text_is_stripped() -> None:
    decoded = run({"Temperature": 21.5, "TempUnit": " C "}, ctx({"unit_fields": {"TempUnit": ["Temperature"]}}))

    assert [(r.metric, r.unit) for r in decoded.readings] == [("Temperature", "C")]


def test_unit_fields_apply_per_record_of_a_batch() -> None:
    decoded = run([{"d": "a", "T": 70, "U": "F"}, {"d": "a", "T": 20, "U": "C"}],
                  ctx({"unit_fields": {"U": ["T"]}}))

    assert [(r.value, r.unit) for r in decoded.readings] == [(70.0, "F"), (20.0, "C")]


# --- pairs ---------------------------------------------------------------------------------------


AIRROHR = {"esp8266id": "13463000", "software_version": "NRZ-2020-133",
           "sensordatavalues": [{"value_type": "SDS_P1", "value": "5.53"}, {"value_type": "SDS_P2", "value": "3.10"},
                                {"value_type": "temperature", "value": "21.40"}]}
AIRROHR_PAIRS = {"pairs": {"key": "sensordatavalues", "name": "value_type", "value": "value"}}


def test_pairs_turn_each_item_into_one_reading_named_by_its_name() -> None:
    decoded = run(AIRROHR, ctx(AIRROHR_PAIRS))

    assert named(decoded) == {"SDS_P1": 5.53, "SDS_P2": 3.1, "temperature": 21.4}
    assert decoded.ignored == 2  # esp8266id and software_version


def test_without_pairs_the_list_items_are_indexed_leaves() -> None:
    decoded = run(AIRROHR)

    assert named(decoded) == {"sensordatavalues.0.value": 5.53, "sensordatavalues.1.value": 3.1,
                              "sensordatavalues.2.value": 21.4}


def test_pairs_default_to_name_and_value_keys() -> None:
    decoded = run({"list": [{"name": "a", "value": 1}, {"name": "b", "value": 2}]}, ctx({"pairs": {"key": "list"}}))

    assert named(decoded) == {"a": 1.0, "b": 2.0}


def test_an_item_without_a_usable_name_stays_under_the_list() -> None:
    payload = {"list": [{"name": "a", "value": 1}, {"value": 2}, {"name": "", "value": 3}, {"name": 7, "value": 4},
                        {"name": "x"}]}

    decoded = run(payload, ctx({"pairs": {"key": "list"}}))

    # Each under its own index in the list as sent: {"value": 2} is item 1, and so on.
    assert named(decoded) == {"a": 1.0, "list.1.value": 2.0, "list.2.value": 3.0, "list.3.name": 7.0,
                              "list.3.value": 4.0}


def test_an_item_whose_name_is_already_a_key_stays_under_the_list() -> None:
    decoded = run({"a": 7, "list": [{"name": "a", "value": 1}]}, ctx({"pairs": {"key": "list"}}))

    assert named(decoded) == {"a": 7.0, "list.0.value": 1.0}


def test_pairs_whose_key_is_absent_or_not_a_list_change_nothing() -> None:
    assert named(run({"x": 1}, ctx({"pairs": {"key": "list"}}))) == {"x": 1.0}
    assert named(run({"x": 1, "list": {"name": "a", "value": 2}}, ctx({"pairs": {"key": "list"}}))) == {
        "x": 1.0, "list.value": 2.0}


def test_pairs_with_device_field_read_the_device_from_the_record() -> None:
    decoded = run(AIRROHR, ctx(AIRROHR_PAIRS, device=None, device_field="esp8266id"))

    assert {r.device for r in decoded.readings} == {"13463000"}
    assert decoded.ignored == 1  # software_version; the device_field is consumed


# --- config errors -------------------------------------------------------------------------------


SOURCE = '[[sources]]\nname = "j"\ntopic = "j/{device}"\nformat = "json"\n[sources.options]\n'


def _problem(tmp_path: Path, options: str) -> ConfigProblem:
    path = tmp_path / "sensor-ingest.toml"
    path.write_text(SOURCE + options + "\n", encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    assert len(info.value.problems) == 1, info.value.problems
    return info.value.problems[0]


def test_good_options_load(tmp_path: Path) -> None:
    path = tmp_path / "sensor-ingest.toml"
    path.write_text(SOURCE + 'root = "params"\nonly_if = { method = ["NotifyStatus", 2, true] }\n'
                    'time_required = false\nnaive_time = "receive"\nskip_scalars = true\nallow_empty = true\n'
                    'unit_fields = { TempUnit = ["*Temperature"] }\npairs = { key = "sensordatavalues" }\n',
                    encoding="utf-8")

    options = load_settings(path).sources[0].format_options()

    assert options == {"strings_as_numbers": True, "root": "params", "only_if": {"method": ["NotifyStatus", 2.0, True]},
                       "time_required": False, "naive_time": "receive", "skip_scalars": True, "allow_empty": True,
                       "unit_fields": {"TempUnit": ["*Temperature"]},
                       "pairs": {"key": "sensordatavalues", "name": "name", "value": "value"}}


def test_an_unknown_option_names_the_known_options(tmp_path: Path) -> None:
    p = _problem(tmp_path, 'roots = "params"')

    assert p.key == "sources[0]"
    assert p.message == "options.roots: unknown option for format json"
    assert p.fix == KNOWN


def test_an_unknown_key_of_pairs_is_refused(tmp_path: Path) -> None:
    p = _problem(tmp_path, 'pairs = { key = "l", nam = "n" }')

    assert p.message == "options.pairs.nam: unknown option for format json"


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ("unit_fields = { TempUnit = [] }", "unit_fields.TempUnit: list at least one non-empty metric glob"),
        ('unit_fields = { TempUnit = ["*Temperature", ""] }',
         "unit_fields.TempUnit: list at least one non-empty metric glob"),
        ('naive_time = "guess"', "options.naive_time: Input should be 'reject' or 'receive'"),
        ('root = ""', "options.root: String should have at least 1 character"),
        ('only_if = { method = "NotifyStatus" }', "options.only_if.method: Input should be a valid list"),
        ("only_if = { method = [{ a = 1 }] }", "options.only_if.method.0"),
        ('time_required = "no"', "options.time_required: Input should be a valid boolean"),
        ("skip_scalars = 1", "options.skip_scalars: Input should be a valid boolean"),
        ('allow_empty = "yes"', "options.allow_empty: Input should be a valid boolean"),
        ('pairs = { name = "n" }', "options.pairs.key: Field required"),
        ('pairs = { key = "" }', "options.pairs.key: String should have at least 1 character"),
        ('pairs = { key = "l", value = "" }', "options.pairs.value: String should have at least 1 character"),
        ('unit_fields = { TempUnit = "*Temperature" }', "options.unit_fields.TempUnit: Input should be a valid list"),
    ],
)
def test_bad_option_values_are_config_errors_naming_the_option(tmp_path: Path, options: str, message: str) -> None:
    p = _problem(tmp_path, options)

    assert p.key == "sources[0]"
    assert message in p.message
    assert p.message.endswith(" for format json")
    assert p.fix == KNOWN


def test_an_option_validator_message_has_no_pydantic_prefix(tmp_path: Path) -> None:
    p = _problem(tmp_path, "unit_fields = { TempUnit = [] }")

    assert "Value error" not in p.message


@pytest.mark.parametrize(("options", "message"), [
    ("only_if = { method = [] }", "only_if.method: list at least one value"),
    ('unit_fields = { "s.U" = ["*"] }', "unit_fields.s.U: a unit field is a key of the record itself"),
])
def test_options_that_would_silently_skip_or_lose_are_refused(tmp_path: Path, options: str, message: str) -> None:
    problem = _problem(tmp_path, options)
    assert message in problem.message, problem


@pytest.mark.parametrize("payload", [b"ON", b"single", b"", b"1,2,3", b"12.05", b'"ON"'])
def test_skip_scalars_skips_raw_text_too(payload: bytes) -> None:
    # Zigbee2MQTT's attribute output publishes strings raw, nulls as "" and lists as a,b.
    decoded = run(payload, ctx({"skip_scalars": True}))
    assert (decoded.readings, decoded.problems, decoded.skipped) == ([], [], "scalar")


def test_a_pair_whose_name_is_taken_stays_under_its_own_index() -> None:
    # A second item named "a" cannot be the key "a" again: it keeps its place, l.1, not a new one.
    decoded = run({"l": [{"n": "b", "v": 0}, {"n": "a", "v": 1}, {"n": "a", "v": 2}]},
                  ctx({"pairs": {"key": "l", "name": "n", "value": "v"}}))
    assert named(decoded) == {"b": 0.0, "a": 1.0, "l.2.v": 2.0}
