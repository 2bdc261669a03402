"""Issue #14 end to end: threshold alerts from MQTT readings to signed webhooks.

Everything is real: the service is a process (`python -m ingest run`), the readings are native
messages published to the private Mosquitto with explicit event times, the state, events and outbox
are rows of the private TimescaleDB, and the webhook is a real HTTP server on 127.0.0.1
(tests/webhook_receiver.py) that records every request and answers from a script, or is down.

Every test checks what the receiver got (status, value, event_time, starts_at, ends_at, in order per
series, each request's Standard Webhooks signature with ingest.alerts.sign.verify and again with
hmac alone) against alert_events, alert_state and alert_outbox.

``[alerts] retry_max = "2s"``: the dispatcher's backoff is full jitter, uniform in
[0, min(retry_max, 1 s * 2**(attempts - 1))], so with a 2 s cap no two attempts of a failing
delivery are more than about 2 s apart (plus the dispatcher's 1 s poll at most), and an event is
delivered within about 2 s of the receiver coming back. The default cap (5 minutes) would make each
outage test wait up to minutes for the next attempt; the behaviour under test is the same.

Event times are a little in the past (NOW - 30 minutes and on), inside alerts.max_notify_age (1 h by
default), so every event is notified.
"""

from __future__ import annotations

import base64
import secrets
from collections.abc import Iterator
from dataclasses import dataclass
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import psycopg
import pytest

from ingest.alerts.sign import verify
from tests.integration.harness import IngestProcess, Publisher, count, native, waiting_on_a_lock, write_config
from tests.proxy import PUBACK, PUBLISH, FaultProxy
from tests.services import Mosquitto, wait_until
from tests.webhook_receiver import Delivery, WebhookReceiver, signature_matches

SECRET_ENV = "SENSOR_INGEST_WEBHOOK_OPS_SECRET"
RETRY_MAX = 2.0  # seconds: [alerts] retry_max (see the module docstring)
WAIT = 60.0  # only bounds a hang


def new_secret() -> str:
    return "whsec_" + base64.b64encode(secrets.token_bytes(24)).decode()


LEVEL_RULE = """
[[rules]]
name = "level-high"
metric = "level"
above = 5.0
clear = 4.0
severity = "critical"
webhooks = ["ops"]
summary = "level at {device} is {value} (threshold {threshold})"
labels = { team = "hydro" }
"""

PM25_RULE = """
[[rules]]
name = "pm25-high"
metric = "pm25"
above = 55.5
clear = 50.0
for = "2m"
severity = "warning"
webhooks = ["ops"]
summary = "PM2.5 at {device} is {value} {unit} (threshold {threshold})"
labels = { team = "environment" }
"""

NO2_WHERE_RULE = """
[[rules]]
name = "no2-hoan-kiem"
metric = "no2"
above = 100.0
where = { district = "hoan-kiem" }
webhooks = ["ops"]
"""


def district_source(prefix: str) -> str:
    """A native source whose topic captures {district}: a device attribute (devices.attributes)."""
    return f'\n[[sources]]\nname = "district"\ntopic = "{prefix}/d/{{district}}/{{device}}/up"\nformat = "native"\n'


def alerts_config(url: str, rules: str, extra: str = "") -> str:
    return f"""
[alerts]
retry_max = "{RETRY_MAX:g}s"

[[webhooks]]
name = "ops"
url = "{url}"
secret_env = "{SECRET_ENV}"
timeout = 2.0
{rules}
{extra}
"""


@pytest.fixture
def t0() -> datetime:
    """The first event time of a test: 30 minutes ago, on a whole minute (well inside max_notify_age)."""
    return (datetime.now(UTC) - timedelta(minutes=30)).replace(second=0, microsecond=0)


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    r = WebhookReceiver()
    yield r
    r.close()


