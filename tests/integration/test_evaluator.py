"""The evaluator (ingest.alerts.evaluator) with the writer's alert stage (ingest.alerts.stage) and the
rule versions of several workers (ingest.alerts.versions) on a real TimescaleDB: the watermark, late
readings, SKIP LOCKED, the no-data job under its advisory lock and grace, version hand-overs, clock
windows and their coverage, per-device silences. Every clock (the stage's event-time clock and the
evaluator's monotonic one) is the test's; rounds are called directly, never ``run``."""

from __future__ import annotations

import asyncio
import json
from collections import Counter
from dataclasses import dataclass
from datetime import datetime
from typing import Any

import asyncpg
import pytest

from ingest.alerts.evaluator import LOCK_KEY, Evaluator
from ingest.alerts.model import Rule
from ingest.alerts.runtime import AlertRuntime, RuleSet
from ingest.alerts.stage import AlertStage, StageResult
from ingest.alerts.versions import Versions
from ingest.model import RawMessage, Reading
from ingest.process import Outcome
from ingest.settings import DatabaseSettings
from ingest.store.pool import create_pool
from ingest.store.writer import Writer, WriteResult
from tests.integration import test_alert_stage as _alert_stage
from tests.integration.test_alert_stage import (
    HOOKS,
    T0,
    UNIT,
    _eventually,
    _is,
    _waiting,
    at,
    events,
    ids,
    outcome,
    pm25,
    reading,
)

pool = _alert_stage.pool  # the fixture: a pool on this test's own database

LATENESS = 60.0  # alerts.lateness of every rule set here: the watermark is the clock minus a minute


class Clock:
    """The stage's clock (event time), moved by the test."""

    def __init__(self, now: datetime) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


class Ticks:
    """The evaluator's monotonic clock (the no-data grace, the beats), moved by the test."""

    def __init__(self, now: float = 1000.0) -> None:
        self.now = now

    def __call__(self) -> float:
        return self.now


@dataclass
class Worker:
    """One ingest process's alert half: its writer, stage, versions and evaluator."""

    writer: Writer
    stage: AlertStage
    versions: Versions
    evaluator: Evaluator
    ticks: Ticks

    async def write(self, *outcomes: Outcome) -> StageResult | None:
        result: WriteResult = await self.writer.write(list(outcomes))
        return result.alerts

    async def round(self, pool: asyncpg.Pool) -> StageResult:
        """One evaluator round on a connection of ``pool`` (bounded: a round never waits for a lock)."""
        async with pool.acquire() as conn:
            return await asyncio.wait_for(self.evaluator.round(conn), 30)


def rules(*rules: Rule, max_notify_age: float = 3600.0, no_data_grace: float | None = None) -> RuleSet:
    return RuleSet(rules, dict(HOOKS), max_notify_age=max_notify_age, lateness=LATENESS, no_data_grace=no_data_grace)


def worker(pool: asyncpg.Pool, active: RuleSet, clock: Clock, *, name: str = "worker-a",
           intervals: dict[str, float] | None = None) -> Worker:
    versions = Versions(name, T0)
    stage = AlertStage(AlertRuntime(active), clock=clock, intervals=intervals, versions=versions)
    ticks = Ticks()
    return Worker(Writer(pool, alerts=stage), stage, versions, Evaluator(lambda: pool, stage, versions,
                                                                         monotonic=ticks), ticks)


async def state(pool: asyncpg.Pool) -> list[tuple[Any, ...]]:
    """alert_state: (rule, device, metric, status, episode_start, last_time, last_value, evaluated_to,
    due_at, version)."""
    return [tuple(r) for r in await pool.fetch(
        "SELECT rule, device_id, metric_id, status, episode_start, last_time, last_value, evaluated_to, due_at, "
        "version FROM alert_state ORDER BY rule, device_id, metric_id")]


async def happened(pool: asyncpg.Pool) -> list[tuple[Any, ...]]:
    """alert_events without ids: (rule, device, metric, status, event_time, starts_at, value, threshold,
    severity, notified)."""
    return [e[1:] for e in await events(pool)]


