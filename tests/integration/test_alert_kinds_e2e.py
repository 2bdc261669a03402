"""Issue #16 end to end: the new rule kinds, and the no-data grace after an outage of the service.

Everything is real: the service is a process (`python -m ingest run`), readings are native messages
published to the private Mosquitto, state and events are rows of the private TimescaleDB, and the
webhook is a real HTTP server (tests/webhook_receiver.py). The helpers that read alert_events and the
outbox, and check what the receiver got, are those of tests/integration/test_alerts_e2e.py.

The tests of the rule kinds share one service (module scope, its own database and receiver): each
has its own rule, restricted to its own devices, and reads only that rule's events and deliveries.
The outage tests stop and restart a service of their own.

Event times are near the real clock, so that the watermark (the clock minus ``alerts.lateness``,
"1s" here to keep the tests quick) decides when a series is judged, as in production:

- scripted series (rate, windows) are published at once with times a little in the future (well
  inside ingest.max_future); they are stored at once and wait, and each worker's evaluator judges
  them in event-time order as the watermark passes them;
- devices that report on their own (no_data, the outage) are a ``Ticker``: a thread that publishes
  each device's readings every second with the current time, until told to stop.

Counts and values are asserted, never durations: every wait is a wait_until on a condition, its
bound only a bound on a hang. The one time the tests compare is the no-data grace itself: a silence
is judged no earlier than the grace after the (re)start, which is the contract, not a speed.
"""

from __future__ import annotations

import math
import threading
import uuid
from collections.abc import Callable, Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import httpx
import psycopg
import pytest

from tests.integration.harness import IngestProcess, Publisher, native, write_config
from tests.integration.test_alerts_e2e import (
    RETRY_MAX,
    SECRET_ENV,
    check_signatures,
    events,
    new_secret,
    outbox,
    seen,
)
from tests.services import Mosquitto, Postgres, wait_until
from tests.webhook_receiver import Delivery, WebhookReceiver

WAIT = 60.0  # only bounds a hang
LATENESS = 1.0  # seconds: [alerts] lateness
ACKED = "sensor_ingest_messages_acked_total"
NOT_JUDGED = "sensor_ingest_alert_not_judged_total"  # windows short of coverage, readings with no rate
EPOCH = datetime(1970, 1, 1, tzinfo=UTC)


def kinds_config(prefix: str, hook_url: str, rules: str) -> str:
    """What write_config's ``extra`` gets: a native source that declares an expected interval of 1 s
    (window coverage), the [alerts] section, the "ops" webhook and the rules."""
    return f"""
[[sources]]
name = "paced"
topic = "{prefix}/paced/{{device}}/up"
format = "native"
expected_interval = "1s"

[alerts]
retry_max = "{RETRY_MAX:g}s"
lateness = "{LATENESS:g}s"

[[webhooks]]
name = "ops"
url = "{hook_url}"
secret_env = "{SECRET_ENV}"
timeout = 2.0
{rules}
"""


@dataclass
class Service:
    ingest: IngestProcess
    receiver: WebhookReceiver
    secret: str
    db: str
    prefix: str
    pub: Publisher
    published: int = 0

    def publish(self, device: str, series: list[tuple[datetime, dict[str, float]]], *, paced: bool = False) -> None:
        """Publish one native message per (time, readings), all at once, and wait until the service
        acknowledged them all (stored; readings after the watermark wait there to be judged).
        ``paced``: on the source that declares expected_interval = "1s"."""
        topic = f"{self.prefix}/paced/{device}/up" if paced else f"{self.prefix}/{device}/up"
        self.published += self.pub.publish_all([(topic, native(device, t.isoformat(), dict[str, object](r)))
                                                for t, r in series])
        wait_until(lambda: self.ingest.metric(ACKED) >= self.published, WAIT,
                   f"{self.published} messages committed and acknowledged")

    def count(self, name: str, rule: str | None = None) -> float:
        """A counter of /metrics, of one rule's label when ``rule`` is given."""
        if rule is None:
            return self.ingest.metric(name)
        text = httpx.get(f"http://{self.ingest.http}/metrics", timeout=5).text
        return sum(float(line.rsplit(" ", 1)[1]) for line in text.splitlines()
                   if line.startswith(name + "{") and f'rule="{rule}"' in line)