@dataclass
class Stack:
    ingest: IngestProcess
    receiver: WebhookReceiver
    secret: str
    db: str
    prefix: str
    pub: Publisher
    t0: datetime
    published: int = 0

    def at(self, minutes: float) -> datetime:
        return self.t0 + timedelta(minutes=minutes)

    def send(self, device: str, metric: str, minutes: float, value: float, *, topic: str | None = None) -> None:
        """Publish one native reading and wait until the service acknowledged it (so after its commit:
        each reading is its own transaction, as when readings arrive one by one)."""
        topic = topic or f"{self.prefix}/{device}/up"
        self.pub.publish_all([(topic, native(device, self.at(minutes).isoformat(), {metric: value}))])
        self.published += 1
        wait_until(lambda: self.ingest.metric("sensor_ingest_messages_acked_total") >= self.published, WAIT,
                   f"message {self.published} committed and acknowledged")


@pytest.fixture
def make_stack(tmp_path: Path, database_url: str, broker: Mosquitto, topic_prefix: str, receiver: WebhookReceiver,
               ingests: list[IngestProcess], t0: datetime) -> Iterator[Any]:
    pubs: list[Publisher] = []

    def make(rules: str, *, extra: str = "", mqtt_url: str | None = None, start: bool = True) -> Stack:
        secret = new_secret()
        cfg = write_config(tmp_path / "ingest.toml", prefix=topic_prefix, database_url=database_url,
                           mqtt_url=mqtt_url or broker.url, extra=alerts_config(receiver.url(), rules, extra))
        ingest = IngestProcess(cfg, tmp_path / "ingest.log", env={SECRET_ENV: secret})
        ingests.append(ingest)
        if start:
            ingest.start()
        pub = Publisher(broker.port)
        pubs.append(pub)
        return Stack(ingest, receiver, secret, database_url, topic_prefix, pub, t0)

    yield make
    for p in pubs:
        p.close()


# --- what the database holds -------------------------------------------------------------------------


def events(db: str) -> list[tuple[Any, ...]]:
    """alert_events: (id, rule, device, status, event_time, starts_at, value, threshold, notified)."""
    with psycopg.connect(db) as c:
        return c.execute(
            "SELECT e.id, e.rule, d.uid, e.status, e.event_time, e.starts_at, e.value, e.threshold, e.notified"
            " FROM alert_events e JOIN devices d ON d.id = e.device_id ORDER BY e.id").fetchall()


def states(db: str) -> dict[tuple[str, str], tuple[Any, ...]]:
    """alert_state: (rule, device) -> (status, episode_start, last_time, last_value), of the rules'
    rows (every rule here is a value rule: what its series judged last is the series' shared row's)."""
    with psycopg.connect(db) as c:
        rows = c.execute(
            "SELECT s.rule, d.uid, s.status, s.episode_start, COALESCE(v.last_time, s.last_time),"
            " COALESCE(v.last_value, s.last_value)"
            " FROM alert_state s JOIN devices d ON d.id = s.device_id"
            " LEFT JOIN alert_state v ON v.rule = '*value' AND v.device_id = s.device_id AND v.metric_id = s.metric_id"
            " WHERE s.rule <> '*value'").fetchall()
    return {(r, u): (st, es, lt, lv) for r, u, st, es, lt, lv in rows}


def shared(db: str, device: str) -> list[tuple[Any, ...]]:
    """The device's series' shared rows of their value rules (rule '*value'): (metric, last_time, last_value)."""
    with psycopg.connect(db) as c:
        return c.execute(
            "SELECT m.name, s.last_time, s.last_value FROM alert_state s JOIN devices d ON d.id = s.device_id"
            " JOIN metrics m ON m.id = s.metric_id WHERE s.rule = '*value' AND d.uid = %s ORDER BY 1",
            (device,)).fetchall()


def outbox(db: str) -> list[dict[str, Any]]:
    with psycopg.connect(db) as c:
        cur = c.execute(
            "SELECT o.id, o.event_id, o.webhook, o.series, o.status, o.attempts, o.last_status, o.lease_until,"
            " o.last_error, e.status AS event_status FROM alert_outbox o JOIN alert_events e ON e.id = o.event_id"
            " ORDER BY o.id")
        names = [d.name for d in cur.description or ()]
        return [dict(zip(names, row, strict=True)) for row in cur.fetchall()]


