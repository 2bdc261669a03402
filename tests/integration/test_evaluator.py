"""The evaluator (ingest.alerts.evaluator) with the writer's alert stage (ingest.alerts.stage) and the
rule versions of several workers (ingest.alerts.versions) on a real TimescaleDB: the watermark, late
readings, SKIP LOCKED, the no-data job under its advisory lock and grace, version hand-overs, clock
windows and their coverage, per-device silences; silence judged on arrival too (seen_at), the grace
after an outage and across a reload, past windows back-filled over several batches, series a rule no
longer selects, the Alertmanager description of each kind. Every clock (the stage's event-time clock and the
evaluator's monotonic one) is the test's; rounds are called directly, never ``run``."""

from __future__ import annotations

import asyncio
import json
import logging
import secrets
from collections import Counter
from collections.abc import Callable
from dataclasses import dataclass, replace
from datetime import datetime
from typing import Any

import asyncpg
import pytest

from ingest.alerts import evaluator as evaluator_module
from ingest.alerts.evaluator import LOCK_KEY, Evaluator
from ingest.alerts.model import Rule, ValueRules, Webhook
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


def rules(*rules: Rule, max_notify_age: float = 3600.0, no_data_grace: float | None = None,
          hooks: dict[str, Webhook] | None = None) -> RuleSet:
    return RuleSet(rules, dict(HOOKS if hooks is None else hooks), max_notify_age=max_notify_age, lateness=LATENESS,
                   no_data_grace=no_data_grace)


def worker(pool: asyncpg.Pool, active: RuleSet, clock: Clock, *, name: str = "worker-a",
           intervals: dict[str, float] | None = None, ready: Callable[[], bool] = lambda: True) -> Worker:
    versions = Versions(name, T0)
    stage = AlertStage(AlertRuntime(active), clock=clock, intervals=intervals, versions=versions)
    ticks = Ticks()
    return Worker(Writer(pool, alerts=stage), stage, versions, Evaluator(lambda: pool, stage, versions,
                                                                         monotonic=ticks, ready=ready), ticks)


# The state of each rule's series as it judges it: (rule, device, metric, status, episode_start,
# last_time, last_value, evaluated_to, due_at, version). A value rule's series (the rules named here,
# the value rules of these tests) is its series' shared row (rule '*value': what it judged to, what
# waits, the value rules' version) with the rule's own status and episode, ok when the rule has no
# row; a rule row of a series without a shared row (or of another kind) as it is.
_STATE = """
SELECT n.name, v.device_id, v.metric_id, coalesce(s.status, 'ok'), s.episode_start, v.last_time, v.last_value,
       v.evaluated_to, v.due_at, v.version
FROM alert_state v CROSS JOIN unnest($1::text[]) AS n(name)
LEFT JOIN alert_state s ON s.rule = n.name AND s.device_id = v.device_id AND s.metric_id = v.metric_id
WHERE v.rule = '*value'
UNION ALL
SELECT rule, device_id, metric_id, status, episode_start, last_time, last_value, evaluated_to, due_at, version
FROM alert_state s
WHERE rule <> '*value' AND NOT (rule = ANY($1::text[]) AND EXISTS (
    SELECT 1 FROM alert_state v WHERE v.rule = '*value' AND v.device_id = s.device_id AND v.metric_id = s.metric_id))
"""


async def state(pool: asyncpg.Pool, values: tuple[str, ...] = ("pm25-high",)) -> list[tuple[Any, ...]]:
    """alert_state as each rule's series (_STATE), sorted."""
    return sorted(tuple(r) for r in await pool.fetch(_STATE, list(values)))