async def bodies(pool: asyncpg.Pool) -> list[tuple[int, str, dict[str, Any]]]:
    return [(r[0], r[1], json.loads(r[2])) for r in await pool.fetch(
        "SELECT event_id, webhook, body FROM alert_outbox ORDER BY id")]


async def count(pool: asyncpg.Pool, table: str) -> int:
    assert table in ("readings", "alert_state", "alert_events", "alert_outbox")
    n = await pool.fetchval(f"SELECT count(*) FROM {table}")
    assert isinstance(n, int)
    return n


def judged(result: StageResult | None) -> tuple[int, Counter[tuple[str, str]], int, int, int, int]:
    """What a batch or round did: (judged, events, late, deferred, uncovered, outbox)."""
    assert result is not None
    return result.judged, result.events, result.late, result.deferred, result.uncovered, result.outbox


NOTHING: Counter[tuple[str, str]] = Counter()
FIRED = Counter({("pm25-high", "firing"): 1})
RESOLVED = Counter({("pm25-high", "resolved"): 1})


# 1. The watermark --------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_readings_wait_for_the_watermark_and_are_judged_in_event_time_order_once(pool: asyncpg.Pool) -> None:
    clock = Clock(at(10))  # the watermark: at(9)
    w = worker(pool, rules(pm25()), clock)
    v = pm25().version
    # 9.5 is after the watermark: stored, nothing judged, due_at set.
    assert judged(await w.write(outcome(1, [reading("hn-aq-1", 9.5, 40.0)]))) == (0, NOTHING, 0, 0, 0, 0)
    d, m = await ids(pool, "hn-aq-1")
    assert await state(pool) == [("pm25-high", d, m, "ok", None, None, None, None, at(9.5), None)]
    assert judged(await w.round(pool)) == (0, NOTHING, 0, 0, 0, 0)  # not due yet
    # An older reading of the series in a later batch, still within the lateness: not late, due earlier.
    clock.now = at(10.1)
    assert judged(await w.write(outcome(2, [reading("hn-aq-1", 9.2, 60.0)]))) == (0, NOTHING, 0, 0, 0, 0)
    assert await state(pool) == [("pm25-high", d, m, "ok", None, None, None, None, at(9.2), None)]
    assert await count(pool, "alert_events") == 0
    # The watermark passes 9.2 only: 60 at 9.2 fires (judged before 9.5 although it came after it).
    clock.now = at(10.3)
    assert judged(await w.round(pool)) == (1, FIRED, 0, 0, 0, 2)
    assert await state(pool) == [("pm25-high", d, m, "firing", at(9.2), at(9.2), 60.0, None, at(9.5), v)]
    # Past 9.5: 40 resolves the episode.
    clock.now = at(10.6)
    assert judged(await w.round(pool)) == (1, RESOLVED, 0, 0, 0, 2)
    assert await state(pool) == [("pm25-high", d, m, "ok", None, at(9.5), 40.0, None, None, v)]
    assert await happened(pool) == [
        ("pm25-high", d, m, "firing", at(9.2), at(9.2), 60.0, 55.5, "critical", True),
        ("pm25-high", d, m, "resolved", at(9.5), at(9.2), 40.0, 55.5, "critical", True),
    ]
    # Nothing waits: further rounds add nothing, whatever the clock says.
    clock.now = at(30)
    assert judged(await w.round(pool)) == (0, NOTHING, 0, 0, 0, 0)
    assert (await count(pool, "alert_events"), await count(pool, "alert_outbox")) == (2, 4)


