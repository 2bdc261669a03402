"""Presets (ingest/presets.py, [presets] in ingest/settings.py) and what issue #12 added around them:
routing order against configured sources, excluded topics, the `decode` fallback, the per-message
limits, and the CLI's `presets` command and `decode --received-at` / `--source`."""

from __future__ import annotations

import json
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from ingest.cli import main
from ingest.errors import ConfigError, ConfigProblem
from ingest.model import FLAG_RECEIVE_TIME, RawMessage
from ingest.presets import PRESETS
from ingest.process import Outcome, Processor, SourceRuntime, _fallback_device
from ingest.settings import IngestSettings, MetricSettings, PresetSettings, Settings, SourceSettings, load_settings

NOW = datetime(2026, 11, 25, 3, 0, 5, tzinfo=UTC)

PRESET_NAMES = ["tasmota", "zigbee2mqtt", "homeassistant", "esphome", "shelly", "homie", "ttn", "chirpstack",
                "airrohr"]
PART_NAMES = [
    "tasmota.sensor", "tasmota.state", "zigbee2mqtt", "homeassistant", "esphome.sensor", "esphome.binary_sensor",
    "esphome.text_sensor", "esphome.switch", "shelly.gen1", "shelly.rpc", "shelly.status", "homie.v5", "homie.v4",
    "ttn", "chirpstack", "airrohr",
]


def _write(tmp_path: Path, text: str) -> Path:
    path = tmp_path / "sensor-ingest.toml"
    path.write_text(text, encoding="utf-8")
    return path


def _problem(tmp_path: Path, text: str) -> ConfigProblem:
    with pytest.raises(ConfigError) as info:
        load_settings(_write(tmp_path, text))
    assert len(info.value.problems) == 1, info.value.problems
    return info.value.problems[0]


def _names(settings: Settings) -> list[str]:
    return [s.name for s in settings.all_sources()]


def process(processor: Processor, topic: str, payload: bytes) -> Outcome:
    return processor.process(RawMessage(topic, payload, NOW))


def readings(out: Outcome) -> list[tuple[str, str, object, str | None, datetime, int]]:
    return [(r.device, r.metric, r.value, r.unit, r.time, r.flags) for r in out.readings]


# --- [presets] settings --------------------------------------------------------------------------


def test_every_preset_has_a_switch_and_all_are_on_by_default() -> None:
    presets = PresetSettings()

    assert list(PRESETS) == PRESET_NAMES
    assert [n for n in PresetSettings.model_fields if n not in ("enabled", "timezone")] == PRESET_NAMES
    assert presets.enabled is True
    assert presets.timezone is None
    assert presets.active() == PRESET_NAMES


def test_the_default_settings_bring_every_preset_part_in_order() -> None:
    settings = Settings()

    assert [(preset, s.name) for preset, s in settings.preset_sources()] == [
        (name.partition(".")[0], name) for name in PART_NAMES]
    assert _names(settings) == PART_NAMES


@pytest.mark.parametrize("timezone", [None, "Asia/Ho_Chi_Minh"])
def test_every_preset_part_passes_validation_and_none_subscribes_to_everything(timezone: str | None) -> None:
    for preset in PRESETS.values():
        for part in preset.parts(timezone):
            source = SourceSettings(**part)
            # As a configured source too: the device-id bound of [[sources]] applies.
            Settings(sources=[source], presets=PresetSettings(enabled=False))
            runtime = SourceRuntime.of(source)
            assert runtime.route.filter != "#", part["name"]
            assert not all(level is None for level in runtime.route.levels), part["name"]
            assert runtime.options == source.format_options()


def test_the_filters_of_the_default_settings_hold_no_bare_hash() -> None:
    filters = Processor.from_settings(Settings()).filters

    assert "#" not in filters
    assert filters == [
        "tele/+/SENSOR", "tele/+/STATE", "zigbee2mqtt/#", "homeassistant/+/+/#", "+/sensor/+/state",
        "+/binary_sensor/+/state", "+/text_sensor/+/state", "+/switch/+/state", "shellies/+/#", "+/events/rpc",
        "+/status/+", "homie/5/+/#", "homie/+/#", "v3/+/devices/+/up", "application/+/device/+/event/up", "airrohr/#",
    ]


def test_only_the_decode_fallback_adds_the_bare_hash_last() -> None:
    processor = Processor.from_settings(Settings(), fallback=True)

    assert processor.filters[-1] == "#"
    assert processor.filters.count("#") == 1
    auto = processor.sources["auto"]
    assert (auto.settings.format, auto.catch_all, auto.fallback_device) == ("auto", True, "")
    assert not Processor.from_settings(Settings()).sources.get("auto")