def vv(*value_rules: Rule) -> str:
    """The version a series' shared row stores: that of the value rules together."""
    return ValueRules(value_rules).version


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
    v = vv(pm25())
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
    after = [("pm25-high", d, m, "ok", None, at(10), 40.0, None, None, vv(pm25()))]
    assert await state(pool) == after
    # Breaches at or before at(10), which the series has judged: late; with one in time, judged alone.
    late = await w.write(outcome(2, [reading("hn-aq-1", 5, 90.0), reading("hn-aq-1", 9.99, 95.0)]))
    assert judged(late) == (0, NOTHING, 2, 0, 0, 0)
    assert await state(pool) == after  # no due_at: nothing waits for them
    assert judged(await w.round(pool)) == (0, NOTHING, 0, 0, 0, 0)
    assert (await count(pool, "readings"), await count(pool, "alert_events")) == (3, 0)
    mixed = await w.write(outcome(3, [reading("hn-aq-1", 8, 99.0), reading("hn-aq-1", 11, 45.0)]))
    assert judged(mixed) == (1, NOTHING, 1, 0, 0, 0)
    assert await state(pool) == [("pm25-high", d, m, "ok", None, at(11), 45.0, None, None, vv(pm25()))]
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
    assert vv(RULE_A) != vv(RULE_B)
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
    assert await state(pool) == [("pm25-high", d, m, "firing", at(1), at(1), 55.0, None, at(2), vv(RULE_A))]
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
    assert await state(pool) == [("pm25-high", d, m, "firing", at(1), at(2), 58.0, None, None, vv(RULE_A))]
    assert judged(await b.write(outcome(3, [reading("hn-aq-1", 3, 45.0)]))) == (0, NOTHING, 0, 1, 0, 0)
    async with pool.acquire() as conn:
        await a.versions.leave(conn)
    # B learns of it at its next beat only.
    assert judged(await b.round(pool)) == (0, NOTHING, 0, 0, 0, 0)
    assert (await state(pool))[0][8] == at(3)
    b.ticks.now += 5.0
    assert judged(await b.round(pool)) == (1, RESOLVED, 0, 0, 0, 2)
    assert await state(pool) == [("pm25-high", d, m, "ok", None, at(3), 45.0, None, None, vv(RULE_B))]
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
        await a.versions.beat(conn, a.stage.runtime.active.versioned)
    assert judged(await b.round(pool)) == (0, NOTHING, 0, 0, 0, 0)  # B has not beaten since
    b.ticks.now += 5.0
    # 58 at 2 min, judged by B's version: back under 60, resolved.
    assert judged(await b.round(pool)) == (1, RESOLVED, 0, 0, 0, 2)
    assert await state(pool) == [("pm25-high", d, m, "ok", None, at(2), 58.0, None, None, vv(RULE_B))]
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
        ("pm25-high", d1, m, "firing", at(1), at(1), 55.0, None, at(2), vv(RULE_A)),  # left as it was
        ("pm25-high", d2, m, "ok", None, at(2), 58.0, None, None, vv(RULE_B)),
        ("pm25-high", d3, m, "firing", at(2), at(2), 65.0, None, None, vv(RULE_B)),
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
    # (The window holding a series' latest reading waits besides until nothing of the series has
    # arrived for the lateness: the batch judges the windows before it, the next round the rest.)
    w = worker(pool, rules(covered), clock, intervals={"native": 60.0})
    await w.write(outcome(1, [reading("hn-aq-3", -30, 1.0)]))
    await pool.execute("UPDATE devices SET expected_interval = 120 WHERE uid = 'hn-aq-3'")  # the register's wins
    thin = [reading("hn-aq-1", t, 60.0) for t in (0, 2, 4, 6)]  # 4 of 10
    full = [reading("hn-aq-1", 10 + t, 60.0) for t in range(8)]  # 8 of 10
    unknown = [reading("hn-aq-2", 10 + t, 60.0) for t in range(10)]  # a source with no interval
    registered = [reading("hn-aq-3", t, 60.0) for t in (0, 2, 4, 6)]  # 4 of 5
    other = Outcome(RawMessage("other/d2/up", b"{}", T0, 1, 9, 1, 9, False), "other", unknown)
    result = await w.write(outcome(2, thin + full), other, outcome(3, registered))
    # Judged now: hn-aq-1's thin window and hn-aq-3's window of its reading at -30 min (one of 3.75).
    assert judged(result) == (3, NOTHING, 0, 0, 2, 0)
    d1, m = await ids(pool, "hn-aq-1")
    d2, _ = await ids(pool, "hn-aq-2")
    d3, _ = await ids(pool, "hn-aq-3")
    v = covered.version
    assert await state(pool) == sorted([
        ("pm25-high", d1, m, "ok", None, at(6), None, at(10), at(20), v),
        ("pm25-high", d2, m, "ok", None, None, None, None, at(20), v),
        ("pm25-high", d3, m, "ok", None, at(-30), None, at(-20), at(10), v),
    ])
    clock.now = at(26)  # a lateness after the batch: the windows of the latest readings are judged
    assert judged(await w.round(pool)) == (3, Counter({("pm25-high", "firing"): 2}), 0, 0, 1, 4)
    assert [e[1:6] for e in await happened(pool)] == sorted(
        [(d1, m, "firing", at(20), at(20)), (d3, m, "firing", at(10), at(10))])
    # The thin window and the window of the unknown interval are passed over, not waited for.
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