# 2. Late readings --------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_reading_at_or_before_the_judged_time_is_late_stored_and_never_judged(pool: asyncpg.Pool) -> None:
    clock = Clock(at(20))
    w = worker(pool, rules(pm25()), clock)
    assert judged(await w.write(outcome(1, [reading("hn-aq-1", 10, 40.0)]))) == (1, NOTHING, 0, 0, 0, 0)
    d, m = await ids(pool, "hn-aq-1")
    after = [("pm25-high", d, m, "ok", None, at(10), 40.0, None, None, pm25().version)]
    assert await state(pool) == after
    # Breaches at or before at(10), which the series has judged: late; with one in time, judged alone.
    late = await w.write(outcome(2, [reading("hn-aq-1", 5, 90.0), reading("hn-aq-1", 9.99, 95.0)]))
    assert judged(late) == (0, NOTHING, 2, 0, 0, 0)
    assert await state(pool) == after  # no due_at: nothing waits for them
    assert judged(await w.round(pool)) == (0, NOTHING, 0, 0, 0, 0)
    assert (await count(pool, "readings"), await count(pool, "alert_events")) == (3, 0)
    mixed = await w.write(outcome(3, [reading("hn-aq-1", 8, 99.0), reading("hn-aq-1", 11, 45.0)]))
    assert judged(mixed) == (1, NOTHING, 1, 0, 0, 0)
    assert await state(pool) == [("pm25-high", d, m, "ok", None, at(11), 45.0, None, None, pm25().version)]
    assert (await count(pool, "readings"), await count(pool, "alert_events")) == (5, 0)


# 3. SKIP LOCKED ----------------------------------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_round_leaves_a_series_another_transaction_holds_and_judges_it_next_time(
        database_url: str, pool: asyncpg.Pool) -> None:
    clock = Clock(at(10))
    w = worker(pool, rules(pm25()), clock)
    await w.write(outcome(1, [reading("hn-aq-1", 9.5, 60.0), reading("hn-aq-2", 9.5, 70.0)]))
    d1, m = await ids(pool, "hn-aq-1")
    d2, _ = await ids(pool, "hn-aq-2")
    assert [s[8] for s in await state(pool)] == [at(9.5), at(9.5)]
    clock.now = at(11)
    holder = await asyncpg.connect(database_url)
    try:
        tx = holder.transaction()
        await tx.start()
        await holder.execute("SELECT 1 FROM alert_state WHERE device_id = $1 FOR UPDATE", d1)
        # The round returns while the lock is held (no wait): hn-aq-2 judged, hn-aq-1 left as it was.
        assert judged(await w.round(pool)) == (1, FIRED, 0, 0, 0, 2)
        assert [e[:6] for e in await happened(pool)] == [("pm25-high", d2, m, "firing", at(9.5), at(9.5))]
        assert (await state(pool))[0] == ("pm25-high", d1, m, "ok", None, None, None, None, at(9.5), None)
        assert judged(await w.round(pool)) == (0, NOTHING, 0, 0, 0, 0)  # still held
        await tx.rollback()
    finally:
        await holder.close()
    assert judged(await w.round(pool)) == (1, FIRED, 0, 0, 0, 2)
    assert judged(await w.round(pool)) == (0, NOTHING, 0, 0, 0, 0)
    assert [e[:6] for e in await happened(pool)] == [("pm25-high", d2, m, "firing", at(9.5), at(9.5)),
                                                      ("pm25-high", d1, m, "firing", at(9.5), at(9.5))]
    assert [s[3] for s in await state(pool)] == ["firing", "firing"]
    assert await count(pool, "alert_outbox") == 4


# 4. no_data --------------------------------------------------------------------------------------------------------

SILENT = Rule("level-silent", "water_level", "above", 900.0, webhooks=("city-ops",), signal="no_data")
SILENCE = Counter({("level-silent", "firing"): 1})


def level(device: str, minutes: float, value: float) -> Reading:
    return Reading(device, "water_level", at(minutes), value, "m")


async def _silent_series(pool: asyncpg.Pool, w: Worker, clock: Clock) -> tuple[int, int]:
    """hn-wl-1 sends one reading at T0, judged at once; then the clock moves to T0 + 30 min (the
    watermark 29 min after the last reading; the rule's duration: 15 min)."""
    clock.now = at(1)
    assert judged(await w.write(outcome(1, [level("hn-wl-1", 0, 1.2)]))) == (1, NOTHING, 0, 0, 0, 0)
    d = await pool.fetchval("SELECT id FROM devices WHERE uid = 'hn-wl-1'")
    m = await pool.fetchval("SELECT id FROM metrics WHERE name = 'water_level'")
    assert isinstance(d, int)
    assert isinstance(m, int)
    assert await state(pool) == [("level-silent", d, m, "ok", None, at(0), None, None, None, SILENT.version)]
    clock.now = at(30)
    return d, m


