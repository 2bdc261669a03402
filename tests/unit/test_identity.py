"""Identity (issue #13, item 4): a payload may not speak for another device than its topic's.

When a source's template captures {device}, a payload that names another device is rejected whole
(device_mismatch), and the same payload on its own device's topic is stored. Shown here for every
format that can name a device in its payload, and for every preset part, table-driven from the
presets themselves: each part is in exactly one table below, and what a part reads (its format and
device_field) decides which table it belongs to, so a new part cannot be left out or filed wrong.

Everything runs through ``Processor.from_settings(...).process(RawMessage(...))``, on the payloads of
the golden cases (tests/decoders/cases, tests/presets/cases) as they were published.
"""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

import pytest

from ingest.model import RawMessage
from ingest.presets import PRESETS
from ingest.process import Outcome, Processor
from ingest.routing import compile_template
from ingest.settings import PresetSettings, Settings, SourceSettings

NOW = datetime(2026, 11, 25, 3, 0, 5, tzinfo=UTC)
TESTS = Path(__file__).parents[1]
DECODER_CASES = TESTS / "decoders" / "cases"
PRESET_CASES = TESTS / "presets" / "cases"
OTHER = "impostor-0001"  # a device that is not the one the payload names
TEMPLATE = "identity/{device}/up"


def _payload(case: Path) -> bytes:
    return (case / "payload").read_bytes()


def _topic_of(case: Path) -> str:
    topic: str = json.loads((case / "context.json").read_text(encoding="utf-8"))["topic"]
    return topic


def _process(processor: Processor, topic: str, payload: bytes) -> Outcome:
    return processor.process(RawMessage(topic, payload, NOW))


def _configured(**source: Any) -> Processor:
    """One configured source named "identity" (the presets off, so that nothing else takes a topic)."""
    settings = Settings(sources=[SourceSettings(name="identity", topic=TEMPLATE, **source)],
                        presets=PresetSettings(enabled=False))
    return Processor.from_settings(settings)


def _assert_refused(out: Outcome, source: str) -> None:
    assert out.source == source
    assert out.rejection is not None
    assert out.rejection.reason == "device_mismatch", out.rejection
    assert out.readings == []


def _assert_stored_under(out: Outcome, source: str, device: str) -> None:
    """Decoded and stored under ``device``: whatever else the catalog says of a value (a unit, a
    range), no reading went to another device and none was refused for naming one."""
    assert out.source == source
    assert out.readings, out.rejection
    assert {r.device for r in out.readings} == {device}
    assert "device_mismatch" not in {p.reason for p in out.problems}
    assert out.rejection is None or out.rejection.reason != "device_mismatch"


# --- formats ----------------------------------------------------------------------------------------------------


@dataclass(frozen=True)
class Named:
    """A payload that names one device, and the source that reads it."""

    id: str
    source: dict[str, Any]
    payload: bytes
    device: str  # the device the payload names: the topic's {device} it agrees with
    stored: str | None = None  # the id its readings are stored under, when it is another id (dev_eui)


_TTS = _payload(PRESET_CASES / "ttn" / "ttn_data_formats_uplink")  # end_device_ids.device_id dev1
_CHIRPSTACK = _payload(PRESET_CASES / "chirpstack" / "chirpstack_winext_an303_object")  # devEui ffffff200000b703
_NATIVE = _payload(DECODER_CASES / "native" / "map_form")  # "device": "hn-aq-0001"
_SENML = _payload(DECODER_CASES / "senml" / "bn_matches_topic_device")  # "bn": "hn-aq-0003:"
_TELEGRAF = _payload(DECODER_CASES / "line" / "telegraf_system_host")  # host=tyrion, ns timestamps
_AIRROHR = {"pairs": {"key": "sensordatavalues", "name": "value_type", "value": "value"}}

