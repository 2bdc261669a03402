"""Every format, through sources that use the mapping options, end to end: real Mosquitto, real
TimescaleDB, the service as a real process. Malformed messages of each new format sit beside the good
ones and must end as rejection rows with their reasons."""

from __future__ import annotations

import json
from datetime import UTC, datetime, timedelta
from pathlib import Path
from zoneinfo import ZoneInfo

import psycopg

from tests.integration.harness import IngestProcess, Publisher, native, write_config
from tests.services import Mosquitto, wait_until

HANOI = ZoneInfo("Asia/Ho_Chi_Minh")

SOURCES = """
[[sources]]
name = "tasmota"
topic = "{p}/tele/{{district}}/{{device}}/SENSOR"
format = "json"
time_field = "Time"
timezone = "Asia/Ho_Chi_Minh"
rename = {{ "AM2301.Temperature" = "temperature" }}
ignore = ["ENERGY.TotalStartTime"]
[sources.metrics."AM2301.Humidity"]
rename = "humidity"
unit = "%"
[sources.metrics."ENERGY.*"]
unit = "kWh"
[sources.metrics."ENERGY.Voltage"]
unit = "V"

[[sources]]
name = "airrohr"
topic = "{p}/airrohr"
format = "json"
device_field = "esp8266id"
device_prefix = "sc-"

[[sources]]
name = "ttn"
topic = "{p}/v3/{{application}}/devices/{{device}}/up"
format = "lorawan"
options = {{ radio = true }}
[sources.metrics.water_cm]          # an ultrasonic gauge 4.20 m above the river bed
rename = "water_level"
scale = -0.01
offset = 4.2
unit = "m"

[[sources]]
name = "chirpstack"
topic = "{p}/application/{{application}}/device/{{device}}/event/+"
format = "lorawan"

[[sources]]
name = "telegraf"
topic = "{p}/telegraf/{{site}}"
format = "line"
allow_devices = ["hn-*"]
options = {{ precision = "s" }}
states = ["weather.status"]

[[sources]]
name = "esphome"
topic = "{p}/esphome/{{device}}/#"
format = "value"
states = ["text_sensor.*"]
rename = {{ "sensor.noise_level" = "noise" }}
[sources.metrics."sensor.noise_level"]
unit = "dB(A)"

[[sources]]
name = "shelly"
topic = "{p}/shellies/{{device}}/relay/{{metric}}"
format = "value"
value_map = {{ "on" = 1, "off" = 0 }}
rename = {{ "0" = "relay0" }}
"""


def _tts(device: str, when: datetime, decoded: dict[str, object]) -> bytes:
    # The Things Stack v3 uplink envelope (docs "Data Formats"), trimmed to the fields it documents
    # as set on every uplink, with two gateways.
    return json.dumps({
        "end_device_ids": {"device_id": device, "application_ids": {"application_id": "hn-water"},
                           "dev_eui": "0004A30B001C0530"},
        "received_at": when.strftime("%Y-%m-%dT%H:%M:%S.123456789Z"),
        "uplink_message": {
            "f_port": 1, "f_cnt": 7, "frm_payload": "AHg=", "decoded_payload": decoded,
            "rx_metadata": [
                {"gateway_ids": {"gateway_id": "gw-far"}, "rssi": -112, "channel_rssi": -112, "snr": -7.5},
                {"gateway_ids": {"gateway_id": "gw-near"}, "rssi": -71, "channel_rssi": -71, "snr": 9.25},
            ],
        },
    }).encode()


def _chirpstack_up(dev_eui: str, when: datetime, obj: dict[str, object]) -> bytes:
    return json.dumps({
        "deduplicationId": "5d9a3908-c0d9-4feb-bf6d-a61ca48b9ebf", "time": when.isoformat(),
        "deviceInfo": {"tenantId": "t", "applicationId": "abc", "deviceName": "rain-1", "devEui": dev_eui},
        "devAddr": "3610bd78", "adr": True, "dr": 5, "fCnt": 18, "fPort": 2, "confirmed": False, "data": "AQ==",
        "object": obj, "rxInfo": [{"gatewayId": "0010502df4563610", "rssi": -60, "snr": 14.0}],
    }).encode()


