"""Silences and acknowledgements (issue #16) on the real TimescaleDB, broker and HTTP receivers.

- end to end: the service as a process, readings over MQTT, silences and acks through the CLI, a
  real webhook receiver: a silenced episode delivers nothing; when the silence is expired while the
  alert fires, exactly one firing notification arrives, and the episode's resolved one after it;
- in process, with injected clocks: the writer's alert stage holds events back (which silences
  match, by rule, device glob, rule labels and device attributes; which do not: expired, not yet
  started, an event too old to notify), the end-of-silence job sends a held firing notification
  once when --until passes (through a real Dispatcher to a real receiver), sends nothing for an
  episode that resolved meanwhile, and skips a round while another worker holds its lock;
- the CLI against the database: silences add, list, expire and alerts ack, their JSON and exit
  statuses; an ack ends with its episode.
"""

from __future__ import annotations

import asyncio
import json
import secrets
from collections.abc import AsyncIterator, Iterator
from datetime import UTC, datetime, timedelta
from pathlib import Path
from typing import Any

import asyncpg
import psycopg
import pytest
import pytest_asyncio

from ingest.alerts.dispatch import CHANNEL, Dispatcher
from ingest.alerts.model import Rule, Webhook
from ingest.alerts.runtime import AlertRuntime, RuleSet
from ingest.alerts.silence import FIRST_AFTER, LOCK_KEY, Released, release_held, release_loop
from ingest.alerts.stage import AlertStage
from ingest.cli import main
from ingest.model import Reading
from ingest.settings import DatabaseSettings
from ingest.store.pool import create_pool
from ingest.store.writer import Writer
from tests.integration.harness import IngestProcess, Publisher, native, write_config
from tests.integration.test_alert_stage import UNIT, body, outcome
from tests.integration.test_alerts_e2e import SECRET_ENV, alerts_config, new_secret
from tests.services import Mosquitto, until, wait_until
from tests.webhook_receiver import WebhookReceiver

pytestmark = pytest.mark.integration

T0 = datetime(2026, 11, 25, 3, 0, tzinfo=UTC)
NOW = T0 + timedelta(minutes=10)  # the stage's clock unless a test moves it
END = T0 + timedelta(minutes=30)  # a test silence's end unless it says otherwise
WAIT = 60.0  # only bounds a hang


def at(minutes: float) -> datetime:
    return T0 + timedelta(minutes=minutes)


def pm25(**changes: Any) -> Rule:
    base: dict[str, Any] = {
        "name": "pm25-high", "metric": "pm2_5", "kind": "above", "threshold": 55.5, "clear": 50.0,
        "severity": "critical", "webhooks": ("city-ops", "backup"),
        "summary": "PM2.5 at {device} is {value} {unit} (threshold 55.5)", "labels": (("team", "environment"),),
        "devices": ("hn-aq-*",),
    }
    return Rule(**{**base, **changes})


LEVEL = Rule("level-high", "level", "above", 5.0, severity="warning", webhooks=("city-ops",),
             labels=(("team", "hydro"),))


def pm(device: str, minutes: float, value: float) -> Reading:
    return Reading(device, "pm2_5", at(minutes), value, UNIT, 0)


class Clock:
    def __init__(self, now: datetime = NOW) -> None:
        self.now = now

    def __call__(self) -> datetime:
        return self.now


@pytest.fixture
def receiver() -> Iterator[WebhookReceiver]:
    r = WebhookReceiver().up()
    yield r
    r.close()


@pytest.fixture
def hooks(receiver: WebhookReceiver) -> dict[str, Webhook]:
    key = secrets.token_bytes(24)
    return {"city-ops": Webhook("city-ops", receiver.url("/ops"), key),
            "backup": Webhook("backup", receiver.url("/backup"), key)}


@pytest_asyncio.fixture
async def pool(database_url: str) -> AsyncIterator[asyncpg.Pool]:
    p = await create_pool(DatabaseSettings(url=database_url))
    yield p
    await p.close()


def writer_of(pool: asyncpg.Pool, hooks: dict[str, Webhook], *rules: Rule, clock: Clock | None = None,
              max_notify_age: float = 3600.0) -> Writer:
    runtime = AlertRuntime(RuleSet(rules or (pm25(),), dict(hooks), max_notify_age=max_notify_age))
    return Writer(pool, alerts=AlertStage(runtime, clock=clock or Clock()))


async def silence(pool: asyncpg.Pool, *, rule: str | None = None, device: str | None = None,
                  labels: dict[str, str] | None = None, starts: datetime = T0, ends: datetime = END,
                  expired: datetime | None = None) -> int:
    sid = await pool.fetchval(
        "INSERT INTO silences (rule, device, labels, starts_at, ends_at, expired_at, comment, created_by)"
        " VALUES ($1, $2, $3::jsonb, $4, $5, $6, 'test', 'tester') RETURNING id",
        rule, device, json.dumps(labels or {}), starts, ends, expired)
    assert isinstance(sid, int)
    return sid


