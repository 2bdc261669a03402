"""Faults mid-stream (issue #5): broker and database outages, blackholes and refusals.

Each test publishes 20,000 QoS 1 native messages (40,000 readings) while the ingest service runs
as a real process, injects one fault once a share of them is stored, holds it for an outage, lifts
it, and then requires, with no restart by hand:

- the stored set of (device, metric, time, value) equals the published set, with no extra row and
  no rejection;
- the process never exited, and still stops gracefully (exit 0) at the end;
- /readyz answered 503 at some point while the fault was on, and 200 after recovery;
- ``sensor_ingest_messages_unacked`` never went above ``mqtt.receive_maximum``;
- after a database outage: ``sensor_ingest_oldest_unacked_age_seconds`` was above 0 during it,
  and ``sensor_ingest_backpressure_seconds_total`` is above 0.

Outage lengths are parameters: SENSOR_INGEST_TEST_OUTAGE seconds (default 3) for stops, restarts
and refusals; a database blackhole lasts at least 2 x database.command_timeout + 2 s (12 s here),
a broker blackhole 3 x keepalive + 2 s (17 s), so that the service's own dead-connection detection
must fire during them. A bench fault run sets a long outage, e.g.
SENSOR_INGEST_TEST_OUTAGE=120 pytest tests/integration/test_faults.py.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from ingest.store.migrate import migrate
from tests.integration.harness import (
    HealthSampler,
    IngestProcess,
    Publisher,
    count,
    fleet,
    stored_readings,
    write_config,
)
from tests.proxy import FaultProxy, Mode
from tests.services import Mosquitto, Postgres, wait_until

T0 = datetime(2025, 11, 26, 0, 0, tzinfo=UTC)  # in the past: ingest.max_future rejects the future
N = 20_000
RECEIVE_MAXIMUM = 500
KEEPALIVE = 5  # seconds: the smallest mqtt.keepalive the settings accept
# The service's own bounds on a silent database (database.command_timeout / connect_timeout).
DB_COMMAND_TIMEOUT, DB_CONNECT_TIMEOUT = 5, 3
OUTAGE = float(os.environ.get("SENSOR_INGEST_TEST_OUTAGE", "3"))
DB_BLACKHOLE = max(OUTAGE, 2 * KEEPALIVE + 2, 2 * DB_COMMAND_TIMEOUT + 2)
# paho sends PINGREQ one keepalive after the last byte it read and gives up one keepalive later, both
# checked on the bridge's 1 s tick: a dead broker connection is noticed 2 x keepalive (+2 s) after
# the blackhole begins at worst, and /readyz must be seen at 503 after that, before it ends.
BROKER_BLACKHOLE = max(OUTAGE, 3 * KEEPALIVE + 2)
FAULT_AT = 0.25  # share of the readings stored before the fault
RECOVERY = 120  # seconds allowed for each wait after the fault is lifted (a bound on a hang only)

UNACKED = "sensor_ingest_messages_unacked"
OLDEST_AGE = "sensor_ingest_oldest_unacked_age_seconds"
BACKPRESSURE = "sensor_ingest_backpressure_seconds_total"


def _with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    userinfo = f"{parts.username}@" if parts.username else ""
    return parts._replace(netloc=f"{userinfo}127.0.0.1:{port}").geturl()


@dataclass
class Fault:
    name: str
    inject: Callable[[], None]
    lift: Callable[[], None]
    outage: float
    database: bool  # a database fault: backpressure and the oldest unacked age must show it


def _proxy_fault(name: str, proxy: FaultProxy, mode: Mode, outage: float, *, database: bool) -> Fault:
    def inject() -> None:
        proxy.mode = mode

    def lift() -> None:
        proxy.mode = "pass"

    return Fault(name, inject, lift, outage, database)


@dataclass
class Run:
    ingest: IngestProcess
    sampler: HealthSampler
    fault_on: float
    fault_off: float
    expected: set[tuple[str, str, str, float]]
    published: int
    problems: list[str]

    def expect(self, ok: bool, what: str) -> None:
        if not ok:
            self.problems.append(what)


def _log_tail(ingest: IngestProcess) -> str:
    text = ingest.log_path.read_text() if ingest.log_path.exists() else ""
    return f"--- {ingest.log_path} (last 4000 chars) ---\n{text[-4000:]}"


def _run_through(
    tmp_path: Path, ingests: list[IngestProcess], *, prefix: str, fault: Fault, ingest_db: str, counting_db: str,
    ingest_mqtt: str, broker_port: int,
) -> Run:
    """Start the service, stream N messages, inject the fault mid-stream, lift it, wait for all of it."""
    messages, expected = fleet(prefix, N, T0)
    cfg = write_config(
        tmp_path / "ingest.toml", prefix=prefix, database_url=ingest_db, mqtt_url=ingest_mqtt,
        keepalive=KEEPALIVE,
        mqtt_extra=f"receive_maximum = {RECEIVE_MAXIMUM}\nconnect_timeout = 3",
        database_extra=f"connect_timeout = {DB_CONNECT_TIMEOUT}\ncommand_timeout = {DB_COMMAND_TIMEOUT}",
    )
    ingest = IngestProcess(cfg, tmp_path / "ingest.log")
    ingests.append(ingest)
    ingest.start()
    pub = Publisher(broker_port)
    publisher = threading.Thread(target=pub.publish_all, args=(messages,), daemon=True)
    sampler = HealthSampler(ingest)

    def wait(predicate: Callable[[], bool], what: str, **kw: float) -> None:
        try:
            wait_until(predicate, RECOVERY, what, **kw)
        except TimeoutError as exc:
            last = sampler.samples[-1] if sampler.samples else None
            metrics = {k: v for k, v in (last.metrics if last else {}).items()
                       if k.startswith("sensor_ingest_") and not k.endswith(("_bucket", "_created"))}
            raise AssertionError(
                f"{fault.name}: {exc}; {count(counting_db, 'readings')}/{len(expected)} readings stored, "
                f"{pub.acked}/{N} publishes acknowledged, service running: {ingest.running}, "
                f"last /readyz {last.readyz if last else None}, metrics {metrics}\n" + _log_tail(ingest)
            ) from exc

    try:
        with sampler:
            publisher.start()
            wait(lambda: count(counting_db, "readings") >= FAULT_AT * len(expected),
                 f"{FAULT_AT:.0%} of the readings before the fault")
            fault_on = time.monotonic()
            fault.inject()
            time.sleep(fault.outage)
            fault_off = time.monotonic()
            fault.lift()
            wait(lambda: pub.acked >= N, "the broker to acknowledge every publish")
            wait(lambda: count(counting_db, "readings") >= len(expected), "every reading after the fault")
            wait(ingest.ready, "/readyz 200 after recovery", interval=0.2)
            time.sleep(1.5)  # one more turn of the service's 1 s gauge task into the samples
        publisher.join(10)
    finally:
        pub.close()
    return Run(ingest, sampler, fault_on, fault_off, expected, pub.acked, [])


def _verify(run: Run, fault: Fault, counting_db: str) -> None:
    """Every property of the module docstring; all violations are reported together."""
    ingest, sampler = run.ingest, run.sampler
    stored = stored_readings(counting_db)
    missing, extra = run.expected - stored, stored - run.expected
    run.expect(not missing and not extra,
               f"stored set != published set: {len(missing)} missing (e.g. {sorted(missing)[:3]}), "
               f"{len(extra)} extra (e.g. {sorted(extra)[:3]})")
    rows = count(counting_db, "readings")
    run.expect(rows == len(run.expected), f"{rows} reading rows for {len(run.expected)} published readings")
    rejected = count(counting_db, "rejected_messages")
    run.expect(rejected == 0, f"{rejected} rejection row(s); a fault must never turn a message into a rejection")

    run.expect(ingest.running, "the service exited during the fault")
    log = ingest.log_path.read_text()
    crashed = re.findall(r"task \w+ (?:failed|ended unexpectedly).*", log)
    run.expect(not crashed, f"a service task ended: {crashed}")
    internal = re.findall(r".*(?:pool is closed|released back to the pool).*", log)
    run.expect(not internal, f"the log reports the driver's internals instead of the outage: {internal[:2]}")

    during = sampler.between(run.fault_on, run.fault_off)
    codes = sorted({s.readyz for s in during})
    run.expect(any(s.readyz == 503 for s in during),
               f"/readyz never answered 503 during the {fault.outage:.0f} s outage "
               f"({len(during)} samples, codes seen: {codes})")
    run.expect(ingest.readyz() == 200, "/readyz is not 200 after recovery")

    unacked = sampler.max_of(UNACKED)
    run.expect(unacked is not None, f"{UNACKED} was never sampled")
    run.expect(unacked is None or unacked <= RECEIVE_MAXIMUM,
               f"{UNACKED} reached {unacked}, above mqtt.receive_maximum = {RECEIVE_MAXIMUM}")

    if fault.database:
        ages = [s.metrics.get(OLDEST_AGE, 0.0) for s in during]
        run.expect(max(ages, default=0.0) > 0,
                   f"{OLDEST_AGE} stayed at 0 during the database outage ({len(ages)} samples)")
        metrics = ingest.metrics()
        run.expect(metrics.get(BACKPRESSURE, 0.0) > 0,
                   f"{BACKPRESSURE} is {metrics.get(BACKPRESSURE, 'absent from /metrics')} after a database "
                   "outage; it must count the seconds writes were held back")

    rc = ingest.terminate()
    run.expect(rc == 0, f"the graceful stop after recovery exited {rc}, not 0")
    assert not run.problems, f"{fault.name}:\n- " + "\n- ".join(run.problems) + "\n" + _log_tail(ingest)


@pytest.fixture
def ingests() -> Iterator[list[IngestProcess]]:
    """Kills a service that a failed test left running."""
    procs: list[IngestProcess] = []
    yield procs
    for p in procs:
        p.close()


def test_broker_sigterm_and_restart_mid_stream(
    tmp_path: Path, ingests: list[IngestProcess], database_url: str, own_broker: Mosquitto, topic_prefix: str,
) -> None:
    """The broker is stopped with SIGTERM (it saves its persistent state first), stays down for the
    outage and is started again on the same port and data directory. The service must notice the
    lost connection (/readyz 503), reconnect by itself with clean_start false, resume its session,
    receive what the broker kept (the queued messages and the unacknowledged in-flight ones), and
    store each reading exactly once. Messages committed but not acked on the lost connection are
    redelivered and absorbed by the unique key."""
    fault = Fault("broker SIGTERM + restart", lambda: own_broker.stop(signal.SIGTERM), own_broker.start,
                  OUTAGE, database=False)
    run = _run_through(tmp_path, ingests, prefix=topic_prefix, fault=fault, ingest_db=database_url,
                       counting_db=database_url, ingest_mqtt=own_broker.url, broker_port=own_broker.port)
    _verify(run, fault, database_url)


def test_postgres_restart_mid_stream(
    tmp_path: Path, ingests: list[IngestProcess], own_pg: Postgres, broker: Mosquitto, topic_prefix: str,
) -> None:
    """A private PostgreSQL is stopped in fast mode (sessions terminated, 57P01) and started again on
    the same port after the outage. Writes fail with connection-class errors and are retried with
    backoff on new connections; meanwhile nothing is acknowledged, so the broker holds the rest
    (backpressure, at most receive_maximum unacked) and /readyz answers 503. After the restart the
    pool reconnects by itself and every reading is stored exactly once."""
    db = own_pg.url(own_pg.create_database("template0"))
    migrate(db)
    fault = Fault("PostgreSQL fast restart", lambda: own_pg.stop(signal.SIGINT), own_pg.start, OUTAGE,
                  database=True)
    run = _run_through(tmp_path, ingests, prefix=topic_prefix, fault=fault, ingest_db=db, counting_db=db,
                       ingest_mqtt=broker.url, broker_port=broker.port)
    _verify(run, fault, db)


@pytest.mark.parametrize(
    ("mode", "outage"), [("blackhole", DB_BLACKHOLE), ("refuse", OUTAGE)], ids=["blackholed", "refusing"]
)
def test_database_unreachable_mid_stream(
    tmp_path: Path, ingests: list[IngestProcess], database_url: str, broker: Mosquitto, topic_prefix: str,
    make_proxy: Callable[[int], FaultProxy], mode: Mode, outage: float,
) -> None:
    """The service reaches PostgreSQL through a proxy.

    blackholed: the proxy goes silent (packets dropped, nothing closed) for longer than the keepalive
    and than twice database.command_timeout. The write in flight must not hang: it times out, the
    connection is given up, new connections time out until the network is back. Connections frozen
    by the blackhole stay dead afterwards (lost NAT/firewall state): the service must not wait on
    them. A COMMIT whose answer was lost is absorbed by the unique key on retry.

    refusing: the proxy resets every current connection and every new one (a database that is down):
    each write and each reconnect fails fast with a connection-class error.

    Either way the failures are retried with backoff, nothing is acked meanwhile, /readyz answers
    503, and when the network is back the service resumes by itself and every reading is stored
    exactly once."""
    proxy = make_proxy(urlsplit(database_url).port or 5432)
    fault = _proxy_fault(f"database {mode}", proxy, mode, outage, database=True)
    run = _run_through(tmp_path, ingests, prefix=topic_prefix, fault=fault,
                       ingest_db=_with_port(database_url, proxy.port), counting_db=database_url,
                       ingest_mqtt=broker.url, broker_port=broker.port)
    _verify(run, fault, database_url)


def test_broker_blackholed_longer_than_the_keepalive(
    tmp_path: Path, ingests: list[IngestProcess], database_url: str, own_broker: Mosquitto, topic_prefix: str,
    make_proxy: Callable[[int], FaultProxy],
) -> None:
    """The service reaches the broker through a proxy that goes silent for longer than twice the
    MQTT keepalive (the publishers still reach the broker directly). The service's keepalive must
    detect the dead connection (no PINGRESP) and /readyz must answer 503; its reconnects time out
    on CONNACK until the network is back, then the session is resumed and what was unacknowledged
    is redelivered. Acks sent into the blackhole are lost, so committed messages come back and are
    absorbed by the unique key: every reading is stored exactly once."""
    proxy = make_proxy(own_broker.port)
    fault = _proxy_fault("broker blackhole", proxy, "blackhole", BROKER_BLACKHOLE, database=False)
    run = _run_through(tmp_path, ingests, prefix=topic_prefix, fault=fault, ingest_db=database_url,
                       counting_db=database_url, ingest_mqtt=f"mqtt://127.0.0.1:{proxy.port}",
                       broker_port=own_broker.port)
    _verify(run, fault, database_url)
