"""The writer's alert stage (ingest.alerts.stage) on a real TimescaleDB: a real Writer, the state,
event and outbox rows written in the batch's transaction, the row lock, the NOTIFY at commit."""

from __future__ import annotations

import asyncio
import json
import secrets
from collections import Counter
from collections.abc import AsyncIterator, Awaitable, Callable
from datetime import UTC, datetime, timedelta
from typing import Any

import asyncpg
import pytest
import pytest_asyncio

from ingest.alerts.body import StandardBody
from ingest.alerts.model import Rule, Webhook
from ingest.alerts.runtime import AlertRuntime, RuleSet
from ingest.alerts.stage import NOTIFY_CHANNEL, AlertStage
from ingest.model import FLAG_SUSPECT, RawMessage, Reading, Rejection
from ingest.process import Outcome
from ingest.settings import DatabaseSettings
from ingest.store.pool import create_pool
from ingest.store.writer import Writer

T0 = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)
NOW = T0 + timedelta(minutes=10)  # the stage's clock: every event below is young unless a test says otherwise
UNIT = "µg/m³"
HOOKS = {
    "city-ops": Webhook("city-ops", "http://127.0.0.1:9/hook", secrets.token_bytes(24)),
    "backup": Webhook("backup", "http://127.0.0.1:9/other", secrets.token_bytes(24)),
}


def pm25(**changes: Any) -> Rule:
    base: dict[str, Any] = {
        "name": "pm25-high", "metric": "pm2_5", "kind": "above", "threshold": 55.5, "clear": 50.0,
        "severity": "critical", "webhooks": ("city-ops", "backup"),
        "summary": "PM2.5 at {device} is {value} {unit} (threshold {threshold})",
        "labels": (("team", "environment"),), "devices": ("hn-aq-*",),
    }
    return Rule(**{**base, **changes})


def stage(*rules: Rule, clock: Callable[[], datetime] = lambda: NOW, max_notify_age: float = 3600.0) -> AlertStage:
    return AlertStage(AlertRuntime(RuleSet(rules, dict(HOOKS), max_notify_age=max_notify_age)), clock=clock)


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def reading(device: str, minutes: float, value: float, *, flags: int = 0) -> Reading:
    return Reading(device, "pm2_5", at(minutes), value, UNIT, flags)


def outcome(i: int, readings: list[Reading], *, redelivered: bool = False, rejection: Rejection | None = None,
            attributes: dict[str, str] | None = None) -> Outcome:
    msg = RawMessage(f"city/d{i}/up", b'{"x": %d}' % i, T0, 1, i, 1, i, redelivered)
    return Outcome(msg, "native", readings, rejection, attributes=attributes)


@pytest_asyncio.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(DatabaseSettings(url=database_url))
    yield p
    await p.close()


async def ids(pool: asyncpg.Pool, device: str) -> tuple[int, int]:
    d = await pool.fetchval("SELECT id FROM devices WHERE uid = $1", device)
    m = await pool.fetchval("SELECT id FROM metrics WHERE name = 'pm2_5'")
    assert isinstance(d, int)
    assert isinstance(m, int)
    return d, m


async def states(pool: asyncpg.Pool) -> list[tuple[Any, ...]]:
    """The rule's rows (those of a series whose state has left ok at least once)."""
    return [tuple(r) for r in await pool.fetch(
        "SELECT rule, device_id, metric_id, status, episode_start, last_time, last_value FROM alert_state "
        "WHERE rule <> '*value' ORDER BY rule, device_id, metric_id")]


async def shared(pool: asyncpg.Pool) -> list[tuple[Any, ...]]:
    """The series' shared rows of their value rules (rule '*value'): (device, metric, last_time, last_value)."""
    return [tuple(r) for r in await pool.fetch(
        "SELECT device_id, metric_id, last_time, last_value FROM alert_state WHERE rule = '*value' "
        "ORDER BY device_id, metric_id")]