async def uid_of(pool: asyncpg.Pool, device_id: int) -> str:
    uid = await pool.fetchval("SELECT uid FROM devices WHERE id = $1", device_id)
    assert isinstance(uid, str)
    return uid


async def events(pool: asyncpg.Pool) -> list[tuple[Any, ...]]:
    """(id, device, status, event_time, notified, silenced_by, released_at), in order."""
    return [tuple(r) for r in await pool.fetch(
        "SELECT e.id, d.uid, e.status, e.event_time, e.notified, e.silenced_by, e.released_at"
        " FROM alert_events e JOIN devices d ON d.id = e.device_id ORDER BY e.id")]


async def outbox(pool: asyncpg.Pool) -> list[tuple[Any, ...]]:
    """(id, event_id, webhook, body), in order."""
    return [(r[0], r[1], r[2], json.loads(r[3])) for r in await pool.fetch(
        "SELECT id, event_id, webhook, body::text FROM alert_outbox ORDER BY id")]


async def held(pool: asyncpg.Pool) -> list[tuple[Any, ...]]:
    """(device, event_id, starts_at, silenced_by, labels, outbox) of each held series."""
    return [(r[0], r[1], r[2], r[3], json.loads(r[4]), json.loads(r[5])) for r in await pool.fetch(
        "SELECT d.uid, h.event_id, h.starts_at, h.silenced_by, h.labels::text, h.outbox::text"
        " FROM alert_held h JOIN devices d ON d.id = h.device_id ORDER BY d.uid")]


async def release(pool: asyncpg.Pool, now: datetime) -> Released | None:
    async with pool.acquire() as conn:
        return await release_held(conn, now)


# --- the stage holds back what an active silence matches --------------------------------------------


@pytest.mark.asyncio
async def test_the_stage_holds_back_what_an_active_silence_matches(pool: asyncpg.Pool,
                                                                   hooks: dict[str, Webhook]) -> None:
    writer = writer_of(pool, hooks, pm25(devices=()), LEVEL)
    by_district = await silence(pool, labels={"district": "hoan-kiem"})  # a device attribute
    by_glob = await silence(pool, device="hn-aq-0?")
    by_rule_label = await silence(pool, labels={"team": "hydro"})  # LEVEL's label
    by_both = await silence(pool, rule="pm25-high", device="sg-*")
    await silence(pool, rule="pm25-high", expired=NOW)  # expired at the stage's now: ended (the end is exclusive)
    await silence(pool, rule="pm25-high", starts=NOW + timedelta(seconds=1))  # not started yet
    await silence(pool, rule="pm25-high", ends=NOW)  # ended at now
    level = Reading("hn-lv-01", "level", at(1), 7.0, "m", 0)
    result = await writer.write([
        outcome(1, [pm("hn-aq-1", 1, 60.0)], attributes={"district": "hoan-kiem"}),
        outcome(2, [pm("hn-aq-02", 1, 60.0)]),
        outcome(3, [pm("hn-aq-3", 1, 60.0)], attributes={"district": "ba-dinh"}),  # nothing matches: notified
        outcome(4, [pm("sg-aq-1", 1, 60.0)]),
        outcome(5, [level]),
    ])
    assert result.alerts is not None
    assert (result.alerts.silenced, result.alerts.notified, result.alerts.outbox) == (4, 1, 2)
    by_device = {e[1]: (e[4], e[5]) for e in await events(pool)}
    assert by_device == {"hn-aq-1": (False, by_district), "hn-aq-02": (False, by_glob), "hn-aq-3": (True, None),
                         "sg-aq-1": (False, by_both), "hn-lv-01": (False, by_rule_label)}
    assert {(e, w) for _, e, w, _ in await outbox(pool)} == {
        (eid, w) for eid, uid, *_ in await events(pool) if uid == "hn-aq-3" for w in ("backup", "city-ops")}
    # Each held event's outbox rows wait in alert_held, exactly the stage's bodies, with the labels matched.
    stored = await held(pool)
    assert [h[0] for h in stored] == ["hn-aq-02", "hn-aq-1", "hn-lv-01", "sg-aq-1"]
    _, eid, starts, sid, labels, rows = stored[1]
    assert (starts, sid) == (at(1), by_district)
    assert labels == {"district": "hoan-kiem", "team": "environment", "alertname": "pm25-high", "rule": "pm25-high",
                      "device": "hn-aq-1", "metric": "pm2_5", "severity": "critical"}
    expected = body(eid, "firing", "hn-aq-1", 60.0, at(1), at(1), {"district": "hoan-kiem"})
    series = rows[0][1]
    assert rows == [["city-ops", series, expected], ["backup", series, expected]]
    assert [len(h[5]) for h in stored] == [2, 2, 1, 2]  # LEVEL has one webhook