@pytest.mark.asyncio
async def test_a_silence_fires_once_after_the_grace_and_a_reading_resolves_it_once(pool: asyncpg.Pool) -> None:
    # max_notify_age 5 min: the firing's event time (T0 + 15 min) is 14 min old when it is judged, and it
    # is notified all the same (it is about the present: the device is silent now).
    clock = Clock(at(0))
    w = worker(pool, rules(SILENT, max_notify_age=300.0, no_data_grace=120.0), clock)
    d, m = await _silent_series(pool, w, clock)
    w.ticks.now = w.evaluator.started + 119.0
    assert judged(await w.round(pool)) == (0, NOTHING, 0, 0, 0, 0)  # within the grace
    assert await count(pool, "alert_events") == 0
    w.ticks.now = w.evaluator.started + 120.0
    assert judged(await w.round(pool)) == (1, SILENCE, 0, 0, 0, 1)
    [(eid, hook, body)] = await bodies(pool)
    assert await happened(pool) == [("level-silent", d, m, "firing", at(15), at(15), 1740.0, 900.0, "warning", True)]
    assert (hook, body["id"], body["status"], body["metric"], body["device"], body["value"], body["event_time"]) == (
        "city-ops", f"evt_{eid}", "firing", "water_level", "hn-wl-1", 1740.0, "2026-11-25T03:15:00Z")
    assert await state(pool) == [("level-silent", d, m, "firing", at(15), at(0), 1740.0, None, None, SILENT.version)]
    # Still silent, later: nothing more.
    clock.now = at(45)
    w.ticks.now += 60
    assert judged(await w.round(pool)) == (0, NOTHING, 0, 0, 0, 0)
    # A reading ends the silence at its time, once.
    clock.now = at(47)
    resolved = await w.write(outcome(2, [level("hn-wl-1", 46, 1.3)]))
    assert judged(resolved) == (1, Counter({("level-silent", "resolved"): 1}), 0, 0, 0, 1)
    assert await state(pool) == [("level-silent", d, m, "ok", None, at(46), 2760.0, None, None, SILENT.version)]
    clock.now = at(60)  # silent again, 13 min at the watermark: not yet
    w.ticks.now += 60
    assert judged(await w.round(pool)) == (0, NOTHING, 0, 0, 0, 0)
    clock.now = at(63)  # 16 min: a new episode, from the new last reading
    assert judged(await w.round(pool)) == (1, SILENCE, 0, 0, 0, 1)
    assert await happened(pool) == [
        ("level-silent", d, m, "firing", at(15), at(15), 1740.0, 900.0, "warning", True),
        ("level-silent", d, m, "resolved", at(46), at(15), 2760.0, 900.0, "warning", True),
        ("level-silent", d, m, "firing", at(61), at(61), 960.0, 900.0, "warning", True),
    ]
    assert [(b["status"], b["unit"], b["value"]) for _, _, b in await bodies(pool)] == [
        ("firing", "s", 1740.0), ("resolved", "s", 2760.0), ("firing", "s", 960.0)]


@pytest.mark.asyncio
async def test_a_gap_filled_by_a_waiting_reading_never_fires(pool: asyncpg.Pool) -> None:
    # A backlog after an outage: the reading at 29.5 min waits for the watermark, and the silence before
    # it (29.5 min, twice the duration) is not judged meanwhile.
    clock = Clock(at(0))
    w = worker(pool, rules(SILENT, no_data_grace=0.0), clock)
    d, m = await _silent_series(pool, w, clock)
    assert judged(await w.write(outcome(2, [level("hn-wl-1", 29.5, 1.4)]))) == (0, NOTHING, 0, 0, 0, 0)
    assert judged(await w.round(pool)) == (0, NOTHING, 0, 0, 0, 0)
    clock.now = at(31)
    assert judged(await w.round(pool)) == (1, NOTHING, 0, 0, 0, 0)
    assert await state(pool) == [("level-silent", d, m, "ok", None, at(29.5), None, None, None, SILENT.version)]
    assert judged(await w.round(pool)) == (0, NOTHING, 0, 0, 0, 0)
    assert await count(pool, "alert_events") == 0