def test_a_preset_switched_off(tmp_path: Path) -> None:
    settings = load_settings(_write(tmp_path, "[presets]\ntasmota = false\nhomie = false\n"))

    assert settings.presets.active() == [n for n in PRESET_NAMES if n not in ("tasmota", "homie")]
    assert _names(settings) == [n for n in PART_NAMES if not n.startswith(("tasmota.", "homie."))]


def test_all_presets_switched_off(tmp_path: Path) -> None:
    text = ('[presets]\nenabled = false\ntasmota = true\n\n'
            '[[sources]]\nname = "aq"\ntopic = "city/{device}/up"\nformat = "native"\n')
    settings = load_settings(_write(tmp_path, text))

    assert settings.presets.active() == []
    assert settings.preset_sources() == []
    assert _names(settings) == ["aq"]
    assert Processor.from_settings(settings).filters == ["city/+/up"]


def test_a_preset_replaced_by_a_source_of_its_name(tmp_path: Path) -> None:
    text = '[[sources]]\nname = "zigbee2mqtt"\ntopic = "z2m/{device}"\nformat = "json"\n'
    settings = load_settings(_write(tmp_path, text))

    assert _names(settings) == ["zigbee2mqtt", *(n for n in PART_NAMES if n != "zigbee2mqtt")]
    assert settings.all_sources()[0].topic == "z2m/{device}"
    assert "zigbee2mqtt" not in {preset for preset, _ in settings.preset_sources()}
    assert "zigbee2mqtt/#" not in Processor.from_settings(settings).filters


def test_a_preset_with_several_parts_replaced_by_its_name_drops_every_part(tmp_path: Path) -> None:
    text = '[[sources]]\nname = "shelly"\ntopic = "shellies/{device}/#"\nformat = "value"\n'
    settings = load_settings(_write(tmp_path, text))

    assert _names(settings) == ["shelly", *(n for n in PART_NAMES if not n.startswith("shelly."))]


def test_a_preset_part_replaced_by_a_source_of_its_name(tmp_path: Path) -> None:
    text = '[[sources]]\nname = "shelly.rpc"\ntopic = "{device:shelly*}/events/rpc"\nformat = "json"\n'
    settings = load_settings(_write(tmp_path, text))

    names = _names(settings)
    assert names == ["shelly.rpc", *(n for n in PART_NAMES if n != "shelly.rpc")]
    assert [s.name for p, s in settings.preset_sources() if p == "shelly"] == ["shelly.gen1", "shelly.status"]
    # The configured one is the only shelly.rpc: no option of the preset's is left on it.
    assert settings.all_sources()[0].options == {}


def test_a_preset_switched_off_and_a_source_of_its_name(tmp_path: Path) -> None:
    text = ('[presets]\nttn = false\n\n'
            '[[sources]]\nname = "ttn"\ntopic = "v3/{app}/devices/{device}/up"\nformat = "lorawan"\n')
    settings = load_settings(_write(tmp_path, text))

    assert _names(settings).count("ttn") == 1
    assert _names(settings)[0] == "ttn"


def test_the_presets_timezone_reaches_the_parts_that_read_local_times() -> None:
    settings = Settings(presets=PresetSettings(timezone="Asia/Ho_Chi_Minh"))

    zones = {s.name: s.timezone for s in settings.all_sources()}
    assert zones["tasmota.sensor"] == zones["tasmota.state"] == "Asia/Ho_Chi_Minh"
    assert {n for n, z in zones.items() if z is not None} == {"tasmota.sensor", "tasmota.state"}


def test_an_unknown_presets_timezone_is_a_config_error(tmp_path: Path) -> None:
    p = _problem(tmp_path, '[presets]\ntimezone = "Mars/Olympus_Mons"\n')

    assert p.key == "presets.timezone"
    assert p.message == "unknown time zone 'Mars/Olympus_Mons' (use an IANA name like Asia/Ho_Chi_Minh)"


def test_a_misspelt_preset_suggests_the_known_one(tmp_path: Path) -> None:
    p = _problem(tmp_path, "[presets]\ntasmotaa = false\n")

    assert (p.key, p.message, p.fix) == ("presets.tasmotaa", "unknown key", "did you mean 'tasmota'?")


def test_an_unknown_preset_key_lists_the_known_ones(tmp_path: Path) -> None:
    p = _problem(tmp_path, "[presets]\nqqqqqqqq = false\n")

    assert p.key == "presets.qqqqqqqq"
    assert p.fix == "known keys here: enabled, timezone, " + ", ".join(PRESET_NAMES)