FORMATS = [
    Named("native", {"format": "native"}, _NATIVE, "hn-aq-0001"),
    Named("senml bn", {"format": "senml"}, _SENML, "hn-aq-0003"),
    Named("json device_field", {"format": "json", "device_field": "esp8266id", "options": _AIRROHR},
          _payload(DECODER_CASES / "json" / "sensor_community_device_field"), "0011223344"),
    # A batch of records, each naming its device by a nested number (sensor.id 7373).
    Named("json device_field number batch",
          {"format": "json", "device_field": "sensor.id", "time_field": "timestamp", "timezone": "UTC"},
          _payload(DECODER_CASES / "json" / "array_of_records_device_field_naive_time"), "7373"),
    Named("lorawan tts", {"format": "lorawan"}, _TTS, "dev1"),
    # The topic carries the device id, the DevEUI is stored: the check compares the device id.
    Named("lorawan tts dev_eui", {"format": "lorawan", "options": {"device": "dev_eui"}}, _TTS, "dev1",
          stored="0004A30B001C0530"),
    Named("lorawan chirpstack", {"format": "lorawan"}, _CHIRPSTACK, "ffffff200000b703"),
    Named("lorawan chirpstack dev_eui", {"format": "lorawan", "options": {"device": "dev_eui"}}, _CHIRPSTACK,
          "ffffff200000b703"),
    Named("line id tag", {"format": "line", "options": {"precision": "s"}},
          _payload(DECODER_CASES / "line" / "device_from_id_tag"), "hn-aq-0007"),
    # One line without tags (the topic's device), one whose host tag names it.
    Named("line host tag", {"format": "line", "options": {"precision": "s"}},
          _payload(DECODER_CASES / "line" / "device_from_topic"), "hn-aq-0009"),
    # The first line of InfluxDB's "Get started" home data, its device in an escaped tag value.
    Named("line device_tag", {"format": "line", "options": {"precision": "s", "device_tag": "room"}},
          _payload(DECODER_CASES / "line" / "influxdb_get_started_home_device_tag").splitlines()[0], "Living Room"),
    # auto tells the family from the payload; each family that can name a device checks it.
    Named("auto native", {"format": "auto"}, _NATIVE, "hn-aq-0001"),
    Named("auto senml", {"format": "auto"}, _SENML, "hn-aq-0003"),
    Named("auto lorawan tts", {"format": "auto"}, _TTS, "dev1"),
    Named("auto lorawan chirpstack", {"format": "auto"}, _CHIRPSTACK, "ffffff200000b703"),
    Named("auto line", {"format": "auto"}, _TELEGRAF, "tyrion"),
]


@pytest.mark.parametrize("case", FORMATS, ids=[c.id for c in FORMATS])
def test_a_payload_naming_another_device_than_the_topic_is_device_mismatch(case: Named) -> None:
    out = _process(_configured(**case.source), TEMPLATE.format(device=OTHER), case.payload)

    _assert_refused(out, "identity")
    assert out.rejection is not None
    assert out.rejection.device == OTHER


@pytest.mark.parametrize("case", FORMATS, ids=[c.id for c in FORMATS])
def test_the_same_payload_on_its_own_devices_topic_is_stored(case: Named) -> None:
    out = _process(_configured(**case.source), TEMPLATE.format(device=case.device), case.payload)

    _assert_stored_under(out, "identity", case.stored or case.device)


def test_every_format_that_reads_a_device_from_the_payload_is_in_the_table() -> None:
    from ingest.decoders import FORMATS as ALL_FORMATS

    # value takes its device from the topic only (test below); json names one through device_field.
    assert {c.source["format"] for c in FORMATS} == set(ALL_FORMATS) - {"value"}


# Payloads that name several devices: on the topic of any one of them the whole message is refused,
# the records of the topic's own device included (every record is checked, not only the first).
MANY = [
    ("native gateway batch", {"format": "native"}, DECODER_CASES / "native" / "gateway_batch",
     ["hn-noise-0007", "hn-flood-0003"]),
    ("senml several bn", {"format": "senml"}, DECODER_CASES / "senml" / "several_base_names", ["dev-a", "dev-b"]),
    ("line host per line", {"format": "line", "options": {"precision": "ms"}},
     DECODER_CASES / "line" / "greptime_precision_ms", ["127.0.0.1", "127.0.0.2"]),
    ("line device_tag per line", {"format": "line", "options": {"precision": "s", "device_tag": "room"}},
     DECODER_CASES / "line" / "influxdb_get_started_home_device_tag", ["Living Room", "Kitchen"]),
    ("auto senml several bn", {"format": "auto"}, DECODER_CASES / "senml" / "several_base_names",
     ["dev-a", "dev-b"]),
]


@pytest.mark.parametrize(("source", "case", "devices"), [m[1:] for m in MANY], ids=[m[0] for m in MANY])
def test_a_payload_naming_several_devices_is_refused_whole_on_each_ones_topic(
        source: dict[str, Any], case: Path, devices: list[str]) -> None:
    processor = _configured(**source)
    for device in devices:
        _assert_refused(_process(processor, TEMPLATE.format(device=device), _payload(case)), "identity")