async def events(pool: asyncpg.Pool) -> list[tuple[Any, ...]]:
    return [tuple(r) for r in await pool.fetch(
        "SELECT id, rule, device_id, metric_id, status, event_time, starts_at, value, threshold, severity, notified "
        "FROM alert_events ORDER BY id")]


async def outbox(pool: asyncpg.Pool) -> list[tuple[Any, ...]]:
    return [(r[0], r[1], r[2], json.loads(r[3]), r[4], r[5]) for r in await pool.fetch(
        "SELECT event_id, webhook, series, body, status, attempts FROM alert_outbox ORDER BY webhook, id")]


async def counts(pool: asyncpg.Pool) -> tuple[int, int, int, int]:
    """readings, the rules' alert_state rows (not the series' shared '*value' rows), events, outbox."""
    row = await pool.fetchrow(
        "SELECT (SELECT count(*) FROM readings), (SELECT count(*) FROM alert_state WHERE rule <> '*value'), "
        "(SELECT count(*) FROM alert_events), (SELECT count(*) FROM alert_outbox)")
    assert row is not None
    return row[0], row[1], row[2], row[3]


def body(event_id: int, status: str, device: str, value: float, starts: datetime, when: datetime,
         attributes: dict[str, Any]) -> dict[str, Any]:
    def iso(t: datetime) -> str:
        return t.astimezone(UTC).strftime("%Y-%m-%dT%H:%M:%SZ")

    return {
        "id": f"evt_{event_id}", "status": status, "rule": "pm25-high", "severity": "critical", "device": device,
        "metric": "pm2_5", "value": value, "unit": UNIT, "threshold": 55.5, "starts_at": iso(starts),
        "ends_at": iso(when) if status == "resolved" else None, "event_time": iso(when),
        "labels": {"team": "environment"},
        "annotations": {"summary": f"PM2.5 at {device} is {value} {UNIT} (threshold 55.5)"},
        "device_attributes": attributes,
    }


@pytest.mark.asyncio
async def test_a_breach_fires_once_with_its_outbox_rows_and_resolves_once(pool: asyncpg.Pool) -> None:
    writer = Writer(pool, alerts=stage(pm25()))
    first = await writer.write([
        outcome(1, [reading("hn-aq-1", 0, 40.0), reading("hn-aq-1", 1, 60.5)], attributes={"district": "hoan-kiem"}),
    ])
    d, m = await ids(pool, "hn-aq-1")
    assert first.alerts is not None
    assert (first.readings, first.alerts.events, first.alerts.notified, first.alerts.outbox, first.alerts.late) == (
        2, Counter({("pm25-high", "firing"): 1}), 1, 2, 0)
    assert await states(pool) == [("pm25-high", d, m, "firing", at(1), at(1), 60.5)]
    [(eid, *fired)] = await events(pool)
    assert fired == ["pm25-high", d, m, "firing", at(1), at(1), 60.5, 55.5, "critical", True]
    expected = body(eid, "firing", "hn-aq-1", 60.5, at(1), at(1), {"district": "hoan-kiem"})
    series = f"pm25-high\x1f{d}\x1f{m}"
    assert await outbox(pool) == [(eid, "backup", series, expected, "pending", 0),
                                  (eid, "city-ops", series, expected, "pending", 0)]
    StandardBody.model_validate(expected)

    # Inside the band (50, 55.5]: still firing, nothing new; 49 ends the episode, once.
    await writer.write([outcome(2, [reading("hn-aq-1", 2, 52.0), reading("hn-aq-1", 3, 58.0)])])
    assert await counts(pool) == (4, 1, 1, 2)
    second = await writer.write([outcome(3, [reading("hn-aq-1", 4, 49.0), reading("hn-aq-1", 5, 54.0)])])
    assert second.alerts is not None
    assert (second.alerts.events, second.alerts.outbox) == (Counter({("pm25-high", "resolved"): 1}), 2)
    assert await states(pool) == [("pm25-high", d, m, "ok", None, at(5), 54.0)]
    [_, (rid, *resolved)] = await events(pool)
    assert resolved == ["pm25-high", d, m, "resolved", at(4), at(1), 49.0, 55.5, "critical", True]
    ended = body(rid, "resolved", "hn-aq-1", 49.0, at(1), at(4), {"district": "hoan-kiem"})
    rows = await outbox(pool)
    assert rows[1] == (rid, "backup", series, ended, "pending", 0)
    assert rows[3] == (rid, "city-ops", series, ended, "pending", 0)
    assert await counts(pool) == (6, 1, 2, 4)


