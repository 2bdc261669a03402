"""Presets: built-in sources for the firmware a city already owns, on by default.

Each preset is one or more ordinary sources (ingest.settings.SourceSettings: a topic template, a
format, its options and a mapping), so a preset does nothing a config file could not; it only saves
writing it. ``[presets] <name> = false`` switches one off, ``[presets] enabled = false`` all of them,
and a ``[[sources]]`` entry named like a preset (or like one of its parts, "shelly.rpc") replaces it.
Configured sources come first in routing order, then the presets in the order below.

Every topic, payload and unit here follows the firmware's own documentation, named in ``doc``; the
golden cases in tests/presets/cases hold real published payloads of each.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass
from typing import Any, Final

__all__ = ["PRESETS", "Preset"]

# Strings that mean on and off, as the firmware writes them (Tasmota POWER, Zigbee2MQTT state).
_ON_OFF: Final = {"ON": True, "OFF": False}


@dataclass(frozen=True, slots=True)
class Preset:
    """A preset: its name (the [presets] key), what it reads, where that is documented, and its sources."""

    name: str
    title: str
    doc: str
    build: Callable[[str | None], list[dict[str, Any]]]  # the zone of local times -> SourceSettings keys

    def parts(self, timezone: str | None = None) -> list[dict[str, Any]]:
        """The keys of each of its sources ([[sources]] entries), for the zone of local payload times."""
        return self.build(timezone)


def _units(table: dict[str, str]) -> dict[str, dict[str, Any]]:
    return {glob: {"unit": unit} for glob, unit in table.items()}


def _tasmota(zone: str | None) -> list[dict[str, Any]]:
    # tele/%topic%/SENSOR and tele/%topic%/STATE (Tasmota docs, "MQTT": FullTopic %prefix%/%topic%/).
    # Time is the device's local time without an offset (unless SetOption52 adds one): read in the
    # configured zone; without one, a time with an offset is read and one without takes the receive
    # time rather than a guess. TempUnit, PressureUnit and SpeedUnit name the units of the leaves
    # (Temperature1 on an ADC, Speed.Act/Avg of a TX23 anemometer).
    time: dict[str, Any] = {"time_field": "Time", "timezone": zone}
    options: dict[str, Any] = {"naive_time": "receive", "unit_fields": {
        "TempUnit": ["*Temperature", "*Temperature[0-9]*", "*DewPoint"],
        "PressureUnit": ["*Pressure", "*Pressure[0-9]*", "*SeaPressure"],
        "SpeedUnit": ["*Speed", "*Speed.*"],
    }}
    metrics = _units({
        "ENERGY.Total": "kWh", "ENERGY.Today": "kWh", "ENERGY.Yesterday": "kWh",
        "ENERGY.Power": "W", "ENERGY.ApparentPower": "VA", "ENERGY.ReactivePower": "var",
        "ENERGY.Voltage": "V", "ENERGY.Current": "A", "ENERGY.Frequency": "Hz", "ENERGY.Period": "Wh",
        # Multi-channel meters send lists: ENERGY.Power.0, ENERGY.Power.1, ...
        "ENERGY.Power.*": "W", "ENERGY.ApparentPower.*": "VA", "ENERGY.ReactivePower.*": "var",
        "ENERGY.Voltage.*": "V", "ENERGY.Current.*": "A", "ENERGY.Period.*": "Wh", "ENERGY.Today.*": "kWh",
        "ENERGY.Yesterday.*": "kWh", "ENERGY.Total.*": "kWh",
        "*.Humidity": "%", "*.Illuminance": "lx", "*.CarbonDioxide": "ppm", "*.eCO2": "ppm", "*.TVOC": "ppb",
        "*.PM1": "ug/m3", "*.PM2.5": "ug/m3", "*.PM10": "ug/m3",
        "Wifi.RSSI": "%", "Wifi.Signal": "dBm", "UptimeSec": "s",
        "*.Battery": "%", "*.RSSI": "dBm",  # MI32 / BLE sensors: battery %, radio rssi dBm
    })
    common = {"format": "json", "options": options, "value_map": _ON_OFF, "metrics": metrics, **time}
    return [
        {"name": "tasmota.sensor", "topic": "tele/{device}/SENSOR", **common},
        {"name": "tasmota.state", "topic": "tele/{device}/STATE", **common},
    ]


def _zigbee2mqtt(zone: str | None) -> list[dict[str, Any]]:
    # zigbee2mqtt/<FRIENDLY_NAME> (zigbee2mqtt.io "MQTT topics and messages"); the friendly name may
    # hold '/' and spaces. bridge/ is the bridge's own traffic; /set, /get and /availability are
    # commands and availability, not states. last_seen (advanced.last_seen: ISO_8601, ISO_8601_local
    # or epoch ms) is the time when the bridge adds it. With advanced.output = attribute the bridge
    # also publishes each attribute alone on <name>/<attribute>, which cannot be told apart from a
    # name holding '/': such bare values are skipped (scalar); the JSON state carries them.
    metrics = _units({
        "temperature": "degC", "local_temperature": "degC", "device_temperature": "degC", "humidity": "%",
        "pressure": "hPa", "battery": "%", "illuminance_lux": "lx", "co2": "ppm", "pm25": "ug/m3",
        "pm10": "ug/m3", "power": "W", "energy": "kWh", "current": "A", "soil_moisture": "%",
    })
    return [{
        "name": "zigbee2mqtt", "topic": "zigbee2mqtt/{device#}", "format": "json",
        "exclude": ["zigbee2mqtt/bridge", "zigbee2mqtt/bridge/*", "zigbee2mqtt/*/set", "zigbee2mqtt/*/set/*",
                    "zigbee2mqtt/*/get", "zigbee2mqtt/*/get/*", "zigbee2mqtt/*/availability"],
        "time_field": "last_seen", "options": {"time_required": False, "skip_scalars": True},
        "value_map": _ON_OFF, "metrics": metrics,
    }]


def _esphome(zone: str | None) -> list[dict[str, Any]]:
    # <topic_prefix>/<component_type>/<name>/state (esphome.io "MQTT Client Component"); the prefix
    # defaults to the node name. Text sensors publish under "sensor" as well: any text is a state;
    # switches publish ON / OFF.
    return [
        {"name": f"esphome.{kind}", "topic": f"{{device}}/{kind}/+/state", "format": "value",
         "options": {"text": True}}
        for kind in ("sensor", "binary_sensor", "text_sensor", "switch")
    ]


def _shelly(zone: str | None) -> list[dict[str, Any]]:
    # Gen1: shellies/<id>/... one value per topic (shelly-api-docs.shelly.cloud gen1 "MQTT"). JSON
    # topics (announce, info, light/N/status, input_event/N, act_reasons) and commands are not states.
    gen1_units = _units({
        "relay.*.power": "W", "relay.power": "W", "roller.*.power": "W", "light.*.power": "W",
        "meter.*.power": "W", "emeter.*.power": "W", "emeter.*.reactive_power": "var", "emeter.*.voltage": "V",
        "emeter.*.current": "A", "emeter.*.total": "Wh", "emeter.*.total_returned": "Wh", "voltage": "V",
        "sensor.temperature": "degC", "sensor.humidity": "%", "sensor.battery": "%", "sensor.lux": "lx",
        "ext_temperature.*": "degC", "ext_humidity.*": "%",
    })
    # shellies/<id>/temperature of relays, plugs and dimmers is the device's internal temperature (the
    # Gen1 docs: "reports internal device temperature"), not the air's: that is sensor/temperature
    # (H&T, Sense, Smoke, Flood) or an add-on's ext_temperature/N.
    gen1_units["temperature"] = {"unit": "degC", "rename": "device_temperature"}
    gen1_units["temperature_f"] = {"unit": "degF", "rename": "device_temperature_f"}
    # relay/N/energy, roller/N/energy and emeter/N/energy count watt-minutes (the Gen1 MQTT docs;
    # emeter/N/total is in Wh): stored in Wh. relay/energy: a Shelly 2.5 in roller mode.
    for glob in ("relay.*.energy", "relay.energy", "roller.*.energy", "light.*.energy", "meter.*.total",
                 "emeter.*.energy", "emeter.*.returned_energy"):
        gen1_units[glob] = {"unit": "Wh", "scale": 1 / 60}
    # Gen2+: <id>/events/rpc carries NotifyStatus / NotifyFullStatus (readings under params, params.ts
    # the time) and NotifyEvent (button events: no readings); <id>/status/<component> the status of
    # one component ("generic status update" setting). Device ids start with "shelly" (or "Shelly" in
    # a prefix a user set).
    gen2_units = _units({
        "*.apower": "W", "*.voltage": "V", "*.current": "A", "*.freq": "Hz", "*.aenergy.total": "Wh",
        "*.ret_aenergy.total": "Wh", "*.aenergy.by_minute.*": "mWh", "*.ret_aenergy.by_minute.*": "mWh",
        "*.temperature.tC": "degC", "*.temperature.tF": "degF", "temperature:*.tC": "degC",
        "temperature:*.tF": "degF", "humidity:*.rh": "%", "*.battery.percent": "%", "*.battery.V": "V",
        "illuminance:*.lux": "lx", "wifi.rssi": "dBm", "sys.uptime": "s",
    })
    gen2_ignore = ["*.minute_ts"]
    return [
        {"name": "shelly.gen1", "topic": "shellies/{device}/#", "format": "value", "options": {"text": True},
         "exclude": ["shellies/announce", "shellies/command", "shellies/*/announce", "shellies/*/info",
                     "shellies/*/command", "shellies/*/command/*", "shellies/*/status", "shellies/*/input_event/*",
                     "shellies/*/act_reasons", "shellies/*/settings", "shellies/*/set"],
         "metrics": gen1_units},
        {"name": "shelly.rpc", "topic": "{device:[Ss]helly*}/events/rpc", "format": "json",
         "options": {"root": "params", "only_if": {"method": ["NotifyStatus", "NotifyFullStatus"]},
                     "time_required": False},
         "time_field": "ts", "metrics": gen2_units, "ignore": gen2_ignore},
        {"name": "shelly.status", "topic": "{device:[Ss]helly*}/status/{metric}", "format": "json",
         "options": {"allow_empty": True}, "metrics": gen2_units, "ignore": gen2_ignore},
    ]


def _homie(zone: str | None) -> list[dict[str, Any]]:
    # homie/5/<device>/<node>/<property> (Homie 5) and homie/<device>/<node>/<property> (Homie 3 and 4);
    # $-topics are attributes (datatype, unit, state...), .../set the controller's commands.
    # The last level is the property, whatever its name ("state" included). An empty payload clears a
    # retained property (device removal, Homie 5), and 0x00 is Homie 5's empty string: no readings.
    exclude = ["*/$*", "*/set"]
    options = {"text": True, "state_level": False, "allow_empty": True}
    return [
        {"name": "homie.v5", "topic": "homie/5/{device}/#", "format": "value", "options": options,
         "exclude": exclude},
        {"name": "homie.v4", "topic": "homie/{device}/#", "format": "value", "options": options,
         "exclude": exclude},
    ]


def _ttn(zone: str | None) -> list[dict[str, Any]]:
    # v3/<application id>@<tenant>/devices/<device id>/up (The Things Stack "MQTT Server").
    return [{"name": "ttn", "topic": "v3/{application}/devices/{device}/up", "format": "lorawan"}]


def _chirpstack(zone: str | None) -> list[dict[str, Any]]:
    # application/<application id>/device/<DevEUI>/event/up (ChirpStack v4 "MQTT integration").
    return [{"name": "chirpstack", "topic": "application/{application}/device/{device}/event/up",
             "format": "lorawan"}]


def _airrohr(zone: str | None) -> list[dict[str, Any]]:
    # The airrohr firmware's JSON (esp8266id, software_version, sensordatavalues[] of value_type and
    # value), as forwarded to MQTT. Devices are named as Sensor.Community names them: esp8266-<id>.
    metrics = _units({
        "*_P0": "ug/m3", "*_P1": "ug/m3", "*_P2": "ug/m3", "*_P4": "ug/m3", "*temperature": "degC",
        "*humidity": "%", "*pressure": "Pa", "signal": "dBm", "*noise_LA*": "dB(A)", "*_co2_ppm": "ppm",
        "interval": "ms", "min_micro": "us", "max_micro": "us",
    })
    return [{
        "name": "airrohr", "topic": "airrohr/#", "format": "json", "device_field": "esp8266id",
        "device_prefix": "esp8266-",
        "options": {"pairs": {"key": "sensordatavalues", "name": "value_type", "value": "value"}},
        "metrics": metrics,
    }]


def _homeassistant(zone: str | None) -> list[dict[str, Any]]:
    # <discovery_prefix>/<component>/<object_id>/state, the state topics of Home Assistant's MQTT
    # discovery examples: a flat JSON object of readings, or one bare value (ON / OFF are booleans).
    # Under the same prefix: the discovery configs (…/config) and commands, which are not states,
    # and <component>/<node_id>/<object_id>/state, whose bare value is named by its object id.
    return [{"name": "homeassistant", "topic": "homeassistant/+/{device}/#", "format": "auto",
             "exclude": ["homeassistant/*/config", "homeassistant/*/set", "homeassistant/*/command",
                         "homeassistant/*/availability"],
             "value_map": _ON_OFF}]


PRESETS: Final[dict[str, Preset]] = {p.name: p for p in (
    Preset("tasmota", "Tasmota", "https://tasmota.github.io/docs/MQTT/", _tasmota),
    Preset("zigbee2mqtt", "Zigbee2MQTT",
           "https://www.zigbee2mqtt.io/guide/usage/mqtt_topics_and_messages.html", _zigbee2mqtt),
    Preset("homeassistant", "Home Assistant style state topics",
           "https://www.home-assistant.io/integrations/mqtt/#discovery-messages", _homeassistant),
    Preset("esphome", "ESPHome", "https://esphome.io/components/mqtt.html", _esphome),
    Preset("shelly", "Shelly Gen1 and Gen2+", "https://shelly-api-docs.shelly.cloud/", _shelly),
    Preset("homie", "Homie 3, 4 and 5", "https://homieiot.github.io/specification/", _homie),
    Preset("ttn", "The Things Stack v3", "https://www.thethingsindustries.com/docs/integrations/mqtt/", _ttn),
    Preset("chirpstack", "ChirpStack v4",
           "https://www.chirpstack.io/docs/chirpstack/integrations/mqtt.html", _chirpstack),
    Preset("airrohr", "Sensor.Community (airrohr) JSON",
           "https://github.com/opendata-stuttgart/sensors-software", _airrohr),
)}
