"""The no_data, rate and window kinds of [[rules]] as config (issue #16): RuleSettings and
compile_alerts (ingest/alerts/settings.py), the rule index and GET /v1/rules (ingest/alerts/runtime.py).

Each kind compiles to the Rule the evaluator runs; each mistake is refused with the rule's name and
the fix; a no_data rule per device is fed readings of every metric.
"""

from __future__ import annotations

import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import httpx
import pytest
from pydantic import ValidationError

from ingest.alerts.model import Rule
from ingest.alerts.runtime import AlertRuntime, RuleSet, RuleSetView, _changes, load_rules, view_of
from ingest.alerts.settings import RuleSettings, compile_alerts
from ingest.cli import main
from ingest.http import create_app
from ingest.metrics import Metrics

# The issue's examples, as the config file writes them.
LEVEL_SILENT: dict[str, Any] = {"name": "level-silent", "metric": "water_level", "no_data": "15m", "per": "series"}
GATEWAY_SILENT: dict[str, Any] = {"name": "gateway-silent", "no_data": "30m", "per": "device", "devices": ["hn-gw-*"]}
RIVER_RISING: dict[str, Any] = {"name": "river-rising", "metric": "water_level", "rate": {"over": "10m", "above": 0.5},
                "clear": 0.2, "for": "2m"}
PM25_HOURLY: dict[str, Any] = {"name": "pm25-hourly", "metric": "pm2_5",
               "window": {"agg": "avg", "over": "1h", "align": "clock", "coverage": 0.75}, "above": 55.5, "clear": 50}
PM25_HIGH: dict[str, Any] = {"name": "pm25-high", "metric": "pm2_5", "above": 55.5}


def compiled(written: dict[str, Any]) -> Rule:
    rules, _, problems = compile_alerts([RuleSettings.model_validate(written)], [], env={})
    assert problems == []
    (only,) = rules
    return only


def refusal(written: dict[str, Any]) -> tuple[tuple[int | str, ...], str, str]:
    """(where, message, fix) of the one problem of an entry."""
    with pytest.raises(ValidationError) as caught:
        RuleSettings.model_validate(written)
    (err,) = caught.value.errors(include_url=False)
    return tuple(err["loc"]), err["msg"], str((err.get("ctx") or {}).get("fix", ""))


# -- each kind compiles to its Rule ----------------------------------------------------------------------------


def test_no_data_per_series_compiles_to_the_silence_in_seconds() -> None:
    assert compiled(LEVEL_SILENT) == Rule("level-silent", "water_level", "above", 900.0, signal="no_data",
                                          per="series")


def test_no_data_per_series_is_the_default() -> None:
    rule = compiled({"name": "r", "metric": "m", "no_data": 90})
    assert (rule.signal, rule.per, rule.per_device, rule.threshold) == ("no_data", "series", False, 90.0)


def test_no_data_per_device_has_no_metric() -> None:
    rule = compiled(GATEWAY_SILENT)
    assert rule == Rule("gateway-silent", "", "above", 1800.0, devices=("hn-gw-*",), signal="no_data", per="device")
    assert rule.per_device
    assert (rule.clear, rule.for_seconds) == (None, 0.0)


def test_rate_above_compiles_to_its_level_and_span() -> None:
    assert compiled(RIVER_RISING) == Rule("river-rising", "water_level", "above", 0.5, clear=0.2, for_seconds=120.0,
                                          signal="rate", over=600.0)


def test_rate_below_is_a_fall() -> None:
    rule = compiled({"name": "r", "metric": "m", "rate": {"over": "5m", "below": -0.5}, "clear": -0.2})
    assert (rule.signal, rule.kind, rule.threshold, rule.clear, rule.over) == ("rate", "below", -0.5, -0.2, 300.0)


@pytest.mark.parametrize(("level", "kind"), [("above", "above"), ("below", "below")])
def test_a_rate_level_of_zero_is_accepted(level: str, kind: str) -> None:
    # Any rise (or fall) at all; a steady series, rate 0, does not fire (the levels are strict).
    rule = compiled({"name": "r", "metric": "m", "rate": {"over": "10m", level: 0}})
    assert (rule.kind, rule.threshold, rule.breached(0.0)) == (kind, 0.0, False)