@pytest.mark.asyncio
async def test_an_event_too_old_to_notify_is_not_held(pool: asyncpg.Pool, hooks: dict[str, Webhook]) -> None:
    writer = writer_of(pool, hooks, clock=Clock(T0 + timedelta(hours=2)))  # max_notify_age 1 h: minute 1 is history
    await silence(pool, rule="pm25-high", ends=T0 + timedelta(hours=3))
    result = await writer.write([outcome(1, [pm("hn-aq-1", 1, 60.0)])])
    assert result.alerts is not None
    assert (result.alerts.silenced, result.alerts.notified) == (0, 0)
    assert [e[4:6] for e in await events(pool)] == [(False, None)]
    assert await held(pool) == []


@pytest.mark.asyncio
async def test_a_silence_added_while_an_episode_fires_lets_its_resolved_event_through(
        pool: asyncpg.Pool, hooks: dict[str, Webhook]) -> None:
    writer = writer_of(pool, hooks)
    await writer.write([outcome(1, [pm("hn-aq-1", 1, 60.0)])])
    await silence(pool, rule="pm25-high")
    result = await writer.write([outcome(2, [pm("hn-aq-1", 2, 40.0)])])
    assert result.alerts is not None
    assert (result.alerts.silenced, result.alerts.notified, result.alerts.outbox) == (0, 1, 2)
    assert [(e[2], e[4], e[5]) for e in await events(pool)] == [("firing", True, None), ("resolved", True, None)]
    # The receivers heard of the episode: they hear of its end, or they would keep it open forever.
    assert [(w, b["status"]) for _, _, w, b in await outbox(pool)] == [
        ("city-ops", "firing"), ("backup", "firing"), ("city-ops", "resolved"), ("backup", "resolved")]


# --- the end-of-silence job -----------------------------------------------------------------------------


@pytest.mark.asyncio
async def test_when_until_passes_while_it_fires_one_firing_notification_is_delivered(
        database_url: str, pool: asyncpg.Pool, hooks: dict[str, Webhook], receiver: WebhookReceiver) -> None:
    writer = writer_of(pool, hooks)
    sid = await silence(pool, device="hn-aq-1", ends=at(30))
    result = await writer.write([outcome(1, [pm("hn-aq-1", 1, 60.5)], attributes={"district": "hoan-kiem"})])
    assert result.alerts is not None
    assert (result.alerts.silenced, result.alerts.notified, result.alerts.outbox) == (1, 0, 0)
    [(eid, _, _, _, notified, by, released)] = await events(pool)
    assert (notified, by, released) == (False, sid, None)
    # Still firing, more readings: nothing new (no second event, the hold stays).
    await writer.write([outcome(2, [pm("hn-aq-1", 2, 70.0)])])
    assert await outbox(pool) == []

    assert await release(pool, at(29)) == Released(events=0, outbox=0, dropped=0, moved=0)  # not even a candidate
    assert await outbox(pool) == []
    listener = await asyncpg.connect(database_url)
    heard: list[str] = []
    await listener.add_listener(CHANNEL, lambda *args: heard.append(args[2]))
    try:
        # --until is exclusive: at 30 minutes the silence has ended.
        assert await release(pool, at(30)) == Released(events=1, outbox=2, dropped=0, moved=0)
        await until(lambda: heard == [CHANNEL], "the dispatcher woken once")
    finally:
        await listener.close()
    expected = body(eid, "firing", "hn-aq-1", 60.5, at(1), at(1), {"district": "hoan-kiem"})
    rows = await outbox(pool)
    assert [(e, w, b) for _, e, w, b in rows] == [(eid, "city-ops", expected), (eid, "backup", expected)]
    assert [e[4:] for e in await events(pool)] == [(True, sid, at(30))]
    assert await held(pool) == []
    assert await release(pool, at(31)) == Released(0, 0, 0, 0)  # once: the hold went with the enqueue

    async with Dispatcher(pool, hooks) as dispatcher:
        assert await dispatcher.run_once() == 2
        assert await dispatcher.run_once() == 0
    got = receiver.requests()
    assert sorted((d.path, d.webhook_id, d.status) for d in got) == sorted(
        [("/ops", f"msg_{rows[0][0]}", 200), ("/backup", f"msg_{rows[1][0]}", 200)])
    assert all(d.json() == expected for d in got)
    # The episode goes on after the silence: its resolved event is sent, after the firing one.
    done = await writer.write([outcome(3, [pm("hn-aq-1", 3, 40.0)])])
    assert done.alerts is not None
    assert (done.alerts.silenced, done.alerts.outbox) == (0, 2)


