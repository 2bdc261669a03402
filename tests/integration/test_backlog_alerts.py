"""Issue #17: two workers that drain a backlog together record the events one worker records
(ingest/alerts/catchup.py), on the real Mosquitto and TimescaleDB, run as an operator runs it
(`sensor-ingest run --workers 2`).

A first run makes both workers' sessions; while they are stopped, a backlog of DEVICES x STEPS
one-reading messages is published, in event-time order, one second of event time a step. The broker
keeps each worker's share in its session (round robin: with an odd number of devices, each device's
readings alternate between the two queues),
and the two workers drain them side by side. Every device's pm25 runs the same cycle of six steps
(10, 60, 90, 60, 10, 10): rule pm25-high (above 50) fires at step 1 of each cycle and resolves at
step 4, pm25-very-high (above 80) fires at step 2 and resolves at step 3. One worker, judging the
stored rows in event-time order, records exactly these events; so must the two.

Run with the receive window (mqtt.receive_maximum) smaller than each worker's share, so that the
window fills and the broker holds the rest, and larger, so that a share comes at once after the
CONNACK. And once with alerts.catch_up_wait = 0 (no worker waits for another): readings come late and
events go missing, which shows that the backlog splits series across the workers as the premise says.
A lone worker holds its judgements too while it drains (it could judge in arrival order: it waits so
that the drain does not judge each batch), and records the same events.
"""

from __future__ import annotations

import json
import re
from collections import Counter
from collections.abc import Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path

import psycopg
import pytest

from tests.integration.harness import count, publish_acked
from tests.integration.test_workers import HANG, RECEIVED, Supervised, _config, _port_run
from tests.services import Mosquitto, wait_until

DEVICES = 41  # odd: Mosquitto hands a group's messages round robin, so each device's alternate
STEPS = 90  # 15 cycles of 6
CYCLE = (10.0, 60.0, 90.0, 60.0, 10.0, 10.0)
LATE = "sensor_ingest_alert_readings_late_total"
HELD = "sensor_ingest_alert_judging_held_seconds"

RULES = """
[[rules]]
name = "pm25-high"
metric = "pm25"
above = 50.0

[[rules]]
name = "pm25-very-high"
metric = "pm25"
above = 80.0
"""

Event = tuple[str, str, str, datetime]  # (rule, device, status, event time)


@pytest.fixture
def runs() -> Iterator[list[Supervised]]:
    """The supervisors a test starts, each closed (killed if still running) after it."""
    started: list[Supervised] = []
    yield started
    for r in started:
        r.close()


def device(i: int) -> str:
    return f"hn-bk-{i:03d}"


def backlog(prefix: str, base: datetime) -> tuple[list[tuple[str, bytes]], Counter[Event]]:
    messages: list[tuple[str, bytes]] = []
    expected: Counter[Event] = Counter()
    for k in range(STEPS):
        t = base + timedelta(seconds=k)
        for i in range(DEVICES):
            body = {"device": device(i), "time": t.isoformat(), "readings": {"pm25": CYCLE[k % 6]}}
            messages.append((f"{prefix}/{device(i)}/up", json.dumps(body).encode()))
            for rule, fires, resolves in (("pm25-high", 1, 4), ("pm25-very-high", 2, 3)):
                if k % 6 == fires:
                    expected[(rule, device(i), "firing", t)] += 1
                elif k % 6 == resolves:
                    expected[(rule, device(i), "resolved", t)] += 1
    return messages, expected


def recorded(db: str) -> Counter[Event]:
    with psycopg.connect(db) as c:
        rows = c.execute("SELECT e.rule, d.uid, e.status, e.event_time FROM alert_events e"
                         " JOIN devices d ON d.id = e.device_id").fetchall()
    return Counter((str(r), str(u), str(s), t) for r, u, s, t in rows)


def waiting(db: str) -> int:
    with psycopg.connect(db) as c:
        row = c.execute("SELECT count(*) FROM alert_state WHERE due_at IS NOT NULL").fetchone()
    assert row is not None
    return int(row[0])