def test_window_compiles_with_its_level_and_clear() -> None:
    assert compiled(PM25_HOURLY) == Rule("pm25-hourly", "pm2_5", "above", 55.5, clear=50.0, signal="window",
                                         over=3600.0, agg="avg", align="clock", coverage=0.75)


def test_window_defaults_avg_clock_and_any_coverage() -> None:
    rule = compiled({"name": "r", "metric": "m", "window": {"over": "15m"}, "below": 3})
    assert (rule.signal, rule.agg, rule.align, rule.coverage, rule.over, rule.kind, rule.threshold) == (
        "window", "avg", "clock", 0.0, 900.0, "below", 3.0)


def test_window_outside_takes_a_clear_range() -> None:
    rule = compiled({"name": "r", "metric": "m", "window": {"agg": "max", "over": "10m", "align": "rolling"},
                     "outside": [10, 80], "clear": [20, 70], "for": "1m"})
    assert (rule.kind, rule.threshold, rule.high, rule.clear, rule.clear_high, rule.agg, rule.align,
            rule.for_seconds) == ("outside", 10.0, 80.0, 20.0, 70.0, "max", "rolling", 60.0)


def test_a_threshold_rule_is_signal_value_as_before() -> None:
    assert compiled(PM25_HIGH) == Rule("pm25-high", "pm2_5", "above", 55.5)


@pytest.mark.parametrize(("window", "over"), [({"over": "90s"}, 90.0), ({"over": "2d"}, 172800.0),
                                              ({"over": "1d"}, 86400.0), ({"over": "7m", "align": "rolling"}, 420.0),
                                              ({"over": "25h", "align": "rolling"}, 90000.0),
                                              ({"over": "1h", "coverage": 1}, 3600.0),
                                              ({"over": "1h", "agg": "count"}, 3600.0)])
def test_window_spans_that_are_taken(window: dict[str, Any], over: float) -> None:
    assert compiled({"name": "r", "metric": "m", "window": window, "above": 1}).over == over


def test_kinds_with_the_same_level_have_different_versions() -> None:
    # Rule.version decides whether two workers run the same rule: the kind is part of it.
    value = compiled({"name": "r", "metric": "m", "above": 1})
    rate = compiled({"name": "r", "metric": "m", "rate": {"over": "1m", "above": 1}})
    window = compiled({"name": "r", "metric": "m", "window": {"over": "1m"}, "above": 1})
    assert len({value.version, rate.version, window.version}) == 3


# -- refusals: the rule, what it set, the fix ------------------------------------------------------------------