@pytest.mark.asyncio
async def test_a_held_episode_that_resolved_before_its_silence_ended_sends_nothing(
        pool: asyncpg.Pool, hooks: dict[str, Webhook]) -> None:
    clock = Clock()
    writer = writer_of(pool, hooks, clock=clock)
    sid = await silence(pool, rule="pm25-high", ends=at(30))
    await writer.write([outcome(1, [pm("hn-aq-1", 1, 60.0), pm("hn-aq-2", 1, 60.0)])])
    resolved = await writer.write([outcome(2, [pm("hn-aq-1", 2, 40.0)])])
    assert resolved.alerts is not None
    assert (resolved.alerts.silenced, resolved.alerts.notified, resolved.alerts.outbox) == (1, 0, 0)
    assert [(e[1], e[2], e[4], e[5]) for e in await events(pool)] == [
        ("hn-aq-1", "firing", False, sid), ("hn-aq-2", "firing", False, sid), ("hn-aq-1", "resolved", False, sid)]
    assert [h[0] for h in await held(pool)] == ["hn-aq-2"]
    # hn-aq-2's episode ends without a resolved event the stage saw (as when a series' state is reset):
    # the job drops its hold and sends nothing either.
    await pool.execute("UPDATE alert_state SET status = 'ok', episode_start = NULL FROM devices d"
                       " WHERE d.id = alert_state.device_id AND d.uid = 'hn-aq-2'")
    assert await release(pool, at(30)) == Released(events=0, outbox=0, dropped=1, moved=0)
    assert await outbox(pool) == []
    assert [e[4] for e in await events(pool)] == [False, False, False]
    assert await held(pool) == []
    # After the silence, a new episode is notified at once.
    clock.now = at(40)
    later = await writer.write([outcome(3, [pm("hn-aq-1", 35, 90.0)])])
    assert later.alerts is not None
    assert (later.alerts.silenced, later.alerts.notified, later.alerts.outbox) == (0, 1, 2)


@pytest.mark.asyncio
async def test_a_series_still_matched_by_another_silence_stays_held_by_it(pool: asyncpg.Pool,
                                                                          hooks: dict[str, Webhook], cli: Any) -> None:
    writer = writer_of(pool, hooks)
    first = await silence(pool, rule="pm25-high", ends=at(30))
    await writer.write([outcome(1, [pm("hn-aq-1", 1, 60.0)], attributes={"district": "hoan-kiem"})])
    second = await silence(pool, labels={"district": "hoan-kiem"}, starts=at(20), ends=at(60))  # added later, longer
    # Both active at 25: the hold is no candidate; at 45 only the second is: the hold passes to it.
    assert await release(pool, at(25)) == Released(events=0, outbox=0, dropped=0, moved=0)
    assert [h[3] for h in await held(pool)] == [first]
    assert await release(pool, at(45)) == Released(events=0, outbox=0, dropped=0, moved=1)
    assert [h[3] for h in await held(pool)] == [second]
    assert [e[5] for e in await events(pool)] == [first]  # the history keeps the silence that held it back
    # The lists name the silence that holds it now.
    status, alerts, _ = cli("alerts", "list", "--json")
    assert (status, [(a["alert"], a["silenced_by"]) for a in alerts]) == (0, [("pm25-high/hn-aq-1", second)])
    # Under its silence again, the hold is no candidate: the next round touches nothing.
    assert await release(pool, at(50)) == Released(events=0, outbox=0, dropped=0, moved=0)
    assert await outbox(pool) == []
    assert await release(pool, at(60)) == Released(events=1, outbox=2, dropped=0, moved=0)


@pytest.mark.asyncio
async def test_one_worker_runs_the_job_at_a_time(database_url: str, pool: asyncpg.Pool,
                                                 hooks: dict[str, Webhook]) -> None:
    writer = writer_of(pool, hooks)
    await silence(pool, rule="pm25-high", ends=at(30))
    await writer.write([outcome(1, [pm("hn-aq-1", 1, 60.0)])])
    other = await asyncpg.connect(database_url)  # another worker, in the middle of its round
    try:
        await other.execute("SELECT pg_advisory_lock($1)", LOCK_KEY)
        assert await release(pool, at(30)) is None
        assert len(await held(pool)) == 1
        assert await outbox(pool) == []
        await other.execute("SELECT pg_advisory_unlock($1)", LOCK_KEY)
    finally:
        await other.close()
    assert await release(pool, at(30)) == Released(events=1, outbox=2, dropped=0, moved=0)


async def _waiting(pool: asyncpg.Pool, query: str) -> int:
    """Backends of this database waiting for a lock in a statement that starts with ``query``."""
    n = await pool.fetchval("SELECT count(*) FROM pg_stat_activity WHERE datname = current_database()"
                            " AND wait_event_type = 'Lock' AND query LIKE $1", query + "%")
    assert isinstance(n, int)
    return n


async def _until_waiting(pool: asyncpg.Pool, query: str) -> None:
    for _ in range(3000):  # bounds a hang only
        if await _waiting(pool, query) == 1:
            return
        await asyncio.sleep(0.01)
    raise AssertionError(f"no backend waits in {query!r}")