@pytest.mark.parametrize("text", ['[presets]\ntasmota = "no"\n', "[presets]\nenabled = 0\n"])
def test_a_preset_switch_is_a_boolean(tmp_path: Path, text: str) -> None:
    p = _problem(tmp_path, text)

    assert p.key in ("presets.tasmota", "presets.enabled")
    assert p.message == "Input should be a valid boolean"


def test_the_presets_timezone_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SENSOR_INGEST_PRESETS__TIMEZONE", "Asia/Ho_Chi_Minh")

    assert load_settings().presets.timezone == "Asia/Ho_Chi_Minh"


def test_a_preset_switched_off_from_the_environment(monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setenv("SENSOR_INGEST_PRESETS__TASMOTA", "false")

    assert "tasmota" not in load_settings().presets.active()


# --- routing: configured sources before presets --------------------------------------------------


def test_a_configured_source_wins_over_a_preset_on_the_same_topics() -> None:
    settings = Settings(sources=[SourceSettings(name="mine", topic="tele/{device}/SENSOR", format="json",
                                                device_prefix="x-")])
    processor = Processor.from_settings(settings)

    out = process(processor, "tele/d1/SENSOR", b'{"Temperature": 21.5}')
    assert out.source == "mine"
    assert readings(out) == [("x-d1", "Temperature", 21.5, "degC", NOW, FLAG_RECEIVE_TIME)]  # the catalog's unit
    assert process(processor, "tele/d1/STATE", b'{"POWER": "ON"}').source == "tasmota.state"


def test_a_wildcard_first_configured_source_wins_over_a_literal_first_preset() -> None:
    settings = Settings(sources=[SourceSettings(name="any-prefix", topic="{site}/{device}/SENSOR", format="json")])
    processor = Processor.from_settings(settings)

    out = process(processor, "tele/d1/SENSOR", b'{"Temperature": 21.5}')
    assert out.source == "any-prefix"
    assert out.attributes == {"site": "tele"}


def test_a_narrower_configured_source_takes_its_topics_and_the_preset_the_rest() -> None:
    settings = Settings(sources=[SourceSettings(name="garage", topic="zigbee2mqtt/garage/{device}", format="json",
                                                device_prefix="g-")])
    processor = Processor.from_settings(settings)

    out = process(processor, "zigbee2mqtt/garage/door", b'{"contact": true}')
    assert (out.source, readings(out)) == ("garage", [("g-door", "contact", True, None, NOW, FLAG_RECEIVE_TIME)])
    out = process(processor, "zigbee2mqtt/kitchen/door", b'{"contact": false}')
    assert (out.source, readings(out)) == ("zigbee2mqtt", [("kitchen/door", "contact", False, None, NOW,
                                                            FLAG_RECEIVE_TIME)])


def test_a_topic_a_configured_source_excludes_goes_on_to_the_preset() -> None:
    settings = Settings(sources=[SourceSettings(name="z2m-mine", topic="zigbee2mqtt/{device#}", format="json",
                                                exclude=["zigbee2mqtt/guest/*"], device_prefix="m-")])
    processor = Processor.from_settings(settings)

    assert process(processor, "zigbee2mqtt/guest/lamp", b'{"power": 5}').source == "zigbee2mqtt"
    out = process(processor, "zigbee2mqtt/hall/lamp", b'{"power": 5}')
    assert (out.source, [r.device for r in out.readings]) == ("z2m-mine", ["m-hall/lamp"])


def test_among_presets_the_earlier_wins_an_overlapping_topic() -> None:
    # A Zigbee2MQTT friendly name "sensor/x/state" spells an ESPHome state topic's shape too.
    out = process(Processor.from_settings(Settings()), "zigbee2mqtt/sensor/x/state", b'{"temperature": 20}')

    assert out.source == "zigbee2mqtt"
    assert readings(out) == [("sensor/x/state", "temperature", 20.0, "degC", NOW, FLAG_RECEIVE_TIME)]


# --- excluded topics -----------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "source"),
    [
        ("zigbee2mqtt/bridge/state", "zigbee2mqtt"),
        ("zigbee2mqtt/bridge", "zigbee2mqtt"),
        ("zigbee2mqtt/Living Room/lamp/set", "zigbee2mqtt"),
        ("zigbee2mqtt/lamp/availability", "zigbee2mqtt"),
        ("homie/dev1/$state", "homie.v4"),
        ("homie/5/dev1/node/$name", "homie.v5"),
        ("homie/dev1/node/temp/set", "homie.v4"),
        ("shellies/sh1/announce", "shelly.gen1"),
        ("shellies/announce", "shelly.gen1"),
        ("homeassistant/sensor/t1/config", "homeassistant"),
        ("tasmota-1/events/rpc", "shelly.rpc"),  # refused by the {device:[Ss]helly*} glob
    ],
)
@pytest.mark.parametrize("fallback", [False, True])
def test_an_excluded_topic_is_skipped_as_excluded_not_rejected(topic: str, source: str, fallback: bool) -> None:
    out = process(Processor.from_settings(Settings(), fallback=fallback), topic, b'{"state": "online"}')

    assert (out.source, out.skipped, out.rejection, out.readings) == (source, "excluded", None, [])
    assert out.as_json()["skipped"] == "excluded"