# (what the entry sets beside its name "x", fragments of the message, fragments of the fix)
REFUSED: dict[str, tuple[dict[str, Any], list[str], list[str]]] = {
    "rate and above": (
        {"metric": "m", "rate": {"over": "10m", "above": 0.5}, "above": 1},
        ["rule 'x' sets rate and above: a rate rule puts its level inside rate",
         'rate = { over = "10m", above = 0.5 }'],
        ["move the level into rate", "remove above"]),
    "rate and outside": (
        {"metric": "m", "rate": {"over": "10m", "above": 0.5}, "outside": [1, 2]},
        ["rule 'x' sets rate and outside"], ["remove outside"]),
    "rate and window": (
        {"metric": "m", "rate": {"over": "10m", "above": 0.5}, "window": {"over": "1h"}, "above": 1},
        ["rule 'x' sets rate and window: a rule is of one kind"], ["one [[rules]] entry per kind"]),
    "no_data and rate": (
        {"metric": "m", "no_data": "15m", "rate": {"over": "10m", "above": 0.5}},
        ["rule 'x' sets no_data and rate"], ["one [[rules]] entry per kind"]),
    "no_data and above": (
        {"metric": "m", "no_data": "15m", "above": 1},
        ["rule 'x' sets no_data and above: a no_data rule fires on silence alone"], ["remove above"]),
    "no_data and for": (
        {"metric": "m", "no_data": "15m", "for": "2m"},
        ["rule 'x' sets no_data and for: the no_data duration is the hold"],
        ['remove for, and lengthen no_data instead, e.g. no_data = "17m"']),
    "no_data and for = 0": (
        {"metric": "m", "no_data": "15m", "for": 0},
        ["rule 'x' sets no_data and for"], ["remove for"]),
    "no_data and clear": (
        {"metric": "m", "no_data": "15m", "clear": 5},
        ["rule 'x' sets no_data and clear: a reading resolves a no_data rule"], ["remove clear"]),
    "no_data under a second": (
        {"metric": "m", "no_data": "500ms"},
        ["rule 'x': no_data = 0.5s is shorter than a second"], ['at least "1s"']),
    "no_data of zero": (
        {"metric": "m", "no_data": 0},
        ["rule 'x': no_data = 0s is shorter than a second"], ['at least "1s"']),
    "per without no_data": (
        {"metric": "m", "above": 1, "per": "device"},
        ["rule 'x' sets per without no_data"], ['remove per, or add no_data = "15m"']),
    "metric with per = device": (
        {"metric": "water_level", "no_data": "15m", "per": "device"},
        ["rule 'x' sets metric 'water_level' with per = \"device\""],
        ["remove metric, or use per = \"series\" to watch that metric alone"]),
    "no metric, no_data per series": (
        {"no_data": "15m"},
        ["rule 'x' names no metric"], ['metric = "pm2_5"', 'or set per = "device"']),
    "no metric, threshold": (
        {"above": 1},
        ["rule 'x' names no metric"], ['set metric to the stored metric it watches, e.g. metric = "pm2_5"']),
    "no metric, rate": (
        {"rate": {"over": "10m", "above": 0.5}},
        ["rule 'x' names no metric"], ['metric = "pm2_5"']),
    "no metric, window": (
        {"window": {"over": "1h"}, "above": 1},
        ["rule 'x' names no metric"], ['metric = "pm2_5"']),
    "rate without a level": (
        {"metric": "m", "rate": {"over": "10m"}},
        ["rule 'x': rate sets neither of above, below"], ["set exactly one", "below = -0.5 for falls"]),
    "rate with both levels": (
        {"metric": "m", "rate": {"over": "10m", "above": 0.5, "below": -0.5}},
        ["rule 'x': rate sets above and below of above, below"], ["set exactly one"]),
    "rate over under a second": (
        {"metric": "m", "rate": {"over": "200ms", "above": 0.5}},
        ["rule 'x': rate.over = 0.2s is shorter than a second"], ['at least "1s"']),
    "rate clear above its level": (
        {"metric": "m", "rate": {"over": "10m", "above": 0.5}, "clear": 0.6},
        ["rule 'x': clear = 0.6 is above the rate's threshold 0.5"], ["set clear at or below rate's above"]),
    "rate clear below its fall": (
        {"metric": "m", "rate": {"over": "10m", "below": -0.5}, "clear": -0.6},
        ["rule 'x': clear = -0.6 is below the rate's threshold -0.5"], ["set clear at or above rate's below"]),
    "rate clear range": (
        {"metric": "m", "rate": {"over": "10m", "above": 0.5}, "clear": [0, 1]},
        ["rule 'x': clear is a range only with outside"], ["write one number"]),
    # A level on the wrong side of zero holds for a steady series (rate 0): every device would page.
    "rate rise of a negative rate": (
        {"metric": "m", "rate": {"over": "10m", "above": -0.5}},
        ["rule 'x': rate.above = -0.5 is a fall, so a steady series (rate 0) would fire"],
        ["for falls write below = a negative rate per minute", "for rises above = a positive one"]),
    "rate fall of a positive rate": (
        {"metric": "m", "rate": {"over": "10m", "below": 0.5}},
        ["rule 'x': rate.below = 0.5 is a rise, so a steady series (rate 0) would fire"],
        ["for falls write below = a negative rate per minute, e.g. below = -0.5"]),
    "window without a level": (
        {"metric": "m", "window": {"over": "1h"}},
        ["rule 'x' sets window and none of above, below, outside"],
        ["set exactly one beside window: the level its avg is judged against"]),
    "window with two levels": (
        {"metric": "m", "window": {"agg": "max", "over": "1h"}, "above": 1, "below": 0},
        ["rule 'x' sets window and above and below"], ["the level its max is judged against"]),
    "window clear above the threshold": (
        {"metric": "m", "window": {"over": "1h"}, "above": 55.5, "clear": 60},
        ["rule 'x': clear = 60 is above the threshold 55.5"], ["set clear at or below above"]),
    "window clear outside the range": (
        {"metric": "m", "window": {"over": "1h"}, "outside": [1, 9], "clear": [0, 5]},
        ["rule 'x': clear = [0, 5] must lie inside outside"], ["narrow clear"]),
    "window coverage over 1": (
        {"metric": "m", "window": {"over": "1h", "coverage": 1.5}, "above": 1},
        ["rule 'x': window.coverage = 1.5 is not a share"], ["from 0 to 1, e.g. coverage = 0.75"]),
    "window coverage negative": (
        {"metric": "m", "window": {"over": "1h", "coverage": -0.1}, "above": 1},
        ["rule 'x': window.coverage = -0.1 is not a share"], ["from 0 to 1"]),
    "window over under a second": (
        {"metric": "m", "window": {"over": "0.5s"}, "above": 1},
        ["rule 'x': window.over = 0.5s is shorter than a second"], ['at least "1s"']),
    "clock window of 7m": (
        {"metric": "m", "window": {"over": "7m"}, "above": 1},
        ["rule 'x': window.over = \"7m\" neither divides a day nor is whole days"],
        ['e.g. over = "5m" or "10m", or align = "rolling"']),
    "clock window of 25h": (
        {"metric": "m", "window": {"over": "25h"}, "above": 1},
        ["rule 'x': window.over = \"25h\" neither divides a day"], ['e.g. over = "1d" or "2d"']),
    "clock window of 7s": (
        {"metric": "m", "window": {"over": 7}, "above": 1},
        ["window.over = \"7s\""], ['e.g. over = "5s" or "10s"']),
    "nothing to judge": (
        {"metric": "m"},
        ["rule 'x' sets none of above, below, outside"], ["set exactly one", "or make it a no_data, rate or window"]),
}