@pytest.mark.asyncio
async def test_two_evaluators_at_once_judge_a_silence_once(database_url: str, pool: asyncpg.Pool) -> None:
    clock = Clock(at(0))
    a = worker(pool, rules(SILENT, no_data_grace=0.0), clock, name="worker-a")
    d, m = await _silent_series(pool, a, clock)
    pool_a = await create_pool(DatabaseSettings(url=database_url), application_name="evaluator-a")
    b = worker(pool, rules(SILENT, no_data_grace=0.0), clock, name="worker-b")
    a.evaluator.pool = lambda: pool_a
    gate = await asyncpg.connect(database_url)
    try:
        # Hold A inside its no-data transaction (it has its advisory lock and the row lock) as it saves.
        await pool.execute("""
            CREATE FUNCTION hold() RETURNS trigger LANGUAGE plpgsql AS $$
            BEGIN PERFORM pg_advisory_xact_lock_shared(4243); RETURN NEW; END $$;
            CREATE TRIGGER hold BEFORE UPDATE ON alert_state FOR EACH ROW EXECUTE FUNCTION hold();
        """)
        await gate.execute("SELECT pg_advisory_lock(4243)")
        held = asyncio.ensure_future(a.round(pool_a))
        await _eventually(lambda: _is(_waiting(pool, ["evaluator-a"], "advisory"), 1))
        assert judged(await b.round(pool)) == (0, NOTHING, 0, 0, 0, 0)
        assert not held.done()
        await gate.execute("SELECT pg_advisory_unlock(4243)")
        assert judged(await held) == (1, Counter({("level-silent", "firing"): 1}), 0, 0, 0, 1)
        assert judged(await b.round(pool)) == (0, NOTHING, 0, 0, 0, 0)
        assert judged(await a.round(pool)) == (0, NOTHING, 0, 0, 0, 0)
        assert [e[:6] for e in await happened(pool)] == [("level-silent", d, m, "firing", at(15), at(15))]
    finally:
        await gate.close()
        await pool_a.close()


@pytest.mark.asyncio
async def test_the_no_data_job_does_not_run_while_another_holds_its_advisory_lock(database_url: str,
                                                                                  pool: asyncpg.Pool) -> None:
    # No row is locked here: only the advisory lock keeps this round from judging the silence.
    clock = Clock(at(0))
    w = worker(pool, rules(SILENT, no_data_grace=0.0), clock)
    await _silent_series(pool, w, clock)
    other = await asyncpg.connect(database_url)
    try:
        await other.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
        assert judged(await w.round(pool)) == (0, NOTHING, 0, 0, 0, 0)
        await other.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
    finally:
        await other.close()
    assert judged(await w.round(pool)) == (1, SILENCE, 0, 0, 0, 1)
    assert await count(pool, "alert_events") == 1


# 5. Versions -------------------------------------------------------------------------------------------------------

RULE_A = pm25(threshold=50.0, clear=None)  # worker A's version of the rule
RULE_B = pm25(threshold=60.0, clear=None)  # worker B's, after an edit A has not read yet


async def _judged_by_a_then_deferred_by_b(pool: asyncpg.Pool) -> tuple[Worker, Worker, int, int]:
    """A fires on 55 at 1 min; B (which would resolve 58) defers 58 at 2 min to A, live."""
    assert RULE_A.version != RULE_B.version
    clock = Clock(at(20))  # every reading below is past the watermark: judged (or deferred) at once
    a = worker(pool, rules(RULE_A), clock, name="worker-a")
    b = worker(pool, rules(RULE_B), clock, name="worker-b")
    for w in (a, b, a):  # both beat (A twice, to read B's): each knows the other
        w.ticks.now += 5.0
        await w.round(pool)
    assert judged(await a.write(outcome(1, [reading("hn-aq-1", 1, 55.0)]))) == (1, FIRED, 0, 0, 0, 2)
    d, m = await ids(pool, "hn-aq-1")
    deferred = await b.write(outcome(2, [reading("hn-aq-1", 2, 58.0)]))
    assert judged(deferred) == (0, NOTHING, 0, 1, 0, 0)
    assert await state(pool) == [("pm25-high", d, m, "firing", at(1), at(1), 55.0, None, at(2), RULE_A.version)]
    # B's evaluator leaves it too: its claim does not even take it (so it counts no deferral).
    assert judged(await b.round(pool)) == (0, NOTHING, 0, 0, 0, 0)
    assert (await state(pool))[0][8] == at(2)
    return a, b, d, m


