"""The ingest pipeline end to end: real Mosquitto, real TimescaleDB, the service as a real process."""

from __future__ import annotations

import json
import re
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
    waiting_on_a_lock,
    write_config,
)
from tests.proxy import CONNECT, PUBACK, PUBLISH, FaultProxy, MqttPacket, puback_problems
from tests.services import REPO, Mosquitto, Postgres, wait_until

T0 = datetime(2026, 11, 25, 0, 0, tzinfo=UTC)


@pytest.fixture
def make_ingest(tmp_path: Path) -> Iterator[list[IngestProcess]]:
    procs: list[IngestProcess] = []
    yield procs
    for p in procs:
        p.close()


def _ingest(
    procs: list[IngestProcess], tmp_path: Path, prefix: str, db: str, mqtt: str, extra: str = "",
    mqtt_extra: str = "", keepalive: int = 10,
) -> IngestProcess:
    cfg = write_config(
        tmp_path / f"ingest{len(procs)}.toml", prefix=prefix, database_url=db, mqtt_url=mqtt, extra=extra,
        mqtt_extra=mqtt_extra, keepalive=keepalive,
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
    epoch = native("hn-aq-3", "1970-01-01T00:00:00Z", {"pm25": 1.0})
    impostor = native("hn-aq-1", T0.isoformat(), {"pm25": 99.0})  # on hn-aq-4's topic: claims another id
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
                (f"{topic_prefix}/hn-aq-3/up", epoch),
                (f"{topic_prefix}/hn-aq-4/up", impostor),
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
    assert {(r[0], bytes(r[1]), r[2], r[3]) for r in rows} == {
        ("malformed", malformed, f"{topic_prefix}/hn-aq-1/up", "native"),
        ("bad_time", epoch, f"{topic_prefix}/hn-aq-3/up", "native"),
        ("device_mismatch", impostor, f"{topic_prefix}/hn-aq-4/up", "native"),
    }
    assert "1970" in next(r[4] for r in rows if r[0] == "bad_time")
    assert ingest.terminate() == 0


# Reasons the service gives only on a bug or on what the database refuses; tested where those are
# made to happen (test_hostile_writes.py, tests/unit/test_process.py). Each refuses a whole message.
NOT_FROM_INPUT = {"decoder_error", "db_rejected", "write_error"}
LIMITS = ("\n[ingest]\nmax_message_bytes = 2048\nmax_readings_per_message = 3\nmax_new_metrics_per_minute = 1\n"
          "max_lines_per_message = 2\n")
LINE_SOURCE = ('\n[[sources]]\nname = "line"\ntopic = "{p}/line/{{device}}"\nformat = "line"\n'
               '\n[[sources]]\nname = "known"\ntopic = "{p}/known/{{gateway}}"\nformat = "native"\n'
               'device_policy = "known"\nallow_devices = ["hn-*"]\n')


def _json(value: object) -> bytes:
    return json.dumps(value).encode()


def _one_of_each_rejection(p: str) -> list[tuple[str, str, bytes]]:
    """(reason, topic, payload): one message for each rejection reason input can cause, under LIMITS
    (with LINE_SOURCE). Each holds one reading, or none: every reason, per-reading ones too, refuses the
    whole message here (tests/integration/test_clean_data.py has the per-reading reasons in messages
    that also hold valid readings). ``conflict`` needs its first value stored before: the test does that."""
    t = T0.isoformat()
    return [
        ("malformed", f"{p}/hn-rj-01/up", b'{"device": "hn-rj-01", "readings": {"pm25": 1.5'),
        ("schema", f"{p}/hn-rj-02/up", b'["not", "messages"]'),
        ("empty", f"{p}/hn-rj-03/up", _json({"time": t, "readings": {}})),
        ("wrong_type", f"{p}/hn-rj-04/up", _json({"time": t, "readings": {"pm25": "12.5"}})),
        ("bad_time", f"{p}/hn-rj-05/up", _json({"time": "1970-01-01T00:00:00Z", "readings": {"pm25": 1.0}})),
        ("not_finite", f"{p}/hn-rj-06/up", b'{"time": "%s", "readings": {"pm25": NaN}}' % t.encode()),
        ("bad_device", f"{p}/gw/gw-07", _json({"device": "xx-07", "time": t, "readings": {"pm25": 1.0}})),
        ("bad_metric", f"{p}/hn-rj-08/up", _json({"time": t, "readings": {"pm\u0007": 1.0}})),
        ("bad_text", f"{p}/hn-rj-09/up", _json({"time": t, "readings": {"status": {"text": "a\u0000b"}}})),
        ("too_long", f"{p}/hn-rj-10/up", _json({"time": t, "readings": {"status": {"text": "x" * 1001}}})),
        ("too_deep", f"{p}/hn-rj-11/up", b"[" * 40 + b"]" * 40),
        ("too_many_readings", f"{p}/hn-rj-12/up", _json({"time": t, "readings": {"a": 1, "b": 2, "c": 3, "d": 4}})),
        ("too_many_lines", f"{p}/line/hn-rj-19", b"w a=1\nw b=2\nw c=3\n"),
        ("device_mismatch", f"{p}/hn-rj-13/up", _json({"device": "hn-rj-99", "time": t, "readings": {"pm25": 1.0}})),
        ("no_device", f"{p}/gw/gw-14", _json({"time": t, "readings": {"pm25": 1.0}})),
        ("no_source", f"{p}//up", _json({"device": "hn-rj-15", "time": t, "readings": {"pm25": 1.0}})),  # `+`
        # matches the empty level, {device} does not
        ("unsupported", f"{p}/senml/hn-rj-16", _json([{"bver": 99, "n": "level", "v": 1.0}])),
        ("too_large", f"{p}/hn-rj-17/up", _json({"time": t, "readings": {"pm25": 1.0}, "pad": "p" * 3000})),
        # The only case with a reading stored: one new metric is within the budget.
        ("too_many_new_series", f"{p}/hn-rj-18/up", _json({"time": t, "readings": {"rj_new_a": 1.0, "rj_new_b": 2.0}})),
        ("out_of_range", f"{p}/hn-rj-20/up", _json({"time": t, "readings": {"pm25": 5000}})),  # possible: 0..2000
        ("bad_unit", f"{p}/hn-rj-21/up",
         _json({"time": t, "readings": {"temperature": {"value": 20, "unit": "hPa"}}})),
        ("unknown_device", f"{p}/known/gw-22", _json({"device": "hn-rj-22", "time": t, "readings": {"pm25": 1.0}})),
        # On the gateway source, whose one new metric the test's first message spent storing 1.0 for this
        # (device, metric, time): 2.0 conflicts.
        ("conflict", f"{p}/gw/gw-23", _json({"device": "hn-rj-23", "time": t, "readings": {"pm25": 2.0}})),
    ]


def _readme_rejection_reasons() -> set[str]:
    """The reason codes of README.md's "Rejection reasons" table."""
    section = (REPO / "README.md").read_text().split("### Rejection reasons", 1)[1].split("\n## ", 1)[0]
    rows = [line.split("|")[1] for line in section.splitlines() if line.startswith("| `")]
    return {code for cell in rows for code in re.findall(r"`([a-z_]+)`", cell)}


def test_every_rejection_reason_from_input_is_a_row_with_the_exact_bytes(
    tmp_path: Path, make_ingest: list[IngestProcess], database_url: str, broker: Mosquitto, topic_prefix: str
) -> None:
    from ingest.reasons import REASONS

    cases = _one_of_each_rejection(topic_prefix)
    assert {reason for reason, _, _ in cases} | NOT_FROM_INPUT == _readme_rejection_reasons() == set(REASONS)
    assert len(cases) == len(REASONS) - len(NOT_FROM_INPUT)  # one message per reason
    assert all(REASONS[r].whole_message for r in NOT_FROM_INPUT)
    assert len({payload for _, _, payload in cases}) == len(cases)  # each row is told apart by its bytes
    conflict_first = (f"{topic_prefix}/gw/gw-23",
                      _json({"device": "hn-rj-23", "time": T0.isoformat(), "readings": {"pm25": 1.0}}))
    ingest = _ingest(make_ingest, tmp_path, topic_prefix, database_url, broker.url,
                     extra=LINE_SOURCE.format(p=topic_prefix) + LIMITS)
    ingest.start()
    pub = Publisher(broker.port)
    try:
        pub.publish_all([conflict_first])  # committed before the message that contradicts it
        wait_until(lambda: ingest.metric("sensor_ingest_messages_acked_total") >= 1, 60, "the first value stored")
        pub.publish_all([(topic, payload) for _, topic, payload in cases])
    finally:
        pub.close()
    # Acknowledged only after its commit: once every message is, every row that will be is there.
    wait_until(lambda: ingest.metric("sensor_ingest_messages_acked_total") >= len(cases) + 1, 60,
               "every message acknowledged")
    with psycopg.connect(database_url) as c:
        rows = c.execute("SELECT reason, topic, payload, details FROM rejected_messages").fetchall()
    stored = sorted((str(reason), str(topic), bytes(payload)) for reason, topic, payload, _ in rows)
    # too_large keeps the first max_message_bytes bytes; every other row keeps the payload whole.
    want = sorted((reason, topic, payload[:2048] if reason == "too_large" else payload)
                  for reason, topic, payload in cases)
    assert stored == want
    # Each row's per-reading details name its one reason.
    assert sorted((str(reason), [d["reason"] for d in details]) for reason, _, _, details in rows) == sorted(
        (reason, [reason]) for reason, _, _ in cases)
    # No reading of a refused message is stored: only the one new metric within the budget, and the
    # first value of the conflict.
    assert stored_readings(database_url) == {("hn-rj-18", "rj_new_a", T0.isoformat(), 1.0),
                                             ("hn-rj-23", "pm25", T0.isoformat(), 1.0)}
    assert ingest.metric("sensor_ingest_rejections_total") == len(cases)
    assert ingest.metric("sensor_ingest_messages_acked_total") == len(cases) + 1
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
    """A window of messages is received on one broker connection, and its batch commits only after
    that connection is gone (a lock on `readings` holds the write until the broker is down). No
    PUBACK may go out for them, neither on their connection (closed) nor on the next one: there the
    broker redelivers them (DUP), the redelivered copies are committed again, absorbed by the unique
    key, and acknowledged. A recording proxy between service and broker sees every PUBLISH and PUBACK
    of every connection."""
    window = 500
    messages, expected = fleet(topic_prefix, 2000, T0)
    with FaultProxy(own_broker.port, record_mqtt=True) as proxy:
        # A short keepalive: with its window full the service reads nothing from the socket, so it
        # notices the lost connection only when its keepalive ping goes unanswered.
        ingest = _ingest(make_ingest, tmp_path, topic_prefix, database_url, f"mqtt://127.0.0.1:{proxy.port}",
                         mqtt_extra=f"receive_maximum = {window}", keepalive=5)
        ingest.start()
        assert ingest.terminate() == 0  # the session (and its subscription) stays at the broker
        pub = Publisher(own_broker.port)
        try:
            pub.publish_all(messages)
        finally:
            pub.close()

        with psycopg.connect(database_url) as locker:
            locker.execute("LOCK TABLE readings IN EXCLUSIVE MODE")  # held until the rollback below
            ingest.start()
            first = proxy.packets(CONNECT)[-1].conn
            wait_until(lambda: ingest.metric("sensor_ingest_messages_received_total") >= window, 60,
                       "a first window of messages")
            wait_until(lambda: waiting_on_a_lock(database_url), 60, "the batch's write to wait on the lock")
            assert ingest.metric("sensor_ingest_messages_acked_total") == 0
            own_broker.stop(signal.SIGTERM)
            wait_until(lambda: ingest.metric("sensor_ingest_mqtt_connected") == 0, 60, "the service to see it")
            locker.rollback()
        # The window commits while the broker is away: its connection is gone, so nothing is acked.
        wait_until(lambda: count(database_url, "readings") == 2 * window, 60, "the first window's commit")
        first_window = [p.payload for p in proxy.packets(PUBLISH, conn=first, direction="down")][:window]
        assert ingest.metric("sensor_ingest_messages_acked_total") == 0

        own_broker.start()

        everything = {payload for _, payload in messages}
        wait_until(lambda: count(database_url, "readings") == len(expected)
                   and _acked_payloads(proxy.packets()) == everything, 120, "every message stored and acknowledged")
        assert ingest.terminate() == 0
        packets = proxy.packets()

    # Every PUBACK answers a PUBLISH of its own connection, once; none went out on the first one.
    assert puback_problems(packets) == []
    assert [p for p in packets if p.conn == first and p.type == PUBACK] == []
    # The first window came back redelivered (DUP) on a later connection, was committed again there,
    # and the unique key absorbed it: every reading is stored, once, and nothing was rejected.
    redelivered = [p.payload for p in packets if p.conn > first and p.type == PUBLISH and p.dup]
    assert len(redelivered) >= window > 0
    assert set(first_window) <= set(redelivered)
    assert stored_readings(database_url) == expected
    assert count(database_url, "readings") == len(expected)
    assert _keys_stored_more_than_once(database_url) == 0
    assert count(database_url, "rejected_messages") == 0




def _keys_stored_more_than_once(url: str) -> int:
    with psycopg.connect(url) as c:
        row = c.execute(
            "SELECT count(*) FROM (SELECT 1 FROM readings GROUP BY device_id, metric_id, time HAVING count(*) > 1) d"
        ).fetchone()
    assert row is not None
    return int(row[0])


def _acked_payloads(packets: list[MqttPacket]) -> set[bytes | None]:
    """The payloads of the PUBLISHes that PUBACKs answered, each matched on its own connection."""
    waiting: dict[tuple[int, int | None], bytes | None] = {}
    acked: set[bytes | None] = set()
    for p in packets:
        if p.type == PUBLISH and p.direction == "down":
            waiting[(p.conn, p.packet_id)] = p.payload
        elif p.type == PUBACK and p.direction == "up" and (p.conn, p.packet_id) in waiting:
            acked.add(waiting.pop((p.conn, p.packet_id)))
    return acked


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
