"""The source mapping (ingest.decoders.mapping) as the config builds it (SourceSettings.mapping)."""

from __future__ import annotations

from datetime import UTC, datetime
from typing import Any

import pytest
from pydantic import ValidationError

from ingest.decoders.mapping import SourceMapping, apply, number_of_text
from ingest.errors import ConfigError
from ingest.model import Reading
from ingest.settings import Settings, SourceSettings, _problems_of

T = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)


def _mapping(**keys: Any) -> SourceMapping:
    return SourceSettings(name="s", topic="t/{device}", format="json", **keys).mapping()


def _r(metric: str, value: float | bool | str, unit: str | None = None) -> Reading:
    return Reading("d", metric, T, value, unit)


@pytest.mark.parametrize(("text", "number"), [
    ("18.83", 18.83), (" -4 ", -4.0), ("1e3", 1000.0), ("+.5", 0.5), ("7.", 7.0),
    ("nan", None), ("inf", None), ("0x1A", None), ("1_000", None), ("", None), ("12 V", None), ("1e999", None),
])
def test_only_plain_decimal_strings_are_numbers(text: str, number: float | None) -> None:
    assert number_of_text(text) == number


def test_rename_scale_offset_and_unit_apply_to_the_decoded_name() -> None:
    m = _mapping(rename={"AM2301.Temperature": "temperature"},
                 metrics={"ENERGY.Voltage": {"scale": 0.1, "offset": 1.0, "unit": "V", "rename": "voltage"}})

    out, ignored = apply([_r("AM2301.Temperature", 21.3), _r("ENERGY.Voltage", 2300.0, "dV"), _r("other", 1.0)], m)

    assert [(r.metric, r.value, r.unit) for r in out] == [
        ("temperature", 21.3, None), ("voltage", pytest.approx(231.0), "V"), ("other", 1.0, None)]
    assert ignored == 0


def test_ignore_globs_drop_and_count() -> None:
    m = _mapping(ignore=["ENERGY.*", "Uptime"])

    out, ignored = apply([_r("ENERGY.Total", 1.0), _r("ENERGY.Today", 2.0), _r("Uptime", 3.0), _r("Temp", 4.0)], m)

    assert [r.metric for r in out] == ["Temp"]
    assert ignored == 3


def test_exact_rule_wins_over_globs_and_matching_globs_complete_it_in_order() -> None:
    m = _mapping(metrics={"*.Temperature": {"unit": "degC", "scale": 2.0}, "*": {"unit": "x", "offset": 5.0},
                          "AM2301.Temperature": {"rename": "t"}, "raw.*": {"scale": 0.1}, "raw.t": {"scale": 1.0}})

    rule = m.rule("AM2301.Temperature")

    assert (rule.rename, rule.unit, rule.scale, rule.offset) == ("t", "degC", 2.0, 5.0)
    assert m.rule("Humidity").unit == "x"
    assert m.rule("raw.t").scale == 1.0  # set on the exact name: the glob's 0.1 does not apply
    assert m.rule("raw.u").scale == 0.1


def test_a_name_listed_exactly_is_a_reading_even_under_an_ignore_glob() -> None:
    m = _mapping(ignore=["ENERGY.*"], rename={"ENERGY.Power": "power"},
                 metrics={"ENERGY.Debug": {"ignore": True, "unit": "x"}})

    out, ignored = apply([_r("ENERGY.Power", 5.0), _r("ENERGY.Total", 1.0), _r("ENERGY.Debug", 2.0)], m)

    assert [(r.metric, r.value) for r in out] == [("power", 5.0)]
    assert ignored == 2


def test_names_longer_than_a_stored_name_are_not_remembered() -> None:
    m = _mapping(ignore=["x*"])

    assert m.rule("x" * 5000).ignore
    assert m.rule("xy").ignore
    assert list(m._cache) == ["xy"]