# 8. Arrival as well as event time (R2 B1, B2) ------------------------------------------------------------------


async def seen(pool: asyncpg.Pool) -> list[tuple[Any, ...]]:
    """alert_state: (rule, device, metric, seen_at): when a reading of each series last arrived."""
    return [tuple(r) for r in await pool.fetch(
        "SELECT rule, device_id, metric_id, seen_at FROM alert_state ORDER BY rule, device_id, metric_id")]


@pytest.mark.asyncio
async def test_a_device_whose_clock_runs_two_hours_behind_is_not_silent_while_it_reports(pool: asyncpg.Pool) -> None:
    # A reading a minute, each timed 2 h before it arrives: each is judged as it is stored (the
    # watermark passed it long ago), so its series' last reading is always 2 h old, far more than the
    # rule's 15 min; but something arrived within the 15 min, so the device is not silent.
    clock = Clock(at(120))
    w = worker(pool, rules(SILENT, no_data_grace=0.0), clock)
    for k in range(20):
        clock.now = at(120 + k)
        assert judged(await w.write(outcome(k + 1, [level("hn-wl-1", k, 1.2)]))) == (1, NOTHING, 0, 0, 0, 0)
        clock.now = at(120.5 + k)
        assert judged(await w.round(pool)) == (0, NOTHING, 0, 0, 0, 0)
    d = await pool.fetchval("SELECT id FROM devices WHERE uid = 'hn-wl-1'")
    m = await pool.fetchval("SELECT id FROM metrics WHERE name = 'water_level'")
    assert await seen(pool) == [("level-silent", d, m, at(139))]  # the stage's clock at the last batch
    assert await state(pool) == [("level-silent", d, m, "ok", None, at(19), None, None, None, SILENT.version)]
    # It stops. 15 min after the last arrival: not yet; just past: fires once, at last reading + 15 min
    # (2 h ago, and sent all the same: the device is silent now).
    clock.now = at(154)
    assert judged(await w.round(pool)) == (0, NOTHING, 0, 0, 0, 0)
    clock.now = at(154.5)
    assert judged(await w.round(pool)) == (1, SILENCE, 0, 0, 0, 1)
    clock.now = at(200)
    assert judged(await w.round(pool)) == (0, NOTHING, 0, 0, 0, 0)
    # It comes back: the resolved is at its (2 h old) reading, and sent too.
    clock.now = at(201)
    back = await w.write(outcome(30, [level("hn-wl-1", 81, 1.3)]))
    assert judged(back) == (1, Counter({("level-silent", "resolved"): 1}), 0, 0, 0, 1)
    assert await happened(pool) == [
        ("level-silent", d, m, "firing", at(34), at(34), (153.5 - 19) * 60, 900.0, "warning", True),
        ("level-silent", d, m, "resolved", at(81), at(34), 62 * 60.0, 900.0, "warning", True),
    ]
    assert [(b["status"], b["event_time"]) for _, _, b in await bodies(pool)] == [
        ("firing", "2026-11-25T03:34:00Z"), ("resolved", "2026-11-25T04:21:00Z")]


@pytest.mark.asyncio
async def test_the_resolved_of_a_silence_is_sent_however_old_its_time(pool: asyncpg.Pool) -> None:
    # A gateway away for 2 h: the job fires promptly (event time T0 + 15 min). Back, the gateway uploads
    # its buffer from T0 + 1 min on: the silence ends at its start, T0 + 15 min, which is now 2 h old,
    # older than alerts.max_notify_age (1 h). The receiver must get it, or the alert stays open there.
    clock = Clock(at(0))
    w = worker(pool, rules(SILENT, no_data_grace=0.0), clock)
    d, m = await _silent_series(pool, w, clock)
    assert judged(await w.round(pool)) == (1, SILENCE, 0, 0, 0, 1)
    clock.now = at(135)
    buffer = [level("hn-wl-1", t, 1.2) for t in range(1, 135, 5)]  # every 5 min from T0 + 1 min
    back = await w.write(outcome(2, buffer))
    assert judged(back) == (1, Counter({("level-silent", "resolved"): 1}), 0, 0, 0, 1)
    assert await happened(pool) == [
        ("level-silent", d, m, "firing", at(15), at(15), 1740.0, 900.0, "warning", True),
        ("level-silent", d, m, "resolved", at(15), at(15), 60.0, 900.0, "warning", True),
    ]
    assert [(hook, b["status"], b["starts_at"], b["ends_at"]) for _, hook, b in await bodies(pool)] == [
        ("city-ops", "firing", "2026-11-25T03:15:00Z", None),
        ("city-ops", "resolved", "2026-11-25T03:15:00Z", "2026-11-25T03:15:00Z"),
    ]
    assert await state(pool) == [("level-silent", d, m, "ok", None, at(131), 60.0, None, None, SILENT.version)]