def drain(tmp_path: Path, database_url: str, broker: Mosquitto, prefix: str, runs: list[Supervised], *,
          receive_maximum: int, catch_up_wait: str | None = None, workers: int = 2
          ) -> tuple[Supervised, Counter[Event]]:
    port = _port_run(workers)
    wait = "" if catch_up_wait is None else f'catch_up_wait = "{catch_up_wait}"\n'
    cfg = _config(tmp_path, prefix, database_url, broker, port=port,
                  extra=f"\n[alerts]\ndispatcher = false\n{wait}{RULES}")
    text = cfg.read_text().replace("[mqtt]\n", f"[mqtt]\nreceive_maximum = {receive_maximum}\n", 1)
    cfg.write_text(text)
    two = Supervised(cfg, tmp_path / "ingest.log", port, workers=workers)
    ks = range(1, workers + 1)
    runs.append(two)
    two.start()  # the sessions
    assert two.stop() == 0
    # Stopped, each worker's row says behind: the broker queues its share while it is away.
    with psycopg.connect(database_url) as c:
        rows = c.execute("SELECT behind_since IS NOT NULL FROM alert_sessions").fetchall()
    assert rows == [(True,)] * workers
    base = datetime.now(UTC).replace(microsecond=0) - timedelta(seconds=STEPS + 60)
    messages, expected = backlog(prefix, base)
    publish_acked(broker.port, messages)
    two.start()
    wait_until(lambda: count(database_url, "readings") == len(messages), HANG, "every reading stored")
    wait_until(lambda: all(two.metric(k, HELD) == 0 for k in ks) and waiting(database_url) == 0, HANG,
               "every series judged")
    received = [two.metric(k, RECEIVED) for k in ks]
    assert sum(received) == len(messages)
    assert all(r > 0 for r in received), received  # both drained a share of the backlog
    return two, expected


@pytest.mark.parametrize("receive_maximum", [500, 4096], ids=["window-fills", "share-at-once"])
def test_two_workers_draining_a_backlog_record_exactly_what_one_worker_records(
    tmp_path: Path, database_url: str, broker: Mosquitto, topic_prefix: str, runs: list[Supervised],
    receive_maximum: int
) -> None:
    two, expected = drain(tmp_path, database_url, broker, topic_prefix, runs, receive_maximum=receive_maximum)
    assert [two.metric(k, LATE) for k in (1, 2)] == [0, 0]
    got = recorded(database_url)
    assert got == expected, (sum((expected - got).values()), sum((got - expected).values()))
    assert count(database_url, "alert_events") == DEVICES * STEPS // 6 * 4
    log = two.log()
    assert re.search(r"judging waits for worker\(s\) .* to catch up", log), log[-3000:]
    assert "every worker has caught up; judging goes on" in log
    assert two.stop() == 0


def test_without_waiting_for_each_other_the_same_backlog_comes_late_and_loses_events(
    tmp_path: Path, database_url: str, broker: Mosquitto, topic_prefix: str, runs: list[Supervised]
) -> None:
    two, expected = drain(tmp_path, database_url, broker, topic_prefix, runs, receive_maximum=500,
                          catch_up_wait="0s")
    late = sum(two.metric(k, LATE) for k in (1, 2))
    got = recorded(database_url)
    assert late > 0
    assert sum((expected - got).values()) > 0  # events that one worker records, missing
    assert "longer than alerts.catch_up_wait = 0s): judging goes on without it" in two.log()
    assert two.stop() == 0


def test_a_lone_worker_judges_its_backlog_once_it_is_stored_and_records_the_same_events(
    tmp_path: Path, database_url: str, broker: Mosquitto, topic_prefix: str, runs: list[Supervised]
) -> None:
    one, expected = drain(tmp_path, database_url, broker, topic_prefix, runs, receive_maximum=500, workers=1)
    assert one.metric(1, LATE) == 0
    got = recorded(database_url)
    assert got == expected, (sum((expected - got).values()), sum((got - expected).values()))
    log = one.log()
    # Its own catching up held the judgements: the batches of the backlog judged nothing.
    assert re.search(r"judging waits for worker\(s\) \S+ to catch up \(\S+: catching up\)", log), log[-3000:]
    assert "every worker has caught up; judging goes on" in log
    assert one.stop() == 0