@pytest.mark.asyncio
async def test_the_job_skips_a_series_a_batch_holds_and_sees_its_outcome_next_round(
        database_url: str, pool: asyncpg.Pool, hooks: dict[str, Webhook]) -> None:
    """The stage resolves the held episode while the job is about to release it: the job never
    waits for the batch (SKIP LOCKED), leaves the series to the next round, and then sees the
    episode ended and sends nothing."""
    writer = writer_of(pool, hooks)
    await silence(pool, rule="pm25-high", ends=at(30))
    await writer.write([outcome(1, [pm("hn-aq-1", 1, 60.0)])])
    tx_conn = await asyncpg.connect(database_url)
    try:
        tx = tx_conn.transaction()
        await tx.start()
        # The stage's transaction, paused after it locked and resolved the series.
        await tx_conn.execute("UPDATE alert_state SET status = 'ok', episode_start = NULL")
        assert await release(pool, at(30)) == Released(events=0, outbox=0, dropped=0, moved=0, busy=1)
        assert len(await held(pool)) == 1
        await tx.commit()
    finally:
        await tx_conn.close()
    assert await release(pool, at(30)) == Released(events=0, outbox=0, dropped=1, moved=0)
    assert await outbox(pool) == []
    assert await held(pool) == []


@pytest.mark.asyncio
async def test_a_batch_that_resolves_a_series_the_job_is_releasing_waits_and_sends_the_resolved(
        database_url: str, pool: asyncpg.Pool, hooks: dict[str, Webhook]) -> None:
    """The reverse order: the job has locked the series and is enqueueing its held firing when a batch
    resolves the episode. The batch waits for the job's commit, finds no hold, and sends the
    resolved event after the released firing one: the receivers see the episode open and close."""
    writer = writer_of(pool, hooks)
    await silence(pool, rule="pm25-high", ends=at(30))
    await writer.write([outcome(1, [pm("hn-aq-1", 1, 60.0)])])
    blocker = await asyncpg.connect(database_url)
    try:
        tx = blocker.transaction()
        await tx.start()
        # Pauses the job after it has locked the series: its INSERT INTO alert_outbox waits for this.
        await blocker.execute("LOCK TABLE alert_outbox IN SHARE MODE")
        job = asyncio.ensure_future(release(pool, at(30)))
        await _until_waiting(pool, "\nINSERT INTO alert_outbox")
        write = asyncio.ensure_future(writer.write([outcome(2, [pm("hn-aq-1", 2, 40.0)])]))
        await _until_waiting(pool, "\nSELECT s.rule, s.device_id")  # the stage's row lock waits for the job
        await tx.commit()
        assert await job == Released(events=1, outbox=2, dropped=0, moved=0)
        result = await write
    finally:
        await blocker.close()
    assert result.alerts is not None
    assert (result.alerts.silenced, result.alerts.notified, result.alerts.outbox) == (0, 1, 2)
    [firing, resolved] = await events(pool)
    assert (firing[2], firing[4], firing[6], resolved[2], resolved[4], resolved[5]) == (
        "firing", True, at(30), "resolved", True, None)
    assert [(e, w, b["status"]) for _, e, w, b in await outbox(pool)] == [
        (firing[0], "city-ops", "firing"), (firing[0], "backup", "firing"),
        (resolved[0], "city-ops", "resolved"), (resolved[0], "backup", "resolved")]


@pytest.mark.asyncio
async def test_an_episode_that_fires_and_resolves_within_one_batch_under_a_silence_sends_nothing(
        pool: asyncpg.Pool, hooks: dict[str, Webhook]) -> None:
    writer = writer_of(pool, hooks)
    sid = await silence(pool, rule="pm25-high", ends=at(30))
    result = await writer.write([outcome(1, [pm("hn-aq-1", 1, 60.0), pm("hn-aq-1", 2, 40.0)])])
    assert result.alerts is not None
    assert (result.alerts.silenced, result.alerts.notified, result.alerts.outbox) == (2, 0, 0)
    assert [(e[2], e[4], e[5]) for e in await events(pool)] == [("firing", False, sid), ("resolved", False, sid)]
    assert await outbox(pool) == []
    assert await held(pool) == []
    # Firing, resolved, firing in one batch: the last episode's firing is held, nothing is sent.
    again = await writer.write([outcome(2, [pm("hn-aq-2", 1, 60.0), pm("hn-aq-2", 2, 40.0),
                                            pm("hn-aq-2", 3, 70.0)])])
    assert again.alerts is not None
    assert (again.alerts.silenced, again.alerts.notified, again.alerts.outbox) == (3, 0, 0)
    second = [e for e in await events(pool) if e[1] == "hn-aq-2"]
    assert [(e[2], e[3], e[4], e[5]) for e in second] == [
        ("firing", at(1), False, sid), ("resolved", at(2), False, sid), ("firing", at(3), False, sid)]
    assert await outbox(pool) == []
    [(device, eid, starts, by, _, rows)] = await held(pool)
    assert (device, eid, starts, by) == ("hn-aq-2", second[2][0], at(3), sid)
    assert [r[2]["id"] for r in rows] == [f"evt_{second[2][0]}"] * 2
    # When the silence ends, that firing alone is sent; the first episodes never are.
    assert await release(pool, at(30)) == Released(events=1, outbox=2, dropped=0, moved=0)
    assert [(e, b["status"], b["event_time"]) for _, e, _, b in await outbox(pool)] == [
        (second[2][0], "firing", "2026-11-25T03:03:00Z")] * 2


