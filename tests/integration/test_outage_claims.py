"""What the service does with the messages it holds while the database is away or blocked (issue #10).

Each test runs the real service as a process against the real broker and database and asserts what
can be observed from outside: /metrics, the log, the stored rows and the exit code.

- A QoS 0 flood while the database is blocked fills the pipeline's inbox up to twice
  ``mqtt.receive_maximum`` and no further; reading starts again below half of it, and what is
  published once the service is back is stored. Committed QoS 0 messages free the receive window.
- Messages of a lost connection still queued unwritten when the session is resumed are released to
  the broker's redelivery (``stale_messages_released_total``) and stored once.
- A stop signal while the database does not answer ends the process within the shutdown grace,
  leaving the rest to the broker; the next process stores all of it.
- A write held up past database.command_timeout, by a row lock or by the abandoned transaction of
  a connection cut off behind a proxy, is retried until it commits, never stored as a rejection.
- A slow write with a full receive window behind it does not cost the broker connection (a bug
  found here: the bridge read nothing, PINGRESPs included, while the window was full).

The database is blocked with ``LOCK TABLE``: the service's writes wait on the lock while the
database keeps answering its probe, so this is a slow database, not an outage (no suspension).
"""

from __future__ import annotations

import re
import signal
import subprocess
import threading
import time
from collections.abc import Callable
from datetime import UTC, datetime, timedelta
from pathlib import Path
from urllib.parse import urlsplit

import psycopg
import pytest

from ingest.service import SHUTDOWN_GRACE
from tests.integration.harness import (
    HealthSampler,
    IngestProcess,
    Publisher,
    count,
    fleet,
    native,
    stored_readings,
    waiting_on_a_lock,
    write_config,
)
from tests.proxy import FaultProxy
from tests.services import Mosquitto, wait_until

T0 = datetime(2025, 11, 27, 0, 0, tzinfo=UTC)  # in the past: ingest.max_future rejects the future
KEEPALIVE = 5  # the smallest the settings accept: a lost connection is noticed within one or two
RECEIVE_MAXIMUM = 100
INBOX_LIMIT = 2 * RECEIVE_MAXIMUM  # ingest/service.py: the pipeline's inbox_limit
BOUND = 60  # seconds: a bound on a hang, never a measure
GAUGE_LAG = 1.5  # seconds: the gauges are updated every second; a sample this much later shows the update

INBOX = "sensor_ingest_inbox_messages"
UNACKED = "sensor_ingest_messages_unacked"
RECONNECTS = "sensor_ingest_mqtt_reconnects_total"
RELEASED = "sensor_ingest_stale_messages_released_total"
SUSPENDED = "sensor_ingest_mqtt_suspended"

Reading = tuple[str, str, str, float]




def _service(ingests: list[IngestProcess], tmp_path: Path, *, prefix: str, database_url: str, mqtt_url: str,
             mqtt_extra: str = "", database_extra: str = "", ingest_extra: str = "") -> IngestProcess:
    cfg = write_config(
        tmp_path / "ingest.toml", prefix=prefix, database_url=database_url, mqtt_url=mqtt_url, keepalive=KEEPALIVE,
        mqtt_extra=f"receive_maximum = {RECEIVE_MAXIMUM}\nconnect_timeout = 3\n{mqtt_extra}",
        database_extra=database_extra,
        extra=f"\n[ingest]\n{ingest_extra}\n" if ingest_extra else "",
    )
    ingest = IngestProcess(cfg, tmp_path / "ingest.log")
    ingests.append(ingest)
    return ingest




def _last(health: HealthSampler, name: str) -> float | None:
    values = [s.metrics[name] for s in list(health.samples) if name in s.metrics]
    return values[-1] if values else None