def test_a_topic_no_filter_brings_in_is_no_source_not_excluded() -> None:
    out = process(Processor.from_settings(Settings()), "elsewhere/x", b"1")

    assert out.skipped is None
    assert out.rejection is not None
    assert (out.source, out.rejection.reason) == (None, "no_source")


# --- the decode fallback -------------------------------------------------------------------------


@pytest.mark.parametrize(
    ("topic", "prefixes", "device"),
    [
        ("tele/dev1/RESULT", frozenset({"tele"}), "dev1"),
        ("tele/dev1", frozenset({"tele"}), "dev1"),
        ("tele", frozenset({"tele"}), "tele"),
        ("tele/", frozenset({"tele"}), "tele/"),
        ("tele//x", frozenset({"tele"}), "tele//x"),
        ("stat/dev1/RESULT", frozenset({"tele"}), "stat/dev1/RESULT"),
        ("tele/dev1/RESULT", frozenset(), "tele/dev1/RESULT"),
    ],
)
def test_fallback_device(topic: str, prefixes: frozenset[str], device: str) -> None:
    assert _fallback_device(topic, prefixes) == device


def test_the_fallback_device_is_the_second_level_after_a_preset_first_level() -> None:
    processor = Processor.from_settings(Settings(), fallback=True)

    out = process(processor, "tele/dev1/RESULT", b'{"Temp": 5}')
    assert (out.source, readings(out)) == ("auto", [("dev1", "Temp", 5.0, "degC", NOW, FLAG_RECEIVE_TIME)])
    out = process(processor, "tele/dev1/POWER", b"ON")
    assert (out.source, readings(out)) == ("auto", [("dev1", "POWER", True, None, NOW, FLAG_RECEIVE_TIME)])


def test_the_fallback_device_is_the_whole_topic_after_an_unknown_first_level() -> None:
    out = process(Processor.from_settings(Settings(), fallback=True), "nothing/here", b"21")

    assert (out.source, out.rejection) == ("auto", None)
    assert readings(out) == [("nothing/here", "value", 21.0, None, NOW, FLAG_RECEIVE_TIME)]


def test_the_known_first_levels_are_those_of_the_sources_in_use() -> None:
    settings = Settings(sources=[SourceSettings(name="c", topic="city/{device}", format="value")],
                        presets=PresetSettings(enabled=False))
    processor = Processor.from_settings(settings, fallback=True)

    assert processor.sources["auto"].fallback_prefixes == frozenset({"city"})
    assert [r.device for r in process(processor, "city/d7/x", b"1").readings] == ["d7"]
    assert [r.device for r in process(processor, "tele/d7/x", b"1").readings] == ["tele/d7/x"]


def test_without_the_fallback_an_unmatched_topic_is_no_source() -> None:
    out = process(Processor.from_settings(Settings()), "tele/dev1/RESULT", b'{"Temp": 5}')

    assert out.rejection is not None
    assert out.rejection.reason == "no_source"


def test_no_fallback_with_a_source_or_a_format() -> None:
    assert "auto" not in Processor.from_settings(Settings(), fallback=True, source="ttn").sources
    with_format = Processor.from_settings(Settings(), fallback=True, override_format="json")
    assert "auto" not in with_format.sources
    assert list(with_format.sources)[-1] == "adhoc"


def test_a_configured_source_named_auto_keeps_its_mapping_with_the_fallback() -> None:
    settings = Settings(sources=[SourceSettings(name="auto", topic="city/{device}", format="value",
                                                metrics={"value": MetricSettings(unit="degC")})],
                        presets=PresetSettings(enabled=False))
    assert [r.unit for r in process(Processor.from_settings(settings), "city/d1", b"21.5").readings] == ["degC"]

    out = process(Processor.from_settings(settings, fallback=True), "city/d1", b"21.5")

    assert [r.unit for r in out.readings] == ["degC"]