def test_the_value_format_takes_the_device_from_the_topic_whatever_the_payload_says() -> None:
    processor = _configured(format="value", options={"text": True})
    topic = "identity/hn-aq-0001/up"

    number = _process(processor, topic, _payload(DECODER_CASES / "value" / "esphome_sensor_float"))
    # A text that spells another device's id is a state of the topic's device, never a claim.
    text = _process(processor, topic, OTHER.encode())

    _assert_stored_under(number, "identity", "hn-aq-0001")
    _assert_stored_under(text, "identity", "hn-aq-0001")
    assert [r.value for r in text.readings] == [OTHER]


# --- preset parts -----------------------------------------------------------------------------------------------

PARTS = {part["name"]: part for preset in PRESETS.values() for part in preset.parts(None)}
_DEVICE_NAMING_FORMATS = frozenset({"native", "senml", "lorawan", "line", "auto"})


def _captures_device(part: dict[str, Any]) -> bool:
    route = compile_template(part["topic"])
    return "device" in route.names or route.rest_name == "device"


def _reads_a_device_from_the_payload(part: dict[str, Any]) -> bool:
    return part["format"] in _DEVICE_NAMING_FORMATS or (part["format"] == "json" and bool(part.get("device_field")))


# Parts whose template captures {device} and whose payload names a device the decoder reads.
DEVICE_NAMING = {
    "ttn": "lorawan: end_device_ids.device_id, the id The Things Stack puts in the topic",
    "chirpstack": "lorawan: deviceInfo.devEui, the id ChirpStack puts in the topic",
    "homeassistant": "auto: a native, SenML, line protocol or LoRaWAN payload names its device",
}
# Parts whose template captures {device} and whose payload never names one the decoder reads: the
# device is the topic's, whatever the payload holds (checked on their golden cases below).
TOPIC_ONLY = {
    "tasmota.sensor": "json without device_field: tele/<topic>/SENSOR carries no device id",
    "tasmota.state": "json without device_field: tele/<topic>/STATE carries no device id",
    "zigbee2mqtt": "json without device_field: the state object; include_device_information's `device` "
                   "object is not read as the device",
    "esphome.sensor": "value: one bare value per topic",
    "esphome.binary_sensor": "value: one bare value per topic",
    "esphome.text_sensor": "value: one bare value per topic",
    "esphome.switch": "value: one bare value per topic",
    "shelly.gen1": "value: one bare value per topic",
    # src is the device's own id, not its topic prefix, which a user may set (the golden cases'
    # ShellyLichtGarten/events/rpc carries src shelly1pmminig3-e4b323133734): not read as the device.
    "shelly.rpc": "json without device_field: src is not the topic prefix",
    "shelly.status": "json without device_field: one component's status object",
    "homie.v5": "value: one bare value per topic",
    "homie.v4": "value: one bare value per topic",
}
# Parts whose template captures no {device}: the payload names it, and the ids are bounded.
NO_TOPIC_DEVICE = {
    "airrohr": "esp8266id names the device, under device_prefix esp8266-",
}


def test_every_preset_part_is_in_exactly_one_identity_table() -> None:
    tables = [set(DEVICE_NAMING), set(TOPIC_ONLY), set(NO_TOPIC_DEVICE)]

    assert set().union(*tables) == set(PARTS)
    assert sum(len(t) for t in tables) == len(PARTS)


@pytest.mark.parametrize("name", sorted(PARTS))
def test_each_part_is_in_the_table_of_what_it_reads(name: str) -> None:
    part = PARTS[name]
    if not _captures_device(part):
        assert name in NO_TOPIC_DEVICE
        # A template without {device} takes ids from the payload: they must be bounded.
        assert part.get("device_prefix") or part.get("allow_devices")
    elif _reads_a_device_from_the_payload(part):
        assert name in DEVICE_NAMING
    else:
        assert name in TOPIC_ONLY


def _on_device(topic: str, device: str) -> str:
    """``topic`` with its {device} level replaced by ``device``."""
    found = Processor.from_settings(Settings()).router.route(topic)
    assert found is not None, topic
    level = found[0].device_level
    assert level is not None, topic
    levels = topic.split("/")
    levels[level] = device
    return "/".join(levels)


@dataclass(frozen=True)
class OnTopic:
    """A payload on a preset topic of the device it names."""

    id: str
    topic: str
    payload: bytes
    stored: str | None = None  # the device its readings are stored under; None: the topic's
    settings: dict[str, Any] = field(default_factory=dict)  # Settings() keys besides the defaults


def _golden(part: str) -> list[OnTopic]:
    return [OnTopic(f"{part}/{case.name}", _topic_of(case), _payload(case))
            for case in sorted((PRESET_CASES / part).iterdir()) if case.is_dir()]