def start_service(dirpath: Path, db: str, broker: Mosquitto, prefix: str, receiver: WebhookReceiver,
                  rules: str) -> Service:
    secret = new_secret()
    cfg = write_config(dirpath / "ingest.toml", prefix=prefix, database_url=db, mqtt_url=broker.url,
                       extra=kinds_config(prefix, receiver.url(), rules))
    ingest = IngestProcess(cfg, dirpath / "ingest.log", env={SECRET_ENV: secret})
    try:
        ingest.start()
    except BaseException:
        ingest.close()
        raise
    return Service(ingest, receiver, secret, db, prefix, Publisher(broker.port))


@pytest.fixture(scope="module")
def kinds(tmp_path_factory: pytest.TempPathFactory, pg: Postgres, migrated_template: str,
          broker: Mosquitto) -> Iterator[Service]:
    """One service, one database and one receiver for the tests of the rule kinds: each test has its
    own rule (restricted to its own devices) and reads only that rule's events and deliveries. One
    start instead of one per test keeps the file quick."""
    name = pg.create_database(migrated_template)
    receiver = WebhookReceiver().up()
    try:
        s = start_service(tmp_path_factory.mktemp("kinds"), pg.url(name), broker, "t" + uuid.uuid4().hex[:10],
                          receiver, RATE_RULE + CLOCK_RULE + ROLLING_RULE + NO_DATA_RULES)
        try:
            yield s
            assert s.ingest.terminate() == 0, f"the shared service did not stop cleanly (log: {s.ingest.log_path})"
        finally:
            s.pub.close()
            s.ingest.close()
    finally:
        receiver.close()
        pg.drop_database(name)


@pytest.fixture
def service(kinds: Service) -> Service:
    assert kinds.ingest.running, f"the shared service is not running (log: {kinds.ingest.log_path})"
    return kinds


@pytest.fixture
def make_service(tmp_path: Path, database_url: str, broker: Mosquitto, topic_prefix: str,
                 ingests: list[IngestProcess]) -> Iterator[Callable[[str], Service]]:
    """A service of the test's own (a database, a receiver), for the tests that stop and restart it."""
    made: list[Service] = []
    receiver = WebhookReceiver().up()

    def make(rules: str) -> Service:
        s = start_service(tmp_path, database_url, broker, topic_prefix, receiver, rules)
        ingests.append(s.ingest)
        made.append(s)
        return s

    yield make
    for s in made:
        s.pub.close()
    receiver.close()