@pytest.mark.parametrize("case", list(REFUSED))
def test_a_mixed_or_bad_kind_is_refused_with_the_rule_and_the_fix(case: str) -> None:
    written, said, fix_said = REFUSED[case]
    where, message, fix = refusal({"name": "x", **written})
    assert where == ()  # the entry's own check, which names the rule
    for part in said:
        assert part in message, f"{case}: {part!r} not in {message!r}"
    for part in fix_said:
        assert part in fix, f"{case}: {part!r} not in {fix!r}"


# Refused by the key itself: located by the key (the config file's loader adds the rule's name).
KEY_REFUSED: dict[str, tuple[dict[str, Any], tuple[str, ...], str, str]] = {
    "unknown key in rate": (
        {"metric": "m", "rate": {"over": "10m", "abov": 0.5}}, ("rate",),
        "rate has an unknown key 'abov'", "did you mean 'above'? rate takes over, above, below"),
    "unknown key in window": (
        {"metric": "m", "window": {"over": "1h", "aligned": "clock"}, "above": 1}, ("window",),
        "window has an unknown key 'aligned'", "did you mean 'align'? window takes agg, over, align, coverage"),
    "a level in window": (
        {"metric": "m", "window": {"over": "1h", "above": 1}}, ("window",),
        "window has an unknown key 'above'", "window takes agg, over, align, coverage"),
    "rate not a table": (
        {"metric": "m", "rate": 0.5}, ("rate",), "rate is a table", 'write e.g. rate = { over = "10m", above = 0.5 }'),
    "window not a table": (
        {"metric": "m", "window": "1h", "above": 1}, ("window",), "window is a table", 'window = { agg = "avg"'),
    "rate without over": (
        {"metric": "m", "rate": {"above": 0.5}}, ("rate", "over"), "Field required", ""),
    "rate.over not a duration": (
        {"metric": "m", "rate": {"over": "ten minutes", "above": 0.5}}, ("rate", "over"),
        "rate.over: 'ten minutes' is not a duration", 'write a duration such as "30s"'),
    "window.agg unknown": (
        {"metric": "m", "window": {"over": "1h", "agg": "mean"}, "above": 1}, ("window", "agg"),
        "window.agg 'mean' is not an aggregate", 'use "avg", "min", "max" or "count"'),
    "window.align unknown": (
        {"metric": "m", "window": {"over": "1h", "align": "hour"}, "above": 1}, ("window", "align"),
        "window.align 'hour' is not an alignment", 'use "clock"'),
    "rate level not finite": (
        {"metric": "m", "rate": {"over": "10m", "above": float("inf")}}, ("rate", "above"), "finite number", ""),
    "per unknown": (
        {"metric": "m", "no_data": "15m", "per": "gateway"}, ("per",),
        "per 'gateway' is not what a no_data rule watches", 'per = "device" (any metric)'),
    "no_data not a duration": (
        {"metric": "m", "no_data": "soon"}, ("no_data",), "no_data: 'soon' is not a duration", "write a duration"),
    "empty metric": (
        {"metric": " ", "above": 1}, ("metric",), "metric is empty", 'metric = "pm2_5"'),
}