@pytest.mark.asyncio
async def test_the_same_batch_again_creates_no_new_event(pool: asyncpg.Pool) -> None:
    writer = Writer(pool, alerts=stage(pm25()))
    batch = [outcome(1, [reading("hn-aq-1", 1, 60.0)]), outcome(2, [reading("hn-aq-1", 2, 40.0)])]
    await writer.write(batch)
    assert await counts(pool) == (2, 1, 2, 4)  # fired and resolved
    before = await pool.fetch("SELECT * FROM alert_state")
    # Redelivered (all duplicates: the conflict path), then as new messages (the COPY conflicts).
    again = await writer.write([outcome(i + 1, o.readings, redelivered=True) for i, o in enumerate(batch)])
    assert (again.readings, again.duplicates, again.conflict_path, again.alerts) == (0, 2, True, None)
    fresh = await writer.write(batch)
    assert (fresh.readings, fresh.duplicates, fresh.conflict_path, fresh.alerts) == (0, 2, True, None)
    assert await counts(pool) == (2, 1, 2, 4)
    assert await pool.fetch("SELECT * FROM alert_state") == before  # not even updated_at moved
    # A redelivered batch with one new reading evaluates that one only.
    mixed = await writer.write([outcome(1, batch[0].readings, redelivered=True),
                                outcome(3, [reading("hn-aq-1", 3, 70.0)], redelivered=True)])
    assert mixed.alerts is not None
    assert (mixed.readings, mixed.duplicates, mixed.alerts.events) == (1, 1, Counter({("pm25-high", "firing"): 1}))
    assert await counts(pool) == (3, 1, 3, 6)