# 9. The grace after an outage and after a reload (R2 B3, B4) ---------------------------------------------------

NOT_TAKING = "the service is not taking messages"


def outages(caplog: pytest.LogCaptureFixture) -> int:
    return sum(NOT_TAKING in r.getMessage() for r in caplog.records if r.name == "ingest.alerts.evaluator")


@pytest.mark.asyncio
async def test_the_grace_starts_again_while_the_service_is_not_taking_messages(
        pool: asyncpg.Pool, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="ingest.alerts.evaluator")
    up = [True]
    clock = Clock(at(0))
    w = worker(pool, rules(SILENT, no_data_grace=120.0), clock, ready=lambda: up[0])
    d, m = await _silent_series(pool, w, clock)  # silent for 29 min: fires once the grace allows
    start = w.evaluator.started
    w.ticks.now = start + 60
    assert judged(await w.round(pool)) == (0, NOTHING, 0, 0, 0, 0)
    # The broker or the database goes away 100 s after the start, for 100 s: past the first grace, and
    # still nothing is judged.
    up[0] = False
    for after in (100.0, 130.0, 170.0, 200.0):
        w.ticks.now = start + after
        assert judged(await w.round(pool)) == (0, NOTHING, 0, 0, 0, 0)
    assert outages(caplog) == 1  # once per outage, not per round
    # Back at the round at 201 s, after 101 s away (from the first round that found it away): no silence
    # is judged for as long as it was away, 101 s (less than the grace of 120 s).
    up[0] = True
    w.ticks.now = start + 201
    assert judged(await w.round(pool)) == (0, NOTHING, 0, 0, 0, 0)
    w.ticks.now = start + 201 + 100
    assert judged(await w.round(pool)) == (0, NOTHING, 0, 0, 0, 0)
    w.ticks.now = start + 201 + 101
    assert judged(await w.round(pool)) == (1, SILENCE, 0, 0, 0, 1)
    assert [e[:6] for e in await happened(pool)] == [("level-silent", d, m, "firing", at(15), at(15))]
    assert outages(caplog) == 1
    # A second outage is logged again, once.
    up[0] = False
    for after in (400.0, 401.0):
        w.ticks.now = start + after
        assert judged(await w.round(pool)) == (0, NOTHING, 0, 0, 0, 0)
    assert outages(caplog) == 2


@pytest.mark.asyncio
async def test_a_blip_of_the_service_costs_the_no_data_job_a_blip_not_the_grace(pool: asyncpg.Pool) -> None:
    # An hour after the start, one round finds the service not taking messages (a retried write, say)
    # and the next finds it back: the job then waits as long as it was away, not the whole grace.
    up = [True]
    clock = Clock(at(0))
    w = worker(pool, rules(SILENT, no_data_grace=900.0), clock, ready=lambda: up[0])
    await _silent_series(pool, w, clock)  # silent for 29 min: due to fire
    start = w.evaluator.started
    up[0] = False
    w.ticks.now = start + 3600.0
    assert judged(await w.round(pool))[1] == NOTHING
    up[0] = True
    w.ticks.now = start + 3600.5  # back after 0.5 s: the job waits 0.5 s, not 900 s
    assert judged(await w.round(pool))[1] == NOTHING
    w.ticks.now = start + 3601.0
    assert judged(await w.round(pool))[1] == SILENCE


BATTERY_SILENT = Rule("battery-silent", "battery", "above", 7 * 86400.0, webhooks=("city-ops",), signal="no_data")


