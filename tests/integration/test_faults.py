"""Faults mid-stream (issue #5; issue #10 made each check compare with normal streaming).

Each test publishes 20,000 QoS 1 native messages (40,000 readings) while the ingest service runs
as a real process, injects one fault once a share of them is stored, holds it until the service has
shown it (below), lifts it, and then requires, with no restart by hand:

- the stored set of (device, metric, time, value) equals the published set, with no extra row and
  no rejection;
- the process never exited, and still stops gracefully (exit 0) at the end;
- /readyz answered 503 while the fault was on, and 200 after recovery;
- ``sensor_ingest_messages_unacked`` never went above ``mqtt.receive_maximum``;
- each state change was logged once, however many writes or reconnects failed in between: a
  database fault logs "database write failed" and "database writes succeed again" once each, a
  broker fault "MQTT connection lost" and "MQTT broker back" once each (and no line per failed
  reconnect);
- after a database fault: the service disconnected from the broker on purpose (``mqtt_suspended``
  sampled at 1, "MQTT disconnected on purpose" logged once) and connected again by itself ("MQTT
  reconnecting" once, ``mqtt_suspended`` back to 0); ``oldest_unacked_age_seconds`` went above the
  highest value it had while streaming before the fault, and ``backpressure_seconds_total`` grew
  more during the fault than in an equal span before it; both counted the whole outage (less the
  lag of a gauge updated every second). Both also move in normal streaming, so being above 0 would
  prove nothing.

A fault lasts at least SENSOR_INGEST_TEST_OUTAGE seconds (default 3; with reconnect_max = 1 s
that is several failed reconnects), and then until the service has shown it, waited for as a
condition, never as a fixed sleep: /readyz sampled at 503; for a database fault, ``mqtt_suspended``
sampled at 1 for 3 s and two failed writes (under a blackhole these are the service's own
statement and connect timeouts firing); for a broker fault, the lost connection in the log
(through a blackhole the keepalive must detect it first, and the fault is held until two reconnects
have timed out on CONNACK). A bench fault run sets a long outage, e.g.
SENSOR_INGEST_TEST_OUTAGE=120 pytest tests/integration/test_faults.py.
"""

from __future__ import annotations

import os
import re
import signal
import threading
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from datetime import UTC, datetime
from pathlib import Path
from urllib.parse import urlsplit

import pytest