def refused_and_not_in_flight(db: str) -> bool:
    """The one outbox row was attempted (the receiver is down) and its retry is recorded: no lease is
    held. A SIGKILL during an attempt would leave the lease (at least 30 s) to expire before the
    restarted dispatcher may claim the row again: correct, and slow."""
    rows = outbox(db)
    return len(rows) == 1 and rows[0]["attempts"] >= 1 and rows[0]["lease_until"] is None


def all_delivered(db: str, n: int) -> bool:
    rows = outbox(db)
    return len(rows) == n and all(r["status"] == "delivered" for r in rows)


# --- what the receiver got --------------------------------------------------------------------------


def when(text: str | None) -> datetime | None:
    return None if text is None else datetime.fromisoformat(text)


def seen(d: Delivery) -> tuple[Any, ...]:
    """(rule, device, status, value, event_time, starts_at, ends_at) of a delivered body."""
    b = d.json()
    return (b["rule"], b["device"], b["status"], b["value"], when(b["event_time"]), when(b["starts_at"]),
            when(b["ends_at"]))


def check_signatures(receiver: WebhookReceiver, secret: str) -> None:
    """Every request the receiver got, failed attempts included, carries a valid Standard Webhooks
    signature: by the project's verifier and by an independent HMAC."""
    got = receiver.requests()
    assert got, "the receiver got no request"
    for d in got:
        assert d.verify(secret) == d.webhook_id
        assert verify(secret, d.headers, d.body) == d.webhook_id
        assert signature_matches(secret, d), f"request {d.seq}: the signature is not HMAC-SHA256 of id.ts.body"
        assert d.headers["content-type"] == "application/json"
        assert d.path == "/hook"


def check_once_each(receiver: WebhookReceiver, db: str) -> list[Delivery]:
    """Exactly one successful delivery per outbox row, under webhook-id msg_<outbox id>, whose body
    is its event's (id evt_<event id>); the successful deliveries, in arrival order."""
    delivered = receiver.delivered()
    rows = outbox(db)
    assert sorted(d.webhook_id for d in delivered) == sorted(f"msg_{r['id']}" for r in rows)
    event_of = {f"msg_{r['id']}": r["event_id"] for r in rows}
    for d in delivered:
        assert d.json()["id"] == f"evt_{event_of[d.webhook_id]}"
    return delivered


def per_series(delivered: list[Delivery]) -> dict[tuple[str, str], list[tuple[Any, ...]]]:
    """The deliveries of each (rule, device), in arrival order: the order a series' events must keep."""
    out: dict[tuple[str, str], list[tuple[Any, ...]]] = {}
    for d in delivered:
        s = seen(d)
        out.setdefault((s[0], s[1]), []).append(s[2:])
    return out


# --- 1. a scripted series: hysteresis and `for` ------------------------------------------------------