def test_a_configured_source_named_adhoc_keeps_its_mapping_with_a_format() -> None:
    settings = Settings(sources=[SourceSettings(name="adhoc", topic="city/{device}", format="value",
                                                metrics={"value": MetricSettings(unit="degC")})],
                        presets=PresetSettings(enabled=False))

    out = process(Processor.from_settings(settings, override_format="value"), "city/d1", b"21.5")

    assert [r.unit for r in out.readings] == ["degC"]


# --- limits --------------------------------------------------------------------------------------


def _limited(**ingest: Any) -> Processor:
    return Processor.from_settings(Settings(
        ingest=IngestSettings(**ingest),
        sources=[SourceSettings(name="lp", topic="lp/{device}", format="line"),
                 SourceSettings(name="j", topic="j/{device}", format="json")],
        presets=PresetSettings(enabled=False)))


def test_the_limits_defaults() -> None:
    ingest = IngestSettings()
    processor = _limited()

    assert (ingest.max_lines_per_message, ingest.max_metric_name_length) == (2000, 200)
    assert (processor.max_lines, processor.limits.max_metric_name) == (2000, 200)


def test_more_point_lines_than_the_limit_is_too_many_lines() -> None:
    out = process(_limited(max_lines_per_message=2), "lp/d", b"m a=1\nm b=2\nm c=3\n")

    assert out.readings == []
    assert out.rejection is not None
    assert out.rejection.reason == "too_many_lines"
    assert out.rejection.detail == ("the message holds 3 lines (limit ingest.max_lines_per_message = 2); none of "
                                    "them is stored")


def test_comments_and_blank_lines_do_not_count_as_lines() -> None:
    out = process(_limited(max_lines_per_message=2), "lp/d", b"# header\nm a=1\n\n   \nm b=2\n# end\n")

    assert out.rejection is None
    assert [(r.metric, r.value) for r in out.readings] == [("m.a", 1.0), ("m.b", 2.0)]


def test_a_metric_name_longer_than_the_limit_is_bad_metric_naming_the_limit() -> None:
    out = process(_limited(max_metric_name_length=16), "j/d", b'{"abcdefghijklmnop": 1, "abcdefghijklmnopq": 2}')

    assert [r.metric for r in out.readings] == ["abcdefghijklmnop"]  # 16 characters: kept
    assert out.rejection is not None
    assert out.rejection.reason == "bad_metric"
    assert out.rejection.detail == ("metric name 'abcdefghijklmnopq' is 17 characters long (limit "
                                    "ingest.max_metric_name_length = 16)")


@pytest.mark.parametrize(("limit", "kept"), [(200, 200), (256, 256)])
def test_the_metric_name_limit_up_to_the_databases(limit: int, kept: int) -> None:
    processor = _limited() if limit == 200 else _limited(max_metric_name_length=limit)
    payload = json.dumps({"a" * kept: 1, "b" * (kept + 1): 2}).encode()

    out = process(processor, "j/d", payload)

    assert [len(r.metric) for r in out.readings] == [kept]
    assert out.rejection is not None
    assert out.rejection.reason == "bad_metric"
    assert f"is {kept + 1} characters long (limit ingest.max_metric_name_length = {limit})" in out.rejection.detail


@pytest.mark.parametrize(
    ("text", "key"),
    [
        ("[ingest]\nmax_metric_name_length = 15\n", "ingest.max_metric_name_length"),
        ("[ingest]\nmax_metric_name_length = 257\n", "ingest.max_metric_name_length"),
        ("[ingest]\nmax_lines_per_message = 0\n", "ingest.max_lines_per_message"),
    ],
)
def test_limits_out_of_range_are_config_errors(tmp_path: Path, text: str, key: str) -> None:
    p = _problem(tmp_path, text)

    assert p.key == key
    assert p.message.startswith("Input should be ")


# --- a few preset behaviours through the processor -----------------------------------------------


def test_tasmota_local_time_takes_the_receive_time_without_a_zone_and_is_read_with_one() -> None:
    payload = b'{"Time": "2026-11-25T10:00:00", "AM2301": {"Temperature": 21.5}, "TempUnit": "C"}'

    out = process(Processor.from_settings(Settings()), "tele/sonoff/SENSOR", payload)
    assert readings(out) == [("sonoff", "AM2301.Temperature", 21.5, "degC", NOW, FLAG_RECEIVE_TIME)]

    zoned = Processor.from_settings(Settings(presets=PresetSettings(timezone="Asia/Ho_Chi_Minh")))
    out = process(zoned, "tele/sonoff/SENSOR", payload)
    assert readings(out) == [("sonoff", "AM2301.Temperature", 21.5, "degC", datetime(2026, 11, 25, 3, 0, tzinfo=UTC),
                                                                             0)]