@pytest.mark.asyncio
async def test_the_job_waits_first_after_before_its_first_round(pool: asyncpg.Pool,
                                                                hooks: dict[str, Webhook]) -> None:
    """After a start the redelivered backlog is written before the first round (``first_after``)."""
    writer = writer_of(pool, hooks)
    await silence(pool, rule="pm25-high", ends=at(30))
    await writer.write([outcome(1, [pm("hn-aq-1", 1, 60.0)])])
    slept: list[float] = []
    state: list[tuple[int, int]] = []

    async def sleep(seconds: float) -> None:  # records each wait and what the job had done by then
        slept.append(seconds)
        state.append((len(await held(pool)), len(await outbox(pool))))
        if len(slept) == 2:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await release_loop(lambda: pool, every=5.0, clock=Clock(at(31)), first_after=30.0, sleep=sleep)
    assert slept == [30.0, 5.0]
    assert state == [(1, 0), (0, 2)]  # nothing released before the first wait; released after it
    assert FIRST_AFTER == 30.0  # the service's default


@pytest.mark.asyncio
async def test_the_job_waits_while_judging_waits_for_a_backlog(pool: asyncpg.Pool,
                                                                hooks: dict[str, Webhook]) -> None:
    """While a worker drains a backlog (ingest.alerts.catchup holds judging) no round runs: the held
    episode may have resolved in readings not judged yet."""
    writer = writer_of(pool, hooks)
    await silence(pool, rule="pm25-high", ends=at(30))
    await writer.write([outcome(1, [pm("hn-aq-1", 1, 60.0)])])
    backlog = [True, True, False]
    state: list[tuple[int, int]] = []

    async def sleep(seconds: float) -> None:
        state.append((len(await held(pool)), len(await outbox(pool))))
        if len(state) == 4:
            raise asyncio.CancelledError

    with pytest.raises(asyncio.CancelledError):
        await release_loop(lambda: pool, every=5.0, clock=Clock(at(31)), first_after=0.0, sleep=sleep,
                           held=lambda: backlog.pop(0))
    # Before the first round, then after two held rounds (nothing), then after the round that ran.
    assert state == [(1, 0), (1, 0), (1, 0), (0, 2)]


# --- the CLI against the database ----------------------------------------------------------------------


@pytest.fixture
def cli(database_url: str, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]) -> Any:
    """``cli(*argv)``: (exit status, stdout as JSON when it parses, else text, stderr)."""
    monkeypatch.setenv("SENSOR_INGEST_DATABASE_URL", database_url)

    def run(*argv: str) -> tuple[int, Any, str]:
        status = main(list(argv))
        out, err = capsys.readouterr()
        try:
            return status, json.loads(out), err
        except ValueError:
            return status, out, err

    return run


def test_silences_add_warns_of_a_rule_nothing_knows(cli: Any, database_url: str) -> None:
    status, text, err = cli("silences", "add", "--rule", "pm25-hihg", "--until", "1h", "--comment", "typo")
    assert status == 0
    assert text.startswith("silence ")
    assert "warning: no rule 'pm25-hihg' is configured here and none has evaluated a series" in err
    with psycopg.connect(database_url, autocommit=True) as c:  # a rule the service has evaluated
        c.execute("INSERT INTO alert_state (rule, device_id, metric_id, status) VALUES ('pm25-high', 1, 1, 'ok')")
    status, _, err = cli("silences", "add", "--rule", "pm25-high", "--until", "1h", "--comment", "known")
    assert (status, err) == (0, "")


def test_silences_add_list_and_expire(cli: Any) -> None:
    status, added, _ = cli("silences", "add", "--rule", "level-high", "--device", "hn-lv-*", "--label",
                           "district=hoan-kiem", "--label", "team=hydro", "--until", "2h", "--comment",
                           "pump station maintenance, ticket 4711", "--by", "alice", "--json")
    assert status == 0
    assert (added["state"], added["rule"], added["device"], added["labels"], added["created_by"], added["comment"]) == (
        "active", "level-high", "hn-lv-*", {"district": "hoan-kiem", "team": "hydro"}, "alice",
        "pump station maintenance, ticket 4711")
    # Both ends on the database's clock: exactly the duration apart.
    assert datetime.fromisoformat(added["ends_at"]) - datetime.fromisoformat(added["starts_at"]) == timedelta(hours=2)
    year = datetime.now(UTC).year + 2
    status, text, err = cli("silences", "add", "--label", "severity=critical", "--until",
                            f"{year}-01-01T00:00:00+07:00", "--comment", "quiet night")
    assert (status, err) == (0, "")
    second = int(text.split()[1])
    assert text.startswith(f"silence {second} added: severity=critical, until {year - 1}-12-31 17:00:00Z")

    status, listed, _ = cli("silences", "list", "--json")
    assert status == 0
    assert [(s["id"], s["state"], s["holding"], s["events_silenced"]) for s in listed] == [
        (second, "active", 0, 0), (added["id"], "active", 0, 0)]
    status, text, _ = cli("silences", "list")
    assert status == 0
    assert text.startswith("active silences")
    assert "alice" in text

    status, expired, _ = cli("silences", "expire", str(added["id"]), "--json")
    assert (status, expired["state"], expired["id"]) == (0, "expired", added["id"])
    status, text, _ = cli("silences", "expire", str(added["id"]))
    assert status == 0
    assert text.startswith(f"silence {added['id']} had expired already, at ")
    status, _, err = cli("silences", "expire", "999999")
    assert status == 1
    assert "there is no silence 999999" in err

    assert [s["id"] for s in cli("silences", "list", "--json")[1]] == [second]
    assert [(s["id"], s["state"]) for s in cli("silences", "list", "--all", "--json")[1]] == [
        (second, "active"), (added["id"], "expired")]
    assert cli("silences", "list", "--all", "--limit", "1")[1].endswith("(the first 1; --limit N shows more)\n")