@pytest.mark.asyncio
async def test_a_reload_during_the_grace_does_not_lengthen_it(pool: asyncpg.Pool) -> None:
    # The grace is the longest no_data duration of the rules at the start (15 min here); a reload that
    # adds a rule of 7 days during it does not hold the 15 min rule back for a week.
    clock = Clock(at(0))
    w = worker(pool, rules(SILENT), clock)
    d, m = await _silent_series(pool, w, clock)
    start = w.evaluator.started
    w.ticks.now = start + 600
    assert judged(await w.round(pool)) == (0, NOTHING, 0, 0, 0, 0)
    w.stage.runtime.replace(rules(SILENT, BATTERY_SILENT))
    w.ticks.now = start + 899
    assert judged(await w.round(pool)) == (0, NOTHING, 0, 0, 0, 0)
    w.ticks.now = start + 900
    assert judged(await w.round(pool)) == (1, SILENCE, 0, 0, 0, 1)
    assert [e[:6] for e in await happened(pool)] == [("level-silent", d, m, "firing", at(15), at(15))]


# 10. A past clock window back-filled over several batches (R2 B5) -------------------------------------------------


@pytest.mark.asyncio
async def test_a_past_window_back_filled_in_two_batches_is_judged_once_on_both(pool: asyncpg.Pool) -> None:
    # [0, 10) ended 110 minutes ago. Its readings come in two batches 15 s apart: 90 x 5, then 60 x 5.
    # The mean is 75; judged on the first batch it would be 90, and the second batch would be late.
    clock = Clock(at(120))
    w = worker(pool, rules(WINDOW, max_notify_age=3 * 3600.0), clock)  # notified, though 2 h old
    assert judged(await w.write(outcome(1, [reading("hn-aq-1", t, 90.0) for t in range(5)]))) == (
        1, NOTHING, 0, 0, 0, 0)
    d, m = await ids(pool, "hn-aq-1")
    v = WINDOW.version
    [waits] = await state(pool)
    assert (waits[:8], waits[9]) == (("pm25-high", d, m, "ok", None, None, None, None), v)
    assert waits[8] is not None  # due_at: something waits
    assert await seen(pool) == [("pm25-high", d, m, at(120))]
    clock.now = at(120.25)
    assert judged(await w.write(outcome(2, [reading("hn-aq-1", t, 60.0) for t in range(5, 10)]))) == (
        1, NOTHING, 0, 0, 0, 0)
    assert await seen(pool) == [("pm25-high", d, m, at(120.25))]
    # 45 s after the last arrival (the lateness is 60 s): the window still waits.
    clock.now = at(121)
    assert (await w.round(pool)).events == NOTHING
    assert await count(pool, "alert_events") == 0
    # A lateness after it: judged once, on all ten readings.
    clock.now = at(121.25)
    assert judged(await w.round(pool)) == (1, FIRED, 0, 0, 0, 2)
    assert await happened(pool) == [("pm25-high", d, m, "firing", at(10), at(10), 75.0, 55.5, "critical", True)]
    assert await state(pool) == [("pm25-high", d, m, "firing", at(10), at(9), 75.0, at(10), None, v)]
    clock.now = at(130)
    assert judged(await w.round(pool)) == (0, NOTHING, 0, 0, 0, 0)


