"""`sensor-ingest simulate` against the real service: a 60-second fleet lands in the database.

The issue's acceptance test, run for real time: the simulator and the service are separate
processes on the private Mosquitto and TimescaleDB, and every count is checked exactly against the
simulator's --json summary.
"""

from __future__ import annotations

import json
import os
import subprocess
import sys
import threading
from collections import Counter
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ingest.simulate.faults import ALERT_THRESHOLDS, EXPECTED_REASONS
from ingest.simulate.fleet import KINDS
from tests.integration.harness import IngestProcess, write_config
from tests.services import REPO, Mosquitto, wait_until

DURATION = 60
RATE = 20.0
CODE_TO_KIND = {spec.code: name for name, spec in KINDS.items()}


def _simulate(*args: str, timeout: float) -> subprocess.CompletedProcess[str]:
    env = {k: v for k, v in os.environ.items() if not k.startswith("SENSOR_INGEST_")}
    return subprocess.run([sys.executable, "-m", "ingest", "simulate", *args], cwd=REPO, env=env,
                          capture_output=True, text=True, timeout=timeout, check=False)


def _kind(uid: str) -> str:
    return CODE_TO_KIND[uid.split("-")[1]]


@pytest.fixture
def ingest(tmp_path: Path, database_url: str, broker: Mosquitto, topic_prefix: str) -> Any:
    printed = _simulate("--print-sources", "--prefix", topic_prefix, timeout=60)
    assert printed.returncode == 0, printed.stderr
    config = write_config(tmp_path / "ingest.toml", prefix=topic_prefix, database_url=database_url,
                          mqtt_url=broker.url, extra=printed.stdout)
    proc = IngestProcess(config, tmp_path / "ingest.log")
    proc.start()
    yield proc
    proc.close()


def test_a_60_second_fleet_lands_in_the_database_with_every_family_and_kind(
    ingest: IngestProcess, database_url: str, broker: Mosquitto, topic_prefix: str
) -> None:
    result = _simulate("--duration", str(DURATION), "--rate", str(RATE), "--prefix", topic_prefix, "--seed", "7",
                       "--json", "--mqtt-url", broker.url, "--faults", "all", timeout=DURATION + 60)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)

    # The simulator: the whole schedule went out, and the broker answered everything.
    assert RATE * DURATION * 0.95 <= summary["published"] <= RATE * DURATION
    assert summary["unanswered"] == 0
    assert summary["refused"] == 0
    assert summary["sent_qos0"] == 0
    assert summary["acked"] == summary["published"]  # oversize payloads too: they reach the service
    assert summary["no_subscribers"] == 0  # the service was subscribed to every topic
    assert len(summary["silenced"]) == 1
    fleet = {uid: family for family, uids in summary["devices_per_family"].items() for uid in uids}
    assert len(fleet) == summary["devices"] == 70
    acked = summary["acked"]

    # The service: it has taken in (stored or rejected) every message the broker acknowledged.
    wait_until(lambda: ingest.metric("sensor_ingest_messages_acked_total") >= acked, 60,
               f"the service to commit and acknowledge {acked} messages")
    assert ingest.metric("sensor_ingest_messages_acked_total") == acked

    with psycopg.connect(database_url) as c:
        devices = {str(uid) for (uid,) in c.execute("SELECT uid FROM devices").fetchall()}
        per_metric = dict(c.execute(
            "SELECT m.name, count(*) FROM readings r JOIN metrics m ON m.id = r.metric_id GROUP BY m.name"
        ).fetchall())
        stored_messages = c.execute("SELECT count(*) FROM (SELECT DISTINCT device_id, time FROM readings) s"
                                    ).fetchone()
        states = c.execute("SELECT count(*) FROM states").fetchone()
        reasons = Counter(dict(c.execute("SELECT reason, count(*) FROM rejected_messages GROUP BY reason"
                                         ).fetchall()))
        flagged = c.execute("SELECT count(*) FROM readings WHERE flags <> 0").fetchone()
        above = 0
        for metric, threshold in ALERT_THRESHOLDS.values():
            row = c.execute("SELECT count(*) FROM readings r JOIN metrics m ON m.id = r.metric_id"
                            " WHERE m.name = %s AND r.value > %s", (metric, threshold)).fetchone()
            above += row[0] if row else 0
        floods = c.execute("SELECT count(*) FROM readings r JOIN metrics m ON m.id = r.metric_id"
                           " WHERE m.name = 'flood' AND r.value = 1").fetchone()
    assert stored_messages is not None
    assert states is not None
    assert flagged is not None
    assert floods is not None

    # Every device that was not silenced is there; so every kind in every family.
    silenced = set(summary["silenced"])
    assert set(fleet) - silenced <= devices
    assert devices <= set(fleet)
    assert {(_kind(uid), fleet[uid]) for uid in devices} == {(k, f) for k in KINDS for f in ("native", "senml")}
    # Readings of every metric of every kind.
    for spec in KINDS.values():
        for metric, _ in spec.metrics:
            assert per_metric.get(metric, 0) > 0, metric
    assert states[0] == 0
    assert flagged[0] == 0

    # Exact accounting: a message is either stored (one (device, time) per message) or rejected.
    assert stored_messages[0] + sum(reasons.values()) == acked

    # Rejections: exactly the bad payloads and bad clocks the broker acknowledged, with their reasons.
    expected = Counter[str]()
    for name, counts in summary["variants"].items():
        fault, variant = name.split("/")
        if fault in ("bad-payload", "bad-clock"):
            expected[EXPECTED_REASONS[variant]] += counts["acked"]
    assert +expected == +reasons
    assert set(reasons) <= {"malformed", "not_finite", "wrong_type", "bad_time", "too_large"}

    # Spikes were stored: each crosses its threshold once (water: its own flood level).
    assert above + floods[0] == summary["faults"]["spike"]["acked"] > 0