def _message(prefix: str, i: int, t0: datetime) -> tuple[str, bytes, set[Reading]]:
    device = f"hn-fl-{i % 100:03d}"
    t = (t0 + timedelta(seconds=i // 100)).isoformat()
    value = float(i)  # "seq": a message number, bound to no catalog quantity (pm25 would be out of range)
    return f"{prefix}/{device}/up", native(device, t, {"seq": value}), {(device, "seq", t, value)}


class _Flood(threading.Thread):
    """QoS 0 messages, each with its own (device, time), at a steady rate until stopped."""

    def __init__(self, pub: Publisher, prefix: str, rate: int = 1000) -> None:
        super().__init__(name="qos0-flood", daemon=True)
        self.pub, self.prefix, self.rate = pub, prefix, rate
        self.sent = 0
        self.published: set[Reading] = set()
        self._halt = threading.Event()

    def run(self) -> None:
        chunk = max(1, self.rate // 20)
        while not self._halt.is_set():
            for _ in range(chunk):
                topic, payload, readings = _message(self.prefix, self.sent, T0)
                self.pub.client.publish(topic, payload, qos=0)
                self.published |= readings
                self.sent += 1
            self._halt.wait(chunk / self.rate)  # the flood's rate, not a synchronisation

    def stop(self) -> None:
        self._halt.set()
        if self.ident is not None:
            self.join(30)


def test_committed_qos0_messages_free_the_receive_window(
    tmp_path: Path, ingests: list[IngestProcess], database_url: str, broker: Mosquitto, topic_prefix: str,
) -> None:
    """A QoS 0 message needs no PUBACK, but it counts in the receive window until its commit like any
    other. A device that publishes at QoS 0 is delivered at QoS 0 even under the default QoS 1
    subscription, so a burst of them fills the window; their commits must open it again. Before
    issue #10 they did not (MqttBridge._send_acks returned early when there was no PUBACK to send):
    the connection read nothing more, not even PINGRESPs, until paho's keepalive gave it up, and the
    QoS 0 messages on their way over it were lost."""
    ingest = _service(ingests, tmp_path, prefix=topic_prefix, database_url=database_url, mqtt_url=broker.url)
    ingest.start()
    burst = [_message(topic_prefix, i, T0) for i in range(10 * RECEIVE_MAXIMUM)]
    readings = set().union(*(r for _, _, r in burst))
    pub = Publisher(broker.port)
    try:
        pub.publish_all([(topic, payload) for topic, payload, _ in burst], qos=0)
    finally:
        pub.close()
    wait_until(lambda: count(database_url, "readings") >= len(readings), BOUND, "every reading of the burst")
    assert stored_readings(database_url) == readings
    log = ingest.log_path.read_text()
    assert "MQTT connection lost" not in log, log[-3000:]
    assert ingest.terminate() == 0


def _assert_inbox_bounded(health: HealthSampler) -> None:
    peak = health.max_of(INBOX)
    assert peak is not None, f"{INBOX} was never sampled"
    assert peak <= INBOX_LIMIT, f"{INBOX} reached {peak}, above the bound of {INBOX_LIMIT} (twice receive_maximum)"


def test_a_qos0_flood_on_a_blocked_database_holds_the_inbox_at_twice_receive_maximum(
    tmp_path: Path, ingests: list[IngestProcess], database_url: str, broker: Mosquitto, topic_prefix: str,
    make_proxy: Callable[[int], FaultProxy],
) -> None:
    """On one connection the receive window bounds what the service reads, QoS 0 or not: it stops
    reading at receive_maximum unacknowledged messages. But every new connection starts with an empty
    window, and the QoS 0 messages of the old one stay queued in the service (no one would deliver
    them again). So while the database is blocked, each lost connection lets one more window of a
    QoS 0 flood in: the pipeline's own limit (twice receive_maximum, Pipeline.submit) must then stop
    reading, hold it stopped over further connections, and start it again once the inbox is below
    half. The connection to the broker is cut through a proxy until the inbox is full, then once more.

    At QoS 0 the broker drops what the service does not take, so this asserts the bound and the
    recovery, not that nothing published is lost: what is published once the service is back is
    stored, and no stored reading was never published."""
    proxy = make_proxy(broker.port)
    ingest = _service(ingests, tmp_path, prefix=topic_prefix, database_url=database_url,
                      mqtt_url=f"mqtt://127.0.0.1:{proxy.port}", mqtt_extra="qos = 0",
                      ingest_extra="batch_max_messages = 10")  # the write path holds 4 batches: 40 messages
    ingest.start()
    pub = Publisher(broker.port)
    flood = _Flood(pub, topic_prefix)
    try:
        with HealthSampler(ingest, interval=0.2) as health:
            def inbox_full() -> bool:
                return any(s.metrics.get(INBOX, 0.0) >= INBOX_LIMIT for s in list(health.samples))

            with psycopg.connect(database_url) as locker:
                locker.execute("LOCK TABLE readings IN ACCESS EXCLUSIVE MODE")  # until the block ends
                flood.start()
                wait_until(lambda: waiting_on_a_lock(database_url), BOUND, "a write to wait on the lock")
                cuts = 0
                connected_at = time.monotonic()
                while not inbox_full() and cuts < 6:
                    # A full window on this connection: seen in a sample of a gauge updated (every
                    # second) after the connection was made, not in the last one of the previous.
                    wait_until(lambda t=connected_at: inbox_full() or any(  # type: ignore[misc]
                        s.at > t + GAUGE_LAG and s.metrics.get(UNACKED) == RECEIVE_MAXIMUM
                        for s in list(health.samples)), BOUND, "a full receive window on this connection")
                    reconnects = ingest.metric(RECONNECTS)
                    proxy.cut()
                    cuts += 1
                    wait_until(lambda r=reconnects: inbox_full() or ingest.metric(RECONNECTS) > r,  # type: ignore[misc]
                               BOUND, "the service to connect again")
                    connected_at = time.monotonic()
                assert inbox_full(), (f"{INBOX} never reached {INBOX_LIMIT} after {cuts} lost connections: "
                                      f"max {health.max_of(INBOX)}")
                # Held over further connections: each is made, and reads nothing (not even its CONNACK).
                accepted = proxy.accepted
                proxy.cut()
                wait_until(lambda: proxy.accepted >= accepted + 2 or (health.max_of(INBOX) or 0) > INBOX_LIMIT,
                           BOUND, "two more connections while the inbox is full")
            wait_until(ingest.ready, BOUND, "the service to read and connect again once the inbox drained")
            flood.stop()
            _assert_inbox_bounded(health)
            # Published once the service is back (ready, after the flood): all of it is stored.
            tail = [_message(topic_prefix, i, T0 + timedelta(days=1)) for i in range(1000)]
            pub.publish_all([(topic, payload) for topic, payload, _ in tail], qos=0)
            tail_readings = set().union(*(r for _, _, r in tail))
            wait_until(lambda: tail_readings <= stored_readings(database_url), BOUND,
                       "every reading published after the release")
        _assert_inbox_bounded(health)
        stored = stored_readings(database_url)
        invented = stored - tail_readings - flood.published
        assert not invented, f"{len(invented)} stored reading(s) were never published, e.g. {sorted(invented)[:3]}"
        assert count(database_url, "rejected_messages") == 0
        log = ingest.log_path.read_text()
        assert not re.findall(r"task \w+ (?:failed|ended unexpectedly).*", log), log[-3000:]
    finally:
        flood.stop()
        pub.close()
    assert ingest.terminate() == 0


def test_messages_of_a_lost_connection_are_released_to_redelivery_not_written_twice(
    tmp_path: Path, ingests: list[IngestProcess], database_url: str, own_broker: Mosquitto, topic_prefix: str,
) -> None:
    """While a write waits on a lock, a full window of QoS 1 messages waits behind it in the write
    queue, the batcher and the inbox. The broker is restarted (SIGTERM: it keeps the session and the
    unacknowledged messages); the service connects again and resumes the session, so the broker will
    redeliver every one of them. Those still unwritten must be released (Pipeline.release_before,
    ``stale_messages_released_total``) instead of being written on behalf of a connection that can no
    longer acknowledge them; the batch already being written commits, goes unacknowledged and comes
    back, absorbed by the unique key. Once the lock is released, every reading is stored exactly once."""
    ingest = _service(ingests, tmp_path, prefix=topic_prefix, database_url=database_url, mqtt_url=own_broker.url,
                      database_extra="command_timeout = 60",  # the lock must outlast no statement timeout
                      ingest_extra="batch_max_messages = 20")  # a window spreads over 5 batches
    ingest.start()
    messages, expected = fleet(topic_prefix, 1000, T0)
    with HealthSampler(ingest, interval=0.2) as health:
        with psycopg.connect(database_url) as locker:
            locker.execute("LOCK TABLE readings IN ACCESS EXCLUSIVE MODE")  # until the block ends
            pub = Publisher(own_broker.port)
            try:
                pub.publish_all(messages)  # acknowledged by the broker: all of it is in the session
            finally:
                pub.close()
            wait_until(lambda: waiting_on_a_lock(database_url) and _last(health, UNACKED) == RECEIVE_MAXIMUM,
                       BOUND, "a write waiting on the lock and a full window behind it")
            reconnects = ingest.metric(RECONNECTS)
            assert ingest.metric(RELEASED) == 0
            own_broker.stop(signal.SIGTERM)
            own_broker.start()
            wait_until(lambda: ingest.metric(RECONNECTS) > reconnects, BOUND, "the service to resume its session")
        wait_until(lambda: count(database_url, "readings") >= len(expected), BOUND, "every reading")
        wait_until(lambda: ingest.metric("sensor_ingest_messages_acked_total") >= len(messages), BOUND,
                   "every message acknowledged")
    released = ingest.metric(RELEASED)
    assert 0 < released <= RECEIVE_MAXIMUM, (
        f"{RELEASED} is {released}: the unwritten messages of the lost connection were not released")
    assert stored_readings(database_url) == expected
    assert count(database_url, "readings") == len(expected)
    assert count(database_url, "rejected_messages") == 0
    assert "released" in ingest.log_path.read_text()
    assert ingest.terminate() == 0


def test_a_stop_while_the_database_does_not_answer_exits_within_the_grace_and_loses_nothing(
    tmp_path: Path, ingests: list[IngestProcess], database_url: str, broker: Mosquitto, topic_prefix: str,
    make_proxy: Callable[[int], FaultProxy],
) -> None:
    """SIGTERM while the database is blackholed: the service must not wait for it forever. It keeps
    trying to commit what it holds for SHUTDOWN_GRACE (ingest/service.py), then says it leaves the
    rest to the broker's redelivery, and exits; run_service returns 0 (no task crashed). The broker
    keeps the session: once the database is back, a new process with the same client id stores every
    reading exactly once."""
    proxy = make_proxy(urlsplit(database_url).port or 5432)
    via_proxy = urlsplit(database_url)._replace(netloc=f"postgres@127.0.0.1:{proxy.port}").geturl()
    ingest = _service(ingests, tmp_path, prefix=topic_prefix, database_url=via_proxy, mqtt_url=broker.url,
                      database_extra="connect_timeout = 3\ncommand_timeout = 5")
    ingest.start()
    messages, expected = fleet(topic_prefix, 2000, T0)
    proxy.mode = "blackhole"
    pub = Publisher(broker.port)
    try:
        pub.publish_all(messages)
    finally:
        pub.close()
    wait_until(lambda: ingest.metric(SUSPENDED) == 1, BOUND, "the service to find the database away")
    assert ingest.metric(UNACKED) > 0, "the service holds nothing: the stop would have nothing to leave"
    assert ingest.proc is not None
    ingest.proc.send_signal(signal.SIGTERM)
    try:
        # A bound on a hang: the grace, then at most ~7 s of the service's own clean-up, then a margin.
        rc = ingest.proc.wait(2 * SHUTDOWN_GRACE + 20)
    except subprocess.TimeoutExpired:
        pytest.fail(f"the service did not exit within {2 * SHUTDOWN_GRACE + 20:.0f} s of SIGTERM with the "
                    f"database away\n{ingest.log_path.read_text()[-3000:]}")
    ingest.proc = None
    log = ingest.log_path.read_text()
    assert rc == 0, log[-3000:]
    left = f"database did not take the last batches within {SHUTDOWN_GRACE:.0f}s; the broker will redeliver them"
    assert left in log, log[-3000:]
    assert count(database_url, "readings") < len(expected)

    proxy.mode = "pass"
    ingest.start()
    wait_until(lambda: count(database_url, "readings") >= len(expected), BOUND, "every reading after the restart")
    wait_until(lambda: ingest.metric(UNACKED) == 0, BOUND, "nothing unacknowledged")
    assert stored_readings(database_url) == expected
    assert count(database_url, "readings") == len(expected)
    assert count(database_url, "rejected_messages") == 0
    assert ingest.terminate() == 0


def test_a_full_window_behind_a_slow_write_keeps_the_broker_connection(
    tmp_path: Path, ingests: list[IngestProcess], database_url: str, broker: Mosquitto, topic_prefix: str,
) -> None:
    """tests/integration/test_slow_database.py with a full receive window behind the slow write: a
    write held up by a lock for three keepalives on a database that keeps answering is not an outage,
    and the broker connection must stay up. paho pings one keepalive after the last byte it read and
    closes the connection when no PINGRESP is read one keepalive later. Before the fix the bridge read
    nothing while the window was full, so the connection was lost ("MQTT connection lost") and the
    window redelivered; now it reads on behind the window (ingest.mqttwire) and hands the PINGRESPs
    to paho. Three keepalives: at least two PINGREQs must have been answered."""
    ingest = _service(ingests, tmp_path, prefix=topic_prefix, database_url=database_url, mqtt_url=broker.url,
                      database_extra="command_timeout = 60")  # the lock must outlast no statement timeout
    ingest.start()
    messages, expected = fleet(topic_prefix, 2 * RECEIVE_MAXIMUM, T0)
    with HealthSampler(ingest, interval=0.2) as health:
        with psycopg.connect(database_url) as locker:
            locker.execute("LOCK TABLE readings IN ACCESS EXCLUSIVE MODE")  # until the block ends
            pub = Publisher(broker.port)
            try:
                pub.publish_all(messages)
            finally:
                pub.close()
            wait_until(lambda: waiting_on_a_lock(database_url) and _last(health, UNACKED) == RECEIVE_MAXIMUM,
                       BOUND, "a write waiting on the lock and a full window behind it")
            held_from = time.monotonic()
            while time.monotonic() - held_from < 3 * KEEPALIVE and not ingest.metric(RECONNECTS):
                time.sleep(0.2)  # the length of the slow write is the scenario; a reconnect ends it early
        wait_until(lambda: count(database_url, "readings") >= len(expected), BOUND, "every reading")
    assert stored_readings(database_url) == expected
    log = ingest.log_path.read_text()
    assert ingest.metric(RECONNECTS) == 0, log[-3000:]
    assert "MQTT connection lost" not in log, log[-3000:]
    assert ingest.terminate() == 0




def _session_states(url: str) -> list[str]:
    """The states (pg_stat_activity.state) of the service's sessions."""
    with psycopg.connect(url, autocommit=True) as c:
        rows = c.execute("SELECT state FROM pg_stat_activity WHERE application_name = 'sensor-ingest'").fetchall()
    return [str(r[0]) for r in rows]


def test_a_write_that_waits_on_a_row_lock_past_the_statement_timeout_is_retried_not_rejected(
    tmp_path: Path, ingests: list[IngestProcess], database_url: str, broker: Mosquitto, topic_prefix: str,
) -> None:
    """Another session holds an uncommitted row with the key of a reading the service is writing, so
    the service's write waits on that row lock, past database.command_timeout. Whichever timeout
    fires, the client's (TimeoutError) or the server's statement_timeout (SQLSTATE 57014), the write
    is retried with backoff: the database is busy, the message is not at fault. Before issue #10 a
    57014 counted as an unexpected failure: the batch was narrowed and the good message stored as a
    write_error rejection and acknowledged, its reading never stored."""
    ingest = _service(ingests, tmp_path, prefix=topic_prefix, database_url=database_url, mqtt_url=broker.url,
                      database_extra="command_timeout = 2")
    ingest.start()
    t1 = T0 + timedelta(minutes=1)
    pub = Publisher(broker.port)
    try:
        pub.publish_all([(f"{topic_prefix}/hn-aq-1/up", native("hn-aq-1", T0.isoformat(), {"pm25": 1.0}))])
        wait_until(lambda: count(database_url, "readings") == 1, BOUND, "the first reading (its ids)")
        with psycopg.connect(database_url) as other:
            other.execute("INSERT INTO readings (time, device_id, metric_id, value, flags)"
                          " SELECT %s, device_id, metric_id, 99, 0 FROM readings", (t1,))
            errors = ingest.metric("sensor_ingest_db_errors_total")
            pub.publish_all([(f"{topic_prefix}/hn-aq-1/up", native("hn-aq-1", t1.isoformat(), {"pm25": 2.0}))])
            # Two writes timed out on the lock (each after command_timeout): past the first timeout.
            wait_until(lambda: ingest.metric("sensor_ingest_db_errors_total") >= errors + 2
                       or count(database_url, "rejected_messages") > 0, BOUND,
                       "two writes to time out on the row lock")
            other.rollback()
        wait_until(lambda: count(database_url, "readings") == 2 or count(database_url, "rejected_messages") > 0,
                   BOUND, "the second reading once the lock is gone")
    finally:
        pub.close()
    assert count(database_url, "rejected_messages") == 0, ingest.log_path.read_text()[-3000:]
    assert stored_readings(database_url) == {("hn-aq-1", "pm25", T0.isoformat(), 1.0),
                                             ("hn-aq-1", "pm25", t1.isoformat(), 2.0)}
    assert ingest.metric('sensor_ingest_db_errors_total{kind="fatal"}') == 0
    assert ingest.terminate() == 0


def test_a_transaction_cut_off_behind_a_proxy_does_not_hold_the_retry(
    tmp_path: Path, ingests: list[IngestProcess], database_url: str, broker: Mosquitto, topic_prefix: str,
    make_proxy: Callable[[int], FaultProxy],
) -> None:
    """The network between the service and a proxy in front of PostgreSQL goes silent just as the
    server finishes a statement inside the service's write transaction: the answer never arrives, the
    client gives the connection up, but the proxy keeps the server's side of it open (it answers TCP
    keepalives, as a load balancer or pooler would), so the server holds the transaction, idle, and
    with it the locks on the rows it inserted. The retry writes the same rows on a new connection and
    would wait on those locks for as long as the proxy lives. The service's sessions set
    idle_in_transaction_session_timeout (database.command_timeout): the server ends the abandoned
    transaction and the retry stores every reading once. The statement is made to finish at the right
    moment by holding a lock on ``states`` (the write's second statement) until the network is cut."""
    proxy = make_proxy(urlsplit(database_url).port or 5432)
    via_proxy = urlsplit(database_url)._replace(netloc=f"postgres@127.0.0.1:{proxy.port}").geturl()
    ingest = _service(ingests, tmp_path, prefix=topic_prefix, database_url=via_proxy, mqtt_url=broker.url,
                      database_extra="connect_timeout = 3\ncommand_timeout = 5")
    ingest.start()
    topic = f"{topic_prefix}/hn-aq-1/up"
    t1 = T0 + timedelta(minutes=1)
    pub = Publisher(broker.port)
    try:
        pub.publish_all([(topic, native("hn-aq-1", T0.isoformat(), {"pm25": 1.0, "door": {"text": "open"}}))])
        wait_until(lambda: count(database_url, "states") == 1, BOUND, "the first message (its ids)")
        with psycopg.connect(database_url) as locker:
            locker.execute("LOCK TABLE states IN ACCESS EXCLUSIVE MODE")
            pub.publish_all([(topic, native("hn-aq-1", t1.isoformat(), {"pm25": 2.0, "door": {"text": "shut"}}))])
            wait_until(lambda: waiting_on_a_lock(database_url), BOUND, "the write to wait on the states lock")
            proxy.mode = "blackhole"
        # The lock is released: the server ends the statement into the blackhole, and waits.
        wait_until(lambda: "idle in transaction" in _session_states(database_url), BOUND,
                   "the service's transaction to be left idle on the server")
        proxy.mode = "pass"
        wait_until(lambda: count(database_url, "states") == 2 or count(database_url, "rejected_messages") > 0,
                   BOUND, "the second message once the network is back")
    finally:
        pub.close()
    assert count(database_url, "rejected_messages") == 0, ingest.log_path.read_text()[-3000:]
    assert stored_readings(database_url) == {("hn-aq-1", "pm25", T0.isoformat(), 1.0),
                                             ("hn-aq-1", "pm25", t1.isoformat(), 2.0)}
    assert ingest.terminate() == 0