@pytest.mark.asyncio
async def test_a_series_stays_with_its_version_while_that_worker_lives_and_passes_on_when_it_leaves(
        pool: asyncpg.Pool) -> None:
    a, b, d, m = await _judged_by_a_then_deferred_by_b(pool)
    # A judges what B left: 58 > 50, still firing; no event.
    assert judged(await a.round(pool)) == (1, NOTHING, 0, 0, 0, 0)
    assert await state(pool) == [("pm25-high", d, m, "firing", at(1), at(2), 58.0, None, None, RULE_A.version)]
    assert judged(await b.write(outcome(3, [reading("hn-aq-1", 3, 45.0)]))) == (0, NOTHING, 0, 1, 0, 0)
    async with pool.acquire() as conn:
        await a.versions.leave(conn)
    # B learns of it at its next beat only.
    assert judged(await b.round(pool)) == (0, NOTHING, 0, 0, 0, 0)
    assert (await state(pool))[0][8] == at(3)
    b.ticks.now += 5.0
    assert judged(await b.round(pool)) == (1, RESOLVED, 0, 0, 0, 2)
    assert await state(pool) == [("pm25-high", d, m, "ok", None, at(3), 45.0, None, None, RULE_B.version)]
    assert await happened(pool) == [
        ("pm25-high", d, m, "firing", at(1), at(1), 55.0, 50.0, "critical", True),
        ("pm25-high", d, m, "resolved", at(3), at(1), 45.0, 60.0, "critical", True),  # B's threshold
    ]
    # From now on B's worker judges the series at once.
    assert judged(await b.write(outcome(4, [reading("hn-aq-1", 4, 65.0)]))) == (1, FIRED, 0, 0, 0, 2)


@pytest.mark.asyncio
async def test_a_series_passes_to_the_new_version_once_every_live_worker_holds_it(pool: asyncpg.Pool) -> None:
    a, b, d, m = await _judged_by_a_then_deferred_by_b(pool)
    # A reads the edited file and beats (A's own round would judge the series itself: only its beat here).
    a.stage.runtime.replace(rules(RULE_B))
    async with pool.acquire() as conn:
        await a.versions.beat(conn, a.stage.runtime.active.rules)
    assert judged(await b.round(pool)) == (0, NOTHING, 0, 0, 0, 0)  # B has not beaten since
    b.ticks.now += 5.0
    # 58 at 2 min, judged by B's version: back under 60, resolved.
    assert judged(await b.round(pool)) == (1, RESOLVED, 0, 0, 0, 2)
    assert await state(pool) == [("pm25-high", d, m, "ok", None, at(2), 58.0, None, None, RULE_B.version)]
    assert [e[3:8] for e in await happened(pool)] == [("firing", at(1), at(1), 55.0, 50.0),
                                                      ("resolved", at(2), at(1), 58.0, 60.0)]
    # A now judges the series too (same version).
    assert judged(await a.write(outcome(3, [reading("hn-aq-1", 3, 61.0)]))) == (1, FIRED, 0, 0, 0, 2)


