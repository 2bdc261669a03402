"""The ingest pipeline end to end: real Mosquitto, real TimescaleDB, the service as a real process."""

from __future__ import annotations

import json
import signal
import threading
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from tests.integration.harness import (
    IngestProcess,
    Publisher,
    count,
    fleet,
    native,
    stored_readings,
    write_config,
)
from tests.services import Mosquitto, Postgres, wait_until

T0 = datetime(2026, 11, 25, 0, 0, tzinfo=UTC)


@pytest.fixture
def make_ingest(tmp_path: Path) -> Iterator[list[IngestProcess]]:
    procs: list[IngestProcess] = []
    yield procs
    for p in procs:
        p.close()


def _ingest(
    procs: list[IngestProcess], tmp_path: Path, prefix: str, db: str, mqtt: str, extra: str = ""
) -> IngestProcess:
    cfg = write_config(
        tmp_path / f"ingest{len(procs)}.toml", prefix=prefix, database_url=db, mqtt_url=mqtt, extra=extra
    )
    proc = IngestProcess(cfg, tmp_path / "ingest.log")
    procs.append(proc)
    return proc


def test_valid_messages_stored_and_malformed_ones_rejected_with_raw_bytes(
    tmp_path: Path, make_ingest: list[IngestProcess], database_url: str, broker: Mosquitto, topic_prefix: str
) -> None:
    ingest = _ingest(make_ingest, tmp_path, topic_prefix, database_url, broker.url)
    ingest.start()
    malformed = b'{"device": "hn-aq-1", "readings": {"pm25": 12.5'  # cut short
    senml = json.dumps(
        [
            {"bn": "hn-rain-7:", "bt": T0.timestamp(), "n": "rain", "u": "mm", "v": 3.5},
            {"n": "level", "u": "m", "v": 1.25, "t": 60},
        ]
    ).encode()
    pub = Publisher(broker.port)
    try:
        pub.publish_all(
            [
                (f"{topic_prefix}/hn-aq-1/up", native("hn-aq-1", T0.isoformat(), {"pm25": 10.0})),
                (f"{topic_prefix}/hn-aq-1/up", malformed),
                (f"{topic_prefix}/hn-aq-2/up", native("hn-aq-2", T0.isoformat(), {"pm25": 11.0, "no2": 40.0})),
                (f"{topic_prefix}/senml/hn-rain-7", senml),
                (f"{topic_prefix}/hn-aq-3/up", native("hn-aq-3", "1970-01-01T00:00:00Z", {"pm25": 1.0})),
                (f"{topic_prefix}/hn-aq-4/up", native("hn-aq-1", T0.isoformat(), {"pm25": 99.0})),  # claims another id
            ]
        )
    finally:
        pub.close()
    wait_until(
        lambda: count(database_url, "rejected_messages") == 3 and count(database_url, "readings") == 5,
        60,
        "3 rejections and 5 readings",
    )
    assert stored_readings(database_url) == {
        ("hn-aq-1", "pm25", T0.isoformat(), 10.0),
        ("hn-aq-2", "pm25", T0.isoformat(), 11.0),
        ("hn-aq-2", "no2", T0.isoformat(), 40.0),
        ("hn-rain-7", "rain", T0.isoformat(), 3.5),
        ("hn-rain-7", "level", (T0 + timedelta(seconds=60)).isoformat(), 1.25),
    }
    with psycopg.connect(database_url) as c:
        rows = c.execute(
            "SELECT reason, payload, topic, source, detail FROM rejected_messages ORDER BY reason"
        ).fetchall()
    by_reason = {r[0]: r for r in rows}
    assert set(by_reason) == {"bad_time", "device_mismatch", "malformed"}
    assert bytes(by_reason["malformed"][1]) == malformed
    assert by_reason["malformed"][2] == f"{topic_prefix}/hn-aq-1/up"
    assert by_reason["malformed"][3] == "native"
    assert "1970" in by_reason["bad_time"][4]
    assert ingest.terminate() == 0