class Ticker:
    """Devices that report every ``interval`` seconds with the current time, from a thread of its own,
    over a QoS 1 publisher of its own: a broker that acknowledged a reading keeps it for the service.

    ``metrics``: device -> the readings of each message. ``mute(device, metric)`` stops a metric of a
    device (every metric when None) and ``unmute`` resumes it; ``sent`` is every reading published,
    (device, metric) -> its times; ``first_after(device, metric, t)`` the first time of a reading after
    t. A change takes effect from the next tick: a tick publishes under the lock it is made under."""

    def __init__(self, port: int, prefix: str, metrics: dict[str, dict[str, float]], interval: float = 1.0) -> None:
        self.prefix = prefix
        self.metrics = metrics
        self.interval = interval
        self.muted: set[tuple[str, str]] = set()
        self.sent: dict[tuple[str, str], list[datetime]] = {}
        self.ticks = 0
        self._lock = threading.Lock()
        self._stop = threading.Event()
        self._pub = Publisher(port)
        self._thread = threading.Thread(target=self._run, name="ticker", daemon=True)

    def __enter__(self) -> Ticker:
        self._thread.start()
        return self

    def __exit__(self, *exc: object) -> None:
        self.stop()

    def stop(self) -> None:
        if not self._stop.is_set():
            self._stop.set()
            self._thread.join(30)
            self._pub.close()

    def _run(self) -> None:
        while not self._stop.is_set():
            with self._lock:
                now = datetime.now(UTC)
                messages = []
                for device, readings in self.metrics.items():
                    live: dict[str, object] = {m: v for m, v in readings.items() if (device, m) not in self.muted}
                    if live:
                        messages.append((f"{self.prefix}/{device}/up", native(device, now.isoformat(), live)))
                        for m in live:
                            self.sent.setdefault((device, m), []).append(now)
                self._pub.publish_all(messages)
                self.ticks += 1
            self._stop.wait(self.interval)

    def _set(self, device: str, metric: str | None, muted: bool) -> None:
        with self._lock:
            for m in ([metric] if metric is not None else list(self.metrics[device])):
                (self.muted.add if muted else self.muted.discard)((device, m))

    def mute(self, device: str, metric: str | None = None) -> None:
        self._set(device, metric, True)

    def unmute(self, device: str, metric: str | None = None) -> None:
        self._set(device, metric, False)

    def last(self, device: str, metric: str | None = None) -> datetime:
        """The time of the device's last reading of ``metric`` (of any metric when None)."""
        with self._lock:
            return max(t for (d, m), ts in self.sent.items() if d == device and metric in (None, m) for t in ts)

    def first_after(self, device: str, metric: str | None, after: datetime) -> datetime | None:
        with self._lock:
            later = [t for (d, m), ts in self.sent.items() if d == device and metric in (None, m) for t in ts
                     if t > after]
        return min(later, default=None)

    def published(self) -> set[tuple[str, str, datetime]]:
        with self._lock:
            return {(d, m, t) for (d, m), ts in self.sent.items() for t in ts}

    def ticked(self, n: int) -> Callable[[], bool]:
        """A condition: ``n`` more ticks from now."""
        target = self.ticks + n
        return lambda: self.ticks >= target


# --- what the database holds ---------------------------------------------------------------------


def rule_events(db: str, rule: str) -> list[tuple[Any, ...]]:
    """The rule's alert_events: (device, status, event_time, starts_at, value, threshold, notified)."""
    return [e[2:] for e in events(db) if e[1] == rule]


def state(db: str, rule: str, device: str) -> dict[str, Any] | None:
    with psycopg.connect(db) as c:
        cur = c.execute(
            "SELECT s.status, s.episode_start, s.last_time, s.last_value, s.evaluated_to, s.due_at FROM alert_state s"
            " JOIN devices d ON d.id = s.device_id WHERE s.rule = %s AND d.uid = %s", (rule, device))
        names = [d.name for d in cur.description or ()]
        row = cur.fetchone()
    return None if row is None else dict(zip(names, row, strict=True))


def judged_to(db: str, rule: str, device: str, t: datetime) -> Callable[[], bool]:
    """A condition: the series has judged every reading up to t (nothing waits for the watermark)."""
    def done() -> bool:
        s = state(db, rule, device)
        return s is not None and s["last_time"] == t and s["due_at"] is None
    return done


def created_at(db: str) -> dict[int, datetime]:
    with psycopg.connect(db) as c:
        return dict(c.execute("SELECT id, created_at FROM alert_events").fetchall())


def stored(db: str, device_like: str) -> set[tuple[str, str, datetime]]:
    with psycopg.connect(db) as c:
        rows = c.execute("SELECT d.uid, m.name, r.time FROM readings r JOIN devices d ON d.id = r.device_id"
                         " JOIN metrics m ON m.id = r.metric_id WHERE d.uid LIKE %s", (device_like,)).fetchall()
    return {(str(d), str(m), t) for d, m, t in rows}