@pytest.mark.asyncio
async def test_a_worker_before_its_first_beat_judges_new_series_and_its_own_version_only(pool: asyncpg.Pool) -> None:
    clock = Clock(at(20))
    # No worker ever beats here: each knows no one.
    a = worker(pool, rules(RULE_A), clock, name="worker-a")
    b = worker(pool, rules(RULE_B), clock, name="worker-b")
    assert judged(await a.write(outcome(1, [reading("hn-aq-1", 1, 55.0)]))) == (1, FIRED, 0, 0, 0, 2)
    assert judged(await b.write(outcome(2, [reading("hn-aq-2", 1, 65.0)]))) == (1, FIRED, 0, 0, 0, 2)
    d1, m = await ids(pool, "hn-aq-1")
    d2, _ = await ids(pool, "hn-aq-2")
    c = worker(pool, rules(RULE_B), clock, name="worker-c")
    batch = await c.write(outcome(3, [reading("hn-aq-1", 2, 58.0), reading("hn-aq-2", 2, 58.0),
                                      reading("hn-aq-3", 2, 65.0)]))
    assert judged(batch) == (2, Counter({("pm25-high", "firing"): 1, ("pm25-high", "resolved"): 1}), 0, 1, 0, 4)
    d3, _ = await ids(pool, "hn-aq-3")
    assert await state(pool) == sorted([
        ("pm25-high", d1, m, "firing", at(1), at(1), 55.0, None, at(2), RULE_A.version),  # left as it was
        ("pm25-high", d2, m, "ok", None, at(2), 58.0, None, None, RULE_B.version),
        ("pm25-high", d3, m, "firing", at(2), at(2), 65.0, None, None, RULE_B.version),
    ])


# 6. Clock windows --------------------------------------------------------------------------------------------------

WINDOW = pm25(signal="window", agg="avg", over=600.0, align="clock")  # [k * 10 min, (k + 1) * 10 min)


@pytest.mark.asyncio
async def test_a_clock_window_waits_for_the_watermark_past_its_end_and_is_judged_once(pool: asyncpg.Pool) -> None:
    clock = Clock(at(9))  # the watermark: at(8)
    w = worker(pool, rules(WINDOW), clock)
    window = [reading("hn-aq-1", t, v) for t, v in ((1, 60.0), (3, 60.0), (5, 60.0), (7, 60.0), (8.5, 70.0))]
    assert judged(await w.write(outcome(1, window[:3]), outcome(2, window[3:]))) == (0, NOTHING, 0, 0, 0, 0)
    d, m = await ids(pool, "hn-aq-1")
    assert await state(pool) == [("pm25-high", d, m, "ok", None, None, None, None, at(10), None)]
    clock.now = at(10.5)  # the watermark at(9.5): the window [0, 10) has not ended for it
    assert judged(await w.round(pool)) == (0, NOTHING, 0, 0, 0, 0)
    clock.now = at(11.5)
    assert judged(await w.round(pool)) == (1, FIRED, 0, 0, 0, 2)
    assert await happened(pool) == [("pm25-high", d, m, "firing", at(10), at(10), 62.0, 55.5, "critical", True)]
    assert await state(pool) == [("pm25-high", d, m, "firing", at(10), at(8.5), 62.0, at(10), None, WINDOW.version)]
    assert judged(await w.round(pool)) == (0, NOTHING, 0, 0, 0, 0)
    # A reading in the judged window is late; one in the next waits for that window's end.
    clock.now = at(12)
    more = await w.write(outcome(3, [reading("hn-aq-1", 9.9, 10.0), reading("hn-aq-1", 12, 40.0)]))
    assert judged(more) == (0, NOTHING, 1, 0, 0, 0)
    assert (await state(pool))[0][8] == at(20)
    clock.now = at(21)
    assert judged(await w.round(pool)) == (1, RESOLVED, 0, 0, 0, 2)
    assert [e[3:7] for e in await happened(pool)] == [("firing", at(10), at(10), 62.0),
                                                      ("resolved", at(20), at(10), 40.0)]
    assert await state(pool) == [("pm25-high", d, m, "ok", None, at(12), 40.0, at(20), None, WINDOW.version)]