@pytest.mark.asyncio
async def test_an_ack_marks_the_firing_episode_and_ends_with_it(pool: asyncpg.Pool, hooks: dict[str, Webhook],
                                                                cli: Any) -> None:
    writer = writer_of(pool, hooks)
    await writer.write([outcome(1, [pm("hn-aq-1", 1, 60.0), pm("hn-aq-2", 1, 10.0)])])

    def listed(which: str = "--all") -> dict[str, dict[str, Any]]:
        status, rows, _ = cli("alerts", "list", which, "--json")
        assert status == 0
        return {r["alert"]: r for r in rows}

    assert listed()["pm25-high/hn-aq-1"]["acked_by"] is None
    status, ack, _ = cli("alerts", "ack", "pm25-high/hn-aq-1", "--comment", "team on site", "--by", "alice", "--json")
    assert status == 0
    assert (ack["alert"], ack["metric"], ack["acked_by"], ack["comment"]) == (
        "pm25-high/hn-aq-1", "pm2_5", "alice", "team on site")
    row = listed()["pm25-high/hn-aq-1"]
    assert (row["status"], row["acked_by"], row["ack_comment"], row["acked_at"]) == (
        "firing", "alice", "team on site", ack["acked_at"])
    status, text, _ = cli("alerts", "ack", "pm25-high/hn-aq-1", "--comment", "sensor cleaned", "--by", "bob")
    assert status == 0
    assert "by bob: sensor cleaned (replacing the ack by alice at " in text
    assert listed()["pm25-high/hn-aq-1"]["acked_by"] == "bob"
    table = cli("alerts", "list")[1]
    assert "pm25-high/hn-aq-1" in table
    assert "sensor cleaned" in table

    for alert, says in (("pm25-high/hn-aq-2", "is ok, not firing"), ("pm25-high/hn-aq-9", "no alert"),
                        ("level-high/hn-aq-1", "no alert")):
        status, _, err = cli("alerts", "ack", alert, "--comment", "x")
        assert status == 1
        assert says in err
    status, _, _ = cli("alerts", "ack", "pm25-high/hn-aq-1/pm2_5", "--comment", "by its metric too")
    assert status == 0

    # The episode ends: the ack with it; the next episode is not acknowledged.
    await writer.write([outcome(2, [pm("hn-aq-1", 2, 40.0)])])
    assert listed()["pm25-high/hn-aq-1"]["acked_by"] is None
    await writer.write([outcome(3, [pm("hn-aq-1", 3, 80.0)])])
    row = listed("--firing")["pm25-high/hn-aq-1"]
    assert (row["status"], row["since"], row["acked_by"]) == ("firing", at(3).isoformat(), None)
    assert await pool.fetchval("SELECT count(*) FROM alert_acks") == 1  # the history stays


# --- end to end: the service, MQTT, the CLI, a real receiver ------------------------------------------


LEVEL_RULE = """
[[rules]]
name = "level-high"
metric = "level"
above = 5.0
clear = 4.0
severity = "critical"
webhooks = ["ops"]
labels = { team = "hydro" }
"""


def _rows(db: str, query: str) -> list[tuple[Any, ...]]:
    with psycopg.connect(db) as c:
        return c.execute(query).fetchall()  # type: ignore[arg-type]