# --- what the receiver got -----------------------------------------------------------------------


def rule_outbox(db: str, rules: set[str]) -> list[dict[str, Any]]:
    """The outbox rows of the events of these rules."""
    rule_of = {e[0]: e[1] for e in events(db)}
    return [r for r in outbox(db) if rule_of[r["event_id"]] in rules]


def rule_requests(s: Service, rules: set[str]) -> list[Delivery]:
    """What the receiver got for events of these rules, in arrival order."""
    return [d for d in s.receiver.requests() if d.json()["rule"] in rules]


def check_delivered(s: Service, expected: dict[tuple[str, str], list[tuple[str, float, datetime, datetime]]],
                    *, metric: dict[str, str]) -> list[dict[str, Any]]:
    """Every event of the rules of ``expected`` was delivered exactly once (one request, answered 200,
    under webhook-id msg_<outbox id>, body id evt_<event id>), signed; the deliveries of each (rule,
    device), in arrival order, are ``expected``: (status, value, event_time, starts_at), ends_at the
    event time of a resolved event. ``metric``: rule -> the body's metric. Returns the bodies."""
    rules = {rule for rule, _ in expected}
    n = sum(len(v) for v in expected.values())

    def done() -> bool:
        rows = rule_outbox(s.db, rules)
        return len(rows) == n and all(r["status"] == "delivered" for r in rows) and len(rule_requests(s, rules)) >= n

    wait_until(done, WAIT, f"{n} events delivered")
    delivered = rule_requests(s, rules)
    assert [d.status for d in delivered] == [200] * n  # one request per event
    rows = rule_outbox(s.db, rules)
    assert sorted(d.webhook_id for d in delivered) == sorted(f"msg_{r['id']}" for r in rows)
    event_of = {f"msg_{r['id']}": r["event_id"] for r in rows}
    assert all(d.json()["id"] == f"evt_{event_of[d.webhook_id]}" for d in delivered)
    check_signatures(s.receiver, s.secret)
    got: dict[tuple[str, str], list[tuple[Any, ...]]] = {}
    for d in delivered:
        rule, device, status, value, event_time, starts_at, ends_at = seen(d)
        assert ends_at == (event_time if status == "resolved" else None)
        got.setdefault((rule, device), []).append((status, value, event_time, starts_at))
    assert set(got) == set(expected)
    for key, want in expected.items():
        assert [(st, t, start) for st, _, t, start in got[key]] == [(st, t, start) for st, _, t, start in want], key
        assert [v for _, v, _, _ in got[key]] == pytest.approx([v for _, v, _, _ in want]), key
    bodies = [d.json() for d in delivered]
    for b in bodies:
        assert b["metric"] == metric[b["rule"]]
    return bodies


def check_recorded(db: str, rule: str, device: str, expected: list[tuple[str, datetime, datetime, float]],
                   threshold: float) -> None:
    """alert_events of the rule: exactly ``expected`` (status, event_time, starts_at, value), on the
    device, against ``threshold``, all notified."""
    got = rule_events(db, rule)
    assert [(d, st, t, start, th, n) for d, st, t, start, _, th, n in got] == [
        (device, st, t, start, threshold, True) for st, t, start, _ in expected]
    assert [v for *_, v, _, _ in got] == pytest.approx([v for *_, v in expected])


def per_minute(dv: float, seconds: float) -> float:
    """A rate as the contract defines it: the change over minutes(t - t_ref)."""
    return dv / (seconds / 60.0)


def soon(seconds: float = 1.5) -> datetime:
    """A whole second a little ahead of the clock: the first event time of a scripted series."""
    t = datetime.now(UTC) + timedelta(seconds=seconds)
    return t.replace(microsecond=0) + timedelta(seconds=1)


# --- 1. rate: a river level rising, then levelling --------------------------------------------------