@pytest.mark.asyncio
async def test_a_round_ends_while_more_back_filled_windows_wait_than_one_claim_takes(
        pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    # Five devices back-fill [0, 10) at once (a gateway fleet after an outage); a claim takes 2. Within
    # the lateness of their arrival the windows wait: a round must still end (the bound of 30 s in
    # Worker.round is a bound on a hang), and the next round after the lateness judges them all.
    monkeypatch.setattr(evaluator_module, "CLAIM", 2)
    clock = Clock(at(120))
    w = worker(pool, rules(WINDOW, max_notify_age=3 * 3600.0), clock)
    fleet = [reading(f"hn-aq-{i}", t, 90.0) for i in range(1, 6) for t in range(10)]
    assert judged(await w.write(outcome(1, fleet))) == (5, NOTHING, 0, 0, 0, 0)
    clock.now = at(120.5)
    assert (await w.round(pool)).events == NOTHING
    clock.now = at(121)
    assert judged(await w.round(pool)) == (5, Counter({("pm25-high", "firing"): 5}), 0, 0, 0, 10)
    assert [s[3] for s in await state(pool)] == ["firing"] * 5


# 11. Series a rule no longer selects (R2 B6) -------------------------------------------------------------------


@pytest.mark.asyncio
async def test_a_reload_that_narrows_devices_takes_the_others_out_of_the_no_data_job(
        pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(evaluator_module, "CLAIM", 2)  # more dropped series than one claim takes
    wide, narrow = replace(SILENT, devices=("hn-wl-*",)), replace(SILENT, devices=("hn-wl-0*",))
    clock = Clock(at(1))
    w = worker(pool, rules(wide, no_data_grace=0.0), clock)
    kept, dropped = ["hn-wl-01", "hn-wl-02"], [f"hn-wl-{i}" for i in range(1, 6)]
    assert judged(await w.write(outcome(1, [level(u, 0, 1.2) for u in kept + dropped]))) == (7, NOTHING, 0, 0, 0, 0)
    assert await count(pool, "alert_state") == 7
    w.stage.runtime.replace(rules(narrow, no_data_grace=0.0))
    clock.now = at(30)  # all seven silent for 29 min
    assert judged(await w.round(pool)) == (2, Counter({("level-silent", "firing"): 2}), 0, 0, 0, 2)
    uids = {i: u for i, u in await pool.fetch("SELECT id, uid FROM devices")}
    assert sorted((uids[s[1]], s[3]) for s in await state(pool)) == [("hn-wl-01", "firing"), ("hn-wl-02", "firing")]
    assert sorted(uids[e[1]] for e in await happened(pool)) == kept
    clock.now = at(60)
    assert judged(await w.round(pool)) == (0, NOTHING, 0, 0, 0, 0)
    assert await count(pool, "alert_events") == 2


@pytest.mark.asyncio
async def test_due_readings_of_a_series_the_rule_no_longer_selects_are_not_judged(
        pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    monkeypatch.setattr(evaluator_module, "CLAIM", 2)
    wide, narrow = pm25(devices=("hn-aq-*",), clear=None), pm25(devices=("hn-aq-0*",), clear=None)
    clock = Clock(at(10))  # the watermark: at(9)
    w = worker(pool, rules(wide), clock)
    # hn-aq-1 fires now; then every device has a breach (hn-aq-1: a clear) waiting for the watermark.
    assert judged(await w.write(outcome(1, [reading("hn-aq-1", 5, 60.0)]))) == (1, FIRED, 0, 0, 0, 2)
    dropped = [f"hn-aq-{i}" for i in range(2, 6)]
    waiting = [reading("hn-aq-01", 9.5, 60.0), reading("hn-aq-1", 9.5, 40.0)] + [reading(u, 9.5, 70.0)
                                                                                for u in dropped]
    assert judged(await w.write(outcome(2, waiting))) == (0, NOTHING, 0, 0, 0, 0)
    w.stage.runtime.replace(rules(narrow))
    clock.now = at(11)
    assert judged(await w.round(pool)) == (1, FIRED, 0, 0, 0, 2)
    uids = {i: u for i, u in await pool.fetch("SELECT id, uid FROM devices")}
    assert [(uids[e[1]], e[3], e[4]) for e in await happened(pool)] == [("hn-aq-1", "firing", at(5)),
                                                                        ("hn-aq-01", "firing", at(9.5))]
    # The dropped ok states are gone; hn-aq-1's open episode stays as it was, nothing waiting.
    rows = {uids[s[1]]: s for s in await state(pool)}
    assert sorted(rows) == ["hn-aq-01", "hn-aq-1"]
    assert rows["hn-aq-1"][3:10] == ("firing", at(5), at(5), 60.0, None, None, wide.version)
    assert rows["hn-aq-01"][3:10] == ("firing", at(9.5), at(9.5), 60.0, None, None, vv(narrow))
    clock.now = at(20)
    assert judged(await w.round(pool)) == (0, NOTHING, 0, 0, 0, 0)


@pytest.mark.asyncio
async def test_a_device_whose_attributes_no_longer_match_where_is_not_paged_for_while_it_reports(
        pool: asyncpg.Pool) -> None:
    rule = replace(SILENT, where=(("district", "hoan-kiem"),))
    clock = Clock(at(1))
    w = worker(pool, rules(rule, no_data_grace=0.0), clock)
    moved = {"district": "ba-dinh"}
    assert judged(await w.write(outcome(1, [level("hn-wl-1", 0, 1.2)], attributes={"district": "hoan-kiem"}),
                                outcome(2, [level("hn-wl-2", 0, 1.2)], attributes={"district": "hoan-kiem"}))) == (
        2, NOTHING, 0, 0, 0, 0)
    # hn-wl-1 moves to another district and goes on reporting every 5 min; the rule no longer takes its
    # readings. hn-wl-2 falls silent.
    for k, t in enumerate(range(5, 31, 5)):
        clock.now = at(t + 0.5)
        ignored = await w.write(outcome(10 + k, [level("hn-wl-1", t, 1.2)], attributes=moved))
        assert ignored is None or judged(ignored) == (0, NOTHING, 0, 0, 0, 0)  # the stage takes none of it
    clock.now = at(31)
    assert judged(await w.round(pool)) == (1, SILENCE, 0, 0, 0, 1)
    d2 = await pool.fetchval("SELECT id FROM devices WHERE uid = 'hn-wl-2'")
    assert [(e[1], e[3]) for e in await happened(pool)] == [(d2, "firing")]
    assert [(s[1], s[3]) for s in await state(pool)] == [(d2, "firing")]


@pytest.mark.asyncio
async def test_a_reload_that_moves_a_rule_to_another_metric_leaves_the_old_series(pool: asyncpg.Pool) -> None:
    # Same name, another metric: the series of water_level are no longer the rule's; nothing fires for
    # them and their states go. A series of the new metric is the rule's from its first reading.
    clock = Clock(at(1))
    w = worker(pool, rules(SILENT, no_data_grace=0.0), clock)
    assert judged(await w.write(outcome(1, [level("hn-wl-1", 0, 1.2), level("hn-wl-2", 0, 1.2)]))) == (
        2, NOTHING, 0, 0, 0, 0)
    flow = replace(SILENT, metric="flow")
    w.stage.runtime.replace(rules(flow, no_data_grace=0.0))
    assert judged(await w.write(outcome(2, [Reading("hn-wl-1", "flow", at(0), 3.0, "m3/s")]))) == (
        1, NOTHING, 0, 0, 0, 0)
    clock.now = at(30)
    assert judged(await w.round(pool)) == (1, SILENCE, 0, 0, 0, 1)
    d = await pool.fetchval("SELECT id FROM devices WHERE uid = 'hn-wl-1'")
    f = await pool.fetchval("SELECT id FROM metrics WHERE name = 'flow'")
    assert [e[1:4] for e in await happened(pool)] == [(d, f, "firing")]
    assert [s[1:4] for s in await state(pool)] == [(d, f, "firing")]


# 12. The Alertmanager body of each kind (R2 D5) ----------------------------------------------------------------

AM = Webhook("am", "http://127.0.0.1:9/am", secrets.token_bytes(24), body="alertmanager",
             external_url="http://ingest.example/")


@pytest.mark.asyncio
async def test_an_alertmanager_body_describes_a_silence_a_rate_and_a_window_in_their_words(pool: asyncpg.Pool) -> None:
    rising = pm25(name="pm25-rising", signal="rate", over=600.0, threshold=1.0, clear=None, webhooks=("am",))
    hourly = pm25(name="pm25-10m", signal="window", agg="avg", over=600.0, align="clock", webhooks=("am",))
    silent = replace(DEVICE_SILENT, webhooks=("am",))
    clock = Clock(at(11))
    w = worker(pool, rules(rising, hourly, silent, no_data_grace=0.0, hooks={"am": AM}), clock)
    # 60, 60, 75 at 0, 5, 10 min: the rate at 10 min is 1.5/min (fires); [0, 10) averages 60 (fires,
    # judged now: a later reading is stored).
    first = await w.write(outcome(1, [reading("hn-aq-1", t, v) for t, v in ((0, 60.0), (5, 60.0), (10, 75.0))]))
    # (the reading at 0 has no reference for a rate: not judged)
    assert judged(first) == (3, Counter({("pm25-rising", "firing"): 1, ("pm25-10m", "firing"): 1}), 0, 0, 1, 2)
    clock.now = at(30)  # silent since 10 min: fires at 25 min
    assert judged(await w.round(pool))[1] == Counter({("device-silent", "firing"): 1})
    clock.now = at(32)
    back = await w.write(outcome(2, [Reading("hn-aq-1", "pm10", at(31), 30.0, UNIT)]))
    assert judged(back) == (1, Counter({("device-silent", "resolved"): 1}), 0, 0, 0, 1)
    sent = {(b["alerts"][0]["labels"]["alertname"], b["status"]): b for _, hook, b in await bodies(pool)
            if hook == "am"}
    said = {k: (b["alerts"][0]["annotations"]["summary"], b["alerts"][0]["annotations"]["description"],
                b["alerts"][0]["labels"]["metric"]) for k, b in sent.items()}
    assert said == {
        ("pm25-rising", "firing"): (
            "PM2.5 at hn-aq-1 is 1.5 µg/m³/min (threshold 1.0)",
            "pm25-rising: the rate of change of hn-aq-1 pm2_5 over 600 s is 1.5 µg/m³/min (threshold 1 µg/m³/min)",
            "pm2_5"),
        ("pm25-10m", "firing"): (
            "PM2.5 at hn-aq-1 is 60.0 µg/m³ (threshold 55.5)",
            "pm25-10m: the avg of hn-aq-1 pm2_5 over 600 s (clock) is 60 µg/m³ (threshold 55.5 µg/m³)",
            "pm2_5"),
        ("device-silent", "firing"): (
            "device-silent: no reading from hn-aq-1 for 1140 s (threshold 900 s)",
            "device-silent: no reading from hn-aq-1 for 1140 s (threshold 900 s)", "*"),
        ("device-silent", "resolved"): (
            "device-silent: hn-aq-1 reports again after 1260 s of silence",
            "device-silent: hn-aq-1 reports again after 1260 s of silence", "*"),
    }
    for b in sent.values():
        assert b["commonAnnotations"] == b["alerts"][0]["annotations"]
    assert sent[("device-silent", "firing")]["groupKey"] == \
        '{}:{alertname="device-silent", device="hn-aq-1", metric="*"}'



@pytest.mark.asyncio
async def test_windows_waiting_for_their_back_fill_do_not_hold_back_other_due_series(
        pool: asyncpg.Pool, monkeypatch: pytest.MonkeyPatch) -> None:
    # More series wait for their back-fill to stop than one claim takes, and they sort first (rule
    # "a-window"). A value breach of another device is due in this round: it must be judged in it, not
    # after the back-fill has stopped (a fleet uploading its buffers for minutes would hold every
    # other due series back that long).
    monkeypatch.setattr(evaluator_module, "CLAIM", 2)
    first = pm25(name="a-window", signal="window", agg="avg", over=600.0, align="clock", devices=("hn-aq-?",))
    clock = Clock(at(120.1))
    w = worker(pool, rules(first, pm25(devices=("hn-aq-99",)), max_notify_age=3 * 3600.0), clock)
    assert judged(await w.write(outcome(1, [reading("hn-aq-99", 120.05, 90.0)]))) == (0, NOTHING, 0, 0, 0, 0)
    clock.now = at(120.5)
    fleet = [reading(f"hn-aq-{i}", t, 90.0) for i in range(1, 4) for t in range(10)]
    assert judged(await w.write(outcome(2, fleet))) == (3, NOTHING, 0, 0, 0, 0)  # their windows wait
    clock.now = at(121.06)  # the watermark has passed the breach; the fleet's readings came 34 s ago
    assert (await w.round(pool)).events == Counter({("pm25-high", "firing"): 1})
    clock.now = at(121.5)  # a lateness after the fleet's last arrival: its windows are judged
    assert (await w.round(pool)).events == Counter({("a-window", "firing"): 3})


@pytest.mark.asyncio
async def test_the_broker_connecting_a_moment_after_the_start_does_not_shorten_the_start_grace(
        pool: asyncpg.Pool) -> None:
    up = [False]  # at the start the broker is not connected yet
    clock = Clock(at(0))
    w = worker(pool, rules(SILENT, no_data_grace=120.0), clock, ready=lambda: up[0])
    await _silent_series(pool, w, clock)
    start = w.evaluator.started
    w.ticks.now = start + 0.5
    assert judged(await w.round(pool))[1] == NOTHING
    up[0] = True
    for after in (2.0, 60.0, 119.0):  # connected after 2 s: the grace of the start still holds
        w.ticks.now = start + after
        assert judged(await w.round(pool))[1] == NOTHING
    w.ticks.now = start + 120.0
    assert judged(await w.round(pool))[1] == SILENCE