from ingest.store.migrate import migrate
from tests.integration.harness import (
    HealthSampler,
    IngestProcess,
    Publisher,
    Sample,
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
FAULT_AT = 0.25  # share of the readings stored before the fault
RECOVERY = 120  # seconds allowed for each wait (a bound on a hang only)
SHOW_BOUND = 60  # seconds allowed for the service to show a fault (a bound on a hang only)
# A database fault is held until the broker connection has been suspended this long, so that a
# metric that stopped counting at the suspension cannot pass for one that counted the whole outage.
SUSPENDED_FOR = 3.0
# The gauges are updated every second and sampled every 0.25 s: a sampled value may lag this much.
GAUGE_LAG = 2.0

UNACKED = "sensor_ingest_messages_unacked"
OLDEST_AGE = "sensor_ingest_oldest_unacked_age_seconds"
BACKPRESSURE = "sensor_ingest_backpressure_seconds_total"
SUSPENDED = "sensor_ingest_mqtt_suspended"
DB_ERRORS = "sensor_ingest_db_errors_total"

# The state-change lines of ingest/pipeline.py, service.py and mqtt.py, and how often one fault of
# each kind logs them.
STATE_LINES: dict[str, tuple[int, int]] = {  # pattern: (database fault, broker fault)
    r"database write failed": (1, 0),
    r"database writes succeed again": (1, 0),
    r"MQTT disconnected on purpose": (1, 0),
    r"MQTT reconnecting: ": (1, 0),
    r"MQTT connection lost": (0, 1),
    # Failed reconnects after a lost connection are part of the "lost" state: never a line each.
    r"MQTT broker \S+ unavailable": (0, 0),
    r"MQTT broker back after": (0, 1),
}
# The probe's own pair: at most once each (a commit may clear a failed probe without a line), and
# never "answers again" without "does not answer".
PROBE_DOWN, PROBE_BACK = r"database does not answer", r"database answers again"


def _with_port(url: str, port: int) -> str:
    parts = urlsplit(url)
    userinfo = f"{parts.username}@" if parts.username else ""
    return parts._replace(netloc=f"{userinfo}127.0.0.1:{port}").geturl()


def _lines(log: str, pattern: str) -> list[str]:
    return re.findall(f".*{pattern}.*", log)


@dataclass
class Fault:
    name: str
    inject: Callable[[], None]
    lift: Callable[[], None]
    outage: float  # the shortest outage; it is then held until the service has shown the fault
    database: bool  # a database fault: suspension, backpressure and the oldest unacked age must show it
    # What the service must also have shown before the fault is lifted (empty: nothing more).
    shown: Callable[[], str] = field(default=lambda: "")


def _proxy_fault(name: str, proxy: FaultProxy, mode: Mode, *, database: bool) -> Fault:
    def inject() -> None:
        proxy.mode = mode

    def lift() -> None:
        proxy.mode = "pass"

    return Fault(name, inject, lift, OUTAGE, database)


@dataclass
class Run:
    ingest: IngestProcess
    sampler: HealthSampler
    streaming_from: float  # when the publisher started
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


def _samples(sampler: HealthSampler, start: float, end: float = float("inf")) -> list[Sample]:
    return [s for s in list(sampler.samples) if start <= s.at <= end and s.metrics]


def _not_shown_yet(fault: Fault, sampler: HealthSampler, ingest: IngestProcess, since: float,
                   errors_before: float) -> str:
    """What the service has not shown of the fault yet (empty when it has shown all of it)."""
    during = [s for s in list(sampler.samples) if s.at >= since]
    missing = []
    if time.monotonic() - since < fault.outage:
        missing.append(f"{fault.outage:.0f} s of outage")
    if not any(s.readyz == 503 for s in during):
        missing.append("/readyz 503")
    if fault.database:
        suspended = [s.at for s in during if s.metrics.get(SUSPENDED) == 1]
        if not suspended or time.monotonic() - suspended[0] < SUSPENDED_FOR:
            missing.append(f"{SUSPENDED} 1 for {SUSPENDED_FOR:.0f} s")
        if max((s.metrics.get(DB_ERRORS, 0.0) for s in during), default=0.0) < errors_before + 2:
            missing.append("two failed writes")
    else:
        log = ingest.log_path.read_text()
        if not _lines(log, "MQTT connection lost"):
            missing.append("the lost broker connection in the log")
    extra = fault.shown()
    if extra:
        missing.append(extra)
    return ", ".join(missing)


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
    # Sampled often enough that normal streaming before the fault is seen at least twice, on a
    # machine that stores the first quarter of the stream within half a second.
    sampler = HealthSampler(ingest, interval=0.1)

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
            streaming_from = time.monotonic()
            publisher.start()
            wait(lambda: count(counting_db, "readings") >= FAULT_AT * len(expected)
                 and len(_samples(sampler, streaming_from, time.monotonic())) >= 2,
                 f"{FAULT_AT:.0%} of the readings, and two samples of normal streaming, before the fault")
            errors_before = ingest.metrics().get(DB_ERRORS, 0.0)
            fault_on = time.monotonic()
            fault.inject()
            missing: list[str] = []

            def shown() -> bool:
                if not ingest.running:
                    raise AssertionError(f"{fault.name}: the service exited during the fault\n" + _log_tail(ingest))
                missing[:] = [_not_shown_yet(fault, sampler, ingest, fault_on, errors_before)]
                return not missing[0]

            try:
                wait_until(shown, SHOW_BOUND, "the service to show the fault", interval=0.1)
            except TimeoutError:
                fault.lift()
                raise AssertionError(f"{fault.name}: the service never showed {missing[0]}\n"
                                     + _log_tail(ingest)) from None
            except AssertionError:
                fault.lift()
                raise
            fault_off = time.monotonic()
            fault.lift()
            wait(lambda: pub.acked >= N, "the broker to acknowledge every publish")
            wait(lambda: count(counting_db, "readings") >= len(expected), "every reading after the fault")
            settled_from = time.monotonic()
            # Settled: a sample taken after the last reading was stored, once the service's 1 s gauge
            # task has caught up: ready, nothing unacknowledged, not suspended.
            wait(lambda: any(s.readyz == 200 and s.metrics.get(UNACKED) == 0 and s.metrics.get(SUSPENDED) == 0
                             for s in _samples(sampler, settled_from)),
                 "/readyz 200, nothing unacknowledged and not suspended after recovery", interval=0.2)
        publisher.join(10)
    finally:
        pub.close()
    return Run(ingest, sampler, streaming_from, fault_on, fault_off, expected, pub.acked, [])


def _at(samples: list[Sample], name: str, t: float) -> float:
    """The last sampled value of a counter at or before t (the first sample if none is before)."""
    before = [s for s in samples if s.at <= t and name in s.metrics]
    chosen = before[-1] if before else next(s for s in samples if name in s.metrics)
    return chosen.metrics[name]


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

    for pattern, (if_database, if_broker) in STATE_LINES.items():
        want, got = (if_database if fault.database else if_broker), _lines(log, pattern)
        run.expect(len(got) == want, f"{want} line(s) like {pattern!r} expected, {len(got)} logged: {got[:4]}")
    down, back = _lines(log, PROBE_DOWN), _lines(log, PROBE_BACK)
    run.expect(len(down) <= (1 if fault.database else 0) and len(back) <= len(down),
               f"the probe's state changes are logged more than once: {down[:3]} / {back[:3]}")

    during = [s for s in sampler.samples if run.fault_on <= s.at <= run.fault_off]
    codes = sorted({s.readyz for s in during})
    run.expect(any(s.readyz == 503 for s in during),
               f"/readyz never answered 503 during the {run.fault_off - run.fault_on:.0f} s outage "
               f"({len(during)} samples, codes seen: {codes})")
    run.expect(ingest.readyz() == 200, "/readyz is not 200 after recovery")

    unacked = sampler.max_of(UNACKED)
    run.expect(unacked is not None, f"{UNACKED} was never sampled")
    run.expect(unacked is None or unacked <= RECEIVE_MAXIMUM,
               f"{UNACKED} reached {unacked}, above mqtt.receive_maximum = {RECEIVE_MAXIMUM}")

    metrics = ingest.metrics()
    run.expect(metrics.get(SUSPENDED) == 0, f"{SUSPENDED} is {metrics.get(SUSPENDED)} after recovery, not 0")
    if fault.database:
        _verify_database_outage_shows(run)

    rc = ingest.terminate()
    run.expect(rc == 0, f"the graceful stop after recovery exited {rc}, not 0")
    assert not run.problems, f"{fault.name}:\n- " + "\n- ".join(run.problems) + "\n" + _log_tail(ingest)


def _verify_database_outage_shows(run: Run) -> None:
    """The metrics that show a database outage must show more than normal streaming does, and for
    the whole outage: both also move in normal streaming, and being above 0 proves nothing."""
    before = _samples(run.sampler, run.streaming_from, run.fault_on)
    during = _samples(run.sampler, run.fault_on, run.fault_off)
    outage = run.fault_off - run.fault_on
    run.expect(len(before) >= 2, f"only {len(before)} sample(s) of normal streaming before the fault")
    if len(before) < 2 or not during:
        return
    suspended = [s.metrics.get(SUSPENDED) for s in during]
    run.expect(1 in suspended, f"{SUSPENDED} never 1 during the database outage: {sorted(set(suspended))}")

    # Nothing is acknowledged during the outage: the oldest message held grows old with it.
    age_before = max(s.metrics.get(OLDEST_AGE, 0.0) for s in before)
    age_during = max(s.metrics.get(OLDEST_AGE, 0.0) for s in during)
    run.expect(age_during > age_before and age_during >= outage - GAUGE_LAG,
               f"{OLDEST_AGE} reached {age_during:.1f} s in the {outage:.1f} s outage; it must exceed the "
               f"{age_before:.1f} s it reached while streaming normally before it, and the outage less "
               f"{GAUGE_LAG:.0f} s")

    # Over the outage and an equal span just before it. When the outage is the longer, that span
    # reaches back before the stream began, where the idle service holds nothing back: the
    # comparison is then with all of the streaming before the fault.
    samples = _samples(run.sampler, run.streaming_from)
    held_before = _at(samples, BACKPRESSURE, run.fault_on) - _at(samples, BACKPRESSURE, run.fault_on - outage)
    held_during = _at(samples, BACKPRESSURE, run.fault_off) - _at(samples, BACKPRESSURE, run.fault_on)
    run.expect(held_during > held_before and held_during >= outage - GAUGE_LAG,
               f"{BACKPRESSURE} grew by {held_during:.1f} s in the {outage:.1f} s outage; it must grow by more "
               f"than the {held_before:.1f} s it grew in as long a span of normal streaming before it, and by "
               f"the outage less {GAUGE_LAG:.0f} s")




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


def _group_alive(pgid: int) -> list[int]:
    """Live (not zombie) processes of a process group."""
    alive = []
    for stat in Path("/proc").glob("[0-9]*/stat"):
        try:
            state, _ppid, group = stat.read_text().rsplit(")", 1)[1].split()[:3]
        except (OSError, IndexError, ValueError):
            continue
        if int(group) == pgid and state != "Z":
            alive.append(int(stat.parent.name))
    return alive


def test_postgres_crash_mid_stream(
    tmp_path: Path, ingests: list[IngestProcess], own_pg: Postgres, broker: Mosquitto, topic_prefix: str,
) -> None:
    """The postmaster is SIGKILLed mid-stream, as a crash would end it: no shutdown, no checkpoint,
    sessions cut without a word. Its backends notice and exit; PostgreSQL is started again on the same
    data directory and must run crash recovery (its log says so). Commits the service saw are in the
    WAL, so they survive; a commit whose answer was lost is retried and absorbed by the unique key.
    The service recovers by itself and every reading is stored exactly once."""
    db = own_pg.url(own_pg.create_database("template0"))
    migrate(db)
    server_log = own_pg.dir / "server.log"
    recoveries_before = server_log.read_text().count("automatic recovery in progress")

    def crash() -> None:
        pid = int((own_pg.data / "postmaster.pid").read_text().split()[0])
        os.kill(pid, signal.SIGKILL)
        own_pg.stop(signal.SIGKILL)  # reaps it
        # A new postmaster refuses to start while a backend of the old one still holds its shared memory.
        wait_until(lambda: not _group_alive(pid), 60, "the backends of the killed postmaster to exit")

    fault = Fault("PostgreSQL SIGKILL + crash recovery", crash, own_pg.start, OUTAGE, database=True)
    run = _run_through(tmp_path, ingests, prefix=topic_prefix, fault=fault, ingest_db=db, counting_db=db,
                       ingest_mqtt=broker.url, broker_port=broker.port)
    recoveries = server_log.read_text().count("automatic recovery in progress") - recoveries_before
    run.expect(recoveries == 1, f"PostgreSQL ran crash recovery {recoveries} time(s), not once: was it a crash?")
    _verify(run, fault, db)


@pytest.mark.parametrize("mode", ["blackhole", "refuse"], ids=["blackholed", "refusing"])
def test_database_unreachable_mid_stream(
    tmp_path: Path, ingests: list[IngestProcess], database_url: str, broker: Mosquitto, topic_prefix: str,
    make_proxy: Callable[[int], FaultProxy], mode: Mode,
) -> None:
    """The service reaches PostgreSQL through a proxy.

    blackholed: the proxy goes silent (packets dropped, nothing closed). The write in flight must not
    hang: it times out (database.command_timeout), the connection is given up, new connections time
    out (connect_timeout) until the network is back; the fault is held until two such failures. Connections frozen
    by the blackhole stay dead afterwards (lost NAT/firewall state): the service must not wait on
    them. A COMMIT whose answer was lost is absorbed by the unique key on retry.

    refusing: the proxy resets every current connection and every new one (a database that is down):
    each write and each reconnect fails fast with a connection-class error.

    Either way the failures are retried with backoff, nothing is acked meanwhile, /readyz answers
    503, the broker connection is suspended on purpose and resumed, and when the network is back the
    service resumes by itself and every reading is stored exactly once."""
    proxy = make_proxy(urlsplit(database_url).port or 5432)
    fault = _proxy_fault(f"database {mode}", proxy, mode, database=True)
    run = _run_through(tmp_path, ingests, prefix=topic_prefix, fault=fault,
                       ingest_db=_with_port(database_url, proxy.port), counting_db=database_url,
                       ingest_mqtt=broker.url, broker_port=broker.port)
    _verify(run, fault, database_url)


def test_broker_blackholed_longer_than_the_keepalive(
    tmp_path: Path, ingests: list[IngestProcess], database_url: str, own_broker: Mosquitto, topic_prefix: str,
    make_proxy: Callable[[int], FaultProxy],
) -> None:
    """The service reaches the broker through a proxy that goes silent (the publishers still reach
    the broker directly). The service's keepalive must detect the dead connection (no PINGRESP) and
    /readyz must answer 503; its reconnects time out on CONNACK until the network is back (the
    blackhole is held until two have), then the session is resumed and what was unacknowledged is
    redelivered. Acks sent into the blackhole are lost, so committed messages come back and are
    absorbed by the unique key: every reading is stored exactly once."""
    proxy = make_proxy(own_broker.port)
    fault = _proxy_fault("broker blackhole", proxy, "blackhole", database=False)
    accepted: list[int] = []

    def two_reconnects_timed_out() -> str:
        if not accepted:
            accepted.append(proxy.accepted)  # at the fault: the connection it froze was accepted before
        # Each reconnect is a new connection that waits for its CONNACK until connect_timeout; a third
        # one means two have timed out.
        return "" if proxy.accepted >= accepted[0] + 3 else "two reconnects timed out on CONNACK"

    fault.shown = two_reconnects_timed_out
    run = _run_through(tmp_path, ingests, prefix=topic_prefix, fault=fault, ingest_db=database_url,
                       counting_db=database_url, ingest_mqtt=f"mqtt://127.0.0.1:{proxy.port}",
                       broker_port=own_broker.port)
    _verify(run, fault, database_url)