RATE_RULE = """
[[rules]]
name = "river-rising"
metric = "water_level"
devices = ["hn-river-*"]
rate = { over = "4s", above = 0.5 }
clear = 0.1
severity = "critical"
webhooks = ["ops"]
"""


def test_rate_fires_once_while_the_level_rises_and_resolves_once_when_it_levels(service: Service) -> None:
    s = service
    not_judged = s.count(NOT_JUDGED)
    # One reading a second: 1.00 m, rising 5 cm a second from s = 5 to s = 8, then level at 1.20 m.
    # The rate at s is against the oldest reading in [s - 4 s, s), judged once that is 2 s back:
    # 0 up to s = 4; s = 5 (ref s = 1): 0.05 m in 4 s, 0.75 m/min > 0.5 fires; 1.5, 2.25, 3.0, 2.25,
    # 1.5 and, at s = 11 (ref s = 7), 0.75 stay above clear 0.1; s = 12 (ref s = 8, both 1.20) is 0
    # and resolves. The readings after it stay level: nothing more. s = 0 and 1 have no reference
    # 2 s back: not judged.
    levels = [1.0] * 5 + [1.05, 1.10, 1.15] + [1.20] * 7
    t0 = soon()
    at = [t0 + timedelta(seconds=i) for i in range(len(levels))]
    s.publish("hn-river-01", [(t, {"water_level": v}) for t, v in zip(at, levels, strict=True)])

    wait_until(judged_to(s.db, "river-rising", "hn-river-01", at[-1]), WAIT, "every reading judged")
    expected = [("firing", at[5], at[5], per_minute(1.05 - 1.0, 4)),
                ("resolved", at[12], at[5], per_minute(1.20 - 1.20, 4))]
    check_recorded(s.db, "river-rising", "hn-river-01", expected, 0.5)
    assert expected[0][3] == pytest.approx(0.75)
    bodies = check_delivered(s, {("river-rising", "hn-river-01"): [(st, v, t, start) for st, t, start, v in expected]},
                             metric={"river-rising": "water_level"})
    assert {b["unit"] for b in bodies} == {"m/min"}  # the value is a rate
    assert {b["threshold"] for b in bodies} == {0.5}
    assert {b["severity"] for b in bodies} == {"critical"}
    assert s.count("sensor_ingest_alert_events_total", "river-rising") == 2
    assert s.count(NOT_JUDGED) - not_judged == 2  # s = 0 and 1


# --- 2. window, clock-aligned, with coverage ---------------------------------------------------------

CLOCK_RULE = """
[[rules]]
name = "pm25-mean"
metric = "pm25"
devices = ["hn-aq-clock-*"]
window = { agg = "avg", over = "4s", align = "clock", coverage = 0.75 }
above = 55.5
clear = 50
webhooks = ["ops"]
"""


def next_window(over: float, after: datetime) -> datetime:
    """The start of the first clock window of ``over`` seconds (from the UTC epoch) after ``after``."""
    return EPOCH + timedelta(seconds=math.ceil((after - EPOCH).total_seconds() / over) * over)