def _ha(device: str) -> str:
    return f"homeassistant/sensor/{device}/state"


# Every part of DEVICE_NAMING, with real payloads on its own topics: the golden cases of the
# LoRaWAN servers (on their published topics), and for Home Assistant's auto the device-naming
# payload of each family (the golden HA states are JSON objects, which name no device).
PRESET_PAYLOADS: dict[str, list[OnTopic]] = {
    "ttn": [
        *_golden("ttn"),
        # The preset replaced by a source of its name with device = "dev_eui" (its topic unchanged):
        # the topic's device id is checked, the DevEUI stored.
        OnTopic("ttn/dev_eui", _topic_of(PRESET_CASES / "ttn" / "ttn_data_formats_uplink"), _TTS, "0004A30B001C0530",
                {"sources": [SourceSettings(**{**PARTS["ttn"], "options": {"device": "dev_eui"}})]}),
    ],
    "chirpstack": _golden("chirpstack"),
    "homeassistant": [
        OnTopic("homeassistant/native", _ha("hn-aq-0001"), _NATIVE),
        OnTopic("homeassistant/senml", _ha("hn-aq-0003"), _SENML),
        OnTopic("homeassistant/line", _ha("tyrion"), _TELEGRAF),
        OnTopic("homeassistant/tts", _ha("dev1"), _TTS),
        OnTopic("homeassistant/chirpstack", _ha("ffffff200000b703"), _CHIRPSTACK),
    ],
}
_ON_TOPIC = [(part, case) for part, cases in PRESET_PAYLOADS.items() for case in cases]


def test_every_device_naming_part_has_payloads_on_its_topics() -> None:
    assert set(PRESET_PAYLOADS) == set(DEVICE_NAMING)
    assert all(PRESET_PAYLOADS.values())


@pytest.mark.parametrize(("part", "case"), _ON_TOPIC, ids=[c.id for _, c in _ON_TOPIC])
def test_a_preset_part_refuses_a_payload_naming_another_device_and_stores_its_own(part: str, case: OnTopic) -> None:
    processor = Processor.from_settings(Settings(**case.settings))
    found = processor.router.route(case.topic)
    assert found is not None
    device = found[1]["device"]

    own = _process(processor, case.topic, case.payload)
    other = _process(processor, _on_device(case.topic, OTHER), case.payload)

    if own.skipped is not None:
        # No readings by design (an uplink the server did not decode): nothing is stored for anyone,
        # on whichever device's topic, so there is nothing to check.
        assert (own.readings, other.readings, other.rejection, other.skipped) == ([], [], None, own.skipped)
        return
    _assert_stored_under(own, part, case.stored or device)
    _assert_refused(other, part)


def test_the_golden_cases_of_the_device_naming_parts_carry_readings() -> None:
    """So that the check above is not vacuous: most of those cases are uplinks with readings."""
    processor = Processor.from_settings(Settings())
    carrying = {part: sum(bool(_process(processor, c.topic, c.payload).readings) for c in cases)
                for part, cases in PRESET_PAYLOADS.items()}
    assert all(n >= 3 for n in carrying.values()), carrying


@pytest.mark.parametrize("preset", sorted({name.partition(".")[0] for name in TOPIC_ONLY}))
def test_a_topic_only_part_stores_every_golden_reading_under_the_topics_device(preset: str) -> None:
    processor = Processor.from_settings(Settings())
    stored = 0
    for case in sorted(p for p in (PRESET_CASES / preset).iterdir() if p.is_dir()):
        topic = _topic_of(case)
        out = _process(processor, topic, _payload(case))
        if out.source not in TOPIC_ONLY or not out.readings:
            continue
        found = processor.router.route(topic)
        assert found is not None
        prefix = processor.sources[out.source].settings.device_prefix
        assert {r.device for r in out.readings} == {prefix + found[1]["device"]}, case.name
        stored += 1
    assert stored, f"no golden case of {preset} carries readings"


def test_a_shelly_rpc_src_naming_another_device_does_not_move_the_readings() -> None:
    """src is not read: a notification whose src is another Shelly's stays the topic's device's."""
    case = PRESET_CASES / "shelly" / "shelly_1pmminig3_notify_status_partial"
    message = json.loads(_payload(case))
    message["src"] = "shelly1pmminig3-000000000000"
    out = _process(Processor.from_settings(Settings()), _topic_of(case), json.dumps(message).encode())

    _assert_stored_under(out, "shelly.rpc", "shelly1pmminig3-5432044edbc0")