def test_scripted_series_fire_and_resolve_exactly_once_with_hysteresis_and_for(make_stack: Any) -> None:
    s: Stack = make_stack(LEVEL_RULE + PM25_RULE)
    s.receiver.up()
    # level-high: above 5.0, clear 4.0, no `for`. Values between 4 and 5 are the hysteresis band: they
    # neither end a firing episode nor start one; 5.0 itself is not above 5.0.
    level = [(0, 3.0), (1, 5.5), (2, 4.5), (3, 5.8), (4, 4.1), (5, 5.1), (6, 3.9), (7, 4.8), (8, 4.2), (9, 5.0)]
    # pm25-high: above 55.5 for 2 minutes of event time, clear 50. A spike of one minute (1 -> 2) does
    # not fire; the condition held from minute 3 fires at minute 5, when two minutes have passed; 52 is
    # in the band (still firing), 49 resolves it.
    pm25 = [(0, 20.0), (1, 60.0), (2, 40.0), (3, 70.0), (4, 65.0), (4.5, 56.0), (5, 58.0), (6, 52.0), (7, 80.0),
            (8, 49.0), (9, 30.0)]
    for i in range(max(len(level), len(pm25))):
        if i < len(level):
            s.send("hn-lv-01", "level", *level[i])
        if i < len(pm25):
            s.send("hn-aq-01", "pm25", *pm25[i])

    at = s.at
    expected_events = [
        ("level-high", "hn-lv-01", "firing", at(1), at(1), 5.5, 5.0, True),
        ("level-high", "hn-lv-01", "resolved", at(6), at(1), 3.9, 5.0, True),
        ("pm25-high", "hn-aq-01", "firing", at(5), at(3), 58.0, 55.5, True),
        ("pm25-high", "hn-aq-01", "resolved", at(8), at(3), 49.0, 55.5, True),
    ]
    assert [e[1:] for e in events(s.db)] == expected_events
    assert states(s.db) == {
        ("level-high", "hn-lv-01"): ("ok", None, at(9), 5.0),
        ("pm25-high", "hn-aq-01"): ("ok", None, at(9), 30.0),
    }

    wait_until(lambda: all_delivered(s.db, 4) and len(s.receiver.delivered()) == 4, WAIT, "4 events delivered")
    delivered = check_once_each(s.receiver, s.db)
    assert len(s.receiver.requests()) == 4  # the receiver answered 200 at once: one request per event
    assert per_series(delivered) == {
        ("level-high", "hn-lv-01"): [("firing", 5.5, at(1), at(1), None), ("resolved", 3.9, at(6), at(1), at(6))],
        ("pm25-high", "hn-aq-01"): [("firing", 58.0, at(5), at(3), None), ("resolved", 49.0, at(8), at(3), at(8))],
    }
    check_signatures(s.receiver, s.secret)
    body = next(d.json() for d in delivered if seen(d)[:3] == ("pm25-high", "hn-aq-01", "firing"))
    assert body["severity"] == "warning"
    assert body["metric"] == "pm25"
    assert body["unit"] == "ug/m3"
    assert body["threshold"] == 55.5
    assert body["labels"] == {"team": "environment"}
    assert body["annotations"] == {"summary": "PM2.5 at hn-aq-01 is 58.0 ug/m3 (threshold 55.5)"}
    assert [r["attempts"] for r in outbox(s.db)] == [1, 1, 1, 1]
    assert s.ingest.metric("sensor_ingest_alert_events_total") == 4
    assert count(s.db, "readings") == len(level) + len(pm25)
    assert s.ingest.terminate() == 0


# --- 7. late data and `where` -------------------------------------------------------------------------