@pytest.mark.asyncio
async def test_a_batch_written_again_after_its_copy_conflicts_creates_its_new_series_in_order(
        pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    # The COPY meets a stored reading: the transaction rolls back, with the alert_state rows it
    # created. The stage forgets having created them, so that the batch written again creates them
    # before its sorted lock, not after it as rows gone missing (out of order: a deadlock risk).
    st = stage(pm25())
    writer = Writer(pool, alerts=st)
    await writer.write([outcome(1, [reading("hn-aq-1", 1, 40.0)])])
    calls: list[list[Any]] = []
    ensure = st._ensure

    async def recorded(conn: Any, keys: list[Any]) -> None:
        calls.append(list(keys))
        await ensure(conn, keys)

    monkeypatch.setattr(st, "_ensure", recorded)
    again = await writer.write([outcome(2, [reading("hn-aq-1", 1, 40.0), reading("hn-aq-2", 1, 41.0)])])
    assert (again.conflict_path, again.readings, again.duplicates) == (True, 1, 1)
    d2, m = await ids(pool, "hn-aq-2")
    assert calls == [[("*value", d2, m)], [("*value", d2, m)]]  # each attempt, before its lock
    assert await pool.fetchval("SELECT count(*) FROM alert_state WHERE device_id = $1", d2) == 1


@pytest.mark.asyncio
async def test_a_conflicting_value_is_not_evaluated(pool: asyncpg.Pool) -> None:
    writer = Writer(pool, alerts=stage(pm25()))
    await writer.write([outcome(1, [reading("hn-aq-1", 1, 40.0)])])
    clash = await writer.write([outcome(2, [reading("hn-aq-1", 1, 90.0)])])
    assert (clash.readings, clash.reasons, clash.alerts) == (0, Counter({"conflict": 1}), None)
    assert await counts(pool) == (1, 0, 0, 0)  # the rule never left ok: no row of its own
    d, m = await ids(pool, "hn-aq-1")
    assert await shared(pool) == [(d, m, at(1), 40.0)]


@pytest.mark.asyncio
async def test_a_reading_older_than_last_time_is_not_evaluated(pool: asyncpg.Pool) -> None:
    # The clock is past every reading here by more than alerts.lateness: each is judged as it comes.
    writer = Writer(pool, alerts=stage(pm25(), clock=lambda: at(20)))
    await writer.write([outcome(1, [reading("hn-aq-1", 10, 40.0)])])
    d, m = await ids(pool, "hn-aq-1")
    late = await writer.write([outcome(2, [reading("hn-aq-1", 5, 90.0), reading("hn-aq-1", 9.5, 95.0)])])
    assert late.alerts is not None
    assert (late.readings, late.alerts.late, late.alerts.events) == (2, 2, Counter())
    assert await shared(pool) == [(d, m, at(10), 40.0)]
    assert await counts(pool) == (3, 0, 0, 0)
    # The series goes on: the next newer breach fires.
    await writer.write([outcome(3, [reading("hn-aq-1", 11, 90.0)])])
    assert await states(pool) == [("pm25-high", d, m, "firing", at(11), at(11), 90.0)]
    assert await counts(pool) == (4, 1, 1, 2)


@pytest.mark.asyncio
async def test_an_event_older_than_max_notify_age_is_recorded_not_notified(database_url: str,
                                                                          pool: asyncpg.Pool) -> None:
    # The clock says T0 + 2 h; max_notify_age = 1 h: an event at T0 + 1 min is history, one at T0 + 61
    # min is news (the horizon, T0 + 60 min, is inclusive: a third device fires exactly there).
    listener = await asyncpg.connect(database_url)
    heard: list[str] = []
    await listener.add_listener(NOTIFY_CHANNEL, lambda *args: heard.append(args[3]))
    try:
        writer = Writer(pool, alerts=stage(pm25(), clock=lambda: T0 + timedelta(hours=2)))
        old = await writer.write([outcome(1, [reading("hn-aq-1", 1, 60.0)])])
        assert old.alerts is not None
        assert (old.alerts.events, old.alerts.notified, old.alerts.outbox) == (
            Counter({("pm25-high", "firing"): 1}), 0, 0)
        d1, m = await ids(pool, "hn-aq-1")
        assert [e[1:] for e in await events(pool)] == [
            ("pm25-high", d1, m, "firing", at(1), at(1), 60.0, 55.5, "critical", False)]
        assert await states(pool) == [("pm25-high", d1, m, "firing", at(1), at(1), 60.0)]
        assert await outbox(pool) == []
        await asyncio.sleep(0.3)
        assert heard == []  # no outbox row, no NOTIFY
        mixed = await writer.write([outcome(2, [reading("hn-aq-2", 61, 60.0), reading("hn-aq-3", 60, 60.0),
                                                reading("hn-aq-4", 59.99, 60.0)])])
        assert mixed.alerts is not None
        assert (mixed.alerts.notified, mixed.alerts.outbox) == (2, 4)
        notified = {(await pool.fetchval("SELECT uid FROM devices WHERE id = $1", e[2])): e[10]
                    for e in (await events(pool))[1:]}
        assert notified == {"hn-aq-2": True, "hn-aq-3": True, "hn-aq-4": False}
        assert sorted(b["device"] for _, _, _, b, _, _ in await outbox(pool)) == [
            "hn-aq-2", "hn-aq-2", "hn-aq-3", "hn-aq-3"]
    finally:
        await listener.close()


@pytest.mark.asyncio
async def test_a_rule_with_where_selects_only_devices_with_that_attribute(pool: asyncpg.Pool) -> None:
    rule = pm25(where=(("district", "hoan-kiem"),))
    writer = Writer(pool, alerts=stage(rule))
    # hn-aq-4 gets its attribute in the devices table (an operator), not from a topic capture.
    await writer.write([outcome(9, [reading("hn-aq-4", 0, 10.0)])])
    await pool.execute("""UPDATE devices SET attributes = '{"district": "hoan-kiem", "floor": 3}' """
                       "WHERE uid = 'hn-aq-4'")
    result = await writer.write([
        outcome(1, [reading("hn-aq-1", 1, 60.0)], attributes={"district": "hoan-kiem"}),
        outcome(2, [reading("hn-aq-2", 1, 60.0)], attributes={"district": "ba-dinh"}),
        outcome(3, [reading("hn-aq-3", 1, 60.0)]),
        outcome(4, [reading("sg-aq-1", 1, 60.0)], attributes={"district": "hoan-kiem"}),  # not in the globs
        outcome(5, [reading("hn-aq-4", 1, 60.0)]),
    ])
    assert result.alerts is not None
    assert result.alerts.events == Counter({("pm25-high", "firing"): 2})
    d1, m = await ids(pool, "hn-aq-1")
    d4, _ = await ids(pool, "hn-aq-4")
    assert [s[:4] for s in await states(pool)] == sorted([("pm25-high", d1, m, "firing"),
                                                          ("pm25-high", d4, m, "firing")])
    bodies = {b["device"]: b["device_attributes"] for _, _, _, b, _, _ in await outbox(pool)}
    assert bodies == {"hn-aq-1": {"district": "hoan-kiem"}, "hn-aq-4": {"district": "hoan-kiem", "floor": 3}}


@pytest.mark.asyncio
async def test_a_suspect_reading_is_evaluated(pool: asyncpg.Pool) -> None:
    writer = Writer(pool, alerts=stage(pm25()))
    await writer.write([outcome(1, [reading("hn-aq-1", 1, 900.0, flags=FLAG_SUSPECT)])])
    assert [e[4:8] for e in await events(pool)] == [("firing", at(1), at(1), 900.0)]


async def _refuse_rejections(pool: asyncpg.Pool) -> None:
    await pool.execute("""
        CREATE FUNCTION refuse() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN
            RAISE EXCEPTION 'refused after % state, % event and % outbox rows',
                (SELECT count(*) FROM alert_state), (SELECT count(*) FROM alert_events),
                (SELECT count(*) FROM alert_outbox);
        END $$;
        CREATE TRIGGER refuse BEFORE INSERT ON rejected_messages FOR EACH ROW EXECUTE FUNCTION refuse();
    """)


@pytest.mark.asyncio
async def test_a_rolled_back_batch_leaves_no_state_event_or_outbox_row(database_url: str, pool: asyncpg.Pool) -> None:
    await _refuse_rejections(pool)
    listener = await asyncpg.connect(database_url)
    heard: list[str] = []
    await listener.add_listener(NOTIFY_CHANNEL, lambda *args: heard.append(args[3]))
    try:
        writer = Writer(pool, alerts=stage(pm25()))
        batch = [outcome(1, [reading("hn-aq-1", 1, 60.0)]), outcome(2, [reading("hn-aq-2", 1, 70.0)])]
        # The rejection row is written after the stage ran: the trigger sees the stage's rows, then
        # fails the transaction.
        with pytest.raises(asyncpg.RaiseError, match="refused after 4 state, 2 event and 4 outbox rows"):
            await writer.write([*batch, outcome(3, [], rejection=Rejection("malformed", "cut short"))])
        assert await counts(pool) == (0, 0, 0, 0)
        await asyncio.sleep(0.3)
        assert heard == []
        # The same messages, redelivered without the refused one, evaluate again and fire once each.
        again = await writer.write([outcome(i + 1, o.readings, redelivered=True) for i, o in enumerate(batch)])
        assert again.alerts is not None
        assert again.alerts.events == Counter({("pm25-high", "firing"): 2})
        assert await counts(pool) == (2, 2, 2, 4)
        await _heard(heard, [""])
    finally:
        await listener.close()


async def _eventually(probe: Callable[[], Awaitable[bool]]) -> None:
    """Wait up to 10 s for ``probe`` to hold."""
    for _ in range(500):
        if await probe():
            return
        await asyncio.sleep(0.02)
    raise AssertionError("not reached within 10 s")


async def _heard(heard: list[Any], expected: list[Any]) -> None:
    async def probe() -> bool:
        return heard == expected

    await _eventually(probe)


async def _waiting(pool: asyncpg.Pool, names: list[str], on: str) -> int:
    """How many backends of these application names wait for a lock of these kinds."""
    n = await pool.fetchval("SELECT count(*) FROM pg_stat_activity WHERE application_name = ANY($1::text[]) "
                            "AND wait_event_type = 'Lock' AND wait_event = ANY($2::text[])", names, on.split(","))
    assert isinstance(n, int)
    return n


async def _is(count: Awaitable[int], expected: int) -> bool:
    return await count == expected


@pytest.mark.asyncio
async def test_two_writers_on_one_series_fire_exactly_once(database_url: str, pool: asyncpg.Pool) -> None:
    url = DatabaseSettings(url=database_url)
    pool_a = await create_pool(url, application_name="alerts-writer-a")
    pool_b = await create_pool(url, application_name="alerts-writer-b")
    gate = await asyncpg.connect(database_url)
    try:
        a = Writer(pool_a, alerts=stage(pm25()))
        b = Writer(pool_b, alerts=stage(pm25()))
        await a.write([outcome(1, [reading("hn-aq-1", 0, 40.0)])])  # the state row exists: only its lock serialises
        d, m = await ids(pool, "hn-aq-1")
        # Hold whichever writer saves the state first, after it read it and before it writes it: with the
        # row lock, the other waits for that lock; without it, the other would read "ok" meanwhile, reach
        # the same hold, and fire too.
        await pool.execute("""
            CREATE FUNCTION hold() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN PERFORM pg_advisory_xact_lock_shared(4242); RETURN NEW; END $$;
            CREATE TRIGGER hold BEFORE UPDATE ON alert_state FOR EACH ROW EXECUTE FUNCTION hold();
        """)
        await gate.execute("SELECT pg_advisory_lock(4242)")
        wa = asyncio.ensure_future(a.write([outcome(2, [reading("hn-aq-1", 1, 100.0)])]))
        wb = asyncio.ensure_future(b.write([outcome(3, [reading("hn-aq-1", 2, 100.0)])]))
        names = ["alerts-writer-a", "alerts-writer-b"]
        # One waits at the hold, the other for the first one's row lock (tuple or transactionid).
        await _eventually(lambda: _is(_waiting(pool, names, "advisory,tuple,transactionid"), 2))
        assert await _waiting(pool, names, "advisory") == 1
        await gate.execute("SELECT pg_advisory_unlock(4242)")
        ra, rb = await asyncio.gather(wa, wb)
        assert ra.alerts is not None
        assert rb.alerts is not None
        fired = ra.alerts.events + rb.alerts.events
        assert fired == Counter({("pm25-high", "firing"): 1})
        assert ra.alerts.late + rb.alerts.late in (0, 1)
        [(_, *event)] = await events(pool)
        assert event[:4] == ["pm25-high", d, m, "firing"]
        assert await states(pool) == [("pm25-high", d, m, "firing", event[5], at(2), 100.0)]
        assert await counts(pool) == (3, 1, 1, 2)
    finally:
        await gate.close()
        await pool_a.close()
        await pool_b.close()


@pytest.mark.asyncio
async def test_notify_is_heard_only_after_the_commit(database_url: str, pool: asyncpg.Pool) -> None:
    # A rejection row in the batch is written after the stage (and its NOTIFY); a trigger holds it
    # there until the test lets go.
    await pool.execute("""
        CREATE FUNCTION hold() RETURNS trigger LANGUAGE plpgsql AS $$
        BEGIN PERFORM pg_advisory_xact_lock_shared(777); RETURN NEW; END $$;
        CREATE TRIGGER hold BEFORE INSERT ON rejected_messages FOR EACH ROW EXECUTE FUNCTION hold();
    """)
    writing = await create_pool(DatabaseSettings(url=database_url), application_name="alerts-notify-writer")
    listener = await asyncpg.connect(database_url)
    gate = await asyncpg.connect(database_url)
    heard: list[tuple[str, str]] = []
    try:
        await listener.add_listener(NOTIFY_CHANNEL, lambda _c, _p, channel, payload: heard.append((channel, payload)))
        await gate.execute("SELECT pg_advisory_lock(777)")
        writer = Writer(writing, alerts=stage(pm25()))
        task = asyncio.ensure_future(writer.write([
            outcome(1, [reading("hn-aq-1", 1, 60.0)]),
            outcome(2, [], rejection=Rejection("malformed", "cut short")),
        ]))
        await _eventually(lambda: _is(_waiting(pool, ["alerts-notify-writer"], "advisory"), 1))
        # The stage has run (its rows are there, uncommitted) and NOTIFY was sent inside the transaction.
        assert await counts(pool) == (0, 0, 0, 0)
        await asyncio.sleep(0.5)
        assert heard == []
        await gate.execute("SELECT pg_advisory_unlock(777)")
        result = await task
        assert result.alerts is not None
        assert (result.alerts.outbox, result.rejections) == (2, 1)
        await _heard(heard, [(NOTIFY_CHANNEL, "")])
        assert await counts(pool) == (1, 1, 1, 2)
        await asyncio.sleep(0.2)
        assert heard == [(NOTIFY_CHANNEL, "")]  # one NOTIFY per transaction, not one per row
    finally:
        await listener.close()
        await gate.close()
        await writing.close()


@pytest.mark.asyncio
async def test_a_reload_during_the_stage_keeps_one_rule_set_for_the_batch(database_url: str,
                                                                          pool: asyncpg.Pool) -> None:
    # The rule set is replaced while the stage waits for the database (here: for the devices table,
    # locked by another transaction). The batch must keep the set it started with: rules of the new set
    # with webhooks of the old one would record a notified event that no outbox row ever delivers.
    writing = await create_pool(DatabaseSettings(url=database_url), application_name="alerts-reload-writer")
    gate = await asyncpg.connect(database_url)
    try:
        alerts = stage(pm25())
        writer = Writer(writing, alerts=alerts)
        await writer.write([outcome(1, [reading("hn-aq-1", 0, 10.0)])])  # the device and metric ids are cached
        newer = RuleSet((pm25(webhooks=("new-hook",)),),
                        {"new-hook": Webhook("new-hook", "http://127.0.0.1:9/new", secrets.token_bytes(24))})
        tx = gate.transaction()
        await tx.start()
        await gate.execute("LOCK TABLE devices IN ACCESS EXCLUSIVE MODE")
        task = asyncio.ensure_future(writer.write([outcome(2, [reading("hn-aq-1", 1, 60.0)])]))
        await _eventually(lambda: _is(_waiting(pool, ["alerts-reload-writer"], "relation"), 1))
        alerts.runtime.replace(newer)
        await tx.rollback()
        result = await task
        assert result.alerts is not None
        [(eid, *_)] = await events(pool)
        assert [(e, w) for e, w, *_ in await outbox(pool)] == [(eid, "backup"), (eid, "city-ops")]
        assert result.alerts.outbox == 2
    finally:
        await gate.close()
        await writing.close()