def test_value_map_turns_strings_into_numbers_and_states_keep_text() -> None:
    m = _mapping(value_map={"ON": 1, "OFF": 0}, states=["Status*"],
                 metrics={"Door": {"value_map": {"open": True, "closed": False}}})

    assert m.text("POWER", "ON") == 1
    assert m.text("POWER", "on") is None  # value maps are exact
    assert m.text("Door", "open") is True
    assert m.text("Door", "ON") is None  # its own map replaces the source's
    assert m.text("StatusText", "running") == "running"
    assert m.text("Temperature", "21.5") == 21.5
    assert m.text("Temperature", "21.5", numbers=False) is None
    assert m.text("Firmware", "9.1.0") is None


def test_value_map_applies_to_text_readings_of_any_format() -> None:
    m = _mapping(value_map={"ON": 1, "OFF": 0}, states=["mode"])

    out, _ = apply([_r("relay", "ON"), _r("mode", "OFF"), _r("mode", "auto"), _r("other", "auto")], m)

    # The same order as a string leaf of json (SourceMapping.text): the value map, then the state.
    assert [r.value for r in out] == [1, 0, "auto", "auto"]
    assert [m.text("mode", "OFF"), m.text("mode", "auto")] == [0, "auto"]


def test_a_value_map_entry_is_stored_as_written_not_scaled() -> None:
    m = _mapping(metrics={"relay": {"value_map": {"ON": 1}, "scale": 10.0}})

    out, _ = apply([_r("relay", "ON"), _r("relay", 2.0)], m)

    assert [r.value for r in out] == [1, 20.0]


def test_scale_leaves_booleans_alone() -> None:
    m = _mapping(metrics={"*": {"scale": 10.0}})

    out, _ = apply([_r("on", True), _r("n", 2.0)], m)

    assert [r.value for r in out] == [True, 20.0]


def test_an_empty_mapping_returns_the_readings_unchanged() -> None:
    readings = [_r("a", 1.0)]

    out, ignored = apply(readings, _mapping())

    assert out == readings
    assert ignored == 0


def _problems(**source: Any) -> str:
    try:
        Settings(sources=[{"name": "s", "topic": "t/{device}", "format": "json", **source}])
    except ValidationError as exc:
        return str(ConfigError("test", _problems_of(exc)))  # what load_settings reports
    raise AssertionError("the source was accepted")


@pytest.mark.parametrize(("source", "expected"), [
    ({"format": "native", "time_field": "Time"}, "time_field is read by the json format, not by native"),
    ({"device_field": "id", "format": "senml"}, "device_field is read by the json format"),
    ({"metrics": {"x": {"scale": 0}}}, "a scale of 0"),
    ({"metrics": {"x": {"sacle": 2}}}, "did you mean 'scale'"),
    ({"metrics": {"x": {"scale": float("nan")}}}, "sources[0].metrics.x.scale"),
    ({"rename": {"a": "b"}, "metrics": {"a": {"rename": "c"}}}, "renamed both in rename and in metrics.a.rename"),
    ({"rename": {"a": ""}}, "rename of 'a' \"\" is empty"),
    ({"ignore": [""]}, "entry [0] is empty"),
    ({"value_map": {"ON": "yes"}}, "sources[0].value_map.ON"),
    ({"format": "value", "topic": "plain/topic", "device_prefix": "x"}, "the value format takes the device"),
    ({"rename": {"a": "tab\there"}}, "contains control characters"),
    ({"metrics": {"x": {"unit": "a-unit-that-is-far-longer-than-32-chars"}}}, "at most 32 characters"),
    ({"value_map": {"ON": float("nan")}}, "value_map['ON'] is nan"),
    ({"metrics": {"x": {"value_map": {"ON": float("inf")}}}}, "value_map['ON'] is inf"),
    ({"rename": {"a": "b"}, "ignore": ["a"]}, "'a' is both renamed and ignored"),
    ({"options": {"strings_as_numbers": "no"}}, "options.strings_as_numbers"),
    ({"topic": "#", "device_prefix": "x"}, "subscribes to every topic (#)"),
    ({"topic": "{device}/#"}, "subscribes to every topic (+/#)"),
])
def test_mapping_mistakes_name_the_key_and_the_fix(source: dict[str, Any], expected: str) -> None:
    assert expected in _problems(**source)