def test_late_reading_does_not_fire_and_where_selects_by_device_attribute(make_stack: Any, topic_prefix: str) -> None:
    s: Stack = make_stack(LEVEL_RULE + NO2_WHERE_RULE, extra=district_source(topic_prefix))
    s.receiver.up()
    at = s.at
    # where = { district = "hoan-kiem" }: the attribute comes from the topic capture {district}.
    s.send("hn-w-01", "no2", 1, 150.0, topic=f"{topic_prefix}/d/hoan-kiem/hn-w-01/up")
    s.send("hn-w-02", "no2", 1, 150.0, topic=f"{topic_prefix}/d/cau-giay/hn-w-02/up")
    s.send("hn-w-03", "no2", 1, 150.0)  # no district at all

    # Late: the series was last evaluated at minute 5; a breaching reading of minute 2, committed
    # afterwards in a transaction of its own, is stored but does not rewrite history.
    s.send("hn-lv-02", "level", 5, 3.0)
    s.send("hn-lv-02", "level", 2, 9.0)
    with psycopg.connect(s.db) as c:
        stored = c.execute("SELECT r.value FROM readings r JOIN devices d ON d.id = r.device_id"
                           " WHERE d.uid = 'hn-lv-02' AND r.time = %s", (at(2),)).fetchall()
    assert stored == [(9.0,)]
    # The rule never left ok there: no row of its own; its series' shared row judged up to minute 5.
    assert ("level-high", "hn-lv-02") not in states(s.db)
    assert shared(s.db, "hn-lv-02") == [("level", at(5), 3.0)]
    assert [e[1:4] for e in events(s.db)] == [("no2-hoan-kiem", "hn-w-01", "firing")]
    # A newer breach of the same series does fire: the rule was live all along.
    s.send("hn-lv-02", "level", 7, 9.0)

    assert [e[1:] for e in events(s.db)] == [
        ("no2-hoan-kiem", "hn-w-01", "firing", at(1), at(1), 150.0, 100.0, True),
        ("level-high", "hn-lv-02", "firing", at(7), at(7), 9.0, 5.0, True),
    ]
    assert set(states(s.db)) == {("no2-hoan-kiem", "hn-w-01"), ("level-high", "hn-lv-02")}
    with psycopg.connect(s.db) as c:
        rows = c.execute("SELECT uid, attributes FROM devices WHERE uid LIKE 'hn-w-%'").fetchall()
    attrs: dict[str, Any] = dict(rows)
    assert attrs == {"hn-w-01": {"district": "hoan-kiem"}, "hn-w-02": {"district": "cau-giay"}, "hn-w-03": {}}

    wait_until(lambda: all_delivered(s.db, 2) and len(s.receiver.delivered()) == 2, WAIT, "2 events delivered")
    delivered = check_once_each(s.receiver, s.db)
    assert per_series(delivered) == {
        ("no2-hoan-kiem", "hn-w-01"): [("firing", 150.0, at(1), at(1), None)],
        ("level-high", "hn-lv-02"): [("firing", 9.0, at(7), at(7), None)],
    }
    no2 = next(d.json() for d in delivered if d.json()["rule"] == "no2-hoan-kiem")
    assert no2["device_attributes"] == {"district": "hoan-kiem"}
    check_signatures(s.receiver, s.secret)
    assert s.ingest.terminate() == 0


# --- 2. 500, then 200 -----------------------------------------------------------------------------------


def test_receiver_answering_500_then_200_gets_the_event_once_with_a_valid_signature(make_stack: Any) -> None:
    s: Stack = make_stack(LEVEL_RULE)
    s.receiver.answer(500)  # then the default, 200
    s.receiver.up()
    s.send("hn-lv-01", "level", 1, 6.0)
    wait_until(lambda: all_delivered(s.db, 1), WAIT, "the event delivered")

    got = s.receiver.requests()
    assert [d.status for d in got] == [500, 200]
    (row,) = outbox(s.db)
    assert {d.webhook_id for d in got} == {f"msg_{row['id']}"}  # the retry is the same message
    assert got[0].body == got[1].body  # the very bytes that were signed, both times
    assert (row["status"], row["attempts"], row["last_status"]) == ("delivered", 2, 200)
    check_once_each(s.receiver, s.db)
    assert seen(got[1]) == ("level-high", "hn-lv-01", "firing", 6.0, s.at(1), s.at(1), None)
    check_signatures(s.receiver, s.secret)
    assert s.ingest.metric("sensor_ingest_webhook_deliveries_total") == 2  # one retry, one delivered
    assert s.ingest.terminate() == 0


# --- 3. receiver down for a while -----------------------------------------------------------------------