def test_a_silenced_episode_delivers_nothing_and_expiring_it_sends_one_firing(
        tmp_path: Path, database_url: str, broker: Mosquitto, topic_prefix: str, receiver: WebhookReceiver,
        ingests: list[IngestProcess], cli: Any) -> None:
    t0 = (datetime.now(UTC) - timedelta(minutes=30)).replace(second=0, microsecond=0)  # young: notified
    secret = new_secret()
    cfg = write_config(tmp_path / "ingest.toml", prefix=topic_prefix, database_url=database_url, mqtt_url=broker.url,
                       extra=alerts_config(receiver.url(), LEVEL_RULE))
    ingest = IngestProcess(cfg, tmp_path / "ingest.log", env={SECRET_ENV: secret})
    ingests.append(ingest)
    ingest.start()
    pub = Publisher(broker.port)
    sent = 0

    def send(device: str, minutes: float, value: float) -> None:
        nonlocal sent
        when = (t0 + timedelta(minutes=minutes)).isoformat()
        pub.publish_all([(f"{topic_prefix}/{device}/up", native(device, when, {"level": value}))])
        sent += 1
        wait_until(lambda: ingest.metric("sensor_ingest_messages_acked_total") >= sent, WAIT, f"message {sent} acked")

    def event_rows() -> list[tuple[Any, ...]]:
        return _rows(database_url, "SELECT e.id, d.uid, e.status, e.value, e.notified, e.silenced_by"
                     " FROM alert_events e JOIN devices d ON d.id = e.device_id ORDER BY e.id")

    def outbox_rows() -> list[tuple[Any, ...]]:
        return _rows(database_url, "SELECT id, event_id, status FROM alert_outbox ORDER BY id")

    try:
        status, added, _ = cli("silences", "add", "--device", "hn-lv-0*", "--label", "team=hydro", "--until", "1h",
                               "--comment", "gauge maintenance", "--json")
        assert status == 0
        sid = added["id"]
        send("hn-lv-01", 1, 6.0)  # silenced
        send("hn-lv-11", 1, 6.0)  # not matched by the glob: delivered
        wait_until(lambda: len(receiver.delivered()) == 1, WAIT, "hn-lv-11's firing delivered")
        send("hn-lv-01", 2, 3.0)  # the silenced episode resolves: nothing either
        send("hn-lv-01", 3, 7.0)  # a new episode, silenced too
        events = event_rows()
        assert [e[1:] for e in events] == [
            ("hn-lv-01", "firing", 6.0, False, sid), ("hn-lv-11", "firing", 6.0, True, None),
            ("hn-lv-01", "resolved", 3.0, False, sid), ("hn-lv-01", "firing", 7.0, False, sid)]
        assert [o[1] for o in outbox_rows()] == [events[1][0]]  # no outbox row for a silenced event
        assert [d.json()["device"] for d in receiver.requests()] == ["hn-lv-11"]
        status, listed, _ = cli("silences", "list", "--json")
        # Holding one firing alert now (hn-lv-01's second episode); three events silenced in all.
        assert [(s["id"], s["holding"], s["events_silenced"]) for s in listed] == [(sid, 1, 3)]
        assert ingest.metric("sensor_ingest_alert_events_silenced_total") == 3
        status, alerts, _ = cli("alerts", "list", "--json")
        assert {(a["alert"], a["silenced_by"]) for a in alerts} == {("level-high/hn-lv-01", sid),
                                                                     ("level-high/hn-lv-11", None)}
        assert cli("alerts", "ack", "level-high/hn-lv-01", "--comment", "known: maintenance")[0] == 0

        # Expired while hn-lv-01 fires: its held firing notification, once, within the job's period.
        assert cli("silences", "expire", str(sid))[0] == 0
        wait_until(lambda: len(receiver.delivered()) == 2, WAIT, "the held firing notification delivered")
        held_event = events[3][0]
        released = receiver.delivered()[1].json()
        assert (released["id"], released["status"], released["device"], released["value"]) == (
            f"evt_{held_event}", "firing", "hn-lv-01", 7.0)
        assert released["starts_at"] == (t0 + timedelta(minutes=3)).strftime("%Y-%m-%dT%H:%M:%SZ")
        assert [o[1] for o in outbox_rows()] == [events[1][0], held_event]
        assert _rows(database_url, "SELECT count(*) FROM alert_held") == [(0,)]
        assert [e[4] for e in event_rows()] == [False, True, False, True]
        status, listed, _ = cli("silences", "list", "--all", "--json")
        assert [(s["id"], s["state"], s["holding"], s["events_silenced"]) for s in listed] == [(sid, "expired", 0, 3)]
        history = {e["id"]: e for e in cli("alerts", "history", "--json")[1]}
        assert (history[held_event]["notified"], history[held_event]["silenced_by"]) == (True, sid)
        assert history[held_event]["released_at"] is not None
        assert history[events[2][0]]["released_at"] is None
        # The episode's end is sent after its firing; the first episode's never.
        send("hn-lv-01", 4, 3.0)
        wait_until(lambda: len(receiver.delivered()) == 3, WAIT, "the resolved notification delivered")
        assert [(b["device"], b["status"], b["value"]) for b in (d.json() for d in receiver.delivered())] == [
            ("hn-lv-11", "firing", 6.0), ("hn-lv-01", "firing", 7.0), ("hn-lv-01", "resolved", 3.0)]
        assert len(receiver.requests()) == 3
        assert ingest.terminate() == 0
    finally:
        pub.close()