def test_zigbee2mqtt_attribute_topics_holding_a_bare_value_are_skipped_as_scalar() -> None:
    out = process(Processor.from_settings(Settings()), "zigbee2mqtt/lamp/power", b"5")

    assert (out.source, out.skipped, out.rejection, out.readings) == ("zigbee2mqtt", "scalar", None, [])


def test_shelly_rpc_events_other_than_status_are_skipped_as_not_selected() -> None:
    out = process(Processor.from_settings(Settings()), "shellyplus1-abc/events/rpc",
                  b'{"method": "NotifyEvent", "params": {"ts": 1795000000, "events": []}}')

    assert (out.source, out.skipped, out.rejection) == ("shelly.rpc", "not_selected", None)


def test_shelly_status_empty_object_is_skipped_as_empty_object() -> None:
    out = process(Processor.from_settings(Settings()), "shellyplus1-abc/status/sys", b"{}")

    assert (out.source, out.skipped, out.rejection) == ("shelly.status", "empty_object", None)


def test_esphome_nan_is_not_finite() -> None:
    out = process(Processor.from_settings(Settings()), "node1/sensor/temp/state", b"nan")

    assert out.rejection is not None
    assert (out.source, out.rejection.reason) == ("esphome.sensor", "not_finite")


# --- CLI: presets --------------------------------------------------------------------------------


def _presets_json(capsys: pytest.CaptureFixture[str], *args: str) -> list[dict[str, Any]]:
    assert main(["presets", "--json", *args]) == 0
    out, _ = capsys.readouterr()
    listing: list[dict[str, Any]] = json.loads(out)
    return listing


@pytest.mark.usefixtures("_restore_logging")
def test_presets_json_lists_every_preset_on_by_default(capsys: pytest.CaptureFixture[str]) -> None:
    listing = _presets_json(capsys)

    assert [(p["name"], p["state"]) for p in listing] == [(n, "on") for n in PRESET_NAMES]
    assert [part["source"] for p in listing for part in p["parts"]] == PART_NAMES
    assert [p["title"] for p in listing] == [p.title for p in PRESETS.values()]
    assert [p["doc"] for p in listing] == [p.doc for p in PRESETS.values()]
    z2m = next(p for p in listing if p["name"] == "zigbee2mqtt")["parts"][0]
    assert {k: v for k, v in z2m.items() if k != "mapping"} == {
        "source": "zigbee2mqtt", "topic": "zigbee2mqtt/{device#}", "filter": "zigbee2mqtt/#", "format": "json",
        "options": {"time_required": False, "skip_scalars": True},
        "exclude": ["zigbee2mqtt/bridge", "zigbee2mqtt/bridge/*", "zigbee2mqtt/*/set", "zigbee2mqtt/*/set/*",
                    "zigbee2mqtt/*/get", "zigbee2mqtt/*/get/*", "zigbee2mqtt/*/availability"],
        "replaced": False,
    }
    assert z2m["mapping"]["time_field"] == "last_seen"
    assert z2m["mapping"]["value_map"] == {"ON": True, "OFF": False}