@pytest.mark.parametrize("case", list(KEY_REFUSED))
def test_a_bad_key_of_a_kind_is_refused_at_the_key(case: str) -> None:
    written, loc, said, fix_said = KEY_REFUSED[case]
    where, message, fix = refusal({"name": "x", **written})
    assert where == loc
    assert said in message
    assert fix_said in fix


def test_the_config_file_names_the_rule_of_each_problem(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ingest.toml"
    path.write_text("""
[[rules]]
name = "river-rising"
metric = "water_level"
rate = { over = "10m", abov = 0.5 }

[[rules]]
name = "gateway-silent"
no_data = "30m"
per = "device"
metric = "water_level"

[[rules]]
name = "pm25-hourly"
metric = "pm2_5"
window = { agg = "avg", over = "50m" }
above = 55.5
""", encoding="utf-8")

    assert main(["rules", "check", str(path)]) == 1

    lines = capsys.readouterr().err.splitlines()
    assert lines[0] == f"sensor-ingest: {path}: 3 problem(s)"
    assert lines[1].startswith("  - rules[0] (river-rising).rate: rate has an unknown key 'abov' (fix: did you mean "
                               "'above'?")
    assert lines[2].startswith("  - rules[1] (gateway-silent): rule 'gateway-silent' sets metric 'water_level' with "
                               'per = "device"')
    assert "(fix: remove metric" in lines[2]
    assert lines[3].startswith("  - rules[2] (pm25-hourly): rule 'pm25-hourly': window.over = \"50m\" neither "
                               "divides a day")
    assert '(fix: use a span that divides a day or whole days, e.g. over = "30m" or "1h"' in lines[3]


# -- the rule index: a per-device no_data rule takes readings of every metric -----------------------------------

ALL = (LEVEL_SILENT, GATEWAY_SILENT, RIVER_RISING, PM25_HOURLY, PM25_HIGH)


def rule_set(*written: dict[str, Any]) -> RuleSet:
    rules, hooks, problems = compile_alerts([RuleSettings.model_validate(w) for w in written], [], env={})
    assert problems == []
    return RuleSet(rules, hooks)


def test_rules_for_appends_the_per_device_rules_to_every_metric() -> None:
    active = rule_set(*ALL)
    runtime = AlertRuntime(active)
    names = {m: [r.name for r in runtime.rules_for(m)] for m in ("water_level", "pm2_5", "battery", "")}
    assert names == {
        "water_level": ["level-silent", "river-rising", "gateway-silent"],
        "pm2_5": ["pm25-hourly", "pm25-high", "gateway-silent"],
        "battery": ["gateway-silent"],  # a metric no rule names: still a sign of life of the device
        "": ["gateway-silent"],
    }
    for metric, expected in names.items():
        assert [r.name for r in active.for_metric(metric)] == expected
    assert runtime.metrics == frozenset({"water_level", "pm2_5"})


def test_without_per_device_rules_an_unnamed_metric_has_none() -> None:
    runtime = AlertRuntime(rule_set(GATEWAY_SILENT, PM25_HIGH))
    assert [r.name for r in runtime.rules_for("noise")] == ["gateway-silent"]
    runtime.replace(rule_set(LEVEL_SILENT, PM25_HIGH))  # a reload drops the per-device rule
    assert runtime.rules_for("noise") == ()
    assert [r.name for r in runtime.rules_for("pm2_5")] == ["pm25-high"]
    assert runtime.active.for_metric("noise") == ()


def test_the_no_data_grace_is_the_setting_else_the_longest_no_data_duration() -> None:
    battery = {"name": "battery-silent", "metric": "battery", "no_data": "7d"}
    assert rule_set(LEVEL_SILENT, GATEWAY_SILENT, PM25_HIGH).grace == 1800.0
    assert rule_set(LEVEL_SILENT, battery).grace == 7 * 86400.0
    assert rule_set(PM25_HIGH, RIVER_RISING).grace == 0.0  # no no_data rule: nothing to hold back
    assert replace(rule_set(LEVEL_SILENT, battery), no_data_grace=30.0).grace == 30.0
    assert replace(rule_set(LEVEL_SILENT), no_data_grace=0.0).grace == 0.0


# -- GET /v1/rules and `rules list` -----------------------------------------------------------------------------

COMMON = {"for": 0.0, "severity": "warning", "webhooks": [], "devices": [], "where": {}, "labels": {}, "summary": ""}


def test_view_shows_each_kind_and_its_parameters() -> None:
    view = view_of(rule_set(*ALL)).model_dump(mode="json", by_alias=True)
    by_name = {r["name"]: r for r in view["rules"]}
    assert by_name["level-silent"] == {**COMMON, "name": "level-silent", "metric": "water_level", "signal": "no_data",
                                       "kind": "above", "threshold": 900.0, "clear": 900.0, "no_data": 900.0,
                                       "per": "series"}
    assert by_name["gateway-silent"] == {**COMMON, "name": "gateway-silent", "metric": "", "signal": "no_data",
                                         "kind": "above", "threshold": 1800.0, "clear": 1800.0, "no_data": 1800.0,
                                         "per": "device", "devices": ["hn-gw-*"]}
    assert by_name["river-rising"] == {**COMMON, "name": "river-rising", "metric": "water_level", "signal": "rate",
                                       "kind": "above", "threshold": 0.5, "clear": 0.2, "for": 120.0,
                                       "rate": {"over": 600.0, "above": 0.5}}
    assert by_name["pm25-hourly"] == {**COMMON, "name": "pm25-hourly", "metric": "pm2_5", "signal": "window",
                                      "kind": "above", "threshold": 55.5, "clear": 50.0,
                                      "window": {"agg": "avg", "over": 3600.0, "align": "clock", "coverage": 0.75}}
    # A threshold rule: the fields it always had, and signal.
    assert by_name["pm25-high"] == {**COMMON, "name": "pm25-high", "metric": "pm2_5", "signal": "value",
                                    "kind": "above", "threshold": 55.5, "clear": 55.5}


def test_view_of_a_falling_rate_shows_below() -> None:
    view = view_of(rule_set({"name": "r", "metric": "m", "rate": {"over": "5m", "below": -0.5}}))
    assert view.model_dump(mode="json", by_alias=True)["rules"][0]["rate"] == {"over": 300.0, "below": -0.5}


def test_the_view_reads_back_and_reads_an_older_service() -> None:
    view = view_of(rule_set(*ALL))
    dumped = view.model_dump(mode="json", by_alias=True)
    assert RuleSetView.model_validate(dumped) == view
    # A service of the release before the kinds: no signal; every rule is a threshold on the value.
    old = {**dumped, "rules": [{k: v for k, v in dumped["rules"][-1].items() if k != "signal"}]}
    assert RuleSetView.model_validate(old).rules[0].signal == "value"
    # A newer service may send keys this release does not know: ignored.
    newer = {**dumped, "rules": [{**dumped["rules"][0], "since": "2030-01-01"}], "silences": []}
    assert RuleSetView.model_validate(newer).rules[0].no_data == 900.0


@pytest.mark.asyncio
async def test_get_v1_rules_shows_the_kinds() -> None:
    runtime = AlertRuntime(rule_set(*ALL))
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app=create_app(Metrics(), lambda: {}, alerts=runtime)),
                                 base_url="http://ingest") as client:
        got = await client.get("/v1/rules")
    assert got.status_code == 200
    assert got.json() == view_of(runtime.active).model_dump(mode="json", by_alias=True)
    high = got.json()["rules"][-1]
    assert "rate" not in high
    assert "no_data" not in high
    assert "window" not in high
    assert "per" not in high