BACKFILL_END = "2026-11-25T09:00:30+07:00"  # floored to 09:00 Hanoi (02:00 UTC): the window is 00:00-02:00 UTC


def test_a_backfill_with_gaps_and_drops_stores_exactly_what_its_summary_says(
    ingest: IngestProcess, database_url: str, broker: Mosquitto, topic_prefix: str
) -> None:
    result = _simulate("--backfill", "2h", "--interval", "60", "--end", BACKFILL_END, "--devices", "14",
                       "--gap", "hn-aq-0001:10m-40m",
                       "--gap", "hn-noise-0002:2026-11-25T08:00:00+07:00..2026-11-25T08:15:00+07:00",
                       "--drop", "0.05", "--rate", "5000", "--seed", "3", "--prefix", topic_prefix,
                       "--mqtt-url", broker.url, "--json", timeout=120)
    assert result.returncode == 0, result.stderr
    summary = json.loads(result.stdout)
    assert summary["backfill"] == {"start": "2026-11-25T00:00:00+00:00", "end": "2026-11-25T02:00:00+00:00",
                                   "interval": 60.0, "expected": 120}
    per_device = summary["per_device"]
    assert len(per_device) == 14
    assert per_device["hn-aq-0001"]["gap"] == 30
    assert per_device["hn-noise-0002"]["gap"] == 15
    assert {uid for uid, row in per_device.items() if row["gap"]} == {"hn-aq-0001", "hn-noise-0002"}
    assert 0 < summary["dropped"] < 0.1 * 14 * 120
    for row in per_device.values():
        assert row["published"] == row["acked"] == 120 - row["gap"] - row["dropped"]
    assert summary["published"] == sum(row["published"] for row in per_device.values()) == summary["acked"]
    assert summary["no_subscribers"] == 0

    acked = summary["acked"]
    wait_until(lambda: ingest.metric("sensor_ingest_messages_acked_total") >= acked, 60,
               f"the service to commit and acknowledge {acked} messages")
    with psycopg.connect(database_url) as c:
        rows = c.execute("SELECT DISTINCT d.uid, r.time FROM readings r JOIN devices d ON d.id = r.device_id"
                         ).fetchall()
        rejected = c.execute("SELECT count(*) FROM rejected_messages").fetchone()
    assert rejected == (0,)
    times: dict[str, list[Any]] = {}
    for uid, when in rows:
        times.setdefault(str(uid), []).append(when)
    # What the service stored, device by device, is what the summary says was published ...
    assert {uid: len(ts) for uid, ts in times.items()} == {uid: r["published"] for uid, r in per_device.items()}
    start = datetime(2026, 11, 25, 0, 0, tzinfo=UTC)
    for uid, ts in times.items():
        buckets = [(t - start) // timedelta(minutes=1) for t in ts]
        # ... at most one message per bucket, inside the window and never on a boundary ...
        assert len(set(buckets)) == len(buckets), uid
        assert all(0 <= b < 120 for b in buckets), uid
        assert all((t - start) % timedelta(minutes=1) > timedelta(0) for t in ts), uid
    # ... and nothing in the gaps.
    aq = {(t - start) // timedelta(minutes=1) for t in times["hn-aq-0001"]}
    assert aq.isdisjoint(range(10, 40))
    noise = {(t - start) // timedelta(minutes=1) for t in times["hn-noise-0002"]}
    assert noise.isdisjoint(range(60, 75))


class _Counter:
    """A QoS 1 subscriber to the whole prefix that counts the messages of each device (topic level 3)."""

    def __init__(self, broker: Mosquitto, prefix: str) -> None:
        import paho.mqtt.client as paho
        from paho.mqtt.enums import CallbackAPIVersion, MQTTProtocolVersion

        self.counts: Counter[str] = Counter()
        self.subscribed = threading.Event()
        self._lock = threading.Lock()
        self.client = paho.Client(CallbackAPIVersion.VERSION2, client_id=f"count-{prefix}",
                                  protocol=MQTTProtocolVersion.MQTTv5)
        self.client.on_connect = lambda c, u, f, rc, p: c.subscribe(f"{prefix}/#", qos=1)
        self.client.on_subscribe = lambda c, u, mid, rcs, p: self.subscribed.set()
        self.client.on_message = self._on_message
        self.client.connect("127.0.0.1", broker.port)
        self.client.loop_start()

    def _on_message(self, client: object, userdata: object, message: Any) -> None:
        with self._lock:
            self.counts[message.topic.split("/")[2]] += 1

    def total(self) -> int:
        with self._lock:
            return sum(self.counts.values())

    def close(self) -> None:
        self.client.disconnect()
        self.client.loop_stop()


def test_a_live_run_with_a_gap_and_drops_sends_exactly_the_counts_of_its_summary(
    broker: Mosquitto, topic_prefix: str
) -> None:
    counter = _Counter(broker, topic_prefix)
    try:
        assert counter.subscribed.wait(10)
        result = _simulate("--duration", "4", "--rate", "50", "--devices", "7", "--drop", "0.2", "--seed", "5",
                           "--gap", "hn-aq-0001:0s-1h", "--prefix", topic_prefix, "--mqtt-url", broker.url, "--json",
                           timeout=60)
        assert result.returncode == 0, result.stderr
        summary = json.loads(result.stdout)
        wait_until(lambda: counter.total() >= summary["acked"], 30, "the subscriber to receive every message")
        per_device = summary["per_device"]
        assert dict(counter.counts) == {uid: r["published"] for uid, r in per_device.items() if r["published"]}
    finally:
        counter.close()
    # The gap covers the whole run: that device's slots stay empty, every one of them counted.
    assert per_device["hn-aq-0001"]["published"] == 0
    assert per_device["hn-aq-0001"]["gap"] > 20
    assert "backfill" not in summary
    assert 0 < summary["dropped"] == sum(r["dropped"] for r in per_device.values())
    slots = {uid: row["published"] + row["gap"] + row["dropped"] for uid, row in per_device.items()}
    assert all(row["published"] == row["acked"] for row in per_device.values())
    # Live, a skipped message keeps its slot, so the other devices keep their cadence: the fleet took
    # no more than rate x duration slots, shared evenly.
    assert 0.9 * 50 * 4 <= sum(slots.values()) <= 50 * 4
    assert max(slots.values()) - min(slots.values()) <= 1
