"""Presets end to end (issue #12): the service with no [[sources]] at all stores the traffic of every
preset, published over the real broker, into the real database, and subscribes to no '#'.

The traffic is the presets' golden cases (tests/presets/cases: real published payloads), each on its
own topic; what lands must be what `sensor-ingest decode` printed for it there: the same readings
(device, metric, value, unit, flags, and the time unless it is the receive time), states, rejections
and skipped messages.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from datetime import datetime
from pathlib import Path
from typing import Any

import httpx
import psycopg
from paho.mqtt.client import topic_matches_sub

from ingest.settings import Settings
from tests.integration.harness import IngestProcess, Publisher
from tests.services import Mosquitto, free_port, wait_until

CASES = Path(__file__).resolve().parents[1] / "presets" / "cases"
FLAG_RECEIVE_TIME = 2


def _cases() -> list[tuple[str, bytes, dict[str, Any]]]:
    """(topic, payload, expected output) of every golden case that runs without environment."""
    out = []
    for case in sorted(p for p in CASES.glob("*/*") if (p / "expected.json").exists()):
        context = json.loads((case / "context.json").read_text(encoding="utf-8"))
        if context.get("env"):
            continue  # one service, one configuration: the cases of the default one
        out.append((context["topic"], (case / "payload").read_bytes(),
                    json.loads((case / "expected.json").read_text(encoding="utf-8"))))
    return out


def _key(r: dict[str, Any]) -> tuple[Any, ...]:
    value = r["value"]
    value = float(value) if isinstance(value, bool) else value  # booleans are stored as 1/0
    when = None if r["flags"] & FLAG_RECEIVE_TIME else datetime.fromisoformat(r["time"])
    return (r["device"], r["metric"], value, r["flags"], when)


def test_presets_alone_store_every_preset_and_subscribe_to_no_hash(
    tmp_path: Path, ingests: list[IngestProcess], database_url: str, own_broker: Mosquitto
) -> None:
    cases = _cases()
    assert {e["source"].split(".")[0] for _, _, e in cases} >= {
        "tasmota", "zigbee2mqtt", "homeassistant", "esphome", "shelly", "homie", "ttn", "chirpstack", "airrohr"}
    config = tmp_path / "ingest.toml"
    config.write_text(f"""
[database]
url = "{database_url}"

[mqtt]
url = "{own_broker.url}"
client_id = "ingest-presets"
reconnect_min = 0.1
reconnect_max = 1.0

[http]
addr = "127.0.0.1:{free_port()}"
""")
    ingest = IngestProcess(config, tmp_path / "ingest.log")
    ingests.append(ingest)
    ingest.start()

    subscribed = re.search(r"MQTT subscribed to (.+)", (tmp_path / "ingest.log").read_text()).group(1).split(", ")
    expected_filters = list(dict.fromkeys(s_route for s_route in _filters()))
    assert subscribed == expected_filters
    assert "#" not in subscribed
    assert all(not f.startswith(("#", "+/#")) for f in subscribed)

    # Beside them, a topic no preset reads: not subscribed, so it leaves no row (not even no_source).
    messages = [(topic, payload) for topic, payload, _ in cases] + [("city/hoan-kiem/unrelated", b"21.5")]
    pub = Publisher(own_broker.port)
    try:
        pub.publish_all(messages)
    finally:
        pub.close()
    wait_until(lambda: ingest.metric("sensor_ingest_messages_acked_total") >= len(cases), 60,
               "every preset message acknowledged")

    def rows(sql: str) -> list[tuple[Any, ...]]:
        with psycopg.connect(database_url) as c:
            return c.execute(sql).fetchall()

    want = [r for _, _, e in cases for r in e["readings"]]
    stored = [
        _key({"device": d, "metric": m, "value": v, "flags": f, "time": t.isoformat()})
        for table in ("readings", "states")
        for d, m, t, v, f in rows(
            f"SELECT d.uid, m.name, x.time, x.value, x.flags FROM {table} x"
            " JOIN devices d ON d.id = x.device_id JOIN metrics m ON m.id = x.metric_id")
    ]
    assert Counter(stored) == Counter(_key(r) for r in want)
    # A metric's unit is kept per metric name (the first one seen): one of those its readings gave.
    units: dict[str, set[str | None]] = {}
    for r in want:
        units.setdefault(r["metric"], set()).add(r["unit"])
    assert {name: unit in units[name] for name, unit in rows("SELECT name, unit FROM metrics")} == \
        dict.fromkeys(units, True)
    rejected = Counter((reason, topic) for reason, topic in rows("SELECT reason, topic FROM rejected_messages"))
    assert rejected == Counter((e["rejection"]["reason"], topic) for topic, _, e in cases if e["rejection"])
    skipped = Counter(e["skipped"] for _, _, e in cases if e.get("skipped"))
    # A topic that two of the filters match comes once per filter; the copies sent for a filter that
    # is not the topic's source's own are acknowledged and counted, never stored twice.
    skipped["overlap_copy"] = sum(sum(topic_matches_sub(f, topic) for f in subscribed) - 1 for topic, _, _ in cases)
    assert skipped["overlap_copy"] > 0
    assert _skipped_by_reason(ingest) == +skipped
    assert ingest.terminate() == 0


def _skipped_by_reason(ingest: IngestProcess) -> Counter[str]:
    text = httpx.get(f"http://{ingest.http}/metrics", timeout=5).text
    out: Counter[str] = Counter()
    for line in text.splitlines():
        if line.startswith("sensor_ingest_messages_skipped_total{"):
            reason = re.search(r'reason="([^"]+)"', line).group(1)
            out[reason] += int(float(line.rsplit(" ", 1)[1]))
    return +out


def _filters() -> list[str]:
    from ingest.routing import compile_template

    return [compile_template(s.topic).filter for s in Settings().all_sources()]