def test_a_reload_names_the_changed_kind_parameters() -> None:
    before = rule_set(PM25_HOURLY, GATEWAY_SILENT)
    after = rule_set({**PM25_HOURLY, "window": {**PM25_HOURLY["window"], "over": "30m", "coverage": 0.5}},
                     {**GATEWAY_SILENT, "no_data": "1h"})
    assert _changes(before, after) == ["rule(s) changed: pm25-hourly (over, coverage), gateway-silent (threshold)"]


def test_load_rules_reads_the_issue_example(tmp_path: Path) -> None:
    path = tmp_path / "ingest.toml"
    path.write_text(ISSUE_EXAMPLE, encoding="utf-8")
    active, problems = load_rules(path)
    assert problems == []
    assert active is not None
    assert [(r.name, r.signal, r.metric) for r in active.rules] == [
        ("level-silent", "no_data", "water_level"), ("gateway-silent", "no_data", ""),
        ("river-rising", "rate", "water_level"), ("pm25-hourly", "window", "pm2_5")]
    assert active.rules == rule_set(*ALL[:4]).rules


ISSUE_EXAMPLE = """
[[rules]]                       # no data: a series silent longer than the duration fires; a reading resolves it
name = "level-silent"
metric = "water_level"
no_data = "15m"
per = "series"

[[rules]]
name = "gateway-silent"
no_data = "30m"
per = "device"
devices = ["hn-gw-*"]

[[rules]]                       # rate of change, in units of the metric per minute
name = "river-rising"
metric = "water_level"
rate = { over = "10m", above = 0.5 }
clear = 0.2
for = "2m"

[[rules]]                       # windowed aggregate
name = "pm25-hourly"
metric = "pm2_5"
window = { agg = "avg", over = "1h", align = "clock", coverage = 0.75 }
above = 55.5
clear = 50
"""