def test_receiver_down_for_a_while_loses_nothing(make_stack: Any) -> None:
    s: Stack = make_stack(LEVEL_RULE)  # the receiver is down: connections to its port are refused
    devices = [f"hn-lv-1{i}" for i in range(3)]
    for dev in devices:
        s.send(dev, "level", 1, 6.0)
        s.send(dev, "level", 2, 3.0)
    assert len(events(s.db)) == 6

    def retried_while_down() -> bool:
        rows = outbox(s.db)
        firing = [r for r in rows if r["event_status"] == "firing"]
        return len(rows) == 6 and all(r["attempts"] >= 4 for r in firing)

    # Four refused attempts of every firing event: the outage outlasted several backoff rounds.
    wait_until(retried_while_down, WAIT, "every firing delivery attempted 4 times while the receiver is down")
    rows = outbox(s.db)
    assert all(r["status"] == "pending" for r in rows)
    assert [r["attempts"] for r in rows if r["event_status"] == "resolved"] == [0, 0, 0]  # they wait their turn
    assert s.receiver.requests() == []

    s.receiver.up()
    wait_until(lambda: all_delivered(s.db, 6), WAIT, "every event delivered after the receiver came back")
    delivered = check_once_each(s.receiver, s.db)
    assert len(s.receiver.requests()) == 6
    at = s.at
    assert per_series(delivered) == {
        ("level-high", dev): [("firing", 6.0, at(1), at(1), None), ("resolved", 3.0, at(2), at(1), at(2))]
        for dev in devices
    }
    check_signatures(s.receiver, s.secret)
    assert s.ingest.terminate() == 0


# --- 4. SIGKILL between commit and delivery ------------------------------------------------------------


def test_sigkill_between_commit_and_delivery_delivers_after_restart_once(make_stack: Any) -> None:
    s: Stack = make_stack(LEVEL_RULE)  # receiver down: the event is committed and cannot be delivered
    s.send("hn-lv-01", "level", 1, 6.0)
    wait_until(lambda: refused_and_not_in_flight(s.db), WAIT, "a refused delivery attempt, recorded")
    s.ingest.kill()
    (row,) = outbox(s.db)
    assert row["status"] == "pending"
    assert s.receiver.requests() == []

    s.receiver.up()
    s.ingest.start()
    wait_until(lambda: all_delivered(s.db, 1), WAIT, "the event delivered by the restarted service")
    got = s.receiver.requests()
    assert [(d.status, d.webhook_id) for d in got] == [(200, f"msg_{row['id']}")]
    check_once_each(s.receiver, s.db)
    assert seen(got[0]) == ("level-high", "hn-lv-01", "firing", 6.0, s.at(1), s.at(1), None)
    check_signatures(s.receiver, s.secret)
    assert [e[1:4] for e in events(s.db)] == [("level-high", "hn-lv-01", "firing")]
    assert s.ingest.terminate() == 0


# --- 5. resolved never overtakes firing -----------------------------------------------------------------


def test_resolved_never_overtakes_its_firing_event(make_stack: Any) -> None:
    s: Stack = make_stack(LEVEL_RULE)
    s.receiver.default = 500  # every attempt fails until the test says otherwise
    s.receiver.up()
    s.send("hn-lv-01", "level", 1, 6.0)
    wait_until(lambda: len(s.receiver.requests()) >= 1, WAIT, "the firing event's first (failed) attempt")
    s.send("hn-lv-01", "level", 2, 3.0)
    assert [e[3] for e in events(s.db)] == ["firing", "resolved"]
    firing_id, resolved_id = (f"msg_{r['id']}" for r in outbox(s.db))
    # Two more failed attempts of the firing event while the resolved one is committed and due.
    n = len(s.receiver.requests())
    wait_until(lambda: len(s.receiver.requests()) >= n + 2, WAIT, "two more attempts after the resolved commit")
    assert {d.webhook_id for d in s.receiver.requests()} == {firing_id}

    s.receiver.default = 200
    wait_until(lambda: all_delivered(s.db, 2), WAIT, "both events delivered")
    got = s.receiver.requests()
    ids = [d.webhook_id for d in got]
    # Every attempt of the firing event, the last one answered 200, then the resolved event, once.
    assert ids == [firing_id] * (len(got) - 1) + [resolved_id]
    assert [d.status for d in got[-2:]] == [200, 200]
    assert all(d.status == 500 for d in got[:-2])
    assert len(got) >= 5
    check_once_each(s.receiver, s.db)
    assert per_series(s.receiver.delivered()) == {
        ("level-high", "hn-lv-01"): [("firing", 6.0, s.at(1), s.at(1), None),
                                     ("resolved", 3.0, s.at(2), s.at(1), s.at(2))],
    }
    check_signatures(s.receiver, s.secret)
    assert s.ingest.terminate() == 0