def test_clock_window_fires_and_resolves_once_and_a_window_with_too_few_readings_is_not_judged(
        service: Service) -> None:
    s = service
    not_judged = s.count(NOT_JUDGED)
    # Windows of 4 s from the epoch; the source's expected_interval 1 s promises 4 readings a window
    # and coverage 0.75 asks for 3. W0: 2 readings of 90 (mean 90, not judged); W1: 3 of 60 (just
    # covered: fires at its end, 60); W2: 4 of 40 (resolves at its end, 40); W3: 2 of 90 again, not
    # judged, so no second episode.
    w = next_window(4, soon())
    windows = [(w, [90.0] * 2), (w + timedelta(seconds=4), [60.0] * 3), (w + timedelta(seconds=8), [40.0] * 4),
               (w + timedelta(seconds=12), [90.0] * 2)]
    series = [(start + timedelta(seconds=0.5 + i), {"pm25": v}) for start, values in windows
              for i, v in enumerate(values)]
    s.publish("hn-aq-clock-01", series, paced=True)

    end = w + timedelta(seconds=16)

    def past_the_last_window() -> bool:
        st = state(s.db, "pm25-mean", "hn-aq-clock-01")
        return st is not None and st["evaluated_to"] == end and st["due_at"] is None

    wait_until(past_the_last_window, WAIT, "every window judged or passed over")
    w2, w3 = w + timedelta(seconds=8), w + timedelta(seconds=12)
    expected = [("firing", w2, w2, 60.0), ("resolved", w3, w2, 40.0)]
    check_recorded(s.db, "pm25-mean", "hn-aq-clock-01", expected, 55.5)
    assert s.count(NOT_JUDGED) - not_judged == 2  # W0 and W3
    check_delivered(s, {("pm25-mean", "hn-aq-clock-01"): [(st, v, t, start) for st, t, start, v in expected]},
                    metric={"pm25-mean": "pm25"})


# --- 3. window, rolling --------------------------------------------------------------------------------

ROLLING_RULE = """
[[rules]]
name = "pm25-rolling"
metric = "pm25"
devices = ["hn-aq-roll-*"]
window = { agg = "avg", over = "4s", align = "rolling" }
above = 55.5
clear = 50
webhooks = ["ops"]
"""


def test_rolling_window_fires_and_resolves_once(service: Service) -> None:
    s = service
    not_judged = s.count(NOT_JUDGED)
    # One reading a second; the mean of the readings in (s - 4 s, s]: 20 up to s = 3, 35 (s = 4: the
    # first 80 alone does not fire, as a plain threshold would), 50, 65 at s = 6 fires, 67.5, 55
    # (above clear 50: still firing), 42.5 at s = 9 resolves, then 30.
    values = [20.0] * 4 + [80.0] * 3 + [30.0] * 5
    t0 = soon()
    at = [t0 + timedelta(seconds=i) for i in range(len(values))]
    s.publish("hn-aq-roll-01", [(t, {"pm25": v}) for t, v in zip(at, values, strict=True)])

    wait_until(judged_to(s.db, "pm25-rolling", "hn-aq-roll-01", at[-1]), WAIT, "every reading judged")
    expected = [("firing", at[6], at[6], 65.0), ("resolved", at[9], at[6], 42.5)]
    check_recorded(s.db, "pm25-rolling", "hn-aq-roll-01", expected, 55.5)
    check_delivered(s, {("pm25-rolling", "hn-aq-roll-01"): [(st, v, t, start) for st, t, start, v in expected]},
                    metric={"pm25-rolling": "pm25"})
    assert s.count(NOT_JUDGED) == not_judged  # no coverage asked: every reading judged


# --- 4. no_data, per series and per device ------------------------------------------------------------

NO_DATA_RULES = """
[[rules]]
name = "level-silent"
metric = "water_level"
devices = ["hn-gauge-*"]
no_data = "3s"
webhooks = ["ops"]

[[rules]]
name = "gauge-silent"
devices = ["hn-gauge-*"]
no_data = "3s"
per = "device"
webhooks = ["ops"]
"""