def test_all_six_formats_land_with_their_mapping_and_malformed_ones_are_rejected(
    tmp_path: Path, ingests: list[IngestProcess], database_url: str, broker: Mosquitto, topic_prefix: str
) -> None:
    p = topic_prefix
    t0 = datetime.now(UTC).replace(microsecond=0) - timedelta(hours=1)
    cfg = write_config(tmp_path / "ingest.toml", prefix=p, database_url=database_url, mqtt_url=broker.url,
                       extra=SOURCES.format(p=p))
    ingest = IngestProcess(cfg, tmp_path / "ingest.log")
    ingests.append(ingest)
    ingest.start()

    local = t0.astimezone(HANOI).replace(tzinfo=None).isoformat()
    tasmota = json.dumps({"Time": local, "AM2301": {"Temperature": 24.6, "Humidity": 58.2},
                          "ENERGY": {"TotalStartTime": "2019-10-05T10:28:46", "Total": 1.5, "Voltage": 229},
                          "TempUnit": "C"}).encode()
    airrohr = json.dumps({"esp8266id": "13463000", "software_version": "NRZ-2020-129",
                          "sensordatavalues": [{"value_type": "SDS_P1", "value": "12.30"}]}).encode()
    line = (f'weather,host=hn-ws-1,site=cg temperature=28.5,humidity=70i,raining=t,status="ok" {int(t0.timestamp())}\n'
            f"weather,host=hn-ws-1 pressure=1009.5 {int(t0.timestamp()) + 60}\n").encode()
    join = json.dumps({"deduplicationId": "c9dbe358", "time": t0.isoformat(), "deviceInfo": {
        "tenantId": "t", "applicationId": "abc", "deviceName": "rain-1", "devEui": "0102030405060708"},
        "devAddr": "00189440"}).encode()
    bad = [  # (reason, topic, payload)
        ("malformed", f"{p}/tele/hoan-kiem/hn-tas-2/SENSOR", b'{"Time": "2026-'),
        ("bad_time", f"{p}/tele/hoan-kiem/hn-tas-3/SENSOR", b'{"AM2301": {"Temperature": 20.1}}'),
        ("device_mismatch", f"{p}/v3/hn-water@ttn/devices/hn-wl-2/up", _tts("hn-wl-9", t0, {"water_cm": 1})),
        ("schema", f"{p}/v3/hn-water@ttn/devices/hn-wl-3/up", b'{"end_device_ids": {"device_id": "hn-wl-3"}, '
         b'"received_at": "2026-11-25T03:00:00Z", "uplink_message": {"decoded_payload": [1, 2]}}'),
        ("malformed", f"{p}/telegraf/cau-giay", b"weather,host=hn-ws-2 temperature=\n"),
        ("not_finite", f"{p}/telegraf/cau-giay", b"weather,host=hn-ws-2 temperature=1e999\n"),
        ("bad_device", f"{p}/telegraf/cau-giay", f"weather,host=xx-1 temperature=1 {int(t0.timestamp())}".encode()),
        ("not_finite", f"{p}/esphome/hn-noise-2/sensor/noise_level/state", b"nan"),
        ("wrong_type", f"{p}/esphome/hn-noise-3/sensor/noise_level/state", b"loud"),
    ]
    messages = [
        (f"{p}/tele/hoan-kiem/hn-tas-1/SENSOR", tasmota),
        (f"{p}/airrohr", airrohr),
        (f"{p}/v3/hn-water@ttn/devices/hn-wl-1/up", _tts("hn-wl-1", t0, {"water_cm": 120, "battery": 3.6})),
        (f"{p}/application/abc/device/0102030405060708/event/up",
         _chirpstack_up("0102030405060708", t0, {"rain_mm": 2.5})),
        (f"{p}/application/abc/device/0102030405060708/event/join", join),
        (f"{p}/telegraf/cau-giay", line),
        (f"{p}/esphome/hn-noise-1/sensor/noise_level/state", b"63.5"),
        (f"{p}/esphome/hn-noise-1/text_sensor/status/state", b"calibrating"),
        (f"{p}/shellies/hn-light-1/relay/0", b"on"),
        (f"{p}/hn-aq-1/up", native("hn-aq-1", t0.isoformat(), {"pm25": 10.0})),
        (f"{p}/senml/hn-rain-7", json.dumps([{"bn": "hn-rain-7:", "bt": t0.timestamp(), "n": "rain", "u": "mm",
                                              "v": 3.5}]).encode()),
        *((t, b) for _, t, b in bad),
    ]
    pub = Publisher(broker.port)
    try:
        pub.publish_all(messages)
    finally:
        pub.close()

    def rows(sql: str) -> list[tuple[object, ...]]:
        with psycopg.connect(database_url) as c:
            return c.execute(sql).fetchall()

    wait_until(lambda: ingest.metric("sensor_ingest_messages_acked_total") >= len(messages), 60,
               "every message acknowledged")
    readings = {
        (d, m): (t, v, u, f) for d, m, t, v, u, f in rows(
            "SELECT d.uid, m.name, r.time, r.value, m.unit, r.flags FROM readings r"
            " JOIN devices d ON d.id = r.device_id JOIN metrics m ON m.id = r.metric_id")
    }
    at = t0
    assert {k: v for k, v in readings.items() if not v[3]} == {
        ("hn-tas-1", "temperature"): (at, 24.6, "degC", 0),  # the catalog: stored in its quantity's unit
        ("hn-tas-1", "humidity"): (at, 58.2, "%", 0),
        ("hn-tas-1", "ENERGY.Total"): (at, 1.5, "kWh", 0),
        ("hn-tas-1", "ENERGY.Voltage"): (at, 229.0, "V", 0),
        ("hn-wl-1", "water_level"): (at + timedelta(microseconds=123456), 3.0, "m", 0),
        ("hn-wl-1", "battery"): (at + timedelta(microseconds=123456), 3.6, "%", 0),
        ("hn-wl-1", "rssi"): (at + timedelta(microseconds=123456), -71.0, "dBm", 0),
        ("hn-wl-1", "snr"): (at + timedelta(microseconds=123456), 9.25, "dB", 0),
        ("0102030405060708", "rain_mm"): (at, 2.5, "mm", 0),
        ("hn-ws-1", "weather.temperature"): (at, 28.5, "degC", 0),
        ("hn-ws-1", "weather.humidity"): (at, 70.0, "%", 0),
        ("hn-ws-1", "weather.raining"): (at, 1.0, None, 0),
        ("hn-ws-1", "weather.pressure"): (at + timedelta(seconds=60), 1009.5, "hPa", 0),
        ("hn-aq-1", "pm25"): (at, 10.0, "ug/m3", 0),
        ("hn-rain-7", "rain"): (at, 3.5, "mm", 0),
    }
    # No time in the payload: the receive time, flagged (FLAG_RECEIVE_TIME = 2).
    received = {k: v[1:] for k, v in readings.items() if v[3]}
    assert received == {
        ("sc-13463000", "sensordatavalues.0.value"): (12.3, None, 2),
        ("hn-noise-1", "noise"): (63.5, "dB(A)", 2),
        ("hn-light-1", "relay0"): (1.0, None, 2),
    }
    assert rows("SELECT d.uid, m.name, s.value FROM states s JOIN devices d ON d.id = s.device_id"
                " JOIN metrics m ON m.id = s.metric_id ORDER BY 1, 2") == [
        ("hn-noise-1", "text_sensor.status", "calibrating"), ("hn-ws-1", "weather.status", "ok")]
    kinds = dict(rows("SELECT name, kind FROM metrics WHERE name IN ('weather.raining', 'text_sensor.status')"))
    assert kinds == {"weather.raining": "bool", "text_sensor.status": "state"}
    attributes = {uid: a for uid, a in rows("SELECT uid, attributes FROM devices WHERE attributes <> '{}'")}
    assert attributes == {
        "hn-tas-1": {"district": "hoan-kiem"},
        "hn-wl-1": {"application": "hn-water@ttn"},
        "0102030405060708": {"application": "abc"},
        "hn-ws-1": {"site": "cau-giay"},
    }
    rejected = rows("SELECT reason, topic, payload FROM rejected_messages")
    assert sorted((r, t, bytes(b)) for r, t, b in rejected) == sorted(bad)
    # The join event is acknowledged and counted, not stored and not a rejection.
    assert ingest.metric("sensor_ingest_messages_skipped_total") == 1
    assert ingest.terminate() == 0