# --- 6. MQTT redelivery after a SIGKILL -----------------------------------------------------------------


def test_redelivered_messages_after_sigkill_do_not_fire_again(make_stack: Any, broker: Mosquitto,
                                                               topic_prefix: str) -> None:
    """The breaching message is committed (readings, alert state, event, outbox row) while its
    PUBACK cannot reach the broker: a lock on `readings` holds the batch until a recording proxy
    between service and broker has frozen the connection. The service is then SIGKILLed, so the
    broker still holds the message unacknowledged and redelivers it (DUP) to the restarted service.
    The redelivered copy is a duplicate reading, not a new one: no second firing event."""
    with FaultProxy(broker.port, record_mqtt=True) as proxy:
        s: Stack = make_stack(LEVEL_RULE, mqtt_url=f"mqtt://127.0.0.1:{proxy.port}")  # receiver down for now
        s.send("hn-lv-01", "level", 0, 3.0)  # the series exists and is ok
        first = max(p.conn for p in proxy.packets())
        payload = native("hn-lv-01", s.at(1).isoformat(), {"level": 6.0})
        with psycopg.connect(s.db) as locker:
            locker.execute("LOCK TABLE readings IN EXCLUSIVE MODE")
            s.pub.publish_all([(f"{topic_prefix}/hn-lv-01/up", payload)])
            wait_until(lambda: waiting_on_a_lock(s.db), WAIT, "the batch's write to wait on the lock")
            proxy.mode = "blackhole"  # from now on nothing the service sends reaches the broker
            locker.rollback()
        wait_until(lambda: len(events(s.db)) == 1, WAIT, "the firing event committed")
        wait_until(lambda: refused_and_not_in_flight(s.db), WAIT, "a refused delivery attempt, recorded")
        s.ingest.kill()
        acked_first = [p for p in proxy.packets(PUBACK, conn=first, direction="up")]
        assert len(acked_first) == 1  # the first message's; none for the breaching one
        assert [e[1:4] for e in events(s.db)] == [("level-high", "hn-lv-01", "firing")]

        proxy.cut()
        proxy.mode = "pass"
        s.receiver.up()
        s.ingest.start()

        def redelivered_and_acked() -> bool:
            packets = proxy.packets()
            dup = {(p.conn, p.packet_id) for p in packets
                   if p.type == PUBLISH and p.direction == "down" and p.conn > first and p.dup and p.payload == payload}
            return any(p.type == PUBACK and p.direction == "up" and (p.conn, p.packet_id) in dup for p in packets)

        wait_until(redelivered_and_acked, WAIT, "the breaching message redelivered (DUP) and acknowledged")
        wait_until(lambda: all_delivered(s.db, 1), WAIT, "the firing event delivered")
        assert [e[1:] for e in events(s.db)] == [("level-high", "hn-lv-01", "firing", s.at(1), s.at(1), 6.0, 5.0, True)]
        assert states(s.db)[("level-high", "hn-lv-01")] == ("firing", s.at(1), s.at(1), 6.0)
        assert count(s.db, "readings") == 2
        got = s.receiver.requests()
        assert [d.status for d in got] == [200]
        check_once_each(s.receiver, s.db)
        assert seen(got[0]) == ("level-high", "hn-lv-01", "firing", 6.0, s.at(1), s.at(1), None)
        check_signatures(s.receiver, s.secret)
        assert s.ingest.metric("sensor_ingest_alert_events_total") == 0  # the restarted process recorded none
        assert s.ingest.terminate() == 0