def test_no_data_per_series_and_per_device_fire_and_resolve_once(service: Service, broker: Mosquitto) -> None:
    """One gauge reports its level and its temperature every second. Its level goes silent: the
    per-series rule fires, the per-device one does not (the temperature is a sign of life). Then the
    temperature stops too: the device rule fires. The temperature comes back: the device rule
    resolves, the level rule still fires; the level comes back: it resolves."""
    s = service
    dev = "hn-gauge-01"
    with Ticker(broker.port, s.prefix, {dev: {"water_level": 1.0, "temperature": 25.0}}) as ticker:
        wait_until(lambda: len(stored(s.db, dev)) >= 2 * 5, WAIT, "five seconds of readings stored")
        ticker.mute(dev, "water_level")
        last_level = ticker.last(dev, "water_level")
        wait_until(lambda: len(rule_events(s.db, "level-silent")) >= 1, WAIT, "the level's silence to fire")
        assert rule_events(s.db, "gauge-silent") == []  # judged in the same round: the device is alive

        ticker.mute(dev)
        last_any = ticker.last(dev)
        wait_until(lambda: len(rule_events(s.db, "gauge-silent")) >= 1, WAIT, "the device's silence to fire")

        ticker.unmute(dev, "temperature")
        wait_until(lambda: ticker.first_after(dev, "temperature", last_any) is not None, WAIT, "the temperature back")
        back_any = ticker.first_after(dev, "temperature", last_any)
        assert back_any is not None
        wait_until(lambda: len(rule_events(s.db, "gauge-silent")) >= 2, WAIT, "the device's silence to resolve")
        assert len(rule_events(s.db, "level-silent")) == 1  # the level is still silent

        ticker.unmute(dev, "water_level")
        wait_until(lambda: ticker.first_after(dev, "water_level", last_level) is not None, WAIT, "the level back")
        back_level = ticker.first_after(dev, "water_level", last_level)
        assert back_level is not None
        wait_until(lambda: len(rule_events(s.db, "level-silent")) >= 2, WAIT, "the level's silence to resolve")
        # Two more seconds of readings judged by both rules: nothing else comes.
        wait_until(ticker.ticked(2), WAIT, "two more seconds of readings")
        newest = ticker.last(dev)
        wait_until(lambda: all((st := state(s.db, rule, dev)) is not None and st["last_time"] >= newest
                               for rule in ("level-silent", "gauge-silent")), WAIT, "the newest readings judged")

    gap = timedelta(seconds=3)
    # Fired at the last reading + the duration (a deterministic time), with the silence seen by the
    # watermark as its value; resolved by the first reading back, with the gap as its value.
    (_, _, _, _, fired_level, _, _), _ = rule_events(s.db, "level-silent")
    (_, _, _, _, fired_any, _, _), _ = rule_events(s.db, "gauge-silent")
    assert fired_level > 3.0
    assert fired_any > 3.0
    level = [("firing", last_level + gap, last_level + gap, fired_level),
             ("resolved", back_level, last_level + gap, (back_level - last_level).total_seconds())]
    device = [("firing", last_any + gap, last_any + gap, fired_any),
              ("resolved", back_any, last_any + gap, (back_any - last_any).total_seconds())]
    check_recorded(s.db, "level-silent", dev, level, 3.0)
    check_recorded(s.db, "gauge-silent", dev, device, 3.0)
    bodies = check_delivered(s, {("level-silent", dev): [(st, v, t, start) for st, t, start, v in level],
                                 ("gauge-silent", dev): [(st, v, t, start) for st, t, start, v in device]},
                             metric={"level-silent": "water_level", "gauge-silent": "*"})
    assert {b["unit"] for b in bodies} == {"s"}  # the value is a silence


# --- 5. an outage of the service does not page for every device ------------------------------------

SILENT_RULE = """
[[rules]]
name = "device-silent"
no_data = "4s"
per = "device"
webhooks = ["ops"]
"""
SILENCE = 4.0  # seconds: the rule's no_data, and so the default alerts.no_data_grace
FLEET = {f"hn-o-{i:02d}": {"temperature": 25.0 + i} for i in range(5)}
GONE = "hn-o-04"  # the device that stops for good