@pytest.mark.parametrize("sig", [signal.SIGKILL, signal.SIGTERM], ids=["sigkill", "sigterm"])
def test_stopped_three_times_mid_stream_loses_and_doubles_nothing(
    tmp_path: Path,
    make_ingest: list[IngestProcess],
    database_url: str,
    broker: Mosquitto,
    topic_prefix: str,
    sig: signal.Signals,
) -> None:
    # SIGKILL: nothing after the last commit was acknowledged, so the broker redelivers it.
    # SIGTERM: the graceful path (stop reading, flush, commit, ack, disconnect) must exit 0.
    n = 20_000
    messages, expected = fleet(topic_prefix, n, T0)
    ingest = _ingest(make_ingest, tmp_path, topic_prefix, database_url, broker.url)
    ingest.start()
    pub = Publisher(broker.port)
    publisher = threading.Thread(target=pub.publish_all, args=(messages,))
    publisher.start()
    kills = 0
    try:
        for fraction in (0.25, 0.5, 0.75):
            wait_until(
                lambda f=fraction: count(database_url, "readings") >= f * len(expected),  # type: ignore[misc]
                120,
                f"{fraction:.0%} of the readings",
            )
            if sig == signal.SIGKILL:
                ingest.kill()
            else:
                assert ingest.terminate() == 0
            kills += 1
            ingest.start()
        publisher.join(120)
        assert pub.acked == n
        wait_until(lambda: count(database_url, "readings") >= len(expected), 120, "every reading")
        stored = stored_readings(database_url)
        assert count(database_url, "readings") == len(expected)
        assert stored == expected
        assert kills == 3

        # The same messages again: redelivery must add no row.
        before = ingest.metric("sensor_ingest_messages_acked_total")
        pub.publish_all(messages)
        wait_until(
            lambda: ingest.metric("sensor_ingest_messages_acked_total") >= before + n,
            120,
            "the republished messages to be acknowledged",
        )
        assert count(database_url, "readings") == len(expected)
        assert stored_readings(database_url) == expected
        assert count(database_url, "rejected_messages") == 0
    finally:
        pub.close()
        publisher.join(5)


def test_broker_connection_drop_mid_batch_acks_only_on_the_new_connection(
    tmp_path: Path, make_ingest: list[IngestProcess], database_url: str, own_broker: Mosquitto, topic_prefix: str
) -> None:
    # Batches stay open for 3 s, so the broker restart lands while messages are received and
    # not yet committed: they are committed on the old connection, must not be acked on the new
    # one, come back redelivered, and the unique key absorbs them.
    extra = "\n[ingest]\nbatch_max_age = 3.0\nbatch_max_messages = 100000\n"
    extra_mqtt = "receive_maximum = 500\n"
    ingest = _ingest(make_ingest, tmp_path, topic_prefix, database_url, own_broker.url, extra)
    text = ingest.config.read_text().replace("keepalive = 10\n", "keepalive = 10\n" + extra_mqtt)
    ingest.config.write_text(text)
    ingest.start()
    assert ingest.terminate() == 0  # the session (and its subscription) stays at the broker

    messages, expected = fleet(topic_prefix, 2000, T0)
    pub = Publisher(own_broker.port)
    try:
        pub.publish_all(messages)
    finally:
        pub.close()
    ingest.start()
    wait_until(lambda: ingest.metric("sensor_ingest_messages_received_total") >= 500, 60, "a first window of messages")
    assert ingest.metric("sensor_ingest_messages_acked_total") == 0
    own_broker.stop(signal.SIGTERM)
    own_broker.start()
    wait_until(lambda: count(database_url, "readings") >= len(expected), 120, "every reading")
    wait_until(lambda: ingest.metric("sensor_ingest_mqtt_reconnects_total") >= 1, 30, "the reconnect")
    assert stored_readings(database_url) == expected
    assert count(database_url, "readings") == len(expected)
    wait_until(
        lambda: ingest.metric("sensor_ingest_conflict_batches_total") >= 1,
        30,
        "a batch of redelivered messages written through ON CONFLICT",
    )
    assert ingest.terminate() == 0


def test_service_refuses_to_start_on_an_unmigrated_database(
    tmp_path: Path, pg: Postgres, empty_database_url: str, broker: Mosquitto, topic_prefix: str
) -> None:
    import subprocess
    import sys

    from tests.services import REPO

    cfg = write_config(tmp_path / "c.toml", prefix=topic_prefix, database_url=empty_database_url, mqtt_url=broker.url)
    out = subprocess.run(
        [sys.executable, "-m", "ingest", "run", "--config", str(cfg)],
        cwd=REPO,
        capture_output=True,
        text=True,
        timeout=60,
    )
    assert out.returncode == 2
    assert "sensor-ingest migrate" in out.stderr