@pytest.mark.usefixtures("_restore_logging")
def test_rules_check_prints_each_kind_readably(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ingest.toml"
    path.write_text(ISSUE_EXAMPLE, encoding="utf-8")

    assert main(["rules", "check", str(path)]) == 0

    rows = {line.split()[0]: line for line in capsys.readouterr().out.splitlines() if line.split()}
    assert "water_level" in rows["level-silent"]
    assert "no data for 15m " in rows["level-silent"]
    assert "a reading" in rows["level-silent"]
    assert "any metric" in rows["gateway-silent"]
    assert "no data for 30m (per device)" in rows["gateway-silent"]
    assert "rate over 10m > 0.5/min" in rows["river-rising"]
    assert "0.2/min" in rows["river-rising"]
    assert "2m" in rows["river-rising"]
    assert "avg over 1h (clock, coverage 0.75) > 55.5" in rows["pm25-hourly"]


@pytest.mark.usefixtures("_restore_logging")
def test_rules_check_json_is_the_view(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = tmp_path / "ingest.toml"
    path.write_text(ISSUE_EXAMPLE, encoding="utf-8")

    assert main(["rules", "check", "--json", str(path)]) == 0

    shown = json.loads(capsys.readouterr().out)
    assert shown["rules"] == view_of(rule_set(*ALL[:4])).model_dump(mode="json", by_alias=True)["rules"]