def _run_then_stop(s: Service, ticker: Ticker) -> None:
    """Every device judged alive by a service up past its grace; then the service stopped (SIGTERM)."""
    def all_seen() -> bool:
        return all((st := state(s.db, "device-silent", d)) is not None and st["last_time"] is not None
                   for d in FLEET)

    wait_until(all_seen, WAIT, "every device's state")
    wait_until(ticker.ticked(int(SILENCE) + 2), WAIT, "the service up past its grace")
    assert events(s.db) == []
    assert s.ingest.terminate() == 0


def _only_the_gone_device_pages(s: Service, ticker: Ticker, restarted: datetime) -> None:
    """After the restart: exactly one firing, the device that stopped, at its last reading + the
    duration, judged no earlier than the grace after the restart; no other device, even after more
    rounds of the no-data job."""
    wait_until(lambda: len(events(s.db)) >= 1, WAIT, "the gone device to page")
    wait_until(ticker.ticked(3), WAIT, "three more seconds of the fleet")
    live = [d for d in FLEET if d != GONE]
    newest = {d: ticker.last(d) for d in live}
    wait_until(lambda: all((st := state(s.db, "device-silent", d)) is not None and st["last_time"] >= newest[d]
                           for d in live), WAIT, "the fleet's newer readings judged")
    got = events(s.db)
    assert [(e[2], e[3]) for e in got] == [(GONE, "firing")]
    ((event_id, rule, device, status, event_time, starts_at, value, threshold, notified),) = got
    last = ticker.last(GONE)
    assert (rule, device, status, event_time, starts_at, threshold, notified) == (
        "device-silent", GONE, "firing", last + timedelta(seconds=SILENCE), last + timedelta(seconds=SILENCE),
        SILENCE, True)
    assert value > SILENCE
    assert created_at(s.db)[event_id] >= restarted + timedelta(seconds=SILENCE)  # the grace held
    check_delivered(s, {("device-silent", GONE): [("firing", value, event_time, starts_at)]},
                    metric={"device-silent": "*"})


def test_an_outage_of_twice_the_no_data_duration_pages_only_for_the_device_that_stopped(
        make_service: Callable[[str], Service], broker: Mosquitto, topic_prefix: str) -> None:
    """The devices go on publishing while the service is down; the persistent session keeps their
    readings for it, and the restarted service stores them before its grace ends, so none of them
    was silent. The one device that stopped during the outage pages, once."""
    s = make_service(SILENT_RULE)
    with Ticker(broker.port, topic_prefix, FLEET) as ticker:
        _run_then_stop(s, ticker)
        ticker.mute(GONE)
        wait_until(ticker.ticked(2 * int(SILENCE)), WAIT, "an outage of twice the no-data duration")
        restarted = datetime.now(UTC)
        s.ingest.start()
        _only_the_gone_device_pages(s, ticker, restarted)
        # The backlog was kept and stored: every reading the fleet published, the outage's included.
        sent = ticker.published()
    assert {(d, m, t) for d, m, t in sent if t < restarted} <= stored(s.db, "hn-o-%")
    assert s.ingest.terminate() == 0


def test_an_outage_the_devices_share_pages_nobody_within_the_grace_then_the_device_that_stays_away(
        make_service: Callable[[str], Service], broker: Mosquitto, topic_prefix: str) -> None:
    """The devices stop during the outage too (a power cut of the district) and come back only after
    the restart: no backlog. Every device was silent for longer than the duration, and none pages: the
    grace (by default the longest no_data duration) lets them report first. The one that never comes
    back pages after the grace."""
    s = make_service(SILENT_RULE)
    with Ticker(broker.port, topic_prefix, FLEET) as ticker:
        _run_then_stop(s, ticker)
        for d in FLEET:
            ticker.mute(d)
        wait_until(ticker.ticked(2 * int(SILENCE)), WAIT, "an outage of twice the no-data duration")
        restarted = datetime.now(UTC)
        s.ingest.start()
        for d in FLEET:
            if d != GONE:
                ticker.unmute(d)
        _only_the_gone_device_pages(s, ticker, restarted)
    assert s.ingest.terminate() == 0
