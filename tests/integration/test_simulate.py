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
from collections import Counter
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