@pytest.mark.asyncio
async def test_a_window_with_too_little_data_is_not_judged(pool: asyncpg.Pool) -> None:
    # Coverage 0.75 of a 10 min window: 7.5 readings at the source's 60 s interval, 3.75 at 120 s.
    covered = pm25(signal="window", agg="avg", over=600.0, align="clock", coverage=0.75)
    clock = Clock(at(25))  # both windows, [0, 10) and [10, 20), have passed the watermark
    w = worker(pool, rules(covered), clock, intervals={"native": 60.0})
    await w.write(outcome(1, [reading("hn-aq-3", -30, 1.0)]))
    await pool.execute("UPDATE devices SET expected_interval = 120 WHERE uid = 'hn-aq-3'")  # the register's wins
    thin = [reading("hn-aq-1", t, 60.0) for t in (0, 2, 4, 6)]  # 4 of 10
    full = [reading("hn-aq-1", 10 + t, 60.0) for t in range(8)]  # 8 of 10
    unknown = [reading("hn-aq-2", 10 + t, 60.0) for t in range(10)]  # a source with no interval
    registered = [reading("hn-aq-3", t, 60.0) for t in (0, 2, 4, 6)]  # 4 of 5
    other = Outcome(RawMessage("other/d2/up", b"{}", T0, 1, 9, 1, 9, False), "other", unknown)
    result = await w.write(outcome(2, thin + full), other, outcome(3, registered))
    assert judged(result) == (3, Counter({("pm25-high", "firing"): 2}), 0, 0, 2, 4)
    d1, m = await ids(pool, "hn-aq-1")
    d3, _ = await ids(pool, "hn-aq-3")
    assert [e[1:6] for e in await happened(pool)] == sorted(
        [(d1, m, "firing", at(20), at(20)), (d3, m, "firing", at(10), at(10))])
    # The thin window and the window of the unknown interval are passed over, not waited for.
    d2, _ = await ids(pool, "hn-aq-2")
    v = covered.version
    assert await state(pool) == sorted([
        ("pm25-high", d1, m, "firing", at(20), at(17), 60.0, at(20), None, v),
        ("pm25-high", d2, m, "ok", None, at(19), None, at(20), None, v),
        ("pm25-high", d3, m, "firing", at(10), at(6), 60.0, at(10), None, v),
    ])
    assert judged(await w.round(pool)) == (0, NOTHING, 0, 0, 0, 0)


# 7. A per-device silence -------------------------------------------------------------------------------------------

DEVICE_SILENT = Rule("device-silent", "", "above", 900.0, webhooks=("city-ops",), signal="no_data", per="device")


@pytest.mark.asyncio
async def test_a_device_silence_is_one_state_of_every_metric_and_says_metric_star(pool: asyncpg.Pool) -> None:
    clock = Clock(at(2))
    w = worker(pool, rules(DEVICE_SILENT), clock)  # the grace: the rule's 15 min
    first = await w.write(outcome(1, [reading("hn-aq-1", 0, 20.0), Reading("hn-aq-1", "pm10", at(1), 30.0, UNIT)]))
    assert judged(first) == (1, NOTHING, 0, 0, 0, 0)
    d, _ = await ids(pool, "hn-aq-1")
    assert await state(pool) == [("device-silent", d, 0, "ok", None, at(1), None, None, None, DEVICE_SILENT.version)]
    clock.now = at(40)
    w.ticks.now = w.evaluator.started + 899.0
    assert judged(await w.round(pool)) == (0, NOTHING, 0, 0, 0, 0)
    w.ticks.now = w.evaluator.started + 900.0
    assert judged(await w.round(pool)) == (1, Counter({("device-silent", "firing"): 1}), 0, 0, 0, 1)
    assert await happened(pool) == [("device-silent", d, 0, "firing", at(16), at(16), 2280.0, 900.0, "warning", True)]
    # Another metric of the device ends it.
    clock.now = at(42)
    back = await w.write(outcome(2, [Reading("hn-aq-1", "pm10", at(41), 31.0, UNIT)]))
    assert judged(back) == (1, Counter({("device-silent", "resolved"): 1}), 0, 0, 0, 1)
    assert await state(pool) == [("device-silent", d, 0, "ok", None, at(41), 2400.0, None, None,
                                  DEVICE_SILENT.version)]
    sent = await bodies(pool)
    assert [(b["status"], b["device"], b["metric"], b["unit"], b["value"]) for _, _, b in sent] == [
        ("firing", "hn-aq-1", "*", "s", 2280.0), ("resolved", "hn-aq-1", "*", "s", 2400.0)]
    assert await count(pool, "alert_state") == 1