@pytest.mark.usefixtures("_restore_logging")
def test_presets_json_shows_off_replaced_and_replaced_parts(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = _write(tmp_path, '[presets]\nhomie = false\n\n'
                  '[[sources]]\nname = "tasmota"\ntopic = "tele/{device}/SENSOR"\nformat = "json"\n\n'
                  '[[sources]]\nname = "shelly.rpc"\ntopic = "{device:shelly*}/events/rpc"\nformat = "json"\n')

    listing = _presets_json(capsys, "--config", str(path))

    states = {p["name"]: p["state"] for p in listing}
    assert states == {**dict.fromkeys(PRESET_NAMES, "on"), "homie": "off",
                      "tasmota": "replaced by [[sources]] tasmota"}
    replaced = {part["source"]: part["replaced"] for p in listing for part in p["parts"]}
    assert {name for name, flag in replaced.items() if flag} == {"shelly.rpc"}
    assert list(replaced) == PART_NAMES


@pytest.mark.usefixtures("_restore_logging")
def test_presets_json_all_off(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    listing = _presets_json(capsys, "--config", str(_write(tmp_path, "[presets]\nenabled = false\n")))

    assert [(p["name"], p["state"]) for p in listing] == [(n, "off") for n in PRESET_NAMES]


@pytest.mark.usefixtures("_restore_logging")
def test_presets_json_parts_carry_the_timezone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, '[presets]\ntimezone = "Asia/Ho_Chi_Minh"\n')

    listing = _presets_json(capsys, "--config", str(path))

    tasmota = next(p for p in listing if p["name"] == "tasmota")
    assert [part["mapping"]["timezone"] for part in tasmota["parts"]] == ["Asia/Ho_Chi_Minh"] * 2


@pytest.mark.usefixtures("_restore_logging")
def test_presets_text_names_each_preset_its_state_and_the_unset_zone(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["presets", "--config", str(_write(tmp_path, "[presets]\ntasmota = false\n"))]) == 0
    out, _ = capsys.readouterr()

    assert "tasmota  (Tasmota; off)  https://tasmota.github.io/docs/MQTT/" in out
    assert "zigbee2mqtt  (Zigbee2MQTT; on)" in out
    assert "  zigbee2mqtt: zigbee2mqtt/{device#}  ->  subscribes zigbee2mqtt/#  format json" in out
    assert "    exclude: zigbee2mqtt/bridge, zigbee2mqtt/bridge/*," in out
    assert "[presets] timezone is unset" in out


@pytest.mark.usefixtures("_restore_logging")
def test_presets_text_without_the_zone_note_when_it_is_set(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    assert main(["presets", "--config", str(_write(tmp_path, '[presets]\ntimezone = "UTC"\n'))]) == 0
    out, _ = capsys.readouterr()

    assert "timezone is unset" not in out


@pytest.mark.usefixtures("_restore_logging")
def test_presets_with_a_bad_config_exits_2(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["presets", "--config", str(_write(tmp_path, "[presets]\ntasmotaa = false\n"))]) == 2
    _, err = capsys.readouterr()

    assert "invalid configuration" in err
    assert "presets.tasmotaa: unknown key (fix: did you mean 'tasmota'?)" in err


@pytest.mark.usefixtures("_restore_logging")
def test_check_config_counts_the_preset_sources(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    path = _write(tmp_path, "[presets]\nhomie = false\n")

    assert main(["check-config", str(path)]) == 0
    out, _ = capsys.readouterr()

    assert out.strip() == f"{path}: OK (0 source(s), 14 preset source(s) of 8 preset(s))"


# --- CLI: decode --received-at and --source ------------------------------------------------------


def _decode(tmp_path: Path, capsys: pytest.CaptureFixture[str], payload: bytes, *args: str) -> tuple[int, Any, str]:
    file = tmp_path / "payload.bin"
    file.write_bytes(payload)
    code = main(["decode", *args, str(file)])
    out, err = capsys.readouterr()
    return code, json.loads(out) if out else None, err


@pytest.mark.usefixtures("_restore_logging")
@pytest.mark.parametrize("when", ["2026-11-25T03:00:05Z", "2026-11-25t03:00:05z", "2026-11-25T10:00:05+07:00"])
def test_decode_received_at_stamps_receive_time_readings(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], when: str
) -> None:
    code, out, _ = _decode(tmp_path, capsys, b"21.5", "--topic", "node1/sensor/temp/state", "--received-at", when)

    assert code == 0
    assert (out["source"], out["format"], out["rejection"]) == ("esphome.sensor", "value", None)
    assert out["readings"] == [{"device": "node1", "metric": "sensor.temp", "time": "2026-11-25T03:00:05+00:00",
                                "value": 21.5, "unit": "degC", "flags": FLAG_RECEIVE_TIME}]


@pytest.mark.usefixtures("_restore_logging")
def test_decode_received_at_leaves_a_payload_time_alone(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    payload = b'{"Time": "2026-11-25T09:59:00+07:00", "ENERGY": {"Power": 12}}'

    code, out, _ = _decode(tmp_path, capsys, payload, "--topic", "tele/plug/SENSOR",
                           "--received-at", "2026-11-25T03:00:05Z")

    assert code == 0
    assert out["readings"] == [{"device": "plug", "metric": "ENERGY.Power", "time": "2026-11-25T02:59:00+00:00",
                                "value": 12.0, "unit": "W", "flags": 0}]


@pytest.mark.usefixtures("_restore_logging")
def test_decode_received_at_is_the_time_of_a_naive_tasmota_time(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    payload = b'{"Time": "2026-11-25T09:59:00", "ENERGY": {"Power": 12}}'

    code, out, _ = _decode(tmp_path, capsys, payload, "--topic", "tele/plug/SENSOR",
                           "--received-at", "2026-11-25T03:00:05Z")

    assert code == 0
    assert [(r["time"], r["flags"]) for r in out["readings"]] == [("2026-11-25T03:00:05+00:00", FLAG_RECEIVE_TIME)]


@pytest.mark.usefixtures("_restore_logging")
@pytest.mark.parametrize(
    ("when", "message"),
    [
        ("2026-11-25T03:00:05", "'2026-11-25T03:00:05' has no UTC offset; add Z or +hh:mm"),
        ("yesterday", "'yesterday' is not an RFC 3339 time, e.g. 2026-11-25T03:00:05Z"),
    ],
)
def test_decode_refuses_a_received_at_without_offset_or_unreadable(
    tmp_path: Path, capsys: pytest.CaptureFixture[str], when: str, message: str
) -> None:
    with pytest.raises(SystemExit) as info:
        _decode(tmp_path, capsys, b"1", "--topic", "node1/sensor/t/state", "--received-at", when)

    assert info.value.code == 2
    _, err = capsys.readouterr()
    assert f"argument --received-at: {message}" in err


@pytest.mark.usefixtures("_restore_logging")
def test_decode_an_unknown_source_exits_2_listing_the_sources(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _write(tmp_path, '[presets]\nhomie = false\n\n'
                    '[[sources]]\nname = "aq"\ntopic = "city/{device}/up"\nformat = "native"\n')

    code, out, err = _decode(tmp_path, capsys, b"1", "--config", str(config), "--topic", "x", "--source", "nope")

    assert (code, out) == (2, None)
    known = ", ".join(["aq", *(n for n in PART_NAMES if not n.startswith("homie."))])
    assert err.strip() == f"sensor-ingest: no source named 'nope'; sources and preset parts: {known}"


@pytest.mark.usefixtures("_restore_logging")
def test_decode_an_unknown_source_without_any_source_says_none(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    config = _write(tmp_path, "[presets]\nenabled = false\n")

    code, _, err = _decode(tmp_path, capsys, b"1", "--config", str(config), "--topic", "x", "--source", "nope")

    assert code == 2
    assert err.strip() == "sensor-ingest: no source named 'nope'; sources and preset parts: none"


@pytest.mark.usefixtures("_restore_logging")
def test_decode_source_names_a_preset_part(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _decode(tmp_path, capsys, b"12.5", "--topic", "shellies/sh1/relay/0/power", "--source",
                           "shelly.gen1", "--received-at", "2026-11-25T03:00:05Z")

    assert code == 0
    assert (out["source"], out["format"]) == ("shelly.gen1", "value")
    assert out["readings"] == [{"device": "sh1", "metric": "relay.0.power", "time": "2026-11-25T03:00:05+00:00",
                                "value": 12.5, "unit": "W", "flags": FLAG_RECEIVE_TIME}]


@pytest.mark.usefixtures("_restore_logging")
def test_decode_with_no_matching_source_uses_auto(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _decode(tmp_path, capsys, b"weather,site=a temp=1.5", "--topic", "lab/lp",
                           "--received-at", "2026-11-25T03:00:05Z")

    assert code == 0
    assert (out["source"], out["format"], out["rejection"]) == ("auto", "auto", None)
    assert [(r["metric"], r["value"], r["time"]) for r in out["readings"]] == [
        ("weather.temp", 1.5, "2026-11-25T03:00:05+00:00")]


@pytest.mark.usefixtures("_restore_logging")
def test_decode_an_excluded_topic_prints_skipped(tmp_path: Path, capsys: pytest.CaptureFixture[str]) -> None:
    code, out, _ = _decode(tmp_path, capsys, b'{"state": "online"}', "--topic", "zigbee2mqtt/bridge/state")

    assert code == 0
    assert out == {"topic": "zigbee2mqtt/bridge/state", "source": "zigbee2mqtt", "format": "json", "readings": [],
                   "rejection": None, "ignored": 0, "skipped": "excluded"}



def test_a_rename_longer_than_max_metric_name_length_is_a_config_error(tmp_path: Path) -> None:
    path = tmp_path / "c.toml"
    path.write_text('[ingest]\nmax_metric_name_length = 16\n[[sources]]\nname = "a"\ntopic = "a/{device}"\n'
                    'format = "json"\nrename = { a = "a_very_long_metric_name_here" }\n', encoding="utf-8")
    with pytest.raises(ConfigError) as info:
        load_settings(path)
    text = str(info.value)
    assert "longer than ingest.max_metric_name_length = 16" in text
    # Up to the database's 256 characters a rename is allowed when the limit allows it.
    path.write_text('[ingest]\nmax_metric_name_length = 256\n[[sources]]\nname = "a"\ntopic = "a/{device}"\n'
                    f'format = "json"\nrename = {{ a = "{"x" * 250}" }}\n', encoding="utf-8")
    assert load_settings(path).sources[0].rename == {"a": "x" * 250}
